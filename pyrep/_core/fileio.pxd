# cython: language_level=3
"""C-level file transfers for other Cython modules (the request path in fastpath.pyx)."""
from posix.types cimport off_t
from posix.uio cimport iovec

# Both return bytes done (short only at end of file, for reads) or -1 with *err set;
# they retry EINTR and short transfers and never modify the entry array.
cdef Py_ssize_t _xfer_one(int fd, char *buf, size_t length, off_t offset, bint write, int *err) noexcept nogil
cdef Py_ssize_t _xfer_vec(int fd, iovec *v, Py_ssize_t n, off_t offset, bint write, int *err) noexcept nogil
