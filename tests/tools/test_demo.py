"""``pyrep-demo --in-process``: both sides in one process verify themselves and say what they did."""
import subprocess
import sys

import pyrep
from pyrep.tools import demo


def test_demo_runs_and_verifies():
    r = subprocess.run([sys.executable, "-m", "pyrep.tools.demo", "--in-process", "--size", "8M", "--seed", "3",
                        "--checkpoints", "3", "--writes", "20"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for line in ("primary writes forwarded:", "copied before write:", "checkpoints:", "failover (commit) time:",
                 "verified: the secondary disk image equals the last checkpoint"):
        assert line in out, out
    assert "images kept" not in out


def test_demo_fails_when_the_disk_is_not_the_last_checkpoint(monkeypatch, capsys, tmp_path):
    # a model that forgets one checkpoint expects older data: the demo must notice and exit 1
    # (and keep its images for a look: here under tmp_path, so the test leaves nothing behind)
    monkeypatch.setattr(demo.tempfile, "mkdtemp", lambda prefix: str(tmp_path / f"{prefix}kept"))
    (tmp_path / "pyrep-demo-kept").mkdir()
    real = demo._Model.do_checkpoint
    calls = []

    def forgetful(self):
        calls.append(1)
        if len(calls) != 4:  # the last checkpoint (1 at seeding + 3 rounds)
            real(self)
    monkeypatch.setattr(demo._Model, "do_checkpoint", forgetful)
    lines = []
    assert demo.run(size=8 << 20, seed=5, checkpoints=3, writes_per_round=20, out=lines.append) == 1
    assert any(line.startswith("FAILED") for line in lines), lines
    assert f"images kept in {tmp_path / 'pyrep-demo-kept'}" in lines
    assert (tmp_path / "pyrep-demo-kept" / "secondary.qcow2").exists()
    pyrep.close_all()


def test_demo_rejects_bad_arguments(capsys):
    import pytest
    with pytest.raises(SystemExit) as e:
        demo.main(["--size", "1K"])                 # the two-process demo
    assert e.value.code == 2
    assert "--size must be" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        demo.main(["--in-process", "--size", "1K"])
    assert e.value.code == 2
    assert "--size must be" in capsys.readouterr().err
