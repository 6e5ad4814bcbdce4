"""pyrep-storage-daemon --config: the config file's tables are the command line's options."""
import os
import shutil

import pyrep

from helpers.qmp import DAEMON, RawClient, connectable
from helpers.referees import needs, qcheck, qimg, qio
from helpers.wait import wait_until

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "configs", "storage-daemon.toml")


@needs("qemu-img", "qemu-io")
def test_the_readme_example_config(tmp_path, daemon):
    shutil.copy(EXAMPLE, tmp_path / "storage-daemon.toml")
    qimg("create", "-f", "qcow2", tmp_path / "disk.qcow2", "16M")
    work = tmp_path / "elsewhere"
    work.mkdir()
    # started from another directory: the file's relative paths are the file's
    d = daemon("--config", tmp_path / "storage-daemon.toml", monitor=False, cwd=work)
    d.qmp_path = str(tmp_path / "qmp.sock")
    wait_until(lambda: d.proc.poll() is not None or connectable(d.qmp_path), 30, "the config's monitor")
    q = d.client()
    assert [e["id"] for e in q.cmd("query-block-exports")] == ["e0"]
    qio(f"nbd+unix:///disk?socket={tmp_path / 'nbd.sock'}", "write -P 0x5a 0 64k", fmt="raw")
    q.cmd("quit")
    assert d.wait() == 0
    assert not (tmp_path / "nbd.sock").exists() and not (tmp_path / "qmp.sock").exists()
    qcheck(tmp_path / "disk.qcow2")
    qio(tmp_path / "disk.qcow2", "read -P 0x5a 0 64k")


def test_config_with_replication_and_command_line_together(tmp_path, daemon):
    (tmp_path / "sec.json").write_text("""{
      "blockdev": [{"node-name": "colo1", "driver": "memory", "size": 1048576},
                   {"node-name": "top0", "driver": "replication", "mode": "secondary", "top-id": "top0",
                    "file": {"driver": "memory", "backing": {"driver": "memory", "backing": "colo1"}}}],
      "nbd-server": {"addr": {"type": "unix", "path": "n.sock"}},
      "export": [{"type": "nbd", "id": "e0", "node-name": "colo1", "writable": true},
                 {"type": "nbd", "id": "e1", "node-name": "top0", "writable": true}],
      "replication": {"enable": true, "primary": false}
    }""")
    d = daemon("--config", tmp_path / "sec.json")        # the monitor from the command line, after the file
    q = d.client()
    status = q.cmd("query-xen-replication-status")
    assert status["stage"] == "running" and status["error"] is False
    q.cmd("xen-set-replication", enable=False, primary=False, failover=True)
    q.cmd("quit")
    assert d.wait() == 0


def test_bad_config_is_one_line_naming_file_and_key(tmp_path, daemon):
    import subprocess
    (tmp_path / "bad.toml").write_text('[[export]]\ntype = "nbd"\nid = "e0"\nnode-name = "nope"\n'
                                       '[nbd-server]\naddr = { type = "unix", path = "n.sock" }\n')
    r = subprocess.run(DAEMON + ["--config", str(tmp_path / "bad.toml")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=60)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert "bad.toml: export[0]" in r.stderr and "nope" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad.toml"]          # the NBD socket made first is gone again


def test_load_config_monitor_in_process(tmp_path):
    (tmp_path / "g.toml").write_text('[[blockdev]]\nnode-name = "n0"\ndriver = "null"\nsize = 4096\n'
                                     '[[monitor]]\npath = "q.sock"\n')
    graph = pyrep.load_config(tmp_path / "g.toml")
    try:
        c = RawClient(str(tmp_path / "q.sock")).negotiate()
        [node] = c.execute("query-named-block-nodes")["return"]
        assert node["node-name"] == "n0" and node["image"]["virtual-size"] == 4096
        c.close()
    finally:
        graph.close()
    assert not (tmp_path / "q.sock").exists() and "n0" not in pyrep.nodes()
