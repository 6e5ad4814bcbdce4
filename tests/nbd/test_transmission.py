"""Request/reply encoding, decoding and validation (no I/O)."""
import pytest

from pyrep.nbd import proto as P
from pyrep.nbd import transmission as T
from pyrep.nbd.proto import ProtocolError


def test_request_roundtrip_and_layout():
    raw = T.pack_request(P.CMD_WRITE, 0x1122334455667788, 1 << 40, 4096, P.CMD_FLAG_FUA)
    assert raw == P.REQUEST.pack(P.REQUEST_MAGIC, P.CMD_FLAG_FUA, P.CMD_WRITE, 0x1122334455667788, 1 << 40, 4096)
    assert T.unpack_request(raw) == (P.CMD_FLAG_FUA, P.CMD_WRITE, 0x1122334455667788, 1 << 40, 4096)
    with pytest.raises(ProtocolError, match="bad magic"):
        T.unpack_request(b"\0" * 28)
    with pytest.raises(ProtocolError, match="28"):
        T.unpack_request(raw[:27])


def test_replies_roundtrip():
    assert T.unpack_reply_header(T.pack_simple_reply(9, P.NBD_EIO)) == ("simple", P.NBD_EIO, 9)
    hdr = T.pack_chunk_header(5, P.REPLY_TYPE_OFFSET_DATA, 12, P.REPLY_FLAG_DONE)
    assert hdr == P.CHUNK_HEADER.pack(P.STRUCTURED_REPLY_MAGIC, 1, 1, 5, 12)
    assert T.unpack_reply_header(hdr) == ("chunk", 1, P.REPLY_TYPE_OFFSET_DATA, 5, 12)
    assert T.unpack_reply_header(hdr[:10]) is None
    with pytest.raises(ProtocolError):
        T.unpack_reply_header(b"\1\2\3\4" + bytes(16))


def test_chunk_payloads_roundtrip():
    d = T.parse_chunk(P.REPLY_TYPE_OFFSET_DATA, T.offset_data_prefix(512) + b"abcd")
    assert d.offset == 512 and bytes(d.data) == b"abcd"
    assert T.parse_chunk(P.REPLY_TYPE_OFFSET_HOLE, T.offset_hole(4096, 8192)) == T.OffsetHole(4096, 8192)
    bs = T.parse_chunk(P.REPLY_TYPE_BLOCK_STATUS, T.block_status_payload(3, [(4096, 0), (8192, 3)]))
    assert bs == T.BlockStatusChunk(3, [(4096, 0), (8192, 3)])
    assert T.parse_chunk(P.REPLY_TYPE_ERROR, T.error_payload(P.NBD_EPERM, "read-only")) == T.ErrorChunk(
        P.NBD_EPERM, "read-only", None)
    assert T.parse_chunk(P.REPLY_TYPE_ERROR_OFFSET, T.error_offset_payload(P.NBD_EIO, 99, "x")) == T.ErrorChunk(
        P.NBD_EIO, "x", 99)
    for rtype, bad in ((P.REPLY_TYPE_OFFSET_HOLE, b"\0" * 11), (P.REPLY_TYPE_BLOCK_STATUS, b"\0" * 10),
                       (P.REPLY_TYPE_ERROR, b"\0\0\0\5\0\x09"), (P.REPLY_TYPE_ERROR, bytes(6)), (77, b"")):
        with pytest.raises(ProtocolError):
            T.parse_chunk(rtype, bad)


@pytest.mark.parametrize("cmd,flags,offset,length,tflags,expect", [
    (P.CMD_READ, 0, 0, 4096, 0, 0),
    (P.CMD_READ, 0, 0, P.MAX_PAYLOAD + 1, 0, P.NBD_EINVAL),
    (P.CMD_READ, 0, 8192, 1, 0, P.NBD_EINVAL),
    (P.CMD_WRITE, 0, 8192, 1, 0, P.NBD_ENOSPC),
    (P.CMD_WRITE, 0, 0, 1, P.TFLAG_READ_ONLY, P.NBD_EPERM),
    (P.CMD_TRIM, 0, 0, 1, P.TFLAG_READ_ONLY, P.NBD_EPERM),
    (P.CMD_WRITE, P.CMD_FLAG_NO_HOLE, 0, 1, 0, P.NBD_EINVAL),
    (P.CMD_READ, P.CMD_FLAG_DF, 0, 1, 0, P.NBD_EINVAL),   # DF without structured replies
    (P.CMD_BLOCK_STATUS, 0, 0, 1, 0, P.NBD_EINVAL),       # no meta context
    (P.CMD_WRITE_ZEROES, P.CMD_FLAG_FAST_ZERO, 0, 1, 0, P.NBD_EINVAL),
    (P.CMD_WRITE_ZEROES, P.CMD_FLAG_FAST_ZERO, 0, 1, P.TFLAG_SEND_FAST_ZERO, 0),
    (P.CMD_FLUSH, 0, 0, 0, 0, 0),
    (P.CMD_WRITE, 0, 0, 0, 0, P.NBD_EINVAL),
    (42, 0, 0, 1, 0, P.NBD_EINVAL),
])
def test_validate_request(cmd, flags, offset, length, tflags, expect):
    assert T.validate_request(cmd, flags, offset, length, 8192, tflags) == expect


def test_errno_mapping():
    import errno
    assert P.errno_to_nbd(errno.EROFS) == P.NBD_EPERM
    assert P.errno_to_nbd(errno.ENOENT) == P.NBD_EIO
    assert P.errno_to_nbd(0) == 0
    assert P.nbd_to_errno(P.NBD_ENOSPC) == errno.ENOSPC
    assert P.nbd_to_errno(4242) == errno.EIO
