"""COLO block replication: xen-set-replication, xen-colo-do-checkpoint, query-xen-replication-status."""
from ... import replication
from ...errors import ReplicationError
from ...options import Opt
from ..registry import CommandTable, QMPError

TABLE = CommandTable()


@TABLE.command("xen-set-replication", Opt("enable", "bool", required=True), Opt("primary", "bool", required=True),
               Opt("failover", "bool"))
def xen_set_replication(session, args):
    """Start (``enable``) or stop replication on this side; ``failover`` on the secondary commits
    its active and hidden disks into the secondary disk in the background."""
    mode = "primary" if args["primary"] else "secondary"
    if args["enable"]:
        if "failover" in args:
            raise QMPError("Parameter 'failover' is only for stopping replication")
        replication.start_all(mode)
        return
    failover = args.get("failover", False)
    if args["primary"] and failover:
        raise QMPError("It's not allowed to do failover on primary side")
    try:
        replication.stop_all(failover, mode=mode)
    except ReplicationError:
        if not failover:
            raise
        # as in QEMU, a failover's errors are reported by query-xen-replication-status


@TABLE.command("xen-colo-do-checkpoint")
def xen_colo_do_checkpoint(session, args):
    """Checkpoint every replication node (a secondary empties its active and hidden disks)."""
    replication.do_checkpoint_all()


@TABLE.command("query-xen-replication-status")
def query_xen_replication_status(session, args):
    """QEMU's ``error``/``desc``, plus ``stage`` (pyrep's lowercase stage names) and ``nodes``."""
    nodes = replication.status()
    out = {"error": False}
    try:
        replication.get_error_all()
    except ReplicationError as e:
        out["error"], out["desc"] = True, str(e)
    out["stage"] = nodes[0]["stage"] if nodes else "none"
    out["nodes"] = nodes
    return out
