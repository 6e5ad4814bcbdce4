"""Opening by filename, as QEMU's bdrv_open does: a bare ``filename`` names a protocol where one is expected
and an image to probe anywhere else; open_backend("x.qcow2"); implied filter children; strict strings.

The option shapes are those of QEMU's own unit tests (tests/unit/test-replication.c opens its disks as
``driver=qcow2,file.filename=...``)."""
import errno
import subprocess

import pytest

import pyrep
from pyrep.graph import protocol_for

M = 1 << 20


def qemu(*args):
    return subprocess.run([*map(str, args)], capture_output=True, text=True, check=True)


@pytest.fixture
def qcow2(tmp_path):
    path = tmp_path / "a.qcow2"
    qemu("qemu-img", "create", "-f", "qcow2", path, "4M")
    return str(path)


@pytest.fixture
def raw(tmp_path):
    path = tmp_path / "a.raw"
    qemu("qemu-img", "create", "-f", "raw", path, "4M")
    return str(path)


def test_qemu_unit_test_shape_file_filename_is_the_file_protocol(qcow2):
    blk = pyrep.open_backend(f"driver=qcow2,file.filename={qcow2}")
    assert blk.node.file.drv.format_name == "file"
    blk.pwrite(0, b"\xab" * 65536)
    blk.close()
    out = qemu("qemu-io", "-f", "qcow2", "-c", "read -P 0xab 0 64k", qcow2).stdout
    assert "read 65536/65536" in out


def test_qemu_replication_test_secondary_shape(tmp_path):
    for name in ("s_local", "hidden", "active"):
        qemu("qemu-img", "create", "-f", "qcow2", tmp_path / f"{name}.qcow2", "4M")
    pyrep.blockdev_add(f"driver=qcow2,node-name=s_local,file.filename={tmp_path}/s_local.qcow2")
    blk = pyrep.open_backend(
        f"driver=replication,mode=secondary,top-id=top,node-name=rep,"
        f"file.driver=qcow2,file.file.filename={tmp_path}/active.qcow2,"
        f"file.backing.driver=qcow2,file.backing.file.filename={tmp_path}/hidden.qcow2,"
        f"file.backing.backing=s_local", name="top")
    active = blk.node.file
    assert active.file.drv.format_name == "file"
    assert active.backing.file.drv.format_name == "file"
    assert active.backing.backing is pyrep.lookup("s_local")


def test_a_filter_under_a_format_keeps_the_protocol_rule(qcow2):
    # qcow2 -> blkdebug -> file: blkdebug stands where the protocol belongs, so its bare filename is the
    # file itself, not an image to probe (which would read the qcow2 header and open a qcow2 in a qcow2)
    blk = pyrep.open_backend({"driver": "qcow2", "file": {"driver": "blkdebug", "file": {"filename": qcow2}}})
    assert blk.node.file.file.drv.format_name == "file"
    assert blk.length == 4 * M


def test_a_format_given_a_filename_gets_its_file_child(qcow2):
    blk = pyrep.open_backend({"driver": "qcow2", "filename": qcow2})
    assert blk.node.drv.format_name == "qcow2" and blk.node.file.filename == qcow2


def test_no_driver_probes_the_format(qcow2, raw):
    a = pyrep.open_backend({"filename": qcow2})
    b = pyrep.blockdev_add({"filename": raw, "node-name": "r0"})
    assert a.node.drv.format_name == "qcow2" and a.node.file.drv.format_name == "file"
    assert b.drv.format_name == "raw" and b.file.drv.format_name == "file"
    assert a.length == b.length == 4 * M


def test_backing_filename_is_probed(tmp_path, qcow2):
    top = tmp_path / "top.qcow2"
    qemu("qemu-img", "create", "-f", "qcow2", top, "4M")
    with pyrep.open_backend({"driver": "qcow2", "filename": qcow2}) as blk:
        blk.pwrite(0, b"base")
    blk = pyrep.open_backend({"driver": "qcow2", "file.filename": str(top), "backing.filename": qcow2})
    assert blk.node.backing.drv.format_name == "qcow2"
    assert blk.pread(0, 4) == b"base"


def test_probed_raw_refuses_writes_that_make_it_look_like_qcow2(tmp_path, raw):
    magic = b"QFI\xfb" + bytes(508)
    blk = pyrep.open_backend({"filename": raw})
    assert blk.node.drv.format_name == "raw"
    for offset, data in ((0, magic), (0, magic[:4]), (0, magic * 8)):
        with pytest.raises(pyrep.BlockError, match="look like qcow2") as e:
            blk.pwrite(offset, data)
        assert e.value.errno == errno.EPERM
    assert blk.pread(0, 4) == bytes(4)
    blk.pwrite(0, b"plain data")              # other data at sector 0: fine
    blk.pwrite(512, magic)                   # the magic elsewhere: fine
    assert blk.pread(0, 10) == b"plain data" and blk.pread(512, 4) == b"QFI\xfb"
    blk.close()
    # the raw format named explicitly writes what it is told (as QEMU)
    with pyrep.open_backend({"driver": "raw", "file.filename": raw}) as blk:
        blk.pwrite(0, magic)
    assert pyrep.graph.probe_format(raw) == "qcow2"


def test_open_backend_of_a_filename(qcow2, raw):
    with pyrep.open_backend(qcow2) as blk:
        assert blk.node.drv.format_name == "qcow2"
        blk.pwrite(0, b"\xcd" * 4096)
    assert "read 4096/4096" in qemu("qemu-io", "-f", "qcow2", "-c", "read -P 0xcd 0 4k", qcow2).stdout
    with pyrep.open_backend(raw, read_only=True) as blk:
        assert blk.node.drv.format_name == "raw" and blk.node.read_only
    # a node of that name wins over the file
    pyrep.blockdev_add({"driver": "null", "node-name": "n0", "size": M})
    with pyrep.open_backend("n0") as blk:
        assert blk.node.drv.format_name == "null"


def test_open_backend_of_nothing_says_what_it_looked_for(tmp_path):
    with pytest.raises(pyrep.OptionError, match=r"no node, backend or file named '.*/missing\.qcow2'"):
        pyrep.open_backend(str(tmp_path / "missing.qcow2"))
    with pytest.raises(pyrep.OptionError, match=r"no node, backend or file named 'nowhere'"):
        pyrep.open_backend("nowhere")
    assert not pyrep.nodes()


class SchemeDriver(pyrep.BlockDriver):
    """A protocol serving ``pyrep-test://<size>`` URIs: all zeroes, as the null driver."""
    format_name = "pyrep-test-scheme"
    protocol_name = "pyrep-test"
    protocol_schemes = ("pyrep-test", "pyrep-test+unix")
    options = (pyrep.Opt("filename", "string", required=True),)

    def open(self, opts):
        self.uri = opts["filename"]
        self.size = pyrep.options.parse_size(self.uri.split("://", 1)[1])

    def getlength(self):
        return self.size

    def preadv(self, offset, length, iov):
        iov.memset(0, 0, length)


@pytest.fixture
def scheme_driver():
    pyrep.register_driver(SchemeDriver)
    yield SchemeDriver
    pyrep.unregister_driver(SchemeDriver.format_name)


def test_uri_scheme_picks_the_driver_that_declares_it(scheme_driver):
    assert protocol_for("pyrep-test+UNIX://1M") == "pyrep-test-scheme"
    assert protocol_for("/tmp/disk.raw") == protocol_for("disk:with:colons") == "file"
    blk = pyrep.open_backend("driver=raw,file.filename=pyrep-test://1M")
    assert blk.node.file.drv is scheme_driver and blk.node.file.driver.uri == "pyrep-test://1M"
    assert blk.length == M
    # no driver at all: the URI's protocol, then the format probed from its first sector
    blk2 = pyrep.open_backend("pyrep-test://2M")
    assert blk2.node.drv.format_name == "raw" and blk2.node.file.drv is scheme_driver and blk2.length == 2 * M


def test_unknown_scheme_is_an_option_error():
    with pytest.raises(pyrep.OptionError, match=r"file\.filename.*unknown protocol 'nosuch'"):
        pyrep.open_backend({"driver": "raw", "file": {"filename": "nosuch://host/x"}})
    assert not pyrep.nodes()


class BareFilter(pyrep.BlockDriver):
    format_name = "pyrep-test-bare-filter"
    is_filter = True


def test_a_filter_with_only_a_name_opens_with_its_file_child_implied(raw):
    pyrep.register_driver(BareFilter)
    try:
        blk = pyrep.open_backend({"driver": BareFilter.format_name, "file": {"driver": "raw", "file.filename": raw}})
        blk.pwrite(4096, b"through")
        assert blk.pread(4096, 7) == b"through" and blk.length == 4 * M
        blk.close()
        with pytest.raises(pyrep.OptionError, match=r"pyrep-test-bare-filter: option 'file' is required"):
            pyrep.open_backend({"driver": BareFilter.format_name})
    finally:
        pyrep.unregister_driver(BareFilter.format_name)


@pytest.mark.parametrize("value", [123, 1.5, True, ["a"]])
def test_string_options_refuse_non_strings(value):
    with pytest.raises(pyrep.OptionError, match=r"file: option 'filename': expected a string"):
        pyrep.open_backend({"driver": "file", "filename": value})
    with pytest.raises(pyrep.OptionError, match=r"raw: option 'node-name': expected a string"):
        pyrep.open_backend({"driver": "raw", "node-name": value, "file": {"driver": "null"}})
