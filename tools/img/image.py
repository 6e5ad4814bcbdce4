"""An image's backing chain: its nodes, its block status through the chain, its backing file's path.
(Opening an image is ``pyrep.tools.opening``.)"""
import os

from pyrep.constants import BS_ALLOCATED, BS_ZERO
from pyrep.node import skip_filters

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
