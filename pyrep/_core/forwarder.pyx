# cython: language_level=3
"""Replication's forwarded writes in C: the primary side's every write takes this path."""
from pyrep.errors import BlockError


cdef class Forwarder:
    """A filter's write that goes to one child and is counted, in C (replication's primary side,
    whose every write takes this path). ``child`` is a Child edge, read at every call, so a rebound
    edge is followed. A BlockError goes to ``on_error(op, offset, length, exc)`` instead of the
    caller: forwarding errors are recorded, never fail the write."""
    cdef object child
    cdef object on_error
    cdef public long long bytes
    cdef public long long writes

    def __init__(self, child, on_error):
        self.child = child
        self.on_error = on_error

    def __call__(self, long long offset, long long length, iov, int flags=0):
        try:
            self.child.pwritev(offset, length, iov, flags)
        except BlockError as e:
            self.on_error("write", offset, length, e)
            return None
        self.bytes += length
        self.writes += 1
        return None

    def count(self, long long length):
        """Count a request forwarded some other way (zeroes)."""
        self.bytes += length
        self.writes += 1
