"""Commit (active and non-active) and mirror jobs."""
import errno
import random
import threading
import time

import pytest

import pyrep
import pyrep.jobs
from pyrep.errors import BlockError, OptionError

from helpers.jobs import CS, SIZE
from helpers.threads import spawn
from helpers.wait import wait_until


def raw_opts(tmp_path, name, fill=None, size=SIZE):
    path = tmp_path / name
    with open(path, "wb") as f:
        f.write(fill if fill is not None else b"")
        f.truncate(size)
    return {"driver": "raw", "file": {"driver": "file", "filename": str(path)}}, path


def wait_status(job, status, timeout=10):
    wait_until(lambda: job.status == status, timeout, f"job {job.id} to be {status} (it is {job.status})")


def make_chain(tmp_path, slow=0.0, read_only_base=True):
    """base (raw file, read-only) <- mid (memory) <- top (memory) with a backend 'disk' on top."""
    rng = random.Random(5)
    base_data = bytearray(rng.randbytes(SIZE))
    opts, path = raw_opts(tmp_path, "base.raw", fill=bytes(base_data))
    if slow:
        opts = {"driver": "slowtest", "delay": slow, "file": opts}
    opts["node-name"] = "base"
    opts["read-only"] = read_only_base
    pyrep.blockdev_add(opts)
    pyrep.blockdev_add({"driver": "memory", "node-name": "mid", "backing": "base"})
    model = bytearray(base_data)
    mid = pyrep.lookup("mid")
    for c in (1, 2, 9, 30):
        d = rng.randbytes(CS)
        mid.pwrite(c * CS, d)
        model[c * CS:(c + 1) * CS] = d
    blk = pyrep.open_backend({"driver": "memory", "node-name": "top", "backing": "mid"}, name="disk")
    for c in (2, 3, 31, 63):
        d = rng.randbytes(1000)
        blk.pwrite(c * CS + 17, d)
        model[c * CS + 17:c * CS + 1017] = d
    return blk, model, path


def test_active_commit_with_concurrent_writes(tmp_path):
    blk, model, path = make_chain(tmp_path, slow=0.003)
    done = []
    job = pyrep.jobs.commit("top", job_id="failover", on_complete=done.append)
    job.pause()          # the first guest writes land while the commit has provably not converged
    assert job.type == "commit" and pyrep.jobs.get("failover") is job
    assert not pyrep.lookup("base").read_only
    rng = random.Random(7)
    nwrites = 0
    for _ in range(10):
        off = rng.randrange(SIZE - 3000)
        d = rng.randbytes(rng.randrange(1, 3000))
        blk.pwrite(off, d)
        model[off:off + len(d)] = d
        nwrites += 1
    assert job.status != "concluded"
    job.resume()
    deadline = time.monotonic() + 20
    while job.status != "concluded" and time.monotonic() < deadline:
        off = rng.randrange(SIZE - 3000)
        d = rng.randbytes(rng.randrange(1, 3000))
        blk.pwrite(off, d)
        model[off:off + len(d)] = d
        nwrites += 1
        time.sleep(0.001)                       # pacing: the guest writes, the commit converges
    assert job.wait(10), "the commit did not converge"
    for _ in range(20):      # writes after the switch land in the base
        off = rng.randrange(SIZE - 3000)
        d = rng.randbytes(3000)
        blk.pwrite(off, d)
        model[off:off + len(d)] = d
    assert job.error is None and job.pivoted and done == [job]
    assert nwrites > 5
    assert blk.node is pyrep.lookup("base")
    assert "top" not in pyrep.nodes() and "mid" not in pyrep.nodes()
    assert not pyrep.lookup("base").read_only
    assert blk.pread(0, SIZE) == bytes(model)
    cur, total = job.progress
    assert cur == total and cur > 0
    blk.flush()
    pyrep.close_all()
    assert path.read_bytes() == bytes(model)


def test_commit_into_intermediate_and_non_active(tmp_path):
    blk, model, _ = make_chain(tmp_path)
    # commit top into mid only (active commit, base = mid)
    job = pyrep.jobs.commit("top", base="mid")
    assert job.wait(10) and job.error is None
    assert blk.node is pyrep.lookup("mid") and "top" not in pyrep.nodes()
    assert blk.pread(0, SIZE) == bytes(model)
    # non-active: a new overlay on mid, then commit mid (now below it) into base
    blk.close()
    blk = pyrep.open_backend({"driver": "memory", "node-name": "ov", "backing": "mid"}, name="disk2")
    blk.pwrite(5, b"overlay")
    model[5:12] = b"overlay"
    job = pyrep.jobs.commit("mid", base="base")
    assert job.wait(10) and job.error is None
    ov = pyrep.lookup("ov")
    assert ov.backing is pyrep.lookup("base") and "mid" not in pyrep.nodes()
    assert blk.pread(0, SIZE) == bytes(model)


def test_commit_error_leaves_graph_unchanged(tmp_path):
    blk, model, _ = make_chain(tmp_path)
    raw_name = pyrep.lookup("base").name
    # put a blkdebug between mid and the raw base: rebuild the chain with blkdebug as base
    pyrep.close_all()
    rng = random.Random(5)
    before = bytearray(rng.randbytes(SIZE))
    opts, path = raw_opts(tmp_path, "base2.raw", fill=bytes(before))
    pyrep.blockdev_add({"driver": "blkdebug", "node-name": "base", "read-only": True, "file": opts})
    pyrep.blockdev_add({"driver": "memory", "node-name": "mid", "backing": "base"})
    blk = pyrep.open_backend({"driver": "memory", "node-name": "top", "backing": "mid"}, name="disk")
    blk.pwrite(3 * CS, b"t" * CS)
    before[3 * CS:4 * CS] = b"t" * CS
    pyrep.lookup("mid").pwrite(8 * CS, b"m" * CS)
    before[8 * CS:9 * CS] = b"m" * CS
    pyrep.inject_error("base", op="write", offset=8 * CS, length=1)
    seen = []
    job = pyrep.jobs.commit("top", on_complete=seen.append)
    assert job.wait(10)
    assert isinstance(job.error, BlockError) and job.error.errno == errno.EIO
    assert not job.pivoted and seen == [job]
    top = pyrep.lookup("top")
    assert blk.node is top and top.backing is pyrep.lookup("mid") and pyrep.lookup("mid").backing.name == raw_name
    assert pyrep.lookup("base").read_only
    assert all(not isinstance(c.parent, pyrep.jobs.Job) for n in pyrep.nodes().values() for c in n.parents)
    assert not top._write_notifiers
    assert blk.pread(0, SIZE) == before
    blk.pwrite(0, b"still writable")
    assert path.read_bytes()[8 * CS:9 * CS] != b"m" * CS         # the failed cluster is not in the base


def test_commit_validation(tmp_path):
    blk, _, _ = make_chain(tmp_path)
    with pytest.raises(OptionError, match="no backing"):
        pyrep.jobs.commit("base")
    pyrep.blockdev_add({"driver": "memory", "size": SIZE, "node-name": "other"})
    with pytest.raises(OptionError, match="not below"):
        pyrep.jobs.commit("top", base="other")
    bk = pyrep.jobs.backup("other", "mid")
    with pytest.raises(OptionError, match="cancel that job"):
        pyrep.jobs.commit("top")
    bk.cancel(sync=True)
    assert pyrep.lookup("base").read_only        # a refused commit did not reopen it


def test_commit_ignore_retries_and_stop_resumes(tmp_path):
    rng = random.Random(2)
    want = bytearray(rng.randbytes(SIZE))
    opts, path = raw_opts(tmp_path, "b.raw", fill=bytes(want))
    pyrep.blockdev_add({"driver": "blkdebug", "node-name": "base", "file": opts})
    blk = pyrep.open_backend({"driver": "memory", "node-name": "top", "backing": "base"})
    blk.pwrite(CS, b"a" * CS)
    want[CS:2 * CS] = b"a" * CS
    pyrep.inject_error("base", op="write", once=True)
    job = pyrep.jobs.commit("top", on_error="ignore")
    assert job.wait(10) and job.error is None and job.errors_ignored == 1
    assert blk.pread(0, SIZE) == want and blk.node.name == "base"
    blk.pwrite(CS * 2, b"b" * 10)
    want[2 * CS:2 * CS + 10] = b"b" * 10
    blk.close()
    assert path.read_bytes() == want                # the retried cluster reached the file
    blk = pyrep.open_backend({"driver": "memory", "node-name": "top2", "backing": "base"})
    blk.pwrite(CS * 4, b"c" * 100)
    want[4 * CS:4 * CS + 100] = b"c" * 100
    pyrep.inject_error("base", op="write")
    job = pyrep.jobs.commit("top2", on_error="stop")
    wait_status(job, "paused")
    assert isinstance(job.io_error, BlockError) and job.io_error.errno == errno.EIO
    pyrep.clear_errors("base")
    job.resume()
    assert job.wait(10) and job.error is None and job.pivoted
    assert blk.pread(0, SIZE) == want
    blk.close()
    assert path.read_bytes() == want


def test_mirror_ready_complete_with_writes(tmp_path):
    rng = random.Random(3)
    model = bytearray(rng.randbytes(SIZE))
    src_opts, _ = raw_opts(tmp_path, "src.raw", fill=bytes(model))
    src_opts["node-name"] = "src"
    blk = pyrep.open_backend(src_opts, name="disk")
    tgt_opts, tpath = raw_opts(tmp_path, "tgt.raw")
    tgt_opts = {"driver": "slowtest", "delay": 0.002, "file": tgt_opts, "node-name": "tgt"}
    pyrep.blockdev_add(tgt_opts)
    job = pyrep.jobs.mirror("src", "tgt")
    assert job.type == "mirror"
    with pytest.raises(OptionError, match="not ready"):
        job.complete()
    stop = threading.Event()
    writes = [0]

    def writer():
        while not stop.is_set():
            off = rng.randrange(SIZE - 4096)
            d = rng.randbytes(4096)
            blk.pwrite(off, d)
            model[off:off + 4096] = d
            writes[0] += 1
            time.sleep(0.002)                   # pacing: a guest, not a flood

    t = spawn(writer)
    try:
        wait_status(job, "ready")
        at_ready = writes[0]
        wait_until(lambda: writes[0] > at_ready + 10, what="writes mirrored while ready")
        job.complete()
        assert job.wait(10)
    finally:
        stop.set()
        t.join()
    assert job.error is None and job.pivoted and not job.cancelled
    assert blk.node is pyrep.lookup("tgt")
    assert "src" not in pyrep.nodes()          # not blockdev_add'ed: closed once unused
    assert blk.pread(0, SIZE) == bytes(model)
    cur, total = job.progress
    assert cur == total >= SIZE
    blk.close()
    assert tpath.read_bytes() == bytes(model)          # the target file, read past pyrep


def test_mirror_cancel_after_ready_and_before(tmp_path):
    blk = pyrep.open_backend({"driver": "memory", "size": SIZE, "node-name": "src"}, name="disk")
    blk.pwrite(0, b"s" * SIZE)
    pyrep.blockdev_add({"driver": "memory", "size": SIZE, "node-name": "tgt"})
    job = pyrep.jobs.mirror("src", "tgt")
    wait_status(job, "ready")
    job.pause()
    assert job.status == "paused"
    job.resume()
    assert job.status == "ready"
    job.cancel(sync=True)
    assert job.status == "concluded" and job.cancelled and job.error is None and not job.pivoted
    assert blk.node.name == "src" and not blk.node._write_notifiers and not blk.node._track_users
    pyrep.blockdev_add({"driver": "slowtest", "node-name": "slow", "delay": 0.02,
                        "file": {"driver": "memory", "size": SIZE}})
    job = pyrep.jobs.mirror("src", "slow")
    wait_until(lambda: job.progress[0] > 0, what="the mirror to start copying")
    job.cancel(sync=True)
    assert job.cancelled and job.progress[0] < SIZE and blk.node.name == "src"
    with pytest.raises(OptionError, match="mirror: source and target are the same node 'src'"):
        pyrep.jobs.mirror("src", "src")


def test_replication_like_failover_with_qcow2(tmp_path):
    """secondary (raw) <- hidden (qcow2) <- active (qcow2): backup secondary->hidden while primary writes
    hit the secondary, then failover = cancel the backup and commit active+hidden into the secondary."""
    rng = random.Random(11)
    checkpoint = rng.randbytes(SIZE)
    sec_opts, sec_path = raw_opts(tmp_path, "sec.raw", fill=checkpoint)
    sec_opts["node-name"] = "secondary"
    primary = pyrep.open_backend(sec_opts, name="nbd", share_rw=True)
    for name, backing in (("hidden", "secondary"), ("active", "hidden")):
        path = str(tmp_path / f"{name}.qcow2")
        pyrep.create_image(path, "qcow2", SIZE)
        opts = {"driver": "qcow2", "node-name": name, "file": {"driver": "file", "filename": path},
                "backing": backing}
        if name == "hidden":
            pyrep.blockdev_add(opts)
    guest = pyrep.open_backend(opts, name="guest")
    job = pyrep.jobs.backup("secondary", "hidden", sync="none", job_id="colo-backup")
    model = bytearray(checkpoint)
    for _ in range(40):
        off = rng.randrange(SIZE - 5000)
        primary.pwrite(off, rng.randbytes(5000))          # primary's forwarded write
        off = rng.randrange(SIZE - 3000)
        d = rng.randbytes(3000)
        guest.pwrite(off, d)                              # secondary's own write
        model[off:off + 3000] = d
        if rng.random() < 0.3:
            assert guest.pread(0, SIZE) == bytes(model)
    assert guest.pread(0, SIZE) == bytes(model)
    # the primary dies: what the secondary shows (checkpoint + own writes) must become the disk
    job.cancel(sync=True)
    # the NBD export still holds "write" on the secondary, which the guest's backend does not share:
    # the pivot is refused and the graph stays as it was
    with pytest.raises(pyrep.PermissionConflict):
        pyrep.jobs.commit("active", base="secondary")
    assert pyrep.lookup("secondary").read_only is False and pyrep.jobs.list() == []
    assert guest.node is pyrep.lookup("active") and pyrep.lookup("active").backing is pyrep.lookup("hidden")
    assert guest.pread(0, SIZE) == bytes(model)
    primary.close()                                       # failover: the export is gone
    commit = pyrep.jobs.commit("active", base="secondary")
    assert commit.wait(20) and commit.error is None
    assert guest.node is pyrep.lookup("secondary")
    assert "active" not in pyrep.nodes() and "hidden" not in pyrep.nodes()
    assert guest.pread(0, SIZE) == bytes(model)
    guest.close()
    pyrep.close_all()
    assert sec_path.read_bytes() == bytes(model)


def test_mirror_top_and_wait_all(tmp_path):
    base = pyrep.blockdev_add({"driver": "memory", "size": SIZE, "node-name": "base"})
    base.pwrite(0, b"b" * SIZE)
    blk = pyrep.open_backend({"driver": "memory", "node-name": "top", "backing": "base"}, name="disk")
    blk.pwrite(3 * CS, b"t" * 100)
    # the target is a new overlay on the same base: only the top layer needs copying
    pyrep.blockdev_add({"driver": "memory", "node-name": "tgt", "backing": "base"})
    job = pyrep.jobs.mirror("top", "tgt", sync="top")
    wait_status(job, "ready")
    assert job.progress == (CS, CS)
    job.complete()
    assert pyrep.jobs.wait_all(10) and job.error is None
    assert blk.node.name == "tgt" and blk.pread(0, SIZE) == b"b" * (3 * CS) + b"t" * 100 + b"b" * (SIZE - 3 * CS - 100)


def test_mirror_sync_none_copies_only_new_writes():
    src = pyrep.open_backend({"driver": "memory", "size": "4M", "node-name": "mn_src"}, share_rw=True)
    dst = pyrep.blockdev_add({"driver": "memory", "size": "4M", "node-name": "mn_dst"})
    src.pwrite(0, b"old" * 1000)
    job = pyrep.jobs.mirror(src.node, dst, sync="none")
    src.pwrite(1 << 20, b"new" * 1000)
    wait_until(lambda: job.status == "ready" and job.progress[0] == job.progress[1], 30, "mirror ready, in sync")
    job.complete()
    assert job.wait(30) and job.error is None
    assert src.node is dst                              # pivoted
    assert dst.pread(1 << 20, 3000) == b"new" * 1000    # the write after the start was copied
    assert dst.pread(0, 3000) == bytes(3000)            # what was there before was not
    src.close()
