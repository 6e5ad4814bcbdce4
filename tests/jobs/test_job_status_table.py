"""Job status is a table: every move a job makes is one of TRANSITIONS, and anything else is refused
with an error that names the job, the status and the event."""
import threading

import pytest

import pyrep
from pyrep.jobs import job as jobmod
from pyrep.jobs.job import TRANSITIONS, JobStatus, JobStatusError


def _moves():
    """Every (old, new) pair the table allows."""
    out = set()
    for table in TRANSITIONS.values():
        for old, new in table.items():
            for n in (new if isinstance(new, frozenset) else (new,)):
                out.add((old, n))
    return out


def test_a_mirror_paused_resumed_and_cancelled_moves_only_along_the_table():
    src = pyrep.open_backend({"driver": "memory", "size": "4M"})
    dst = pyrep.blockdev_add({"driver": "memory", "size": "4M", "node-name": "tbl_dst"})
    src.pwrite(0, b"x" * 65536)
    seen, ready = [], threading.Event()

    def listener(job, old, new):
        if job.id == "tbl0":
            seen.append((old, new))
            if new == "ready":
                ready.set()

    jobmod.add_status_listener(listener)
    try:
        job = pyrep.jobs.mirror(src.node, dst, sync="full", job_id="tbl0")
        assert ready.wait(30)
        job.pause()
        assert job.status is JobStatus.PAUSED
        job.resume()
        assert job.status is JobStatus.READY            # back to where the pause found it
        job.cancel(sync=True)
    finally:
        jobmod.remove_status_listener(listener)
        src.close()
        pyrep.blockdev_del("tbl_dst")
    assert seen == [("created", "running"), ("running", "ready"), ("ready", "paused"), ("paused", "ready"),
                    ("ready", "aborting"), ("aborting", "concluded")]
    assert set(seen) <= _moves()
    assert all(isinstance(new, JobStatus) for _, new in seen)


def test_an_illegal_move_names_the_job_the_status_and_the_event():
    job = jobmod.Job(job_id="tbl1")
    job.start()
    assert job.wait(30)
    assert job.status == "concluded"
    with pytest.raises(JobStatusError) as e:
        job.transition("ready")
    assert "job 'tbl1'" in str(e.value) and "'concluded'" in str(e.value) and "'ready'" in str(e.value)
    assert job.status is JobStatus.CONCLUDED             # refused: nothing moved
    with pytest.raises(JobStatusError):
        job.transition("resume", "running")
    assert isinstance(e.value, pyrep.Error)


def test_resume_may_only_go_back_to_running_or_ready():
    job = jobmod.Job(job_id="tbl2")
    try:
        job.pause()                                       # a created job may be paused
        assert job.status is JobStatus.PAUSED
        with pytest.raises(JobStatusError) as e:
            job.transition("resume", "concluded")
        assert "'paused'" in str(e.value) and "'resume'" in str(e.value) and "tbl2" in str(e.value)
        assert job.status is JobStatus.PAUSED
    finally:
        job.abandon()


def test_statuses_print_and_compare_as_their_names():
    assert str(JobStatus.READY) == "ready" and f"{JobStatus.ABORTING}" == "aborting"
    assert JobStatus.RUNNING == "running" and jobmod.STATUSES == tuple(s.value for s in JobStatus)
    assert {s for table in TRANSITIONS.values() for s in table} | {JobStatus.CONCLUDED} == set(JobStatus)


def test_cancelling_a_job_that_never_started_concludes_it_and_frees_its_id():
    # before: the status jumped to "concluded" but nothing set the job done, so wait() never returned
    # and the id stayed taken; a job paused before start() stayed "aborting" for ever
    seen = []
    for pause_first in (False, True):
        job = jobmod.Job(job_id="tbl3")
        job.add_callback(lambda j: seen.append(j.status))
        if pause_first:
            job.pause()
        job.cancel()
        assert job.wait(30)
        assert job.status is JobStatus.CONCLUDED and job.cancelled and job.error is None
        assert "tbl3" not in [j.id for j in pyrep.jobs.list()]
    assert seen == ["concluded", "concluded"]            # the completion callbacks ran
