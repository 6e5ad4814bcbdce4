"""The README tells the truth: every ```python block runs verbatim, each alone in an empty directory
(it creates what it uses), in a fresh interpreter that ends without pyrep.close_all() mattering."""
import os
import re
import signal
import subprocess
import sys

import pytest

from helpers.wait import wait_until

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return [m.group(1) for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)]


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 4


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs_in_an_empty_directory(tmp_path, index):
    block = python_blocks()[index]
    try:
        r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    finally:
        stop_daemon(tmp_path / "daemon.pid")
    assert r.returncode == 0, f"README python block {index + 1} failed:\n{block}\n--- stderr:\n{r.stderr}"


def stop_daemon(pidfile):
    """A daemon a block started and did not quit (the block failed): SIGTERM, waited for, then SIGKILL."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return

    def gone():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    for sig in (signal.SIGTERM, signal.SIGKILL):
        if gone():
            return
        os.kill(pid, sig)
        try:
            wait_until(gone, timeout=15, what=f"daemon {pid} to exit")
            return
        except AssertionError:
            continue
