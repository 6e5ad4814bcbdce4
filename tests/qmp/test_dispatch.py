"""The command table, argument checking and framing, without sockets."""
import pytest

from pyrep.options import Opt
from pyrep.qmp import ArgError, CommandTable, QMPError
from pyrep.qmp.commands import default_table
from pyrep.qmp.dispatch import check_args, dispatch
from pyrep.qmp.session import Session


class _State:
    def __init__(self, table):
        self.table = table

    def version(self):
        return {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "test"}


def _table():
    t = CommandTable()

    @t.command("echo", Opt("text", "string", required=True), Opt("times", "number", default=1, min=1),
               Opt("mode", "enum", choices=("loud", "quiet")), Opt("flag", "bool"))
    def echo(session, args):
        return {"text": args["text"] * args["times"], "mode": args.get("mode")}

    @t.command("fail")
    def fail(session, args):
        raise QMPError("it failed", "DeviceNotFound")

    @t.command("crash")
    def crash(session, args):
        return 1 / 0

    for cmd in default_table():
        if cmd.name == "qmp_capabilities":
            t.add(cmd)
    return t


def _session():
    return Session(_State(_table()))


@pytest.mark.parametrize("args, message", [
    ({}, "Parameter 'text' is missing"),
    ({"text": 5}, "Invalid parameter type for 'text', expected: string"),
    ({"text": "a", "times": "2"}, "Invalid parameter type for 'times', expected: integer"),
    ({"text": "a", "times": True}, "Invalid parameter type for 'times', expected: integer"),
    ({"text": "a", "times": 0}, "Parameter 'times' expects a value of at least 1"),
    ({"text": "a", "mode": "soft"}, "Parameter 'mode' does not accept value 'soft'"),
    ({"text": "a", "flag": "on"}, "Invalid parameter type for 'flag', expected: boolean"),
    ({"text": "a", "colour": "red"}, "Parameter 'colour' is unexpected"),
])
def test_argument_errors_name_the_argument(args, message):
    schema = _table().get("echo").args
    with pytest.raises(ArgError) as e:
        check_args(schema, args)
    assert e.value.desc == message and e.value.error_class == "GenericError"


def test_nested_arguments_are_named_by_path():
    with pytest.raises(ArgError, match=r"Parameter 'addr\.path' is missing"):
        check_args((Opt("path", "string", required=True),), {}, prefix="addr.")


def test_negotiation_then_commands_with_id_echoed():
    s = _session()
    assert dispatch(s.table, s, {"execute": "echo", "arguments": {"text": "x"}, "id": 7}, s.negotiated) == {
        "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
        "id": 7}
    assert s.feed(b'{"execute": "qmp_capabilities", "id": {"any": ["json"]}}\n') == [
        {"return": {}, "id": {"any": ["json"]}}]
    assert s.feed('{"execute": "echo", "arguments": {"text": "ab", "times": 2}, "id": "x"}') == [
        {"return": {"text": "abab", "mode": None}, "id": "x"}]
    assert s.feed('{"execute": "qmp_capabilities"}') == [
        {"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}]
    assert s.feed('{"execute": "nope", "id": 1}') == [
        {"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": 1}]
    assert s.feed('{"execute": "fail"}') == [{"error": {"class": "DeviceNotFound", "desc": "it failed"}}]
    [crash] = s.feed('{"execute": "crash"}')
    assert crash["error"]["class"] == "GenericError" and "ZeroDivisionError" in crash["error"]["desc"]


def test_unknown_capability_is_refused():
    s = _session()
    [r] = s.feed('{"execute": "qmp_capabilities", "arguments": {"enable": ["telepathy"]}}')
    assert r["error"]["class"] == "GenericError" and "telepathy" in r["error"]["desc"] and not s.negotiated
    assert s.feed('{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}') == [{"return": {}}]
    assert s.negotiated and s.enabled == {"oob"}


@pytest.mark.parametrize("text, desc", [
    ("garbage\n", "JSON parse error"),
    ("[1, 2]\n", "QMP input must be a JSON object"),
    ('{"id": 3}\n', "QMP input lacks member 'execute'"),
    ('{"execute": 3}\n', "QMP input member 'execute' must be a string"),
    ('{"execute": "echo", "arguments": [1]}\n', "QMP input member 'arguments' must be an object"),
    ('{"execute": "echo", "colour": 1}\n', "QMP input member 'colour' is unexpected"),
])
def test_malformed_input_gets_an_error_and_the_session_goes_on(text, desc):
    s = _session()
    s.feed('{"execute": "qmp_capabilities"}')
    [r] = s.feed(text)
    assert r["error"]["class"] == "GenericError" and r["error"]["desc"].startswith(desc)
    assert s.feed('{"execute": "echo", "arguments": {"text": "ok"}}\n') == [{"return": {"text": "ok", "mode": None}}]


def test_framing_split_and_joined_messages():
    s = _session()
    s.feed('{"execute": "qmp_capabilities"}')
    msg = '{"execute": "echo",\n "arguments": {"text": "é,}"}, "id": 1}'
    data = msg.encode()
    out = []
    for i in range(len(data)):               # one byte at a time: a UTF-8 character is split too
        out += s.feed(data[i:i + 1])
    assert out == [{"return": {"text": "é,}", "mode": None}, "id": 1}]
    s2 = s
    two = '{"execute": "echo", "arguments": {"text": "a"}, "id": 1}{"execute": "echo", "arguments": {"text": "b"}, "id": 2}\n'
    assert [r["id"] for r in s2.feed(two)] == [1, 2]
    # a bad line between good ones is reported once, when whole, and skipped
    out = s2.feed('{"execute": "echo", "arguments": {"text": "a"}, "id": 1}\nbad') + s2.feed(' stuff\n{"execute": "echo", "arguments": {"text": "c"}, "id": 3}\n')
    assert [r.get("id") for r in out] == [1, None, 3] and "error" in out[1]


def test_the_table_is_the_one_source_of_names_and_schemas():
    t = default_table()
    names = t.names()
    for name in ("qmp_capabilities", "query-version", "query-commands", "quit", "blockdev-add", "blockdev-del",
                 "query-named-block-nodes", "nbd-server-start", "nbd-server-stop", "block-export-add",
                 "block-export-del", "query-block-exports", "nbd-server-add", "x-blockdev-change",
                 "blockdev-backup", "blockdev-mirror", "query-jobs", "job-cancel", "block-job-cancel",
                 "job-dismiss", "xen-set-replication", "xen-colo-do-checkpoint", "query-xen-replication-status"):
        assert name in names
    assert len(set(names)) == len(names)
    with pytest.raises(ValueError, match="registered twice"):
        t.add(t.get("quit"))
    for cmd in t:
        assert all(isinstance(a, Opt) for a in cmd.args) and cmd.help, cmd.name
