"""An example third-party pyrep driver: a filter that XORs every byte with ``key``.

It shows the whole plugin contract: a ``BlockDriver`` subclass that declares
its name, that it is a filter and its typed options, implements only the ops
it changes (read and write), and lets the base class forward the rest
(zeroes, discard, flush, block status, length) to its ``file`` child.
"""
import pyrep
from pyrep.options import Opt


class XorDriver(pyrep.BlockDriver):
    format_name = "xor"
    is_filter = True
    options = (
        Opt("file", "child", required=True, help="the node holding the scrambled data"),
        Opt("key", "number", default=0x5A, min=0, max=255, help="the byte every data byte is XORed with"),
    )

    def open(self, opts):
        self.file = self.node.open_child(opts, "file")
        self.table = bytes(b ^ int(opts["key"]) for b in range(256))

    def preadv(self, offset, length, iov):
        self.file.preadv(offset, length, iov)
        iov.copy_from(0, iov.to_bytes().translate(self.table))

    def pwritev(self, offset, length, iov, flags=0):
        scrambled = iov.to_bytes().translate(self.table)
        self.file.pwritev(offset, length, pyrep.IOVector(scrambled), flags)
