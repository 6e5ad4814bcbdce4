"""Adding and removing quorum children at run time (x-blockdev-change) while writes and reads run."""
import threading

import pytest

import pyrep

from helpers.threads import spawn
from helpers.wait import wait_until

M = 1 << 20
BLOCK = 4096
WRITERS = 4
PER_WRITER = 64          # blocks of each writer's own region


@pytest.mark.parametrize("parallel", [False, True])
def test_add_and_remove_children_under_load(parallel):
    a = pyrep.blockdev_add({"driver": "memory", "size": M, "node-name": "la"})
    b = pyrep.blockdev_add({"driver": "memory", "size": M, "node-name": "lb"})
    q = pyrep.open_backend({"driver": "quorum", "node-name": "lq", "vote-threshold": 1, "read-pattern": "fifo",
                            "parallel": parallel, "children": ["la", "lb"]}, name="lqblk")
    new = pyrep.blockdev_add({"driver": "memory", "size": M, "node-name": "lnew"})
    stop = threading.Event()
    added = threading.Event()
    last = {}                 # block -> (data, began after the add had returned)
    lock = threading.Lock()
    counts = [0] * WRITERS

    def writer(n):
        seq = 0
        while not stop.is_set() and seq < 100000:
            seq += 1
            blockno = n * PER_WRITER + seq % PER_WRITER
            after_add = added.is_set()
            data = bytes([n + 1]) * 8 + seq.to_bytes(8, "little") * ((BLOCK - 8) // 8) + b"\0" * ((BLOCK - 8) % 8)
            q.pwrite(blockno * BLOCK, data)          # must never fail: threshold 1, children healthy
            got = q.pread(blockno * BLOCK, BLOCK)
            assert got == data, f"writer {n}: read back another version of block {blockno}"
            with lock:
                last[blockno] = (data, after_add)
            counts[n] += 1

    workers = [spawn(writer, n) for n in range(WRITERS)]
    wait_until(lambda: min(counts) >= 20, 30, "writes under way")
    assert pyrep.quorum_add_child("lq", "lnew") == "children.2"
    added.set()
    base = list(counts)
    wait_until(lambda: all(c >= b + 20 for c, b in zip(counts, base)), 30, "writes after the add")
    # remove the child fifo reads come from, then the other original one, while writes go on
    assert pyrep.quorum_del_child("lq", "children.0") == "children.0"
    base = list(counts)
    wait_until(lambda: all(c >= b + 20 for c, b in zip(counts, base)), 30, "writes after the first removal")
    assert pyrep.quorum_del_child("lq", "lb") == "children.1"
    base = list(counts)
    wait_until(lambda: all(c >= b + 20 for c, b in zip(counts, base)), 30, "writes after the second removal")
    stop.set()
    for w in workers:
        w.join()
    assert [c.node.name for c in pyrep.lookup("lq").driver.children] == ["lnew"]
    # every write that began after the add returned is on the new child, whatever happened meanwhile
    checked = 0
    for blockno, (data, after_add) in last.items():
        assert q.pread(blockno * BLOCK, BLOCK) == data
        if after_add:
            assert new.pread(blockno * BLOCK, BLOCK) == data, f"block {blockno} missing on the added child"
            checked += 1
    assert checked == WRITERS * PER_WRITER
    assert a.closed is False and not a.parents       # the removed children are free again (blockdev-added)
    assert not b.parents
    q.close()
