"""pyrep-io against qemu-io: the common commands, interactive mode, image names, messages."""
import os
import re
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(shutil.which("qemu-io") is None or shutil.which("qemu-img") is None,
                                reason="qemu-io/qemu-img not installed")

RATE = re.compile(r"^\S+ \S+, \d+ ops; .* ops/sec\)$")     # the timing line: differs run to run


def run(tool, *args, cwd=None, input=None, stdout=subprocess.PIPE):
    cmd = ["qemu-io"] if tool == "qemu-io" else [sys.executable, "-m", "pyrep.tools.io"]
    return subprocess.run(cmd + [str(a) for a in args], stdout=stdout, stderr=subprocess.PIPE, text=True,
                          cwd=cwd, input=input)


def both(*args, cwd=None, input=None):
    """Run qemu-io and pyrep-io on copies of the same images; (theirs, mine), timing lines dropped."""
    out = []
    for tool in ("qemu-io", "pyrep-io"):
        p = run(tool, *args, cwd=cwd / tool, input=input)
        p.stdout = "\n".join(line for line in p.stdout.split("\n") if not RATE.match(line))
        p.stderr = p.stderr.replace("qemu-io", "pyrep-io")
        out.append(p)
    return out


@pytest.fixture
def images(tmp_path):
    """The same images in tmp_path/qemu-io and tmp_path/pyrep-io: base.qcow2 <- x.qcow2 (data in both
    layers), r.raw."""
    for tool in ("qemu-io", "pyrep-io"):
        d = tmp_path / tool
        d.mkdir()
        img = lambda *a: subprocess.run(["qemu-img", *a], cwd=d, check=True, capture_output=True)  # noqa: E731
        img("create", "-q", "-f", "qcow2", "base.qcow2", "4M")
        img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "x.qcow2")
        img("create", "-q", "-f", "raw", "r.raw", "1M")
        for f, cmd in (("base.qcow2", "write -P 1 1M 192k"), ("x.qcow2", "write -P 2 0 64k"),
                       ("x.qcow2", "write -z 3M 128k")):
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, f], cwd=d, check=True, capture_output=True)
    return tmp_path


@pytest.mark.parametrize("args", [
    ["-c", "map", "x.qcow2"],
    ["-c", "map", "base.qcow2"],
    ["-c", "info", "x.qcow2"],
    ["-f", "raw", "-c", "info", "r.raw"],
    ["-c", "info", "-c", "write -P 0x51 0 4k", "-c", "read -P 0x51 0 4k", "r.raw"],    # probed raw: qemu-io's warning
    ["-f", "raw", "-c", "map", "r.raw"],
    ["-c", "write -P 0x33 64k 4k", "-c", "write -z 128k 64k", "-c", "read -P 0x33 64k 4k", "-c", "read -P 0 128k 64k",
     "-c", "map", "x.qcow2"],
    ["-c", "aio_write -P 0x44 256k 4k", "-c", "aio_flush", "-c", "aio_read -P 0x44 256k 4k", "-c", "aio_flush",
     "-c", "read -P 0x44 256k 4k", "x.qcow2"],
    ["-c", "aio_write -z 1M 64k", "-c", "aio_flush", "-c", "read -P 0 1M 64k", "x.qcow2"],
    ["-c", "read -P 0xzz 0 1", "x.qcow2"],
    ["-c", "write -P 300 0 1", "x.qcow2"],
    ["-c", "write -z -P 1 0 4k", "x.qcow2"],
    ["-c", "write -u 0 4k", "x.qcow2"],
    ["-c", "read abc 4", "x.qcow2"],
    ["-c", "read 0", "x.qcow2"],
    ["-c", "map extra", "x.qcow2"],
    ["-c", "help bogus", "x.qcow2"],
    ["-r", "-c", "aio_write 0 4k", "x.qcow2"],
    ["--image-opts", "-c", "read -P 2 0 64k", "-c", "map", "driver=qcow2,file.driver=file,file.filename=x.qcow2"],
    ["--image-opts", "-c", "read -P 1 1M 64k", "driver=qcow2,file.filename=x.qcow2"],
    ["-c", "read -P 2 0 64k", "-c", "info", 'json:{"driver": "qcow2", "file": {"driver": "file", "filename": "x.qcow2"}}'],
    ["-c", "read -P 1 1M 64k", 'json:{"file": {"driver": "file", "filename": "x.qcow2"}}'],
    ["-f", "qcow2", "-c", "read 0 1", "r.raw"],
])
def test_like_qemu_io(images, args):
    theirs, mine = both(*args, cwd=images)
    assert (mine.returncode, mine.stdout, mine.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)


def test_the_images_end_the_same(images):
    """What pyrep-io's writes (sync, aio, zero) leave behind is what qemu-io's leave."""
    cmds = ["-c", "write -P 0x5 8k 8k", "-c", "aio_write -P 0x6 2M 64k", "-c", "aio_write -z 1M 64k",
            "-c", "aio_flush", "-c", "write -z -u 0 64k", "-c", "discard 3M 64k"]
    both(*cmds, "x.qcow2", cwd=images)
    p = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", images / "qemu-io" / "x.qcow2",
                        images / "pyrep-io" / "x.qcow2"], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    check = subprocess.run(["qemu-img", "check", images / "pyrep-io" / "x.qcow2"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_interactive_mode(images):
    """No -c: a "qemu-io> " prompt before every line read from stdin, as qemu-io."""
    script = "write -P 0x22 0 4k\nread -P 0x22 0 4k\nbogus\nread -P 0x23 0 4k\n"
    theirs, mine = both("-f", "raw", "r.raw", cwd=images, input=script)
    assert mine.stdout.count("qemu-io> ") == 5
    assert (mine.returncode, mine.stdout, mine.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)
    theirs, mine = both("-f", "raw", "r.raw", cwd=images, input="quit\nwrite 0 4k\n")
    assert (mine.returncode, mine.stdout) == (theirs.returncode, theirs.stdout) == (0, "qemu-io> ")


def test_help_lists_every_command(images):
    p = run("pyrep-io", "-c", "help", images / "pyrep-io" / "r.raw")
    assert p.returncode == 0
    from pyrep.tools.io.commands import COMMANDS
    lines = [line for line in p.stdout.splitlines() if " -- " in line]
    assert [line.split(" ")[0] for line in lines] == sorted(COMMANDS)
    for name in ("map", "info", "aio_read", "aio_write", "aio_flush", "read", "write", "help"):
        assert name in COMMANDS
    q = run("qemu-io", "-c", "help", images / "qemu-io" / "r.raw")
    theirs = {line.split(" ")[0]: line for line in q.stdout.splitlines()}
    for name in ("map", "info", "aio_flush", "flush", "length", "help", "quit"):
        assert theirs[name] == next(line for line in lines if line.split(" ")[0] == name)   # qemu's words
    p = run("pyrep-io", "-c", "help read", images / "pyrep-io" / "r.raw")
    assert p.stdout.startswith("read [-qv] [-P pattern] off len -- ")


def test_version_and_option_help():
    p = run("pyrep-io", "-V")
    assert p.returncode == 0 and p.stdout.startswith("pyrep-io version ")
    from pyrep.tools.io.cli import build_parser
    for action in build_parser()._actions:
        assert action.help, action.option_strings or action.dest


def test_open_errors_are_qemu_io_lines(images):
    (images / "qemu-io" / "bad.qcow2").write_bytes(b"junk\n")
    (images / "pyrep-io" / "bad.qcow2").write_bytes(b"junk\n")
    for args in (["-c", "read 0 1", "nope.qcow2"], ["-f", "qcow2", "-c", "read 0 1", "bad.qcow2"]):
        theirs, mine = both(*args, cwd=images)
        assert (mine.returncode, mine.stderr) == (theirs.returncode, theirs.stderr) == (1, mine.stderr)
        assert len(mine.stderr.splitlines()) == 1


def test_a_closed_stdout_ends_quietly(images):
    for tool in ("qemu-io", "pyrep-io"):
        r, w = os.pipe()
        os.close(r)
        try:
            p = run(tool, "-c", "read -v 0 64k", images / tool / "x.qcow2", stdout=w)
        finally:
            os.close(w)
        assert (tool, p.returncode, p.stderr) == (tool, 0, "")
