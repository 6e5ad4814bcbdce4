#!/usr/bin/env python3
"""A COLO block-replication pair from the two config files beside this script, driven as an HA manager does.

    python3 run.py [WORKDIR]        (default: a new temporary directory, removed at the end)

Both sides run here (Unix sockets in WORKDIR); on two hosts, start each daemon
on its own host with TCP addresses instead (README: "Replication between two
hosts") and keep the manager's part of this script: QMP on both monitors.
"""
import os
import random
import shutil
import subprocess
import sys
import tempfile

import pyrep
from pyrep.tools import colo

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE = 64 << 20


def daemon(workdir, side):
    """Start ``pyrep-storage-daemon --config <side>.toml`` in ``workdir``; return it as a QMP-driven side."""
    exe = shutil.which("pyrep-storage-daemon") or sys.executable
    cmd = [exe] if exe != sys.executable else [exe, "-m", "pyrep.tools.storage_daemon"]
    proc = subprocess.Popen(cmd + ["--config", f"{side}.toml"], cwd=workdir)
    try:
        return colo.Side("pyrep", side, proc, os.path.join(workdir, f"{side}.qmp"), workdir)
    except BaseException:          # a daemon whose monitor never answered is not left running
        proc.kill()
        proc.wait(30)
        raise


def main(workdir=None):
    keep = workdir is not None
    workdir = workdir or tempfile.mkdtemp(prefix="pyrep-colo-")
    os.makedirs(workdir, exist_ok=True)
    for side in ("secondary", "primary"):
        shutil.copy(os.path.join(HERE, f"{side}.toml"), workdir)
    # both disks start equal (empty), so no initial copy is needed; see the README for seeding
    for name in ("primary", "secondary", "active", "hidden"):
        pyrep.create_image(os.path.join(workdir, f"{name}.qcow2"), "qcow2", SIZE)
    sides = []
    try:
        sec = daemon(workdir, "secondary")          # the secondary first: the primary connects to it
        sides.append(sec)
        pri = daemon(workdir, "primary")
        sides.append(pri)
        print("replication:", pri("query-xen-replication-status"), sec("query-xen-replication-status"))

        rng = random.Random(7)
        disk = bytearray(SIZE)
        with pyrep.open_backend(f"nbd+unix:///disk?socket={workdir}/primary.nbd") as guest:
            for round_ in range(3):
                for _ in range(50):
                    off, n = rng.randrange(0, SIZE // 4096 - 16) * 4096, rng.randrange(1, 17) * 4096
                    data = bytes([rng.randrange(256)]) * n
                    guest.pwrite(off, data)
                    disk[off:off + n] = data
                # the checkpoint: primary first, then the secondary
                pri("xen-colo-do-checkpoint")
                sec("xen-colo-do-checkpoint")
                checkpointed = bytes(disk)
                print(f"checkpoint {round_ + 1} done")
            guest.pwrite(0, b"after the last checkpoint: rolled back by the failover")

        pri.kill()                                           # the primary's host dies
        took = colo.failover(sec, os.path.join(workdir, "active.qcow2"))
        print(f"failover done in {took * 1000:.0f} ms:", sec("query-xen-replication-status"))
        with pyrep.open_backend(f"nbd+unix:///top?socket={workdir}/secondary.nbd") as view:
            same = view.pread(0, SIZE) == checkpointed
        print("the secondary holds the last checkpoint:", same)
        code = sec.stop()                                    # quit: flush and close everything, exit 0
        return 0 if same and code == 0 else 1
    finally:
        for side in sides:
            side.kill()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
