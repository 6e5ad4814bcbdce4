"""TLS on the NBD server: x509 credentials made by openssl, real clients (nbdinfo, qemu-io)."""
import json

import pytest

import pyrep
from nbd_testlib import RawClient, pyrep_nbd, raw_node, run, uri  # noqa: F401 - fixtures
from pki import make_pki
from pyrep.nbd import handshake as H
from pyrep.nbd import proto as P


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture
def tls_server(tmp_path, pki):
    pyrep.object_add("tls-creds-x509", id="tls0", dir=pki["server"], endpoint="server", verify_peer=True)
    sock = str(tmp_path / "tls.sock")
    srv = pyrep.nbd_server_start({"type": "unix", "path": sock}, tls_creds="tls0")
    srv.sock_path = sock
    node, path = raw_node(tmp_path, 4 << 20)
    pyrep.export_add(node, writable=True)
    yield srv
    pyrep.nbd_server_stop(timeout=60)
    pyrep.object_del("tls0")


def tls_uri(sock, certs):
    return f"nbds+unix:///d0?socket={sock}&tls-certificates={certs}"


def test_nbdinfo_over_tls(tls_server, pki):
    info = json.loads(run("nbdinfo", "--json", tls_uri(tls_server.sock_path, pki["client"])).stdout)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == 4 << 20


def test_qemu_io_over_tls_writes_and_reads(tls_server, pki):
    obj = f"tls-creds-x509,id=c0,dir={pki['client']},endpoint=client"
    img = (f"driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={tls_server.sock_path},"
           f"file.export=d0,file.tls-creds=c0,file.tls-hostname=localhost")
    run("qemu-io", "--object", obj, "--image-opts", img, "-c", "write -P 0x3c 64k 128k")
    out = run("qemu-io", "--object", obj, "--image-opts", img, "-c", "read -P 0x3c 64k 128k").stdout
    assert "read 131072/131072" in out


def test_plaintext_client_is_refused_with_tls_reqd(tls_server):
    p = run("nbdinfo", uri(tls_server.sock_path, "d0"), check=False)
    assert p.returncode != 0
    c = RawClient(tls_server.sock_path)
    c.event()
    c.send(H.ClientFlags())
    for ev in (H.Go("d0", ()), H.List(), H.StructuredReply(), H.Info("d0", ())):
        c.send(ev)
        r = c.until_done()
        assert r == [H.OptionError(P.REP_ERR_TLS_REQD, "TLS is required on this server", ev.code)]
    c.send(H.ExportName("d0"))          # no error reply is possible here: the server closes
    with pytest.raises((EOFError, ConnectionError, P.ProtocolError)):
        c.event()
    c.close()


def test_wrong_ca_is_refused_and_the_server_carries_on(tls_server, pki):
    p = run("nbdinfo", "--json", tls_uri(tls_server.sock_path, pki["rogue"]), check=False)
    assert p.returncode != 0
    info = json.loads(run("nbdinfo", "--json", tls_uri(tls_server.sock_path, pki["client"])).stdout)
    assert info["TLS"] is True


def test_pyrep_nbd_with_tls_object(tmp_path, pki, pyrep_nbd):
    img = tmp_path / "t.raw"
    img.write_bytes(b"\x7e" * (1 << 20))
    sock = str(tmp_path / "t.sock")
    srv = pyrep_nbd("--object", f"tls-creds-x509,id=t0,dir={pki['server']},endpoint=server",
                    "--tls-creds", "t0", "-f", "raw", "-x", "d0", "-k", sock, img)
    info = json.loads(run("nbdinfo", "--json", tls_uri(sock, pki["client"])).stdout)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == 1 << 20
    assert srv.stop() == 0        # not persistent: it exits by itself after the client leaves, or on SIGTERM


def test_object_add_checks_the_directory(tmp_path, pki):
    with pytest.raises(pyrep.OptionError, match="missing .*server-cert.pem"):
        pyrep.object_add("tls-creds-x509", id="bad", dir=pki["client"], endpoint="server")
    with pytest.raises(pyrep.OptionError, match="unknown property 'colour'"):
        pyrep.object_add("tls-creds-x509", id="bad", dir=pki["client"], colour="red")
    c = pyrep.object_add("tls-creds-x509", id="c1", dir=pki["client"], endpoint="client")
    try:
        assert pyrep.lookup_object("c1") is c
        with pytest.raises(pyrep.OptionError, match="duplicate"):
            pyrep.object_add("tls-creds-x509", id="c1", dir=pki["client"])
        with pytest.raises(pyrep.OptionError, match="endpoint 'client'"):
            pyrep.nbd_server_start({"type": "unix", "path": str(tmp_path / "x.sock")}, tls_creds="c1")
    finally:
        pyrep.object_del("c1")
    with pytest.raises(pyrep.OptionError, match="no object"):
        pyrep.lookup_object("c1")


def test_pyrep_nbd_list_over_tls(tls_server, pki):
    import sys
    out = run(sys.executable, "-m", "pyrep.tools.nbd", "-L", "-k", tls_server.sock_path,
              "--object", f"tls-creds-x509,id=c9,dir={pki['client']},endpoint=client", "--tls-creds", "c9").stdout
    assert " export: 'd0'" in out and f"size:  {4 << 20}" in out
    p = run(sys.executable, "-m", "pyrep.tools.nbd", "-L", "-k", tls_server.sock_path, check=False)
    assert p.returncode == 1 and "requires TLS" in p.stderr and "Traceback" not in p.stderr
