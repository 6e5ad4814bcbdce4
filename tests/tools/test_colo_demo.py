"""The README's main command: ``pyrep-demo``, two storage daemons replicating over loopback, verifies itself."""
import subprocess
import sys

from pyrep.tools import colo_demo


def test_demo_runs_two_daemons_and_verifies():
    r = subprocess.run([sys.executable, "-m", "pyrep.tools.demo", "--size", "8M", "--seed", "3",
                        "--checkpoints", "3", "--writes", "16"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for line in ("initial copy: blockdev-backup sync=full over NBD", "primary SIGKILLed",
                 "failover: xen-set-replication failover=true, commit done in",
                 "secondary's view through its export after failover: identical (8 MiB)",
                 "secondary disk file after a clean exit: identical (8 MiB)", "secondary disk check: clean",
                 "pyrep-demo: OK"):
        assert line in out, out


def test_demo_notices_a_disk_that_is_not_the_last_checkpoint(monkeypatch, capsys):
    # a model that forgets the last checkpoint expects older data: the demo must say so and exit 1
    real = colo_demo.Model.do_checkpoint
    calls = []

    def forgetful(self):
        calls.append(1)
        if len(calls) != 2:
            real(self)
    monkeypatch.setattr(colo_demo.Model, "do_checkpoint", forgetful)
    assert colo_demo.main(["--size", "8M", "--seed", "4", "--checkpoints", "2", "--writes", "16",
                           "--transport", "unix"]) == 1
    out = capsys.readouterr().out
    assert "DIFFERS from the model" in out and "pyrep-demo: FAILED" in out, out
    assert len(calls) == 2
