"""Randomized model test: writes/zeroes/discards/make_empty on a 3-deep chain against bytearrays."""
import os
import random

import pytest

import pyrep

from helpers.qcow2 import open_q
from helpers.referees import compare_with_model, needs_qemu, qcheck, qimg
from helpers.threads import run_in_threads

pytestmark = needs_qemu

SIZE = 4 << 20


class Layer:
    def __init__(self, path, cluster, version, below):
        self.path, self.cluster, self.version, self.below = path, cluster, version, below
        self.own = bytearray(SIZE)
        self.alloc = bytearray(SIZE // cluster)   # 1: this layer provides the cluster

    def visible(self):
        if self.below is None:
            return bytearray(self.own)
        out = self.below.visible()
        cs = self.cluster
        for c, a in enumerate(self.alloc):
            if a:
                out[c * cs:(c + 1) * cs] = self.own[c * cs:(c + 1) * cs]
        return out

    def _materialize(self, off, n):
        cs = self.cluster
        below = self.below.visible() if self.below is not None else None
        for c in range(off // cs, (off + n - 1) // cs + 1):
            if not self.alloc[c]:
                self.alloc[c] = 1
                self.own[c * cs:(c + 1) * cs] = below[c * cs:(c + 1) * cs] if below is not None else bytes(cs)

    def write(self, off, data):
        self._materialize(off, len(data))
        self.own[off:off + len(data)] = data

    def zero(self, off, n):
        self.write(off, bytes(n))

    def discard(self, off, n):
        cs = self.cluster
        a, b = -(-off // cs), (off + n) // cs
        for c in range(a, b):
            if self.below is None or self.version == 3:
                self.alloc[c] = 1 if self.below is not None else 0
                self.own[c * cs:(c + 1) * cs] = bytes(cs)
            else:   # v2 with a backing: the cluster is deallocated, the backing shows through
                self.alloc[c] = 0

    def make_empty(self):
        self.own = bytearray(SIZE)
        self.alloc = bytearray(len(self.alloc))


SEEDS = [int(x) for x in os.environ.get("QCOW2_MODEL_SEEDS", "1234,7,99").split(",")]


@pytest.mark.parametrize("seed", SEEDS)
def test_random_chain(tmp_path, seed):
    rng = random.Random(seed)
    base_p, mid_p, top_p = tmp_path / "base.qcow2", tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", base_p, str(SIZE))
    pyrep.create_image(str(mid_p), "qcow2", SIZE, backing_file="base.qcow2", backing_fmt="qcow2",
                       cluster_size=4096, compat="0.10")
    pyrep.create_image(str(top_p), "qcow2", SIZE, backing_file="mid.qcow2", backing_fmt="qcow2",
                       cluster_size=512)
    base = Layer(base_p, 65536, 3, None)
    mid = Layer(mid_p, 4096, 2, base)
    top = Layer(top_p, 512, 3, mid)
    layers = [base, mid, top]
    for batch in range(10):
        layer = rng.choice([base, mid, top, top, top])
        blk = open_q(layer.path)
        try:
            for _ in range(35):
                r = rng.random()
                off = rng.randrange(0, SIZE - 1)
                n = rng.randrange(1, min(200000, SIZE - off) + 1)
                if r < 0.55:
                    data = bytes([rng.randrange(1, 256)]) * n
                    blk.pwrite(off, data)
                    layer.write(off, data)
                elif r < 0.75:
                    unmap = rng.random() < 0.5
                    blk.pwrite_zeroes(off, n, may_unmap=unmap)
                    layer.zero(off, n)
                elif r < 0.95:
                    blk.pdiscard(off, n)
                    layer.discard(off, n)
                elif layer is not base:
                    blk.node.make_empty()
                    layer.make_empty()
                if rng.random() < 0.2:
                    ro = rng.randrange(0, SIZE - 8192)
                    assert blk.pread(ro, 8192) == bytes(layer.visible()[ro:ro + 8192])
        finally:
            blk.close()
        for ly in layers:
            qcheck(ly.path)
        blk = open_q(top_p, read_only=True)
        try:
            want = top.visible()
            got = blk.pread(0, SIZE)
            assert got == bytes(want), f"batch {batch}: top differs from the model"
            assert blk.node.backing.driver.version == 2
        finally:
            blk.close()
    compare_with_model(top_p, top.visible(), tmp_path)
    compare_with_model(mid_p, mid.visible(), tmp_path, "mid.raw")


@pytest.mark.parametrize("backing", [False, True], ids=["alone", "over-backing"])
@pytest.mark.parametrize("cs", [4096, 65536, 2 << 20])
def test_concurrent_writes_and_zeroes_sharing_clusters(tmp_path, cs, backing):
    """Six threads, each owning every sixth 4 KiB block, write and zero their blocks at random, so
    most requests share clusters with other threads' requests: concurrent allocation of one cluster,
    copy-on-write from the backing, zeroes inside clusters being allocated, the file growing under
    writes in flight (2 MiB clusters). The image must hold exactly the model, and be clean."""
    T, nblocks = 6, (2048 if cs == 2 << 20 else 256)
    size = nblocks * 4096
    img = tmp_path / "a.qcow2"
    model = bytearray(size)
    if backing:
        base = tmp_path / "b.qcow2"
        qimg("create", "-q", "-f", "qcow2", base, size)
        blk = open_q(base)
        blk.pwrite(0, b"\x42" * (size // 2))
        blk.close()
        model[:size // 2] = b"\x42" * (size // 2)
        qimg("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", "-b", "b.qcow2", "-F", "qcow2", img)
    else:
        qimg("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", img, size)
    blk = open_q(img)

    def worker(t):
        rng = random.Random(cs * 10 + t + backing)
        own = range(t, nblocks, T)
        for i in range(600):
            b = rng.choice(own)
            if rng.random() < 0.7:
                data = bytes([rng.randrange(1, 256)]) * 4096
                blk.pwrite(b * 4096, data)
            else:
                data = bytes(4096)
                blk.pwrite_zeroes(b * 4096, 4096, may_unmap=rng.random() < 0.5)
            model[b * 4096:(b + 1) * 4096] = data
            if t == 0 and i % 100 == 99:
                blk.flush()
    try:
        run_in_threads(worker, [(t,) for t in range(T)])
        assert blk.pread(0, size) == model
    finally:
        blk.close()
    qcheck(img)
    compare_with_model(img, model, tmp_path)
