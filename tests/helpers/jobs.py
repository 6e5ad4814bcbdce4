"""Shared pieces of the job tests: sizes, and a slow filter that makes a job overlap with writers."""
import time

import pytest

from pyrep.driver import BlockDriver
from pyrep.options import Opt

from helpers.drivers import registered

CS = 65536
SIZE = 4 << 20


class SlowFilter(BlockDriver):
    """A filter that sleeps before each write, so background jobs run long enough to overlap with writers
    (the sleep paces the engine; no test waits on it)."""
    format_name = "slowtest"
    is_filter = True
    options = (Opt("file", "child", required=True), Opt("delay", "number", default=0.002))

    def open(self, opts):
        self.file = self.node.open_child(opts, "file", role="file")
        self.delay = opts["delay"]

    def pwritev(self, offset, length, iov, flags=0):
        time.sleep(self.delay)
        return self.file.pwritev(offset, length, iov, flags)


@pytest.fixture
def slowtest_driver():
    """The ``slowtest`` driver, registered for one test only."""
    with registered(SlowFilter):
        yield SlowFilter
