"""QMP command handlers, one module per area; each module's ``TABLE`` holds its commands.

Handlers are ``fn(session, args)``: ``session.state`` is the
:class:`~pyrep.qmp.server.QMPServer`; they use only pyrep's public API.
"""
from ..registry import CommandTable
from . import block, core, exports, jobs, replication

__all__ = ["default_table", "MODULES"]

MODULES = (core, block, exports, jobs, replication)


def default_table():
    """A table holding every command of every module (a new one each call)."""
    table = CommandTable()
    for mod in MODULES:
        for cmd in mod.TABLE:
            table.add(cmd)
    return table
