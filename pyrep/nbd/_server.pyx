# cython: language_level=3
"""The NBD server's transmission loop in C: the per-request hot path of :mod:`pyrep.nbd.server`.

One :class:`ServerConn` per connection after negotiation, run by a few threads (:meth:`ServerConn.run`).
One of them holds the *reader role*: it reads the next request (header and, for a WRITE, its payload)
from a buffered receiver and executes it inline — no hand-off between threads, which on a fast disk
would cost more than the request itself. If a request keeps its thread for longer than
``STEAL_NS`` (it waits on a disk, a network node, a flush), a waiting thread takes the reader role
over and serves the requests behind it; the slow request's thread, when done, sends its reply and
waits to be needed again. Requests of one connection therefore run concurrently whenever one of
them is slow, and replies leave in completion order. One waiting thread watches with a timed wait;
the others sleep until woken, and the watcher too while the connection is idle.

The reader polls its socket briefly before it sleeps in ``recv`` (adaptive, like QEMU's
``poll-max-ns``: :mod:`pyrep.nbd._poll`): a client that sends its next request right after our
reply is served without a context switch. Socket calls release the GIL; a plaintext connection is
driven through its file descriptor (recv, sendmsg), a TLS one through its Python ``SSLSocket`` by a single thread (an SSL object must not be
used from two threads at once). READ and WRITE go straight to the backend's C methods
(``pread``/``pwrite``); the rare commands (FLUSH, TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS) call the
Python export object.
"""
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memmove
from libc.errno cimport errno, EINTR
from posix.uio cimport iovec
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE

from pyrep._core.constants cimport REQ_FUA
from posix.time cimport clock_gettime, timespec, CLOCK_REALTIME
from pyrep.nbd._poll cimport now_ns, recv_polled
from pyrep.nbd._wire cimport put16, put32, put64, get16, get32, get64, c_validate

import logging

from pyrep.blocking import set_hint
from pyrep.nbd.proto import errno_to_nbd

cdef extern from "sys/socket.h" nogil:
    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    int MSG_NOSIGNAL
    int MSG_PEEK
    int MSG_DONTWAIT

cdef extern from "pthread.h" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_cond_init(pthread_cond_t *c, const void *attr)
    int pthread_cond_destroy(pthread_cond_t *c)
    int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
    int pthread_cond_timedwait(pthread_cond_t *c, pthread_mutex_t *m, const timespec *t)
    int pthread_cond_signal(pthread_cond_t *c)
    int pthread_cond_broadcast(pthread_cond_t *c)


cdef enum:
    REQUEST_MAGIC = 0x25609513
    SIMPLE_REPLY_MAGIC = 0x67446698
    STRUCTURED_REPLY_MAGIC = 0x668E33EF
    REQUEST_SIZE = 28
    RBUF_SIZE = 256 * 1024
    MAX_PAYLOAD = 32 * 1024 * 1024
    CMD_READ = 0
    CMD_WRITE = 1
    CMD_DISC = 2
    CMD_BLOCK_STATUS = 7
    FLAG_FUA = 1
    REPLY_FLAG_DONE = 1
    TYPE_OFFSET_DATA = 1
    TYPE_BLOCK_STATUS = 5
    TYPE_ERROR = (1 << 15) | 1
    NBD_EIO = 5

# A request holding the reader role this long lets a waiting thread read the requests behind it.
cdef long long STEAL_NS = 1000000


def set_steal_ns(long long ns):
    """Set how long a request may keep the reader role before a waiting thread takes it over; returns
    the old value (for tests that must see only what :meth:`ServerConn.yield_role` hands over)."""
    global STEAL_NS
    old, STEAL_NS = STEAL_NS, ns
    return old

# Replies of requests read back to back are sent together: one sendmsg for up to BATCH replies. A reply
# waits at most BATCH_NS (or until no further request is buffered) for the ones behind it.
cdef enum:
    BATCH = 16
    HDR_MAX = 32
cdef long long BATCH_NS = 50000

ctypedef struct batch_t:
    iovec iov[2 * BATCH]
    char hdr[BATCH * HDR_MAX]
    int niov
    int nrep
    long long first_ns

_log = logging.getLogger("pyrep.nbd.server")


cdef inline void _queue_reply(batch_t *bt, size_t hlen, char *data, size_t dlen) noexcept:
    """Add the reply whose header was written at ``bt.hdr + bt.nrep * HDR_MAX`` (``hlen`` bytes), and
    ``dlen`` bytes of ``data`` after it (kept alive by the caller until the batch is sent)."""
    bt.iov[bt.niov].iov_base = bt.hdr + bt.nrep * HDR_MAX
    bt.iov[bt.niov].iov_len = hlen
    bt.niov += 1
    if dlen:
        bt.iov[bt.niov].iov_base = data
        bt.iov[bt.niov].iov_len = dlen
        bt.niov += 1
    bt.nrep += 1
    if bt.nrep == 1:
        bt.first_ns = now_ns()


cdef class ServerConn:
    """The transmission phase of one connection (see the module docstring).

    ``fd``: the socket's descriptor in blocking mode (plaintext), or -1 with ``sock`` the
    ``SSLSocket`` (TLS). ``blk``: the export's BlockBackend; ``export``: the Python export (rare
    commands); ``size``/``tflags``: what the client was told; ``structured``/``meta_id``: what it
    negotiated; ``initial``: bytes the negotiation read past its end.

    Locking: ``rbuf``/``rpos``/``rend`` belong to the reader role's holder; the role itself
    (``role_epoch``, ``reader_taken``, ``proc_start``, ``watcher``, ``dozing``) is guarded by ``mlock``;
    the socket's send side by ``slock``. ``closing`` is set (never cleared) under ``mlock``."""
    cdef int fd
    cdef object sock
    cdef object blk
    cdef object export
    cdef uint64_t size
    cdef int tflags
    cdef bint structured
    cdef uint32_t meta_id
    cdef int write_flags            # request flags added to every write (REQ_FUA: the export is writethrough)
    cdef char *rbuf
    cdef size_t rpos, rend, rcap
    cdef pthread_mutex_t mlock
    cdef pthread_cond_t cond
    cdef pthread_mutex_t slock
    cdef long long role_epoch       # bumped each time the reader role changes hands
    cdef bint reader_taken          # some thread holds the reader role
    cdef long long proc_start       # when the role holder started executing a request (0: reading)
    cdef bint watcher               # a waiting thread is watching proc_start with a timed wait
    cdef bint dozing                # ... or, the connection being idle, sleeping until a request starts
    cdef bint yielded               # the holder's request is about to wait (yield_role): take the role now
    cdef public long long yields    # times yield_role handed the reader role over
    cdef public int threads         # threads inside run()
    cdef public long long steals    # times a waiting thread took the reader role over
    cdef public bint closing        # no further request is read
    cdef public object reason       # why the connection ends: None (client left or DISC) or a message
    cdef public long long requests  # requests read so far
    cdef public long long poll_ns   # the reader's polling window (adaptive, pyrep.nbd._poll)

    def __cinit__(self, int fd, sock, blk, export, uint64_t size, int tflags, bint structured, uint32_t meta_id,
                  bytes initial=b""):
        self.rcap = RBUF_SIZE
        self.rbuf = <char *>malloc(self.rcap)
        if self.rbuf == NULL:
            raise MemoryError()
        pthread_mutex_init(&self.mlock, NULL)
        pthread_cond_init(&self.cond, NULL)
        pthread_mutex_init(&self.slock, NULL)
        self.fd = fd
        self.sock = sock
        self.blk = blk
        self.export = export
        self.size = size
        self.tflags = tflags
        self.structured = structured
        self.meta_id = meta_id
        self.write_flags = REQ_FUA if getattr(export, "writethrough", False) else 0
        cdef Py_ssize_t n = PyBytes_GET_SIZE(initial)
        if n > <Py_ssize_t>self.rcap:
            raise ValueError("too much initial data")
        memcpy(self.rbuf, PyBytes_AS_STRING(initial), n)
        self.rend = n

    def __dealloc__(self):
        free(self.rbuf)
        pthread_mutex_destroy(&self.mlock)
        pthread_cond_destroy(&self.cond)
        pthread_mutex_destroy(&self.slock)

    # ------------------------------------------------------------ receiving (reader role held)
    cdef Py_ssize_t _recv(self, char *p, size_t n) except -2:
        """Up to ``n`` bytes into ``p``: count, 0 at end of stream, -1 on error."""
        cdef Py_ssize_t r
        cdef int fd = self.fd
        if self.sock is None:
            with nogil:
                r = recv_polled(fd, p, n, &self.poll_ns)
            return r
        try:
            data = self.sock.recv(n)
        except OSError:
            return -1
        r = len(data)
        memcpy(p, <char *>data, r)
        return r

    cdef int _fill(self, size_t need) except -2:
        """At least ``need`` (≤ rcap) buffered bytes: 0, or -1 when the stream ended or failed."""
        cdef Py_ssize_t r
        cdef size_t have = self.rend - self.rpos
        if have >= need:
            return 0
        if self.rpos:
            memmove(self.rbuf, self.rbuf + self.rpos, have)
            self.rpos = 0
            self.rend = have
        while self.rend < need:
            r = self._recv(self.rbuf + self.rend, self.rcap - self.rend)
            if r <= 0:
                return -1
            self.rend += r
        return 0

    cdef int _read_payload(self, char *dst, size_t n) except -2:
        """Exactly ``n`` bytes into ``dst``: buffered bytes first; a large remainder straight from
        the socket, a small one through the buffer (so the requests behind it come in the same call)."""
        cdef size_t have = self.rend - self.rpos
        cdef size_t k = have if have < n else n
        cdef Py_ssize_t r
        memcpy(dst, self.rbuf + self.rpos, k)
        self.rpos += k
        if k == n:
            return 0
        if n - k <= self.rcap // 2:
            if self._fill(n - k) < 0:
                return -1
            memcpy(dst + k, self.rbuf + self.rpos, n - k)
            self.rpos += n - k
            return 0
        while k < n:
            r = self._recv(dst + k, n - k)
            if r <= 0:
                return -1
            k += r
        return 0

    # ------------------------------------------------------------ sending
    cdef int _flush(self, batch_t *bt, list keep) except -1:
        """Send the batched replies as one message; a failure closes the connection."""
        cdef msghdr msg
        cdef Py_ssize_t r
        cdef int fd = self.fd
        cdef iovec *iov = bt.iov
        cdef int nv = bt.niov
        cdef int i
        bt.niov = 0
        bt.nrep = 0
        if nv == 0:
            return 0
        if self.sock is not None:
            try:
                self.sock.sendall(b"".join([PyBytes_FromStringAndSize(<char *>iov[i].iov_base, iov[i].iov_len)
                                            for i in range(nv)]))
            except OSError as e:
                self._fail(f"send failed: {e}")
            del keep[:]
            return 0
        msg.msg_name = NULL
        msg.msg_namelen = 0
        msg.msg_control = NULL
        msg.msg_controllen = 0
        msg.msg_flags = 0
        with nogil:
            pthread_mutex_lock(&self.slock)
            while True:
                msg.msg_iov = iov
                msg.msg_iovlen = nv
                r = sendmsg(fd, &msg, MSG_NOSIGNAL)
                if r < 0:
                    if errno == EINTR:
                        continue
                    break
                while nv and <size_t>r >= iov[0].iov_len:      # skip what was sent
                    r -= iov[0].iov_len
                    iov += 1
                    nv -= 1
                if nv == 0:
                    break
                iov[0].iov_base = <char *>iov[0].iov_base + r
                iov[0].iov_len -= r
            pthread_mutex_unlock(&self.slock)
        del keep[:]
        if nv:
            self._fail("send failed: the client went away")
        return 0

    cdef void _fail(self, reason):
        if self.reason is None and not self.closing:
            self.reason = reason
        with nogil:
            self._close_role(0)

    # ------------------------------------------------------------ the reader role
    cdef long long _take_role(self) noexcept nogil:
        """Wait until this thread may read requests; its role epoch, or -1 when the connection closes."""
        cdef timespec ts
        cdef bint watching = False
        cdef long long epoch = -1
        cdef int idle = 0
        pthread_mutex_lock(&self.mlock)
        while not self.closing:
            if not self.reader_taken:
                self.reader_taken = True
                break
            if self.proc_start and (self.yielded or now_ns() - self.proc_start >= STEAL_NS):
                # the holder is stuck in a request: take the role over (it learns so by the epoch)
                self.steals += 1
                break
            if not self.watcher or watching:
                self.watcher = watching = True
                if idle >= 4:
                    # no request seen running for four periods: sleep until one starts (_begin_request wakes us),
                    # so an idle connection costs no wake-ups
                    self.dozing = True
                    pthread_cond_wait(&self.cond, &self.mlock)
                    idle = 0
                    continue
                clock_gettime(CLOCK_REALTIME, &ts)
                ts.tv_nsec += STEAL_NS % 1000000000
                ts.tv_sec += STEAL_NS // 1000000000 + ts.tv_nsec // 1000000000
                ts.tv_nsec %= 1000000000
                pthread_cond_timedwait(&self.cond, &self.mlock, &ts)
                idle = idle + 1 if self.proc_start == 0 else 0
            else:
                pthread_cond_wait(&self.cond, &self.mlock)
        if not self.closing:
            self.role_epoch += 1
            self.proc_start = 0
            self.yielded = False
            epoch = self.role_epoch
        if watching:
            self.watcher = False
            self.dozing = False
            pthread_cond_signal(&self.cond)     # another waiting thread becomes the watcher
        pthread_mutex_unlock(&self.mlock)
        return epoch

    cdef bint _begin_request(self) noexcept nogil:
        pthread_mutex_lock(&self.mlock)
        self.proc_start = now_ns()
        self.yielded = False
        if self.dozing:                         # the watcher sleeps: it must time this request
            self.dozing = False
            pthread_cond_broadcast(&self.cond)
        pthread_mutex_unlock(&self.mlock)
        return True

    cdef bint _end_request(self, long long epoch) noexcept nogil:
        """After a request: does this thread still hold the reader role?"""
        cdef bint still
        pthread_mutex_lock(&self.mlock)
        still = epoch == self.role_epoch and not self.closing
        if still:
            self.proc_start = 0
        pthread_mutex_unlock(&self.mlock)
        return still

    cdef void _close_role(self, long long epoch) noexcept nogil:
        """The reader saw the end of the stream (or a fatal error): everyone stops reading."""
        pthread_mutex_lock(&self.mlock)
        self.closing = True
        pthread_cond_broadcast(&self.cond)
        pthread_mutex_unlock(&self.mlock)

    # ------------------------------------------------------------ the loop
    def run(self):
        """Serve requests until the connection ends (end of stream, DISC, a protocol error, or
        :meth:`stop`); any number of threads may run this at once. Returns after this thread's last
        reply is sent."""
        cdef char *p
        cdef uint16_t flags, cmd
        cdef uint64_t handle, offset
        cdef uint32_t length, magic
        cdef long long epoch = -1
        cdef object payload
        cdef object data
        cdef size_t hlen
        cdef batch_t bt
        cdef list keep = []         # the batched replies' data objects, alive until sent
        bt.niov = 0
        bt.nrep = 0
        self.threads += 1
        set_hint(self.yield_role)
        try:
            while True:
                if epoch < 0:
                    with nogil:
                        epoch = self._take_role()
                    if epoch < 0:
                        return
                payload = None
                if self._fill(REQUEST_SIZE) < 0:
                    self._close_role(epoch)
                    return
                p = self.rbuf + self.rpos
                magic = get32(p)
                flags = get16(p + 4)
                cmd = get16(p + 6)
                handle = get64(p + 8)
                offset = get64(p + 16)
                length = get32(p + 24)
                self.rpos += REQUEST_SIZE
                if magic != REQUEST_MAGIC:
                    self._fail(f"request with bad magic {magic:#x}")
                    self._close_role(epoch)
                    return
                self.requests += 1
                if cmd == CMD_WRITE:
                    if length > MAX_PAYLOAD:
                        # the payload cannot be skipped safely: the spec lets us close instead
                        self._fail(f"WRITE of {length} bytes exceeds the {MAX_PAYLOAD}-byte limit")
                        self._close_role(epoch)
                        return
                    if bt.niov and self.rend - self.rpos < length:
                        self._flush(&bt, keep)  # the payload may take a while: do not hold earlier replies
                    payload = PyBytes_FromStringAndSize(NULL, length)
                    if self._read_payload(PyBytes_AS_STRING(payload), length) < 0:
                        self._fail("the client went away in the middle of a WRITE payload")
                        self._close_role(epoch)
                        return
                elif cmd == CMD_DISC:
                    self._close_role(epoch)
                    return
                self._begin_request()
                if cmd == CMD_WRITE and bt.nrep + 1 < BATCH and self._next_is_write():
                    # writes that came with this one, fully buffered: one backend call for all of them
                    # (a replication primary forwards them to its secondary in one message)
                    self._write_batch(&bt, flags, handle, offset, length, payload)
                else:
                    data = self._handle(flags, cmd, handle, offset, length, payload, bt.hdr + bt.nrep * HDR_MAX,
                                        &hlen)
                    if data is not None and PyBytes_GET_SIZE(data):
                        keep.append(data)
                        _queue_reply(&bt, hlen, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
                    else:
                        _queue_reply(&bt, hlen, NULL, 0)
                payload = None
                if not self._end_request(epoch):
                    epoch = -1          # another thread read on while we were busy: wait to be needed
                    self._flush(&bt, keep)
                elif (bt.nrep >= BATCH or self.rend - self.rpos < REQUEST_SIZE or
                      now_ns() - bt.first_ns >= BATCH_NS):
                    self._flush(&bt, keep)
        finally:
            set_hint(None)
            if bt.niov:
                self._flush(&bt, keep)
            self.threads -= 1

    cdef bint _next_is_write(self):
        """Is the next buffered request a WRITE whose payload is buffered too?"""
        cdef char *p = self.rbuf + self.rpos
        cdef size_t have = self.rend - self.rpos
        if have < REQUEST_SIZE or get32(p) != REQUEST_MAGIC or get16(p + 6) != CMD_WRITE:
            return False
        return get32(p + 24) <= have - REQUEST_SIZE

    cdef int _write_batch(self, batch_t *bt, uint16_t flags, uint64_t handle, uint64_t offset, uint32_t length,
                          object payload) except -1:
        """Execute the WRITE just read together with the valid WRITEs buffered behind it (up to the
        reply batch's room), through ``blk.pwritev_batch``; their replies go to ``bt``."""
        cdef list handles = [handle]
        cdef list reqs = [(offset, payload, (REQ_FUA if flags & FLAG_FUA else 0) | self.write_flags)]
        cdef list errs = [c_validate(CMD_WRITE, flags, offset, length, self.size, self.tflags, self.structured,
                                     self.meta_id)]
        cdef char *p
        cdef uint32_t n, err
        cdef Py_ssize_t i
        while bt.nrep + len(handles) < BATCH and self._next_is_write():
            p = self.rbuf + self.rpos
            flags = get16(p + 4)
            handle = get64(p + 8)
            offset = get64(p + 16)
            n = get32(p + 24)
            err = c_validate(CMD_WRITE, flags, offset, n, self.size, self.tflags, self.structured, self.meta_id)
            self.rpos += REQUEST_SIZE
            self.requests += 1
            handles.append(handle)
            errs.append(err)
            reqs.append((offset, PyBytes_FromStringAndSize(self.rbuf + self.rpos, n),
                         (REQ_FUA if flags & FLAG_FUA else 0) | self.write_flags))
            self.rpos += n
        todo = [reqs[i] for i in range(len(reqs)) if not errs[i]]
        if todo:
            try:
                res = self.blk.pwritev_batch(todo)
            except Exception:
                _log.exception("NBD batch of %d writes on export %r failed", len(todo),
                               getattr(self.export, "name", None))
                res = [OSError(NBD_EIO, "batch failed")] * len(todo)
            k = 0
            for i in range(len(reqs)):
                if not errs[i]:
                    e = res[k]
                    k += 1
                    if e is not None:
                        errs[i] = (errno_to_nbd(e.errno) if isinstance(e, OSError) else 0) or NBD_EIO
        for i in range(len(handles)):
            p = bt.hdr + bt.nrep * HDR_MAX
            put32(p, SIMPLE_REPLY_MAGIC)
            put32(p + 4, <uint32_t>errs[i])
            put64(p + 8, <uint64_t>handles[i])
            _queue_reply(bt, 16, NULL, 0)
        return 0

    def yield_role(self):
        """The request this thread runs is about to wait on something slow (:mod:`pyrep.blocking`): let a
        waiting thread take the reader role over now instead of after ``STEAL_NS``. Only when another
        request is already there to read (buffered, or waiting in the socket): with none, handing the
        role over would cost a wake-up and win nothing (depth 1)."""
        cdef char c
        if self.rend == self.rpos and (self.sock is not None or
                                       recv(self.fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) <= 0):
            return
        with nogil:
            pthread_mutex_lock(&self.mlock)
            if self.proc_start and not self.yielded:
                self.yielded = True         # the next look at it takes the role over
                self.yields += 1
                pthread_cond_broadcast(&self.cond)
            pthread_mutex_unlock(&self.mlock)

    def stop(self):
        """Read no further request (in-flight ones finish and reply); wakes waiting threads."""
        with nogil:
            self._close_role(0)

    cdef object _handle(self, uint16_t flags, uint16_t cmd, uint64_t handle, uint64_t offset, uint32_t length,
                        object payload, char *hdr, size_t *hlen_out):
        """Execute one request; its reply header goes to ``hdr`` (``*hlen_out`` bytes), the data to send
        after it (a READ's bytes, a BLOCK_STATUS payload) is returned (or None)."""
        cdef uint32_t err = c_validate(cmd, flags, offset, length, self.size, self.tflags, self.structured,
                                       self.meta_id)
        cdef object data = None
        cdef size_t hlen
        if not err:
            try:
                if cmd == CMD_READ:
                    data = self.blk.pread(offset, length)
                elif cmd == CMD_WRITE:
                    self.blk.pwrite(offset, payload, (REQ_FUA if flags & FLAG_FUA else 0) | self.write_flags)
                elif cmd == CMD_BLOCK_STATUS:
                    data = self.export.block_status(offset, length, flags)
                else:
                    self.export.command(cmd, flags, offset, length)
            except OSError as e:
                err = errno_to_nbd(e.errno) or NBD_EIO
                data = None
            except Exception:
                _log.exception("NBD request %d on export %r failed", cmd, getattr(self.export, "name", None))
                err = NBD_EIO
                data = None
        if self.structured and (cmd == CMD_READ or cmd == CMD_BLOCK_STATUS):
            put32(hdr, STRUCTURED_REPLY_MAGIC)
            put16(hdr + 4, REPLY_FLAG_DONE)
            put64(hdr + 8, handle)
            if err:
                put16(hdr + 6, TYPE_ERROR)
                put32(hdr + 16, 6)
                put32(hdr + 20, err)
                put16(hdr + 24, 0)
                hlen = 26
            elif cmd == CMD_READ:
                put16(hdr + 6, TYPE_OFFSET_DATA)
                put32(hdr + 16, 8 + length)
                put64(hdr + 20, offset)
                hlen = 28
            else:
                put16(hdr + 6, TYPE_BLOCK_STATUS)
                put32(hdr + 16, 4 + PyBytes_GET_SIZE(data))
                put32(hdr + 20, self.meta_id)
                hlen = 24
        else:
            put32(hdr, SIMPLE_REPLY_MAGIC)
            put32(hdr + 4, err)
            put64(hdr + 8, handle)
            hlen = 16
            if cmd != CMD_READ:
                data = None
        hlen_out[0] = hlen
        return data
