"""Crash safety: a writer killed with SIGKILL leaves an image with leaks at most, holding every
write acknowledged after a flush."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from helpers.referees import needs_qemu, qimg, run

pytestmark = needs_qemu

HERE = os.path.dirname(os.path.abspath(__file__))
SLOT = 12288
NSLOTS = 1500


def _check_no_corruption(img):
    import json
    p = qimg("check", "--output=json", img, check=False)
    res = json.loads(p.stdout)
    assert not res.get("corruptions") and not res.get("check-errors"), p.stdout + p.stderr
    return res


@pytest.mark.parametrize("cluster_size,compat", [(65536, "1.1"), (4096, "0.10"), (512, "1.1")])
def test_sigkill_writer(tmp_path, cluster_size, compat):
    base = tmp_path / "base.qcow2"
    img = tmp_path / "top.qcow2"
    size = SLOT * NSLOTS
    qimg("create", "-q", "-f", "qcow2", base, str(size))
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {size}", base)
    qimg("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size},compat={compat}",
         "-b", "base.qcow2", "-F", "qcow2", img)
    rng = random.Random(cluster_size)
    acked = {}
    touched = set()
    killed = 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    for round_ in range(5):
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "qcow2_crash_writer.py"), str(img),
                                 str(round_ * 1000 + cluster_size), str(SLOT), str(NSLOTS),
                                 ",".join(map(str, touched))],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        # kill at a random moment: after a random number of output lines, plus a random delay
        lines = []
        target = rng.randrange(5, 600)
        for line in proc.stdout:
            lines.append(line)
            if len(lines) >= target:
                break
        time.sleep(rng.uniform(0, 0.01))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        lines.extend(proc.stdout)
        err = proc.stderr.read()
        proc.stderr.close()
        assert proc.returncode in (-signal.SIGKILL, 0), err
        killed += "DONE\n" not in lines
        for line in lines:
            if line.startswith("W "):
                touched.add(int(line.split()[1]))
            if line.startswith("A "):
                slot, off, n, val = map(int, line.split()[1:])
                acked[slot] = (off, n, val)
        _check_no_corruption(img)
        # every acknowledged write is there, and the rest of its slot still shows the backing
        data = run("qemu-io", "-f", "qcow2", "-c", "help", img)  # the image opens with qemu
        from helpers.qcow2 import open_q
        blk = open_q(img, read_only=True)
        try:
            for slot, (off, n, val) in acked.items():
                got = blk.pread(slot * SLOT, SLOT)
                want = bytearray(b"\x5a" * SLOT)
                want[off - slot * SLOT:off - slot * SLOT + n] = bytes([val]) * n
                assert got == bytes(want), f"round {round_}: slot {slot} lost an acknowledged write"
        finally:
            blk.close()
        del data
    assert acked, "the writer never acknowledged anything"
    assert killed >= 3, "the writer finished before it could be killed: make it write more"
    # leaks (if any) are repairable, and then the image is clean
    import pyrep
    pyrep.check_image(str(img), repair="leaks")
    res = _check_no_corruption(img)
    assert not res.get("leaks")
