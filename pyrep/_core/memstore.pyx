# cython: language_level=3
"""The memory driver's cluster store: the hot paths of ``drivers/memory.py`` in C (a core type: the
copy-before-write gate in fastpath.pyx hands it buffers directly).

Thread safety without a lock: every operation here that looks at a cluster
and changes it (or copies out of a raw buffer) runs with the GIL held and
calls nothing that could release it in between. Raw buffers are recycled
(``pool``), so a copy out of one must never run while another thread could
be handing the same buffer to a different cluster; holding the GIL for the
copy is what guarantees that. Copies into a buffer that is still private
(taken from the pool, not yet installed) may release the GIL.

Entries of ``clusters``: ``bytearray`` (raw, exactly ``cluster_size``),
``bytes`` (compressed; the driver decompresses) or ``b""`` (reads as zeroes).
"""
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_GET_SIZE
from libc.string cimport memcmp, memset

from pyrep._core.iovec cimport IOVector

from pyrep.errors import BlockError

cdef Py_ssize_t _ENTRY_OVERHEAD = 105   # bytes object + dict slot, roughly (see memory.py)


cdef inline bint _all_zero(const char *p, Py_ssize_t n) noexcept:
    return (<const unsigned char *>p)[0] == 0 and memcmp(p, p + 1, n - 1) == 0


cdef class MemStore:
    def __init__(self, driver, long long cluster_size, bint has_backing, bint background):
        self.driver = driver
        self.cluster_size = cluster_size
        self.shift = cluster_size.bit_length() - 1
        self.clusters = {}
        self.pool = {}
        self.touched = set()
        self.background = background
        self.has_backing = has_backing

    # ------------------------------------------------------------ entries
    cdef inline Py_ssize_t _size(self, entry):
        return len(entry) + _ENTRY_OVERHEAD

    cpdef bytearray buffer(self):
        """A raw cluster-sized buffer (pooled if one is free; contents undefined), private to the caller."""
        cdef dict pool = self.pool
        while pool:
            e = pool.popitem()[1]
            if type(e) is bytearray and len(<bytearray>e) == self.cluster_size:
                return e
        return PyByteArray_FromStringAndSize(NULL, self.cluster_size)

    cpdef recycle(self, bytearray buf):
        self._pool_key -= 1
        self.pool[self._pool_key] = buf

    cpdef put(self, long long idx, entry):
        """Make ``entry`` cluster ``idx``'s (None: drop it). A raw buffer it replaces is recycled."""
        old = self.clusters.pop(idx, None)
        if old is not None:
            self.used -= self._size(old)
            if type(old) is bytearray:
                self.raw_bytes -= self.cluster_size
                if old is not entry:
                    self.recycle(old)
        if entry is not None:
            self.clusters[idx] = entry
            self.used += self._size(entry)
            if type(entry) is bytearray:
                self.raw_bytes += self.cluster_size
                if self.compacting:
                    self.touched.add(idx)
                elif self.background and self.raw_bytes >= self.wake_bytes and not self.wake_pending:
                    self.wake_pending = True
                    self.driver._start_compressor()

    cpdef bint replace_if(self, long long idx, expected, entry, bint untouched=False):
        """``put(idx, entry)`` if cluster ``idx`` is still ``expected`` (and, with ``untouched``, was not
        written since the compressor took it); else recycle ``entry`` if raw. Atomic."""
        if self.clusters.get(idx) is not expected or (untouched and idx in self.touched):
            if type(entry) is bytearray:
                self.recycle(entry)
            return False
        self.put(idx, entry)
        return True

    def take_for_compression(self, long long idx):
        """The raw buffer of cluster ``idx`` (or None), marked untouched; compress it, then
        ``replace_if(idx, raw, packed, untouched=True)``. Only while ``compacting``."""
        e = self.clusters.get(idx)
        if type(e) is not bytearray:
            return None
        self.touched.discard(idx)
        return e

    def empty(self):
        """Forget every cluster; their raw buffers become the pool (the old pool is returned, to free)."""
        old_pool = self.pool
        self.pool = self.clusters
        self.clusters = {}
        self.used = 0
        self.raw_bytes = 0
        self.touched.clear()
        self.wake_pending = False
        self.empties += 1
        return old_pool

    # ------------------------------------------------------------ I/O
    cpdef preadv(self, long long offset, long long length, IOVector iov):
        cdef long long cs = self.cluster_size, mask = cs - 1
        cdef long long pos = offset, end = offset + length, done = 0, n, start, run_end, idx
        cdef dict clusters = self.clusters
        if not iov.all_writable:
            raise BlockError(22, "memory: read into a read-only buffer")
        while pos < end:
            idx = pos >> self.shift
            entry = clusters.get(idx)
            start = pos & mask
            n = min(cs - start, end - pos)
            if entry is None:
                # a run of clusters this layer does not hold: one backing read
                run_end = pos + n
                while run_end < end and (run_end >> self.shift) not in clusters:
                    run_end = min(end, run_end + cs)
                n = run_end - pos
                self.driver._read_backing(pos, n, iov, done)
            elif type(entry) is bytearray:
                iov.c_scatter_held(done, n, PyByteArray_AS_STRING(entry) + start)
            elif PyBytes_GET_SIZE(entry) == 0:
                iov.memset(done, 0, n)
            else:
                self.driver._read_compressed(entry, start, n, iov, done)
            pos += n
            done += n

    cpdef pwritev(self, long long offset, long long length, IOVector iov, int flags=0):
        cdef long long cs = self.cluster_size, mask = cs - 1
        cdef long long pos = offset, end = offset + length, done = 0, n, start, idx
        cdef bytearray buf
        while pos < end:
            idx = pos >> self.shift
            start = pos & mask
            n = min(cs - start, end - pos)
            if n == cs:
                buf = self.buffer()
                iov.c_gather(done, cs, PyByteArray_AS_STRING(buf))     # private buffer: may drop the GIL
                if _all_zero(PyByteArray_AS_STRING(buf), cs):
                    self.recycle(buf)
                    self.put(idx, b"" if self.has_backing else None)
                else:
                    self.put(idx, buf)
            else:
                entry = self.clusters.get(idx)
                if type(entry) is bytearray:
                    iov.c_gather_held(done, n, PyByteArray_AS_STRING(entry) + start)
                    if self.compacting:
                        self.touched.add(idx)
                else:
                    self.driver._write_partial(idx, start, n, iov, done)
            pos += n
            done += n

    cpdef adopt(self, long long offset, list bufs):
        """Install the filled buffers ``bufs`` (from ``buffer()``) as the clusters from ``offset`` (cluster
        aligned) on: a whole-cluster write without a copy."""
        cdef long long idx = offset >> self.shift
        cdef bytearray buf
        for buf in bufs:
            if _all_zero(PyByteArray_AS_STRING(buf), self.cluster_size):
                self.recycle(buf)
                self.put(idx, b"" if self.has_backing else None)
            else:
                self.put(idx, buf)
            idx += 1

    cpdef bint patch_install(self, long long idx, expected, bytearray buf, long long start, long long n,
                             IOVector iov, long long at):
        """Copy ``iov[at:at+n]`` into ``buf`` at ``start`` and install ``buf`` as cluster ``idx`` — if the
        cluster is still ``expected`` (atomic). Else recycle ``buf``; return False: the caller retries."""
        if self.clusters.get(idx) is not expected:
            self.recycle(buf)
            return False
        iov.c_gather_held(at, n, PyByteArray_AS_STRING(buf) + start)
        self.put(idx, buf)
        return True

    cpdef zero_part(self, long long idx, long long start, long long n):
        """Zero bytes ``[start, start+n)`` of raw cluster ``idx`` in place; False if it is not raw."""
        entry = self.clusters.get(idx)
        if type(entry) is not bytearray:
            return False
        memset(PyByteArray_AS_STRING(entry) + start, 0, n)
        if self.compacting:
            self.touched.add(idx)
        return True
