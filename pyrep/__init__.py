"""pyrep: a block-storage engine for Python with a Cython core, modelled on QEMU's block layer.

See the README for a tour, ``docs/internals.md`` for the contracts between
layers, and ``ARCHITECTURE.md`` for the public API this module exports.
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

__version__ = "0.1.0"


def close_all():
    """Close every job, backend and node of this process: jobs are cancelled first (they hold edges
    into the graph and may still write), then the graph closes (:func:`pyrep.graph.close_graph`)."""
    job_registry = sys.modules.get("pyrep.jobs.job")     # not loaded: no job was ever made
    if job_registry is not None:
        job_registry.cancel_all()
    close_graph()


def inject_error(node_name, op="write", errno="EIO", offset=0, length=None, once=False, after=0, delay=None):
    """Make the blkdebug node ``node_name`` fail (or, with ``delay`` and ``errno=None``, hold up)
    matching requests from now on (see the blkdebug driver)."""
    from .drivers.blkdebug import inject_error as _inject
    return _inject(node_name, op=op, errno=errno, offset=offset, length=length, once=once, after=after,
                   delay=delay)


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
