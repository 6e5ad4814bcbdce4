"""Opening an image as qemu-img does, and reading block status through its backing chain."""
import os

import pyrep
from pyrep._core.registry import get_driver
from pyrep.constants import BS_ALLOCATED, BS_ZERO
from pyrep.errors import Error
from pyrep.graph import probe_format
from pyrep.node import skip_filters

def image_opts(filename, fmt=None, backing=True, read_only=True, cache=None, force_share=False,
               extra=None):
    """The option dict of an image file; ``backing=False`` opens it alone (no backing chain)."""
    if fmt is None:
        fmt = probe_format(filename)
    f = {"driver": "file", "filename": filename}
    if force_share:
        f["locking"] = "off"
    opts = {"driver": fmt, "file": f, "read-only": read_only}
    if not backing and get_driver(fmt).supports_backing:
        opts["backing"] = None
    if cache:
        opts["cache"] = dict(cache)
    if force_share:
        opts["force-share"] = True
    if extra:
        opts.update(extra)
    return opts


def open_image(filename, fmt=None, backing=True, read_only=True, cache=None, force_share=False, what="open",
               extra=None):
    if not os.path.exists(filename):
        raise Error(f"Could not open '{filename}': No such file or directory")
    try:
        opts = image_opts(filename, fmt, backing, read_only, cache, force_share, extra)
        return pyrep.open_backend(opts, read_only=read_only, shared="all" if force_share else None)
    except Error as e:
        raise type(e)(*((e.errno, f"Could not open '{filename}': {e}") if isinstance(e, pyrep.BlockError)
                        else (f"Could not open '{filename}': {e}",))) from None


def chain_nodes(node):
    """[top, backing, backing's backing, ...], filters skipped."""
    out = []
    n = skip_filters(node)
    while n is not None:
        out.append(n)
        n = skip_filters(n.backing)
    return out


def status_above(node, offset, length, base=None):
    """QEMU's ``bdrv_block_status_above(node, base)``: ``(flags, pnum)``; the flags of the first layer
    (from the top, ``base`` excluded) that holds the range, else of the last layer examined."""
    cur = skip_filters(node)
    base = skip_filters(base) if base is not None else None
    n = length
    flags = 0
    while cur is not None and cur is not base:
        st = cur.block_status(offset, n)
        if st.length <= 0:
            return BS_ZERO, n
        n = st.length
        flags = st.flags
        if flags & (BS_ALLOCATED | BS_ZERO):
            return flags, n
        cur = skip_filters(cur.backing)
    return flags, n


def full_backing_name(image, backing):
    if not backing:
        return backing
    if os.path.isabs(backing) or ":" in backing.split("/")[0]:
        return backing
    d = os.path.dirname(image)
    return os.path.join(d, backing) if d else backing
