"""Worker threads for tests: an exception raised in a worker fails the test that started it.

A plain ``threading.Thread`` loses its exception (pytest only warns, and the project turns that warning
into an error, but the failure then points nowhere near the cause). Start every worker through
``spawn`` or ``run_in_threads``: ``Worker.join`` re-raises what the worker raised, and conftest joins
every worker a test left running and raises its error at teardown.
"""
import threading
import time

TIMEOUT = 60.0          # no worker of the suite legitimately runs this long

_started = []           # workers started by the running test; conftest reaps them


class Worker(threading.Thread):
    """Runs ``fn(*args)`` once. ``done`` is set when it returned or raised; ``join`` waits at most
    ``timeout`` seconds, then fails if the worker still runs, re-raises its exception, or returns its
    result."""

    def __init__(self, fn, *args, name=None):
        super().__init__(name=name or f"worker:{getattr(fn, '__qualname__', fn)}", daemon=True)
        self._fn, self._args = fn, args
        self.result = None
        self.error = None
        self.done = threading.Event()

    def run(self):
        try:
            self.result = self._fn(*self._args)
        except BaseException as e:  # noqa: BLE001 - re-raised by join, in the test's thread
            self.error = e
        finally:
            self.done.set()

    def join(self, timeout=TIMEOUT):
        super().join(timeout)
        if self.is_alive():
            raise AssertionError(f"{self.name} still running after {timeout} s")
        if self in _started:
            _started.remove(self)       # its outcome is the caller's now
        if self.error is not None:
            raise self.error
        return self.result


def spawn(fn, *args, name=None):
    """Start ``fn(*args)`` on a ``Worker`` and return it."""
    w = Worker(fn, *args, name=name)
    _started.append(w)
    w.start()
    return w


def run_in_threads(fn, args_list, timeout=TIMEOUT):
    """Call ``fn(*args)`` for every ``args`` of ``args_list``, each on its own thread, released at once
    by a barrier; wait for all of them (``timeout`` seconds in all) and raise the first exception any
    of them raised (the others are attached to it as notes)."""
    start = threading.Barrier(len(args_list))

    def released(*args):
        start.wait(timeout)
        return fn(*args)
    workers = [spawn(released, *a, name=f"worker{i}:{getattr(fn, '__qualname__', fn)}")
               for i, a in enumerate(args_list)]
    reap(workers, timeout)


def reap(workers=None, timeout=TIMEOUT):
    """Join ``workers`` (default: every worker started and not yet reaped) within ``timeout`` seconds
    in all; raise the first failure, the others attached as notes."""
    if workers is None:
        workers = list(_started)
    deadline = time.monotonic() + timeout
    errors = []
    for w in workers:
        try:
            w.join(max(0.0, deadline - time.monotonic()))
        except BaseException as e:  # noqa: BLE001 - collected, the first re-raised below
            errors.append(e)
    for w in workers:
        if w in _started:
            _started.remove(w)          # a hung one is reported once, here, not by every later test
    if errors:
        if len(errors) > 1 and hasattr(errors[0], "add_note"):       # Python >= 3.11
            errors[0].add_note("other workers failed too: " + "; ".join(map(repr, errors[1:])))
        raise errors[0]
