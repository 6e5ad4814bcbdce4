"""The nbd client driver: ``pyrep-img convert`` vs ``qemu-img convert`` from the same qemu-nbd export.

A raw image in tmpfs (data with some holes) is served by ``qemu-nbd -t -e 8 -f raw`` on a Unix socket;
both tools copy the export to a raw file in tmpfs, alternating ``--reps`` times so background noise hits
both alike, with their default settings (``-f raw -O raw``, no other option). The time per tool is the
wall clock of the whole command (start-up included: the installed ``pyrep-img`` is used, see
``bench_common.installed_pyrep_img``); the figure is the MEDIAN, the ratio is qemu-img's time / pyrep's
(above 1: pyrep is faster). Every copy is compared with the source once.

    python bench/bench_nbd_client.py [--size 2G] [--reps 5] [--hole-every 8]
"""
import argparse
import filecmp
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import SHM, installed_pyrep_img, qemu_img  # noqa: E402

MiB = 1 << 20


def _size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def make_image(path, size, hole_every):
    """Data everywhere but one MiB in every ``hole_every`` (left as a hole), distinct per MiB."""
    block = bytearray(os.urandom(MiB))
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(size // MiB):
            if hole_every and i % hole_every == hole_every - 1:
                continue
            block[:8] = i.to_bytes(8, "little")
            f.seek(i * MiB)
            f.write(block)


def serve(image, sock, pidfile):
    subprocess.run(["qemu-nbd", "--fork", "--pid-file", pidfile, "-t", "-e", "8", "-f", "raw", "-k", sock,
                    "-x", "disk", image], check=True)
    with open(pidfile) as f:
        return int(f.read())


def timed(cmd):
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2G")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--hole-every", type=int, default=8, help="one MiB in N is a hole (0: none)")
    a = ap.parse_args()
    for tool in ("qemu-nbd", "qemu-img"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found (apt-get install qemu-utils)")
    size = _size(a.size)
    work = tempfile.mkdtemp(prefix="bench-nbd-client-", dir=SHM)
    pid = None
    try:
        pyrep = installed_pyrep_img(tempfile.mkdtemp(prefix="bench-nbd-venv-"))
        src, out = os.path.join(work, "src.raw"), os.path.join(work, "out.raw")
        sock, pidfile = os.path.join(work, "nbd.sock"), os.path.join(work, "nbd.pid")
        make_image(src, size, a.hole_every)
        pid = serve(src, sock, pidfile)
        uri = f"nbd+unix:///disk?socket={sock}"
        cmds = {"qemu-img": qemu_img() + ["convert", "-f", "raw", "-O", "raw", uri, out],
                "pyrep-img": pyrep + ["convert", "-f", "raw", "-O", "raw", uri, out]}
        times = {k: [] for k in cmds}
        for rep in range(a.reps):
            for name, cmd in cmds.items():
                if os.path.exists(out):
                    os.unlink(out)
                times[name].append(timed(cmd))
                if rep == 0 and not filecmp.cmp(src, out, shallow=False):
                    raise RuntimeError(f"{name} made a copy that differs from the source")
        q, p = statistics.median(times["qemu-img"]), statistics.median(times["pyrep-img"])
        gib = size / (1 << 30)
        print(f"convert {a.size} raw from a qemu-nbd export (hole every {a.hole_every} MiB), {a.reps} reps, "
              f"medians")
        print("| tool | seconds (median) | best | GiB/s (median) |")
        print("|---|---:|---:|---:|")
        for name, m in (("qemu-img", q), ("pyrep-img", p)):
            print(f"| {name} | {m:.3f} | {min(times[name]):.3f} | {gib / m:.2f} |")
        print(f"ratio qemu-img time / pyrep-img time: {q / p:.2f}× (best runs {min(times['qemu-img']) / min(times['pyrep-img']):.2f}×)"
              f"  goal ≥ 1.0× {'✅' if q / p >= 1.0 else '❌'}")
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
