"""Config files (TOML and JSON) describing nodes and named backends."""
import json

import pytest

import pyrep

from helpers.referees import needs, qimg

TOML = """
[[blockdev]]
node-name = "base0"
driver = "raw"
file = { driver = "file", filename = "disk.raw" }

[[blockdev]]
node-name = "over0"
driver = "memory"
backing = "base0"

[[backend]]
name = "disk0"
node = "over0"
"""


@pytest.fixture
def disk(tmp_path):
    with open(tmp_path / "disk.raw", "wb") as f:
        f.write(b"base" + bytes(65532))
    return tmp_path / "disk.raw"


def test_toml_graph(tmp_path, disk):
    (tmp_path / "graph.toml").write_text(TOML)
    g = pyrep.load_config(str(tmp_path / "graph.toml"))
    blk = pyrep.backend("disk0")
    assert set(g.nodes) == {"base0", "over0"} and g.backends["disk0"] is blk
    assert blk.pread(0, 4) == b"base"          # relative filename resolved against the config's directory
    blk.pwrite(0, b"over")
    assert pyrep.lookup("base0").pread(0, 4) == b"base"  # the overlay took the write
    g.close()
    assert pyrep.nodes() == {} and pyrep.backends() == {}


def test_json_graph_same_shape(tmp_path, disk):
    cfg = {"blockdev": [{"node-name": "base0", "driver": "raw", "file": {"driver": "file", "filename": str(disk)}}],
           "backend": [{"name": "disk0", "node": "base0", "read-only": True}]}
    (tmp_path / "g.json").write_text(json.dumps(cfg))
    with pyrep.load_config(tmp_path / "g.json"):
        blk = pyrep.backend("disk0")
        assert blk.read_only and blk.pread(0, 4) == b"base"


@pytest.mark.parametrize("text, msg", [
    ('[[blockdev]]\nnode-name = "a"\ndriver = "raw"\n', r"g.toml: blockdev\[0\]: raw: option 'file' is required"),
    ('[[blockdev]]\ndriver = "memory"\nsize = "1M"\n[[blockdev]]\ndriver = "memory"\nsize = "lots"\n',
     r"g.toml: blockdev\[1\]: memory: option 'size': expected a size"),
    ('[[blockdev]]\ndriver = "raw"\nfile = { driver = "file", filename = "x.raw", lock = "on" }\n',
     r"blockdev\[0\]: file: unknown option 'file.lock'"),
    ('[[backend]]\nname = "b"\n', r"backend\[0\]: 'node' is required"),
    ('[[backend]]\nname = "b"\nnode = "nowhere"\n', r"backend\[0\]: no node or backend named 'nowhere'"),
    ('[[backend]]\nname = "b"\nnode = "n"\ncolour = "red"\n', r"backend\[0\]: unknown key 'colour'"),
    ('[[blockdevs]]\n', r"unknown top-level key 'blockdevs'"),
    ('[[blockdev\n', r"g.toml: not valid TOML"),
])
def test_errors_name_file_and_key(tmp_path, text, msg):
    (tmp_path / "g.toml").write_text(text)
    before = set(pyrep.nodes())
    with pytest.raises(pyrep.Error, match=msg):
        pyrep.load_config(tmp_path / "g.toml")
    assert set(pyrep.nodes()) == before  # nothing left half-built


def test_missing_file(tmp_path):
    with pytest.raises(pyrep.OptionError, match="cannot read config file"):
        pyrep.load_config(tmp_path / "nope.toml")


@needs("qemu-img")
def test_the_example_secondary_config_starts_replication(tmp_path):
    import os
    import shutil
    here = os.path.dirname(os.path.abspath(__file__))
    cfg = os.path.join(here, "..", "..", "examples", "configs", "secondary.toml")
    shutil.copy(cfg, tmp_path / "secondary.toml")
    qimg("create", "-f", "qcow2", tmp_path / "secondary.qcow2", "16M")
    g = pyrep.load_config(tmp_path / "secondary.toml")
    pyrep.backend("s_disk_blk").pwrite(0, b"checkpoint")
    pyrep.replication.start_all("secondary")
    assert pyrep.replication.status()[0]["stage"] == "running"
    top = pyrep.backend("s_top")
    pyrep.backend("s_disk_blk").pwrite(0, b"PRIMARY!!!")     # a forwarded primary write: COW keeps the old data
    assert top.pread(0, 10) == b"checkpoint"
    top.pwrite(100, b"mine")
    pyrep.replication.stop_all(failover=True, wait=True)
    # failover rolls the disk back to the last checkpoint (taken at start) plus the secondary's writes
    assert top.pread(0, 10) == b"checkpoint"
    assert top.pread(100, 4) == b"mine"
    g.close()


def test_unknown_sections_and_keys_are_refused(tmp_path):
    (tmp_path / "g.toml").write_text('[[exports]]\nnode = "x"\n')
    with pytest.raises(pyrep.OptionError, match="unknown top-level key 'exports'"):
        pyrep.load_config(tmp_path / "g.toml")
    (tmp_path / "g.toml").write_text('[[export]]\nnode = "x"\n')
    with pytest.raises(pyrep.OptionError, match=r"export\[0\]: unknown key 'node'"):
        pyrep.load_config(tmp_path / "g.toml")
    (tmp_path / "g.toml").write_text('[[monitor]]\nid = "m0"\n')
    with pytest.raises(pyrep.OptionError, match=r"monitor\[0\]: 'path' \(a Unix socket\) or 'host' and 'port'"):
        pyrep.load_config(tmp_path / "g.toml")
    (tmp_path / "g.toml").write_text('[replication]\nenable = "maybe"\nprimary = false\n')
    with pytest.raises(pyrep.OptionError, match=r"replication: key 'enable'"):
        pyrep.load_config(tmp_path / "g.toml")
