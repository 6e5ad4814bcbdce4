"""The command-line core of ``pyrep-img``: one parser, one way to print an error, one table of exit codes.

Each command is a module of this package with ``add_arguments(parser)`` and ``run(args) -> exit code``;
only the module of the command being run is imported (the others cost start-up time for nothing).
"""
import argparse
import importlib
import re
import sys

from pyrep.errors import Error

from ..console import start_console_script, version_text
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


# what qemu-img says when a command's file operands are missing or too many (with its --help hint)
OPERANDS = {"compare": "Expecting two image file names", "create": "Expecting image file name"}


class _Parser(argparse.ArgumentParser):
    """Usage errors as qemu-img reports them: one line in its words (and its "Try --help" hint), exit 1
    (argparse would print its usage and exit 2, compare's "error" code)."""

    def __init__(self, *a, command=None, **kw):
        super().__init__(*a, **kw)
        self.command = command

    def error(self, message):
        raise UsageError(*usage_message(self.command, message))


def usage_message(cmd, message):
    """(qemu-img's text, hint) for one of argparse's messages."""
    operands = OPERANDS.get(cmd, "Expecting one image file name")
    if message == "the following arguments are required: command":
        return "Not enough arguments", True
    m = re.match(r"argument command: invalid choice: '([^']*)'", message)
    if m:
        return f"Command not found: {m.group(1)}", True
    if message.startswith("the following arguments are required:"):
        return operands, True
    m = re.match(r"unrecognized arguments: (\S+)", message)
    if m:
        word = m.group(1)
        return (f"unrecognized option '{word}'" if word.startswith("-") else operands), True
    m = re.match(r"argument (-\w)(?:/\S+)?: expected one argument", message)
    if m:
        return f"option requires an argument -- '{m.group(1)[1:]}'", True
    m = re.match(r"argument (?:-\w/)?(--[\w-]+): expected one argument", message)
    if m:
        return f"option '{m.group(1)}' requires an argument", True
    return message, True


def command_module(name):
    """The module implementing command ``name`` (imported on first use)."""
    return importlib.import_module(f"{__package__}.{name}")


def build_parser(cmd=None):
    """The argument parser; with ``cmd`` (the command being run), only that command's module is
    imported and only its sub-parser gets its options."""
    p = _Parser(prog=PROG, description="pyrep disk image utility (qemu-img compatible)")
    p.add_argument("-V", "--version", action="version", version=version_text(PROG),
                   help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", metavar="command", parser_class=_Parser,
                           help="the command to run; 'pyrep-img COMMAND --help' describes its options")
    sub.required = True
    for name, help_ in COMMANDS.items():
        s = sub.add_parser(name, help=help_, description=help_, command=name)
        if name == cmd:
            mod = command_module(name)
            mod.add_arguments(s)
            s.set_defaults(func=mod.run)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    start_console_script()
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    try:
        args = parser.parse_args(argv)
    except UsageError as e:             # from the parser or a type= check (sizes, offsets)
        err(str(e), e.hint)
        return 1
    try:
        rc = args.func(args)
    except UsageError as e:
        err(str(e), e.hint)
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
