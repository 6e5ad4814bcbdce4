"""pyrep-img convert's copy engine (tools/img/copier.py): every path of it against real files and qemu-img.

The source is a 3-deep qcow2 chain with data in every layer, zero clusters, discarded (unallocated)
clusters, data clusters that hold zeroes, extents that are not aligned to the engine's 1 MiB jobs
(4 KiB clusters in the top layer) and an odd-sized last cluster; outputs are checked with
``qemu-img compare`` / ``check`` and their allocation with ``qemu-img map``.
"""
import json
import random

import pytest

import pyrep
from pyrep._core.copy import nonzero_runs

from helpers.referees import needs, pimg, qimg, qio

pytestmark = needs("qemu-img", "qemu-io")

MiB = 1 << 20
SIZE = 24 * MiB + 4096 + 512     # not a multiple of any cluster size


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    d = tmp_path_factory.mktemp("chain")
    base, mid, top = d / "base.qcow2", d / "mid.qcow2", d / "top.qcow2"
    qimg("create", "-q", "-f", "qcow2", base, SIZE)
    qio(base, "write -P 0x11 0 6M", "write -P 0x12 8M 8M", f"write -P 0x13 {SIZE - 8192} 8192",
        "write -P 0 20M 1M")                      # data clusters holding zeroes
    qimg("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", mid)
    qio(mid, "write -P 0x22 1M 64k", "write -z 2M 1M",              # a zero cluster run over base data
        "write -P 0x23 7M 1536k", "write -P 0x24 15M 512k")
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", mid.name, "-F", "qcow2", top)
    qio(top, "write -P 0x33 4096 4096", "write -P 0x34 1044480 8192",  # across a 1 MiB job boundary
        "write -z 9M 12k", "discard 10M 64k",       # discard: unallocated here, reads the layers below
        "write -P 0x35 17M 300k", f"write -P 0x36 {SIZE - 4096 - 512} 4608")
    return base, mid, top


def data_ranges(img):
    """[(start, length)] of the ranges qemu-img map reports as data, merged."""
    out = []
    for e in json.loads(qimg("map", "--output=json", img).stdout):
        if e["data"] and not e.get("zero"):
            if out and out[-1][0] + out[-1][1] == e["start"]:
                out[-1] = (out[-1][0], out[-1][1] + e["length"])
            else:
                out.append((e["start"], e["length"]))
    return out


@pytest.mark.parametrize("opts", [[], ["-m", "1"], ["-m", "4"], ["-W"], ["-W", "-m", "3"], ["-p"]])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_chain(tmp_path, chain, fmt, opts):
    _, _, top = chain
    out = tmp_path / f"out.{fmt}"
    p = pimg("convert", "-O", fmt, *opts, top, out, check=0)
    if "-p" in opts:
        assert "(100.00/100%)" in p.stdout
    qimg("compare", top, out)
    if fmt == "qcow2":
        qimg("check", out)
    # what qemu-img convert leaves sparse, pyrep-img does too (zero clusters, unallocated and zero data)
    ref = tmp_path / f"ref.{fmt}"
    qimg("convert", "-O", fmt, top, ref)
    assert data_ranges(out) == data_ranges(ref)


def test_convert_raw_to_qcow2_sparse_data(tmp_path):
    """A raw source whose data holds zero granules (not holes): they stay out of the qcow2 target."""
    rng = random.Random(3)
    src = tmp_path / "src.raw"
    data = bytearray(5 * MiB + 512)
    for off in range(0, len(data), 64 * 1024):
        if rng.random() < 0.6:
            data[off:off + 64 * 1024] = rng.randbytes(64 * 1024)[:len(data) - off]
    src.write_bytes(bytes(data))
    for opts in ([], ["-m", "2", "-W"], ["-S", "0"]):
        out = tmp_path / "out.qcow2"
        out.unlink(missing_ok=True)
        pimg("convert", "-O", "qcow2", *opts, src, out, check=0)
        qimg("compare", "-f", "raw", src, out)
        qimg("check", out)
        if not opts or "-W" in opts:
            ref = tmp_path / "ref.qcow2"
            ref.unlink(missing_ok=True)
            qimg("convert", "-O", "qcow2", src, ref)
            assert data_ranges(out) == data_ranges(ref)


def test_convert_into_existing_target(tmp_path, chain):
    """-n: the target holds data everywhere, so zero ranges of the source must be written as zeroes."""
    _, _, top = chain
    out = tmp_path / "full.qcow2"
    qimg("create", "-q", "-f", "qcow2", out, SIZE)
    qio(out, f"write -P 0x77 0 {SIZE}")
    pimg("convert", "-n", "-O", "qcow2", top, out, check=0)
    qimg("compare", top, out)
    qimg("check", out)


def test_convert_overlay_with_backing(tmp_path, chain):
    """-B: only what the top layer allocates is copied; the rest stays with the target's backing file."""
    _, mid, top = chain
    out = tmp_path / "ov.qcow2"
    pimg("convert", "-O", "qcow2", "-B", mid, "-F", "qcow2", "-m", "3", top, out, check=0)
    qimg("compare", top, out)
    qimg("check", out)
    entries = json.loads(qimg("map", "--output=json", out).stdout)
    assert sum(e["length"] for e in entries if e["depth"] == 0 and e["data"]) < 2 * MiB


@pytest.mark.parametrize("opts", [[], ["-W", "-m", "4"]])
def test_convert_compressed(tmp_path, chain, opts):
    _, _, top = chain
    out = tmp_path / "c.qcow2"
    pimg("convert", "-c", "-O", "qcow2", *opts, top, out, check=0)
    qimg("compare", top, out)
    res = json.loads(qimg("check", "--output=json", out).stdout)
    assert res["compressed-clusters"] > 0 and not res.get("leaks") and not res.get("corruptions")


def test_convert_bad_coroutines(tmp_path, chain):
    _, _, top = chain
    out = tmp_path / "x.raw"
    for m in ("0", "17"):
        p = pimg("convert", "-m", m, "-O", "raw", top, out, check=1)
        assert "Invalid number of coroutines" in p.stderr
    assert not out.exists()


@pytest.mark.parametrize("where", ["source", "target"])
@pytest.mark.parametrize("readers", [1, 3])
def test_engine_io_error_is_raised_not_hung(tmp_path, where, readers):
    """An I/O error in a reader or in the writer thread ends the copy with that error (blkdebug injects
    it into real files); the threads are joined, nothing hangs."""
    from pyrep.tools.img.copier import Copier
    from pyrep.tools.img.image import status_above
    src, dst = tmp_path / "s.raw", tmp_path / "d.raw"
    src.write_bytes(b"\x5a" * (8 * MiB))
    dst.write_bytes(b"")
    with open(dst, "r+b") as f:
        f.truncate(8 * MiB)
    rule = [{"op": "read" if where == "source" else "write", "offset": 5 * MiB, "length": 4096}]

    def opts(path, bad, ro):
        f = {"driver": "file", "filename": str(path)}
        if bad:
            f = {"driver": "blkdebug", "inject-error": rule, "file": f}
        return {"driver": "raw", "file": f, "read-only": ro}

    s = pyrep.open_backend(opts(src, where == "source", True), read_only=True)
    d = pyrep.open_backend(opts(dst, where == "target", False))
    try:
        with pytest.raises(pyrep.BlockError) as ei:
            Copier(s, d, 8 * MiB, status=status_above, readers=readers).run()
        assert "injected error" in str(ei.value)
    finally:
        s.close()
        d.close()


def test_nonzero_runs():
    rng = random.Random(11)
    for _ in range(500):
        n = rng.randrange(0, 20000)
        gran = rng.choice([1, 8, 63, 64, 65, 512, 4096])
        buf = bytearray(n)
        for _ in range(rng.randrange(0, 6)):
            if n:
                buf[rng.randrange(n)] = rng.randrange(1, 256)
        want, start = [], None
        for pos in range(0, n, gran):
            nz = any(buf[pos:pos + gran])
            if nz and start is None:
                start = pos
            elif not nz and start is not None:
                want.append((start, pos - start))
                start = None
        if start is not None:
            want.append((start, n - start))
        assert nonzero_runs(buf, n, gran) == want
    with pytest.raises(ValueError):
        nonzero_runs(bytearray(10), 11, 4)
    with pytest.raises(ValueError):
        nonzero_runs(bytearray(10), 10, 0)
