"""Request tracking: the Python side of tracked and serialising requests (QEMU's tracked requests in io.c).

The tracked list and its counters live in C (:class:`~pyrep._core.fastpath.NodeIO`),
where the fast path registers and drops requests without a lock;
:class:`RequestTracking` adds what needs Python: waiting in arrival order
for a conflicting request, the users that turn tracking on, and waiting for
overlaps to drain. ``Node`` builds on it.
"""
import threading
from contextlib import contextmanager

from ._core.fastpath import NodeIO

__all__ = ["RequestTracking"]


class RequestTracking(NodeIO):
    """Tracked requests of one node. A request is an ``(start, end, serialising)`` tuple; a
    serialising request waits for and blocks every overlapping request, and any request waits for
    an overlapping serialising one. Waiters queue in arrival order (no starved serialising write)."""

    def _init_tracking(self):
        self._tracked = []
        self._track_users = 0
        self._track_cond = threading.Condition()

    def _refresh_paths(self):
        """Recompute the fast-path flags after a state change (the node defines them)."""
        raise NotImplementedError

    def enable_tracking(self):
        """Start tracking requests (needed by serialising users); pair with disable_tracking."""
        with self._track_cond:
            self._track_users += 1
        self._refresh_paths()

    def disable_tracking(self):
        with self._track_cond:
            self._track_users -= 1
        self._refresh_paths()

    @contextmanager
    def tracked(self, offset, length, serialising=False):
        """Track a request; a serialising one waits for and blocks every overlapping request,
        and any request waits for an overlapping serialising one."""
        req = self._track_begin(offset, length, serialising)
        try:
            yield
        finally:
            if req is not None:
                self._track_end(req)

    def _track_begin(self, offset, length, serialising):
        """Register a request (waiting as ``tracked`` says); None when nothing is tracked. On a node with
        a request alignment every request is tracked: an unaligned write is a serialising
        read-modify-write of whole blocks, and an aligned write landing between its read and its write
        would be overwritten with the old bytes around the unaligned part."""
        if not self._track_users and not serialising and self.align <= 1:
            return None
        end = offset + length
        req = self._track_try(offset, end, serialising)
        if req is not None:
            return req
        # queue: registered now, so a request arriving later that conflicts with this one waits behind
        # it (a serialising write is never overtaken for ever by a stream of overlapping reads, as in
        # QEMU); this one waits only for the conflicting requests registered before it, so the waits
        # follow arrival order and cannot form a cycle
        req = (offset, end, serialising)
        cond = self._track_cond
        with cond:
            self._track_waiters += 1        # before registering: a request ending now must wake us
            self._tracked.append(req)
            try:
                while self._track_blocked(req):
                    cond.wait()
            except BaseException:
                self._track_done(req)
                raise
            finally:
                self._track_waiters -= 1
        return req

    def _track_end(self, req):
        self._track_done(req)

    def _track_wake(self):
        with self._track_cond:
            self._track_cond.notify_all()

    def wait_for_overlaps(self, offset, length):
        """Block until no tracked request overlaps the range."""
        cond = self._track_cond
        end = offset + length
        with cond:
            self._track_waiters += 1
            try:
                while any(r[0] < end and offset < r[1] for r in list(self._tracked)):
                    cond.wait()
            finally:
                self._track_waiters -= 1
