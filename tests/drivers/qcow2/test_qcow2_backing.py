"""Backing files named in a qcow2 header are opened through the option layer, as any filename is:
``json:{...}`` pseudo-filenames (qemu-img writes them, QEMU opens them) and loops between images."""
import errno
import json

import pytest

import pyrep
from pyrep import BlockError, OptionError

from helpers.qcow2 import open_q
from helpers.referees import needs_qemu, qimg, qio

pytestmark = needs_qemu


def _json_name(options):
    return "json:" + json.dumps(options)


def _overlay(tmp_path, backing_name, fmt, name="top.qcow2"):
    top = tmp_path / name
    qimg("create", "-q", "-f", "qcow2", "-b", backing_name, "-F", fmt, top, "4M")
    return top


def test_json_backing_of_a_qcow2_base_opens_and_reads_through(tmp_path):
    base = tmp_path / "base.qcow2"
    qimg("create", "-q", "-f", "qcow2", base, "4M")
    qio(base, "write -P 0x5a 0 64k", "write -P 0x3c 1M 4k")
    name = _json_name({"driver": "qcow2", "file": {"driver": "file", "filename": str(base)}})
    top = _overlay(tmp_path, name, "qcow2")
    qio(top, "read -P 0x5a 0 64k", "read -P 0x3c 1M 4k")          # QEMU opens it
    blk = open_q(top)
    try:
        assert blk.node.backing is not None
        assert blk.node.backing.drv.format_name == "qcow2"
        assert blk.node.backing.file.filename == str(base)
        assert blk.node.backing.read_only
        assert blk.pread(0, 65536) == b"\x5a" * 65536
        assert blk.pread(1 << 20, 4096) == b"\x3c" * 4096
        blk.pwrite(4096, b"\x11" * 512)                     # copy-on-write from the json: backing
        assert blk.pread(0, 8192) == b"\x5a" * 4096 + b"\x11" * 512 + b"\x5a" * 3584
    finally:
        blk.close()
    qio(top, "read -P 0x5a 0 4k", "read -P 0x11 4k 512", "read -P 0x5a 4608 60928")
    assert "backing file: " + name in qimg("info", top).stdout    # the name is kept as written


def test_json_backing_without_a_driver_takes_the_header_format(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x77" * (1 << 20) + bytes(3 << 20))
    name = _json_name({"file": {"driver": "file", "filename": str(base)}})
    top = _overlay(tmp_path, name, "raw")
    blk = open_q(top, read_only=True)
    try:
        assert blk.node.backing.drv.format_name == "raw"
        assert blk.pread(0, 4096) == b"\x77" * 4096
        assert blk.pread(1 << 20, 4096) == bytes(4096)
    finally:
        blk.close()


def test_json_backing_naming_a_missing_file_is_enoent(tmp_path):
    base = tmp_path / "base.qcow2"
    qimg("create", "-q", "-f", "qcow2", base, "4M")
    top = _overlay(tmp_path, _json_name({"driver": "qcow2", "file": {"driver": "file", "filename": str(base)}}),
                   "qcow2")
    base.unlink()
    before = set(pyrep.nodes())
    with pytest.raises(BlockError) as ei:
        open_q(top)
    assert ei.value.errno == errno.ENOENT
    assert str(base) in str(ei.value)
    assert set(pyrep.nodes()) == before                     # nothing stays open


def test_json_backing_that_is_not_json_names_the_problem(tmp_path):
    base = tmp_path / "base.qcow2"
    qimg("create", "-q", "-f", "qcow2", base, "4M")
    top = _overlay(tmp_path, "base.qcow2", "qcow2")
    # rewrite the name in place with a broken json: one of the same length
    bad = 'json:{"x'.ljust(len("base.qcow2"), "y")
    data = bytearray(top.read_bytes())
    at = data.index(b"base.qcow2")
    data[at:at + len(bad)] = bad.encode()
    top.write_bytes(bytes(data))
    with pytest.raises(OptionError, match="json"):
        open_q(top, read_only=True)


def test_json_backing_that_loops_back_to_the_image_is_refused(tmp_path):
    a = tmp_path / "a.qcow2"
    qimg("create", "-q", "-f", "qcow2", a, "4M")
    qimg("rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b",
         _json_name({"driver": "qcow2", "file": {"driver": "file", "filename": str(a)}}), a)
    before = set(pyrep.nodes())
    with pytest.raises(OptionError, match="loops"):
        open_q(a, read_only=True)
    assert set(pyrep.nodes()) == before


def test_loop_through_a_json_name_and_a_plain_name_is_refused(tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qimg("create", "-q", "-f", "qcow2", a, "4M")
    qimg("create", "-q", "-f", "qcow2", "-b", _json_name({"driver": "qcow2", "file": {
        "driver": "file", "filename": str(a)}}), "-F", "qcow2", b)
    qimg("rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", "b.qcow2", a)
    with pytest.raises(OptionError, match="loops"):
        open_q(b, read_only=True)
    with pytest.raises(OptionError, match="loops"):
        open_q(a, read_only=True)


def test_create_without_a_size_takes_it_from_a_json_backing(tmp_path):
    base = tmp_path / "base.qcow2"
    qimg("create", "-q", "-f", "qcow2", base, "3M")
    name = _json_name({"driver": "qcow2", "file": {"driver": "file", "filename": str(base)}})
    top = tmp_path / "top.qcow2"
    pyrep.create_image(str(top), "qcow2", None, backing_file=name, backing_fmt="qcow2")
    info = json.loads(qimg("info", "--output=json", top).stdout)
    assert info["virtual-size"] == 3 << 20
    assert info["backing-filename"] == name and info["backing-filename-format"] == "qcow2"
    from pyrep.drivers.qcow2.driver import Qcow2Driver     # the driver's own create, with no size
    top2 = tmp_path / "top2.qcow2"
    Qcow2Driver.create(str(top2), None, {"backing_file": name, "backing_fmt": "qcow2"})
    assert json.loads(qimg("info", "--output=json", top2).stdout)["virtual-size"] == 3 << 20


def test_create_options_are_parsed_by_the_option_layer(tmp_path):
    from pyrep.drivers.qcow2.driver import Qcow2Driver
    img = tmp_path / "c.qcow2"
    Qcow2Driver.create(str(img), "2M", {"cluster_size": "4K", "lazy_refcounts": "on"})
    info = json.loads(qimg("info", "--output=json", img).stdout)
    assert info["cluster-size"] == 4096 and info["virtual-size"] == 2 << 20
    assert info["format-specific"]["data"]["lazy-refcounts"] is True
    with pytest.raises(OptionError, match=r"qcow2: option 'cluster_size'.*'lots'"):
        Qcow2Driver.create(str(tmp_path / "d.qcow2"), "2M", {"cluster_size": "lots"})
    with pytest.raises(OptionError, match=r"qcow2: option 'lazy_refcounts'.*'maybe'"):
        Qcow2Driver.create(str(tmp_path / "e.qcow2"), "2M", {"lazy_refcounts": "maybe"})
