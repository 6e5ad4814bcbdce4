"""``pyrep-img rebase``: change the backing file of an image."""
import os

from pyrep._core.iovec import IOVector
from pyrep.constants import BS_ALLOCATED
from pyrep.errors import Error
from pyrep.node import skip_filters

from ..opening import driver_of, open_image
from . import args
from .common import IO_BUF_SIZE, ZEROS, cache_opts, progress_bar, UsageError
from .image import full_backing_name


def add_arguments(s):
    """The command's options and operands."""
    args.add_format(s)
    args.add_image_opts(s)
    s.add_argument("-b", dest="backing", metavar="BACKING", help="the new backing file ('' for none)")
    s.add_argument("-F", dest="backing_fmt", metavar="BACKING_FMT", help="format of the new backing file")
    s.add_argument("-u", dest="unsafe", action="store_true",
                   help="unsafe: only rewrite the backing file name, copy no data")
    args.add_progress(s)
    args.add_quiet(s)
    args.add_cache(s)
    args.add_filename(s)


def _backing_setter(node):
    d = node.driver
    for name in ("change_backing_file", "set_backing_file"):
        fn = getattr(d, name, None)
        if fn is not None:
            return fn
    return None


def run(a):
    if a.backing is None:
        raise UsageError("Must specify backing file (-b) or use '-b \"\"' to remove it")
    new_backing = a.backing or None
    new_fmt = a.backing_fmt
    if new_fmt is not None:
        driver_of(new_fmt, "Invalid format name: '{name}'")
    if new_backing and not a.unsafe:
        full = full_backing_name(a.filename, new_backing)
        if not os.path.exists(full):
            raise Error(f"Could not open new backing file '{full}': Could not open '{full}': "
                        f"No such file or directory")
    if new_backing and new_fmt is None:
        # qemu-img 7.2: no probing of the new backing file's format, ever (probing raw is a security hole)
        raise Error(f"Could not change the backing file to '{new_backing}': backing format must be specified")
    if a.unsafe:
        blk = open_image(a.filename, a.fmt, image_opts=a.image_opts, backing=False, read_only=False, cache=cache_opts(a.cache))
        try:
            setter = _backing_setter(blk.node)
            if setter is None:
                raise Error(f"Could not change the backing file to '{new_backing}': the "
                            f"{blk.node.drv.format_name} driver offers no change_backing_file(name, fmt)")
            setter(new_backing, new_fmt)
            blk.flush()
        finally:
            blk.close()
        return 0
    # safe mode: copy into the image whatever reads differently through the new backing
    blk = open_image(a.filename, a.fmt, image_opts=a.image_opts, read_only=False, cache=cache_opts(a.cache))
    try:
        top = skip_filters(blk.node)
        setter = _backing_setter(top)
        if setter is None:
            raise Error(f"Could not change the backing file to '{new_backing}': the "
                        f"{top.drv.format_name} driver offers no change_backing_file(name, fmt)")
        newb = None
        if new_backing:
            newb = open_image(full_backing_name(a.filename, new_backing), new_fmt, cache=cache_opts(a.cache))
        try:
            size = blk.length
            nlen = newb.length if newb is not None else 0
            buf1, buf2 = bytearray(IO_BUF_SIZE), bytearray(IO_BUF_SIZE)
            prog = progress_bar(a)
            off = 0
            while off < size:
                st = top.block_status(off, size - off)
                n = st.length
                if st.flags & BS_ALLOCATED:
                    off += n
                    continue
                end = off + n
                while off < end:
                    c = min(IO_BUF_SIZE, end - off)
                    m1 = memoryview(buf1)[:c]
                    top.preadv(off, c, IOVector(m1))
                    m2 = memoryview(buf2)[:c]
                    if newb is not None and off < nlen:
                        k = min(c, nlen - off)
                        newb.preadv(off, IOVector(m2[:k]))
                        if k < c:
                            m2[k:] = ZEROS[:c - k]
                    else:
                        m2[:] = ZEROS[:c]
                    if buf1[:c] != buf2[:c]:
                        blk.pwritev(off, IOVector(m1))
                    off += c
                    prog.update(off * 100.0 / size)
            prog.done()
        finally:
            if newb is not None:
                newb.close()
        setter(new_backing, new_fmt)
        blk.flush()
    finally:
        blk.close()
    return 0
