"""Helpers for the replication tests: build QEMU-shaped primary and secondary graphs.

Kinds of secondary graphs (``KINDS``):

- ``qcow2``: secondary, active and hidden disks are 64 MiB qcow2 images made by
  ``qemu-img create -f qcow2`` (QEMU's tests/unit/test-replication.c);
- ``qcow2+memory``: qcow2 secondary disk, memory active/hidden with 4K clusters (the recommended config);
- ``raw+memory``: raw secondary disk (``qemu-img create -f raw``), memory active/hidden;
- ``memory``: everything in memory.
"""
import os

import pytest

import pyrep

from helpers.referees import qimg

M = 1 << 20
IMG_SIZE = 64 * M
KINDS = ("qcow2", "qcow2+memory", "raw+memory", "memory")

# names as in QEMU's test
S_LOCAL = "s_local"          # the secondary disk node
S_LOCAL_BLK = "colo-disk"    # its backend
S_ID = "top"                 # the top backend (top-id)
REP = "rep"                  # the secondary replication node
P_ID = "primary"


def new_image(path, fmt, size=IMG_SIZE):
    qimg("create", "-f", fmt, path, size)
    return str(path)


def disk_opts(tmp_path, name, fmt, size=IMG_SIZE, debug=None, backing=None, cluster_size=None):
    """Options of a disk node ``name``: fmt is qcow2/raw (an image file) or memory.
    ``debug``: put a blkdebug node of that name between the format and its file (image files only)."""
    if fmt == "memory":
        assert not debug, "blkdebug goes under an image format"
        opts = {"driver": "memory", "size": size, "node-name": name}
        if cluster_size:
            opts["cluster-size"] = cluster_size
        if backing is not None:
            opts["backing"] = backing
        return opts
    path = new_image(os.path.join(str(tmp_path), f"{name}.{fmt}"), fmt, size)
    file = {"driver": "file", "filename": path}
    if debug:
        file = {"driver": "blkdebug", "node-name": debug, "file": file}
    opts = {"driver": fmt, "node-name": name, "file": file}
    if backing is not None:
        opts["backing"] = backing
    return opts


def kind_formats(kind):
    """(secondary disk format, active/hidden format)."""
    return {"qcow2": ("qcow2", "qcow2"), "qcow2+memory": ("qcow2", "memory"),
            "raw+memory": ("raw", "memory"), "memory": ("memory", "memory")}[kind]


class Secondary:
    """The secondary side: ``top`` (backend S_ID) -> replication -> active -> hidden -> s_local."""

    def __init__(self, tmp_path, kind="qcow2+memory", size=IMG_SIZE, fill=0x11, sd_debug=None,
                 active_debug=None, hidden_debug=None, top_id=S_ID, start=False):
        sfmt, ofmt = kind_formats(kind)
        self.size = size
        sd = pyrep.blockdev_add(disk_opts(tmp_path, S_LOCAL, sfmt, size, debug=sd_debug))
        self.local = pyrep.open_backend(sd, name=S_LOCAL_BLK, share_rw=True)
        if fill is not None:
            self.local.pwrite(0, bytes([fill]) * size)
        # the recommended config's overlays have 4K clusters (a 4K write copies 4K); the other memory
        # kinds keep the 64K default, so both copy granularities are exercised
        ocs = "4K" if kind == "qcow2+memory" else None
        hidden = disk_opts(tmp_path, "hidden", ofmt, size, debug=hidden_debug, backing=S_LOCAL, cluster_size=ocs)
        active = disk_opts(tmp_path, "active", ofmt, size, debug=active_debug, backing=hidden, cluster_size=ocs)
        self.top = pyrep.open_backend({"driver": "replication", "mode": "secondary", "top-id": top_id,
                                       "node-name": REP, "file": active}, name=S_ID)
        self.rep = pyrep.lookup(REP)
        if start:
            pyrep.replication.start_all("secondary")

    @property
    def driver(self):
        return self.rep.driver


class Primary:
    """QEMU's primary: quorum(vote-threshold=1, fifo) over the local disk and replication(primary)
    whose file is the secondary disk node (referenced by name, same process)."""

    def __init__(self, tmp_path, kind="qcow2+memory", size=IMG_SIZE, fill=0x11, secondary_node=S_LOCAL,
                 local_debug=None):
        sfmt, _ = kind_formats(kind)
        local = disk_opts(tmp_path, "p_local", sfmt, size, debug=local_debug)
        self.blk = pyrep.open_backend({
            "driver": "quorum", "node-name": "p_quorum", "vote-threshold": 1, "read-pattern": "fifo",
            "children": [local, {"driver": "replication", "mode": "primary", "node-name": "p_rep",
                                 "file": secondary_node}]}, name=P_ID)
        self.local = pyrep.lookup("p_local")
        self.rep = pyrep.lookup("p_rep")
        if fill is not None:
            # seed: the local disk holds what the secondary disk holds
            self.local.pwrite(0, bytes([fill]) * size)


def stage(name=REP):
    return pyrep.lookup(name).driver.stage


def error_of(name=REP):
    return pyrep.lookup(name).driver.current_error()


def expect_pattern(blk, byte, offset, length, chunk=8 * M):
    pos, end = offset, offset + length
    while pos < end:
        n = min(chunk, end - pos)
        data = blk.pread(pos, n)
        if data != bytes([byte]) * n:
            bad = next(i for i, b in enumerate(data) if b != byte)
            raise AssertionError(f"at {pos + bad}: expected {byte:#x}, got {data[bad]:#x}")
        pos += n


def has_commit():
    import pyrep.jobs as jobs
    return hasattr(jobs, "commit")


def need_commit():
    if not has_commit():
        pytest.fail("pyrep.jobs.commit is not available yet: failover cannot be tested")
