#!/usr/bin/env python3
"""pyrep-img bench vs qemu-img bench on a raw image in tmpfs, plus per-request cost vs the bare syscall.

    python bench/bench_raw.py [--reps 5] [--quick] [--md]

Points (identical arguments for both tools, cache=writeback since tmpfs has no O_DIRECT):
  4 KiB reads/writes at depth 1 and depth 32 (sequential, step = 4 KiB), 1 MiB sequential reads/writes
  (depth 1). Each point alternates the two tools ``reps`` times; figures are medians.
Targets (issue 2): 4 KiB depth 1 ≥ 4×, 4 KiB depth 32 ≥ 2×, 1 MiB sequential ≥ 1.0×;
per request within 2× of a bare os.preadv loop.
"""
import argparse
import mmap
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

TARGETS = {"4K read d1": 4, "4K write d1": 4, "4K read d32": 2, "4K write d32": 2, "4K write d32 (pyrep --threads 2)": 2,
           "1M seq read d1": 1.0, "1M seq write d1": 1.0}


def per_request(image, n=200000, reps=5):
    """µs per 4 KiB read: bare os.preadv, bare fileio.preadv, pyrep node path, pyrep BlockBackend."""
    import pyrep
    from pyrep._core import fileio
    from pyrep._core.iovec import IOVector
    size = os.path.getsize(image)
    offsets = [(i * 4096) % size for i in range(n)]
    buf = mmap.mmap(-1, 4096)
    res = {}
    fd = os.open(image, os.O_RDONLY)
    try:
        bufs = [buf]
        pv = os.preadv
        res["bare os.preadv"] = bc.timeit_loop(lambda o: pv(fd, bufs, o), offsets, reps)
        iov = IOVector(buf)
        fp = fileio.preadv
        res["bare fileio.preadv (Cython)"] = bc.timeit_loop(lambda o: fp(fd, iov, o), offsets, reps)
    finally:
        os.close(fd)
    blk = pyrep.open_backend({"driver": "raw", "file": {"driver": "file", "filename": image}}, read_only=True)
    try:
        iov = IOVector(buf)
        rd = blk.root.preadv
        res["pyrep node graph (root edge → raw → file)"] = bc.timeit_loop(lambda o: rd(o, 4096, iov), offsets, reps)
        brd = blk.preadv
        res["pyrep BlockBackend.preadv"] = bc.timeit_loop(lambda o: brd(o, iov), offsets, reps)
    finally:
        blk.close()
    # the lambda adds one Python call to every variant alike; measure it so it can be subtracted
    res["(empty lambda loop)"] = bc.timeit_loop(lambda o: None, offsets, reps)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="fewer requests (smoke test)")
    ap.add_argument("--md", action="store_true", help="print Markdown only")
    ap.add_argument("--size", default=str(512 << 20), help="image size in bytes (default 512 MiB)")
    a = ap.parse_args()
    image = os.path.join(bc.SHM, f"pyrep-bench-raw-{os.getpid()}.img")
    size = int(a.size)
    div = 10 if a.quick else 1
    n4k, n1m = 50000 // div, 1000 // div
    points = [
        bc.Point("4K read d1", ["-f", "raw", "-d", "1", "-s", "4096"], n4k, 4096),
        bc.Point("4K write d1", ["-f", "raw", "-d", "1", "-s", "4096", "-w"], n4k, 4096),
        bc.Point("4K read d32", ["-f", "raw", "-d", "32", "-s", "4096"], n4k, 4096),
        bc.Point("4K write d32", ["-f", "raw", "-d", "32", "-s", "4096", "-w"], n4k, 4096),
        bc.Point("4K write d32 (pyrep --threads 2)", ["-f", "raw", "-d", "32", "-s", "4096", "-w"], n4k, 4096,
                 extra_pyrep=["--threads", "2"]),
        bc.Point("1M seq read d1", ["-f", "raw", "-d", "1", "-s", "1M"], n1m, 1 << 20),
        bc.Point("1M seq write d1", ["-f", "raw", "-d", "1", "-s", "1M", "-w"], n1m, 1 << 20),
    ]
    try:
        bc.fill_image(image, size)
        rows = []
        for p in points:
            p.measure(image, reps=a.reps)
            rows.append(p.row())
            if not a.md:
                r = rows[-1]
                print(f"{r['name']:16s} qemu {r['qemu_iops']:>10,.0f}/s  pyrep {r['pyrep_iops']:>10,.0f}/s  "
                      f"ratio {r['ratio']:.2f}x (best {r['ratio_best']:.2f}x)", flush=True)
        pr = per_request(image, n=200000 // div, reps=a.reps)
    finally:
        if os.path.exists(image):
            os.unlink(image)
    qv = subprocess.run(bc.qemu_img() + ["--version"], capture_output=True, text=True).stdout.splitlines()[0]
    print()
    print(f"Machine: {bc.cpu_info()}; {qv}; Python {sys.version.split()[0]}; image {size >> 20} MiB raw on tmpfs; "
          f"{a.reps} alternating runs per point, median")
    print()
    print(bc.table(rows, TARGETS))
    print()
    bare = pr["bare os.preadv"][0]
    lam = pr["(empty lambda loop)"][0]
    print("| per 4 KiB read, in-process loop | µs/req (median) | µs/req (best) | × bare os.preadv | "
          "× bare, loop overhead subtracted |")
    print("|---|---:|---:|---:|---:|")
    for k, (med, best) in pr.items():
        if k.startswith("("):
            continue
        print(f"| {k} | {med * 1e6:.2f} | {best * 1e6:.2f} | {med / bare:.2f}× | "
              f"{(med - lam) / (bare - lam):.2f}× |")
    print(f"| (empty lambda loop, included above) | {lam * 1e6:.2f} | {pr['(empty lambda loop)'][1] * 1e6:.2f} | | |")


if __name__ == "__main__":
    main()
