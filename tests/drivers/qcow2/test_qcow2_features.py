"""make_empty, check/repair, dirty bit, resize, backing override, concurrency, info."""
import struct

import pytest

import pyrep
from pyrep.errors import BlockError

from helpers.qcow2 import open_q
from helpers.referees import needs_qemu, qcheck, qimg, qio
from helpers.threads import run_in_threads, spawn
from helpers.wait import stays_false

pytestmark = needs_qemu


def _patch(path, offset, fmt, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def test_make_empty_1g_keeps_backing(tmp_path):
    """make_empty of an overlay with 1 GiB mapped swaps in a fresh layout (it does not walk the
    clusters: how long it takes is measured by bench/bench_qcow2.py, make-empty-1g)."""
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qimg("create", "-q", "-f", "qcow2", base, "1G")
    qio(base, "write -P 0x33 0 1M", "write -P 0x44 1023M 1M")
    # 1 GiB allocated in the overlay (metadata preallocation), then give it the backing
    qimg("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", top, "1G")
    qimg("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", top)
    qio(top, "write -P 0x55 0 64k")
    blk = open_q(top)
    try:
        assert blk.pread(0, 65536) == b"\x55" * 65536
        assert blk.pread(1 << 20, 4096) == bytes(4096)
        blk.node.make_empty()
        assert blk.pread(0, 1 << 20) == b"\x33" * (1 << 20)
        assert blk.pread(1023 << 20, 1 << 20) == b"\x44" * (1 << 20)
        blk.pwrite(5 << 20, b"\x66" * 100000)
    finally:
        blk.close()
    res = qcheck(top)
    assert res.get("allocated-clusters", 0) <= 3
    info = qimg("info", top).stdout
    assert "backing file: base.qcow2" in info and "backing file format: qcow2" in info
    qio(top, "read -P 0x33 0 1M", "read -P 0x66 5M 100000", "read -P 0x44 1023M 1M")
    assert top.stat().st_size < 4 << 20


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_make_empty_then_write(tmp_path, compat):
    img = tmp_path / "e.qcow2"
    pyrep.create_image(str(img), "qcow2", 64 << 20, cluster_size=4096, compat=compat)
    blk = open_q(img)
    blk.pwrite(0, b"\x01" * (8 << 20))
    blk.node.make_empty()
    assert blk.pread(0, 8 << 20) == bytes(8 << 20)
    blk.pwrite(100, b"\x02" * 10000)
    blk.close()
    qcheck(img)
    qio(img, "read -P 0 0 100", "read -P 2 100 10000", "read -P 0 10100 1M")


def _held_backend(img, **opts):
    """A qcow2 backend whose file is a blkdebug node "heldfile" (to hold writes in flight)."""
    return pyrep.open_backend({"driver": "qcow2", **opts,
                               "file": {"driver": "blkdebug", "node-name": "heldfile",
                                        "file": {"driver": "file", "filename": str(img)}}})


def _start_held_write(blk, offset, data):
    """Start ``blk.pwrite(offset, data)`` on a worker, its write to the file held until the returned
    rule is released; returns (worker, rule) once the write is in flight."""
    rule = pyrep.inject_error("heldfile", op="write", errno=None, hold=True, once=True)
    w = spawn(blk.pwrite, offset, data)
    assert rule.wait_held()
    assert not w.done.is_set()
    return w, rule


def test_make_empty_waits_for_writes_in_flight(tmp_path):
    """An overwrite of an allocated cluster held in flight (blkdebug delay on the file) while another
    thread empties the overlay: make_empty drains first, so the write lands before the clusters are
    dropped (never afterwards, into a cluster the emptied image may hand out again)."""
    img = tmp_path / "d.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "16M")
    blk = _held_backend(img)
    try:
        blk.pwrite(0, b"\x01" * 65536)             # allocated: the next write is a plain overwrite
        w, rule = _start_held_write(blk, 0, b"\x02" * 4096)
        emptying = spawn(blk.node.make_empty)
        assert stays_false(emptying.done.is_set), "make_empty returned with a write in flight"
        rule.release()
        emptying.join()
        assert w.done.is_set()                      # make_empty returned only after the write
        w.join()
        assert blk.pread(0, 65536) == bytes(65536)  # emptied after the write: nothing is left
        blk.pwrite(65536, b"\x03" * 65536)
    finally:
        pyrep.clear_errors("heldfile")
        blk.close()
    qcheck(img)
    qio(img, "read -P 0 0 64k", "read -P 3 64k 64k")


def test_cluster_freed_under_a_write_in_flight_is_not_reused_before_it_lands(tmp_path):
    """An overwrite of guest cluster 0 is held in flight (it has found its host cluster already); the
    guest zeroes that cluster with unmap and flushes, which frees the host cluster; a new allocation
    must not get it while the old write can still land there (it used to: the late write then
    overwrote guest cluster 5). Once the write is done, the next flush frees the cluster."""
    img = tmp_path / "z.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "16M")
    blk = _held_backend(img, discard="unmap")
    drv = blk.node.driver
    try:
        blk.pwrite(0, b"\x01" * 65536)
        blk.flush()
        w, rule = _start_held_write(blk, 0, b"\x02" * 4096)
        blk.pwrite_zeroes(0, 65536, may_unmap=True)
        blk.flush()
        assert drv.refs.grace                      # the free waits for the write in flight
        blk.pwrite(5 * 65536, b"\xbb" * 65536)
        rule.release()                             # the old write lands now, in its old host cluster
        w.join()
        assert blk.pread(5 * 65536, 65536) == b"\xbb" * 65536
        assert blk.pread(0, 65536) == bytes(65536)
        blk.flush()
        assert not drv.refs.grace and not drv.refs.pending
    finally:
        pyrep.clear_errors("heldfile")
        blk.close()
    qcheck(img)                                     # no leak: the cluster was freed in the end
    qio(img, "read -P 0 0 64k", "read -P 0xbb 320k 64k")


def test_frees_are_not_starved_by_later_requests_in_flight(tmp_path):
    """Frees wait only for the requests that started before them: with another write held in flight
    that started later, the earlier free still happens at the next flush."""
    img = tmp_path / "s.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "16M")
    blk = _held_backend(img, discard="unmap")
    drv = blk.node.driver
    try:
        blk.pwrite(0, b"\x01" * (3 * 65536))
        blk.flush()
        first, rule = _start_held_write(blk, 0, b"\x02" * 4096)
        blk.pwrite_zeroes(0, 65536, may_unmap=True)
        blk.flush()                                 # queued behind the held write
        assert drv.refs.grace
        rule.release()
        first.join()
        second, rule = _start_held_write(blk, 2 * 65536, b"\x03" * 4096)    # after the free was queued
        blk.flush()
        assert not drv.refs.grace                  # applied although a write is in flight
        rule.release()
        second.join()
    finally:
        pyrep.clear_errors("heldfile")
        blk.close()
    qcheck(img)
    qio(img, "read -P 0 0 64k", "read -P 1 64k 64k", "read -P 3 128k 4k", "read -P 1 132k 60k")


def test_check_and_repair_leaks(tmp_path):
    img = tmp_path / "l.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "16M")
    qio(img, "write -P 1 0 1M")
    # leak: give cluster 40 (unused, inside the file) a refcount of 1 in the first refcount block
    with open(img, "r+b") as f:
        f.truncate(50 * 65536)
    _patch(img, 0x20000 + 40 * 2, ">H", 1)
    res = pyrep.check_image(str(img))
    assert res["leaks"] == 1 and res["corruptions"] == 0
    assert any("Leaked cluster 40" in m for m in res["messages"])
    q = qimg("check", "--output=json", img, check=False)
    assert '"leaks": 1' in q.stdout
    res = pyrep.check_image(str(img), repair="leaks")
    assert res["leaks-fixed"] == 1 and res["leaks"] == 0
    qcheck(img)


def test_check_repair_refcount_corruption(tmp_path):
    img = tmp_path / "c.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "16M")
    qio(img, "write -P 1 0 1M")
    # refcount of a data cluster (cluster 5) dropped to 0: a corruption
    _patch(img, 0x20000 + 5 * 2, ">H", 0)
    res = pyrep.check_image(str(img))
    assert res["corruptions"] >= 1
    res = pyrep.check_image(str(img), repair="leaks")
    assert res["corruptions"] >= 1
    res = pyrep.check_image(str(img), repair="all")
    assert res["corruptions"] == 0 and res["corruptions-fixed"] >= 1
    qcheck(img)
    qio(img, "read -P 1 0 1M")


def test_dirty_bit_repaired_on_rw_open(tmp_path):
    img = tmp_path / "d.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "16M")
    qio(img, "write -P 1 0 1M")
    _patch(img, 0x20000 + 40 * 2, ">H", 1)      # a leak
    _patch(img, 72, ">Q", 1)                    # dirty
    blk = open_q(img, read_only=True)
    assert blk.pread(0, 4096) == b"\x01" * 4096
    blk.close()
    blk = open_q(img)
    blk.pwrite(2 << 20, b"\x02" * 4096)
    info = blk.node.driver.get_info()
    assert info["dirty"] is False and info["lazy-refcounts"] is True
    blk.close()
    assert struct.unpack(">Q", img.read_bytes()[72:80])[0] & 1 == 0
    qcheck(img)


def test_resize_grow_and_refuse_shrink(tmp_path):
    img = tmp_path / "r.qcow2"
    pyrep.create_image(str(img), "qcow2", 1 << 20, cluster_size=512)
    blk = open_q(img)
    blk.pwrite(0, b"\x07" * (1 << 20))
    blk.truncate(64 << 20)
    assert blk.length == 64 << 20
    blk.pwrite(60 << 20, b"\x08" * 70000)
    with pytest.raises(BlockError) as ei:
        blk.truncate(1 << 20)
    assert "shrink" in str(ei.value)
    blk.close()
    qcheck(img)
    assert "virtual size: 64 MiB" in qimg("info", img).stdout
    qio(img, "read -P 7 0 1M", "read -P 0 1M 59M", "read -P 8 60M 70000")


def test_backing_option_override(tmp_path):
    base = tmp_path / "b.qcow2"
    top = tmp_path / "t.qcow2"
    qimg("create", "-q", "-f", "qcow2", base, "1M")
    qio(base, "write -P 9 0 1M")
    pyrep.create_image(str(top), "qcow2", None, backing_file="b.qcow2", backing_fmt="qcow2")
    assert "virtual size: 1 MiB" in qimg("info", top).stdout
    blk = open_q(top, read_only=True)
    assert blk.pread(0, 512) == b"\x09" * 512
    assert blk.node.backing is not None
    blk.close()
    blk = open_q(top, read_only=True, backing=None)
    assert blk.pread(0, 512) == bytes(512)
    assert blk.node.backing is None
    blk.close()


def test_concurrent_allocating_writes_same_cluster(tmp_path):
    img = tmp_path / "cc.qcow2"
    base = tmp_path / "cb.qcow2"
    qimg("create", "-q", "-f", "qcow2", base, "8M")
    qio(base, "write -P 0x5a 0 8M")
    pyrep.create_image(str(img), "qcow2", 8 << 20, backing_file="cb.qcow2", backing_fmt="qcow2")
    blk = open_q(img)
    nthreads, per = 8, 64

    def worker(t):
        for i in range(per):
            # every thread writes its own 512-byte sector of the same clusters
            cl = i % 16
            off = cl * 65536 + (t * 16 + i // 16) * 512
            blk.pwrite(off, bytes([t + 1]) * 512)
    errors = run_in_threads(worker, [(t,) for t in range(nthreads)])
    assert not errors, errors
    model = bytearray(b"\x5a" * (16 * 65536))
    for t in range(nthreads):
        for i in range(per):
            cl = i % 16
            off = cl * 65536 + (t * 16 + i // 16) * 512
            model[off:off + 512] = bytes([t + 1]) * 512
    assert blk.pread(0, len(model)) == bytes(model)
    blk.close()
    res = qcheck(img)
    assert res["allocated-clusters"] == 16


def test_info_fields(tmp_path):
    img = tmp_path / "i.qcow2"
    pyrep.create_image(str(img), "qcow2", 1 << 30)
    blk = open_q(img, read_only=True)
    info = blk.node.driver.get_info()
    blk.close()
    assert info["cluster-size"] == 65536 and info["compat"] == "1.1" and info["refcount-bits"] == 16
    assert info["corrupt"] is False and info["dirty"] is False
    # byte-identical header fields to qemu-img's (layout included) for the default case
    ref = tmp_path / "ref.qcow2"
    qimg("create", "-q", "-f", "qcow2", ref, str(1 << 30))
    assert img.read_bytes()[:104] == ref.read_bytes()[:104]


def test_small_caches_evict_correctly(tmp_path):
    import random
    from helpers.qcow2 import random_model_op
    from helpers.referees import compare_with_model
    img = tmp_path / "ev.qcow2"
    pyrep.create_image(str(img), "qcow2", 32 << 20, cluster_size=4096)
    blk = open_q(img, **{"l2-cache-size": 16384, "refcount-cache-size": 16384})
    size = blk.length
    model = bytearray(size)
    rng = random.Random(3)
    for i in range(1200):
        random_model_op(blk, model, rng, 20000, 0.7, 0.15, 4096)
        if i % 300 == 0:
            blk.flush()
    assert blk.pread(0, size) == bytes(model)
    blk.close()
    qcheck(img)
    compare_with_model(img, model, tmp_path)
