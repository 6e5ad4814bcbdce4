"""Helpers of the NBD tests: a pyrep-nbd process, the in-process server, raw protocol clients."""
import os
import socket
import subprocess
import sys

import pytest

import pyrep
from helpers.referees import run  # noqa: F401 - re-exported for the NBD tests
from helpers.wait import unix_listening as can_connect  # noqa: F401 - the NBD tests' name for it
from helpers.wait import wait_until
from pyrep.nbd import handshake as H
from pyrep.nbd import proto as P
from pyrep.nbd import transmission as T


def uri(sock, export=""):
    return f"nbd+unix:///{export}?socket={sock}"


class PyrepNbd:
    """A ``pyrep-nbd`` process (``python -m pyrep.tools.nbd``), stopped by the fixture's finalizer.

    With ``ready`` (a path), ``--pid-file ready`` is added and the start waits for that file: pyrep-nbd
    writes it once its export is served (probing the socket would count as a client, and a
    non-persistent server exits when its last client leaves)."""

    def __init__(self, args, ready):
        self.ready = ready
        extra = ["--pid-file", ready] if ready else []
        self.proc = subprocess.Popen([sys.executable, "-m", "pyrep.tools.nbd", *extra, *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if ready is not None:
            wait_until(lambda: self.proc.poll() is not None or os.path.exists(ready), timeout=60,
                       what="pyrep-nbd to serve")
            if self.proc.poll() is not None:
                pytest.fail(f"pyrep-nbd exited ({self.proc.returncode}): {self.proc.stderr.read()}")

    def stop(self, sig=15, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail("pyrep-nbd did not stop on signal")
        return self.proc.returncode


@pytest.fixture
def pyrep_nbd(tmp_path):
    started = []

    def start(*args, wait=True):
        p = PyrepNbd(args, str(tmp_path / f"pyrep-nbd-{len(started)}.pid") if wait else None)
        started.append(p)
        return p
    yield start
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()
        for f in (p.proc.stdout, p.proc.stderr):
            f.close()


@pytest.fixture
def server(tmp_path):
    """The in-process NBD server on a Unix socket (``server.sock``); stopped at the end."""
    sock = str(tmp_path / "nbd.sock")
    srv = pyrep.nbd_server_start({"type": "unix", "path": sock})
    srv.sock_path = sock
    yield srv
    from pyrep.nbd.server import nbd_server
    if nbd_server() is not None:
        pyrep.nbd_server_stop(timeout=60)


def raw_node(tmp_path, size=16 << 20, name="d0", data=None):
    path = tmp_path / f"{name}.raw"
    with open(path, "wb") as f:
        f.truncate(size)
        if data:
            f.write(data)
    return pyrep.blockdev_add({"driver": "raw", "node-name": name,
                               "file": {"driver": "file", "filename": str(path)}}), path


class RawClient:
    """A minimal protocol-level client for tests: negotiates with the sans-I/O machine, then sends
    raw requests and reads replies. Every socket call has a timeout."""

    def __init__(self, path, timeout=30):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.hs = H.Handshake(H.CLIENT)
        self.buf = b""

    def event(self):
        while True:
            ev = self.hs.next_event()
            if ev is not H.NEED_DATA:
                return ev
            self.hs.receive_data(self.s.recv(65536))

    def send(self, ev):
        self.s.sendall(self.hs.send(ev))

    def until_done(self):
        out = []
        while True:
            ev = self.event()
            out.append(ev)
            if isinstance(ev, (H.Ack, H.OptionError, H.ExportNameReply)):
                return out

    def go(self, name="", structured=True, meta=True):
        self.event()
        self.send(H.ClientFlags())
        if structured:
            self.send(H.StructuredReply())
            self.until_done()
            if meta:
                self.send(H.SetMetaContext(name, (P.META_BASE_ALLOCATION,)))
                self.until_done()
        self.send(H.Go(name, ()))
        replies = self.until_done()
        assert isinstance(replies[-1], H.Ack), replies
        self.buf = self.hs.trailing_data()
        self.size = self.hs.export_size
        self.flags = self.hs.export_flags
        return self

    def recv_exact(self, n):
        while len(self.buf) < n:
            d = self.s.recv(max(65536, n - len(self.buf)))
            if not d:
                raise EOFError("server closed the connection")
            self.buf += d
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def request(self, cmd, handle, offset, length, flags=0, data=b""):
        self.s.sendall(T.pack_request(cmd, handle, offset, length, flags) + data)

    def reply(self, read_len=0):
        """(handle, error, payload) of the next reply; structured chunks are gathered until DONE."""
        head = self.recv_exact(4)
        if head == P.U32.pack(P.SIMPLE_REPLY_MAGIC):
            _, err, handle = T.unpack_reply_header(head + self.recv_exact(12))
            data = self.recv_exact(read_len) if (read_len and not err) else b""
            return handle, err, data
        parts, err = [], 0
        while True:
            _, flags, rtype, handle, length = T.unpack_reply_header(head + self.recv_exact(16))
            c = T.parse_chunk(rtype, self.recv_exact(length))
            if isinstance(c, T.ErrorChunk):
                err = c.error
            elif isinstance(c, T.OffsetData):
                parts.append(bytes(c.data))
            elif isinstance(c, T.BlockStatusChunk):
                parts.append(c)
            if flags & P.REPLY_FLAG_DONE:
                return handle, err, (b"".join(parts) if parts and isinstance(parts[0], bytes) else parts)
            head = self.recv_exact(4)

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass
