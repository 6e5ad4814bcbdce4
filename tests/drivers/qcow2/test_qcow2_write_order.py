"""The order of the qcow2 driver's writes and flushes, as its file sees them: what makes an image safe
against power loss, not only against a killed process (whose writes the page cache keeps anyway).

A logging filter between the driver and its file records every write and flush. Replaying the log
against the final layout checks QEMU's ordering rule: an L2 table is written only when every data and
refcount-block write before it has been flushed (the table may point to those clusters), and the L1
table only when the L2 tables before it have been flushed too."""
import random
import struct
import threading

import pyrep
from pyrep.driver import BlockDriver
from pyrep.options import Opt

from helpers.referees import needs_qemu, qcheck, qimg, qio
from helpers.drivers import registered
from helpers.threads import TIMEOUT, spawn

CS = 4096                   # small clusters: an L2 table maps 2 MiB, so 64 MiB needs 32 of them
SIZE = 64 << 20
OFFSET_MASK = 0x00FFFFFFFFFFFE00


class OpLog(BlockDriver):
    """Forwards everything to its ``file`` child; records writes and flushes in ``OpLog.log``."""
    format_name = "test-oplog"
    is_filter = True
    options = (Opt("file", "child", required=True),)
    log = []

    def open(self, opts):
        self.file = self.node.open_child(opts, "file", role="file")

    def pwritev(self, offset, length, iov, flags=0):
        OpLog.log.append(("w", offset, length))
        return self.file.pwritev(offset, length, iov, flags)

    def pwrite_zeroes(self, offset, length, flags=0):
        OpLog.log.append(("w", offset, length))
        return self.file.pwrite_zeroes(offset, length, flags)

    def flush(self):
        OpLog.log.append(("f",))
        return self.file.flush()


def layout(path):
    """(L1 range, L2 table offsets, refcount block offsets, refcount table range) of the image."""
    with open(path, "rb") as f:
        img = f.read()
    l1_size, l1_off, rt_off, rt_clusters = struct.unpack_from(">IQQI", img, 36)
    l1 = struct.unpack_from(f">{l1_size}Q", img, l1_off)
    rt = struct.unpack_from(f">{rt_clusters * CS // 8}Q", img, rt_off)
    return ((l1_off, l1_off + l1_size * 8), {e & OFFSET_MASK for e in l1 if e & OFFSET_MASK},
            {e & ~511 for e in rt if e}, (rt_off, rt_off + rt_clusters * CS))


def kind_of(offset, lay):
    (l1_lo, l1_hi), l2s, rbs, (rt_lo, rt_hi) = lay
    if offset < CS:
        return "header"
    if l1_lo <= offset < l1_hi:
        return "l1"
    if rt_lo <= offset < rt_hi:
        return "reftable"
    cl = offset & ~(CS - 1)
    if cl in l2s:
        return "l2"
    if cl in rbs:
        return "refblock"
    return "data"


def ordering_violations(log, lay):
    """Writes that may point to something not yet on stable storage: (index, kind, unflushed kinds)."""
    bad = []
    unflushed = set()
    for i, op in enumerate(log):
        if op[0] == "f":
            unflushed.clear()
            continue
        kind = kind_of(op[1], lay)
        if kind == "l2" and unflushed & {"data", "refblock"}:
            bad.append((i, kind, sorted(unflushed)))
        elif kind == "l1" and unflushed & {"data", "refblock", "l2"}:
            bad.append((i, kind, sorted(unflushed)))
        unflushed.add(kind)
    return bad


@needs_qemu
def test_metadata_reaches_the_file_after_what_it_points_to(tmp_path):
    img, model_path = tmp_path / "a.qcow2", tmp_path / "model.raw"
    pyrep.register_driver(OpLog, clobber=True)
    OpLog.log = []
    pyrep.create_image(str(img), "qcow2", SIZE, cluster_size=CS)
    # an L2 cache of 4 tables for 32: evictions write dirty tables all along, between the flushes
    blk = pyrep.open_backend({"driver": "qcow2", "l2-cache-size": 4 * CS, "refcount-cache-size": 4 * CS,
                              "file": {"driver": "test-oplog", "file": {"driver": "file", "filename": str(img)}}})
    model = bytearray(SIZE)
    rng = random.Random(7)
    try:
        for i in range(1500):
            off = rng.randrange(SIZE // 512) * 512
            n = min(rng.choice([512, 4096, 3 * CS, 9000]), SIZE - off)
            data = bytes([i % 251 + 1]) * n
            blk.pwrite(off, data)
            model[off:off + n] = data
            if i % 300 == 299:
                blk.flush()
    finally:
        blk.close()
        pyrep.unregister_driver("test-oplog")
    log = OpLog.log
    lay = layout(img)
    kinds = {kind_of(op[1], lay) for op in log if op[0] == "w"}
    assert {"data", "l2", "refblock", "l1"} <= kinds, kinds       # the log saw every kind of write
    evicted = sum(1 for op in log[:-1] if op[0] == "w" and kind_of(op[1], lay) == "l2")
    assert evicted > 32                                            # L2 tables written more than once each
    assert ordering_violations(log, lay) == []
    qcheck(img)
    model_path.write_bytes(model)
    assert qimg("compare", "-f", "qcow2", "-F", "raw", img, model_path, check=False).returncode == 0


def test_the_order_check_catches_a_table_written_before_its_data():
    # the checker itself: an L2 write after an unflushed data write, and an L1 write after an
    # unflushed L2 write, are reported; the same writes with flushes in between are not
    lay = ((CS * 3, CS * 3 + 64), {CS * 4}, {CS * 2}, (CS, 2 * CS))
    assert ordering_violations([("w", CS * 9, 512), ("w", CS * 4, CS)], lay) == [(1, "l2", ["data"])]
    assert ordering_violations([("w", CS * 2, CS), ("w", CS * 4, CS), ("w", CS * 3, 8)], lay) == \
        [(1, "l2", ["refblock"]), (2, "l1", ["l2", "refblock"])]
    assert ordering_violations([("w", CS * 9, 512), ("w", CS * 2, CS), ("f",), ("w", CS * 4, CS), ("f",),
                                ("w", CS * 3, 8)], lay) == []


class HoldAfterWrite(BlockDriver):
    """Forwards everything; a write of ``hold-length`` bytes reaches the file, then returns only once
    ``HoldAfterWrite.release`` is set (the request stays in flight with its data already there);
    ``HoldAfterWrite.held`` is set while it waits."""
    format_name = "test-hold-after-write"
    is_filter = True
    options = (Opt("file", "child", required=True), Opt("hold-length", "size", default=0))
    held = threading.Event()
    release = threading.Event()

    def open(self, opts):
        self.file = self.node.open_child(opts, "file", role="file")
        self.hold_length = opts["hold-length"]

    def pwritev(self, offset, length, iov, flags=0):
        r = self.file.pwritev(offset, length, iov, flags)
        if length == self.hold_length:
            HoldAfterWrite.held.set()
            HoldAfterWrite.release.wait(TIMEOUT)
        return r


@needs_qemu
def test_growing_the_file_never_cuts_off_a_write_in_flight(tmp_path):
    """Request B reserves a new cluster, then waits for its head from the backing; meanwhile request C
    reserves the next cluster and writes it whole, and stays in flight. When B then grows the file
    for its cluster's zero tail, the file must not be truncated below C's data (it used to be, by a
    size computed from the last *finished* write: C's acknowledged data then read back as zeroes)."""
    cs = 2 << 20
    base, img = tmp_path / "base.raw", tmp_path / "a.qcow2"
    base.write_bytes(b"\x11" * 4096)            # the backing ends inside B's head: B's tail is zeroes
    qimg("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", "-b", str(base), "-F", "raw", img, 8 * cs)
    HoldAfterWrite.held.clear()
    HoldAfterWrite.release.clear()
    with registered(HoldAfterWrite):
        blk = pyrep.open_backend({
            "driver": "qcow2",
            "file": {"driver": "test-hold-after-write", "hold-length": cs,
                     "file": {"driver": "file", "filename": str(img)}},
            "backing": {"driver": "raw", "file": {"driver": "blkdebug", "node-name": "slowbase",
                                                  "file": {"driver": "file", "filename": str(base)}}}})
        head = pyrep.inject_error("slowbase", op="read", errno=None, hold=True, once=True)
        try:
            b = spawn(blk.pwrite, 8192, b"\xbb" * 4096)
            assert head.wait_held()             # B has reserved its cluster and reads its head
            c = spawn(blk.pwrite, cs, b"\xcc" * cs)
            assert HoldAfterWrite.held.wait(TIMEOUT)     # C's data is in the file, C is still in flight
            head.release()                      # B goes on: it grows the file for its zero tail
            b.done.wait(2)                      # (an engine may also make B wait for C: then it does not end)
            HoldAfterWrite.release.set()
            b.join()
            c.join()
            assert blk.pread(cs, cs) == b"\xcc" * cs
            assert blk.pread(0, 12288) == b"\x11" * 4096 + bytes(4096) + b"\xbb" * 4096
        finally:
            HoldAfterWrite.release.set()
            pyrep.clear_errors("slowbase")
            blk.close()
    qcheck(img)
    qio(img, f"read -P 0xcc {cs} {cs}", "read -P 0xbb 8192 4096", f"read -P 0 12288 {cs - 12288}")
