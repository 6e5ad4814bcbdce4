"""``pyrep-img check``: check an image for consistency."""
import sys

from pyrep.node import skip_filters

from ..opening import open_image
from . import args
from .common import UsageError, err, jdump, qprint


def add_arguments(s):
    """The command's options and operands."""
    args.add_format(s)
    args.add_image_opts(s)
    s.add_argument("-r", dest="repair", type=_repair, metavar="{leaks,all}",
                   help="repair: leaked clusters only, or all errors (corruptions too)")
    args.add_output(s)
    args.add_quiet(s)
    args.add_force_share(s)
    args.add_cache(s, "-T", "src_cache")
    args.add_filename(s)


_CHECK_ORDER = ("image-end-offset", "total-clusters", "check-errors", "leaks", "leaks-fixed", "corruptions",
                "corruptions-fixed", "allocated-clusters", "fragmented-clusters", "compressed-clusters",
                "filename", "format")


def _repair(text):
    if text not in ("leaks", "all"):
        raise UsageError(f"Unknown option value for -r (expecting 'leaks' or 'all'): {text}", hint=True)
    return text


def check(a, repair=None):
    """One check of the image, opened with its backing chain as qemu-img opens it (a missing backing
    file is an error, exit 1); None if its format has no check."""
    with open_image(a.filename, a.fmt, image_opts=a.image_opts, read_only=repair is None,
                    force_share=a.force_share and repair is None, repair=repair is not None) as blk:
        node = skip_filters(blk.node)
        if not node.drv.implements("check"):
            return None
        res = node.driver.check(repair)
        res.setdefault("format", node.drv.format_name)
        return res


def run(a):
    res = check(a, a.repair)
    if res is None:
        err("This image format does not support checks")
        return 63
    if res.get("leaks-fixed") or res.get("corruptions-fixed"):
        lf, cf = res.get("leaks-fixed", 0), res.get("corruptions-fixed", 0)
        if a.output == "human":
            qprint(a.quiet, "The following inconsistencies were found and repaired:\n\n"
                            f"    {lf} leaked clusters\n    {cf} corruptions\n\n"
                            "Double checking the fixed image now...")
        res = check(a)
        res["leaks-fixed"], res["corruptions-fixed"] = lf, cf
    for m in res.get("messages") or ():
        print(m, file=sys.stderr)
    res["filename"] = a.filename
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
