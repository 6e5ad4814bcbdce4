"""``null``: reads return zeroes (or leave the buffer alone), writes go nowhere — for benchmarks."""
from pyrep.constants import BS_ALLOCATED, BS_OFFSET_VALID, BS_ZERO
from pyrep.driver import BlockDriver
from pyrep.options import Opt

__all__ = ["NullDriver"]


class NullDriver(BlockDriver):
    format_name = "null"
    protocol_name = "null"
    options = (
        Opt("size", "size", default=1 << 30, help="the disk's length"),
        Opt("read-zeroes", "bool", default=True, help="fill read buffers with zeroes (off: leave them alone)"),
    )

    def open(self, opts):
        self.size = opts["size"]
        self.read_zeroes = opts["read-zeroes"]

    def getlength(self):
        return self.size

    def preadv(self, offset, length, iov):
        if self.read_zeroes:
            iov.memset(0, 0, length)

    def pwritev(self, offset, length, iov, flags=0):
        pass

    def pwrite_zeroes(self, offset, length, flags=0):
        pass

    def pdiscard(self, offset, length):
        pass

    def flush(self):
        pass

    def truncate(self, length):
        self.size = length

    def block_status(self, offset, length):
        return (BS_ZERO | BS_ALLOCATED | BS_OFFSET_VALID, length, offset, self.node)
