"""examples/colo: the pair built from the two config files, driven by run.py as an HA manager would."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_example_pair_from_config_files(tmp_path):
    work = tmp_path / "w"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "colo", "run.py"), str(work)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "checkpoint 3 done" in r.stdout
    assert "'stage': 'done'" in r.stdout
    assert "the secondary holds the last checkpoint: True" in r.stdout
    # the daemons are gone and the secondary's image is clean after its quit
    check = subprocess.run(["qemu-img", "check", str(work / "secondary.qcow2")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
