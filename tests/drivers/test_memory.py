"""The memory driver: compression, sparseness, memory use, overlay behaviour, make_empty."""
import os

import pytest

import pyrep
from pyrep.constants import BS_ALLOCATED

MiB = 1 << 20


@pytest.mark.parametrize("codec", ["blosclz", "lz4", "lz4hc", "zlib", "zstd", "none"])
def test_codecs_round_trip(codec):
    with pyrep.open_backend({"driver": "memory", "size": "4M", "codec": codec, "level": 5}) as blk:
        data = os.urandom(3000) + b"compressible" * 10000
        blk.pwrite(12345, data)
        assert blk.pread(12345, len(data)) == data


def test_memory_use_is_real_and_sparse():
    with pyrep.open_backend({"driver": "memory", "size": "1T"}) as blk:   # a huge sparse disk costs nothing
        drv = blk.node.driver
        assert drv.memory_used == 0
        blk.pwrite(0, b"a" * MiB)                     # very compressible
        compressible = drv.memory_used
        assert 0 < compressible < MiB // 20
        blk.pwrite(8 * MiB, os.urandom(MiB))          # incompressible
        assert drv.memory_used > compressible + MiB * 0.9
        assert blk.node.driver.get_info()["allocated-clusters"] == 32
        blk.pwrite_zeroes(0, MiB)                     # no backing: zeroes are simply dropped
        assert blk.node.driver.get_info()["allocated-clusters"] == 16
        blk.node.make_empty()
        assert drv.memory_used == 0 and blk.pread(8 * MiB, 16) == bytes(16)


def test_overlay_reads_backing_and_make_empty_restores_it():
    base = pyrep.blockdev_add({"driver": "memory", "size": "2M", "node-name": "base"})
    base.pwrite(0, b"B" * (2 * MiB))
    top = pyrep.blockdev_add({"driver": "memory", "backing": "base", "node-name": "top", "cluster-size": "4K"})
    assert top.length == 2 * MiB
    top.pwrite(100, b"top")                          # partial cluster: COW from the backing
    assert top.pread(96, 10) == b"BBBBtopBBB"
    top.pwrite_zeroes(8192, 4096)                    # with a backing, zeroes must be kept as zero clusters
    assert top.pread(8192, 4096) == bytes(4096)
    assert top.block_status(8192, 4096).flags & BS_ALLOCATED
    top.pdiscard(16384, 4096)
    assert base.pread(0, 4) == b"BBBB"
    top.make_empty()
    assert top.pread(0, 8192 + 4096) == b"B" * (8192 + 4096)
    assert not pyrep.is_allocated(top, 0, 2 * MiB)[0]


def test_size_required_without_backing_and_bad_cluster_size():
    with pytest.raises(pyrep.OptionError, match="memory: option 'size' is required when there is no backing"):
        pyrep.blockdev_add({"driver": "memory"})
    with pytest.raises(pyrep.OptionError, match="cluster-size' must be a power of two"):
        pyrep.blockdev_add({"driver": "memory", "size": "1M", "cluster-size": 3000})
    with pytest.raises(pyrep.OptionError, match=r"memory: option 'level': 12 is above the maximum 9"):
        pyrep.blockdev_add({"driver": "memory", "size": "1M", "level": 12})


def test_resize():
    with pyrep.open_backend({"driver": "memory", "size": "1M", "cluster-size": "64K"}) as blk:
        blk.pwrite(0, b"x" * MiB)
        blk.truncate(100000)
        assert blk.length == 100000
        blk.truncate(MiB)
        assert blk.pread(99990, 20) == b"x" * 10 + bytes(10)


def test_incompressible_clusters_are_kept_as_is_and_compressible_ones_compressed():
    with pyrep.open_backend({"driver": "memory", "size": "4M"}) as blk:
        drv = blk.node.driver
        noise = os.urandom(MiB)
        blk.pwrite(0, noise)
        assert all(type(e) is bytearray for e in drv._clusters.values())   # not compressed: kept raw
        assert MiB <= drv.memory_used < MiB * 1.05
        text = (b"replicated disk block " * 50000)[:MiB]
        blk.pwrite(MiB, text)
        assert sum(1 for e in drv._clusters.values() if type(e) is bytes) == 16
        assert blk.pread(0, MiB) == noise and blk.pread(MiB, MiB) == text
        # a cluster that starts with noise and ends with text is still compressed, and read back exactly
        mixed = os.urandom(40960) + text[:65536 - 40960]
        blk.pwrite(2 * MiB, mixed)
        assert type(drv._clusters[(2 * MiB) // 65536]) is bytes
        assert blk.pread(2 * MiB, 65536) == mixed
