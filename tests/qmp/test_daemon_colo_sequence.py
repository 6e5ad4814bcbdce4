"""The COLO block-replication sequence of QEMU's docs, step by step over QMP on two daemons: what
issue 14's pair is built from (its full model tests live with the pair)."""
import signal

from helpers.qmp import DEADLINE
from helpers.referees import needs, qcheck, qimg, qio
from helpers.wait import wait_until

pytestmark = needs("qemu-img", "qemu-io")
MiB = 1 << 20


def test_primary_and_secondary_daemons_checkpoint_and_fail_over(daemon, tmp_path):
    for name in ("primary.qcow2", "secondary.qcow2"):
        qimg("create", "-f", "qcow2", tmp_path / name, "16M")
    s_nbd, p_nbd = tmp_path / "s-nbd.sock", tmp_path / "p-nbd.sock"
    # secondary: the disk, the replication top, the NBD server exporting the disk, replication on
    sec = daemon("--blockdev", f"driver=file,node-name=f0,filename={tmp_path / 'secondary.qcow2'}",
                 "--blockdev", "driver=qcow2,node-name=colo1,file=f0")
    s = sec.client()
    s.cmd("blockdev-add", driver="replication", mode="secondary", **{"node-name": "top0", "top-id": "top0"},
          file={"driver": "memory", "cluster-size": "4K",
                "backing": {"driver": "memory", "cluster-size": "4K", "backing": "colo1"}})
    s.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(s_nbd)}})
    s.cmd("block-export-add", type="nbd", id="e-colo1", **{"node-name": "colo1"}, writable=True)
    s.cmd("xen-set-replication", enable=True, primary=False)
    # primary: a quorum over the local disk, a replication node over an nbd client of colo1 added as a child
    (tmp_path / "p").mkdir()
    prim = daemon("--blockdev", f"driver=file,node-name=f0,filename={tmp_path / 'primary.qcow2'}",
                  "--blockdev", "driver=qcow2,node-name=disk,file=f0", home=tmp_path / "p")
    p = prim.client()
    p.cmd("blockdev-add", driver="quorum", **{"node-name": "colo-disk0", "vote-threshold": 1,
                                              "read-pattern": "fifo"}, children=["disk"])
    p.cmd("blockdev-add", driver="replication", mode="primary", **{"node-name": "rep0"},
          file={"driver": "nbd", "server": {"type": "unix", "path": str(s_nbd)}, "export": "colo1"})
    p.cmd("x-blockdev-change", parent="colo-disk0", node="rep0")
    p.cmd("xen-set-replication", enable=True, primary=True)
    p.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(p_nbd)}})
    p.cmd("block-export-add", type="nbd", id="guest", **{"node-name": "colo-disk0"}, writable=True)
    guest = f"nbd+unix:///colo-disk0?socket={p_nbd}"
    qio(guest, "write -P 0x11 0 1M", fmt="raw")
    for q in (s, p):
        q.cmd("xen-colo-do-checkpoint")
    qio(guest, "write -P 0x22 1M 1M", fmt="raw")           # after the checkpoint: rolled back by failover
    status = p.cmd("query-xen-replication-status")
    assert status["error"] is False and status["stage"] == "running"
    prim.proc.send_signal(signal.SIGKILL)                   # the primary dies
    prim.wait()
    s.cmd("xen-set-replication", enable=False, primary=False, failover=True)
    wait_until(lambda: s.cmd("query-xen-replication-status")["stage"] == "done", DEADLINE, "failover done")
    s.cmd("quit")
    assert sec.wait() == 0
    qcheck(tmp_path / "secondary.qcow2")
    qio(tmp_path / "secondary.qcow2", "read -P 0x11 0 1M", "read -P 0 1M 1M")
