"""pyrep-img's command-line core (tools/img/cli.py): commands load lazily, the console script works."""
import shutil
import subprocess
import sys

import pytest

from pyrep.tools.img import cli


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
