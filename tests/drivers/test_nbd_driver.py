"""The ``nbd`` driver against servers nobody here wrote: qemu-nbd and nbdkit on Unix sockets."""
import errno
import json
import os
import random
import subprocess

import pytest

import pyrep
from pyrep.constants import BS_DATA, BS_ZERO, REQ_FUA, REQ_NO_FALLBACK
from pyrep.drivers.nbd import make_uri, parse_uri
from pyrep.nbd.client import Address  # noqa: F401

from helpers import nbd_peers
from helpers.threads import spawn
from helpers.referees import qimg, qio

MiB = 1 << 20


# ------------------------------------------------------------------ options and URIs
@pytest.mark.parametrize("uri, kind, where, export, tls", [
    ("nbd://example.org/disk", "inet", ("example.org", 10809), "disk", False),
    ("nbd://10.0.0.2:10900/", "inet", ("10.0.0.2", 10900), "", False),
    ("nbd+tcp://[::1]:7000/a%20b", "inet", ("::1", 7000), "a b", False),
    ("nbds://h/x", "inet", ("h", 10809), "x", True),
    ("nbd+unix:///colo1?socket=/run/s.sock", "unix", "/run/s.sock", "colo1", False),
    ("nbd+unix://?socket=/run/s.sock", "unix", "/run/s.sock", "", False),
    ("nbds+unix:///e?socket=/s", "unix", "/s", "e", True),
])
def test_uri_forms(uri, kind, where, export, tls):
    addr, exp, is_tls = parse_uri(uri)
    assert addr.type == kind and exp == export and is_tls == tls
    assert (addr.path if kind == "unix" else (addr.host, addr.port)) == where
    assert parse_uri(make_uri(addr, exp, tls))[1:] == (exp, tls)      # the node's filename reads back the same


@pytest.mark.parametrize("uri, words", [
    ("nbd+unix:///e", "socket"),
    ("nbd+unix://host/e?socket=/s", "takes no host"),
    ("nbd+unix:///e?socket=/s&x=1", "x"),
    ("nbd://h/e?socket=/s", "no URI parameters"),
    ("nbd:///e", "no host"),
    ("nbd://h:99999/e", "port"),
    ("http://h/e", "not an NBD URI"),
])
def test_bad_uris_name_the_problem(uri, words):
    with pytest.raises(pyrep.OptionError) as e:
        pyrep.open_backend({"driver": "nbd", "filename": uri})
    assert words in str(e.value) and "filename" in str(e.value)


@pytest.mark.parametrize("opts, words", [
    ({}, "'server' is required"),
    ({"server": {"type": "unix"}}, "server.path"),
    ({"server": {"type": "inet", "port": "1"}}, "server.host"),
    ({"server": {"type": "inet", "host": "h", "port": "x"}}, "server.port"),
    ({"server": {"type": "vsock", "cid": "3"}}, "server.type"),
    ({"server": {"type": "unix", "path": "/s", "host": "h"}}, "unknown key"),
    ({"server": {"type": "unix", "path": "/s"}, "filename": "nbd+unix:///?socket=/s"}, "cannot be combined"),
    ({"filename": "nbds://h/e"}, "tls-creds"),
    ({"server": {"type": "unix", "path": "/s"}, "tls-hostname": "h"}, "needs option 'tls-creds'"),
    ({"server": {"type": "unix", "path": "/s"}, "reconnect-delay": -1}, "reconnect-delay"),
])
def test_bad_options_name_driver_and_key(opts, words):
    with pytest.raises(pyrep.OptionError) as e:
        pyrep.open_backend({"driver": "nbd", **opts})
    assert words in str(e.value) and "nbd" in str(e.value)


def test_dotted_options_as_qemu_writes_them(tmp_path):
    peer = nbd_peers.nbdkit(tmp_path, "memory", "1M")
    blk = pyrep.open_backend(f"driver=nbd,server.type=unix,server.path={peer.sock},export=")
    assert blk.length == MiB
    assert blk.node.filename == f"nbd+unix:///?socket={peer.sock}"


def test_no_server_is_a_clear_error(tmp_path):
    with pytest.raises(pyrep.BlockError) as e:
        pyrep.open_backend({"driver": "nbd", "server": {"type": "unix", "path": str(tmp_path / "none.sock")}})
    assert "could not connect" in str(e.value) and "none.sock" in str(e.value)


def test_unknown_export_is_enoent(tmp_path):
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(MiB))
    peer = nbd_peers.qemu_nbd(tmp_path, img, export="disk")
    with pytest.raises(pyrep.BlockError) as e:
        pyrep.open_backend(peer.opts(export="other"))
    assert e.value.errno == errno.ENOENT and "other" in str(e.value)


def test_open_timeout_waits_for_a_server_that_comes_up(tmp_path):
    """open-timeout: the open keeps trying until the server listens (started once the open has failed to
    connect at least once)."""
    img = tmp_path / "d.raw"
    img.write_bytes(b"\x5a" * MiB)
    sock = tmp_path / "qemu-nbd.sock"
    opener = spawn(pyrep.open_backend, {"driver": "nbd", "server": {"type": "unix", "path": str(sock)},
                                        "export": "disk", "open-timeout": 60})
    try:
        nbd_peers.qemu_nbd(tmp_path, img)
    finally:
        blk = opener.join(120)                  # re-raises what the open raised
    assert blk.pread(0, 4) == b"\x5a" * 4


def test_read_only_export(tmp_path):
    img = tmp_path / "d.raw"
    img.write_bytes(b"\x11" * MiB)
    peer = nbd_peers.qemu_nbd(tmp_path, img, extra=("-r",))
    with pytest.raises(pyrep.BlockError) as e:
        pyrep.open_backend(peer.opts())
    assert e.value.errno == errno.EPERM and "read-only" in str(e.value)
    with pyrep.open_backend(peer.opts(), read_only=True) as blk:
        assert blk.pread(0, 3) == b"\x11" * 3
    # auto-read-only falls back to read-only, as in QEMU
    node = pyrep.blockdev_add(peer.opts(**{"auto-read-only": True, "node-name": "ro0"}))
    assert node.read_only
    pyrep.blockdev_del("ro0")


# ------------------------------------------------------------------ qemu-nbd, raw
def _sparse_raw(path, size, rng):
    """A raw file with data runs, explicit zero runs and holes; returns the model."""
    model = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in [(0, 65536), (200000, 3000), (MiB, 2 * MiB), (5 * MiB + 4096, 4096), (size - 8192, 8192)]:
            data = rng.randbytes(n)
            f.seek(off)
            f.write(data)
            model[off:off + n] = data
        f.seek(4 * MiB)
        f.write(bytes(65536))          # written zeroes: data that reads zero
    return model


def test_qemu_nbd_raw_reads_writes_zeroes_discard_flush(tmp_path):
    rng = random.Random(7)
    img = tmp_path / "d.raw"
    size = 8 * MiB
    model = _sparse_raw(img, size, rng)
    peer = nbd_peers.qemu_nbd(tmp_path, img)
    blk = pyrep.open_backend(peer.opts(discard="unmap"))
    assert blk.length == size
    assert blk.pread(0, size) == bytes(model)
    for off, n in [(1, 1), (4095, 10000), (3 * MiB - 7, 70000), (size - 1, 1)]:
        d = rng.randbytes(n)
        blk.pwrite(off, d)
        model[off:off + n] = d
    blk.pwrite(6 * MiB, b"\x42" * 4096, flags=REQ_FUA)
    model[6 * MiB:6 * MiB + 4096] = b"\x42" * 4096
    blk.pwrite_zeroes(MiB + 100, 300000)
    model[MiB + 100:MiB + 300100] = bytes(300000)
    blk.pwrite_zeroes(2 * MiB, MiB, may_unmap=True)
    model[2 * MiB:3 * MiB] = bytes(MiB)
    blk.pdiscard(7 * MiB, 65536)            # content afterwards is unspecified: read it into the model
    model[7 * MiB:7 * MiB + 65536] = blk.pread(7 * MiB, 65536)
    blk.flush()
    assert blk.pread(0, size) == bytes(model)
    blk.close()
    peer.stop()
    assert img.read_bytes() == bytes(model)          # what qemu-nbd wrote to the file


def _status_runs(blk):
    """[(start, end, data, zero)] of pyrep's block status over the whole disk, merged."""
    runs, pos = [], 0
    while pos < blk.length:
        st = blk.block_status(pos, blk.length - pos)
        item = (bool(st.flags & BS_DATA), bool(st.flags & BS_ZERO))
        if runs and runs[-1][2:] == item and runs[-1][1] == pos:
            runs[-1] = (runs[-1][0], pos + st.length) + item
        else:
            runs.append((pos, pos + st.length) + item)
        pos += st.length
    return runs


def _qemu_map_runs(uri):
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", uri], capture_output=True, text=True,
                         check=True).stdout
    runs = []
    for e in json.loads(out):
        item = (e["data"], e["zero"])
        if runs and runs[-1][2:] == item and runs[-1][1] == e["start"]:
            runs[-1] = (runs[-1][0], e["start"] + e["length"]) + item
        else:
            runs.append((e["start"], e["start"] + e["length"]) + item)
    return runs


def test_block_status_matches_qemu_img_map(tmp_path):
    img = tmp_path / "d.raw"
    _sparse_raw(img, 8 * MiB, random.Random(3))
    peer = nbd_peers.qemu_nbd(tmp_path, img)
    blk = pyrep.open_backend(peer.opts())
    blk.pwrite_zeroes(6 * MiB, MiB, may_unmap=True)     # a punched range: hole and zero
    ours = _status_runs(blk)
    assert ours == _qemu_map_runs(peer.uri())
    assert any(r[2] for r in ours) and any(r[3] and not r[2] for r in ours)   # both kinds are there


def test_qcow2_served_raw_opened_as_qcow2_through_nbd(tmp_path):
    img = tmp_path / "d.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", img, "16M")
    qio(img, "write -P 0xab 0 1M", "write -P 0xcd 5M 64k")
    peer = nbd_peers.qemu_nbd(tmp_path, img, fmt="raw")
    blk = pyrep.open_backend({"driver": "qcow2", "file": peer.opts()})
    assert blk.length == 16 * MiB
    assert blk.pread(0, MiB) == b"\xab" * MiB
    assert blk.pread(5 * MiB, 65536) == b"\xcd" * 65536
    assert blk.pread(8 * MiB, 65536) == bytes(65536)
    blk.pwrite(8 * MiB + 512, b"\xee" * 100000)          # preallocated: lands inside the export
    blk.pwrite_zeroes(0, 65536)
    blk.flush()
    blk.close()
    peer.stop()
    assert "No errors" in qimg("check", img).stdout
    qio(img, "read -P 0xee 8389120 100000", "read -P 0 0 64k", "read -P 0xab 64k 960k")


# ------------------------------------------------------------------ nbdkit: capabilities as advertised
def _log_lines(path, action):
    return [ln for ln in path.read_text().splitlines() if f" {action} id=" in ln]


def test_nbdkit_memory_flags_as_advertised(tmp_path):
    log = tmp_path / "nbdkit.log"
    peer = nbd_peers.nbdkit(tmp_path, "memory", "4M", f"logfile={log}", filters=("log",))
    blk = pyrep.open_backend(peer.opts(discard="unmap"))
    blk.pwrite(0, b"\x01" * 4096, flags=REQ_FUA)
    blk.pwrite_zeroes(8192, 8192)
    blk.pwrite_zeroes(16384, 8192, may_unmap=True)
    blk.node.pwrite_zeroes(32768, 4096, REQ_NO_FALLBACK)
    blk.pdiscard(65536, 4096)
    blk.flush()
    assert blk.pread(0, 4096) == b"\x01" * 4096
    blk.close()
    peer.stop()
    writes = _log_lines(log, "Write")
    assert len(writes) == 1 and "fua=1" in writes[0]
    zeroes = _log_lines(log, "Zero")
    assert [("trim=1" in z, "fast=1" in z) for z in zeroes] == [(False, False), (True, False), (False, True)]
    assert len(_log_lines(log, "Trim")) == 1 and len(_log_lines(log, "Flush")) >= 1


def test_without_fua_or_zeroes_the_driver_flushes_and_writes_zeroes(tmp_path):
    log = tmp_path / "nbdkit.log"
    peer = nbd_peers.nbdkit(tmp_path, "memory", "4M", f"logfile={log}",
                            filters=("log", "fua", "nozero"))   # both filters default to "none": not advertised
    blk = pyrep.open_backend(peer.opts())
    blk.pwrite(0, b"\x02" * 4096, flags=REQ_FUA)
    blk.pwrite(4096, b"\x03" * 4096)
    blk.pwrite_zeroes(4096, 4096)
    assert blk.pread(0, 8192) == b"\x02" * 4096 + bytes(4096)
    blk.close()
    peer.stop()
    actions = []
    for ln in log.read_text().splitlines():
        if " connection=" in ln:
            word = ln.split(" connection=", 1)[1].split(" ")[1]
            if not word.startswith("...") and word not in ("Connect", "Disconnect"):
                actions.append(word)
    assert actions[:3] == ["Write", "Flush", "Write"]          # FUA emulated by a flush after the write
    assert "Zero" not in actions and actions[3] == "Write"       # zeroes written as data


def test_block_size_constraints(tmp_path):
    """INFO_BLOCK_SIZE: requests are aligned to the minimum block and split at the maximum payload."""
    log = tmp_path / "nbdkit.log"
    peer = nbd_peers.nbdkit(tmp_path, "memory", "4M", f"logfile={log}", "blocksize-minimum=4096",
                            "blocksize-preferred=8192", "blocksize-maximum=65536", "blocksize-error-policy=error",
                            filters=("log", "blocksize-policy"))
    blk = pyrep.open_backend(peer.opts())
    assert blk.node.align == 4096
    data = os.urandom(300000)
    blk.pwrite(1000, data)                   # unaligned and larger than the maximum
    assert blk.pread(1000, len(data)) == data
    assert blk.pread(0, 1000) == bytes(1000)
    blk.close()
    peer.stop()
    for ln in _log_lines(log, "Read") + _log_lines(log, "Write"):
        fields = dict(f.split("=", 1) for f in ln.split() if "=" in f)
        off, count = int(fields["offset"], 16), int(fields["count"], 16)
        assert off % 4096 == 0 and count % 4096 == 0 and count <= 65536, ln


def test_nbdkit_memory_block_status_and_sparse_reads(tmp_path):
    peer = nbd_peers.nbdkit(tmp_path, "memory", "64M")
    blk = pyrep.open_backend(peer.opts())
    blk.pwrite(32 * MiB, b"\x77" * 65536)
    st = blk.block_status(0, blk.length)
    assert st.flags & BS_ZERO and not st.flags & BS_DATA and st.length == 32 * MiB
    st = blk.block_status(32 * MiB, blk.length - 32 * MiB)
    assert st.flags & BS_DATA and st.length >= 65536
    assert blk.pread(32 * MiB - 4096, 8192) == bytes(4096) + b"\x77" * 4096


def test_a_filename_uri_selects_the_nbd_driver(tmp_path):
    """As QEMU: a child with an NBD URI and no driver gets the nbd protocol; a bare URI is probed."""
    img = tmp_path / "d.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", img, "4M")
    peer = nbd_peers.qemu_nbd(tmp_path, img, fmt="raw")
    with pyrep.open_backend({"driver": "raw", "file.filename": peer.uri()}) as blk:
        assert blk.node.file.drv.format_name == "nbd" and blk.length == img.stat().st_size
    with pyrep.open_backend(peer.uri()) as blk:
        assert blk.node.drv.format_name == "qcow2" and blk.node.file.drv.format_name == "nbd"
        blk.pwrite(0, b"probed")
        assert blk.pread(0, 6) == b"probed" and blk.length == 4 * MiB


def test_unknown_host_is_a_block_error(tmp_path):
    with pytest.raises(pyrep.BlockError) as e:
        pyrep.open_backend({"driver": "nbd", "filename": "nbd://no-such-host.invalid/disk"})
    assert "could not connect" in str(e.value) and "no-such-host.invalid" in str(e.value)
