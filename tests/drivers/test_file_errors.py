"""The file driver's own I/O errors, from the kernel (not injected by blkdebug above it): each is a
BlockError with the kernel's errno and a message naming the driver, the request and the file; nothing
crashes, the backend stays usable, and what was acknowledged before stays on the disk."""
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap

import pytest

import pyrep

from helpers.referees import require, run

MiB = 1 << 20


def test_a_full_device_fails_writes_with_enospc():
    """/dev/full takes every write with ENOSPC: small writes (the C path), large and vectored ones all
    report it; reads go on (it reads as zeroes). cache.no-flush: its flush (which /dev/full refuses
    with EINVAL) never reaches the file."""
    blk = pyrep.open_backend({"driver": "raw", "size": MiB, "cache": {"no-flush": True},
                              "file": {"driver": "file", "filename": "/dev/full", "cache": {"no-flush": True}}})
    try:
        for off, n in ((0, 512), (4096, 300000)):
            with pytest.raises(pyrep.BlockError) as e:
                blk.pwrite(off, b"x" * n)
            assert e.value.errno == errno.ENOSPC
            assert f"file: write of {n} bytes at {off} failed" in str(e.value) and "/dev/full" in str(e.value)
        with pytest.raises(pyrep.BlockError) as e:
            iov = pyrep.IOVector(b"a" * 4096)
            iov.add(bytearray(b"b" * 8192))
            blk.pwritev(8192, iov)
        assert e.value.errno == errno.ENOSPC
        assert blk.in_flight == 0
        assert blk.pread(0, 4096) == bytes(4096)
        blk.flush()                             # no-flush: not sent, so not refused
    finally:
        blk.close()


def test_a_refused_flush_is_reported_and_close_still_closes():
    blk = pyrep.open_backend({"driver": "file", "filename": "/dev/full", "node-name": "full"})
    with pytest.raises(pyrep.BlockError) as e:
        blk.flush()
    assert e.value.errno == errno.EINVAL and "file: flush failed" in str(e.value) and "/dev/full" in str(e.value)
    with pytest.raises(pyrep.BlockError) as e:
        blk.close()                             # closing flushes: the error is not swallowed ...
    assert e.value.errno == errno.EINVAL
    assert blk.closed and "full" not in pyrep.nodes()       # ... and the backend is closed all the same


_CHILD = textwrap.dedent("""
    import json, sys
    import pyrep
    path, limit = sys.argv[1], int(sys.argv[2])
    out = {}
    with pyrep.open_backend({"driver": "raw", "size": 4 * limit,
                             "file": {"driver": "file", "filename": path}}) as blk:
        blk.pwrite(0, b"a" * 4096)                       # inside the limit: acknowledged
        for name, call in (("small", lambda: blk.pwrite(limit, b"b" * 512)),
                           ("across", lambda: blk.pwrite(limit - 4096, b"c" * (1 << 20))),
                           ("zeroes", lambda: blk.pwrite_zeroes(limit + 65536, 65536))):
            try:
                call()
                out[name] = None
            except pyrep.BlockError as e:
                out[name] = [e.errno, str(e)]
        out["in_flight"] = blk.in_flight
        out["after"] = blk.pread(0, 4096) == b"a" * 4096
    print(json.dumps(out))
""")


def _limit_file_size(limit):
    def pre():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # the write fails with EFBIG, not a signal
    return pre


def test_a_file_size_limit_fails_writes_with_efbig(tmp_path):
    """RLIMIT_FSIZE, set in a child process: writes past the limit fail with EFBIG (one that crosses it
    too, although the kernel wrote its first part: a short write is a failed write), the growing
    write-zeroes as well; the write before it is on the disk."""
    path, limit = tmp_path / "d.raw", MiB
    path.write_bytes(b"")
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    p = subprocess.run([sys.executable, str(script), str(path), str(limit)], preexec_fn=_limit_file_size(limit),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    for name, what in (("small", "write of 512 bytes at 1048576"), ("across", "write of 1048576 bytes at 1044480"),
                       ("zeroes", "")):
        assert out[name] is not None, f"{name}: the write past RLIMIT_FSIZE succeeded"
        code, msg = out[name]
        assert code == errno.EFBIG and msg.startswith("[EFBIG] file: ") and str(path) in msg, out[name]
        assert what in msg, msg
    assert out["in_flight"] == 0 and out["after"]
    assert path.read_bytes()[:4096] == b"a" * 4096
    assert os.path.getsize(path) <= limit


@pytest.fixture
def immutable(tmp_path):
    """A file the kernel refuses to write: immutable (chattr +i) when we are root (root may write any
    file mode), mode 0444 otherwise. Yields (path, make_immutable, errno expected)."""
    path = tmp_path / "ro.raw"
    path.write_bytes(b"\x5a" * MiB)
    root = os.geteuid() == 0
    if root:
        require("chattr")

    def make_immutable():
        if root:
            run("chattr", "+i", path)
        else:
            path.chmod(0o444)
    yield path, make_immutable, (errno.EPERM if root else errno.EACCES)
    if root:
        run("chattr", "-i", path, check=None)


def test_a_read_only_file_is_refused_for_writing_and_opens_read_only(immutable):
    path, make_immutable, code = immutable
    make_immutable()
    opts = {"driver": "raw", "file": {"driver": "file", "filename": str(path)}}
    with pytest.raises(pyrep.BlockError) as e:
        pyrep.open_backend(opts)
    assert e.value.errno == code and f"file: could not open '{path}' read-write" in str(e.value)
    with pyrep.open_backend(opts, read_only=True) as blk:
        assert blk.pread(0, 4) == b"\x5a" * 4
        with pytest.raises(pyrep.BlockError) as e:
            blk.pwrite(0, b"x")
        assert e.value.errno == errno.EPERM and "read-only" in str(e.value)
    assert path.read_bytes() == b"\x5a" * MiB


def test_a_file_made_immutable_while_open_fails_writes(immutable):
    """The kernel refuses writes through an fd opened read-write once the file is immutable: the
    driver's write and write-zeroes paths report the kernel's errno; reads and earlier data stay."""
    path, make_immutable, code = immutable
    if code != errno.EPERM:
        pytest.skip("only root can make a file immutable under an open fd")
    with pyrep.open_backend({"driver": "raw", "file": {"driver": "file", "filename": str(path)}}) as blk:
        blk.pwrite(0, b"ok")
        blk.flush()
        make_immutable()
        for call, what in ((lambda: blk.pwrite(4096, b"y" * 512), "file: write of 512 bytes at 4096 failed"),
                           (lambda: blk.pwrite(8192, b"z" * 200000), "file: write of 200000 bytes at 8192 failed")):
            with pytest.raises(pyrep.BlockError) as e:
                call()
            assert e.value.errno == errno.EPERM and what in str(e.value) and str(path) in str(e.value)
        assert blk.pread(0, 4) == b"ok\x5a\x5a" and blk.in_flight == 0
        run("chattr", "-i", path)               # closing flushes: let it
    assert path.read_bytes()[:4] == b"ok\x5a\x5a"
