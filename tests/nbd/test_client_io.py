"""The NBD client's request path: many requests in flight on one connection, from threads and coroutines,
replies in any order, server errors mapped to errno. Real servers: qemu-nbd and nbdkit."""
import asyncio
import errno
import random
import re
import threading

import pytest

import pyrep
from pyrep.constants import BS_DATA, BS_ZERO
from helpers import nbd_peers
from helpers.threads import run_in_threads

MiB = 1 << 20
BLOCK = 4096


def _server(kind, tmp_path, size):
    if kind == "qemu-nbd":
        img = tmp_path / "d.raw"
        with open(img, "wb") as f:
            f.truncate(size)
        return nbd_peers.qemu_nbd(tmp_path, img)
    return nbd_peers.nbdkit(tmp_path, "memory", str(size))


@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit"])
def test_16_threads_of_mixed_io_against_a_model(kind, tmp_path):
    """Each thread owns every 16th block (a model per thread), and mixes reads, writes (some FUA),
    zeroes, trims, flushes and block status on the one connection; every read checks the model, and the
    whole disk is checked at the end."""
    size, nthreads, ops = 16 * MiB, 16, 150
    peer = _server(kind, tmp_path, size)
    blk = pyrep.open_backend(peer.opts(discard="unmap"))
    nblocks = size // BLOCK
    model = bytearray(size)
    lock = threading.Lock()

    def worker(t):
        rng = random.Random(t)
        mine = list(range(t, nblocks, nthreads))
        for _ in range(ops):
            b = rng.choice(mine)
            off = b * BLOCK
            op = rng.random()
            if op < 0.35:
                data = rng.randbytes(BLOCK)
                blk.pwrite(off, data, flags=1 if rng.random() < 0.1 else 0)
                with lock:
                    model[off:off + BLOCK] = data
            elif op < 0.45:
                blk.pwrite_zeroes(off, BLOCK, may_unmap=rng.random() < 0.5)
                with lock:
                    model[off:off + BLOCK] = bytes(BLOCK)
            elif op < 0.5:
                blk.pdiscard(off, BLOCK)        # unspecified content: the model takes what reads back
                got = blk.pread(off, BLOCK)
                with lock:
                    model[off:off + BLOCK] = got
            elif op < 0.55:
                blk.flush()
            elif op < 0.6:
                st = blk.block_status(off, BLOCK)
                if st.flags & BS_ZERO and not st.flags & BS_DATA:
                    assert blk.pread(off, BLOCK) == bytes(BLOCK)
            else:
                got = blk.pread(off, BLOCK)
                with lock:
                    want = bytes(model[off:off + BLOCK])
                assert got == want, (t, b)

    run_in_threads(worker, [(t,) for t in range(nthreads)])
    assert blk.pread(0, size) == bytes(model)


def test_coroutines_share_the_connection(tmp_path):
    peer = nbd_peers.nbdkit(tmp_path, "memory", "8M")
    blk = pyrep.open_backend(peer.opts())
    pieces = {i * 65536: bytes([i % 251 + 1]) * 65536 for i in range(64)}

    async def go():
        await asyncio.gather(*(blk.co_pwrite(off, data) for off, data in pieces.items()))
        return await asyncio.gather(*(blk.co_pread(off, 65536) for off in pieces))
    assert asyncio.run(go()) == list(pieces.values())


def test_requests_are_in_flight_together_and_replies_come_in_any_order(tmp_path):
    """nbdkit holds every read for a while: with 8 readers, the server sees all 8 reads before it answers
    the first, on one connection; the replies then come in whatever order the server finishes them."""
    log = tmp_path / "nbdkit.log"
    peer = nbd_peers.nbdkit(tmp_path, "memory", "8M", f"logfile={log}", "delay-read=300ms",
                            filters=("log", "delay"))
    blk = pyrep.open_backend(peer.opts())
    for i in range(8):
        blk.pwrite(i * MiB, bytes([i + 1]) * 4096)

    def reader(i):
        assert blk.pread(i * MiB, 4096) == bytes([i + 1]) * 4096
    run_in_threads(reader, [(i,) for i in range(8)])
    blk.close()
    peer.stop()
    depth = most = 0
    connections = set()
    for ln in log.read_text().splitlines():
        m = re.search(r"connection=(\d+) (\.\.\.)?Read ", ln)
        if m:
            connections.add(m.group(1))
            depth += -1 if m.group(2) else 1
            most = max(most, depth)
    assert connections == {next(iter(connections))} and most == 8


@pytest.mark.parametrize("name, err", [("ENOSPC", errno.ENOSPC), ("EPERM", errno.EPERM), ("EIO", errno.EIO),
                                       ("ESHUTDOWN", errno.ESHUTDOWN)])
def test_server_errors_keep_their_errno(tmp_path, name, err):
    trigger = tmp_path / "inject"
    peer = nbd_peers.nbdkit(tmp_path, "memory", "1M", f"error={name}", "error-pwrite-rate=100%",
                            f"error-pwrite-file={trigger}", filters=("error",))
    blk = pyrep.open_backend(peer.opts())
    blk.pwrite(0, b"ok")
    trigger.write_text("")
    with pytest.raises(pyrep.BlockError) as e:
        blk.pwrite(4096, b"x" * 512)
    assert e.value.errno == err and "WRITE of 512 bytes at 4096" in str(e.value)
    trigger.unlink()
    blk.pwrite(4096, b"y")                 # the connection carries on after an error reply
    assert blk.pread(0, 2) == b"ok" and blk.pread(4096, 1) == b"y"


def test_large_requests_are_split_and_reassembled(tmp_path):
    """Reads and writes above the 32 MiB payload limit go as several requests at once."""
    peer = nbd_peers.nbdkit(tmp_path, "memory", "96M")
    blk = pyrep.open_backend(peer.opts())
    data = random.Random(5).randbytes(70 * MiB)
    blk.pwrite(3, data)
    assert blk.pread(3, len(data)) == data
    blk.pwrite_zeroes(MiB, 80 * MiB)
    assert blk.pread(0, 4) == b"\0\0\0" + data[:1]
    assert blk.pread(MiB, 80 * MiB).count(0) == 80 * MiB


def test_block_status_answer_is_reused_until_the_data_changes(tmp_path):
    """A walk over the disk costs one BLOCK_STATUS request (the answer holds every extent); a write, a
    zero or a trim makes the next status ask the server again."""
    log = tmp_path / "nbdkit.log"
    peer = nbd_peers.nbdkit(tmp_path, "memory", "16M", f"logfile={log}", filters=("log",))
    blk = pyrep.open_backend(peer.opts(discard="unmap"))
    for i in range(0, 16, 2):
        blk.pwrite(i * MiB, b"\x01" * MiB)

    def walk():
        runs, pos = [], 0
        while pos < blk.length:
            st = blk.block_status(pos, blk.length - pos)
            runs.append((pos, st.length, bool(st.flags & BS_DATA)))
            pos += st.length
        return runs

    def status_requests():
        return sum(1 for ln in log.read_text().splitlines() if " Extents id=" in ln)

    first = walk()
    assert [r[2] for r in first] == [True, False] * 8 and status_requests() == 1
    assert walk() == first and status_requests() == 1
    blk.pwrite(MiB + 4096, b"\x02" * 4096)                 # data where there was a hole
    st = blk.block_status(MiB, MiB)
    assert st.flags & BS_DATA and status_requests() == 2
    blk.pwrite_zeroes(0, MiB, may_unmap=True)
    st = blk.block_status(0, MiB)
    assert st.flags & BS_ZERO and not st.flags & BS_DATA and status_requests() == 3


def test_a_write_of_many_small_pieces(tmp_path):
    """A scatter-gather write of more pieces than the kernel takes in one sendmsg (IOV_MAX = 1024)."""
    peer = nbd_peers.nbdkit(tmp_path, "memory", "1M")
    blk = pyrep.open_backend(peer.opts())
    pieces = [bytes([i % 255 + 1]) * 7 for i in range(3000)]
    iov = pyrep.IOVector()
    for p in pieces:
        iov.add(p)
    blk.pwritev(5, iov)
    assert blk.pread(5, 21000) == b"".join(pieces)
    assert blk.node.driver.client.reconnects == 0 and blk.node.driver.client.state == "connected"


def test_a_server_without_structured_replies(tmp_path):
    """nbdkit --no-sr: simple replies only (reads carry their data after the reply header), no block
    status context: the disk reads as data everywhere."""
    peer = nbd_peers.nbdkit(tmp_path, "memory", "4M", extra=("--no-sr",))
    blk = pyrep.open_backend(peer.opts())
    info = blk.node.driver.client.info
    assert not info.structured and info.context_id is None
    data = random.Random(9).randbytes(300000)
    blk.pwrite(12345, data)
    assert blk.pread(12345, len(data)) == data
    st = blk.block_status(0, blk.length)
    assert st.flags & BS_DATA and st.length == blk.length


def test_a_server_without_fixed_newstyle_is_refused(tmp_path):
    peer = nbd_peers.nbdkit(tmp_path, "memory", "4M", extra=("--mask-handshake=0",))
    with pytest.raises(pyrep.BlockError) as e:
        pyrep.open_backend(peer.opts())
    assert "fixed newstyle" in str(e.value)


def test_a_batch_of_writes_is_in_flight_at_once_and_each_keeps_its_reply(tmp_path):
    """``write_batch`` (what a replication primary forwards a burst with): every write is sent before
    the first reply comes (nbdkit holds each write a while and logs it), one fails alone."""
    log = tmp_path / "nbdkit.log"
    peer = nbd_peers.nbdkit(tmp_path, "memory", "8M", f"logfile={log}", "delay-write=200ms",
                            filters=("log", "delay"))
    blk = pyrep.open_backend(peer.opts())
    client = blk.node.driver.client
    reqs = [(i * MiB, 4096, pyrep.IOVector(bytes([i + 1]) * 4096), i == 3) for i in range(6)]
    reqs.insert(2, (8 * MiB, 4096, pyrep.IOVector(b"x" * 4096), False))      # beyond the end
    out = client.write_batch(reqs)
    assert [e is None for e in out] == [True, True, False, True, True, True, True]
    assert out[2].errno == errno.ENOSPC and "WRITE of 4096 bytes at 8388608" in str(out[2])
    for i in range(6):
        assert blk.pread(i * MiB, 4096) == bytes([i + 1]) * 4096
    blk.close()
    peer.stop()
    depth = most = 0
    fua = []
    for ln in log.read_text().splitlines():
        m = re.search(r"(\.\.\.)?Write .*offset=(0x[0-9a-f]+).*fua=(\d)", ln)
        if m:
            depth += -1 if m.group(1) else 1
            most = max(most, depth)
            if not m.group(1):
                fua.append((int(m.group(2), 16), m.group(3)))
    assert most == 6                                 # the six valid writes were all in flight together
    assert sorted(fua) == [(i * MiB, "1" if i == 3 else "0") for i in range(6)]
