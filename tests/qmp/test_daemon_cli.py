"""pyrep-storage-daemon's command line: qemu-storage-daemon's options, bad command lines, pidfile,
daemonize, SIGTERM and quit."""
import os
import signal
import subprocess

import pytest

from helpers.qmp import DAEMON, DEADLINE, connectable, pull_event
from helpers.referees import needs, qcheck, qimg
from helpers.wait import wait_until


def run(args, cwd):
    return subprocess.run(DAEMON + [str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                          timeout=DEADLINE)


@pytest.fixture
def image(tmp_path):
    qimg("create", "-f", "qcow2", tmp_path / "x.qcow2", "16M")
    return tmp_path / "x.qcow2"


def _blockdevs(image):
    return ["--blockdev", f"driver=file,node-name=f0,filename={image}",
            "--blockdev", "driver=qcow2,node-name=q0,file=f0"]


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unrecognized option '--bogus'"),
    (["stray"], "unexpected argument 'stray'"),
    (["--blockdev"], "option '--blockdev' requires an argument"),
    (["--blockdev", "driver=nope,node-name=n"], "--blockdev driver=nope,node-name=n: unknown driver 'nope'"),
    (["--blockdev", "{not json"], "--blockdev {not json: not valid JSON"),
    (["--blockdev", "driver=null-co,,"], "--blockdev driver=null-co,,"),
    (["--chardev", "stdio,id=m0"], "only 'socket' chardevs are supported"),
    (["--chardev", "socket,path=q.sock,server=on"], "'id' is required"),
    (["--chardev", "socket,id=m0,path=q.sock"], "must be a server"),
    (["--chardev", "socket,id=m0,path=q.sock,server=on,colour=red"], "unknown option 'colour'"),
    (["--monitor", "chardev=m9"], "chardev 'm9' not found"),
    (["--chardev", "socket,id=m0,path=q.sock,server=on,wait=off", "--monitor", "m0,mode=readline"],
     "only mode=control"),
    (["--nbd-server", "addr.type=tcp,addr.host=127.0.0.1"], "'addr.type' must be 'unix' or 'inet'"),
    (["--nbd-server", "addr.type=unix"], "'addr.path' is required"),
    (["--nbd-server", "addr.type=unix,addr.path=n.sock,max-connections=many"], "key 'max-connections'"),
    (["--export", "type=nbd,id=e0,node-name=q0"], "an NBD export needs --nbd-server"),
    (["--nbd-server", "addr.type=unix,addr.path=n.sock", "--export", "type=fuse,id=e0,node-name=q0"],
     "only type=nbd exports"),
    (["--nbd-server", "addr.type=unix,addr.path=n.sock", "--export", "type=nbd,node-name=q0"], "key 'id' is required"),
    (["--config", "missing.toml"], "--config missing.toml: no such file"),
    (["--trace", "x"], "tracing is not supported"),
])
def test_bad_command_line_is_one_line_and_exit_1(tmp_path, args, message):
    before = sorted(os.listdir(tmp_path))
    r = run(args, tmp_path)
    assert r.returncode == 1, r
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyrep-storage-daemon: ") and message in lines[0], r.stderr
    assert r.stdout == "" and sorted(os.listdir(tmp_path)) == before


def test_failure_after_startup_began_undoes_everything(tmp_path, image):
    """A later option fails: the monitor socket made before is removed, the image untouched, no pidfile."""
    before = image.read_bytes()
    args = _blockdevs(image) + ["--chardev", f"socket,id=m0,path={tmp_path / 'q.sock'},server=on,wait=off",
                                "--monitor", "m0", "--pidfile", tmp_path / "pid",
                                "--blockdev", "driver=qcow2,node-name=q1,file=missing-node"]
    r = run(args, tmp_path)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "missing-node" in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["x.qcow2"]
    assert image.read_bytes() == before
    # a pidfile that cannot be written: nothing is left either
    r = run(_blockdevs(image) + ["--pidfile", tmp_path / "no" / "pid"], tmp_path)
    assert r.returncode == 1 and "cannot open pid file" in r.stderr and sorted(os.listdir(tmp_path)) == ["x.qcow2"]


def test_bad_blockdev_does_not_truncate_an_existing_file(tmp_path):
    victim = tmp_path / "data.bin"
    victim.write_bytes(b"precious" * 1000)
    r = run(["--blockdev", f"driver=file,node-name=f0,filename={victim}",
             "--blockdev", "driver=qcow2,node-name=q0,file=f0"], tmp_path)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert victim.read_bytes() == b"precious" * 1000


def test_version_and_help(tmp_path):
    r = run(["-V"], tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("pyrep-storage-daemon version ")
    r = run(["--help"], tmp_path)
    assert r.returncode == 0 and "--blockdev" in r.stdout and "--nbd-server" in r.stdout and "--daemonize" in r.stdout


def test_blockdev_json_form_and_quit(daemon, image):
    d = daemon("--blockdev", f'{{"driver": "file", "node-name": "f0", "filename": "{image}"}}',
               "--blockdev", "qcow2,node-name=q0,file=f0")        # the implied driver= key, as QEMU has it
    q = d.client()
    nodes = {n["node-name"]: n for n in q.cmd("query-named-block-nodes")}
    assert nodes["q0"]["drv"] == "qcow2" and nodes["f0"]["drv"] == "file"
    watcher = d.client()
    assert q.cmd("quit") == {}
    assert pull_event(watcher, "SHUTDOWN")["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert d.wait() == 0
    assert not os.path.exists(d.qmp_path)


@needs("qemu-img")
def test_sigterm_exits_0_and_removes_sockets_and_pidfile(daemon, image, tmp_path):
    d = daemon(*_blockdevs(image), "--pidfile", tmp_path / "pid")
    wait_until(lambda: (tmp_path / "pid").exists(), DEADLINE, "the pidfile")
    assert int((tmp_path / "pid").read_text()) == d.proc.pid
    q = d.client()
    assert q.cmd("query-version")["package"].startswith("pyrep")
    d.signal(signal.SIGTERM)
    assert pull_event(q, "SHUTDOWN")["data"] == {"guest": False, "reason": "host-signal"}
    assert d.wait() == 0
    assert not (tmp_path / "pid").exists() and not os.path.exists(d.qmp_path)
    qcheck(image)


def test_pidfile_held_by_a_running_daemon_is_refused(daemon, image, tmp_path):
    d = daemon(*_blockdevs(image), "--pidfile", tmp_path / "pid")
    wait_until(lambda: (tmp_path / "pid").exists(), DEADLINE, "the pidfile")
    r = run(["--blockdev", "driver=null-co,node-name=n0", "--pidfile", tmp_path / "pid"], tmp_path)
    # null-co is QEMU's name; pyrep's is null: either way the line names the problem and nothing changes
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    r = run(["--blockdev", "driver=null,node-name=n0,size=1M", "--pidfile", tmp_path / "pid"], tmp_path)
    assert r.returncode == 1 and "cannot lock pid file" in r.stderr
    assert int((tmp_path / "pid").read_text()) == d.proc.pid


def test_daemonize_returns_once_listening(tmp_path, image, reap_pids):
    sock, pid = tmp_path / "q.sock", tmp_path / "pid"
    r = run(_blockdevs(image) + ["--chardev", f"socket,id=m0,path={sock},server=on,wait=off", "--monitor", "m0",
                                 "--pidfile", pid, "--daemonize"], tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    # no waiting: the parent returned after everything listened and the pidfile was written
    assert connectable(str(sock)) and pid.exists()
    child = int(pid.read_text())
    reap_pids.append(child)
    os.kill(child, signal.SIGTERM)
    wait_until(lambda: not _alive(child), DEADLINE, "the daemonized process to exit")
    assert not pid.exists() and not sock.exists()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes (its parent, the test runner's child, has exited)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_daemonize_reports_a_startup_failure(tmp_path):
    r = run(["--blockdev", "driver=file,node-name=f0,filename=/nonexistent/x", "--daemonize"], tmp_path)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "/nonexistent/x" in r.stderr


def test_chardev_without_wait_off_waits_for_its_first_client(tmp_path, image, daemon):
    """QEMU's default for a server chardev is wait=on: startup goes on once a client connected."""
    from helpers.qmp import RawClient
    sock, pid = tmp_path / "q.sock", tmp_path / "pid"
    d = daemon("--chardev", f"socket,id=m0,path={sock},server=on", "--monitor", "m0", "--pidfile", pid,
               *_blockdevs(image), monitor=False)
    # the socket file appears once it listens (a probe connection would itself be the first client)
    wait_until(lambda: d.proc.poll() is not None or sock.exists(), DEADLINE, "the monitor socket")
    assert d.proc.poll() is None and not pid.exists()     # waiting: the rest of the command line has not run
    c = RawClient(str(sock)).negotiate()                  # the first client: startup continues
    d.clients.append(c)
    wait_until(lambda: pid.exists(), DEADLINE, "the pidfile after the first client")
    nodes = c.execute("query-named-block-nodes")["return"]
    assert {n["node-name"] for n in nodes} == {"f0", "q0"}
    c.execute("quit")
    assert d.wait() == 0
