"""pyrep-io run as a subprocess; images cross-checked with qemu-io."""
import subprocess
import sys

import pytest

from helpers.referees import needs

pytestmark = needs("qemu-io")


def pio(*args):
    return subprocess.run([sys.executable, "-m", "pyrep.tools.io", *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def raw(tmp_path):
    img = tmp_path / "io.raw"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    return img


def test_write_read_pattern(raw):
    p = pio("-f", "raw", "-c", "write -P 0xab 0 64k", "-c", "read -P 0xab 0 64k", raw)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "wrote 65536/65536 bytes at offset 0"
    assert lines[1].startswith("64 KiB, 1 ops; ")
    assert lines[2] == "read 65536/65536 bytes at offset 0"
    q = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0xab 0 64k", str(raw)], capture_output=True, text=True)
    assert q.returncode == 0 and "Pattern verification" not in q.stdout


def test_pattern_failure_exit_1(raw):
    p = pio("-f", "raw", "-c", "write -P 0x01 4k 4k", "-c", "read -P 0x02 4k 4k", raw)
    assert p.returncode == 1
    assert "Pattern verification failed at offset 4096, 4096 bytes" in p.stdout


def test_zero_discard_flush(raw):
    p = pio("-f", "raw", "-c", "write -P 0x55 0 128k", "-c", "write -z 0 64k", "-c", "discard 64k 64k",
            "-c", "flush", "-c", "read -P 0 0 128k", raw)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "discard 65536/65536 bytes at offset 65536" in p.stdout


def test_errors(raw, tmp_path):
    p = pio("-c", "read 0 2M", raw)
    assert p.returncode == 1 and "read failed" in p.stderr
    p = pio("-c", "bogus", raw)
    assert p.returncode == 1 and 'command "bogus" not found' in p.stderr
    p = pio(tmp_path / "missing")
    assert p.returncode == 1 and "can't open device" in p.stderr
    p = pio("-r", "-c", "write 0 4k", raw)
    assert p.returncode == 1 and p.stderr.splitlines()[-1] == "pyrep-io: Block node is read-only"   # qemu-io's words


def test_verbose_dump(raw):
    p = pio("-c", "write -P 0x41 0 16", "-c", "read -v 0 16", raw)
    assert "00000000:  41 41 41 41 41 41 41 41 41 41 41 41 41 41 41 41  AAAAAAAAAAAAAAAA" in p.stdout
