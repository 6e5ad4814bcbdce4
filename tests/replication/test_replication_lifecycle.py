"""Options, start validation (each failure distinct, nothing half-started) and close while running."""
import pytest

import pyrep
from pyrep import replication
from helpers.replication import M, S_LOCAL, Secondary, stage


def mem(name, size=4 * M, **kw):
    return {"driver": "memory", "size": size, "node-name": name, **kw}


@pytest.mark.parametrize("opts,match", [
    ({"mode": "primary", "top-id": "x"}, "'top-id' is not supported in primary mode"),
    ({"mode": "secondary"}, "'top-id' is required in secondary mode"),
    ({}, "replication: option 'mode' is required"),
    ({"mode": "tertiary"}, "replication: option 'mode'.*'primary', 'secondary'"),
    ({"mode": "primary", "bogus": 1}, "replication: unknown option 'bogus'"),
])
def test_options(opts, match):
    with pytest.raises(pyrep.OptionError, match=match):
        pyrep.open_backend({"driver": "replication", "file": mem("f"), **opts})
    assert pyrep.nodes() == {}


def secondary_graph(active, top_id="top", sd_backend=True):
    sd = pyrep.blockdev_add(mem(S_LOCAL))
    if sd_backend:
        pyrep.open_backend(sd, name="sdb", share_rw=True)
    return pyrep.open_backend({"driver": "replication", "mode": "secondary", "top-id": top_id,
                               "node-name": "rep", "file": active}, name="top")


@pytest.mark.parametrize("case,match", [
    ("no-active-backing", "active disk 'active' has no backing"),
    ("no-hidden-backing", "hidden disk 'hidden' has no backing"),
    ("no-backend", "secondary disk 's_local' has no backend"),
    ("lengths", "must have the same length"),
    ("top-missing", "top-id 'nope' names no node"),
    ("top-not-root", "is not a root node"),
    ("top-elsewhere", "does not contain this replication node"),
])
def test_start_validation(case, match):
    hidden = mem("hidden", backing=S_LOCAL)
    active = mem("active", backing=hidden)
    top_id, sd_backend = "top", True
    if case == "no-active-backing":
        active = mem("active")
    elif case == "no-hidden-backing":
        active = mem("active", backing=mem("hidden"))
    elif case == "no-backend":
        sd_backend = False
    elif case == "lengths":
        active = mem("active", size=8 * M, backing=hidden)
    elif case == "top-missing":
        top_id = "nope"
    elif case == "top-not-root":
        top_id = "active"
    elif case == "top-elsewhere":
        pyrep.blockdev_add(mem("other"))
        top_id = "other"
    secondary_graph(active, top_id, sd_backend)
    with pytest.raises(pyrep.ReplicationError, match=match):
        replication.start_all("secondary")
    assert stage() == "none"
    assert pyrep.jobs.list() == []
    assert not pyrep.lookup("top").blockers
    if "hidden" in pyrep.nodes():
        assert pyrep.lookup("hidden").read_only is True


def test_close_while_running(tmp_path):
    s = Secondary(tmp_path, "memory", size=4 * M, start=True)
    s.local.pwrite(0, b"\x22" * 65536)
    top = pyrep.lookup("top")
    s.top.close()
    assert pyrep.jobs.list() == []
    assert not top.blockers
    assert replication.status() == []


def test_close_while_failing_over(tmp_path):
    s = Secondary(tmp_path, "qcow2", size=16 * M, start=True)
    s.top.pwrite(0, b"\x33" * (8 * M))
    replication.stop_all(True)
    s.top.close()                   # must not hang, nothing left behind
    assert pyrep.jobs.wait_all(10)
    assert pyrep.jobs.list() == []
    assert replication.status() == []
