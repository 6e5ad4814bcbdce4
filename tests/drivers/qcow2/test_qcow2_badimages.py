"""Bad images are refused with a clear BlockError/OptionError, before any write to them."""
import struct

import pytest

import pyrep
from pyrep.errors import BlockError, OptionError

from helpers.qcow2 import open_q
from helpers.referees import needs_qemu, qimg

pytestmark = needs_qemu


def _image(tmp_path, compat="1.1", name="bad.qcow2"):
    img = tmp_path / name
    qimg("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", img, "1M")
    return img


def _patch(path, offset, fmt, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def _refused(img, match, read_only=False):
    before = img.read_bytes()
    with pytest.raises((BlockError, OptionError)) as ei:
        open_q(img, read_only=read_only).close()
    assert match in str(ei.value), str(ei.value)
    assert "qcow2" in str(ei.value)
    assert img.read_bytes() == before, "a refused image was written to"
    return str(ei.value)


CASES = [
    # (name, offset, fmt, value, expected message part)
    ("version", 4, ">I", 4, "unsupported qcow2 version 4"),
    ("cluster_bits_small", 20, ">I", 8, "cluster_bits 8 out of range"),
    ("cluster_bits_big", 20, ">I", 22, "cluster_bits 22 out of range"),
    ("size_absurd", 24, ">Q", 1 << 63, "virtual size"),
    ("l1_size_absurd", 36, ">I", 0x7FFFFFFF, "L1 table too large"),
    ("l1_past_eof", 40, ">Q", 1 << 40, "past the end of the file"),
    ("l1_in_header", 40, ">Q", 0, "overlaps the header"),
    ("l1_misaligned", 40, ">Q", 0x30008, "not aligned"),
    ("reftable_past_eof", 48, ">Q", 1 << 40, "refcount table at offset"),
    ("reftable_in_header", 48, ">Q", 0, "overlaps the header"),
    ("reftable_huge", 56, ">I", 1 << 20, "refcount table too large"),
    ("refcount_order", 96, ">I", 7, "refcount_order 7"),
    ("header_length_small", 100, ">I", 8, "header_length 8"),
    ("header_length_huge", 100, ">I", 1 << 20, "header_length"),
    ("backing_name_long", 16, ">I", 5000, "backing file name"),
]


@pytest.mark.parametrize("name,offset,fmt,value,match", CASES, ids=[c[0] for c in CASES])
def test_bad_header_fields(tmp_path, name, offset, fmt, value, match):
    img = _image(tmp_path)
    if name == "backing_name_long":
        _patch(img, 8, ">Q", 0x200)
    _patch(img, offset, fmt, value)
    _refused(img, match)


def test_truncated_header(tmp_path):
    img = _image(tmp_path)
    with open(img, "r+b") as f:
        f.truncate(50)
    _refused(img, "too short")
    img2 = _image(tmp_path, name="b.qcow2")
    with open(img2, "r+b") as f:
        f.truncate(90)
    _refused(img2, "truncated")


def test_not_qcow2(tmp_path):
    img = _image(tmp_path)
    _patch(img, 0, ">I", 0x12345678)
    _refused(img, "bad magic")


def test_unknown_incompatible_feature_named_from_table(tmp_path):
    img = _image(tmp_path)
    data = bytearray(img.read_bytes()[:4096])
    # rename the feature-table entry of incompatible bit 4 to bit 9 "frobnication"
    i = data.index(b"extended L2 entries")
    assert data[i - 2:i] == b"\x00\x04"
    data[i - 1] = 9
    data[i:i + 46] = b"frobnication".ljust(46, b"\0")
    with open(img, "r+b") as f:
        f.write(data)
    _patch(img, 72, ">Q", 1 << 9)
    msg = _refused(img, "frobnication")
    assert "bit 9" in msg
    # a bit without a name
    _patch(img, 72, ">Q", 1 << 20)
    _refused(img, "bit 20")
    # a known but unsupported one: extended L2 entries (qemu's own name is in its table? we renamed it,
    # so our built-in name is used)
    _patch(img, 72, ">Q", 1 << 4)
    _refused(img, "extended L2 entries")


def test_backing_loop_self(tmp_path):
    img = _image(tmp_path)
    qimg("rebase", "-u", "-b", img.name, "-F", "qcow2", img)
    _refused(img, "loop", read_only=True)


def test_backing_loop_two(tmp_path):
    a = _image(tmp_path, name="a.qcow2")
    b = _image(tmp_path, name="b.qcow2")
    qimg("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
    qimg("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", b)
    before = a.read_bytes()
    with pytest.raises((BlockError, OptionError)) as ei:
        open_q(a, read_only=True).close()
    assert "loop" in str(ei.value) or "chain" in str(ei.value), str(ei.value)
    assert a.read_bytes() == before


def test_corrupt_bit(tmp_path):
    img = _image(tmp_path)
    qimg("create", "-q", "-f", "qcow2", img, "1M")
    from helpers.referees import qio
    qio(img, "write -P 5 0 64k")
    _patch(img, 72, ">Q", 2)
    msg = _refused(img, "corrupt")
    assert "read/write" in msg
    blk = open_q(img, read_only=True)
    assert blk.pread(0, 65536) == b"\x05" * 65536
    blk.close()


def test_l2_entry_beyond_eof_detected_by_check(tmp_path):
    img = _image(tmp_path)
    from helpers.referees import qcheck, qio
    qio(img, "write -P 5 0 64k")
    # L1 at 0x30000 -> L2 table; make its first entry point far past EOF
    l2 = struct.unpack(">Q", img.read_bytes()[0x30000:0x30008])[0] & 0x00FFFFFFFFFFFE00
    _patch(img, l2, ">Q", (1 << 63) | (1 << 36))
    res = pyrep.check_image(str(img))
    assert res["corruptions"] >= 1
    assert any("past the end" in m for m in res["messages"])
    res = pyrep.check_image(str(img), repair="all")
    assert res["corruptions"] == 0 and res["corruptions-fixed"] >= 1
    qcheck(img)


def test_corrupt_bit_repair_open(tmp_path):
    from helpers.referees import qcheck, qio
    img = _image(tmp_path)
    qio(img, "write -P 5 0 64k")
    _patch(img, 72, ">Q", 2)
    blk = open_q(img, **{"x-check-repair": True})
    try:
        with pytest.raises(BlockError) as ei:
            blk.pwrite(0, b"x")
        assert "corrupt" in str(ei.value)
        res = blk.node.driver.check("all")
        assert res["corruptions"] == 0
        blk.pwrite(0, b"\x06" * 512)   # repaired: writable again
    finally:
        blk.close()
    assert struct.unpack(">Q", img.read_bytes()[72:80])[0] == 0
    qcheck(img)
    qio(img, "read -P 6 0 512", "read -P 5 512 65024")
