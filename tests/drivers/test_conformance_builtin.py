"""The built-in drivers join the conformance suite, one line each."""
from driver_conformance import Conformance
from helpers import nbd_peers


def _raw_file(tmp_path, disk_size, **extra):
    path = tmp_path / "disk.raw"
    if not path.exists():
        with open(path, "wb") as f:
            # a window gets non-zero bytes around it, to catch reads that miss the offset
            f.truncate(disk_size + 2 * extra.get("offset", 0))
            if extra.get("offset"):
                f.write(b"\xee" * extra["offset"])
                f.seek(disk_size + extra["offset"])
                f.write(b"\xee" * extra["offset"])
    return {"driver": "raw", "file": {"driver": "file", "filename": str(path)}, **extra}


class TestFileConformance(Conformance):
    make = staticmethod(lambda tmp, size: {"driver": "file", "filename": _raw_file(tmp, size)["file"]["filename"]})


class TestRawConformance(Conformance):
    make = staticmethod(_raw_file)


class TestRawWindowConformance(Conformance):
    make = staticmethod(lambda tmp, size: _raw_file(tmp, size, offset=65536, size=size))


class TestMemoryConformance(Conformance):
    persistent = False
    make = staticmethod(lambda tmp, size: {"driver": "memory", "size": size, "cluster-size": "4K"})


class TestMemoryOverlayConformance(Conformance):
    persistent = False
    make = staticmethod(lambda tmp, size: {"driver": "memory", "backing": {"driver": "memory", "size": size}})


class TestBlkdebugConformance(Conformance):
    make = staticmethod(lambda tmp, size: {"driver": "blkdebug", "file": _raw_file(tmp, size)})


class TestBlkdebugAlignedConformance(Conformance):
    # a 4 KiB request alignment makes the node layer pad every unaligned request
    make = staticmethod(lambda tmp, size: {"driver": "blkdebug", "align": 4096, "file": _raw_file(tmp, size)})


class TestNullConformance(Conformance):
    stores_data = False
    make = staticmethod(lambda tmp, size: {"driver": "null", "size": size})


def _qcow2(tmp_path, disk_size, **create):
    import pyrep
    path = tmp_path / "disk.qcow2"
    if not path.exists():
        pyrep.create_image(str(path), "qcow2", disk_size, **create)
    return {"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}}


class TestQcow2Conformance(Conformance):
    make = staticmethod(_qcow2)


class TestQcow2SmallClusterV2Conformance(Conformance):
    make = staticmethod(lambda tmp, size: _qcow2(tmp, size, cluster_size=512, compat="0.10"))


def _qcow2_over_memory(tmp_path, disk_size):
    opts = _qcow2(tmp_path, disk_size)
    opts["backing"] = {"driver": "memory", "size": disk_size}  # the backing given as options overrides the header
    return opts


class TestQcow2OverlayConformance(Conformance):
    persistent = False  # its backing lives in RAM
    make = staticmethod(_qcow2_over_memory)


class TestNbdConformance(Conformance):
    # a real server: qemu-nbd serving a raw file (stopped after the test by conftest's fixture)
    make = staticmethod(lambda tmp, size: nbd_peers.qemu_nbd(tmp, _raw_file(tmp, size)["file"]["filename"]).opts())
