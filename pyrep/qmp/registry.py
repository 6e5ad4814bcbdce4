"""The QMP command table: each command's name, argument schema and handler, as data.

A command's arguments are declared with :class:`pyrep.options.Opt`, the same
schema type the drivers use, so ``query-commands``, ``query-qmp-schema``-like
introspection and every argument error come from this one table::

    table = CommandTable()

    @table.command("blockdev-del", Opt("node-name", "string", required=True))
    def blockdev_del(ctx, args):
        ...

``boxed=True`` hands the whole argument object to the handler unchecked (QEMU's
``'boxed': true``, used by ``blockdev-add`` whose arguments are node options
that the graph validates itself). Handlers return the command's ``return``
value (``None`` means ``{}``) and raise :class:`QMPError` (or any
:class:`pyrep.Error`, mapped to ``GenericError``).
"""
from ..options import Opt

__all__ = ["Command", "CommandTable", "QMPError", "ArgError"]


class QMPError(Exception):
    """An error reply: ``error_class`` (QEMU's ErrorClass: GenericError, CommandNotFound, ...) and ``desc``."""

    def __init__(self, desc, error_class="GenericError"):
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


class ArgError(QMPError):
    """A bad argument; the message names it by its full path (``addr.path``)."""


class Command:
    """One entry of the table."""

    __slots__ = ("name", "args", "handler", "boxed", "before_negotiation", "help")

    def __init__(self, name, args, handler, boxed=False, before_negotiation=False, help=""):
        for a in args:
            if not isinstance(a, Opt):
                raise TypeError(f"command {name!r}: arguments must be Opt, got {a!r}")
        self.name, self.args, self.handler, self.boxed = name, tuple(args), handler, boxed
        self.before_negotiation = before_negotiation
        self.help = help or (handler.__doc__ or "").strip().split("\n")[0]

    def __repr__(self):
        return f"<Command {self.name}>"


class CommandTable:
    """Commands by name, in registration order."""

    def __init__(self):
        self._commands = {}

    def add(self, command):
        if command.name in self._commands:
            raise ValueError(f"QMP command {command.name!r} is registered twice")
        self._commands[command.name] = command
        return command

    def command(self, name, *args, boxed=False, before_negotiation=False):
        """Decorator: register ``fn(ctx, args)`` as the handler of ``name``."""
        def register(fn):
            self.add(Command(name, args, fn, boxed=boxed, before_negotiation=before_negotiation))
            return fn
        return register

    def get(self, name):
        return self._commands.get(name)

    def names(self):
        return list(self._commands)

    def __contains__(self, name):
        return name in self._commands

    def __iter__(self):
        return iter(self._commands.values())

    def __len__(self):
        return len(self._commands)
