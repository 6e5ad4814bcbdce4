"""The NBD client over TLS against qemu-nbd: x509 credentials made by openssl, verified both ways
(qemu-nbd checks our client certificate, we check its certificate against tls-hostname)."""
import errno

import pytest

import pyrep
from helpers import nbd_peers
from pki import make_pki

MiB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """One CA, server and client certificates, and a client of another CA, for the whole module."""
    return make_pki(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture(autouse=True)
def _drop_objects():
    yield
    for oid in list(pyrep.objects.objects()):
        pyrep.object_del(oid)


@pytest.fixture
def tls_server(tmp_path, pki):
    img = tmp_path / "d.raw"
    img.write_bytes(b"\x3c" * MiB)
    return nbd_peers.qemu_nbd(tmp_path, img, extra=(
        "--object", f"tls-creds-x509,id=tls0,dir={pki['server']},endpoint=server,verify-peer=on",
        "--tls-creds", "tls0"))


def _client_creds(pki, which="client", id="tlsc"):
    pyrep.object_add("tls-creds-x509", id=id, dir=pki[which], endpoint="client")
    return id


def test_tls_reads_writes_and_a_hostname_check(tls_server, pki):
    creds = _client_creds(pki)
    blk = pyrep.open_backend(tls_server.opts(**{"tls-creds": creds, "tls-hostname": "localhost"}))
    assert blk.node.filename.startswith("nbds+unix:///disk?socket=")
    assert blk.pread(0, 4) == b"\x3c" * 4
    blk.pwrite(4096, b"\x99" * 100000)
    blk.flush()
    assert blk.pread(4000, 100200) == b"\x3c" * 96 + b"\x99" * 100000 + b"\x3c" * 104
    blk.close()
    # the same export by URI
    blk = pyrep.open_backend({"driver": "nbd", "filename": f"nbds+unix:///disk?socket={tls_server.sock}",
                              "tls-creds": creds, "tls-hostname": "localhost"})
    assert blk.pread(4096, 2) == b"\x99\x99"


def test_tls_many_threads_on_one_connection(tls_server, pki):
    """The reader thread and 8 writer threads share one TLS session (it lives in memory BIOs)."""
    from helpers.threads import run_in_threads
    blk = pyrep.open_backend(tls_server.opts(**{"tls-creds": _client_creds(pki), "tls-hostname": "localhost"}))

    def worker(t):
        for i in range(30):
            off = (i * 8 + t) * 4096
            blk.pwrite(off, bytes([t + 1]) * 4096)
            assert blk.pread(off, 4096) == bytes([t + 1]) * 4096
    assert not run_in_threads(worker, [(t,) for t in range(8)])


def test_wrong_ca_is_refused(tls_server, pki):
    creds = _client_creds(pki, "rogue")           # trusts another CA: qemu-nbd's certificate fails
    with pytest.raises(pyrep.BlockError) as e:
        pyrep.open_backend(tls_server.opts(**{"tls-creds": creds, "tls-hostname": "localhost"}))
    assert "certificate verify failed" in str(e.value)


def test_wrong_hostname_is_refused(tls_server, pki):
    with pytest.raises(pyrep.BlockError) as e:
        pyrep.open_backend(tls_server.opts(**{"tls-creds": _client_creds(pki), "tls-hostname": "elsewhere"}))
    assert "elsewhere" in str(e.value) or "hostname" in str(e.value).lower()


def test_plaintext_client_is_refused_by_a_tls_server(tls_server):
    with pytest.raises(pyrep.BlockError) as e:
        pyrep.open_backend(tls_server.opts())
    assert e.value.errno == errno.EACCES and "requires TLS" in str(e.value)


def test_tls_over_unix_needs_a_hostname(tls_server, pki):
    with pytest.raises(pyrep.OptionError) as e:
        pyrep.open_backend(tls_server.opts(**{"tls-creds": _client_creds(pki)}))
    assert "tls-hostname" in str(e.value)


def test_server_endpoint_creds_are_refused(tls_server, pki):
    pyrep.object_add("tls-creds-x509", id="srv", dir=pki["server"], endpoint="server")
    with pytest.raises(pyrep.OptionError) as e:
        pyrep.open_backend(tls_server.opts(**{"tls-creds": "srv", "tls-hostname": "localhost"}))
    assert "endpoint" in str(e.value) and "tls-creds" in str(e.value)


def test_server_refuses_a_client_certificate_of_another_ca(tls_server, pki, tmp_path):
    """The other way: we trust qemu-nbd, but present a certificate its CA did not sign (verify-peer=on)."""
    import shutil
    d = tmp_path / "mixed"
    d.mkdir()
    shutil.copy(f"{pki['client']}/ca-cert.pem", d / "ca-cert.pem")
    for name in ("client-cert.pem", "client-key.pem"):
        shutil.copy(f"{pki['rogue']}/{name}", d / name)
    pyrep.object_add("tls-creds-x509", id="mixed", dir=str(d), endpoint="client")
    with pytest.raises(pyrep.BlockError) as e:
        pyrep.open_backend(tls_server.opts(**{"tls-creds": "mixed", "tls-hostname": "localhost"}))
    assert "disk" in str(e.value) and tls_server.sock in str(e.value)
