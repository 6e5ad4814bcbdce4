"""Concurrency inside one connection, draining on stop and export_del, the export registry and hooks."""
import threading

import pytest

import pyrep
from helpers.drivers import registered
from helpers.threads import spawn
from nbd_testlib import RawClient, raw_node, run, server, uri  # noqa: F401 - fixtures
from pyrep.driver import BlockDriver
from pyrep.nbd import proto as P
from pyrep.options import Opt

HOLD = 60.0     # an upper bound only: every wait below is released by the test itself


class GateFilter(BlockDriver):
    """Holds requests that touch offset 0 until the test opens the gate (no timing involved)."""
    format_name = "test-nbd-gate"
    is_filter = True
    options = (Opt("file", "child", required=True),)
    entered = None
    release = None

    def open(self, opts):
        self.file = self.node.open_child(opts, "file", role="file")

    def _gate(self, offset):
        if offset == 0:
            GateFilter.entered.set()
            assert GateFilter.release.wait(HOLD)

    def preadv(self, offset, length, iov):
        self._gate(offset)
        return self.file.preadv(offset, length, iov)

    def pwritev(self, offset, length, iov, flags=0):
        self._gate(offset)
        return self.file.pwritev(offset, length, iov, flags)

    def flush(self):
        return self.file.flush()


@pytest.fixture
def gated(tmp_path, server):
    GateFilter.entered, GateFilter.release = threading.Event(), threading.Event()
    path = tmp_path / "g.raw"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    with registered(GateFilter):
        node = pyrep.blockdev_add({"driver": "test-nbd-gate", "node-name": "g",
                                   "file": {"driver": "file", "filename": str(path)}})
        pyrep.export_add(node, writable=True)
        yield path
        GateFilter.release.set()
        if pyrep.nbd_exports():
            pyrep.export_del("g", timeout=60)


def test_a_held_request_does_not_hold_up_the_next_ones(server, gated):
    c = RawClient(server.sock_path).go("g")
    c.request(P.CMD_WRITE, 1, 0, 4096, data=b"\x01" * 4096)     # held at the gate
    assert GateFilter.entered.wait(HOLD)
    for h in range(2, 6):
        c.request(P.CMD_READ, h, 65536 * h, 4096)
    got = [c.reply(4096)[:2] for _ in range(4)]                  # served while #1 is still held
    assert sorted(got) == [(2, 0), (3, 0), (4, 0), (5, 0)]
    GateFilter.release.set()
    assert c.reply() == (1, 0, b"")                              # replies left in completion order
    c.request(P.CMD_READ, 6, 0, 4096)
    assert c.reply(4096) == (6, 0, b"\x01" * 4096)
    c.close()


def test_export_del_drains_in_flight_requests(server, gated):
    deleted = []
    from pyrep.nbd.server import add_export_deleted_hook, remove_export_deleted_hook
    add_export_deleted_hook(deleted.append)
    try:
        c = RawClient(server.sock_path).go("g")
        c.request(P.CMD_WRITE, 1, 0, 4096, data=b"\x7f" * 4096)
        assert GateFilter.entered.wait(HOLD)
        w = spawn(pyrep.export_del, "g", 60)
        assert not w.done.wait(0.05)             # still waiting for the held write
        GateFilter.release.set()
        w.join()
        assert c.reply() == (1, 0, b"")          # the in-flight write was answered before the close
        with pytest.raises((EOFError, ConnectionError)):
            c.recv_exact(1)
        c.close()
        assert deleted == ["g"] and pyrep.nbd_exports() == []
        assert open(gated, "rb").read(4096) == b"\x7f" * 4096
    finally:
        remove_export_deleted_hook(deleted.append)


def test_server_stop_drains_and_flushes(tmp_path):
    sock = str(tmp_path / "stop.sock")
    pyrep.nbd_server_start({"type": "unix", "path": sock})
    node, path = raw_node(tmp_path, 1 << 20)
    pyrep.export_add(node, writable=True)
    c = RawClient(sock).go("d0")
    for i in range(32):
        c.request(P.CMD_WRITE, i, i * 4096, 4096, data=bytes([i]) * 4096)
    got = sorted(c.reply()[:2] for _ in range(32))
    assert got == [(i, 0) for i in range(32)]
    pyrep.nbd_server_stop(timeout=60)
    with pytest.raises((EOFError, ConnectionError)):
        c.recv_exact(1)
    c.close()
    data = open(path, "rb").read(32 * 4096)
    assert all(data[i * 4096:(i + 1) * 4096] == bytes([i]) * 4096 for i in range(32))
    assert pyrep.nbd_exports() == []
    with pytest.raises(pyrep.OptionError, match="no NBD server"):
        pyrep.nbd_server_stop()


def test_registry_errors(tmp_path, server):
    node, _ = raw_node(tmp_path, 1 << 20)
    e = pyrep.export_add(node, name="x", description="desc", id="exp0")
    assert pyrep.nbd_exports() == [{"id": "exp0", "type": "nbd", "node-name": "d0", "shutting-down": False,
                                    "name": "x", "description": "desc", "writable": False,
                                    "size": 1 << 20, "clients": 0}]
    with pytest.raises(pyrep.OptionError, match="exists"):
        pyrep.export_add(node, name="x")
    with pytest.raises(pyrep.OptionError, match="no node or backend"):
        pyrep.export_add("nope")
    with pytest.raises(pyrep.OptionError, match="no NBD export"):
        pyrep.export_del("nope")
    with pytest.raises(pyrep.OptionError, match="already running"):
        pyrep.nbd_server_start({"type": "unix", "path": str(tmp_path / "2.sock")})
    ro = pyrep.blockdev_add({"driver": "null", "node-name": "ro", "read-only": True})
    with pytest.raises(pyrep.OptionError, match="read-only"):
        pyrep.export_add(ro, writable=True)
    pyrep.export_del("exp0")                       # by id
    assert pyrep.nbd_exports() == [] and e.blk.closed


def test_export_add_needs_a_server():
    pyrep.blockdev_add({"driver": "null", "node-name": "n"})
    with pytest.raises(pyrep.OptionError, match="no NBD server is running"):
        pyrep.export_add("n")


def test_bad_addresses():
    with pytest.raises(pyrep.OptionError, match="unknown type"):
        pyrep.nbd_server_start({"type": "vsock"})
    with pytest.raises(pyrep.OptionError, match="'path' is required"):
        pyrep.nbd_server_start({"type": "unix"})
    with pytest.raises(pyrep.OptionError, match="port"):
        pyrep.nbd_server_start({"type": "inet", "host": "127.0.0.1", "port": "http"})


def test_inet_server_on_a_free_port(tmp_path):
    srv = pyrep.nbd_server_start({"type": "inet", "host": "127.0.0.1", "port": "0"})
    try:
        node, _ = raw_node(tmp_path, 2 << 20)
        pyrep.export_add(node, name="tcp")
        port = srv.address["port"]
        assert run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/tcp").stdout.strip() == str(2 << 20)
    finally:
        pyrep.nbd_server_stop(timeout=60)


def test_an_exported_node_stays_writable_by_its_other_users(tmp_path, server):
    """The export shares writes: the node's own backend keeps writing while a client reads."""
    node, _ = raw_node(tmp_path, 1 << 20)
    blk = pyrep.open_backend(node, name="owner")
    pyrep.export_add(node, name="shared")
    blk.pwrite(0, b"\x33" * 4096)
    c = RawClient(server.sock_path).go("shared")
    c.request(P.CMD_READ, 1, 0, 4096)
    assert c.reply(4096) == (1, 0, b"\x33" * 4096)
    c.close()


class FlagLog(BlockDriver):
    """Records the flags of every write that reaches it."""
    format_name = "test-nbd-flaglog"
    is_filter = True
    options = (Opt("file", "child", required=True),)
    seen = []

    def open(self, opts):
        self.file = self.node.open_child(opts, "file", role="file")

    def pwritev(self, offset, length, iov, flags=0):
        FlagLog.seen.append((offset, flags))
        return self.file.pwritev(offset, length, iov, flags)


@pytest.mark.parametrize("writethrough", [False, True])
def test_fua_reaches_the_node_and_writethrough_forces_it(tmp_path, server, writethrough):
    from pyrep.constants import REQ_FUA
    FlagLog.seen = []
    path = tmp_path / "f.raw"
    path.write_bytes(bytes(1 << 20))
    with registered(FlagLog):
        node = pyrep.blockdev_add({"driver": "test-nbd-flaglog", "node-name": "fl",
                                   "file": {"driver": "file", "filename": str(path)}})
        exp = pyrep.export_add(node, writable=True)
        exp.writethrough = writethrough
        c = RawClient(server.sock_path).go("fl")
        c.request(P.CMD_WRITE, 1, 0, 512, data=b"a" * 512)
        c.request(P.CMD_WRITE, 2, 4096, 512, P.CMD_FLAG_FUA, data=b"b" * 512)
        assert sorted(c.reply()[:2] for _ in range(2)) == [(1, 0), (2, 0)]
        c.close()
        fua = {off: bool(f & REQ_FUA) for off, f in FlagLog.seen}
        assert fua == {0: writethrough, 4096: True}
        pyrep.export_del("fl", timeout=60)
