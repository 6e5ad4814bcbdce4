"""pyrep-nbd vs qemu-nbd, judged by fio's nbd engine (issue 12's performance table).

The same raw image in tmpfs is served alternately by ``pyrep-nbd`` and ``qemu-nbd`` (both
``-t -e 8 -f raw``, a Unix socket, writable), and fio (``--ioengine=nbd``, one job, one connection)
runs each point against each server ``--reps`` times, alternating, so background noise hits both
alike. The figure per server is the MEDIAN; the ratio is pyrep / qemu. Points: 4 KiB random read and
write at QD1 and QD16, 1 MiB sequential read and write at QD8.

Each point also reports the server process's CPU time per request (user + system, from
``/proc/PID/stat``): on a shared, busy machine throughput mostly measures the scheduler, while the CPU
a server spends per request is what it would cost on an idle one.

    python bench/bench_nbd.py [--size 1G] [--runtime 5] [--reps 3] [--points all|4k|1m]
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

SHM = "/dev/shm"
POINTS = [  # name, fio rw, block size, iodepth, unit, goal (issue 12)
    ("4K randread QD1", "randread", "4k", 1, "IOPS", 2.0),
    ("4K randwrite QD1", "randwrite", "4k", 1, "IOPS", 2.0),
    ("4K randread QD16", "randread", "4k", 16, "IOPS", 3.5),
    ("4K randwrite QD16", "randwrite", "4k", 16, "IOPS", 3.0),
    ("1M seq read QD8", "read", "1M", 8, "GiB/s", 1.2),
    ("1M seq write QD8", "write", "1M", 8, "GiB/s", 1.5),
]


def _wait_socket(path, proc, deadline=30.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early ({proc.returncode}): {proc.stderr.read()}")
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
                s.close()
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.02)
    raise RuntimeError(f"no server on {path} after {deadline} s")


def start_server(kind, image, sock):
    if kind == "pyrep":
        cmd = [sys.executable, "-m", "pyrep.tools.nbd"]
    else:
        cmd = [shutil.which("qemu-nbd")]
    cmd += ["-t", "-e", "8", "-f", "raw", "-k", sock, image]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_socket(sock, p)
    return p


def stop_server(p):
    p.terminate()
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def cpu_seconds(pid):
    """User + system CPU seconds the process ``pid`` (all its threads) has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_fio(sock, rw, bs, qd, runtime, size, out):
    cmd = ["fio", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={qd}", f"--runtime={runtime}", "--time_based", "--name=nbd", f"--size={size}",
           "--output-format=json", f"--output={out}"]
    subprocess.run(cmd, check=True, capture_output=True)
    with open(out) as f:
        job = json.load(f)["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return side["iops"], side["bw_bytes"] / (1 << 30), side["total_ios"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--points", default="all", choices=("all", "4k", "1m"))
    a = ap.parse_args(argv)
    for tool in ("fio", "qemu-nbd"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found")
    points = [p for p in POINTS if a.points == "all" or p[2].lower().startswith(a.points[0])]
    work = tempfile.mkdtemp(prefix="bench-nbd-", dir=SHM)
    image = os.path.join(work, "disk.raw")
    subprocess.run(["dd", "if=/dev/urandom", f"of={image}", "bs=1M",
                    f"count={int(a.size[:-1]) * (1024 if a.size.endswith('G') else 1)}"],
                   check=True, capture_output=True)
    results = {}
    try:
        for rep in range(a.reps):
            for kind in (("pyrep", "qemu") if rep % 2 == 0 else ("qemu", "pyrep")):
                sock = os.path.join(work, f"{kind}.sock")
                p = start_server(kind, image, sock)
                try:
                    for name, rw, bs, qd, unit, _ in points:
                        c0 = cpu_seconds(p.pid)
                        iops, gib, n = run_fio(sock, rw, bs, qd, a.runtime, a.size, os.path.join(work, "fio.json"))
                        cpu_us = (cpu_seconds(p.pid) - c0) * 1e6 / max(n, 1)
                        results.setdefault((name, kind), []).append(iops if unit == "IOPS" else gib)
                        results.setdefault((name, kind, "cpu"), []).append(cpu_us)
                finally:
                    stop_server(p)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"fio --ioengine=nbd, {a.size} raw image in tmpfs, both servers -t -e 8 -f raw -k SOCK, "
          f"{a.runtime} s per run, median of {a.reps}")
    print(f"{'point':20} {'pyrep-nbd':>12} {'qemu-nbd':>12} {'ratio':>7} {'goal':>6}       "
          f"{'server CPU µs/request: pyrep':>28} {'qemu':>6}")
    for name, _, _, _, unit, goal in points:
        pv = statistics.median(results[(name, "pyrep")])
        qv = statistics.median(results[(name, "qemu")])
        fmt = (lambda v: f"{v / 1000:.1f}k") if unit == "IOPS" else (lambda v: f"{v:.2f}")
        ratio = pv / qv if qv else float("inf")
        pc = statistics.median(results[(name, "pyrep", "cpu")])
        qc = statistics.median(results[(name, "qemu", "cpu")])
        print(f"{name:20} {fmt(pv):>12} {fmt(qv):>12} {ratio:6.2f}x {goal:5.1f}x {'ok' if ratio >= goal else 'BELOW':5} "
              f"({unit:5}) {pc:22.1f} {qc:6.1f}")


if __name__ == "__main__":
    main()
