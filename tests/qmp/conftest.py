import os
import signal

import pytest

from helpers.qmp import Daemon
from helpers.wait import wait_until


@pytest.fixture
def daemon(tmp_path):
    """``daemon(*args, monitor=True, cwd=None, home=None)`` starts a pyrep-storage-daemon whose QMP socket
    is ``home/qmp.sock`` (``home`` defaults to tmp_path); every one is stopped at the end."""
    started = []

    def start(*args, monitor=True, cwd=None, home=None):
        d = Daemon(home or tmp_path, args, monitor=monitor, cwd=cwd)
        started.append(d)
        return d
    yield start
    for d in started:
        d.stop()


@pytest.fixture
def reap_pids():
    """A list to put the ids of processes that are not our children (a daemonized daemon): each is
    sent SIGTERM at the end, then SIGKILL if it is still there after the deadline."""
    pids = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        try:
            wait_until(lambda: not _running(pid), 30, f"process {pid} to exit")
        except AssertionError:
            os.kill(pid, signal.SIGKILL)


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
