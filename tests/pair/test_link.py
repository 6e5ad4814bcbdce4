"""The link between the primary and the secondary breaks: the primary records it and its guest carries on.

Each case breaks the NBD connection from the primary's replication node to the
secondary's ``colo1`` export in another way: the NBD server restarted, the TCP
connection reset (a real RST, from a proxy in this process that aborts both
sides). The primary's guest writes keep succeeding through the quorum, its
``query-xen-replication-status`` says ``error: true`` with a ``desc`` naming the
failed forwarding, and the secondary, left without a primary, still fails
over to its last checkpoint.
"""
import random
import select
import socket
import struct
import threading

import pytest
from helpers.threads import spawn

from pyrep.tools import colo

from test_pair import Model, _apply, _batch, _read_all, _start
from test_pair import pair_dir, sides  # noqa: F401


class ResettingProxy:
    """A TCP proxy on 127.0.0.1 to ``target`` whose :meth:`reset` aborts every connection with an RST."""

    def __init__(self, target):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns = []
        self.lock = threading.Lock()
        self.threads = [spawn(self._accept, name="proxy-accept")]

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                self.threads.append(spawn(self._pump, a, b, name="proxy-pump"))

    @staticmethod
    def _pump(src, dst):
        # poll with a short timeout: a socket closed by reset() in another thread does not wake a blocked recv
        try:
            while True:
                if not select.select([src], [], [], 0.05)[0]:
                    continue
                data = src.recv(1 << 20)
                if not data:
                    break
                dst.sendall(data)
        except (OSError, ValueError):      # ValueError: select() on a socket reset() closed
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def reset(self):
        """Abort every proxied connection: SO_LINGER 0 then close sends an RST both ways."""
        with self.lock:
            for s in self.conns:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.close()
                except OSError:
                    pass
            self.conns = []

    def close(self):
        try:
            self.listener.shutdown(socket.SHUT_RDWR)     # wakes the accept() of the other thread
        except OSError:
            pass
        self.listener.close()
        self.reset()
        for t in self.threads:
            t.join(10)          # re-raises what a proxy thread raised; fails if one did not end


def _assert_link_error(pri):
    status = pri("query-xen-replication-status")
    assert status["error"] is True, status
    assert "replication 'rep0'" in status["desc"], status
    assert "forwarding a write" in status["desc"] and "export 'colo1'" in status["desc"], status


def _failover_to_checkpoint(sec, d, model):
    colo.failover(sec, str(d / "act.qcow2"))
    top = f"nbd+unix:///top?socket={d / 's.nbd'}"
    assert _read_all(top, "raw", str(d / "view.raw")) == model.secondary_view()


def test_nbd_server_restarted_on_the_secondary(pair_dir, sides):
    d = pair_dir
    sec = _start("pyrep", d, "secondary", sides)
    pri = _start("pyrep", d, "primary", sides)
    s_nbd = {"type": "unix", "path": str(d / "s.nbd")}
    colo.secondary_setup(sec, str(d / "sec.qcow2"), str(d / "act.qcow2"), str(d / "hid.qcow2"), s_nbd)
    colo.primary_setup(pri, str(d / "pri.qcow2"), s_nbd, {"type": "unix", "path": str(d / "p.nbd")})
    guest = f"nbd+unix:///disk?socket={d / 'p.nbd'}"
    model = Model(16 << 20)
    _apply(guest, model.write_primary, _batch(random.Random(5), 10))
    colo.checkpoint(pri, sec)
    model.do_checkpoint()
    sec("nbd-server-stop")
    sec("nbd-server-start", addr={"type": "unix", "data": {"path": str(d / "s.nbd")}})
    sec("block-export-add", {"type": "nbd", "id": "colo1-export", "node-name": "colo1", "name": "colo1",
                             "writable": True})
    sec("block-export-add", {"type": "nbd", "id": "top-export", "node-name": "top", "name": "top",
                             "writable": True})
    _apply(guest, model.write_primary, _batch(random.Random(6), 10))     # the guest never notices
    _assert_link_error(pri)
    pri.kill()
    _failover_to_checkpoint(sec, d, model)
    assert _read_all(str(d / "pri.qcow2"), "qcow2", str(d / "pri.raw")) == bytes(model.primary)


def test_connection_reset_between_the_hosts(pair_dir, sides):
    d = pair_dir
    sec = _start("pyrep", d, "secondary", sides)
    pri = _start("pyrep", d, "primary", sides)
    port = colo.free_port()
    s_nbd = {"type": "inet", "host": "127.0.0.1", "port": str(port)}
    colo.secondary_setup(sec, str(d / "sec.qcow2"), str(d / "act.qcow2"), str(d / "hid.qcow2"), s_nbd)
    proxy = ResettingProxy(("127.0.0.1", port))
    try:
        colo.primary_setup(pri, str(d / "pri.qcow2"), {"type": "inet", "host": "127.0.0.1", "port": str(proxy.port)},
                           {"type": "unix", "path": str(d / "p.nbd")})
        guest = f"nbd+unix:///disk?socket={d / 'p.nbd'}"
        model = Model(16 << 20)
        _apply(guest, model.write_primary, _batch(random.Random(7), 10))
        assert pri("query-xen-replication-status")["error"] is False
        colo.checkpoint(pri, sec)
        model.do_checkpoint()
        proxy.reset()
        _apply(guest, model.write_primary, _batch(random.Random(8), 10))
        _assert_link_error(pri)
        assert pri.stop() == 0        # nothing hangs: a clean quit with the link gone
        assert _read_all(str(d / "pri.qcow2"), "qcow2", str(d / "pri.raw")) == bytes(model.primary)
    finally:
        proxy.close()
    # the secondary with no primary fails over to the last checkpoint
    top = f"nbd://127.0.0.1:{port}/top"
    colo.failover(sec, str(d / "act.qcow2"))
    assert _read_all(top, "raw", str(d / "view.raw")) == model.secondary_view()
