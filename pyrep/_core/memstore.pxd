# cython: language_level=3
"""C-level view of MemStore (see memstore.pyx), for the copy-before-write gate in fastpath.pyx."""
from pyrep._core.iovec cimport IOVector


cdef class MemStore:
    cdef public dict clusters
    cdef public dict pool           # raw buffers to reuse (keys are meaningless)
    cdef public set touched         # clusters written while a compaction pass runs
    cdef public bint compacting     # a compaction pass is running: writes note what they touch
    cdef public bint wake_pending   # the driver's compressor was asked to run a pass
    cdef readonly long long empties # times the store was emptied (make_empty)
    cdef public bint background     # a compressor may be working on raw buffers
    cdef public bint has_backing    # an all-zero cluster is kept as b"" (else dropped)
    cdef readonly long long cluster_size
    cdef readonly long long used
    cdef readonly long long raw_bytes
    cdef public long long wake_bytes  # raw bytes from which the driver's compressor is woken
    cdef int shift
    cdef object driver              # slow paths: _read_backing, _write_partial, _read_compressed
    cdef long long _pool_key

    cdef inline Py_ssize_t _size(self, entry)
    cpdef bytearray buffer(self)
    cpdef recycle(self, bytearray buf)
    cpdef put(self, long long idx, entry)
    cpdef bint replace_if(self, long long idx, expected, entry, bint untouched=*)
    cpdef preadv(self, long long offset, long long length, IOVector iov)
    cpdef pwritev(self, long long offset, long long length, IOVector iov, int flags=*)
    cpdef adopt(self, long long offset, list bufs)
    cpdef bint patch_install(self, long long idx, expected, bytearray buf, long long start, long long n,
                             IOVector iov, long long at)
    cpdef zero_part(self, long long idx, long long start, long long n)
