"""``pyrep-img map``: show the allocation map of an image."""
import os
import sys

from pyrep.constants import BS_ALLOCATED, BS_DATA, BS_EOF, BS_OFFSET_VALID, BS_ZERO
from pyrep.errors import Error
from pyrep.node import skip_filters

from ..opening import open_image
from . import args
from .common import size_arg


def add_arguments(s):
    """The command's options and operands."""
    args.add_format(s)
    args.add_image_opts(s)
    args.add_output(s)
    s.add_argument("-s", "--start-offset", type=lambda v: size_arg(v, "start offset"), metavar="OFFSET",
                   help="guest offset to start from (default 0)")
    s.add_argument("-l", "--max-length", type=lambda v: size_arg(v, "length"), metavar="LENGTH",
                   help="map at most this many bytes (default: to the end)")
    args.add_force_share(s)
    args.add_filename(s)


def _qemu_recurses(node):
    """Whether QEMU would ask ``node``'s protocol file for zeroes under its data clusters.

    qcow2 sets BDRV_BLOCK_RECURSE only when qcow2_detect_metadata_preallocation() finds more
    clusters in use than the file really allocates (holes under allocated clusters); mirrored here
    with the file's cluster count standing in for its count of referenced clusters."""
    if node.drv.format_name != "qcow2" or node.file is None:
        return False
    try:
        cs = (node.driver.get_info() or {}).get("cluster-size") or 65536
        real = os.stat(node.file.filename).st_blocks * 512 // cs
        nb = -(-node.file.length // cs)
    except (OSError, Error, TypeError):
        return False
    return nb > max(real * 10 // 9, real + 2)


def map_entry(top, offset, length, recurse=None):
    """qemu-img map's get_block_status: walk down the chain until a layer knows the range."""
    node = skip_filters(top)
    depth = 0
    while True:
        st = node.block_status(offset, length)
        length = st.length
        flags = st.flags
        f = st.file
        if (recurse is not None and flags & BS_DATA and flags & BS_OFFSET_VALID and not flags & BS_ZERO
                and f is not None and f is not node and st.offset is not None and _cached(recurse, node)):
            # as QEMU's bdrv_co_block_status(want_zero): ask the protocol whether the mapped range
            # reads as zeroes (a hole inside an allocated cluster) and clip to its answer
            try:
                inner = f.block_status(st.offset, length)
            except Error:
                inner = None
            if inner is not None:
                if inner.flags & BS_EOF and (not inner.length or inner.flags & BS_ZERO):
                    flags |= BS_ZERO
                elif inner.length:
                    length = min(length, inner.length)
                    flags |= inner.flags & BS_ZERO
                st = st._replace(flags=flags, length=length)
        if flags & (BS_ZERO | BS_DATA):
            break
        nxt = skip_filters(node.backing)
        if nxt is None:
            flags = 0
            st = None
            break
        node = nxt
        depth += 1
    has_off = bool(st is not None and flags & BS_OFFSET_VALID and st.offset is not None)
    fnode = st.file if st is not None else None
    return {"start": offset, "length": length, "depth": depth, "present": bool(flags & BS_ALLOCATED),
            "zero": bool(flags & BS_ZERO), "data": bool(flags & BS_DATA),
            "offset": st.offset if has_off else None,
            "filename": (fnode.filename or fnode.name) if (has_off and fnode is not None) else None}


def _cached(memo, node):
    v = memo.get(id(node))
    if v is None:
        v = memo[id(node)] = _qemu_recurses(node)
    return v


def _mergeable(c, n):
    if any(c[k] != n[k] for k in ("zero", "data", "depth", "present")):
        return False
    if (c["offset"] is None) != (n["offset"] is None) or c["filename"] != n["filename"]:
        return False
    if c["offset"] is not None and c["offset"] + c["length"] != n["offset"]:
        return False
    return True


def _hexq(v):
    return "0" if v == 0 else "%#x" % v


def _dump_map(fmt, e, nxt, out):
    if fmt == "human":
        if e["data"] and e["offset"] is None:
            raise Error("File contains external, encrypted or compressed clusters.")
        if e["data"] and not e["zero"]:
            out.append("%-16s%-16s%-16s%s\n" % (_hexq(e["start"]), _hexq(e["length"]),
                                                _hexq(e["offset"] or 0), e["filename"] or ""))
        if nxt is not None and (not nxt["data"] or nxt["zero"]):
            nxt["data"], nxt["zero"] = False, True
    else:
        s = ('{ "start": %d, "length": %d, "depth": %d, "present": %s, "zero": %s, "data": %s' % (
            e["start"], e["length"], e["depth"], "true" if e["present"] else "false",
            "true" if e["zero"] else "false", "true" if e["data"] else "false"))
        if e["offset"] is not None:
            s += ', "offset": %d' % e["offset"]
        s += "}"
        out.append(s + (",\n" if nxt is not None else ""))


def run(a):
    with open_image(a.filename, a.fmt, image_opts=a.image_opts, force_share=a.force_share) as blk:
        top = blk.node
        length = blk.length
        start = a.start_offset or 0
        end = min(length, start + a.max_length) if a.max_length is not None else length
        out = []
        if a.output == "json":
            out.append("[")
        else:
            out.append("%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File"))
        curr = None
        recurse_memo = {}
        pos = start
        while pos < end:
            n = min(1 << 30, end - pos)
            nxt = map_entry(top, pos, n, recurse_memo)
            pos += nxt["length"]
            if curr is not None:
                if _mergeable(curr, nxt):
                    curr["length"] += nxt["length"]
                    continue
                _dump_map(a.output, curr, nxt, out)
            curr = nxt
        if curr is not None:
            _dump_map(a.output, curr, None, out)
        if a.output == "json":
            out.append("]\n")
        sys.stdout.write("".join(out))
    return 0
