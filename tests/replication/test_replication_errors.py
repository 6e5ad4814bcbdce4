"""The seven internal error cases of block-replication.md, injected with blkdebug.

1. I/O error on the primary disk          -> reported to the disk's user
2. forwarding a primary write failed      -> replication error (get_error)
3. the backup (copy-before-write) failed  -> replication error
4. I/O error on the secondary disk        -> replication error
5. I/O error on the active disk           -> reported to the disk's user
6. make_empty of active/hidden failed     -> replication error (checkpoint fails)
7. failover failed (commit error)         -> FAILOVER_FAILED; writes to active where allocated, else the disk

Each checks the stage, get_error_all / status and the data.
"""
import errno
import pytest

import pyrep
from pyrep import replication
from pyrep.drivers.quorum import child_errors
from helpers.replication import (M, S_LOCAL, Primary, Secondary, expect_pattern, stage)

SIZE = 16 * M
CL = 65536


def both(tmp_path, kind="raw+memory", sd_debug=None, active_debug=None, hidden_debug=None, local_debug=None,
         link=False):
    s = Secondary(tmp_path, kind, size=SIZE, sd_debug=sd_debug, active_debug=active_debug,
                  hidden_debug=hidden_debug)
    target = S_LOCAL
    if link:
        # the "link" to the secondary disk (an NBD client in production) as a blkdebug node
        pyrep.blockdev_add({"driver": "blkdebug", "node-name": "link", "file": S_LOCAL})
        target = "link"
    p = Primary(tmp_path, kind, size=SIZE, secondary_node=target, local_debug=local_debug)
    replication.start_all("secondary", skip_other_mode=True)
    replication.start_all("primary", skip_other_mode=True)
    return p, s


def test_1_primary_disk_error(tmp_path):
    p, s = both(tmp_path, local_debug="p_dbg")
    pyrep.inject_error("p_dbg", op="read", errno="EIO", offset=0, length=CL)
    with pytest.raises(pyrep.BlockError) as ei:          # fifo: local fails, the replication child never reads
        p.blk.pread(0, 4096)
    assert ei.value.errno == 5
    pyrep.clear_errors("p_dbg")
    pyrep.inject_error("p_dbg", op="write", errno="ENOSPC", offset=0, length=CL)
    p.blk.pwrite(0, b"\x55" * CL)                        # vote-threshold 1: the forward succeeded
    log = child_errors("p_quorum")
    assert any(e["node"] == "p_local" and e["op"] == "write" and e["errno"] == 28 for e in log)
    assert s.local.pread(0, CL) == b"\x55" * CL          # forwarded
    expect_pattern(s.top, 0x11, 0, CL)                   # the secondary still sees the checkpoint
    replication.get_error_all()                          # not a replication error
    assert stage("p_rep") == "running" and stage() == "running"


def test_2_forwarding_error(tmp_path):
    p, s = both(tmp_path, link=True)
    pyrep.inject_error("link", op="write", errno="EIO", offset=0, length=CL)
    p.blk.pwrite(0, b"\x66" * CL)                        # the primary's write succeeds
    p.blk.pwrite(CL, b"\x67" * CL)                       # outside the injected range: forwarded
    assert p.local.pread(0, 4) == b"\x66" * 4
    assert s.local.pread(0, 4) == b"\x11" * 4            # never reached the secondary disk
    assert s.local.pread(CL, 4) == b"\x67" * 4
    with pytest.raises(pyrep.ReplicationError, match="p_rep.*forwarding a write at 0"):
        replication.get_error_all()
    replication.get_error_all(mode="secondary")          # the secondary is fine
    st = {d["node"]: d for d in replication.status()}
    assert st["p_rep"]["stage"] == "running" and "forwarding" in st["p_rep"]["error"]
    assert st["rep"]["error"] is None
    assert replication.stats()["p_rep"]["forward_errors"] == 1
    replication.stop_all(False, mode="primary")
    assert stage("p_rep") == "done"


def test_2_forwarding_error_in_a_batch_fails_no_guest_write(tmp_path):
    # a burst of guest writes arrives as one batch (the NBD server's pwritev_batch): forwarded together,
    # and a write whose forwarding failed is recorded like a single one
    p, s = both(tmp_path, link=True)
    pyrep.inject_error("link", op="write", errno="EIO", offset=CL, length=CL)
    before = replication.stats()["p_rep"]["bytes_forwarded"]
    out = p.blk.pwritev_batch([(0, b"\x61" * CL, 0), (CL, b"\x62" * CL, 0), (2 * CL, b"\x63" * CL, 0)])
    assert out == [None, None, None]                     # the primary's writes all succeed
    assert [p.local.pread(i * CL, 1) for i in range(3)] == [b"\x61", b"\x62", b"\x63"]
    assert [s.local.pread(i * CL, 1) for i in range(3)] == [b"\x61", b"\x11", b"\x63"]
    with pytest.raises(pyrep.ReplicationError, match=f"p_rep.*forwarding a write at {CL}"):
        replication.get_error_all()
    st = replication.stats()["p_rep"]
    assert st["forward_errors"] == 1 and st["bytes_forwarded"] - before == 2 * CL


def test_3_backup_error(tmp_path):
    # a copy-before-write that fails fails the write that caused it (QEMU 7's on-cbw-error=break-guest-write):
    # the secondary's view never changes without its copy
    p, s = both(tmp_path, kind="qcow2", hidden_debug="hidden_dbg")
    pyrep.inject_error("hidden_dbg", op="write", errno="EIO")
    p.blk.pwrite(0, b"\x77" * CL)                        # the primary's own write succeeds...
    assert p.local.pread(0, 4) == b"\x77" * 4
    assert s.local.pread(0, 4) == b"\x11" * 4            # ...the forwarded one is refused on the secondary disk
    expect_pattern(s.top, 0x11, 0, CL)                   # the secondary's view: still the checkpoint
    with pytest.raises(pyrep.ReplicationError, match="rep.*copy-before-write.*EIO"):
        replication.get_error_all(mode="secondary")
    with pytest.raises(pyrep.ReplicationError, match="p_rep.*forwarding a write at 0"):
        replication.get_error_all(mode="primary")
    assert stage() == "running"
    with pytest.raises(pyrep.BlockError) as ei:          # a direct writer of the secondary disk sees the error
        s.local.pwrite(CL, b"\x78" * 4096)
    assert ei.value.errno == 5 and "hidden" in str(ei.value)
    assert s.local.pread(CL, 4) == b"\x11" * 4
    pyrep.clear_errors("hidden_dbg")
    s.local.pwrite(CL, b"\x78" * 4096)                   # the copy works again: so does the write
    expect_pattern(s.top, 0x11, 0, 2 * CL)
    assert [j.type for j in pyrep.jobs.list()] == ["backup"]     # the job kept running
    replication.do_checkpoint_all(mode="secondary")
    with pytest.raises(pyrep.ReplicationError, match="copy-before-write"):
        replication.get_error_all(mode="secondary")      # the error stays until replication stops
    replication.stop_all(False)
    assert stage() == "done" and not pyrep.lookup("top").blockers


def test_4_secondary_disk_error(tmp_path):
    p, s = both(tmp_path, sd_debug="sd_dbg")
    # a write error on the secondary disk: the primary's forward fails
    pyrep.inject_error("sd_dbg", op="write", errno="EIO", offset=0, length=CL)
    p.blk.pwrite(0, b"\x88" * CL)
    assert p.local.pread(0, 4) == b"\x88" * 4
    assert s.local.pread(0, 4) == b"\x11" * 4
    expect_pattern(s.top, 0x11, 0, CL)
    with pytest.raises(pyrep.ReplicationError, match="p_rep"):
        replication.get_error_all()
    pyrep.clear_errors("sd_dbg")
    # a read error on the secondary disk: the secondary's reader sees it, and the copy-before-write
    # of the next primary write fails -> the secondary reports a replication error
    pyrep.inject_error("sd_dbg", op="read", errno="EIO", offset=2 * CL, length=CL)
    with pytest.raises(pyrep.BlockError) as e:
        s.top.pread(2 * CL, 4096)
    assert e.value.errno == errno.EIO
    p.blk.pwrite(2 * CL, b"\x89" * CL)
    with pytest.raises(pyrep.ReplicationError, match="rep.*copy-before-write"):
        replication.get_error_all(mode="secondary")
    assert stage() == "running"
    pyrep.clear_errors("sd_dbg")
    assert s.local.pread(2 * CL, 4) == b"\x11" * 4       # refused: its old data could not be copied
    expect_pattern(s.top, 0x11, 2 * CL, CL)


def test_5_active_disk_error(tmp_path):
    p, s = both(tmp_path, kind="qcow2", active_debug="active_dbg")
    pyrep.inject_error("active_dbg", op="write", errno="ENOSPC")
    with pytest.raises(pyrep.BlockError) as ei:
        s.top.pwrite(0, b"\x99" * CL)
    assert ei.value.errno == 28
    pyrep.clear_errors("active_dbg")
    s.top.pwrite(CL, b"\x9a" * CL)
    pyrep.inject_error("active_dbg", op="read", errno="EIO")
    with pytest.raises(pyrep.BlockError) as e:
        s.top.pread(CL, 4096)
    assert e.value.errno == errno.EIO
    pyrep.clear_errors("active_dbg")
    replication.get_error_all()                          # reported to the user, not a replication error
    assert stage() == "running"
    assert s.top.pread(CL, 4) == b"\x9a" * 4
    assert s.local.pread(CL, 4) == b"\x11" * 4


def test_6_make_empty_error(tmp_path):
    p, s = both(tmp_path, kind="qcow2", active_debug="active_dbg")
    s.top.pwrite(0, b"\xaa" * CL)
    p.blk.pwrite(CL, b"\xab" * CL)
    pyrep.inject_error("active_dbg", op="write", errno="EIO")
    with pytest.raises(pyrep.ReplicationError, match="active disk 'active' empty"):
        replication.do_checkpoint_all()
    with pytest.raises(pyrep.ReplicationError, match="empty"):
        replication.get_error_all()
    assert stage() == "running"
    assert s.local.pread(CL, 4) == b"\xab" * 4           # the secondary disk holds the primary's data
    assert s.local.pread(0, 4) == b"\x11" * 4
    pyrep.clear_errors("active_dbg")


def test_7_failover_failed(tmp_path):
    p, s = both(tmp_path, sd_debug="sd_dbg")
    p.blk.pwrite(0, b"\xbb" * CL)                        # copied before write into hidden: 0x11
    s.top.pwrite(2 * CL, b"\xbc" * CL)                   # active
    # the primary dies; the commit cannot write the secondary disk
    pyrep.inject_error("sd_dbg", op="write", errno="EIO", offset=0, length=4 * CL)
    with pytest.raises(pyrep.ReplicationError, match="failover failed"):
        replication.stop_all(True, wait=True, timeout=30, mode="secondary")
    assert stage() == "failover_failed"
    with pytest.raises(pyrep.ReplicationError, match="failover failed"):
        replication.get_error_all(mode="secondary")
    assert {d["node"]: d["stage"] for d in replication.status()}["rep"] == "failover_failed"
    # the graph is unchanged: the secondary still reads the checkpoint + its writes
    assert pyrep.lookup("rep").file.name == "active"
    expect_pattern(s.top, 0x11, 0, CL)
    expect_pattern(s.top, 0xbc, 2 * CL, CL)
    # writes: allocated above the secondary disk -> active; else straight to the secondary disk
    s.top.pwrite(2 * CL, b"\xbd" * CL)                   # active holds it
    s.top.pwrite(0, b"\xbe" * CL)                        # hidden holds it -> active
    assert s.local.pread(2 * CL, 4) == b"\x11" * 4
    with pytest.raises(pyrep.BlockError) as e:           # not allocated above: to the (failing) disk
        s.top.pwrite(3 * CL, b"\xbf" * CL)
    assert e.value.errno == errno.EIO
    pyrep.clear_errors("sd_dbg")
    s.top.pwrite(3 * CL, b"\xbf" * CL)
    assert s.local.pread(3 * CL, 4) == b"\xbf" * 4
    # a write spanning both is split
    s.top.pwrite(2 * CL + CL // 2, b"\xc0" * CL)
    assert s.local.pread(3 * CL, CL // 2) == b"\xc0" * (CL // 2)
    assert s.local.pread(3 * CL + CL // 2, 4) == b"\xbf" * 4
    assert s.top.pread(2 * CL, CL) == b"\xbd" * (CL // 2) + b"\xc0" * (CL // 2)
    assert s.top.pread(0, 4) == b"\xbe" * 4
    # replication calls on a failed failover are refused
    with pytest.raises(pyrep.ReplicationError):
        replication.stop_all(True, mode="secondary")
