"""pyrep-io and pyrep-img ended by a signal lose no acknowledged write (issue 9: no data lost at exit):
SIGTERM/SIGINT end them through SystemExit, so their images are flushed and closed; qemu-io and
qemu-img judge the images afterwards."""
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from helpers.nbd_peers import nbdkit
from helpers.referees import needs, qimg, run

pytestmark = needs("qemu-img", "qemu-io")

DEADLINE = 60.0


def read_until(proc, text, timeout=DEADLINE):
    """Read the process's stdout until ``text`` shows (bounded in time); what was read."""
    got, end = b"", time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while text.encode() not in got:
        left = end - time.monotonic()
        assert left > 0, f"no {text!r} within {timeout} s; got {got[-500:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, f"stdout closed before {text!r}; got {got[-500:]!r}, stderr {proc.stderr.read()!r}"
            got += chunk
    return got


@pytest.fixture
def spawn():
    """Start a tool in a subprocess; every one is killed and reaped when the test ends."""
    procs = []

    def start(*args):
        p = subprocess.Popen([sys.executable, "-m", *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        procs.append(p)
        return p
    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=DEADLINE)
        for f in (p.stdin, p.stdout, p.stderr):
            f.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_pyrep_io_ended_by_a_signal_keeps_its_writes(tmp_path, spawn, sig):
    img = tmp_path / "a.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "4M")
    p = spawn("pyrep.tools.io", img)                    # interactive: commands from stdin
    p.stdin.write(b"write -P 0x61 0 64k\naio_write -P 0x62 1M 64k\naio_flush\nwrite -z 2M 64k\n")
    p.stdin.flush()
    read_until(p, "wrote 65536/65536 bytes at offset 2097152")     # all four acknowledged; stdin stays open
    p.send_signal(sig)
    assert p.wait(timeout=DEADLINE) == 128 + sig, p.stderr.read()
    assert b"Traceback" not in p.stderr.read()
    run("qemu-io", "-f", "qcow2", "-c", "read -P 0x61 0 64k", "-c", "read -P 0x62 1M 64k", "-c", "read -P 0 2M 64k",
        img)
    assert "No errors were found" in qimg("check", img).stdout


@needs("nbdkit")
def test_pyrep_img_ended_by_a_signal_leaves_a_consistent_image(tmp_path, spawn):
    """A convert from a slow source (nbdkit's delay filter) stopped half way: exit 128+SIGTERM, and what
    it wrote is a clean qcow2 whose mapped data is the source's."""
    src = nbdkit(tmp_path, "pattern", "size=64M", "rdelay=20ms", filters=("delay",))
    out = tmp_path / "out.qcow2"
    p = spawn("pyrep.tools.img", "convert", "-p", "-O", "qcow2", src.uri(), out)
    read_until(p, "/100%)")                             # the progress bar is drawn: copying has begun
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=DEADLINE) == 128 + signal.SIGTERM, p.stderr.read()
    assert qimg("check", out).returncode == 0
    # every cluster the image maps reads as the source: compare the mapped ranges through qemu-io
    import json
    extents = json.loads(qimg("map", "--output=json", out).stdout)
    data = [e for e in extents if e["data"]]
    for e in data[:8]:
        n = min(e["length"], 1 << 20)
        theirs = run("qemu-io", "-r", "-c", f"read -v {e['start']} {n}", src.uri()).stdout
        mine = run("qemu-io", "-r", "-f", "qcow2", "-c", f"read -v {e['start']} {n}", out).stdout
        dump = lambda s: [line for line in s.splitlines() if line[:1].isdigit() and ":" in line[:9]]  # noqa: E731
        assert dump(mine) == dump(theirs)
