"""Options: the three spellings, schemas, and the errors for every option type."""
import pytest

import pyrep
from pyrep.options import Opt, parse_size, validate


def test_drive_string_dotted_and_escaped_commas():
    d = pyrep.parse_drive("driver=qcow2,file.filename=a,,b.qcow2,node-name=n0")
    assert d == {"driver": "qcow2", "file.filename": "a,b.qcow2", "node-name": "n0"}


def test_spellings_are_equivalent():
    nested = {"driver": "quorum", "children": [{"driver": "null"}, {"driver": "null", "size": "1M"}],
              "file": {"backing": {"backing": "colo1"}}}
    dotted = {"driver": "quorum", "children.0.driver": "null", "children.1.driver": "null",
              "children.1.size": "1M", "file.backing.backing": "colo1"}
    drive = "driver=quorum,children.0.driver=null,children.1.driver=null,children.1.size=1M,file.backing.backing=colo1"
    js = 'json:{"driver": "quorum", "children": [{"driver": "null"}, {"driver": "null", "size": "1M"}],' \
         ' "file": {"backing": {"backing": "colo1"}}}'
    assert pyrep.normalize(nested) == pyrep.normalize(dotted) == pyrep.normalize(drive) == pyrep.normalize(js) \
        == nested
    assert pyrep.flatten(nested) == dotted
    assert pyrep.unflatten(dotted) == nested


def test_mixed_nested_and_dotted():
    assert pyrep.normalize({"driver": "raw", "file": {"driver": "file"}, "file.filename": "x"}) == \
        {"driver": "raw", "file": {"driver": "file", "filename": "x"}}


@pytest.mark.parametrize("text, msg", [
    ("driver=raw,,,", "empty option"),
    ("driver=raw,file", "has no '='"),
    ("driver=raw,driver=qcow2", "given twice"),
    ("=x", "empty key"),
    ("json:{bad", "not valid JSON"),
    ("json:[1]", "JSON object"),
])
def test_bad_drive_strings(text, msg):
    with pytest.raises(pyrep.OptionError, match=msg):
        pyrep.parse_drive(text)


def test_value_and_group_clash():
    with pytest.raises(pyrep.OptionError, match="both a value"):
        pyrep.unflatten({"file": "n0", "file.filename": "x"})


def test_list_indexes_must_be_contiguous():
    with pytest.raises(pyrep.OptionError, match="list indexes"):
        Opt("children", "children").convert({"0": {}, "2": {}}, "quorum: option 'children'")


@pytest.mark.parametrize("text, value", [("512", 512), (4096, 4096), ("64K", 65536), ("64k", 65536),
                                         ("1M", 1 << 20), ("1.5G", 3 << 29), ("2T", 2 << 40), ("8KiB", 8192)])
def test_sizes(text, value):
    assert parse_size(text) == value


SCHEMA = (Opt("s", "string"), Opt("b", "bool"), Opt("n", "number", min=0, max=10), Opt("z", "size"),
          Opt("e", "enum", choices=("x", "y")), Opt("req", "string", required=True), Opt("c", "child"),
          Opt("l", "list"))


@pytest.mark.parametrize("key, value, expected", [
    ("b", "maybe", "expected on/off"),
    ("n", "ten", "expected a number"),
    ("n", 11, "above the maximum 10"),
    ("n", -1, "below the minimum 0"),
    ("z", "12Q", "expected a size"),
    ("z", -5, "expected a size"),
    ("e", "z", "one of 'x', 'y'"),
    ("s", ["a"], "expected a string"),
    ("c", 5, "a dict of options or the name of a node"),
    ("l", "x", "expected a list"),
])
def test_each_type_rejects_bad_values_naming_driver_and_key(key, value, expected):
    with pytest.raises(pyrep.OptionError) as e:
        validate(SCHEMA, {"driver": "mine", "req": "r", key: value}, "mine", "file.backing.")
    msg = str(e.value)
    assert msg.startswith("mine: option 'file.backing." + key + "'")
    assert expected in msg


def test_unknown_and_missing_options():
    with pytest.raises(pyrep.OptionError, match=r"mine: unknown option 'file\.cluster-sise'.*options of mine: b, c"):
        validate(SCHEMA, {"driver": "mine", "req": "r", "cluster-sise": 1}, "mine", "file.")
    with pytest.raises(pyrep.OptionError, match="option 'req' is required"):
        validate(SCHEMA, {"driver": "mine"}, "mine")


def test_conversions_and_defaults():
    out = validate(SCHEMA + (Opt("d", "size", default=65536),), {"driver": "mine", "req": "r", "b": "on", "n": "7", "z": "1M",
                                                                 "e": "y"}, "mine")
    assert out["b"] is True and out["n"] == 7 and out["z"] == 1 << 20 and out["e"] == "y" and out["d"] == 65536
    assert "c" not in out  # absent children stay absent (absent != null)
    assert out["read-only"] is False


def test_errors_through_blockdev_add_name_the_key_path(tmp_path):
    with pytest.raises(pyrep.OptionError, match=r"raw: unknown option 'file\.filenme'|file: unknown option 'file\.filenme'"):
        pyrep.blockdev_add({"driver": "raw", "file": {"driver": "file", "filenme": "x"}})
    with pytest.raises(pyrep.OptionError, match=r"memory: option 'backing\.cluster-size': expected a size"):
        pyrep.blockdev_add({"driver": "memory", "size": "1M", "backing": {"driver": "memory", "size": "1M",
                                                                          "cluster-size": "big"}})
    with pytest.raises(pyrep.OptionError, match=r"unknown driver 'qcow3' \(known drivers: .*blkdebug.*file"):
        pyrep.blockdev_add({"driver": "qcow3"})
    with pytest.raises(pyrep.OptionError, match="'driver' is required"):
        pyrep.blockdev_add({"size": "1M"})
    with pytest.raises(pyrep.OptionError, match=r"raw: option 'file' is required"):
        pyrep.blockdev_add({"driver": "raw"})
