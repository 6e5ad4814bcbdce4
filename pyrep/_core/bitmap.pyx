# cython: language_level=3
"""Bitmap: a hierarchical dirty bitmap over a byte range (after QEMU's HBitmap).

One bit covers ``granularity`` bytes. Above the bitmap words sit summary levels
(one bit per word of the level below) for both "word has a set bit" and "word
has a clear bit", so next_set, next_clear and is_empty skip empty/full areas
in O(levels) word reads instead of scanning; a running count makes count()
O(1). A 4 TiB disk at 64 KiB granularity is 64 Mi bits = 8 MiB of words plus
~260 KiB of summaries.

Range rules (all offsets and lengths are bytes; negative values raise
ValueError everywhere):
- set/reset/extents: ``offset > length`` raises ValueError; a range that runs
  past the end is clamped to it (so ``offset == length`` is an empty range).
- get: ``offset >= length`` raises ValueError.
- next_set/next_clear: ``offset >= length`` returns -1 (no ValueError), so
  scanning loops end naturally.

Not thread-safe: there is no internal lock. Callers that share a Bitmap
between threads serialise every call themselves (the c_* methods run without
the GIL, so the GIL gives no protection either).
"""
cimport cython
from libc.stdint cimport uint64_t, int64_t
from libc.stdlib cimport calloc, malloc, free
from libc.string cimport memcpy, memset

cdef extern from *:
    int __builtin_ctzll(unsigned long long) nogil
    int __builtin_popcountll(unsigned long long) nogil

cdef uint64_t ALL = <uint64_t>0xFFFFFFFFFFFFFFFF


cdef inline uint64_t _div_up(uint64_t a, uint64_t b) noexcept nogil:
    return a // b + (1 if a % b else 0)


cdef inline uint64_t _low_mask(uint64_t nbits) noexcept nogil:
    # Mask of the low ``nbits`` bits, nbits in 1..64.
    return ALL if nbits >= 64 else ((<uint64_t>1 << nbits) - 1)


cdef uint64_t _nonneg(object value, str what) except? 0xFFFFFFFFFFFFFFFF:
    if value < 0:
        raise ValueError(f"{what} must be >= 0, not {value}")
    return value


cdef uint64_t _start(Bitmap bm, object offset, bint allow_end) except? 0xFFFFFFFFFFFFFFFF:
    cdef uint64_t off = _nonneg(offset, "offset")
    if off > bm._length or (off == bm._length and not allow_end):
        raise ValueError(f"offset {offset} is past the end of the bitmap ({bm._length} bytes)")
    return off


cdef uint64_t _len(Bitmap bm, object length) except? 0xFFFFFFFFFFFFFFFF:
    if length < 0:
        raise ValueError(f"length must be >= 0, not {length}")
    if length > bm._length:
        return bm._length
    return length


@cython.final
cdef class Bitmap:
    """Bitmap(length, granularity): dirty tracking for ``length`` bytes.

    ``granularity`` (bytes per bit) must be a power of two >= 1, else
    ValueError. Setting or resetting a byte range affects every granule it
    touches. Offsets returned are bytes. See the module docstring for how
    out-of-range arguments are handled, and note that the bitmap is not
    internally locked.
    """

    def __cinit__(self, length, granularity):
        cdef uint64_t g
        if granularity < 1 or (granularity & (granularity - 1)) != 0:
            raise ValueError(f"granularity must be a power of two >= 1, not {granularity}")
        if length < 0:
            raise ValueError(f"length must be >= 0, not {length}")
        if length >= 2 ** 63:
            raise ValueError(f"length {length} is too large")
        if granularity >= 2 ** 63:
            raise ValueError(f"granularity {granularity} is too large")
        g = granularity
        self._gran = g
        self._gshift = __builtin_ctzll(g)
        self._alloc(length)
        self._fill_summary(self._set, False)
        self._fill_summary(self._clr, True)

    def __dealloc__(self):
        self._free()

    cdef int _alloc(self, uint64_t length) except -1:
        # Allocates every level (data zeroed, summaries zeroed); the caller
        # fills the summaries to match the data.
        cdef int lvl
        cdef uint64_t nw
        self._length = length
        self._nbits = (length >> self._gshift) + (1 if length & (self._gran - 1) else 0)
        self._nset = 0
        nw = _div_up(self._nbits, 64)
        if nw == 0:
            nw = 1
        lvl = 0
        while True:
            self._nw[lvl] = nw
            self._set[lvl] = <uint64_t *>calloc(nw, 8)
            if self._set[lvl] == NULL:
                self._depth = lvl
                self._free()
                raise MemoryError(f"cannot allocate a bitmap of {self._nbits} bits")
            if lvl > 0:
                self._clr[lvl] = <uint64_t *>calloc(nw, 8)
                if self._clr[lvl] == NULL:
                    self._depth = lvl + 1
                    self._free()
                    raise MemoryError(f"cannot allocate a bitmap of {self._nbits} bits")
            lvl += 1
            if nw == 1:
                break
            nw = _div_up(nw, 64)
        self._depth = lvl
        return 0

    cdef void _free(self) noexcept nogil:
        cdef int lvl
        for lvl in range(BITMAP_MAXLVL):
            free(self._set[lvl])
            free(self._clr[lvl])
            self._set[lvl] = NULL
            self._clr[lvl] = NULL
        self._depth = 0

    cdef uint64_t _mask(self, uint64_t wi) noexcept nogil:
        # Valid bits of data word ``wi`` (only the last word is partial).
        if wi == self._nw[0] - 1:
            if self._nbits == 0:
                return 0
            return _low_mask(self._nbits - (wi << 6))
        return ALL

    cdef void _fill_summary(self, uint64_t **h, bint val) noexcept nogil:
        # Set every summary bit of hierarchy ``h`` (levels >= 1) to ``val``.
        # Only right when all data words agree (all zero / all full / all
        # not-full). With _nbits == 0 there is a single word and no summary
        # level, so the "empty word has no clear bit" corner never arises.
        cdef int lvl
        cdef uint64_t nvalid, nw
        for lvl in range(1, self._depth):
            nw = self._nw[lvl]
            if not val:
                memset(h[lvl], 0, nw * 8)
                continue
            nvalid = self._nw[lvl - 1]
            memset(h[lvl], 0xFF, nw * 8)
            if nvalid & 63:
                h[lvl][nw - 1] = _low_mask(nvalid & 63)

    cdef void _rebuild(self) noexcept nogil:
        # Recompute the running count and every summary from the data words.
        cdef uint64_t i, w
        cdef int lvl
        cdef uint64_t *d = self._set[0]
        self._nset = 0
        for lvl in range(1, self._depth):
            memset(self._set[lvl], 0, self._nw[lvl] * 8)
            memset(self._clr[lvl], 0, self._nw[lvl] * 8)
        for i in range(self._nw[0]):
            w = d[i]
            self._nset += __builtin_popcountll(w)
            if self._depth > 1:
                if w:
                    self._set[1][i >> 6] |= <uint64_t>1 << (i & 63)
                if w != self._mask(i):
                    self._clr[1][i >> 6] |= <uint64_t>1 << (i & 63)
        for lvl in range(2, self._depth):
            for i in range(self._nw[lvl - 1]):
                if self._set[lvl - 1][i]:
                    self._set[lvl][i >> 6] |= <uint64_t>1 << (i & 63)
                if self._clr[lvl - 1][i]:
                    self._clr[lvl][i >> 6] |= <uint64_t>1 << (i & 63)

    cdef void _sum_update(self, uint64_t **h, uint64_t i, bint val) noexcept nogil:
        # Word ``i`` of level 0 became interesting (val) or not: update bit i
        # of level 1 and propagate upwards while a word's zero-ness changes.
        cdef int lvl = 1
        cdef uint64_t old, new, bit
        while lvl < self._depth:
            bit = <uint64_t>1 << (i & 63)
            i >>= 6
            old = h[lvl][i]
            new = (old | bit) if val else (old & ~bit)
            h[lvl][i] = new
            if (old != 0) == (new != 0):
                return
            val = new != 0
            lvl += 1

    cdef void _update_word(self, uint64_t wi, uint64_t new) noexcept nogil:
        cdef uint64_t old = self._set[0][wi]
        cdef uint64_t m
        if old == new:
            return
        self._set[0][wi] = new
        self._nset = self._nset + __builtin_popcountll(new) - __builtin_popcountll(old)
        if (old != 0) != (new != 0):
            self._sum_update(self._set, wi, new != 0)
        m = self._mask(wi)
        if (old != m) != (new != m):
            self._sum_update(self._clr, wi, new != m)

    cdef void _change_bits(self, uint64_t a, uint64_t b, bint val) noexcept nogil:
        # Set (val) or clear bits [a, b); requires a < b <= _nbits.
        cdef uint64_t wa = a >> 6, wb = (b - 1) >> 6, wi, m
        cdef uint64_t first = ALL << (a & 63)
        cdef uint64_t last = ALL >> (63 - ((b - 1) & 63))
        cdef uint64_t *d = self._set[0]
        if wa == wb:
            m = first & last
            self._update_word(wa, (d[wa] | m) if val else (d[wa] & ~m))
            return
        self._update_word(wa, (d[wa] | first) if val else (d[wa] & ~first))
        for wi in range(wa + 1, wb):
            self._update_word(wi, ALL if val else 0)
        self._update_word(wb, (d[wb] | last) if val else (d[wb] & ~last))

    cdef int64_t _find(self, uint64_t **h, bint inv, uint64_t pos) noexcept nogil:
        # First bit >= pos that is set (inv=0, h=_set) or clear (inv=1,
        # h=_clr), or -1. Climb while the rest of the current word is
        # uninteresting, then descend along first set summary bits.
        cdef int lvl = 0
        cdef uint64_t p = pos, wi, w
        if pos >= self._nbits:
            return -1
        while True:
            wi = p >> 6
            if wi >= self._nw[lvl]:
                return -1
            if lvl == 0:
                w = self._set[0][wi]
                if inv:
                    w = ~w & self._mask(wi)
            else:
                w = h[lvl][wi]
            w &= ALL << (p & 63)
            if w:
                p = (wi << 6) | <uint64_t>__builtin_ctzll(w)
                break
            lvl += 1
            if lvl >= self._depth:
                return -1
            p = wi + 1
        while lvl > 0:
            lvl -= 1
            if lvl == 0:
                w = self._set[0][p]
                if inv:
                    w = ~w & self._mask(p)
            else:
                w = h[lvl][p]
            p = (p << 6) | <uint64_t>__builtin_ctzll(w)
        return <int64_t>p

    # ---- C API (see bitmap.pxd) -------------------------------------------

    cdef bint c_get(self, uint64_t offset) noexcept nogil:
        cdef uint64_t bit
        if offset >= self._length:
            return False
        bit = offset >> self._gshift
        return (self._set[0][bit >> 6] >> (bit & 63)) & 1

    cdef void c_set(self, uint64_t offset, uint64_t length) noexcept nogil:
        if offset >= self._length or length == 0:
            return
        if length > self._length - offset:
            length = self._length - offset
        self._change_bits(offset >> self._gshift,
                          ((offset + length - 1) >> self._gshift) + 1, True)

    cdef void c_reset(self, uint64_t offset, uint64_t length) noexcept nogil:
        if offset >= self._length or length == 0:
            return
        if length > self._length - offset:
            length = self._length - offset
        self._change_bits(offset >> self._gshift,
                          ((offset + length - 1) >> self._gshift) + 1, False)

    cdef int64_t c_next_set(self, uint64_t offset) noexcept nogil:
        cdef int64_t r
        if offset >= self._length:
            return -1
        r = self._find(self._set, False, offset >> self._gshift)
        if r < 0:
            return -1
        r <<= self._gshift
        return r if <uint64_t>r > offset else <int64_t>offset

    cdef int64_t c_next_clear(self, uint64_t offset) noexcept nogil:
        cdef int64_t r
        if offset >= self._length:
            return -1
        r = self._find(self._clr, True, offset >> self._gshift)
        if r < 0:
            return -1
        r <<= self._gshift
        return r if <uint64_t>r > offset else <int64_t>offset

    cdef uint64_t c_count(self) noexcept nogil:
        cdef uint64_t n = self._nset << self._gshift
        cdef uint64_t last
        if self._nset and self._nbits:
            last = self._nbits - 1
            if (self._set[0][last >> 6] >> (last & 63)) & 1:
                # The last granule may extend past the end: count only bytes
                # that exist.
                n -= (self._nbits << self._gshift) - self._length
        return n

    cdef bint c_is_empty(self) noexcept nogil:
        return self._nset == 0

    # ---- Python API ---------------------------------------------------------

    @property
    def length(self):
        """Bytes covered by the bitmap."""
        return self._length

    @property
    def granularity(self):
        """Bytes per bit (a power of two)."""
        return self._gran

    def set(self, offset, length):
        """Mark every granule touched by bytes [offset, offset+length) dirty.

        ValueError if ``offset > self.length``; the range is clamped to the end.
        """
        cdef uint64_t off = _start(self, offset, True)
        self.c_set(off, _len(self, length))

    def reset(self, offset, length):
        """Clear every granule touched by bytes [offset, offset+length).

        ValueError if ``offset > self.length``; the range is clamped to the end.
        Note a partial granule at either edge is cleared entirely.
        """
        cdef uint64_t off = _start(self, offset, True)
        self.c_reset(off, _len(self, length))

    def get(self, offset):
        """True if the granule containing byte ``offset`` is dirty.

        ValueError if ``offset >= self.length``.
        """
        return self.c_get(_start(self, offset, False))

    def next_set(self, offset):
        """Byte offset of the first dirty byte at or after ``offset``, or -1.

        The result is the start of a dirty granule, or ``offset`` itself if
        the granule containing it is dirty. -1 if ``offset >= self.length``.
        """
        cdef uint64_t off = _nonneg(offset, "offset")
        return self.c_next_set(off) if offset < self._length else -1

    def next_clear(self, offset):
        """Byte offset of the first clean byte at or after ``offset``, or -1.

        Same conventions as next_set.
        """
        cdef uint64_t off = _nonneg(offset, "offset")
        return self.c_next_clear(off) if offset < self._length else -1

    def count(self):
        """Number of dirty bytes: dirty granules x granularity, the last
        granule counted only up to ``length``."""
        return self.c_count()

    def extents(self, offset=0, length=None):
        """Iterate ``(start, length)`` byte runs of dirty granules.

        Runs are maximal, in order, and clamped to the query range
        [offset, offset+length) and to the bitmap's length (``length=None``
        means to the end). ValueError if ``offset > self.length``.
        The bitmap is re-read at every step; changing it while iterating is
        allowed and the iteration sees the changes past the current run.
        """
        cdef uint64_t start = _start(self, offset, True)
        cdef uint64_t end
        if length is None:
            end = self._length
        else:
            end = start + _len(self, length)
            if end > self._length:
                end = self._length
        return _Extents(self, start, end)

    def reset_all(self):
        """Clear every bit."""
        memset(self._set[0], 0, self._nw[0] * 8)
        self._nset = 0
        self._fill_summary(self._set, False)
        self._fill_summary(self._clr, True)

    def set_all(self):
        """Set every bit (the whole length is dirty)."""
        if self._nbits == 0:
            return
        memset(self._set[0], 0xFF, self._nw[0] * 8)
        self._set[0][self._nw[0] - 1] = self._mask(self._nw[0] - 1)
        self._nset = self._nbits
        self._fill_summary(self._set, True)
        self._fill_summary(self._clr, False)

    def is_empty(self):
        """True if no bit is set."""
        return self._nset == 0

    def copy(self):
        """An independent Bitmap with the same length, granularity and bits."""
        cdef Bitmap out = Bitmap.__new__(Bitmap, 0, self._gran)
        cdef int lvl
        out._free()
        out._alloc(self._length)
        for lvl in range(self._depth):
            memcpy(out._set[lvl], self._set[lvl], self._nw[lvl] * 8)
            if lvl:
                memcpy(out._clr[lvl], self._clr[lvl], self._nw[lvl] * 8)
        out._nset = self._nset
        return out

    def merge(self, Bitmap other not None):
        """OR ``other``'s bits into this bitmap.

        ValueError unless both have the same length and granularity.
        """
        cdef uint64_t i
        cdef uint64_t *o = other._set[0]
        cdef uint64_t *d = self._set[0]
        if other._gran != self._gran or other._length != self._length:
            raise ValueError(f"cannot merge a bitmap of {other._length} bytes / granularity "
                             f"{other._gran} into one of {self._length} bytes / granularity {self._gran}")
        if other is self:
            return
        with nogil:
            for i in range(self._nw[0]):
                if o[i] & ~d[i]:
                    self._update_word(i, d[i] | o[i])

    def resize(self, length):
        """Change the covered length, keeping bits of granules that remain.

        Growing adds clean granules (a dirty granule that straddled the old
        end stays dirty and now covers more bytes); shrinking drops granules
        past the new end.
        """
        cdef uint64_t newlen = _nonneg(length, "length")
        cdef uint64_t *old = self._set[0]
        cdef uint64_t oldnw = self._nw[0], keep
        cdef int lvl
        if length >= 2 ** 63:
            raise ValueError(f"length {length} is too large")
        # Detach the data words so _free() keeps them for copying.
        self._set[0] = NULL
        self._free()
        try:
            self._alloc(newlen)
        except MemoryError:
            # Keep the object usable (empty, length 0) rather than dangling.
            free(old)
            self._alloc(0)
            raise
        keep = oldnw if oldnw < self._nw[0] else self._nw[0]
        memcpy(self._set[0], old, keep * 8)
        free(old)
        # Clear bits past the new end (shrinking) so the padding stays zero.
        self._set[0][self._nw[0] - 1] &= self._mask(self._nw[0] - 1)
        self._rebuild()

    def __repr__(self):
        return (f"<Bitmap length={self._length} granularity={self._gran} "
                f"dirty={self.c_count()}>")


@cython.final
cdef class _Extents:
    """Iterator behind Bitmap.extents()."""
    cdef Bitmap bm
    cdef uint64_t pos, end

    def __cinit__(self, Bitmap bm, uint64_t pos, uint64_t end):
        self.bm = bm
        self.pos = pos
        self.end = end

    def __iter__(self):
        return self

    def __next__(self):
        cdef int64_t s, e
        cdef uint64_t end = self.end
        if end > self.bm._length:       # the bitmap shrank meanwhile
            end = self.bm._length
        if self.pos >= end:
            raise StopIteration
        s = self.bm.c_next_set(self.pos)
        if s < 0 or <uint64_t>s >= end:
            self.pos = end
            raise StopIteration
        e = self.bm.c_next_clear(<uint64_t>s)
        if e < 0 or <uint64_t>e > end:
            e = end
        self.pos = e
        return (s, e - s)
