"""``pyrep-demo``: COLO block replication between two storage processes, end to end.

Two ``pyrep-storage-daemon`` processes on this machine play the two hosts;
they talk NBD over loopback TCP (127.0.0.1, ports picked free), and this
process is both the HA manager (QMP on each daemon) and the guests (NBD
clients of the primary's disk and of the secondary's view):

1. images: the primary's disk (with data already on it), the secondary disk
   (empty), the active and hidden disks (qcow2, all in a temporary directory);
2. the secondary is set up (disk, replication top, NBD exports); the primary
   seeds it with ``blockdev-backup sync=full`` over NBD (the initial copy);
3. replication starts (the secondary first), the primary builds its quorum;
4. a random workload writes through the primary's export, the secondary writes
   some of its own, ``xen-colo-do-checkpoint`` runs on both every round;
5. the primary is SIGKILLed between two checkpoints, the secondary fails over;
6. the secondary's view is compared byte for byte with the model ("disk at
   the last checkpoint plus the secondary's own writes"), through its export
   and again in its disk file after a clean exit.

It prints what it did and the figures (throughput, checkpoint and failover
times) and exits non-zero if a verification fails.

    pyrep-demo [--size 64M] [--seed N] [--checkpoints 5] [--transport tcp|unix] [--keep]
    pyrep-demo --in-process      (both sides in this one process, through the Python API)
"""
import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

import pyrep
from pyrep.options import parse_size
from pyrep.tools import colo

M = 1 << 20


class Model:
    """The expected disks: the primary's, the last checkpoint's, the secondary's own writes since."""

    def __init__(self, initial):
        self.primary = bytearray(initial)
        self.checkpoint = bytes(initial)
        self.own = []

    def do_checkpoint(self):
        self.checkpoint = bytes(self.primary)
        self.own = []

    def secondary_view(self):
        view = bytearray(self.checkpoint)
        for off, data in self.own:
            view[off:off + len(data)] = data
        return bytes(view)


def _random_write(rng, size, max_len=256 * 1024, align=512):
    length = rng.randrange(align, max_len + 1, align)
    offset = rng.randrange(0, (size - length) // align + 1) * align
    return offset, bytes([rng.randrange(1, 256)]) * length


def _say(msg):
    print(msg, flush=True)


def _nbd_uri(addr, export):
    if addr["type"] == "unix":
        return f"nbd+unix:///{export}?socket={addr['path']}"
    return f"nbd://{addr['host']}:{addr['port']}/{export}"


def _addr(transport, workdir, name):
    if transport == "unix":
        return {"type": "unix", "path": os.path.join(workdir, f"{name}.nbd")}
    return {"type": "inet", "host": "127.0.0.1", "port": str(colo.free_port())}


def _compare(what, got, expected):
    if got == expected:
        _say(f"  {what}: identical ({len(got) // M} MiB)")
        return True
    first = next(i for i in range(len(expected)) if got[i:i + 1] != expected[i:i + 1])
    _say(f"  {what}: DIFFERS from the model, first at byte {first}")
    return False


def run(args):
    size = args.size                       # bytes: main() parsed and checked it
    rng = random.Random(args.seed)
    workdir = tempfile.mkdtemp(prefix="pyrep-demo-")
    _say(f"pyrep-demo: two storage daemons, NBD over {args.transport}, images in {workdir}")
    paths = {n: os.path.join(workdir, f"{n}.qcow2") for n in ("primary", "secondary", "active", "hidden")}
    for p in paths.values():
        pyrep.create_image(p, "qcow2", size)
    # the primary's disk already holds data the secondary lacks: the initial copy has work to do
    initial = bytearray(size)
    with pyrep.open_backend(paths["primary"]) as blk:
        for _ in range(16):
            off, data = _random_write(rng, size, max_len=1 * M)
            blk.pwrite(off, data)
            initial[off:off + len(data)] = data
    model = Model(initial)
    sec = pri = None
    guest = view = None
    ok = True
    try:
        sec = colo.start_pyrep(workdir, "secondary")
        pri = colo.start_pyrep(workdir, "primary")
        _say(f"  secondary daemon pid {sec.proc.pid}, primary daemon pid {pri.proc.pid} (QMP on "
             f"{os.path.basename(sec.qmp_path)}, {os.path.basename(pri.qmp_path)})")
        s_nbd, p_nbd = _addr(args.transport, workdir, "secondary"), _addr(args.transport, workdir, "primary")
        colo.secondary_setup(sec, paths["secondary"], paths["active"], paths["hidden"], s_nbd, start=False)
        seeded = colo.seed(pri, paths["primary"], s_nbd)
        _say(f"  initial copy: blockdev-backup sync=full over NBD, {size // M} MiB in {seeded * 1000:.0f} ms")
        colo.start_secondary(sec)
        colo.primary_setup(pri, paths["primary"], s_nbd, p_nbd)
        _say("  replication running: secondary (colo1 <- NBD <- primary's rep0), primary (quorum: pdisk + rep0)")

        guest = pyrep.open_backend(_nbd_uri(p_nbd, "disk"))
        view = pyrep.open_backend(_nbd_uri(s_nbd, "top"))
        written = 0
        busy = 0.0
        ckpt_times = []
        for _ in range(args.checkpoints):
            t0 = time.perf_counter()
            for _ in range(args.writes):
                off, data = _random_write(rng, size)
                guest.pwrite(off, data)
                model.primary[off:off + len(data)] = data
                written += len(data)
            busy += time.perf_counter() - t0
            for _ in range(args.writes // 8):
                off, data = _random_write(rng, size, max_len=64 * 1024)
                view.pwrite(off, data)
                model.own.append((off, data))
            t0 = time.perf_counter()
            colo.checkpoint(pri, sec)
            ckpt_times.append(time.perf_counter() - t0)
            model.do_checkpoint()
        _say(f"  {args.checkpoints} rounds: {written / M:.1f} MiB written by the primary's guest at "
             f"{written / M / busy:.0f} MiB/s (random writes of 512 B..256 KiB, one at a time), checkpoints "
             f"{statistics.median(ckpt_times) * 1000:.1f} ms median, {max(ckpt_times) * 1000:.1f} ms max")

        # between two checkpoints: both sides write, then the primary dies
        for _ in range(args.writes):
            off, data = _random_write(rng, size)
            guest.pwrite(off, data)
            model.primary[off:off + len(data)] = data
        for _ in range(args.writes // 8):
            off, data = _random_write(rng, size, max_len=64 * 1024)
            view.pwrite(off, data)
            model.own.append((off, data))
        guest.close()
        guest = None
        pri.kill()
        _say(f"  primary SIGKILLed; its replication status was unknowable, the secondary's: "
             f"{sec('query-xen-replication-status')}")
        took = colo.failover(sec, paths["active"])
        status = sec("query-xen-replication-status")
        _say(f"  failover: xen-set-replication failover=true, commit done in {took * 1000:.1f} ms -> {status}")

        expected = model.secondary_view()
        ok &= _compare("secondary's view through its export after failover", view.pread(0, size), expected)
        view.close()
        view = None
        code = sec.stop()
        _say(f"  secondary daemon stopped with 'quit' (exit status {code})")
        ok &= code == 0
        with pyrep.open_backend(paths["secondary"], read_only=True) as blk:
            ok &= _compare("secondary disk file after a clean exit", blk.pread(0, size), expected)
        report = pyrep.check_image(paths["secondary"])
        clean = not report.get("corruptions") and not report.get("leaks")
        _say(f"  secondary disk check: {'clean' if clean else report}")
        ok &= clean
    finally:
        for blk in (guest, view):
            if blk is not None:
                try:
                    blk.close()
                except pyrep.Error:
                    pass
        for side in (pri, sec):
            if side is not None:
                side.kill()
        if args.keep:
            _say(f"  kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    _say("pyrep-demo: " + ("OK: the secondary holds exactly the last checkpoint plus its own writes" if ok
                           else "FAILED"))
    return 0 if ok else 1


def disk_size(ap, text):
    """``--size`` of both demos in bytes; a bad one is the parser's usage error (exit 2)."""
    try:
        size = parse_size(text, "--size")
    except pyrep.OptionError as e:
        ap.error(str(e))
    if size < 2 * M or size % 512:
        ap.error("--size must be a multiple of 512 and at least 2M")
    return size


def main(argv=None):
    ap = argparse.ArgumentParser(prog="pyrep-demo", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    ap.add_argument("--size", default="64M", help="disk size (default 64M)")
    ap.add_argument("--seed", type=int, default=1, help="random seed of the workload")
    ap.add_argument("--checkpoints", type=int, default=5, help="checkpoints before the primary dies")
    ap.add_argument("--writes", type=int, default=64, help="primary writes between two checkpoints")
    ap.add_argument("--transport", choices=("tcp", "unix"), default="tcp",
                    help="NBD between the daemons: loopback TCP (default) or Unix sockets")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    args.size = disk_size(ap, args.size)
    try:
        return run(args)
    except (pyrep.Error, colo.QMPError, OSError, RuntimeError) as e:
        print(f"pyrep-demo: FAILED: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
