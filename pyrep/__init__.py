"""pyrep: a block-storage engine for Python with a Cython core, modelled on QEMU's block layer.

See the README for a tour and the public API this module exports,
``docs/architecture.md`` for the layers, the request path and the life-cycle
tables, and ``docs/internals.md`` for the contracts between layers.
"""
import sys

from . import constants
from ._core.bitmap import Bitmap
from ._core.iovec import IOVector
from ._core.registry import drivers, get_driver, register_driver, unregister_driver
from .backend import BlockBackend, backend, backends, open_backend
from .config import load_config
from .driver import BlockDriver
from .errors import BlockError, Error, OptionError, PermissionConflict, ReplicationError
from .graph import blockdev_add, blockdev_del, close_graph, is_root, lookup, nodes, reopen, reopen_multiple
from .image import check_image, create_image
from .node import BlockStatus, Child, Node, drained, is_allocated, is_allocated_above
from .options import Opt, flatten, normalize, parse_drive, unflatten
from .shutdown import handle_exit_signals   # importing it registers the exit hook: no write lost at exit

__version__ = "0.1.0"


def close_all():
    """Close every job, backend and node of this process: jobs are cancelled first (they hold edges
    into the graph and may still write), then the graph closes (:func:`pyrep.graph.close_graph`)."""
    job_registry = sys.modules.get("pyrep.jobs.job")     # not loaded: no job was ever made
    if job_registry is not None:
        job_registry.cancel_all()
    close_graph()


def inject_error(node_name, op="write", errno="EIO", offset=0, length=None, once=False, after=0, delay=None,
                 hold=False):
    """Make the blkdebug node ``node_name`` fail (or, with ``delay`` and ``errno=None``, hold up; with
    ``hold``, hold until ``rule.release()``) matching requests from now on (see the blkdebug driver);
    returns the rule."""
    from .drivers.blkdebug import inject_error as _inject
    return _inject(node_name, op=op, errno=errno, offset=offset, length=length, once=once, after=after,
                   delay=delay, hold=hold)


def clear_errors(node_name):
    """Remove every injected error of the blkdebug node ``node_name``."""
    from .drivers.blkdebug import clear_errors as _clear
    return _clear(node_name)


def quorum_add_child(node_name, child_node_name):
    """Add an existing node as a new child of the quorum ``node_name`` (QEMU's x-blockdev-change)."""
    from .drivers.quorum import quorum_add_child as _add
    return _add(node_name, child_node_name)


def quorum_del_child(node_name, child):
    """Remove a child (by role ``children.N`` or node name) from a quorum; never below its threshold."""
    from .drivers.quorum import quorum_del_child as _del
    return _del(node_name, child)


def __getattr__(name):
    # heavier subsystems load on first use
    if name in ("jobs", "replication"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'pyrep' has no attribute {name!r}")


# ------------------------------------------------------------------ network (loaded on first use)
def object_add(qom_type, id, **props):
    """Create a user object (``"tls-creds-x509"``: dir, endpoint, verify_peer); see pyrep.objects."""
    from .objects import object_add as _add
    return _add(qom_type, id, **props)


def object_del(id):
    """Remove the user object ``id``."""
    from .objects import object_del as _del
    return _del(id)


def lookup_object(id):
    """The user object ``id`` (OptionError if there is none)."""
    from .objects import lookup_object as _lookup
    return _lookup(id)


def nbd_server_start(addr, tls_creds=None, max_connections=0, **kwargs):
    """Start this process's NBD server (see pyrep.nbd.server); returns it (``.address``: the bound address)."""
    from .nbd.server import nbd_server_start as _start
    return _start(addr, tls_creds=tls_creds, max_connections=max_connections, **kwargs)


def nbd_server_stop(timeout=None):
    """Stop the NBD server: in-flight requests finish, exports are flushed and removed."""
    from .nbd.server import nbd_server_stop as _stop
    return _stop(timeout)


def export_add(node_or_name, name=None, writable=False, description=None, id=None):
    """Export a node over NBD (its backend shares writes); returns the Export."""
    from .nbd.server import export_add as _add
    return _add(node_or_name, name=name, writable=writable, description=description, id=id)


def export_del(name, timeout=None):
    """Remove an NBD export (by name or id) after its clients' in-flight requests finish."""
    from .nbd.server import export_del as _del
    return _del(name, timeout)


def nbd_exports():
    """The NBD exports as dicts (id, type, node-name, shutting-down, name, description, writable, size, clients)."""
    from .nbd.server import nbd_exports as _list
    return _list()
