"""Shared pieces of the job tests."""
import time

import pyrep
from pyrep.driver import BlockDriver
from pyrep.options import Opt

CS = 65536
SIZE = 4 << 20


class SlowFilter(BlockDriver):
    """A filter that sleeps before each write, so background jobs run long enough to overlap with writers."""
    format_name = "slowtest"
    is_filter = True
    options = (Opt("file", "child", required=True), Opt("delay", "number", default=0.002))

    def open(self, opts):
        self.file = self.node.open_child(opts, "file", role="file")
        self.delay = opts["delay"]

    def pwritev(self, offset, length, iov, flags=0):
        time.sleep(self.delay)
        return self.file.pwritev(offset, length, iov, flags)


pyrep.register_driver(SlowFilter, clobber=True)
