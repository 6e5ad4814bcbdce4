"""No acknowledged write is lost when the process ends.

A qcow2 image keeps its L2 and refcount updates in caches until a flush or a close, as QEMU does: an
image that is never closed would lose every write made through them. So, as Python's own file objects
are flushed at exit:

- at interpreter exit (``atexit``, registered when pyrep is imported) every job is cancelled and every
  backend and node is flushed and closed (:func:`close_at_exit`);
- a console script calls :func:`handle_exit_signals` first: SIGTERM, SIGINT and SIGHUP then end the
  program with ``SystemExit(128 + signal)`` raised in the main thread, which unwinds it (``finally``
  blocks run) and reaches the exit hook, instead of killing the process with dirty caches.

Python runs signal handlers in the main thread between bytecodes: a main thread blocked in one long
call (a sleep, a lock wait) when the signal reaches another thread ends when that call returns.
``os._exit`` and SIGKILL still skip all of this; so does a forked child (it must not write metadata of
images its parent holds).
"""
import atexit
import os
import signal
import sys

__all__ = ["close_at_exit", "handle_exit_signals", "EXIT_SIGNALS"]

EXIT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")

_pid = os.getpid()
_MAX_ROUNDS = 64        # each round closes at least the item that failed the one before


def close_at_exit():
    """Cancel every job, flush and close every backend and node; report (never raise) what fails."""
    if os.getpid() != _pid:
        return
    pyrep = sys.modules.get("pyrep")
    graph = sys.modules.get("pyrep.graph")
    if pyrep is None or graph is None:
        return
    for _ in range(_MAX_ROUNDS):
        if not graph.nodes() and not graph.backends():
            return
        try:
            pyrep.close_all()
            return
        except BaseException as e:  # noqa: BLE001 - at exit: report and go on closing the rest
            print(f"pyrep: while closing at exit: {e}", file=sys.stderr)


def _exit_on_signal(signum, frame):
    # restore the default first: a second signal while closing ends the process at once
    signal.signal(signum, signal.SIG_DFL)
    raise SystemExit(128 + signum)


def handle_exit_signals(signals=EXIT_SIGNALS):
    """Make ``signals`` (names) end the program through ``SystemExit(128 + signal)`` so that the exit hook
    flushes and closes every image. Call it from the main thread at the start of a console script."""
    for name in signals:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, _exit_on_signal)


atexit.register(close_at_exit)
