"""Waiting for a condition with a deadline, instead of sleeping and hoping."""
import time

TIMEOUT = 10.0


def wait_until(cond, timeout=TIMEOUT, what=None, interval=0.001):
    """Poll ``cond()`` until it returns something true and return that; fail with ``what`` (or the
    condition's name) when ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or getattr(cond, '__qualname__', cond)}")
        time.sleep(interval)
