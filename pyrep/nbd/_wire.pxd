# cython: language_level=3
"""Big-endian field access shared by the NBD C modules (see _wire.pyx)."""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef inline void put16(char *p, uint16_t v) noexcept nogil:
    p[0] = <char>(v >> 8); p[1] = <char>v

cdef inline void put32(char *p, uint32_t v) noexcept nogil:
    p[0] = <char>(v >> 24); p[1] = <char>(v >> 16); p[2] = <char>(v >> 8); p[3] = <char>v

cdef inline void put64(char *p, uint64_t v) noexcept nogil:
    put32(p, <uint32_t>(v >> 32)); put32(p + 4, <uint32_t>v)

cdef inline uint16_t get16(const char *p) noexcept nogil:
    cdef const uint8_t *u = <const uint8_t *>p
    return (<uint16_t>u[0] << 8) | u[1]

cdef inline uint32_t get32(const char *p) noexcept nogil:
    cdef const uint8_t *u = <const uint8_t *>p
    return (<uint32_t>u[0] << 24) | (<uint32_t>u[1] << 16) | (<uint32_t>u[2] << 8) | u[3]

cdef inline uint64_t get64(const char *p) noexcept nogil:
    return (<uint64_t>get32(p) << 32) | get32(p + 4)


# request validation (the rules are documented on pyrep.nbd.transmission.validate_request)
cdef enum:
    W_MAX_PAYLOAD = 32 * 1024 * 1024
    W_EPERM = 1
    W_EINVAL = 22
    W_ENOSPC = 28
    W_CMD_READ = 0
    W_CMD_WRITE = 1
    W_CMD_DISC = 2
    W_CMD_FLUSH = 3
    W_CMD_TRIM = 4
    W_CMD_CACHE = 5
    W_CMD_WRITE_ZEROES = 6
    W_CMD_BLOCK_STATUS = 7
    W_FLAG_FUA = 1
    W_FLAG_NO_HOLE = 2
    W_FLAG_DF = 4
    W_FLAG_REQ_ONE = 8
    W_FLAG_FAST_ZERO = 16
    W_TFLAG_READ_ONLY = 2
    W_TFLAG_SEND_FAST_ZERO = 1 << 11

cdef inline uint32_t c_validate(uint16_t cmd, uint16_t flags, uint64_t offset, uint64_t length, uint64_t size,
                                int tflags, bint structured, uint32_t meta_id) noexcept nogil:
    cdef uint16_t allowed
    if cmd == W_CMD_READ:
        allowed = W_FLAG_DF
    elif cmd == W_CMD_WRITE or cmd == W_CMD_TRIM:
        allowed = W_FLAG_FUA
    elif cmd == W_CMD_DISC or cmd == W_CMD_FLUSH or cmd == W_CMD_CACHE:
        allowed = 0
    elif cmd == W_CMD_WRITE_ZEROES:
        allowed = W_FLAG_FUA | W_FLAG_NO_HOLE | W_FLAG_FAST_ZERO
    elif cmd == W_CMD_BLOCK_STATUS:
        allowed = W_FLAG_REQ_ONE
    else:
        return W_EINVAL
    if flags & ~allowed:
        return W_EINVAL
    if flags & W_FLAG_DF and not structured:
        return W_EINVAL
    if cmd == W_CMD_DISC or cmd == W_CMD_FLUSH:
        return 0
    if (cmd == W_CMD_WRITE or cmd == W_CMD_TRIM or cmd == W_CMD_WRITE_ZEROES) and tflags & W_TFLAG_READ_ONLY:
        return W_EPERM
    if (cmd == W_CMD_READ or cmd == W_CMD_WRITE) and length > W_MAX_PAYLOAD:
        return W_EINVAL
    if length == 0 and cmd != W_CMD_CACHE:
        return W_EINVAL
    if offset > size or length > size - offset:
        return W_ENOSPC if (cmd == W_CMD_WRITE or cmd == W_CMD_WRITE_ZEROES) else W_EINVAL
    if cmd == W_CMD_BLOCK_STATUS and meta_id == 0:
        return W_EINVAL
    if flags & W_FLAG_FAST_ZERO and not tflags & W_TFLAG_SEND_FAST_ZERO:
        return W_EINVAL
    return 0
