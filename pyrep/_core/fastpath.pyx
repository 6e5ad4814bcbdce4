# cython: language_level=3
"""The request path in C: the backend's gate, the node layer's fast path, file I/O.

Python classes build on these bases (``BlockBackend(BackendCore)``,
``Node(NodeIO)``) and keep every slow or rare case in readable Python: the
fast path here is only what a common request needs — a bounds check against
a cached length, an in-flight count, and one call per layer.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.buffer cimport PyBUF_WRITABLE
from cpython.bytearray cimport PyByteArray_FromStringAndSize

from posix.types cimport off_t
from posix.uio cimport iovec

cdef extern from "unistd.h" nogil:
    int fdatasync(int fd)

cdef extern from "sys/vfs.h" nogil:
    ctypedef struct statfs_t "struct statfs":
        long f_type
    int fstatfs(int fd, statfs_t *buf)

cdef enum:
    TMPFS_MAGIC = 0x01021994
    RAMFS_MAGIC = 0x858458f6

cdef extern from "sys/uio.h" nogil:
    ssize_t preadv2(int fd, const iovec *iov, int iovcnt, off_t offset, int flags)
    int RWF_NOWAIT

cdef enum:
    _SMALL_IO = 65536       # reads up to this size first try RWF_NOWAIT with the GIL held
    REQ_FUA = 0x1           # pyrep.constants.REQ_FUA
    REQ_SERIALISING = 0x10  # pyrep.constants.REQ_SERIALISING
    REQ_WRITE_UNCHANGED = 0x8  # pyrep.constants.REQ_WRITE_UNCHANGED
from libc.errno cimport errno as c_errno, EINTR, EINVAL, EBADF, EPERM, EOPNOTSUPP, ENOSYS

from pyrep._core.iovec cimport IOVector
from pyrep._core.bitmap cimport Bitmap
from pyrep._core.memstore cimport MemStore
from libc.stdint cimport int64_t, uint64_t
from pyrep._core.fileio cimport _xfer_one, _xfer_vec, io_enter, io_leave, io_keep_gil

import errno as _errno

from pyrep.errors import BlockError

# Bumped by every resize anywhere in the graph (and by graph changes that can
# change a length), so backends know when their cached length is stale.
cdef long long _length_epoch = 0


def bump_length_epoch():
    """Tell every backend that some node's length may have changed."""
    global _length_epoch
    _length_epoch += 1


cdef class _WritableBytes:
    """Exports a fresh, unshared bytes object's storage as a writable buffer,
    so ``pread`` can read straight into the bytes it returns (no copy)."""
    cdef object obj

    def __getbuffer__(self, Py_buffer *view, int flags):
        view.buf = PyBytes_AS_STRING(self.obj)
        view.len = len(self.obj)
        view.readonly = 0
        view.itemsize = 1
        view.format = NULL
        view.ndim = 1
        view.shape = NULL
        view.strides = NULL
        view.suboffsets = NULL
        view.internal = NULL
        view.obj = self

    def __releasebuffer__(self, Py_buffer *view):
        pass


cdef inline bint _track_conflict(tuple r, long long start, long long end, bint serialising):
    """Tracked request ``r`` overlaps ``[start, end)`` and one of the two is serialising."""
    return <long long>r[0] < end and start < <long long>r[1] and (serialising or r[2])


cdef class NodeIO:
    """Base of ``pyrep.node.Node``: the read/write fast path.

    ``_rslow``/``_wslow`` are set by the Python side whenever a request may
    need more than a straight call into the driver. Some of those reasons are
    handled here in C too (``_rc``/``_wc``): request tracking (a serialising
    request, or users that need tracking) and one write notifier that is a
    :class:`CowGate` or declared a skip bitmap. Anything else, and any case
    the C path cannot finish (a conflicting tracked request to wait for, a
    cluster another request is copying), goes to the Python slow paths
    ``_preadv_slow``/``_pwritev_slow``.

    Tracked requests are ``(start, end, serialising)`` tuples in ``_tracked``, in
    arrival order; the list is changed only by ``_track_try``/``_track_done``
    and by a waiting request queueing itself (``Node._track_begin``), each with
    the GIL held and calling nothing that could release it, so C and Python
    users see a consistent list without a lock. A request that conflicts
    queues itself and waits for the conflicting requests before it; later
    arrivals wait behind it. Whoever waits counts itself in ``_track_waiters``
    first and then waits on the node's condition; ``_track_done`` wakes
    waiters only when there are some."""
    cdef public bint _rslow
    cdef public bint _wslow
    cdef public bint _rc            # reads: tracking is the only reason for the slow path
    cdef public bint _wc            # writes: tracking / one gate or skip notifier are the only reasons
    cdef public int _track_users
    cdef public int _track_waiters
    cdef public list _tracked
    cdef object _drv_preadv
    cdef object _drv_pwritev
    # When the only write notifier is a skip-declaring one (a backup's copied clusters), a
    # write wholly inside set granules goes straight to the driver: the notifier would do nothing.
    cdef Bitmap _notifier_skip
    cdef CowGate _cow

    def _set_notifier_skip(self, skip):
        if isinstance(skip, CowGate):
            self._cow = skip
            self._notifier_skip = (<CowGate>skip).copied
        else:
            self._cow = None
            self._notifier_skip = skip

    def _bind_driver_ops(self, driver):
        """Cache the driver's read/write callables (after open, which may replace them)."""
        self._drv_preadv = driver.preadv
        self._drv_pwritev = driver.pwritev

    cdef object _c_track_try(self, long long start, long long end, bint serialising):
        cdef tuple r
        cdef list lst = self._tracked
        for r in lst:
            if _track_conflict(r, start, end, serialising):
                return None
        req = (start, end, serialising)
        lst.append(req)
        return req

    def _track_blocked(self, tuple req):
        """Does a request registered before the queued ``req`` conflict with it?"""
        cdef tuple r
        cdef long long start = req[0], end = req[1]
        cdef bint serialising = req[2]
        for r in self._tracked:
            if r is req:
                return False
            if _track_conflict(r, start, end, serialising):
                return True
        return False

    cdef int _c_track_done(self, req) except -1:
        # by identity: equal tuples of other requests stay (a queued request finds itself by identity)
        cdef list lst = self._tracked
        cdef Py_ssize_t i
        for i in range(len(lst)):
            if lst[i] is req:
                del lst[i]
                break
        if self._track_waiters:
            self._track_wake()
        return 0

    def _track_try(self, long long start, long long end, bint serialising):
        """Register ``[start, end)`` unless it conflicts with a tracked request (then None)."""
        return self._c_track_try(start, end, serialising)

    def _track_done(self, req):
        self._c_track_done(req)

    cpdef preadv(self, long long offset, long long length, iov, int flags=0):
        """Read ``length`` bytes at ``offset`` into ``iov``."""
        if length > 0 and offset >= 0:
            if not self._rslow:
                return self._drv_preadv(offset, length, iov)
            if self._rc:
                req = self._c_track_try(offset, offset + length, False)
                if req is not None:
                    try:
                        return self._drv_preadv(offset, length, iov)
                    finally:
                        self._c_track_done(req)
        return self._preadv_slow(offset, length, iov)

    cpdef pwritev(self, long long offset, long long length, iov, int flags=0):
        """Write ``iov`` (``length`` bytes) at ``offset``."""
        cdef int64_t nc
        cdef bint ser = flags & REQ_SERIALISING
        cdef bint ok
        if length > 0 and offset >= 0:
            if not self._wslow and not ser:
                return self._drv_pwritev(offset, length, iov, flags)
            if self._wc:
                req = None
                if self._track_users or ser:
                    req = self._c_track_try(offset, offset + length, ser)
                    if req is None:
                        return self._pwritev_slow(offset, length, iov, flags)
                try:
                    if self._cow is not None:
                        ok = self._cow.c_before_write(offset, length, flags)
                    elif self._notifier_skip is not None:
                        nc = self._notifier_skip.c_next_clear(offset)
                        ok = (<uint64_t>(offset + length) <= self._notifier_skip._length and
                              (nc < 0 or nc >= offset + length))
                    else:
                        ok = True
                    if ok:
                        return self._drv_pwritev(offset, length, iov, flags & ~REQ_SERIALISING)
                finally:
                    if req is not None:
                        self._c_track_done(req)
        return self._pwritev_slow(offset, length, iov, flags)


cdef class Forwarder:
    """A filter's write that goes to one child and is counted, in C (replication's primary side,
    whose every write takes this path). ``child`` is a Child edge, read at every call, so a rebound
    edge is followed. A BlockError goes to ``on_error(op, offset, length, exc)`` instead of the
    caller: forwarding errors are recorded, never fail the write."""
    cdef object child
    cdef object on_error
    cdef public long long bytes
    cdef public long long writes

    def __init__(self, child, on_error):
        self.child = child
        self.on_error = on_error

    def __call__(self, long long offset, long long length, iov, int flags=0):
        try:
            self.child.pwritev(offset, length, iov, flags)
        except BlockError as e:
            self.on_error("write", offset, length, e)
            return None
        self.bytes += length
        self.writes += 1
        return None

    def count(self, long long length):
        """Count a request forwarded some other way (zeroes)."""
        self.bytes += length
        self.writes += 1


cdef class CowGate:
    """Copy-before-write in C: the state a backup job shares with the node layer.

    ``copied`` has a bit per cluster copied in this interval; ``claimed`` a bit
    per cluster some request is copying now. Both change only with the GIL
    held and without releasing it between test and set, which makes a claim
    atomic for C and Python callers alike (``claim``/``release``).

    ``c_before_write`` is the whole copy for the common case: claim every
    uncopied cluster the write touches, read them from the source's driver
    (untracked: the write that triggered the copy is itself in flight),
    write them to the target as a serialising request, mark them copied. It
    returns False — "take the Python path" — when a cluster is claimed by
    someone else (the Python notifier waits for it). A copy error goes to
    ``on_error(exc, failed, rest)`` with the clusters of the run that failed and
    the claimed ones not tried yet (the job's policy: it releases the claims
    and may raise; True means "failed run given up as copied, go on with the
    rest"). ``on_wake()`` is called after claims are released
    if anyone counted itself in ``waiters`` (the job's condition)."""
    cdef readonly Bitmap copied
    cdef readonly Bitmap claimed
    cdef NodeIO source
    cdef NodeIO target
    cdef readonly long long cluster_size
    cdef readonly long long length
    cdef public int waiters
    cdef readonly int active
    cdef public bint stopped
    cdef public object on_error
    cdef public object on_wake
    cdef readonly long long bytes_copied
    cdef readonly long long clusters_copied
    # a memory target's cluster store: copies are read straight into its buffers, if set
    cdef MemStore store

    def set_target_store(self, MemStore store):
        """Copy into the target through ``store`` (the target node's memory driver's MemStore)."""
        self.store = store

    def __init__(self, NodeIO source, NodeIO target, long long length, long long cluster_size):
        self.source, self.target = source, target
        self.length, self.cluster_size = length, cluster_size
        self.copied = Bitmap(length, cluster_size)
        self.claimed = Bitmap(length, cluster_size)

    def enter(self):
        self.active += 1

    def leave(self):
        self.active -= 1
        if self.waiters:
            self.on_wake()

    def claim(self, long long first, long long last):
        """Claim the uncopied, unclaimed clusters in ``[first, last]``; return (mine, others):
        the indices claimed now and those someone else is copying."""
        cdef long long idx, cs = self.cluster_size
        mine, others = [], []
        for idx in range(first, last + 1):
            if self.copied.c_get(idx * cs):
                continue
            if self.claimed.c_get(idx * cs):
                others.append(idx)
            else:
                self.claimed.c_set(idx * cs, cs)
                mine.append(idx)
        return mine, others

    def claim_run(self, long long first, long long max_count):
        """Claim up to ``max_count`` clusters from ``first`` on, stopping at the first one copied or
        claimed; return how many were claimed."""
        cdef long long cs = self.cluster_size, count = 0
        cdef long long nclusters = (self.length + cs - 1) // cs
        while (count < max_count and first + count < nclusters and not self.copied.c_get((first + count) * cs)
               and not self.claimed.c_get((first + count) * cs)):
            self.claimed.c_set((first + count) * cs, cs)
            count += 1
        return count

    def claimed_any(self, idxs):
        cdef long long cs = self.cluster_size
        for idx in idxs:
            if self.claimed.c_get(<long long>idx * cs):
                return True
        return False

    def release(self, idxs, bint mark):
        """Drop the claims on ``idxs``; ``mark``: they count as copied."""
        cdef long long cs = self.cluster_size
        for idx in idxs:
            self.claimed.c_reset(<long long>idx * cs, cs)
            if mark:
                self.copied.c_set(<long long>idx * cs, cs)
        if self.waiters:
            self.on_wake()

    def copy_run(self, long long first, long long count):
        """Copy claimed clusters ``[first, first+count)`` source → target, then mark them copied and
        release them. Raises on error (the claims are still held then)."""
        self._copy_run(first, count)

    cdef int _copy_run(self, long long first, long long count) except -1:
        cdef long long cs = self.cluster_size
        cdef long long off = first * cs
        cdef long long n = min(count * cs, self.length - off)
        cdef bytearray buf
        cdef IOVector iov
        if not self._copy_adopted(off, n):
            buf = PyByteArray_FromStringAndSize(NULL, n)   # fully overwritten by the read
            iov = IOVector(buf)
            self.source._drv_preadv(off, n, iov)
            self.target.pwritev(off, n, iov, REQ_SERIALISING)
        self.copied.c_set(off, n)
        self.claimed.c_reset(off, n)
        self.bytes_copied += n
        self.clusters_copied += count
        if self.waiters:
            self.on_wake()
        return 0

    cdef bint _copy_adopted(self, long long off, long long n) except -1:
        """The copy without an intermediate buffer, into a target that lends its own cluster buffers
        (memory): read the source straight into them and hand them back. The target's request
        tracking is kept (a serialising request, as target.pwritev would make). False: not possible
        here, copy the ordinary way."""
        cdef NodeIO t = self.target
        cdef MemStore store = self.store
        cdef IOVector iov
        cdef long long tcs, k
        cdef list bufs
        if store is None or not t._wc or t._cow is not None or t._notifier_skip is not None:
            return False
        tcs = store.cluster_size
        if off % tcs or n % tcs:
            return False
        bufs = [store.buffer() for k in range(n // tcs)]
        iov = IOVector.__new__(IOVector)
        for b in bufs:
            iov.c_add(b)
        try:
            # read first, then the serialising write (as copy_run's ordinary path): readers of the
            # target that fall through to the source meanwhile still find the old data there
            self.source._drv_preadv(off, n, iov)
            req = t._c_track_try(off, off + n, True)
            if req is None:                   # overlapping requests in flight: the ordinary write waits
                t.pwritev(off, n, iov, REQ_SERIALISING)
                for b in bufs:
                    store.recycle(b)
                return True
        except BaseException:
            for b in bufs:
                store.recycle(b)
            raise
        try:
            store.adopt(off, bufs)
        finally:
            t._c_track_done(req)
        return True

    cdef bint c_before_write(self, long long offset, long long length, int flags) except -1:
        cdef long long end = min(offset + length, self.length)
        cdef long long cs = self.cluster_size
        cdef long long first, last, idx, run
        cdef int64_t nc
        if flags & REQ_WRITE_UNCHANGED or self.stopped or offset >= end:
            return True
        first = offset // cs
        last = (end - 1) // cs
        nc = self.copied.c_next_clear(first * cs)
        if nc < 0 or nc >= (last + 1) * cs:
            return True
        for idx in range(first, last + 1):
            if not self.copied.c_get(idx * cs) and self.claimed.c_get(idx * cs):
                return False                        # someone is copying it: the Python path waits
        for idx in range(first, last + 1):
            if not self.copied.c_get(idx * cs):
                self.claimed.c_set(idx * cs, cs)
        self.active += 1
        try:
            idx = first
            while idx <= last:
                if self.copied.c_get(idx * cs):
                    idx += 1
                    continue
                run = 1
                while idx + run <= last and not self.copied.c_get((idx + run) * cs):
                    run += 1
                try:
                    self._copy_run(idx, run)
                except BlockError as e:
                    rest = [i for i in range(idx + run, last + 1) if not self.copied.c_get(i * cs)]
                    if self.on_error(e, list(range(idx, idx + run)), rest):
                        idx += run
                        continue
                    return True
                except BaseException:
                    self.release([i for i in range(idx, last + 1) if not self.copied.c_get(i * cs)], False)
                    raise
                idx += run
        finally:
            self.active -= 1
            if self.waiters:
                self.on_wake()
        return True


cdef class BackendCore:
    """Base of ``pyrep.backend.BlockBackend``: bounds checks and the request gate.

    The in-flight count is a C field changed with the GIL held, so it needs
    no lock; only draining (``_quiesce``) takes the condition variable."""
    cdef public object _root            # Child to the root node
    cdef public object _lock            # threading.Condition, for drain
    cdef public long _in_flight
    cdef public int _quiesce
    cdef public bint _closed
    cdef public bint read_only
    cdef long long _length
    cdef long long _epoch

    def _init_core(self, root, lock, bint read_only):
        self._root = root
        self._lock = lock
        self.read_only = read_only
        self._epoch = -1

    cdef inline int _check(self, long long offset, long long length, bint write) except -1:
        if self._closed:
            raise BlockError(EBADF, f"{self.describe()} is closed")
        if offset < 0 or length < 0:
            raise BlockError(EINVAL, f"{self.describe()}: negative offset or length ({offset}, {length})")
        if self._epoch != _length_epoch or offset + length > self._length:
            self._length = self._root.node.length
            self._epoch = _length_epoch
            if offset + length > self._length:
                raise BlockError(EINVAL, f"{self.describe()}: request [{offset}, {offset + length}) is beyond "
                                         f"the end of the disk ({self._length} bytes)")
        if write and self.read_only:
            raise BlockError(EPERM, f"{self.describe()} is read-only")
        return 0

    cdef inline int _enter(self) except -1:
        if self._quiesce or self._closed:
            self._wait_unquiesced()
        self._in_flight += 1
        io_enter()
        return 0

    cdef inline void _leave(self):
        self._in_flight -= 1
        io_leave()
        if self._quiesce and self._in_flight == 0:
            self._wake_drainer()

    def _wait_unquiesced(self):
        lock = self._lock
        with lock:
            while self._quiesce:
                lock.wait(0.5)
        if self._closed:
            raise BlockError(EBADF, f"{self.describe()} is closed")

    def _wake_drainer(self):
        with self._lock:
            self._lock.notify_all()

    def _check_request(self, long long offset, long long length, bint write=False):
        self._check(offset, length, write)

    cpdef bytes pread(self, long long offset, long long length):
        """``length`` bytes at ``offset``; out of range → BlockError(EINVAL)."""
        self._check(offset, length, False)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, length)
        if length == 0:
            return out
        cdef _WritableBytes holder = _WritableBytes.__new__(_WritableBytes)
        holder.obj = out
        cdef IOVector iov = IOVector(holder)
        self._enter()
        try:
            self._root.preadv(offset, length, iov)
        finally:
            self._leave()
        return out

    cpdef preadv(self, long long offset, IOVector iov):
        """Read ``iov.size`` bytes at ``offset`` into the vector (zero-copy)."""
        cdef long long length = iov.nbytes
        self._check(offset, length, False)
        if length == 0:
            return
        self._enter()
        try:
            self._root.preadv(offset, length, iov)
        finally:
            self._leave()

    cpdef pwritev(self, long long offset, IOVector iov, int flags=0):
        """Write the vector at ``offset``."""
        cdef long long length = iov.nbytes
        self._check(offset, length, True)
        if length == 0:
            return
        self._enter()
        try:
            self._root.pwritev(offset, length, iov, flags)
        finally:
            self._leave()

    cpdef pwrite(self, long long offset, data, int flags=0):
        """Write any bytes-like ``data`` at ``offset``."""
        cdef IOVector iov = data if isinstance(data, IOVector) else IOVector(data)
        self.pwritev(offset, iov, flags)

    def _call(self, long long offset, long long length, bint write, fn, *args):
        """Run ``fn(*args)`` as a request on ``[offset, offset+length)`` (checks, gate)."""
        self._check(offset, length, write)
        self._enter()
        try:
            return fn(*args)
        finally:
            self._leave()


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
