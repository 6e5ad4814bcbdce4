"""CPU time per qcow2 request (pyrep only): the figure to compare two checkouts on a shared machine.

    python bench/bench_qcow2_cpu.py [--label NAME] [--rounds N]

bench_qcow2.py and bench_img_qcow2.py measure wall clock against qemu-img in the same run; when other
work loads the machine, both sides swing by 2-5x from run to run. The CPU time the requesting process
spends per request (``time.process_time``) moves far less, so running this with two checkouts' venvs,
alternately, tells whether a change made the request path dearer. Cases, one image in /dev/shm:
256 × 1 MiB sequential writes into an empty 512 MiB image (allocating, then flush), 4 × 256 × 1 MiB
sequential reads of them, 4096 × 4 KiB allocating writes (one new 64 KiB cluster each).
"""
import argparse
import os
import shutil
import subprocess
import tempfile
import time

import pyrep


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.process_time() - c0, time.perf_counter() - t0


def one_round():
    d = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        img = os.path.join(d, "a.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "512M"], check=True)
        blk = pyrep.open_backend({"driver": "qcow2", "file": {"driver": "file", "filename": img}})
        try:
            big, small = b"\x5a" * (1 << 20), b"\x11" * 4096

            def writes():
                for i in range(256):
                    blk.pwrite(i << 20, big)
                blk.flush()

            def reads():
                for _ in range(4):
                    for i in range(256):
                        blk.pread(i << 20, 1 << 20)

            def allocs():
                for i in range(256, 512):
                    for j in range(16):
                        blk.pwrite((i << 20) + j * 65536, small)
            return {"1M-write": (_timed(writes), 256), "1M-read": (_timed(reads), 1024),
                    "4K-alloc-write": (_timed(allocs), 4096)}
        finally:
            blk.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="pyrep")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    best = {}
    for _ in range(a.rounds):
        for case, ((cpu, wall), n) in one_round().items():
            cpu_us, wall_us = cpu * 1e6 / n, wall * 1e6 / n
            old = best.get(case)
            best[case] = (min(cpu_us, old[0]), min(wall_us, old[1])) if old else (cpu_us, wall_us)
    print(f"{a.label}: " + " | ".join(f"{c} cpu {v[0]:.1f} us wall {v[1]:.1f} us" for c, v in best.items()))


if __name__ == "__main__":
    main()
