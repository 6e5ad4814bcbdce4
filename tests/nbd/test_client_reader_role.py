"""The NBD client has no reader thread: the callers waiting for replies read them, one at a time (the
reader role), completing each other's requests, and the role passes to a sleeping caller when its holder's
own request is done.

The server (in-process) holds each read in a gate the test opens, so the order in which replies come is
the test's: the role's holder must complete the others' requests when their replies come first, and hand
the role on when its own comes first."""
import threading

import pytest

import pyrep
from helpers.drivers import registered
from helpers.threads import spawn
from helpers.wait import wait_until
from nbd_testlib import server  # noqa: F401 - fixture
from pyrep.driver import BlockDriver
from pyrep.options import Opt

N = 4                       # the server runs 4 requests of a connection at once (DEFAULT_WORKERS)
SPAN = 1 << 16
HOLD = 60.0                 # an upper bound only: the test opens every gate itself


class Gated(BlockDriver):
    """A read at ``k * SPAN`` says it entered, then waits for gate ``k``."""
    format_name = "test-nbd-gated"
    is_filter = True
    options = (Opt("file", "child", required=True),)
    gates = entered = None

    def open(self, opts):
        self.file = self.node.open_child(opts, "file", role="file")

    def preadv(self, offset, length, iov, flags=0):
        k = offset // SPAN
        if k < N and self.gates is not None:
            self.entered[k].set()
            assert self.gates[k].wait(HOLD)
        return self.file.preadv(offset, length, iov, flags)


@pytest.fixture
def gated(tmp_path, server):
    path = tmp_path / "g.raw"
    with open(path, "wb") as f:
        for k in range(N):
            f.write(bytes([k + 1]) * SPAN)
    with registered(Gated):
        node = pyrep.blockdev_add({"driver": "test-nbd-gated", "node-name": "g",
                                   "file": {"driver": "file", "filename": str(path)}})
        pyrep.export_add(node, writable=True)
        blk = pyrep.open_backend({"driver": "nbd", "server": {"type": "unix", "path": server.sock_path}, "export": "g"})
        yield blk
        for ev in Gated.gates or ():
            ev.set()
        Gated.gates = Gated.entered = None
        blk.close()
        pyrep.export_del("g", timeout=60)


@pytest.mark.parametrize("order", [(3, 2, 1, 0), (0, 1, 2, 3), (2, 0, 3, 1)])
def test_callers_read_each_others_replies_and_hand_the_role_on(gated, order):
    blk = gated
    client = blk.node.driver.client
    Gated.gates = [threading.Event() for _ in range(N)]
    Gated.entered = [threading.Event() for _ in range(N)]
    got = {}

    def read(k):
        got[k] = blk.pread(k * SPAN, 4096)
    workers = []
    for k in range(N):
        workers.append(spawn(read, k))
        assert Gated.entered[k].wait(HOLD)
        # caller 0 holds the reader role, the later ones sleep (oldest first)
        wait_until(lambda: client._reading and len(client._sleepers) == k, what=f"caller {k} to wait")
    for k in order:
        Gated.gates[k].set()
        workers[k].join()
    assert got == {k: bytes([k + 1]) * 4096 for k in range(N)}
    assert not client._reading and not client._sleepers
    # caller 0 reads until its own reply; each time the holder's own reply comes while others still
    # wait, the role passes to the oldest sleeper
    expected = 0
    holder, waiting = 0, [1, 2, 3]
    for k in order:
        waiting = [w for w in waiting if w != k]
        if k == holder and waiting:
            holder = waiting.pop(0)
            expected += 1
    assert client.handoffs == expected
    assert not [t for t in threading.enumerate() if t.name.startswith("nbd-reader")]


def test_a_holder_that_fails_unexpectedly_hands_the_role_on(gated, server):
    """A bug while reading a reply (here an injected RuntimeError) ends the holder's call and breaks the
    connection; the role must not leave with it: after the reconnect, a caller that slept through it
    reads its reply."""
    blk = pyrep.open_backend({"driver": "nbd", "server": {"type": "unix", "path": server.sock_path},
                              "export": "g", "reconnect-delay": 30})
    try:
        client = blk.node.driver.client
        Gated.gates = [threading.Event() for _ in range(N)]
        Gated.entered = [threading.Event() for _ in range(N)]
        real, calls = client._read_data, []

        def broken_once(*args):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected")
            return real(*args)
        client._read_data = broken_once
        w0 = spawn(blk.pread, 0, 4096)
        assert Gated.entered[0].wait(HOLD)
        wait_until(lambda: client._reading, what="caller 0 to hold the role")
        w1 = spawn(blk.pread, SPAN, 4096)
        assert Gated.entered[1].wait(HOLD)
        wait_until(lambda: len(client._sleepers) == 1, what="caller 1 to sleep")
        Gated.gates[0].set()
        with pytest.raises(RuntimeError, match="injected"):
            w0.join()
        wait_until(lambda: client.reconnects == 1, what="the reconnect")
        Gated.gates[1].set()
        assert w1.join() == bytes([2]) * 4096
        assert not client._sleepers
    finally:
        blk.close()
