"""``pyrep-demo --in-process``: COLO block replication, end to end, in one process.

(``pyrep-demo`` without ``--in-process`` runs the two-process pair:
:mod:`pyrep.tools.colo_demo`.)

It creates temporary images (qcow2 primary and secondary disks, memory active
and hidden disks), seeds the secondary disk with a full backup of the primary,
starts replication (secondary first), drives a random write workload on the
primary with periodic checkpoints and some writes of the secondary's own,
"kills" the primary between two checkpoints, fails over, and verifies byte
for byte that the secondary disk (re-opened from its image file after
everything was closed) equals the disk at the last checkpoint plus the
secondary's writes since. It prints what it did and exits non-zero if the
verification fails.

    pyrep-demo --in-process [--size 64M] [--seed N] [--checkpoints 5] [--keep] [--fmt qcow2|raw]
"""
import argparse
import os
import random
import shutil
import sys
import tempfile
import time

import pyrep

M = 1 << 20


def _fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


class _Model:
    """The expected disks: what the primary holds, the last checkpoint, the secondary's writes since."""

    def __init__(self, size):
        self.primary = bytearray(size)
        self.checkpoint = bytes(size)
        self.secondary_writes = []     # (offset, data) since the last checkpoint

    def do_checkpoint(self):
        self.checkpoint = bytes(self.primary)
        self.secondary_writes = []

    def secondary_view(self):
        view = bytearray(self.checkpoint)
        for off, data in self.secondary_writes:
            view[off:off + len(data)] = data
        return view


def _random_write(rng, size, max_len=256 * 1024, align=512):
    length = rng.randrange(align, max_len + 1, align)
    offset = rng.randrange(0, size - length + 1, align)
    fill = rng.randrange(1, 256)
    data = bytes([fill]) * (length // 2) + rng.randbytes(length - length // 2)
    return offset, data


def run(size=64 * M, seed=None, checkpoints=5, writes_per_round=40, fmt="qcow2", keep=False, out=print):
    seed = random.randrange(1 << 32) if seed is None else seed
    rng = random.Random(seed)
    tmp = tempfile.mkdtemp(prefix="pyrep-demo-")
    ok = False
    try:
        p_path = os.path.join(tmp, f"primary.{fmt}")
        s_path = os.path.join(tmp, f"secondary.{fmt}")
        pyrep.create_image(p_path, fmt, size)
        pyrep.create_image(s_path, fmt, size)
        out(f"pyrep replication demo (seed {seed}, {_fmt_bytes(size)} disks, images in {tmp})")
        model = _Model(size)

        # ---- the primary's disk, with some content before replication starts
        local = pyrep.blockdev_add({"driver": fmt, "node-name": "p_local",
                                    "file": {"driver": "file", "filename": p_path}})
        for _ in range(16):
            off, data = _random_write(rng, size, max_len=1 * M)
            local.pwrite(off, data)
            model.primary[off:off + len(data)] = data

        # ---- the secondary disk, seeded with a full copy of the primary's disk
        sd = pyrep.blockdev_add({"driver": fmt, "node-name": "s_disk",
                                 "file": {"driver": "file", "filename": s_path}})
        t0 = time.perf_counter()
        seed_job = pyrep.jobs.backup(local, sd, sync="full")
        seed_job.wait()
        if seed_job.error is not None:
            raise RuntimeError(f"seeding the secondary failed: {seed_job.error}")
        out(f"seeded the secondary disk with a full backup in {time.perf_counter() - t0:.3f} s")
        # its backend shares writes: the primary's forwarded writes and the backup job write there too
        pyrep.open_backend(sd, name="s_disk_blk", share_rw=True)
        model.do_checkpoint()

        # ---- the secondary: top -> replication -> active (memory) -> hidden (memory) -> secondary disk
        top = pyrep.open_backend({
            "driver": "replication", "mode": "secondary", "top-id": "s_top", "node-name": "s_rep",
            "file": {"driver": "memory", "node-name": "s_active", "cluster-size": "4K",
                     "backing": {"driver": "memory", "node-name": "s_hidden", "cluster-size": "4K",
                                 "backing": "s_disk"}}},
            name="s_top")
        # ---- the primary: quorum(local disk, replication(primary) -> the secondary disk)
        prim = pyrep.open_backend({
            "driver": "quorum", "node-name": "p_quorum", "vote-threshold": 1, "read-pattern": "fifo",
            "children": ["p_local", {"driver": "replication", "mode": "primary", "node-name": "p_rep",
                                     "file": "s_disk"}]}, name="p_top")
        pyrep.replication.start_all("secondary", skip_other_mode=True)
        pyrep.replication.start_all("primary", skip_other_mode=True)
        out("replication started (secondary, then primary)")

        sec_writes = 0
        for rnd in range(checkpoints + 1):
            for i in range(writes_per_round):
                off, data = _random_write(rng, size)
                prim.pwrite(off, data)
                model.primary[off:off + len(data)] = data
                if i % 8 == 7:
                    off, data = _random_write(rng, size, max_len=64 * 1024)
                    top.pwrite(off, data)
                    model.secondary_writes.append((off, data))
                    sec_writes += 1
            if rnd == checkpoints:
                break     # the primary dies between two checkpoints
            pyrep.replication.do_checkpoint_all()
            model.do_checkpoint()
            pyrep.replication.get_error_all()
        # a check on the way: the secondary sees the checkpoint plus its own writes
        expected = model.secondary_view()
        if top.pread(0, size) != expected:
            out("FAILED: before failover the secondary's view differs from checkpoint + its writes")
            return 1

        # ---- kill the primary
        p = pyrep.replication.stats()["p_rep"]
        prim.close()
        out(f"killed the primary after {writes_per_round} more writes since the last checkpoint")
        t0 = time.perf_counter()
        pyrep.replication.stop_all(True, wait=True, mode="secondary")
        failover_wall = time.perf_counter() - t0
        st = pyrep.replication.stats()
        status = {d["node"]: d for d in pyrep.replication.status()}
        out(f"failover: stage {status['s_rep']['stage']}, the top now reads "
            f"'{pyrep.lookup('s_rep').file.name}'")
        if top.pread(0, size) != expected:
            out("FAILED: after failover the top's view differs from checkpoint + secondary writes")
            return 1

        # ---- report
        s = st["s_rep"]
        durs = s["checkpoint_durations"]
        out(f"primary writes forwarded:    {p['writes_forwarded']} ({_fmt_bytes(p['bytes_forwarded'])}), "
            f"{p['forward_errors']} errors")
        out(f"copied before write:         {_fmt_bytes(s['bytes_copied_before_write'])} into the hidden disk")
        out(f"secondary's own writes:      {sec_writes}")
        out(f"checkpoints:                 {len(durs)} (incl. the one at start); durations ms: "
            + ", ".join(f"{d * 1000:.2f}" for d in durs))
        out(f"failover (commit) time:      {s['failover_time']:.3f} s (stop_all wall time {failover_wall:.3f} s)")

        # ---- close everything and compare the secondary disk image itself
        pyrep.close_all()
        with pyrep.open_backend({"driver": fmt, "file": {"driver": "file", "filename": s_path}},
                                read_only=True) as check:
            got = check.pread(0, size)
        if got != expected:
            bad = next(i for i in range(size) if got[i] != expected[i])
            out(f"FAILED: the secondary disk image differs from checkpoint + secondary writes at byte {bad}")
            return 1
        out(f"verified: the secondary disk image equals the last checkpoint plus the secondary's "
            f"{len(model.secondary_writes)} writes since, byte for byte ({_fmt_bytes(size)})")
        ok = True
        return 0
    finally:
        pyrep.close_all()
        if keep or not ok:
            out(f"images kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    """``pyrep-demo``: the two-process pair (:mod:`pyrep.tools.colo_demo`); ``--in-process``: this module's."""
    pyrep.handle_exit_signals()      # SIGTERM/SIGINT: unwind (temporary images removed) and close every image
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--in-process" not in argv:
        from pyrep.tools import colo_demo
        return colo_demo.main(argv)
    argv.remove("--in-process")
    ap = argparse.ArgumentParser(prog="pyrep-demo --in-process", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="64M", help="disk size (default 64M)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    ap.add_argument("--checkpoints", type=int, default=5, help="checkpoints before the primary dies")
    ap.add_argument("--writes", type=int, default=40, help="primary writes between checkpoints")
    ap.add_argument("--fmt", choices=("qcow2", "raw"), default="qcow2", help="image format of the disks")
    ap.add_argument("--keep", action="store_true", help="keep the images")
    args = ap.parse_args(argv)
    from pyrep.tools.colo_demo import disk_size
    size = disk_size(ap, args.size)
    try:
        return run(size=size, seed=args.seed, checkpoints=args.checkpoints, writes_per_round=args.writes,
                   fmt=args.fmt, keep=args.keep)
    except pyrep.Error as e:
        print(f"pyrep-demo: FAILED: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
