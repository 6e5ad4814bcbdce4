"""Replication semantics of issue 9: QEMU's replication_*_all, copy-before-write failures that fail the
write, a start that refuses what would make failover fail, and the stage table."""
import pytest

import pyrep
from pyrep import replication
from helpers.replication import (M, S_LOCAL, S_LOCAL_BLK, Primary, Secondary, disk_opts, expect_pattern,
                                 need_commit, stage)

SIZE = 16 * M
CL = 65536


def test_empty_registry_is_not_an_error():
    assert replication.status() == []
    replication.start_all("primary")
    replication.start_all("secondary")
    replication.do_checkpoint_all()
    replication.get_error_all()
    replication.stop_all(True, wait=True)


def test_other_mode_not_failed_over_is_an_error_naming_both_modes(tmp_path):
    Secondary(tmp_path, "memory", size=SIZE)
    Primary(tmp_path, "memory", size=SIZE)
    with pytest.raises(pyrep.ReplicationError, match="'rep' is a secondary node.*cannot start in primary mode"):
        replication.start_all("primary")
    with pytest.raises(pyrep.ReplicationError, match="'p_rep' is a primary node.*cannot start in secondary mode"):
        replication.start_all("secondary")
    assert stage() == stage("p_rep") == "none"          # checked before anything started
    replication.start_all("secondary", skip_other_mode=True)
    replication.start_all("primary", skip_other_mode=True)
    assert stage() == stage("p_rep") == "running"


def test_failed_over_secondary_ignores_every_mode_while_a_primary_still_starts(tmp_path):
    need_commit()
    s = Secondary(tmp_path, "memory", size=SIZE, start=True)
    replication.stop_all(True, wait=True)
    assert stage() == "done"
    # a new primary in this process (the promoted secondary replicates to a new peer)
    pyrep.blockdev_add({"driver": "memory", "size": SIZE, "node-name": "peer"})
    pyrep.open_backend({"driver": "replication", "mode": "primary", "node-name": "p2", "file": "peer"})
    replication.start_all("primary")                     # walks both: the promoted one is ignored
    assert stage("p2") == "running" and stage() == "done"
    replication.do_checkpoint_all()
    replication.stop_all(False)
    assert stage("p2") == "done"
    s.top.pwrite(0, b"\x44" * 4096)
    assert s.local.pread(0, 4) == b"\x44" * 4


# ------------------------------------------------------------ copy-before-write failures

@pytest.mark.parametrize("kind, how", [
    ("qcow2+memory", "source-read"),      # C path, copy straight into the memory hidden disk's buffers
    ("raw+memory", "source-read"),        # C path, 64K clusters
    ("qcow2", "target-write"),            # C path, a serialising write into the qcow2 hidden disk
    ("qcow2", "zero-write"),              # Python notifier: write-zeroes take the slow path
])
def test_failed_copy_fails_the_write_and_the_view_holds(tmp_path, kind, how):
    need_commit()
    debug = {"sd_debug": "sd_dbg"} if how == "source-read" else {"hidden_debug": "hidden_dbg"}
    s = Secondary(tmp_path, kind, size=SIZE, start=True, **debug)
    s.top.pwrite(4 * CL, b"\x33" * CL)                  # the secondary's own write
    if how == "source-read":
        pyrep.inject_error("sd_dbg", op="read", errno="EIO")        # every read of the disk's file
    else:
        pyrep.inject_error("hidden_dbg", op="write", errno="ENOSPC")
    with pytest.raises(pyrep.BlockError) as ei:
        if how == "zero-write":
            s.local.pwrite_zeroes(0, 2 * CL)
        else:
            s.local.pwrite(0, b"\x22" * 2 * CL)
    assert ei.value.errno == (5 if how == "source-read" else 28)
    pyrep.clear_errors("sd_dbg" if how == "source-read" else "hidden_dbg")
    expect_pattern(s.local, 0x11, 0, 2 * CL)            # the write never reached the secondary disk
    expect_pattern(s.top, 0x11, 0, 2 * CL)              # so the view is still the checkpoint
    with pytest.raises(pyrep.ReplicationError, match="'rep'.*copy-before-write"):
        replication.get_error_all()
    assert replication.status()[0]["error"] is not None
    s.local.pwrite(2 * CL, b"\x22" * CL)                 # other clusters copy fine meanwhile
    expect_pattern(s.top, 0x11, 2 * CL, CL)
    # failover commits exactly the view: checkpoint + the secondary's own writes
    replication.stop_all(True, wait=True)
    expect_pattern(s.local, 0x11, 0, 4 * CL)
    expect_pattern(s.local, 0x33, 4 * CL, CL)
    expect_pattern(s.local, 0x11, 5 * CL, CL)


# ------------------------------------------------------------ start refuses a failover that cannot work

def _secondary_graph(tmp_path, **backend_kw):
    sd = pyrep.blockdev_add(disk_opts(tmp_path, S_LOCAL, "qcow2", SIZE))
    pyrep.open_backend(sd, name=S_LOCAL_BLK, **backend_kw)
    hidden = disk_opts(tmp_path, "hidden", "memory", SIZE, backing=S_LOCAL)
    active = disk_opts(tmp_path, "active", "memory", SIZE, backing=hidden)
    return pyrep.open_backend({"driver": "replication", "mode": "secondary", "top-id": "top", "node-name": "rep",
                               "file": active}, name="top")


@pytest.mark.parametrize("backend_kw", [{}, {"read_only": True}])
def test_start_refuses_a_user_that_does_not_share_writes(tmp_path, backend_kw):
    _secondary_graph(tmp_path, **backend_kw)
    with pytest.raises(pyrep.ReplicationError,
                       match=r"backend 'colo-disk'.*does not share 'write'.*secondary disk 's_local'.*failover"):
        replication.start_all("secondary")
    assert stage() == "none" and not pyrep.lookup("top").blockers and pyrep.jobs.list() == []


def test_start_accepts_users_that_share_writes(tmp_path):
    _secondary_graph(tmp_path, share_rw=True)
    pyrep.open_backend(S_LOCAL, name="reader", read_only=True, shared="all")
    replication.start_all("secondary")
    assert stage() == "running"


# ------------------------------------------------------------ the stage table

def test_illegal_moves_name_node_stage_and_event(tmp_path):
    from pyrep.replication_state import Stage
    s = Secondary(tmp_path, "memory", size=SIZE)
    with pytest.raises(pyrep.ReplicationError, match=r"replication 'rep' \(secondary\): 'stop' is not allowed in "
                                                     r"stage none"):
        replication.stop_all(False)
    with pytest.raises(pyrep.ReplicationError, match=r"'rep'.*'checkpoint' is not allowed in stage none"):
        replication.do_checkpoint_all()
    replication.start_all("secondary")
    assert s.driver.stage is Stage.RUNNING and replication.status()[0]["stage"] == "running"
    assert type(replication.status()[0]["stage"]) is str
    with pytest.raises(pyrep.ReplicationError, match=r"'rep'.*'start' is not allowed in stage running"):
        replication.start_all("secondary")


def test_transition_table_refuses_every_move_it_does_not_hold():
    from pyrep.replication_state import IGNORED, TRANSITIONS, Event, Stage, next_stage
    for st in Stage:
        for ev in Event:
            if (st, ev) in TRANSITIONS:
                assert next_stage("n", st, ev) is TRANSITIONS[(st, ev)]
            else:
                with pytest.raises(pyrep.ReplicationError, match=f"n: '{ev.value}' is not allowed in stage "
                                                                 f"{st.value}"):
                    next_stage("n", st, ev)
    # promoted nodes ignore start, checkpoint and stop; nothing leaves failover_failed
    for st in (Stage.FAILOVER, Stage.DONE):
        for ev in (Event.START, Event.CHECKPOINT, Event.STOP):
            assert TRANSITIONS[(st, ev)] is IGNORED
    assert not any(st is Stage.FAILOVER_FAILED for st, _ in TRANSITIONS)


def test_the_stage_is_set_in_one_place():
    import inspect
    import re
    from pyrep.drivers import replication as drv
    src = inspect.getsource(drv)
    assert len(re.findall(r"self\._stage\s*=(?!=)", src)) == 2      # open() and _move()
    assert not re.search(r"self\.stage\s*=(?!=)", src)


def test_nobody_but_replication_ends_its_copy_before_write_job(tmp_path):
    # without the job, the primary's writes would change the secondary's view with no copy kept
    s = Secondary(tmp_path, "memory", size=SIZE, start=True)
    job = s.driver.backup_job
    with pytest.raises(pyrep.OptionError, match="belongs to replication 'rep'"):
        job.cancel()
    s.local.pwrite(0, b"\x22" * CL)
    expect_pattern(s.top, 0x11, 0, CL)                  # copied before the write: the view holds
    replication.get_error_all()
    replication.stop_all(False)
    assert job.cancelled and pyrep.jobs.list() == []


def test_a_write_waiting_for_a_failing_copy_tries_it_itself_and_fails_too(tmp_path):
    # writer A's copy of cluster 0 is slow and fails; writer B meets the cluster claimed, waits in the
    # job's Python notifier, then copies it itself: the copy fails again, so B's write fails as well
    from helpers.threads import spawn
    from helpers.wait import wait_until
    s = Secondary(tmp_path, "raw+memory", size=SIZE, start=True, sd_debug="sd_dbg")
    gate = s.driver.backup_job._gate
    pyrep.inject_error("sd_dbg", op="read", errno="EIO", offset=0, length=CL, delay=0.5)

    def write_a():
        with pytest.raises(pyrep.BlockError) as ei:
            s.local.pwrite(0, b"\x22" * 4096)
        return ei.value.errno

    a = spawn(write_a)
    wait_until(lambda: not gate.claimed.is_empty(), what="writer A claiming cluster 0")
    with pytest.raises(pyrep.BlockError) as ei:
        s.local.pwrite(4096, b"\x23" * 4096)
    assert ei.value.errno == 5 and a.join() == 5
    pyrep.clear_errors("sd_dbg")
    expect_pattern(s.local, 0x11, 0, CL)
    expect_pattern(s.top, 0x11, 0, CL)
    assert gate.claimed.is_empty()
    with pytest.raises(pyrep.ReplicationError, match="2 write\\(s\\) into the secondary disk refused"):
        replication.get_error_all()
