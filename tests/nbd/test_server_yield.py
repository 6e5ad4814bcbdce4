"""A request about to wait on a network peer (``pyrep.blocking.about_to_wait``) hands the reader role
over at once, so the requests behind it run meanwhile — the replication primary's forwarded writes.

Steals after a delay are switched off for these tests (``set_steal_ns``), so only the hint can let
the next request run while the first one is held: no timing is involved."""
import threading

import pytest

import pyrep
from helpers.drivers import registered
from nbd_testlib import RawClient, server  # noqa: F401 - fixtures
from pyrep.blocking import about_to_wait, set_hint
from pyrep.driver import BlockDriver
from pyrep.nbd import proto as P
from pyrep.nbd._server import set_steal_ns
from pyrep.options import Opt

HOLD = 60.0     # an upper bound only: the test releases every wait itself


class WaitsOnPeer(BlockDriver):
    """A write at offset 0 says it is about to wait on a peer (once the test says so), then waits."""
    format_name = "test-nbd-waits-on-peer"
    is_filter = True
    options = (Opt("file", "child", required=True),)

    def open(self, opts):
        self.file = self.node.open_child(opts, "file", role="file")

    def pwritev(self, offset, length, iov, flags=0):
        if offset == 0:
            ev = self.events
            ev["entered"].set()
            assert ev["go"].wait(HOLD)
            if ev["hint"]:
                about_to_wait()
            assert ev["release"].wait(HOLD)
        return self.file.pwritev(offset, length, iov, flags)

    def flush(self):
        return self.file.flush()


@pytest.fixture
def peer_export(tmp_path, server):
    events = {"entered": threading.Event(), "go": threading.Event(), "release": threading.Event(), "hint": True}
    WaitsOnPeer.events = events
    path = tmp_path / "w.raw"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    old = set_steal_ns(120 * 10**9)      # far longer than any hold of these tests
    try:
        with registered(WaitsOnPeer):
            node = pyrep.blockdev_add({"driver": "test-nbd-waits-on-peer", "node-name": "w",
                                       "file": {"driver": "file", "filename": str(path)}})
            pyrep.export_add(node, writable=True)
            yield events
            events["go"].set()
            events["release"].set()
            pyrep.export_del("w", timeout=60)
    finally:
        set_steal_ns(old)


def test_a_request_about_to_wait_lets_the_next_one_run(server, peer_export):
    ev = peer_export
    c = RawClient(server.sock_path).go("w")
    c.request(P.CMD_WRITE, 1, 0, 4096, data=b"\x01" * 4096)
    assert ev["entered"].wait(HOLD)
    c.request(P.CMD_READ, 2, 65536, 4096)          # queued behind #1 (in the server's socket, unread)
    ev["go"].set()                                 # #1 now says it waits on a peer, and waits
    assert c.reply(4096)[:2] == (2, 0)             # #2 was read and served while #1 is held
    ev["release"].set()
    assert c.reply() == (1, 0, b"")
    c.close()


def test_the_hint_outside_a_server_thread_does_nothing():
    calls = []
    about_to_wait()                                # no server on this thread: nothing happens
    set_hint(lambda: calls.append(1))
    try:
        about_to_wait()
    finally:
        set_hint(None)
    about_to_wait()
    assert calls == [1]


def test_the_nbd_client_says_it_is_about_to_wait_for_a_reply(server, peer_export):
    # the server holds the write until the client's thread says it is about to wait for the reply: a
    # client that never says so would wait for the hold's upper bound, and the write would then fail
    ev = peer_export
    calls = []

    def hint():
        calls.append(1)
        ev["go"].set()
        ev["release"].set()
    with pyrep.open_backend(f"nbd+unix:///w?socket={server.sock_path}") as blk:
        set_hint(hint)
        try:
            blk.pwrite(0, b"\x02" * 4096)
        finally:
            set_hint(None)
        assert blk.pread(0, 4096) == b"\x02" * 4096
    assert calls == [1]
