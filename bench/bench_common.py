"""Shared helpers of the pyrep-vs-qemu-img benchmarks (bench_raw.py, bench_qcow2.py).

Every point runs ``pyrep-img bench`` and ``qemu-img bench`` with identical
arguments, alternating the two tools ``reps`` times so background noise hits
both alike; the per-tool figure is the MEDIAN of the runs (the best run is
shown too). Both tools time only the request loop ("Run completed in X
seconds."), not process start-up or image opening.
"""
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

_RUN_RE = re.compile(r"Run completed in ([0-9.]+) seconds")
SHM = "/dev/shm"


def pyrep_img():
    """The interpreter running this script, ``-m pyrep.tools.img`` (what the ``pyrep-img`` entry point
    runs), so a pyenv shim's extra ~0.1 s of bash start-up does not count against wall-clock points."""
    return [sys.executable, "-m", "pyrep.tools.img"]


def installed_pyrep_img(workdir):
    """``pyrep-img`` as ``pip install .`` installs it: a wheel of this checkout, installed in a new venv
    under ``workdir``. For wall-clock points, where process start-up counts: the checkout's editable
    install loads setuptools' import finder at every interpreter start (pathlib and friends, ~13 ms), and
    this environment adds a certificate hook of its own (~11 ms); an installed pyrep-img pays neither.
    Returns the command (the venv's console script)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    venv, wheels = os.path.join(workdir, "venv"), os.path.join(workdir, "wheel")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels,
                        root], capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"building a wheel of {root} failed (this venv needs: pip install wheel cython):\n"
                 f"{p.stdout[-2000:]}{p.stderr[-2000:]}")
    whl = [os.path.join(wheels, f) for f in os.listdir(wheels) if f.endswith(".whl")]
    # --no-deps: blosc (memory-node compression) is imported only when a node compresses
    subprocess.run([sys.executable, "-m", "pip", "--python", os.path.join(venv, "bin", "python"), "install", "-q",
                    "--no-deps", *whl], check=True, capture_output=True)
    return [os.path.join(venv, "bin", "pyrep-img")]


def qemu_img():
    exe = shutil.which("qemu-img")
    if not exe:
        sys.exit("qemu-img not found (apt-get install qemu-utils)")
    return [exe]


def run_bench(tool, args, image):
    """Run one ``<tool> bench`` and return the seconds it reports."""
    cmd = tool + ["bench"] + list(args) + [image]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    m = _RUN_RE.search(p.stdout)
    if not m:
        raise RuntimeError(f"{' '.join(cmd)}: no 'Run completed' line in {p.stdout!r}")
    return float(m.group(1))


def qemu_args(args, cache="writeback"):
    """qemu-img needs -t for the cache mode; pyrep-img accepts the same flag."""
    return ["-t", cache] + list(args)


class Point:
    def __init__(self, name, args, count, size, extra_pyrep=(), extra_qemu=()):
        self.name, self.args, self.count, self.size = name, list(args), count, size
        self.extra_pyrep, self.extra_qemu = list(extra_pyrep), list(extra_qemu)
        self.q, self.p = [], []

    def measure(self, image_q, image_p=None, reps=5, cache="writeback"):
        image_p = image_p or image_q
        base = ["-c", str(self.count)] + self.args
        for _ in range(reps):
            self.q.append(run_bench(qemu_img(), qemu_args(base + self.extra_qemu, cache), image_q))
            self.p.append(run_bench(pyrep_img(), qemu_args(base + self.extra_pyrep, cache), image_p))
        return self

    # figures
    def per_s(self, secs):
        return self.count / secs

    def row(self):
        qm, pm = statistics.median(self.q), statistics.median(self.p)
        qb, pb = min(self.q), min(self.p)
        iops_q, iops_p = self.count / qm, self.count / pm
        mib_q = iops_q * self.size / (1 << 20)
        mib_p = iops_p * self.size / (1 << 20)
        return {"name": self.name, "qemu_iops": iops_q, "pyrep_iops": iops_p, "qemu_mib": mib_q,
                "pyrep_mib": mib_p, "ratio": qm / pm, "ratio_best": qb / pb,
                "qemu_us": qm / self.count * 1e6, "pyrep_us": pm / self.count * 1e6}


def table(rows, targets=None):
    out = ["| point | qemu-img IOPS | pyrep IOPS | qemu-img MiB/s | pyrep MiB/s | qemu µs/req | pyrep µs/req "
           "| ratio pyrep/qemu (median) | ratio (best runs) | target |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        t = (targets or {}).get(r["name"])
        verdict = ""
        if t is not None:
            verdict = f"≥ {t}× {'✅' if r['ratio'] >= t else '❌'}"
        out.append(f"| {r['name']} | {r['qemu_iops']:,.0f} | {r['pyrep_iops']:,.0f} | {r['qemu_mib']:,.1f} | "
                   f"{r['pyrep_mib']:,.1f} | {r['qemu_us']:.2f} | {r['pyrep_us']:.2f} | {r['ratio']:.2f}× | "
                   f"{r['ratio_best']:.2f}× | {verdict} |")
    return "\n".join(out)


def fill_image(path, size, fmt="raw", pattern=0x5a):
    """Create ``path`` and write every byte (so reads hit real pages, not holes)."""
    if os.path.exists(path):
        os.unlink(path)
    subprocess.run(qemu_img() + ["create", "-q", "-f", fmt, path, str(size)], check=True)
    subprocess.run(["qemu-io", "-f", fmt, "-c", f"write -P {pattern:#x} 0 {size}", path], check=True,
                   capture_output=True)


def timeit_loop(fn, offsets, reps=5):
    """Median seconds per call of ``fn(off)`` over ``offsets`` (``reps`` passes)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for o in offsets:
            fn(o)
        times.append((time.perf_counter() - t0) / len(offsets))
    return statistics.median(times), min(times)


def cpu_info():
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception:  # noqa: BLE001
        model = "?"
    return f"{model}, {os.cpu_count()} CPUs"
