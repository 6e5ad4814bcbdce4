"""NBD wire constants, message layouts and the errno ↔ NBD error mapping (no I/O).

Facts from the NBD protocol specification (``doc/proto.md`` of
NetworkBlockDevice/nbd). Every integer on the wire is big-endian. The names
follow the specification without the ``NBD_`` prefix. Both the client and the
server import only from here for numbers and layouts, so a value is written
once.
"""
import errno as _errno
import struct

# ------------------------------------------------------------------ magics
NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC": first 8 bytes the server sends
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT": newstyle greeting and every option request
REPLY_MAGIC = 0x0003E889045565A9       # option replies
REQUEST_MAGIC = 0x25609513             # transmission requests (compact headers)
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# ------------------------------------------------------ handshake flags (server, 16 bits)
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
# client flags (32 bits)
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# ------------------------------------------------------------------ options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

OPT_NAMES = {OPT_EXPORT_NAME: "EXPORT_NAME", OPT_ABORT: "ABORT", OPT_LIST: "LIST", OPT_STARTTLS: "STARTTLS",
             OPT_INFO: "INFO", OPT_GO: "GO", OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
             OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT", OPT_SET_META_CONTEXT: "SET_META_CONTEXT"}

# ------------------------------------------------------------ option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

REP_NAMES = {REP_ACK: "ACK", REP_SERVER: "SERVER", REP_INFO: "INFO", REP_META_CONTEXT: "META_CONTEXT",
             REP_ERR_UNSUP: "ERR_UNSUP", REP_ERR_POLICY: "ERR_POLICY", REP_ERR_INVALID: "ERR_INVALID",
             REP_ERR_PLATFORM: "ERR_PLATFORM", REP_ERR_TLS_REQD: "ERR_TLS_REQD", REP_ERR_UNKNOWN: "ERR_UNKNOWN",
             REP_ERR_SHUTDOWN: "ERR_SHUTDOWN", REP_ERR_BLOCK_SIZE_REQD: "ERR_BLOCK_SIZE_REQD",
             REP_ERR_TOO_BIG: "ERR_TOO_BIG"}

# NBD_REP_INFO payload types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# ------------------------------------------------------ transmission flags (16 bits)
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_RESIZE = 1 << 9
TFLAG_SEND_CACHE = 1 << 10
TFLAG_SEND_FAST_ZERO = 1 << 11

# ------------------------------------------------------------------ commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH", CMD_TRIM: "TRIM",
             CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES", CMD_BLOCK_STATUS: "BLOCK_STATUS"}

# command flags (16 bits)
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# which flags each command may carry (anything else is EINVAL)
CMD_ALLOWED_FLAGS = {
    CMD_READ: CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: 0,
    CMD_FLUSH: 0,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_CACHE: 0,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}

# ------------------------------------------------------ structured reply chunks
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2


def reply_type_is_error(t):
    return bool(t & (1 << 15))


# base:allocation extent flags
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
META_BASE_ALLOCATION = "base:allocation"

# ------------------------------------------------------------------ limits
DEFAULT_PORT = 10809                    # IANA port for NBD
MAX_PAYLOAD = 32 * 1024 * 1024        # largest READ/WRITE payload we send or accept (32 MiB)
MAX_STRING = 4096                      # export names, descriptions, messages
MAX_OPTION_DATA = 64 * 1024            # an option's data beyond this is refused (the connection closes)
MIN_BLOCK = 1                          # our exports are byte-granular
PREFERRED_BLOCK = 4096
EXPORT_NAME_ZEROES = 124               # padding after the EXPORT_NAME reply unless NO_ZEROES

# ------------------------------------------------------------------ layouts
GREETING = struct.Struct(">QQH")             # NBDMAGIC, IHAVEOPT, handshake flags          (18)
CLIENT_FLAGS = struct.Struct(">I")           #                                               (4)
OPTION_HEADER = struct.Struct(">QII")        # IHAVEOPT, option, data length                 (16)
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # REPLY_MAGIC, option, reply type, length       (20)
EXPORT_NAME_REPLY = struct.Struct(">QH")     # size, transmission flags                      (10)
INFO_EXPORT_PAYLOAD = struct.Struct(">HQH")  # INFO_EXPORT, size, transmission flags         (12)
INFO_BLOCK_SIZE_PAYLOAD = struct.Struct(">HIII")  # INFO_BLOCK_SIZE, minimum, preferred, maximum (14)
REQUEST = struct.Struct(">IHHQQI")           # magic, flags, type, handle, offset, length    (28)
SIMPLE_REPLY = struct.Struct(">IIQ")         # magic, error, handle                          (16)
CHUNK_HEADER = struct.Struct(">IHHQI")       # magic, flags, type, handle, payload length    (20)
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
EXTENT = struct.Struct(">II")                # length, status flags
ERROR_HEAD = struct.Struct(">IH")            # error, message length

# ------------------------------------------------------------------ errors
# The spec's error values are Linux errno numbers; anything else travels as EINVAL
# (malformed requests) or EIO (everything else), as the spec recommends.
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

_TO_NBD = {
    _errno.EPERM: NBD_EPERM, _errno.EROFS: NBD_EPERM, _errno.EACCES: NBD_EPERM,
    _errno.EIO: NBD_EIO,
    _errno.ENOMEM: NBD_ENOMEM,
    _errno.EINVAL: NBD_EINVAL, _errno.EFBIG: NBD_ENOSPC,
    _errno.ENOSPC: NBD_ENOSPC, _errno.EDQUOT: NBD_ENOSPC,
    _errno.EOVERFLOW: NBD_EOVERFLOW,
    _errno.ENOTSUP: NBD_ENOTSUP, _errno.EOPNOTSUPP: NBD_ENOTSUP,
    _errno.ESHUTDOWN: NBD_ESHUTDOWN,
}
_FROM_NBD = {NBD_EPERM: _errno.EPERM, NBD_EIO: _errno.EIO, NBD_ENOMEM: _errno.ENOMEM,
             NBD_EINVAL: _errno.EINVAL, NBD_ENOSPC: _errno.ENOSPC, NBD_EOVERFLOW: _errno.EOVERFLOW,
             NBD_ENOTSUP: _errno.ENOTSUP, NBD_ESHUTDOWN: _errno.ESHUTDOWN}


def errno_to_nbd(err):
    """The NBD error code for a local errno (unknown ones → EIO; 0 → 0)."""
    if not err:
        return 0
    return _TO_NBD.get(err, NBD_EIO)


def nbd_to_errno(code):
    """The local errno for an NBD error code received from a peer (unknown codes → EIO, a
    generic failure)."""
    if not code:
        return 0
    return _FROM_NBD.get(code, _errno.EIO)


class ProtocolError(Exception):
    """The peer broke the protocol (wrong magic, bad length, a message the state forbids).

    The connection cannot continue: whoever catches this closes it."""


class LocalProtocolError(ProtocolError):
    """Our own side tried something the protocol state forbids (a programming error)."""
