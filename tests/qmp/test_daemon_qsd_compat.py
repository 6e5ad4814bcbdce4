"""qemu-storage-daemon's own command lines run unchanged and serve nbdinfo/qemu-io; SIGTERM with
writes in flight leaves qcow2 images clean with every acknowledged write."""
import json
import signal

import pyrep
from pyrep.errors import BlockError

from helpers.qmp import DEADLINE, connectable
from helpers.referees import needs, qcheck, qimg, qio, run
from helpers.threads import spawn
from helpers.wait import wait_until

pytestmark = needs("qemu-img", "qemu-io", "nbdinfo")
MiB = 1 << 20


def test_qsd_command_line_serves_nbdinfo_and_qemu_io(daemon, tmp_path):
    qimg("create", "-f", "qcow2", tmp_path / "x", "32M")
    # qemu-storage-daemon's documented form, relative paths and all, run in the image's directory
    d = daemon("--blockdev", "driver=file,node-name=f0,filename=x",
               "--blockdev", "driver=qcow2,node-name=q0,file=f0",
               "--nbd-server", "addr.type=unix,addr.path=s",
               "--export", "type=nbd,id=e0,node-name=q0,name=disk,writable=on")
    uri = f"nbd+unix:///disk?socket={tmp_path / 's'}"
    info = json.loads(run("nbdinfo", "--json", uri).stdout)
    assert info["exports"][0]["export-size"] == 32 * MiB and info["exports"][0]["is_read_only"] is False
    qio(uri, "write -P 0xa5 0 1M", "write -z 4M 1M", "read -P 0xa5 0 1M", fmt="raw")
    q = d.client()
    assert q.cmd("query-block-exports")[0]["id"] == "e0"
    q.cmd("quit")
    assert d.wait() == 0
    qcheck(tmp_path / "x")
    qio(tmp_path / "x", "read -P 0xa5 0 1M", "read -P 0 4M 1M")


def test_qsd_inet_server_and_json_blockdev(daemon, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    qimg("create", "-f", "raw", tmp_path / "r.raw", "4M")
    d = daemon("--blockdev", f'{{"driver": "raw", "node-name": "r0", "file": {{"driver": "file", '
                             f'"filename": "{tmp_path / "r.raw"}"}}}}',
               "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port},max-connections=4",
               "--export", "nbd,id=e0,node-name=r0")                 # the implied type=, read-only
    uri = f"nbd://127.0.0.1:{port}/r0"
    assert json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]["is_read_only"] is True
    r = qio(uri, "write -P 1 0 4k", fmt="raw", check=False)
    assert r.returncode != 0 or "failed" in r.stdout.lower()
    d.signal(signal.SIGTERM)
    assert d.wait() == 0


def test_sigterm_with_writes_in_flight_keeps_every_acknowledged_write(daemon, tmp_path):
    qimg("create", "-f", "qcow2", tmp_path / "disk.qcow2", "64M")
    d = daemon("--blockdev", f"driver=file,node-name=f0,filename={tmp_path / 'disk.qcow2'}",
               "--blockdev", "driver=qcow2,node-name=q0,file=f0",
               "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'nbd.sock'}",
               "--export", "type=nbd,id=e0,node-name=q0,name=disk,writable=on")
    wait_until(lambda: connectable(str(tmp_path / "nbd.sock")), DEADLINE, "the NBD socket")
    blk = pyrep.open_backend({"driver": "raw", "file": {"driver": "nbd", "export": "disk",
                                                        "server": {"type": "unix", "path": str(tmp_path / "nbd.sock")}}})
    acked = [[] for _ in range(4)]
    block = 64 * 1024

    def writer(n):
        # thread n writes blocks n, n+4, n+8, ... each with its own pattern; a write that returned is acked
        for i in range(n, 1024, 4):
            data = bytes([(i % 251) + 1]) * block
            try:
                blk.pwrite(i * block, data)
            except BlockError:
                return              # the daemon went away: this write and the rest were never acknowledged
            acked[n].append(i)

    workers = [spawn(writer, n) for n in range(4)]
    wait_until(lambda: sum(map(len, acked)) >= 40, DEADLINE, "some acknowledged writes")
    d.signal(signal.SIGTERM)
    for w in workers:
        w.join()
    assert d.wait() == 0
    try:
        blk.close()
    except BlockError:
        pass                        # its final flush has no server to go to
    done = sorted(i for a in acked for i in a)
    assert len(done) >= 40
    qcheck(tmp_path / "disk.qcow2")
    img = pyrep.open_backend({"driver": "qcow2", "file": {"driver": "file", "filename": str(tmp_path / "disk.qcow2")}},
                             read_only=True)
    try:
        for i in done:
            assert img.pread(i * block, block) == bytes([(i % 251) + 1]) * block, f"acknowledged block {i} lost"
    finally:
        img.close()
