"""The QMP and daemon tests' pieces: a pyrep-storage-daemon process (always stopped by the ``daemon``
fixture of tests/qmp/conftest.py), QMP clients (QEMU's own library, ``qemu.qmp``, and a raw socket)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

from qemu.qmp.legacy import QEMUMonitorProtocol

DAEMON = [sys.executable, "-m", "pyrep.tools.storage_daemon"]
from .wait import unix_listening as connectable  # noqa: F401 - the daemon tests' name for it
from .wait import wait_until

DEADLINE = 30.0


class Daemon:
    """A pyrep-storage-daemon process with a QMP monitor on ``self.qmp_path``."""

    def __init__(self, tmp_path, args, monitor=True, cwd=None):
        self.tmp_path = tmp_path
        self.qmp_path = str(tmp_path / "qmp.sock")
        argv = DAEMON + [str(a) for a in args]
        if monitor:     # last: options apply in order, so the monitor answers once the rest is built
            argv += ["--chardev", f"socket,id=m0,path={self.qmp_path},server=on,wait=off", "--monitor", "chardev=m0"]
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd or tmp_path)
        self.clients = []
        if monitor:
            wait_until(lambda: self.proc.poll() is not None or connectable(self.qmp_path), DEADLINE,
                       "the daemon's QMP socket")
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.proc.stderr.read().decode()}")

    def client(self):
        """A negotiated qemu.qmp client (QEMU's own library)."""
        q = QEMUMonitorProtocol(self.qmp_path)
        q.connect(negotiate=True)
        self.clients.append(q)
        return q

    def raw(self):
        """A raw-socket client, greeting read, not negotiated."""
        r = RawClient(self.qmp_path)
        self.clients.append(r)
        return r

    def signal(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)

    def wait(self, timeout=DEADLINE):
        return self.proc.wait(timeout)

    def stop(self):
        for c in self.clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - the daemon may be gone already
                pass
        self.clients = []
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(DEADLINE)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


class RawClient:
    """A QMP client on a bare socket: bytes out, decoded messages in (events kept aside)."""

    def __init__(self, path_or_addr):
        if isinstance(path_or_addr, tuple):
            self.sock = socket.create_connection(path_or_addr, timeout=DEADLINE)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(DEADLINE)
            self.sock.connect(path_or_addr)
        self.buf = b""
        self.events = []
        self.greeting = self.recv()

    def send(self, data):
        if isinstance(data, (dict, list)):
            data = json.dumps(data)
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def recv(self):
        """The next message (event or reply), in arrival order."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the daemon closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def reply(self):
        """The next reply (events on the way are kept in ``self.events``)."""
        while True:
            msg = self.recv()
            if "event" in msg:
                self.events.append(msg)
            else:
                return msg

    def execute(self, name, arguments=None, **extra):
        msg = {"execute": name, **extra}
        if arguments is not None:
            msg["arguments"] = arguments
        self.send(json.dumps(msg) + "\n")
        return self.reply()

    def negotiate(self):
        r = self.execute("qmp_capabilities")
        assert r == {"return": {}}, r
        return self

    def event(self, name, cond=lambda e: True):
        """The first event ``name`` satisfying ``cond`` (already received or arriving)."""
        for i, e in enumerate(self.events):
            if e["event"] == name and cond(e):
                return self.events.pop(i)
        while True:
            msg = self.recv()
            if "event" not in msg:
                raise AssertionError(f"unexpected reply {msg} while waiting for {name}")
            if msg["event"] == name and cond(msg):
                return msg
            self.events.append(msg)

    def close(self):
        self.sock.close()


def pull_event(q, name, cond=lambda e: True, timeout=DEADLINE):
    """With a qemu.qmp client: the next event ``name`` satisfying ``cond``."""
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for event {name}")
        e = q.pull_event(wait=left)
        if e is None:
            continue
        if e["event"] == name and cond(e):
            return e
