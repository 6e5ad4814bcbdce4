"""The NBD server and block exports: nbd-server-start/-stop, block-export-add/-del,
query-block-exports, and the legacy nbd-server-add/-remove.

QEMU names exports by ``id`` in QMP and by ``name`` on the wire; pyrep's
export API names them by the wire name, so the server keeps the ``id`` →
export table (:class:`Exports`), shared with the command line's ``--export``.
"""
import threading

import pyrep

from ...options import Opt
from ..registry import ArgError, CommandTable, QMPError

TABLE = CommandTable()


def _api(name):
    fn = getattr(pyrep, name, None)
    if fn is None:
        raise QMPError(f"this pyrep has no NBD server (pyrep.{name} is missing)")
    return fn


class Exports:
    """The exports a server's monitors (or the daemon's command line) added, by id."""

    def __init__(self, server):
        self.server = server
        self._lock = threading.Lock()
        self._by_id = {}          # id -> {"id", "name", "node-name", "writable"}

    def add(self, export_id, node_name, name=None, writable=False, description=None):
        name = node_name if name is None else name
        with self._lock:
            if export_id in self._by_id:
                raise QMPError(f"Block export id '{export_id}' is already in use")
        _api("export_add")(node_name, name=name, writable=writable, description=description)
        with self._lock:
            self._by_id[export_id] = {"id": export_id, "name": name, "node-name": node_name, "writable": writable}

    def delete(self, export_id, mode="safe"):
        with self._lock:
            entry = self._by_id.get(export_id)
        if entry is None:
            raise QMPError(f"Export '{export_id}' is not found")
        _api("export_del")(entry["name"])
        self.deleted(export_id)

    def deleted(self, export_id):
        """An export went (deleted, or its server stopped): forget it and tell the monitors."""
        with self._lock:
            entry = self._by_id.pop(export_id, None)
        if entry is not None:
            self.server.emit("BLOCK_EXPORT_DELETED", {"id": export_id})

    def by_name(self, name):
        with self._lock:
            return next((i for i, e in self._by_id.items() if e["name"] == name), None)

    def all(self):
        with self._lock:
            return [dict(e) for e in self._by_id.values()]


def exports(state):
    """The server's Exports table (made on first use)."""
    if getattr(state, "exports", None) is None:
        state.exports = Exports(state)
    return state.exports


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
    _api("nbd_server_start")(legacy_address(args["addr"]), tls_creds=args.get("tls-creds"),
                             max_connections=args["max-connections"])


@TABLE.command("nbd-server-stop")
def nbd_server_stop(session, args):
    """Stop the NBD server; its exports go (BLOCK_EXPORT_DELETED for each)."""
    table = exports(session.state)
    gone = [e["id"] for e in table.all()]
    _api("nbd_server_stop")()
    for export_id in gone:
        table.deleted(export_id)


_EXPORT_ARGS = (Opt("type", "enum", required=True, choices=("nbd", "fuse", "vhost-user-blk", "vduse-blk")),
                Opt("id", "string", required=True), Opt("node-name", "string", required=True),
                Opt("writable", "bool", default=False), Opt("writethrough", "bool", default=False),
                Opt("fixed-iothread", "bool"), Opt("iothread", "string"), Opt("allow-inactive", "bool"),
                Opt("name", "string"), Opt("description", "string"), Opt("bitmaps", "list"),
                Opt("allocation-depth", "bool"))


@TABLE.command("block-export-add", *_EXPORT_ARGS)
def block_export_add(session, args):
    """Export a node over the NBD server (``name`` defaults to the node name)."""
    if args["type"] != "nbd":
        raise ArgError(f"Parameter 'type' does not accept value '{args['type']}' here: pyrep exports over nbd")
    if args.get("bitmaps"):
        raise ArgError("Parameter 'bitmaps' is not supported by pyrep")
    exports(session.state).add(args["id"], args["node-name"], name=args.get("name"), writable=args["writable"],
                               description=args.get("description"))


@TABLE.command("block-export-del", Opt("id", "string", required=True),
               Opt("mode", "enum", choices=("safe", "hard"), default="safe"))
def block_export_del(session, args):
    """Remove an export (BLOCK_EXPORT_DELETED follows)."""
    exports(session.state).delete(args["id"], args["mode"])


@TABLE.command("query-block-exports")
def query_block_exports(session, args):
    """Every export: id, type, node-name, shutting-down."""
    return [{"id": e["id"], "type": "nbd", "node-name": e["node-name"], "shutting-down": False}
            for e in exports(session.state).all()]


@TABLE.command("nbd-server-add", Opt("device", "string", required=True), Opt("name", "string"),
               Opt("description", "string"), Opt("writable", "bool", default=False), Opt("bitmap", "string"))
def nbd_server_add(session, args):
    """The legacy form of block-export-add: the export's id is its name."""
    if args.get("bitmap"):
        raise ArgError("Parameter 'bitmap' is not supported by pyrep")
    name = args.get("name", args["device"])
    exports(session.state).add(name, args["device"], name=name, writable=args["writable"],
                               description=args.get("description"))


@TABLE.command("nbd-server-remove", Opt("name", "string", required=True),
               Opt("mode", "enum", choices=("safe", "hard"), default="safe"))
def nbd_server_remove(session, args):
    """The legacy form of block-export-del, by export name."""
    table = exports(session.state)
    export_id = table.by_name(args["name"])
    if export_id is None:
        raise QMPError(f"Export '{args['name']}' is not found")
    table.delete(export_id, args["mode"])
