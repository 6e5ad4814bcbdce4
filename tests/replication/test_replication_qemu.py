"""Every scenario of QEMU's tests/unit/test-replication.c, on 64 MiB images.

Primary: read/write before start fail; start; stop; checkpoint; get_error.
Secondary: read/write before start fail; start with copy-before-write preserving
old data; stop with failover committing active and hidden; continuous
replication; checkpoint; get_error. Parametrized over the kinds of
helpers.replication (qcow2 images made by qemu-img, and memory/raw variants).
"""
import errno

import pytest

import pyrep
from pyrep import replication

from helpers.referees import qimg
from helpers.replication import (IMG_SIZE, KINDS, S_LOCAL_BLK, Secondary, disk_opts, expect_pattern, need_commit, stage)

HALF = IMG_SIZE // 2


# ------------------------------------------------------------------ primary

def primary_blk(tmp_path, kind):
    fmt = "memory" if kind == "memory" else "qcow2"
    local = disk_opts(tmp_path, "p_local", fmt)
    return pyrep.open_backend({"driver": "replication", "mode": "primary", "node-name": "p_rep", "file": local},
                              name="primary")


@pytest.mark.parametrize("kind", ["qcow2", "memory"])
def test_primary_read(tmp_path, kind):
    blk = primary_blk(tmp_path, kind)
    with pytest.raises(pyrep.BlockError) as ei:
        blk.pread(0, IMG_SIZE)
    assert ei.value.errno == 5
    replication.start_all("primary")
    with pytest.raises(pyrep.BlockError, match="the primary side never serves reads") as ei:
        blk.pread(0, 4096)
    assert ei.value.errno == errno.EIO
    replication.stop_all(False)


@pytest.mark.parametrize("kind", ["qcow2", "memory"])
def test_primary_write(tmp_path, kind):
    blk = primary_blk(tmp_path, kind)
    with pytest.raises(pyrep.BlockError) as ei:
        blk.pwrite(0, b"\x00" * 65536)
    assert ei.value.errno == 5


@pytest.mark.parametrize("kind", ["qcow2", "memory"])
def test_primary_start(tmp_path, kind):
    blk = primary_blk(tmp_path, kind)
    replication.start_all("primary")
    assert stage("p_rep") == "running"
    blk.pwrite(0, b"\x5a" * HALF)               # forwarded
    with pytest.raises(pyrep.BlockError) as ei:
        blk.pread(0, HALF)
    assert ei.value.errno == errno.EIO
    expect_pattern(pyrep.lookup("p_local"), 0x5a, 0, HALF)
    expect_pattern(pyrep.lookup("p_local"), 0, HALF, HALF)
    st = replication.stats()["p_rep"]
    assert st["bytes_forwarded"] == HALF and st["forward_errors"] == 0
    replication.stop_all(False)
    assert stage("p_rep") == "done"


@pytest.mark.parametrize("kind", ["qcow2", "memory"])
def test_primary_stop(tmp_path, kind):
    primary_blk(tmp_path, kind)
    replication.start_all("primary")
    assert stage("p_rep") == "running"
    replication.stop_all(True)                  # failover on a primary: just stop
    assert replication.status() == [{"node": "p_rep", "mode": "primary", "stage": "done", "error": None}]
    assert pyrep.jobs.list() == [] and replication.stats()["p_rep"]["failover_time"] is None


@pytest.mark.parametrize("kind", ["qcow2", "memory"])
def test_primary_do_checkpoint(tmp_path, kind):
    primary_blk(tmp_path, kind)
    with pytest.raises(pyrep.ReplicationError, match="not running"):
        replication.do_checkpoint_all()
    replication.start_all("primary")
    replication.do_checkpoint_all()             # a primary has nothing to checkpoint: no copy, no job
    st = replication.stats()["p_rep"]
    assert st["checkpoints"] == 0 and st["bytes_copied_before_write"] == 0 and st["stage"] == "running"
    assert pyrep.jobs.list() == []
    replication.stop_all(False)
    assert stage("p_rep") == "done"


@pytest.mark.parametrize("kind", ["qcow2", "memory"])
def test_primary_get_error_all(tmp_path, kind):
    primary_blk(tmp_path, kind)
    with pytest.raises(pyrep.ReplicationError, match="not running"):
        replication.get_error_all()
    replication.start_all("primary")
    assert replication.get_error_all() is None
    assert replication.status()[0]["error"] is None
    replication.stop_all(False)


def test_start_wrong_mode_and_twice(tmp_path):
    primary_blk(tmp_path, "memory")
    # QEMU's replication_start_all: a node of the other mode that was not failed over is an error naming both
    with pytest.raises(pyrep.ReplicationError, match="'p_rep' is a primary node.*cannot start in secondary mode"):
        replication.start_all("secondary")
    assert stage("p_rep") == "none"
    with pytest.raises(pyrep.ReplicationError, match="mode"):
        replication.start_all("tertiary")
    with pytest.raises(pyrep.ReplicationError, match="cannot start it in secondary mode"):
        pyrep.lookup("p_rep").driver.start("secondary")
    replication.start_all("primary")
    with pytest.raises(pyrep.ReplicationError, match="already running"):
        replication.start_all("primary")


# ------------------------------------------------------------------ secondary

@pytest.mark.parametrize("kind", KINDS)
def test_secondary_read(tmp_path, kind):
    s = Secondary(tmp_path, kind, fill=None)
    with pytest.raises(pyrep.BlockError) as ei:
        s.top.pread(0, IMG_SIZE)
    assert ei.value.errno == 5


@pytest.mark.parametrize("kind", KINDS)
def test_secondary_write(tmp_path, kind):
    s = Secondary(tmp_path, kind, fill=None)
    with pytest.raises(pyrep.BlockError) as ei:
        s.top.pwrite(0, b"\x00" * 65536)
    assert ei.value.errno == 5


@pytest.mark.parametrize("kind", KINDS)
def test_secondary_start(tmp_path, kind):
    s = Secondary(tmp_path, kind)
    replication.start_all("secondary")
    assert stage() == "running"
    assert pyrep.lookup("hidden").read_only is False
    assert pyrep.lookup(S_LOCAL_BLK).read_only is False
    top = pyrep.lookup("top")
    with pytest.raises(pyrep.PermissionConflict):
        top.check_op("commit-source")             # ops on top blocked, I/O allowed
    # read from the secondary disk
    expect_pattern(s.top, 0x11, 0, IMG_SIZE)
    # the primary writes 0x22 to the secondary disk's second half
    s.local.pwrite(HALF, b"\x22" * HALF)
    expect_pattern(s.local, 0x22, HALF, HALF)
    # copy-before-write kept the old data for the secondary
    expect_pattern(s.top, 0x11, HALF, HALF)
    # the secondary writes 0x33 to its first half (the active disk)
    s.top.pwrite(0, b"\x33" * HALF)
    expect_pattern(s.top, 0x33, 0, HALF)
    expect_pattern(s.local, 0x11, 0, HALF)
    replication.stop_all(False)
    assert stage() == "done"
    assert not top.blockers
    assert pyrep.lookup("hidden").read_only is True
    assert pyrep.jobs.list() == []


@pytest.mark.parametrize("kind", KINDS)
def test_secondary_stop(tmp_path, kind):
    need_commit()
    s = Secondary(tmp_path, kind)
    replication.start_all("secondary")
    s.local.pwrite(0, b"\x22" * HALF)                # primary write
    expect_pattern(s.top, 0x11, 0, HALF)
    s.top.pwrite(HALF, b"\x33" * HALF)              # secondary write
    replication.stop_all(True, wait=True)             # failover: commit active and hidden
    assert stage() == "done"
    assert pyrep.lookup("rep").file.name == "s_local"
    assert "active" not in pyrep.nodes() and "hidden" not in pyrep.nodes()
    # hidden held 0x11 for the first half: committed into the secondary disk
    expect_pattern(s.top, 0x11, 0, HALF)
    expect_pattern(s.top, 0x33, HALF, HALF)
    expect_pattern(s.local, 0x11, 0, HALF)
    expect_pattern(s.local, 0x33, HALF, HALF)
    assert replication.stats()["rep"]["failover_time"] is not None
    assert pyrep.jobs.list() == []
    if kind != "memory":                        # the disk image, judged by qemu-img
        fmt = "raw" if kind.startswith("raw") else "qcow2"
        path = pyrep.lookup("s_local").file.filename
        pyrep.close_all()
        model = tmp_path / "model.raw"
        model.write_bytes(b"\x11" * HALF + b"\x33" * HALF)
        qimg("compare", "-f", fmt, "-F", "raw", path, model)


@pytest.mark.parametrize("kind", KINDS)
def test_secondary_continuous_replication(tmp_path, kind):
    need_commit()
    s = Secondary(tmp_path, kind)
    replication.start_all("secondary")
    s.local.pwrite(0, b"\x22" * HALF)
    expect_pattern(s.top, 0x11, 0, HALF)
    s.top.pwrite(HALF, b"\x33" * HALF)
    replication.stop_all(True)
    replication.wait_failover(30)
    assert stage() == "done"
    # promoted: every replication call is ignored, in any mode (QEMU's test calls exactly these)
    before = replication.stats()["rep"]
    replication.start_all("primary")
    replication.do_checkpoint_all()
    replication.stop_all(True)
    replication.start_all("secondary")
    assert replication.get_error_all() is None
    replication.stop_all(False)
    assert stage() == "done" and replication.stats()["rep"] == before and pyrep.jobs.list() == []
    s.top.pwrite(0, b"\x44" * 65536)                # writes now land on the secondary disk
    expect_pattern(s.local, 0x44, 0, 65536)
    expect_pattern(s.local, 0x11, 65536, HALF - 65536)
    expect_pattern(s.local, 0x33, HALF, HALF)


@pytest.mark.parametrize("kind", KINDS)
def test_secondary_do_checkpoint(tmp_path, kind):
    s = Secondary(tmp_path, kind)
    replication.start_all("secondary")
    s.local.pwrite(HALF, b"\x22" * HALF)
    expect_pattern(s.top, 0x11, HALF, HALF)
    s.top.pwrite(0, b"\x33" * 65536)
    replication.do_checkpoint_all()
    # after the checkpoint the secondary sees the primary's disk again
    expect_pattern(s.top, 0x22, HALF, HALF)
    expect_pattern(s.top, 0x11, 0, HALF)
    st = replication.stats()["rep"]
    assert st["checkpoints"] == 2 and len(st["checkpoint_durations"]) == 2     # start + this one
    assert st["bytes_copied_before_write"] >= HALF
    replication.stop_all(False)


@pytest.mark.parametrize("kind", KINDS)
def test_secondary_get_error_all(tmp_path, kind):
    Secondary(tmp_path, kind)
    replication.start_all("secondary")
    assert replication.get_error_all() is None
    assert replication.status() == [{"node": "rep", "mode": "secondary", "stage": "running", "error": None}]
    replication.stop_all(False)
