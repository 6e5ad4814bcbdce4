"""qcow2 benchmark: pyrep side by side with ``qemu-img bench -f qcow2`` on the same images.

    python bench/bench_qcow2.py [--dir DIR] [--count N] [--reps R]

The images live in a fresh directory under /dev/shm (tmpfs) unless --dir says otherwise, so the numbers
measure the format layer, not the disk. Each case runs ``--reps`` times (default 3) on fresh images,
alternating qemu-img and pyrep; the table shows the BEST run of each side.

Cases (same image layout for both tools, page cache warm, no O_DIRECT; qemu-img bench with its defaults,
i.e. ``-t writeback`` and queue depth 64 on the thread pool; pyrep is one synchronous request at a time):
  alloc-4k-write   4 KiB writes, each into a new 64 KiB cluster of an empty overlay (allocating path;
                   qemu-img bench steps sequentially with -S 64k, pyrep goes in random order), then flush
  chain-4k-read    4 KiB reads through a 3-deep chain whose data lives in the bottom image
                   (qemu-img: sequential, pyrep: random offsets)
  chain-4k-read-seq  the same, pyrep also sequential (like for like with qemu-img)
  seq-1m-write     1 MiB sequential writes into an empty image, then flush
  seq-1m-read      1 MiB sequential reads of that image
  make-empty-1g    make_empty of an overlay with 1 GiB allocated (pyrep only)
"""
import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pyrep


def qemu_bench(args):
    t = time.perf_counter()
    out = subprocess.run(["qemu-img", "bench", "-f", "qcow2", "-q"] + [str(a) for a in args],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"completed in ([0-9.]+) seconds", out)
    return float(m.group(1)) if m else time.perf_counter() - t


def qimg(*args):
    subprocess.run(["qemu-img"] + [str(a) for a in args], check=True, capture_output=True)


def opened(path, read_only=False):
    return pyrep.open_backend({"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}},
                              read_only=read_only)


def rm(*paths):
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def case_alloc(d, n):
    size = n * 65536
    q = os.path.join(d, "q-alloc.qcow2")
    p = os.path.join(d, "p-alloc.qcow2")
    rm(q, p)
    qimg("create", "-q", "-f", "qcow2", q, size)
    qimg("create", "-q", "-f", "qcow2", p, size)
    tq = qemu_bench(["-w", "-c", n, "-s", 4096, "-S", 65536, "--flush-interval", n, q])
    offs = [i * 65536 for i in range(n)]
    random.Random(1).shuffle(offs)
    buf = b"\xa5" * 4096
    blk = opened(p)
    t = time.perf_counter()
    for o in offs:
        blk.pwrite(o, buf)
    blk.flush()
    tp = time.perf_counter() - t
    blk.close()
    rm(q, p)
    return n / tq, n / tp


CSIZE = 256 << 20


def setup_chain(d):
    base, mid, top = (os.path.join(d, x) for x in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    qimg("create", "-q", "-f", "qcow2", base, CSIZE)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 1 0 {CSIZE}", base], check=True,
                   capture_output=True)
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
    qimg("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    return top


def case_chain(top, n):
    """(qemu, pyrep random, pyrep sequential) IOPS."""
    rn = min(n * 4, CSIZE // 4096)
    tq = qemu_bench(["-c", rn, "-s", 4096, "-S", 4096, top])
    offs = [random.randrange(0, CSIZE // 4096) * 4096 for _ in range(rn)]
    blk = opened(top, read_only=True)
    for o in offs[:1000]:
        blk.pread(o, 4096)
    t = time.perf_counter()
    for o in offs:
        blk.pread(o, 4096)
    tp = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(rn):
        blk.pread(i << 12, 4096)
    ts = time.perf_counter() - t
    blk.close()
    return rn / tq, rn / tp, rn / ts


def case_seq(d):
    ssize = 512 << 20
    q = os.path.join(d, "q-seq.qcow2")
    p = os.path.join(d, "p-seq.qcow2")
    rm(q, p)
    qimg("create", "-q", "-f", "qcow2", q, ssize)
    qimg("create", "-q", "-f", "qcow2", p, ssize)
    cnt = ssize >> 20
    tq = qemu_bench(["-w", "-c", cnt, "-s", 1 << 20, "-S", 1 << 20, "--flush-interval", cnt, q])
    buf = b"\x5a" * (1 << 20)
    blk = opened(p)
    t = time.perf_counter()
    for i in range(cnt):
        blk.pwrite(i << 20, buf)
    blk.flush()
    tpw = time.perf_counter() - t
    tqr = qemu_bench(["-c", cnt, "-s", 1 << 20, "-S", 1 << 20, q])
    t = time.perf_counter()
    for i in range(cnt):
        blk.pread(i << 20, 1 << 20)
    tpr = time.perf_counter() - t
    blk.close()
    rm(q, p)
    return (cnt / tq, cnt / tpw), (cnt / tqr, cnt / tpr)


def case_make_empty(d):
    me = os.path.join(d, "me.qcow2")
    rm(me)
    qimg("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", me, 1 << 30)
    blk = opened(me)
    t = time.perf_counter()
    blk.node.make_empty()
    tp = time.perf_counter() - t
    blk.close()
    rm(me)
    return tp * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None, help="where the images go (default: a fresh dir in /dev/shm)")
    ap.add_argument("--count", type=int, default=16000)
    ap.add_argument("--reps", type=int, default=3, help="runs per case; the best of each side is shown")
    ap.add_argument("--only", default=None, help="comma-separated case names (alloc, chain, seq, empty)")
    a = ap.parse_args()
    root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    d = a.dir or tempfile.mkdtemp(prefix="bench-qcow2-", dir=root)
    n = a.count
    only = set(a.only.split(",")) if a.only else {"alloc", "chain", "seq", "empty"}
    res = {}

    def keep(name, q_, p_, unit):
        oq, op, _ = res.get(name, (None, None, unit))
        res[name] = (max(q_, oq or 0) if q_ is not None else None, max(p_, op or 0), unit)

    try:
        top = setup_chain(d) if "chain" in only else None
        for _ in range(a.reps):
            if "alloc" in only:
                keep("alloc-4k-write", *case_alloc(d, n), "IOPS")
            if "chain" in only:
                q_, p_, s_ = case_chain(top, n)
                keep("chain-4k-read", q_, p_, "IOPS")
                keep("chain-4k-read-seq", q_, s_, "IOPS")
            if "seq" in only:
                w, r = case_seq(d)
                keep("seq-1m-write", *w, "MiB/s")
                keep("seq-1m-read", *r, "MiB/s")
            if "empty" in only:
                ms = case_make_empty(d)
                old = res.get("make-empty-1g")
                res["make-empty-1g"] = (None, min(ms, old[1]) if old else ms, "ms")
    finally:
        if not a.dir:
            shutil.rmtree(d, ignore_errors=True)

    print(f"dir={d} count={n} reps={a.reps} (best of each side)")
    print(f"{'case':<16} {'qemu-img':>12} {'pyrep':>12} {'unit':>6} {'ratio':>7}")
    for name in ("alloc-4k-write", "chain-4k-read", "chain-4k-read-seq", "seq-1m-write", "seq-1m-read", "make-empty-1g"):
        if name not in res:
            continue
        q_, p_, unit = res[name]
        ratio = f"{p_ / q_:.2f}x" if q_ else ""
        qs = f"{q_:.0f}" if q_ else "-"
        print(f"{name:<16} {qs:>12} {p_:>12.1f} {unit:>6} {ratio:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
