"""What several pyrep-img commands share: error printing, qemu-img's argument syntaxes (sizes, ``-o``,
cache modes), creation options, output helpers (qemu's size text, JSON key order, progress)."""
import sys

import pyrep
from pyrep._core.registry import get_driver
from pyrep.errors import Error
from pyrep.options import parse_size

from .progress import Progress

PROG = "pyrep-img"
IO_BUF_SIZE = 2 << 20          # qemu-img's convert/compare buffer
SECTOR = 512


class UsageError(Exception):
    """A command-line mistake: message on stderr, exit code 1; ``hint``: qemu-img adds "Try ... --help"."""

    def __init__(self, message, hint=False):
        super().__init__(message)
        self.hint = hint


def err(msg, hint=False):
    """An error line on stderr, as qemu-img prints it (``hint``: its "Try ... --help" line too)."""
    print(f"{PROG}: {msg}", file=sys.stderr)
    if hint:
        print(f"Try '{PROG} --help' for more information", file=sys.stderr)


def qprint(quiet, *args, **kw):
    if not quiet:
        print(*args, **kw)


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


ZEROS = bytes(IO_BUF_SIZE)    # a buffer's worth of zeroes to compare against
