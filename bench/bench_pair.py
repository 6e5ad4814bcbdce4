"""A replication pair under load: a pyrep pair against a QEMU pair, built by the same QMP sequence.

Both pairs are two storage processes on this machine (the secondary and the
primary), built by :mod:`pyrep.tools.colo` exactly as QEMU's COLO
documentation builds them: the primary serves its quorum (local qcow2 disk +
replication -> NBD -> the secondary's disk) over NBD, and fio's nbd engine
writes through that export. Images live in tmpfs. The pairs alternate
``--reps`` times so background noise hits both alike; each figure is the
median, and the ratio pyrep/QEMU is what to read (the machine is shared).

Also measured on each pair: the checkpoint latency (``xen-colo-do-checkpoint``
on both sides, with 512 MiB written since the last checkpoint) and the
failover time (256 MiB written since the last checkpoint, SIGKILL the primary,
``xen-set-replication failover=true``, until the commit ended).

    python bench/bench_pair.py [--reps 3] [--runtime 5] [--size 1G] [--only qemu|pyrep]
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import colo  # noqa: E402  (the checkout's tools/colo.py, also installed as pyrep.tools.colo)

POINTS = [  # name, fio rw, block size, iodepth
    ("4K randwrite QD1", "randwrite", "4k", 1),
    ("4K randwrite QD16", "randwrite", "4k", 16),
    ("1M write QD8", "write", "1M", 8),
]


def cpu_seconds(pid):
    """User + system CPU time of process ``pid`` so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def fio(uri, rw, bs, depth, runtime, size):
    """One fio run with the nbd engine; returns (IOPS, bytes/s)."""
    cmd = ["fio", "--name=pair", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={depth}", f"--size={size}", "--time_based", f"--runtime={runtime}",
           "--output-format=json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr.strip()[-500:]}")
    out = p.stdout[p.stdout.index("{"):]
    job = json.loads(out)["jobs"][0]["write"]
    return job["iops"], job["bw_bytes"]


def fill(uri, size):
    """Write ``size`` bytes sequentially from offset 0 (1 MiB requests, depth 8)."""
    cmd = ["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--rw=write", "--bs=1M", "--iodepth=8",
           f"--size={size}", "--output-format=json"]
    subprocess.run(cmd, check=True, capture_output=True)


def build_pair(kind, workdir, size):
    """Start a secondary and a primary of ``kind`` ("pyrep" | "qemu") in ``workdir``; return them."""
    for name in ("sec", "act", "hid", "pri"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", os.path.join(workdir, f"{name}.qcow2"),
                        str(size)], check=True)
    start = colo.start_pyrep if kind == "pyrep" else colo.start_qemu
    sec = start(workdir, "secondary")
    pri = start(workdir, "primary")
    colo.secondary_setup(sec, sec.path("sec.qcow2"), sec.path("act.qcow2"), sec.path("hid.qcow2"),
                         {"type": "unix", "path": sec.path("sec.nbd")}, export_top=False)
    colo.primary_setup(pri, pri.path("pri.qcow2"), {"type": "unix", "path": sec.path("sec.nbd")},
                       {"type": "unix", "path": pri.path("pri.nbd")})
    return pri, sec


def measure(kind, args):
    workdir = tempfile.mkdtemp(prefix=f"pyrep-bench-pair-{kind}-", dir="/dev/shm")
    pri = sec = None
    result = {}
    try:
        pri, sec = build_pair(kind, workdir, args.size)
        uri = f"nbd+unix:///disk?socket={pri.path('pri.nbd')}"
        for name, rw, bs, depth in POINTS:
            before = (children_cpu_seconds(), cpu_seconds(pri.proc.pid), cpu_seconds(sec.proc.pid))
            result[name] = fio(uri, rw, bs, depth, args.runtime, args.size)
            after = (children_cpu_seconds(), cpu_seconds(pri.proc.pid), cpu_seconds(sec.proc.pid))
            requests = result[name][0] * args.runtime
            # CPU per request of fio, the primary and the secondary: where a point's time goes on a small machine
            result[name + " cpu"] = tuple((a - b) / requests * 1e6 for a, b in zip(after, before))
        # the checkpoint right after 512 MiB were written since the last one (the hidden disk holds their
        # old data), then the failover with 256 MiB written since that checkpoint
        colo.checkpoint(pri, sec)
        fill(uri, "512M")
        t0 = time.perf_counter()
        colo.checkpoint(pri, sec)
        result["checkpoint (s)"] = time.perf_counter() - t0
        fill(uri, "256M")
        pri.kill()
        result["failover (s)"] = colo.failover(sec, sec.path("act.qcow2"))
    finally:
        for side in (pri, sec):
            if side is not None:
                side.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio point")
    ap.add_argument("--size", default="1G", help="disk size (fio's region)")
    ap.add_argument("--only", choices=("qemu", "pyrep"))
    args = ap.parse_args()
    kinds = [args.only] if args.only else ["qemu", "pyrep"]
    runs = {k: [] for k in kinds}
    for _ in range(args.reps):
        for k in kinds:
            runs[k].append(measure(k, args))
    print(f"{'point':<22}" + "".join(f"{k:>22}" for k in kinds) + ("   pyrep/qemu" if len(kinds) == 2 else ""))
    for name, *_ in POINTS:
        med = {k: statistics.median(r[name][0] if "4K" in name else r[name][1] for r in runs[k]) for k in kinds}
        unit = "IOPS" if "4K" in name else "MiB/s"
        fmt = {k: (f"{med[k]:.0f} {unit}" if unit == "IOPS" else f"{med[k] / 2**20:.0f} {unit}") for k in kinds}
        line = f"{name:<22}" + "".join(f"{fmt[k]:>22}" for k in kinds)
        if len(kinds) == 2:
            line += f"   {med['pyrep'] / med['qemu']:.2f}x"
        print(line)
    print("CPU per request, µs (fio / primary / secondary; medians):")
    for name, *_ in POINTS:
        cells = []
        for k in kinds:
            parts = [statistics.median(r[name + " cpu"][i] for r in runs[k]) for i in range(3)]
            cells.append(" / ".join(f"{v:.0f}" if v >= 100 else f"{v:.1f}" for v in parts))
        print(f"  {name:<20}" + "".join(f"{c:>22}" for c in cells))
    for name in ("checkpoint (s)", "failover (s)"):
        med = {k: statistics.median(r[name] for r in runs[k]) for k in kinds}
        line = f"{name:<22}" + "".join(f"{med[k] * 1000:>19.1f} ms" for k in kinds)
        if len(kinds) == 2:
            line += f"   {med['pyrep'] / med['qemu']:.2f}x (lower is better)"
        print(line)


if __name__ == "__main__":
    main()
