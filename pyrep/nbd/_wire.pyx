# cython: language_level=3
"""NBD transmission headers in C: pack and unpack without ``struct`` (the per-request hot path).

No I/O. :mod:`pyrep.nbd.transmission` exports these with their contracts; the server's C loop
(``pyrep.nbd._server``) uses the inline ``cdef`` forms directly.
"""
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING

from pyrep.nbd.proto import ProtocolError

cdef enum:
    REQUEST_MAGIC = 0x25609513
    SIMPLE_REPLY_MAGIC = 0x67446698
    STRUCTURED_REPLY_MAGIC = 0x668E33EF


def pack_request(int cmd, uint64_t handle, uint64_t offset, uint32_t length, int flags=0):
    """The 28-byte request header (the WRITE payload follows it on the wire)."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 28)
    cdef char *p = PyBytes_AS_STRING(out)
    put32(p, REQUEST_MAGIC); put16(p + 4, <uint16_t>flags); put16(p + 6, <uint16_t>cmd)
    put64(p + 8, handle); put64(p + 16, offset); put32(p + 24, length)
    return out


def unpack_request(const unsigned char[::1] buf not None):
    """``(flags, cmd, handle, offset, length)`` from a 28-byte header; ProtocolError on bad magic."""
    if buf.shape[0] < 28:
        raise ProtocolError(f"NBD request header of {buf.shape[0]} bytes (need 28)")
    cdef const char *p = <const char *>&buf[0]
    cdef uint32_t magic = get32(p)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"NBD request with bad magic {magic:#x}")
    return get16(p + 4), get16(p + 6), get64(p + 8), get64(p + 16), get32(p + 24)


def pack_simple_reply(uint64_t handle, uint32_t error=0):
    """The 16-byte simple reply (a successful READ's data follows it)."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 16)
    cdef char *p = PyBytes_AS_STRING(out)
    put32(p, SIMPLE_REPLY_MAGIC); put32(p + 4, error); put64(p + 8, handle)
    return out


def pack_chunk_header(uint64_t handle, int rtype, uint32_t length, int flags=0):
    """The 20-byte structured reply chunk header; ``length`` counts the payload after it."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 20)
    cdef char *p = PyBytes_AS_STRING(out)
    put32(p, STRUCTURED_REPLY_MAGIC); put16(p + 4, <uint16_t>flags); put16(p + 6, <uint16_t>rtype)
    put64(p + 8, handle); put32(p + 16, length)
    return out


def unpack_reply_header(const unsigned char[::1] buf not None):
    """Classify a reply by its first 4 bytes and decode its header.

    Returns ``("simple", error, handle)`` for a 16-byte simple reply or ``("chunk", flags, type,
    handle, length)`` for a 20-byte chunk header; ``None`` when ``buf`` is too short for the header
    its magic announces; ProtocolError on an unknown magic."""
    cdef Py_ssize_t n = buf.shape[0]
    if n < 4:
        return None
    cdef const char *p = <const char *>&buf[0]
    cdef uint32_t magic = get32(p)
    if magic == SIMPLE_REPLY_MAGIC:
        if n < 16:
            return None
        return ("simple", get32(p + 4), get64(p + 8))
    if magic == STRUCTURED_REPLY_MAGIC:
        if n < 20:
            return None
        return ("chunk", get16(p + 4), get16(p + 6), get64(p + 8), get32(p + 16))
    raise ProtocolError(f"NBD reply with bad magic {magic:#x}")


def validate_request(int cmd, int flags, uint64_t offset, uint64_t length, uint64_t size, int tflags,
                     bint structured=False, uint32_t meta_id=0):
    """The NBD error for a request before any I/O (0: valid); see transmission.validate_request."""
    if cmd < 0 or cmd > 0xFFFF or flags < 0 or flags > 0xFFFF:
        return 22
    return c_validate(<uint16_t>cmd, <uint16_t>flags, offset, length, size, tflags, structured, meta_id)
