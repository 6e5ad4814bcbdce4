"""Every scenario of QEMU's tests/unit/test-replication.c, on 64 MiB images.

Primary: read/write before start fail; start; stop; checkpoint; get_error.
Secondary: read/write before start fail; start with copy-before-write preserving
old data; stop with failover committing active and hidden; continuous
replication; checkpoint; get_error. Parametrized over the kinds of
helpers.replication (qcow2 images made by qemu-img, and memory/raw variants).
"""
import pytest

import pyrep
from pyrep import replication
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
    with pytest.raises(pyrep.BlockError):      # the primary never serves reads
        blk.pread(0, 4096)
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
    blk.pwrite(0, b"\x00" * HALF)               # forwarded
    with pytest.raises(pyrep.BlockError):
        blk.pread(0, HALF)
    assert pyrep.lookup("p_local").pread(0, 16) == b"\x00" * 16
    assert replication.stats()["p_rep"]["bytes_forwarded"] == HALF
    replication.stop_all(False)
    assert stage("p_rep") == "done"


@pytest.mark.parametrize("kind", ["qcow2", "memory"])
def test_primary_stop(tmp_path, kind):
    primary_blk(tmp_path, kind)
    replication.start_all("primary")
    replication.stop_all(True)                  # failover on a primary: just stop
    assert replication.status() == [{"node": "p_rep", "mode": "primary", "stage": "done", "error": None}]


@pytest.mark.parametrize("kind", ["qcow2", "memory"])
def test_primary_do_checkpoint(tmp_path, kind):
    primary_blk(tmp_path, kind)
    with pytest.raises(pyrep.ReplicationError):  # not running
        replication.do_checkpoint_all()
    replication.start_all("primary")
    replication.do_checkpoint_all()
    replication.stop_all(False)


@pytest.mark.parametrize("kind", ["qcow2", "memory"])
def test_primary_get_error_all(tmp_path, kind):
    primary_blk(tmp_path, kind)
    with pytest.raises(pyrep.ReplicationError, match="not running"):
        replication.get_error_all()
    replication.start_all("primary")
    replication.get_error_all()
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
    replication.start_all("primary")
    replication.do_checkpoint_all()
    replication.stop_all(True)
    replication.start_all("secondary")
    replication.get_error_all()
    replication.stop_all(False)
    assert stage() == "done"
    s.top.pwrite(0, b"\x44" * 65536)                # writes now land on the secondary disk
    assert s.local.pread(0, 4) == b"\x44" * 4


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
    replication.get_error_all()
    assert replication.status() == [{"node": "rep", "mode": "secondary", "stage": "running", "error": None}]
    replication.stop_all(False)
