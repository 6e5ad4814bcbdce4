"""qcow2 discards racing writes and resize, on real threads: discards free host clusters that writes
in flight may still be using and that new allocations want; a resize moves the L1 table under them.

Every guest cluster has its own fill byte, so whatever interleaving happens, each byte of a cluster
must read as that byte or as zero (discarded, never written since). A late write into a host cluster
freed and handed out again, an L2 entry lost under a concurrent allocation or L1 move, or a refcount
gone wrong shows up as another cluster's byte, as data where nothing was written, or in qemu-img check.
"""
import random
import time

import pyrep
from pyrep.driver import BlockDriver
from pyrep.options import Opt

from helpers.referees import needs_qemu, qcheck, qimg
from helpers.threads import run_in_threads

pytestmark = needs_qemu

CS = 65536
START = 8 << 20
GROW = 1 << 20
STEPS = 12


def _fill(cidx):
    return cidx % 251 + 1


def _check_cluster(blk, cidx, data):
    fill = _fill(cidx)
    bad = set(data) - {0, fill}
    assert not bad, f"guest cluster {cidx} holds bytes {sorted(bad)[:8]} (its own fill is {fill})"


def _open_held(img):
    """The image over blkdebug holding every write a little (reads are not held): requests stay in
    flight outside the metadata lock long enough for the other threads to run meanwhile."""
    blk = pyrep.open_backend({"driver": "qcow2", "discard": "unmap",
                              "file": {"driver": "blkdebug", "node-name": "held",
                                       "file": {"driver": "file", "filename": str(img)}}})
    pyrep.inject_error("held", op="write", errno=None, delay=0.001)
    return blk


class HoldSmallWrites(BlockDriver):
    """Forwards everything; a write of ``hold-length`` bytes reaches the file only ``hold`` seconds
    after it was issued. The overwrites of the test are that long and its allocations are whole
    clusters: an overwrite that found its host cluster before a discard freed it lands after the
    allocation that got the cluster next, unless the free waited for it."""
    format_name = "test-hold-small-writes"
    is_filter = True
    options = (Opt("file", "child", required=True), Opt("hold-length", "size", default=512),
               Opt("hold", "number", default=0.003))

    def open(self, opts):
        self.file = self.node.open_child(opts, "file", role="file")
        self.hold_length, self.hold = opts["hold-length"], opts["hold"]

    def pwritev(self, offset, length, iov, flags=0):
        if length == self.hold_length:
            time.sleep(self.hold)       # injected latency (as blkdebug's delay), not synchronisation
        return self.file.pwritev(offset, length, iov, flags)


def _race(blk, ops, seed):
    def writer(rng_seed):
        rng = random.Random(rng_seed)
        for _ in range(ops):
            nclus = blk.length // CS
            cidx = rng.randrange(nclus)
            if rng.random() < 0.5:
                blk.pwrite(cidx * CS, bytes([_fill(cidx)]) * CS)              # whole cluster
            else:
                off = rng.randrange(0, CS - 4096, 512)
                blk.pwrite(cidx * CS + off, bytes([_fill(cidx)]) * 4096)      # allocating or overwrite

    def discarder(rng_seed):
        rng = random.Random(rng_seed)
        for i in range(ops):
            nclus = blk.length // CS
            cidx = rng.randrange(nclus)
            n = rng.randrange(1, 4)
            n = min(n, nclus - cidx)
            if rng.random() < 0.7:
                blk.pdiscard(cidx * CS, n * CS)
            else:
                blk.pwrite_zeroes(cidx * CS, n * CS, may_unmap=True)
            if i % 8 == 0:
                blk.flush()           # frees become real here: freed clusters are handed out again

    def resizer(_):
        for _ in range(STEPS):
            blk.truncate(blk.length + GROW)
            blk.pwrite(blk.length - CS, bytes([_fill(blk.length // CS - 1)]) * CS)

    work = [(writer, seed), (writer, seed + 1), (discarder, seed + 2), (resizer, None)]
    run_in_threads(lambda fn, s: fn(s), work)


def test_discards_race_writes_and_resize(tmp_path):
    img = tmp_path / "race.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, str(START))
    blk = _open_held(img)                                # discard=unmap: discards free host clusters
    try:
        _race(blk, ops=150, seed=1)
        assert blk.length == START + STEPS * GROW
        blk.flush()
        ours = bytearray()
        for cidx in range(blk.length // CS):
            data = blk.pread(cidx * CS, CS)
            _check_cluster(blk, cidx, data)
            ours += data
    finally:
        blk.close()
    qcheck(img)
    raw = tmp_path / "race.raw"
    qimg("convert", "-f", "qcow2", "-O", "raw", img, raw)
    assert raw.read_bytes() == bytes(ours)               # QEMU reads what we read


def test_discards_race_overwrites_of_the_same_clusters(tmp_path):
    """Writers overwrite a few allocated clusters in a loop while a discarder keeps freeing exactly
    those clusters and flushing: the freed host clusters come back for the next allocations at once."""
    img = tmp_path / "hot.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "4M")
    pyrep.register_driver(HoldSmallWrites, clobber=True)
    blk = pyrep.open_backend({"driver": "qcow2", "discard": "unmap",
                              "file": {"driver": "test-hold-small-writes",
                                       "file": {"driver": "file", "filename": str(img)}}})
    hot = list(range(8))
    try:
        for c in hot:
            blk.pwrite(c * CS, bytes([_fill(c)]) * CS)

        def writer(seed):
            rng = random.Random(seed)
            for _ in range(250):
                c = rng.choice(hot)
                off = rng.randrange(0, CS - 512, 512)
                blk.pwrite(c * CS + off, bytes([_fill(c)]) * 512)

        def discarder(seed):
            rng = random.Random(seed)
            for i in range(250):
                blk.pdiscard(rng.choice(hot) * CS, CS)
                if i % 4 == 0:
                    blk.flush()

        def checker(_):
            # a cluster holding another cluster's bytes may be discarded again soon: look all along
            for _ in range(250):
                for c in hot:
                    _check_cluster(blk, c, blk.pread(c * CS, CS))

        run_in_threads(lambda fn, s: fn(s), [(writer, 1), (writer, 2), (writer, 3), (discarder, 4),
                                             (checker, None)])
        blk.flush()
        for c in range(len(hot)):
            _check_cluster(blk, c, blk.pread(c * CS, CS))
        for c in range(len(hot), (4 << 20) // CS):
            assert blk.pread(c * CS, CS) == bytes(CS)
    finally:
        blk.close()
        pyrep.unregister_driver("test-hold-small-writes")
    qcheck(img)
