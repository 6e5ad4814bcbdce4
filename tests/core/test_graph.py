"""The node graph: names, references, lifetimes, permissions, blockers, reopen, drain, allocation."""
import errno
import threading

import pytest

import pyrep
from pyrep.constants import BS_ALLOCATED, BS_DATA, BS_ZERO

from helpers.referees import needs, qcheck, qimg
from helpers.threads import TIMEOUT, run_in_threads, spawn
from helpers.wait import stays_false


def raw(tmp_path, name="d.raw", size=1 << 20, **extra):
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return {"driver": "raw", "file": {"driver": "file", "filename": str(path)}, **extra}


def test_auto_names_and_lookup(tmp_path):
    n = pyrep.blockdev_add(raw(tmp_path))
    assert n.name.startswith("#block") and n.auto_named
    assert pyrep.lookup(n.name) is n
    assert n.file.drv.format_name == "file"
    named = pyrep.blockdev_add(raw(tmp_path, "e.raw", **{"node-name": "disk-e"}))
    assert pyrep.lookup("disk-e") is named
    with pytest.raises(pyrep.OptionError, match="duplicate node-name 'disk-e'"):
        pyrep.blockdev_add(raw(tmp_path, "f.raw", **{"node-name": "disk-e"}))
    with pytest.raises(pyrep.OptionError, match="invalid node-name '9x'"):
        pyrep.blockdev_add(raw(tmp_path, "g.raw", **{"node-name": "9x"}))
    with pytest.raises(pyrep.OptionError, match="no node or backend named 'nope'"):
        pyrep.lookup("nope")


def test_string_child_references_node_or_backend(tmp_path):
    base = pyrep.blockdev_add({"driver": "memory", "size": "1M", "node-name": "colo1"})
    top = pyrep.blockdev_add("driver=memory,node-name=top,backing=colo1")
    assert top.backing is base and top.length == 1 << 20
    blk = pyrep.open_backend(raw(tmp_path), name="disk0")
    over = pyrep.blockdev_add({"driver": "memory", "backing": "disk0", "node-name": "over"})
    assert over.backing is blk.node
    with pytest.raises(pyrep.OptionError, match=r"memory: option 'backing': no node or backend named 'ghost'"):
        pyrep.blockdev_add({"driver": "memory", "backing": "ghost"})


def test_blockdev_del_refuses_nodes_in_use_and_implicit_children(tmp_path):
    pyrep.blockdev_add({"driver": "memory", "size": "1M", "node-name": "b"})
    top = pyrep.blockdev_add({"driver": "memory", "backing": "b", "node-name": "t"})
    with pytest.raises(pyrep.PermissionConflict, match="node 'b' is in use by node 't'"):
        pyrep.blockdev_del("b")
    child = pyrep.blockdev_add(raw(tmp_path, **{"node-name": "r"})).file
    with pytest.raises(pyrep.OptionError, match="not added by blockdev_add"):
        pyrep.blockdev_del(child.name)
    pyrep.blockdev_del("t")
    pyrep.blockdev_del("b")
    assert "b" not in pyrep.nodes() and "t" not in pyrep.nodes()
    assert top.closed
    with pytest.raises(pyrep.OptionError, match="no node of that name"):
        pyrep.blockdev_del("b")


def test_implicit_children_close_with_their_parent(tmp_path):
    blk = pyrep.open_backend(raw(tmp_path))
    root, proto = blk.node, blk.node.file
    blk.close()
    assert root.closed and proto.closed
    assert root.name not in pyrep.nodes() and proto.name not in pyrep.nodes()


def test_failed_open_leaves_nothing_behind(tmp_path):
    before = set(pyrep.nodes())
    with pytest.raises(pyrep.OptionError, match=r"file: option 'file.locking': expected one of 'on', 'off', 'auto'"):
        pyrep.blockdev_add({"driver": "raw", "node-name": "x", "file": {"driver": "file", "filename": str(
            tmp_path / "d.raw"), "locking": "sometimes"}})
    with pytest.raises(pyrep.BlockError) as e:
        pyrep.blockdev_add({"driver": "raw", "file": {"driver": "file", "filename": str(tmp_path / "missing")}})
    assert e.value.errno == errno.ENOENT and "missing" in str(e.value)
    assert set(pyrep.nodes()) == before


def test_loops_are_refused():
    a = pyrep.blockdev_add({"driver": "memory", "size": "1M", "node-name": "a"})
    b = pyrep.blockdev_add({"driver": "memory", "backing": "a", "node-name": "b"})
    with pytest.raises(pyrep.OptionError, match="would make a loop"):
        a.attach_child(b, "backing")


def test_permission_conflict_names_both_users(tmp_path):
    opts = raw(tmp_path, **{"node-name": "shared-disk"})
    b1 = pyrep.open_backend(opts, name="writer1")
    with pytest.raises(pyrep.PermissionConflict) as e:
        pyrep.open_backend("shared-disk", name="writer2")
    msg = str(e.value)
    assert "node 'shared-disk'" in msg and "backend 'writer2'" in msg and "backend 'writer1'" in msg
    assert "write" in msg
    # a reader that shares writes may join; a second writer may join once the first shares writes
    reader = pyrep.open_backend("shared-disk", read_only=True, shared="all")
    b1.set_perm("consistent-read,write,resize", "all")
    with pytest.raises(pyrep.PermissionConflict):
        pyrep.open_backend("shared-disk", name="writer3")  # writer3 itself does not share writes with writer1
    b3 = pyrep.open_backend("shared-disk", name="writer3", share_rw=True)
    b3.pwrite(0, b"both")
    assert reader.pread(0, 4) == b"both"
    for b in (b3, reader, b1):
        b.close()


def test_permission_conflict_leaves_graph_unchanged(tmp_path):
    b1 = pyrep.open_backend(raw(tmp_path, **{"node-name": "n"}), name="one")
    parents = list(b1.node.parents)
    with pytest.raises(pyrep.PermissionConflict):
        pyrep.open_backend("n")
    assert b1.node.parents == parents
    b1.pwrite(0, b"ok")


def test_op_blockers():
    n = pyrep.blockdev_add({"driver": "memory", "size": "1M", "node-name": "m"})
    n.block_op("resize", "replication on 'm'")
    blk = pyrep.open_backend("m")
    with pytest.raises(pyrep.PermissionConflict, match="'resize' is blocked by replication on 'm'"):
        blk.truncate(2 << 20)
    n.unblock_op("resize", "replication on 'm'")
    blk.truncate(2 << 20)
    assert blk.length == 2 << 20
    n.block_all_ops("job x")
    with pytest.raises(pyrep.PermissionConflict, match="'drive-del' is blocked by job x"):
        n.check_op("drive-del")
    n.unblock_all_ops("job x")
    assert not n.blockers


def test_read_only_node_and_reopen(tmp_path):
    node = pyrep.blockdev_add(raw(tmp_path, **{"node-name": "r", "read-only": True}))
    blk = pyrep.open_backend("r", read_only=True, shared="all")
    with pytest.raises(pyrep.BlockError) as e:
        node.pwrite(0, b"x")
    assert e.value.errno == errno.EPERM
    pyrep.reopen(node, read_only=False)
    assert not node.read_only and not node.file.read_only
    node.pwrite(0, b"now")
    assert blk.pread(0, 3) == b"now"
    pyrep.reopen_multiple([(node, True)])
    with pytest.raises(pyrep.BlockError) as e:
        node.pwrite(0, b"x")
    assert e.value.errno == errno.EPERM


def test_reopen_is_atomic(tmp_path):
    good = pyrep.blockdev_add(raw(tmp_path, "a.raw", **{"node-name": "good", "read-only": True}))
    bad = pyrep.blockdev_add(raw(tmp_path, "b.raw", **{"node-name": "bad", "read-only": True}))
    (tmp_path / "b.raw").chmod(0o444)
    import os
    if os.geteuid() == 0:
        # root ignores file modes: make the second reopen fail through an op blocker instead
        bad.block_op("change", "a test")
    with pytest.raises((pyrep.BlockError, pyrep.PermissionConflict)):
        pyrep.reopen_multiple([(good, False), (bad, False)])
    assert good.read_only and bad.read_only
    with pytest.raises(pyrep.BlockError) as e:
        good.pwrite(0, b"x")
    assert e.value.errno == errno.EPERM


def test_drain_waits_for_in_flight_and_holds_new_requests():
    blk = pyrep.open_backend({"driver": "memory", "size": "1M", "node-name": "m"})
    started, release = threading.Event(), threading.Event()

    def slow_notifier(node, offset, length, flags):
        if offset == 0:
            started.set()
            release.wait(TIMEOUT)
    blk.node.add_write_notifier(slow_notifier)
    w = spawn(blk.pwrite, 0, b"a" * 512)
    assert started.wait(TIMEOUT)
    assert blk.in_flight == 1
    drained, leave = threading.Event(), threading.Event()

    def drainer():
        with pyrep.drained(blk.node):
            drained.set()
            leave.wait(TIMEOUT)
    d = spawn(drainer)
    assert stays_false(drained.is_set), "drained while a write was still in flight"
    release.set()
    assert drained.wait(TIMEOUT)
    w.join()
    assert blk.in_flight == 0
    late = spawn(blk.pwrite, 4096, b"b" * 512)      # a new request inside the drained section waits
    assert stays_false(late.done.is_set), "a request ran inside a drained section"
    leave.set()
    d.join()
    late.join()
    assert blk.pread(0, 1) == b"a" and blk.pread(4096, 1) == b"b"


def test_is_allocated_above_across_a_chain():
    base = pyrep.blockdev_add({"driver": "memory", "size": "4M", "node-name": "base", "cluster-size": "64K"})
    mid = pyrep.blockdev_add({"driver": "memory", "backing": "base", "node-name": "mid", "cluster-size": "64K"})
    top = pyrep.blockdev_add({"driver": "memory", "backing": "mid", "node-name": "top", "cluster-size": "64K"})
    base.pwrite(0, b"b" * 65536)
    mid.pwrite(65536, b"m" * 65536)
    top.pwrite(131072, b"t" * 65536)
    top.pwrite_zeroes(196608, 65536)
    assert pyrep.is_allocated(top, 131072, 65536) == (True, 65536)
    assert pyrep.is_allocated(top, 0, 131072) == (False, 131072)
    assert pyrep.is_allocated_above(top, base, 0, 65536) == (False, 65536)
    assert pyrep.is_allocated_above(top, base, 65536, 65536) == (True, 65536)
    assert pyrep.is_allocated_above(top, None, 0, 65536) == (True, 65536)
    assert pyrep.is_allocated_above(top, base, 0, 65536, include_base=True) == (True, 65536)
    st = top.block_status(196608, 65536)
    assert st.flags & BS_ZERO and st.flags & BS_ALLOCATED  # a zero cluster is allocated and reads zeroes
    assert top.pread(196608, 65536) == bytes(65536)
    st = top.block_status(131072, 65536)
    assert st.flags & BS_DATA and st.flags & BS_ALLOCATED


def test_shorter_backing_reads_zero_and_counts_as_allocated():
    pyrep.blockdev_add({"driver": "memory", "size": "1M", "node-name": "short"})
    lookup = pyrep.lookup("short")
    lookup.pwrite(0, b"s" * (1 << 20))
    top = pyrep.blockdev_add({"driver": "memory", "size": "2M", "backing": "short", "node-name": "long"})
    assert top.pread((1 << 20) - 2, 4) == b"ss\0\0"
    assert pyrep.is_allocated_above(top, None, 1 << 20, 65536)[0]


def test_is_root():
    pyrep.blockdev_add({"driver": "memory", "size": "1M", "node-name": "b"})
    top = pyrep.blockdev_add({"driver": "memory", "backing": "b", "node-name": "t"})
    assert pyrep.is_root(top) and not pyrep.is_root(pyrep.lookup("b"))


def test_backend_names_and_lookup(tmp_path):
    blk = pyrep.open_backend(raw(tmp_path), name="disk0")
    assert pyrep.backend("disk0") is blk and pyrep.lookup("disk0") is blk.node and blk.name == "disk0"
    with pytest.raises(pyrep.OptionError, match="duplicate backend name 'disk0'"):
        pyrep.open_backend({"driver": "null"}, name="disk0")
    blk.close()
    with pytest.raises(pyrep.OptionError, match="no backend named 'disk0'"):
        pyrep.backend("disk0")
    with pytest.raises(pyrep.BlockError) as e:
        blk.pread(0, 1)
    assert e.value.errno == errno.EBADF


def test_backend_usable_from_many_threads():
    blk = pyrep.open_backend({"driver": "memory", "size": "8M"})

    def worker(t):
        for i in range(50):
            off = (t * 50 + i) * 4096
            blk.pwrite(off, bytes([t]) * 4096)
            assert blk.pread(off, 4096) == bytes([t]) * 4096
    run_in_threads(worker, [(t,) for t in range(8)])


def test_close_all_closes_everything(tmp_path):
    pyrep.open_backend(raw(tmp_path), name="x")
    pyrep.blockdev_add({"driver": "memory", "size": "1M", "node-name": "y"})
    pyrep.close_all()
    assert pyrep.nodes() == {} and pyrep.backends() == {}


def test_inactive_nodes_refuse_io():
    blk = pyrep.open_backend({"driver": "memory", "size": "1M"})
    blk.node.set_inactive(True)
    for call in (lambda: blk.pread(0, 1), lambda: blk.pwrite(0, b"x")):
        with pytest.raises(pyrep.BlockError) as e:
            call()
        assert e.value.errno == errno.EPERM and "inactive" in str(e.value)
    blk.node.set_inactive(False)
    blk.pwrite(0, b"x")


def test_detect_zeroes_turns_zero_writes_into_zero_clusters():
    base = pyrep.blockdev_add({"driver": "memory", "size": "1M", "node-name": "base"})
    base.pwrite(0, b"\xff" * 65536)
    blk = pyrep.open_backend({"driver": "memory", "backing": "base", "detect-zeroes": "on"})
    blk.pwrite(0, bytes(65536))
    st = blk.block_status(0, 65536)
    assert st.flags & BS_ZERO and st.flags & BS_ALLOCATED
    assert blk.node.driver.memory_used < 200  # no compressed payload was stored
    assert blk.pread(0, 65536) == bytes(65536)


def test_resize_seen_by_every_backend_on_the_node():
    pyrep.blockdev_add({"driver": "memory", "size": "1M", "node-name": "m"})
    a = pyrep.open_backend("m", share_rw=True, perm="consistent-read,write,resize", shared="all")
    b = pyrep.open_backend("m", shared="all")
    assert b.length == 1 << 20
    b.pread(0, 1)  # caches the length
    a.truncate(2 << 20)
    assert b.pread((2 << 20) - 1, 1) == b"\0"  # b's cached length was refreshed
    a.truncate(1 << 20)
    with pytest.raises(pyrep.BlockError) as e:
        b.pread((2 << 20) - 1, 1)
    assert e.value.errno == errno.EINVAL


@needs("qemu-img")
def test_backing_loops_between_images_are_refused_by_the_graph(tmp_path):
    """A raw-probed chain cannot loop, so build a -> b -> a with qcow2 headers and open it through a
    format that leaves loop detection to the graph: the memory overlay names its backing by options,
    and the graph refuses an image that already is in the chain being opened."""
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qimg("create", "-q", "-f", "qcow2", a, "1M")
    qimg("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b)
    qimg("rebase", "-q", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", a)
    before = set(pyrep.nodes())
    with pytest.raises(pyrep.OptionError, match="loop"):
        pyrep.open_backend({"driver": "qcow2", "file": {"driver": "file", "filename": str(b)}})
    assert set(pyrep.nodes()) == before
    # the graph's own check, reached without the qcow2 header walk
    from pyrep.graph import open_backing_file
    top = pyrep.blockdev_add({"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(a)}})
    with pytest.raises(pyrep.OptionError, match="loops"):
        open_backing_file(top, "a.qcow2", "qcow2", str(a))


@needs("qemu-img")
def test_check_image_repairs_an_image_marked_corrupt(tmp_path):
    import struct
    img = tmp_path / "c.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "1M")
    with open(img, "r+b") as f:          # set the corrupt bit (incompatible feature bit 1)
        f.seek(72)
        feats = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", feats | 2))
    with pytest.raises(pyrep.Error, match="corrupt"):
        pyrep.open_backend({"driver": "qcow2", "file": {"driver": "file", "filename": str(img)}})
    report = pyrep.check_image(str(img), repair="all")
    assert report["corruptions"] == 0
    with pyrep.open_backend({"driver": "qcow2", "file": {"driver": "file", "filename": str(img)}}) as blk:
        blk.pwrite(0, b"writable again")
    qcheck(img)


def test_write_notifier_skip_bitmap_keeps_fast_path_only_inside_set_granules():
    calls = []
    blk = pyrep.open_backend({"driver": "memory", "size": "1M", "node-name": "m"})
    skip = pyrep.Bitmap(1 << 20, 65536)
    skip.set(0, 65536)

    def notifier(node, offset, length, flags):
        calls.append((offset, length))
    blk.node.add_write_notifier(notifier, skip=skip)
    blk.pwrite(100, b"x" * 100)          # inside a set granule: the notifier would do nothing
    blk.pwrite(65000, b"y" * 1000)       # crosses into a clear granule: it must run
    blk.pwrite(200000, b"z")
    assert calls == [(65000, 1000), (200000, 1)]
    blk.node.enable_tracking()           # tracking is handled in C too: the skip still applies...
    blk.pwrite(100, b"x")
    blk.pwrite(70000, b"t")              # ...and a write outside set granules still notifies
    blk.node.disable_tracking()
    assert calls[-1] == (70000, 1) and len(calls) == 3
    blk.node.detect_zeroes = "on"        # a reason the C path does not handle: every write notifies
    blk.node._refresh_paths()
    blk.pwrite(100, b"x")
    blk.node.detect_zeroes = "off"
    blk.node._refresh_paths()
    assert calls[-1] == (100, 1)
    blk.node.remove_write_notifier(notifier)
    blk.pwrite(300000, b"w")
    assert len(calls) == 4
    assert blk.pread(100, 100) == b"x" + b"x" * 99 and blk.pread(300000, 1) == b"w"


def test_allocation_extents_walks_a_layer_in_order():
    from pyrep.node import allocation_extents
    base = pyrep.blockdev_add({"driver": "memory", "size": "1M", "node-name": "xb"})
    top = pyrep.blockdev_add({"driver": "memory", "backing": "xb", "node-name": "xt", "cluster-size": "64K"})
    top.pwrite(0, b"a" * 65536)
    top.pwrite(3 * 65536, b"b" * 2 * 65536)
    ext = list(allocation_extents(lambda p, n: pyrep.is_allocated(top, p, n), 0, top.length))
    assert ext == [(0, 65536, True), (65536, 2 * 65536, False), (3 * 65536, 2 * 65536, True),
                   (5 * 65536, 11 * 65536, False)]
    # a window, clipped at its end
    assert list(allocation_extents(lambda p, n: pyrep.is_allocated(top, p, n), 32768, 4 * 65536)) == \
        [(32768, 32768, True), (65536, 2 * 65536, False), (3 * 65536, 65536, True)]
    # a probe that makes no progress ends the walk instead of spinning
    assert list(allocation_extents(lambda p, n: (True, 0), 0, 100)) == []
    assert base.pread(0, 1) == b"\0"


def test_a_write_notifier_reads_old_data_untracked_inside_a_serialising_write():
    """preadv_untracked is the read a write notifier may make: inside a serialising write, a tracked
    read of the same range would wait for that very write."""
    from pyrep.constants import REQ_SERIALISING
    node = pyrep.blockdev_add({"driver": "memory", "size": "1M", "node-name": "un"})
    node.pwrite(0, b"old!" * 1024)
    seen = []

    def notifier(n, offset, length, flags):
        buf = bytearray(length)
        n.preadv_untracked(offset, length, pyrep.IOVector(buf))
        seen.append(bytes(buf))
    node.enable_tracking()
    node.add_write_notifier(notifier)
    w = spawn(node.pwritev, 0, 4096, pyrep.IOVector(b"new!" * 1024), REQ_SERIALISING)
    finished = w.done.wait(TIMEOUT)
    node.remove_write_notifier(notifier)
    node.disable_tracking()
    assert finished, "the notifier's read waited for the write it runs in"
    w.join()
    assert seen == [b"old!" * 1024] and node.pread(0, 4) == b"new!"
