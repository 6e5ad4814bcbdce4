"""pyrep-img where a mistake would cost data or break a qemu-img script: images in use are never
overwritten, bad options and values are refused by name, exit codes and streams follow qemu-img."""
import json
import os

import pytest

from helpers.locks import qemu_io_holding
from helpers.referees import needs, pimg, qimg, qio

pytestmark = needs("qemu-img", "qemu-io")
MiB = 1 << 20


@pytest.fixture
def img(tmp_path):
    p = tmp_path / "a.qcow2"
    qimg("create", "-q", "-f", "qcow2", p, "10M", check=0)
    qio(p, "write -P 0x41 0 1M", "write -P 0x42 5M 64k")
    return p


def test_convert_onto_its_own_source_is_refused_and_keeps_it(img):
    for fmt in ("qcow2", "raw"):
        p = pimg("convert", "-O", fmt, img, img)
        assert p.returncode == 1 and 'Failed to get "write" lock' in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
    qio(img, "read -P 0x41 0 1M", "read -P 0x42 5M 64k")


def test_create_or_convert_over_an_image_in_use_is_refused(img, tmp_path):
    with qemu_io_holding(img, fmt="qcow2"):         # entered once qemu-io holds its locks
        p = pimg("create", "-f", "qcow2", img, "1M")
        assert p.returncode == 1 and 'Failed to get "write" lock' in p.stderr, p.stderr
        src = tmp_path / "src.raw"
        src.write_bytes(b"\x07" * MiB)
        p = pimg("convert", "-O", "qcow2", src, img)
        assert p.returncode == 1 and 'Failed to get "write" lock' in p.stderr, p.stderr
    qio(img, "read -P 0x41 0 1M", "read -P 0x42 5M 64k")


def test_target_size_below_the_source_is_refused(img, tmp_path):
    out = tmp_path / "t.qcow2"
    p = pimg("convert", "-O", "qcow2", "--target-size", "1M", img, out)
    assert p.returncode == 1 and "smaller than the source" in p.stderr
    pimg("convert", "-O", "qcow2", "--target-size", "12M", img, out, check=0)
    assert json.loads(qimg("info", "--output=json", out).stdout)["virtual-size"] == 12 * MiB


@pytest.mark.parametrize("size", [3000000, 3, 65536 * 3 + 700])
def test_compressed_convert_of_a_raw_file_of_any_size(tmp_path, size):
    src, out = tmp_path / "odd.raw", tmp_path / "c.qcow2"
    src.write_bytes((b"compressible " * (size // 13 + 1))[:size])
    pimg("convert", "-c", "-O", "qcow2", src, out, check=0)
    qimg("compare", src, out, check=0)
    res = json.loads(qimg("check", "--output=json", out).stdout)
    assert not res.get("corruptions") and not res.get("leaks") and res.get("compressed-clusters", 0) >= 1


@pytest.mark.parametrize("args,msg", [
    (["create", "-f", "raw", "-o", "foo=bar", "{d}/y.raw", "1M"], "Invalid parameter 'foo' for format 'raw'"),
    (["create", "-f", "qcow2", "-o", "lazy_refcounts=maybe", "{d}/y.qcow2", "1M"], "lazy_refcounts"),
    (["create", "-f", "qcow2", "-o", "size=2M", "{d}/y.qcow2", "3M"], "Image size must be specified only once"),
    (["create", "-f", "raw", "-o", "cluster_size=64k", "{d}/y.raw", "1M"], "Invalid parameter 'cluster_size'"),
    (["map", "-s", "-1", "{img}"], "Invalid start offset specified"),
    (["map", "-l", "abc", "{img}"], "Invalid length specified"),
])
def test_bad_options_and_values_are_one_clear_error(img, tmp_path, args, msg):
    p = pimg(*[a.format(d=tmp_path, img=img) for a in args])
    assert p.returncode == 1 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "y.raw").exists() and not (tmp_path / "y.qcow2").exists()


def test_valid_create_options_and_hex_sizes(tmp_path):
    r, q = tmp_path / "p.raw", tmp_path / "q.qcow2"
    pimg("create", "-f", "raw", "-o", "preallocation=falloc", r, "0x100000", check=0)
    assert os.path.getsize(r) == MiB and os.stat(r).st_blocks * 512 >= MiB
    pimg("create", "-f", "qcow2", "-o", "cluster_size=4k,lazy_refcounts=on", q, "1M", check=0)
    info = json.loads(qimg("info", "--output=json", q).stdout)
    assert info["cluster-size"] == 4096 and info["format-specific"]["data"]["lazy-refcounts"] is True


def test_compare_errors_exit_2_and_progress_follows_qemu(img, tmp_path):
    assert pimg("compare", "-T", "bogus", img, img).returncode == qimg("compare", "-T", "bogus", img, img, check=None).returncode
    out = tmp_path / "o.raw"
    p = pimg("convert", "-p", "-O", "raw", img, out, check=0)
    assert "(100.00/100%)" in p.stdout and "/100%" not in p.stderr      # on stdout, as qemu-img draws it
    p = pimg("convert", "-q", "-p", "-O", "raw", img, out, check=0)
    assert p.stdout == "" and p.stderr == ""                            # -q silences it


def test_commit_into_a_base_with_bitmaps_and_a_relative_base_path(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "sub").mkdir()
    base, mid, top = tmp_path / "base" / "b.qcow2", tmp_path / "sub" / "mid.qcow2", tmp_path / "sub" / "top.qcow2"
    qimg("create", "-q", "-f", "qcow2", base, "4M", check=0)
    qimg("bitmap", "--add", base, "bm0", check=0)                  # the base needs a write when opened rw
    qimg("create", "-q", "-f", "qcow2", "-b", "../base/b.qcow2", "-F", "qcow2", mid, check=0)
    qimg("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top, check=0)
    qio(top, "write -P 0x33 0 64k")
    # -b relative to the image's directory, as qemu-img resolves it
    p = pimg("commit", "-b", "../base/b.qcow2", top)
    assert p.returncode == 0, p.stderr
    qio(base, "read -P 0x33 0 64k")
    res = json.loads(qimg("check", "--output=json", base).stdout)
    assert not res.get("corruptions") and not res.get("leaks")
    bitmaps = json.loads(qimg("info", "--output=json", base).stdout)["format-specific"]["data"]["bitmaps"]
    assert bitmaps[0]["name"] == "bm0" and "in-use" in bitmaps[0]["flags"]   # written, not tracked


def test_convert_S0_fully_allocates_and_bad_S_is_refused_first(img, tmp_path):
    q, r = tmp_path / "full.qcow2", tmp_path / "full.raw"
    pimg("convert", "-S", "0", "-O", "qcow2", img, q, check=0)
    res = json.loads(qimg("check", "--output=json", q).stdout)
    assert res["allocated-clusters"] == res["total-clusters"] == 160      # as qemu-img -S 0
    qimg("compare", img, q, check=0)
    pimg("convert", "-S", "0", "-O", "raw", img, r, check=0)
    assert os.stat(r).st_blocks * 512 >= 10 * MiB
    bad = tmp_path / "bad.raw"
    p = pimg("convert", "-S", "1", "-O", "raw", img, bad)
    assert p.returncode == 1 and "Invalid buffer size for sparse output" in p.stderr and not bad.exists()


def test_raw_files_of_odd_size_are_whole_sectors_as_in_qemu(tmp_path):
    odd, o1, o2 = tmp_path / "odd.raw", tmp_path / "o1.raw", tmp_path / "o2.raw"
    odd.write_bytes(os.urandom(3000000))
    for cmd in (["map", "--output=json", odd], ["map", odd]):
        assert pimg(*cmd, check=0).stdout == qimg(*cmd, check=0).stdout, cmd
    mine = json.loads(pimg("info", "--output=json", odd, check=0).stdout)
    assert mine["virtual-size"] == json.loads(qimg("info", "--output=json", odd).stdout)["virtual-size"] == 3000320
    o1.write_bytes(b"\x01" * 1000)
    o2.write_bytes(b"\x01" * 1000 + bytes(24))
    mine, theirs = pimg("compare", o1, o2), qimg("compare", o1, o2, check=None)
    assert (mine.returncode, mine.stdout) == (theirs.returncode, theirs.stdout) == (0, "Images are identical.\n")
    pimg("create", "-q", "-f", "raw", tmp_path / "c.raw", "1000", check=0)
    assert os.path.getsize(tmp_path / "c.raw") == 1024
    pimg("convert", "-O", "raw", odd, tmp_path / "p.raw", check=0)
    qimg("convert", "-O", "raw", odd, tmp_path / "q.raw", check=0)
    assert (tmp_path / "p.raw").read_bytes() == (tmp_path / "q.raw").read_bytes()


def test_strict_compare_tells_compressed_from_plain_clusters(img, tmp_path):
    c = tmp_path / "c.qcow2"
    qimg("convert", "-c", "-O", "qcow2", img, c, check=0)
    for args in (("-s", img, c), ("-s", img, img), (img, c)):
        mine, theirs = pimg("compare", *args), qimg("compare", *args, check=None)
        assert (mine.returncode, mine.stdout) == (theirs.returncode, theirs.stdout), args


@pytest.mark.parametrize("cmd", [["create", "-f", "qcow2", "-o", "help"], ["convert", "-O", "qcow2", "-o", "help"],
                                 ["create", "-f", "raw", "-o", "?"]])
def test_o_help_lists_the_creation_options(cmd):
    p = pimg(*cmd, check=0)
    fmt = cmd[cmd.index("-f" if "-f" in cmd else "-O") + 1]
    assert p.stdout.startswith(f"Supported {fmt} options:\n") and "  size=<size>" in p.stdout
    if fmt == "qcow2":
        for name in ("cluster_size", "compat", "lazy_refcounts", "refcount_bits", "backing_file"):
            assert f"  {name}=<" in p.stdout, name
