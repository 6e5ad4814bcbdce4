"""REQ_FUA (the write is stable when it returns) and cache.no-flush (flushes are dropped), seen from below:
a blkdebug node counts the flushes that reach it, and /dev/null, whose fdatasync the kernel refuses,
shows whether the file driver synced."""
import errno

import pytest

import pyrep
from pyrep.constants import REQ_FUA

MiB = 1 << 20


def counting(node_name):
    """A rule on blkdebug ``node_name`` that never fires and counts the flushes it sees."""
    return pyrep.inject_error(node_name, op="flush", errno=None, after=10 ** 12)


def qcow2_over_blkdebug(tmp_path, **top):
    img = tmp_path / "d.qcow2"
    pyrep.create_image(str(img), "qcow2", 4 * MiB)
    return pyrep.open_backend({"driver": "qcow2", **top, "file": {
        "driver": "blkdebug", "node-name": "dbg", "file": {"driver": "file", "filename": str(img)}}}), img


def test_fua_write_on_a_format_flushes_its_file(tmp_path):
    blk, _ = qcow2_over_blkdebug(tmp_path)
    flushes = counting("dbg")
    blk.pwrite(0, b"a" * 65536)
    assert flushes.seen == 0                     # a plain write does not flush
    blk.pwrite(65536, b"b" * 65536, flags=REQ_FUA)
    assert flushes.seen >= 1
    seen = flushes.seen
    blk.pwrite_zeroes(2 * 65536, 65536, flags=REQ_FUA)
    assert flushes.seen > seen
    blk.close()


def test_fua_write_of_the_file_driver_syncs():
    """/dev/null takes writes and refuses fdatasync (EINVAL): a FUA write must fail with that error,
    a plain one succeed."""
    blk = pyrep.open_backend({"driver": "raw", "size": MiB, "file": {"driver": "file", "filename": "/dev/null",
                                                                      "cache": {"no-flush": True}},
                              "cache": {"no-flush": True}})
    blk.pwrite(0, b"x" * 4096)
    with pytest.raises(pyrep.BlockError) as e:
        blk.pwrite(0, b"x" * 4096, flags=REQ_FUA)
    assert e.value.errno == errno.EINVAL and "file: flush after FUA write failed" in str(e.value)
    assert "/dev/null" in str(e.value)
    blk.close()


def test_no_flush_drops_flushes_and_without_it_they_reach_the_file(tmp_path):
    blk, img = qcow2_over_blkdebug(tmp_path, cache={"no-flush": True})
    flushes = counting("dbg")
    blk.pwrite(0, b"a" * 65536)
    blk.flush()
    assert flushes.seen == 0
    blk.close()
    blk = pyrep.open_backend({"driver": "qcow2", "file": {
        "driver": "blkdebug", "node-name": "dbg", "file": {"driver": "file", "filename": str(img)}}})
    flushes = counting("dbg")
    assert blk.pread(0, 65536) == b"a" * 65536
    blk.pwrite(65536, b"b")
    blk.flush()
    assert flushes.seen >= 1
    blk.close()


def test_no_flush_keeps_a_refused_flush_from_failing():
    """On /dev/null a flush fails with EINVAL; with cache.no-flush it never reaches the file."""
    plain = pyrep.open_backend({"driver": "file", "filename": "/dev/null", "node-name": "null-plain"})
    with pytest.raises(pyrep.BlockError) as e:
        plain.flush()
    assert e.value.errno == errno.EINVAL
    with pytest.raises(pyrep.BlockError):
        plain.close()
    quiet = pyrep.open_backend({"driver": "file", "filename": "/dev/null", "cache": {"no-flush": True}})
    quiet.flush()
    quiet.close()
