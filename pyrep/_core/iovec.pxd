# cython: language_level=3
"""C-level view of pyrep's IOVector (see iovec.pyx for the Python contract).

Other Cython modules cimport this to reach the scatter-gather list without
Python calls: ``iov[0:n]`` is laid out exactly as ``struct iovec`` so it can be
handed to preadv(2)/pwritev(2) directly.
"""
from posix.uio cimport iovec
from cpython.object cimport PyObject

cdef enum:
    # Entries stored inside the object itself: the common one- and two-buffer
    # vectors never touch malloc.
    IOVECTOR_INLINE = 2


cdef class IOVector:
    # Entries [0, n): base/len of each piece. Never zero-length (empty
    # buffers are dropped on add), so a syscall always makes progress.
    cdef iovec *iov
    # Parallel array: one owned reference per entry to the object that holds
    # the Py_buffer export keeping that memory alive (a private _BufHold).
    cdef PyObject **owners
    cdef Py_ssize_t n
    cdef Py_ssize_t cap
    # Sum of iov[i].iov_len.
    cdef size_t nbytes
    # True iff every entry is writable (True for an empty vector).
    cdef bint all_writable
    # > 0 while C code is using iov/owners without the GIL. Operations that
    # change the entry list (add, concat into it, reset) raise BufferError
    # while pinned, so the array cannot be freed or reallocated under a
    # running syscall. Pair c_pin()/c_unpin() with the GIL held.
    cdef int npins
    cdef iovec _inl_iov[IOVECTOR_INLINE]
    cdef PyObject *_inl_own[IOVECTOR_INLINE]

    cdef int c_add(self, object buf) except -1
    cdef int c_concat(self, IOVector src, size_t offset, size_t length) except -1
    cdef int c_check_mutable(self) except -1
    cdef int c_check_writable(self, size_t offset, size_t length) except -1
    cdef void c_gather(self, size_t offset, size_t length, char *dst) noexcept
    # Same, GIL held throughout (an atomic copy as far as other Python threads can tell).
    cdef void c_gather_held(self, size_t offset, size_t length, char *dst) noexcept
    cdef void c_scatter_held(self, size_t offset, size_t length, const char *src) noexcept
    cdef int _reserve(self, Py_ssize_t extra) except -1
    cdef int _append(self, void *base, size_t length, PyObject *owner, bint readonly) except -1
    cdef inline void c_pin(self) noexcept:
        self.npins += 1
    cdef inline void c_unpin(self) noexcept:
        self.npins -= 1
