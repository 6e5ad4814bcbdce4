"""The quorum driver: voting reads, fifo reads, rewrite-corrupted, write thresholds, options, run-time children."""
import errno
import random
import threading

import pytest

import pyrep
from pyrep.drivers.quorum import child_errors, clear_child_errors

from helpers.threads import run_in_threads, spawn
from helpers.wait import wait_until

M = 1 << 20


def mem(name, size=M):
    return {"driver": "memory", "size": size, "node-name": name}


def dbg(name, size=M):
    return {"driver": "blkdebug", "node-name": name, "file": mem(name + "-m", size)}


def quorum(children, threshold, **kw):
    opts = {"driver": "quorum", "node-name": "q", "vote-threshold": threshold, "children": children}
    opts.update(kw)
    return pyrep.open_backend(opts, name="qblk")


def test_write_reaches_every_child_and_reads_vote():
    q = quorum([mem("a"), mem("b"), mem("c")], 2)
    q.pwrite(4096, b"x" * 8192)
    for n in "abc":
        assert pyrep.lookup(n).pread(4096, 8192) == b"x" * 8192
    assert q.pread(4096, 8192) == b"x" * 8192
    assert [c.role for c in pyrep.lookup("q").driver.children] == ["children.0", "children.1", "children.2"]
    assert q.length == M


def test_vote_outvotes_corrupted_child_and_reports_it():
    q = quorum([mem("a"), mem("b"), mem("c")], 2)
    q.pwrite(0, b"good" * 1024)
    pyrep.lookup("a").pwrite(0, b"bad!")
    assert q.pread(0, 4096) == b"good" * 1024
    log = child_errors("q")
    assert [e["node"] for e in log] == ["a"] and log[0]["op"] == "read"
    assert pyrep.lookup("a").pread(0, 4) == b"bad!"   # no rewrite by default


def test_no_quorum_is_eio():
    q = quorum([mem("a"), mem("b"), mem("c")], 2)
    pyrep.lookup("a").pwrite(0, b"1")
    pyrep.lookup("b").pwrite(0, b"2")
    with pytest.raises(pyrep.BlockError) as ei:
        q.pread(0, 512)
    assert ei.value.errno == 5 and "votes" in str(ei.value)


def test_read_errors_count_as_missing_votes():
    q = quorum([dbg("a"), dbg("b"), mem("c")], 2)
    q.pwrite(0, b"z" * 512)
    pyrep.inject_error("a", op="read")
    assert q.pread(0, 512) == b"z" * 512
    pyrep.inject_error("b", op="read")
    with pytest.raises(pyrep.BlockError) as ei:
        q.pread(0, 512)
    assert ei.value.errno == errno.EIO
    assert {e["node"] for e in child_errors("q")} == {"a", "b"}


def test_rewrite_corrupted():
    q = quorum([mem("a"), mem("b"), mem("c")], 2, **{"rewrite-corrupted": True})
    q.pwrite(0, b"v" * 65536)
    pyrep.lookup("b").pwrite(100, b"corrupt")
    assert q.pread(0, 65536) == b"v" * 65536
    assert pyrep.lookup("b").pread(0, 65536) == b"v" * 65536


def test_fifo_reads_first_child_then_falls_back():
    q = quorum([dbg("a"), mem("b")], 1, **{"read-pattern": "fifo"})
    q.pwrite(0, b"f" * 512)
    pyrep.lookup("b").pwrite(0, b"B")
    assert q.pread(0, 1) == b"f"                      # no vote: the first child's data
    pyrep.inject_error("a", op="read")
    assert q.pread(0, 1) == b"B"                      # fallback
    assert [(e["node"], e["op"]) for e in child_errors("q")] == [("a", "read")]
    clear_child_errors("q")
    assert child_errors("q") == []


def test_fifo_all_fail():
    q = quorum([dbg("a"), dbg("b")], 1, **{"read-pattern": "fifo"})
    pyrep.inject_error("a", op="read", errno="EIO")
    pyrep.inject_error("b", op="read", errno="ENOSPC")
    with pytest.raises(pyrep.BlockError) as ei:
        q.pread(0, 512)
    assert ei.value.errno == 28


def test_write_threshold():
    q = quorum([dbg("a"), dbg("b"), dbg("c")], 2)
    pyrep.inject_error("a", op="write", errno="ENOSPC")
    q.pwrite(0, b"w" * 512)                           # 2 of 3 succeeded
    assert pyrep.lookup("b").pread(0, 1) == b"w"
    assert [(e["node"], e["op"], e["errno"]) for e in child_errors("q")] == [("a", "write", 28)]
    pyrep.inject_error("b", op="write", errno="EIO")
    with pytest.raises(pyrep.BlockError) as ei:
        q.pwrite(0, b"w" * 512)
    assert "1 of 3" in str(ei.value)
    pyrep.clear_errors("a")
    pyrep.clear_errors("b")
    q.pwrite_zeroes(0, 512)
    q.flush()
    assert pyrep.lookup("c").pread(0, 4) == b"\0" * 4


def test_concurrent_writes_parallel_children():
    """Threads write their own blocks at once: every child ends as the model, and so does a voted read
    of the whole disk."""
    q = quorum([mem("a", 4 * M), mem("b", 4 * M)], 2)
    model = bytearray(4 * M)

    def worker(i):
        for j in range(20):
            off = (i * 20 + j) * 4096 + (i % 3) * 300           # unaligned for some threads
            q.pwrite(off, bytes([i + 1]) * 3000)

    run_in_threads(worker, [(i,) for i in range(8)])
    for i in range(8):
        for j in range(20):
            off = (i * 20 + j) * 4096 + (i % 3) * 300
            model[off:off + 3000] = bytes([i + 1]) * 3000
    for name in ("a", "b"):
        assert pyrep.lookup(name).pread(0, 4 * M) == model, name
    assert q.pread(0, 4 * M) == model


def test_a_child_failing_under_load_is_outvoted_and_then_a_second_one_fails_the_writes():
    """Writers and readers run while child a starts failing every write and read: with 2 of 3 votes
    nothing fails and a and its errors are reported; the other children hold the model. Then b fails
    too: writes now fail with EIO, each naming the votes, and none of them is half-acknowledged."""
    q = quorum([dbg("a", 2 * M), dbg("b", 2 * M), mem("c", 2 * M)], 2)
    model = bytearray(2 * M)
    lock = threading.Lock()
    failing = threading.Event()

    def worker(t):
        rng = random.Random(t)
        for i in range(150):
            if i == 50 and t == 0:
                pyrep.inject_error("a", op="any", errno="EIO")
                failing.set()
            blk_no = rng.randrange(t, 2 * M // 4096, 4)          # each thread owns its blocks
            if rng.random() < 0.6:
                data = bytes([rng.randrange(1, 256)]) * 4096
                q.pwrite(blk_no * 4096, data)
                with lock:
                    model[blk_no * 4096:(blk_no + 1) * 4096] = data
            else:
                with lock:
                    want = bytes(model[blk_no * 4096:(blk_no + 1) * 4096])
                assert q.pread(blk_no * 4096, 4096) == want

    run_in_threads(worker, [(t,) for t in range(4)])
    assert failing.is_set()
    assert {e["node"] for e in child_errors("q")} == {"a"}
    assert pyrep.lookup("b").pread(0, 2 * M) == model and pyrep.lookup("c").pread(0, 2 * M) == model
    assert q.pread(0, 2 * M) == model
    pyrep.inject_error("b", op="write", errno="EIO")

    def refused(t):
        with pytest.raises(pyrep.BlockError) as ei:
            q.pwrite(t * 65536, b"\xff" * 4096)
        assert ei.value.errno == errno.EIO and "1 of 3" in str(ei.value)
    run_in_threads(refused, [(t,) for t in range(4)])
    pyrep.clear_errors("a")
    pyrep.clear_errors("b")
    assert pyrep.lookup("b").pread(0, 2 * M) == model


def test_children_added_and_removed_while_writes_go_on():
    """A writer keeps writing while a synced child joins and another leaves: every write that
    returned is on every child that was a member at the time and stays until the end."""
    q = quorum([mem("a"), mem("b")], 1)
    model = bytearray(M)
    stop = threading.Event()
    n = [0]

    def writer():
        rng = random.Random(1)
        while not stop.is_set():
            off = rng.randrange(0, M - 4096, 512)
            data = bytes([rng.randrange(1, 256)]) * 4096
            q.pwrite(off, data)
            model[off:off + 4096] = data
            n[0] += 1
    w = spawn(writer)
    try:
        wait_until(lambda: n[0] > 20, what="writes")
        with pyrep.drained(pyrep.lookup("q")):           # sync the new child while no write runs
            pyrep.blockdev_add(mem("c"))
            pyrep.lookup("c").pwrite(0, bytes(model))
            assert pyrep.quorum_add_child("q", "c") == "children.2"
        at = n[0]
        wait_until(lambda: n[0] > at + 20, what="writes after the child joined")
        assert pyrep.quorum_del_child("q", "a") == "children.0"
        at = n[0]
        wait_until(lambda: n[0] > at + 20, what="writes after a child left")
    finally:
        stop.set()
        w.join()
    for name in ("b", "c"):
        assert pyrep.lookup(name).pread(0, M) == model, name
    assert q.pread(0, M) == model


@pytest.mark.parametrize("opts,match", [
    ({"vote-threshold": 3}, "at most the number of children"),
    ({"vote-threshold": 0}, "minimum"),
    ({"vote-threshold": 1.5}, "whole number"),
    ({"vote-threshold": 1, "read-pattern": "fifo", "rewrite-corrupted": True}, "rewrite-corrupted"),
    ({"vote-threshold": 1, "read-pattern": "random"}, "read-pattern"),
    ({"vote-threshold": 1, "bogus": 1}, "unknown option 'bogus'"),
    ({}, "vote-threshold' is required"),
])
def test_bad_options(opts, match):
    base = {"driver": "quorum", "children": [mem("a"), mem("b")]}
    base.update(opts)
    with pytest.raises(pyrep.OptionError, match=match):
        pyrep.open_backend(base)
    assert "a" not in pyrep.nodes()                   # nothing left open


def test_children_lengths_must_match():
    with pytest.raises(pyrep.OptionError, match="differ in length"):
        pyrep.open_backend({"driver": "quorum", "vote-threshold": 1, "children": [mem("a"), mem("b", 2 * M)]})


def test_children_by_name_and_dotted_options():
    pyrep.blockdev_add(mem("a"))
    pyrep.blockdev_add(mem("b"))
    q = pyrep.open_backend("driver=quorum,node-name=q,vote-threshold=2,children.0=a,children.1=b")
    q.pwrite(0, b"n" * 512)
    assert pyrep.lookup("a").pread(0, 1) == b"n"
    assert pyrep.lookup("q").children["children.1"].node.name == "b"


def test_add_and_remove_children():
    q = quorum([mem("a"), mem("b")], 2)
    q.pwrite(0, b"1" * 512)
    with pytest.raises(pyrep.OptionError, match="below the threshold"):
        pyrep.quorum_del_child("q", "children.0")
    pyrep.blockdev_add(mem("c"))
    pyrep.lookup("c").pwrite(0, b"1" * 512)          # the user syncs a new child first, as with QEMU
    assert pyrep.quorum_add_child("q", "c") == "children.2"
    q.pwrite(512, b"2" * 512)
    assert pyrep.lookup("c").pread(512, 1) == b"2"
    assert pyrep.quorum_del_child("q", "a") == "children.0"      # by node name
    assert [c.role for c in pyrep.lookup("q").driver.children] == ["children.1", "children.2"]
    q.pwrite(0, b"3" * 512)
    assert "a" not in pyrep.nodes()                   # an implicit child left the graph
    assert q.pread(0, 512) == b"3" * 512
    with pytest.raises(pyrep.OptionError, match="has no child 'children.0'"):
        pyrep.quorum_del_child("q", "children.0")
    with pytest.raises(pyrep.OptionError, match="already a child"):
        pyrep.quorum_add_child("q", "c")
    pyrep.blockdev_add(mem("d", 2 * M))
    with pytest.raises(pyrep.OptionError, match="length"):
        pyrep.quorum_add_child("q", "d")
    pyrep.blockdev_add(mem("e"))
    with pytest.raises(pyrep.OptionError, match="not quorum"):
        pyrep.quorum_add_child("e", "d")
    with pytest.raises(pyrep.OptionError, match="below the threshold"):
        pyrep.quorum_del_child("q", "children.1")
    assert pyrep.quorum_add_child("q", "e") == "children.3"


def test_permissions_forwarded_to_children():
    pyrep.blockdev_add(mem("a"))
    pyrep.blockdev_add(mem("b"))
    pyrep.open_backend("a", name="other")             # a writer that shares only reads
    with pytest.raises(pyrep.PermissionConflict):
        pyrep.open_backend({"driver": "quorum", "vote-threshold": 1, "children": ["a", "b"]})
    ro = pyrep.open_backend({"driver": "quorum", "vote-threshold": 1, "children": ["b"]}, read_only=True)
    assert ro.pread(0, 1) == b"\0"


def test_primary_graph_shape(tmp_path):
    """QEMU's primary: quorum(threshold 1, fifo) over the local disk and replication(primary)."""
    pyrep.blockdev_add(mem("sd"))
    sdb = pyrep.open_backend("sd", name="sdb", share_rw=True)
    p = pyrep.open_backend({"driver": "quorum", "vote-threshold": 1, "read-pattern": "fifo", "children": [
        mem("local"), {"driver": "replication", "mode": "primary", "node-name": "prep", "file": "sd"}]})
    p.pwrite(0, b"p" * 512)                           # replication not started: its child fails, threshold 1
    assert pyrep.lookup("local").pread(0, 1) == b"p" and sdb.pread(0, 1) == b"\0"
    pyrep.replication.start_all("primary")
    p.pwrite(0, b"q" * 512)
    assert sdb.pread(0, 1) == b"q"
    assert p.pread(0, 1) == b"q"


class _BuggyFilter(pyrep.BlockDriver):
    """A filter whose reads and writes have a bug (a TypeError), not an I/O error."""
    format_name = "buggy-filter"
    is_filter = True
    options = (pyrep.Opt("file", "child", required=True),)

    def open(self, opts):
        self.file = self.node.open_child(opts, "file")

    def preadv(self, offset, length, iov):
        raise TypeError("buggy-filter: a bug in the read path")

    def pwritev(self, offset, length, iov, flags=0):
        raise TypeError("buggy-filter: a bug in the write path")


@pytest.fixture
def buggy_driver():
    pyrep.register_driver(_BuggyFilter)
    yield
    pyrep.close_all()
    pyrep.unregister_driver("buggy-filter")


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("pattern", ["quorum", "fifo"])
def test_a_bug_in_a_child_is_raised_not_counted_as_a_failed_vote(buggy_driver, parallel, pattern):
    buggy = {"driver": "buggy-filter", "node-name": "bug", "file": mem("bug-m")}
    # the buggy child comes first: a fifo read would otherwise never reach it
    q = quorum([buggy, mem("a"), mem("b")], 1, parallel=parallel, **{"read-pattern": pattern})
    with pytest.raises(TypeError, match="bug in the read path"):
        q.pread(0, 4096)
    with pytest.raises(TypeError, match="bug in the write path"):
        q.pwrite(0, b"w" * 4096)
    assert child_errors("q") == []                      # nothing was recorded as a child's I/O error


def test_an_io_error_in_a_child_still_counts_as_a_failed_vote():
    q = quorum([dbg("a"), mem("b"), mem("c")], 2)
    pyrep.inject_error("a", op="write", errno="EIO")
    q.pwrite(0, b"v" * 4096)                            # two of three succeed: the threshold holds
    assert [e["node"] for e in child_errors("q")] == ["a"]


@pytest.mark.parametrize("parallel", [False, True])
def test_a_batch_of_writes_is_voted_request_by_request(parallel):
    # the server hands buffered writes over as one batch (BlockBackend.pwritev_batch): each write is
    # still voted on alone, and a child's failure is reported for the write it failed
    q = quorum([dbg("a"), dbg("b"), mem("c")], 2, parallel=parallel)
    pyrep.inject_error("a", op="write", errno="ENOSPC", offset=8192, length=4096)
    pyrep.inject_error("b", op="write", errno="EIO", offset=16384, length=4096)
    pyrep.inject_error("b", op="write", errno="EIO", offset=8192, length=4096)
    out = q.pwritev_batch([(0, b"0" * 4096, 0), (8192, b"8" * 4096, 0), (16384, b"6" * 4096, 0)])
    assert out[0] is None and out[2] is None            # 3 of 3, then 2 of 3 (b failed)
    assert isinstance(out[1], pyrep.BlockError) and "1 of 3" in str(out[1])
    assert out[1].errno == errno.ENOSPC                 # the first failure's errno
    assert q.pread(0, 1) == b"0" and pyrep.lookup("a").pread(16384, 1) == b"6"
    assert pyrep.lookup("c").pread(8192, 1) == b"8"     # written where it could be (as pwritev does)
    assert sorted((e["node"], e["offset"]) for e in child_errors("q")) == [("a", 8192), ("b", 8192), ("b", 16384)]


def test_a_bug_in_a_child_fails_the_whole_batch(buggy_driver):
    buggy = {"driver": "buggy-filter", "node-name": "bug", "file": mem("bug-m")}
    q = quorum([mem("a"), buggy], 1)
    with pytest.raises(TypeError, match="bug in the write path"):
        q.pwritev_batch([(0, b"w" * 4096, 0), (4096, b"w" * 4096, 0)])
    assert child_errors("q") == []


def test_a_batch_reaches_a_network_child_before_the_local_one_is_written(tmp_path):
    # the replication primary's shape: local disk + a child over NBD. The NBD child's batch is sent
    # first (pwritev_batch_start), so the secondary writes while the local disk does
    from helpers import nbd_peers
    from helpers.threads import spawn
    log = tmp_path / "nbdkit.log"
    peer = nbd_peers.nbdkit(tmp_path, "memory", "1M", f"logfile={log}", filters=("log",))
    q = quorum([dbg("l"), peer.opts()], 2)
    rule = pyrep.inject_error("l", op="write", errno=None, hold=True)   # the local disk holds every write
    out = {}
    t = spawn(lambda: out.update(r=q.pwritev_batch([(i * 8192, bytes([i + 1]) * 4096, 0) for i in range(3)])))
    try:
        nbd_peers.wait_for(lambda: log.exists() and log.read_text().count(" Write id=") == 3,
                           "the NBD child's writes to reach the server while the local disk is held")
    finally:
        rule.release()
        t.join(60)
    assert not t.is_alive() and out["r"] == [None, None, None]
    for i in range(3):
        assert q.pread(i * 8192, 4096) == bytes([i + 1]) * 4096
    q.close()
    peer.stop()
