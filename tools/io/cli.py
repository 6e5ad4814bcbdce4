"""``pyrep-io``'s command line: open one image, run the ``-c`` commands (or read commands from stdin at
a ``qemu-io> `` prompt when there are none), exit 1 if any command failed, as qemu-io does."""
import argparse
import sys

from ..console import start_console_script, version_text
from .commands import PROG, Context, run_command

RAW_PROBED = ("WARNING: Image format was not specified for '{name}' and probing guessed raw.\n"
              "         Automatically detecting the format is dangerous for raw images, write operations on "
              "block 0 will be restricted.\n"
              "         Specify the 'raw' format explicitly to remove the restrictions.")
PROMPT = "qemu-io> "     # qemu-io's own: scripts that drive qemu-io interactively wait for it


class _Parser(argparse.ArgumentParser):
    """A usage error is one line and its --help hint, exit 1 (argparse: usage dump, exit 2)."""

    def error(self, message):
        self.exit(1, f"{PROG}: {message}\nTry '{PROG} --help' for more information\n")


def build_parser():
    p = _Parser(prog=PROG, description="pyrep block I/O tester (qemu-io compatible)",
                epilog=f"See '{PROG} -c help' for the commands.")
    p.add_argument("-c", "--cmd", dest="cmds", action="append", default=[], metavar="STRING",
                   help="run this command (repeatable); without -c, commands are read from stdin")
    p.add_argument("-f", "--format", dest="fmt", metavar="FMT",
                   help="format of the image (qcow2, raw, ...); probed when not given")
    p.add_argument("--image-opts", action="store_true",
                   help="the filename is a drive string of node options (driver=qcow2,file.filename=x.qcow2)")
    p.add_argument("-r", "--read-only", dest="read_only", action="store_true", help="open the image read-only")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="share the image with other writers (no locks; needs -r)")
    p.add_argument("-t", "--cache", dest="cache", metavar="MODE",
                   help="cache mode: writeback (default), writethrough, none, directsync, unsafe")
    p.add_argument("-n", "--nocache", dest="nocache", action="store_true", help="no host cache, short for -t none")
    p.add_argument("-V", "--version", action="version", version=version_text(PROG),
                   help="print the version and exit")
    p.add_argument("filename", nargs="?", help="the image: a file, a json:{...} pseudo-filename or a URI")
    return p


def open_device(a):
    """The BlockBackend of the image, or None after printing qemu-io's "can't open device" line."""
    from ..img.common import cache_opts
    from ..opening import OpenError, open_image
    from pyrep.errors import Error
    from pyrep.node import skip_filters
    try:
        cache = cache_opts("none" if a.nocache and a.cache is None else a.cache)
        # qemu-io opens with discard=unmap: a discard really deallocates
        blk = open_image(a.filename, a.fmt, image_opts=a.image_opts, read_only=a.read_only, cache=cache,
                         force_share=a.force_share, extra={"discard": "unmap"}, guarded_probe=True)
        if a.fmt is None and not a.image_opts and not a.filename.startswith("json:") and \
                skip_filters(blk.node).drv.format_name == "raw":
            print(RAW_PROBED.format(name=a.filename), file=sys.stderr)
        return blk
    except OpenError as e:
        reason = e.reason
    except Error as e:
        reason = str(e)
    print(f"{PROG}: can't open device {a.filename}: {reason}", file=sys.stderr)
    return None


def interactive(ctx, stdin=None):
    """qemu-io without -c: prompt, read a line, run it; until end of input or ``quit``."""
    stdin = stdin or sys.stdin
    ok = True
    while not ctx.quit:
        sys.stdout.write(PROMPT)
        sys.stdout.flush()
        line = stdin.readline()
        if not line:
            break
        ok = run_command(ctx, line) and ok
    return ok


def main(argv=None):
    start_console_script()
    a = build_parser().parse_args(argv)
    blk = None
    if a.filename is not None:
        blk = open_device(a)
        if blk is None:
            return 1
    ctx = Context(blk)
    ok = True
    try:
        if a.cmds:
            for line in a.cmds:
                ok = run_command(ctx, line) and ok
                if ctx.quit:
                    break
        else:
            ok = interactive(ctx)
        ctx.reap(wait=True)
    finally:
        if blk is not None:
            try:
                blk.close()
            except Exception as e:  # noqa: BLE001 - a failed close is reported and fails the run
                print(f"{PROG}: {e}", file=sys.stderr)
                ok = False
    return 0 if ok else 1
