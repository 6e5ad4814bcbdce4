"""Shared fixtures and hooks: every test ends with a clean graph (no node, backend or job left), no worker
thread and no NBD server it started still running; a test marked ``needs(...)`` runs only where its
referees are installed (and fails under ``CI=true`` where one is missing). Shared helpers are in
``tests/helpers/``."""
import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # for helpers and driver_conformance

import pyrep  # noqa: E402

from helpers import nbd_peers, referees, threads  # noqa: E402

REFEREES = ("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdcopy", "nbdkit", "fio", "qemu-system-x86_64")


def pytest_configure(config):
    config.addinivalue_line("markers", "referee(*tools): the outside programs that judge this test's results")


def pytest_report_header(config):
    found = ", ".join(f"{t}={'yes' if shutil.which(t) else 'MISSING'}" for t in REFEREES)
    return [f"referees: {found}" + (" (CI: a missing referee fails its tests)" if referees.IN_CI else "")]


def pytest_runtest_setup(item):
    for mark in item.iter_markers("referee"):
        referees.require(*mark.args)


@pytest.fixture(autouse=True)
def _clean_graph():
    yield
    try:
        threads.reap()              # a worker the test left running, or one that failed unjoined
    finally:
        try:
            pyrep.close_all()
        finally:
            nbd_peers.stop_all()    # NBD servers a test started (tests/helpers/nbd_peers.py)
