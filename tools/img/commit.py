"""``pyrep-img commit``: commit an image into its backing file."""
import os

import pyrep
from pyrep._core.iovec import IOVector
from pyrep.constants import BS_ALLOCATED, BS_ZERO
from pyrep.errors import Error
from pyrep.node import skip_filters

from ..opening import open_image
from . import args
from .common import IO_BUF_SIZE, cache_opts, progress_bar, qprint
from .image import chain_nodes, status_above


def add_arguments(s):
    """The command's options and operands."""
    args.add_format(s)
    args.add_image_opts(s)
    s.add_argument("-b", dest="base", metavar="BASE",
                   help="commit down to this image of the backing chain (default: the backing file)")
    s.add_argument("-d", dest="drop", action="store_true", help="do not empty the image after the commit")
    args.add_progress(s)
    args.add_quiet(s)
    args.add_cache(s)
    args.add_filename(s)


def run(a):
    blk = open_image(a.filename, a.fmt, image_opts=a.image_opts, read_only=False, cache=cache_opts(a.cache))
    try:
        top = skip_filters(blk.node)
        chain = chain_nodes(top)
        if len(chain) < 2:
            raise Error(f"Image '{a.filename}' does not have a backing file")
        if a.base:
            # as qemu-img: a relative -b names a file relative to the image's directory
            want = os.path.realpath(a.base if os.path.isabs(a.base)
                                    else os.path.join(os.path.dirname(a.filename), a.base))
            base = next((n for n in chain[1:] if n.filename and os.path.realpath(n.filename) == want), None)
            if base is None:
                raise Error(f"Did not find '{a.base}' in the backing chain of '{a.filename}'")
        else:
            base = chain[1]
        drop = a.drop or a.base is not None
        if not drop and not top.drv.implements("make_empty"):
            raise Error(f"The {top.drv.format_name} driver cannot empty the image after the commit (use -d)")
        pyrep.reopen(base, False)
        bblk = pyrep.open_backend(base, share_rw=True)
        try:
            size = top.length
            if bblk.length < size:
                bblk.truncate(size)
            prog = progress_bar(a)
            prog.update(0)
            buf = bytearray(IO_BUF_SIZE)
            off = 0
            while off < size:
                flags, n = status_above(top, off, size - off, base=base)
                if flags & BS_ALLOCATED:
                    if flags & BS_ZERO:
                        bblk.pwrite_zeroes(off, n)
                    else:
                        end = off + n
                        while off < end:
                            c = min(IO_BUF_SIZE, end - off)
                            mv = memoryview(buf)[:c]
                            top.preadv(off, c, IOVector(mv))
                            bblk.pwritev(off, IOVector(mv))
                            off += c
                            prog.update(off * 100.0 / size)
                        continue
                off += n
                prog.update(off * 100.0 / size)
            bblk.flush()
            prog.done()
        finally:
            bblk.close()
        if not drop:
            top.make_empty()
        blk.flush()
    finally:
        blk.close()
    qprint(a.quiet, "Image committed.")
    return 0
