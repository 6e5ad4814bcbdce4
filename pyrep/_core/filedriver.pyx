# cython: language_level=3
"""The file driver's request path in C (``drivers/file.py`` keeps the rest of the driver).

One syscall from the request's vector, GIL released (or kept where a
hand-over costs more than the copy: see ``fileio.pxd``).
"""
from libc.errno cimport errno as c_errno, EINVAL, EOPNOTSUPP, ENOSYS
from posix.types cimport off_t
from posix.uio cimport iovec

from pyrep._core.constants cimport REQ_FUA
from pyrep._core.fileio cimport _xfer_one, _xfer_vec, io_keep_gil
from pyrep._core.iovec cimport IOVector

from pyrep.errors import BlockError

cdef extern from "unistd.h" nogil:
    int fdatasync(int fd)

cdef extern from "sys/vfs.h" nogil:
    ctypedef struct statfs_t "struct statfs":
        long f_type
    int fstatfs(int fd, statfs_t *buf)

cdef extern from "sys/uio.h" nogil:
    ssize_t preadv2(int fd, const iovec *iov, int iovcnt, off_t offset, int flags)
    int RWF_NOWAIT

cdef enum:
    TMPFS_MAGIC = 0x01021994
    RAMFS_MAGIC = 0x858458f6
    _SMALL_IO = 65536       # reads up to this size first try RWF_NOWAIT with the GIL held


cdef class FileIO:
    """The file driver's read and write: one syscall from the request's vector, GIL released.

    Reads past EOF fill the rest with zeroes; errors raise BlockError with the errno."""
    cdef public int fd
    cdef public str path
    cdef public long long size
    cdef public bint nowait         # try cached small reads without releasing the GIL
    cdef public bint memfs          # tmpfs/ramfs: small transfers are memory copies, keep the GIL

    def __init__(self, int fd, str path, long long size):
        cdef statfs_t st
        self.fd = fd
        self.path = path
        self.size = size
        self.nowait = True
        self.memfs = fstatfs(fd, &st) == 0 and (st.f_type == TMPFS_MAGIC or st.f_type == RAMFS_MAGIC)

    cpdef preadv(self, long long offset, long long length, IOVector iov):
        cdef Py_ssize_t done = 0, r
        cdef int err = 0
        if not iov.all_writable:
            raise BlockError(EINVAL, "file: read into a read-only buffer")
        if length <= _SMALL_IO and self.nowait and iov.n <= 64:
            # a small read the page cache can serve is cheaper than handing the GIL to another thread
            # and taking it back: try it without blocking (RWF_NOWAIT) while holding the GIL; anything
            # else (not cached, short, unsupported) takes the normal path below
            r = preadv2(self.fd, iov.iov, <int>iov.n, offset, RWF_NOWAIT)
            if r == length:
                return None
            if r < 0 and c_errno in (EOPNOTSUPP, ENOSYS, EINVAL):
                self.nowait = False
        iov.c_pin()
        try:
            done = _xfer(self.fd, iov, offset, False, &err, self.memfs and io_keep_gil(length))
        finally:
            iov.c_unpin()
        if err:
            raise BlockError(err, f"file: read of {length} bytes at {offset} failed: {_strerror(err)}", self.path)
        if done < length:
            iov.memset(done, 0, length - done)  # past EOF reads as zeroes
        return None

    cpdef pwritev(self, long long offset, long long length, IOVector iov, int flags=0):
        cdef Py_ssize_t done
        cdef int err = 0
        iov.c_pin()
        try:
            done = _xfer(self.fd, iov, offset, True, &err, self.memfs and io_keep_gil(length))
        finally:
            iov.c_unpin()
        if err:
            raise BlockError(err, f"file: write of {length} bytes at {offset} failed: {_strerror(err)}", self.path)
        if offset + length > self.size:
            self.size = offset + length
        if flags & REQ_FUA:
            with nogil:
                err = fdatasync(self.fd) and c_errno
            if err:
                raise BlockError(err, f"file: flush after FUA write failed: {_strerror(err)}", self.path)
        return None


cdef str _strerror(int err):
    import os
    return os.strerror(err)


cdef Py_ssize_t _xfer(int fd, IOVector iov, long long offset, bint write, int *err, bint keep_gil=False):
    """Move the whole vector; bytes done (short reads at EOF), ``err`` set on failure. The GIL is released
    unless ``keep_gil`` (a small transfer on a memory file system, which never waits for a device)."""
    cdef Py_ssize_t r
    if keep_gil:
        if iov.n == 1:
            return _xfer_one(fd, <char *>iov.iov[0].iov_base, iov.iov[0].iov_len, offset, write, err)
        return _xfer_vec(fd, iov.iov, iov.n, offset, write, err)
    with nogil:
        if iov.n == 1:
            r = _xfer_one(fd, <char *>iov.iov[0].iov_base, iov.iov[0].iov_len, offset, write, err)
        else:
            r = _xfer_vec(fd, iov.iov, iov.n, offset, write, err)
    return r
