"""make_empty and the image file's space: kept for reuse by default, given back with discard=unmap."""
import os

import pytest

import pyrep

from helpers.referees import needs_qemu, qcheck, qimg, qio

M = 1 << 20


@needs_qemu
@pytest.mark.parametrize("discard", ["ignore", "unmap"])
def test_make_empty_space(tmp_path, discard):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qimg("create", "-q", "-f", "qcow2", base, "64M")
    qio(base, "write -P 0x11 0 64M")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    opts = {"driver": "qcow2", "discard": discard, "file": {"driver": "file", "filename": str(top)}}
    with pyrep.open_backend(opts) as blk:
        blk.pwrite(0, b"\x22" * (32 * M))
        blk.flush()
        full = os.path.getsize(top)
        blk.node.make_empty()
        assert blk.pread(0, M) == b"\x11" * M           # the backing shows through again
        emptied = os.path.getsize(top)
        if discard == "unmap":
            assert emptied < M                          # space given back
        else:
            assert emptied >= full                      # kept for reuse: no page freeing on the checkpoint path
        blk.pwrite(0, b"\x33" * (32 * M))               # refill: the kept space is reused, the file does not grow
        blk.flush()
        assert os.path.getsize(top) <= max(full, emptied) + 2 * M
        assert blk.pread(32 * M - 4, 8) == b"\x33" * 4 + b"\x11" * 4
    qcheck(top)
    qio(top, "read -P 0x33 0 32M", "read -P 0x11 32M 32M")
