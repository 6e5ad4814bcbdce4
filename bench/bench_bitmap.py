"""Dirty-bitmap searches on a 4 TiB disk at 64 KiB granules (the copy bitmap of a large backup).

The tests check what the searches return; this measures that they do not scan the 8 MiB of words
each time (the summary levels skip empty and full runs): 10 000 next_clear and 10 000 next_set calls
over a nearly full and an empty bitmap. Run: python bench/bench_bitmap.py
"""
import time

from pyrep._core.bitmap import Bitmap


def main():
    tib4 = 4 << 40
    t0 = time.perf_counter()
    bm = Bitmap(tib4, 65536)
    bm.set_all()
    bm.reset(2 << 40, 1)
    t1 = time.perf_counter()
    for i in range(10000):
        assert bm.next_clear(i * 65536) == 2 << 40
    t2 = time.perf_counter()
    bm.reset_all()
    for i in range(10000):
        assert bm.next_set(i * 1000003) == -1
    t3 = time.perf_counter()
    print(f"bitmap 4 TiB/64 KiB: build+set_all {1e3 * (t1 - t0):.1f} ms, "
          f"10k next_clear {1e3 * (t2 - t1):.1f} ms, 10k next_set {1e3 * (t3 - t2):.1f} ms")


if __name__ == "__main__":
    main()
