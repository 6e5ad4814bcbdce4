"""The graph of this process: named nodes and backends, opening, lookup, reopen.

Node names and backend names share one namespace, so a string where a
child's options belong can name either. Opening a node's children is the
graph's job (:func:`open_child`, :func:`open_backing`, QEMU's
``bdrv_open_child``); drivers call them as ``node.open_child(...)``, which
the graph wires up when it loads (:func:`pyrep.node.install_graph`). The
graph knows nothing of jobs: :func:`pyrep.close_all` cancels them before it
calls :func:`close_graph`.
"""
import itertools
import os
import re
import threading
from types import SimpleNamespace
from contextlib import contextmanager

from ._core.registry import get_driver
from .errors import BlockError, OptionError, PermissionConflict
from . import node as _node_layer
from .node import Node, drained
from .options import normalize, validate

__all__ = ["blockdev_add", "blockdev_del", "open_node", "open_child", "open_backing", "lookup",
           "lookup_node_or_backend", "nodes", "reopen", "reopen_multiple", "drained", "close_graph", "is_root",
           "check_name", "add_backend", "remove_backend", "get_backend", "backends", "protocol_for", "uri_scheme",
           "probe_format", "probe_node", "format_of"]

_lock = threading.RLock()
_opening = threading.local()   # per thread: the nodes being opened, outermost first
_nodes = {}          # node-name -> Node
_backends = {}       # backend name -> BlockBackend
_auto = itertools.count()
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$")


def check_name(name, what):
    """Refuse ``name`` as a new node-name or backend name (``what``): bad spelling or already taken."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise OptionError(f"invalid {what} {name!r}: it must start with a letter and hold only letters, "
                          f"digits, '-', '_' and '.' (at most 128 characters)")
    if name in _nodes:
        raise OptionError(f"duplicate {what} '{name}': a node of that name exists")
    if name in _backends:
        raise OptionError(f"duplicate {what} '{name}': a backend of that name exists")


def open_node(options, prefix="", inherit=None, protocol=False, probed=False):
    """Open a node (and, recursively, its children) from options in any spelling.

    ``inherit`` holds options a parent passes down (read-only, discard, cache)
    that the child's own options override. On failure nothing stays open.

    Options with a ``filename`` and no ``driver`` follow QEMU's ``bdrv_open``:
    where a protocol is expected (``protocol``: the ``file`` child of a format,
    or of a filter that is itself such a child) the filename picks it
    (:func:`protocol_for`); anywhere else the protocol is opened and the format
    probed from its first sector (:func:`probe_format`). A format given a
    ``filename`` instead of a ``file`` child gets ``file.filename``."""
    opts = normalize(options)
    where = prefix[:-1] if prefix else "options"
    if "driver" not in opts and "filename" in opts:
        if not protocol:
            return _open_probed(opts, prefix, inherit)
        opts["driver"] = protocol_for(opts["filename"], f"{where}: option '{prefix}filename'")
    if "driver" not in opts:
        raise OptionError(f"{where}: 'driver' is required (known drivers: {', '.join(_known_drivers())})")
    name = opts["driver"]
    if not isinstance(name, str):
        raise OptionError(f"{where}: option '{prefix}driver' must be a string, got {name!r}")
    drv = get_driver(name)
    if drv.is_format and "filename" in opts and "file" not in opts:
        opts["file"] = {"filename": opts.pop("filename")}
    if inherit:
        for k, v in inherit.items():
            opts.setdefault(k, v)
    opts = validate(drv.all_options(), opts, name, prefix)
    with _lock:
        node_name = opts.get("node-name")
        if node_name is None:
            node_name, auto = f"#block{next(_auto)}", True
        else:
            check_name(node_name, "node-name")
            auto = False
        node = Node(node_name, drv, opts, auto_named=auto, prefix=prefix)
        node.opened_as_protocol = protocol
        _nodes[node_name] = node
    stack = _opening.__dict__.setdefault("stack", [])
    stack.append(node)
    try:
        node.driver = drv(node)
        node.driver.probed = probed
        node.driver.open(opts)
        if node.filename is None and node.file is not None:
            node.filename = node.file.filename
        node.set_align(max(node.align, node.driver.request_alignment))
        node.bind_driver()
    except BaseException:
        node.close()
        raise
    finally:
        stack.pop()
    return node


_URI_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def uri_scheme(filename):
    """The scheme of a ``scheme://...`` filename (lower case), or None for a path."""
    m = _URI_RE.match(filename) if isinstance(filename, str) else None
    return m.group(1).lower() if m else None


def protocol_for(filename, where="filename"):
    """The protocol driver's name for ``filename`` (QEMU's bdrv_find_protocol): the driver whose
    ``protocol_schemes`` hold its URI scheme; ``file`` for a plain path."""
    if not isinstance(filename, str):
        raise OptionError(f"{where}: expected a string, got {filename!r}")
    scheme = uri_scheme(filename)
    if scheme is None:
        return "file"
    known = {}
    for name in _known_drivers():
        try:
            drv = get_driver(name)
        except OptionError:
            continue
        for s in getattr(drv, "protocol_schemes", ()) or ():
            known.setdefault(s.lower(), name)
    if scheme in known:
        return known[scheme]
    raise OptionError(f"{where}: unknown protocol '{scheme}' in {filename!r} (known: "
                      f"{', '.join(sorted(known)) or 'none'}; a plain path opens a file)")


def _open_probed(opts, prefix, inherit):
    """A node given a ``filename`` but no ``driver``: open the protocol the filename names, probe its
    first sector for a format, open that format over it (QEMU's bdrv_open without a format)."""
    filename = opts.pop("filename")
    where = prefix[:-1] if prefix else "options"
    proto = opts.pop("file", None)
    if proto is None:
        proto = {}
    elif not isinstance(proto, dict):
        raise OptionError(f"{where}: give either option '{prefix}filename' or a node name in '{prefix}file', "
                          f"not both")
    if "filename" in proto:
        raise OptionError(f"{where}: option '{prefix}filename' and '{prefix}file.filename' given together")
    proto = dict(proto, filename=filename)
    from .options import parse_bool
    inherit = dict(inherit or {})
    ro = parse_bool(opts.get("read-only", inherit.get("read-only", False)), f"{where}: option '{prefix}read-only'")
    child_inherit = {"read-only": ro, "discard": opts.get("discard", inherit.get("discard", "ignore"))}
    if opts.get("cache", inherit.get("cache")) is not None:
        child_inherit["cache"] = opts.get("cache", inherit.get("cache"))
    pnode = open_node(proto, prefix=f"{prefix}file.", inherit=child_inherit, protocol=True)
    try:
        opts["driver"] = probe_node(pnode)
        opts["file"] = pnode.name
        return open_node(opts, prefix, inherit, probed=True)
    except BaseException:
        if not pnode.parents and not pnode.closed:
            pnode.close()
        raise


def _known_drivers():
    from ._core.registry import drivers
    return drivers()


def forget_node(node):
    """A node closed: its name is free again (called by :meth:`Node.close`)."""
    with _lock:
        if _nodes.get(node.name) is node:
            del _nodes[node.name]


def open_child(parent, opts, key, role=None, required=True, read_only=None):
    """Open (or reference) the child of ``parent`` described by ``opts[key]`` and attach it as ``role``.

    ``opts[key]`` may be a dict of the child's options, a string naming
    an existing node or backend, or None/absent (an error if required).
    A child opened from a dict inherits ``read-only`` (``read_only``, default
    the parent's), ``discard`` and ``cache`` unless it sets them, and closes
    again if it cannot be attached. Returns the :class:`~pyrep.node.Child` or None."""
    role = role or key
    value = opts.get(key)
    where = f"{parent.drv.format_name}: option '{parent.option_key(key)}'"
    if value is None:
        if required:
            raise OptionError(f"{where} is required (a dict of options or the name of a node)")
        return None
    if isinstance(value, str):
        return parent.attach_child(lookup_node_or_backend(value, where), role)
    if read_only is None:
        read_only = parent.read_only
    # a bare "filename" names a protocol under a format (and under a filter standing where a protocol
    # is expected), and an image to probe anywhere else (QEMU's BDRV_O_PROTOCOL inheritance)
    protocol = role == "file" and (parent.drv.is_format or (parent.drv.is_filter and parent.opened_as_protocol))
    child_node = open_node(value, prefix=parent.option_key(key) + ".", inherit=_inherited(parent, read_only),
                           protocol=protocol)
    try:
        return parent.attach_child(child_node, role)
    except BaseException:
        if not child_node.parents and not child_node.monitor_owned:
            child_node.close()
        raise


def _inherited(parent, read_only):
    """Options a child opened from a dict takes from ``parent`` unless it sets them."""
    inherit = {"read-only": read_only, "discard": parent.opts.get("discard", "ignore")}
    if parent.opts.get("cache") is not None:
        inherit["cache"] = parent.opts["cache"]
    return inherit


def open_backing(parent, opts, filename=None, fmt=None, relative_to=None):
    """Open the backing child of ``parent``: from ``opts["backing"]`` when given (None: no backing),
    else from ``filename``/``fmt`` (from the image header; relative names resolve against
    ``relative_to``). Returns the :class:`~pyrep.node.Child` or None."""
    if "backing" in opts:
        if opts["backing"] is None:
            return None
        return open_child(parent, opts, "backing", role="backing", read_only=True)
    if not filename:
        return None
    return parent.attach_child(open_backing_file(parent, filename, fmt, relative_to), "backing")


def blockdev_add(options):
    """Add a node owned by the user (it lives until :func:`blockdev_del`); returns the Node."""
    node = open_node(options)
    node.monitor_owned = True
    return node


def blockdev_del(node_name):
    """Delete a node added by :func:`blockdev_add`; refused while anything uses it."""
    node = _nodes.get(node_name)
    if node is None:
        raise OptionError(f"cannot delete '{node_name}': no node of that name")
    if not node.monitor_owned:
        raise OptionError(f"cannot delete '{node_name}': it was not added by blockdev_add (it is an implicit child)")
    if node.parents:
        users = ", ".join(c.user for c in node.parents)
        raise PermissionConflict(f"node '{node_name}' is in use by {users}")
    node.check_op("drive-del")
    node.monitor_owned = False
    node.close()


def lookup(name):
    """The Node named ``name`` (a node-name, or a backend's name → its root node)."""
    node = _nodes.get(name)
    if node is not None:
        return node
    blk = _backends.get(name)
    if blk is not None and blk.node is not None:
        return blk.node
    known = sorted(set(_nodes) | set(_backends))
    raise OptionError(f"no node or backend named '{name}'" + (f" (known: {', '.join(known[:20])})" if known else ""))


def lookup_node_or_backend(name, where):
    try:
        return lookup(name)
    except OptionError:
        raise OptionError(f"{where}: no node or backend named '{name}'") from None


def nodes():
    """Every open node, by name."""
    return dict(_nodes)


def is_root(node):
    """True if ``node`` has no parent node (only backends, jobs or nothing above it)."""
    return not any(isinstance(c.parent, Node) for c in node.parents)


def backing_options(filename, fmt, relative_to):
    """The options of the backing node an image header names: ``filename`` (as written there) with
    format ``fmt`` (None: probed), relative names resolved against the image ``relative_to``. A
    ``json:{...}`` name is parsed by the option layer, as any filename is; when it names no driver the
    header's format is used (QEMU's rule)."""
    if filename.startswith("json:"):
        opts = normalize(filename)
        if "driver" not in opts:
            if fmt is None:
                raise OptionError(f"backing file {filename!r} of '{relative_to}' names no driver and the image "
                                  f"names no backing format")
            opts["driver"] = fmt
        return opts
    path = filename
    if relative_to and not os.path.isabs(filename) and ":" not in filename.split("/")[0]:
        path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), filename)
    if not os.path.exists(path):
        raise BlockError(2, f"could not open backing file '{filename}' of '{relative_to}': no such file", path)
    return {"driver": fmt or probe_format(path), "file": {"driver": "file", "filename": path}}


def _files_named(opts):
    """The real paths of the ``file`` protocol nodes that options ``opts`` would open."""
    out = set()
    if isinstance(opts, dict):
        if opts.get("driver") == "file" and isinstance(opts.get("filename"), str):
            out.add(os.path.realpath(opts["filename"]))
        for v in opts.values():
            out |= _files_named(v)
    elif isinstance(opts, list):
        for v in opts:
            out |= _files_named(v)
    return out


def _files_open_under(n):
    """The real paths of the ``file`` nodes at or below node ``n`` (its protocol layer)."""
    out = set()
    stack, seen = [n], set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.drv.format_name == "file" and n.filename:
            out.add(os.path.realpath(n.filename))
        stack.extend(c.node for r, c in n.children.items() if r != "backing")
    return out


def open_backing_file(node, filename, fmt, relative_to):
    """Open a backing file named in an image header (read-only, as QEMU does), through the option layer
    (:func:`backing_options`). The one backing-loop check: a backing whose files are already open
    in the chain above (being opened on this thread, or parents of ``node``) is refused, and so is a
    chain deeper than 256 nodes (which also bounds loops through protocols that have no file name)."""
    opts = backing_options(filename, fmt, relative_to)
    # the images being opened on this thread (a chain opens recursively) and those above the node
    chain = list(getattr(_opening, "stack", ()))
    parent = node
    while parent is not None:
        chain.append(parent)
        parent = next((c.parent for c in parent.parents if isinstance(c.parent, Node)), None)
    if len(chain) > 256:
        raise OptionError(f"backing chain of '{relative_to or node.name}' is too deep (more than 256 nodes)")
    seen = {os.path.realpath(relative_to)} if relative_to and ":" not in relative_to.split("/")[0] else set()
    for n in chain:
        seen |= _files_open_under(n)
    if _files_named(opts) & seen:
        raise OptionError(f"backing chain of '{relative_to or node.name}' loops: '{filename}' is already in the chain")
    return open_node(opts, prefix=node.option_key("backing") + ".",
                     inherit={"read-only": True, "discard": node.opts.get("discard", "ignore")})


PROBE_SIZE = 512       # the bytes a format is probed from (QEMU's BLOCK_PROBE_BUF_SIZE)


def format_of(header, filename=None):
    """The format whose ``probe`` claims ``header`` most surely (QEMU's bdrv_probe_all), else ``"raw"``."""
    best, best_score = "raw", 0
    for name in _known_drivers():
        try:
            drv = get_driver(name)
        except OptionError:
            continue
        if not drv.is_format or name == "raw":
            continue
        score = drv.probe(header, filename)
        if score > best_score:
            best, best_score = name, score
    return best


def probe_node(node):
    """The format of the image held by the protocol ``node`` (its first sector probed)."""
    n = min(PROBE_SIZE, node.length)
    return format_of(node.pread(0, n) if n > 0 else b"", node.filename)


def probe_format(path):
    """The format of the image file at ``path``: ``"qcow2"`` if it starts with the qcow2 magic, else ``"raw"``."""
    try:
        with open(path, "rb") as f:
            header = f.read(PROBE_SIZE)
    except OSError as e:
        raise BlockError(e.errno, f"could not probe '{path}': {e.strerror}", path) from None
    return format_of(header, path)


# ------------------------------------------------------------ drain & reopen

def reopen(node, read_only):
    """Switch one node between read-only and read-write (see :func:`reopen_multiple`)."""
    reopen_multiple([(node, read_only)])


def reopen_multiple(changes):
    """Atomically switch a set of nodes between read-only and read-write, after draining.

    ``changes`` is a list of ``(node, read_only)``. A node's protocol child
    (``file`` of a format) follows it. Either every node switches or none
    does (a driver or permission refusal rolls everything back)."""
    plan = []
    for node, ro in changes:
        if isinstance(node, str):
            node = lookup(node)
        while node is not None:
            if all(n is not node for n, _ in plan):
                plan.append((node, bool(ro)))
            node = node.file if (node.drv.is_format or node.drv.is_filter) and not ro else None
    nodes_ = [n for n, _ in plan]
    with drained(*nodes_):
        old = {id(n): n.read_only for n in nodes_}
        prepared = []
        try:
            for n, ro in plan:
                if n.closed:
                    raise OptionError(f"cannot reopen node '{n.name}': it is closed")
                if not ro and n.read_only:
                    n.check_op("change")
                n.driver.reopen_prepare(ro)
                prepared.append(n)
            for n, ro in plan:
                n.set_read_only_flag(ro)
            for n in nodes_:
                n.refresh_perms()
        except BaseException:
            for n in nodes_:
                n.set_read_only_flag(old[id(n)])
            for n in prepared:
                n.driver.reopen_abort()
            for n in nodes_:
                try:
                    n.refresh_perms()
                except Exception:
                    pass
            raise
        # protocol children first: a format that goes read/write may write at once (qcow2 repairs
        # a dirty image, clears auto-clear bits, flags its bitmaps), through its file's new fd
        for n in reversed(prepared):
            n.driver.reopen_commit()
            n.opts["read-only"] = n.read_only


def close_graph():
    """Close every backend and node of this process (:func:`pyrep.close_all` cancels jobs first:
    they hold edges into the graph)."""
    for blk in list(_backends.values()):
        blk.close()
    # top down: a format flushes its caches into its file while closing, so no node may close before
    # the nodes above it (unnamed backends are still attached: their roots close as roots)
    for _ in range(len(_nodes) + 1):
        roots = [n for n in list(_nodes.values()) if not n.closed and is_root(n)]
        if not roots:
            break
        for node in roots:
            node.monitor_owned = False
            node.close()
    for node in list(_nodes.values()):
        node.monitor_owned = False
        node.close()
    _nodes.clear()


# ------------------------------------------------------------ backends by name

def add_backend(name, blk):
    """Register backend ``blk`` under ``name`` (already checked with :func:`check_name`)."""
    with _lock:
        _backends[name] = blk


def remove_backend(name, blk):
    """Forget backend ``blk`` (if it is still the one registered under ``name``)."""
    with _lock:
        if _backends.get(name) is blk:
            del _backends[name]


def get_backend(name):
    """The backend named ``name``, or None."""
    return _backends.get(name)


def backends():
    """Every named backend, by name."""
    return dict(_backends)


_node_layer.install_graph(SimpleNamespace(open_child=open_child, open_backing=open_backing, forget_node=forget_node))
