"""The file driver: image locking interop with QEMU, and memory file system detection."""
import os
import subprocess

import pytest

import pyrep

from helpers.locks import LOCK_BYTES, byte_locked_by_other, qemu_io_holding
from helpers.referees import needs, qimg, qio

pytestmark = needs("qemu-img", "qemu-io")


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.raw"
    qimg("create", "-f", "raw", path, "1M")
    return path


def opts(path, **file_extra):
    return {"driver": "raw", "file": {"driver": "file", "filename": str(path), **file_extra}}


def test_qemu_img_cannot_write_while_pyrep_writes(image):
    with pyrep.open_backend(opts(image)) as blk:
        blk.pwrite(0, b"pyrep")
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", str(image)], capture_output=True, text=True)
        assert r.returncode != 0 or "Failed to get" in r.stderr + r.stdout
        assert "Failed to get" in r.stderr + r.stdout
        assert qimg("info", "-U", image).returncode == 0
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x70 0 1", str(image)], capture_output=True, text=True)
    assert r.returncode == 0 and "verification failed" not in r.stdout  # 'p' == 0x70, written by pyrep


def test_read_only_pyrep_lets_qemu_read_but_not_write(image):
    with pyrep.open_backend(opts(image), read_only=True) as blk:
        blk.pread(0, 512)
        r = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read 0 512", str(image)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", str(image)], capture_output=True, text=True)
        assert "Failed to get" in r.stderr + r.stdout  # pyrep did not share writes


def test_pyrep_refuses_an_image_qemu_holds(image):
    with qemu_io_holding(image):
        with pytest.raises(pyrep.PermissionConflict, match=r'Failed to get .*"write" lock'):
            pyrep.open_backend(opts(image))
        # read-only with shared writes (qemu-img -U style) is allowed
        with pyrep.open_backend(opts(image), read_only=True, shared="all") as blk:
            assert blk.pread(0, 4) == bytes(4)


def test_locking_off(image):
    """locking=off opens and writes an image qemu-io holds (the same open is refused with locking on),
    and takes no lock of its own: qemu-img can still open the image for writing meanwhile."""
    with qemu_io_holding(image):
        with pytest.raises(pyrep.PermissionConflict):
            pyrep.open_backend(opts(image))
        with pyrep.open_backend(opts(image, locking="off")) as blk:
            blk.pwrite(0, b"x")
            blk.flush()
            assert image.read_bytes()[:1] == b"x"
    with pyrep.open_backend(opts(image, locking="off")) as blk:
        assert not any(byte_locked_by_other(image, b) for b in LOCK_BYTES)
        qio(image, "write -P 0x79 4096 512", fmt="raw")              # qemu-io may write: no lock held
        assert blk.pread(4096, 512) == b"\x79" * 512


def test_two_pyrep_writers_in_one_process_conflict(image):
    b1 = pyrep.open_backend(opts(image))
    with pytest.raises(pyrep.PermissionConflict, match="Failed to get"):
        pyrep.open_backend(opts(image))
    b1.close()
    pyrep.open_backend(opts(image)).close()  # the locks went away with the first one


def test_memory_file_systems_are_detected(tmp_path):
    """Small transfers on tmpfs keep the GIL (they are memory copies); elsewhere it is released."""
    import shutil
    candidates = [str(tmp_path)] + (["/dev/shm"] if os.path.isdir("/dev/shm") else [])
    for d in candidates:
        path = os.path.join(d, f"pyrep-memfs-probe-{os.getpid()}.raw")
        with open(path, "wb") as f:
            f.truncate(65536)
        try:
            fstype = subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True).stdout.strip()
            with pyrep.open_backend({"driver": "file", "filename": path}) as blk:
                assert blk.node.driver._io.memfs == (fstype in ("tmpfs", "ramfs")), fstype
                blk.pwrite(4096, b"memfs")
                assert blk.pread(4090, 12) == bytes(6) + b"memfs" + bytes(1)
        finally:
            os.unlink(path)
    assert shutil.which("stat")


def test_reads_past_the_end_of_the_file_are_zeroes(tmp_path):
    path = tmp_path / "short.raw"
    path.write_bytes(b"\xff" * 1000)
    # a raw window longer than its file: the tail of the read lies past EOF
    with pyrep.open_backend({"driver": "raw", "size": 8192, "file": {"driver": "file", "filename": str(path)}}) as blk:
        buf = bytearray(b"\xaa" * 8192)
        blk.preadv(0, pyrep.IOVector(buf))
        assert bytes(buf) == b"\xff" * 1000 + bytes(7192)
