"""Block status: what a range of a node holds and which layer provides it (QEMU's bdrv_co_block_status
and bdrv_is_allocated[_above] in io.c).

Works on nodes through their public attributes only (``driver``, ``backing``,
``is_filter``, ``length``): this module sits below the node class and never imports it.
"""
import errno
from collections import namedtuple

from .constants import BS_ALLOCATED, BS_DATA, BS_EOF, BS_OFFSET_VALID, BS_RECURSE, BS_ZERO
from .errors import BlockError

__all__ = ["BlockStatus", "block_status", "skip_filters", "is_allocated", "is_allocated_above",
           "allocation_extents"]

BlockStatus = namedtuple("BlockStatus", "flags length offset file")


def block_status(node, offset, length):
    """:class:`BlockStatus` of ``[offset, offset+pnum)`` of ``node`` (access already checked);
    follows filters and protocols (``BS_RECURSE``) and marks unallocated ranges without a backing
    as zero."""
    total = node.length
    if offset >= total:
        return BlockStatus(BS_EOF, 0, None, None)
    length = min(length, total - offset)
    flags, pnum, mapped, file = node.driver.block_status(offset, length)
    if pnum <= 0:
        raise BlockError(errno.EIO, f"node '{node.name}': block status made no progress at {offset}")
    pnum = min(pnum, length)
    if flags & BS_RECURSE and file is not None:
        inner = file.block_status(mapped, pnum)
        if inner.flags & BS_EOF and not inner.length:
            # past the end of the protocol (a raw disk's tail, rounded up to a sector): zeroes
            flags = BS_ZERO | BS_OFFSET_VALID | (flags & BS_ALLOCATED & ~BS_RECURSE)
        else:
            pnum = min(pnum, inner.length) if inner.length else pnum
            flags = (inner.flags & ~BS_EOF) | (flags & BS_ALLOCATED & ~BS_RECURSE)
            mapped, file = inner.offset, inner.file
        if not node.is_filter:
            flags |= BS_ALLOCATED
            if not flags & (BS_DATA | BS_ZERO):
                flags |= BS_DATA
    if not flags & BS_ALLOCATED:
        back = node.backing
        if back is None and not node.is_filter:
            flags |= BS_ZERO
        elif back is not None:
            blen = back.length
            if offset >= blen:
                flags |= BS_ZERO
            else:
                pnum = min(pnum, blen - offset)
    if offset + pnum >= total:
        flags |= BS_EOF
    return BlockStatus(flags, pnum, mapped if flags & BS_OFFSET_VALID else None, file)


def skip_filters(node):
    """The first node at or below ``node`` that is not a filter with a file child."""
    while node is not None and node.drv.is_filter and "file" in node.children:
        node = node.file
    return node


def is_allocated(node, offset, length):
    """``(allocated, pnum)``: whether this layer (filters skipped) provides ``[offset, offset+pnum)``."""
    st = skip_filters(node).block_status(offset, length)
    return bool(st.flags & BS_ALLOCATED), st.length


def is_allocated_above(top, base, offset, length, include_base=False):
    """``(allocated, pnum)``: whether any layer from ``top`` down to ``base`` (excluded unless
    ``include_base``) provides ``[offset, offset+pnum)`` — a range past the end of a shorter
    backing counts as allocated, since it reads as zeroes there."""
    node = skip_filters(top)
    base = skip_filters(base) if base is not None else None
    n = length
    while node is not None:
        if node is base and not include_base:
            break
        st = node.block_status(offset, n)
        if st.length == 0:
            return False, n
        if st.flags & BS_ALLOCATED:
            return True, st.length
        n = min(n, st.length)
        nxt = skip_filters(node.backing)
        if node is base:
            break
        if nxt is not None and offset >= nxt.length:
            return True, n
        node = nxt
    return False, n


def allocation_extents(probe, offset, end):
    """Walk ``[offset, end)`` with ``probe(pos, n) -> (allocated, pnum)`` (``is_allocated`` or
    ``is_allocated_above`` bound to their nodes); yield ``(pos, pnum, allocated)`` for each extent
    in order. Stops early if the probe makes no progress."""
    pos = offset
    while pos < end:
        alloc, n = probe(pos, end - pos)
        if n <= 0:
            return
        n = min(n, end - pos)
        yield pos, n, alloc
        pos += n
