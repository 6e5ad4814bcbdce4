"""Qcow2Driver.pwritev_compressed and change_backing_file, checked with real qemu-img / qemu-io."""
import json
import os
import random

import pytest

import pyrep
from pyrep._core.iovec import IOVector

from helpers.qcow2 import open_q
from helpers.referees import compare_with_model, needs_qemu, qcheck, qimg, qio
from helpers.threads import run_in_threads

pytestmark = needs_qemu


def _compressible(rng, n, seed_byte):
    """Data that deflates well but is not trivial: short random words repeated."""
    words = [bytes([seed_byte]) + rng.randbytes(7) for _ in range(16)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words)
    return bytes(out[:n])


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 << 20])
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_compressed_writes_read_by_qemu(tmp_path, cluster_size, compat):
    rng = random.Random(cluster_size)
    cs = cluster_size
    n = 24 if cs < (1 << 20) else 5
    size = n * cs - (cs // 2 if cs >= 1024 else 0)        # a shorter last cluster
    img = tmp_path / "c.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs},compat={compat}", img, size)
    model = bytearray(size)
    blk = open_q(img)
    drv = blk.node.driver
    try:
        for i in range(n):
            if i % 5 == 3:
                continue                                     # left unallocated
            off = i * cs
            ln = min(cs, size - off)
            data = rng.randbytes(ln) if i % 7 == 6 else _compressible(rng, ln, i)   # some incompressible
            drv.pwritev_compressed(off, ln, IOVector(bytearray(data)))
            model[off:off + ln] = data
        buf = bytearray(size)
        blk.preadv(0, IOVector(buf))
        assert buf == model
    finally:
        blk.close()
    res = qcheck(img)
    assert res.get("compressed-clusters", 0) > 0
    compare_with_model(img, model, tmp_path)
    # reopened by pyrep: still the same, and a normal overwrite of a compressed cluster frees it cleanly
    blk = open_q(img)
    try:
        blk.pwritev(0, IOVector(bytearray(b"\x5a" * min(cs, size))))
        model[0:min(cs, size)] = b"\x5a" * min(cs, size)
        blk.pwrite_zeroes(cs, cs)
        model[cs:2 * cs] = bytes(cs)
    finally:
        blk.close()
    qcheck(img)
    compare_with_model(img, model, tmp_path)
    qio(img, f"read -P 0x5a 0 {min(cs, size)}")


def test_several_clusters_share_a_host_cluster(tmp_path):
    img = tmp_path / "s.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "4M")
    blk = open_q(img)
    drv = blk.node.driver
    try:
        for i in range(16):
            drv.pwritev_compressed(i * 65536, 65536, IOVector(bytearray(bytes([i + 1]) * 65536)))
    finally:
        blk.close()
    res = qcheck(img)
    assert res["compressed-clusters"] == 16
    # 16 tiny compressed clusters in one host cluster: header + refcount table/block + L1 + L2 + 1 data
    assert res["image-end-offset"] <= 6 * 65536
    for i in range(16):
        qio(img, f"read -P {i + 1} {i * 65536} 64k")


@pytest.mark.parametrize("cluster_size", [4096, 65536])
def test_compressed_writes_concurrent_with_allocating_writes(tmp_path, cluster_size):
    """Threads writing compressed clusters (packed into shared host clusters) while others allocate
    plain clusters, rewrite compressed ones in place of nothing, and zero some: no lost write, no
    overlap, a clean image that qemu-img reads as the model."""
    cs = cluster_size
    n = 256
    img = tmp_path / "cc.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", img, n * cs)
    model = bytearray(n * cs)
    blk = open_q(img)
    drv = blk.node.driver
    # every cluster belongs to one thread: threads 0-2 compress (some incompressible: plain writes),
    # thread 3 writes partial and whole plain clusters, thread 4 writes then zeroes
    owner = [c % 5 for c in range(n)]
    datas = {}
    rng = random.Random(cs)
    for c in range(n):
        if owner[c] < 3:
            datas[c] = rng.randbytes(cs) if c % 11 == 0 else _compressible(rng, cs, c % 250)
        elif owner[c] == 3:
            datas[c] = bytes([c % 250 + 1]) * (cs if c % 2 else 512)
        else:
            datas[c] = b""

    def worker(t):
        for c in range(n):
            if owner[c] != t:
                continue
            if t < 3:
                drv.pwritev_compressed(c * cs, cs, IOVector(bytearray(datas[c])))
            elif t == 3:
                blk.pwrite(c * cs, datas[c])
            else:
                blk.pwrite(c * cs, b"\x77" * cs)
                blk.pwrite_zeroes(c * cs, cs)
    try:
        run_in_threads(worker, [(t,) for t in range(5)])
        for c, d in datas.items():
            model[c * cs:c * cs + len(d)] = d
        buf = bytearray(n * cs)
        blk.preadv(0, IOVector(buf))
        assert buf == model
    finally:
        blk.close()
    res = qcheck(img)
    assert res.get("compressed-clusters", 0) > n // 2
    compare_with_model(img, model, tmp_path)


def test_compressed_cluster_rewritten_in_place_of_a_freed_one_reads_new_data(tmp_path):
    """A compressed cluster is read (its decompressed data is cached), zeroed with unmap, and a new
    compressed cluster of the same size lands at the same host offset, with the same L2 entry: the
    read must decompress the new data, not return the cached old one."""
    img = tmp_path / "r.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "16M")
    blk = open_q(img)
    drv = blk.node.driver
    try:
        drv.pwritev_compressed(0, 65536, IOVector(bytearray(b"\x01" * 65536)))
        assert blk.pread(0, 65536) == b"\x01" * 65536
        e0 = drv.clusters.l2.tables[next(iter(drv.clusters.l2.tables))][0]
        blk.pwrite_zeroes(0, 65536, may_unmap=True)
        blk.flush()
        drv.pwritev_compressed(65536, 65536, IOVector(bytearray(b"\x02" * 65536)))
        assert drv.clusters.l2.tables[next(iter(drv.clusters.l2.tables))][1] == e0     # the very same entry value
        assert blk.pread(65536, 65536) == b"\x02" * 65536
    finally:
        blk.close()
    qcheck(img)
    qio(img, "read -P 0 0 64k", "read -P 2 64k 64k")


def test_compressed_write_refusals(tmp_path):
    img = tmp_path / "r.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "1M")
    qio(img, "write -P 1 0 64k", "write -z 64k 64k")
    blk = open_q(img)
    drv = blk.node.driver
    z = bytearray(65536)
    try:
        with pytest.raises(pyrep.BlockError, match="already holds data"):
            drv.pwritev_compressed(0, 65536, IOVector(bytearray(b"x" * 65536)))
        with pytest.raises(pyrep.BlockError, match="not aligned"):
            drv.pwritev_compressed(512, 65536, IOVector(z))
        with pytest.raises(pyrep.BlockError, match="one whole cluster"):
            drv.pwritev_compressed(131072, 4096, IOVector(z[:4096]))
        with pytest.raises(pyrep.BlockError, match="past the end"):
            drv.pwritev_compressed(1 << 20, 65536, IOVector(z))
        # a plain zero cluster may be replaced
        drv.pwritev_compressed(65536, 65536, IOVector(bytearray(b"y" * 65536)))
    finally:
        blk.close()
    qcheck(img)
    qio(img, "read -P 1 0 64k", "read -P 0x79 64k 64k")


def test_change_backing_file(tmp_path):
    base, other, top = tmp_path / "base.qcow2", tmp_path / "other.raw", tmp_path / "top.qcow2"
    qimg("create", "-q", "-f", "qcow2", base, "1M")
    qimg("create", "-q", "-f", "raw", other, "1M")
    qimg("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    qio(top, "write -P 7 0 4k")
    blk = open_q(top, backing=None)
    try:
        blk.node.driver.change_backing_file(other.name, "raw")
    finally:
        blk.close()
    info = json.loads(qimg("info", "--output=json", top).stdout)
    assert info["backing-filename"] == other.name and info["backing-filename-format"] == "raw"
    qcheck(top)
    # feature table kept, header extensions still parse
    assert info["format-specific"]["data"]["compat"] == "1.1"
    blk = open_q(top, backing=None)
    try:
        blk.node.driver.change_backing_file(None, None)
    finally:
        blk.close()
    info = json.loads(qimg("info", "--output=json", top).stdout)
    assert "backing-filename" not in info and "backing-filename-format" not in info
    qcheck(top)
    qio(top, "read -P 7 0 4k", "read -P 0 4k 4k")
    # a name that does not fit in the first cluster is refused and the header is left alone
    small = tmp_path / "small.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", small, "1M")
    before = open(small, "rb").read(512)
    blk = open_q(small)
    try:
        with pytest.raises(pyrep.BlockError, match="do not fit in the first cluster"):
            blk.node.driver.change_backing_file("x" * 400, "qcow2")
    finally:
        blk.close()
    assert open(small, "rb").read(512) == before
    qcheck(small)


def test_qemu_rebase_unsafe_read_by_pyrep(tmp_path):
    base, other, top = tmp_path / "base.qcow2", tmp_path / "other.qcow2", tmp_path / "top.qcow2"
    qimg("create", "-q", "-f", "qcow2", base, "1M")
    qio(base, "write -P 1 0 1M")
    qimg("create", "-q", "-f", "qcow2", other, "1M")
    qio(other, "write -P 2 0 1M")
    qimg("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    qio(top, "write -P 3 0 64k")
    qimg("rebase", "-u", "-b", other.name, "-F", "qcow2", top)
    blk = open_q(top, read_only=True)
    try:
        buf = bytearray(1 << 20)
        blk.preadv(0, IOVector(buf))
        assert buf[:65536] == b"\x03" * 65536 and buf[65536:] == b"\x02" * (len(buf) - 65536)
    finally:
        blk.close()
    assert os.path.exists(top)
