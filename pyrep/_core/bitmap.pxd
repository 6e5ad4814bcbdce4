# cython: language_level=3
"""C-level view of pyrep's Bitmap (see bitmap.pyx for the contract).

The c_* methods take byte offsets/lengths like the Python API but never raise:
ranges are clamped to the bitmap (a start at or past the end is a no-op, c_get
past the end is False, c_next_* past the end is -1). They need no GIL, but the
bitmap is not internally locked: callers serialise access themselves.
"""
from libc.stdint cimport uint64_t, int64_t

cdef enum:
    # Enough summary levels for 2**64 bits at 64 bits per word.
    BITMAP_MAXLVL = 12


cdef class Bitmap:
    cdef uint64_t _length      # bytes covered
    cdef uint64_t _gran        # bytes per bit, a power of two
    cdef int _gshift           # log2(_gran)
    cdef uint64_t _nbits       # granules: ceil(_length / _gran)
    cdef uint64_t _nset        # running count of set bits
    cdef int _depth            # levels in use; level _depth-1 has exactly one word
    cdef uint64_t _nw[BITMAP_MAXLVL]      # words per level
    # _set[0] is the bitmap itself; for k >= 1, bit i of _set[k] says
    # "word i of level k-1 is non-zero".
    cdef uint64_t *_set[BITMAP_MAXLVL]
    # _clr[0] is unused (NULL); bit i of _clr[1] says "data word i has a clear
    # bit" (within _nbits); for k >= 2, bit i says "word i of _clr[k-1] is
    # non-zero". This makes next_clear as cheap as next_set.
    cdef uint64_t *_clr[BITMAP_MAXLVL]

    cdef bint c_get(self, uint64_t offset) noexcept nogil
    cdef void c_set(self, uint64_t offset, uint64_t length) noexcept nogil
    cdef void c_reset(self, uint64_t offset, uint64_t length) noexcept nogil
    cdef int64_t c_next_set(self, uint64_t offset) noexcept nogil
    cdef int64_t c_next_clear(self, uint64_t offset) noexcept nogil
    cdef uint64_t c_count(self) noexcept nogil
    cdef bint c_is_empty(self) noexcept nogil

    cdef int _alloc(self, uint64_t length) except -1
    cdef void _free(self) noexcept nogil
    cdef uint64_t _mask(self, uint64_t wi) noexcept nogil
    cdef void _sum_update(self, uint64_t **h, uint64_t i, bint val) noexcept nogil
    cdef void _update_word(self, uint64_t wi, uint64_t new) noexcept nogil
    cdef void _change_bits(self, uint64_t a, uint64_t b, bint val) noexcept nogil
    cdef int64_t _find(self, uint64_t **h, bint inv, uint64_t pos) noexcept nogil
    cdef void _fill_summary(self, uint64_t **h, bint val) noexcept nogil
    cdef void _rebuild(self) noexcept nogil
