"""pyrep-nbd: qemu-nbd's command line and semantics, judged by nbdinfo, qemu-io and qemu-img."""
import json
import os
import signal
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "nbd"))

from nbd_testlib import RawClient, pyrep_nbd, run, uri, wait_until  # noqa: E402,F401 - fixtures
from pyrep.nbd import proto as P  # noqa: E402


def _image(tmp_path, size=4 << 20, fill=None):
    p = tmp_path / "disk.raw"
    with open(p, "wb") as f:
        f.truncate(size)
        if fill:
            f.write(fill)
    return p


def test_exits_after_the_last_client_without_persistent(tmp_path, pyrep_nbd):
    img = _image(tmp_path)
    sock = str(tmp_path / "s.sock")
    srv = pyrep_nbd("-f", "raw", "-k", sock, img)
    assert json.loads(run("nbdinfo", "--json", uri(sock)).stdout)["exports"][0]["export-size"] == 4 << 20
    wait_until(lambda: srv.proc.poll() is not None, what="pyrep-nbd to exit after its client left")
    assert srv.proc.returncode == 0 and not os.path.exists(sock)


def test_persistent_serves_clients_and_sigterm_keeps_acknowledged_writes(tmp_path, pyrep_nbd):
    img = _image(tmp_path)
    sock = str(tmp_path / "s.sock")
    srv = pyrep_nbd("-t", "-e", "8", "-f", "raw", "-k", sock, img)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x21 0 64k", uri(sock))
    run("qemu-io", "-f", "raw", "-c", "read -P 0x21 0 64k", uri(sock))
    c = RawClient(sock).go("")
    c.request(P.CMD_WRITE, 7, 1 << 20, 8192, data=b"\x42" * 8192)
    assert c.reply() == (7, 0, b"")       # acknowledged; no flush asked for
    assert srv.stop(signal.SIGTERM) == 0
    c.close()
    data = img.read_bytes()
    assert data[:65536] == b"\x21" * 65536 and data[1 << 20:(1 << 20) + 8192] == b"\x42" * 8192


def test_shared_limits_simultaneous_clients(tmp_path, pyrep_nbd):
    img = _image(tmp_path)
    sock = str(tmp_path / "s.sock")
    pyrep_nbd("-t", "-e", "1", "-f", "raw", "-k", sock, img)
    first = RawClient(sock).go("")
    second = RawClient(sock)
    with pytest.raises((EOFError, ConnectionError, P.ProtocolError)):
        second.event()                     # closed without a greeting: over the limit
    second.close()
    first.request(P.CMD_READ, 1, 0, 512)
    assert first.reply(512) == (1, 0, bytes(512))
    first.request(P.CMD_DISC, 2, 0, 0)
    first.close()
    wait_until(lambda: _serves(sock), what="the slot to be free again")


def _serves(sock):
    return run("nbdinfo", "--size", uri(sock), check=False).stdout.strip() == str(4 << 20)


def test_read_only_name_and_description(tmp_path, pyrep_nbd):
    img = _image(tmp_path)
    sock = str(tmp_path / "s.sock")
    pyrep_nbd("-t", "-r", "-x", "disk0", "-D", "a read-only disk", "-f", "raw", "-k", sock, img)
    e = json.loads(run("nbdinfo", "--json", uri(sock, "disk0")).stdout)["exports"][0]
    assert e["export-name"] == "disk0" and e["is_read_only"] is True and e["description"] == "a read-only disk"
    assert run("nbdinfo", uri(sock, "other"), check=False).returncode != 0


def test_list_against_qemu_nbd_and_pyrep_nbd(tmp_path, pyrep_nbd):
    img = _image(tmp_path)
    sock = str(tmp_path / "s.sock")
    pyrep_nbd("-t", "-x", "mine", "-D", "described", "-f", "raw", "-k", sock, img)
    out = run(sys.executable, "-m", "pyrep.tools.nbd", "-L", "-k", sock).stdout
    assert "exports available: 1" in out and " export: 'mine'" in out and f"size:  {4 << 20}" in out
    assert "description: described" in out and "base:allocation" in out
    qsock = str(tmp_path / "q.sock")
    qimg = tmp_path / "q.raw"
    qimg.write_bytes(bytes(4 << 20))
    q = subprocess.Popen(["qemu-nbd", "-t", "-f", "raw", "-x", "qx", "-k", qsock, "-r", str(qimg)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: os.path.exists(qsock), what="qemu-nbd's socket")
        wait_until(lambda: run(sys.executable, "-m", "pyrep.tools.nbd", "-L", "-k", qsock,
                               check=False).returncode == 0, what="pyrep-nbd -L against qemu-nbd")
        out = run(sys.executable, "-m", "pyrep.tools.nbd", "-L", "-k", qsock).stdout
        assert " export: 'qx'" in out and f"size:  {4 << 20}" in out
    finally:
        q.terminate()
        q.wait(30)


def test_version():
    out = run(sys.executable, "-m", "pyrep.tools.nbd", "-V").stdout
    assert out.startswith("pyrep-nbd ")


def test_fork_and_pid_file(tmp_path):
    img = _image(tmp_path)
    sock = str(tmp_path / "s.sock")
    pid_file = tmp_path / "nbd.pid"
    p = run(sys.executable, "-m", "pyrep.tools.nbd", "--fork", "-t", "--pid-file", pid_file, "-f", "raw",
            "-k", sock, img)
    assert p.returncode == 0                      # the parent returns once the child serves
    pid = int(pid_file.read_text())
    try:
        assert _serves(sock)
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2],
               what="the forked server to exit")
    assert not pid_file.exists()


def test_image_opts_and_discard_unmap(tmp_path, pyrep_nbd):
    img = _image(tmp_path, fill=b"\x55" * (1 << 20))
    before = os.stat(img).st_blocks
    sock = str(tmp_path / "s.sock")
    pyrep_nbd("-t", "--discard=unmap", "--image-opts", "-k", sock,
              f"driver=raw,file.driver=file,file.filename={img}")
    run("qemu-io", "-f", "raw", "-c", "discard 0 1M", "-c", "flush", uri(sock))
    after = os.stat(img).st_blocks
    assert after < before, (before, after)
    out = run("nbdinfo", "--map", uri(sock)).stdout
    assert any("hole" in line and int(line.split()[0]) < 1 << 20 for line in out.splitlines()), out


def test_qcow2_file_is_probed_and_served_raw(tmp_path, pyrep_nbd):
    img = tmp_path / "d.qcow2"
    run("qemu-img", "create", "-f", "qcow2", img, "8M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x66 1M 256k", img)
    sock = str(tmp_path / "s.sock")
    pyrep_nbd("-t", "-k", sock, img)
    run("qemu-io", "-f", "raw", "-c", "read -P 0x66 1M 256k", "-c", "read -P 0 0 1M", uri(sock))
    assert json.loads(run("nbdinfo", "--json", uri(sock)).stdout)["exports"][0]["export-size"] == 8 << 20


def test_bad_arguments_fail_cleanly(tmp_path):
    p = run(sys.executable, "-m", "pyrep.tools.nbd", "-k", str(tmp_path / "s.sock"), tmp_path / "missing.raw",
            check=False)
    assert p.returncode == 1 and "missing.raw" in p.stderr and "Traceback" not in p.stderr
    p = run(sys.executable, "-m", "pyrep.tools.nbd", "--object", "tls-creds-x509,id=x,dir=/nonexistent",
            "-k", str(tmp_path / "s.sock"), tmp_path / "missing.raw", check=False)
    assert p.returncode == 1 and "/nonexistent" in p.stderr and "Traceback" not in p.stderr


def _free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_tcp_bind_and_port_and_list_over_tcp(tmp_path, pyrep_nbd):
    img = _image(tmp_path, fill=b"\x5c" * 4096)
    port = _free_port()
    pyrep_nbd("-t", "-b", "127.0.0.1", "-p", port, "-x", "tcp", "-f", "raw", img)
    run("qemu-io", "-f", "raw", "-c", "read -P 0x5c 0 4k", f"nbd://127.0.0.1:{port}/tcp")
    out = run(sys.executable, "-m", "pyrep.tools.nbd", "-L", "-b", "127.0.0.1", "-p", port).stdout
    assert " export: 'tcp'" in out and f"size:  {4 << 20}" in out
