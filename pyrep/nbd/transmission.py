"""NBD transmission phase: requests and replies, encoded, decoded and validated, without I/O.

Headers are packed in C (:mod:`pyrep.nbd._wire`); payload builders and parsers for the structured
reply chunks and the request validation rules are here, shared by the client and the server.

Request: ``pack_request(cmd, handle, offset, length, flags=0)`` → 28 bytes (a WRITE's payload
follows); ``unpack_request(buf)`` → ``(flags, cmd, handle, offset, length)``.

Replies: ``pack_simple_reply(handle, error=0)`` → 16 bytes (a successful READ's data follows);
``pack_chunk_header(handle, type, length, flags=0)`` → 20 bytes; ``unpack_reply_header(buf)`` →
``("simple", error, handle)`` / ``("chunk", flags, type, handle, length)`` / ``None`` (need more).
``validate_request(cmd, flags, offset, length, size, tflags, structured=False, meta_id=0)`` → the NBD
error the server answers before any I/O (0: valid). ``size``/``tflags``: the export's size and
transmission flags; ``structured``: structured replies negotiated; ``meta_id``: the
``base:allocation`` context id (0: none). Rules, in order: unknown command → EINVAL; flags the command
does not take → EINVAL; DF without structured replies → EINVAL; DISC and FLUSH are then valid; a
write-type command (WRITE, TRIM, WRITE_ZEROES) on a read-only export → EPERM; a READ/WRITE over 32
MiB → EINVAL (for WRITE the server closes instead: it cannot skip the payload safely); zero length
(all but CACHE) → EINVAL; past the end → ENOSPC for WRITE/WRITE_ZEROES, EINVAL otherwise;
BLOCK_STATUS without a negotiated context → EINVAL; FAST_ZERO when not advertised → EINVAL.

Chunk payloads: :func:`offset_data_prefix`, :func:`offset_hole`, :func:`block_status_payload`,
:func:`error_payload`, :func:`error_offset_payload`; :func:`parse_chunk` decodes any of them.

All errors carried on the wire are NBD error numbers (see ``proto.errno_to_nbd``).
"""
from collections import namedtuple

from . import proto as P
from ._wire import (pack_chunk_header, pack_request, pack_simple_reply, unpack_reply_header, unpack_request,
                    validate_request)
from .proto import ProtocolError

__all__ = ["pack_request", "unpack_request", "pack_simple_reply", "pack_chunk_header", "unpack_reply_header",
           "validate_request", "expects_payload", "offset_data_prefix", "offset_hole", "block_status_payload",
           "error_payload", "error_offset_payload", "parse_chunk", "OffsetData", "OffsetHole", "BlockStatusChunk",
           "ErrorChunk", "NoneChunk", "chunk"]

OffsetData = namedtuple("OffsetData", "offset data")
OffsetHole = namedtuple("OffsetHole", "offset length")
BlockStatusChunk = namedtuple("BlockStatusChunk", "context_id extents")   # extents: [(length, flags)]
ErrorChunk = namedtuple("ErrorChunk", "error message offset")             # offset None unless ERROR_OFFSET
NoneChunk = namedtuple("NoneChunk", "")


def expects_payload(cmd):
    """Does a request of ``cmd`` carry ``length`` bytes of payload after its header?"""
    return cmd == P.CMD_WRITE


# ------------------------------------------------------------ chunk payloads
def offset_data_prefix(offset):
    """The 8 bytes that precede the data in an OFFSET_DATA chunk (chunk length = 8 + data)."""
    return P.U64.pack(offset)


def offset_hole(offset, length):
    return P.U64.pack(offset) + P.U32.pack(length)


def block_status_payload(context_id, extents):
    """A BLOCK_STATUS chunk's payload: the context id, then ``(length, flags)`` descriptors."""
    return P.U32.pack(context_id) + b"".join(P.EXTENT.pack(n, f) for n, f in extents)


def error_payload(error, message=""):
    m = message.encode("utf-8", "replace")[:P.MAX_STRING]
    return P.ERROR_HEAD.pack(error, len(m)) + m


def error_offset_payload(error, offset, message=""):
    return error_payload(error, message) + P.U64.pack(offset)


def chunk(handle, rtype, payload, done=True):
    """A whole chunk (header + payload) as bytes."""
    return pack_chunk_header(handle, rtype, len(payload), P.REPLY_FLAG_DONE if done else 0) + payload


def parse_chunk(rtype, payload):
    """Decode a chunk payload of ``rtype``; ProtocolError when malformed.

    Unknown non-error types raise ProtocolError; unknown error types decode as ErrorChunk."""
    n = len(payload)
    if rtype == P.REPLY_TYPE_NONE:
        if n:
            raise ProtocolError("NONE chunk with a payload")
        return NoneChunk()
    if rtype == P.REPLY_TYPE_OFFSET_DATA:
        if n < 9:
            raise ProtocolError(f"OFFSET_DATA chunk of {n} bytes")
        return OffsetData(P.U64.unpack_from(payload)[0], memoryview(payload)[8:])
    if rtype == P.REPLY_TYPE_OFFSET_HOLE:
        if n != 12:
            raise ProtocolError(f"OFFSET_HOLE chunk of {n} bytes")
        return OffsetHole(P.U64.unpack_from(payload)[0], P.U32.unpack_from(payload, 8)[0])
    if rtype == P.REPLY_TYPE_BLOCK_STATUS:
        if n < 12 or (n - 4) % 8:
            raise ProtocolError(f"BLOCK_STATUS chunk of {n} bytes")
        cid = P.U32.unpack_from(payload)[0]
        return BlockStatusChunk(cid, [P.EXTENT.unpack_from(payload, 4 + 8 * i) for i in range((n - 4) // 8)])
    if P.reply_type_is_error(rtype):
        if n < 6:
            raise ProtocolError(f"error chunk of {n} bytes")
        err, mlen = P.ERROR_HEAD.unpack_from(payload)
        if 6 + mlen > n:
            raise ProtocolError("error chunk message longer than the chunk")
        msg = bytes(payload[6:6 + mlen]).decode("utf-8", "replace")
        off = None
        if rtype == P.REPLY_TYPE_ERROR_OFFSET:
            if n != 6 + mlen + 8:
                raise ProtocolError("ERROR_OFFSET chunk without its offset")
            off = P.U64.unpack_from(payload, 6 + mlen)[0]
        if not err:
            raise ProtocolError("error chunk with error 0")
        return ErrorChunk(err, msg, off)
    raise ProtocolError(f"unknown structured reply type {rtype}")
