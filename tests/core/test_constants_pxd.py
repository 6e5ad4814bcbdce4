"""The Cython modules' shared constants (pyrep/_core/constants.pxd) agree with pyrep.constants."""
import os
import re

import pyrep
from pyrep import constants

PXD = os.path.join(os.path.dirname(pyrep.__file__), "_core", "constants.pxd")


def test_every_request_flag_in_the_pxd_matches_pyrep_constants():
    with open(PXD) as f:
        declared = {m.group(1): int(m.group(2), 0)
                    for m in re.finditer(r"^\s+(REQ_[A-Z_]+)\s*=\s*(0x[0-9a-fA-F]+|\d+)", f.read(), re.M)}
    python_side = {k: v for k, v in vars(constants).items() if k.startswith("REQ_")}
    assert declared == python_side


def test_no_other_cython_module_declares_request_flags_again():
    roots = [os.path.dirname(pyrep.__file__), os.path.dirname(pyrep.drivers.__file__)]
    twins = []
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                if name.endswith((".pyx", ".pxd")) and name != "constants.pxd":
                    with open(os.path.join(dirpath, name)) as f:
                        if re.search(r"^\s+REQ_[A-Z_]+\s*=", f.read(), re.M):
                            twins.append(name)
    assert twins == []
