"""The server's reader and the client's (:mod:`pyrep.nbd._poll`) poll their socket before sleeping in ``recv``, with a window that adapts as QEMU's
``poll-max-ns`` does: it opens while requests arrive soon after the previous reply and closes while they
arrive long after it (an idle client costs no spinning).

The bounds are set far from any scheduling noise: "soon" is within 10 s (any back-to-back request), "long
after" is 100 ms after a window of at most 1 ms."""
import socket
import threading
import time

import pytest

import pyrep
from nbd_testlib import RawClient, raw_node, server  # noqa: F401 - fixtures
from pyrep.nbd import proto as P
from pyrep.nbd._poll import PolledReceiver, set_poll_max_ns


@pytest.fixture
def conn_of(server):
    def find():
        conns = list(server._conns)
        assert len(conns) == 1
        return conns[0].core
    return find


def _roundtrip(c, handle):
    c.request(P.CMD_READ, handle, 0, 4096)
    assert c.reply(4096)[:2] == (handle, 0)


def test_the_poll_window_opens_for_a_busy_client_and_closes_for_an_idle_one(tmp_path, server, conn_of):
    pyrep.export_add(raw_node(tmp_path)[0], name="d0")
    old = set_poll_max_ns(10 * 10**9)
    c = RawClient(server.sock_path).go("d0")
    try:
        for h in range(1, 9):                       # back to back: each arrives well within the window
            _roundtrip(c, h)
        core = conn_of()
        assert core.poll_ns >= 4000                 # opened (it grows until it catches the next request)
        set_poll_max_ns(10**6)                       # at most 1 ms from now on
        for h in range(9, 25):
            time.sleep(0.1)                          # a gap, not a synchronisation: the client is idle
            _roundtrip(c, h)
            if core.poll_ns == 0:
                break
        assert core.poll_ns == 0
        set_poll_max_ns(0)                           # off: requests are still served
        _roundtrip(c, 99)
        assert core.poll_ns == 0
    finally:
        set_poll_max_ns(old)
        c.close()


def test_a_negative_window_is_refused():
    with pytest.raises(ValueError, match="poll-max-ns"):
        set_poll_max_ns(-1)


def test_the_clients_receiver_adapts_its_window_and_receives_everything():
    a, b = socket.socketpair()
    old = set_poll_max_ns(10 * 10**9)
    try:
        rx = PolledReceiver(a.fileno())
        buf = bytearray(8)
        for i in range(8):                      # the peer answers at once: the window opens
            t = threading.Timer(0.0, b.sendall, (bytes([i]) * 8,))
            t.start()
            assert rx.recv_into(buf) == 8 and buf == bytes([i]) * 8
            t.join()
        assert rx.poll_ns >= 4000
        set_poll_max_ns(10**6)
        for i in range(16):                     # the peer answers after 100 ms: the window closes
            t = threading.Timer(0.1, b.sendall, (b"x",))
            t.start()
            assert rx.recv_into(memoryview(buf)[:1]) == 1
            t.join()
            if rx.poll_ns == 0:
                break
        assert rx.poll_ns == 0
        b.close()
        assert rx.recv_into(buf) == 0           # the end of the stream
        with pytest.raises(BufferError):
            rx.recv_into(b"read-only")          # not a writable buffer: an error, not a crash
    finally:
        set_poll_max_ns(old)
        a.close()
        b.close()
