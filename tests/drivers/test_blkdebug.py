"""Fault injection: rules from options and at run time."""
import errno
import time

import pytest

import pyrep

from helpers.threads import spawn


@pytest.fixture
def blk():
    b = pyrep.open_backend({"driver": "blkdebug", "node-name": "dbg", "file": {"driver": "memory", "size": "1M"}})
    yield b
    b.close()


def test_rules_from_options_match_op_range_and_after():
    rules = [{"op": "write", "errno": "ENOSPC", "offset": 65536, "length": 65536, "after": 2},
             {"op": "read", "errno": 5, "offset": "512K", "once": True}]
    with pyrep.open_backend({"driver": "blkdebug", "inject-error": rules,
                             "file": {"driver": "memory", "size": "1M"}}) as b:
        b.pwrite(0, b"x" * 65536)                  # outside the range
        b.pwrite(65536, b"a")                      # after=2: the first two matching writes pass
        b.pwrite(131071, b"b")
        with pytest.raises(pyrep.BlockError) as e:
            b.pwrite(131000, b"c" * 100)           # touches the range: fails from now on
        assert e.value.errno == errno.ENOSPC and "injected error on write at 131000" in str(e.value)
        with pytest.raises(pyrep.BlockError) as e:
            b.pwrite(70000, b"d")
        assert e.value.errno == errno.ENOSPC
        b.pread(0, 512 * 1024)                     # ends exactly where the read rule starts
        with pytest.raises(pyrep.BlockError) as e:
            b.pread(600000, 1)
        assert e.value.errno == errno.EIO
        assert b.pread(600000, 1) == b"\0"         # once: it fired and is gone


def test_drive_string_rules():
    b = pyrep.open_backend("driver=blkdebug,inject-error.0.op=flush,inject-error.0.errno=EIO,file.driver=null")
    with pytest.raises(pyrep.BlockError) as e:
        b.flush()
    assert e.value.errno == errno.EIO
    with pytest.raises(pyrep.BlockError) as e:  # close reports the failed flush, and still closes
        b.close()
    assert e.value.errno == errno.EIO
    assert b.closed and pyrep.nodes() == {}


def test_runtime_injection_and_clear(blk):
    rule = pyrep.inject_error("dbg", op="any", errno="EPERM", offset=4096, length=4096)
    for call in (lambda: blk.pwrite(4096, b"x"), lambda: blk.pread(8000, 200), lambda: blk.pwrite_zeroes(0, 8192)):
        with pytest.raises(pyrep.BlockError) as e:
            call()
        assert e.value.errno == errno.EPERM
    blk.pdiscard(4096, 1)  # discard=ignore (the default) drops discards before they reach the filter
    assert rule.fired == 3
    blk.pwrite(0, b"fine")
    pyrep.clear_errors("dbg")
    blk.pwrite(4096, b"x")


def test_discard_reaches_the_filter_with_discard_unmap():
    b = pyrep.open_backend({"driver": "blkdebug", "node-name": "d2", "discard": "unmap",
                            "file": {"driver": "memory", "size": "1M"}})
    pyrep.inject_error("d2", op="discard", errno="EIO")
    with pytest.raises(pyrep.BlockError) as e:
        b.pdiscard(0, 65536)
    assert e.value.errno == errno.EIO
    b.close()


@pytest.mark.parametrize("rule, msg", [
    ({"op": "sing"}, r"inject-error.0.op: expected one of read, write"),
    ({"op": "read", "errno": "EWHAT"}, r"inject-error.0.errno: unknown errno 'EWHAT'"),
    ({"op": "read", "offset": "far"}, r"inject-error.0.offset: expected a size"),
    ({"op": "read", "colour": 1}, r"unknown option 'inject-error.0.colour'"),
])
def test_bad_rules(rule, msg):
    with pytest.raises(pyrep.OptionError, match=msg):
        pyrep.blockdev_add({"driver": "blkdebug", "inject-error": [rule], "file": {"driver": "null"}})


def test_inject_on_a_non_blkdebug_node():
    pyrep.blockdev_add({"driver": "null", "node-name": "n"})
    with pytest.raises(pyrep.OptionError, match="is a 'null' node, not blkdebug"):
        pyrep.inject_error("n")


def test_delay_rules_hold_requests_without_failing(blk):
    rule = pyrep.inject_error("dbg", op="read", errno=None, delay=0.2, offset=0, length=4096)
    t0 = time.monotonic()
    assert blk.pread(0, 512) == bytes(512)
    assert time.monotonic() - t0 >= 0.2 and rule.fired == 1      # a lower bound: slow machines pass too
    blk.pwrite(65536, b"w")
    assert blk.pread(65536, 1) == b"w" and rule.fired == 1        # outside the range: not delayed
    with pytest.raises(pyrep.OptionError, match=r"inject-error.0.delay: expected 0 to 60 seconds"):
        pyrep.blockdev_add({"driver": "blkdebug", "inject-error": [{"op": "read", "delay": -1}],
                            "file": {"driver": "null"}})


def test_hold_rules_hold_requests_until_released(blk):
    rule = pyrep.inject_error("dbg", op="read", errno=None, hold=True, offset=0, length=4096)
    r = spawn(blk.pread, 0, 512)
    assert rule.wait_held(1)
    blk.pwrite(65536, b"w")                     # other requests are not held up
    assert blk.pread(65536, 1) == b"w"
    assert not r.done.is_set() and rule.held == 1
    rule.release()
    assert r.join() == bytes(512) and rule.held == 0
    assert blk.pread(0, 1) == b"\0"             # released: later requests pass at once


def test_clearing_the_rules_releases_what_they_hold(blk):
    rule = pyrep.inject_error("dbg", op="write", errno=None, hold=True)
    w = spawn(blk.pwrite, 0, b"held")
    assert rule.wait_held(1)
    pyrep.clear_errors("dbg")
    w.join()
    assert blk.pread(0, 4) == b"held"


def test_a_hold_with_an_errno_fails_the_request_once_released(blk):
    rule = pyrep.inject_error("dbg", op="write", errno="ENOSPC", hold=True, once=True)
    w = spawn(blk.pwrite, 0, b"x")
    assert rule.wait_held(1)
    rule.release()
    with pytest.raises(pyrep.BlockError) as e:
        w.join()
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(pyrep.OptionError, match=r"inject-error.0.hold: "):
        pyrep.blockdev_add({"driver": "blkdebug", "inject-error": [{"op": "read", "hold": "maybe"}],
                            "file": {"driver": "null"}})
