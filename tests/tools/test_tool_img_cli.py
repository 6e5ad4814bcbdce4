"""pyrep-img's command-line core (tools/img/cli.py): commands load lazily, the console script works."""
import os
import shutil
import subprocess
import sys

import pytest

from pyrep.tools.img import cli

from helpers.referees import needs


def test_only_the_command_run_is_imported(tmp_path):
    img = tmp_path / "a.raw"
    img.write_bytes(bytes(65536))
    code = ("import sys\nfrom pyrep.tools.img import cli\n"
            f"rc = cli.main(['info', {str(img)!r}])\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('pyrep.tools.img.'))\n"
            "print(rc, ' '.join(loaded))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rc, loaded = p.stdout.splitlines()[-1].split(" ", 1)
    assert rc == "0"
    commands = {f"pyrep.tools.img.{c}" for c in cli.COMMANDS}
    assert commands & set(loaded.split()) == {"pyrep.tools.img.info"}


def test_every_command_has_a_module():
    for name in cli.COMMANDS:
        mod = cli.command_module(name)
        assert callable(mod.add_arguments) and callable(mod.run), name


@pytest.mark.skipif(shutil.which("pyrep-img") is None, reason="pyrep-img console script not installed")
def test_console_script(tmp_path):
    img = tmp_path / "a.raw"
    img.write_bytes(bytes(1 << 20))
    p = subprocess.run(["pyrep-img", "info", str(img)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "virtual size: 1 MiB (1048576 bytes)" in p.stdout


# ------------------------------------------------ qemu-img's command line, judged by qemu-img itself
needs_qemu_img = needs("qemu-img")


def run(tool, *args, cwd=None, stdout=subprocess.PIPE):
    cmd = ["qemu-img"] if tool == "qemu-img" else [sys.executable, "-m", "pyrep.tools.img"]
    return subprocess.run(cmd + [str(a) for a in args], stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=cwd)


def assert_like_qemu_img(*args, cwd=None):
    """Same exit code and the same stderr as qemu-img (its name replaced by ours)."""
    theirs, mine = run("qemu-img", *args, cwd=cwd), run("pyrep-img", *args, cwd=cwd)
    assert mine.returncode == theirs.returncode, (args, mine.stderr, theirs.stderr)
    assert mine.stderr == theirs.stderr.replace("qemu-img", "pyrep-img"), args
    return mine


@pytest.fixture
def chain(tmp_path):
    """base.qcow2 <- x.qcow2, new.qcow2 beside them, bad.qcow2 (not an image); names relative to tmp_path."""
    for args in (["base.qcow2", "1M"], ["-b", "base.qcow2", "-F", "qcow2", "x.qcow2"], ["new.qcow2", "1M"]):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *args], cwd=tmp_path, check=True)
    (tmp_path / "bad.qcow2").write_bytes(b"not an image\n")
    return tmp_path


@needs_qemu_img
def test_rebase_without_backing_format_is_refused(chain):
    before = (chain / "x.qcow2").read_bytes()
    for args in (["-u", "-b", "new.qcow2", "x.qcow2"], ["-b", "new.qcow2", "x.qcow2"]):
        p = assert_like_qemu_img("rebase", *args, cwd=chain)
        assert p.returncode == 1 and "backing format must be specified" in p.stderr
    assert (chain / "x.qcow2").read_bytes() == before


@needs_qemu_img
@pytest.mark.parametrize("args", [
    ["info", "-f", "qcow2", "bad.qcow2"],               # not a qcow2 image
    ["info", "nope.qcow2"],                             # no such file
    ["map", "gone/x.qcow2"],                            # its backing file is missing
    ["check", "gone/x.qcow2"],                          # check opens the chain too: exit 1
    ["rebase", "-b", "missing.qcow2", "-F", "qcow2", "x.qcow2"],
    ["info", "--image-opts", "-f", "qcow2", "driver=qcow2,file.filename=x.qcow2"],
])
def test_open_errors_are_qemu_img_lines(chain, args):
    (chain / "gone").mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "base.qcow2", "-F", "qcow2",
                    "gone/x.qcow2", "1M"], cwd=chain, check=True)
    p = assert_like_qemu_img(*args, cwd=chain)
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1 and "[E" not in p.stderr


@needs_qemu_img
@pytest.mark.parametrize("args", [
    [], ["bogus"], ["info"], ["info", "x.qcow2", "extra"], ["compare", "x.qcow2"], ["check"], ["convert"],
    ["info", "--output=xml", "x.qcow2"], ["map", "--output=xml", "x.qcow2"], ["check", "--output", "yaml", "x.qcow2"],
    ["info", "--bogus", "x.qcow2"], ["check", "-r", "bogus", "x.qcow2"], ["create", "-f", "raw", "a.raw"],
])
def test_usage_errors_are_qemu_img_lines(chain, args):
    """qemu-img's own words and exit code; no usage dump (at most qemu-img's one "Try --help" hint)."""
    p = assert_like_qemu_img(*args, cwd=chain)
    assert p.returncode == 1 and "usage:" not in p.stderr
    assert p.stdout == ""


@needs_qemu_img
def test_unknown_format_lists_formats_only(chain):
    for args, qemu_line in ((["info", "-f", "bogus", "x.qcow2"], "Could not open 'x.qcow2': Unknown driver 'bogus'"),
                            (["create", "-f", "bogus", "a", "1M"], "a: Unknown file format 'bogus'"),
                            (["convert", "-O", "bogus", "x.qcow2", "o"], "Unknown file format 'bogus'"),
                            (["rebase", "-u", "-b", "new.qcow2", "-F", "bogus", "x.qcow2"],
                             "Invalid format name: 'bogus'")):
        theirs, mine = run("qemu-img", *args, cwd=chain), run("pyrep-img", *args, cwd=chain)
        assert theirs.returncode == mine.returncode == 1
        assert theirs.stderr.strip() == f"qemu-img: {qemu_line}"
        assert mine.stderr.strip() == f"pyrep-img: {qemu_line} (known formats: qcow2, raw)", mine.stderr


@needs_qemu_img
def test_a_closed_stdout_ends_quietly(chain):
    """``pyrep-img info x | head -1``: the reader is gone; qemu-img exits 0 and says nothing."""
    for tool in ("qemu-img", "pyrep-img"):
        r, w = os.pipe()
        os.close(r)
        try:
            p = run(tool, "info", "--backing-chain", "x.qcow2", cwd=chain, stdout=w)
        finally:
            os.close(w)
        assert (tool, p.returncode, p.stderr) == (tool, 0, "")


def test_version():
    for flag in ("-V", "--version"):
        p = run("pyrep-img", flag)
        assert p.returncode == 0 and p.stderr == ""
        assert p.stdout.startswith("pyrep-img version ") and len(p.stdout.splitlines()) == 1


@needs_qemu_img
@pytest.mark.parametrize("spec", [
    ["--image-opts", "driver=qcow2,file.driver=file,file.filename=x.qcow2"],
    ["--image-opts", "driver=qcow2,file.filename=x.qcow2"],
    ['json:{"driver": "qcow2", "file": {"driver": "file", "filename": "x.qcow2"}}'],
    ['json:{"file": {"driver": "file", "filename": "x.qcow2"}}'],      # format probed
])
def test_image_opts_and_json_filenames(chain, spec):
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 64k 64k", "x.qcow2"], cwd=chain, check=True,
                   capture_output=True)
    for cmd in (["info"], ["map", "--output=json"], ["check"]):
        theirs, mine = run("qemu-img", *cmd, *spec, cwd=chain), run("pyrep-img", *cmd, *spec, cwd=chain)
        assert theirs.returncode == 0, theirs.stderr
        assert (mine.returncode, mine.stdout) == (0, theirs.stdout), (cmd, mine.stderr)
    p = run("pyrep-img", "compare", *spec, *spec[-1:], cwd=chain)
    assert (p.returncode, p.stdout) == (0, "Images are identical.\n"), p.stderr


def test_every_option_has_a_description():
    for name in cli.COMMANDS:
        parser = cli.build_parser(name)
        sub = next(a for a in parser._actions if a.dest == "cmd").choices[name]
        for action in parser._actions + sub._actions:
            assert action.help, (name, action.option_strings or action.dest)


@needs_qemu_img
def test_info_backing_chain_refuses_a_loop_through_the_engines_one_check(chain):
    # x.qcow2 -> base.qcow2 -> x.qcow2 (made with qemu-img rebase -u): qemu-img refuses it, so do we, with
    # the graph's loop check (the one that also sees json: and nbd backings), not a check of our own
    subprocess.run(["qemu-img", "rebase", "-u", "-b", "x.qcow2", "-F", "qcow2", "base.qcow2"], cwd=chain,
                   check=True)
    theirs, mine = run("qemu-img", "info", "--backing-chain", "x.qcow2", cwd=chain), \
        run("pyrep-img", "info", "--backing-chain", "x.qcow2", cwd=chain)
    assert theirs.returncode == mine.returncode == 1
    assert "loops" in mine.stderr and "is already in the chain" in mine.stderr, mine.stderr
    assert mine.stdout == ""
