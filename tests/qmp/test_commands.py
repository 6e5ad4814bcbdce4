"""Every QMP command of pyrep-storage-daemon, driven by QEMU's own client library (qemu.qmp)."""
import json
import subprocess

import pytest
from qemu.qmp import ExecuteError

from helpers.qmp import DEADLINE, pull_event
from helpers.referees import needs, qcheck, qimg, qio, run

pytestmark = needs("qemu-img", "qemu-io")
MiB = 1 << 20


def _error(q, cmd, **args):
    with pytest.raises(ExecuteError) as e:
        q.cmd(cmd, **args)
    return e.value.error_class, str(e.value)


def _events_until(q, name, cond=lambda e: True):
    """Every event up to and including the first ``name`` satisfying ``cond``."""
    seen = []
    while True:
        e = q.pull_event(wait=DEADLINE)
        assert e is not None, f"no {name} event"
        seen.append(e)
        if e["event"] == name and cond(e):
            return seen


@pytest.fixture
def images(tmp_path):
    qimg("create", "-f", "qcow2", tmp_path / "base.qcow2", "8M")
    qio(tmp_path / "base.qcow2", "write -P 0x11 0 1M")
    qimg("create", "-f", "qcow2", "-b", tmp_path / "base.qcow2", "-F", "qcow2", tmp_path / "top.qcow2")
    qio(tmp_path / "top.qcow2", "write -P 0x22 1M 1M")
    qimg("create", "-f", "qcow2", tmp_path / "copy.qcow2", "8M")
    return tmp_path


def test_protocol_commands(daemon):
    d = daemon()
    q = d.client()
    greeting = q._get_greeting() if hasattr(q, "_get_greeting") else None
    version = q.cmd("query-version")
    assert set(version["qemu"]) == {"major", "minor", "micro"} and version["package"].startswith("pyrep")
    if greeting is not None:
        assert greeting["QMP"]["version"] == version and greeting["QMP"]["capabilities"] == ["oob"]
    names = {c["name"] for c in q.cmd("query-commands")}
    assert {"blockdev-add", "x-blockdev-change", "xen-set-replication", "query-xen-replication-status"} <= names
    assert _error(q, "no-such-command") == ("CommandNotFound", "The command no-such-command has not been found")
    assert _error(q, "qmp_capabilities")[0] == "CommandNotFound"
    cls, desc = _error(q, "blockdev-del", **{"node": "x"})
    assert cls == "GenericError" and desc == "Parameter 'node' is unexpected"


def test_blockdev_add_del_and_query(daemon, images):
    d = daemon()
    q = d.client()
    q.cmd("blockdev-add", driver="qcow2", **{"node-name": "top0"},
          file={"driver": "file", "filename": str(images / "top.qcow2")})
    nodes = {n["node-name"]: n for n in q.cmd("query-named-block-nodes")}
    top = nodes["top0"]
    assert top["drv"] == "qcow2" and top["ro"] is False and top["file"] == str(images / "top.qcow2")
    img = top["image"]
    assert img["virtual-size"] == 8 * MiB and img["format"] == "qcow2" and img["filename"] == str(images / "top.qcow2")
    assert img["backing-image"]["filename"] == str(images / "base.qcow2") and img["backing-image"]["format"] == "qcow2"
    flat = {n["node-name"]: n for n in q.cmd("query-named-block-nodes", flat=True)}
    assert "backing-image" not in flat["top0"]["image"]
    implicit = [n for n in flat if n.startswith("#block")]         # the file and backing nodes, as in QEMU
    assert {flat[n]["drv"] for n in implicit} == {"file", "qcow2"}
    # errors name the option
    cls, desc = _error(q, "blockdev-add", driver="qcow2", **{"node-name": "bad"},
                       file={"driver": "file", "filename": str(images / "top.qcow2"), "colour": "red"})
    assert cls == "GenericError" and "colour" in desc
    assert "node-name" in _error(q, "blockdev-add", driver="null", size=MiB)[1]
    # in use: refused, the node stays; then deleted
    q.cmd("blockdev-add", driver="raw", **{"node-name": "user0"}, file="top0")
    cls, desc = _error(q, "blockdev-del", **{"node-name": "top0"})
    assert cls == "GenericError" and "in use" in desc and "user0" in desc
    q.cmd("blockdev-del", **{"node-name": "user0"})
    q.cmd("blockdev-del", **{"node-name": "top0"})
    assert q.cmd("query-named-block-nodes") == []
    assert "no node" in _error(q, "blockdev-del", **{"node-name": "top0"})[1]


@needs("nbdinfo")
def test_nbd_server_and_exports(daemon, images, tmp_path):
    d = daemon("--blockdev", f"driver=file,node-name=f0,filename={images / 'top.qcow2'}",
               "--blockdev", "driver=qcow2,node-name=q0,file=f0")
    q = d.client()
    sock = str(tmp_path / "nbd.sock")
    q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})      # QEMU's legacy address form
    assert _error(q, "nbd-server-start", addr={"type": "unix", "data": {"path": sock}})[0] == "GenericError"
    assert "addr.data.path" in _error(q, "nbd-server-start", addr={"type": "unix", "data": {}})[1]
    q.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "q0"}, name="disk", writable=True,
          description="the disk")
    assert "already in use" in _error(q, "block-export-add", type="nbd", id="e0", **{"node-name": "q0"})[1]
    [info] = q.cmd("query-block-exports")
    assert info["id"] == "e0" and info["type"] == "nbd" and info["node-name"] == "q0" and not info["shutting-down"]
    out = json.loads(run("nbdinfo", "--json", f"nbd+unix:///disk?socket={sock}").stdout)
    assert out["exports"][0]["export-size"] == 8 * MiB and out["exports"][0]["description"] == "the disk"
    qio(f"nbd+unix:///disk?socket={sock}", "write -P 0x33 2M 64k", fmt="raw")
    qio(f"nbd+unix:///disk?socket={sock}", "read -P 0x22 1M 64k", "read -P 0x33 2M 64k", fmt="raw")
    # the legacy forms
    q.cmd("nbd-server-add", device="f0", name="raw-file")
    assert {e["id"] for e in q.cmd("query-block-exports")} == {"e0", "raw-file"}
    q.cmd("nbd-server-remove", name="raw-file")
    assert pull_event(q, "BLOCK_EXPORT_DELETED")["data"] == {"id": "raw-file"}
    q.cmd("block-export-del", id="e0")
    assert pull_event(q, "BLOCK_EXPORT_DELETED")["data"] == {"id": "e0"}
    assert "not found" in _error(q, "block-export-del", id="e0")[1]
    q.cmd("block-export-add", type="nbd", id="e1", **{"node-name": "q0"})
    q.cmd("nbd-server-stop")
    assert pull_event(q, "BLOCK_EXPORT_DELETED")["data"] == {"id": "e1"}
    assert q.cmd("query-block-exports") == []
    q.cmd("quit")
    assert d.wait() == 0
    qcheck(images / "top.qcow2")
    qio(images / "top.qcow2", "read -P 0x33 2M 64k")


def test_x_blockdev_change_quorum_children(daemon):
    d = daemon("--blockdev", "driver=null,node-name=a,size=1M", "--blockdev", "driver=null,node-name=b,size=1M",
               "--blockdev", '{"driver": "quorum", "node-name": "qu", "vote-threshold": 1, "children": ["a"]}')
    q = d.client()
    q.cmd("x-blockdev-change", parent="qu", node="b")
    assert "in use" in _error(q, "blockdev-del", **{"node-name": "b"})[1]
    q.cmd("x-blockdev-change", parent="qu", child="children.0")
    q.cmd("blockdev-del", **{"node-name": "a"})                  # no longer a child
    assert "threshold" in _error(q, "x-blockdev-change", parent="qu", child="children.1")[1]
    assert _error(q, "x-blockdev-change", parent="qu")[1] == "Either child or node must be specified"
    assert "conflict" in _error(q, "x-blockdev-change", parent="qu", child="children.1", node="b")[1]
    assert "not quorum" in _error(q, "x-blockdev-change", parent="b", node="qu")[1]


def _source_and_target(images):
    """Options for two qcow2 nodes: ``src`` (top.qcow2 and its backing) and ``dst`` (copy.qcow2)."""
    return ["--blockdev", f"driver=file,node-name=f0,filename={images / 'top.qcow2'}",
            "--blockdev", "driver=qcow2,node-name=src,file=f0",
            "--blockdev", f"driver=file,node-name=f1,filename={images / 'copy.qcow2'}",
            "--blockdev", "driver=qcow2,node-name=dst,file=f1"]


def test_backup_jobs_events_query_dismiss(daemon, images):
    d = daemon(*_source_and_target(images))
    q = d.client()
    q.cmd("blockdev-backup", **{"job-id": "j1", "device": "src", "target": "dst", "sync": "full",
                                "auto-dismiss": False})
    seen = _events_until(q, "JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "concluded")
    statuses = [e["data"]["status"] for e in seen if e["event"] == "JOB_STATUS_CHANGE"]
    assert statuses[:2] == ["created", "running"] and statuses[-3:] == ["waiting", "pending", "concluded"]
    done = next(e for e in seen if e["event"] == "BLOCK_JOB_COMPLETED")["data"]
    assert done["type"] == "backup" and done["device"] == "j1" and done["len"] == done["offset"] == 8 * MiB
    assert "error" not in done
    [job] = q.cmd("query-jobs")
    assert job["id"] == "j1" and job["status"] == "concluded" and job["type"] == "backup"
    q.cmd("job-dismiss", id="j1")
    assert pull_event(q, "JOB_STATUS_CHANGE")["data"] == {"id": "j1", "status": "null"}
    assert q.cmd("query-jobs") == []
    assert _error(q, "job-dismiss", id="j1") == ("GenericError", "Job not found")
    # argument errors come from the table
    assert "does not accept value 'bogus'" in _error(q, "blockdev-backup", device="src", target="dst", sync="bogus")[1]
    assert "sync full, top and none" in _error(q, "blockdev-backup", device="src", target="dst",
                                                sync="incremental")[1]
    # sync=none runs until cancelled (copy-before-write); cancel -> BLOCK_JOB_CANCELLED, auto-dismissed
    q.cmd("blockdev-backup", **{"job-id": "cbw", "device": "src", "target": "dst", "sync": "none"})
    assert q.cmd("query-jobs")[0]["status"] == "running"
    assert "already in use" in _error(q, "blockdev-backup", **{"job-id": "cbw", "device": "src",
                                                               "target": "dst", "sync": "none"})[1]
    q.cmd("job-cancel", id="cbw")
    seen = _events_until(q, "JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "null")
    assert [e["data"]["status"] for e in seen if e["event"] == "JOB_STATUS_CHANGE"][-3:] == \
        ["aborting", "concluded", "null"]
    assert any(e["event"] == "BLOCK_JOB_CANCELLED" and e["data"]["device"] == "cbw" for e in seen)
    q.cmd("quit")
    assert d.wait() == 0
    r = qimg("compare", images / "top.qcow2", images / "copy.qcow2", check=False)
    assert r.returncode == 0, r.stdout


def test_mirror_ready_complete_and_cancel(daemon, images):
    d = daemon(*_source_and_target(images))
    q = d.client()
    q.cmd("blockdev-mirror", **{"job-id": "m1", "device": "src", "target": "dst", "sync": "full"})
    ready = pull_event(q, "BLOCK_JOB_READY")["data"]
    assert ready["device"] == "m1" and ready["type"] == "mirror"
    [info] = q.cmd("query-block-jobs")
    assert info["ready"] and info["device"] == "m1"
    # block-job-cancel of a ready mirror finishes it without pivot: BLOCK_JOB_COMPLETED (QEMU's rule)
    q.cmd("block-job-cancel", device="m1")
    assert pull_event(q, "BLOCK_JOB_COMPLETED")["data"]["device"] == "m1"
    q.cmd("blockdev-mirror", **{"job-id": "m2", "device": "src", "target": "dst", "sync": "top",
                                "copy-mode": "background"})
    pull_event(q, "BLOCK_JOB_READY")
    q.cmd("job-complete", id="m2")
    pull_event(q, "BLOCK_JOB_COMPLETED", lambda e: e["data"]["device"] == "m2")
    assert "write-blocking" in _error(q, "blockdev-mirror", device="dst", target="src", sync="full",
                                      **{"copy-mode": "write-blocking"})[1]
    assert _error(q, "job-complete", id="m2") == ("GenericError", "Job not found")
    q.cmd("quit")
    assert d.wait() == 0
    qcheck(images / "copy.qcow2")


@needs("nbdinfo")
def test_initial_copy_to_an_nbd_node_of_another_daemon(daemon, images, tmp_path):
    """blockdev-backup sync=full to an nbd node: how a primary seeds its secondary's disk."""
    sock = tmp_path / "sec.sock"
    (tmp_path / "sec").mkdir()
    secondary = daemon("--blockdev", f"driver=file,node-name=f0,filename={images / 'copy.qcow2'}",
                       "--blockdev", "driver=qcow2,node-name=colo1,file=f0",
                       "--nbd-server", f"addr.type=unix,addr.path={sock}",
                       "--export", "type=nbd,id=e0,node-name=colo1,writable=on")
    # the primary is a second process with its own monitor socket
    primary = daemon("--blockdev", f"driver=file,node-name=f0,filename={images / 'top.qcow2'}",
                     "--blockdev", "driver=qcow2,node-name=disk,file=f0", home=tmp_path / "sec")
    q = primary.client()
    q.cmd("blockdev-add", driver="raw", **{"node-name": "remote"},
          file={"driver": "nbd", "server": {"type": "unix", "path": str(sock)}, "export": "colo1"})
    q.cmd("blockdev-backup", **{"job-id": "seed", "device": "disk", "target": "remote", "sync": "full"})
    done = pull_event(q, "BLOCK_JOB_COMPLETED")["data"]
    assert done["device"] == "seed" and "error" not in done
    q.cmd("quit")
    assert primary.wait() == 0
    secondary.client().cmd("quit")
    assert secondary.wait() == 0
    assert qimg("compare", images / "top.qcow2", images / "copy.qcow2", check=False).returncode == 0


def test_replication_commands_secondary(daemon, images, tmp_path):
    sock = tmp_path / "nbd.sock"
    d = daemon("--blockdev", f"driver=file,node-name=f0,filename={images / 'copy.qcow2'}",
               "--blockdev", "driver=qcow2,node-name=colo1,file=f0")
    q = d.client()
    status = q.cmd("query-xen-replication-status")
    assert status["error"] is False and status["stage"] == "none"
    q.cmd("blockdev-add", driver="replication", mode="secondary", **{"node-name": "top0", "top-id": "top0"},
          file={"driver": "memory", "cluster-size": "4K",
                "backing": {"driver": "memory", "cluster-size": "4K", "backing": "colo1"}})
    q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    q.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "colo1"}, writable=True)
    q.cmd("block-export-add", type="nbd", id="e1", **{"node-name": "top0"}, name="top", writable=True)
    assert "only for stopping" in _error(q, "xen-set-replication", enable=True, primary=False, failover=True)[1]
    q.cmd("xen-set-replication", enable=True, primary=False)
    status = q.cmd("query-xen-replication-status")
    assert status == {"error": False, "stage": "running", "nodes": status["nodes"]}
    # the secondary's own write through its top view, then a checkpoint drops it
    qio(f"nbd+unix:///top?socket={sock}", "write -P 0x44 0 64k", fmt="raw")
    q.cmd("xen-colo-do-checkpoint")
    qio(f"nbd+unix:///top?socket={sock}", "read -P 0 0 64k", fmt="raw")
    # the primary's writes arrive on colo1: those before the last checkpoint stay, the later one is
    # rolled back by the failover; the secondary's own write since the checkpoint stays
    qio(f"nbd+unix:///colo1?socket={sock}", "write -P 0x55 1M 64k", fmt="raw")
    q.cmd("xen-colo-do-checkpoint")
    qio(f"nbd+unix:///colo1?socket={sock}", "write -P 0x77 3M 64k", fmt="raw")
    qio(f"nbd+unix:///top?socket={sock}", "write -P 0x66 2M 64k", fmt="raw")
    assert "not allowed to do failover on primary" in _error(q, "xen-set-replication", enable=False, primary=True,
                                                              failover=True)[1]
    q.cmd("xen-set-replication", enable=False, primary=False, failover=True)
    from helpers.wait import wait_until
    wait_until(lambda: q.cmd("query-xen-replication-status")["stage"] == "done", DEADLINE, "failover done")
    q.cmd("quit")
    assert d.wait() == 0
    qcheck(images / "copy.qcow2")
    qio(images / "copy.qcow2", "read -P 0 0 64k", "read -P 0x55 1M 64k", "read -P 0x66 2M 64k", "read -P 0 3M 64k")


def test_replication_error_is_reported(daemon, tmp_path):
    d = daemon("--blockdev", "driver=null,node-name=s0,size=1M",
               "--blockdev", '{"driver": "blkdebug", "node-name": "dbg", "file": "s0", '
                             '"inject-error": [{"op": "write", "errno": "EIO"}]}',
               "--blockdev", '{"driver": "quorum", "node-name": "qu", "vote-threshold": 1, "read-pattern": "fifo", '
                             '"children": [{"driver": "null", "size": 1048576}, '
                             '{"driver": "replication", "mode": "primary", "node-name": "rep", "file": "dbg"}]}')
    q = d.client()
    q.cmd("xen-set-replication", enable=True, primary=True)
    q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(tmp_path / "n.sock")}})
    q.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "qu"}, writable=True)
    # the guest's write succeeds through the quorum; forwarding failed and is the replication error
    qio(f"nbd+unix:///qu?socket={tmp_path / 'n.sock'}", "write -P 1 0 4k", fmt="raw")
    status = q.cmd("query-xen-replication-status")
    assert status["error"] is True and status["desc"] and status["stage"] == "running"
