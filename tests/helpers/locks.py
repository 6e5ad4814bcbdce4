"""A QEMU process holding an image, for the image-locking tests.

QEMU locks one byte per permission (offset 100 + bit: "I use it", 200 + bit: "I do not share it") with
OFD locks. ``qemu_io_holding`` starts an interactive qemu-io on the image and returns once the byte that
says "write is used" is locked, seen from here with F_OFD_GETLK: the moment qemu-io holds its locks, not
a guess of how long it takes to open the image.
"""
import contextlib
import fcntl
import os
import struct
import subprocess

from helpers.referees import require
from helpers.wait import wait_until

_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_FLOCK = "hhqqi4x"                  # struct flock on Linux: type, whence, start, len, pid
WRITE_USED = 100 + 1                # QEMU's permission-lock base + the bit of BLK_PERM_WRITE
LOCK_BYTES = (100, 101, 102, 103, 200, 201, 202, 203)     # every byte QEMU locks for the four permissions


def byte_locked_by_other(path, byte):
    fd = os.open(path, os.O_RDONLY)
    try:
        res = fcntl.fcntl(fd, _F_OFD_GETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
        return struct.unpack(_FLOCK, res)[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


@contextlib.contextmanager
def qemu_io_holding(path, fmt="raw", timeout=20.0):
    """An interactive ``qemu-io -f fmt path`` (read-write) for the ``with`` block,
    entered once it holds its locks; it quits (or is killed) on exit."""
    require("qemu-io")
    holder = subprocess.Popen(["qemu-io", "-f", fmt, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: holder.poll() is not None or byte_locked_by_other(path, WRITE_USED),
                   timeout, "qemu-io to lock the image")
        assert holder.poll() is None, f"qemu-io exited: {holder.communicate()}"
        yield holder
    finally:
        try:
            holder.communicate("quit\n", timeout=10)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
