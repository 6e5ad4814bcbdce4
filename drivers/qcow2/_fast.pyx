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
from cpython.bytearray cimport PyByteArray_FromStringAndSize
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from libc.errno cimport ENOSYS, EXDEV, EINVAL, EOPNOTSUPP
from libc.stdint cimport uint64_t
from libc.string cimport memset

from pyrep._core.constants cimport REQ_FUA
from pyrep._core.iovec cimport IOVector
from pyrep._core.fileio cimport _xfer_one, _xfer_vec, _copy_range, io_keep_gil, io_alone

from pyrep._core.filedriver import FileIO

cdef extern from "unistd.h" nogil:
    int getpid()

cdef extern from *:
    """
    static inline int q2_load(int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void q2_pause(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #endif
    }
    """
    int q2_load(int *p) nogil
    void q2_pause() nogil

cdef extern from "pthread.h" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_create(pthread_t *th, void *attr, void *(*fn)(void *) noexcept nogil, void *arg)
    int pthread_detach(pthread_t th)
    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_cond_init(pthread_cond_t *c, void *attr)
    int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
    int pthread_cond_signal(pthread_cond_t *c)


# ---------------------------------------------------------------------- large reads on two cores
# A 1 MiB read from the page cache is a memory copy bound by one core. Large direct file reads are split
# in two: one helper thread (a plain pthread, never touching Python) reads the second half while the
# caller reads the first. If the helper has not picked the half up by the time the caller is done
# with its own (busy machine), the caller takes it back and reads it itself, so the split never waits
# on a thread that is not running. One job slot: a second concurrent large read simply reads alone.
# Both sides spin a little (the helper for the next job, the caller for the helper's half) before
# sleeping on the condition variable: a wake-up costs tens of microseconds, a 512 KiB half about 50.
cdef enum:
    SPLIT_MIN = 512 * 1024
    SPIN = 4000

cdef struct _Helper:
    pthread_mutex_t mu
    pthread_cond_t cv_job
    pthread_cond_t cv_done
    int pid              # process that started the helper (0: none; after fork the child has none)
    int state            # 0 free, 1 posted, 2 running, 3 done
    int fd
    char *buf
    size_t length
    long long offset
    Py_ssize_t result
    int err

cdef _Helper H
pthread_mutex_init(&H.mu, NULL)
pthread_cond_init(&H.cv_job, NULL)
pthread_cond_init(&H.cv_done, NULL)
H.pid = 0
H.state = 0


cdef void *_helper_main(void *arg) noexcept nogil:
    cdef int fd, err
    cdef char *buf
    cdef size_t length
    cdef long long offset
    cdef Py_ssize_t r
    cdef int i
    pthread_mutex_lock(&H.mu)
    while True:
        if H.state != 1:
            pthread_mutex_unlock(&H.mu)
            i = 0
            while i < SPIN and q2_load(&H.state) != 1:
                q2_pause()
                i += 1
            pthread_mutex_lock(&H.mu)
        while H.state != 1:
            pthread_cond_wait(&H.cv_job, &H.mu)
        H.state = 2
        fd, buf, length, offset = H.fd, H.buf, H.length, H.offset
        pthread_mutex_unlock(&H.mu)
        err = 0
        r = _xfer_one(fd, buf, length, offset, False, &err)
        pthread_mutex_lock(&H.mu)
        H.result, H.err, H.state = r, err, 3
        pthread_cond_signal(&H.cv_done)
    return NULL


cdef bint _helper_ready():
    """Start the helper thread in this process if needed (GIL held). False if it cannot run."""
    cdef pthread_t th
    cdef int pid = getpid()
    if H.pid == pid:
        return True
    if H.pid != 0:          # forked child: the parent's helper does not exist here
        pthread_mutex_init(&H.mu, NULL)
        pthread_cond_init(&H.cv_job, NULL)
        pthread_cond_init(&H.cv_done, NULL)
        H.state = 0
    if pthread_create(&th, NULL, _helper_main, NULL) != 0:
        return False
    pthread_detach(th)
    H.pid = pid
    return True


cdef Py_ssize_t _split_read(int fd, char *buf, size_t length, long long offset, int *err) noexcept nogil:
    """Like _xfer_one (read): bytes done, short only at EOF; -1 with *err set on failure."""
    cdef size_t half = (length // 2) & ~(<size_t>4095)
    cdef Py_ssize_t r1, r2
    cdef int e1 = 0, e2 = 0, i
    pthread_mutex_lock(&H.mu)
    if H.state != 0:
        pthread_mutex_unlock(&H.mu)
        return _xfer_one(fd, buf, length, offset, False, err)
    H.fd, H.buf, H.length, H.offset = fd, buf + half, length - half, offset + half
    H.state = 1
    pthread_cond_signal(&H.cv_job)
    pthread_mutex_unlock(&H.mu)
    r1 = _xfer_one(fd, buf, half, offset, False, &e1)
    i = 0
    while i < SPIN and q2_load(&H.state) == 2:      # running: it finishes soon
        q2_pause()
        i += 1
    pthread_mutex_lock(&H.mu)
    if H.state == 1:        # not started: read it here
        H.state = 0
        pthread_mutex_unlock(&H.mu)
        r2 = _xfer_one(fd, buf + half, length - half, offset + half, False, &e2)
    else:
        while H.state != 3:
            pthread_cond_wait(&H.cv_done, &H.mu)
        r2, e2 = H.result, H.err
        H.state = 0
        pthread_mutex_unlock(&H.mu)
    if e1:
        err[0] = e1
        return -1
    if r1 < <Py_ssize_t>half:
        return r1
    if e2:
        err[0] = e2
        return -1
    return r1 + r2

cdef uint64_t L1M = 0x00FFFFFFFFFFFE00ULL
cdef uint64_t L2M = 0x00FFFFFFFFFFFE00ULL
cdef uint64_t CP = 1ULL << 63
cdef uint64_t REFT_MASK = 0xFFFFFFFFFFFFFE00ULL
cdef uint64_t FM = (1ULL << 63) | (1ULL << 62) | 1ULL

cdef class TableCore:
    """The storage of one metadata cache (``cache.Qcow2Cache`` holds the logic): tables by host offset
    and the offsets of those changed since written. The C paths only read ``tables``; every change
    goes through Qcow2Cache, under the lock of the object that owns the cache."""
    cdef public dict tables
    cdef public set dirty
    cdef public Py_ssize_t capacity


cdef class ClusterCore:
    """The state of the cluster map (``cluster.Clusters`` holds the logic). Every field is guarded by
    ``lock`` (the C paths read L1/L2 entries and the in-flight set without it, under the GIL, with no
    Python code run between a check and its use)."""
    cdef public object lock
    cdef public object cond         # on ``lock``: an in-flight allocation finished
    cdef public int waiters         # threads blocked on ``cond`` (finishers skip notify_all when 0)
    cdef public array l1            # L1 table, host byte order
    cdef public long long l1_offset
    cdef public set l1_dirty        # L1 indexes changed since written
    cdef public TableCore l2        # the L2 table cache
    cdef public set inflight        # guest clusters being allocated (data written, L2 entry not yet)


cdef class RefcountCore:
    """The state of the refcount side (``refcount.Refcounts`` holds the logic): the refcount table, the
    refcount-block cache, where free clusters are looked for, and how far the file reaches. Every
    field is guarded by ``lock``; taken inside ``ClusterCore.lock`` when both are held, never the other
    way round."""
    cdef public object lock
    cdef public array table                 # refcount table, host byte order
    cdef public long long table_offset
    cdef public long long table_clusters
    cdef public TableCore blocks            # the refcount-block cache (F.RefBlock by host offset)
    cdef public int order                   # refcount_order: entries are 1 << order bits wide
    cdef public int block_bits              # log2(entries per refcount block)
    cdef public long long block_mask
    cdef public long long free_hint         # no free cluster below this one (a lower bound)
    # every cluster ever reserved lies below this one: the file is never truncated below it, and a
    # cluster at or past it that the file reaches reads as zeroes
    cdef public long long reserved_end
    # bytes of the file known to exist (grows as clusters are written; read without the lock as a
    # lower bound by validity checks)
    cdef public long long file_size

    cdef inline uint64_t _rb_get(self, object arr, long long i):
        cdef int o = self.order
        cdef array a = <array>arr
        if o == 4:
            return a.data.as_ushorts[i]
        if o == 3:
            return a.data.as_uchars[i]
        if o == 5:
            return a.data.as_uints[i]
        return a.data.as_ulonglongs[i]

    cdef inline void _rb_set1(self, object arr, long long i):
        cdef int o = self.order
        cdef array a = <array>arr
        if o == 4:
            a.data.as_ushorts[i] = 1
        elif o == 3:
            a.data.as_uchars[i] = 1
        elif o == 5:
            a.data.as_uints[i] = 1
        else:
            a.data.as_ulonglongs[i] = 1

    cdef object _refarr(self, long long cc):
        """The refcount array covering cluster ``cc`` if its block is cached (else None), and its offset."""
        cdef long long r = cc >> self.block_bits
        cdef array rt = self.table
        cdef uint64_t boff
        cdef PyObject *b
        if rt is None or r >= len(rt):
            return None
        boff = rt.data.as_ulonglongs[r] & REFT_MASK
        if not boff:
            return None
        b = PyDict_GetItem(self.blocks.tables, boff)
        if b is NULL:
            return None
        arr = (<object>b).arr
        if arr is None:
            return None
        return (arr, boff)

    cdef long long _scan_free(self, long long k, long long *first_free) except -2:
        """First run of ``k`` free clusters from the free hint; -1 if that needs the Python path
        (refcount table growth, new or uncached refcount block, sub-byte refcounts). Changes nothing."""
        cdef long long c = self.free_hint, start, cc, j
        cdef bint ok
        first_free[0] = -1
        while True:
            start = c
            ok = True
            j = 0
            while j < k:
                cc = start + j
                ra = self._refarr(cc)
                if ra is None:
                    return -1
                if self._rb_get(ra[0], cc & self.block_mask):
                    c = cc + 1
                    ok = False
                    break
                if first_free[0] < 0:
                    first_free[0] = cc
                j += 1
            if ok:
                return start

    cpdef note_written(self, long long end):
        """The file reaches at least ``end`` (a write there is done). Atomic under the GIL (no Python
        code runs between the test and the store), so it needs no lock: ``file_size`` never shrinks
        except in make_empty, with both locks held and nothing in flight."""
        if end > self.file_size:
            self.file_size = end

    cdef void _take(self, long long hc, long long k, long long first_free):
        """``lock`` held, right after ``_scan_free`` returned ``hc`` (and ``first_free``) with nothing run
        in between: set the refcounts of clusters [hc, hc+k) to 1 and move the hints."""
        cdef long long j, cc
        for j in range(k):
            cc = hc + j
            ra = self._refarr(cc)
            self._rb_set1(ra[0], cc & self.block_mask)
            self.blocks.dirty.add(ra[1])
        if first_free < 0 or first_free >= hc:
            self.free_hint = hc + k
        else:
            self.free_hint = first_free
        if hc + k > self.reserved_end:
            self.reserved_end = hc + k


cdef class Qcow2Core:
    # Which lock guards what: the metadata is in the two objects below, each guarded by its own lock.
    # The fields of this class are set at open and only read afterwards, except where a comment says
    # otherwise (the GIL is all they need: each is one read or one store).
    # the image's two metadata objects (cluster.Clusters, refcount.Refcounts: they own their locks)
    cdef public ClusterCore clusters
    cdef public RefcountCore refs
    cdef public object backing
    cdef public object file
    cdef public object _file_preadv
    cdef public object _file_pwritev
    # set once when corruption is found (then every write fails with it); read by the C write paths
    cdef public object _corrupt_msg
    cdef public int cluster_bits
    cdef public int _l2_bits
    cdef public long long cluster_size
    cdef public long long _cmask
    cdef public long long _l2_mask
    cdef public long long _backing_len     # refreshed by reads that reach past it (one store)
    # direct file access cache (GIL: filled and read by the C paths only): the file node seen last, its driver, FileIO and FileIO.preadv
    cdef object _fnode
    cdef object _fdrv
    cdef object _fio
    cdef object _fpre
    cdef object _fpw
    cdef public bint _nocopy    # copy_file_range is not usable between our file and the backing's
    cdef public bint _bm_pending    # persistent bitmaps still to flag in use (cleared under Clusters.lock)
    cdef public long long cow_copies    # copy-on-write clusters copied in the kernel (stats, tests)
    # data requests that reach a host cluster found in an L2 entry, counted per epoch while they run
    # outside the lock: a freed cluster is handed out again only when those that started before its
    # entry changed have finished (see Refcounts.settle_frees)
    cdef int _dio_epoch
    cdef int _dio_n[2]
    cdef bint _fmemfs           # that FileIO is on tmpfs/ramfs
    # direct backing access cache: the backing node seen last and its Qcow2Core driver (or None)
    cdef object _bnode
    cdef Qcow2Core _bcore
    # spare one-cluster buffers (IOVector of one bytearray) for copy-on-write; taken and given back
    # under the GIL, so each is used by one request at a time
    cdef list _cowbufs

    cdef inline long long _plain_host(self, uint64_t e) noexcept:
        """The host offset of L2 entry ``e`` if it is a plain data cluster (COPIED, not compressed or
        zero) at a valid place (aligned, past the header), else -1."""
        cdef long long host
        if (e & FM) != CP:
            return -1
        host = <long long>(e & L2M)
        if host & self._cmask or host < self.cluster_size:
            return -1
        return host

    # ------------------------------------------------------------------ data requests in flight
    cdef inline int _dio_enter(self) noexcept:
        cdef int e = self._dio_epoch
        self._dio_n[e] += 1
        return e

    cdef inline void _dio_leave(self, int e) noexcept:
        self._dio_n[e] -= 1

    def dio_enter(self):
        """Count a data request on a host cluster (Python paths); returns the token for dio_leave."""
        return self._dio_enter()

    def dio_leave(self, int e):
        self._dio_leave(e)

    def dio_idle(self, int e):
        """No data request counted in epoch ``e`` is running."""
        return self._dio_n[e & 1] == 0

    def dio_flip(self):
        """Start a new epoch; returns the old one (whose requests all started before this call)."""
        cdef int old = self._dio_epoch
        self._dio_epoch = old ^ 1
        return old

    @property
    def dio_epoch(self):
        return self._dio_epoch

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
        cdef ClusterCore m = self.clusters
        cdef array l1
        cdef long long last, j, k
        cdef int de
        cdef unsigned long long *ents
        if m is None or m.l1 is None:
            return 0
        l1 = m.l1
        cidx = offset >> self.cluster_bits
        l1i = cidx >> self._l2_bits
        if l1i >= len(l1):
            return 0
        if in_off + length > self.cluster_size:
            # several clusters of one L2 table: all data and physically contiguous (one read), all
            # unallocated (the backing), or runs of both (_read_runs)
            last = (offset + length - 1) >> self.cluster_bits
            if (last >> self._l2_bits) != l1i:
                return 0
            k = last - cidx + 1
        else:
            k = 1
        toff = l1.data.as_ulonglongs[l1i] & L1M
        if toff:
            t = PyDict_GetItem(m.l2.tables, toff)
            if t is NULL:
                return 0
            ents = (<array>t).data.as_ulonglongs + (cidx & self._l2_mask)
            e = ents[0]
            if (e & FM) == CP:
                host = self._plain_host(e)
                if host < 0:
                    return 0          # the slow path reports the corruption
                for j in range(1, k):
                    if ents[j] != (e + <uint64_t>(j * self.cluster_size)):
                        return self._read_runs(offset, length, iov, ents, k)
                de = self._dio_enter()
                try:
                    self._file_read(host + in_off, length, iov)
                finally:
                    self._dio_leave(de)
                return 1
            for j in range(k):
                if ents[j]:
                    return self._read_runs(offset, length, iov, ents, k)
        b = self.backing
        if b is None:
            iov.memset(0, 0, length)
            return 1
        if offset + length > self._backing_len:
            return 0
        return self._backing_read(offset, length, iov)

    cdef int _read_runs(self, long long offset, long long length, object iov, unsigned long long *ents,
                        long long k) except -1:
        """A read over ``k`` clusters of one cached L2 table (``ents``) that mixes runs of data clusters
        and unallocated ones (a layer of a chain): each run is one read of the file or of the backing.
        Anything else (zero or compressed clusters, shared data, a run past the backing's known length,
        a vector that is not an IOVector) is left to the slow path: 0, before any I/O."""
        cdef long long cs = self.cluster_size, in_off = offset & self._cmask
        cdef long long j, j2, done = 0, n, host, pos
        cdef unsigned long long e
        cdef int de
        if type(iov) is not IOVector:
            return 0
        for j in range(k):
            e = ents[j]
            if e == 0:
                # the part of this cluster read must lie inside the backing's known length
                pos = ((offset >> self.cluster_bits) + j + 1) << self.cluster_bits
                if self.backing is not None and min(pos, offset + length) > self._backing_len:
                    return 0
            elif self._plain_host(e) < 0:
                return 0
        de = self._dio_enter()
        try:
            j = 0
            while done < length:
                e = ents[j]
                n = min(cs - (in_off if j == 0 else 0), length - done)
                j2 = j + 1
                while j2 < k and done + n < length and (
                        (e == 0 and ents[j2] == 0)
                        or (e != 0 and ents[j2] == e + <unsigned long long>((j2 - j) * cs))):
                    n += min(cs, length - done - n)
                    j2 += 1
                sub = iov.slice(done, n)
                if e == 0:
                    if self.backing is None:
                        (<IOVector>sub).memset(0, 0, n)
                    else:
                        self._backing_read(offset + done, n, sub)
                else:
                    host = <long long>(e & L2M) + (in_off if j == 0 else 0)
                    self._file_read(host, n, sub)
                done += n
                j = j2
        finally:
            self._dio_leave(de)
        return 1

    cdef int _backing_read(self, long long offset, long long length, object iov) except -1:
        """Read [offset, offset+length) (inside the backing's length) from the backing node: its C
        read path when it is a qcow2 node on the fast path, else through the node layer."""
        cdef Qcow2Core bc = self._backing_core()
        if bc is not None and bc._read_fast(offset, length, iov):
            return 1
        self.backing.preadv(offset, length, iov)
        return 1

    cdef Qcow2Core _backing_core(self):
        """The backing node's driver when it is a qcow2 node on the read fast path (its C code may be
        called directly: what the node layer would do), else None."""
        bn = self.backing.node
        if bn is not self._bnode:
            self._bnode = bn
            drv = getattr(bn, "driver", None)
            self._bcore = drv if isinstance(drv, Qcow2Core) else None
        if bn._rslow:
            return None
        return self._bcore

    cdef int _file_fd(self, bint write) except -2:
        """The fd of the ``file`` child when a read (or a write) may go to it directly, else -1: a
        ``file`` protocol node on the fast path whose driver still uses its FileIO (what the node layer
        would call anyway)."""
        fn = self.file.node
        if fn is not self._fnode:
            self._fnode = fn
            drv = getattr(fn, "driver", None)
            hook = getattr(drv, "direct_io", None)
            fio = hook() if hook is not None else None
            if isinstance(fio, FileIO):
                self._fdrv, self._fio = drv, fio
                self._fpre, self._fpw = getattr(drv, "preadv", None), getattr(drv, "pwritev", None)
                self._fmemfs = fio.memfs
            else:
                self._fdrv = self._fio = self._fpre = self._fpw = None
        if self._fio is None:
            return -1
        if write:
            if fn._wslow or self._fdrv.pwritev is not self._fpw:
                return -1
        elif fn._rslow or self._fdrv.preadv is not self._fpre:
            return -1
        return self._fio.fd

    cdef long long _data_host(self, long long offset, long long n):
        """Host offset of guest ``[offset, offset+n)`` when it lies in one plain data cluster whose L2
        table is cached, else -1 (changes nothing)."""
        cdef long long cidx = offset >> self.cluster_bits
        cdef long long l1i = cidx >> self._l2_bits
        cdef long long host
        cdef uint64_t toff
        cdef PyObject *t
        cdef ClusterCore m = self.clusters
        cdef array l1
        if m is None or m.l1 is None:
            return -1
        l1 = m.l1
        if l1i >= len(l1) or (offset & self._cmask) + n > self.cluster_size:
            return -1
        toff = l1.data.as_ulonglongs[l1i] & L1M
        if not toff:
            return -1
        t = PyDict_GetItem(m.l2.tables, toff)
        if t is NULL:
            return -1
        host = self._plain_host((<array>t).data.as_ulonglongs[cidx & self._l2_mask])
        if host < 0:
            return -1
        return host + (offset & self._cmask)

    cdef int _cow_write(self, long long offset, long long host, long long in_off, long long length,
                        IOVector v) except -1:
        """Copy-on-write of guest cluster ``offset`` into our new cluster ``host`` straight from the
        backing's file, in the kernel (copy_file_range: the old data is copied once, with no user
        buffer), then the new data (``v``, ``length`` bytes at ``in_off``) over it; the GIL is released
        for both. Only when the backing is a qcow2 node on the fast path holding that range in one data
        cluster, and both files are on the direct path. 1 if done, 0 if the caller must read the old
        cluster and write it whole (that rewrites whatever part was copied)."""
        cdef long long cs = self.cluster_size, src
        cdef Qcow2Core bc
        cdef int sfd, dfd, err = 0, de
        cdef Py_ssize_t r
        if self._nocopy or not io_alone():
            # with other requests in flight, reading the old data into a buffer first and writing it
            # whole keeps the target file's write lock (one writer at a time on most file systems)
            # for the write only; in the kernel copy it also covers the read of the old data from
            # memory (16 threads: 31 us per request read+write, 43-51 copied; 1 thread: 37 vs 33)
            return 0
        bc = self._backing_core()
        if bc is None:
            return 0
        src = bc._data_host(offset, cs)
        if src < 0:
            return 0
        sfd = bc._file_fd(False)
        dfd = self._file_fd(True)
        if sfd < 0 or dfd < 0:
            return 0
        v.c_pin()
        de = bc._dio_enter()        # the backing's cluster is read outside its lock, as its reads are
        with nogil:
            r = _copy_range(sfd, src, dfd, host, cs, &err)
            if r == cs:
                _xfer_vec(dfd, v.iov, v.n, host + in_off, True, &err)
        bc._dio_leave(de)
        v.c_unpin()
        if r != cs:
            if err in (ENOSYS, EXDEV, EINVAL, EOPNOTSUPP):
                self._nocopy = True
            return 0
        if err:
            # again through the node layer: it raises the proper error
            self._file_pwritev(host + in_off, length, v)
        self._fdrv.note_written(host + cs)
        self.cow_copies += 1
        return 1

    cdef int _file_read(self, long long pos, long long length, object iov) except -1:
        cdef IOVector v
        cdef Py_ssize_t r
        cdef int err = 0, fd
        cdef size_t skip, elen
        cdef Py_ssize_t i
        fd = self._file_fd(False)
        if fd < 0 or type(iov) is not IOVector:
            self.file.preadv(pos, length, iov)
            return 0
        v = <IOVector>iov
        if not v.all_writable or <long long>v.nbytes != length:
            self.file.preadv(pos, length, iov)
            return 0
        v.c_pin()
        cdef bint split = v.n == 1 and length >= SPLIT_MIN and _helper_ready()
        if not split and self._fmemfs and io_keep_gil(length):
            # as FileIO: a small read from tmpfs/ramfs while requests crowd the CPUs is cheaper done with
            # the GIL held than paying a GIL hand-over to another thread and back (see io_keep_gil)
            r = _xfer_one(fd, <char *>v.iov[0].iov_base, v.iov[0].iov_len, pos, False, &err) if v.n == 1 \
                else _xfer_vec(fd, v.iov, v.n, pos, False, &err)
        else:
            with nogil:
                if split:
                    r = _split_read(fd, <char *>v.iov[0].iov_base, v.iov[0].iov_len, pos, &err)
                elif v.n == 1:
                    r = _xfer_one(fd, <char *>v.iov[0].iov_base, v.iov[0].iov_len, pos, False, &err)
                else:
                    r = _xfer_vec(fd, v.iov, v.n, pos, False, &err)
        v.c_unpin()
        if err:
            self.file.preadv(pos, length, iov)     # again through the node layer: it raises the proper error
            return 0
        if r < length:                     # past EOF reads as zeroes (as FileIO does)
            v.memset(r, 0, length - r)
        return 1

    # ------------------------------------------------------------------ writes
    def pwritev(self, long long offset, long long length, iov, int flags=0):
        cdef long long in_off = offset & self._cmask
        cdef long long cidx, l1i, host
        cdef int de
        cdef uint64_t toff
        cdef PyObject *t
        cdef ClusterCore m = self.clusters
        cdef array l1 = m.l1 if m is not None else None
        if not flags & REQ_FUA and self._corrupt_msg is None and l1 is not None and not self._bm_pending:
            if in_off + length <= self.cluster_size:
                # overwrite inside an allocated cluster whose L2 table is cached
                cidx = offset >> self.cluster_bits
                l1i = cidx >> self._l2_bits
                if l1i < len(l1):
                    toff = l1.data.as_ulonglongs[l1i] & L1M
                    if toff and (not m.inflight or cidx not in m.inflight):
                        t = PyDict_GetItem(m.l2.tables, toff)
                        if t is not NULL:
                            host = self._plain_host((<array>t).data.as_ulonglongs[cidx & self._l2_mask])
                            if host >= 0 and not self.meta_overlap(host, length):
                                de = self._dio_enter()
                                try:
                                    return self._file_pwritev(host + in_off, length, iov)
                                finally:
                                    self._dio_leave(de)
            if self._alloc_fast(offset, length, iov):
                return None
        return self._pwritev_slow(offset, length, iov, flags)

    cdef int _alloc_fast(self, long long offset, long long length, object iov) except -1:
        """Allocating write into clusters that are unallocated (entry 0) in a cached L2 table, whose
        partial head/tail need no copy (no backing file, new clusters past everything written), with
        the refcount blocks needed already cached. Also the copy-on-write case: a partial write inside
        one cluster that lies wholly inside the backing (the backing cluster is read whole, the new data
        laid over it, and the full cluster written once). 1 if done, 0 if the Python path must do it
        (nothing changed then). Same steps and crash-safety order as Clusters.plan_alloc/alloc_write/
        commit_alloc: reserve (in-flight under the cluster lock, refcounts under the refcount lock inside
        it), data written, then the L2 entry."""
        cdef int cb = self.cluster_bits
        cdef long long cs = self.cluster_size
        cdef long long cidx = offset >> cb
        cdef long long in_off = offset & self._cmask
        cdef long long last = (offset + length - 1) >> cb
        cdef long long k = last - cidx + 1
        cdef long long tail_len = k * cs - in_off - length
        cdef long long l1i = cidx >> self._l2_bits
        cdef long long l2i = cidx & self._l2_mask
        cdef long long j, hc, host, first_free
        cdef uint64_t toff
        cdef PyObject *t
        cdef ClusterCore m = self.clusters
        cdef RefcountCore r = self.refs
        cdef array l1 = m.l1
        cdef bint partial = in_off != 0 or tail_len != 0
        cdef set inflight = m.inflight
        cdef bint cow = False, committed
        cdef char *cbuf
        cdef IOVector src, wv
        if (last >> self._l2_bits) != l1i or r is None or r.table is None:
            return 0
        if partial and self.backing is not None:
            # copy-on-write: one cluster, wholly inside the backing, source data an IOVector
            if (k != 1 or (cidx + 1) * cs > self._backing_len or type(iov) is not IOVector
                    or <long long>(<IOVector>iov).nbytes != length):
                return 0
            cow = True
        lock = m.lock
        lock.acquire()
        try:
            if self._corrupt_msg is not None or l1i >= len(l1):
                return 0
            toff = l1.data.as_ulonglongs[l1i] & L1M
            if not toff:
                return 0
            t = PyDict_GetItem(m.l2.tables, toff)
            if t is NULL:
                return 0
            for j in range(k):
                if (<array>t).data.as_ulonglongs[l2i + j] != 0:
                    return 0
                if inflight and (cidx + j) in inflight:
                    return 0
            rlock = r.lock
            rlock.acquire()
            try:
                hc = r._scan_free(k, &first_free)
                if hc < 0:
                    return 0
                host = hc << cb
                if partial and not cow and hc < r.reserved_end:
                    return 0
                if host < cs or self.meta_overlap(host, k * cs):
                    return 0
                r._take(hc, k, first_free)
            finally:
                rlock.release()
            for j in range(k):
                inflight.add(cidx + j)
        finally:
            lock.release()
        committed = False
        try:
            if cow and self._cow_write(cidx << cb, host, in_off, length, <IOVector>iov):
                in_off = 0
                length = cs
            elif cow:
                # old content of the whole guest cluster from the backing, new data laid over it,
                # then the full cluster written at once (no file-size extension needed)
                bufs = self._cowbufs
                if bufs is None:
                    bufs = self._cowbufs = []
                if bufs:
                    wv = <IOVector>bufs.pop()
                else:
                    wv = IOVector(PyByteArray_FromStringAndSize(NULL, cs))
                cbuf = <char *>wv.iov[0].iov_base
                self._backing_read(cidx << cb, cs, wv)
                src = <IOVector>iov
                src.c_gather(0, <size_t>length, cbuf + in_off)
                self._file_pwritev(host, cs, wv)
                if len(bufs) < 4:
                    bufs.append(wv)
                in_off = 0
                length = cs
            else:
                if tail_len and host + k * cs > r.file_size:
                    (<object>r).ensure_file_size(host + k * cs, host)
                self._file_pwritev(host + in_off, length, iov)
            lock.acquire()
            try:
                r.note_written(host + in_off + length)
                toff = (<array>m.l1).data.as_ulonglongs[l1i] & L1M
                tab = m.l2.tables.get(toff)
                if tab is None:
                    tab = (<object>m).l2_table(l1i, False)[0]
                for j in range(k):
                    (<array>tab).data.as_ulonglongs[l2i + j] = <uint64_t>(host + j * cs) | CP
                m.l2.dirty.add(toff)
                committed = True
            finally:
                lock.release()
        finally:
            if not committed:       # the write failed: nothing points to the new clusters
                (<object>r).give_back(host, k * cs)
            lock.acquire()
            try:
                for j in range(k):
                    inflight.discard(cidx + j)
                if m.waiters:
                    m.cond.notify_all()
            finally:
                lock.release()
        return 1

    cpdef bint meta_overlap(self, long long host, long long n):
        """Does [host, host+n) overlap the L1 table or the refcount table?"""
        cdef ClusterCore m = self.clusters
        cdef RefcountCore r = self.refs
        cdef long long l1o = m.l1_offset
        cdef long long rto = r.table_offset
        if host < l1o + len(m.l1) * 8 and l1o < host + n:
            return True
        return host < rto + (r.table_clusters << self.cluster_bits) and rto < host + n
