"""``pyrep-img create``: create a new image."""
import os

import pyrep
from pyrep.errors import Error
from pyrep.graph import probe_format

from ..opening import driver_of, open_image
from . import args
from .common import create_kwargs, OptionsHelp, parse_o, print_create_options, qprint, size_arg, UsageError
from .image import full_backing_name


def add_arguments(s):
    """The command's options and operands."""
    s.add_argument("-f", dest="fmt", metavar="FMT", help="format of the new image (default: raw)")
    s.add_argument("-b", dest="backing", metavar="BACKING", help="backing file of the new image")
    s.add_argument("-F", dest="backing_fmt", metavar="BACKING_FMT", help="format of the backing file")
    s.add_argument("-o", dest="options", action="append", metavar="OPTIONS",
                   help="format options (key=value,...; -o help lists them); repeatable")
    s.add_argument("-u", dest="unsafe", action="store_true",
                   help="unsafe: do not open the backing file (it need not exist yet; a size is then needed)")
    args.add_quiet(s)
    s.add_argument("filename", nargs="?", help="the image to create")          # not needed for -o help
    s.add_argument("size", nargs="?", help="its virtual size (1024, 64k, 10G...; default: the backing file's)")


def _formatting_parts(fmt, size, backing, backing_fmt, opts):
    """The ``key=value`` list of qemu-img's "Formatting '...'" line (qcow2 shows its defaults too)."""
    o = {k.replace("-", "_"): v for k, v in opts.items()}
    parts = [f"fmt={fmt}"]
    if fmt == "qcow2":
        cs = size_arg(o.pop("cluster_size", 65536), "cluster_size")
        parts += [f"cluster_size={cs}", f"extended_l2={o.pop('extended_l2', 'off')}",
                  f"compression_type={o.pop('compression_type', 'zlib')}"]
    parts.append(f"size={size}")
    if backing is not None:
        parts.append(f"backing_file={backing}")
        if backing_fmt:
            parts.append(f"backing_fmt={backing_fmt}")
    if fmt == "qcow2":
        for k in ("encryption", "compat"):
            if k in o:
                parts.append(f"{k}={o.pop(k)}")
        lazy = o.pop("lazy_refcounts", "off")
        lazy = {"true": "on", "false": "off", True: "on", False: "off"}.get(lazy, lazy)
        tail = [f"lazy_refcounts={lazy}", f"refcount_bits={o.pop('refcount_bits', 16)}"]
        parts += [f"{k}={v}" for k, v in o.items()] + tail
    else:
        parts += [f"{k}={v}" for k, v in o.items()]
    return parts


def run(a):
    try:
        opts = parse_o(a.options)
    except OptionsHelp:
        return print_create_options(a.fmt or "raw")
    if a.filename is None:
        raise UsageError("Expecting image file name", hint=True)
    fmt = a.fmt or "raw"
    backing = a.backing if a.backing is not None else opts.pop("backing_file", None)
    backing_fmt = a.backing_fmt if a.backing_fmt is not None else opts.pop("backing_fmt", None)
    opts.pop("backing_file", None)
    opts.pop("backing_fmt", None)
    size = opts.pop("size", None)
    if a.size is not None:
        if size is not None:
            raise Error(f"{a.filename}: Image size must be specified only once")
        size = a.size
    size = size_arg(size, "image size") if size is not None else None
    drv = driver_of(fmt, f"{a.filename}: Unknown file format '{{name}}'")
    if not drv.implements("create"):
        raise Error(f"{a.filename}: Format driver '{fmt}' does not support image creation")
    if backing is not None and not drv.supports_backing:
        raise Error(f"{a.filename}: Backing file not supported for file format '{fmt}'")
    if backing is not None and not a.unsafe:
        bpath = full_backing_name(a.filename, backing)
        if not os.path.exists(bpath):
            raise Error(f"Could not open backing image '{backing}': No such file or directory")
        if backing_fmt is None:
            backing_fmt = probe_format(bpath)
        if size is None:
            with open_image(bpath, backing_fmt) as b:
                size = b.length
    elif backing is not None and size is None:
        raise Error("Backing file specified without a size (-u needs one)")
    if size is None:
        raise UsageError(f"{a.filename}: Image creation needs a size parameter")
    kw = create_kwargs(drv, fmt, opts)
    # the line qemu-img prints
    qprint(a.quiet, f"Formatting '{a.filename}', " + " ".join(_formatting_parts(fmt, size, backing, backing_fmt, opts)))
    if backing is not None and a.unsafe:
        # no probing of a backing file that may not exist yet
        kw["backing_file"] = backing
        kw["backing_fmt"] = backing_fmt
        drv.create(a.filename, size, kw)
    else:
        pyrep.create_image(a.filename, fmt, size, backing_file=backing, backing_fmt=backing_fmt, **kw)
    return 0
