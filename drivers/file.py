"""``file``: the POSIX file protocol.

pread/pwrite straight from the request's IOVector with the GIL released,
fdatasync for flush, fallocate for zeroes and discard, SEEK_DATA/SEEK_HOLE
for block status, and QEMU-compatible image locking: OFD byte-range locks
at byte 100+bit for each permission held and 200+bit for each permission
not shared, so qemu-img and pyrep refuse to write an image the other holds.
"""
import errno
import fcntl
import os
import stat
import struct

from pyrep._core import fileio
from pyrep._core.filedriver import FileIO
from pyrep.constants import (BS_ALLOCATED, BS_DATA, BS_OFFSET_VALID, BS_ZERO, PERM_CONSISTENT_READ, PERM_NAMES,
                             PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED, REQ_MAY_UNMAP)
from pyrep.driver import BlockDriver
from pyrep.errors import BlockError, OptionError, PermissionConflict
from pyrep.options import Opt

__all__ = ["FileDriver"]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# QEMU's lock layout (file-posix.c): one byte per permission bit
_LOCK_PERM_BASE = 100
_LOCK_SHARED_BASE = 200
_LOCKED_PERMS = (PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE)
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = "hhqqi4x"  # struct flock on Linux: type, whence, start, len, pid


def _lock_byte(fd, byte, ltype):
    fcntl.fcntl(fd, _F_OFD_SETLK, struct.pack(_FLOCK, ltype, os.SEEK_SET, byte, 1, 0))


def _byte_locked_by_other(fd, byte):
    res = fcntl.fcntl(fd, _F_OFD_GETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
    return struct.unpack(_FLOCK, res)[0] != fcntl.F_UNLCK


def _bit_index(bit):
    return bit.bit_length() - 1


def create_fd(path, locking=True, what="file"):
    """An fd of ``path`` (created if missing), emptied only once QEMU's creation locks are held: the
    caller writes the new image and closes the fd (which drops the locks). PermissionConflict, and the
    file untouched, if another user holds the image (a VM, or the source of the convert creating it)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise BlockError(e.errno, f"{what}: could not create '{path}': {e.strerror}", path) from None
    try:
        if locking and stat.S_ISREG(os.fstat(fd).st_mode):
            _lock_for_create(fd, path)
        os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lock_for_create(fd, path):
    """Hold write and resize, share everything but resize (QEMU's creation locks); refuse if another user
    holds resize or does not share write or resize."""
    for bit, unshare in ((PERM_WRITE, False), (PERM_RESIZE, True)):
        i = _bit_index(bit)
        try:
            _lock_byte(fd, _LOCK_PERM_BASE + i, fcntl.F_RDLCK)
            if unshare:
                _lock_byte(fd, _LOCK_SHARED_BASE + i, fcntl.F_RDLCK)
        except OSError:
            pass                # the checks below say who is in the way
    for bit in (PERM_WRITE, PERM_RESIZE):
        i = _bit_index(bit)
        if _byte_locked_by_other(fd, _LOCK_SHARED_BASE + i) or (
                bit == PERM_RESIZE and _byte_locked_by_other(fd, _LOCK_PERM_BASE + i)):
            raise PermissionConflict(f"Failed to get \"{PERM_NAMES[bit]}\" lock on '{path}': is another process "
                                     f"using the image?")


class FileDriver(BlockDriver):
    format_name = "file"
    protocol_name = "file"
    options = (
        Opt("filename", "string", required=True, help="path of the file"),
        Opt("locking", "enum", default="auto", choices=("on", "off", "auto"),
            help="QEMU-compatible image locking with OFD locks"),
        Opt("aio", "enum", default="threads", choices=("threads", "native", "io_uring"),
            help="accepted for QEMU compatibility; requests run on the caller's thread"),
    )
    create_options = (
        Opt("preallocation", "enum", default="off", choices=("off", "falloc", "full"),
            help="allocate the file's blocks at creation"),
    )

    def open(self, opts):
        path = opts["filename"]
        if not path:
            raise OptionError("file: option 'filename' must not be empty")
        self.path = path
        self.node.filename = path
        self.fd = -1
        self.fd = self._open_fd(self.node.read_only)
        st = os.fstat(self.fd)
        if stat.S_ISDIR(st.st_mode):
            os.close(self.fd)
            raise BlockError(errno.EISDIR, f"file: '{path}' is a directory", path)
        self._blockdev = stat.S_ISBLK(st.st_mode)
        size = os.lseek(self.fd, 0, os.SEEK_END) if self._blockdev else st.st_size
        self.locking = opts["locking"] != "off"
        self._locked_perm, self._locked_shared = 0, (1 << 5) - 1
        self._new_fd = None
        # the request path is Cython: reads and writes go straight to FileIO
        self._io = FileIO(self.fd, self.path, size)
        self.preadv = self._io.preadv
        self.pwritev = self._io.pwritev

    def direct_io(self):
        """The ``FileIO`` behind this node's ``preadv``/``pwritev``, for a format driver above that
        issues preadv(2)/pwritev(2)/copy_file_range(2) on its ``fd`` itself (qcow2's C path), or None
        once requests no longer go to it. Such a caller may only do what ``preadv``/``pwritev`` would
        (same fd, same offsets), must check that they are still the node's request functions (a
        filter or a reopen may replace them), and must report every byte it wrote past the end with
        :meth:`note_written`, so that the node's length stays right."""
        return self._io

    def note_written(self, end):
        """A direct writer (see :meth:`direct_io`) wrote up to byte ``end``: the file is at least that long."""
        if end > self._io.size:
            self._io.size = end

    @property
    def _size(self):
        return self._io.size

    @_size.setter
    def _size(self, value):
        self._io.size = value

    def _open_fd(self, read_only):
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            return os.open(self.path, flags)
        except OSError as e:
            mode = "read-only" if read_only else "read-write"
            raise BlockError(e.errno, f"file: could not open '{self.path}' {mode}: {e.strerror}", self.path) from None

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)  # drops the OFD locks with it
            self.fd = self._io.fd = -1

    def getlength(self):
        return self._size

    # ------------------------------------------------------------------ I/O
    def pwrite_zeroes(self, offset, length, flags=0):
        end = offset + length
        if offset >= self._size:
            # past EOF: growing the file is enough
            self.truncate(end)
            return
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if flags & REQ_MAY_UNMAP else FALLOC_FL_ZERO_RANGE
        try:
            fileio.fallocate(self.fd, mode, offset, length)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise BlockError(errno.ENOTSUP, "file: fallocate not supported here") from None
            raise BlockError(e.errno, f"file: zeroing {length} bytes at {offset} failed: {e.strerror}",
                             self.path) from None
        if end > self._size:
            self.truncate(end)

    def pdiscard(self, offset, length):
        length = min(length, self._size - offset)
        if length <= 0:
            return
        try:
            fileio.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise BlockError(e.errno, f"file: discard at {offset} failed: {e.strerror}", self.path) from None

    def flush(self):
        try:
            fileio.fdatasync(self.fd)
        except OSError as e:
            raise BlockError(e.errno, f"file: flush failed: {e.strerror}", self.path) from None

    def truncate(self, length):
        if self._blockdev:
            if length > self._size:
                raise BlockError(errno.ENOTSUP, f"file: cannot grow block device '{self.path}'")
            return
        try:
            os.ftruncate(self.fd, length)
        except OSError as e:
            raise BlockError(e.errno, f"file: resize to {length} failed: {e.strerror}", self.path) from None
        self._size = length

    def block_status(self, offset, length):
        end = min(offset + length, self._size)
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole up to EOF
                return (BS_ZERO | BS_OFFSET_VALID | BS_ALLOCATED, end - offset, offset, self.node)
            return (BS_DATA | BS_OFFSET_VALID | BS_ALLOCATED, end - offset, offset, self.node)
        if data > offset:
            return (BS_ZERO | BS_OFFSET_VALID | BS_ALLOCATED, min(data, end) - offset, offset, self.node)
        try:
            hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError:
            hole = end
        return (BS_DATA | BS_OFFSET_VALID | BS_ALLOCATED, max(1, min(hole, end) - offset), offset, self.node)

    # -------------------------------------------------------------- reopen
    def reopen_prepare(self, read_only):
        self._new_fd = self._open_fd(read_only)
        if self.locking and self._locked_perm:
            try:
                self._apply_locks(self._new_fd, self._locked_perm, self._locked_shared)
            except OSError as e:
                os.close(self._new_fd)
                self._new_fd = None
                raise BlockError(e.errno, f"file: could not lock '{self.path}': {e.strerror}") from None

    def reopen_commit(self):
        old, self.fd, self._new_fd = self.fd, self._new_fd, None
        self._io.fd = self.fd
        os.close(old)

    def reopen_abort(self):
        if self._new_fd is not None:
            os.close(self._new_fd)
            self._new_fd = None

    # ------------------------------------------------------------- locking
    def _apply_locks(self, fd, perm, shared):
        for bit in _LOCKED_PERMS:
            i = _bit_index(bit)
            _lock_byte(fd, _LOCK_PERM_BASE + i, fcntl.F_RDLCK if perm & bit else fcntl.F_UNLCK)
            _lock_byte(fd, _LOCK_SHARED_BASE + i, fcntl.F_UNLCK if shared & bit else fcntl.F_RDLCK)

    def check_perm(self, perm, shared):
        if not self.locking or self.fd < 0:
            return
        old = self._locked_perm, self._locked_shared
        try:
            # take the union first so no other process can slip in between test and set
            self._apply_locks(self.fd, perm | old[0], shared & old[1])
            for bit in _LOCKED_PERMS:
                i = _bit_index(bit)
                if perm & bit and _byte_locked_by_other(self.fd, _LOCK_SHARED_BASE + i):
                    raise PermissionConflict(f"Failed to get \"{PERM_NAMES[bit]}\" lock on '{self.path}': "
                                             f"is another process using the image?")
                if not shared & bit and _byte_locked_by_other(self.fd, _LOCK_PERM_BASE + i):
                    raise PermissionConflict(f"Failed to get shared \"{PERM_NAMES[bit]}\" lock on '{self.path}': "
                                             f"is another process using the image?")
        except PermissionConflict:
            self._apply_locks(self.fd, *old)
            raise
        except OSError as e:
            self._apply_locks(self.fd, *old)
            raise BlockError(e.errno, f"file: could not lock '{self.path}': {e.strerror}") from None

    def set_perm(self, perm, shared):
        if not self.locking or self.fd < 0:
            return
        self._apply_locks(self.fd, perm, shared)
        self._locked_perm, self._locked_shared = perm, shared

    # ------------------------------------------------------------- create
    @classmethod
    def create(cls, filename, size, opts):
        """Create (or empty) ``filename`` with ``size`` bytes. As QEMU does, the write and resize locks are
        taken and checked *before* the file is emptied: an image another user holds (a VM, or the source
        of the very convert that creates this file) is refused, and keeps its data."""
        prealloc = opts.get("preallocation", "off")
        size = (size + 511) & ~511          # qemu-img creates whole sectors too
        fd = create_fd(filename, opts.get("locking", "auto") != "off")
        try:
            os.ftruncate(fd, size)
            if prealloc == "falloc" and size:
                os.posix_fallocate(fd, 0, size)
            elif prealloc == "full" and size:
                chunk = bytes(1 << 20)
                for pos in range(0, size, len(chunk)):
                    os.pwrite(fd, chunk[:min(len(chunk), size - pos)], pos)
        except OSError as e:
            raise BlockError(e.errno, f"file: could not size '{filename}': {e.strerror}", filename) from None
        finally:
            os.close(fd)           # drops the locks

    def get_info(self):
        try:
            st = os.fstat(self.fd)
            return {"actual-size": st.st_blocks * 512}
        except OSError:
            return {}
