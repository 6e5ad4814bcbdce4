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

Relative filenames are resolved against the config file's directory. Every
error names the file and the key path (``graph.toml: blockdev[1].file.filename``).
"""
import os

from .errors import Error, OptionError

__all__ = ["load_config", "Graph"]

_BACKEND_KEYS = {"name", "node", "read-only", "share-rw", "perm", "shared"}
_TOP_KEYS = {"blockdev", "backend"}


class Graph:
    """What a config file built: ``nodes`` (name → Node) and ``backends`` (name → BlockBackend)."""

    def __init__(self, path):
        self.path = path
        self.nodes = {}
        self.backends = {}

    def close(self):
        """Close the backends and delete the nodes this config made (in reverse order)."""
        from .graph import blockdev_del
        for blk in reversed(list(self.backends.values())):
            blk.close()
        for name in reversed(list(self.nodes)):
            node = self.nodes[name]
            if not node.closed and not node.parents and node.monitor_owned:
                blockdev_del(name)

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


def load_config(path):
    """Build the nodes and backends a TOML/JSON file describes; returns a :class:`Graph`.

    On an error, whatever the file had built so far is closed again."""
    from .backend import open_backend
    from .graph import lookup
    from .graph import blockdev_add
    path = os.fspath(path)
    data = _read(path)
    base = os.path.dirname(os.path.abspath(path))
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise OptionError(f"{path}: unknown top-level key '{sorted(unknown)[0]}' (expected: blockdev, backend)")
    graph = Graph(path)
    try:
        for i, spec in enumerate(_as_list(data.get("blockdev", []), path, "blockdev")):
            where = f"{path}: blockdev[{i}]"
            if not isinstance(spec, dict):
                raise OptionError(f"{where}: expected a table of node options")
            try:
                node = blockdev_add(_resolve_filenames(spec, base))
            except Error as e:
                raise _reworded(e, where) from None
            graph.nodes[node.name] = node
        for i, spec in enumerate(_as_list(data.get("backend", []), path, "backend")):
            where = f"{path}: backend[{i}]"
            if not isinstance(spec, dict):
                raise OptionError(f"{where}: expected a table with 'name' and 'node'")
            bad = set(spec) - _BACKEND_KEYS
            if bad:
                raise OptionError(f"{where}: unknown key '{sorted(bad)[0]}' (expected: {', '.join(sorted(_BACKEND_KEYS))})")
            if "node" not in spec:
                raise OptionError(f"{where}: 'node' is required (the node-name of the backend's root)")
            node = spec["node"]
            try:
                if isinstance(node, dict):
                    node = _resolve_filenames(node, base)
                elif isinstance(node, str):
                    node = lookup(node)         # a node of this file or of the process, never a file
                blk = open_backend(node, name=spec.get("name"), read_only=bool(spec.get("read-only", False)),
                                   perm=spec.get("perm"), shared=spec.get("shared"),
                                   share_rw=bool(spec.get("share-rw", False)))
            except Error as e:
                raise _reworded(e, where) from None
            graph.backends[blk.name or f"#backend{i}"] = blk
    except BaseException:
        graph.close()
        raise
    return graph


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
