"""The NBD client: one connection to one export, many requests in flight, reconnecting.

The only client module that touches sockets. Messages and the negotiation are
:mod:`pyrep.nbd.proto`'s and :mod:`pyrep.nbd.handshake`'s (sans-I/O); this
module moves their bytes, wraps the socket in TLS when the negotiation says so,
and runs the transmission phase:

- callers on any thread (or coroutines through the backend's thread pool) register
  a request under a fresh cookie and send it, header and payload at once, under the
  send lock (requests never interleave on the wire);
- the callers themselves receive the replies (QEMU's client does the same): one
  waiting caller at a time holds the *reader role* and reads replies, simple or
  structured, in any order, completing the request each cookie names (read payloads
  go straight into that caller's buffers) until its own request is complete; then
  it hands the role to another waiting caller, if any. The others sleep until their
  request completes or the role is handed to them. No thread sits between the socket
  and the caller: a reply costs one wake-up (the caller's own), not two (a reader
  thread's, then the caller's), and with a short poll of the socket before sleeping
  (:class:`pyrep.nbd._poll.PolledReceiver`, adaptive), often none.

Disconnects (QEMU's ``reconnect-delay``). When the connection breaks (EOF, a reset,
a protocol error from the server), with ``reconnect_delay == 0`` every request in
flight and every later one fails at once with ``BlockError(EIO)``. Otherwise a
reconnect thread connects and negotiates again; until ``reconnect_delay`` seconds
after the break, requests (those in flight and new ones) wait, and once connected
again every request not yet answered is sent again with its original payload:
nothing acknowledged is lost and nothing unacknowledged is dropped (NBD's write,
zero and trim are idempotent). When the delay passes first, the waiting requests
fail with EIO, later ones fail at once, and the thread keeps trying: a server that
comes back later serves new requests. The export must come back with the same size.

Lifecycle of a client (``_MOVES``): ``new → connected → (reconnecting ↔ connected)
→ failed → connected ...``, and anything ``→ closed``.

Locks: ``_send_lock`` guards the socket's sending side and ``_conn`` changes;
``_cond`` guards ``_state``, ``_deadline`` and the reconnect thread. Order:
``_send_lock`` before ``_cond``. ``_inflight`` (cookie → request) is a dict used
with atomic operations only (``pop`` claims a request: whoever pops it completes it).
``_rmu`` guards the reader role (``_reading``, ``_sleepers``, and each request's ``completed``,
``sleeping``, ``handoff``); it is taken last and held only for a few assignments. The reader never
sends.

A break of the connection is noticed by whoever reads next: while requests are in flight, at once; an
idle client notices when it next sends a request (as QEMU's client does).
"""
import bisect
import collections
import errno
import itertools
import socket
import ssl
import struct
import threading
import time
from _thread import allocate_lock

from pyrep.blocking import about_to_wait
from pyrep.errors import BlockError, OptionError

from . import proto
from ._poll import PolledReceiver
from .proto import ProtocolError
from .transmission import BlockStatusChunk, ErrorChunk, OffsetHole, pack_request, parse_chunk, unpack_reply_header

__all__ = ["Address", "ExportInfo", "NbdClient", "DEFAULT_PORT"]

DEFAULT_PORT = 10809
_CONNECT_ATTEMPT_TIMEOUT = 5.0      # one connect + negotiation while reconnecting (bounded by the deadline)
_BACKOFF_MIN, _BACKOFF_MAX = 0.02, 0.5
_RECV_BUF = 256 * 1024
_RECV_SLACK = 4096
_SENDMSG_MAX = 512
_SIMPLE_REPLY = proto.SIMPLE_REPLY
_REQUEST_SIZE = proto.REQUEST.size
_CLOSE_JOIN = 5.0                   # seconds close() waits for the reconnect thread's attempt
_DISC_WAIT = 1.0                    # seconds close() waits for the send lock to say goodbye

_MOVES = {
    "new": {"connected", "failed", "closed"},
    "connected": {"reconnecting", "failed", "closed"},
    "reconnecting": {"connected", "failed", "closed"},
    "failed": {"connected", "closed"},
    "closed": set(),
}


# ----------------------------------------------------------------- addresses
class Address:
    """A server address as QEMU's SocketAddress: ``{"type": "inet", "host", "port"}`` or
    ``{"type": "unix", "path"}``."""

    __slots__ = ("type", "host", "port", "path")

    def __init__(self, type, host=None, port=None, path=None):
        self.type, self.host, self.port, self.path = type, host, port, path

    @classmethod
    def from_dict(cls, d, driver="nbd", key="server"):
        """Validate a SocketAddress dict (OptionError naming the driver and the key)."""
        if not isinstance(d, dict):
            raise OptionError(f"{driver}: option '{key}': expected a dict such as {{'type': 'unix', 'path': ...}}, got {d!r}")
        kind = d.get("type")
        if kind == "inet":
            extra = set(d) - {"type", "host", "port", "numeric", "ipv4", "ipv6", "keep-alive", "to"}
            host = d.get("host")
            if not isinstance(host, str) or not host:
                raise OptionError(f"{driver}: option '{key}.host': required for type 'inet' (a host name or address)")
            port = d.get("port", DEFAULT_PORT)
            try:
                port = int(port)
            except (TypeError, ValueError):
                raise OptionError(f"{driver}: option '{key}.port': expected a port number, got {port!r}") from None
            if not 0 < port < 65536:
                raise OptionError(f"{driver}: option '{key}.port': {port} is not a TCP port")
            addr = cls("inet", host=host.strip("[]"), port=port)
        elif kind == "unix":
            extra = set(d) - {"type", "path", "abstract", "tight"}
            path = d.get("path")
            if not isinstance(path, str) or not path:
                raise OptionError(f"{driver}: option '{key}.path': required for type 'unix' (the socket's path)")
            addr = cls("unix", path=path)
        else:
            raise OptionError(f"{driver}: option '{key}.type': expected 'inet' or 'unix', got {kind!r}")
        if extra:
            raise OptionError(f"{driver}: option '{key}': unknown key(s) {', '.join(sorted(extra))} for type '{kind}'")
        return addr

    def to_dict(self):
        if self.type == "unix":
            return {"type": "unix", "path": self.path}
        return {"type": "inet", "host": self.host, "port": str(self.port)}

    def connect(self, timeout):
        """A connected stream socket (OSError on failure)."""
        if self.type == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(self.path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def __str__(self):
        if self.type == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class ExportInfo:
    """What the server told us of the export during negotiation."""

    __slots__ = ("name", "size", "flags", "min_block", "pref_block", "max_block", "structured", "context_id",
                 "description")

    def __init__(self, name, size, flags, min_block=1, pref_block=4096, max_block=proto.MAX_PAYLOAD,
                 structured=False, context_id=None, description=None):
        self.name, self.size, self.flags = name, size, flags
        self.min_block, self.pref_block, self.max_block = min_block, pref_block, max_block
        self.structured, self.context_id, self.description = structured, context_id, description

    def has(self, flag):
        return bool(self.flags & flag)


# ------------------------------------------------------------------ requests
_CHANGES_DATA = frozenset((proto.CMD_WRITE, proto.CMD_WRITE_ZEROES, proto.CMD_TRIM))


def _extents_from(entry, offset, length):
    """The extents of a block status answer ``entry`` from ``offset`` (the first one cut to start
    there, at most 64 after it: enough to merge runs, little to copy); None when ``offset`` is outside
    it."""
    _, starts, extents, end = entry
    if not starts or offset < starts[0] or offset >= end:
        return None
    i = bisect.bisect_right(starts, offset) - 1
    n, state = extents[i]
    out = [(starts[i] + n - offset, state)]
    out.extend(extents[i + 1:i + 65])
    return out

class _Request:
    """One command in flight. ``done`` is held until the request completes (a reply, or a failure)."""

    __slots__ = ("cookie", "cmd", "flags", "offset", "length", "payload", "dest", "done", "error", "msg",
                 "extents", "conn", "got", "completed", "sleeping", "handoff")

    def __init__(self, cmd, flags, offset, length, payload=None, dest=None):
        self.cmd, self.flags, self.offset, self.length = cmd, flags, offset, length
        self.payload = payload      # write: list of buffers (kept until the reply: a reconnect resends them)
        self.dest = dest            # read: IOVector of ``length`` bytes
        self.done = allocate_lock()
        self.done.acquire()
        self.error = 0
        self.msg = None
        self.extents = None         # block status: [(length, flags), ...]
        self.conn = None            # the connection it was last sent on
        self.got = 0                # read: bytes of data or holes received (a structured reply must cover all)
        self.completed = False      # answered or failed (see NbdClient._finish)
        self.sleeping = False       # its caller sleeps on ``done`` (it is in NbdClient._sleepers)
        self.handoff = False        # ``done`` was released to hand the caller the reader role


# ---------------------------------------------------------------- connection
class _Conn:
    """One negotiated connection. ``sock`` is the socket; ``io`` carries the bytes: the socket itself,
    or a :class:`_TlsChannel` over it; ``rx`` receives them (used by the reader role's holder only)."""

    def __init__(self, sock, io, info):
        self.sock, self.io, self.info = sock, io, info
        self.tls = io is not sock
        self.rx = _Receiver(io, None if self.tls else sock.fileno())
        self.broken = False

    def send(self, req):
        """Send a request's header and payload (the caller holds the send lock)."""
        head = pack_request(req.cmd, req.cookie, req.offset, req.length, req.flags)
        if req.payload is None:
            self.io.sendall(head)
        elif self.tls:
            self.io.sendall(head)
            for b in req.payload:
                self.io.sendall(b)
        else:
            _sendmsg_all(self.sock, [head] + req.payload, _REQUEST_SIZE + req.length)

    def send_many(self, reqs):
        """Send several requests as one message (the caller holds the send lock): one system call
        and, for the server, one wake-up for all of them."""
        if self.tls:
            for req in reqs:
                self.send(req)
            return
        bufs = []
        total = 0
        for req in reqs:
            bufs.append(pack_request(req.cmd, req.cookie, req.offset, req.length, req.flags))
            total += _REQUEST_SIZE
            if req.payload is not None:
                bufs.extend(req.payload)
                total += req.length
        _sendmsg_all(self.sock, bufs, total)

    def send_nowait(self, data):
        """Send what the socket takes now, without blocking (OSError when it takes nothing)."""
        if self.tls:
            self.io.send_nowait(data)
        else:
            self.sock.send(data, socket.MSG_DONTWAIT)

    def shutdown(self):
        """Wake the reader and any sender blocked on this socket; idempotent."""
        self.broken = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self):
        self.shutdown()
        try:
            self.sock.close()
        except OSError:
            pass


class _TlsChannel:
    """TLS over a plain socket, the TLS state in memory (``ssl.MemoryBIO``), so that one thread can
    receive while others send: OpenSSL forbids two threads in one connection at once, which an
    ``ssl.SSLSocket`` read by the reader thread and written by callers would do.

    Every use of the ``SSLObject`` holds ``lock``; socket reads and writes happen outside it.
    Ciphertext leaves in the order it was made: senders hold the client's send lock from encrypting
    to writing. What a read makes TLS answer by itself (a TLS 1.3 key update) stays in the memory BIO
    and leaves with the next request: the reader never sends, so it never waits for a sender that
    waits for the server that waits for us to read."""

    def __init__(self, sock, context, hostname):
        self.sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_hostname=hostname)
        self.lock = threading.Lock()

    def _feed(self):
        data = self.sock.recv(_RECV_BUF)
        if not data:
            raise ConnectionResetError(errno.ECONNRESET, "the server closed the connection during TLS")
        with self.lock:
            self._in.write(data)

    def handshake(self):
        """The TLS handshake (blocking; the socket's timeout bounds it)."""
        while True:
            try:
                with self.lock:
                    self._tls.do_handshake()
                    out = self._out.read()
                self.sock.sendall(out)
                return
            except ssl.SSLWantReadError:
                with self.lock:
                    out = self._out.read()
                if out:
                    self.sock.sendall(out)
                self._feed()

    def sendall(self, data):
        """Encrypt and send (the caller holds ``send_lock``, or is alone during the negotiation)."""
        with self.lock:
            self._tls.write(data)
            out = self._out.read()
        self.sock.sendall(out)

    def send_nowait(self, data):
        """Encrypt and send what the socket takes now (a goodbye that must not block)."""
        with self.lock:
            self._tls.write(data)
            out = self._out.read()
        self.sock.send(out, socket.MSG_DONTWAIT)

    def recv_into(self, mv):
        """Decrypt into ``mv``; the byte count (0 at the end of the stream)."""
        while True:
            with self.lock:
                try:
                    n = self._tls.read(len(mv), mv)
                except ssl.SSLWantReadError:
                    n = None
                except ssl.SSLZeroReturnError:
                    return 0
            if n is not None:
                return n
            self._feed()

    def recv(self, n):
        buf = bytearray(n)
        k = self.recv_into(memoryview(buf))
        return bytes(buf[:k])


def _sendmsg_all(sock, bufs, total=-1):
    """sendmsg until every byte of ``bufs`` is out (a stream socket may take part of them). With
    ``total`` (their byte count) the common case, all taken at once, needs no views of the buffers."""
    sent = 0
    if 0 <= total and len(bufs) <= _SENDMSG_MAX:
        sent = sock.sendmsg(bufs)
        if sent == total:
            return
    views = [memoryview(b).cast("B") for b in bufs]
    n = sent
    while views:
        while n:
            first = views[0]
            if n >= len(first):
                n -= len(first)
                views.pop(0)
            else:
                views[0] = first[n:]
                n = 0
        while views and not len(views[0]):
            views.pop(0)
        if views:
            n = sock.sendmsg(views[:_SENDMSG_MAX])     # the kernel takes at most IOV_MAX (1024) pieces


class _Receiver:
    """Buffered reads from a socket: small headers come from a buffer, large payloads go straight
    into the destination buffers."""

    __slots__ = ("buf", "view", "start", "end", "recv_into")

    def __init__(self, sock, fd=None):
        """``sock``: what to receive from (a socket or a TLS channel); ``fd``: the plaintext socket's
        descriptor, received from with adaptive polling (:mod:`pyrep.nbd._poll`)."""
        self.recv_into = sock.recv_into if fd is None else PolledReceiver(fd).recv_into
        self.buf = bytearray(_RECV_BUF)
        self.view = memoryview(self.buf)
        self.start = self.end = 0

    def _fill(self, n):
        """Have at least ``n`` bytes buffered (``n`` <= the buffer's size)."""
        if self.end - self.start >= n:
            return
        if self.start:
            avail = self.end - self.start
            self.view[:avail] = self.view[self.start:self.end]
            self.start, self.end = 0, avail
        while self.end < n:
            # a little beyond what is needed: replies without payload batch up, but a read's payload
            # is mostly left in the socket for ``into`` to receive in place (no copy through here)
            got = self.recv_into(self.view[self.end:max(n, self.end + _RECV_SLACK)])
            if not got:
                raise ConnectionResetError(errno.ECONNRESET, "the server closed the connection")
            self.end += got

    def reply_header(self):
        """The next reply header, decoded by ``transmission.unpack_reply_header``."""
        self._fill(16)
        head = unpack_reply_header(self.view[self.start:self.end])
        if head is None:
            self._fill(20)
            head = unpack_reply_header(self.view[self.start:self.end])
        self.start += 16 if head[0] == "simple" else 20
        return head

    def unpack(self, st):
        """Receive and unpack one ``struct.Struct``."""
        self._fill(st.size)
        v = st.unpack_from(self.buf, self.start)
        self.start += st.size
        return v

    def take(self, n):
        """``n`` bytes as bytes (small payloads: messages, extents)."""
        if n <= len(self.buf):
            self._fill(n)
            b = bytes(self.view[self.start:self.start + n])
            self.start += n
            return b
        out = bytearray(n)
        self.into(memoryview(out))
        return bytes(out)

    def into(self, mv):
        """Fill the writable memoryview ``mv`` completely."""
        n = len(mv)
        avail = self.end - self.start
        if avail:
            k = min(avail, n)
            mv[:k] = self.view[self.start:self.start + k]
            self.start += k
            if k == n:
                return
            mv = mv[k:]
        recv_into = self.recv_into
        while len(mv):
            got = recv_into(mv)
            if not got:
                raise ConnectionResetError(errno.ECONNRESET, "the server closed the connection")
            mv = mv[got:]

    def skip(self, n):
        while n:
            k = min(n, len(self.buf))
            self._fill(k)
            self.start += k
            n -= k


# -------------------------------------------------------------------- client
class NbdClient:
    """A client of one export. ``connect()`` once, then the I/O methods from any thread; ``close()``.

    ``tls``: an ``ssl.SSLContext`` for the client side (or None); ``tls_hostname``: the name the
    server's certificate must carry. ``reconnect_delay`` / ``open_timeout`` in seconds, as QEMU's
    options. ``what`` prefixes error messages."""

    def __init__(self, address, export="", tls=None, tls_hostname=None, reconnect_delay=0, open_timeout=0,
                 what="nbd"):
        self.address, self.export = address, export
        self.tls, self.tls_hostname = tls, tls_hostname
        self.reconnect_delay, self.open_timeout = reconnect_delay, open_timeout
        self.what = what
        self.info = None
        self._conn = None
        self._state = "new"
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._inflight = {}
        self._cookies = itertools.count(1)
        self._deadline = None
        self._reconnector = None
        self._stop = threading.Event()
        self._bs_counter = itertools.count(1)
        self._bs_gen = 0                # see _data_changed
        self._bs_cache = None           # (gen, extent starts, extents, end) of the last block status
        self.reconnects = 0             # how many times a broken connection was replaced
        self._rmu = allocate_lock()     # the reader role (see the module docstring)
        self._reading = False           # a caller holds the reader role
        self._sleepers = collections.deque()    # requests whose callers sleep, oldest first
        self.handoffs = 0               # times the reader role passed from one caller to another

    def __repr__(self):
        return f"<NbdClient {self.address} export={self.export!r} {self._state}>"

    @property
    def state(self):
        return self._state

    def _move(self, state):
        """Change state (the caller holds ``_cond``); an illegal move is a bug, caught here."""
        if state not in _MOVES[self._state]:
            raise AssertionError(f"{self.what}: illegal client state move {self._state} -> {state}")
        self._state = state
        self._cond.notify_all()

    def _where(self):
        return f"{self.what}: export '{self.export}' on {self.address}"

    # ------------------------------------------------------------ connecting
    def connect(self):
        """Connect and negotiate, retrying refused or missing servers for ``open_timeout`` seconds.

        Raises BlockError (network, refusal) or OptionError (the server has no such export)."""
        deadline = time.monotonic() + self.open_timeout
        backoff = _BACKOFF_MIN
        while True:
            remaining = deadline - time.monotonic()
            try:
                conn = self._open_conn(max(remaining, _CONNECT_ATTEMPT_TIMEOUT))
                break
            except BlockError:
                raise                   # the server answered, and said no
            except OSError as e:
                err = e.errno if isinstance(e.errno, int) and e.errno > 0 else errno.EIO
                retry = isinstance(e, (ConnectionRefusedError, FileNotFoundError, ConnectionResetError,
                                       socket.timeout))
                if not retry or time.monotonic() + backoff >= deadline:
                    raise BlockError(err, f"{self._where()}: could not connect: {e.strerror or e}") from None
                time.sleep(backoff)     # bounded: open_timeout
                backoff = min(backoff * 2, _BACKOFF_MAX)
        self.info = conn.info
        with self._send_lock, self._cond:
            self._install(conn)

    def _open_conn(self, timeout):
        """A new negotiated connection (OSError, ProtocolError, BlockError, OptionError)."""
        sock = self.address.connect(timeout)
        try:
            sock.settimeout(timeout)
            io, info = self._negotiate(sock)
            sock.settimeout(None)
        except ProtocolError as e:
            sock.close()
            raise BlockError(errno.EIO, f"{self._where()}: negotiation failed: {e}") from None
        except ssl.SSLError as e:
            sock.close()
            raise BlockError(errno.EACCES, f"{self._where()}: TLS handshake failed: {e}") from None
        except BaseException:
            sock.close()
            raise
        return _Conn(sock, io, info)

    def _negotiate(self, sock):
        """Run the client side of the negotiation over ``sock`` (fixed newstyle; STARTTLS first when
        TLS is configured; structured replies and ``base:allocation`` when the server has them; GO,
        or EXPORT_NAME for servers without GO). Returns ``(io, ExportInfo)``: ``io`` carries the
        transmission's bytes, ``sock`` itself or the TLS channel over it."""
        from . import handshake as H     # sans-I/O, shared with the server

        hs = H.Handshake(H.CLIENT)
        where = self._where()

        def event():
            while True:
                ev = hs.next_event()
                if ev is not H.NEED_DATA:
                    return ev
                hs.receive_data(sock.recv(65536))

        def send(ev):
            sock.sendall(hs.send(ev))

        def refused(ev, what):
            if ev.code == proto.REP_ERR_TLS_REQD:
                return BlockError(errno.EACCES, f"{where}: the server requires TLS (give tls-creds)")
            if ev.code == proto.REP_ERR_UNKNOWN:
                return BlockError(errno.ENOENT, f"{where}: the server has no such export"
                                                f"{': ' + ev.message if ev.message else ''}")
            name = proto.REP_NAMES.get(ev.code, hex(ev.code))
            return BlockError(errno.EIO, f"{where}: the server refused {what} ({name})"
                                         f"{': ' + ev.message if ev.message else ''}")

        greeting = event()
        send(H.ClientFlags(proto.FLAG_C_FIXED_NEWSTYLE | (greeting.flags & proto.FLAG_NO_ZEROES and
                                                           proto.FLAG_C_NO_ZEROES)))
        if self.tls is not None:
            send(H.StartTLS())
            ev = event()
            if isinstance(ev, H.OptionError):
                raise refused(ev, "STARTTLS")
            sock = _TlsChannel(sock, self.tls, self.tls_hostname)
            sock.handshake()
            hs.tls_established()
        send(H.StructuredReply())
        ev = event()
        if isinstance(ev, H.OptionError) and ev.code == proto.REP_ERR_TLS_REQD:
            raise refused(ev, "STRUCTURED_REPLY")
        structured = isinstance(ev, H.Ack)
        context_id = None
        if structured:
            send(H.SetMetaContext(self.export, (proto.META_BASE_ALLOCATION,)))
            while True:
                ev = event()
                if isinstance(ev, H.MetaContext):
                    if ev.name == proto.META_BASE_ALLOCATION:
                        context_id = ev.context_id
                    continue
                if isinstance(ev, H.OptionError) and ev.code == proto.REP_ERR_UNKNOWN:
                    raise refused(ev, "SET_META_CONTEXT")
                break                   # Ack, or a server without meta contexts: no block status
        send(H.Go(self.export, (proto.INFO_BLOCK_SIZE,)))
        size = flags = None
        blocks = (1, 4096, proto.MAX_PAYLOAD)
        description = None
        while True:
            ev = event()
            if isinstance(ev, H.InfoExport):
                size, flags = ev.size, ev.flags
            elif isinstance(ev, H.InfoBlockSize):
                blocks = (ev.minimum, ev.preferred, ev.maximum)
            elif isinstance(ev, H.InfoDescription):
                description = ev.description
            elif isinstance(ev, H.Ack):
                break
            elif isinstance(ev, H.OptionError):
                if ev.code != proto.REP_ERR_UNSUP:
                    raise refused(ev, "the export")
                send(H.ExportName(self.export))    # a server without GO
                ev = event()
                size, flags = ev.size, ev.flags
                break
        if size is None:
            raise ProtocolError("the server acknowledged GO without INFO_EXPORT")
        if hs.trailing_data():
            raise ProtocolError("the server sent data before the first request")
        mn, pref, mx = blocks
        if mn < 1 or mn & (mn - 1) or mn > 65536 or mx < mn or pref < mn:
            raise ProtocolError(f"invalid block sizes minimum={mn} preferred={pref} maximum={mx}")
        mx = min(mx, proto.MAX_PAYLOAD) // mn * mn
        info = ExportInfo(self.export, size, flags, mn, pref, mx, structured, context_id, description)
        return sock, info

    def _install(self, conn):
        """Make ``conn`` the live connection and resend what is waiting (holding both locks)."""
        self._data_changed()
        self._conn = conn
        self._move("connected")
        self._deadline = None
        for req in list(self._inflight.values()):
            if req.conn is not conn:
                req.conn = conn
                req.got, req.error, req.msg, req.extents = 0, 0, None, None
                try:
                    conn.send(req)
                except OSError:
                    conn.shutdown()     # the next reader notices; the requests wait for the next connection
                    break
        with self._rmu:
            if not self._reading and self._sleepers:
                self._reading = True    # callers that slept through the break: one of them reads now
                self._hand_role()

    # --------------------------------------------------------- disconnects
    def _lost(self, conn, why):
        """``conn`` broke: fail, or wait for a reconnect, as ``reconnect_delay`` says."""
        conn.shutdown()                 # a sender blocked on the socket returns now
        with self._send_lock, self._cond:
            if self._conn is not conn:
                return                  # already handled, or closing
            self._conn = None
            conn.close()
            if self._state == "closed":
                return
            if self.reconnect_delay <= 0:
                self._move("failed")
                self._fail_all(errno.EIO, f"{self._where()}: connection lost ({why})")
                return
            self._deadline = time.monotonic() + self.reconnect_delay
            self._move("reconnecting")
            if self._reconnector is None:
                self._reconnector = threading.Thread(target=self._reconnect_loop, daemon=True,
                                                     name=f"nbd-reconnect {self.address}")
                self._reconnector.start()

    def _fail_all(self, err, msg):
        for cookie in list(self._inflight):
            req = self._inflight.pop(cookie, None)
            if req is not None:
                req.error, req.msg = err, msg
                self._finish(req)

    def _reconnect_loop(self):
        """Connect again until it works or the client closes; at the deadline, fail what waits."""
        backoff = _BACKOFF_MIN
        try:
            while not self._stop.is_set():
                with self._cond:
                    if self._state in ("connected", "closed"):
                        return
                    if self._state == "reconnecting" and time.monotonic() >= self._deadline:
                        self._move("failed")
                        self._fail_all(errno.EIO, f"{self._where()}: connection lost and not back within "
                                                  f"reconnect-delay={self.reconnect_delay}s")
                    deadline = self._deadline if self._state == "reconnecting" else None
                timeout = _CONNECT_ATTEMPT_TIMEOUT
                if deadline is not None:
                    timeout = max(0.05, min(timeout, deadline - time.monotonic()))
                try:
                    conn = self._open_conn(timeout)
                except Exception:       # noqa: BLE001 - any failed attempt: try again after a pause
                    wait = backoff if deadline is None else max(0.0, min(backoff, deadline - time.monotonic()))
                    self._stop.wait(wait)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
                    continue
                if conn.info.size != self.info.size:
                    conn.close()
                    with self._cond:
                        if self._state != "closed":
                            if self._state != "failed":
                                self._move("failed")
                            self._fail_all(errno.EIO, f"{self._where()}: the export came back with another "
                                                      f"size ({conn.info.size}, was {self.info.size})")
                    return
                with self._send_lock, self._cond:
                    if self._state == "closed":
                        conn.close()
                        return
                    self.reconnects += 1
                    self.info = conn.info
                    self._install(conn)
                return
        finally:
            with self._cond:
                self._reconnector = None
                # a break that came while this thread was finishing needs a new one
                if self._state == "reconnecting" and not self._stop.is_set():
                    self._reconnector = threading.Thread(target=self._reconnect_loop, daemon=True,
                                                         name=f"nbd-reconnect {self.address}")
                    self._reconnector.start()

    # ------------------------------------------------------------- closing
    def close(self):
        """Say goodbye (NBD_CMD_DISC, if it can go without waiting), stop the threads, fail whatever
        still waits. Never blocks on the server: a sender stuck on a full socket is woken by the
        shutdown. Idempotent."""
        self._stop.set()
        with self._cond:
            if self._state == "closed":
                return
            self._move("closed")        # from now on nothing is submitted, and _lost does not reconnect
            conn, reconnector = self._conn, self._reconnector
        if conn is not None:
            if self._send_lock.acquire(timeout=_DISC_WAIT):
                try:
                    conn.send_nowait(pack_request(proto.CMD_DISC, 0, 0, 0))
                except OSError:
                    pass
                finally:
                    self._send_lock.release()
            conn.close()
        with self._send_lock, self._cond:
            self._conn = None
            self._fail_all(errno.EIO, f"{self._where()}: the client was closed")
        if reconnector is not None and reconnector is not threading.current_thread():
            reconnector.join(_CLOSE_JOIN + _CONNECT_ATTEMPT_TIMEOUT)

    # ------------------------------------------------------------ requests
    def _submit(self, cmd, flags, offset, length, payload=None, dest=None):
        req = _Request(cmd, flags, offset, length, payload, dest)
        if cmd in _CHANGES_DATA:
            self._data_changed()
        self._register((req,), proto.CMD_NAMES[cmd])
        with self._send_lock:
            conn = self._conn
            if conn is not None and req.conn is not conn and not conn.broken:
                req.conn = conn
                try:
                    conn.send(req)
                except OSError:
                    conn.shutdown()     # the reader sees it and _lost decides: resend or fail
        return req

    def _submit_many(self, reqs):
        """Register and send the write-type ``_Request`` objects ``reqs`` in one message (see :meth:`_submit`)."""
        self._data_changed()
        self._register(reqs, f"{len(reqs)} writes")
        with self._send_lock:
            conn = self._conn
            if conn is not None and not conn.broken:
                # a reconnect between registering and now may have sent some already (_install)
                todo = [req for req in reqs if req.conn is not conn]
                for req in todo:
                    req.conn = conn
                try:
                    conn.send_many(todo)
                except OSError:
                    conn.shutdown()
        return reqs

    def _register(self, reqs, what):
        """Give each request a cookie and put it in flight; EIO when the client cannot send."""
        with self._cond:
            state = self._state
            if state == "failed" or state == "closed" or state == "new":
                why = "closed" if state == "closed" else "not connected (server gone)"
                raise BlockError(errno.EIO, f"{self._where()}: {what} refused: {why}")
            for req in reqs:
                req.cookie = next(self._cookies)
                self._inflight[req.cookie] = req

    def write_batch(self, reqs):
        """Write ``[(offset, length, iov, fua), ...]`` (independent writes, as if in flight together):
        all sent in one message, then all replies awaited. Returns None or the ``BlockError`` of each.
        A request longer than the server's maximum payload, or a FUA one the server cannot flag, goes
        through :meth:`write` alone."""
        return self.write_batch_start(reqs)()

    def write_batch_start(self, reqs):
        """:meth:`write_batch` in two halves: send the batch now, and return a callable that waits for
        the replies and returns the list of errors (call it once). The requests that go alone (see
        :meth:`write_batch`) are written by the callable."""
        info = self.info
        limit = info.max_block
        fua_flag = info.has(proto.TFLAG_SEND_FUA)
        out = [None] * len(reqs)
        batch, where, alone = [], [], []
        for i, (offset, length, iov, fua) in enumerate(reqs):
            if length > limit or (fua and not fua_flag):
                alone.append(i)
            else:
                batch.append(_Request(proto.CMD_WRITE, proto.CMD_FLAG_FUA if fua else 0, offset, length,
                                      payload=iov.buffers()))
                where.append(i)
        sent = False
        if batch:
            try:
                self._submit_many(batch)
                sent = True
            except BlockError as e:
                for i in where:
                    out[i] = e

        def finish():
            if sent:
                for i, req in zip(where, batch):
                    try:
                        self._wait(req)
                    except BlockError as e:
                        out[i] = e
            for i in alone:
                offset, length, iov, fua = reqs[i]
                try:
                    self.write(offset, length, iov, fua)
                except BlockError as e:
                    out[i] = e
            return out
        return finish

    def _wait(self, req):
        """Until ``req`` completes: read replies while holding the reader role, sleep otherwise."""
        rmu = self._rmu
        lead = False
        if not req.completed:
            about_to_wait()             # a server running this request on our thread may read on meanwhile
        while True:
            with rmu:
                if req.completed:
                    if lead:
                        self._hand_role()
                    break
                conn = self._conn
                readable = conn is not None     # a broken one too: its reader finds out, and calls _lost
                if lead and not readable:
                    lead = False        # nothing to read until a reconnect (_install hands the role on)
                    self._reading = False
                elif not lead and readable and not self._reading:
                    lead = self._reading = True
                if not lead:
                    req.sleeping = True
                    self._sleepers.append(req)
            if lead:
                try:
                    self._read_reply(conn)
                except BaseException:
                    with rmu:           # a bug (or an interrupt) leaves this caller: the role must not go with it
                        self._hand_role()
                    raise
                continue
            req.done.acquire()          # completed, or handed the reader role
            if req.handoff:
                req.handoff = False
                lead = True
        if req.error:
            raise BlockError(req.error, req.msg or f"{self._where()}: {proto.CMD_NAMES[req.cmd]} of {req.length} "
                                                   f"bytes at {req.offset} failed")
        return req

    def _chunks(self, offset, length, limit):
        pos, end = offset, offset + length
        while pos < end:
            n = min(limit, end - pos)
            yield pos, n
            pos += n

    def read(self, offset, length, iov):
        """Fill ``iov`` (an IOVector of ``length`` bytes) from ``offset``; large reads are split at the
        server's maximum payload and sent all at once."""
        limit = self.info.max_block
        if length <= limit:
            return self._wait(self._submit(proto.CMD_READ, 0, offset, length, dest=iov))
        reqs = [self._submit(proto.CMD_READ, 0, pos, n, dest=iov.slice(pos - offset, n))
                for pos, n in self._chunks(offset, length, limit)]
        self._wait_all(reqs)

    def write(self, offset, length, iov, fua=False):
        """Write ``iov`` at ``offset``; ``fua``: stable when this returns (FUA, or a flush after)."""
        info = self.info
        flags = 0
        if fua and info.has(proto.TFLAG_SEND_FUA):
            flags, fua = proto.CMD_FLAG_FUA, False
        limit = info.max_block
        if length <= limit:
            self._wait(self._submit(proto.CMD_WRITE, flags, offset, length, payload=iov.buffers()))
        else:
            self._wait_all([self._submit(proto.CMD_WRITE, flags, pos, n,
                                         payload=iov.slice(pos - offset, n).buffers())
                            for pos, n in self._chunks(offset, length, limit)])
        if fua:
            self.flush()

    def write_zeroes(self, offset, length, may_unmap=False, fast=False, fua=False):
        """WRITE_ZEROES (NO_HOLE unless ``may_unmap``; FAST_ZERO if ``fast``). ENOTSUP when the server
        cannot (or, with ``fast``, cannot do it fast)."""
        info = self.info
        if not info.has(proto.TFLAG_SEND_WRITE_ZEROES):
            raise BlockError(errno.ENOTSUP, f"{self._where()}: the server does not support WRITE_ZEROES")
        flags = 0 if may_unmap else proto.CMD_FLAG_NO_HOLE
        if fast:
            if not info.has(proto.TFLAG_SEND_FAST_ZERO):
                raise BlockError(errno.ENOTSUP, f"{self._where()}: the server cannot zero fast")
            flags |= proto.CMD_FLAG_FAST_ZERO
        if fua and info.has(proto.TFLAG_SEND_FUA):
            flags, fua = flags | proto.CMD_FLAG_FUA, False
        self._wait_all([self._submit(proto.CMD_WRITE_ZEROES, flags, pos, n)
                        for pos, n in self._chunks(offset, length, self._big_limit())])
        if fua:
            self.flush()

    def trim(self, offset, length):
        """TRIM the range if the server advertises it (a hint: otherwise nothing happens)."""
        if not self.info.has(proto.TFLAG_SEND_TRIM):
            return
        self._wait_all([self._submit(proto.CMD_TRIM, 0, pos, n)
                        for pos, n in self._chunks(offset, length, self._big_limit())])

    def flush(self):
        """FLUSH, if the server advertises it (else its writes are stable as acknowledged)."""
        if self.info.has(proto.TFLAG_SEND_FLUSH):
            self._wait(self._submit(proto.CMD_FLUSH, 0, 0, 0))

    def cache(self, offset, length):
        """CACHE (a prefetch hint) if the server advertises it."""
        if self.info.has(proto.TFLAG_SEND_CACHE):
            self._wait_all([self._submit(proto.CMD_CACHE, 0, pos, n)
                            for pos, n in self._chunks(offset, length, self._big_limit())])

    def block_status(self, offset, length):
        """``[(length, flags), ...]`` of ``base:allocation`` from ``offset`` (at least one extent; flags
        are ``proto.STATE_*``). Without the context, everything is data.

        One request asks for the whole range and the server answers with every extent it finds; the
        answer is kept, so walking a disk extent by extent costs one round trip, not one per extent
        (and servers such as qemu-nbd compute the whole range each time). It is used only while no
        write, zero or trim was submitted or completed since it was asked for (``_bs_gen``)."""
        info = self.info
        if info.context_id is None:
            return [(length, 0)]
        cached = self._bs_cache
        if cached is not None and cached[0] == self._bs_gen:
            got = _extents_from(cached, offset, length)
            if got:
                return got
        gen = self._bs_gen
        req = self._wait(self._submit(proto.CMD_BLOCK_STATUS, 0, offset, min(length, self._big_limit())))
        if not req.extents:
            raise BlockError(errno.EIO, f"{self._where()}: the server answered BLOCK_STATUS at {offset} "
                                        f"without extents")
        starts, pos = [], offset
        for n, _ in req.extents:
            starts.append(pos)
            pos += n
        entry = (gen, starts, req.extents, pos)
        if self._bs_gen == gen:
            self._bs_cache = entry
        return _extents_from(entry, offset, length)

    def _data_changed(self):
        """A write-type request was submitted or completed (or the connection changed): cached block
        status may be stale. ``next`` on a counter is atomic, and each value differs from all before."""
        self._bs_gen = next(self._bs_counter)

    def _big_limit(self):
        """The longest zero/trim/status request: 32-bit lengths, kept a multiple of the block size."""
        return (0xFFFFFFFF // max(self.info.min_block, 4096)) * max(self.info.min_block, 4096) // 2

    def _wait_all(self, reqs):
        first = None
        for req in reqs:
            try:
                self._wait(req)
            except BlockError as e:
                first = first or e
        if first is not None:
            raise first

    # ---------------------------------------------------------- reader
    def _hand_role(self):
        """Pass the reader role (held; ``_rmu`` held) to the oldest sleeping caller, or drop it."""
        if self._sleepers:
            req = self._sleepers.popleft()
            req.sleeping = False
            req.handoff = True
            self.handoffs += 1
            req.done.release()
        else:
            self._reading = False

    def _finish(self, req):
        """``req`` is answered or failed (its ``error``/``msg`` set): wake its caller if it sleeps."""
        with self._rmu:
            req.completed = True
            if req.sleeping:
                req.sleeping = False
                self._sleepers.remove(req)
                req.done.release()

    def _read_reply(self, conn):
        """Receive one reply (or one chunk of a structured reply) on ``conn`` and apply it; the caller
        holds the reader role. A broken connection goes to ``_lost``."""
        rx = conn.rx
        inflight = self._inflight
        try:
            head = rx.reply_header()
            req = inflight.get(head[-1] if head[0] == "simple" else head[3])
            if head[0] == "simple":
                _, err, cookie = head
                if req is None:
                    raise ProtocolError(f"a reply for unknown cookie {cookie}")
                if req.cmd == proto.CMD_READ and not err:
                    if conn.info.structured:
                        raise ProtocolError("a simple reply to a read after structured replies were agreed")
                    self._read_data(rx, req, 0, req.length)
                self._complete(req, proto.nbd_to_errno(err))
                self._more_simple(rx, inflight)
                return
            _, flags, rtype, cookie, plen = head
            if req is None:
                raise ProtocolError(f"a reply chunk for unknown cookie {cookie}")
            if rtype == proto.REPLY_TYPE_OFFSET_DATA:
                # the data goes straight into the caller's buffers: no copy, no parse of the payload
                if req.cmd != proto.CMD_READ or plen < 9:
                    raise ProtocolError(f"an OFFSET_DATA chunk of {plen} bytes for {proto.CMD_NAMES[req.cmd]}")
                off, = rx.unpack(proto.U64)
                self._check_range(req, off, plen - 8)
                self._read_data(rx, req, off - req.offset, plen - 8)
            else:
                self._chunk(conn, req, rtype, parse_chunk(rtype, rx.take(plen)))
            if flags & proto.REPLY_FLAG_DONE:
                if req.cmd == proto.CMD_READ and not req.error and req.got != req.length:
                    raise ProtocolError(f"the reply to a read of {req.length} bytes covered {req.got}")
                self._complete(req, req.error)
        except (OSError, ProtocolError, struct.error, ValueError) as e:
            self._lost(conn, e)
        except BaseException as e:      # noqa: BLE001 - a bug here must not leave callers waiting
            self._lost(conn, e)
            raise

    def _more_simple(self, rx, inflight):
        """Apply the further simple replies already buffered for requests without data (a batch's
        writes), without a round through ``_wait`` for each; stop at anything else."""
        buf, unpack, magic, read = rx.buf, _SIMPLE_REPLY.unpack_from, proto.SIMPLE_REPLY_MAGIC, proto.CMD_READ
        while rx.end - rx.start >= 16:
            m, err, cookie = unpack(buf, rx.start)
            req = inflight.get(cookie)
            if m != magic or req is None or req.cmd == read:
                return                  # the general path deals with it (and with errors in it)
            rx.start += 16
            self._complete(req, proto.nbd_to_errno(err) if err else 0)

    def _complete(self, req, err):
        """Hand ``req`` back to its caller; ``err`` is a local errno (0: success)."""
        if self._inflight.pop(req.cookie, None) is None:
            return                      # failed meanwhile (closing)
        if req.cmd in _CHANGES_DATA:
            self._data_changed()
        req.payload = None
        if err:
            req.error = err
            if req.msg is None:
                req.msg = (f"{self._where()}: {proto.CMD_NAMES[req.cmd]} of {req.length} bytes at {req.offset}: "
                           f"the server answered {errno.errorcode.get(err, err)}")
        self._finish(req)

    def _read_data(self, rx, req, at, n):
        """Receive ``n`` bytes of read data into the request's buffers at request offset ``at``."""
        dest = req.dest
        if dest.niov == 1 and at == 0 and n == req.length:
            rx.into(dest.buffers()[0])
        else:
            for mv in dest.slice(at, n).buffers():
                rx.into(mv)
        req.got += n

    def _chunk(self, conn, req, rtype, chunk):
        """Apply a decoded reply chunk (anything but OFFSET_DATA) to its request."""
        if isinstance(chunk, OffsetHole):
            if req.cmd != proto.CMD_READ:
                raise ProtocolError(f"an OFFSET_HOLE chunk for {proto.CMD_NAMES[req.cmd]}")
            self._check_range(req, chunk.offset, chunk.length)
            req.dest.memset(chunk.offset - req.offset, 0, chunk.length)
            req.got += chunk.length
        elif isinstance(chunk, BlockStatusChunk):
            if req.cmd != proto.CMD_BLOCK_STATUS:
                raise ProtocolError(f"a BLOCK_STATUS chunk for {proto.CMD_NAMES[req.cmd]}")
            if chunk.context_id == conn.info.context_id and req.extents is None:
                if not chunk.extents or any(n == 0 for n, _ in chunk.extents):
                    raise ProtocolError("a block status extent of length 0")
                req.extents = chunk.extents
        elif isinstance(chunk, ErrorChunk):
            if not req.error:
                req.error = proto.nbd_to_errno(chunk.error) or errno.EIO
                at = f" (at offset {chunk.offset})" if chunk.offset is not None else ""
                req.msg = (f"{self._where()}: {proto.CMD_NAMES[req.cmd]} of {req.length} bytes at {req.offset} "
                           f"failed{at}: {chunk.message or errno.errorcode.get(req.error, req.error)}")

    @staticmethod
    def _check_range(req, off, n):
        if off < req.offset or off + n > req.offset + req.length:
            raise ProtocolError(f"a reply chunk [{off}, +{n}) outside the request [{req.offset}, +{req.length})")




# ---------------------------------------------------------------------- TLS
def tls_client_context(creds_id, where="nbd: option 'tls-creds'"):
    """An ``ssl.SSLContext`` for the client from the ``tls-creds-x509`` object ``creds_id``
    (``pyrep.object_add``): it trusts the object's ``ca-cert.pem`` and presents ``client-cert.pem``
    when the directory has one; the caller checks the server's name against ``tls-hostname``."""
    from pyrep.objects import lookup_object
    try:
        creds = lookup_object(creds_id, "tls-creds-x509")
    except OptionError as e:
        raise OptionError(f"{where}: {e}") from None
    if creds.endpoint != "client":
        raise OptionError(f"{where}: object '{creds_id}' has endpoint '{creds.endpoint}'; the nbd driver "
                          f"needs endpoint=client")
    return creds.ssl_context()
