"""QMP: the monitor protocol of QEMU, served by pyrep-storage-daemon (and usable in any pyrep process).

- :mod:`.registry`: the command table (name, Opt argument schema, handler);
- :mod:`.dispatch`: one message in, one reply out, no I/O;
- :mod:`.session`: greeting, negotiation, framing;
- :mod:`.server`: Unix/TCP listeners, sessions, events (the only socket code);
- :mod:`.commands`: the handlers, one module per area.

    server = pyrep.qmp.QMPServer()
    server.add_listener({"type": "unix", "path": "/run/qmp.sock"})
    ...
    server.close()
"""
from .registry import ArgError, Command, CommandTable, QMPError
from .server import QMPServer, socket_address

__all__ = ["QMPServer", "CommandTable", "Command", "QMPError", "ArgError", "socket_address"]
