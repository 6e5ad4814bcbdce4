"""WRITEs that arrive together go to the backend as one batch (``BlockBackend.pwritev_batch``): a
replication primary forwards them to its secondary in one message. Each keeps its own reply, error
and flags.

The first WRITE (at offset 0) is held by the test's driver while the ones behind it arrive, so the
server finds them all buffered when it reads on; steals after a delay are off (``set_steal_ns``), so
no other thread reads them meanwhile. No timing is involved."""
import errno
import threading

import pytest

import pyrep
from helpers.drivers import registered
from nbd_testlib import RawClient, server  # noqa: F401 - fixtures
from pyrep.constants import REQ_FUA
from pyrep.driver import BlockDriver
from pyrep.nbd import proto as P
from pyrep.nbd._server import set_steal_ns
from pyrep.options import Opt

HOLD = 60.0     # an upper bound only: the test releases the held write itself
SIZE = 1 << 20


class RecordsBatches(BlockDriver):
    """A filter that holds a write at offset 0 until released, records the batches it is given, and
    fails writes at ``FAIL_AT`` with ENOSPC."""
    format_name = "test-nbd-records-batches"
    is_filter = True
    options = (Opt("file", "child", required=True),)
    FAIL_AT = 12 * 4096

    def open(self, opts):
        self.file = self.node.open_child(opts, "file", role="file")

    def pwritev(self, offset, length, iov, flags=0):
        if offset == 0:
            self.events["entered"].set()
            assert self.events["release"].wait(HOLD)
        if offset == self.FAIL_AT:
            raise pyrep.BlockError(errno.ENOSPC, "test: no space here")
        return self.file.pwritev(offset, length, iov, flags)

    def pwritev_batch(self, reqs):
        self.batches.append([(off, n, flags) for off, n, _, flags in reqs])
        return super().pwritev_batch(reqs)

    def flush(self):
        return self.file.flush()


@pytest.fixture
def export(tmp_path, server):
    RecordsBatches.events = {"entered": threading.Event(), "release": threading.Event()}
    RecordsBatches.batches = []
    path = tmp_path / "b.raw"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    old = set_steal_ns(120 * 10**9)      # far longer than the hold
    try:
        with registered(RecordsBatches):
            pyrep.blockdev_add({"driver": "test-nbd-records-batches", "node-name": "b",
                                "file": {"driver": "file", "filename": str(path)}})
            pyrep.export_add("b", writable=True)
            yield RecordsBatches
            RecordsBatches.events["release"].set()
            pyrep.export_del("b", timeout=60)
    finally:
        set_steal_ns(old)


def _pack(cmd, handle, offset, length, flags=0, data=b""):
    from pyrep.nbd import transmission as T
    return T.pack_request(cmd, handle, offset, length, flags) + data


def test_writes_queued_together_are_one_batch_with_their_own_replies(server, export):
    c = RawClient(server.sock_path).go("b")
    c.request(P.CMD_WRITE, 1, 0, 4096, data=b"\x01" * 4096)
    assert export.events["entered"].wait(HOLD)
    # queued behind the held write, in one send: good writes, one beyond the end, one the driver
    # fails, one with FUA, then a read (not a write: it ends the batch)
    burst = [(2, 4096, 4096, 0, b"\x02"), (3, SIZE, 4096, 0, b"\x03"), (4, 8 * 4096, 512, P.CMD_FLAG_FUA, b"\x04"),
             (5, RecordsBatches.FAIL_AT, 4096, 0, b"\x05"), (6, 20 * 4096, 8192, 0, b"\x06")]
    c.s.sendall(b"".join(_pack(P.CMD_WRITE, h, off, n, fl, fill * n) for h, off, n, fl, fill in burst) +
                _pack(P.CMD_READ, 7, 8 * 4096, 512))
    export.events["release"].set()
    replies = {}
    for _ in range(6):
        h, err, _ = c.reply()
        replies[h] = err
    assert replies == {1: 0, 2: 0, 3: P.NBD_ENOSPC, 4: 0, 5: P.NBD_ENOSPC, 6: 0}
    assert c.reply(512) == (7, 0, b"\x04" * 512)
    # the first write went alone (nothing was queued yet when it was read), the valid ones behind it as
    # one batch, with their flags; the one beyond the end never reached the driver
    assert export.batches == [[(4096, 4096, 0), (8 * 4096, 512, REQ_FUA), (RecordsBatches.FAIL_AT, 4096, 0),
                               (20 * 4096, 8192, 0)]]
    for off, n, fill in [(0, 4096, b"\x01"), (4096, 4096, b"\x02"), (20 * 4096, 8192, b"\x06")]:
        c.request(P.CMD_READ, 10, off, n)
        assert c.reply(n) == (10, 0, fill * n)
    c.request(P.CMD_READ, 11, RecordsBatches.FAIL_AT, 4096)
    assert c.reply(4096) == (11, 0, bytes(4096))         # the failed write left nothing
    c.close()


def test_a_write_whose_payload_is_not_all_there_is_not_waited_for(server, export):
    """Only writes already buffered join a batch: the server never waits for more to come."""
    c = RawClient(server.sock_path).go("b")
    c.request(P.CMD_WRITE, 1, 0, 4096, data=b"\x01" * 4096)
    assert export.events["entered"].wait(HOLD)
    # a whole write, then a write whose payload is still on its way
    c.s.sendall(_pack(P.CMD_WRITE, 2, 4096, 4096, 0, b"\x02" * 4096) + _pack(P.CMD_WRITE, 3, 8192, 4096) +
                b"\x03" * 100)
    export.events["release"].set()
    assert c.reply()[:2] == (1, 0)
    assert c.reply()[:2] == (2, 0)                       # answered before #3's payload is complete
    c.s.sendall(b"\x03" * 3996)
    assert c.reply()[:2] == (3, 0)
    assert export.batches == []                          # nothing went as a batch: each write alone
    c.request(P.CMD_READ, 4, 8192, 4096)
    assert c.reply(4096) == (4, 0, b"\x03" * 4096)
    c.close()


def test_the_clients_batch_against_our_server_keeps_each_reply(server, tmp_path):
    """``NbdClient.write_batch`` to pyrep's server: the server answers the batch in one message and the
    client applies the buffered replies together; an error among them lands on its own request."""
    path = tmp_path / "c.raw"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    pyrep.blockdev_add({"driver": "raw", "node-name": "c", "file": {"driver": "file", "filename": str(path)}})
    pyrep.export_add("c", writable=True)
    blk = pyrep.open_backend({"driver": "nbd", "server": {"type": "unix", "path": server.sock_path}, "export": "c"})
    try:
        client = blk.node.driver.client
        reqs = [(i * 8192, 4096, pyrep.IOVector(bytes([i + 1]) * 4096), False) for i in range(8)]
        reqs[5] = (SIZE, 4096, pyrep.IOVector(b"x" * 4096), False)           # beyond the end
        for _ in range(3):
            out = client.write_batch(reqs)
            assert [e is None for e in out] == [i != 5 for i in range(8)]
            assert out[5].errno == errno.ENOSPC
        for i in range(8):
            if i != 5:
                assert blk.pread(i * 8192, 4096) == bytes([i + 1]) * 4096
    finally:
        blk.close()
        pyrep.export_del("c", timeout=60)


def test_random_bursts_of_pipelined_writes_against_a_model(server, tmp_path):
    """Bursts of 1-16 writes sent blind (any size up to 64 KiB, some FUA, some beyond the end), then
    their replies, then a read of the disk: what the server batched and what it did not must agree
    with a model. Writes of one burst do not overlap (NBD leaves their order open)."""
    import random
    path = tmp_path / "m.raw"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    pyrep.blockdev_add({"driver": "raw", "node-name": "m", "file": {"driver": "file", "filename": str(path)}})
    pyrep.export_add("m", writable=True)
    c = RawClient(server.sock_path).go("m")
    rng = random.Random(5)
    model = bytearray(SIZE)
    handle = 0
    try:
        for _ in range(60):
            count = rng.randrange(1, 17)
            slot = SIZE // count
            burst, want = [], {}
            for i in range(count):
                n = rng.randrange(1, 65537)
                off = i * slot + rng.randrange(0, max(1, slot - n))
                if rng.random() < 0.05:
                    off = SIZE - n // 2                  # crosses the end: ENOSPC, nothing written
                handle += 1
                data = rng.randbytes(n)
                burst.append(_pack(P.CMD_WRITE, handle, off, n, P.CMD_FLAG_FUA if rng.random() < 0.2 else 0, data))
                fits = off + n <= SIZE
                want[handle] = 0 if fits else P.NBD_ENOSPC
                if fits:
                    model[off:off + n] = data
            c.s.sendall(b"".join(burst))
            got = {}
            for _ in range(count):
                h, err, _ = c.reply()
                got[h] = err
            assert got == want
        handle += 1
        c.request(P.CMD_READ, handle, 0, SIZE)
        assert c.reply(SIZE) == (handle, 0, bytes(model))
    finally:
        c.close()
        pyrep.export_del("m", timeout=60)
