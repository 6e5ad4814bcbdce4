"""Drive a COLO block-replication pair over QMP, as an HA manager does.

Each side is a storage process with a QMP monitor: ``pyrep-storage-daemon``
or QEMU (``qemu-system-x86_64 -M none``). Both accept the same QMP sequence —
the one QEMU's COLO documentation uses — so any pairing works:

secondary::

    blockdev-add      colo1: the secondary disk (the primary's writes land here)
    blockdev-add      top: replication(mode=secondary, top-id=top)
                           -> active (qcow2) -> hidden (qcow2) -> colo1
    nbd-server-start  ; block-export-add colo1 (writable)   (and top, to read the secondary's view)
    xen-set-replication enable=true primary=false

initial copy, when the disks differ (the secondary set up but not started yet)::

    primary: blockdev-add pdisk ; blockdev-add seed-target: raw -> nbd client of colo1
             blockdev-backup device=pdisk target=seed-target sync=full ; wait for it ; job-dismiss ;
             blockdev-del seed-target
    secondary: xen-set-replication enable=true primary=false

primary::

    blockdev-add      pdisk: the local disk ; quorum over it (vote-threshold=1, read-pattern=fifo)
    blockdev-add      rep0: replication(mode=primary) -> nbd client of the secondary's colo1 export
    x-blockdev-change parent=quorum node=rep0
    xen-set-replication enable=true primary=true
    nbd-server-start  ; block-export-add quorum (the guest's disk)

then ``xen-colo-do-checkpoint`` on both sides at every checkpoint, and, when the
primary is gone, ``xen-set-replication enable=false primary=false
failover=true`` on the secondary.

The QMP client here is deliberately small and synchronous (no dependency):
:class:`QMP` reads the greeting, negotiates capabilities, sends one command at
a time and keeps the events it reads on the way.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

__all__ = ["QMP", "QMPError", "Side", "start_pyrep", "start_qemu", "secondary_setup", "start_secondary", "seed",
           "primary_setup", "checkpoint", "failover", "replication_status", "wait_for_path", "free_port"]


class QMPError(Exception):
    """A QMP command answered with an error: ``.error_class`` and ``.desc`` are QEMU's."""

    def __init__(self, command, error):
        self.error_class = error.get("class", "GenericError")
        self.desc = error.get("desc", "")
        super().__init__(f"{command}: {self.error_class}: {self.desc}")


class QMP:
    """A synchronous QMP client on a Unix socket path or a ``(host, port)`` pair."""

    def __init__(self, address, timeout=30.0):
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        deadline = time.monotonic() + timeout
        while True:
            self._sock = socket.socket(family, socket.SOCK_STREAM)
            self._sock.settimeout(timeout)
            try:
                self._sock.connect(address)
                break
            except ConnectionRefusedError:
                # a server binds its socket (the path appears) a moment before it listens
                self._sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self._file = self._sock.makefile("rb")
        self.events = []
        self.greeting = self._read()
        if "QMP" not in self.greeting:
            raise QMPError("greeting", {"desc": f"not a QMP greeting: {self.greeting!r}"})
        self.command("qmp_capabilities")

    def _read(self):
        line = self._file.readline()
        if not line:
            raise EOFError("the QMP peer closed the connection")
        return json.loads(line)

    def command(self, name, arguments=None, **kwargs):
        """Run ``name`` with ``arguments`` (a dict; or keyword arguments) and return its ``return`` value."""
        args = dict(arguments or {}, **kwargs)
        msg = {"execute": name, "id": name}
        if args:
            msg["arguments"] = args
        self._sock.sendall(json.dumps(msg).encode() + b"\r\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QMPError(name, reply["error"])
            return reply.get("return")

    def close(self):
        try:
            self._file.close()
            self._sock.close()
        except OSError:
            pass


def wait_for_path(path, proc=None, timeout=30.0):
    """Wait until ``path`` exists (a socket a child process creates); fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with status {proc.returncode} before creating {path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.01)


class Side:
    """One storage process of the pair: its kind ("pyrep" or "qemu"), process, QMP client and work dir."""

    def __init__(self, kind, name, proc, qmp_path, workdir):
        self.kind, self.name, self.proc, self.workdir = kind, name, proc, workdir
        self.qmp_path = qmp_path
        wait_for_path(qmp_path, proc)
        self.qmp = QMP(qmp_path)

    def __call__(self, command, arguments=None, **kwargs):
        return self.qmp.command(command, arguments, **kwargs)

    def path(self, name):
        return os.path.join(self.workdir, name)

    def kill(self):
        """SIGKILL: the host died. Nothing is flushed or closed."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self.qmp.close()

    def stop(self, timeout=30):
        """``quit`` over QMP (a clean shutdown), SIGKILL if it does not exit in time; returns the exit status."""
        if self.proc.poll() is None:
            try:
                self.qmp.command("quit")
            except (OSError, EOFError, QMPError):
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.qmp.close()
        return self.proc.returncode


def _side(kind, name, cmd, qmp_path, workdir):
    """Start ``cmd`` and connect to its monitor; a process whose monitor never answers is killed, not leaked."""
    with open(os.path.join(workdir, f"{name}.log"), "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    try:
        return Side(kind, name, proc, qmp_path, workdir)
    except BaseException:
        proc.kill()
        proc.wait(30)
        raise


def start_pyrep(workdir, name, extra_args=()):
    """Start ``pyrep-storage-daemon`` with a QMP monitor on ``<workdir>/<name>.qmp``."""
    qmp_path = os.path.join(workdir, f"{name}.qmp")
    exe = shutil.which("pyrep-storage-daemon")
    cmd = [exe] if exe else [sys.executable, "-m", "pyrep.tools.storage_daemon"]
    cmd += ["--chardev", f"socket,id=mon0,path={qmp_path},server=on,wait=off", "--monitor", "chardev=mon0",
            *extra_args]
    return _side("pyrep", name, cmd, qmp_path, workdir)


def start_qemu(workdir, name, extra_args=()):
    """Start QEMU as a bare storage process (no machine, no devices) with a QMP monitor."""
    qmp_path = os.path.join(workdir, f"{name}.qmp")
    cmd = ["qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none",
           "-qmp", f"unix:{qmp_path},server=on,wait=off", *extra_args]
    return _side("qemu", name, cmd, qmp_path, workdir)


def _file(filename, fmt="qcow2"):
    return {"driver": fmt, "file": {"driver": "file", "filename": filename}}


def secondary_setup(side, disk, active, hidden, nbd_addr, fmt="qcow2", export_top=True, start=True):
    """Build the secondary of the pair on ``side`` and start replication there.

    ``disk``: the secondary disk image (format ``fmt``); ``active``/``hidden``:
    empty qcow2 images of the same size; ``nbd_addr``: the NBD server's
    SocketAddress ({"type": "unix", "path"} or {"type": "inet", "host", "port"}).
    Exports ``colo1`` (where the primary's writes arrive) and, with
    ``export_top``, ``top`` (the secondary's own view). With ``start=False``
    replication is not started yet (seed the disk first, then :func:`start_secondary`)."""
    side("blockdev-add", dict(_file(disk, fmt), **{"node-name": "colo1"}))
    side("blockdev-add", {"driver": "replication", "node-name": "top", "mode": "secondary", "top-id": "top",
                          "file": dict(_file(active), backing=dict(_file(hidden), backing="colo1"))})
    side("nbd-server-start", addr=_legacy_addr(nbd_addr))
    side("block-export-add", {"type": "nbd", "id": "colo1-export", "node-name": "colo1", "name": "colo1",
                              "writable": True})
    if export_top:
        side("block-export-add", {"type": "nbd", "id": "top-export", "node-name": "top", "name": "top",
                                  "writable": True})
    if start:
        start_secondary(side)


def start_secondary(side):
    """``xen-set-replication enable=true primary=false``: the copy-before-write starts, then a checkpoint."""
    side("xen-set-replication", enable=True, primary=False)


def seed(primary, disk, secondary_addr, fmt="qcow2", export="colo1", timeout=600.0):
    """The initial copy: make the secondary disk equal to the primary's before replication starts.

    On the primary: open the primary disk (node ``pdisk``), an NBD client of the
    secondary's export (node ``seed-target``), run ``blockdev-backup sync=full``
    from one to the other, wait for the job to conclude, dismiss it and drop the
    client. The secondary must be set up (its export open) and not yet started.
    Returns the seconds the copy took."""
    t0 = time.perf_counter()
    primary("blockdev-add", dict(_file(disk, fmt), **{"node-name": "pdisk"}))
    primary("blockdev-add", {"driver": "raw", "node-name": "seed-target",
                             "file": {"driver": "nbd", "server": _flat_addr(secondary_addr), "export": export}})
    primary("blockdev-backup", {"job-id": "seed", "device": "pdisk", "target": "seed-target", "sync": "full",
                                "auto-dismiss": False})
    deadline = time.monotonic() + timeout
    while True:
        job = next((j for j in primary("query-jobs") if j["id"] == "seed"), None)
        if job is None or job["status"] == "concluded":
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the initial copy did not end within {timeout:.0f} s: {job}")
        time.sleep(0.01)
    if job is not None:
        if job.get("error"):
            raise RuntimeError(f"the initial copy failed: {job['error']}")
        primary("job-dismiss", id="seed")
    primary("blockdev-del", **{"node-name": "seed-target"})
    return time.perf_counter() - t0


def primary_setup(side, disk, secondary_addr, nbd_addr, fmt="qcow2", export="colo1"):
    """Build the primary of the pair on ``side``: a quorum over its disk plus the link to the secondary.

    ``secondary_addr``: the secondary's NBD server (a SocketAddress); ``nbd_addr``:
    where this side serves the guest's disk (export ``disk``, the quorum)."""
    if not any(n.get("node-name") == "pdisk" for n in side("query-named-block-nodes")):
        side("blockdev-add", dict(_file(disk, fmt), **{"node-name": "pdisk"}))   # (seed() opened it already)
    side("blockdev-add", {"driver": "quorum", "node-name": "colo-disk0", "vote-threshold": 1,
                          "read-pattern": "fifo", "children": ["pdisk"]})
    side("blockdev-add", {"driver": "replication", "node-name": "rep0", "mode": "primary",
                          "file": {"driver": "nbd", "server": _flat_addr(secondary_addr), "export": export}})
    side("x-blockdev-change", parent="colo-disk0", node="rep0")
    side("xen-set-replication", enable=True, primary=True)
    side("nbd-server-start", addr=_legacy_addr(nbd_addr))
    side("block-export-add", {"type": "nbd", "id": "disk-export", "node-name": "colo-disk0", "name": "disk",
                              "writable": True})


def checkpoint(*sides):
    """One checkpoint: ``xen-colo-do-checkpoint`` on every side given (the primary first)."""
    for side in sides:
        side("xen-colo-do-checkpoint")


def replication_status(side):
    return side("query-xen-replication-status")


def failover(secondary, active, timeout=60.0):
    """Promote the secondary after the primary died; return the seconds until its commit ended.

    ``active`` is the active disk's filename. pyrep reports the end as ``stage``
    "done" in ``query-xen-replication-status``; QEMU does not say, so for it
    this waits until the replication node no longer reads through the active
    disk (QEMU names a filter after its children: the active disk's filename
    leaves the replication node's ``file`` when the commit replaces it)."""
    t0 = time.perf_counter()
    secondary("xen-set-replication", enable=False, primary=False, failover=True)
    deadline = time.monotonic() + timeout
    while True:
        status = secondary("query-xen-replication-status")
        stage = status.get("stage")
        if stage == "done" or (stage is None and not _reads_through(secondary, "top", active)):
            return time.perf_counter() - t0
        if stage == "failover_failed":
            raise RuntimeError(f"failover failed on {secondary.name}: {status}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"failover on {secondary.name} did not end within {timeout:.0f} s: {status}")
        time.sleep(0.01)


def _reads_through(side, node_name, filename):
    for node in side("query-named-block-nodes"):
        if node.get("node-name") == node_name:
            return filename in node.get("file", "")
    raise RuntimeError(f"{side.name} has no node {node_name!r}")


def _legacy_addr(addr):
    """QMP's nbd-server-start takes QEMU's SocketAddressLegacy: {"type": t, "data": {...}}."""
    if "data" in addr:
        return addr
    return {"type": addr["type"], "data": {k: v for k, v in addr.items() if k != "type"}}


def _flat_addr(addr):
    """blockdev options take the flat SocketAddress: {"type": t, ...}."""
    if "data" in addr:
        return dict(addr["data"], type=addr["type"])
    return dict(addr)


def free_port(host="127.0.0.1"):
    """A TCP port free on ``host`` now (the kernel picks it; a later bind may still race, as with any tool)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def terminate(proc, timeout=30):
    """SIGTERM a child, then SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
