"""Bad input never crashes the server or disturbs other connections: each case is answered as the
spec says, or only the offending connection is closed."""
import os
import socket

import pytest

import pyrep
from nbd_testlib import RawClient, raw_node, server  # noqa: F401 - fixtures
from pyrep.nbd import handshake as H
from pyrep.nbd import proto as P
from pyrep.nbd import transmission as T

CLOSED = (EOFError, ConnectionError, P.ProtocolError, socket.timeout)


@pytest.fixture
def disk(tmp_path, server):
    node, path = raw_node(tmp_path, 1 << 20, data=os.urandom(4096))
    pyrep.export_add(node, name="d", writable=True)
    return path


def _still_serves(server, path):
    """A fresh client reads the export correctly."""
    c = RawClient(server.sock_path).go("d")
    c.request(P.CMD_READ, 99, 0, 4096)
    assert c.reply(4096) == (99, 0, open(path, "rb").read(4096))
    c.close()


def _closed(c):
    """The server closed this connection (reads see the end of the stream)."""
    with pytest.raises(CLOSED):
        if c.hs.state == H.TRANSMISSION:
            c.recv_exact(1)
        else:
            c.event()
    c.close()


def _raw(server):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(server.sock_path)
    return s


def _recv_all(s):
    out = b""
    while True:
        d = s.recv(65536)
        if not d:
            return out
        out += d


def test_garbage_instead_of_a_handshake(server, disk):
    s = _raw(server)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(200))
    got = _recv_all(s)                       # the greeting, then the server closes
    assert got[:8] == b"NBDMAGIC" and len(got) == 18
    s.close()
    _still_serves(server, disk)


def test_wrong_option_magic_closes(server, disk):
    c = RawClient(server.sock_path)
    c.event()
    c.send(H.ClientFlags())
    c.s.sendall(P.OPTION_HEADER.pack(0xDEADBEEF, P.OPT_GO, 0))
    assert _recv_all(c.s) == b""
    c.close()
    _still_serves(server, disk)


def test_unknown_and_malformed_options_get_errors_and_the_session_goes_on(server, disk):
    c = RawClient(server.sock_path)
    c.event()
    c.send(H.ClientFlags())
    c.send(H.UnknownOption(77, b"whatever"))
    assert c.until_done() == [H.OptionError(P.REP_ERR_UNSUP, "option 77 is not supported", 77)]
    c.send(H.InvalidOption(P.OPT_GO, b"\x00\x00\x10\x00", "short"))
    assert isinstance(c.until_done()[0], H.OptionError) and c.hs.state == H.OPTIONS
    c.send(H.Go("nope", ()))
    assert c.until_done()[0].code == P.REP_ERR_UNKNOWN
    c.send(H.SetMetaContext("d", (P.META_BASE_ALLOCATION,)))     # before structured replies
    assert c.until_done()[0].code == P.REP_ERR_INVALID
    c.send(H.StartTLS())                                         # no credentials on this server
    assert c.until_done()[0].code == P.REP_ERR_POLICY
    c.send(H.Go("d", ()))
    assert isinstance(c.until_done()[-1], H.Ack)
    c.buf = c.hs.trailing_data()
    c.request(P.CMD_READ, 1, 0, 16)
    assert c.reply(16)[:2] == (1, 0)
    c.close()


def test_unknown_client_flags_close(server, disk):
    s = _raw(server)
    assert len(s.recv(18)) == 18
    s.sendall(P.CLIENT_FLAGS.pack(0x80))
    assert _recv_all(s) == b""
    s.close()
    _still_serves(server, disk)


def test_export_name_of_a_missing_export_closes(server, disk):
    c = RawClient(server.sock_path)
    c.event()
    c.send(H.ClientFlags())
    c.send(H.ExportName("missing"))
    _closed(c)
    _still_serves(server, disk)


def test_request_errors_are_answered_and_the_connection_continues(server, disk):
    c = RawClient(server.sock_path).go("d")
    size = c.size
    cases = [
        (P.CMD_READ, 0, size - 10, 20, P.NBD_EINVAL),           # past the end
        (P.CMD_WRITE_ZEROES, 0, size, 1, P.NBD_ENOSPC),         # write-type past the end
        (P.CMD_READ, 0, 0, P.MAX_PAYLOAD + 1, P.NBD_EINVAL),    # over 32 MiB
        (P.CMD_READ, P.CMD_FLAG_FUA, 0, 512, P.NBD_EINVAL),     # a flag READ does not take
        (42, 0, 0, 512, P.NBD_EINVAL),                          # unknown command
        (P.CMD_READ, 0, 0, 0, P.NBD_EINVAL),                    # zero length
        (P.CMD_READ, 0, (1 << 64) - 512, 1024, P.NBD_EINVAL),  # offset + length wraps
    ]
    for i, (cmd, flags, off, n, err) in enumerate(cases):
        c.request(cmd, i, off, n, flags)
        handle, got, _ = c.reply()
        assert (handle, got) == (i, err), (cmd, flags, off, n)
    c.request(P.CMD_WRITE, 50, 0, 8, 0, data=b"12345678")
    c.request(P.CMD_WRITE, 51, size, 8, 0, data=b"abcdefgh")  # past the end: payload consumed, ENOSPC
    assert sorted(c.reply()[:2] for _ in range(2)) == [(50, 0), (51, P.NBD_ENOSPC)]
    c.request(P.CMD_READ, 52, 0, 8)
    assert c.reply(8) == (52, 0, b"12345678")
    c.request(P.CMD_WRITE_ZEROES, 53, 0, 4, P.CMD_FLAG_FAST_ZERO)   # never promised fast: refused at once
    assert c.reply()[:2] == (53, P.NBD_ENOTSUP)
    c.request(P.CMD_WRITE_ZEROES, 54, 0, 4, P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FUA)
    c.request(P.CMD_READ, 55, 0, 8)
    assert c.reply() == (54, 0, b"") and c.reply(8) == (55, 0, bytes(4) + b"5678")
    c.close()


def test_wrong_request_magic_closes_only_that_connection(server, disk):
    other = RawClient(server.sock_path).go("d")
    c = RawClient(server.sock_path).go("d")
    c.s.sendall(b"\x12\x34\x56\x78" + bytes(24))
    _closed(c)
    other.request(P.CMD_READ, 5, 0, 4096)
    assert other.reply(4096)[:2] == (5, 0)
    other.close()


def test_oversized_write_closes_the_connection(server, disk):
    c = RawClient(server.sock_path).go("d")
    c.request(P.CMD_WRITE, 1, 0, 64 << 20)          # no payload follows: the server must not wait for it
    _closed(c)
    _still_serves(server, disk)


def test_client_vanishing_mid_request(server, disk):
    before = open(disk, "rb").read(8192)
    c = RawClient(server.sock_path).go("d")
    c.s.sendall(T.pack_request(P.CMD_WRITE, 1, 0, 8192) + b"\xee" * 3000)   # half a payload
    c.close()
    c = RawClient(server.sock_path).go("d")
    c.s.sendall(T.pack_request(P.CMD_READ, 2, 0, 1 << 20))                  # then leaves before the reply
    c.close()
    c = RawClient(server.sock_path).go("d")
    c.s.sendall(T.pack_request(P.CMD_READ, 3, 0, 512)[:11])                 # half a header
    c.close()
    assert open(disk, "rb").read(8192) == before     # the unfinished write was never acknowledged or done
    _still_serves(server, disk)
    server.wait_connections(lambda n: n == 0, timeout=30)
    assert server.connections == 0


def test_more_clients_than_allowed(tmp_path):
    sock = str(tmp_path / "lim.sock")
    srv = pyrep.nbd_server_start({"type": "unix", "path": sock}, max_connections=2)
    try:
        node, path = raw_node(tmp_path, 1 << 20)
        pyrep.export_add(node, name="d")
        a = RawClient(sock).go("d")
        b = RawClient(sock).go("d")
        extra = RawClient(sock)
        with pytest.raises(CLOSED):
            extra.event()
        extra.close()
        for i, c in enumerate((a, b)):
            c.request(P.CMD_READ, i, 0, 512)
            assert c.reply(512)[:2] == (i, 0)
        a.request(P.CMD_DISC, 9, 0, 0)
        a.close()
        assert srv.wait_connections(lambda n: n == 1, timeout=30)
        c = RawClient(sock).go("d")              # a slot is free again
        c.close()
        b.close()
    finally:
        pyrep.nbd_server_stop(timeout=60)


def test_block_status_reports_allocation(server, tmp_path):
    path = tmp_path / "bs.raw"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(b"\x01" * (1 << 20))
    node = pyrep.blockdev_add({"driver": "raw", "node-name": "bs",
                               "file": {"driver": "file", "filename": str(path)}})
    pyrep.export_add(node)
    c = RawClient(server.sock_path).go("bs")
    c.request(P.CMD_BLOCK_STATUS, 1, 0, 4 << 20)
    handle, err, chunks = c.reply()
    assert (handle, err) == (1, 0) and chunks[0].context_id == 1
    ext = chunks[0].extents
    assert sum(n for n, _ in ext) == 4 << 20
    pos, state_at = 0, {}
    for n, st in ext:
        state_at[pos] = st
        pos += n
    assert any(s == 0 for s in state_at.values())                               # the data
    assert any(s == P.STATE_HOLE | P.STATE_ZERO for s in state_at.values())    # the holes
    c.request(P.CMD_BLOCK_STATUS, 2, 0, 4 << 20, P.CMD_FLAG_REQ_ONE)
    assert len(c.reply()[2][0].extents) == 1
    c.close()
    # without a negotiated context the command is refused
    c = RawClient(server.sock_path).go("bs", meta=False)
    c.request(P.CMD_BLOCK_STATUS, 3, 0, 4096)
    assert c.reply()[:2] == (3, P.NBD_EINVAL)
    c.close()


def test_simple_replies_without_structured(server, disk):
    c = RawClient(server.sock_path).go("d", structured=False)
    c.request(P.CMD_READ, 1, 0, 4096)
    assert c.reply(4096) == (1, 0, open(disk, "rb").read(4096))
    c.request(P.CMD_READ, 2, 0, 4096, P.CMD_FLAG_DF)          # DF needs structured replies
    assert c.reply()[:2] == (2, P.NBD_EINVAL)
    c.request(P.CMD_FLUSH, 3, 0, 0)
    assert c.reply()[:2] == (3, 0)
    c.close()


def test_export_name_path_without_zeroes(server, disk):
    c = RawClient(server.sock_path)
    c.event()
    c.send(H.ClientFlags())
    c.send(H.ExportName("d"))
    ev = c.event()
    assert isinstance(ev, H.ExportNameReply) and ev.size == 1 << 20
    c.buf = c.hs.trailing_data()
    c.request(P.CMD_READ, 1, 0, 512)
    assert c.reply(512) == (1, 0, open(disk, "rb").read(512))
    c.close()


def test_trailing_requests_sent_with_go_are_served(server, disk):
    """A client may pipeline its first request right behind GO: the negotiation's leftover bytes
    reach the transmission loop."""
    c = RawClient(server.sock_path)
    c.event()
    c.send(H.ClientFlags())
    c.s.sendall(c.hs.send(H.Go("d", ())) + T.pack_request(P.CMD_READ, 8, 0, 64))
    assert isinstance(c.until_done()[-1], H.Ack)
    c.buf = c.hs.trailing_data()
    assert c.reply(64) == (8, 0, open(disk, "rb").read(64))
    c.close()
