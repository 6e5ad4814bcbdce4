"""A qemu-img style progress indicator (``    (12.34/100%)``), on stdout as qemu-img draws it, redrawn in place."""
import sys
import time


class Progress:
    """``Progress(enabled)``; ``update(percent)`` redraws at most every 0.1 s or 1 %; ``done()`` ends at 100 %."""

    def __init__(self, enabled, stream=None, min_interval=0.1):
        self.enabled = bool(enabled)
        self.stream = stream or sys.stdout
        self.min_interval = min_interval
        self._last_pct = -100.0
        self._last_t = 0.0
        self._finished = False
        if self.enabled:
            self._last_pct, self._last_t = 0.0, time.monotonic()
            self._draw(0.0)

    def _draw(self, pct):
        self.stream.write("    (%3.2f/100%%)\r" % pct)
        self.stream.flush()

    def update(self, pct):
        if not self.enabled or self._finished:
            return
        pct = max(0.0, min(100.0, pct))
        now = time.monotonic()
        if pct == self._last_pct:
            return
        if pct - self._last_pct >= 1.0 or now - self._last_t >= self.min_interval:
            self._last_pct, self._last_t = pct, now
            self._draw(pct)

    def done(self):
        if self.enabled and not self._finished:
            self._finished = True
            if self._last_pct != 100.0:
                self._draw(100.0)
            self.stream.write("\n")
            self.stream.flush()
