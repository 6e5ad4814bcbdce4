"""Nodes with a request alignment (``align``, as O_DIRECT files have): unaligned requests are padded to
whole blocks, and an unaligned write is a read-modify-write that must never put back stale bytes over a
write that landed meanwhile."""
import random

import pyrep

from helpers.threads import run_in_threads, spawn
from helpers.wait import stays_false

BLOCK = 4096


def _aligned_node(tmp_path, size, name):
    path = tmp_path / f"{name}.raw"
    path.write_bytes(bytes(size))
    return pyrep.open_backend({"driver": "blkdebug", "node-name": name, "align": BLOCK,
                               "file": {"driver": "file", "filename": str(path)}})


def test_aligned_write_during_a_read_modify_write_is_not_overwritten(tmp_path):
    """A 512-byte write reads its 4 KiB block, and its write-back is held (blkdebug hold); an aligned
    write of the whole block meanwhile must not be undone by the write-back: it waits for it instead."""
    blk = _aligned_node(tmp_path, 65536, "al")
    try:
        rule = pyrep.inject_error("al", op="write", errno=None, hold=True)
        rmw = spawn(blk.pwrite, 0, b"\xaa" * 512)
        assert rule.wait_held(1)                # the unaligned write has read its block, its write is held
        whole = spawn(blk.pwrite, 0, b"\xbb" * BLOCK)
        assert stays_false(lambda: rule.held > 1 or whole.done.is_set()), \
            "the aligned write went to the file under a held read-modify-write"
        rule.release()
        rmw.join()
        whole.join()
        assert rule.fired == 2                  # both writes reached the file, in order
        assert blk.pread(0, BLOCK) == b"\xbb" * BLOCK
    finally:
        pyrep.clear_errors("al")
        blk.close()


def test_concurrent_unaligned_and_aligned_writes_lose_nothing(tmp_path):
    """Threads write their own 512-byte sectors (unaligned requests) and, now and then, whole blocks that
    only they own, sharing blocks with the other threads' sectors: every byte ends as its owner last
    wrote it."""
    T, blocks = 4, 16
    size = blocks * BLOCK
    blk = _aligned_node(tmp_path, size, "al2")
    model = bytearray(size)
    # sector s of block b belongs to thread (b + s) % T, except blocks b % 5 == 0, whole to thread b % T
    owner = {}
    for b in range(blocks):
        for s in range(BLOCK // 512):
            owner[b * 8 + s] = b % T if b % 5 == 0 else (b + s) % T

    def worker(t):
        rng = random.Random(t)
        mine = [sec for sec, o in owner.items() if o == t]
        whole = [b for b in range(blocks) if b % 5 == 0 and b % T == t]
        for i in range(300):
            v = bytes([t * 60 + i % 60 + 1])
            if whole and rng.random() < 0.3:
                b = rng.choice(whole)
                blk.pwrite(b * BLOCK, v * BLOCK)
                model[b * BLOCK:(b + 1) * BLOCK] = v * BLOCK
            else:
                sec = rng.choice(mine)
                blk.pwrite(sec * 512, v * 512)
                model[sec * 512:(sec + 1) * 512] = v * 512
    try:
        run_in_threads(worker, [(t,) for t in range(T)])
        assert blk.pread(0, size) == model
    finally:
        blk.close()
