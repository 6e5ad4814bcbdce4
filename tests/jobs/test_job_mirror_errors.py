"""Mirror with errors injected into its own I/O, under each policy (on_error): report ends the job with
the graph unchanged, ignore retries the range until it copies, stop pauses until resume. Writes of the
guest go on meanwhile; the target, read past pyrep, ends as the model."""
import errno
import random

import pytest

import pyrep
import pyrep.jobs

from helpers.jobs import CS, SIZE
from helpers.wait import wait_until


def setup(tmp_path, err_on):
    """Source 'src' (raw file, random data; a blkdebug 'src-dbg' under it when ``err_on`` is 'source'),
    target 'tgt' (raw file under blkdebug 'tgt-dbg'). Returns (backend, model, target path)."""
    rng = random.Random(4)
    model = bytearray(rng.randbytes(SIZE))
    spath, tpath = tmp_path / "src.raw", tmp_path / "tgt.raw"
    spath.write_bytes(bytes(model))
    tpath.write_bytes(bytes(SIZE))
    sfile = {"driver": "file", "filename": str(spath)}
    if err_on == "source":
        sfile = {"driver": "blkdebug", "node-name": "src-dbg", "file": sfile}
    blk = pyrep.open_backend({"driver": "raw", "node-name": "src", "file": sfile}, name="disk")
    pyrep.blockdev_add({"driver": "raw", "node-name": "tgt", "file": {
        "driver": "blkdebug", "node-name": "tgt-dbg", "file": {"driver": "file", "filename": str(tpath)}}})
    return blk, model, tpath


def dbg(err_on):
    return "src-dbg" if err_on == "source" else "tgt-dbg"


def inject(err_on, once):
    if err_on == "source":
        return pyrep.inject_error("src-dbg", op="read", errno="EIO", offset=5 * CS, length=CS, once=once)
    return pyrep.inject_error("tgt-dbg", op="write", errno="ENOSPC", offset=5 * CS, length=CS, once=once)


def guest_writes(blk, model, seed, n=30):
    rng = random.Random(seed)
    for _ in range(n):
        off = rng.randrange(SIZE - 4096)
        d = rng.randbytes(4096)
        blk.pwrite(off, d)
        model[off:off + 4096] = d


def expected_errno(err_on):
    return errno.EIO if err_on == "source" else errno.ENOSPC


@pytest.mark.parametrize("err_on", ["source", "target"])
def test_report_ends_the_job_and_leaves_the_graph(tmp_path, err_on):
    blk, model, _ = setup(tmp_path, err_on)
    inject(err_on, once=False)
    job = pyrep.jobs.mirror("src", "tgt", on_error="report")
    assert job.wait(30)
    assert job.error is not None and job.error.errno == expected_errno(err_on)
    assert not job.pivoted and blk.node is pyrep.lookup("src") and pyrep.jobs.list() == []
    assert all(not isinstance(c.parent, pyrep.jobs.Job) for n in pyrep.nodes().values() for c in n.parents)
    pyrep.clear_errors(dbg(err_on))
    guest_writes(blk, model, 1)                        # the disk goes on, on the source
    assert blk.pread(0, SIZE) == model


@pytest.mark.parametrize("err_on", ["source", "target"])
def test_ignore_retries_the_range_until_it_copies(tmp_path, err_on):
    blk, model, tpath = setup(tmp_path, err_on)
    inject(err_on, once=False)
    job = pyrep.jobs.mirror("src", "tgt", on_error="ignore")
    wait_until(lambda: job.errors_ignored >= 2, 30, "the job to meet the error and retry")
    assert job.status != "ready" and job.last_error.errno == expected_errno(err_on)
    guest_writes(blk, model, 2)
    pyrep.clear_errors(dbg(err_on))
    wait_until(lambda: job.status == "ready", 30, "the mirror to be ready once the range copies")
    guest_writes(blk, model, 3)
    job.complete()
    assert job.wait(30) and job.error is None and job.pivoted
    assert blk.node is pyrep.lookup("tgt")
    blk.close()
    assert tpath.read_bytes() == model


@pytest.mark.parametrize("err_on", ["source", "target"])
def test_stop_pauses_and_resume_finishes(tmp_path, err_on):
    blk, model, tpath = setup(tmp_path, err_on)
    inject(err_on, once=False)
    job = pyrep.jobs.mirror("src", "tgt", on_error="stop")
    wait_until(lambda: job.io_error is not None, 30, "the job to stop on the error")
    assert job.status == "paused" and job.io_error.errno == expected_errno(err_on)
    guest_writes(blk, model, 4)                        # the guest is not stopped with the job
    pyrep.clear_errors(dbg(err_on))
    job.resume()
    assert job.io_error is None
    wait_until(lambda: job.status == "ready", 30, "the resumed mirror to be ready")
    job.complete()
    assert job.wait(30) and job.error is None and job.pivoted
    blk.close()
    assert tpath.read_bytes() == model
