# cython: language_level=3
"""C-level file transfers for other Cython modules (the request path in fastpath.pyx)."""
from posix.types cimport off_t
from posix.uio cimport iovec

# Both return bytes done (short only at end of file, for reads) or -1 with *err set;
# they retry EINTR and short transfers and never modify the entry array.
cdef Py_ssize_t _xfer_one(int fd, char *buf, size_t length, off_t offset, bint write, int *err) noexcept nogil
cdef Py_ssize_t _xfer_vec(int fd, iovec *v, Py_ssize_t n, off_t offset, bint write, int *err) noexcept nogil
# copy_file_range(2) of ``length`` bytes from fd_in at off_in to fd_out at off_out, in the kernel (no
# user buffer: one copy where read+write make two). Bytes copied (short only at the end of fd_in) or
# -1 with *err set; ENOSYS, EXDEV, EINVAL, EOPNOTSUPP mean "not here": the caller falls back to
# read+write, which must rewrite the whole range (a failed copy may have written part of it).
cdef Py_ssize_t _copy_range(int fd_in, off_t off_in, int fd_out, off_t off_out, size_t length,
                            int *err) noexcept nogil

# Requests in flight through backends (counted with the GIL held). A small transfer on a memory file
# system is a memory copy: releasing the GIL for it pays only while another request can use another
# CPU meanwhile. With more requests in flight than CPUs the threads queue for the GIL anyway and each
# release costs a hand-over (futex wake, context switch): io_keep_gil(length) says so, for transfers
# up to 16 KiB — a 4K copy is over before a hand-over would be; a 64K one is not, and releasing lets a
# second CPU work meanwhile (16 threads of 64K COW writes: 0.5 s released, 0.7-1.7 s kept). (Keeping
# it at one request in flight would save ~0.1 us, but a second thread waiting for the GIL is not
# counted yet, and two threads on two CPUs would then never overlap.) Callers decide whether the
# file is on a memory file system.
cdef void io_enter() noexcept
cdef void io_leave() noexcept
cdef bint io_keep_gil(size_t length) noexcept
# No other request in flight: the caller may take a path that is cheaper alone but holds a per-file
# lock longer (copy_file_range reads the old data while holding the target file's write lock).
cdef bint io_alone() noexcept
