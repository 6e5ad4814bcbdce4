# cython: language_level=3
"""The request path in C: the backend's gate and the node layer's fast path.

Python classes build on these bases (``BlockBackend(BackendCore)``,
``Node(NodeIO)``) and keep every slow or rare case in readable Python: the
fast path here is only what a common request needs — a bounds check against
a cached length, an in-flight count, and one call per layer. What plugs into
it lives beside it, one concern a module: ``cowgate.pyx`` (backup's
copy-before-write, a :class:`WriteGate`), ``forwarder.pyx`` (replication's
forwarded writes), ``filedriver.pyx`` (the file driver's syscalls).
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.errno cimport EINVAL, EBADF, EPERM
from libc.stdint cimport int64_t, uint64_t

from pyrep._core.bitmap cimport Bitmap
from pyrep._core.constants cimport REQ_SERIALISING
from pyrep._core.fileio cimport io_enter, io_leave
from pyrep._core.iovec cimport IOVector

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


cdef class WriteGate:
    """Base of the write gates the C fast path runs itself (declared in fastpath.pxd).

    A node's only write notifier may be a gate (``Node.add_write_notifier(fn, skip=gate)``):
    ``NodeIO.pwritev`` then calls :meth:`c_before_write` in C and falls back to the Python
    notifier ``fn`` only when the gate says it cannot finish. ``copied`` is the skip bitmap."""

    cdef bint c_before_write(self, long long offset, long long length, int flags) except -1:
        return False


cdef class NodeIO:
    """Base of ``pyrep.node.Node``: the read/write fast path.

    ``_rslow``/``_wslow`` are set by the Python side whenever a request may
    need more than a straight call into the driver. Some of those reasons are
    handled here in C too (``_rc``/``_wc``): request tracking (a serialising
    request, or users that need tracking) and one write notifier that is a
    :class:`WriteGate` or declared a skip bitmap. Anything else, and any case
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

    def _set_notifier_skip(self, skip):
        """The only write notifier's skip: a Bitmap, a :class:`WriteGate`, or None (no C notifier)."""
        if isinstance(skip, WriteGate):
            self._gate = skip
            self._notifier_skip = (<WriteGate>skip).copied
        else:
            self._gate = None
            self._notifier_skip = skip

    def bind_driver_ops(self, driver):
        """Cache ``driver``'s read/write callables as the fast path's targets: called once the driver
        is open (open may replace them), and again by a driver that swaps its ops at run time
        (replication changes its read/write with its stage)."""
        self._drv_preadv = driver.preadv
        self._drv_pwritev = driver.pwritev
        self._drv_pwritev_batch_start = (driver.pwritev_batch_start if driver.implements("pwritev_batch_start")
                                         else None)
        # a driver with only the two halves batches too (BlockDriver.pwritev_batch joins them)
        self._drv_pwritev_batch = (driver.pwritev_batch if driver.implements("pwritev_batch") or
                                   self._drv_pwritev_batch_start is not None else None)

    cdef object c_track_try(self, long long start, long long end, bint serialising):
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

    cdef int c_track_done(self, req) except -1:
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

    cdef int c_driver_preadv(self, long long offset, long long length, iov) except -1:
        self._drv_preadv(offset, length, iov)
        return 0

    cdef bint c_plain_writes(self):
        return self._wc and self._gate is None and self._notifier_skip is None

    def _track_try(self, long long start, long long end, bint serialising):
        """Register ``[start, end)`` unless it conflicts with a tracked request (then None)."""
        return self.c_track_try(start, end, serialising)

    def _track_done(self, req):
        self.c_track_done(req)

    cpdef preadv(self, long long offset, long long length, iov, int flags=0):
        """Read ``length`` bytes at ``offset`` into ``iov``."""
        if length > 0 and offset >= 0:
            if not self._rslow:
                return self._drv_preadv(offset, length, iov)
            if self._rc:
                req = self.c_track_try(offset, offset + length, False)
                if req is not None:
                    try:
                        return self._drv_preadv(offset, length, iov)
                    finally:
                        self.c_track_done(req)
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
                    req = self.c_track_try(offset, offset + length, ser)
                    if req is None:
                        return self._pwritev_slow(offset, length, iov, flags)
                try:
                    if self._gate is not None:
                        ok = self._gate.c_before_write(offset, length, flags)
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
                        self.c_track_done(req)
        return self._pwritev_slow(offset, length, iov, flags)


    cdef bint c_batch_fast(self, list reqs):
        """May ``reqs`` go to the driver's batch ops as they are (fast path, nothing serialising)?"""
        cdef tuple r
        if self._wslow:
            return False
        for r in reqs:
            if <long long>r[1] <= 0 or <long long>r[0] < 0 or (<int>r[3]) & REQ_SERIALISING:
                return False
        return True

    def pwritev_batch(self, list reqs):
        """Write independent requests ``[(offset, length, iov, flags), ...]``, as if they had been
        submitted at once (as concurrent requests, their order among themselves is not guaranteed);
        returns a list with, for each request, None or the ``OSError``/``BlockError`` it failed with.

        A driver with its own ``pwritev_batch`` (one that can overlap the requests: an NBD client
        sends them in one message) gets the whole list while the node is on its fast path; otherwise,
        and for a serialising request, each request goes through :meth:`pwritev`."""
        if self._drv_pwritev_batch is not None and self.c_batch_fast(reqs):
            return self._drv_pwritev_batch(reqs)
        return pwritev_each(self.pwritev, reqs)

    def batch_starts(self):
        """Does :meth:`pwritev_batch_start` return before the writes are done (the driver sends them
        and waits later: an NBD client)? A caller with several targets starts those first."""
        return self._drv_pwritev_batch_start is not None and not self._wslow

    def pwritev_batch_start(self, list reqs):
        """:meth:`pwritev_batch` in two halves: start the writes, and return a callable that waits for
        them and returns the list of errors (call it exactly once). Where the driver cannot start a
        batch and return (see :meth:`batch_starts`), the writes are done here and the callable only
        hands their errors over."""
        if self._drv_pwritev_batch_start is not None and self.c_batch_fast(reqs):
            return self._drv_pwritev_batch_start(reqs)
        out = self.pwritev_batch(reqs)
        return out.copy


cpdef list pwritev_each(write, list reqs):
    """``pwritev_batch`` one request at a time through ``write(offset, length, iov, flags)``: the
    fallback of the node layer, and of a driver whose batch cannot go further in one piece."""
    cdef list out = []
    cdef tuple r
    for r in reqs:
        try:
            write(r[0], r[1], r[2], r[3])
        except OSError as e:
            out.append(e)
        else:
            out.append(None)
    return out


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

    def pwritev_batch(self, list reqs):
        """Write independent requests ``[(offset, data, flags), ...]`` (``data`` an IOVector or any
        bytes-like object) as if submitted at once; returns None or the error of each request (one out
        of range fails alone). See ``NodeIO.pwritev_batch``."""
        cdef list out = [None] * len(reqs)
        cdef list todo = []
        cdef list where = []
        cdef Py_ssize_t i
        cdef IOVector iov
        cdef tuple r
        for i in range(len(reqs)):
            r = reqs[i]
            iov = r[1] if isinstance(r[1], IOVector) else IOVector(r[1])
            try:
                self._check(r[0], iov.nbytes, True)
            except BlockError as e:
                out[i] = e
                continue
            if iov.nbytes:
                todo.append((r[0], iov.nbytes, iov, r[2]))
                where.append(i)
        if not todo:
            return out
        self._enter()
        try:
            res = self._root.node.pwritev_batch(todo)
        finally:
            self._leave()
        for i in range(len(where)):
            out[where[i]] = res[i]
        return out

    def _call(self, long long offset, long long length, bint write, fn, *args):
        """Run ``fn(*args)`` as a request on ``[offset, offset+length)`` (checks, gate)."""
        self._check(offset, length, write)
        self._enter()
        try:
            return fn(*args)
        finally:
            self._leave()
