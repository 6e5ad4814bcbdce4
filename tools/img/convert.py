"""``pyrep-img convert``: convert an image to another format."""
import pyrep
from pyrep.errors import Error

from ..opening import driver_of, open_image
from . import args
from .common import cache_opts, create_kwargs, OptionsHelp, parse_o, print_create_options, progress_bar, size_arg, sparse_arg, UsageError
from .image import status_above


def add_arguments(s):
    """The command's options and operands."""
    args.add_format(s, what="the source")
    s.add_argument("-O", dest="out_fmt", metavar="OUTPUT_FMT", help="format of the output image (default: raw)")
    args.add_image_opts(s)
    s.add_argument("-c", dest="compress", action="store_true", help="write compressed clusters (qcow2)")
    args.add_progress(s)
    args.add_quiet(s)
    s.add_argument("-o", dest="options", action="append", metavar="OPTIONS",
                   help="format options of the output (key=value,...; -o help lists them); repeatable")
    s.add_argument("-B", dest="backing", metavar="BACKING",
                   help="backing file of the output: only what differs from it is copied")
    s.add_argument("-F", dest="backing_fmt", metavar="BACKING_FMT", help="format of the -B backing file")
    s.add_argument("-n", dest="no_create", action="store_true", help="the output exists: do not create it")
    s.add_argument("-S", dest="min_sparse", metavar="SPARSE_SIZE",
                   help="zero runs of this size are not written (default 4k; 0: write every byte)")
    args.add_cache(s, "-t", "cache", "the output")
    args.add_cache(s, "-T", "src_cache", "the source")
    s.add_argument("-m", dest="num_coroutines", type=int, metavar="N",
                   help="copy with N parallel requests (1-16)")
    s.add_argument("-W", dest="unordered", action="store_true", help="write out of order (faster, fragments)")
    args.add_force_share(s)
    s.add_argument("--target-size", dest="target_size", metavar="SIZE",
                   help="virtual size of the output (not smaller than the source)")
    s.add_argument("filenames", nargs="*", metavar="filename", help="the source image, then the output image")


def _compressed_writer(node):
    """The driver's compressed-cluster write, if it offers one (QEMU: bdrv_co_pwritev_compressed)."""
    d = node.driver
    for name in ("pwritev_compressed", "write_compressed", "pwrite_compressed"):
        fn = getattr(d, name, None)
        if fn is not None:
            return name, fn
    return None, None


def run(a):
    try:
        opts = parse_o(a.options)
    except OptionsHelp:
        return print_create_options(a.out_fmt or "raw")
    if not a.filenames or len(a.filenames) < 2:
        raise UsageError("Must specify image file name")
    if len(a.filenames) > 2:
        raise UsageError("pyrep-img convert takes exactly one source image")
    if a.num_coroutines is not None and not 1 <= a.num_coroutines <= 16:
        raise UsageError("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16")
    src_name, out_name = a.filenames
    min_sparse = sparse_arg(a.min_sparse)   # checked before anything is created
    out_fmt = a.out_fmt or "raw"
    backing = a.backing if a.backing is not None else opts.pop("backing_file", None)
    backing_fmt = a.backing_fmt if a.backing_fmt is not None else opts.pop("backing_fmt", None)
    opts.pop("backing_file", None)
    opts.pop("backing_fmt", None)
    odrv = driver_of(out_fmt, "Unknown file format '{name}'")
    if not a.no_create and not odrv.implements("create"):
        raise Error(f"Format driver '{out_fmt}' does not support image creation")
    if a.compress and not odrv.supports_backing and out_fmt != "qcow2":
        raise Error("Compression not supported for this file format")
    if backing is not None and not odrv.supports_backing:
        raise Error(f"Backing file not supported for file format '{out_fmt}'")
    src = open_image(src_name, a.fmt, image_opts=a.image_opts, cache=cache_opts(a.src_cache), force_share=a.force_share)
    try:
        size = src.length
        if a.target_size is not None:
            tsize = size_arg(a.target_size)
            if tsize < size:
                raise Error(f"--target-size {tsize} is smaller than the source ({size} bytes): the copy would "
                            f"lose data")
            size = tsize
        if not a.no_create:
            kw = create_kwargs(odrv, out_fmt, opts)
            if backing is not None:
                pyrep.create_image(out_name, out_fmt, size, backing_file=backing, backing_fmt=backing_fmt, **kw)
            else:
                pyrep.create_image(out_name, out_fmt, size, **kw)
        dst = open_image(out_name, out_fmt, backing=backing is not None, read_only=False,
                         cache=cache_opts(a.cache))
        try:
            cwrite = None
            if a.compress:
                name, cwrite = _compressed_writer(dst.node)
                if cwrite is None:
                    raise Error(f"Compression not supported: the {out_fmt} driver offers no compressed "
                                f"cluster write (expected driver.pwritev_compressed(offset, length, iov))")
            if dst.length < size:
                raise Error(f"Output image '{out_name}' is smaller ({dst.length}) than the source ({size})")
            _convert_copy(a, src, dst, size, backing is not None, cwrite, min_sparse)
            dst.flush()
        finally:
            dst.close()
    finally:
        src.close()
    return 0


def _convert_copy(a, src, dst, size, target_has_backing, cwrite, min_sparse):
    """Copy ``src`` to ``dst`` with the copy engine of copier.py: zero/unallocated ranges are
    skipped (the fresh target reads zeroes), data is read and written by a few worker threads."""
    from .copier import Copier
    prog = progress_bar(a)
    cs = 0
    if cwrite is not None:
        info = dst.node.driver.get_info() or {}
        cs = info.get("cluster-size") or 65536
    # the target reads zeroes unless -n or it has a backing file
    Copier(src, dst, size, status=status_above, fresh=not a.no_create and not target_has_backing,
           min_sparse=min_sparse, top_only=target_has_backing, cwrite=cwrite, cs=cs, readers=a.num_coroutines,
           ordered=not a.unordered, progress=lambda off: prog.update(off * 100.0 / size) if size else None).run()
    prog.done()
