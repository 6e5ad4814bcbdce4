"""Interop with qemu-img/qemu-io both ways, for each cluster size and version."""
import random

import pytest

import pyrep
from pyrep.constants import BS_ALLOCATED, BS_DATA, BS_ZERO

from helpers.qcow2 import open_q, random_model_op
from helpers.referees import compare_with_model, needs_qemu, qcheck, qimg, qio, qmap

pytestmark = needs_qemu

SIZES = [512, 4096, 65536, 2 * 1024 * 1024]
COMPAT = ["0.10", "1.1"]


@pytest.mark.parametrize("cluster_size", SIZES)
@pytest.mark.parametrize("compat", COMPAT)
def test_qemu_made_image_read_write(tmp_path, cluster_size, compat):
    img = tmp_path / "a.qcow2"
    size = 8 * 1024 * 1024
    qimg("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size},compat={compat}", img, str(size))
    model = bytearray(size)
    # qemu writes some data first
    qio(img, "write -P 0x11 0 100k", "write -P 0x22 3M 1M", "write -z 3584k 64k")
    model[0:100 * 1024] = b"\x11" * (100 * 1024)
    model[3 << 20:4 << 20] = b"\x22" * (1 << 20)
    model[3584 * 1024:3648 * 1024] = bytes(64 * 1024)
    rng = random.Random(cluster_size * 7 + len(compat))
    blk = open_q(img)
    try:
        assert blk.pread(0, 200 * 1024) == bytes(model[:200 * 1024])
        assert blk.pread(3 << 20, 1 << 20) == bytes(model[3 << 20:4 << 20])
        for i in range(60):
            random_model_op(blk, model, rng, 300000, 0.6, 0.2, cluster_size)
            if i % 10 == 0:
                blk.flush()
                roff = rng.randrange(0, size - 4096)
                assert blk.pread(roff, 4096) == bytes(model[roff:roff + 4096])
        assert blk.pread(0, size) == bytes(model)
    finally:
        blk.close()
    qcheck(img)
    compare_with_model(img, model, tmp_path)


@pytest.mark.parametrize("cluster_size", [512, 65536])
@pytest.mark.parametrize("compat", COMPAT)
def test_pyrep_created_image_read_by_qemu(tmp_path, cluster_size, compat):
    img = tmp_path / "p.qcow2"
    pyrep.create_image(str(img), "qcow2", 16 << 20, cluster_size=cluster_size, compat=compat)
    info = qimg("info", img).stdout
    ref = tmp_path / "ref.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size},compat={compat}", ref, str(16 << 20))
    refinfo = qimg("info", ref).stdout
    strip = lambda s: [l for l in s.splitlines() if not l.startswith(("image:", "disk size:"))]  # noqa: E731
    assert strip(info) == strip(refinfo)
    qcheck(img)
    blk = open_q(img)
    blk.pwrite(0, b"\xab" * 5000)
    blk.pwrite(1 << 20, b"\xcd" * (3 << 20))
    blk.pwrite_zeroes(2 << 20, 1 << 20)
    blk.close()
    qcheck(img)
    qio(img, "read -P 0xab 0 5000", "read -P 0 5000 1043576", "read -P 0xcd 1M 1M", "read -P 0 2M 1M",
        "read -P 0xcd 3M 1M", "read -P 0 4M 12M")


def _pyrep_map(path):
    blk = open_q(path, read_only=True)
    try:
        out = []
        pos, size = 0, blk.length
        while pos < size:
            st = blk.block_status(pos, size - pos)
            out.append((pos, st.length, bool(st.flags & BS_DATA), bool(st.flags & BS_ZERO),
                        st.offset if st.flags & BS_DATA and st.offset is not None else None,
                        bool(st.flags & BS_ALLOCATED)))
            pos += st.length
        return out
    finally:
        blk.close()


def _normalize(extents):
    """Merge adjacent extents with the same (data, zero, contiguous offset)."""
    out = []
    for start, length, data, zero, off in extents:
        if out:
            s, l, d, z, o = out[-1]
            if d == data and z == zero and ((o is None and off is None) or (o is not None and off == o + l)):
                out[-1] = (s, l + length, d, z, o)
                continue
        out.append((start, length, data, zero, off))
    return out


@pytest.mark.parametrize("compat", COMPAT)
def test_map_agrees_with_block_status(tmp_path, compat):
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", base, "4M")
    qio(base, "write -P 1 0 1M")
    pyrep.create_image(str(top), "qcow2", 4 << 20, backing_file="base.qcow2", backing_fmt="qcow2", compat=compat)
    blk = open_q(top)
    blk.pwrite(512 * 1024, b"\x02" * 300000)
    blk.pwrite(2 << 20, b"\x03" * 65536)
    blk.pwrite_zeroes(3 << 20, 128 * 1024)
    blk.close()
    qcheck(top)
    qm = [(e["start"], e["length"], e["data"], e["zero"], e.get("offset") if e["depth"] == 0 else None)
          for e in qmap(top) if e["depth"] == 0 and e["present"]]
    pm = [(s, l, d, z, o) for s, l, d, z, o, alloc in _pyrep_map(top) if alloc]
    assert _normalize(pm) == _normalize(qm)


@pytest.mark.parametrize("cluster_size", [4096, 65536])
def test_compressed_images(tmp_path, cluster_size):
    src = tmp_path / "src.raw"
    rng = random.Random(5)
    data = bytearray()
    for i in range(64):
        chunk = (bytes([i]) * 3000 + bytes(rng.randrange(256) for _ in range(100))) * 10
        data += chunk[:32768]
    data = bytes(data) + bytes(1 << 20)
    src.write_bytes(data)
    img = tmp_path / "c.qcow2"
    qimg("convert", "-q", "-c", "-O", "qcow2", "-o", f"cluster_size={cluster_size}", "-f", "raw", src, img)
    info = qimg("check", "--output=json", img).stdout
    assert '"compressed-clusters"' in info
    blk = open_q(img)
    try:
        assert blk.pread(0, len(data)) == data
        # overwrite inside a compressed cluster: it is reallocated
        model = bytearray(data)
        blk.pwrite(cluster_size + 100, b"\xee" * 200)
        model[cluster_size + 100:cluster_size + 300] = b"\xee" * 200
        blk.pwrite_zeroes(4 * cluster_size, cluster_size)
        model[4 * cluster_size:5 * cluster_size] = bytes(cluster_size)
        assert blk.pread(0, len(model)) == bytes(model)
    finally:
        blk.close()
    qcheck(img)
    compare_with_model(img, model, tmp_path)


@pytest.mark.parametrize("bits", [1, 8, 32, 64])
def test_refcount_widths(tmp_path, bits):
    img = tmp_path / "r.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", f"refcount_bits={bits},cluster_size=4096", img, "4M")
    qio(img, "write -P 7 0 256k")
    blk = open_q(img)
    assert blk.pread(0, 256 * 1024) == b"\x07" * (256 * 1024)
    blk.pwrite(1 << 20, b"\x08" * (1 << 20))
    blk.close()
    qcheck(img)
    qio(img, "read -P 7 0 256k", "read -P 8 1M 1M")
    res = pyrep.check_image(str(img))
    assert res["corruptions"] == 0 and res["leaks"] == 0, res
