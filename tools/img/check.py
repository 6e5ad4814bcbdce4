"""``pyrep-img check``: check an image for consistency."""
import os
import sys

import pyrep
from pyrep._core.registry import get_driver
from pyrep.errors import Error
from pyrep.graph import probe_format

from .common import err, jdump, qprint


def add_arguments(s):
    """The command's options and operands."""
    s.add_argument("-f", dest="fmt")
    s.add_argument("-r", dest="repair", choices=("leaks", "all"))
    s.add_argument("--output", choices=("human", "json"), default="human")
    s.add_argument("-q", dest="quiet", action="store_true")
    s.add_argument("-U", "--force-share", action="store_true")
    s.add_argument("-T", dest="src_cache")
    s.add_argument("filename")


_CHECK_ORDER = ("image-end-offset", "total-clusters", "check-errors", "leaks", "leaks-fixed", "corruptions",
                "corruptions-fixed", "allocated-clusters", "fragmented-clusters", "compressed-clusters",
                "filename", "format")


def run(a):
    fmt = a.fmt or probe_format(a.filename) if os.path.exists(a.filename) else a.fmt
    if not os.path.exists(a.filename):
        raise Error(f"Could not open '{a.filename}': No such file or directory")
    if not get_driver(fmt).implements("check"):
        err("This image format does not support checks")
        return 63
    res = pyrep.check_image(a.filename, fmt, repair=a.repair)
    if res.get("leaks-fixed") or res.get("corruptions-fixed"):
        lf, cf = res.get("leaks-fixed", 0), res.get("corruptions-fixed", 0)
        if a.output == "human":
            qprint(a.quiet, "The following inconsistencies were found and repaired:\n\n"
                            f"    {lf} leaked clusters\n    {cf} corruptions\n\n"
                            "Double checking the fixed image now...")
        for m in res.get("messages") or ():
            pass
        res = pyrep.check_image(a.filename, fmt, repair=None)
        res["leaks-fixed"], res["corruptions-fixed"] = lf, cf
    for m in res.get("messages") or ():
        print(m, file=sys.stderr)
    res["filename"] = a.filename
    res.setdefault("format", fmt)
    g = lambda k: int(res.get(k) or 0)  # noqa: E731
    if a.output == "json":
        out = {}
        for k in _CHECK_ORDER:
            if k in ("check-errors", "filename", "format"):
                out[k] = res.get(k, 0)
            elif g(k):
                out[k] = g(k)
        jdump(out)
    elif not a.quiet:
        if not g("corruptions") and not g("leaks") and not g("check-errors"):
            print("No errors were found on the image.")
        else:
            if g("corruptions"):
                print(f"\n{g('corruptions')} errors were found on the image.\n"
                      "Data may be corrupted, or further writes to the image may corrupt it.")
            if g("leaks"):
                print(f"\n{g('leaks')} leaked clusters were found on the image.\n"
                      "This means waste of disk space, but no harm to data.")
            if g("check-errors"):
                print(f"\n{g('check-errors')} internal errors have occurred during the check.")
        if g("total-clusters") and g("allocated-clusters"):
            alloc, total = g("allocated-clusters"), g("total-clusters")
            print("%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters" % (
                alloc, total, alloc * 100.0 / total, g("fragmented-clusters") * 100.0 / alloc,
                g("compressed-clusters") * 100.0 / alloc))
        if g("image-end-offset"):
            print(f"Image end offset: {g('image-end-offset')}")
    if g("check-errors"):
        err("Check failed")
        return 1
    if g("corruptions"):
        return 2
    if g("leaks"):
        return 3
    return 0
