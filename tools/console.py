"""What every pyrep console script shares: its version line, a quiet exit on a closed stdout, and an end
by signal that loses no write."""
import os
import sys
import threading


def version_text(prog):
    """``-V``/``--version``: the tool, pyrep's version and the QEMU release whose interface it follows."""
    import pyrep
    return f"{prog} version {pyrep.__version__} (pyrep; command line of QEMU 7.2)"


class _QuietPipe:
    """stdout that ignores a reader gone away (``pyrep-img info x | head -1``), as qemu-img does: the rest
    of the output goes to /dev/null and the command finishes with its own exit code."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self):
        fd = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(fd, self._stream.fileno())
        finally:
            os.close(fd)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def quiet_broken_pipe():
    """Install the quiet stdout (idempotent)."""
    if not isinstance(sys.stdout, _QuietPipe) and sys.stdout is not None:
        sys.stdout = _QuietPipe(sys.stdout)


def start_console_script():
    """What a console script's ``main`` does first: stdout quiet on a closed pipe; SIGTERM, SIGINT and
    SIGHUP end the program through ``SystemExit`` (``pyrep.shutdown``), so ``finally`` blocks run and
    every image is flushed and closed at exit instead of dying with writes in its caches. Signal
    handlers can only be set from the main thread: a ``main`` called from another thread keeps them."""
    quiet_broken_pipe()
    if threading.current_thread() is threading.main_thread():
        from pyrep.shutdown import handle_exit_signals
        handle_exit_signals()
