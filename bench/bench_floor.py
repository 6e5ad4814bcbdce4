#!/usr/bin/env python3
"""The kernel's share of the issue-3 points that stay under target, measured beside both tools.

    python bench/bench_floor.py [--reps 5] [--size BYTES]

For each point, in one run on the same tmpfs images, alternating:
  - qemu-img and pyrep-img (the same commands as bench_img_qcow2.py);
  - the floor: the system calls any implementation must make, issued from a bare Python loop with
    nothing else (no qcow2 metadata, no locks, no threads). What pyrep does above that is its own cost;
    qemu-img's time over the floor is the best ratio any engine could reach on this machine.

Points:
  - 4 KiB allocating writes over a backing, depth 1 (one new 64 KiB cluster per request, its other
    60 KiB copied from the backing): floor = the cheaper of (pread 64 KiB of the backing's data +
    pwrite 64 KiB into a new file) and (copy_file_range 64 KiB + pwrite 4 KiB), per request;
  - the same at depth 16: writes to one file are serialised by its write lock on tmpfs (and most file
    systems), so no number of threads beats one thread writing 64 KiB into fresh pages per request:
    floor = pwrite 64 KiB into a new file, per request;
  - convert raw -> qcow2: floor = writing the image's bytes into a new file in 1 MiB writes (the
    target's writes, which both tools serialise on that file's lock), plus the process start-up of
    each tool, measured apart.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
import bench_img_qcow2 as bq  # noqa: E402

CL = 65536


def _fresh(path):
    if os.path.exists(path):
        os.unlink(path)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)


def floor_cow(d, src, count):
    """Seconds for ``count`` copy-on-write requests from ``src`` (a file with data): min of two ways."""
    sfd = os.open(src, os.O_RDONLY)
    buf = bytearray(CL)
    mv = memoryview(buf)
    data = b"\x5a" * 4096
    out = os.path.join(d, "floor.raw")
    times = []
    try:
        for way in ("read+write", "copy_file_range"):
            fd = _fresh(out)
            t = time.perf_counter()
            if way == "read+write":
                for i in range(count):
                    os.preadv(sfd, [mv], (i + 2) * CL)
                    mv[4096:8192] = data
                    os.pwrite(fd, mv, i * CL)
            else:
                for i in range(count):
                    os.copy_file_range(sfd, fd, CL, (i + 2) * CL, i * CL)
                    os.pwrite(fd, data, i * CL + 4096)
            times.append(time.perf_counter() - t)
            os.close(fd)
    finally:
        os.close(sfd)
        if os.path.exists(out):
            os.unlink(out)
    return min(times)


def floor_fresh_writes(d, nbytes, chunk):
    """Seconds to write ``nbytes`` into a new file, ``chunk`` bytes per pwrite."""
    out = os.path.join(d, "floor.raw")
    buf = os.urandom(chunk)
    fd = _fresh(out)
    try:
        t = time.perf_counter()
        for off in range(0, nbytes, chunk):
            os.pwrite(fd, buf, off)
        return time.perf_counter() - t
    finally:
        os.close(fd)
        os.unlink(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--size", type=int, default=1 << 30)
    a = ap.parse_args()
    bq.ensure_bytecode()
    d = os.path.join(bc.SHM, f"pyrep-bench-floor-{os.getpid()}")
    os.makedirs(d)
    vdir = tempfile.mkdtemp(prefix="pyrep-bench-venv-")
    count = min(a.size // CL - 4, 8192)
    rows = []
    try:
        base = os.path.join(d, "base.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(a.size)], check=True)
        bq.qbench("-w", "-c", a.size // CL, "-s", CL, "-d", "16", "-f", "qcow2", "--pattern", "0x11", base)
        for depth in (1, 16):
            p = bq.FreshOverlay(f"4K alloc write d{depth}", ["-f", "qcow2", "-w", "-d", str(depth), "-s", "4096",
                                                             "-S", str(CL)], count, 4096)
            fl = []
            for _ in range(a.reps):
                p.measure(base, reps=1)
                fl.append(floor_cow(d, base, count) if depth == 1 else floor_fresh_writes(d, count * CL, CL))
            rows.append((p.name, statistics.median(p.q) / count, statistics.median(p.p) / count,
                         statistics.median(fl) / count, 3.0))
        # convert raw -> qcow2: the installed pyrep-img, as in bench_img_qcow2.py
        raw = os.path.join(d, "src.raw")
        subprocess.run(["qemu-img", "convert", "-O", "raw", base, raw], check=True)
        pyrep = bc.installed_pyrep_img(vdir)
        out = os.path.join(d, "conv.qcow2")
        tq, tp, fl = [], [], []
        for _ in range(a.reps):
            for tool, store in ((bc.qemu_img(), tq), (pyrep, tp)):
                if os.path.exists(out):
                    os.unlink(out)
                store.append(bq.wall(tool + ["convert", "-O", "qcow2", raw, out]))
            os.unlink(out)
            fl.append(floor_fresh_writes(d, a.size, 1 << 20))
        st_q = statistics.median(bq.wall(bc.qemu_img() + ["--version"]) for _ in range(5))
        st_p = statistics.median(bq.wall(pyrep + ["--help"]) for _ in range(5))
        rows.append(("convert raw → qcow2 (whole command)", statistics.median(tq), statistics.median(tp),
                     statistics.median(fl), 1.0))
    finally:
        subprocess.run(["rm", "-rf", d, vdir])
    print()
    print(f"Machine: {bc.cpu_info()}; images of {a.size >> 20} MiB on tmpfs; {a.reps} alternating runs, median.")
    print()
    print("| point | qemu-img | pyrep-img | floor (kernel) | pyrep above floor | best possible ratio "
          "(qemu / floor) | ratio reached (qemu / pyrep) | target |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, q, p, f, target in rows:
        unit, k = ("µs/req", 1e6) if q < 0.01 else ("s", 1)
        print(f"| {name} | {q * k:.2f} {unit} | {p * k:.2f} {unit} | {f * k:.2f} {unit} | {(p - f) * k:+.2f} {unit} "
              f"| {q / f:.2f}× | {q / p:.2f}× | ≥ {target}× |")
    print()
    print(f"convert: the floor counts the target's writes only; start-up (no-op command, median of 5): "
          f"qemu-img {st_q * 1000:.0f} ms, pyrep-img {st_p * 1000:.0f} ms.")


if __name__ == "__main__":
    main()
