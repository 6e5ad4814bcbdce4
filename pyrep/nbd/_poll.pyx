# cython: language_level=3
"""Receiving from a socket with adaptive polling, for the NBD server's reader and the client's.

Sleeping in ``recv`` and being woken costs a context switch each way, which on a virtual machine is
most of a small request's cost. Like QEMU's adaptive polling (``poll-max-ns``), a receiver first polls
the socket for up to its window, then sleeps; the window grows (doubling from ``POLL_START_NS``, up to
``POLL_MAX_NS``) while data keeps arriving just after it closed, and shrinks (halving, then off) while
data arrives long after it, so an idle or slow peer costs no spinning. Each receiver keeps its own
window (``poll_ns``); only one thread receives on a socket at a time.
"""
from libc.errno cimport errno, EINTR, EAGAIN
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE

cdef extern from "sys/socket.h" nogil:
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int MSG_DONTWAIT

cdef extern from *:
    """
    #if defined(__x86_64__) || defined(__i386__)
    static inline void pyrep_cpu_relax(void) { __builtin_ia32_pause(); }
    #else
    static inline void pyrep_cpu_relax(void) { }
    #endif
    """
    void pyrep_cpu_relax() nogil

# 100 µs: a QD1 client here (fio's nbd engine) sends its next request 35-50 µs after our reply, which
# QEMU's 32 µs never caught; a replication secondary sees the primary's next forwarded write 60-90 µs
# after its reply (bench/RESULTS.md).
cdef long long POLL_MAX_NS = 100000
cdef long long POLL_START_NS = 4000


def _from_env():
    """``PYREP_NBD_POLL_MAX_NS`` (if set) replaces the default: for tuning on other machines."""
    import os
    v = os.environ.get("PYREP_NBD_POLL_MAX_NS")
    if v is not None:
        try:
            set_poll_max_ns(int(v))
        except ValueError:
            raise ValueError(f"PYREP_NBD_POLL_MAX_NS: expected a number of nanoseconds >= 0, got {v!r}") from None


def set_poll_max_ns(long long ns):
    """Set the longest any receiver polls before sleeping in ``recv`` (0: never poll); returns the
    old value. Receivers adjust to it at their next receive."""
    global POLL_MAX_NS
    if ns < 0:
        raise ValueError("poll-max-ns must be >= 0")
    old, POLL_MAX_NS = POLL_MAX_NS, ns
    return old


cdef Py_ssize_t recv_polled(int fd, char *p, size_t n, long long *poll_ns) noexcept nogil:
    """``recv(fd, p, n)`` (blocking socket), polled first for up to ``*poll_ns``, which it adapts.
    Returns the count, 0 at the end of the stream, -1 with ``errno`` set on an error."""
    cdef Py_ssize_t r
    cdef long long t0, waited
    cdef long long window = poll_ns[0]
    if window > POLL_MAX_NS:
        window = POLL_MAX_NS
    if window > 0:
        t0 = now_ns()
        while True:
            r = recv(fd, p, n, MSG_DONTWAIT)
            if r >= 0 or (errno != EAGAIN and errno != EINTR):
                poll_ns[0] = window
                return r
            if now_ns() - t0 >= window:
                break
            pyrep_cpu_relax()
    t0 = now_ns()
    while True:
        r = recv(fd, p, n, 0)
        if r >= 0 or errno != EINTR:
            break
    waited = now_ns() - t0 + window
    if POLL_MAX_NS > 0 and waited <= POLL_MAX_NS:
        # the data came soon after the window closed: a longer window would have caught it
        window = window * 2 if window else POLL_START_NS
        if window > POLL_MAX_NS:
            window = POLL_MAX_NS
    elif window:
        window = window // 2 if window > POLL_START_NS else 0
    poll_ns[0] = window
    return r


cdef class PolledReceiver:
    """``recv_into`` on a blocking socket's descriptor with its own adaptive window (``poll_ns``);
    for one thread at a time."""
    cdef int fd
    cdef public long long poll_ns

    def __cinit__(self, int fd):
        self.fd = fd
        self.poll_ns = 0

    def recv_into(self, buf):
        """Receive into the writable buffer ``buf``: the byte count, 0 at the end of the stream;
        OSError on an error."""
        cdef Py_buffer view
        cdef Py_ssize_t r
        cdef int err
        PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE | PyBUF_SIMPLE)
        try:
            with nogil:
                r = recv_polled(self.fd, <char *>view.buf, view.len, &self.poll_ns)
                err = errno
        finally:
            PyBuffer_Release(&view)
        if r < 0:
            raise OSError(err, __import__("os").strerror(err))
        return r


_from_env()
