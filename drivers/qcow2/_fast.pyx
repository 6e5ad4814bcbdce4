# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The qcow2 request hot paths in C.

``Qcow2Core`` is the extension-type base of ``Qcow2Driver``: the fields the hot paths need (L1 table,
L2 cache, in-flight set, geometry, children) live in C slots, shared with the Python code of the driver
(which assigns them as ordinary attributes). ``preadv``/``pwritev`` here handle the common cases with no
Python frame and no lock (under the GIL, with no Python code run in between, every check-and-use is
atomic, just like the lock-free Python fast path this replaces); everything else calls the driver's
Python ``_preadv_slow`` / ``_pwritev_slow``.

Read hot path:
  * data cluster (COPIED, not compressed/zero) with its L2 table cached: read the ``file`` child;
  * no L2 table / unallocated entry: hand the request to the backing node. When that node is itself a
    qcow2 node on the fast path (its ``_rslow`` flag clear), its C code is called directly instead of
    going through the node layer's Python-visible call (same checks, same result).
  * the ``file`` child is read straight with preadv(2) when it is a ``file`` protocol node on the fast
    path whose driver still uses its FileIO (what NodeIO would call anyway); errors and anything unusual
    go through the child as before, so messages and error handling are unchanged.
"""
from cpython.array cimport array
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from libc.stdint cimport uint64_t
from libc.string cimport memset

from pyrep._core.iovec cimport IOVector
from pyrep._core.fileio cimport _xfer_one, _xfer_vec

from pyrep._core.fastpath import FileIO

cdef uint64_t L1M = 0x00FFFFFFFFFFFE00ULL
cdef uint64_t L2M = 0x00FFFFFFFFFFFE00ULL
cdef uint64_t CP = 1ULL << 63
cdef uint64_t FM = (1ULL << 63) | (1ULL << 62) | 1ULL

cdef enum:
    REQ_FUA = 0x1


cdef class Qcow2Core:
    # metadata shared with driver.py (assigned there as plain attributes)
    cdef public array _l1
    cdef public dict _l2_cache
    cdef public set _inflight
    cdef public object backing
    cdef public object file
    cdef public object _file_preadv
    cdef public object _file_pwritev
    cdef public object _corrupt_msg
    cdef public int cluster_bits
    cdef public int _l2_bits
    cdef public long long cluster_size
    cdef public long long _cmask
    cdef public long long _l2_mask
    cdef public long long _backing_len
    cdef public long long _l1_offset
    cdef public long long _reftable_offset
    cdef public long long _reftable_clusters
    # threads blocked on the condition variable (driver.py only notifies when > 0)
    cdef public int _waiters
    # direct file access cache: the file node seen last, its driver, FileIO and FileIO.preadv
    cdef object _fnode
    cdef object _fdrv
    cdef object _fio
    cdef object _fpre
    # direct backing access cache: the backing node seen last and its Qcow2Core driver (or None)
    cdef object _bnode
    cdef Qcow2Core _bcore

    # ------------------------------------------------------------------ reads
    def preadv(self, long long offset, long long length, iov):
        if self._read_fast(offset, length, iov):
            return None
        return self._preadv_slow(offset, length, iov)

    cdef int _read_fast(self, long long offset, long long length, object iov) except -1:
        """1 if done, 0 if the caller must take the slow path (nothing was done)."""
        cdef long long in_off = offset & self._cmask
        cdef long long cidx, l1i, host
        cdef uint64_t toff, e
        cdef PyObject *t
        cdef array l1 = self._l1
        if in_off + length > self.cluster_size or l1 is None:
            return 0
        cidx = offset >> self.cluster_bits
        l1i = cidx >> self._l2_bits
        if l1i >= len(l1):
            return 0
        toff = l1.data.as_ulonglongs[l1i] & L1M
        if toff:
            t = PyDict_GetItem(self._l2_cache, toff)
            if t is NULL:
                return 0
            e = (<array>t).data.as_ulonglongs[cidx & self._l2_mask]
            if (e & FM) == CP:
                host = <long long>(e & L2M)
                if host & self._cmask or host < self.cluster_size:
                    return 0          # the slow path reports the corruption
                self._file_read(host + in_off, length, iov)
                return 1
            if e:
                return 0
        b = self.backing
        if b is None:
            iov.memset(0, 0, length)
            return 1
        if offset + length > self._backing_len:
            return 0
        bn = b.node
        if bn is not self._bnode:
            self._bnode = bn
            drv = getattr(bn, "driver", None)
            self._bcore = drv if isinstance(drv, Qcow2Core) else None
        if self._bcore is not None and not bn._rslow:
            if self._bcore._read_fast(offset, length, iov):
                return 1
        b.preadv(offset, length, iov)
        return 1

    cdef int _file_read(self, long long pos, long long length, object iov) except -1:
        cdef IOVector v
        cdef Py_ssize_t r
        cdef int err = 0, fd
        cdef size_t skip, elen
        cdef Py_ssize_t i
        f = self.file
        fn = f.node
        if fn is not self._fnode:
            self._fnode = fn
            drv = getattr(fn, "driver", None)
            fio = getattr(drv, "_io", None)
            if isinstance(fio, FileIO):
                self._fdrv, self._fio, self._fpre = drv, fio, getattr(drv, "preadv", None)
            else:
                self._fdrv = self._fio = self._fpre = None
        if (self._fio is None or fn._rslow or type(iov) is not IOVector
                or self._fdrv.preadv is not self._fpre):
            f.preadv(pos, length, iov)
            return 0
        v = <IOVector>iov
        fd = self._fio.fd
        if not v.all_writable or fd < 0 or <long long>v.nbytes != length:
            f.preadv(pos, length, iov)
            return 0
        v.c_pin()
        with nogil:
            if v.n == 1:
                r = _xfer_one(fd, <char *>v.iov[0].iov_base, v.iov[0].iov_len, pos, False, &err)
            else:
                r = _xfer_vec(fd, v.iov, v.n, pos, False, &err)
        v.c_unpin()
        if err:
            f.preadv(pos, length, iov)     # again through the node layer: it raises the proper error
            return 0
        if r < length:                     # past EOF reads as zeroes (as FileIO does)
            skip = r
            for i in range(v.n):
                elen = v.iov[i].iov_len
                if skip >= elen:
                    skip -= elen
                    continue
                memset(<char *>v.iov[i].iov_base + skip, 0, elen - skip)
                skip = 0
        return 1

    # ------------------------------------------------------------------ writes
    def pwritev(self, long long offset, long long length, iov, int flags=0):
        cdef long long in_off = offset & self._cmask
        cdef long long cidx, l1i, host
        cdef uint64_t toff, e
        cdef PyObject *t
        cdef array l1 = self._l1
        if (in_off + length <= self.cluster_size and not flags & REQ_FUA and self._corrupt_msg is None
                and l1 is not None):
            # overwrite inside an allocated cluster whose L2 table is cached
            cidx = offset >> self.cluster_bits
            l1i = cidx >> self._l2_bits
            if l1i < len(l1):
                toff = l1.data.as_ulonglongs[l1i] & L1M
                if toff and (not self._inflight or cidx not in self._inflight):
                    t = PyDict_GetItem(self._l2_cache, toff)
                    if t is not NULL:
                        e = (<array>t).data.as_ulonglongs[cidx & self._l2_mask]
                        if (e & FM) == CP:
                            host = <long long>(e & L2M)
                            if not (host & self._cmask or host < self.cluster_size
                                    or self.meta_overlap(host, length)):
                                return self._file_pwritev(host + in_off, length, iov)
        return self._pwritev_slow(offset, length, iov, flags)

    cpdef bint meta_overlap(self, long long host, long long n):
        """Does [host, host+n) overlap the L1 table or the refcount table?"""
        cdef long long l1o = self._l1_offset
        cdef long long rto = self._reftable_offset
        if host < l1o + len(self._l1) * 8 and l1o < host + n:
            return True
        return host < rto + (self._reftable_clusters << self.cluster_bits) and rto < host + n
