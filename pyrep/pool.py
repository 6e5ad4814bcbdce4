"""Lazily made thread pools: one implementation for every pool pyrep keeps.

``concurrent.futures`` is imported on first use (it pulls in logging, ~7 ms of
start-up that a process never using a pool should not pay). A pool knows its
own worker threads (:meth:`LazyPool.in_pool`), so a user that submits work from
inside one of them can choose to run it inline instead of waiting for a free
worker (nested quorums, which could otherwise starve their own pool).
"""
import threading

__all__ = ["LazyPool"]


class LazyPool:
    """A ``ThreadPoolExecutor`` of ``max_workers`` threads named ``name-N``, made on first use."""

    def __init__(self, name, max_workers):
        self.name = name
        self.max_workers = max_workers
        self._executor = None
        self._lock = threading.Lock()
        self._local = threading.local()

    def _mark_worker(self):
        self._local.worker = True

    def executor(self):
        """The pool's executor (made now if this is the first use)."""
        ex = self._executor
        if ex is None:
            with self._lock:
                if self._executor is None:
                    from concurrent.futures import ThreadPoolExecutor
                    self._executor = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix=self.name,
                                                        initializer=self._mark_worker)
                ex = self._executor
        return ex

    def submit(self, fn, *args):
        """Run ``fn(*args)`` on the pool; returns a Future."""
        return self.executor().submit(fn, *args)

    def in_pool(self):
        """True in one of this pool's worker threads."""
        return getattr(self._local, "worker", False)
