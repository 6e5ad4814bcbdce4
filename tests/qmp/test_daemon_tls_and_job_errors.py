"""--object tls-creds-x509 with a TLS NBD server, and the job error events (BLOCK_JOB_ERROR)."""
import importlib.util
import json
import os

import pytest

from helpers.qmp import pull_event
from helpers.referees import needs, run

MiB = 1 << 20


def _make_pki(base):
    path = os.path.join(os.path.dirname(__file__), "..", "nbd", "pki.py")      # the NBD tests' openssl CA
    spec = importlib.util.spec_from_file_location("nbd_pki", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_pki(base)


@needs("nbdinfo", "openssl")
def test_object_tls_creds_and_tls_nbd_server(daemon, tmp_path):
    pki = _make_pki(str(tmp_path / "pki"))
    sock = tmp_path / "tls.sock"
    d = daemon("--object", f"tls-creds-x509,id=tls0,dir={pki['server']},endpoint=server,verify-peer=on",
               "--blockdev", "driver=null,node-name=n0,size=4M",
               "--nbd-server", f"addr.type=unix,addr.path={sock},tls-creds=tls0",
               "--export", "type=nbd,id=e0,node-name=n0,name=d0")
    info = json.loads(run("nbdinfo", "--json", f"nbds+unix:///d0?socket={sock}&tls-certificates={pki['client']}").stdout)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == 4 * MiB
    assert run("nbdinfo", f"nbd+unix:///d0?socket={sock}", check=False).returncode != 0    # plaintext refused
    d.client().cmd("quit")
    assert d.wait() == 0


def test_bad_object_is_one_line(daemon, tmp_path):
    import subprocess
    from helpers.qmp import DAEMON
    r = subprocess.run(DAEMON + ["--object", "tls-creds-x509,id=t0,dir=/nonexistent,endpoint=server"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "/nonexistent" in r.stderr
    r = subprocess.run(DAEMON + ["--object", "secret,id=s0,data=x"], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert r.returncode == 1 and "unknown object type 'secret'" in r.stderr


@pytest.mark.parametrize("policy, action", [("report", "report"), ("stop", "stop"), ("ignore", "ignore")])
def test_block_job_error_events(daemon, policy, action):
    d = daemon("--blockdev", "driver=null,node-name=src,size=4M",
               "--blockdev", '{"driver": "blkdebug", "node-name": "dst", '
                             '"file": {"driver": "null", "size": 4194304}, '
                             '"inject-error": [{"op": "write", "errno": "EIO", "once": true}]}')
    q = d.client()
    q.cmd("blockdev-backup", **{"job-id": "j", "device": "src", "target": "dst", "sync": "full",
                                "on-target-error": policy})
    err = pull_event(q, "BLOCK_JOB_ERROR")["data"]
    assert err == {"device": "j", "operation": "write", "action": action}
    if policy == "stop":
        pull_event(q, "JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "paused")
        q.cmd("job-resume", id="j")                  # the injected error fired once: the retry succeeds
        done = pull_event(q, "BLOCK_JOB_COMPLETED")["data"]
        assert "error" not in done and done["offset"] == done["len"] == 4 * MiB
    elif policy == "ignore":                       # the job went on; the failed range was retried
        done = pull_event(q, "BLOCK_JOB_COMPLETED")["data"]
        assert "error" not in done and done["offset"] == done["len"] == 4 * MiB
    else:
        done = pull_event(q, "BLOCK_JOB_COMPLETED")["data"]
        assert "EIO" in done["error"] or "nput/output" in done["error"], done
    with pytest.raises(Exception, match="pyrep applies one error policy"):
        q.cmd("blockdev-backup", **{"job-id": "k", "device": "src", "target": "dst", "sync": "full",
                                    "on-source-error": "ignore", "on-target-error": "stop"})
