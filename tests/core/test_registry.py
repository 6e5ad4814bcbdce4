"""The driver registry: registration, clobber, unknown names, entry-point plugins."""
import os
import subprocess
import sys
import textwrap

import pytest

import pyrep
from pyrep.options import Opt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Doubler(pyrep.BlockDriver):
    """A protocol whose byte i reads as (i * 2) & 0xff: enough to see it was used."""
    format_name = "test-doubler"
    options = (Opt("size", "size", default=65536),)

    def open(self, opts):
        self.size = opts["size"]

    def getlength(self):
        return self.size

    def preadv(self, offset, length, iov):
        iov.copy_from(0, bytes(((offset + i) * 2) & 0xFF for i in range(length)))


def test_register_lookup_and_duplicates():
    pyrep.register_driver(Doubler)
    try:
        assert "test-doubler" in pyrep.drivers()
        assert pyrep.get_driver("test-doubler") is Doubler
        with pyrep.open_backend({"driver": "test-doubler", "size": "4K"}) as blk:
            assert blk.pread(3, 3) == bytes([6, 8, 10])
            with pytest.raises(pyrep.BlockError, match="write not supported"):
                blk.pwrite(0, b"x")

        class Other(Doubler):
            pass
        with pytest.raises(pyrep.OptionError, match="already registered.*clobber=True"):
            pyrep.register_driver(Other)
        pyrep.register_driver(Other, clobber=True)
        assert pyrep.get_driver("test-doubler") is Other
        pyrep.register_driver(Other)  # the same class again is not a duplicate
    finally:
        pyrep.unregister_driver("test-doubler")
    with pytest.raises(pyrep.OptionError, match=r"unknown driver 'test-doubler' \(known drivers: .*raw"):
        pyrep.get_driver("test-doubler")


def test_driver_without_name_is_refused():
    class Nameless(pyrep.BlockDriver):
        pass
    with pytest.raises(pyrep.OptionError, match="has no format_name"):
        pyrep.register_driver(Nameless)


def test_builtins_are_listed():
    names = pyrep.drivers()
    for n in ("file", "raw", "memory", "null", "blkdebug"):
        assert n in names


def test_entry_point_plugin_installed_in_the_test_run(tmp_path):
    """Install examples/pyrep-xor into a scratch dir and use it from a fresh interpreter."""
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--target", str(target), os.path.join(ROOT, "examples", "pyrep-xor")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    disk = tmp_path / "disk.raw"
    script = textwrap.dedent(f"""
        import pyrep
        assert "xor" in pyrep.drivers(), pyrep.drivers()
        with open({str(disk)!r}, "wb") as f:
            f.truncate(65536)
        opts = {{"driver": "xor", "key": 255, "file": {{"driver": "raw", "file": {{"driver": "file",
                 "filename": {str(disk)!r}}}}}}}
        with pyrep.open_backend(opts) as blk:
            blk.pwrite(0, b"plugin")
            assert blk.pread(0, 6) == b"plugin"
        with open({str(disk)!r}, "rb") as f:
            assert f.read(6) == bytes(b ^ 255 for b in b"plugin")
        try:
            pyrep.open_backend({{"driver": "xor", "key": 300, "file": {{"driver": "null"}}}})
        except pyrep.OptionError as e:
            assert "xor: option 'key': 300 is above the maximum 255" in str(e), e
        else:
            raise SystemExit("bad key accepted")
        print("plugin ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "plugin ok" in r.stdout
