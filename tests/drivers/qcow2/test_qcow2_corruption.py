"""Corruption met during I/O (not at open): the request fails with EIO saying what was found, every later
write is refused, a v3 image gets its corrupt bit on disk (QEMU then refuses to write it too), and what
is intact stays readable."""
import errno
import json
import struct

import pytest

import pyrep
from pyrep import BlockError

from helpers.qcow2 import open_q
from helpers.referees import needs_qemu, qcheck, qimg, qio, run

pytestmark = needs_qemu

CS = 4096                      # small clusters: one L2 table maps 2 MiB, so the image has four L1 entries
GOOD = 6 << 20                 # guest offset mapped through L1 entry 3, which no case breaks
COPIED = 1 << 63


def _geometry(img):
    with open(img, "rb") as f:
        h = f.read(104)
    l1_size, l1_off = struct.unpack_from(">IQ", h, 36)
    rt_off = struct.unpack_from(">Q", h, 48)[0]
    return l1_off, rt_off


def _u64(img, off):
    with open(img, "rb") as f:
        f.seek(off)
        return struct.unpack(">Q", f.read(8))[0]


def _put_u64(img, off, value):
    with open(img, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(">Q", value))


def _image(tmp_path, compat="1.1"):
    img = tmp_path / "c.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS},compat={compat}", img, "8M")
    qio(img, f"write -P 0x11 0 {2 * CS}", f"write -P 0x66 {GOOD} {CS}")
    return img


def _l2_of_cluster0(img):
    l1_off, _ = _geometry(img)
    return _u64(img, l1_off) & 0x00FFFFFFFFFFFE00


# (name, how the image is broken, the request that meets it, what the error says)
def _bad_data_offset(img):
    l2 = _l2_of_cluster0(img)
    _put_u64(img, l2, (_u64(img, l2) & ~COPIED) + 0x200 | COPIED)       # a data cluster not on a boundary


def _data_over_l1(img):
    l1_off, _ = _geometry(img)
    _put_u64(img, _l2_of_cluster0(img), l1_off | COPIED)                 # guest cluster 0 "is" the L1 table


def _l2_past_eof(img):
    l1_off, _ = _geometry(img)
    _put_u64(img, l1_off, (1 << 40) | COPIED)


def _l2_misaligned(img):
    l1_off, _ = _geometry(img)
    _put_u64(img, l1_off, (_u64(img, l1_off) + 0x200) | COPIED)


def _refblock_past_eof(img):
    _, rt_off = _geometry(img)
    _put_u64(img, rt_off, 1 << 40)


def _read0(blk):
    blk.pread(0, CS)


def _overwrite0(blk):
    blk.pwrite(0, b"\x22" * 512)


def _allocate(blk):
    blk.pwrite(3 * CS, b"\x33" * CS)          # an unallocated cluster in the first L2 table


CASES = [
    ("data-offset-misaligned-read", _bad_data_offset, _read0, "data cluster offset"),
    ("data-offset-misaligned-write", _bad_data_offset, _overwrite0, "data cluster offset"),
    ("data-cluster-is-the-l1-table", _data_over_l1, _overwrite0, "data cluster offset"),
    ("l2-table-past-eof-read", _l2_past_eof, _read0, "lies past the end of the file"),
    ("l2-table-past-eof-allocating", _l2_past_eof, _allocate, "lies past the end of the file"),
    ("l2-table-misaligned-read", _l2_misaligned, _read0, "L2 table offset"),
    ("refblock-past-eof-allocating", _refblock_past_eof, _allocate, "refcount block offset"),
]


@pytest.mark.parametrize("name,breaker,request_,reason", CASES, ids=[c[0] for c in CASES])
def test_corruption_met_during_io_marks_the_image_and_stops_writes(tmp_path, name, breaker, request_, reason):
    img = _image(tmp_path)
    breaker(img)
    blk = open_q(img)                           # nothing is wrong at open: the header is fine
    try:
        assert blk.pread(GOOD, CS) == b"\x66" * CS
        with pytest.raises(BlockError) as ei:
            request_(blk)
        msg = str(ei.value)
        assert ei.value.errno == errno.EIO
        assert reason in msg and "is corrupt" in msg and "further writes are refused" in msg, msg
        assert str(img) in msg
        # from now on every change is refused with the same reason, wherever it goes
        for change in (lambda: blk.pwrite(GOOD, b"\x77" * 512),
                       lambda: blk.pwrite(7 << 20, b"\x77" * CS),
                       lambda: blk.pwrite_zeroes(GOOD, CS),
                       lambda: blk.pdiscard(GOOD, CS),
                       lambda: blk.truncate(16 << 20)):
            with pytest.raises(BlockError) as e2:
                change()
            assert e2.value.errno == errno.EIO and reason in str(e2.value), str(e2.value)
        assert blk.pread(GOOD, CS) == b"\x66" * CS       # what is intact still reads
        assert blk.node.driver.get_info()["corrupt"] is True
    finally:
        blk.close()
    info = json.loads(qimg("info", "--output=json", img).stdout)
    assert info["format-specific"]["data"]["corrupt"] is True      # on disk: QEMU sees it too
    p = qio(img, "write 6M 512", check=False)
    assert p.returncode != 0 and "corrupt" in (p.stdout + p.stderr).lower()
    with pytest.raises(BlockError) as e3:
        open_q(img)
    assert e3.value.errno == errno.EACCES and "marked corrupt" in str(e3.value)
    ro = open_q(img, read_only=True)
    try:
        assert ro.pread(GOOD, CS) == b"\x66" * CS
    finally:
        ro.close()
    run("qemu-io", "-r", "-f", "qcow2", "-c", f"read -P 0x66 {GOOD} {CS}", img)


def test_corruption_on_a_v2_image_stops_writes_without_a_header_bit(tmp_path):
    """compat=0.10 has no corrupt bit: the open image refuses writes, the file's header is unchanged."""
    img = _image(tmp_path, compat="0.10")
    _l2_past_eof(img)
    header = img.read_bytes()[:104]
    blk = open_q(img)
    try:
        with pytest.raises(BlockError) as ei:
            _read0(blk)
        assert ei.value.errno == errno.EIO and "lies past the end of the file" in str(ei.value)
        with pytest.raises(BlockError) as e2:
            blk.pwrite(GOOD, b"\x77" * 512)
        assert e2.value.errno == errno.EIO and "lies past the end of the file" in str(e2.value)
        assert blk.pread(GOOD, CS) == b"\x66" * CS
    finally:
        blk.close()
    assert img.read_bytes()[:104] == header


def test_repair_clears_the_mark_and_the_image_is_writable_again(tmp_path):
    img = _image(tmp_path)
    _bad_data_offset(img)
    blk = open_q(img)
    try:
        with pytest.raises(BlockError) as ei:
            _read0(blk)
        assert ei.value.errno == errno.EIO and "data cluster offset" in str(ei.value)
    finally:
        blk.close()
    res = pyrep.check_image(str(img), repair="all")
    assert res["corruptions"] == 0 and res["corruptions-fixed"] >= 1
    assert "The corrupt flag was cleared" in res["messages"]
    qcheck(img)
    blk = open_q(img)
    try:
        blk.pwrite(GOOD, b"\x88" * CS)
    finally:
        blk.close()
    qio(img, f"read -P 0x88 {GOOD} {CS}")
