# cython: language_level=3
"""IOVector: a zero-copy scatter-gather list of buffer views.

The Python-level contract is in docs/internals.md ("Core types"); the C-level
fields are declared in iovec.pxd for other Cython modules.

Memory safety: every entry holds a buffer export (``PyObject_GetBuffer``) of
the object it was added from, owned by a small private holder object shared by
all entries (and slices/concats in other vectors) that point into that export.
The export is released only when the last vector referencing it drops it, so a
bytearray cannot be resized and an mmap cannot be closed under a vector.

Not internally locked: like a list, an IOVector must not be mutated by one
thread while another uses it. Entry-list changes are refused while C code has
pinned the vector for GIL-free I/O (see ``IOVector.pins``).
"""
cimport cython
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE,
                             PyBUF_WRITABLE, PyBUF_FORMAT, PyBUF_ND, PyBUF_STRIDES)
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memmove, memset as c_memset, memcmp
from posix.uio cimport iovec


@cython.final
@cython.freelist(64)
cdef class _BufHold:
    """Owns one buffer export; released when the last entry using it goes."""
    cdef Py_buffer view
    cdef bint held

    def __dealloc__(self):
        if self.held:
            self.held = False
            PyBuffer_Release(&self.view)

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        # Re-export the held bytes as a flat unsigned-byte buffer so buffers()
        # can hand out memoryviews that keep this holder (and thus the
        # original export) alive.
        if (flags & PyBUF_WRITABLE) and self.view.readonly:
            raise BufferError("buffer is read-only")
        buffer.buf = self.view.buf
        buffer.len = self.view.len
        buffer.readonly = self.view.readonly
        buffer.itemsize = 1
        if flags & PyBUF_FORMAT:
            buffer.format = "B"
        else:
            buffer.format = NULL
        buffer.ndim = 1
        buffer.shape = &buffer.len if (flags & PyBUF_ND) == PyBUF_ND else NULL
        buffer.strides = &buffer.itemsize if (flags & PyBUF_STRIDES) == PyBUF_STRIDES else NULL
        buffer.suboffsets = NULL
        buffer.internal = NULL
        buffer.obj = self

    def __releasebuffer__(self, Py_buffer *buffer):
        pass


cdef inline int _range_check(size_t total, object offset, object length, str what) except -1:
    # Python ints may be negative or huge: check before narrowing to size_t.
    if offset < 0 or length < 0:
        raise ValueError(f"{what}: negative offset or length ({offset}, {length})")
    if offset > total or length > total - offset:
        raise ValueError(f"{what}: range [{offset}, {offset}+{length}) is outside the vector "
                         f"of {total} bytes")
    return 0


# Copies of at least this many bytes run with the GIL released (smaller ones
# finish before another thread could make use of it).
cdef enum:
    _NOGIL_COPY = 65536


cdef enum:
    _FILL = 0      # set the range to a byte
    _GATHER = 1    # copy the range out to a flat buffer
    _SCATTER = 2   # copy a flat buffer into the range


cdef void _walk(iovec *v, Py_ssize_t n, size_t off, size_t ln, char *p, int op, int byte) noexcept nogil:
    """Apply ``op`` to bytes [off, off+ln) of the entries, ``p`` walking the flat side."""
    cdef Py_ssize_t i = 0
    cdef size_t elen, take
    cdef char *base
    while ln > 0 and i < n:
        elen = v[i].iov_len
        if off >= elen:
            off -= elen
        else:
            take = elen - off
            if take > ln:
                take = ln
            base = <char *>v[i].iov_base + off
            if op == _FILL:
                c_memset(base, byte, take)
            elif op == _GATHER:
                memcpy(p, base, take)
                p += take
            else:
                memmove(base, p, take)  # data may overlap the vector's own memory
                p += take
            ln -= take
            off = 0
        i += 1


@cython.final
@cython.freelist(64)
cdef class IOVector:
    """A list of views of buffer-protocol objects, addressed as one byte range.

    ``IOVector()`` is empty; ``IOVector(buf)`` views one buffer. Any
    C-contiguous buffer-protocol object is accepted (bytes, bytearray,
    memoryview, mmap, numpy arrays, ...); nothing is copied. A vector can be
    read into only if every buffer in it is writable (``writable``).
    Zero-length buffers are accepted and dropped: they add no entry.

    Bounds errors raise ValueError; writing through a read-only buffer raises
    BufferError; changing the entry list while the vector is pinned by
    in-progress GIL-free I/O raises BufferError.
    """

    def __cinit__(self, buf=None):
        self.iov = self._inl_iov
        self.owners = self._inl_own
        self.cap = IOVECTOR_INLINE
        self.all_writable = True
        if buf is not None:
            self.c_add(buf)

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self.n):
            Py_XDECREF(self.owners[i])
        if self.iov != self._inl_iov:
            free(self.iov)
            free(self.owners)

    cdef int c_check_mutable(self) except -1:
        if self.npins:
            raise BufferError("IOVector is in use by I/O in progress; its entries cannot change")
        return 0

    cdef int _reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t need = self.n + extra
        cdef Py_ssize_t newcap
        cdef iovec *niov
        cdef PyObject **nown
        if need <= self.cap:
            return 0
        newcap = self.cap * 2
        if newcap < need:
            newcap = need
        if self.iov == self._inl_iov:
            niov = <iovec *>malloc(newcap * sizeof(iovec))
            nown = <PyObject **>malloc(newcap * sizeof(PyObject *))
            if niov == NULL or nown == NULL:
                free(niov)
                free(nown)
                raise MemoryError()
            memcpy(niov, self.iov, self.n * sizeof(iovec))
            memcpy(nown, self.owners, self.n * sizeof(PyObject *))
        else:
            niov = <iovec *>realloc(self.iov, newcap * sizeof(iovec))
            if niov == NULL:
                raise MemoryError()
            self.iov = niov
            nown = <PyObject **>realloc(self.owners, newcap * sizeof(PyObject *))
            if nown == NULL:
                raise MemoryError()
        self.iov = niov
        self.owners = nown
        self.cap = newcap
        return 0

    cdef int _append(self, void *base, size_t length, PyObject *owner, bint readonly) except -1:
        if self.n == self.cap:
            self._reserve(1)
        self.iov[self.n].iov_base = base
        self.iov[self.n].iov_len = length
        Py_INCREF(<object>owner)
        self.owners[self.n] = owner
        self.n += 1
        self.nbytes += length
        if readonly:
            self.all_writable = False
        return 0

    cdef int c_add(self, object buf) except -1:
        cdef _BufHold h
        if self.npins:
            self.c_check_mutable()
        h = _BufHold.__new__(_BufHold)
        # PyBUF_SIMPLE asks for contiguous bytes, readable or writable; the
        # exporter reports which in view.readonly.
        PyObject_GetBuffer(buf, &h.view, PyBUF_SIMPLE)
        h.held = True
        if h.view.len > 0:
            self._append(h.view.buf, <size_t>h.view.len, <PyObject *>h, h.view.readonly)
        return 0

    cdef int c_concat(self, IOVector src, size_t offset, size_t length) except -1:
        # Caller has checked offset + length <= src.nbytes.
        cdef Py_ssize_t i = 0, n0 = src.n
        cdef size_t take, elen
        self.c_check_mutable()
        while length > 0 and i < n0:
            elen = src.iov[i].iov_len
            if offset >= elen:
                offset -= elen
                i += 1
                continue
            take = elen - offset
            if take > length:
                take = length
            # src may be self: _append can move the arrays, so re-read
            # src.iov/src.owners on every step rather than caching them.
            self._append(<char *>src.iov[i].iov_base + offset, take, src.owners[i],
                         (<_BufHold>src.owners[i]).view.readonly)
            length -= take
            offset = 0
            i += 1
        return 0

    def add(self, buf):
        """Append a view of ``buf`` (any contiguous buffer-protocol object)."""
        self.c_add(buf)

    def concat(self, IOVector src not None, offset, length):
        """Append views of ``src``'s bytes [offset, offset+length) (no copy).

        ``src`` may be this vector. ValueError if the range is outside ``src``.
        """
        _range_check(src.nbytes, offset, length, "concat")
        self.c_concat(src, offset, length)

    def slice(self, offset, length):
        """A new IOVector viewing bytes [offset, offset+length) of this one."""
        _range_check(self.nbytes, offset, length, "slice")
        cdef IOVector out = IOVector.__new__(IOVector)
        out.c_concat(self, offset, length)
        return out

    def reset(self):
        """Drop every entry (releasing the buffers); the vector becomes empty."""
        self.c_check_mutable()
        cdef Py_ssize_t i, n = self.n
        # Clear first so that a release callback re-entering this object
        # sees a consistent, empty vector.
        self.n = 0
        self.nbytes = 0
        self.all_writable = True
        for i in range(n):
            Py_XDECREF(self.owners[i])
            self.owners[i] = NULL

    @property
    def size(self):
        """Total number of bytes viewed."""
        return self.nbytes

    @property
    def niov(self):
        """Number of entries (zero-length buffers are not counted)."""
        return self.n

    @property
    def writable(self):
        """True if every buffer in the vector is writable (True when empty)."""
        return self.all_writable

    @property
    def pins(self):
        """Number of GIL-free I/O operations currently using the vector."""
        return self.npins

    def buffers(self):
        """A list of memoryviews, one per entry, in order (they share memory)."""
        cdef Py_ssize_t i
        cdef _BufHold h
        cdef Py_ssize_t start
        out = []
        for i in range(self.n):
            h = <_BufHold>self.owners[i]
            start = <char *>self.iov[i].iov_base - <char *>h.view.buf
            out.append(memoryview(h)[start:start + <Py_ssize_t>self.iov[i].iov_len])
        return out

    cdef int c_check_writable(self, size_t offset, size_t length) except -1:
        # Refuse before writing anything so a failed call leaves no partial write.
        cdef Py_ssize_t i = 0
        cdef size_t elen
        if self.all_writable:
            return 0
        while length > 0 and i < self.n:
            elen = self.iov[i].iov_len
            if offset >= elen:
                offset -= elen
            else:
                if (<_BufHold>self.owners[i]).view.readonly:
                    raise BufferError(f"IOVector entry {i} is a read-only buffer; cannot write into it")
                if elen - offset >= length:
                    return 0
                length -= elen - offset
                offset = 0
            i += 1
        return 0

    def memset(self, offset, int byte, length):
        """Set bytes [offset, offset+length) to ``byte`` (0..255)."""
        if byte < 0 or byte > 255:
            raise ValueError(f"memset: byte must be in 0..255, not {byte}")
        _range_check(self.nbytes, offset, length, "memset")
        cdef size_t off = offset, ln = length
        self.c_check_writable(off, ln)
        if ln < _NOGIL_COPY:
            _walk(self.iov, self.n, off, ln, NULL, _FILL, byte)
            return
        self.c_pin()  # the entry array must not change while the GIL is released
        try:
            with nogil:
                _walk(self.iov, self.n, off, ln, NULL, _FILL, byte)
        finally:
            self.c_unpin()

    cdef void c_gather(self, size_t off, size_t ln, char *dst) noexcept:
        if ln < _NOGIL_COPY:
            _walk(self.iov, self.n, off, ln, dst, _GATHER, 0)
            return
        self.c_pin()  # the entry array must not change while the GIL is released
        with nogil:
            _walk(self.iov, self.n, off, ln, dst, _GATHER, 0)
        self.c_unpin()

    cdef void c_gather_held(self, size_t off, size_t ln, char *dst) noexcept:
        # the GIL stays held, whatever the size: callers rely on the copy being atomic for other threads
        _walk(self.iov, self.n, off, ln, dst, _GATHER, 0)

    cdef void c_scatter_held(self, size_t off, size_t ln, const char *src) noexcept:
        _walk(self.iov, self.n, off, ln, <char *>src, _SCATTER, 0)

    def copy_to(self, offset, length):
        """Bytes [offset, offset+length) of the vector, as a new bytes object."""
        _range_check(self.nbytes, offset, length, "copy_to")
        out = PyBytes_FromStringAndSize(NULL, length)
        self.c_gather(offset, length, PyBytes_AS_STRING(out))
        return out

    def to_bytes(self):
        """The whole vector's content, as a new bytes object."""
        if self.n == 1:
            return PyBytes_FromStringAndSize(<char *>self.iov[0].iov_base, self.nbytes)
        out = PyBytes_FromStringAndSize(NULL, self.nbytes)
        self.c_gather(0, self.nbytes, PyBytes_AS_STRING(out))
        return out

    def copy_from(self, offset, data):
        """Write ``data`` (any buffer) into the vector at ``offset``; return len(data).

        ValueError if it does not fit; BufferError if it would touch a
        read-only buffer (nothing is written then). ``data`` may overlap the
        vector's own memory.
        """
        cdef Py_buffer src
        cdef size_t off, ln
        cdef const char *p
        PyObject_GetBuffer(data, &src, PyBUF_SIMPLE)
        try:
            _range_check(self.nbytes, offset, src.len, "copy_from")
            off = offset
            ln = src.len
            self.c_check_writable(off, ln)
            p = <const char *>src.buf
            if ln < _NOGIL_COPY:
                _walk(self.iov, self.n, off, ln, <char *>p, _SCATTER, 0)
            else:
                self.c_pin()  # the entry array must not change while the GIL is released
                try:
                    with nogil:
                        _walk(self.iov, self.n, off, ln, <char *>p, _SCATTER, 0)
                finally:
                    self.c_unpin()
            return src.len
        finally:
            PyBuffer_Release(&src)

    def is_zero(self):
        """True if every byte of the vector is zero (True when empty)."""
        cdef Py_ssize_t i
        cdef const unsigned char *p
        cdef size_t ln
        for i in range(self.n):
            p = <const unsigned char *>self.iov[i].iov_base
            ln = self.iov[i].iov_len
            # p[0] == 0 and p[k] == p[k+1] for all k  <=>  all zero; memcmp
            # is vectorised by libc, far faster than a byte loop.
            if p[0] != 0 or memcmp(p, p + 1, ln - 1) != 0:
                return False
        return True

    def __repr__(self):
        return f"<IOVector niov={self.n} size={self.nbytes}{'' if self.all_writable else ' read-only'}>"
