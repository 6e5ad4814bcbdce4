"""The protocol's own commands: qmp_capabilities, query-version, query-commands, quit."""
from ...options import Opt
from ..registry import CommandTable, QMPError
from ..session import CAPABILITIES

TABLE = CommandTable()


@TABLE.command("qmp_capabilities", Opt("enable", "list"), before_negotiation=True)
def qmp_capabilities(session, args):
    """Leave capabilities negotiation mode, enabling the listed capabilities."""
    if session.negotiated:
        raise QMPError("Capabilities negotiation is already complete, command ignored", "CommandNotFound")
    enable = args.get("enable", [])
    for cap in enable:
        if cap not in CAPABILITIES:
            raise QMPError(f"Parameter 'enable' does not accept value '{cap}'" if not isinstance(cap, str)
                           else f"Capability '{cap}' not available")
    session.enabled = set(enable)
    session.negotiated = True


@TABLE.command("query-version")
def query_version(session, args):
    """The version, in QEMU's VersionInfo shape."""
    return session.state.version()


@TABLE.command("query-commands")
def query_commands(session, args):
    """Every command of the table."""
    return [{"name": name} for name in session.table.names()]


@TABLE.command("quit")
def quit_(session, args):
    """Drain, flush and close every node, then exit (the reply comes first)."""
    session.state.request_quit(session)
