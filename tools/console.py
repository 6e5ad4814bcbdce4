"""What every pyrep console script shares: its version line and quiet exit on a closed stdout."""
import os
import sys


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
