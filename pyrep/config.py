"""Configuration files (TOML or JSON) describing nodes and named backends.

::

    [[blockdev]]                 # one table per node: the keys of blockdev_add
    node-name = "base0"
    driver = "raw"
    file = { driver = "file", filename = "disk.raw" }

    [[backend]]                  # a named BlockBackend on an existing node
    name = "disk0"
    node = "base0"
    read-only = false            # optional; also share-rw, perm, shared

The tables of a long-running process (``pyrep-storage-daemon --config``) take
the keys of the daemon's command-line options (qemu-storage-daemon's)::

    [[object]]                   # --object tls-creds-x509,id=tls0,dir=pki,endpoint=server
    qom-type = "tls-creds-x509"
    id = "tls0"
    dir = "pki"
    endpoint = "server"

    [nbd-server]                 # --nbd-server addr.type=unix,addr.path=nbd.sock[,tls-creds=..][,max-connections=..]
    addr = { type = "unix", path = "nbd.sock" }      # or { type = "inet", host = "0.0.0.0", port = "10809" }

    [[export]]                   # --export type=nbd,id=e0,node-name=base0,name=disk,writable=on
    type = "nbd"
    id = "e0"
    node-name = "base0"
    name = "disk"
    writable = true

    [[monitor]]                  # --chardev socket,id=m0,path=qmp.sock,server=on,wait=off --monitor chardev=m0
    id = "m0"
    path = "qmp.sock"            # or host = "127.0.0.1" and port = "4444"
    pretty = false

    [replication]                # xen-set-replication enable=true primary=false, once everything is up
    enable = true
    primary = false

They are applied in this order: objects, nodes, backends, NBD server,
exports, replication, and monitors last (a client that can connect finds the
rest up). Relative filenames and socket paths (and an
object's ``dir``) are resolved against the config file's directory. Every
error names the file and the key path (``graph.toml: blockdev[1].file.filename``).
"""
import os

from .errors import Error, OptionError
from .options import Opt

__all__ = ["load_config", "Graph", "SERVICE_SCHEMAS", "check_service", "apply_service"]

_BACKEND_KEYS = {"name", "node", "read-only", "share-rw", "perm", "shared"}
# applied in this order; monitors last, so a client that can connect finds everything up
_TOP_KEYS = ("object", "blockdev", "backend", "nbd-server", "export", "replication", "monitor")

# the keys of each service table: the same as the daemon's command-line options
SERVICE_SCHEMAS = {
    "nbd-server": (Opt("addr", "any", required=True), Opt("tls-creds", "string"), Opt("tls-authz", "string"),
                   Opt("max-connections", "number", default=0, min=0)),
    "export": (Opt("type", "enum", required=True, choices=("nbd",)), Opt("id", "string", required=True),
               Opt("node-name", "string", required=True), Opt("name", "string"),
               Opt("writable", "bool", default=False), Opt("description", "string"),
               Opt("writethrough", "bool", default=False)),
    "monitor": (Opt("id", "string"), Opt("path", "string"), Opt("host", "string"), Opt("port", "string"),
                Opt("server", "bool", default=True), Opt("wait", "bool", default=False),
                Opt("pretty", "bool", default=False), Opt("mode", "enum", default="control", choices=("control",))),
    "replication": (Opt("enable", "bool", required=True), Opt("primary", "bool", required=True),
                    Opt("failover", "bool", default=False)),
    "object": (Opt("qom-type", "string", required=True), Opt("id", "string", required=True)),
}


def check_service(kind, spec, where):
    """``spec`` (a dict) checked against ``SERVICE_SCHEMAS[kind]``, values converted, defaults filled in;
    an ``object`` keeps its type-specific properties unchecked (the object's type checks them)."""
    if not isinstance(spec, dict):
        raise OptionError(f"{where}: expected a table of {kind} options")
    schema = {o.name: o for o in SERVICE_SCHEMAS[kind]}
    out = {}
    for key, value in spec.items():
        opt = schema.get(key)
        if opt is None:
            if kind == "object":
                out[key] = value
                continue
            raise OptionError(f"{where}: unknown key '{key}' (keys of {kind}: {', '.join(schema)})")
        out[key] = opt.convert(value, f"{where}: key '{key}'")
    for opt in schema.values():
        if opt.name not in out:
            if opt.required:
                raise OptionError(f"{where}: key '{opt.name}' is required ({opt.expected()})")
            if opt.default is not None:
                out[opt.name] = opt.default
    if kind == "nbd-server":
        from .qmp.server import socket_address
        out["addr"] = _flat_address(out["addr"], where)
        socket_address(out["addr"], where, "addr")
    elif kind == "monitor":
        if not out["server"]:
            raise OptionError(f"{where}: only server=on sockets can carry a monitor")
        if "path" in out and ("host" in out or "port" in out):
            raise OptionError(f"{where}: give either 'path' or 'host' and 'port'")
        if "path" not in out and not ("host" in out and "port" in out):
            raise OptionError(f"{where}: 'path' (a Unix socket) or 'host' and 'port' (TCP) is required")
    return out


def _flat_address(addr, where):
    """A SocketAddress dict (values as strings, as QEMU's QAPI has them)."""
    if not isinstance(addr, dict):
        raise OptionError(f"{where}: key 'addr' must be a table such as {{type = \"unix\", path = \"nbd.sock\"}}")
    return {k: (str(v) if isinstance(v, int) and not isinstance(v, bool) else v) for k, v in addr.items()}


def apply_service(graph, kind, spec, qmp=None):
    """Start what a checked service spec describes, recording it in ``graph`` so that
    :meth:`Graph.close` undoes it. ``qmp``: the QMPServer that monitors join (by default the
    first monitor makes one, owned by the graph)."""
    if kind == "object":
        from .objects import object_add
        props = {k: v for k, v in spec.items() if k not in ("qom-type", "id")}
        object_add(spec["qom-type"], spec["id"], **props)
        graph.objects.append(spec["id"])
    elif kind == "monitor":
        if qmp is None:
            if graph.qmp is None:
                from .qmp.server import QMPServer
                graph.qmp, graph.owns_qmp = QMPServer(), True
            qmp = graph.qmp
        addr = ({"type": "unix", "path": spec["path"]} if "path" in spec
                else {"type": "inet", "host": spec["host"], "port": spec["port"]})
        key = qmp.add_listener(addr, id=spec.get("id"), pretty=spec["pretty"], wait=spec["wait"])
        graph.monitors.append((qmp, key))
    elif kind == "nbd-server":
        from .nbd.server import nbd_server_start
        nbd_server_start(spec["addr"], tls_creds=spec.get("tls-creds"), max_connections=spec["max-connections"])
        graph.nbd_server = True
    elif kind == "export":
        from .nbd.server import export_add
        export_add(spec["node-name"], name=spec.get("name"), writable=spec["writable"],
                   description=spec.get("description"), id=spec["id"])
        graph.exports.append(spec["id"])
    elif kind == "replication":
        from . import replication
        if spec["enable"]:
            if spec["failover"]:
                raise OptionError("replication: 'failover' is only for stopping replication")
            replication.start_all("primary" if spec["primary"] else "secondary")
    else:
        raise OptionError(f"unknown service kind {kind!r}")


class Graph:
    """What a config file built: ``nodes`` (name → Node), ``backends`` (name → BlockBackend),
    and the services: ``objects``, ``monitors``, ``exports``, ``nbd_server``, ``qmp``."""

    def __init__(self, path):
        self.path = path
        self.nodes = {}
        self.backends = {}
        self.objects = []
        self.monitors = []         # (QMPServer, listener id)
        self.exports = []          # export ids
        self.nbd_server = False
        self.qmp = None
        self.owns_qmp = False

    def close(self):
        """Undo what this config made, in reverse order: exports, the NBD server, monitors,
        backends, nodes, objects."""
        from .graph import blockdev_del
        if self.exports or self.nbd_server:
            from .nbd import server as nbd
            for export_id in reversed(self.exports):
                if any(e["id"] == export_id for e in nbd.nbd_exports()):    # not deleted over QMP meanwhile
                    nbd.export_del(export_id)
            self.exports = []
            if self.nbd_server and nbd.nbd_server() is not None:
                nbd.nbd_server_stop()
            self.nbd_server = False
        for qmp, key in reversed(self.monitors):
            qmp.remove_listener(key)
        self.monitors = []
        if self.owns_qmp and self.qmp is not None:
            self.qmp.close()
            self.qmp, self.owns_qmp = None, False
        for blk in reversed(list(self.backends.values())):
            blk.close()
        for name in reversed(list(self.nodes)):
            node = self.nodes[name]
            if not node.closed and not node.parents and node.monitor_owned:
                blockdev_del(name)
        if self.objects:
            from .objects import object_del
            for obj in reversed(self.objects):
                try:
                    object_del(obj)
                except Error:
                    pass        # deleted by hand meanwhile
            self.objects = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<Graph {self.path}: nodes={list(self.nodes)} backends={list(self.backends)}>"


def _tomllib():
    """tomllib, imported when a TOML file is read (it costs ~4 ms of every start-up otherwise)."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib
    return tomllib


def _read(path):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise OptionError(f"{path}: cannot read config file: {e.strerror}") from None
    if path.endswith(".json"):
        fmt = "json"
    elif path.endswith(".toml"):
        fmt = "toml"
    else:
        fmt = "json" if raw.lstrip()[:1] in (b"{", b"[") else "toml"
    try:
        if fmt == "json":
            import json
            data = json.loads(raw.decode("utf-8"))
        else:
            data = _tomllib().loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise OptionError(f"{path}: not valid {fmt.upper()}: {e}") from None
    if not isinstance(data, dict):
        raise OptionError(f"{path}: the top level must be a table/object with 'blockdev' and 'backend' lists")
    return data


def _resolve_filenames(opts, base):
    """Make relative ``filename`` values absolute against the config's directory."""
    if isinstance(opts, dict):
        return {k: (os.path.join(base, v) if k == "filename" and isinstance(v, str) and not os.path.isabs(v)
                    else _resolve_filenames(v, base)) for k, v in opts.items()}
    if isinstance(opts, list):
        return [_resolve_filenames(v, base) for v in opts]
    return opts


def load_config(path, qmp=None):
    """Build what a TOML/JSON file describes; returns a :class:`Graph`.

    ``qmp``: the :class:`pyrep.qmp.QMPServer` that the file's monitors join (by
    default the first monitor makes one, closed with the Graph). On an error,
    whatever the file had built so far is closed again."""
    path = os.fspath(path)
    data = _read(path)
    base = os.path.dirname(os.path.abspath(path))
    unknown = set(data) - set(_TOP_KEYS)
    if unknown:
        raise OptionError(f"{path}: unknown top-level key '{sorted(unknown)[0]}' (expected: {', '.join(_TOP_KEYS)})")
    graph = Graph(path)
    try:
        for kind in _TOP_KEYS:
            if kind not in data:
                continue
            items = _as_list(data[kind], path, kind) if kind not in ("nbd-server", "replication") else [data[kind]]
            if kind in ("nbd-server", "replication") and not isinstance(data[kind], dict):
                raise OptionError(f"{path}: '{kind}' must be one table")
            for i, spec in enumerate(items):
                where = f"{path}: {kind}" + ("" if kind in ("nbd-server", "replication") else f"[{i}]")
                add_item(graph, kind, spec, where, base, qmp)
    except BaseException:
        graph.close()
        raise
    return graph


def add_item(graph, kind, spec, where, base, qmp=None):
    """Apply one table (``kind`` one of the top-level keys) to ``graph``; errors name ``where``.
    ``base``: the directory relative paths are resolved against (None: leave them)."""
    from .backend import open_backend
    from .graph import blockdev_add, lookup
    if kind == "blockdev":
        if not isinstance(spec, dict):
            raise OptionError(f"{where}: expected a table of node options")
        try:
            node = blockdev_add(_resolve_filenames(spec, base) if base else spec)
        except Error as e:
            raise _reworded(e, where) from None
        graph.nodes[node.name] = node
        return
    if kind == "backend":
        if not isinstance(spec, dict):
            raise OptionError(f"{where}: expected a table with 'name' and 'node'")
        bad = set(spec) - _BACKEND_KEYS
        if bad:
            raise OptionError(f"{where}: unknown key '{sorted(bad)[0]}' (expected: {', '.join(sorted(_BACKEND_KEYS))})")
        if "node" not in spec:
            raise OptionError(f"{where}: 'node' is required (the node-name of the backend's root)")
        node = spec["node"]
        try:
            if isinstance(node, dict) and base:
                node = _resolve_filenames(node, base)
            elif isinstance(node, str):
                node = lookup(node)         # a node of this file or of the process, never a file
            blk = open_backend(node, name=spec.get("name"), read_only=bool(spec.get("read-only", False)),
                               perm=spec.get("perm"), shared=spec.get("shared"),
                               share_rw=bool(spec.get("share-rw", False)))
        except Error as e:
            raise _reworded(e, where) from None
        graph.backends[blk.name or f"#backend{len(graph.backends)}"] = blk
        return
    spec = check_service(kind, spec, where)
    if base:
        spec = _resolve_paths(kind, spec, base)
    try:
        apply_service(graph, kind, spec, qmp)
    except Error as e:
        raise _reworded(e, where) from None
    except OSError as e:
        raise OptionError(f"{where}: {e.strerror or e}" + (f": '{e.filename}'" if e.filename else "")) from None


def _resolve_paths(kind, spec, base):
    def absolute(p):
        return p if os.path.isabs(p) else os.path.join(base, p)
    spec = dict(spec)
    if kind == "monitor" and "path" in spec:
        spec["path"] = absolute(spec["path"])
    elif kind == "nbd-server" and spec["addr"].get("type", "unix") == "unix" and "path" in spec["addr"]:
        spec["addr"] = dict(spec["addr"], path=absolute(spec["addr"]["path"]))
    elif kind == "object" and isinstance(spec.get("dir"), str):
        spec["dir"] = absolute(spec["dir"])
    return spec


def _reworded(e, where):
    """The same error, its message prefixed with the file and key path."""
    from .errors import BlockError
    if isinstance(e, BlockError):
        return BlockError(e.errno, f"{where}: {e.strerror}", e.filename)
    return type(e)(f"{where}: {e}")


def _as_list(value, path, key):
    if isinstance(value, dict):
        return [value]
    if not isinstance(value, list):
        raise OptionError(f"{path}: '{key}' must be a list of tables")
    return value
