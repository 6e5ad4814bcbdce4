"""``raw``: the raw format over any protocol node, optionally a window of it (``offset``/``size``)."""
import errno

from pyrep.constants import BS_OFFSET_VALID, BS_RECURSE
from pyrep.driver import BlockDriver
from pyrep.errors import BlockError, OptionError
from pyrep.graph import PROBE_SIZE, format_of
from pyrep.options import Opt

from .file import FileDriver

__all__ = ["RawDriver"]


class RawDriver(BlockDriver):
    format_name = "raw"
    is_format = True
    create_options = FileDriver.create_options      # raw creates the plain file
    options = (
        Opt("file", "child", required=True, help="the protocol node"),
        Opt("offset", "size", default=0, help="where the disk starts in the file"),
        Opt("size", "size", help="the disk's length (default: the rest of the file)"),
    )

    def open(self, opts):
        self.file = self.node.open_child(opts, "file", role="file")
        self.offset = opts["offset"]
        self.size = opts.get("size")
        flen = self.file.node.length
        if self.offset > flen:
            raise OptionError(f"raw: option '{self.node.option_prefix}offset' ({self.offset}) is beyond the end of the file "
                              f"({flen} bytes)")
        if self.size is not None and self.offset + self.size > flen and self.node.read_only:
            raise OptionError(f"raw: offset+size ({self.offset}+{self.size}) is beyond the end of the file "
                              f"({flen} bytes)")
        self.request_alignment = self.file.node.align
        if self.probed:
            # whole first sectors only, so a write to sector 0 can be probed as it will read (QEMU's rule)
            self.request_alignment = max(self.request_alignment, PROBE_SIZE)
        self.child_rebound(self.file)

    def child_rebound(self, child):
        if child is self.file and self.offset == 0:
            # no translation: hand requests straight to the protocol node
            self.preadv = child.node.preadv
            if not self.probed:
                self.pwritev = child.node.pwritev

    def getlength(self):
        if self.size is not None:
            return self.size
        # as QEMU: the disk is whole 512-byte sectors; the tail of an odd-sized file reads as zeroes
        return (self.file.node.length - self.offset + 511) & ~511

    def preadv(self, offset, length, iov):
        return self.file.preadv(offset + self.offset, length, iov)

    def pwritev(self, offset, length, iov, flags=0):
        if self.probed and offset < PROBE_SIZE:
            self._check_probed_write(iov)
        return self.file.pwritev(offset + self.offset, length, iov, flags)

    def _check_probed_write(self, iov):
        """A raw image whose format was probed must not turn into another format by a guest write: the
        next probe would open it as that format (and follow, say, a backing file the guest chose)."""
        fmt = format_of(iov.copy_to(0, min(PROBE_SIZE, iov.size)), self.node.filename)
        if fmt != "raw":
            raise BlockError(errno.EPERM, f"raw: write to sector 0 of '{self.node.filename or self.node.name}' "
                                          f"refused: the image's format was probed and the write would make it "
                                          f"look like {fmt} (open it with driver=raw to allow such writes)")

    def pwrite_zeroes(self, offset, length, flags=0):
        return self.file.pwrite_zeroes(offset + self.offset, length, flags)

    def pdiscard(self, offset, length):
        return self.file.pdiscard(offset + self.offset, length)

    def truncate(self, length):
        if self.size is not None:
            raise BlockError(errno.ENOTSUP, "raw: cannot resize a disk with a fixed 'size'")
        return self.file.truncate(self.offset + length)

    def block_status(self, offset, length):
        return (BS_RECURSE | BS_OFFSET_VALID, length, offset + self.offset, self.file.node)

    def child_perm(self, role, perm, shared):
        # raw has no metadata: its file sees exactly what its users ask
        return perm, shared

    @classmethod
    def create(cls, filename, size, opts):
        from pyrep._core.registry import get_driver
        get_driver("file").create(filename, size, opts)
