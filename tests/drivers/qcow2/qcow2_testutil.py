"""Shared helpers of the qcow2 tests (real qemu-img / qemu-io on tmp_path images)."""
import json
import shutil
import subprocess

import pytest

import pyrep

HAVE_QEMU = shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None
needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-img/qemu-io not installed")


def run(*args, check=True):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def qimg(*args, check=True):
    return run("qemu-img", *args, check=check)


def qio(path, *cmds, fmt="qcow2", check=True):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    p = run(*args, path, check=check)
    if check and ("Pattern verification failed" in p.stdout or "failed" in p.stdout.lower()):
        raise AssertionError(f"qemu-io {cmds} on {path}:\n{p.stdout}\n{p.stderr}")
    return p


def qcheck(path):
    """qemu-img check --output=json; asserts no corruption and no leak."""
    p = qimg("check", "--output=json", path, check=False)
    res = json.loads(p.stdout) if p.stdout.strip() else {}
    assert p.returncode == 0 and not res.get("corruptions") and not res.get("leaks") \
        and not res.get("check-errors"), f"qemu-img check {path}: rc={p.returncode}\n{p.stdout}\n{p.stderr}"
    return res


def qmap(path):
    return json.loads(qimg("map", "--output=json", path).stdout)


def open_q(path, read_only=False, **extra):
    opts = {"driver": "qcow2", "discard": "unmap", "file": {"driver": "file", "filename": str(path)}}
    opts.update(extra)
    return pyrep.open_backend(opts, read_only=read_only)


def random_model_op(blk, model, rng, max_len, p_write, p_zero, discard_granule):
    """One random write (a fill byte), write-zeroes or discard on ``blk``, applied to the bytearray
    ``model`` too: probability ``p_write`` of a write, ``p_zero`` of zeroes, else a discard, which
    only drops whole ``discard_granule`` blocks (they then read as zeroes: no backing)."""
    size = len(model)
    off = rng.randrange(size - 1)
    n = rng.randrange(1, min(max_len, size - off) + 1)
    r = rng.random()
    if r < p_write:
        data = bytes([rng.randrange(1, 256)]) * n
        blk.pwrite(off, data)
        model[off:off + n] = data
    elif r < p_write + p_zero:
        blk.pwrite_zeroes(off, n, may_unmap=rng.random() < 0.5)
        model[off:off + n] = bytes(n)
    else:
        blk.pdiscard(off, n)
        a, b = -(-off // discard_granule) * discard_granule, (off + n) // discard_granule * discard_granule
        if b > a:
            model[a:b] = bytes(b - a)


def write_raw(path, model):
    with open(path, "wb") as f:
        f.write(bytes(model))


def compare_with_model(img, model, tmp_path, name="model.raw"):
    raw = tmp_path / name
    write_raw(raw, model)
    p = qimg("compare", "-f", "qcow2", "-F", "raw", img, raw, check=False)
    assert p.returncode == 0, f"qemu-img compare {img}: {p.stdout}{p.stderr}"
