# cython: language_level=3
"""C-level view of the node layer's fast path (see fastpath.pyx), for the Cython modules that plug
into it: a write gate (backup's copy-before-write, cowgate.pyx) is called by ``NodeIO.pwritev`` in C
and itself reads and writes nodes through their C entry points."""
from pyrep._core.bitmap cimport Bitmap


cdef class WriteGate:
    """A write notifier the C fast path can run itself (QEMU's before-write notifier, in C).

    ``copied`` has a bit per granule the gate has nothing left to do for: a data write wholly inside
    set granules passes without calling the gate."""
    cdef readonly Bitmap copied

    # Before a write of [offset, offset+length) reaches the driver: do what the gate must (GIL held).
    # True: the write may go on; False: the gate cannot finish here, take the Python slow path
    # (whose notifier waits or copies). Raising fails the write.
    cdef bint c_before_write(self, long long offset, long long length, int flags) except -1


cdef class NodeIO:
    cdef public bint _rslow
    cdef public bint _wslow
    cdef public bint _rc            # reads: tracking is the only reason for the slow path
    cdef public bint _wc            # writes: tracking / one gate or skip notifier are the only reasons
    cdef public int _track_users
    cdef public int _track_waiters
    cdef public list _tracked
    cdef object _drv_preadv
    cdef object _drv_pwritev
    cdef object _drv_pwritev_batch  # the driver's own pwritev_batch, or None
    cdef object _drv_pwritev_batch_start    # ... and pwritev_batch_start
    cdef bint c_batch_fast(self, list reqs)
    # When the only write notifier is a skip-declaring one (a backup's copied clusters), a
    # write wholly inside set granules goes straight to the driver: the notifier would do nothing.
    cdef Bitmap _notifier_skip
    cdef WriteGate _gate

    # Register [start, end) as a tracked request unless it conflicts with one (then None); the
    # returned token goes back to c_track_done. GIL held, nothing released in between.
    cdef object c_track_try(self, long long start, long long end, bint serialising)
    cdef int c_track_done(self, req) except -1
    # Read straight from the driver: no checks, no tracking (a gate's copy runs inside the write
    # that triggered it, and a tracked read could wait for that very write).
    cdef int c_driver_preadv(self, long long offset, long long length, iov) except -1
    # Writes go to the driver with no gate or skip notifier in the way (only tracking, if any):
    # a writer may hand the node's driver data another way and keep the tracking itself.
    cdef bint c_plain_writes(self)

    cpdef preadv(self, long long offset, long long length, iov, int flags=*)
    cpdef pwritev(self, long long offset, long long length, iov, int flags=*)
