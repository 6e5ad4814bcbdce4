"""Status listeners: every status change of every job is told, in order (a QMP monitor's job events)."""
import threading

import pytest

import pyrep
from pyrep.jobs import job as jobmod


def test_listener_sees_every_change_of_a_mirror_in_order():
    src = pyrep.open_backend({"driver": "memory", "size": "4M"})
    dst = pyrep.blockdev_add({"driver": "memory", "size": "4M", "node-name": "lst_dst"})
    src.pwrite(0, b"x" * 65536)
    seen, lock, ready = [], threading.Lock(), threading.Event()

    def listener(job, old, new):
        with lock:
            seen.append((job.id, old, new))
        if new == "ready":
            ready.set()

    jobmod.add_status_listener(listener)
    try:
        job = pyrep.jobs.mirror(src.node, dst, sync="full", job_id="lst0")
        assert ready.wait(30)
        job.cancel(sync=True)
    finally:
        jobmod.remove_status_listener(listener)
        src.close()
        pyrep.blockdev_del("lst_dst")
    assert [s for s in seen if s[0] == "lst0"] == [("lst0", "created", "running"), ("lst0", "running", "ready"),
                                                     ("lst0", "ready", "aborting"),
                                                     ("lst0", "aborting", "concluded")]
    assert dst.closed


def test_removed_listener_is_not_called_and_a_raising_one_breaks_nothing():
    calls = []

    def bad(job, old, new):
        calls.append(new)
        raise RuntimeError("listener bug")

    jobmod.add_status_listener(bad)
    src = pyrep.open_backend({"driver": "memory", "size": "1M"})
    dst = pyrep.blockdev_add({"driver": "memory", "size": "1M", "node-name": "lst_dst2"})
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            job = pyrep.jobs.backup(src.node, dst, sync="full")
            assert job.wait(30) and job.error is None
        jobmod.remove_status_listener(bad)
        n = len(calls)
        job2 = pyrep.jobs.backup(src.node, dst, sync="full")
        assert job2.wait(30) and job2.error is None
        assert len(calls) == n and "concluded" in calls
    finally:
        jobmod.remove_status_listener(bad)
        src.close()
        pyrep.blockdev_del("lst_dst2")


@pytest.mark.parametrize("policy", ["report", "ignore"])
def test_error_listener_hears_each_error_with_the_action(policy):
    seen = []

    def listener(job, error, action):
        seen.append((job.id, error.errno, action))

    jobmod.add_error_listener(listener)
    try:
        src = pyrep.open_backend({"driver": "null", "size": "1M"})
        pyrep.blockdev_add({"driver": "blkdebug", "node-name": "lst_bad", "file": {"driver": "null", "size": "1M"},
                            "inject-error": [{"op": "write", "errno": "EIO", "once": True}]})
        job = pyrep.jobs.backup(src.node, "lst_bad", sync="full", job_id="lst_err", on_error=policy)
        assert job.wait(30)
        src.close()
    finally:
        jobmod.remove_error_listener(listener)
    import errno
    assert seen == [("lst_err", errno.EIO, policy)]
    assert (job.error is not None) == (policy == "report")
