"""The fixed-newstyle NBD negotiation as a state machine, for either role, without I/O.

Bytes in → events out (:meth:`Handshake.receive_data` + :meth:`Handshake.next_event`), events in →
bytes out (:meth:`Handshake.send`). The caller owns the socket: it writes what ``send`` returns and
feeds what it reads. Every move of the state is in :data:`TRANSITIONS`, keyed by ``(state, event
class)``; anything else raises :class:`~pyrep.nbd.proto.LocalProtocolError` (our side) or
:class:`~pyrep.nbd.proto.ProtocolError` (the peer), naming the role and the state.

A conversation::

    server                     state                client
    Greeting          ───►     GREETING → CLIENT_FLAGS
                      ◄───     ClientFlags          → OPTIONS
                      ◄───     an option (Go, List, StartTLS, ...)  → REPLY_<option>
    replies (InfoExport, Server, MetaContext, ...), then Ack or OptionError
                               → OPTIONS, TRANSMISSION (Go + Ack, ExportName + ExportNameReply),
                                 TLS (StartTLS + Ack: both sides run the TLS handshake on the
                                 transport, then call tls_established() → OPTIONS), CLOSED (Abort)

Once in ``TRANSMISSION``, :meth:`Handshake.trailing_data` hands over bytes read past the negotiation.
Negotiated facts are attributes: ``no_zeroes``, ``structured_reply``, ``meta_contexts`` (name → id),
``export_size``/``export_flags`` (client), ``tls_active``.
"""
from dataclasses import dataclass, field

from . import proto as P
from .proto import LocalProtocolError, ProtocolError

CLIENT = "client"
SERVER = "server"

# states
GREETING = "GREETING"               # the server's greeting is due
CLIENT_FLAGS = "CLIENT_FLAGS"       # the client's flags are due
OPTIONS = "OPTIONS"                 # the client may send an option
REPLY_EXPORT_NAME = "REPLY_EXPORT_NAME"
REPLY_GO = "REPLY_GO"
REPLY_INFO = "REPLY_INFO"
REPLY_LIST = "REPLY_LIST"
REPLY_META = "REPLY_META"
REPLY_STARTTLS = "REPLY_STARTTLS"
REPLY_ABORT = "REPLY_ABORT"
REPLY_SIMPLE = "REPLY_SIMPLE"       # an option answered by Ack or an error only
TLS = "TLS"                         # STARTTLS acknowledged: the transport runs the TLS handshake
TRANSMISSION = "TRANSMISSION"
CLOSED = "CLOSED"

NEED_DATA = object()                # next_event(): more bytes are needed


# ------------------------------------------------------------------ events
class Event:
    sender = None


# --- server → client
@dataclass(frozen=True)
class Greeting(Event):
    flags: int = P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES
    sender = SERVER


@dataclass(frozen=True)
class Reply(Event):
    """Base of the option replies; ``option`` is filled in by the machine when omitted."""
    sender = SERVER


@dataclass(frozen=True)
class Ack(Reply):
    option: int = 0


@dataclass(frozen=True)
class Server(Reply):
    """One export of a LIST."""
    name: str = ""
    details: str = ""
    option: int = 0


@dataclass(frozen=True)
class InfoExport(Reply):
    size: int = 0
    flags: int = 0
    option: int = 0


@dataclass(frozen=True)
class InfoName(Reply):
    name: str = ""
    option: int = 0


@dataclass(frozen=True)
class InfoDescription(Reply):
    description: str = ""
    option: int = 0


@dataclass(frozen=True)
class InfoBlockSize(Reply):
    minimum: int = 1
    preferred: int = P.PREFERRED_BLOCK
    maximum: int = P.MAX_PAYLOAD
    option: int = 0


@dataclass(frozen=True)
class InfoUnknown(Reply):
    """An INFO item of a type we do not know (clients must ignore it)."""
    info_type: int = 0
    data: bytes = b""
    option: int = 0


@dataclass(frozen=True)
class MetaContext(Reply):
    context_id: int = 0
    name: str = ""
    option: int = 0


@dataclass(frozen=True)
class OptionError(Reply):
    """An error reply (``code`` is one of ``proto.REP_ERR_*``)."""
    code: int = P.REP_ERR_UNSUP
    message: str = ""
    option: int = 0


@dataclass(frozen=True)
class ExportNameReply(Event):
    """The answer to EXPORT_NAME (there is no error reply: the server closes instead)."""
    size: int = 0
    flags: int = 0
    sender = SERVER


# --- client → server
@dataclass(frozen=True)
class ClientFlags(Event):
    flags: int = P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES
    sender = CLIENT


@dataclass(frozen=True)
class Option(Event):
    """Base of the option requests."""
    sender = CLIENT
    code = 0


@dataclass(frozen=True)
class ExportName(Option):
    name: str = ""
    code = P.OPT_EXPORT_NAME


@dataclass(frozen=True)
class Go(Option):
    name: str = ""
    requests: tuple = ()        # INFO_* types asked for
    code = P.OPT_GO


@dataclass(frozen=True)
class Info(Option):
    name: str = ""
    requests: tuple = ()
    code = P.OPT_INFO


@dataclass(frozen=True)
class List(Option):
    code = P.OPT_LIST


@dataclass(frozen=True)
class Abort(Option):
    code = P.OPT_ABORT


@dataclass(frozen=True)
class StructuredReply(Option):
    code = P.OPT_STRUCTURED_REPLY


@dataclass(frozen=True)
class StartTLS(Option):
    code = P.OPT_STARTTLS


@dataclass(frozen=True)
class SetMetaContext(Option):
    export: str = ""
    queries: tuple = ()
    code = P.OPT_SET_META_CONTEXT


@dataclass(frozen=True)
class ListMetaContext(Option):
    export: str = ""
    queries: tuple = ()
    code = P.OPT_LIST_META_CONTEXT


@dataclass(frozen=True)
class UnknownOption(Option):
    """An option we do not implement (the server answers ERR_UNSUP)."""
    option: int = 0
    data: bytes = b""

    @property
    def code(self):
        return self.option


@dataclass(frozen=True)
class InvalidOption(Option):
    """A known option whose data is malformed (the server answers ERR_INVALID)."""
    option: int = 0
    data: bytes = b""
    reason: str = ""

    @property
    def code(self):
        return self.option


# --- local
@dataclass(frozen=True)
class TLSEstablished(Event):
    """Both sides: the transport finished the TLS handshake after STARTTLS."""


_INFO_REPLIES = (InfoExport, InfoName, InfoDescription, InfoBlockSize, InfoUnknown)

_OPTION_STATE = {
    ExportName: REPLY_EXPORT_NAME, Go: REPLY_GO, Info: REPLY_INFO, List: REPLY_LIST, Abort: REPLY_ABORT,
    StructuredReply: REPLY_SIMPLE, StartTLS: REPLY_STARTTLS, SetMetaContext: REPLY_META,
    ListMetaContext: REPLY_META, UnknownOption: REPLY_SIMPLE, InvalidOption: REPLY_SIMPLE,
}


def _table():
    t = {(GREETING, Greeting): CLIENT_FLAGS, (CLIENT_FLAGS, ClientFlags): OPTIONS, (TLS, TLSEstablished): OPTIONS}
    for cls, state in _OPTION_STATE.items():
        t[(OPTIONS, cls)] = state
    for state, after_ack in ((REPLY_GO, TRANSMISSION), (REPLY_INFO, OPTIONS), (REPLY_LIST, OPTIONS),
                             (REPLY_META, OPTIONS), (REPLY_SIMPLE, OPTIONS), (REPLY_STARTTLS, TLS),
                             (REPLY_ABORT, CLOSED)):
        t[(state, Ack)] = after_ack
        t[(state, OptionError)] = CLOSED if state == REPLY_ABORT else OPTIONS
    for cls in _INFO_REPLIES:
        t[(REPLY_GO, cls)] = REPLY_GO
        t[(REPLY_INFO, cls)] = REPLY_INFO
    t[(REPLY_LIST, Server)] = REPLY_LIST
    t[(REPLY_META, MetaContext)] = REPLY_META
    t[(REPLY_EXPORT_NAME, ExportNameReply)] = TRANSMISSION
    return t


#: (state, event class) → next state: the whole negotiation.
TRANSITIONS = _table()


# ------------------------------------------------------------------ helpers
def _string(data, pos, what):
    """A u32-length-prefixed string at ``pos``: (text, next pos); ValueError when malformed."""
    if pos + 4 > len(data):
        raise ValueError(f"{what}: truncated length")
    n = P.U32.unpack_from(data, pos)[0]
    pos += 4
    if n > P.MAX_STRING or pos + n > len(data):
        raise ValueError(f"{what}: length {n} exceeds the data or {P.MAX_STRING} bytes")
    return bytes(data[pos:pos + n]).decode("utf-8", "surrogateescape"), pos + n


def _pack_string(text):
    b = text.encode("utf-8", "surrogateescape")
    if len(b) > P.MAX_STRING:
        raise LocalProtocolError(f"string of {len(b)} bytes exceeds {P.MAX_STRING}")
    return P.U32.pack(len(b)) + b


def _parse_option(code, data):
    """The event for option ``code`` with ``data`` (malformed → InvalidOption)."""
    try:
        if code == P.OPT_EXPORT_NAME:
            if len(data) > P.MAX_STRING:
                raise ValueError("export name too long")
            return ExportName(bytes(data).decode("utf-8", "surrogateescape"))
        if code in (P.OPT_GO, P.OPT_INFO):
            name, pos = _string(data, 0, "export name")
            if pos + 2 > len(data):
                raise ValueError("missing the count of information requests")
            n = P.U16.unpack_from(data, pos)[0]
            pos += 2
            if pos + 2 * n != len(data):
                raise ValueError(f"{n} information requests do not match {len(data) - pos} bytes")
            reqs = tuple(P.U16.unpack_from(data, pos + 2 * i)[0] for i in range(n))
            return (Go if code == P.OPT_GO else Info)(name, reqs)
        if code in (P.OPT_LIST, P.OPT_ABORT, P.OPT_STRUCTURED_REPLY, P.OPT_STARTTLS):
            if data:
                raise ValueError("this option takes no data")
            return {P.OPT_LIST: List, P.OPT_ABORT: Abort, P.OPT_STRUCTURED_REPLY: StructuredReply,
                    P.OPT_STARTTLS: StartTLS}[code]()
        if code in (P.OPT_SET_META_CONTEXT, P.OPT_LIST_META_CONTEXT):
            export, pos = _string(data, 0, "export name")
            if pos + 4 > len(data):
                raise ValueError("missing the count of queries")
            n = P.U32.unpack_from(data, pos)[0]
            pos += 4
            queries = []
            for _ in range(n):
                q, pos = _string(data, pos, "query")
                queries.append(q)
            if pos != len(data):
                raise ValueError("trailing bytes after the queries")
            return (SetMetaContext if code == P.OPT_SET_META_CONTEXT else ListMetaContext)(export, tuple(queries))
    except ValueError as e:
        return InvalidOption(code, bytes(data), str(e))
    return UnknownOption(code, bytes(data))


def _option_data(ev):
    if isinstance(ev, ExportName):
        return ev.name.encode("utf-8", "surrogateescape")
    if isinstance(ev, (Go, Info)):
        return _pack_string(ev.name) + P.U16.pack(len(ev.requests)) + b"".join(P.U16.pack(r) for r in ev.requests)
    if isinstance(ev, (SetMetaContext, ListMetaContext)):
        return (_pack_string(ev.export) + P.U32.pack(len(ev.queries)) +
                b"".join(_pack_string(q) for q in ev.queries))
    if isinstance(ev, (UnknownOption, InvalidOption)):
        return ev.data
    return b""


def _reply_payload(ev):
    """(reply type, payload) of an option reply event."""
    if isinstance(ev, Ack):
        return P.REP_ACK, b""
    if isinstance(ev, Server):
        return P.REP_SERVER, _pack_string(ev.name) + ev.details.encode("utf-8", "surrogateescape")
    if isinstance(ev, InfoExport):
        return P.REP_INFO, P.INFO_EXPORT_PAYLOAD.pack(P.INFO_EXPORT, ev.size, ev.flags)
    if isinstance(ev, InfoName):
        return P.REP_INFO, P.U16.pack(P.INFO_NAME) + ev.name.encode("utf-8", "surrogateescape")
    if isinstance(ev, InfoDescription):
        return P.REP_INFO, P.U16.pack(P.INFO_DESCRIPTION) + ev.description.encode("utf-8", "surrogateescape")
    if isinstance(ev, InfoBlockSize):
        return P.REP_INFO, P.INFO_BLOCK_SIZE_PAYLOAD.pack(P.INFO_BLOCK_SIZE, ev.minimum, ev.preferred, ev.maximum)
    if isinstance(ev, InfoUnknown):
        return P.REP_INFO, P.U16.pack(ev.info_type) + ev.data
    if isinstance(ev, MetaContext):
        return P.REP_META_CONTEXT, P.U32.pack(ev.context_id) + ev.name.encode("utf-8", "surrogateescape")
    if isinstance(ev, OptionError):
        if not ev.code & P.REP_FLAG_ERROR:
            raise LocalProtocolError(f"option error code {ev.code:#x} lacks the error bit")
        return ev.code, ev.message.encode("utf-8", "surrogateescape")[:P.MAX_STRING]
    raise LocalProtocolError(f"{type(ev).__name__} is not an option reply")


def _parse_reply(option, rtype, data):
    text = lambda b: bytes(b).decode("utf-8", "surrogateescape")  # noqa: E731
    if rtype == P.REP_ACK:
        if data:
            raise ProtocolError("ACK reply with data")
        return Ack(option)
    if rtype == P.REP_SERVER:
        try:
            name, pos = _string(data, 0, "export name")
        except ValueError as e:
            raise ProtocolError(f"malformed SERVER reply: {e}") from None
        return Server(name, text(data[pos:]), option)
    if rtype == P.REP_INFO:
        if len(data) < 2:
            raise ProtocolError("INFO reply without a type")
        itype = P.U16.unpack_from(data)[0]
        if itype == P.INFO_EXPORT:
            if len(data) != P.INFO_EXPORT_PAYLOAD.size:
                raise ProtocolError(f"INFO_EXPORT of {len(data)} bytes")
            _, size, flags = P.INFO_EXPORT_PAYLOAD.unpack(data)
            return InfoExport(size, flags, option)
        if itype == P.INFO_NAME:
            return InfoName(text(data[2:]), option)
        if itype == P.INFO_DESCRIPTION:
            return InfoDescription(text(data[2:]), option)
        if itype == P.INFO_BLOCK_SIZE:
            if len(data) != P.INFO_BLOCK_SIZE_PAYLOAD.size:
                raise ProtocolError(f"INFO_BLOCK_SIZE of {len(data)} bytes")
            _, mn, pref, mx = P.INFO_BLOCK_SIZE_PAYLOAD.unpack(data)
            return InfoBlockSize(mn, pref, mx, option)
        return InfoUnknown(itype, bytes(data[2:]), option)
    if rtype == P.REP_META_CONTEXT:
        if len(data) < 4:
            raise ProtocolError("META_CONTEXT reply without an id")
        return MetaContext(P.U32.unpack_from(data)[0], text(data[4:]), option)
    if rtype & P.REP_FLAG_ERROR:
        return OptionError(rtype, text(data), option)
    raise ProtocolError(f"unknown option reply type {rtype:#x}")


# ------------------------------------------------------------------ the machine
class Handshake:
    """One side (``role``: :data:`CLIENT` or :data:`SERVER`) of an NBD negotiation.

    Not thread-safe: one connection, one thread at a time."""

    def __init__(self, role):
        if role not in (CLIENT, SERVER):
            raise ValueError(f"role must be {CLIENT!r} or {SERVER!r}, not {role!r}")
        self.role = role
        self.state = GREETING
        self._buf = bytearray()
        self.pending = None             # the option (event) being answered
        self.server_flags = 0
        self.client_flags = 0
        self.no_zeroes = False
        self.structured_reply = False
        self.meta_contexts = {}         # name -> id, from the last SET_META_CONTEXT
        self.export_name = None         # the export chosen by GO / EXPORT_NAME
        self.export_size = None         # (client) what the server said
        self.export_flags = None
        self.tls_active = False

    def __repr__(self):
        return f"<Handshake {self.role} {self.state}>"

    # ---------------------------------------------------------- transitions
    def _move(self, ev, by_us):
        key = (self.state, type(ev))
        nxt = TRANSITIONS.get(key)
        if nxt is None:
            err = LocalProtocolError if by_us else ProtocolError
            who = "we" if by_us else "the peer"
            raise err(f"NBD {self.role}: {who} cannot {'send' if by_us else 'receive'} "
                      f"{type(ev).__name__} in state {self.state}")
        self._apply(ev)
        self.state = nxt

    def _apply(self, ev):
        """Record what an event negotiates (before the state moves)."""
        if isinstance(ev, Greeting):
            self.server_flags = ev.flags
        elif isinstance(ev, ClientFlags):
            self.client_flags = ev.flags
            self.no_zeroes = bool(self.server_flags & P.FLAG_NO_ZEROES and ev.flags & P.FLAG_C_NO_ZEROES)
        elif isinstance(ev, Option):
            self.pending = ev
            if isinstance(ev, SetMetaContext):
                self.meta_contexts = {}
        elif isinstance(ev, MetaContext) and isinstance(self.pending, SetMetaContext):
            self.meta_contexts[ev.name] = ev.context_id
        elif isinstance(ev, InfoExport) and isinstance(self.pending, Go):
            self.export_size, self.export_flags = ev.size, ev.flags
        elif isinstance(ev, Ack):
            if isinstance(self.pending, StructuredReply):
                self.structured_reply = True
            elif isinstance(self.pending, Go):
                self.export_name = self.pending.name
        elif isinstance(ev, ExportNameReply):
            self.export_name = self.pending.name
            self.export_size, self.export_flags = ev.size, ev.flags
        elif isinstance(ev, TLSEstablished):
            self.tls_active = True
        if isinstance(ev, (Ack, OptionError, ExportNameReply, TLSEstablished)):
            if not isinstance(ev, TLSEstablished):
                self.pending = None

    # ---------------------------------------------------------- sending
    def send(self, ev):
        """Bytes to write for ``ev`` (an event our role sends); moves the state."""
        if ev.sender != self.role:
            raise LocalProtocolError(f"NBD {self.role}: {type(ev).__name__} is sent by the "
                                     f"{ev.sender}, not by us (state {self.state})")
        pending = self.pending
        self._move(ev, True)
        if isinstance(ev, Greeting):
            return P.GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, ev.flags)
        if isinstance(ev, ClientFlags):
            return P.CLIENT_FLAGS.pack(ev.flags)
        if isinstance(ev, Option):
            data = _option_data(ev)
            return P.OPTION_HEADER.pack(P.IHAVEOPT, ev.code, len(data)) + data
        if isinstance(ev, ExportNameReply):
            return P.EXPORT_NAME_REPLY.pack(ev.size, ev.flags) + (b"" if self.no_zeroes else
                                                                    bytes(P.EXPORT_NAME_ZEROES))
        rtype, payload = _reply_payload(ev)
        return P.OPTION_REPLY_HEADER.pack(P.REPLY_MAGIC, pending.code, rtype, len(payload)) + payload

    def tls_established(self):
        """The transport finished its TLS handshake after an acknowledged STARTTLS."""
        self._move(TLSEstablished(), True)

    # ---------------------------------------------------------- receiving
    def receive_data(self, data):
        """Feed bytes read from the peer (``b""`` is end of stream)."""
        if not data:
            self._eof = True
        self._buf += data

    def trailing_data(self):
        """Bytes received beyond the negotiation (hand them to the transmission phase)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def next_event(self):
        """The next event from the peer, or :data:`NEED_DATA`; raises ProtocolError on bad input."""
        ev = self._parse()
        if ev is NEED_DATA:
            if getattr(self, "_eof", False):
                raise ProtocolError(f"NBD {self.role}: the peer closed the connection in state {self.state}")
            return ev
        self._move(ev, False)
        return ev

    def _take(self, n):
        if len(self._buf) < n:
            return None
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _parse(self):
        buf, st = self._buf, self.state
        if self.role == SERVER:
            if st == CLIENT_FLAGS:
                b = self._take(4)
                if b is None:
                    return NEED_DATA
                flags = P.CLIENT_FLAGS.unpack(b)[0]
                if flags & ~P.KNOWN_CLIENT_FLAGS:
                    raise ProtocolError(f"NBD server: unknown client flags {flags:#x}")
                return ClientFlags(flags)
            if st == OPTIONS:
                if len(buf) < P.OPTION_HEADER.size:
                    return NEED_DATA
                magic, code, length = P.OPTION_HEADER.unpack_from(buf)
                if magic != P.IHAVEOPT:
                    raise ProtocolError(f"NBD server: option with bad magic {magic:#x}")
                if length > P.MAX_OPTION_DATA:
                    raise ProtocolError(f"NBD server: option {code} carries {length} bytes "
                                        f"(more than {P.MAX_OPTION_DATA})")
                if len(buf) < P.OPTION_HEADER.size + length:
                    return NEED_DATA
                self._take(P.OPTION_HEADER.size)
                return _parse_option(code, self._take(length))
            # options may be pipelined: later ones wait in the buffer until our replies are sent
            return NEED_DATA
        # client
        if st == GREETING:
            b = self._take(P.GREETING.size)
            if b is None:
                return NEED_DATA
            magic, opt_magic, flags = P.GREETING.unpack(b)
            if magic != P.NBDMAGIC:
                raise ProtocolError(f"NBD client: not an NBD server (magic {magic:#x})")
            if opt_magic != P.IHAVEOPT:
                raise ProtocolError("NBD client: the server speaks the oldstyle protocol (not supported)")
            if not flags & P.FLAG_FIXED_NEWSTYLE:
                raise ProtocolError("NBD client: the server does not offer fixed newstyle negotiation")
            return Greeting(flags)
        if st == REPLY_EXPORT_NAME:
            need = P.EXPORT_NAME_REPLY.size + (0 if self.no_zeroes else P.EXPORT_NAME_ZEROES)
            b = self._take(need)
            if b is None:
                return NEED_DATA
            size, flags = P.EXPORT_NAME_REPLY.unpack_from(b)
            return ExportNameReply(size, flags)
        if st in (REPLY_GO, REPLY_INFO, REPLY_LIST, REPLY_META, REPLY_STARTTLS, REPLY_ABORT, REPLY_SIMPLE):
            if len(buf) < P.OPTION_REPLY_HEADER.size:
                return NEED_DATA
            magic, code, rtype, length = P.OPTION_REPLY_HEADER.unpack_from(buf)
            if magic != P.REPLY_MAGIC:
                raise ProtocolError(f"NBD client: option reply with bad magic {magic:#x}")
            if code != self.pending.code:
                raise ProtocolError(f"NBD client: reply to option {code} while waiting for {self.pending.code}")
            if length > P.MAX_OPTION_DATA:
                raise ProtocolError(f"NBD client: option reply of {length} bytes")
            if len(buf) < P.OPTION_REPLY_HEADER.size + length:
                return NEED_DATA
            self._take(P.OPTION_REPLY_HEADER.size)
            return _parse_reply(code, rtype, self._take(length))
        if buf and st != TRANSMISSION:
            raise ProtocolError(f"NBD client: unexpected data from the server in state {st}")
        return NEED_DATA
