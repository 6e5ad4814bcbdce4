"""The C hot paths of the qcow2 driver (drivers/qcow2/_fast.pyx): allocating writes, multi-cluster reads,
chain reads handed to the backing node's C path, direct file reads, and their fallbacks."""
import errno
import random

import pytest

import pyrep
from pyrep.drivers.qcow2._fast import Qcow2Core
from pyrep.errors import BlockError

from helpers.qcow2 import open_q
from helpers.referees import needs_qemu, qcheck, qimg, qio
from helpers.threads import run_in_threads

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

    def worker(t):
        for c in range(nclusters):
            blk.pwrite(c * CS + t * 4096, bytes([t + 1]) * 4096)
            if c % 7 == 0:   # multi-cluster allocating write into a region of its own
                blk.pwrite(32 * MB + (t * nclusters + c) * CS, bytes([t + 1]) * (2 * CS))
    run_in_threads(worker, [(t,) for t in range(nthreads)])
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
def test_reads_over_mixed_clusters_in_c_match_qemu(tmp_path, monkeypatch):
    """Large reads over clusters of a layer that mix data runs (contiguous or not) and unallocated ones
    read each run in C (file or backing); zero clusters, compressed ones and ranges past the backing
    still take the Python path. Every read matches what qemu-img converts the chain to."""
    from pyrep.drivers.qcow2.driver import Qcow2Driver
    base, mid, top, raw = (tmp_path / n for n in ("base.qcow2", "mid.qcow2", "top.qcow2", "top.raw"))
    qimg("create", "-q", "-f", "qcow2", base, 12 * MB)          # shorter than the chain above it
    qio(base, f"write -P 1 0 {12 * MB}")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid, 16 * MB)
    qio(mid, *[f"write -P {10 + i % 200} {i * CS} {CS}" for i in range(0, 256, 3)])
    qimg("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top, 16 * MB)
    # every 5th cluster, written backwards so the runs are not contiguous in the file; a few zeroes
    qio(top, *[f"write -P {100 + i % 100} {i * CS} {CS}" for i in reversed(range(0, 256, 5))],
        f"write -z {40 * CS} {CS}")
    qimg("convert", "-O", "raw", top, raw)
    want = raw.read_bytes()
    slow = []
    orig = Qcow2Driver._preadv_slow

    def counting(self, offset, length, iov):
        slow.append((self.filename, offset, length))
        return orig(self, offset, length, iov)
    monkeypatch.setattr(Qcow2Driver, "_preadv_slow", counting)
    blk = open_q(top, read_only=True)
    try:
        assert blk.pread(0, 16 * MB) == want                # loads every layer's L2 table
        for off, n in [(0, MB), (CS // 2, 3 * CS), (MB + 4096, MB - 8192), (2 * MB, 8 * CS)]:
            slow.clear()
            assert blk.pread(off, n) == want[off:off + n], (off, n)
            assert slow == [], (off, n, slow)               # all in C, every layer
        for off, n in [(39 * CS, 3 * CS), (11 * MB, 2 * MB)]:   # a zero cluster; past the base's end
            slow.clear()
            assert blk.pread(off, n) == want[off:off + n], (off, n)
            assert slow, (off, n)
        rng = random.Random(5)
        for _ in range(200):
            off = rng.randrange(16 * MB - 1)
            n = rng.randrange(1, min(2 * MB, 16 * MB - off) + 1)
            assert blk.pread(off, n) == want[off:off + n], (off, n)
    finally:
        blk.close()


@needs_qemu
def test_read_errors_of_the_file_still_reported(tmp_path):
    img = tmp_path / "a.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, 8 * MB)
    qio(img, f"write -P 9 0 {MB}")
    blk = pyrep.open_backend({"driver": "qcow2", "file": {"driver": "blkdebug", "node-name": "dbg",
                                                          "file": {"driver": "file", "filename": str(img)}}})
    assert blk.pread(0, 4096) == b"\x09" * 4096          # cache the L2 table
    pyrep.inject_error("dbg", op="read", errno="ENOSPC")      # not EIO: the errno must come through
    with pytest.raises(BlockError) as e1:
        blk.pread(4096, 4096)
    assert e1.value.errno == errno.ENOSPC
    with pytest.raises(BlockError) as e2:
        blk.pread(0, MB)
    assert e2.value.errno == errno.ENOSPC
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

    def reader(seed):
        rng = random.Random(seed)
        for _ in range(200):
            i = rng.randrange(16)
            assert blk.pread(i * MB, MB) == bytes([i + 1]) * MB, f"cluster run {i} read wrong"
    run_in_threads(reader, [(s,) for s in range(3)])
    assert blk.pread(MB - 4096, 2 * MB) == b"\1" * 4096 + b"\2" * MB + b"\3" * (MB - 4096)
    pid = os.fork()
    if pid == 0:   # child: the parent's helper thread does not exist here
        ok = blk.pread(5 * MB, MB) == b"\6" * MB and blk.pread(7 * MB, MB) == b"\x08" * MB
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    blk.close()


@needs_qemu
@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "read+write"])
def test_cow_allocating_writes_in_c_match_qemu_io(tmp_path, monkeypatch, kernel_copy):
    """Partial writes into fresh clusters of an overlay copy the rest of the cluster from the backing
    in C (single cluster inside the backing): in the kernel when the request is alone (copy_file_range
    from the backing's file), else read into a buffer and written whole. The data matches qemu-io's,
    the head/tail from the backing survive, concurrent writers to the same fresh cluster lose nothing,
    and the image is clean."""
    from pyrep.drivers.qcow2.driver import Qcow2Driver
    base, a, b = tmp_path / "base.qcow2", tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qimg("create", "-q", "-f", "qcow2", base, 12 * MB)
    # distinct content per 64 KiB of the backing (its last 2 MiB left unallocated: zeroes)
    qio(base, *[f"write -P {(i % 250) + 1} {i * CS} {CS}" for i in range(10 * MB // CS)])
    for img in (a, b):
        qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", img, 16 * MB)
    calls = []
    orig = Qcow2Driver._pwritev_slow

    def counting(self, offset, length, iov, flags):
        calls.append(offset)
        return orig(self, offset, length, iov, flags)

    monkeypatch.setattr(Qcow2Driver, "_pwritev_slow", counting)
    rng = random.Random(11)
    ops = [(0, 4096), (CS + 4096, 4096), (2 * CS + CS - 512, 512), (3 * CS + 777, 3000),
           (10 * MB + 8192, 4096)]                      # the last: backing cluster unallocated (zeroes)
    for _ in range(150):
        n = rng.choice([512, 4096, 3000, 20000])
        c = rng.randrange(5, 8 * MB // CS)
        ops.append((c * CS + rng.randrange(0, CS - n), n))
    blk = open_q(a)
    drv = blk.node.driver
    drv._nocopy = not kernel_copy
    blk.pwrite(4 * CS, b"\xee" * 4096)                  # allocates the L2 table (Python path)
    ops.insert(0, (4 * CS, 4096))
    calls.clear()
    model = {}
    for i, (o, n) in enumerate(ops[1:], 1):
        p = (i % 200) + 30
        blk.pwrite(o, bytes([p]) * n)
        model[i] = p
    assert calls == []                                  # all in C (copy-on-write or overwrite)
    # every first write into a cluster the backing holds data for was copied in the kernel (or none)
    copied = {o // CS for o, n in ops[1:] if o < 10 * MB}
    assert drv.cow_copies == (len(copied) if kernel_copy else 0)
    blk.pwrite(14 * MB + 4096, b"\x05" * 4096)          # cluster past the backing's end: Python path
    assert calls == [14 * MB + 4096]
    # concurrent 4 KiB writers into the same fresh clusters (one allocates, the others wait for it)
    nthreads = 4

    def worker(t):
        for c in range(8 * MB // CS, 8 * MB // CS + 30):
            blk.pwrite(c * CS + t * 8192, bytes([200 + t]) * 4096)
    run_in_threads(worker, [(t,) for t in range(nthreads)])
    for c in range(8 * MB // CS, 8 * MB // CS + 30):
        data = blk.pread(c * CS, CS)
        pat = bytes([(c % 250) + 1])
        for t in range(nthreads):
            assert data[t * 8192:t * 8192 + 4096] == bytes([200 + t]) * 4096, (c, t)
            assert data[t * 8192 + 4096:(t + 1) * 8192] == pat * 4096, (c, t)
        assert data[nthreads * 8192:] == pat * (CS - nthreads * 8192)
    res = blk.node.driver.check()
    assert res["corruptions"] == 0 and res["leaks"] == 0
    blk.close()
    qcheck(a)
    # the same writes with qemu-io on the twin overlay: identical images
    cmds = [f"write -P 238 {4 * CS} 4096"] + [f"write -P {model[i]} {o} {n}" for i, (o, n) in enumerate(ops[1:], 1)]
    cmds.append(f"write -P 5 {14 * MB + 4096} 4096")
    cmds += [f"write -P {200 + t} {c * CS + t * 8192} 4096"
             for c in range(8 * MB // CS, 8 * MB // CS + 30) for t in range(nthreads)]
    qio(b, *cmds)
    assert qimg("compare", a, b, check=False).returncode == 0
    # head/tail preserved from the backing, read by qemu-io
    qio(a, f"read -P 1 4096 {CS - 4096}", f"read -P 2 {CS} 4096", f"read -P 2 {CS + 8192} {CS - 8192}",
        f"read -P 3 {2 * CS} {CS - 512}", f"read -P 0 {10 * MB} 8192", f"read -P 0 {10 * MB + 12288} {CS - 12288}")


@needs_qemu
@pytest.mark.parametrize("bcs", [4096, 131072])
def test_cow_from_backing_with_other_cluster_size(tmp_path, bcs):
    """Copy-on-write from a backing with other clusters than the overlay's: from a larger one the kernel
    copy takes the overlay cluster's part of the backing cluster; from a smaller one (a 64 KiB cluster
    may be scattered over its file) the old data is read through the backing. Checked by qemu-io."""
    base, a = tmp_path / "base.qcow2", tmp_path / "a.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", f"cluster_size={bcs}", base, 4 * MB)
    # written backwards, so a small-cluster backing holds each 64 KiB out of order in its file
    qio(base, *[f"write -P {i + 1} {i * CS} {CS}" for i in reversed(range(40))])
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", a, 4 * MB)
    blk = open_q(a)
    drv = blk.node.driver
    for i in range(40):
        blk.pwrite(i * CS + (i % 15) * 4096, bytes([100 + i]) * 4096)
    # the first copy-on-write loads the backing's L2 table (read path); the rest are kernel copies
    # when the backing's clusters hold whole overlay clusters
    assert drv.cow_copies == (39 if bcs >= CS else 0)
    for i in range(40):
        data = blk.pread(i * CS, CS)
        at = (i % 15) * 4096
        assert data[:at] == bytes([i + 1]) * at and data[at + 4096:] == bytes([i + 1]) * (CS - at - 4096), i
        assert data[at:at + 4096] == bytes([100 + i]) * 4096, i
    blk.close()
    qcheck(a)
    qio(a, *[f"read -P {100 + i} {i * CS + (i % 15) * 4096} 4096" for i in range(40)],
        *[f"read -P {i + 1} {i * CS + ((i % 15) + 1) * 4096} {CS - ((i % 15) + 1) * 4096}" for i in range(40)])
