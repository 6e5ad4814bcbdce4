"""The server going away never hangs a caller: requests fail with EIO (no reconnect-delay, or the delay
passed), or wait for a reconnect and resume with nothing lost. Real servers, really killed."""
import errno
import random
import threading

import pytest

import pyrep
from helpers import nbd_peers
from helpers.nbd_peers import log_has, wait_for
from helpers.threads import run_in_threads, spawn

MiB = 1 << 20
_JOIN = 60          # far beyond any bound below: a thread still alive then is a hang


def _call_in_thread(fn):
    """Run ``fn`` on a worker; returns (worker, result dict with 'value' or 'error'): the tests expect
    some of these calls to fail and check how."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e
    return spawn(run), out


def _kill_with_a_read_in_flight(tmp_path, **opts):
    """Open an nbdkit export that holds every read for a minute, send a read from a thread, kill the
    server once the read reached it (and, with a reconnect-delay, once the client noticed).
    Returns (backend, client, reader thread, its result dict)."""
    log = tmp_path / "nbdkit.log"
    peer = nbd_peers.nbdkit(tmp_path, "memory", "4M", f"logfile={log}", "delay-read=60", filters=("log", "delay"))
    blk = pyrep.open_backend(peer.opts(**opts))
    client = blk.node.driver.client
    t, out = _call_in_thread(lambda: blk.pread(0, 4096))
    wait_for(log_has(log, "Read id="), "the read to reach the server")
    peer.kill()
    if opts.get("reconnect-delay"):
        wait_for(lambda: client.state == "reconnecting", "the client to notice")
    return blk, client, t, out


def test_server_killed_requests_in_flight_fail_with_eio(tmp_path):
    blk, client, t, out = _kill_with_a_read_in_flight(tmp_path)
    t.join(_JOIN)
    assert not t.is_alive()
    assert isinstance(out.get("error"), pyrep.BlockError) and out["error"].errno == errno.EIO
    assert "connection lost" in str(out["error"])
    with pytest.raises(pyrep.BlockError) as e:         # later requests fail at once
        blk.pwrite(0, b"x")
    assert e.value.errno == errno.EIO


def test_server_gone_for_longer_than_reconnect_delay(tmp_path):
    blk, client, t, out = _kill_with_a_read_in_flight(tmp_path, **{"reconnect-delay": 1})
    t2, out2 = _call_in_thread(lambda: blk.pwrite(0, b"late"))      # sent while the server is away
    for th in (t, t2):
        th.join(_JOIN)
        assert not th.is_alive()
    for o in (out, out2):
        assert isinstance(o.get("error"), pyrep.BlockError) and o["error"].errno == errno.EIO, o
        assert "reconnect-delay" in str(o["error"])
    assert client.state == "failed"
    with pytest.raises(pyrep.BlockError):
        blk.pread(0, 1)


def _holding_writes(tmp_path):
    """An nbdkit export of a 4 MiB file that holds every write for a minute, opened with a
    reconnect-delay of 60 s: (image path, nbdkit log path, peer, backend, client)."""
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(4 * MiB))
    log = tmp_path / "nbdkit.log"
    peer = nbd_peers.nbdkit(tmp_path, "file", str(img), f"logfile={log}", "delay-write=60",
                            filters=("log", "delay"))
    blk = pyrep.open_backend(peer.opts(**{"reconnect-delay": 60}))
    return img, log, peer, blk, blk.node.driver.client


def test_server_back_within_reconnect_delay_resends_what_was_in_flight(tmp_path):
    """A write held by the server when it dies is sent again to the restarted server, and writes issued
    while it was away wait and go through: all of them are on disk afterwards."""
    img, log, peer, blk, client = _holding_writes(tmp_path)
    t1, out1 = _call_in_thread(lambda: blk.pwrite(MiB, b"\xa1" * 65536))
    wait_for(log_has(log, "Write id="), "the write to reach the server")
    peer.kill()
    wait_for(lambda: client.state == "reconnecting", "the client to notice")
    t2, out2 = _call_in_thread(lambda: blk.pwrite(2 * MiB, b"\xb2" * 4096))
    t3, out3 = _call_in_thread(lambda: blk.pread(0, 4))
    wait_for(lambda: len(client._inflight) == 3, "three requests waiting")
    again = nbd_peers.nbdkit(tmp_path, "file", str(img), name="nbdkit")      # same socket, no delay
    for th in (t1, t2, t3):
        th.join(_JOIN)
        assert not th.is_alive()
    assert "error" not in out1 and "error" not in out2 and out3["value"] == bytes(4), (out1, out2, out3)
    assert client.reconnects == 1 and client.state == "connected"
    blk.flush()
    blk.close()
    again.stop()
    data = img.read_bytes()
    assert data[MiB:MiB + 65536] == b"\xa1" * 65536 and data[2 * MiB:2 * MiB + 4096] == b"\xb2" * 4096


def test_a_batch_in_flight_and_one_sent_while_away_are_resent_once(tmp_path):
    """``write_batch``: a batch held by the dying server and one issued while it is away both reach the
    restarted server (each request once: a duplicate would be a reply for an unknown cookie)."""
    img, log, peer, blk, client = _holding_writes(tmp_path)

    def batch(base, fill):
        return lambda: client.write_batch([(base + i * 65536, 4096, pyrep.IOVector(bytes([fill + i]) * 4096), False)
                                           for i in range(4)])
    t1, out1 = _call_in_thread(batch(0, 0x10))
    wait_for(lambda: log.read_text().count(" Write id=") == 4, "the batch to reach the server")
    peer.kill()
    wait_for(lambda: client.state == "reconnecting", "the client to notice")
    t2, out2 = _call_in_thread(batch(MiB, 0x20))
    wait_for(lambda: len(client._inflight) == 8, "both batches waiting")
    again = nbd_peers.nbdkit(tmp_path, "file", str(img), name="nbdkit")
    for th in (t1, t2):
        th.join(_JOIN)
        assert not th.is_alive()
    assert out1.get("value") == [None] * 4 and out2.get("value") == [None] * 4, (out1, out2)
    assert client.reconnects == 1 and client.state == "connected"
    blk.flush()
    blk.close()
    again.stop()
    data = img.read_bytes()
    for base, fill in ((0, 0x10), (MiB, 0x20)):
        for i in range(4):
            assert data[base + i * 65536:base + i * 65536 + 4096] == bytes([fill + i]) * 4096


def test_16_threads_carry_on_across_a_server_restart(tmp_path):
    """qemu-nbd is killed while 16 threads write and read against a model; restarted, every thread
    finishes without an error and the disk holds exactly the model."""
    size, nthreads, block = 8 * MiB, 16, 4096
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(size))
    peer = nbd_peers.qemu_nbd(tmp_path, img)
    blk = pyrep.open_backend(peer.opts(**{"reconnect-delay": 60}))
    client = blk.node.driver.client
    model = bytearray(size)
    done = [0] * nthreads
    restarted = threading.Event()

    def worker(t):
        rng = random.Random(t)
        mine = list(range(t, size // block, nthreads))
        i = 0
        while i < 100 or not restarted.is_set():
            if i > 5000:
                raise AssertionError("the restart never came")
            off = rng.choice(mine) * block
            if rng.random() < 0.6:
                data = rng.randbytes(block)
                blk.pwrite(off, data)
                model[off:off + block] = data       # each thread owns its blocks: no lock needed
            else:
                assert blk.pread(off, block) == model[off:off + block]
            i += 1
            done[t] = i

    runner = spawn(run_in_threads, worker, [(t,) for t in range(nthreads)])
    try:
        wait_for(lambda: min(done) >= 20, "every thread to get going")
        peer.kill()
        wait_for(lambda: client.state == "reconnecting", "the client to notice")
        nbd_peers.qemu_nbd(tmp_path, img)
    finally:
        restarted.set()
        runner.join(_JOIN * 2)                  # re-raises what a worker raised
    assert client.reconnects == 1
    assert blk.pread(0, size) == bytes(model)
    blk.close()
    assert img.read_bytes() == bytes(model)


def test_close_while_reconnecting_fails_waiters_at_once(tmp_path):
    blk, client, t, out = _kill_with_a_read_in_flight(tmp_path, **{"reconnect-delay": 3600})
    client.close()
    t.join(_JOIN)
    assert not t.is_alive() and out["error"].errno == errno.EIO
    assert client.state == "closed"


def test_export_back_with_another_size_is_refused(tmp_path):
    blk, client, t, out = _kill_with_a_read_in_flight(tmp_path, **{"reconnect-delay": 60})
    nbd_peers.nbdkit(tmp_path, "memory", "8M")              # same socket, twice the size
    t.join(_JOIN)
    assert not t.is_alive() and out["error"].errno == errno.EIO and "another size" in str(out["error"])
