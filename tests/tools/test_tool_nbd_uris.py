"""pyrep-img and pyrep-io take NBD URIs wherever they take a filename, judged against qemu-img and
qemu-io on the same export of a real qemu-nbd (started here, stopped by the fixtures)."""
import socket

import pytest

from helpers.nbd_peers import Peer, qemu_nbd
from helpers.referees import needs, pimg, pio, qimg, run

pytestmark = needs("qemu-img", "qemu-io", "qemu-nbd")


@pytest.fixture
def image(tmp_path):
    """A 4 MiB qcow2 with data at 0 (64k of 0x11) and 1 MiB (128k of 0x22), zeroes at 3 MiB."""
    img = tmp_path / "disk.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "4M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 1M 128k",
        "-c", "write -z 3M 64k", img)
    return img


@pytest.fixture
def unix_export(tmp_path, image):
    """The image's bytes exported by qemu-nbd on a Unix socket: the URI names a qcow2 over NBD."""
    peer = qemu_nbd(tmp_path, image, fmt="raw", export="disk")
    yield peer.uri("disk")
    peer.stop()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tcp_export(tmp_path, image):
    """The same over TCP on 127.0.0.1, a port free at run time."""
    port = _free_port()
    pidfile = tmp_path / "tcp.pid"
    argv = ["qemu-nbd", "--fork", "--pid-file", str(pidfile), "-t", "-e", "16", "-b", "127.0.0.1", "-p", str(port),
            "-x", "exp", "-f", "raw", "--cache=writeback", str(image)]
    peer = Peer(argv, tmp_path / "tcp.unused", pidfile, "qemu-nbd-tcp").start()
    yield f"nbd://127.0.0.1:{port}/exp"
    peer.stop()


@pytest.fixture(params=["unix", "tcp"])
def uri(request):
    return request.getfixturevalue(f"{request.param}_export")


def test_info_and_map_like_qemu_img(uri):
    for cmd in (["info"], ["info", "--output=json"], ["map", "--output=json"], ["check"]):
        theirs, mine = qimg(*cmd, uri), pimg(*cmd, uri)
        assert (mine.returncode, mine.stdout) == (0, theirs.stdout), (cmd, mine.stderr)


def test_compare_and_convert_from_an_export(uri, image, tmp_path):
    p = pimg("compare", "-U", uri, image)           # -U: qemu-nbd holds the image's lock
    assert (p.returncode, p.stdout) == (0, "Images are identical.\n"), p.stderr
    out = tmp_path / "copy.qcow2"
    p = pimg("convert", "-O", "qcow2", uri, out)
    assert p.returncode == 0, p.stderr
    qimg("compare", "-U", "-f", "qcow2", "-F", "qcow2", image, out)


def test_image_opts_and_json_name_an_export(unix_export):
    sock = unix_export.split("socket=")[1]
    json_name = (f'json:{{"driver": "qcow2", "file": {{"driver": "nbd", "server": {{"type": "unix", "path": "{sock}"}}, '
                 f'"export": "disk"}}}}')
    drop = lambda out: [line for line in out.splitlines() if " ops; " not in line]  # noqa: E731 (timings)
    opts = f"driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path={sock},file.export=disk"
    for args in (["--image-opts", opts], [json_name]):
        p = pio("-c", "read -P 0x22 1M 128k", "-c", "map", *args)
        assert p.returncode == 0, p.stderr
        q = run("qemu-io", "-c", "read -P 0x22 1M 128k", "-c", "map", *args)
        assert drop(p.stdout) == drop(q.stdout)
    # issue 9: a file.filename that is a URI picks its protocol (qemu-io 7.2 takes it for a local file, and
    # its nbd driver reads no URI from options: "NBD server address missing")
    for opts in (f"driver=qcow2,file.filename={unix_export}", f"driver=qcow2,file.driver=nbd,file.filename={unix_export}",
                 f"file.filename={unix_export}"):      # the last: qcow2 probed through the export
        p = pio("--image-opts", "-c", "read -P 0x11 0 64k", "-c", "info", opts)
        assert p.returncode == 0, p.stderr
        assert "format name: qcow2" in p.stdout


@pytest.fixture
def raw_export(tmp_path):
    """A 4 MiB raw image over NBD (a qcow2 over NBD cannot grow past the export's size, in QEMU neither)."""
    img = tmp_path / "disk.raw"
    qimg("create", "-q", "-f", "raw", img, "4M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 64k", img)
    peer = qemu_nbd(tmp_path, img, fmt="raw", export="disk")
    yield img, peer
    peer.stop()


def test_pyrep_io_writes_through_an_export(raw_export):
    img, peer = raw_export
    p = pio("-c", "write -P 0x33 2M 64k", "-c", "aio_write -P 0x44 2176k 64k", "-c", "aio_flush",
            "-c", "write -z 0 4k", "-c", "flush", "-c", "read -P 0x33 2M 64k", "-c", "read -P 0x11 4k 60k",
            peer.uri())
    assert p.returncode == 0, p.stderr
    run("qemu-io", "-c", "read -P 0x33 2M 64k", "-c", "read -P 0x44 2176k 64k", "-c", "read -P 0 0 4k", peer.uri())
    peer.stop()
    run("qemu-io", "-f", "raw", "-c", "read -P 0x33 2M 64k", "-c", "read -P 0x44 2176k 64k", "-c", "read -P 0 0 4k",
        "-c", "read -P 0x11 4k 60k", img)
