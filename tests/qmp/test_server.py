"""The QMP server on real sockets: raw-socket sessions, several monitors (Unix and TCP) at once,
events broadcast to every negotiated session, a malformed line never ends a session."""
import json
import socket

import pytest

import pyrep
from pyrep.qmp import QMPServer

from helpers.qmp import RawClient, pull_event
from helpers.wait import wait_until


@pytest.fixture
def server():
    quits = []
    s = QMPServer(on_quit=lambda: quits.append(1))
    s.quits = quits
    yield s
    s.close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_raw_session_greeting_negotiation_and_errors(server, tmp_path):
    path = str(tmp_path / "q.sock")
    key = server.add_listener({"type": "unix", "path": path})
    assert server.listeners() == {key: path}
    c = RawClient(path)
    g = c.greeting["QMP"]
    assert g["capabilities"] == ["oob"] and set(g["version"]["qemu"]) == {"major", "minor", "micro"}
    assert c.execute("query-version", id="a") == {
        "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
        "id": "a"}
    assert c.execute("qmp_capabilities", {"enable": ["oob"]}, id=1) == {"return": {}, "id": 1}
    # malformed input: an error reply each, the session lives on
    c.send(b"this is not json\n")
    assert c.reply()["error"]["class"] == "GenericError"
    c.send(b'["a list"]\n')
    assert c.reply() == {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}
    c.send(b'{"execute": "query-version", "arguments": {"x": 1}, "id": [1, {"two": 2}]}\n')
    assert c.reply() == {"error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"},
                         "id": [1, {"two": 2}]}
    # a message split over writes and two in one write
    c.send(b'{"execute": "query-')
    c.send(b'version", "id": 2}{"execute": "query-commands", "id": 3}\n')
    r2, r3 = c.reply(), c.reply()
    assert r2["id"] == 2 and "qemu" in r2["return"] and r3["id"] == 3 and {"name": "quit"} in r3["return"]
    c.send(b'{"exec-oob": "query-version", "id": 4}\n')
    assert "does not support OOB" in c.reply()["error"]["desc"]
    c.close()


def test_several_monitors_unix_and_tcp_with_events_to_all(server, tmp_path):
    path = str(tmp_path / "q.sock")
    port = _free_port()
    server.add_listener({"type": "unix", "path": path})
    tcp = server.add_listener({"type": "inet", "host": "127.0.0.1", "port": str(port)})
    assert server.listeners()[tcp] == ("127.0.0.1", port)
    a = RawClient(path).negotiate()
    b = RawClient(("127.0.0.1", port)).negotiate()
    unnegotiated = RawClient(path)
    from qemu.qmp.legacy import QEMUMonitorProtocol
    q = QEMUMonitorProtocol(("127.0.0.1", port))
    q.connect()
    try:
        pyrep.blockdev_add({"driver": "null", "node-name": "n0", "size": 1 << 20})
        pyrep.blockdev_add({"driver": "null", "node-name": "n1", "size": 1 << 20})
        assert a.execute("blockdev-backup", {"job-id": "j", "device": "n0", "target": "n1", "sync": "full"}) == \
            {"return": {}}
        for client in (a, b):
            done = client.event("BLOCK_JOB_COMPLETED")
            assert done["data"]["device"] == "j" and set(done["timestamp"]) == {"seconds", "microseconds"}
        assert pull_event(q, "JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "null")["data"]["id"] == "j"
        # no event before negotiation: the first thing this session sees is its reply
        assert unnegotiated.execute("qmp_capabilities") == {"return": {}}
        # commands of one session do not disturb another
        assert b.execute("query-jobs") == {"return": []}
    finally:
        q.close()
        for c in (a, b, unnegotiated):
            c.close()


def test_quit_replies_then_shutdown_event_then_hook(server, tmp_path):
    path = str(tmp_path / "q.sock")
    server.add_listener({"type": "unix", "path": path})
    a, watcher = RawClient(path).negotiate(), RawClient(path).negotiate()
    a.send(b'{"execute": "quit", "id": "bye"}\n')
    assert a.recv() == {"return": {}, "id": "bye"}
    assert a.recv()["event"] == "SHUTDOWN"
    assert watcher.event("SHUTDOWN")["data"] == {"guest": False, "reason": "host-qmp-quit"}
    wait_until(lambda: server.quits, 10, "the quit hook")
    with pytest.raises(EOFError):             # the quitting session is closed after its reply
        a.recv()
    a.close()
    watcher.close()


def test_client_that_disconnects_mid_message_and_close_with_clients(server, tmp_path):
    path = str(tmp_path / "q.sock")
    server.add_listener({"type": "unix", "path": path})
    c = RawClient(path).negotiate()
    c.send(b'{"execute": "query-ver')
    c.close()
    d = RawClient(path).negotiate()
    assert "return" in d.execute("query-version")
    server.close()
    with pytest.raises((EOFError, OSError)):
        d.execute("query-version")
    d.close()
    import os
    assert not os.path.exists(path)


def test_stale_socket_file_is_replaced_but_a_regular_file_is_not(server, tmp_path):
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()                                  # a socket file nobody listens on
    server.add_listener({"type": "unix", "path": str(stale)})
    assert RawClient(str(stale)).negotiate().execute("query-version")["return"]
    regular = tmp_path / "data"
    regular.write_bytes(b"keep me")
    with pytest.raises(OSError):
        server.add_listener({"type": "unix", "path": str(regular)})
    assert regular.read_bytes() == b"keep me"


def test_pretty_monitor(server, tmp_path):
    path = str(tmp_path / "q.sock")
    server.add_listener({"type": "unix", "path": path}, pretty=True)
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    buf = b""
    while not buf.endswith(b"}\n"):
        buf += s.recv(4096)
    assert json.loads(buf)["QMP"] and b"\n    " in buf     # indented, one message still parses whole
    s.close()
