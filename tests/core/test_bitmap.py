"""Bitmap against a plain-Python model, plus edge cases and large-size speed."""
import random

import pytest

from pyrep._core.bitmap import Bitmap


class Model:
    """One byte (0/1) per granule; byte semantics written the obvious way."""

    def __init__(self, length, gran):
        self.length = length
        self.gran = gran
        self.bits = bytearray(-(-length // gran))

    def _span(self, offset, length):
        end = min(offset + length, self.length)
        if length == 0 or offset >= end:
            return slice(0, 0)
        return slice(offset // self.gran, (end - 1) // self.gran + 1)

    def set(self, offset, length):
        sl = self._span(offset, length)
        self.bits[sl] = b"\x01" * len(self.bits[sl])

    def reset(self, offset, length):
        sl = self._span(offset, length)
        self.bits[sl] = bytes(len(self.bits[sl]))

    def merge(self, other):
        self.bits = bytearray(a | b for a, b in zip(self.bits, other.bits))

    def get(self, offset):
        return bool(self.bits[offset // self.gran])

    def _next(self, offset, want):
        if offset >= self.length:
            return -1
        g = self.bits.find(want, offset // self.gran)
        return -1 if g < 0 else max(g * self.gran, offset)

    def next_set(self, offset):
        return self._next(offset, 1)

    def next_clear(self, offset):
        return self._next(offset, 0)

    def count(self):
        n = self.bits.count(1) * self.gran
        if self.bits and self.bits[-1]:
            n -= len(self.bits) * self.gran - self.length
        return n

    def extents(self, offset=0, length=None):
        end = self.length if length is None else min(offset + length, self.length)
        out = []
        pos = offset
        while pos < end:
            s = self._next(pos, 1)
            if s < 0 or s >= end:
                break
            e = self._next(s, 0)
            e = end if e < 0 or e > end else e
            out.append((s, e - s))
            pos = e
        return out

    def slow_extents(self):
        # Independent of _next: walk every granule.
        out = []
        for g, b in enumerate(self.bits):
            if not b:
                continue
            s, e = g * self.gran, min((g + 1) * self.gran, self.length)
            if out and out[-1][0] + out[-1][1] == s:
                out[-1] = (out[-1][0], e - out[-1][0])
            else:
                out.append((s, e - s))
        return out

    def resize(self, length):
        n = -(-length // self.gran)
        self.bits = (self.bits + bytearray(n))[:n]
        self.length = length


def check_same(bm, m, rng, probes=50):
    assert bm.length == m.length
    assert bm.count() == m.count()
    assert bm.is_empty() == (not any(m.bits))
    assert list(bm.extents()) == m.extents()
    for _ in range(probes):
        if m.length == 0:
            break
        off = rng.randrange(m.length)
        assert bm.get(off) == m.get(off), off
        assert bm.next_set(off) == m.next_set(off), off
        assert bm.next_clear(off) == m.next_clear(off), off
        ln = rng.randrange(m.length - off + 3)
        assert list(bm.extents(off, ln)) == m.extents(off, ln), (off, ln)


def rand_range(rng, length):
    # Mix small, word-sized and huge ranges, sometimes past the end.
    off = rng.randrange(length + 1)
    kind = rng.random()
    if kind < 0.4:
        ln = rng.randrange(1, 200)
    elif kind < 0.8:
        ln = rng.randrange(length + 10)
    else:
        ln = rng.randrange(length * 2 + 1)
    return off, ln


@pytest.mark.parametrize("seed,length,gran", [
    (1, 1, 1),
    (2, 63, 1),
    (3, 64, 1),
    (4, 65, 1),
    (5, 4096 * 3 + 17, 1),       # several summary levels (depth 3)
    (6, 300000, 1),              # depth 4
    (7, 100000, 4),
    (8, 512 * 5000 + 100, 512),  # partial last granule
    (9, 1 << 20, 1 << 20),       # a single granule
    (10, 3 * 65536 - 1, 65536),
])
def test_random_ops_match_model(seed, length, gran):
    rng = random.Random(seed)
    bm = Bitmap(length, gran)
    m = Model(length, gran)
    check_same(bm, m, rng)
    for step in range(600):
        op = rng.random()
        if op < 0.45:
            off, ln = rand_range(rng, length)
            bm.set(off, ln)
            m.set(off, ln)
        elif op < 0.9:
            off, ln = rand_range(rng, length)
            bm.reset(off, ln)
            m.reset(off, ln)
        elif op < 0.93:
            bm.set_all()
            m.set(0, length)
        elif op < 0.95:
            bm.reset_all()
            m.reset(0, length)
        elif op < 0.98:
            other = Bitmap(length, gran)
            om = Model(length, gran)
            for _ in range(5):
                off, ln = rand_range(rng, length)
                other.set(off, ln)
                om.set(off, ln)
            bm.merge(other)
            m.merge(om)
            assert other.count() == om.count()
        else:
            c = bm.copy()
            assert list(c.extents()) == m.extents()
            c.set_all()    # the copy is independent
            c.reset(0, length)
            assert c.is_empty()
        if step % 20 == 0:
            check_same(bm, m, rng)
    check_same(bm, m, rng, probes=200)
    assert list(bm.extents()) == m.slow_extents()


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_resize_matches_model(seed):
    rng = random.Random(seed)
    gran = rng.choice([1, 8, 512])
    length = rng.randrange(1, 20000)
    bm = Bitmap(length, gran)
    m = Model(length, gran)
    for _ in range(60):
        for _ in range(5):
            off, ln = rand_range(rng, length)
            if rng.random() < 0.6:
                bm.set(off, ln)
                m.set(off, ln)
            else:
                bm.reset(off, ln)
                m.reset(off, ln)
        length = rng.randrange(0, 30000)
        bm.resize(length)
        m.resize(length)
        check_same(bm, m, rng)
        # Fresh granules past the old end must really be clean and settable.
        if length:
            bm.set(length - 1, 1)
            m.set(length - 1, 1)
            check_same(bm, m, rng, probes=5)


def test_count_clamps_last_granule():
    bm = Bitmap(1000, 512)       # granules [0,512) and [512,1000)
    bm.set(999, 1)
    assert bm.count() == 488
    assert list(bm.extents()) == [(512, 488)]
    bm.set(0, 1)
    assert bm.count() == 1000
    assert list(bm.extents()) == [(0, 1000)]


def test_touching_granules_and_clamped_next():
    bm = Bitmap(4096, 1024)
    bm.set(1023, 2)              # touches granules 0 and 1
    assert bm.get(0) and bm.get(2047) and not bm.get(2048)
    assert bm.next_set(100) == 100           # clamped to offset
    assert bm.next_clear(100) == 2048
    assert bm.next_set(2048) == -1
    assert bm.next_clear(3000) == 3000
    bm.reset(2047, 1)            # clears all of granule 1
    assert list(bm.extents()) == [(0, 1024)]
    assert list(bm.extents(10, 100)) == [(10, 100)]
    assert list(bm.extents(1000, 10000)) == [(1000, 24)]


def test_range_rules():
    bm = Bitmap(100, 4)
    with pytest.raises(ValueError):
        bm.set(101, 1)
    with pytest.raises(ValueError):
        bm.reset(-1, 1)
    with pytest.raises(ValueError):
        bm.set(0, -1)
    with pytest.raises(ValueError):
        bm.get(100)
    with pytest.raises(ValueError):
        bm.get(-1)
    with pytest.raises(ValueError):
        list(bm.extents(101))
    with pytest.raises(ValueError):
        bm.next_set(-5)
    bm.set(100, 10)              # start at the end: empty range
    assert bm.is_empty()
    bm.set(96, 1 << 70)          # huge length is clamped
    assert bm.count() == 4
    assert bm.next_set(100) == -1 and bm.next_clear(1 << 40) == -1
    assert list(bm.extents(100)) == []


@pytest.mark.parametrize("gran", [0, 3, 6, -2, 1000])
def test_bad_granularity(gran):
    with pytest.raises(ValueError):
        Bitmap(4096, gran)


def test_bad_length():
    with pytest.raises(ValueError):
        Bitmap(-1, 1)


def test_merge_checks_shape():
    with pytest.raises(ValueError):
        Bitmap(100, 4).merge(Bitmap(100, 8))
    with pytest.raises(ValueError):
        Bitmap(100, 4).merge(Bitmap(104, 4))
    a = Bitmap(100, 4)
    a.set(8, 4)
    a.merge(a)
    assert list(a.extents()) == [(8, 4)]


def test_properties_and_empty_bitmap():
    bm = Bitmap(0, 65536)
    assert bm.length == 0 and bm.granularity == 65536
    assert bm.is_empty() and bm.count() == 0
    bm.set_all()
    assert bm.is_empty()
    assert bm.next_set(0) == -1 and bm.next_clear(0) == -1
    assert list(bm.extents()) == []
    bm.resize(65536 * 2)
    assert bm.next_clear(0) == 0
    bm.set_all()
    assert bm.count() == 65536 * 2 and bm.next_clear(0) == -1


def test_large_bitmap():
    """A 4 TiB disk at 64 KiB granules: searches, counts and extents (how fast they are is measured by
    bench/bench_bitmap.py)."""
    tib4 = 4 << 40
    bm = Bitmap(tib4, 65536)
    assert bm.is_empty()
    assert bm.next_set(0) == -1
    assert bm.next_clear(0) == 0
    bm.set(tib4 - 1, 1)
    bm.set(12345 * 65536, 3)
    assert bm.next_set(0) == 12345 * 65536
    assert bm.next_set(12346 * 65536) == tib4 - 65536
    assert bm.count() == 2 * 65536
    assert list(bm.extents()) == [(12345 * 65536, 65536), (tib4 - 65536, 65536)]
    bm.set_all()
    assert bm.next_clear(0) == -1
    bm.reset(2 << 40, 1)
    assert bm.next_clear(0) == 2 << 40
    assert bm.count() == tib4 - 65536
    for i in range(0, 10000, 97):
        assert bm.next_clear(i * 65536) == 2 << 40
    bm.reset_all()
    for i in range(0, 10000, 97):
        assert bm.next_set(i * 1000003) == -1


def test_big_range_set_then_sparse_reset():
    # 1 TiB at 512 B: 2**31 bits would be too big for the test box; use
    # 64 GiB at 4 KiB (16 Mi bits, depth 5).
    length = 64 << 30
    bm = Bitmap(length, 4096)
    bm.set(4096, length)
    assert bm.count() == length - 4096
    assert bm.next_clear(0) == 0 and bm.next_clear(1) == 1 and bm.next_clear(4096) == -1
    bm.reset(length // 2, 4096)
    assert bm.next_clear(4096) == length // 2
    assert list(bm.extents(length // 2 - 4096, 3 * 4096)) == [
        (length // 2 - 4096, 4096), (length // 2 + 4096, 4096)]
