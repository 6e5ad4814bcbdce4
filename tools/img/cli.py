"""The command-line core of ``pyrep-img``: one parser, one way to print an error, one table of exit codes.

Each command is a module of this package with ``add_arguments(parser)`` and ``run(args) -> exit code``;
only the module of the command being run is imported (the others cost start-up time for nothing).
"""
import argparse
import importlib
import sys

from pyrep.errors import Error

from .common import PROG, UsageError, err

# name -> one-line help; the module pyrep.tools.img.<name> implements it
COMMANDS = {
    "create": "create a new image",
    "info": "show information about an image",
    "check": "check an image for consistency",
    "map": "show the allocation map of an image",
    "compare": "compare the contents of two images",
    "convert": "convert an image to another format",
    "commit": "commit an image into its backing file",
    "rebase": "change the backing file of an image",
    "bench": "run a simple image benchmark",
}

# exit code of an error a command raises (qemu-img: 1, but compare's 1 means "different", 2 is its error)
ERROR_EXIT = {"compare": 2}


class _Parser(argparse.ArgumentParser):
    """qemu-img exits 1 on a usage error (argparse would exit 2, compare's "error" code)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: {message}\n")


def command_module(name):
    """The module implementing command ``name`` (imported on first use)."""
    return importlib.import_module(f"{__package__}.{name}")


def build_parser(cmd=None):
    """The argument parser; with ``cmd`` (the command being run), only that command's module is
    imported and only its sub-parser gets its options."""
    p = _Parser(prog=PROG, description="pyrep disk image utility (qemu-img compatible)")
    sub = p.add_subparsers(dest="cmd", metavar="command", parser_class=_Parser)
    sub.required = True
    for name, help_ in COMMANDS.items():
        s = sub.add_parser(name, help=help_, description=help_)
        if name == cmd:
            mod = command_module(name)
            mod.add_arguments(s)
            s.set_defaults(func=mod.run)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
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
        return ERROR_EXIT.get(args.cmd, 1)
    except KeyboardInterrupt:
        return 130
    finally:
        try:
            sys.stdout.flush()
        except Exception:  # noqa: BLE001
            pass
    return rc or 0
