"""The NBD server and block exports: nbd-server-start/-stop, block-export-add/-del,
query-block-exports, and the legacy nbd-server-add/-remove.

pyrep's NBD server (:mod:`pyrep.nbd.server`) names exports by ``id`` and by wire
``name`` as QEMU does, and tells the deleted-export hook of every export that
goes (deleted, or with its server): :func:`watch` turns that into
BLOCK_EXPORT_DELETED.
"""
from ...nbd import server as nbd
from ...options import Opt
from ..registry import ArgError, CommandTable, QMPError

TABLE = CommandTable()


def watch(server):
    """Send BLOCK_EXPORT_DELETED to ``server``'s monitors whenever an export goes; returns the undo."""
    def deleted(export_id):
        server.emit("BLOCK_EXPORT_DELETED", {"id": export_id})
    nbd.add_export_deleted_hook(deleted)
    return lambda: nbd.remove_export_deleted_hook(deleted)


def legacy_address(addr):
    """A flat SocketAddress from QEMU's SocketAddressLegacy (``{"type", "data": {...}}``); a flat
    address is accepted too."""
    if not isinstance(addr, dict):
        raise ArgError("Invalid parameter type for 'addr', expected: object")
    kind = addr.get("type")
    if kind is None:
        raise ArgError("Parameter 'addr.type' is missing")
    if kind not in ("inet", "unix", "vsock", "fd"):
        raise ArgError(f"Parameter 'addr.type' does not accept value '{kind}'")
    if kind in ("vsock", "fd"):
        raise ArgError(f"Parameter 'addr.type' does not accept value '{kind}' here: pyrep serves inet and unix")
    if "data" in addr:
        if set(addr) - {"type", "data"}:
            raise ArgError(f"Parameter 'addr.{sorted(set(addr) - {'type', 'data'})[0]}' is unexpected")
        data = addr["data"]
        if not isinstance(data, dict):
            raise ArgError("Invalid parameter type for 'addr.data', expected: object")
        flat = dict(data, type=kind)
    else:
        flat = dict(addr)
    if kind == "unix" and not isinstance(flat.get("path"), str):
        raise ArgError("Parameter 'addr.data.path' is missing")
    if kind == "inet":
        for key in ("host", "port"):
            if not isinstance(flat.get(key), str):
                raise ArgError(f"Parameter 'addr.data.{key}' is missing" if key not in flat
                               else f"Invalid parameter type for 'addr.data.{key}', expected: string")
    return flat


@TABLE.command("nbd-server-start", Opt("addr", "any", required=True), Opt("tls-creds", "string"),
               Opt("tls-authz", "string"), Opt("max-connections", "number", min=0, default=0))
def nbd_server_start(session, args):
    """Start the NBD server on ``addr`` (QEMU's SocketAddressLegacy, or a flat SocketAddress)."""
    if args.get("tls-authz"):
        raise ArgError("Parameter 'tls-authz' is not supported by pyrep")
    nbd.nbd_server_start(legacy_address(args["addr"]), tls_creds=args.get("tls-creds"),
                         max_connections=args["max-connections"])


@TABLE.command("nbd-server-stop")
def nbd_server_stop(session, args):
    """Stop the NBD server: in-flight requests finish, its exports go (BLOCK_EXPORT_DELETED for each)."""
    nbd.nbd_server_stop()


_EXPORT_TYPES = ("nbd", "fuse", "vhost-user-blk", "vduse-blk")


@TABLE.command("block-export-add", Opt("type", "enum", required=True, choices=_EXPORT_TYPES),
               Opt("id", "string", required=True), Opt("node-name", "string", required=True),
               Opt("writable", "bool", default=False), Opt("writethrough", "bool", default=False),
               Opt("fixed-iothread", "bool"), Opt("iothread", "string"), Opt("allow-inactive", "bool"),
               Opt("name", "string"), Opt("description", "string"), Opt("bitmaps", "list"),
               Opt("allocation-depth", "bool"))
def block_export_add(session, args):
    """Export a node over the NBD server (``name`` defaults to the node name)."""
    if args["type"] != "nbd":
        raise ArgError(f"Parameter 'type' does not accept value '{args['type']}' here: pyrep exports over nbd")
    if args.get("bitmaps"):
        raise ArgError("Parameter 'bitmaps' is not supported by pyrep")
    _unique_id(args["id"])
    nbd.export_add(args["node-name"], name=args.get("name"), writable=args["writable"],
                   description=args.get("description"), id=args["id"])


def _unique_id(export_id):
    if any(e["id"] == export_id for e in nbd.nbd_exports()):
        raise QMPError(f"Block export id '{export_id}' is already in use")


def _by_id(export_id):
    if not any(e["id"] == export_id for e in nbd.nbd_exports()):
        raise QMPError(f"Export '{export_id}' is not found")


@TABLE.command("block-export-del", Opt("id", "string", required=True),
               Opt("mode", "enum", choices=("safe", "hard"), default="safe"))
def block_export_del(session, args):
    """Remove an export once its clients' in-flight requests have finished (BLOCK_EXPORT_DELETED follows)."""
    _by_id(args["id"])
    nbd.export_del(args["id"])


@TABLE.command("query-block-exports")
def query_block_exports(session, args):
    """Every export: QEMU's id, type, node-name, shutting-down, plus pyrep's name, writable, size, clients."""
    return nbd.nbd_exports()


@TABLE.command("nbd-server-add", Opt("device", "string", required=True), Opt("name", "string"),
               Opt("description", "string"), Opt("writable", "bool", default=False), Opt("bitmap", "string"))
def nbd_server_add(session, args):
    """The legacy form of block-export-add: the export's id is its name."""
    if args.get("bitmap"):
        raise ArgError("Parameter 'bitmap' is not supported by pyrep")
    name = args.get("name", args["device"])
    _unique_id(name)
    nbd.export_add(args["device"], name=name, writable=args["writable"], description=args.get("description"),
                   id=name)


@TABLE.command("nbd-server-remove", Opt("name", "string", required=True),
               Opt("mode", "enum", choices=("safe", "hard"), default="safe"))
def nbd_server_remove(session, args):
    """The legacy form of block-export-del, by export name."""
    if not any(e["name"] == args["name"] for e in nbd.nbd_exports()):
        raise QMPError(f"Export '{args['name']}' is not found")
    nbd.export_del(args["name"])
