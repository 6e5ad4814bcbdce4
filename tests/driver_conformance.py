"""The driver conformance suite: every driver joins it in one line.

    class TestRawConformance(Conformance):
        make = staticmethod(lambda tmp_path, size: {"driver": "raw", "file": {...}})

``make(tmp_path, size)`` returns the options of a fresh, zero-filled disk of
``size`` bytes. Class flags describe what the driver is: ``stores_data``
(False for null), ``persistent`` (data survives close and reopen with the
same options), ``zero_init`` (a fresh disk reads as zeroes), ``flush_visible_elsewhere`` (another
process may open the disk meanwhile, read-only).
"""
import asyncio
import errno
import json
import os
import random
import subprocess
import sys

import pytest

import pyrep
from pyrep.constants import BS_ZERO, REQ_FUA

from helpers.threads import run_in_threads

MiB = 1 << 20


def _sharing(opts):
    """``opts`` opened read-only, sharing everything, at every level (qemu-img -U's reader)."""
    if isinstance(opts, dict):
        out = {k: _sharing(v) for k, v in opts.items()}
        if "driver" in out:
            out.update({"read-only": True, "force-share": True})
        return out
    return opts


class Conformance:
    make = None
    size = 8 * MiB
    stores_data = True
    persistent = True
    zero_init = True
    flush_visible_elsewhere = True     # a second process may open the disk while we hold it

    @pytest.fixture
    def blk(self, tmp_path):
        self._opts = self.make(tmp_path, self.size)
        b = pyrep.open_backend(self._opts)
        yield b
        b.close()

    def _reopen(self, blk):
        blk.close()
        return pyrep.open_backend(self._opts)

    def test_length(self, blk):
        assert blk.length == self.size

    def test_fresh_disk_reads_zeroes(self, blk):
        if not self.zero_init:
            pytest.skip("driver does not zero-initialise")
        assert blk.pread(0, 65536) == bytes(65536)
        assert blk.pread(self.size - 4096, 4096) == bytes(4096)

    def test_write_read_unaligned_and_cross_cluster(self, blk):
        if not self.stores_data:
            pytest.skip("driver stores nothing")
        rng = random.Random(1)
        model = bytearray(self.size)
        for off, ln in [(0, 512), (1, 1), (511, 3), (4095, 2), (65535, 70000), (self.size - 7, 7),
                        (3 * MiB - 100, 200000), (12345, 4096)]:
            data = rng.randbytes(ln)
            blk.pwrite(off, data)
            model[off:off + ln] = data
        for off, ln in [(0, 4096), (65000, 200000), (3 * MiB - 200, 300000), (self.size - 4096, 4096)]:
            assert blk.pread(off, ln) == bytes(model[off:off + ln]), (off, ln)

    def test_write_zeroes(self, blk):
        if not self.stores_data:
            pytest.skip("driver stores nothing")
        blk.pwrite(0, b"\xaa" * (256 * 1024))
        blk.pwrite_zeroes(1000, 100000)
        blk.pwrite_zeroes(131072, 65536, may_unmap=True)
        data = blk.pread(0, 256 * 1024)
        assert data[:1000] == b"\xaa" * 1000
        assert data[1000:101000] == bytes(100000)
        assert data[101000:131072] == b"\xaa" * (131072 - 101000)
        assert data[131072:196608] == bytes(65536)
        assert data[196608:] == b"\xaa" * (256 * 1024 - 196608)

    def test_discard_keeps_length_and_other_data(self, blk):
        blk.pwrite(0, b"\x11" * 4096)
        blk.pdiscard(65536, 131072)
        assert blk.length == self.size
        if self.stores_data:
            assert blk.pread(0, 4096) == b"\x11" * 4096

    def test_out_of_range_is_einval(self, blk):
        for call in (lambda: blk.pread(self.size - 1, 2), lambda: blk.pwrite(self.size, b"x"),
                     lambda: blk.pread(-1, 1), lambda: blk.pwrite_zeroes(self.size - 1, 2)):
            with pytest.raises(pyrep.BlockError) as e:
                call()
            assert e.value.errno == errno.EINVAL

    def test_batched_writes_land_and_a_bad_one_fails_alone(self, blk):
        # BlockBackend.pwritev_batch: the driver's own batch if it has one (nbd), else one by one
        rng = random.Random(7)
        iov = pyrep.IOVector()
        parts = [rng.randbytes(n) for n in (1000, 3096)]
        for p in parts:
            iov.add(p)
        reqs = [(0, rng.randbytes(4096), 0), (8192, rng.randbytes(512), REQ_FUA),
                (self.size, b"x" * 4096, 0),            # beyond the end: fails alone
                (MiB + 1, rng.randbytes(70000), 0), (2 * MiB, iov, 0), (self.size - 100, rng.randbytes(100), 0)]
        out = blk.pwritev_batch(reqs)
        assert len(out) == len(reqs)
        assert isinstance(out[2], pyrep.BlockError) and out[2].errno == errno.EINVAL
        assert [e for i, e in enumerate(out) if i != 2] == [None] * (len(reqs) - 1)
        if not self.stores_data:
            return
        for i, (off, data, _) in enumerate(reqs):
            if i != 2:
                want = b"".join(parts) if isinstance(data, pyrep.IOVector) else data
                assert blk.pread(off, len(want)) == want, off

    def test_iovector_scatter_gather(self, blk):
        if not self.stores_data:
            pytest.skip("driver stores nothing")
        parts = [os.urandom(n) for n in (100, 4000, 1, 61435)]
        iov = pyrep.IOVector()
        for p in parts:
            iov.add(p)
        blk.pwritev(8192, iov)
        bufs = [bytearray(n) for n in (5000, 5000, 55536)]
        out = pyrep.IOVector()
        for b in bufs:
            out.add(b)
        blk.preadv(8192, out)
        assert b"".join(bufs) == b"".join(parts)

    def test_block_status_covers_disk_and_zero_ranges_read_zero(self, blk):
        if self.stores_data:
            blk.pwrite(MiB, os.urandom(65536))
        pos = 0
        while pos < self.size:
            st = blk.block_status(pos, self.size - pos)
            assert st.length > 0
            if st.flags & BS_ZERO and self.stores_data:
                n = min(st.length, 65536)
                assert blk.pread(pos, n) == bytes(n)
            pos += st.length
        assert pos == self.size

    def test_concurrent_writers_lose_nothing(self, blk):
        if not self.stores_data:
            pytest.skip("driver stores nothing")
        # 8 threads write interleaved 512-byte pieces of the same clusters
        n_threads, piece = 8, 512
        span = n_threads * piece * 64

        def worker(t):
            for i in range(64):
                off = (i * n_threads + t) * piece
                blk.pwrite(off, bytes([t + 1]) * piece)
        run_in_threads(worker, [(t,) for t in range(n_threads)])
        data = blk.pread(0, span)
        for i in range(64 * n_threads):
            assert data[i * piece:(i + 1) * piece] == bytes([i % n_threads + 1]) * piece, i

    def test_async_twins(self, blk):
        async def go():
            await blk.co_pwrite(4096, b"async!")
            return await blk.co_pread(4096, 6)
        data = asyncio.run(go())
        assert data == (b"async!" if self.stores_data else bytes(6))

    def test_flush_leaves_the_data_for_a_reader_in_another_process(self, blk):
        """A flush writes back whatever the driver caches (qcow2's tables, ...): a reader in another
        process, opening the same options while this backend stays open, reads what was written.
        A driver whose data does not outlive the process must still flush and keep it (null: zeroes)."""
        payload = os.urandom(70000)
        blk.pwrite(12345, payload)
        blk.flush()
        if not self.stores_data:
            assert blk.pread(12345, len(payload)) == bytes(len(payload))
            return
        assert blk.pread(12345, len(payload)) == payload
        if not (self.persistent and self.flush_visible_elsewhere):
            return
        script = ("import json, sys, pyrep\n"
                  "with pyrep.open_backend(json.loads(sys.argv[1]), read_only=True, shared='all') as b:\n"
                  "    sys.stdout.write(b.pread(12345, 70000).hex())\n")
        p = subprocess.run([sys.executable, "-c", script, json.dumps(_sharing(self._opts))], capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert bytes.fromhex(p.stdout) == payload, "another process does not see the flushed data"

    def test_persistence_across_reopen(self, blk):
        if not (self.stores_data and self.persistent):
            pytest.skip("not persistent")
        payload = os.urandom(100000)
        blk.pwrite(777, payload)
        blk.flush()
        blk2 = self._reopen(blk)
        try:
            assert blk2.pread(777, len(payload)) == payload
        finally:
            blk2.close()

    def test_read_only_refuses_writes(self, tmp_path):
        opts = self.make(tmp_path, self.size)
        with pyrep.open_backend(opts, read_only=True) as b:
            with pytest.raises(pyrep.BlockError) as e:
                b.pwrite(0, b"x")
            assert e.value.errno == errno.EPERM
            b.pread(0, 512)
