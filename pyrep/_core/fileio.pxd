# cython: language_level=3
"""C-level file transfers for other Cython modules (the request path in fastpath.pyx)."""
from posix.types cimport off_t
from posix.uio cimport iovec

# Both return bytes done (short only at end of file, for reads) or -1 with *err set;
# they retry EINTR and short transfers and never modify the entry array.
cdef Py_ssize_t _xfer_one(int fd, char *buf, size_t length, off_t offset, bint write, int *err) noexcept nogil
cdef Py_ssize_t _xfer_vec(int fd, iovec *v, Py_ssize_t n, off_t offset, bint write, int *err) noexcept nogil

# Requests in flight through backends (counted with the GIL held). A small transfer on a memory file
# system is a memory copy: releasing the GIL for it pays only while another request can use another
# CPU meanwhile. With more requests in flight than CPUs the threads queue for the GIL anyway and each
# release costs a hand-over (futex wake, context switch): io_keep_gil() says so. (Keeping it at one
# request in flight would save ~0.1 us, but a second thread waiting for the GIL is not counted yet,
# and two threads on two CPUs would then never overlap.)
cdef void io_enter() noexcept
cdef void io_leave() noexcept
cdef bint io_keep_gil() noexcept
