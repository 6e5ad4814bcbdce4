"""Randomized model test and concurrency test of the in-process replication.

Model: "the secondary disk at the last checkpoint + the secondary's writes since".
After the final failover the closed secondary disk image must equal the model
(checked with ``qemu-img compare`` against a raw file holding the model).
"""
import os
import random
import threading
import time

import pytest

import pyrep
from pyrep import replication
from helpers.replication import M, Primary, Secondary
from helpers.referees import qimg
from helpers.threads import spawn
from helpers.wait import wait_until

SIZE = 8 * M


def rand_write(rng, size, max_len=192 * 1024):
    length = rng.randrange(512, max_len + 1, 512)
    off = rng.randrange(0, size - length + 1, 512)
    return off, rng.randbytes(length)


@pytest.mark.parametrize("kind,seed", [("qcow2", 1), ("qcow2+memory", 2), ("raw+memory", 3), ("qcow2", 4)])
def test_random_model(tmp_path, kind, seed):
    rng = random.Random(seed)
    s = Secondary(tmp_path, kind, size=SIZE, fill=0x11)
    p = Primary(tmp_path, kind, size=SIZE, fill=0x11)
    replication.start_all("secondary", skip_other_mode=True)
    replication.start_all("primary", skip_other_mode=True)
    primary = bytearray(b"\x11" * SIZE)
    checkpoint = bytes(primary)
    view = bytearray(checkpoint)           # checkpoint + secondary overlay
    for step in range(300):
        r = rng.random()
        if r < 0.45:
            off, data = rand_write(rng, SIZE)
            p.blk.pwrite(off, data)
            primary[off:off + len(data)] = data
        elif r < 0.65:
            off, data = rand_write(rng, SIZE, 64 * 1024)
            s.top.pwrite(off, data)
            view[off:off + len(data)] = data
        elif r < 0.93:
            off, data = rand_write(rng, SIZE)
            n = len(data)
            assert s.top.pread(off, n) == bytes(view[off:off + n]), f"step {step}: secondary read at {off}"
            assert p.blk.pread(off, n) == bytes(primary[off:off + n]), f"step {step}: primary read at {off}"
        else:
            replication.do_checkpoint_all()
            checkpoint = bytes(primary)
            view = bytearray(checkpoint)
            assert s.local.pread(0, SIZE) == checkpoint
    replication.get_error_all()
    # the primary dies between checkpoints; failover
    p.blk.close()
    replication.stop_all(True, wait=True, timeout=60, mode="secondary")
    assert s.top.pread(0, SIZE) == bytes(view)
    sd_file = pyrep.lookup("s_local").file.filename if kind != "memory" else None
    fmt = "raw" if kind.startswith("raw") else "qcow2"
    pyrep.close_all()
    model = os.path.join(str(tmp_path), "model.raw")
    with open(model, "wb") as f:
        f.write(view)
    qimg("compare", "-f", fmt, "-F", "raw", sd_file, model)


def test_concurrent_primary_writes_and_secondary_reads(tmp_path):
    """Reads of the secondary racing the primary's writes to the same clusters only ever see the
    checkpoint's data (or the secondary's own write), never the primary's new data or a mix.
    Several rounds, each after a checkpoint, so every cluster is copied before write again."""
    size = 8 * M
    cl = 65536
    ncl = size // cl
    s = Secondary(tmp_path, "qcow2+memory", size=size, fill=None)
    disk = bytearray(b"".join(bytes([i % 250 + 1]) * cl for i in range(ncl)))    # the model of s_local
    s.local.pwrite(0, bytes(disk))
    p = Primary(tmp_path, "qcow2+memory", size=size, fill=None)
    replication.start_all("secondary", skip_other_mode=True)
    replication.start_all("primary", skip_other_mode=True)
    # widen the race window: a read of the hidden disk that misses waits a little before it reads
    # the secondary disk (where the primary's write may land meanwhile)
    hidden = pyrep.lookup("hidden").driver
    orig_read_backing = hidden._read_backing

    def slow_read_backing(*args):
        time.sleep(0.0005)
        return orig_read_backing(*args)

    hidden._read_backing = slow_read_backing
    bad = []
    for rnd in range(4):
        replication.do_checkpoint_all()
        old = bytes(disk)
        own = {}
        own_lock = threading.Lock()
        stop = threading.Event()
        primary_writes = []            # offsets; every writer of a round writes the same byte there
        reads = [0] * 4

        def primary_writer(seed):
            rng = random.Random(seed)
            for _ in range(60):
                c = rng.randrange(ncl)
                off = c * cl + rng.randrange(0, cl, 4096)
                p.blk.pwrite(off, bytes([0xe0 + rnd]) * 4096)
                primary_writes.append(off)
                time.sleep(0.002)     # pacing: spread the first writes (the copies) over the round

        def secondary_reader(seed):
            rng = random.Random(seed)
            while not stop.is_set():
                c = rng.randrange(ncl)
                n = min(rng.choice([1, 2, 3]), ncl - c)
                data = s.top.pread(c * cl, n * cl)
                for k in range(n):
                    chunk = data[k * cl:(k + 1) * cl]
                    if chunk == old[(c + k) * cl:(c + k + 1) * cl]:
                        continue
                    with own_lock:
                        mine = own.get(c + k)
                    if chunk != mine:
                        bad.append((rnd, c + k, chunk[:8]))
                reads[seed % 10] += 1

        readers = [spawn(secondary_reader, 100 + rnd * 10 + i) for i in range(4)]
        try:
            wait_until(lambda: min(reads) > 0, what="the secondary's readers to be reading")
            writers = [spawn(primary_writer, rnd * 10 + i) for i in range(3)]
            rng = random.Random(rnd)
            for _ in range(10):
                c = rng.randrange(ncl)
                with own_lock:
                    s.top.pwrite(c * cl, bytes([0xd0 + c % 16]) * cl)
                    own[c] = bytes([0xd0 + c % 16]) * cl
            for w in writers:
                w.join()
            at_end = list(reads)
            wait_until(lambda: all(r > e for r, e in zip(reads, at_end)), what="reads after the last write")
        finally:
            stop.set()
            for r in readers:
                r.join()
        for off in primary_writes:
            disk[off:off + 4096] = bytes([0xe0 + rnd]) * 4096
        assert s.local.pread(0, size) == disk, "the secondary disk is not what the primary wrote"
        assert not bad, f"the secondary saw data that is neither old nor its own: {bad[:5]}"
        replication.get_error_all()
        view = s.top.pread(0, size)
        for c in range(ncl):
            assert view[c * cl:(c + 1) * cl] == own.get(c, old[c * cl:(c + 1) * cl])
