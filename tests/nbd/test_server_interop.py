"""The in-process NBD server judged by clients nobody here wrote: nbdinfo, nbdcopy, qemu-img, qemu-io, fio."""
import json
import os

import pytest

import pyrep
from nbd_testlib import RawClient, raw_node, run, server, uri  # noqa: F401 - fixtures
from pyrep.nbd import proto as P


def test_nbdinfo_sees_export_details(tmp_path, server):
    node, _ = raw_node(tmp_path, 8 << 20)
    pyrep.export_add(node, name="disk", writable=True, description="the test disk")
    info = json.loads(run("nbdinfo", "--json", uri(server.sock_path, "disk")).stdout)
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    e = info["exports"][0]
    assert e["export-name"] == "disk" and e["description"] == "the test disk"
    assert e["export-size"] == 8 << 20 and e["is_read_only"] is False
    assert e["contexts"] == ["base:allocation"]
    assert e["can_flush"] and e["can_fua"] and e["can_trim"] and e["can_zero"] and e["can_fast_zero"]
    assert e["block_size_maximum"] == 32 << 20


def test_nbdinfo_list_shows_every_export(tmp_path, server):
    a, _ = raw_node(tmp_path, 1 << 20, "a")
    b, _ = raw_node(tmp_path, 2 << 20, "b")
    pyrep.export_add(a)
    pyrep.export_add(b, name="second", description="two")
    out = json.loads(run("nbdinfo", "--json", "--list", uri(server.sock_path)).stdout)
    got = {e["export-name"]: e for e in out["exports"]}
    assert set(got) == {"a", "second"}
    assert got["second"]["export-size"] == 2 << 20 and got["second"]["description"] == "two"
    assert got["a"]["is_read_only"] is True
    assert [e["name"] for e in pyrep.nbd_exports()] == ["a", "second"]
    assert pyrep.nbd_exports()[1]["node-name"] == "b" and pyrep.nbd_exports()[1]["type"] == "nbd"


def test_qemu_io_writes_reach_the_node_and_read_back(tmp_path, server):
    node, path = raw_node(tmp_path, 16 << 20)
    pyrep.export_add(node, writable=True)
    u = uri(server.sock_path, "d0")
    run("qemu-io", "-f", "raw", "-c", "write -P 0xa5 4096 1M", "-c", "write -z 2M 64k", "-c", "flush",
        "-c", "write -f -P 0x11 8M 4k", u)
    run("qemu-io", "-f", "raw", "-c", "read -P 0xa5 4096 1M", "-c", "read -P 0 2M 64k", "-c", "read -P 0x11 8M 4k", u)
    with open(path, "rb") as f:
        f.seek(4096)
        assert f.read(1 << 20) == b"\xa5" * (1 << 20)
    # the node itself sees the writes (the export shares writes with other users)
    blk = pyrep.open_backend(node, share_rw=True, read_only=True)
    assert blk.pread(8 << 20, 4096) == b"\x11" * 4096
    blk.close()


def test_read_only_export_refuses_writes_with_eperm(tmp_path, server):
    node, path = raw_node(tmp_path, 1 << 20)
    pyrep.export_add(node)
    p = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", uri(server.sock_path, "d0"), check=False)
    assert p.returncode != 0 and "Permission denied" in p.stderr      # it sees the read-only flag
    c = RawClient(server.sock_path).go("d0")
    assert c.flags & P.TFLAG_READ_ONLY
    c.request(P.CMD_WRITE, 1, 0, 4096, data=b"x" * 4096)
    c.request(P.CMD_TRIM, 2, 0, 4096)
    c.request(P.CMD_WRITE_ZEROES, 3, 0, 4096)
    assert sorted(c.reply()[:2] for _ in range(3)) == [(1, P.NBD_EPERM), (2, P.NBD_EPERM), (3, P.NBD_EPERM)]
    c.request(P.CMD_READ, 4, 0, 4096)
    assert c.reply(4096) == (4, 0, bytes(4096))
    c.close()
    assert open(path, "rb").read(4096) == bytes(4096)


def test_qemu_img_convert_compare_and_map(tmp_path, server):
    src = tmp_path / "src.raw"
    data = os.urandom(1 << 20)
    with open(src, "wb") as f:
        f.truncate(8 << 20)
        f.seek(3 << 20)
        f.write(data)
    node = pyrep.blockdev_add({"driver": "raw", "node-name": "src",
                               "file": {"driver": "file", "filename": str(src)}})
    pyrep.export_add(node)
    u = uri(server.sock_path, "src")
    out = tmp_path / "out.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", u, out)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", u, out)
    info = json.loads(run("qemu-img", "info", "--output=json", "-f", "raw", u).stdout)
    assert info["virtual-size"] == 8 << 20
    m = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", u).stdout)
    data_ranges = [(e["start"], e["length"]) for e in m if e["data"]]
    assert any(s <= 3 << 20 and s + n >= 4 << 20 for s, n in data_ranges)
    assert any(not e["data"] and e["zero"] and e["start"] >= 4 << 20 for e in m)


def test_nbdcopy_both_ways_and_nbdinfo_map(tmp_path, server):
    node, path = raw_node(tmp_path, 4 << 20)
    pyrep.export_add(node, writable=True)
    u = uri(server.sock_path, "d0")
    src = tmp_path / "in.raw"
    payload = os.urandom(1 << 20)
    with open(src, "wb") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(payload)
    run("nbdcopy", src, u)
    run("nbdcopy", u, tmp_path / "back.raw")
    assert open(tmp_path / "back.raw", "rb").read() == open(src, "rb").read()
    m = run("nbdinfo", "--map", u).stdout
    assert "data" in m


def test_fio_verify_over_nbd(tmp_path, server):
    node, _ = raw_node(tmp_path, 16 << 20)
    pyrep.export_add(node, writable=True)
    run("fio", "--ioengine=nbd", f"--uri={uri(server.sock_path, 'd0')}", "--rw=randwrite", "--bs=4k",
        "--iodepth=16", "--size=16M", "--name=v", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
        "--output-format=json", f"--output={tmp_path / 'fio.json'}")
    job = json.loads(open(tmp_path / "fio.json").read())["jobs"][0]
    assert job["error"] == 0 and job["write"]["total_ios"] == 4096
