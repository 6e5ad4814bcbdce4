"""Backup jobs: copy-before-write (sync=none), full/top copies, policies, job control."""
import errno
import os
import random
import threading
import time

import pytest

import pyrep
import pyrep.jobs
from pyrep.errors import BlockError, OptionError

from helpers.jobs import CS, SIZE
from helpers.threads import run_in_threads, spawn
from helpers.wait import stays_false, wait_until


def pattern(tag, n=CS):
    return bytes([tag % 251 + 1]) * n


def raw_file(tmp_path, name, size=SIZE, fill=None):
    path = tmp_path / name
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            for i in range(size // CS):
                f.write(fill(i))
    return {"driver": "raw", "file": {"driver": "file", "filename": str(path)}}


def file_bytes(opts):
    """What the raw file of ``opts`` holds, read past pyrep: the model the tests compare with."""
    with open(opts["file"]["filename"], "rb") as f:
        return f.read()


def counting_target(name="tgt", size=SIZE):
    """A memory target under a blkdebug whose never-firing rule counts the writes it sees."""
    node = pyrep.blockdev_add({"driver": "blkdebug", "node-name": name,
                               "file": {"driver": "memory", "size": size, "node-name": name + "-mem"}})
    rule = pyrep.inject_error(name, op="write", after=10 ** 12)
    return node, rule


def test_cow_copies_old_data_once_per_cluster(tmp_path):
    opts = raw_file(tmp_path, "src.raw", fill=lambda i: pattern(i))
    opts["node-name"] = "src"
    blk = pyrep.open_backend(opts, share_rw=True)
    tgt, rule = counting_target()
    job = pyrep.jobs.backup("src", "tgt", sync="none")
    assert job.type == "backup" and job.status == "running" and pyrep.jobs.get(job.id) is job
    touched = set()
    rng = random.Random(1)
    for _ in range(200):
        c = rng.randrange(SIZE // CS)
        off = c * CS + rng.randrange(CS - 100)
        blk.pwrite(off, b"N" * 100)
        touched.add(c)
    blk.pwrite_zeroes(10 * CS, 2 * CS)
    touched |= {10, 11}
    assert rule.seen == len(touched) == job.clusters_copied
    for c in range(SIZE // CS):
        got = tgt.pread(c * CS, CS)
        assert got == (pattern(c) if c in touched else bytes(CS)), c
    assert job.progress == (len(touched) * CS, SIZE)
    # a new checkpoint interval: the next write copies again (what the source held then)
    cur = file_bytes(opts)[3 * CS:4 * CS]               # what the source holds now, read past pyrep
    job.do_checkpoint()
    assert job.progress == (0, SIZE)
    blk.pwrite(3 * CS, b"X" * CS)
    blk.pwrite(3 * CS, b"Y" * CS)
    assert rule.seen == len(touched) + 1
    assert tgt.pread(3 * CS, CS) == cur
    job.cancel(sync=True)
    assert job.status == "concluded" and job.cancelled and job.error is None
    assert job not in pyrep.jobs.list()
    # the job let go of its nodes
    assert all(c.parent is not job for c in blk.node.parents + tgt.parents)
    blk.pwrite(4 * CS, b"Z")
    assert rule.seen == len(touched) + 1


def test_cow_write_unchanged_and_discard(tmp_path):
    blk = pyrep.open_backend({"driver": "memory", "size": SIZE, "node-name": "src"}, share_rw=True)
    blk.pwrite(0, pattern(7, SIZE))
    tgt, rule = counting_target()
    job = pyrep.jobs.backup("src", tgt, sync="none")
    blk.pwrite(0, pattern(7, CS), flags=pyrep.constants.REQ_WRITE_UNCHANGED)
    assert rule.seen == 0
    blk.pwrite(CS * 5 + 1, b"q")
    assert rule.seen == 1 and tgt.pread(5 * CS, CS) == pattern(7)
    job.cancel(sync=True)


def test_concurrent_writers_and_overlay_readers(tmp_path):
    """Replication's secondary: readers through active -> hidden (target) -> secondary disk
    (source) see the checkpoint content of every cluster while writes hit the source."""
    nclusters = 32
    size = nclusters * CS
    opts = raw_file(tmp_path, "sec.raw", size=size, fill=lambda i: pattern(i))
    opts["node-name"] = "secondary"
    sec = pyrep.open_backend(opts, share_rw=True)
    pyrep.blockdev_add({"driver": "memory", "node-name": "hidden", "backing": "secondary"})
    active = pyrep.open_backend({"driver": "memory", "node-name": "active", "backing": "hidden"}, share_rw=True)
    job = pyrep.jobs.backup("secondary", "hidden", sync="none")
    stop = threading.Event()
    errors = []
    reads = [0, 0, 0]

    def writer(seed):
        rng = random.Random(seed)
        for _ in range(150):
            c = rng.randrange(nclusters)
            if rng.random() < 0.5:
                sec.pwrite(c * CS, pattern(100 + seed, CS))
            else:
                sec.pwrite(c * CS + rng.randrange(CS // 2), pattern(150 + seed, rng.randrange(1, CS // 2)))

    def reader(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            c = rng.randrange(nclusters)
            n = rng.randrange(1, 4)
            n = min(n, nclusters - c)
            data = active.pread(c * CS, n * CS)
            for k in range(n):
                if data[k * CS:(k + 1) * CS] != pattern(c + k):
                    errors.append((c + k, set(data[k * CS:(k + 1) * CS])))
            reads[seed - 10] += 1

    readers = [spawn(reader, 10 + i) for i in range(3)]
    try:
        wait_until(lambda: min(reads) > 0, what="the readers to be reading")
        at_start = list(reads)
        run_in_threads(writer, [(i,) for i in range(3)])          # 450 writes while they read
        assert all(r > s for r, s in zip(reads, at_start)), "no read overlapped the writes"
    finally:
        stop.set()
        for r in readers:
            r.join()
    assert not errors, errors[:5]
    assert 0 < job.clusters_copied <= nclusters
    for c in range(nclusters):
        assert active.pread(c * CS, CS) == pattern(c)
    job.cancel(sync=True)


def _snapshot_source(tmp_path, name):
    opts = raw_file(tmp_path, name, fill=lambda i: pattern(i * 7))
    opts["node-name"] = "src"
    return pyrep.open_backend(opts, share_rw=True)


def test_full_backup_is_point_in_time_with_concurrent_writes(tmp_path):
    blk = _snapshot_source(tmp_path, "full.raw")
    before = b"".join(pattern(i * 7) for i in range(SIZE // CS))
    topts = raw_file(tmp_path, "full-tgt.raw")
    topts["node-name"] = "tgt-raw"
    pyrep.blockdev_add({"driver": "blkdebug", "node-name": "tgt", "file": topts})
    held = pyrep.inject_error("tgt", op="write", errno=None, hold=True, once=True, offset=SIZE // 2, length=CS)
    done = []
    job = pyrep.jobs.backup("src", "tgt", sync="full", cluster_size=CS, on_complete=done.append)
    assert held.wait_held()                             # the job is halfway: the guest writes now
    rng = random.Random(3)
    # copied clusters, and ones still to copy; not those of the held batch (up to 1 MiB from the held
    # cluster: a guest write there rightly waits for the batch's copy)
    for i in range(100):
        lo, hi = (0, SIZE // 2 - 5000) if i % 2 else (SIZE // 2 + (1 << 20), SIZE - 5000)
        blk.pwrite(rng.randrange(lo, hi), os.urandom(5000))
    held.release()
    deadline = time.monotonic() + 60
    while job.status != "concluded":                    # and goes on writing while the job ends
        assert time.monotonic() < deadline, f"the backup did not end ({job.progress})"
        blk.pwrite(rng.randrange(SIZE - 5000), os.urandom(5000))
    assert job.wait(10) and job.error is None and not job.cancelled
    assert done == [job]
    assert job.progress == (SIZE, SIZE)
    assert file_bytes(topts) == before
    late = []
    job.add_callback(late.append)
    assert late == [job]


def test_top_backup_copies_only_the_top_layer(tmp_path):
    base = raw_file(tmp_path, "base.raw", fill=lambda i: pattern(i))
    base["node-name"] = "base"
    pyrep.blockdev_add(base)
    top = pyrep.open_backend({"driver": "memory", "node-name": "top", "backing": "base"}, share_rw=True)
    written = {1, 5, 6, 40}
    for c in written:
        top.pwrite(c * CS, pattern(200 + c))
    tgt = pyrep.blockdev_add({"driver": "memory", "size": SIZE, "node-name": "tgt"})
    job = pyrep.jobs.backup("top", "tgt", sync="top")
    assert job.wait(10) and job.error is None
    for c in range(SIZE // CS):
        assert tgt.pread(c * CS, CS) == (pattern(200 + c) if c in written else bytes(CS)), c
    assert job.clusters_copied == len(written)


def test_cow_error_report_ends_job_guest_write_proceeds():
    blk = pyrep.open_backend({"driver": "memory", "size": SIZE, "node-name": "src"}, share_rw=True)
    blk.pwrite(0, pattern(1, SIZE))
    counting_target()
    seen = []
    job = pyrep.jobs.backup("src", "tgt", on_complete=seen.append)
    pyrep.inject_error("tgt", op="write", errno="ENOSPC")
    blk.pwrite(0, b"new")
    assert blk.pread(0, 3) == b"new"
    assert job.wait(5)
    assert job.status == "concluded" and isinstance(job.error, BlockError) and not job.cancelled
    assert job.error.errno == errno.ENOSPC
    assert seen == [job]
    assert not blk.node._write_notifiers


def test_cow_error_ignore_skips_cluster():
    blk = pyrep.open_backend({"driver": "memory", "size": SIZE, "node-name": "src"}, share_rw=True)
    blk.pwrite(0, pattern(1, SIZE))
    tgt, _ = counting_target()
    job = pyrep.jobs.backup("src", "tgt", on_error="ignore")
    pyrep.inject_error("tgt", op="write", once=True)
    blk.pwrite(0, b"new")
    blk.pwrite(1, b"again")
    blk.pwrite(CS, b"ok")
    assert job.status == "running" and job.errors_ignored == 1 and job.error is None
    assert tgt.pread(CS, CS) == pattern(1) and tgt.pread(0, CS) == bytes(CS)
    job.cancel(sync=True)


def test_cow_error_ignore_gives_up_only_the_failed_clusters():
    """One write over three clusters: the copy of the first fails (ignored), the second was copied
    before; the third must still be copied, not marked copied without its old data."""
    src = pyrep.blockdev_add({"driver": "blkdebug", "node-name": "src",
                              "file": {"driver": "memory", "size": SIZE, "node-name": "src-mem"}})
    blk = pyrep.open_backend(src, share_rw=True)
    blk.pwrite(0, pattern(1) + pattern(2) + pattern(3))
    tgt, _ = counting_target()
    job = pyrep.jobs.backup("src", "tgt", on_error="ignore")
    blk.pwrite(CS, b"x")                                   # cluster 1 copied now
    pyrep.inject_error("src", op="read", offset=0, length=CS, once=True)
    blk.pwrite(0, b"\xee" * (3 * CS))                      # cluster 0 fails, 2 is still to copy
    assert job.errors_ignored == 1 and job.error is None
    assert tgt.pread(CS, CS) == pattern(2) and tgt.pread(2 * CS, CS) == pattern(3)
    assert tgt.pread(0, CS) == bytes(CS)                   # the one cluster given up
    job.cancel(sync=True)


def test_cow_error_stop_fails_write_and_pauses():
    blk = pyrep.open_backend({"driver": "memory", "size": SIZE, "node-name": "src"}, share_rw=True)
    blk.pwrite(0, pattern(1, SIZE))
    tgt, _ = counting_target()
    job = pyrep.jobs.backup("src", "tgt", on_error="stop")
    pyrep.inject_error("tgt", op="write")
    with pytest.raises(BlockError) as e:
        blk.pwrite(0, b"new")
    assert e.value.errno == errno.EIO
    assert blk.pread(0, 1) == pattern(1, 1)
    assert job.status == "paused" and isinstance(job.io_error, BlockError) and job.io_error.errno == errno.EIO
    pyrep.clear_errors("tgt")
    job.resume()
    assert job.status == "running" and job.io_error is None
    blk.pwrite(0, b"new")
    assert tgt.pread(0, CS) == pattern(1)
    job.cancel(sync=True)


def test_background_error_report_and_stop(tmp_path):
    blk = pyrep.open_backend({"driver": "memory", "size": SIZE, "node-name": "src"}, share_rw=True)
    blk.pwrite(0, pattern(9, SIZE))
    tgt, _ = counting_target()
    pyrep.inject_error("tgt", op="write", offset=2 * CS, length=1)
    job = pyrep.jobs.backup("src", "tgt", sync="full")
    assert job.wait(10) and isinstance(job.error, BlockError) and job.error.errno == errno.EIO
    job = pyrep.jobs.backup("src", "tgt", sync="full", on_error="stop")
    wait_until(lambda: job.io_error is not None, what="the job to meet the error")
    assert job.status == "paused" and job.io_error.errno == errno.EIO
    pyrep.clear_errors("tgt")
    job.resume()
    assert job.wait(10) and job.error is None
    assert tgt.pread(0, SIZE) == pattern(9, SIZE)


def test_pause_resume_cancel_progress(tmp_path):
    blk = pyrep.open_backend({"driver": "memory", "size": SIZE, "node-name": "src"}, share_rw=True)
    blk.pwrite(0, pattern(3, SIZE))
    pyrep.blockdev_add({"driver": "slowtest", "node-name": "tgt", "delay": 0.01,
                        "file": {"driver": "memory", "size": SIZE}})
    job = pyrep.jobs.backup("src", "tgt", sync="full", cluster_size=CS)
    job.pause()
    assert job.status == "paused"
    wait_until(lambda: job.paused, what="the job to reach a pause point")
    p1 = job.progress
    assert stays_false(lambda: job.progress != p1), "a paused job went on copying"
    assert p1[0] < SIZE
    job.resume()
    assert job.status == "running"
    wait_until(lambda: job.progress[0] > p1[0], what="the resumed job to copy")
    # drain stops it at a pause point too
    with pyrep.drained(blk.node):
        assert job.paused
        p2 = job.progress
        assert stays_false(lambda: job.progress != p2), "a job copied inside a drained section"
    job.cancel(sync=True)
    assert job.status == "concluded" and job.cancelled and job.error is None
    assert job.progress[0] < SIZE


def test_registry_ids_and_validation(tmp_path):
    pyrep.blockdev_add({"driver": "memory", "size": SIZE, "node-name": "src"})
    pyrep.blockdev_add({"driver": "memory", "size": SIZE, "node-name": "tgt"})
    pyrep.blockdev_add({"driver": "memory", "size": SIZE // 2, "node-name": "small"})
    job = pyrep.jobs.backup("src", "tgt", job_id="bk")
    assert pyrep.jobs.get("bk") is job and job.id == "bk"
    pyrep.blockdev_add({"driver": "memory", "size": SIZE, "node-name": "other"})
    pyrep.blockdev_add({"driver": "memory", "size": SIZE, "node-name": "other-tgt"})
    with pytest.raises(OptionError, match="already exists"):
        pyrep.jobs.backup("other", "other-tgt", job_id="bk")
    with pytest.raises(pyrep.PermissionConflict):
        pyrep.jobs.backup("src", "tgt")          # backup-source is blocked by the first job
    with pytest.raises(OptionError, match="target node 'small' .* is smaller than source node 'tgt'"):
        pyrep.jobs.backup("tgt", "small")
    with pytest.raises(OptionError, match="bogus"):
        pyrep.jobs.backup("tgt", "src", sync="bogus")
    with pytest.raises(OptionError, match="nope"):
        pyrep.jobs.get("nope")
    assert pyrep.jobs.list() == [job]
    pyrep.close_all()
    assert job.status == "concluded" and job.cancelled
    assert pyrep.jobs.list() == []


@pytest.mark.parametrize("hidden_cluster, copied", [("4K", 4096), ("64K", 65536)])
def test_cow_into_a_memory_overlay_copies_in_its_clusters(tmp_path, hidden_cluster, copied):
    """A memory target is copied in its own clusters (min 4K), straight into buffers it lends
    (no intermediate copy); a qcow2-like target keeps QEMU's 64K minimum (next test)."""
    sopts = raw_file(tmp_path, "src.raw", fill=lambda i: os.urandom(CS))
    old = file_bytes(sopts)
    src = pyrep.blockdev_add(dict(sopts, **{"node-name": "src"}))
    hidden = pyrep.blockdev_add({"driver": "memory", "node-name": "hid", "backing": "src",
                                 "cluster-size": hidden_cluster})
    blk = pyrep.open_backend(src, share_rw=True)
    job = pyrep.jobs.backup(src, hidden, sync="none")
    assert job.cluster_size == copied
    blk.pwrite(8192 + 100, b"new data")                 # one small write: one cluster copied
    assert job.bytes_copied == copied and job.clusters_copied == 1
    assert hidden.pread(0, SIZE) == old                 # the hidden disk still shows the old disk
    assert file_bytes(sopts)[8192 + 100:8192 + 108] == b"new data"
    blk.pwrite(8192, b"x" * 4096)                       # same cluster again: no second copy
    assert job.bytes_copied == copied
    job.do_checkpoint()
    hidden.make_empty()
    blk.pwrite(8192, b"y" * 4096)                       # a new interval: copied again, current data
    assert job.bytes_copied == 2 * copied
    assert hidden.pread(8192, 8) == b"x" * 8
    job.cancel(sync=True)


def test_cow_into_a_file_target_uses_64k_clusters(tmp_path):
    src = pyrep.blockdev_add(dict(raw_file(tmp_path, "src.raw", fill=lambda i: pattern(i)), **{"node-name": "src"}))
    topts = raw_file(tmp_path, "tgt.raw")
    tgt = pyrep.blockdev_add(dict(topts, **{"node-name": "tgt"}))
    blk = pyrep.open_backend(src, share_rw=True)
    job = pyrep.jobs.backup(src, tgt, sync="none")
    assert job.cluster_size == 65536
    blk.pwrite(100, b"z")
    assert job.bytes_copied == 65536
    job.cancel(sync=True)
    tgt.flush()
    assert file_bytes(topts)[:65536] == pattern(0)


def test_writes_racing_for_one_cluster_copy_it_once_and_keep_old_data(tmp_path):
    """Many threads write into the same clusters at once: the C claim makes one of them copy
    each cluster, the others wait in the Python notifier; the target holds exactly the old data."""
    sopts = raw_file(tmp_path, "src.raw", fill=lambda i: os.urandom(CS))
    old = file_bytes(sopts)
    src = pyrep.blockdev_add(dict(sopts, **{"node-name": "src"}))
    hidden = pyrep.blockdev_add({"driver": "memory", "node-name": "hid", "backing": "src", "cluster-size": "4K"})
    blk = pyrep.open_backend(src, share_rw=True)
    job = pyrep.jobs.backup(src, hidden, sync="none")
    nclusters = 64

    def writer(seed):
        rng = random.Random(seed)
        for _ in range(400):
            c = rng.randrange(nclusters)
            blk.pwrite(c * 4096 + rng.randrange(0, 4000), bytes([seed + 1]) * 64)
    run_in_threads(writer, [(i,) for i in range(6)])
    assert job.clusters_copied == nclusters and job.bytes_copied == nclusters * 4096
    assert hidden.pread(0, SIZE) == old
    job.cancel(sync=True)


def test_cow_into_a_memory_target_the_c_path_cannot_take_directly(tmp_path):
    """A memory target whose node needs its Python write path (detect-zeroes) is written the ordinary
    way, not through its lent buffers; the old data, zero clusters included, still lands in it."""
    src = pyrep.blockdev_add(dict(raw_file(tmp_path, "src.raw", fill=lambda i: pattern(i) if i % 2 else bytes(CS)),
                                  **{"node-name": "src"}))
    old = b"".join(pattern(i) if i % 2 else bytes(CS) for i in range(SIZE // CS))
    hidden = pyrep.blockdev_add({"driver": "memory", "node-name": "hid", "backing": "src", "cluster-size": "4K",
                                 "detect-zeroes": "on"})
    blk = pyrep.open_backend(src, share_rw=True)
    job = pyrep.jobs.backup(src, hidden, sync="none")
    for c in range(4):
        blk.pwrite(c * CS + 512, b"new" * 100)
    assert job.bytes_copied == 4 * 4096
    assert hidden.pread(0, SIZE) == old
    assert pyrep.is_allocated(hidden, 0, 4096)[0] and pyrep.is_allocated(hidden, CS, 4096)[0]
    job.cancel(sync=True)
