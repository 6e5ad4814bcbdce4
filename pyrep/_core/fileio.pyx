# cython: language_level=3
"""Positional file I/O for pyrep, with the GIL released around every syscall.

All functions take a raw file descriptor and raise ``OSError(errno, strerror)``
(so the usual subclasses such as FileNotFoundError apply) on failure.

Transfer functions (preadv, pwritev, pread_into, pwrite_from):
- retry on EINTR and after short transfers, continuing where the kernel
  stopped, until everything is done;
- a read stops early only at end of file and returns the byte count read;
  the bytes after it are left untouched (the caller zero-fills);
- a write that makes no progress (returns 0) raises OSError(EIO);
- a zero-length transfer returns 0 without making a syscall (so it does not
  validate the fd);
- reading into a read-only buffer raises BufferError before any I/O.
An error after partial progress raises; the partial count is not reported
(the data in the buffers is then undefined).
"""
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from libc.errno cimport errno, EINTR, EIO, ENXIO
from libc.string cimport strerror
from posix.types cimport off_t
from posix.uio cimport iovec, preadv as c_preadv, pwritev as c_pwritev
from posix.unistd cimport pread as c_pread, pwrite as c_pwrite, fdatasync as c_fdatasync, lseek

from pyrep._core.iovec cimport IOVector

cdef extern from *:
    """
    #include <limits.h>
    #include <fcntl.h>
    #include <unistd.h>
    #include <linux/falloc.h>
    #ifndef IOV_MAX
    #define IOV_MAX 1024
    #endif
    """
    enum: IOV_MAX
    enum: SEEK_DATA
    enum: SEEK_HOLE
    enum: FALLOC_FL_KEEP_SIZE
    enum: FALLOC_FL_PUNCH_HOLE
    enum: FALLOC_FL_ZERO_RANGE
    int c_fallocate "fallocate" (int fd, int mode, off_t offset, off_t length) nogil
    Py_ssize_t c_copy_file_range "copy_file_range" (int fd_in, off_t *off_in, int fd_out, off_t *off_out,
                                                    size_t length, unsigned int flags) nogil

#: fallocate(2) mode bits, for :func:`fallocate`.
FALLOC_KEEP_SIZE = FALLOC_FL_KEEP_SIZE
FALLOC_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE
FALLOC_ZERO_RANGE = FALLOC_FL_ZERO_RANGE
#: Largest number of buffers one preadv(2)/pwritev(2) call accepts here;
#: longer vectors are transferred in chunks of this many entries.
MAX_IOV = IOV_MAX


cdef int _io_active = 0
cdef int _io_ncpu = 1


def _init_ncpu():
    global _io_ncpu
    import os
    try:
        _io_ncpu = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        _io_ncpu = max(1, os.cpu_count() or 1)


_init_ncpu()


cdef void io_enter() noexcept:
    global _io_active
    _io_active += 1


cdef void io_leave() noexcept:
    global _io_active
    _io_active -= 1


cdef enum:
    _KEEP_GIL_IO = 16384


cdef bint io_keep_gil(size_t length) noexcept:
    return length <= _KEEP_GIL_IO and _io_active > _io_ncpu


cdef bint io_alone() noexcept:
    return _io_active <= 1


def io_active():
    """Requests in flight through backends right now (for tests and diagnostics)."""
    return _io_active


cdef int _raise(int err) except -1:
    raise OSError(err, strerror(err).decode("utf-8", "replace"))


cdef Py_ssize_t _xfer_one(int fd, char *buf, size_t length, off_t offset,
                          bint write, int *err) noexcept nogil:
    # Transfer one contiguous buffer; returns bytes done or -1 with *err set.
    cdef size_t done = 0
    cdef Py_ssize_t r
    while done < length:
        if write:
            r = c_pwrite(fd, buf + done, length - done, offset + <off_t>done)
        else:
            r = c_pread(fd, buf + done, length - done, offset + <off_t>done)
        if r < 0:
            if errno == EINTR:
                continue
            err[0] = errno
            return -1
        if r == 0:
            if write:
                err[0] = EIO
                return -1
            break                       # end of file
        done += <size_t>r
    return <Py_ssize_t>done


cdef Py_ssize_t _copy_range(int fd_in, off_t off_in, int fd_out, off_t off_out, size_t length,
                            int *err) noexcept nogil:
    cdef size_t done = 0
    cdef Py_ssize_t r
    while done < length:
        r = c_copy_file_range(fd_in, &off_in, fd_out, &off_out, length - done, 0)
        if r < 0:
            if errno == EINTR:
                continue
            err[0] = errno
            return -1
        if r == 0:
            break                       # end of fd_in
        done += <size_t>r               # the kernel advanced both offsets
    return <Py_ssize_t>done


cdef Py_ssize_t _xfer_vec(int fd, iovec *v, Py_ssize_t n, off_t offset,
                          bint write, int *err) noexcept nogil:
    # Transfer n entries (each non-empty, as IOVector guarantees). After a
    # short transfer that stops inside entry i, finish that entry with
    # _xfer_one and go on with vectored calls from entry i+1: the shared
    # entry array is never modified, so no copy is needed.
    cdef size_t done = 0, skip = 0, left, avail
    cdef Py_ssize_t i = 0, r
    cdef int cnt
    while i < n:
        if skip:
            # finish the entry a short transfer stopped in on its own, then go on vectored
            r = _xfer_one(fd, <char *>v[i].iov_base + skip, v[i].iov_len - skip, offset + <off_t>done,
                          write, err)
            if r < 0:
                return -1
            done += <size_t>r
            if <size_t>r < v[i].iov_len - skip:
                break                   # end of file
            skip = 0
            i += 1
            continue
        cnt = IOV_MAX if n - i > IOV_MAX else <int>(n - i)
        if write:
            r = c_pwritev(fd, &v[i], cnt, offset + <off_t>done)
        else:
            r = c_preadv(fd, &v[i], cnt, offset + <off_t>done)
        if r < 0:
            if errno == EINTR:
                continue
            err[0] = errno
            return -1
        if r == 0:
            if write:
                err[0] = EIO
                return -1
            break                       # end of file
        done += <size_t>r
        left = <size_t>r
        while left:
            avail = v[i].iov_len - skip
            if left >= avail:
                left -= avail
                skip = 0
                i += 1
            else:
                skip += left
                left = 0
    return <Py_ssize_t>done


cdef Py_ssize_t _vec(int fd, IOVector iov, long long offset, bint write) except -1:
    cdef Py_ssize_t r
    cdef int err = 0
    if not write and not iov.all_writable:
        raise BufferError("cannot read into an IOVector that has a read-only buffer")
    if iov.n == 0:
        return 0
    # Pin so that no other thread can free or move the entry array (or drop
    # the buffers) while the syscall runs without the GIL.
    iov.c_pin()
    with nogil:
        if iov.n == 1:
            r = _xfer_one(fd, <char *>iov.iov[0].iov_base, iov.iov[0].iov_len, offset, write, &err)
        else:
            r = _xfer_vec(fd, iov.iov, iov.n, offset, write, &err)
    iov.c_unpin()
    if r < 0:
        _raise(err)
    return r


def preadv(int fd, IOVector iov not None, long long offset):
    """Read ``iov.size`` bytes at ``offset`` into ``iov``; return bytes read.

    Fewer than ``iov.size`` only at end of file. BufferError if any buffer
    of ``iov`` is read-only.
    """
    return _vec(fd, iov, offset, False)


def pwritev(int fd, IOVector iov not None, long long offset):
    """Write all of ``iov`` at ``offset``; return ``iov.size``."""
    return _vec(fd, iov, offset, True)


def pread_into(int fd, buf, long long offset):
    """Read ``len(buf)`` bytes at ``offset`` into the writable buffer ``buf``.

    Returns the bytes read (fewer only at end of file).
    """
    cdef Py_buffer view
    cdef Py_ssize_t r
    cdef int err = 0
    PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
    with nogil:
        r = _xfer_one(fd, <char *>view.buf, <size_t>view.len, offset, False, &err)
    PyBuffer_Release(&view)
    if r < 0:
        _raise(err)
    return r


def pwrite_from(int fd, buf, long long offset):
    """Write all of the buffer ``buf`` at ``offset``; return its length."""
    cdef Py_buffer view
    cdef Py_ssize_t r
    cdef int err = 0
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    with nogil:
        r = _xfer_one(fd, <char *>view.buf, <size_t>view.len, offset, True, &err)
    PyBuffer_Release(&view)
    if r < 0:
        _raise(err)
    return r


def fdatasync(int fd):
    """fdatasync(2): make the file's data (and size) stable."""
    cdef int r
    cdef int err = 0
    with nogil:
        while True:
            r = c_fdatasync(fd)
            if r == 0 or errno != EINTR:
                break
        if r < 0:
            err = errno
    if r < 0:
        _raise(err)


def fallocate(int fd, int mode, long long offset, long long length):
    """fallocate(2). ``mode`` is 0 (allocate), ``FALLOC_PUNCH_HOLE |
    FALLOC_KEEP_SIZE`` (deallocate, reads return zeroes) or
    ``FALLOC_ZERO_RANGE`` (optionally ``| FALLOC_KEEP_SIZE``). Unsupported
    modes raise OSError (EOPNOTSUPP); callers fall back to writing zeroes.
    """
    cdef int r
    cdef int err = 0
    with nogil:
        while True:
            r = c_fallocate(fd, mode, offset, length)
            if r == 0 or errno != EINTR:
                break
        if r < 0:
            err = errno
    if r < 0:
        _raise(err)


def punch_hole(int fd, long long offset, long long length):
    """Deallocate [offset, offset+length) keeping the file size (reads give zeroes)."""
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def zero_range(int fd, long long offset, long long length):
    """Zero [offset, offset+length) (may extend the file), without writing data."""
    fallocate(fd, FALLOC_FL_ZERO_RANGE, offset, length)


cdef object _seek(int fd, long long offset, int whence):
    cdef off_t r
    cdef int err = 0
    if offset < 0:
        # Linux answers ENXIO here, which would read as "no data": refuse instead.
        raise ValueError(f"negative offset {offset}")
    with nogil:
        r = lseek(fd, offset, whence)
        if r < 0:
            err = errno
    if r < 0:
        if err == ENXIO:
            return None
        _raise(err)
    return r


def lseek_data(int fd, long long offset):
    """Offset of the first data byte at or after ``offset``, or None if there
    is none (ENXIO: only holes up to end of file, or ``offset`` >= size).

    Other errors (e.g. EINVAL where SEEK_DATA is unsupported) raise OSError;
    a negative ``offset`` raises ValueError.
    """
    return _seek(fd, offset, SEEK_DATA)


def lseek_hole(int fd, long long offset):
    """Offset of the first hole at or after ``offset`` (end of file counts as
    a hole), or None if ``offset`` is at or past end of file (ENXIO).
    """
    return _seek(fd, offset, SEEK_HOLE)
