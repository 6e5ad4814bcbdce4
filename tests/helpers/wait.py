"""Waiting for a condition with a deadline, instead of sleeping and hoping."""
import socket
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


def stays_false(cond, window=0.2, interval=0.001):
    """True if ``cond()`` stays false for ``window`` seconds. Only for things that must NOT happen (a
    request that must wait, a write that must not land): a broken engine makes them happen at once, so
    a short window catches it, and a working one never fails by being slow."""
    deadline = time.monotonic() + window
    while time.monotonic() < deadline:
        if cond():
            return False
        time.sleep(interval)
    return not cond()


def unix_listening(path):
    """True if a server accepts connections on the Unix socket ``path`` (for ``wait_until``)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()
