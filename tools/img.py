"""``pyrep-img``: qemu-img's command line on pyrep's block layer.

Subcommands: create, info, check, map, compare, convert, commit, rebase, bench.
Output text, JSON field names and exit codes follow qemu-img 7.2, so scripts
written for qemu-img keep working:

- check: 0 clean, 1 check error, 2 corruptions, 3 leaks only, 63 format without checks;
- compare: 0 identical, 1 different, 2 error;
- everything else: 0 success, 1 error.

Images are opened format-agnostically as ``{"driver": fmt, "file": {"driver":
"file", "filename": path}}``; ``fmt`` is probed (``pyrep.graph.probe_format``)
unless ``-f`` names it.
"""
import argparse
import mmap
import os
import sys
import threading
import time

import pyrep
from pyrep._core.iovec import IOVector
from pyrep._core.registry import get_driver
from pyrep.constants import BS_ALLOCATED, BS_DATA, BS_EOF, BS_OFFSET_VALID, BS_ZERO
from pyrep.errors import Error
from pyrep.graph import probe_format
from pyrep.node import skip_filters
from pyrep.options import parse_size

from .progress import Progress

PROG = "pyrep-img"
IO_BUF_SIZE = 2 << 20          # qemu-img's convert/compare buffer
SECTOR = 512


class UsageError(Exception):
    """A command-line mistake: message on stderr, exit code 1."""


def err(msg):
    print(f"{PROG}: {msg}", file=sys.stderr)


def qprint(quiet, *args, **kw):
    if not quiet:
        print(*args, **kw)


# --------------------------------------------------------------------- helpers
def size_arg(text, what="size"):
    """qemu-img sizes: ``1024``, ``64k``, ``1.5G``, ``512b``... (k/K = KiB)."""
    t = str(text).strip()
    if t.lower().endswith("b") and t[:-1].isdigit():
        t = t[:-1]
    if t[:2].lower() == "0x":                   # qemu accepts hexadecimal byte counts
        try:
            return int(t, 16)
        except ValueError:
            pass
    try:
        return parse_size(t, what)
    except pyrep.OptionError:
        raise UsageError(f"Invalid {what} specified: '{text}'. You may use k, M, G, T, P or E suffixes for "
                         f"kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.") from None


def sparse_arg(text):
    """convert -S: the zero-detection granule (default 4 KiB); 0 writes every byte (fully allocated)."""
    n = size_arg(text, "sparse size") if text is not None else 4096
    if n % 512 or n > 16 * 1024 * 1024:
        raise Error("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to "
                    "16777216. Select 0 to disable sparse detection (fully allocates output).")
    return n


def create_kwargs(drv, fmt, opts):
    """``-o`` options → keyword arguments of the format's ``create``, checked against its
    ``create_options`` as qemu-img checks them: an unknown key or a bad value is an error naming it."""
    schema = {o.name.replace("-", "_"): o for o in getattr(drv, "create_options", ())}
    kw = {}
    for k, v in opts.items():
        key = k.replace("-", "_")
        o = schema.get(key)
        if o is None:
            known = f" (known: {', '.join(sorted(schema))})" if schema else ""
            raise Error(f"Invalid parameter '{k}' for format '{fmt}'{known}")
        try:
            kw[key] = o.convert(v, f"{fmt}: option '{k}'")
        except pyrep.OptionError as e:
            raise Error(str(e)) from None
    return kw


class OptionsHelp(Exception):
    """``-o help``: list the format's creation options instead of running the command."""


_OPT_KIND = {"size": "size", "bool": "bool (on/off)", "number": "num", "enum": "str", "string": "str"}


def print_create_options(fmt):
    """What ``qemu-img create -f FMT -o help`` prints: the format's creation options."""
    drv = get_driver(fmt)
    print(f"Supported {fmt} options:")
    rows = [("size", "size", "Virtual disk size")] + [
        (o.name, _OPT_KIND.get(o.type, "str"), o.help or "") for o in getattr(drv, "create_options", ())]
    for name, kind, text in sorted(rows):
        left = f"  {name}=<{kind}>"
        print(f"{left:<24} - {text}" if text else left)
    return 0


def progress_bar(a):
    """The ``-p`` progress bar of a command (qemu-img: ``-q`` silences it)."""
    return Progress(a.progress and not a.quiet)


def parse_o(values):
    """``-o a=1,b=2`` (repeatable) → dict; ``,,`` escapes a comma as in qemu."""
    out = {}
    for text in values or ():
        parts, cur, i = [], "", 0
        while i < len(text):
            c = text[i]
            if c == ",":
                if text[i + 1:i + 2] == ",":
                    cur += ","
                    i += 2
                    continue
                parts.append(cur)
                cur = ""
            else:
                cur += c
            i += 1
        parts.append(cur)
        for p in parts:
            if not p:
                continue
            if p == "help" or p == "?":
                raise OptionsHelp()
            k, sep, v = p.partition("=")
            out[k.strip()] = v if sep else "on"
    return out


def cache_opts(mode):
    """qemu cache modes → pyrep's ``cache`` option."""
    if mode in (None, "writeback"):
        return None
    if mode == "none":
        return {"direct": True}
    if mode == "directsync":
        return {"direct": True}
    if mode == "writethrough":
        return None
    if mode == "unsafe":
        return {"no-flush": True}
    raise UsageError(f"Invalid cache option: {mode}")


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


def size_to_str(val):
    """qemu's size_to_str: ``10 MiB``, ``324 KiB``, ``0.977 KiB``."""
    import math
    suffixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    _, i = math.frexp(val / (1000.0 / 1024.0)) if val else (0, 0)
    i = max(0, (i - 1) // 10)
    i = min(i, len(suffixes) - 1)
    return "%0.3g %sB" % (val / float(1 << (i * 10)), suffixes[i])


def _tdb_hash(name):
    """QEMU's QDict bucket hash (qobject/qdict.c tdb_hash)."""
    b = name.encode()
    value = (0x238F13AF * len(b)) & 0xFFFFFFFF
    for i, c in enumerate(b):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_order(obj):
    """Order dict keys as qemu-img's JSON output does (QDict iterates its 512 hash buckets in order)."""
    if isinstance(obj, dict):
        return {k: qdict_order(obj[k]) for k in sorted(obj, key=lambda k: _tdb_hash(k) % 512)}
    if isinstance(obj, list):
        return [qdict_order(v) for v in obj]
    return obj


def jdump(obj):
    import json     # only --output json needs it
    print(json.dumps(qdict_order(obj), indent=4))


# ------------------------------------------------------------------- create
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


def cmd_create(a):
    try:
        opts = parse_o(a.options)
    except OptionsHelp:
        return print_create_options(a.fmt or "raw")
    if a.filename is None:
        raise UsageError("Expecting image file name")
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
    drv = get_driver(fmt)
    if not drv.implements("create"):
        raise Error(f"Format driver '{fmt}' does not support image creation")
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
        raise UsageError("Image creation needs a size parameter")
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


# --------------------------------------------------------------------- info
_INFO_KEYS = ("backing-filename-format", "virtual-size", "filename", "cluster-size", "format", "actual-size",
              "encrypted", "format-specific", "full-backing-filename", "backing-filename", "dirty-flag")


def image_info(filename, fmt=None, force_share=False):
    """qemu-img's ImageInfo for one image (its backing chain is not opened)."""
    with open_image(filename, fmt, backing=False, force_share=force_share) as blk:
        node = blk.node
        fmt = node.drv.format_name
        extra = {}
        try:
            extra = node.driver.get_info() or {}
        except Error:
            extra = {}
        info = {}
        bfmt = extra.get("backing-filename-format")
        if bfmt:
            info["backing-filename-format"] = bfmt
        info["virtual-size"] = blk.length
        info["filename"] = filename
        if extra.get("cluster-size"):
            info["cluster-size"] = extra["cluster-size"]
        info["format"] = fmt
        try:
            st = os.stat(filename)
            info["actual-size"] = st.st_blocks * 512
        except OSError:
            pass
        if extra.get("encrypted"):
            info["encrypted"] = True
        spec = extra.get("format-specific")
        if spec:
            data = spec.get("data")
            if isinstance(data, dict):
                # qemu's field order
                data = {k: data[k] for k in [k for k in _SPEC_ORDER if k in data] +
                        [k for k in data if k not in _SPEC_ORDER]}
                spec = dict(spec, data=data)
            info["format-specific"] = spec
        bname = extra.get("backing-filename")
        if bname:
            info["full-backing-filename"] = extra.get("full-backing-filename") or full_backing_name(filename, bname)
            info["backing-filename"] = bname
        info["dirty-flag"] = bool(extra.get("dirty-flag", extra.get("dirty", False)))
        return info


def _human_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


_SPEC_ORDER = ("compat", "compression-type", "lazy-refcounts", "refcount-bits", "corrupt", "extended-l2")


def _dump_spec(data, indent):
    keys = [k for k in _SPEC_ORDER if k in data] + [k for k in data if k not in _SPEC_ORDER]
    for k in keys:
        v = data[k]
        name = k.replace("-", " ")
        if isinstance(v, dict):
            print(f"{' ' * indent}{name}:")
            _dump_spec(v, indent + 4)
        elif isinstance(v, list):
            print(f"{' ' * indent}{name}:")
            for item in v:
                if isinstance(item, dict):
                    _dump_spec(item, indent + 8)
                else:
                    print(f"{' ' * (indent + 4)}[{_human_value(item)}]")
        else:
            print(f"{' ' * indent}{name}: {_human_value(v)}")


def dump_human_info(info):
    print(f"image: {info['filename']}")
    print(f"file format: {info['format']}")
    print(f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)")
    if "actual-size" in info:
        print(f"disk size: {size_to_str(info['actual-size'])}")
    else:
        print("disk size: unavailable")
    if info.get("encrypted"):
        print("encrypted: yes")
    if "cluster-size" in info:
        print(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        print("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full and full != info["backing-filename"]:
            line += f" (actual path: {full})"
        print(line)
        if "backing-filename-format" in info:
            print(f"backing file format: {info['backing-filename-format']}")
    spec = info.get("format-specific")
    if spec:
        print("Format specific information:")
        _dump_spec(spec.get("data", {}), 4)


def cmd_info(a):
    infos = []
    filename, fmt, seen = a.filename, a.fmt, set()
    while True:
        real = os.path.realpath(filename)
        if real in seen:
            raise Error(f"Backing file '{filename}' creates an infinite loop.")
        seen.add(real)
        info = image_info(filename, fmt, force_share=a.force_share)
        infos.append(info)
        if not a.backing_chain or "full-backing-filename" not in info:
            break
        filename = info["full-backing-filename"]
        fmt = info.get("backing-filename-format")
    if a.output == "json":
        jdump(infos if a.backing_chain else infos[0])
    else:
        for i, info in enumerate(infos):
            if i:
                print()
            dump_human_info(info)
    return 0


# -------------------------------------------------------------------- check
_CHECK_ORDER = ("image-end-offset", "total-clusters", "check-errors", "leaks", "leaks-fixed", "corruptions",
                "corruptions-fixed", "allocated-clusters", "fragmented-clusters", "compressed-clusters",
                "filename", "format")


def cmd_check(a):
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


# ---------------------------------------------------------------------- map
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


def cmd_map(a):
    with open_image(a.filename, a.fmt, force_share=a.force_share) as blk:
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


# ------------------------------------------------------------------ compare
def _first_mismatch(b1, b2, n, base):
    """Byte offset (sector-granular, as qemu reports it) of the first difference, or -1."""
    if b1[:n] == b2[:n]:
        return -1
    lo, hi = 0, n
    while hi - lo > SECTOR:
        mid = lo + (((hi - lo) // 2 + SECTOR - 1) // SECTOR) * SECTOR
        if mid >= hi:
            break
        if b1[lo:mid] != b2[lo:mid]:
            hi = mid
        else:
            lo = mid
    return base + lo


def _first_nonzero(buf, n, base):
    mv = memoryview(buf)[:n]
    if not any_nonzero(mv):
        return -1
    lo, hi = 0, n
    while hi - lo > SECTOR:
        mid = lo + (((hi - lo) // 2 + SECTOR - 1) // SECTOR) * SECTOR
        if mid >= hi:
            break
        if any_nonzero(mv[lo:mid]):
            hi = mid
        else:
            lo = mid
    return base + lo


_ZEROS = bytes(IO_BUF_SIZE)


def any_nonzero(mv):
    """True if the buffer holds a non-zero byte (IOVector.is_zero: C speed; comparing memoryviews
    with == goes item by item and is ~90x slower)."""
    return not IOVector(mv).is_zero() if len(mv) else False


def cmd_compare(a):
    try:
        cache = cache_opts(a.cache)
    except UsageError as e:             # qemu-img compare: any error is exit code 2
        err(str(e))
        return 2
    try:
        blk1 = open_image(a.filename1, a.fmt1, cache=cache, force_share=a.force_share)
    except Error as e:
        err(str(e))
        return 2
    try:
        blk2 = open_image(a.filename2, a.fmt2, cache=cache, force_share=a.force_share)
    except Error as e:
        blk1.close()
        err(str(e))
        return 2
    try:
        return _compare(a, blk1, blk2)
    except Error as e:
        err(str(e))
        return 2
    finally:
        blk1.close()
        blk2.close()


def _compare(a, blk1, blk2):
    q = a.quiet
    n1, n2 = blk1.node, blk2.node
    size1, size2 = blk1.length, blk2.length
    common = min(size1, size2)
    if a.strict and size1 != size2:
        qprint(q, "Strict mode: Image size mismatch!")
        return 1
    buf1, buf2 = bytearray(IO_BUF_SIZE), bytearray(IO_BUF_SIZE)
    prog = progress_bar(a)
    total = max(size1, size2) or 1
    off = 0
    while off < common:
        s1, p1 = status_above(n1, off, common - off)
        s2, p2 = status_above(n2, off, common - off)
        chunk = min(p1, p2)
        al1, al2 = bool(s1 & BS_ALLOCATED), bool(s2 & BS_ALLOCATED)
        # qemu-img compares the whole status; OFFSET_VALID tells a compressed cluster from a plain one
        strict_mask = BS_ALLOCATED | BS_ZERO | BS_DATA | BS_OFFSET_VALID
        if a.strict and (s1 & strict_mask) != (s2 & strict_mask):
            qprint(q, f"Strict mode: Offset {off} block status mismatch!")
            return 1
        if s1 & BS_ZERO and s2 & BS_ZERO:
            pass
        elif al1 == al2:
            if al1:
                chunk = min(chunk, IO_BUF_SIZE)
                blk1.preadv(off, IOVector(memoryview(buf1)[:chunk]))
                blk2.preadv(off, IOVector(memoryview(buf2)[:chunk]))
                bad = _first_mismatch(buf1, buf2, chunk, off)
                if bad >= 0:
                    qprint(q, f"Content mismatch at offset {bad}!")
                    return 1
        else:
            chunk = min(chunk, IO_BUF_SIZE)
            blk = blk1 if al1 else blk2
            blk.preadv(off, IOVector(memoryview(buf1)[:chunk]))
            # both sides are read: the unallocated one reads its backing (or zeroes)
            other = blk2 if al1 else blk1
            other.preadv(off, IOVector(memoryview(buf2)[:chunk]))
            bad = _first_mismatch(buf1, buf2, chunk, off)
            if bad >= 0:
                qprint(q, f"Content mismatch at offset {bad}!")
                return 1
        off += chunk
        prog.update(off * 100.0 / total)
    if size1 != size2:
        qprint(q, "Warning: Image size mismatch!")
        blk_over = blk1 if size1 > size2 else blk2
        over_end = max(size1, size2)
        while off < over_end:
            s, chunk = status_above(blk_over.node, off, over_end - off)
            if s & BS_ALLOCATED and not s & BS_ZERO or not s & (BS_ALLOCATED | BS_ZERO):
                chunk = min(chunk, IO_BUF_SIZE)
                blk_over.preadv(off, IOVector(memoryview(buf1)[:chunk]))
                bad = _first_nonzero(buf1, chunk, off)
                if bad >= 0:
                    qprint(q, f"Content mismatch at offset {bad}!")
                    return 1
            off += chunk
            prog.update(off * 100.0 / total)
    prog.done()
    qprint(q, "Images are identical.")
    return 0


# ------------------------------------------------------------------ convert
def _compressed_writer(node):
    """The driver's compressed-cluster write, if it offers one (QEMU: bdrv_co_pwritev_compressed)."""
    d = node.driver
    for name in ("pwritev_compressed", "write_compressed", "pwrite_compressed"):
        fn = getattr(d, name, None)
        if fn is not None:
            return name, fn
    return None, None


def cmd_convert(a):
    try:
        opts = parse_o(a.options)
    except OptionsHelp:
        return print_create_options(a.out_fmt or "raw")
    if not a.filenames or len(a.filenames) < 2:
        raise UsageError("Expecting one image file name (and an output file)")
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
    odrv = get_driver(out_fmt)
    if a.compress and not odrv.supports_backing and out_fmt != "qcow2":
        raise Error("Compression not supported for this file format")
    if backing is not None and not odrv.supports_backing:
        raise Error(f"Backing file not supported for file format '{out_fmt}'")
    src = open_image(src_name, a.fmt, cache=cache_opts(a.src_cache), force_share=a.force_share)
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
    """Copy ``src`` to ``dst`` with the copy engine of tools/convert.py: zero/unallocated ranges are
    skipped (the fresh target reads zeroes), data is read and written by a few worker threads."""
    from .convert import Copier
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


# ------------------------------------------------------------------- commit
def cmd_commit(a):
    blk = open_image(a.filename, a.fmt, read_only=False, cache=cache_opts(a.cache))
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


# ------------------------------------------------------------------- rebase
def _backing_setter(node):
    d = node.driver
    for name in ("change_backing_file", "set_backing_file"):
        fn = getattr(d, name, None)
        if fn is not None:
            return fn
    return None


def cmd_rebase(a):
    if a.backing is None:
        raise UsageError("Must specify backing file (-b) or use '-b \"\"' to remove it")
    new_backing = a.backing or None
    new_fmt = a.backing_fmt
    if new_backing and new_fmt is None:
        full = full_backing_name(a.filename, new_backing)
        if os.path.exists(full):
            new_fmt = probe_format(full)
        elif not a.unsafe:
            raise Error(f"Could not open new backing file '{full}': No such file or directory")
    if a.unsafe:
        blk = open_image(a.filename, a.fmt, backing=False, read_only=False, cache=cache_opts(a.cache))
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
    blk = open_image(a.filename, a.fmt, read_only=False, cache=cache_opts(a.cache))
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
                            m2[k:] = _ZEROS[:c - k]
                    else:
                        m2[:] = _ZEROS[:c]
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


# -------------------------------------------------------------------- bench
def cmd_bench(a):
    count = a.count
    depth = a.depth
    bufsize = size_arg(a.size, "buffer size")
    step = size_arg(a.step, "step size") if a.step is not None else 0
    offset = size_arg(a.offset, "offset") if a.offset is not None else 0
    pattern = a.pattern
    if count < 1:
        raise UsageError(f"Invalid request count specified: {count}")
    if depth < 1:
        raise UsageError(f"Invalid queue depth specified: {depth}")
    if bufsize < 1 or bufsize > (1 << 31):
        raise UsageError(f"Invalid buffer size specified: {a.size}")
    if a.flush_interval and a.flush_interval < depth:
        raise UsageError("Flush interval can't be smaller than depth")
    if a.flush_interval and not a.write:
        raise UsageError("--flush-interval is only available in write tests")
    if a.no_drain and not a.flush_interval:
        raise UsageError("--no-drain requires --flush-interval")
    if not step:
        step = bufsize
    cache = cache_opts(a.cache or "writeback")
    extra = None
    if a.native:
        extra = None  # aio=native has no meaning for pyrep: requests run on the caller's threads
    blk = open_image(a.filename, a.fmt, read_only=not a.write, cache=cache, force_share=a.force_share,
                     extra=extra)
    try:
        image_size = blk.length
        qprint(a.quiet, f"Sending {count} {'write' if a.write else 'read'} requests, {bufsize} bytes each, "
                        f"{depth} in parallel (starting at offset {offset}, step size {step})")
        if a.flush_interval:
            qprint(a.quiet, f"Sending flush every {a.flush_interval} requests")
        elapsed = run_bench(blk, count, depth, bufsize, step, offset, image_size, a.write, pattern,
                            a.flush_interval, a.path, a.threads)
        qprint(a.quiet, "Run completed in %.3f seconds." % elapsed)
    finally:
        blk.close()
    return 0


def _offsets(start, step, image_size, count, first, stride):
    """The offsets request i (i = first, first+stride, ...) uses: qemu's ``offset = (offset + step) % size``."""
    return [(start + i * step) % image_size for i in range(first, count, stride)]


def run_bench(blk, count, depth, bufsize, step, offset, image_size, write, pattern, flush_interval, path,
              threads=0):
    """Issue the requests; returns the elapsed seconds (setup excluded, as in qemu-img)."""
    # request function: the backend (public path) or its root edge (node graph, no in-flight gate)
    if path == "node":
        fn = blk._root.pwritev if write else blk._root.preadv
    else:
        fn = blk.pwritev if write else blk.preadv
    nthreads = min(threads or depth, depth, count)
    flush = blk.flush

    def worker(first, stride, out):
        # page-aligned (as qemu's qemu_blockalign): the kernel copies aligned buffers faster
        buf = mmap.mmap(-1, bufsize)
        if pattern:
            buf[:] = bytes([pattern & 0xff]) * bufsize
        iov = IOVector(buf)
        offs = _offsets(offset, step, image_size, count, first, stride)
        f = fn
        try:
            barrier.wait()
            if path == "node":
                n = bufsize
                if write:
                    for o in offs:
                        f(o, n, iov, 0)
                else:
                    for o in offs:
                        f(o, n, iov)
            elif flush_interval:
                done = 0
                for o in offs:
                    f(o, iov)
                    done += 1
                    if done % flush_interval == 0:
                        flush()
            else:
                for o in offs:
                    f(o, iov)
        except BaseException as e:  # noqa: BLE001
            out.append(e)

    errors = []
    barrier = threading.Barrier(nthreads + 1)
    if nthreads == 1:
        # depth 1: no thread at all, the loop runs here
        barrier = _NoBarrier()
        t0 = time.perf_counter()
        worker(0, 1, errors)
        if flush_interval:
            flush()
        t1 = time.perf_counter()
    else:
        # ``depth`` requests in flight: one thread per slot, request i goes to slot i % depth
        # (flush-interval then applies per slot, a close approximation of qemu's global count)
        threads = [threading.Thread(target=worker, args=(w, nthreads, errors), daemon=True)
                   for w in range(nthreads)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        if flush_interval:
            flush()
        t1 = time.perf_counter()
    if errors:
        e = errors[0]
        raise Error(f"Failed request: {e}")
    return t1 - t0


class _NoBarrier:
    def wait(self):
        pass


# --------------------------------------------------------------------- main
_COMMANDS = ("create", "info", "check", "map", "compare", "convert", "commit", "rebase", "bench")

def _int(text):
    return int(text, 0)


class _Parser(argparse.ArgumentParser):
    """qemu-img exits 1 on a usage error (argparse would exit 2, compare's "error" code)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: {message}\n")


class _Unused:
    """Stands for the sub-parser of a command that is not being run: it is not built."""

    def add_argument(self, *args, **kw):
        pass


def build_parser(cmd=None):
    """The argument parser; with ``cmd`` (the command being run), only that command's sub-parser is
    built (all of them cost ~4 ms of every start-up)."""
    p = _Parser(prog=PROG, description="pyrep disk image utility (qemu-img compatible)")
    sub = p.add_subparsers(dest="cmd", metavar="command", parser_class=_Parser)
    sub.required = True

    def add(name, fn, help_):
        if cmd is not None and cmd != name:
            return _Unused()
        s = sub.add_parser(name, help=help_)
        s.set_defaults(func=fn)
        return s

    s = add("create", cmd_create, "create a new image")
    s.add_argument("-f", dest="fmt")
    s.add_argument("-b", dest="backing")
    s.add_argument("-F", dest="backing_fmt")
    s.add_argument("-o", dest="options", action="append")
    s.add_argument("-u", dest="unsafe", action="store_true")
    s.add_argument("-q", dest="quiet", action="store_true")
    s.add_argument("filename", nargs="?")          # not needed for -o help
    s.add_argument("size", nargs="?")

    s = add("info", cmd_info, "show information about an image")
    s.add_argument("-f", dest="fmt")
    s.add_argument("--output", choices=("human", "json"), default="human")
    s.add_argument("--backing-chain", action="store_true")
    s.add_argument("-U", "--force-share", action="store_true")
    s.add_argument("filename")

    s = add("check", cmd_check, "check an image for consistency")
    s.add_argument("-f", dest="fmt")
    s.add_argument("-r", dest="repair", choices=("leaks", "all"))
    s.add_argument("--output", choices=("human", "json"), default="human")
    s.add_argument("-q", dest="quiet", action="store_true")
    s.add_argument("-U", "--force-share", action="store_true")
    s.add_argument("-T", dest="src_cache")
    s.add_argument("filename")

    s = add("map", cmd_map, "show the allocation map of an image")
    s.add_argument("-f", dest="fmt")
    s.add_argument("--output", choices=("human", "json"), default="human")
    s.add_argument("-s", "--start-offset", type=lambda v: size_arg(v, "offset"))
    s.add_argument("-l", "--max-length", type=lambda v: size_arg(v, "length"))
    s.add_argument("-U", "--force-share", action="store_true")
    s.add_argument("filename")

    s = add("compare", cmd_compare, "compare the contents of two images")
    s.add_argument("-f", dest="fmt1")
    s.add_argument("-F", dest="fmt2")
    s.add_argument("-s", dest="strict", action="store_true")
    s.add_argument("-q", dest="quiet", action="store_true")
    s.add_argument("-p", dest="progress", action="store_true")
    s.add_argument("-T", dest="cache")
    s.add_argument("-U", "--force-share", action="store_true")
    s.add_argument("filename1")
    s.add_argument("filename2")

    s = add("convert", cmd_convert, "convert an image to another format")
    s.add_argument("-f", dest="fmt")
    s.add_argument("-O", dest="out_fmt")
    s.add_argument("-c", dest="compress", action="store_true")
    s.add_argument("-p", dest="progress", action="store_true")
    s.add_argument("-q", dest="quiet", action="store_true")
    s.add_argument("-o", dest="options", action="append")
    s.add_argument("-B", dest="backing")
    s.add_argument("-F", dest="backing_fmt")
    s.add_argument("-n", dest="no_create", action="store_true")
    s.add_argument("-S", dest="min_sparse")
    s.add_argument("-t", dest="cache")
    s.add_argument("-T", dest="src_cache")
    s.add_argument("-m", dest="num_coroutines", type=int)
    s.add_argument("-W", dest="unordered", action="store_true")
    s.add_argument("-U", "--force-share", action="store_true")
    s.add_argument("--target-size", dest="target_size")
    s.add_argument("filenames", nargs="*")

    s = add("commit", cmd_commit, "commit an image into its backing file")
    s.add_argument("-f", dest="fmt")
    s.add_argument("-b", dest="base")
    s.add_argument("-d", dest="drop", action="store_true")
    s.add_argument("-p", dest="progress", action="store_true")
    s.add_argument("-q", dest="quiet", action="store_true")
    s.add_argument("-t", dest="cache")
    s.add_argument("filename")

    s = add("rebase", cmd_rebase, "change the backing file of an image")
    s.add_argument("-f", dest="fmt")
    s.add_argument("-b", dest="backing")
    s.add_argument("-F", dest="backing_fmt")
    s.add_argument("-u", dest="unsafe", action="store_true")
    s.add_argument("-p", dest="progress", action="store_true")
    s.add_argument("-q", dest="quiet", action="store_true")
    s.add_argument("-t", dest="cache")
    s.add_argument("filename")

    s = add("bench", cmd_bench, "run a simple image benchmark")
    s.add_argument("-c", dest="count", type=int, default=75000)
    s.add_argument("-d", dest="depth", type=int, default=64)
    s.add_argument("-f", dest="fmt")
    s.add_argument("-s", dest="size", default="4096")
    s.add_argument("-S", dest="step")
    s.add_argument("-o", dest="offset")
    s.add_argument("-w", dest="write", action="store_true")
    s.add_argument("-P", "--pattern", dest="pattern", type=_int, default=0)
    s.add_argument("-t", dest="cache", default="writeback")
    s.add_argument("-n", dest="native", action="store_true")
    s.add_argument("-i", dest="aio")
    s.add_argument("-q", dest="quiet", action="store_true")
    s.add_argument("-U", "--force-share", action="store_true")
    s.add_argument("--flush-interval", dest="flush_interval", type=int, default=0)
    s.add_argument("--no-drain", dest="no_drain", action="store_true")
    s.add_argument("--threads", type=int, default=0,
                   help="pyrep only: worker threads for depth > 1 (default: depth, one per in-flight request)")
    s.add_argument("--path", choices=("backend", "node"), default="backend",
                   help="pyrep only: issue requests through the BlockBackend (default) or its root edge")
    s.add_argument("filename")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv and argv[0] in _COMMANDS else None)
    try:
        args = parser.parse_args(argv)
    except UsageError as e:             # raised by a type= check (sizes, offsets)
        err(str(e))
        return 1
    try:
        rc = args.func(args)
    except UsageError as e:
        err(str(e))
        return 1
    except (Error, OSError) as e:
        err(str(e))
        return 2 if args.cmd == "compare" else 1
    except KeyboardInterrupt:
        return 130
    finally:
        try:
            sys.stdout.flush()
        except Exception:  # noqa: BLE001
            pass
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
