"""``BlockDriver``: the base class of every driver (QEMU's BlockDriver).

A driver declares what it is (``format_name``, ``is_filter``, ``is_format``,
``protocol_name``), its options (a tuple of :class:`~pyrep.options.Opt`) and
implements only the ops it has. The node layer (:mod:`pyrep.node`) calls the
ops with these guarantees, so drivers do not check them again:

- ``offset`` and ``length`` are multiples of ``request_alignment`` (but for
  the tail at the end of the node), ``length > 0``;
- the node is open and active; for writes, it is writable;
- requests may come from several threads at once: a driver with mutable
  metadata serialises it itself and releases its lock around data I/O.

Ops a driver does not implement fall back as QEMU's do: a filter forwards
everything to its ``file`` child; ``pwrite_zeroes`` writes a zero buffer;
``pdiscard`` does nothing; ``flush`` flushes the ``file`` child; ``block_status``
reports data (or forwards, for filters). Errors are ``BlockError(errno, msg)``.
"""
import errno

from .constants import (BS_ALLOCATED, BS_DATA, BS_OFFSET_VALID, BS_RECURSE, PERM_ALL, PERM_CONSISTENT_READ,
                        PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED)
from .errors import BlockError
from ._core.fastpath import pwritev_each
from .options import Opt

__all__ = ["BlockDriver"]

_OPS = ("preadv", "pwritev", "pwrite_zeroes", "pdiscard", "flush", "truncate", "block_status", "make_empty",
        "check", "create")

_IMPLIED_FILE = Opt("file", "child", required=True, help="the node this filter forwards to")


class BlockDriver:
    format_name = None      # the name used in {"driver": ...}
    is_filter = False       # forwards what it does not implement to its "file" child; a filter that does not
                            # declare a "file" option gets one implied (see all_options)
    is_format = False       # an image format over a protocol node (its "file" child)
    protocol_name = None    # a protocol's URI-ish name ("file")
    # URI schemes this protocol serves (QEMU's protocol_name matched by bdrv_find_protocol): a node whose
    # options give a "filename" such as "nbd+unix:///disk?socket=/s" and no "driver", where a protocol is
    # expected, opens with this driver and receives the whole filename in its "filename" option, e.g.
    # protocol_schemes = ("nbd", "nbd+unix", "nbd+tcp", "nbds", "nbds+unix", "nbds+tcp"). A filename
    # without "scheme://" is a path for the file driver.
    protocol_schemes = ()
    supports_backing = False
    request_alignment = 1
    options = ()            # tuple of Opt
    create_options = ()     # tuple of Opt accepted by create()
    # set by the graph before open(): True when this format was chosen by probing the content (no "driver"
    # given); raw then refuses writes that would make sector 0 look like another format (QEMU's rule)
    probed = False

    def __init__(self, node):
        self.node = node

    @classmethod
    def all_options(cls):
        """The option schema ``open`` receives validated: ``options``, plus the implied ``file`` child of
        a filter that declares none."""
        if cls.is_filter and not any(o.name == "file" for o in cls.options):
            return tuple(cls.options) + (_IMPLIED_FILE,)
        return tuple(cls.options)

    @classmethod
    def probe(cls, header, filename=None):
        """How sure (0-100) this format is that an image starting with ``header`` (its first 512 bytes, or
        fewer for a smaller image) is one of its own; 0: not mine. Formats that can be recognised by
        their content override it (qcow2: its magic); raw is the fallback when no format claims the data."""
        return 0

    @classmethod
    def implements(cls, op):
        """True if this driver has its own ``op`` (not the base class fallback)."""
        return getattr(cls, op, None) is not getattr(BlockDriver, op, None)

    # ------------------------------------------------------------ life cycle
    def open(self, opts):
        """Set up from validated ``opts``; open children with ``self.node.open_child``."""
        if self.is_filter:
            self.file = self.node.open_child(opts, "file", role="file")

    def close(self):
        """Release resources. Children are closed by the node layer afterwards."""

    def getlength(self):
        """The node's length in bytes."""
        if self.is_filter:
            return self.node.file.length
        raise BlockError(errno.ENOTSUP, f"{self.format_name}: getlength not implemented")

    # ----------------------------------------------------------------- I/O
    def preadv(self, offset, length, iov):
        """Fill ``iov`` (whose size is ``length``) with the bytes at ``offset``."""
        if self.is_filter:
            return self.node.children["file"].preadv(offset, length, iov)
        raise BlockError(errno.ENOTSUP, f"{self.format_name}: read not supported")

    def pwritev(self, offset, length, iov, flags=0):
        """Write ``iov`` at ``offset``. ``REQ_FUA`` in flags: stable when this returns."""
        if self.is_filter:
            return self.node.children["file"].pwritev(offset, length, iov, flags)
        raise BlockError(errno.ENOTSUP, f"{self.format_name}: write not supported")

    def pwritev_batch(self, reqs):
        """Write several independent requests ``[(offset, length, iov, flags), ...]`` at once; return a
        list with None or the ``OSError``/``BlockError`` of each (a failed request does not stop the
        others). Optional: a driver implements it when it can overlap the requests (an NBD client sends
        them in one message and waits for all the replies together); this fallback writes them one by
        one, or, for a driver that has only ``pwritev_batch_start``, starts them and waits. The caller
        guarantees: the requests were in flight together (their order among themselves is free, as for
        concurrent requests), none is serialising, lengths are positive, offsets in range, and the node
        is on its fast path (no tracking, notifier or alignment in the way)."""
        if self.implements("pwritev_batch_start"):
            return self.pwritev_batch_start(reqs)()
        return pwritev_each(self.pwritev, reqs)

    def pwritev_batch_start(self, reqs):
        """``pwritev_batch`` in two halves: start the writes and return at once with a callable that
        waits for them and returns the list of errors (the node layer calls it exactly once). Optional,
        for drivers whose writes complete later (an NBD client: sent now, replies read by the callable);
        a caller with several targets (quorum) starts these first and writes the others meanwhile.
        Same guarantees as ``pwritev_batch``."""
        return self.pwritev_batch(reqs).copy

    def pwrite_zeroes(self, offset, length, flags=0):
        """Make ``[offset, offset+length)`` read as zeroes (``REQ_MAY_UNMAP``: may deallocate).

        Raise ``BlockError(ENOTSUP)`` to let the node layer write a zero buffer."""
        if self.is_filter:
            return self.node.children["file"].pwrite_zeroes(offset, length, flags)
        raise BlockError(errno.ENOTSUP, f"{self.format_name}: write_zeroes not supported")

    def pdiscard(self, offset, length):
        """Hint that the range is unused; content afterwards is unspecified (may stay)."""
        if self.is_filter:
            return self.node.children["file"].pdiscard(offset, length)

    def flush(self):
        """Make completed writes stable: flush own caches, then the ``file`` child."""
        child = self.node.children.get("file")
        if child is not None:
            child.flush()

    def truncate(self, length):
        """Resize the node."""
        if self.is_filter:
            return self.node.children["file"].truncate(length)
        raise BlockError(errno.ENOTSUP, f"{self.format_name}: resize not supported")

    def block_status(self, offset, length):
        """``(flags, pnum, map_offset, file_node)`` for ``[offset, offset+pnum)``, ``pnum <= length``.

        Flags are ``BS_*``. Without ``BS_ALLOCATED`` the range comes from the backing (or reads zeroes)."""
        if self.is_filter:
            return (BS_RECURSE | BS_OFFSET_VALID, length, offset, self.node.file)
        return (BS_DATA | BS_ALLOCATED | BS_OFFSET_VALID, length, offset, self.node)

    def make_empty(self):
        """Drop every allocation of this layer (overlays); reads then fall through to the backing."""
        raise BlockError(errno.ENOTSUP, f"{self.format_name}: make_empty not supported")

    def cow_store(self):
        """A ``pyrep._core.memstore.MemStore`` that copy-before-write may fill with whole clusters
        directly, bypassing ``pwritev`` (the node's request tracking is still honoured), or None.
        Only in-RAM cluster stores (the memory driver) have one."""
        return None

    # ---------------------------------------------------------- reopen
    def reopen_prepare(self, read_only):
        """Check that the node can switch to ``read_only``; raise to refuse. Nothing may change yet."""

    def reopen_commit(self):
        """Apply what reopen_prepare checked."""

    def reopen_abort(self):
        """Forget what reopen_prepare checked."""

    def child_rebound(self, child):
        """``child`` now points at another node (a job pivoted): drop anything cached from the old one."""

    # ---------------------------------------------------------- permissions
    def child_perm(self, role, perm, shared):
        """Permissions this node takes on its child of ``role`` given its parents' ``perm``/``shared``.

        Formats always read their metadata, write it when the node is
        writable, and let no one else write or resize their file; a backing
        child is only read and shared with everyone; filters pass through."""
        if role == "backing":
            return PERM_CONSISTENT_READ, PERM_ALL
        if self.is_format and role == "file":
            perm |= PERM_CONSISTENT_READ
            if not self.node.read_only and perm & (PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE):
                perm |= PERM_WRITE | PERM_RESIZE
            return perm, shared & ~(PERM_WRITE | PERM_RESIZE)
        return perm, shared

    def check_perm(self, perm, shared):
        """Raise if this node cannot take ``perm`` while sharing only ``shared`` (e.g. image locks)."""

    def set_perm(self, perm, shared):
        """Apply the permissions check_perm accepted."""

    # ------------------------------------------------------------ info
    def get_info(self):
        """Extra fields for ``pyrep-img info``."""
        return {}

    def __repr__(self):
        return f"<{type(self).__name__} {self.format_name} node={getattr(self.node, 'name', None)}>"
