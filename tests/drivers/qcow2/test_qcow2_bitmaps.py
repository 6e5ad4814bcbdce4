"""Persistent dirty bitmaps made by qemu-img: pyrep keeps them well-formed (flagged in use when it writes)
and referenced, so images stay clean for qemu-img check and QEMU can still list and remove them."""
import json
import struct

import pytest

import pyrep
from pyrep.errors import BlockError

from helpers.qcow2 import open_q
from helpers.referees import needs_qemu, qcheck, qimg, qio

pytestmark = needs_qemu
MB = 1 << 20


def _with_bitmaps(path):
    """A 16 MiB image with data and two bitmaps, one of them holding dirty bits (written after it)."""
    qimg("create", "-q", "-f", "qcow2", path, "16M")
    qio(path, "write -P 1 0 1M")
    qimg("bitmap", "--add", path, "b0")
    qimg("bitmap", "--add", "-g", "128K", path, "b1")
    qio(path, "write -P 2 2M 64k")


def _qemu_bitmaps(path):
    info = json.loads(qimg("info", "--output=json", path).stdout)
    return {b["name"]: sorted(b["flags"]) for b in info["format-specific"]["data"].get("bitmaps", [])}


def test_written_image_keeps_its_bitmaps_in_use_and_clean(tmp_path):
    img = tmp_path / "b.qcow2"
    _with_bitmaps(img)
    assert _qemu_bitmaps(img) == {"b0": ["auto"], "b1": ["auto"]}
    res = pyrep.check_image(str(img))       # the bitmaps' clusters are references, not leaks
    assert res["leaks"] == 0 and res["corruptions"] == 0, res["messages"]
    blk = open_q(img)
    blk.pwrite(4 * MB, b"\x05" * 65536)
    blk.close()
    qcheck(img)                             # clean, not "leaked clusters"
    assert _qemu_bitmaps(img) == {"b0": ["auto", "in-use"], "b1": ["auto", "in-use"]}
    res = pyrep.check_image(str(img), repair="leaks")       # repair must not free bitmap clusters
    assert res["leaks"] == 0 and res["leaks-fixed"] == 0
    qimg("bitmap", "--remove", img, "b0")   # QEMU can still handle them
    qcheck(img)
    assert _qemu_bitmaps(img) == {"b1": ["auto", "in-use"]}
    qio(img, "read -P 1 0 1M", "read -P 2 2M 64k", "read -P 5 4M 64k")


def test_pyrep_img_info_lists_bitmaps(tmp_path):
    import subprocess
    import sys
    img = tmp_path / "b.qcow2"
    _with_bitmaps(img)
    out = subprocess.run([sys.executable, "-m", "pyrep.tools.img", "info", "--output=json", str(img)],
                         capture_output=True, text=True, check=True).stdout
    bitmaps = json.loads(out)["format-specific"]["data"]["bitmaps"]
    assert bitmaps == [{"flags": ["auto"], "name": "b0", "granularity": 65536},
                       {"flags": ["auto"], "name": "b1", "granularity": 131072}]


def test_rebase_keeps_bitmaps_and_resize_is_refused(tmp_path):
    base, img = tmp_path / "base.qcow2", tmp_path / "b.qcow2"
    qimg("create", "-q", "-f", "qcow2", base, "16M")
    _with_bitmaps(img)
    blk = open_q(img)
    try:
        blk.node.driver.change_backing_file("base.qcow2", "qcow2")
        with pytest.raises(BlockError, match="persistent dirty bitmaps; resizing it is not supported"):
            blk.node.driver.truncate(32 * MB)
    finally:
        blk.close()
    qcheck(img)
    # no guest data changed: the bitmaps are still consistent, not flagged
    assert _qemu_bitmaps(img) == {"b0": ["auto"], "b1": ["auto"]}
    info = json.loads(qimg("info", "--output=json", img).stdout)
    assert info["backing-filename"] == "base.qcow2" and info["virtual-size"] == 16 * MB


def test_opening_read_write_without_writing_leaves_bitmaps_consistent(tmp_path):
    """Opened read/write and read from, or repaired: the bitmaps are not flagged in use; the first
    write of guest data flags them, before it reaches the file."""
    img = tmp_path / "b.qcow2"
    _with_bitmaps(img)
    blk = open_q(img)
    try:
        assert blk.pread(0, 4096) == b"\x01" * 4096
        blk.flush()
    finally:
        blk.close()
    assert pyrep.check_image(str(img), repair="all")["corruptions"] == 0
    assert _qemu_bitmaps(img) == {"b0": ["auto"], "b1": ["auto"]}
    blk = open_q(img)
    try:
        blk.pwrite_zeroes(8 * MB, 65536)
    finally:
        blk.close()
    assert _qemu_bitmaps(img) == {"b0": ["auto", "in-use"], "b1": ["auto", "in-use"]}
    qcheck(img)


def test_unparsable_bitmap_directory_is_dropped_not_trusted(tmp_path):
    """A bitmaps extension pointing past the end of the file: pyrep's check says so; opened read/write,
    the extension is declared stale (auto-clear bit cleared) so its clusters only leak."""
    img = tmp_path / "b.qcow2"
    _with_bitmaps(img)
    data = bytearray(img.read_bytes()[:65536])
    pos = struct.unpack_from(">I", data, 100)[0]    # header extensions follow the header (header_length)
    while True:
        etype, elen = struct.unpack_from(">II", data, pos)
        assert etype, "no bitmaps extension"
        if etype == 0x23852875:
            break
        pos += 8 + ((elen + 7) & ~7)
    struct.pack_into(">Q", data, pos + 8 + 16, 1 << 40)     # bitmap_directory_offset past EOF
    with open(img, "r+b") as f:
        f.write(data)
    res = pyrep.check_image(str(img))
    assert res["corruptions"] == 1 and any("bitmap directory" in m for m in res["messages"]), res["messages"]
    blk = open_q(img)
    blk.pwrite(4 * MB, b"\x05" * 4096)
    blk.close()
    res = json.loads(qimg("check", "--output=json", img, check=False).stdout)
    assert not res.get("corruptions") and res.get("leaks", 0) > 0
    qimg("check", "-q", "-r", "leaks", img, check=False)
    qcheck(img)
    qio(img, "read -P 1 0 1M", "read -P 5 4M 4k")
