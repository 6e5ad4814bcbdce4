"""The README tells the truth: every ```python block runs verbatim, each alone in an empty directory
(it creates what it uses), in a fresh interpreter that ends without pyrep.close_all() mattering."""
import os
import re
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return [m.group(1) for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)]


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 4


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs_in_an_empty_directory(tmp_path, index):
    block = python_blocks()[index]
    r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"README python block {index + 1} failed:\n{block}\n--- stderr:\n{r.stderr}"


def test_readme_says_to_make_a_virtual_environment_first():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    venv = text.find("python3 -m venv .venv && . .venv/bin/activate")
    assert venv != -1 and venv < text.find("-m pip install")
