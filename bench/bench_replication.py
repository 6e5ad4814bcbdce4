#!/usr/bin/env python3
"""Block replication benchmarks (issue 4, "Performance (benchmark)"), measured in one run on tmpfs.

    python bench/bench_replication.py [--reps 3] [--dirty 1G] [--commit-dirty 256M] [--md FILE] [--profile]

(a) Throughput of the primary's writes into the secondary disk with the backup (copy-before-write)
    running vs the same writes with replication off: 4 KiB and 64 KiB random writes sent to the
    primary's replication(primary) node (which forwards them into the secondary disk: the
    HEADLINE rows) and straight to the secondary disk's backend; the reference is the same writes
    (same offsets, sizes, buffers) into a byte copy of the secondary disk through the same kind of
    path with no secondary at all, measured interleaved with them (alternating which goes first),
    since this VM's speed drifts within a minute. The whole primary graph ``quorum(p_local raw,
    replication(primary) -> secondary disk)`` is measured the same way against a twin quorum over
    copies of both disks. Memory active/hidden disks with --mem-cluster (default 4K, as the
    recommended config; the backup copies in the hidden disk's clusters). Cases: "fresh" = one
    write per 64 KiB cluster in random order after a checkpoint (every write copies: the worst
    case); "mix" = uniform random offsets after a checkpoint, 2 writes per 64 KiB cluster on
    average; "copied" = every cluster already copied in this interval (no copy left, only the
    extra hops). The KiB copied per write is shown. 4 KiB mix into the secondary disk is the
    headline. Target ≥ 0.5×.
(b) Checkpoint latency with --dirty (default 1 GiB) dirty in active+hidden: half copied into
    hidden by copy-before-write (writes to the secondary disk's backend, where the primary's
    forwarded writes land), half written by the secondary into active; then
    ``do_checkpoint_all()`` is timed. Memory overlays and qcow2 overlays. Target < 50 ms.
(c) Failover commit vs qemu-img commit of the same chain: qcow2 active (-b hidden) over qcow2
    hidden (-b secondary disk) over a qcow2 secondary disk, --commit-dirty (default 256 MiB)
    allocated above the base (half in hidden via COW, half in active by secondary writes,
    overlapping by a quarter). After filling, every node is flushed and the three files are
    copied; pyrep then runs ``stop_all(failover=True, wait=True)`` on the live graph (an active
    commit of active+hidden into the secondary disk), and ``qemu-img commit -t writeback -d -b
    sd.qcow2 active.qcow2`` commits the copy (top + intermediate into base in one command; its
    wall time includes process start and image opening). Both results are checked equal with
    ``qemu-img compare``. Target ≥ 1.0×.
"""
import argparse
import cProfile
import datetime
import io
import os
import platform
import pstats
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

import pyrep  # noqa: E402
from pyrep import replication  # noqa: E402
from pyrep.options import parse_size  # noqa: E402

K, M, G = 1 << 10, 1 << 20, 1 << 30
CL = 64 * K
SHM = bc.SHM if os.path.isdir(bc.SHM) else tempfile.gettempdir()


# ----------------------------------------------------------------------------- helpers
class Data:
    """Compressible-but-not-trivial 1 MiB buffers: each 64 KiB cluster is 40 KiB random + a fill byte."""

    def __init__(self, n=16, seed=1):
        rng = random.Random(seed)
        self.bufs = []
        for i in range(n):
            b = bytearray()
            for c in range(M // CL):
                b += rng.randbytes(40 * K) + bytes([(i * 16 + c) % 255 + 1]) * (CL - 40 * K)
            self.bufs.append(bytes(b))

    def chunk(self, i, length=M):
        return self.bufs[i % len(self.bufs)][:length]


def qemu_img(*args):
    return subprocess.run(bc.qemu_img() + [str(a) for a in args], check=True, capture_output=True, text=True)


def fill(blk, start, length, data, chunk=M):
    pos = start
    i = 0
    while pos < start + length:
        n = min(chunk, start + length - pos)
        blk.pwrite(pos, data.chunk(i, n))
        pos += n
        i += 1


def med(xs):
    return statistics.median(xs)


MEM_CLUSTER = "4K"      # memory active/hidden cluster size (--mem-cluster); also the COW granularity


def build(tmp, size, overlays="memory", sd_fmt="qcow2", primary=True, sd_path=None, chain_files=False):
    """Secondary: top -> replication -> active -> hidden -> secondary disk (backend 'colo-disk');
    primary (optional): quorum(p_local raw, replication(primary) -> secondary disk)."""
    sd_path = sd_path or os.path.join(tmp, f"sd.{sd_fmt}")
    if not os.path.exists(sd_path):
        qemu_img("create", "-q", "-f", sd_fmt, sd_path, size)
    sd = pyrep.blockdev_add({"driver": sd_fmt, "node-name": "s_disk",
                             "file": {"driver": "file", "filename": sd_path}})
    colo = pyrep.open_backend(sd, name="colo-disk", share_rw=True)
    if overlays == "memory":
        hidden = {"driver": "memory", "node-name": "hidden", "backing": "s_disk", "cluster-size": MEM_CLUSTER}
        active = {"driver": "memory", "node-name": "active", "backing": hidden, "cluster-size": MEM_CLUSTER}
    else:
        hp, ap = os.path.join(tmp, "hidden.qcow2"), os.path.join(tmp, "active.qcow2")
        if chain_files:     # headers name their backing files (relative), so qemu-img sees the same chain
            qemu_img("create", "-q", "-f", "qcow2", "-b", os.path.basename(sd_path), "-F", sd_fmt, hp, size)
            qemu_img("create", "-q", "-f", "qcow2", "-b", "hidden.qcow2", "-F", "qcow2", ap, size)
        else:
            qemu_img("create", "-q", "-f", "qcow2", hp, size)
            qemu_img("create", "-q", "-f", "qcow2", ap, size)
        hidden = {"driver": "qcow2", "node-name": "hidden", "file": {"driver": "file", "filename": hp},
                  "backing": "s_disk"}
        active = {"driver": "qcow2", "node-name": "active", "file": {"driver": "file", "filename": ap},
                  "backing": hidden}
    top = pyrep.open_backend({"driver": "replication", "mode": "secondary", "top-id": "top",
                              "node-name": "s_rep", "file": active}, name="top")
    prim = None
    if primary:
        pl = os.path.join(tmp, "p_local.raw")
        if not os.path.exists(pl):
            qemu_img("create", "-q", "-f", "raw", pl, size)
        prim = pyrep.open_backend({
            "driver": "quorum", "node-name": "p_quorum", "vote-threshold": 1, "read-pattern": "fifo",
            "children": [{"driver": "raw", "node-name": "p_local", "file": {"driver": "file", "filename": pl}},
                         {"driver": "replication", "mode": "primary", "node-name": "p_rep", "file": "s_disk"}]},
            name="primary")
    return colo, top, prim


# ----------------------------------------------------------------------------- (a) throughput
def offsets_fresh(rng, size, bs):
    clusters = list(range(size // CL))
    rng.shuffle(clusters)
    return [c * CL + rng.randrange(0, CL, bs) for c in clusters]


def offsets_mix(rng, size, bs, n):
    return [rng.randrange(0, size, bs) for _ in range(n)]


def timed_writes(blk, offsets, data):
    pw = blk.pwrite
    t0 = time.perf_counter()
    for o in offsets:
        pw(o, data)
    return time.perf_counter() - t0


def bench_throughput(tmp, size, reps, data, log, profile=None):
    rng = random.Random(42)
    sd_path = os.path.join(tmp, "sd.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", sd_path, size)
    pl = os.path.join(tmp, "p_local.raw")
    qemu_img("create", "-q", "-f", "raw", pl, size)
    cases = {}
    for bs in (4 * K, 64 * K):
        cases[(bs, "fresh")] = [offsets_fresh(rng, size, bs) for _ in range(reps)]
        n = size // CL * 2
        cases[(bs, "mix")] = [offsets_mix(rng, size, bs, n) for _ in range(reps)]
        cases[(bs, "copied")] = [offsets_mix(rng, size, bs, n) for _ in range(reps)]
    bufs = {bs: data.chunk(3, bs) for bs in (4 * K, 64 * K)}

    # the secondary disk image, fully allocated with real data (so nobody pays qcow2 allocation)
    colo, top, prim = build(tmp, size, "memory", sd_path=sd_path)
    fill(colo, 0, size, data)
    colo.flush()
    with open(pl, "r+b") as f:          # the primary's local disk: real pages too
        for i in range(size // M):
            f.write(data.chunk(i))
    # the reference: twins of both disks (byte copies) with the same primary graph but no secondary,
    # so no backup: "the same writes with replication off", measured interleaved with the real ones
    # (this VM's speed drifts by tens of percent within a minute)
    twin_sd, twin_pl = os.path.join(tmp, "sd_twin.qcow2"), os.path.join(tmp, "p_twin.raw")
    shutil.copyfile(sd_path, twin_sd)
    shutil.copyfile(pl, twin_pl)
    pyrep.blockdev_add({"driver": "qcow2", "node-name": "t_disk", "file": {"driver": "file", "filename": twin_sd}})
    twin = pyrep.open_backend("t_disk", name="twin-disk", share_rw=True)
    prim_twin = pyrep.open_backend({
        "driver": "quorum", "node-name": "t_quorum", "vote-threshold": 1, "read-pattern": "fifo",
        "children": [{"driver": "raw", "node-name": "t_local", "file": {"driver": "file", "filename": twin_pl}},
                     {"driver": "replication", "mode": "primary", "node-name": "t_rep", "file": "t_disk"}]},
        name="primary-twin")
    replication.start_all("primary")    # both primaries forward; only s_disk has a secondary (a backup)
    replication.start_all("secondary")
    job = pyrep.lookup("s_rep").driver.backup_job
    pairs = (("quorum", prim, prim_twin),                                   # the whole primary graph
             ("p_rep", pyrep.lookup("p_rep"), pyrep.lookup("t_rep")),       # its forward, node level
             ("colo", colo, twin))                                          # the secondary disk's backend
    res = {}
    for target, blk, ref in pairs:
        for (bs, kind), offs in cases.items():
            times, base_times, fresh_frac = [], [], []
            for i, o in enumerate(offs):
                replication.do_checkpoint_all()
                if kind == "copied":       # one pass over every cluster first: nothing left to copy
                    for c in range(size // CL):
                        colo.pwrite(c * CL, bufs[CL])
                        twin.pwrite(c * CL, bufs[CL])
                c0 = job.bytes_copied
                if i % 2:                  # alternate which side goes first
                    base_times.append(timed_writes(ref, o, bufs[bs]))
                if profile is not None and target == "quorum" and kind == "fresh" and bs == 4 * K:
                    profile.enable()
                times.append(timed_writes(blk, o, bufs[bs]))
                if profile is not None:
                    profile.disable()
                fresh_frac.append((job.bytes_copied - c0) / len(o) / K)   # KiB copied before write, per write
                if not i % 2:
                    base_times.append(timed_writes(ref, o, bufs[bs]))
            res[(target, bs, kind)] = times
            res[(target, "base", bs, kind)] = base_times
            res[(target, bs, kind, "fresh")] = med(fresh_frac)
    replication.get_error_all()
    pyrep.close_all()
    rows = []
    for bs in (4 * K, 64 * K):
        for kind in ("fresh", "mix", "copied"):
            n = len(cases[(bs, kind)][0])
            for target in ("quorum", "p_rep", "colo"):
                b = med(res[(target, "base", bs, kind)])
                t = med(res[(target, bs, kind)])
                rows.append({"bs": bs, "kind": kind, "target": target, "n": n, "base_s": b, "repl_s": t,
                             "base_iops": n / b, "repl_iops": n / t, "ratio": b / t,
                             "first_writes": res[(target, bs, kind, "fresh")]})
                log(f"  (a) {bs // K:>2} KiB {kind:<6} via {target:<6}: no backup {n / b:9,.0f} IOPS, "
                    f"replicating {n / t:9,.0f} IOPS → {b / t:.2f}×  (copied before write: {res[(target, bs, kind, 'fresh')]:.1f} KiB/write)")
    return rows


# ----------------------------------------------------------------------------- (b) checkpoint latency
def bench_checkpoint(tmp, dirty, data, log, reps=1):
    out = {}
    size = dirty      # hidden takes the first half (COW), active the second half (secondary writes)
    sd_path = os.path.join(tmp, "sd_ckpt.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", sd_path, size)
    blk = pyrep.open_backend({"driver": "qcow2", "file": {"driver": "file", "filename": sd_path}})
    fill(blk, 0, size, data)
    blk.close()
    for overlays in ("memory", "qcow2"):
        d = os.path.join(tmp, f"ckpt-{overlays}")
        os.makedirs(d, exist_ok=True)
        times, empty_times, fill_s, mem = [], [], [], None
        colo, top, _ = build(d, size, overlays, primary=False, sd_path=sd_path)
        replication.start_all("secondary")
        for r in range(reps):
            t0 = time.perf_counter()
            half = dirty // 2
            # COW: every cluster of the first half is overwritten on the secondary disk -> copied to hidden
            fill(colo, 0, half, Data.shifted(data, r + 1))
            fill(top, half, dirty - half, Data.shifted(data, r + 2))
            fill_s.append(time.perf_counter() - t0)
            act, hid = pyrep.lookup("active"), pyrep.lookup("hidden")
            a_alloc = _allocated(act)
            h_alloc = _allocated(hid)
            if overlays == "memory":
                mem = act.driver.memory_used + hid.driver.memory_used
            t0 = time.perf_counter()
            replication.do_checkpoint_all()
            times.append(time.perf_counter() - t0)
            assert _allocated(act) == 0 and _allocated(hid) == 0
            t0 = time.perf_counter()
            replication.do_checkpoint_all()
            empty_times.append(time.perf_counter() - t0)
        replication.get_error_all()
        pyrep.close_all()
        shutil.rmtree(d, ignore_errors=True)
        out[overlays] = {"ms": med(times) * 1e3, "empty_ms": med(empty_times) * 1e3, "active": a_alloc,
                         "hidden": h_alloc, "fill_s": med(fill_s), "mem": mem}
        log(f"  (b) {overlays} overlays: {a_alloc / M:.0f} MiB in active + {h_alloc / M:.0f} MiB in hidden → "
            f"checkpoint {out[overlays]['ms']:.2f} ms (empty overlays: {out[overlays]['empty_ms']:.2f} ms; "
            f"filling took {out[overlays]['fill_s']:.1f} s"
            + (f"; RAM used by the overlays {mem / M:.0f} MiB)" if mem else ")"))
    os.unlink(sd_path)
    return out


def _shifted(data, k):
    d = Data.__new__(Data)
    d.bufs = data.bufs[k % len(data.bufs):] + data.bufs[:k % len(data.bufs)]
    return d


Data.shifted = staticmethod(_shifted)


def _allocated(node):
    from pyrep.node import allocation_extents, is_allocated
    return sum(n for _, n, alloc in allocation_extents(lambda p, n: is_allocated(node, p, n), 0, node.length)
               if alloc)


# ----------------------------------------------------------------------------- (c) failover commit
def bench_commit(tmp, dirty, reps, data, log, profile=None):
    size = dirty
    rows = []
    for r in range(reps):
        a = os.path.join(tmp, f"commit-{r}-pyrep")
        b = os.path.join(tmp, f"commit-{r}-qemu")
        os.makedirs(a)
        sd_path = os.path.join(a, "sd.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", sd_path, size)
        blk = pyrep.open_backend({"driver": "qcow2", "file": {"driver": "file", "filename": sd_path}})
        fill(blk, 0, size, data)
        blk.close()
        colo, top, _ = build(a, size, "qcow2", primary=False, sd_path=sd_path, chain_files=True)
        replication.start_all("secondary")
        h0, h1 = 0, dirty // 2                     # hidden: [0, 1/2) by COW
        a0, a1 = dirty // 4, dirty                 # active: [1/4, 1) by the secondary
        fill(colo, h0, h1 - h0, Data.shifted(data, 5))
        fill(top, a0, a1 - a0, Data.shifted(data, 9))
        above = _allocated_above()
        for n in ("active", "hidden", "s_disk"):
            pyrep.lookup(n).flush()
        shutil.copytree(a, b)
        if profile is not None:
            profile.enable()
        t0 = time.perf_counter()
        replication.stop_all(True, wait=True)
        tp = time.perf_counter() - t0
        if profile is not None:
            profile.disable()
        ft = pyrep.replication.stats()["s_rep"]["failover_time"]
        expected = top.pread(0, size) if r == 0 else None
        pyrep.close_all()
        t0 = time.perf_counter()
        qemu_img("commit", "-q", "-t", "writeback", "-d", "-b", "sd.qcow2", os.path.join(b, "active.qcow2"))
        tq = time.perf_counter() - t0
        cmp = subprocess.run(bc.qemu_img() + ["compare", "-f", "qcow2", "-F", "qcow2", sd_path,
                                              os.path.join(b, "sd.qcow2")], capture_output=True, text=True)
        if cmp.returncode != 0:
            raise SystemExit(f"(c) pyrep's and qemu-img's committed disks differ: {cmp.stdout} {cmp.stderr}")
        if expected is not None:
            with pyrep.open_backend({"driver": "qcow2", "file": {"driver": "file", "filename": sd_path}},
                                    read_only=True) as chk:
                if chk.pread(0, size) != expected:
                    raise SystemExit("(c) after failover the secondary disk differs from the top's view")
        shutil.rmtree(a)
        shutil.rmtree(b)
        rows.append((tp, ft, tq, above))
        log(f"  (c) rep {r}: {above / M:.0f} MiB above the base: pyrep stop_all(failover) {tp * 1e3:.0f} ms "
            f"(job {ft * 1e3:.0f} ms), qemu-img commit {tq * 1e3:.0f} ms → {tq / tp:.2f}×")
    tp, ft, tq = med([x[0] for x in rows]), med([x[1] for x in rows]), med([x[2] for x in rows])
    above = rows[0][3]
    return {"pyrep_s": tp, "job_s": ft, "qemu_s": tq, "bytes": above, "ratio": tq / tp,
            "pyrep_mib_s": above / M / tp, "qemu_mib_s": above / M / tq}


def _allocated_above():
    from pyrep.node import allocation_extents, is_allocated_above
    top, base = pyrep.lookup("active"), pyrep.lookup("s_disk")
    return sum(n for _, n, alloc in allocation_extents(lambda p, n: is_allocated_above(top, base, p, n), 0,
                                                        top.length) if alloc)


def qemu_commit_start_cost(tmp):
    """qemu-img commit of an empty 1-cluster overlay: process start + opening, for reference."""
    d = os.path.join(tmp, "qcost")
    os.makedirs(d)
    qemu_img("create", "-q", "-f", "qcow2", os.path.join(d, "b.qcow2"), "64M")
    ts = []
    for _ in range(3):
        qemu_img("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", os.path.join(d, "t.qcow2"), "64M")
        t0 = time.perf_counter()
        qemu_img("commit", "-q", "-t", "writeback", "-d", "-b", "b.qcow2", os.path.join(d, "t.qcow2"))
        ts.append(time.perf_counter() - t0)
    shutil.rmtree(d)
    return med(ts)


# ----------------------------------------------------------------------------- report
def verdict(ok):
    return "✅" if ok else "❌"


def report(cmd, when, a_rows, ckpt, com, qcost, args, elapsed):
    L = []
    L.append("## Block replication (issue 4)\n")
    L.append(f"Command: `{cmd}`  ")
    L.append(f"Date: {when}  ")
    L.append(f"Machine: {bc.cpu_info()}, Python {platform.python_version()}, "
             f"{subprocess.run(bc.qemu_img() + ['--version'], capture_output=True, text=True).stdout.splitlines()[0]}; "
             f"images on {SHM} (tmpfs); whole run {elapsed:.0f} s\n")
    L.append("| measurement | pyrep | reference | ratio / value | target |")
    L.append("|---|---:|---:|---:|---|")
    head = next(r for r in a_rows if r["bs"] == 4 * K and r["kind"] == "mix" and r["target"] == "p_rep")
    for bs in (4 * K, 64 * K):
        for kind in ("fresh", "mix", "copied"):
            r = next(x for x in a_rows if x["bs"] == bs and x["kind"] == kind and x["target"] == "p_rep")
            tag = " **(headline)**" if r is head else ""
            tgt = f"≥ 0.5× {verdict(r['ratio'] >= 0.5)}"
            L.append(f"| (a) {bs // K} KiB random writes, {kind} ({r['first_writes']:.1f} KiB copied per write), "
                     f"forwarded by the primary's replication node into the secondary disk, backup running{tag} | "
                     f"{r['repl_iops']:,.0f} IOPS ({r['repl_iops'] * bs / M:,.1f} MiB/s) | "
                     f"{r['base_iops']:,.0f} IOPS ({r['base_iops'] * bs / M:,.1f} MiB/s) the same writes into the "
                     f"secondary disk, replication off | {r['ratio']:.2f}× | {tgt} |")
    for m in ("memory", "qcow2"):
        c = ckpt[m]
        L.append(f"| (b) checkpoint, {m} overlays, {c['active'] / M:.0f} MiB active + {c['hidden'] / M:.0f} MiB "
                 f"hidden dirty | {c['ms']:.2f} ms | {c['empty_ms']:.2f} ms (empty overlays) | {c['ms']:.2f} ms | "
                 f"< 50 ms {verdict(c['ms'] < 50)} |")
    L.append(f"| (c) failover commit, {com['bytes'] / M:.0f} MiB above the base (qcow2 active+hidden → qcow2) | "
             f"{com['pyrep_s'] * 1e3:.0f} ms ({com['pyrep_mib_s']:,.0f} MiB/s) | {com['qemu_s'] * 1e3:.0f} ms "
             f"({com['qemu_mib_s']:,.0f} MiB/s) `qemu-img commit -t writeback -d -b sd.qcow2 active.qcow2` | "
             f"{com['ratio']:.2f}× | ≥ 1.0× {verdict(com['ratio'] >= 1.0)} |")
    L.append("")
    L.append("Details (all writes use the same offsets and buffers for both sides; medians of "
             f"{args.reps} passes):\n")
    L.append("| (a) case | writes | via replication(primary) node: off / backup running, IOPS | ratio | "
             "secondary-disk backend: off / backup running, IOPS | ratio | "
             "primary quorum: no backup / backup running, IOPS | ratio |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for bs in (4 * K, 64 * K):
        for kind in ("fresh", "mix", "copied"):
            cells = []
            for target in ("p_rep", "colo", "quorum"):
                x = next(y for y in a_rows if y["bs"] == bs and y["kind"] == kind and y["target"] == target)
                cells.append(f"{x['base_iops']:,.0f} / {x['repl_iops']:,.0f} | {x['ratio']:.2f}×")
            L.append(f"| {bs // K} KiB {kind} | {x['n']} | " + " | ".join(cells) + " |")
    L.append("")
    L.append(f"(c) pyrep's figure is the wall time of `stop_all(failover=True, wait=True)` (the commit job itself: "
             f"{com['job_s'] * 1e3:.0f} ms); qemu-img's is the wall time of the command, including process start "
             f"and image opening (≈ {qcost * 1e3:.0f} ms for an empty overlay on this machine). Both committed "
             f"disks compare equal (`qemu-img compare`).")
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", default="256M", help="(a) secondary disk size")
    ap.add_argument("--dirty", default="1G", help="(b) dirty bytes in active+hidden")
    ap.add_argument("--commit-dirty", default="256M", help="(c) disk size; all of it ends up allocated above the base")
    ap.add_argument("--md", default=None, help="also write the markdown table to this file "
                                               "(bench/RESULTS.md holds the recorded results)")
    ap.add_argument("--profile", action="store_true", help="cProfile (a) 4K fresh via quorum and (c); print hot spots")
    ap.add_argument("--only", default="abc", help="which parts to run (subset of 'abc')")
    ap.add_argument("--mem-cluster", default="4K", help="cluster size of memory active/hidden disks")
    args = ap.parse_args()
    globals()["MEM_CLUSTER"] = args.mem_cluster
    size, dirty, cdirty = (parse_size(args.size, "--size"), parse_size(args.dirty, "--dirty"),
                           parse_size(args.commit_dirty, "--commit-dirty"))
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    tmp = tempfile.mkdtemp(prefix="pyrep-bench-repl-", dir=SHM)
    t_start = time.perf_counter()
    data = Data()
    profs = {k: (cProfile.Profile() if args.profile else None) for k in "ac"}
    a_rows = ckpt = com = None
    qcost = 0.0
    try:
        print(f"bench_replication: images in {tmp}")
        if "a" in args.only:
            a_rows = bench_throughput(tmp, size, args.reps, data, print, profs["a"])
        if "b" in args.only:
            ckpt = bench_checkpoint(tmp, dirty, data, print)
        if "c" in args.only:
            com = bench_commit(tmp, cdirty, args.reps, data, print, profs["c"])
            qcost = qemu_commit_start_cost(tmp)
    finally:
        pyrep.close_all()
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - t_start
    for k, p in profs.items():
        if p is not None and k in args.only:  # a profile that never ran has no stats
            s = io.StringIO()
            pstats.Stats(p, stream=s).sort_stats("tottime").print_stats(25)
            print(f"---- profile ({k}) by tottime ----\n{s.getvalue()}")
    if a_rows and ckpt and com:
        md = report(cmd, when, a_rows, ckpt, com, qcost, args, elapsed)
        print()
        print(md)
        if args.md:
            with open(args.md, "w") as f:
                f.write(md)
            print(f"written to {args.md}")


if __name__ == "__main__":
    main()
