import pytest

from helpers.qmp import Daemon


@pytest.fixture
def daemon(tmp_path):
    """``daemon(*args, monitor=True)`` starts a pyrep-storage-daemon; every one is stopped at the end."""
    started = []

    def start(*args, monitor=True, cwd=None):
        d = Daemon(tmp_path, args, monitor=monitor, cwd=cwd)
        started.append(d)
        return d
    yield start
    for d in started:
        d.stop()
