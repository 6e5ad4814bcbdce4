"""pyrep-io's commands: qemu-io's common ones, one function each, registered in one table.

A command is ``fn(ctx, opts, operands) -> bool`` (False: it failed, the exit code becomes 1). Its
options are parsed as qemu-io parses them (getopt: ``-qv``, ``-P 0xab``, ``-P0xab``); messages and
where they go (stdout or stderr) follow qemu-io 7.2.
"""
import os
import shlex
import sys
import time

from pyrep._core.iovec import IOVector
from pyrep.constants import BS_ALLOCATED
from pyrep.errors import Error, OptionError
from pyrep.node import skip_filters
from pyrep.options import parse_size

from .output import cvtstr, dump_buffer, report

PROG = "pyrep-io"


class Command:
    """One entry of the table: ``usage`` and ``help`` are what ``help`` prints; ``optspec`` is getopt's
    (``"P:qv"``); ``nargs`` the (min, max) operand count, max None for no limit."""

    def __init__(self, name, fn, usage, help, optspec="", nargs=(0, 0), alias=None, needs_file=True):
        self.name, self.fn, self.usage, self.help = name, fn, usage, help
        self.optspec, self.nargs, self.alias, self.needs_file = optspec, nargs, alias, needs_file

    def line(self):
        # qemu-io prints "name  -- help" for a command whose usage is "" and "name -- help" for none
        return f"{self.name} -- {self.help}" if self.usage is None else f"{self.name} {self.usage} -- {self.help}"


COMMANDS = {}       # name -> Command
ALIASES = {}        # alias -> name


def command(name, usage, help, optspec="", nargs=(0, 0), alias=None, needs_file=True):
    def register(fn):
        COMMANDS[name] = Command(name, fn, usage, help, optspec, nargs, alias, needs_file)
        if alias:
            ALIASES[alias] = name
        return fn
    return register


class ArgError(Exception):
    """A refused command: qemu-io prints the message on stdout (``stderr``: as "pyrep-io: ..." on stderr)
    and the command fails."""

    def __init__(self, message, stderr=False):
        super().__init__(message)
        self.stderr = stderr


class Context:
    """What commands work on: the open image (``blk``, or None) and the pending aio requests."""

    def __init__(self, blk):
        self.blk = blk
        self.aio = []       # [(future, on_done)] in submission order
        self.quit = False

    def reap(self, wait=False):
        """Report finished aio requests (all of them, waiting, when ``wait``). As in qemu-io, what an aio
        request reports when it completes (an I/O error, a pattern mismatch) does not fail the run."""
        keep = []
        for fut, on_done in self.aio:
            if wait or fut.done():
                on_done(fut)
            else:
                keep.append((fut, on_done))
        self.aio = keep


# --------------------------------------------------------------------------- arguments
def getopt(args, optspec, name):
    """(options, operands): ``-x`` flags True, ``-x VALUE`` for letters followed by ``:`` in optspec."""
    opts, i = {}, 0
    while i < len(args):
        a = args[i]
        if a == "--":
            i += 1
            break
        if not a.startswith("-") or a == "-":
            break
        j = 1
        while j < len(a):
            c = a[j]
            k = optspec.find(c)
            if k < 0 or c == ":":
                raise _InvalidOption(f"{name}: invalid option -- '{c}'")
            if optspec[k + 1:k + 2] == ":":
                value = a[j + 1:]
                if not value:
                    i += 1
                    if i >= len(args):
                        raise _InvalidOption(f"{name}: option requires an argument -- '{c}'")
                    value = args[i]
                opts[c] = value
                break
            opts[c] = True
            j += 1
        i += 1
    return opts, args[i:]


class _InvalidOption(Exception):
    """getopt's complaint: on stderr, followed by the command's help line on stdout."""


def number(text):
    """qemu-io's cvtnum: bytes, with k/M/G/T/P/E suffixes or in hex."""
    t = text.strip()
    try:
        if t.lower().startswith("0x"):
            return int(t, 16)
        if t.lower().endswith("b") and t[:-1].isdigit():
            t = t[:-1]
        n = parse_size(t, "number")
    except (ValueError, OptionError):
        n = None
    if n is None or n < 0:
        raise ArgError(f"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {text}")
    return n


def pattern(text):
    """A pattern byte as C's strtol(text, 0) reads it (0x.. hex, 0.. octal); 0-255 only."""
    t = text.strip()
    try:
        if t[:2].lower() == "0x":
            v = int(t[2:], 16)
        elif t.startswith("0") and len(t) > 1:
            v = int(t[1:], 8)
        else:
            v = int(t, 10)
    except ValueError:
        v = -1
    if not 0 <= v <= 255:
        raise ArgError(f"{text} is not a valid pattern byte")
    return v


def _errstr(e):
    err = getattr(e, "errno", None)
    return os.strerror(err) if err else str(e)


def _failed(what, e):
    print(f"{what} failed: {_errstr(e)}", file=sys.stderr)
    return False


def _range(operands):
    """``off len [len...]``: the offset and the total length."""
    off = number(operands[0])
    return off, sum(number(t) for t in operands[1:])


# --------------------------------------------------------------------------- synchronous I/O
def _verify(buf, pat, off):
    if pat is not None and buf != bytes([pat]) * len(buf):
        print(f"Pattern verification failed at offset {off}, {len(buf)} bytes")
        return False
    return True


def _read(ctx, o, operands, name):
    """A read request: ``(call, finish)``; ``finish(error)`` verifies, dumps and reports as qemu-io."""
    off, n = _range(operands)
    pat = pattern(o["P"]) if "P" in o else None
    buf = bytearray(n)
    t0 = time.perf_counter()

    def finish(error):
        if error is not None:
            return _failed(name, error)
        dt = time.perf_counter() - t0
        ok = _verify(buf, pat, off)
        if o.get("v"):
            dump_buffer(buf, off)
        if not o.get("q"):
            report("read", n, n, off, dt)
        return ok
    return (ctx.blk.preadv, off, IOVector(buf)), finish


def _write(ctx, o, operands, name):
    """A write request (data, or zeroes with -z): ``(call, finish)``."""
    off, n = _range(operands)
    args = _write_args(ctx, o)
    t0 = time.perf_counter()

    def finish(error):
        if error is not None:
            return _failed(name, error)
        if not o.get("q"):
            report("wrote", n, n, off, time.perf_counter() - t0)
        return True
    return (_do_write, ctx.blk, off, n, *args), finish


def _now(call, finish):
    """Run a request on this thread; what ``finish`` says."""
    try:
        call[0](*call[1:])
    except Error as e:
        return finish(e)
    return finish(None)


def _later(ctx, call, finish):
    """Submit a request; ``finish`` runs when ``ctx.reap`` finds it done."""
    def done(fut):
        e = fut.exception()
        if e is not None and not isinstance(e, Error):
            raise e                 # a bug, not an I/O error: let it show
        return finish(e)
    ctx.aio.append((ctx.blk.submit(*call), done))
    return True


@command("read", "[-qv] [-P pattern] off len", "reads a number of bytes at a specified offset", "P:qv", (2, 2),
         alias="r")
def do_read(ctx, o, operands):
    return _now(*_read(ctx, o, operands, "read"))


def _write_args(ctx, o):
    """(pattern byte, zero?, may unmap?, flags) of write and aio_write."""
    if ctx.blk.read_only:
        raise ArgError("Block node is read-only", stderr=True)
    if o.get("z") and "P" in o:
        raise ArgError("Only one of -z, -P, and -s can be specified at the same time")
    if o.get("u") and not o.get("z"):
        raise ArgError("-u requires -z to be specified")
    pat = 0xcd if "P" not in o else pattern(o["P"])
    return pat, bool(o.get("z")), bool(o.get("u")), 1 if o.get("f") else 0


def _do_write(blk, off, n, pat, zero, unmap, flags):
    if zero:
        blk.pwrite_zeroes(off, n, flags, may_unmap=unmap)
    else:
        blk.pwrite(off, bytes([pat]) * n, flags)


@command("write", "[-fquz] [-P pattern] off len", "writes a number of bytes at a specified offset", "P:fquz",
         (2, 2), alias="w")
def do_write(ctx, o, operands):
    return _now(*_write(ctx, o, operands, "write"))


@command("discard", "[-q] off len", "discards a number of bytes at a specified offset", "q", (2, 2), alias="d")
def do_discard(ctx, o, operands):
    off, n = _range(operands)
    t0 = time.perf_counter()
    try:
        ctx.blk.pdiscard(off, n)
    except Error as e:
        return _failed("discard", e)
    if not o.get("q"):
        report("discard", n, n, off, time.perf_counter() - t0)
    return True


@command("flush", None, "flush all in-core file state to disk", alias="f")
def do_flush(ctx, o, operands):
    try:
        ctx.blk.flush()
    except Error as e:
        return _failed("flush", e)
    return True


@command("length", None, "gets the length of the current file", alias="l")
def do_length(ctx, o, operands):
    print(cvtstr(ctx.blk.length))
    return True


# --------------------------------------------------------------------------- asynchronous I/O
@command("aio_read", "[-qv] [-P pattern] off len [len..]", "asynchronously reads a number of bytes", "P:qv",
         (2, None))
def do_aio_read(ctx, o, operands):
    return _later(ctx, *_read(ctx, o, operands, "aio_read"))


@command("aio_write", "[-fquz] [-P pattern] off len [len..]", "asynchronously writes a number of bytes",
         "P:fquz", (2, None))
def do_aio_write(ctx, o, operands):
    return _later(ctx, *_write(ctx, o, operands, "aio_write"))


@command("aio_flush", None, "completes all outstanding aio requests")
def do_aio_flush(ctx, o, operands):
    ctx.reap(wait=True)
    return True


# --------------------------------------------------------------------------- the image
@command("map", "", "prints the allocated areas of a file")
def do_map(ctx, o, operands):
    """What the image itself allocates (as qemu-io: its backing chain is not looked at)."""
    node, length, off, run = skip_filters(ctx.blk.node), ctx.blk.length, 0, None
    while off < length:
        st = node.block_status(off, min(length - off, 1 << 30))
        n = max(st.length, 1)
        alloc = bool(st.flags & BS_ALLOCATED)
        if run is not None and run[0] == alloc:
            run[2] += n
        else:
            if run is not None:
                _map_line(*run)
            run = [alloc, off, n]
        off += n
    if run is not None:
        _map_line(*run)
    return True


def _map_line(alloc, off, n):
    print(f"{cvtstr(n)} (0x{n:x}) bytes {'   ' if alloc else 'not'} allocated at offset {cvtstr(off)} (0x{off:x})")


def vm_state_offset(info, size):
    """Where a qcow2 image would keep VM state: past the last L1 entry its virtual size needs."""
    cs = info.get("cluster-size") or 0
    if not cs:
        return 0
    data = (info.get("format-specific") or {}).get("data") or {}
    cluster_bits = cs.bit_length() - 1
    l2_bits = cluster_bits - (4 if data.get("extended-l2") else 3)
    span = 1 << (cluster_bits + l2_bits)
    return -(-size // span) * span


@command("info", None, "prints information about the current file")
def do_info(ctx, o, operands):
    from ..img.info import dump_spec
    node = skip_filters(ctx.blk.node)
    try:
        info = node.driver.get_info() or {}
    except Error:
        info = {}
    fmt = node.drv.format_name
    print(f"format name: {fmt}")
    print(f"cluster size: {cvtstr(info.get('cluster-size') or 0)}")
    print(f"vm state offset: {cvtstr(vm_state_offset(info, ctx.blk.length) if fmt == 'qcow2' else 0)}")
    spec = (info.get("format-specific") or {}).get("data")
    if spec:
        print("Format specific information:")
        dump_spec(spec, 4)
    return True


@command("help", "[command]", "help for one or all commands", nargs=(0, 1), alias="?", needs_file=False)
def do_help(ctx, o, operands):
    if operands:
        cmd = COMMANDS.get(ALIASES.get(operands[0], operands[0]))
        if cmd is None:
            print(f"command {operands[0]} not found")
            return False
        print(cmd.line())
        return True
    for name in sorted(COMMANDS):
        print(COMMANDS[name].line())
    print("\nUse 'help commandname' for extended help.")
    return True


@command("quit", None, "exit the program", alias="q", needs_file=False)
def do_quit(ctx, o, operands):
    ctx.quit = True
    return True


# --------------------------------------------------------------------------- one command line
def _count_error(name, got, lo, hi):
    if got < lo:
        want = f"at least {lo}"
    elif hi == lo:
        want = f"{lo}"
    else:
        want = f"between {lo} and {hi}"
    return f"bad argument count {got} to {name}, expected {want} arguments"


def run_command(ctx, line):
    """Run one command line; False if it failed."""
    ctx.reap()
    try:
        words = shlex.split(line)
    except ValueError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return False
    if not words:
        return True
    cmd = COMMANDS.get(ALIASES.get(words[0], words[0]))
    if cmd is None:
        print(f"command \"{words[0]}\" not found", file=sys.stderr)
        return False
    try:
        opts, operands = getopt(words[1:], cmd.optspec, cmd.name)
    except _InvalidOption as e:
        print(e, file=sys.stderr)
        print(cmd.line())
        return False
    lo, hi = cmd.nargs
    if len(operands) < lo or (hi is not None and len(operands) > hi):
        print(_count_error(cmd.name, len(operands), lo, hi), file=sys.stderr)
        return False
    if cmd.needs_file and ctx.blk is None:
        print("no file open, try 'help open'", file=sys.stderr)
        return False
    try:
        return cmd.fn(ctx, opts, operands)
    except ArgError as e:
        if e.stderr:
            print(f"{PROG}: {e}", file=sys.stderr)
        else:
            print(e)
        return False
