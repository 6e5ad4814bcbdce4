"""NBD servers nobody here wrote (qemu-nbd, nbdkit), started for a test and always stopped.

Both servers are started in their forking mode: the command returns once the socket listens (no polling,
no sleep), and the daemon's pid comes from its pid file. A daemon is not our child, so its end is
awaited through a pidfd. Every server started here is stopped by :func:`stop_all`, which the autouse
fixture of ``tests/conftest.py`` calls after every test.
"""
import os
import select
import signal
import subprocess

from helpers.referees import require
from helpers.wait import wait_until

_running = []
_STOP_TIMEOUT = 10.0


def need(tool):
    require(tool)


class Peer:
    """A running NBD server: ``sock`` (its Unix socket), ``pid``; ``uri(export)``; ``kill()``, ``stop()``."""

    def __init__(self, argv, sock, pidfile, name):
        self.argv, self.sock, self.pidfile, self.name = argv, str(sock), str(pidfile), name
        self.pid = None
        self._pidfd = None

    def start(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)        # a killed server leaves its socket file behind
        if os.path.exists(self.pidfile):
            os.unlink(self.pidfile)
        r = subprocess.run(self.argv, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"{self.name} did not start ({r.returncode}): {r.stderr.strip()}\n{self.argv}")
        self.pid = self._read_pidfile()
        self._pidfd = os.pidfd_open(self.pid)
        if self not in _running:
            _running.append(self)
        return self

    def _read_pidfile(self):
        """The daemon's pid. The socket listens once the forking parent has exited, but nbdkit's child
        writes its pid file just after: wait for that condition, bounded."""
        def pid():
            try:
                with open(self.pidfile) as f:
                    text = f.read()
            except FileNotFoundError:
                return None
            return int(text) if text.endswith("\n") else None     # written whole
        return wait_until(pid, _STOP_TIMEOUT, f"{self.name} to write its pid file {self.pidfile}")

    def uri(self, export=None):
        return f"nbd+unix:///{self.export if export is None else export}?socket={self.sock}"

    def opts(self, **extra):
        return {"driver": "nbd", "server": {"type": "unix", "path": self.sock}, "export": self.export, **extra}

    @property
    def alive(self):
        return self._pidfd is not None

    def _wait_gone(self, timeout):
        ready, _, _ = select.select([self._pidfd], [], [], timeout)
        return bool(ready)

    def kill(self, sig=signal.SIGKILL):
        """Send ``sig`` and wait until the process is gone."""
        if self._pidfd is None:
            return
        try:
            os.kill(self.pid, sig)
            if not self._wait_gone(_STOP_TIMEOUT):
                os.kill(self.pid, signal.SIGKILL)
                if not self._wait_gone(_STOP_TIMEOUT):
                    raise RuntimeError(f"{self.name} (pid {self.pid}) did not exit")
        except ProcessLookupError:
            pass
        finally:
            os.close(self._pidfd)
            self._pidfd = None

    def stop(self):
        self.kill(signal.SIGTERM)
        if self in _running:
            _running.remove(self)


def stop_all():
    """Stop every server still running (the autouse fixture's finalizer)."""
    while _running:
        _running.pop().stop()


def qemu_nbd(tmp_path, image, fmt="raw", export="disk", extra=(), name="qemu-nbd"):
    """Serve ``image`` with ``qemu-nbd -t -e 16`` on a Unix socket in ``tmp_path``."""
    need("qemu-nbd")
    sock, pidfile = tmp_path / f"{name}.sock", tmp_path / f"{name}.pid"
    argv = ["qemu-nbd", "--fork", "--pid-file", str(pidfile), "-t", "-e", "16", "-k", str(sock), "-x", export,
            "-f", fmt, "--cache=writeback", *extra, str(image)]
    peer = Peer(argv, sock, pidfile, name)
    peer.export = export
    return peer.start()


def nbdkit(tmp_path, *plugin_args, export="", filters=(), extra=(), name="nbdkit"):
    """``nbdkit -U sock [--filter=...] PLUGIN ARGS`` on a Unix socket in ``tmp_path``."""
    need("nbdkit")
    sock, pidfile = tmp_path / f"{name}.sock", tmp_path / f"{name}.pid"
    argv = ["nbdkit", "-U", str(sock), "-P", str(pidfile), *[f"--filter={f}" for f in filters], *extra,
            *plugin_args]
    peer = Peer(argv, sock, pidfile, name)
    peer.export = export
    return peer.start()


def wait_for(cond, what, timeout=30.0):
    """Wait until ``cond()`` is true, failing the test after ``timeout`` (``helpers.wait.wait_until``)."""
    wait_until(cond, timeout, what)


def log_has(path, text):
    """A condition for :func:`wait_for`: nbdkit's log file holds ``text``."""
    def cond():
        try:
            return text in path.read_text()
        except FileNotFoundError:
            return False
    return cond
