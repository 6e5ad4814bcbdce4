#!/usr/bin/env python3
"""pyrep-img vs qemu-img on qcow2 images in tmpfs: the command-line tools side by side (issue 3).

    python bench/bench_img_qcow2.py [--reps 5] [--quick] [--size BYTES] [--only convert|bench]
                                    [--convert-pyrep installed|checkout]

(bench/bench_qcow2.py is the driver-level, in-process benchmark; this one runs the two CLI tools.)
Points, identical arguments for both tools (cache=writeback; tmpfs has no O_DIRECT):
  - 4 KiB writes into an EMPTY overlay (allocating path, one new cluster per request: step 64 KiB),
    over a fully written base; a fresh overlay for every run of either tool; depth 1 and 16;
  - 4 KiB reads through a 3-deep chain (base fully written, mid holds every 3rd cluster, top every
    5th), step 4 KiB, depth 1 and 16 (and depth 16 with pyrep capped at 2 worker threads);
  - 1 MiB sequential reads and (re)writes of an allocated qcow2, depth 1;
  - convert throughput: qcow2 chain → raw and raw → qcow2, wall clock of the whole command
    (process start-up included for both tools). pyrep-img is, by default, this checkout built as a
    wheel and installed in a new venv, as a user's ``pip install`` has it (bench_common.
    installed_pyrep_img); ``--convert-pyrep checkout`` runs this checkout's editable install instead
    (its modules byte-compiled first, see ensure_bytecode). The start-up of both is printed.
Targets: 4 KiB points ≥ 3×, 1 MiB sequential ≥ 1.0×, convert ≥ 1.0×. Medians of alternating runs.
"""
import argparse
import os
import statistics
import tempfile
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

TARGETS = {"4K alloc write d1": 3, "4K alloc write d16": 3, "4K read 3-chain d1": 3, "4K read 3-chain d16": 3,
           "4K read 3-chain d16 (pyrep --threads 2)": 3, "1M seq read d1": 1.0, "1M seq write d1": 1.0}
CL = 65536


def sh(*args):
    subprocess.run(list(map(str, args)), check=True, capture_output=True)


def qbench(*args):
    sh("qemu-img", "bench", "-t", "writeback", *args)


def make_chain(d, size):
    base, mid, top = (os.path.join(d, n) for n in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    sh("qemu-img", "create", "-f", "qcow2", base, size)
    qbench("-w", "-c", size // CL, "-s", CL, "-d", "16", "-f", "qcow2", "--pattern", "0x11", base)
    sh("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
    qbench("-w", "-c", size // CL // 3, "-s", CL, "-S", 3 * CL, "-d", "16", "-f", "qcow2", "--pattern", "0x22", mid)
    sh("qemu-img", "create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    qbench("-w", "-c", size // CL // 5, "-s", CL, "-S", 5 * CL, "-o", CL, "-d", "16", "-f", "qcow2",
           "--pattern", "0x33", top)
    return base, mid, top


class FreshOverlay(bc.Point):
    """Every run writes into a new empty overlay of ``base``."""

    def measure(self, base, reps=5, cache="writeback"):
        ov = os.path.join(os.path.dirname(base), "ov.qcow2")
        args = ["-c", str(self.count)] + self.args
        for _ in range(reps):
            for tool, store in ((bc.qemu_img(), self.q), (bc.pyrep_img(), self.p)):
                if os.path.exists(ov):
                    os.unlink(ov)
                sh("qemu-img", "create", "-f", "qcow2", "-b", os.path.basename(base), "-F", "qcow2", ov)
                store.append(bc.run_bench(tool, bc.qemu_args(args, cache), ov))
        sh("qemu-img", "check", ov)
        os.unlink(ov)
        return self


def ensure_bytecode():
    """Byte-compile pyrep's modules (what ``pip install`` does, and any Python run without
    PYTHONDONTWRITEBYTECODE on its first run): with the editable install in an environment that sets
    PYTHONDONTWRITEBYTECODE=1, every ``python -m pyrep.tools.img`` would otherwise compile ~15 modules
    from source (~40 ms), a cost no installed pyrep-img pays. Stale .pyc files are ignored by Python
    (their source mtime differs), so this never runs old code."""
    import compileall

    import pyrep
    import pyrep.drivers
    import pyrep.tools
    for pkg in (pyrep, pyrep.drivers, pyrep.tools):
        compileall.compile_dir(os.path.dirname(pkg.__file__), quiet=1)


def wall(cmd):
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def convert_points(d, top, size, reps, pyrep_cmd):
    rows = []
    raw_src = os.path.join(d, "src.raw")
    sh("qemu-img", "convert", "-O", "raw", top, raw_src)
    cases = [("convert qcow2 chain → raw", top, "raw"), ("convert raw → qcow2", raw_src, "qcow2")]
    for name, src, ofmt in cases:
        out = os.path.join(d, "conv.out")
        tq, tp = [], []
        for _ in range(reps):
            for tool, store in ((bc.qemu_img(), tq), (pyrep_cmd, tp)):
                if os.path.exists(out):
                    os.unlink(out)
                store.append(wall(tool + ["convert", "-O", ofmt, src, out]))
            sh("qemu-img", "compare", src, out)
        os.unlink(out)
        qm, pm = statistics.median(tq), statistics.median(tp)
        rows.append((name, size / qm / (1 << 20), size / pm / (1 << 20), qm, pm, qm / pm, min(tq) / min(tp)))
    os.unlink(raw_src)
    # start-up cost of each tool (a no-op command), to read the wall-clock figures
    st_q = statistics.median(wall(bc.qemu_img() + ["--version"]) for _ in range(5))
    st_p = statistics.median(wall(pyrep_cmd + ["--help"]) for _ in range(5))
    st_c = statistics.median(wall(bc.pyrep_img() + ["--help"]) for _ in range(5))
    return rows, st_q, st_p, st_c


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", type=int, default=1 << 30)
    ap.add_argument("--only", choices=("bench", "convert"),
                    help="run only the 'bench' points (4K/1M) or only the convert points")
    ap.add_argument("--convert-pyrep", choices=("installed", "checkout"), default="installed",
                    help="the pyrep-img of the convert points: this checkout installed from a wheel in a "
                         "new venv (default), or the checkout's editable install")
    a = ap.parse_args()
    div = 10 if a.quick else 1
    ensure_bytecode()
    d = os.path.join(bc.SHM, f"pyrep-bench-img-qcow2-{os.getpid()}")
    os.makedirs(d)
    vdir = tempfile.mkdtemp(prefix="pyrep-bench-venv-")
    size = a.size
    try:
        base, mid, top = make_chain(d, size)
        rows, conv = [], None
        if a.only != "convert":
            rows = bench_points(a, base, top, size, div)
        if a.only != "bench":
            conv_reps = a.reps if a.only == "convert" else max(1, a.reps // 2 + 1)
            cmd = bc.installed_pyrep_img(vdir) if a.convert_pyrep == "installed" else bc.pyrep_img()
            conv, st_q, st_p, st_c = convert_points(d, top, size, conv_reps, cmd)
    finally:
        subprocess.run(["rm", "-rf", d, vdir])
    qv = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    print()
    print(f"Machine: {bc.cpu_info()}; {qv}; Python {sys.version.split()[0]}; qcow2 images of {size >> 20} MiB "
          f"(64 KiB clusters) on tmpfs; {a.reps} alternating runs per point, median")
    if rows:
        print()
        print(bc.table(rows, TARGETS))
    if conv is None:
        return
    print()
    print(f"Convert points: {conv_reps} alternating runs of each tool, median; pyrep-img: "
          f"{'this checkout installed from a wheel in a new venv' if a.convert_pyrep == 'installed' else 'the checkout'}.")
    print()
    print("| convert (wall clock, whole command) | qemu-img MiB/s | pyrep-img MiB/s | qemu-img s | pyrep-img s "
          "| ratio (median) | ratio (best) | target |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, mq, mp, qm, pm, r, rb in conv:
        print(f"| {name} | {mq:,.0f} | {mp:,.0f} | {qm:.3f} | {pm:.3f} | {r:.2f}× | {rb:.2f}× | "
              f"≥ 1.0× {'✅' if r >= 1.0 else '❌'} |")
    print()
    print(f"Process start-up (no-op command, median of 5): qemu-img {st_q * 1000:.0f} ms, "
          f"pyrep-img {st_p * 1000:.0f} ms (the checkout's editable install: {st_c * 1000:.0f} ms).")


def bench_points(a, base, top, size, div):
    """The ``bench`` points (4 KiB and 1 MiB requests, times reported by the tools themselves)."""
    n_alloc = min(size // CL, 8192 // div)
    rows = []
    pts = [FreshOverlay("4K alloc write d1", ["-f", "qcow2", "-w", "-d", "1", "-s", "4096", "-S", str(CL)],
                        n_alloc, 4096),
           FreshOverlay("4K alloc write d16", ["-f", "qcow2", "-w", "-d", "16", "-s", "4096", "-S", str(CL)],
                        n_alloc, 4096)]
    for p in pts:
        p.measure(base, reps=a.reps)
        rows.append(p.row())
        print(f"{p.name}: ratio {rows[-1]['ratio']:.2f}x", flush=True)
    n4k = 50000 // div
    for p in (bc.Point("4K read 3-chain d1", ["-f", "qcow2", "-d", "1", "-s", "4096"], n4k, 4096),
              bc.Point("4K read 3-chain d16", ["-f", "qcow2", "-d", "16", "-s", "4096"], n4k, 4096),
              bc.Point("4K read 3-chain d16 (pyrep --threads 2)", ["-f", "qcow2", "-d", "16", "-s", "4096"],
                       n4k, 4096, extra_pyrep=["--threads", "2"])):
        p.measure(top, reps=a.reps)
        rows.append(p.row())
        print(f"{p.name}: ratio {rows[-1]['ratio']:.2f}x", flush=True)
    n1m = 1000 // div
    for p in (bc.Point("1M seq read d1", ["-f", "qcow2", "-d", "1", "-s", "1M"], n1m, 1 << 20),
              bc.Point("1M seq write d1", ["-f", "qcow2", "-d", "1", "-s", "1M", "-w"], n1m, 1 << 20)):
        p.measure(base, reps=a.reps)
        rows.append(p.row())
        print(f"{p.name}: ratio {rows[-1]['ratio']:.2f}x", flush=True)
    sh("qemu-img", "check", base)
    return rows


if __name__ == "__main__":
    main()
