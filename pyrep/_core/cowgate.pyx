# cython: language_level=3
"""Backup's copy-before-write gate, run by the node layer's C fast path (a :class:`WriteGate`).

The job (``pyrep.jobs.backup``) owns the policy — errors, waiting, the
Python notifier; this module owns only the C copy a write triggers.
"""
from cpython.bytearray cimport PyByteArray_FromStringAndSize
from libc.stdint cimport int64_t

from pyrep._core.bitmap cimport Bitmap
from pyrep._core.constants cimport REQ_SERIALISING, REQ_WRITE_UNCHANGED
from pyrep._core.fastpath cimport NodeIO, WriteGate
from pyrep._core.iovec cimport IOVector
from pyrep._core.memstore cimport MemStore

from pyrep.errors import BlockError


cdef class CowGate(WriteGate):
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
            self.source.c_driver_preadv(off, n, iov)
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
        if store is None or not t.c_plain_writes():
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
            self.source.c_driver_preadv(off, n, iov)
            req = t.c_track_try(off, off + n, True)
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
            t.c_track_done(req)
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
