"""I/O errors under qcow2: a write or flush that fails while clusters are being allocated (blkdebug, and
real kernel errors from a file-size limit), compressed clusters that do not inflate, and resize errors.
Every case ends with an image ``qemu-img check`` accepts and with every acknowledged write in place."""
import errno
import json
import os
import struct
import subprocess
import sys

import pytest

import pyrep
from pyrep import BlockError, OptionError

from helpers.qcow2 import open_q
from helpers.referees import needs_qemu, qcheck, qimg, qio, run

pytestmark = needs_qemu

CS = 65536


def _blkdebug_q(img, name="dbg", **extra):
    opts = {"driver": "qcow2", "discard": "unmap",
            "file": {"driver": "blkdebug", "node-name": name,
                     "file": {"driver": "file", "filename": str(img)}}}
    opts.update(extra)
    return pyrep.open_backend(opts)


def _check_clean(img):
    """qemu-img check: no corruption, no leak (a failed allocation gives its clusters back)."""
    return qcheck(img)


# ---------------------------------------------------------------- failed writes while allocating

def test_failed_data_write_of_an_allocation_leaves_a_clean_image(tmp_path):
    img = tmp_path / "w.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "16M")
    blk = _blkdebug_q(img)
    try:
        blk.pwrite(0, b"\x01" * CS)                         # acknowledged: must survive
        blk.flush()
        end = os.path.getsize(img)
        pyrep.inject_error("dbg", op="write", errno="EIO", offset=end)    # every write past the end fails
        for off, n in ((4 * CS, CS), (8 * CS + 512, 3 * CS), (12 * CS + 4096, 4096)):
            with pytest.raises(BlockError) as ei:
                blk.pwrite(off, b"\x02" * n)
            assert ei.value.errno == errno.EIO
            assert blk.pread(off, n) == bytes(n)            # the entry was never pointed at the new cluster
        pyrep.clear_errors("dbg")
        blk.pwrite(4 * CS, b"\x03" * CS)                    # the same clusters allocate fine afterwards
    finally:
        blk.close()
    _check_clean(img)
    qio(img, "read -P 1 0 64k", "read -P 3 256k 64k", "read -P 0 512k 256k")


def test_failed_flush_during_write_back_keeps_the_metadata_dirty_and_the_data(tmp_path):
    """The flush that orders refcounts before L2 tables fails: nothing that depends on it is written,
    the next flush writes it all; no acknowledged write is lost."""
    img = tmp_path / "f.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "16M")
    blk = _blkdebug_q(img)
    try:
        blk.pwrite(0, b"\x05" * (3 * CS))
        pyrep.inject_error("dbg", op="flush", errno="EIO", once=True)
        with pytest.raises(BlockError) as ei:
            blk.flush()
        assert ei.value.errno == errno.EIO
        # on disk the L2 table was not written (it would have followed the failed flush)
        run("qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read -P 0 0 192k", img)
        blk.flush()
        blk.pwrite(5 * CS, b"\x06" * CS)
    finally:
        blk.close()
    _check_clean(img)
    qio(img, "read -P 5 0 192k", "read -P 6 320k 64k")


def test_failed_l2_table_write_is_retried_at_the_next_flush(tmp_path):
    img = tmp_path / "l2.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "16M")
    blk = _blkdebug_q(img)
    try:
        blk.pwrite(0, b"\x07" * CS)
        blk.flush()
        with open(img, "rb") as f:
            f.seek(40)
            l1_off = struct.unpack(">Q", f.read(8))[0]
            f.seek(l1_off)
            l2_off = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        blk.pwrite(CS, b"\x08" * CS)
        pyrep.inject_error("dbg", op="write", errno="EIO", offset=l2_off, length=CS, once=True)
        with pytest.raises(BlockError) as ei:
            blk.flush()
        assert ei.value.errno == errno.EIO
        blk.flush()                                          # the table is still dirty: written now
    finally:
        blk.close()
    _check_clean(img)
    qio(img, "read -P 7 0 64k", "read -P 8 64k 64k")


_CHILD = r"""
import json, os, resource, signal, sys
import pyrep
path, limit = sys.argv[1], int(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # the write fails with EFBIG instead of killing us
out = {"ok": [], "failed": []}
blk = pyrep.open_backend({"driver": "qcow2", "file": {"driver": "file", "filename": path}})
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))          # the soft limit: it can be lifted again
for i in range(64):
    off = i * 65536
    try:
        blk.pwrite(off, bytes([i + 1]) * 65536)
        out["ok"].append(off)
    except pyrep.BlockError as e:
        out["failed"].append([off, e.errno, str(e)])
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
blk.pwrite(100 * 65536 + 4096, b"\xee" * 4096)      # the limit lifted: allocating works again
try:
    blk.flush()
    out["flushed"] = True
except pyrep.BlockError as e:
    out["flushed"] = str(e)
blk.close()
print(json.dumps(out))
"""


def test_file_size_limit_efbig_while_allocating_leaves_a_clean_image(tmp_path):
    """A real kernel error under the file driver: a child process with RLIMIT_FSIZE a little past the
    image's size writes 64 clusters; those past the limit fail with EFBIG, those before it are kept."""
    img = tmp_path / "big.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "8M")
    limit = os.path.getsize(img) + 20 * CS
    p = subprocess.run([sys.executable, "-c", _CHILD, str(img), str(limit)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["failed"] and out["ok"], out
    assert all(e == errno.EFBIG for _, e, _ in out["failed"]), out["failed"]
    assert out["flushed"] is True
    _check_clean(img)
    for off in out["ok"]:
        qio(img, f"read -P {off // CS + 1} {off} 64k")
    for off, _, _ in out["failed"]:
        qio(img, f"read -P 0 {off} 64k")
    qio(img, f"read -P 0 {100 * CS} 4k", f"read -P 0xee {100 * CS + 4096} 4k", f"read -P 0 {100 * CS + 8192} 56k")


# ---------------------------------------------------------------- compressed clusters

def _compressed_image(tmp_path, data):
    raw = tmp_path / "src.raw"
    raw.write_bytes(data)
    img = tmp_path / "z.qcow2"
    qimg("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", raw, img)
    return img


def _l2_entry(img, cidx):
    with open(img, "rb") as f:
        f.seek(40)
        l1_off = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1_off)
        l2_off = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2_off + 8 * cidx)
        return l2_off + 8 * cidx, struct.unpack(">Q", f.read(8))[0]


def _payload(seed):
    import random
    rng = random.Random(seed)
    half = bytes(rng.randrange(256) for _ in range(CS // 4))
    return half + bytes(CS - len(half))       # compresses, but to several sectors


def test_compressed_cluster_that_does_not_inflate_is_eio_not_corruption(tmp_path):
    data = _payload(1) + _payload(2) + _payload(3)
    img = _compressed_image(tmp_path, data)
    where, e = _l2_entry(img, 1)
    assert e & (1 << 62)                                   # cluster 1 is compressed
    host = e & ((1 << 54) - 1)
    with open(img, "r+b") as f:                            # spoil the start of its deflate stream
        f.seek(host)
        f.write(b"\xff" * 16)
    blk = open_q(img)
    try:
        assert blk.pread(0, CS) == data[:CS]
        assert blk.pread(2 * CS, CS) == data[2 * CS:]
        with pytest.raises(BlockError) as ei:
            blk.pread(CS + 100, 10)
        assert ei.value.errno == errno.EIO
        assert "decompress" in str(ei.value) and f"guest offset {CS + 100}" in str(ei.value)
        # a partial write needs the old data: it fails the same way and changes nothing
        with pytest.raises(BlockError) as e2:
            blk.pwrite(CS + 512, b"\x09" * 512)
        assert e2.value.errno == errno.EIO and "decompress" in str(e2.value)
        blk.pwrite(2 * CS, b"\x0a" * CS)                   # elsewhere: the image is not marked corrupt
        assert blk.node.driver.get_info()["corrupt"] is False
    finally:
        blk.close()
    _check_clean(img)
    p = qio(img, f"read {CS} {CS}", check=False)
    assert "Input/output error" in p.stdout + p.stderr        # QEMU cannot read it either
    qio(img, "read -P 0xa 128k 64k")


def test_compressed_cluster_shorter_than_its_stream_is_eio(tmp_path):
    data = _payload(4) + _payload(5)
    img = _compressed_image(tmp_path, data)
    where, e = _l2_entry(img, 0)
    shift = 62 - (16 - 8)
    assert (e >> shift) & ((1 << 8) - 1) > 0               # several sectors
    with open(img, "r+b") as f:                            # claim one sector only
        f.seek(where)
        f.write(struct.pack(">Q", e & ~(((1 << 8) - 1) << shift)))
    blk = open_q(img, read_only=True)
    try:
        with pytest.raises(BlockError) as ei:
            blk.pread(0, CS)
        assert ei.value.errno == errno.EIO and "guest offset 0" in str(ei.value)
        assert blk.pread(CS, CS) == data[CS:]
    finally:
        blk.close()


def test_compressed_writes_with_one_bit_refcounts_do_not_overflow(tmp_path):
    """refcount_bits=1: a host cluster can hold one compressed cluster only; packing a second one into
    it would overflow its refcount, so it goes to a new host cluster (as QEMU does)."""
    img = tmp_path / "r1.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", img, "4M")
    blk = open_q(img)
    drv = blk.node.driver
    try:
        from pyrep._core.iovec import IOVector
        for i in range(6):
            drv.pwritev_compressed(i * CS, CS, IOVector(bytearray(bytes([i + 1]) * CS)))
        for i in range(6):
            assert blk.pread(i * CS, CS) == bytes([i + 1]) * CS
    finally:
        blk.close()
    _check_clean(img)
    for i in range(6):
        qio(img, f"read -P {i + 1} {i * CS} 64k")


# ---------------------------------------------------------------- resize

def test_resize_errors_say_why_and_change_nothing(tmp_path):
    img = tmp_path / "s.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "16M")
    blk = open_q(img)
    try:
        blk.pwrite(0, b"\x01" * CS)
        for new, err, what in ((8 << 20, errno.ENOTSUP, "shrinking"), ((16 << 20) + 100, errno.EINVAL, "512"),
                               (1 << 62, errno.EFBIG, "too large")):
            with pytest.raises(BlockError) as ei:
                blk.truncate(new)
            assert ei.value.errno == err and what in str(ei.value), str(ei.value)
            assert blk.length == 16 << 20
    finally:
        blk.close()
    assert json.loads(qimg("info", "--output=json", img).stdout)["virtual-size"] == 16 << 20
    _check_clean(img)
    qio(img, "read -P 1 0 64k")


def test_resize_of_an_image_with_bitmaps_is_refused(tmp_path):
    img = tmp_path / "b.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "16M")
    qimg("bitmap", "--add", img, "bm0")
    blk = open_q(img)
    try:
        with pytest.raises(BlockError) as ei:
            blk.truncate(32 << 20)
        assert ei.value.errno == errno.ENOTSUP and "bitmaps" in str(ei.value)
        assert blk.length == 16 << 20
    finally:
        blk.close()
    qcheck(img)


def test_resize_whose_l1_write_fails_keeps_the_old_size_and_a_clean_image(tmp_path):
    """Growing past what the L1 table maps writes a new L1 table at the end of the file first: when
    that write fails, the header still names the old table and size, and the clusters reserved for the
    new table are given back."""
    img = tmp_path / "g.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "2M")   # one L2 table: 2 MiB
    blk = _blkdebug_q(img)
    try:
        blk.pwrite(0, b"\x01" * 8192)
        blk.flush()
        pyrep.inject_error("dbg", op="write", errno="EIO", offset=os.path.getsize(img))
        with pytest.raises(BlockError) as ei:
            blk.truncate(64 << 20)
        assert ei.value.errno == errno.EIO
        assert blk.length == 2 << 20
        pyrep.clear_errors("dbg")
        blk.pwrite(4096, b"\x02" * 4096)
        blk.truncate(64 << 20)                             # works once the file does
        blk.pwrite(60 << 20, b"\x03" * 4096)
    finally:
        blk.close()
    assert json.loads(qimg("info", "--output=json", img).stdout)["virtual-size"] == 64 << 20
    _check_clean(img)
    qio(img, "read -P 1 0 4k", "read -P 2 4k 4k", "read -P 3 60M 4k")


def test_resize_of_a_read_only_image_is_refused(tmp_path):
    img = tmp_path / "ro.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "16M")
    blk = open_q(img, read_only=True)
    try:
        with pytest.raises((BlockError, OptionError)) as ei:
            blk.truncate(32 << 20)
        assert getattr(ei.value, "errno", errno.EPERM) in (errno.EPERM, errno.EROFS, errno.EACCES)
        assert blk.length == 16 << 20
    finally:
        blk.close()
    assert json.loads(qimg("info", "--output=json", img).stdout)["virtual-size"] == 16 << 20
