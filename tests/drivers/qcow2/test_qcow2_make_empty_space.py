"""make_empty and the image file's space: kept for reuse by default, given back with discard=unmap."""
import os
import subprocess

import pytest

import pyrep

M = 1 << 20


@pytest.mark.parametrize("discard", ["ignore", "unmap"])
def test_make_empty_space(tmp_path, discard):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64M", base], check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top], check=True)
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
    r = subprocess.run(["qemu-img", "check", top], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x33 0 32M", "-c", "read -P 0x11 32M 32M", top],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "failed" not in r.stdout, r.stdout
