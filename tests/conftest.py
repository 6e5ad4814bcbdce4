"""Shared fixtures: every test ends with a clean graph (no node, backend or job left) and no NBD server
it started still running."""
import os
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # for driver_conformance and helpers

import nbd_peers  # noqa: E402
import pyrep  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_graph():
    yield
    try:
        pyrep.close_all()
    finally:
        nbd_peers.stop_all()        # NBD servers a test started (tests/nbd_peers.py)


def have_qemu_img():
    return shutil.which("qemu-img") is not None


@pytest.fixture
def qemu_img():
    """Run qemu-img with arguments; returns CompletedProcess (text)."""
    if not have_qemu_img():
        pytest.fail("qemu-img is required for the interop tests (apt-get install qemu-utils)")

    def run(*args, check=True):
        return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, check=check)
    return run
