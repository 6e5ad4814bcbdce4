# cython: language_level=3
"""Adaptive polling of a socket before a blocking ``recv`` (see _poll.pyx), and the clock it uses."""
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC


cdef inline long long now_ns() noexcept nogil:
    """CLOCK_MONOTONIC in nanoseconds."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1000000000LL + ts.tv_nsec


cdef Py_ssize_t recv_polled(int fd, char *p, size_t n, long long *poll_ns) noexcept nogil
