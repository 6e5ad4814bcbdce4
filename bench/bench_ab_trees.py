#!/usr/bin/env python3
"""A/B of two pyrep checkouts on the request path, in the same minutes: per-request CPU cost and 1 MiB copies.

    python bench/bench_ab_trees.py --before PYTHON:DIR --after PYTHON:DIR [--rounds 10]

``PYTHON`` is an interpreter whose ``import pyrep`` loads the checkout in ``DIR`` (built in place, e.g. an
editable install); the script runs in DIR. Each round runs one short process per tree, alternating which
goes first (this VM's speed drifts by tens of percent within a minute, so only same-minute pairs mean
anything). Measured in-process on a raw image over the file driver in tmpfs:

- CPU µs (``time.process_time``, less disturbed by other processes than wall time) per 4 KiB read: a bare
  ``os.preadv``, the node path (the backend's root edge: node → raw → file) and ``BlockBackend.preadv``;
  best of 5 loops of 100000 per process;
- wall µs per 1 MiB sequential read and write through the backend; median of 5 passes over 256 MiB.

Each figure is the median over the rounds.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

CHILD = r'''
import json, os, statistics, time, pyrep
from pyrep._core.iovec import IOVector
small, big = %r, %r
res = {}
blk = pyrep.open_backend({"driver": "raw", "file": {"driver": "file", "filename": small}}, read_only=True)
buf = bytearray(4096); iov = IOVector(buf)
root = blk.root if hasattr(blk, "root") else blk._root     # older checkouts: no public name yet
fd = os.open(small, os.O_RDONLY)
offs = [(i * 4096) %% (16 << 20) for i in range(100000)]
for name, fn in (("4K read, bare os.preadv (CPU)", lambda o, b=[buf]: os.preadv(fd, b, o)),
                 ("4K read, node path (CPU)", lambda o: root.preadv(o, 4096, iov)),
                 ("4K read, BlockBackend.preadv (CPU)", lambda o: blk.preadv(o, iov))):
    ts = []
    for _ in range(5):
        t0 = time.process_time()
        for o in offs:
            fn(o)
        ts.append((time.process_time() - t0) / len(offs))
    res[name] = min(ts)
os.close(fd)
blk.close()
blk = pyrep.open_backend({"driver": "raw", "file": {"driver": "file", "filename": big}})
iov = IOVector(bytearray(1 << 20))
for name, fn in (("1M seq read (wall)", blk.preadv), ("1M seq write (wall)", blk.pwritev)):
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        for i in range(256):
            fn(i << 20, iov)
        ts.append((time.perf_counter() - t0) / 256)
    res[name] = statistics.median(ts)
blk.close()
print(json.dumps(res))
'''


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="PYTHON:DIR of the reference checkout")
    ap.add_argument("--after", required=True, help="PYTHON:DIR of the checkout under test")
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    trees = {"before": a.before.split(":", 1), "after": a.after.split(":", 1)}
    small = os.path.join(bc.SHM, f"pyrep-ab-small-{os.getpid()}.img")
    big = os.path.join(bc.SHM, f"pyrep-ab-big-{os.getpid()}.img")
    with open(small, "wb") as f:
        f.write(b"\x01" * (16 << 20))
    with open(big, "wb") as f:
        f.write(b"\x02" * (256 << 20))
    res = {"before": [], "after": []}
    try:
        for i in range(a.rounds):
            for t in (("before", "after") if i % 2 == 0 else ("after", "before")):
                py, cwd = trees[t]
                out = subprocess.run([py, "-c", CHILD % (small, big)], cwd=cwd, capture_output=True, text=True,
                                     check=True).stdout
                res[t].append(json.loads(out.strip().splitlines()[-1]))
    finally:
        os.unlink(small)
        os.unlink(big)
    print(f"| µs per request, median of {a.rounds} alternating rounds | before | after | after/before |")
    print("|---|---:|---:|---:|")
    for k in res["before"][0]:
        b = statistics.median(r[k] for r in res["before"])
        f = statistics.median(r[k] for r in res["after"])
        print(f"| {k} | {b * 1e6:.2f} | {f * 1e6:.2f} | {f / b:.2f}× |")


if __name__ == "__main__":
    main()
