"""The backends' global in-flight count, which decides whether small memory-fs transfers keep the GIL."""
import os
import tempfile
import threading
import time

import pytest

import pyrep
from pyrep._core.fileio import io_active

from helpers.threads import run_in_threads


def test_requests_in_flight_are_counted_and_always_uncounted(tmp_path):
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(1 << 20))
    blk = pyrep.open_backend({"driver": "blkdebug", "node-name": "dbg",
                              "file": {"driver": "file", "filename": str(img)}})
    assert io_active() == 0
    pyrep.inject_error("dbg", op="read", errno=None, delay=0.3, once=True)
    t = threading.Thread(target=blk.pread, args=(0, 4096))
    t.start()
    deadline = time.monotonic() + 5
    while io_active() == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert io_active() == 1                  # the held read is in flight
    t.join()
    assert io_active() == 0
    pyrep.inject_error("dbg", op="write", errno="EIO", once=True)
    with pytest.raises(pyrep.BlockError):
        blk.pwrite(0, b"x" * 512)
    assert io_active() == 0                  # a failed request leaves the count too
    with pytest.raises(pyrep.BlockError):
        blk.pread(1 << 30, 1)                # refused before it starts: never counted
    assert io_active() == 0
    blk.close()


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
        errors = run_in_threads(reader, [(s,) for s in range(8)])
        blk.close()
        assert not errors and io_active() == 0
    finally:
        os.unlink(path)
