"""Fuzzing the server's handshake and request parsing with random and mutated valid streams.

Thousands of connections, each a byte stream sent blind (the client half-closes, then reads until the
server closes): the server must close every one of them (no hang), log no unexpected error, keep
accepting, and serve a witness client on another export correctly throughout."""
import logging
import os
import random
import socket
import time

import pytest

import pyrep
from nbd_testlib import RawClient, raw_node, server  # noqa: F401 - fixtures
from pyrep.nbd import handshake as H
from pyrep.nbd import proto as P
from pyrep.nbd import transmission as T

CASES = 3000
TIME_BUDGET = 90.0      # a bound on the loop, not a performance assertion: fewer cases on a slow machine


def _valid_stream(rng):
    """Bytes a correct client could send (it never waits for replies, the server must cope)."""
    c = H.Handshake(H.CLIENT)
    c.receive_data(P.GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
    c.next_event()
    out = [c.send(H.ClientFlags(rng.choice([0, 1, 3])))]
    opts = []
    if rng.random() < 0.7:
        opts.append(H.StructuredReply())
        if rng.random() < 0.6:
            opts.append(H.SetMetaContext("f", (P.META_BASE_ALLOCATION,)))
    if rng.random() < 0.3:
        opts.append(H.List())
    if rng.random() < 0.2:
        opts.append(H.Info("f", (P.INFO_BLOCK_SIZE, P.INFO_DESCRIPTION)))
    if rng.random() < 0.1:
        opts.append(H.UnknownOption(rng.randrange(11, 1 << 32), os.urandom(rng.randrange(0, 40))))
    for o in opts:
        out.append(P.OPTION_HEADER.pack(P.IHAVEOPT, o.code, len(H._option_data(o))) + H._option_data(o))
    if rng.random() < 0.15:
        data = b"f"
        out.append(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_EXPORT_NAME, len(data)) + data)
    else:
        go = H.Go("f", ())
        d = H._option_data(go)
        out.append(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_GO, len(d)) + d)
    for h in range(rng.randrange(0, 12)):
        cmd = rng.choice([P.CMD_READ, P.CMD_WRITE, P.CMD_FLUSH, P.CMD_TRIM, P.CMD_WRITE_ZEROES,
                          P.CMD_BLOCK_STATUS, P.CMD_CACHE, P.CMD_READ, P.CMD_WRITE])
        off = rng.choice([0, rng.randrange(0, 1 << 20), (1 << 20) - 512])
        n = rng.choice([1, 512, 4096, rng.randrange(1, 70000)])
        flags = rng.choice([0, 0, 0, P.CMD_FLAG_FUA, P.CMD_FLAG_REQ_ONE, P.CMD_FLAG_NO_HOLE])
        out.append(T.pack_request(cmd, h, off, n, flags))
        if cmd == P.CMD_WRITE:
            out.append(bytes([h]) * n)
    if rng.random() < 0.5:
        out.append(T.pack_request(P.CMD_DISC, 99, 0, 0))
    return b"".join(out)


def _mutate(rng, data):
    b = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        if not b:
            break
        kind = rng.randrange(5)
        i = rng.randrange(len(b))
        if kind == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif kind == 1:
            b[i:i + 4] = os.urandom(4)
        elif kind == 2:
            del b[i:i + rng.randrange(1, 64)]
        elif kind == 3:
            b[i:i] = os.urandom(rng.randrange(1, 64))
        else:
            j = rng.randrange(len(b))
            b[i:i] = b[j:j + rng.randrange(1, 128)]
    if rng.random() < 0.2:
        del b[rng.randrange(len(b) + 1):]
    return bytes(b)


def _case(path, data):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    try:
        s.connect(path)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass                        # the server closed first: fine
        while True:
            try:
                if not s.recv(1 << 20):
                    return
            except ConnectionResetError:
                return
            except socket.timeout:
                pytest.fail("the server neither answered nor closed a fuzzed connection within 20 s")
    finally:
        s.close()


def test_fuzzed_streams_never_hurt_the_server(tmp_path, server, caplog):
    caplog.set_level(logging.ERROR, logger="pyrep.nbd.server")
    fnode, _ = raw_node(tmp_path, 1 << 20, name="fz")
    pyrep.export_add(fnode, name="f", writable=True, description="fuzz")
    wnode, wpath = raw_node(tmp_path, 1 << 20, name="wt", data=os.urandom(1 << 16))
    pyrep.export_add(wnode, name="w", writable=True)
    witness = RawClient(server.sock_path).go("w")
    expect = bytearray(open(wpath, "rb").read(1 << 16))
    rng = random.Random(12)
    start = time.monotonic()
    done = 0
    for i in range(CASES):
        if time.monotonic() - start > TIME_BUDGET:
            break
        r = rng.random()
        if r < 0.1:
            data = os.urandom(rng.randrange(0, 400))
        elif r < 0.25:
            data = _valid_stream(rng)
        else:
            data = _mutate(rng, _valid_stream(rng))
        _case(server.sock_path, data)
        done += 1
        if i % 100 == 0:            # the witness keeps being served correctly
            off = rng.randrange(0, (1 << 16) - 4096)
            blob = os.urandom(4096)
            witness.request(P.CMD_WRITE, i, off, 4096, data=blob)
            assert witness.reply() == (i, 0, b"")
            expect[off:off + 4096] = blob
            witness.request(P.CMD_READ, i + 1, 0, 1 << 16)
            assert witness.reply(1 << 16) == (i + 1, 0, bytes(expect))
    assert done >= 500, f"only {done} cases ran in {TIME_BUDGET} s"
    assert [r.getMessage() for r in caplog.records] == []
    witness.close()
    assert server.wait_connections(lambda n: n == 0, timeout=60)
    c = RawClient(server.sock_path).go("w")
    c.request(P.CMD_READ, 1, 0, 1 << 16)
    assert c.reply(1 << 16) == (1, 0, bytes(expect))
    c.close()
