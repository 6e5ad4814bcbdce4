"""One QMP session: the greeting, capabilities negotiation and framing. The socket lives in server.py.

Bytes in (:meth:`Session.feed`), messages out (dicts, to be serialised by
:meth:`Session.encode`). Input is a stream of JSON objects, as QEMU reads
it: several may share a line and one may span lines. Text that cannot be
parsed gets a ``GenericError`` reply (without ``id``: there is none to echo)
and is skipped up to the end of its line; the session goes on.

Capabilities (QEMU's ``QMPCapability``): ``oob`` is offered; enabling it is
accepted (no command here is out-of-band capable, so ``exec-oob`` is answered
with an error as QEMU answers it for such commands).
"""
import codecs
import json

from .dispatch import dispatch, error_reply

__all__ = ["Session", "greeting", "CAPABILITIES", "MAX_PENDING"]

CAPABILITIES = ("oob",)
MAX_PENDING = 16 << 20      # bytes of one unfinished message before the input is declared bad
_decoder = json.JSONDecoder()


def greeting(version):
    """The greeting message: ``{"QMP": {"version": ..., "capabilities": [...]}}``."""
    return {"QMP": {"version": version, "capabilities": list(CAPABILITIES)}}


class Session:
    """A monitor session's protocol state. ``state`` is the daemon-wide state handlers use
    (``state.table`` the command table); ``negotiated`` turns True after ``qmp_capabilities``."""

    def __init__(self, state, pretty=False):
        self.state = state
        self.table = state.table
        self.pretty = pretty
        self.negotiated = False
        self.enabled = set()
        self.closing = False         # set by a handler (quit): close after the reply
        self._buf = ""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def greeting(self):
        return greeting(self.state.version())

    def encode(self, msg):
        """One message as bytes on the wire (a line of JSON; indented when ``pretty``)."""
        if self.pretty:
            return (json.dumps(msg, indent=4) + "\n").encode()
        return (json.dumps(msg) + "\n").encode()

    def feed(self, data):
        """Replies to every complete message in ``data`` (bytes or str, any fragment of the stream)."""
        if isinstance(data, bytes):
            data = self._utf8.decode(data)      # a character split between reads stays whole
        self._buf += data
        replies = []
        while True:
            text = self._buf.lstrip()
            if not text:
                self._buf = ""
                break
            try:
                msg, end = _decoder.raw_decode(text)
            except json.JSONDecodeError as e:
                if e.pos >= len(text) or (e.msg.startswith("Unterminated string") and "\n" not in text[e.pos:]):
                    # incomplete: wait for more (bounded)
                    self._buf = text
                    if len(text) > MAX_PENDING:
                        replies.append(error_reply(f"JSON parse error, message longer than {MAX_PENDING} bytes"))
                        self._buf = ""
                    break
                nl = text.find("\n", e.pos)
                if nl < 0 and len(text) <= MAX_PENDING:
                    self._buf = text        # report a bad line once, when it is whole
                    break
                replies.append(error_reply(f"JSON parse error, {e.msg}"))
                self._buf = "" if nl < 0 else text[nl + 1:]
                continue
            self._buf = text[end:]
            replies.append(dispatch(self.table, self, msg, self.negotiated))
            if self.closing:
                self._buf = ""
                break
        return replies
