"""The C hot paths of the qcow2 driver (drivers/qcow2/_fast.pyx): allocating writes, multi-cluster reads,
chain reads handed to the backing node's C path, direct file reads, and their fallbacks."""
import random
import threading

import pytest

import pyrep
from pyrep.drivers.qcow2._fast import Qcow2Core
from pyrep.errors import BlockError

from qcow2_testutil import needs_qemu, open_q, qcheck, qimg, qio

MB = 1 << 20
CS = 65536


@needs_qemu
def test_driver_is_the_c_core(tmp_path):
    img = tmp_path / "a.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, 8 * MB)
    blk = open_q(img)
    assert isinstance(blk.node.driver, Qcow2Core)
    blk.close()


@needs_qemu
def test_random_mixed_writes_match_qemu_io(tmp_path):
    size = 256 * MB
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qimg("create", "-q", "-f", "qcow2", a, size)
    qimg("create", "-q", "-f", "qcow2", b, size)
    rng = random.Random(7)
    ops = []
    for _ in range(600):
        n = rng.choice([512, 4096, 3000, CS, CS + 512, MB, 70000])
        o = rng.randrange(0, size - n) & ~511 if rng.random() < 0.7 else rng.randrange(0, size // CS - 20) * CS
        ops.append((o, n, rng.randrange(1, 256)))
    blk = open_q(a)
    for o, n, p in ops:
        blk.pwrite(o, bytes([p]) * n)
    # read back through the fast paths (single and multi-cluster) before closing
    for o, n, p in ops[-50:]:
        assert blk.pread(o, n) == bytes([p]) * n
    blk.close()
    qio(b, *[f"write -P {p} {o} {n}" for o, n, p in ops])
    qcheck(a)
    assert qimg("compare", a, b, check=False).returncode == 0


@needs_qemu
def test_concurrent_allocating_writes_same_clusters(tmp_path):
    """Threads write different 4 KiB pieces of the same new clusters at once: the in-flight set must
    serialise the allocations (one host cluster per guest cluster, nothing lost)."""
    img = tmp_path / "a.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, 128 * MB)
    blk = open_q(img)
    nthreads, nclusters = 4, 200
    errors = []

    def worker(t):
        try:
            for c in range(nclusters):
                blk.pwrite(c * CS + t * 4096, bytes([t + 1]) * 4096)
                if c % 7 == 0:   # multi-cluster allocating write into a region of its own
                    blk.pwrite(32 * MB + (t * nclusters + c) * CS, bytes([t + 1]) * (2 * CS))
        except Exception as ex:   # pragma: no cover - reported below
            errors.append(ex)

    ths = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert not errors
    for c in range(nclusters):
        data = blk.pread(c * CS, CS)
        for t in range(nthreads):
            assert data[t * 4096:(t + 1) * 4096] == bytes([t + 1]) * 4096, (c, t)
        assert data[nthreads * 4096:] == bytes(CS - nthreads * 4096)
    res = blk.node.driver.check()
    assert res["corruptions"] == 0 and res["leaks"] == 0
    blk.close()
    qcheck(img)


@needs_qemu
def test_chain_reads_through_c_backing_path(tmp_path):
    base, mid, top = tmp_path / "base.qcow2", tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    qimg("create", "-q", "-f", "qcow2", base, 16 * MB)
    qio(base, f"write -P 1 0 {16 * MB}")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
    qio(mid, f"write -P 2 {4 * MB} {CS}", f"write -z {5 * MB} {CS}")
    qimg("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    qio(top, f"write -P 3 {8 * MB} 4096")
    blk = open_q(top, read_only=True)
    assert blk.pread(0, 4096) == b"\1" * 4096
    assert blk.pread(4 * MB + 512, 4096) == b"\2" * 4096
    assert blk.pread(5 * MB, 4096) == bytes(4096)
    assert blk.pread(8 * MB, 8192) == b"\3" * 4096 + b"\1" * 4096   # the rest of the cluster was copied
    assert blk.pread(4 * MB - 4096, 3 * 4096) == b"\1" * 4096 + b"\2" * 8192
    assert blk.pread(MB, MB) == b"\1" * MB
    blk.close()


@needs_qemu
def test_read_errors_of_the_file_still_reported(tmp_path):
    img = tmp_path / "a.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, 8 * MB)
    qio(img, f"write -P 9 0 {MB}")
    blk = pyrep.open_backend({"driver": "qcow2", "file": {"driver": "blkdebug", "node-name": "dbg",
                                                          "file": {"driver": "file", "filename": str(img)}}})
    assert blk.pread(0, 4096) == b"\x09" * 4096          # cache the L2 table
    pyrep.inject_error("dbg", op="read", errno="EIO")
    with pytest.raises(BlockError):
        blk.pread(4096, 4096)
    with pytest.raises(BlockError):
        blk.pread(0, MB)
    pyrep.clear_errors("dbg")
    assert blk.pread(0, MB) == b"\x09" * MB
    blk.close()


@needs_qemu
def test_large_reads_split_concurrent_and_after_fork(tmp_path):
    """Large direct reads are split with a helper thread: concurrent readers, EOF, and a forked child."""
    import os
    img = tmp_path / "a.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, 64 * MB)
    blk = open_q(img)
    for i in range(16):
        blk.pwrite(i * MB, bytes([i + 1]) * MB)
    errors = []

    def reader(seed):
        rng = random.Random(seed)
        try:
            for _ in range(200):
                i = rng.randrange(16)
                if blk.pread(i * MB, MB) != bytes([i + 1]) * MB:
                    errors.append(i)
        except Exception as ex:   # pragma: no cover
            errors.append(ex)

    ths = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert not errors
    assert blk.pread(MB - 4096, 2 * MB) == b"\1" * 4096 + b"\2" * MB + b"\3" * (MB - 4096)
    pid = os.fork()
    if pid == 0:   # child: the parent's helper thread does not exist here
        ok = blk.pread(5 * MB, MB) == b"\6" * MB and blk.pread(7 * MB, MB) == b"\x08" * MB
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    blk.close()
