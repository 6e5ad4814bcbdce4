"""``pyrep-io``: a small qemu-io on pyrep's block layer.

    pyrep-io [-f fmt] [-r] [-U] [-t cache] -c 'write -P 0xab 0 64k' -c 'read -P 0xab 0 64k' image

Commands: read [-P pattern] [-v] [-q] off len; write [-P pattern | -z [-u]] [-q] off len; discard off len;
flush (aio_flush); length. Output and messages follow qemu-io ("wrote N/N bytes at offset O",
"Pattern verification failed at offset O, N bytes"); the exit code is 1 if any command failed.
"""
import argparse
import os
import shlex
import sys
import time

import pyrep
from pyrep._core.iovec import IOVector
from pyrep.errors import Error
from pyrep.graph import probe_format
from pyrep.options import parse_size

PROG = "pyrep-io"


def _num(text):
    t = text.strip()
    if t.lower().startswith("0x"):
        return int(t, 16)
    if t.lower().endswith("b") and t[:-1].isdigit():
        t = t[:-1]
    return parse_size(t, "number")


def cvtstr(value):
    """qemu-io's cvtstr: ``64 KiB``, ``53.296 MiB``, ``32 bytes``."""
    for shift, suffix in ((60, " EiB"), (50, " PiB"), (40, " TiB"), (30, " GiB"), (20, " MiB"), (10, " KiB")):
        if value >= (1 << shift):
            s = "%.3f" % (value / (1 << shift))
            if s.endswith(".000"):
                s = s[:-4]
            return s + suffix
    s = "%.3f" % value
    if s.endswith(".000"):
        s = s[:-4]
    return s + " bytes"


def report(verb, done, total, offset, secs, cnt=1):
    print(f"{verb} {done}/{total} bytes at offset {offset}")
    secs = max(secs, 1e-9)
    print(f"{cvtstr(done)}, {cnt} ops; {'%05.2f' % secs} sec ({cvtstr(done / secs)}/sec and "
          f"{cnt / secs:.4f} ops/sec)")


def dump_buffer(buf, offset):
    for i in range(0, len(buf), 16):
        chunk = buf[i:i + 16]
        hexs = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        print(f"{offset + i:08x}:  {hexs:<47}  {text}")


class _CmdParser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


def _parser(name):
    p = _CmdParser(prog=name, add_help=False)
    p.add_argument("-q", action="store_true")
    p.add_argument("-P", dest="pattern", type=lambda v: int(v, 0))
    p.add_argument("offset")
    p.add_argument("length")
    return p


_READ = _parser("read")
_READ.add_argument("-v", action="store_true")
_WRITE = _parser("write")
_WRITE.add_argument("-z", action="store_true")
_WRITE.add_argument("-u", action="store_true")
_WRITE.add_argument("-f", dest="fua", action="store_true")
_DISCARD = _parser("discard")


def do_read(blk, args):
    a = _READ.parse_args(args)
    off, n = _num(a.offset), _num(a.length)
    buf = bytearray(n)
    t0 = time.perf_counter()
    try:
        blk.preadv(off, IOVector(buf))
    except Error as e:
        print(f"read failed: {_errstr(e)}", file=sys.stderr)
        return False
    dt = time.perf_counter() - t0
    ok = True
    if a.pattern is not None:
        if buf != bytes([a.pattern & 0xff]) * n:
            print(f"Pattern verification failed at offset {off}, {n} bytes")
            ok = False
    if a.v:
        dump_buffer(buf, off)
    if not a.q:
        report("read", n, n, off, dt)
    return ok


def do_write(blk, args):
    a = _WRITE.parse_args(args)
    off, n = _num(a.offset), _num(a.length)
    if a.z and a.pattern is not None:
        print("-z and -P cannot be specified at the same time", file=sys.stderr)
        return False
    t0 = time.perf_counter()
    try:
        if a.z:
            blk.pwrite_zeroes(off, n, may_unmap=a.u)
        else:
            pat = 0xcd if a.pattern is None else a.pattern & 0xff
            blk.pwrite(off, bytes([pat]) * n, 1 if a.fua else 0)
    except Error as e:
        print(f"write failed: {_errstr(e)}", file=sys.stderr)
        return False
    dt = time.perf_counter() - t0
    if not a.q:
        report("wrote", n, n, off, dt)
    return True


def do_discard(blk, args):
    a = _DISCARD.parse_args(args)
    off, n = _num(a.offset), _num(a.length)
    t0 = time.perf_counter()
    try:
        blk.pdiscard(off, n)
    except Error as e:
        print(f"discard failed: {_errstr(e)}", file=sys.stderr)
        return False
    if not a.q:
        report("discard", n, n, off, time.perf_counter() - t0)
    return True


def do_flush(blk, args):
    try:
        blk.flush()
    except Error as e:
        print(f"flush failed: {_errstr(e)}", file=sys.stderr)
        return False
    return True


def do_length(blk, args):
    n = blk.length
    print(cvtstr(n))
    return True


def _errstr(e):
    err = getattr(e, "errno", None)
    if err:
        return os.strerror(err)
    return str(e)


COMMANDS = {"read": do_read, "r": do_read, "write": do_write, "w": do_write, "discard": do_discard,
            "d": do_discard, "flush": do_flush, "f": do_flush, "aio_flush": do_flush, "length": do_length,
            "l": do_length}


def run_command(blk, line):
    """Run one command line; False if it failed."""
    try:
        words = shlex.split(line)
    except ValueError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return False
    if not words:
        return True
    fn = COMMANDS.get(words[0])
    if fn is None:
        print(f"command \"{words[0]}\" not found", file=sys.stderr)
        return False
    try:
        return fn(blk, words[1:])
    except (ValueError, pyrep.OptionError) as e:
        print(f"{words[0]}: {e}", file=sys.stderr)
        return False


def main(argv=None):
    ap = argparse.ArgumentParser(prog=PROG, description="pyrep block I/O tester (qemu-io compatible subset)")
    ap.add_argument("-f", dest="fmt")
    ap.add_argument("-c", dest="cmds", action="append", default=[])
    ap.add_argument("-r", dest="read_only", action="store_true")
    ap.add_argument("-U", "--force-share", action="store_true")
    ap.add_argument("-t", dest="cache")
    ap.add_argument("-n", dest="nocache", action="store_true")
    ap.add_argument("filename")
    a = ap.parse_args(argv)
    try:
        if not os.path.exists(a.filename):
            raise Error(f"Could not open '{a.filename}': No such file or directory")
        fmt = a.fmt or probe_format(a.filename)
        f = {"driver": "file", "filename": a.filename}
        if a.force_share:
            f["locking"] = "off"
        # qemu-io opens with discard=unmap: a discard really deallocates
        opts = {"driver": fmt, "file": f, "discard": "unmap"}
        if a.cache == "unsafe":
            opts["cache"] = {"no-flush": True}
        blk = pyrep.open_backend(opts, read_only=a.read_only, shared="all" if a.force_share else None)
    except Error as e:
        msg = str(e)
        if not msg.startswith("Could not open"):
            msg = f"Could not open '{a.filename}': {msg}"
        print(f"{PROG}: can't open device {a.filename}: {msg}", file=sys.stderr)
        return 1
    ok = True
    try:
        for line in a.cmds:
            if not run_command(blk, line):
                ok = False
    finally:
        try:
            blk.close()
        except Error as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
