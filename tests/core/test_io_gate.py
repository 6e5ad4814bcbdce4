"""The backends' global in-flight count, which decides whether small memory-fs transfers keep the GIL."""
import os
import tempfile
import errno
import threading

import pytest

import pyrep
from pyrep._core.fileio import io_active

from helpers.threads import TIMEOUT, run_in_threads, spawn
from helpers.wait import wait_until


def test_requests_in_flight_are_counted_and_always_uncounted(tmp_path):
    """The count is process-wide: measured against what is in flight before (nothing, once the other
    tests' requests have ended), with a write held in flight by a notifier until the test releases it."""
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(1 << 20))
    blk = pyrep.open_backend({"driver": "blkdebug", "node-name": "dbg",
                              "file": {"driver": "file", "filename": str(img)}})
    wait_until(lambda: io_active() == 0, what="requests of earlier tests to end")
    started, release = threading.Event(), threading.Event()

    def hold(node, offset, length, flags):
        started.set()
        release.wait(TIMEOUT)
    blk.node.add_write_notifier(hold)
    w = spawn(blk.pwrite, 0, b"h" * 4096)
    assert started.wait(TIMEOUT)
    assert io_active() == 1           # the held write is in flight
    release.set()
    w.join()
    blk.node.remove_write_notifier(hold)
    assert io_active() == 0
    pyrep.inject_error("dbg", op="write", errno="EIO", once=True)
    with pytest.raises(pyrep.BlockError) as e:
        blk.pwrite(0, b"x" * 512)
    assert e.value.errno == errno.EIO
    assert io_active() == 0               # a failed request leaves the count too
    with pytest.raises(pyrep.BlockError) as e:
        blk.pread(1 << 30, 1)                # refused before it starts: never counted
    assert e.value.errno == errno.EINVAL
    assert io_active() == 0
    blk.close()
    assert blk_read_back(img) == b"h" * 4096


def blk_read_back(img):
    with open(img, "rb") as f:
        return f.read(4096)


def test_many_threads_on_tmpfs_read_correct_data(tmp_path):
    """Above the CPU count the small tmpfs transfers keep the GIL: the data must stay right."""
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)
    fd, path = tempfile.mkstemp(dir=shm)
    os.close(fd)
    try:
        data = os.urandom(1 << 20)
        with open(path, "wb") as f:
            f.write(data)
        blk = pyrep.open_backend({"driver": "file", "filename": path})

        def reader(seed):
            for i in range(300):
                off = ((seed * 7919 + i * 104729) % 255) * 4096
                assert blk.pread(off, 4096) == data[off:off + 4096], f"wrong data at {off}"
        run_in_threads(reader, [(s,) for s in range(8)])
        blk.close()
    finally:
        os.unlink(path)
