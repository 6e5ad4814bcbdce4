"""Nodes and the edges between them (QEMU's BlockDriverState and BdrvChild).

A :class:`Node` holds one driver instance, its validated options, its
children (``file``, ``backing``, ``children.N``) and its parents. It is also
the per-node I/O layer every request passes through (QEMU's ``bdrv_co_*``):
it enforces read-only/inactive, pads unaligned requests for drivers that
declare a ``request_alignment`` (read-modify-write, serialised), runs write
notifiers (copy-before-write hooks) and tracks requests when someone asked
for it. The common request takes a fast path of one flag test and one call.

A :class:`Child` is a user's edge to a node: it carries the role and the
permissions that user takes and shares; conflicts raise
:class:`~pyrep.errors.PermissionConflict` naming both users.

What QEMU keeps apart lives apart here too: permissions and op blockers in
:mod:`pyrep.perms`, block status in :mod:`pyrep.blockstatus`, request
tracking in :mod:`pyrep.tracking` (a base of :class:`Node`), the C fast path
in ``_core/fastpath.pyx``. Opening children from options is the graph's job
(:func:`pyrep.graph.open_child`); this module never imports the graph: the
graph installs its hooks here (:func:`install_graph`). Draining
(:func:`drained`) sits here, with the edges it walks.
"""
import errno
from contextlib import contextmanager

from . import perms
from ._core.fastpath import bump_length_epoch
from ._core.iovec import IOVector
from .blockstatus import (BlockStatus, allocation_extents, block_status, is_allocated, is_allocated_above,
                          skip_filters)
from .constants import PERM_ALL, REQ_MAY_UNMAP, REQ_SERIALISING
from .errors import BlockError, OptionError, PermissionConflict
from .perms import OPS
from .tracking import RequestTracking

__all__ = ["Node", "Child", "BlockStatus", "skip_filters", "is_allocated", "is_allocated_above", "allocation_extents",
           "reaches", "drained", "users_above", "install_graph", "OPS"]

_ZERO_CHUNK = 1 << 20


class _NoGraph:
    """Hooks before the graph installed its own: a node made outside a graph cannot open children."""

    @staticmethod
    def open_child(parent, *args, **kwargs):
        raise OptionError(f"{parent.describe()}: children are opened by the graph (pyrep.graph), which is not loaded")

    open_backing = open_child

    @staticmethod
    def forget_node(node):
        pass


_graph = _NoGraph


def install_graph(hooks):
    """The graph registers what nodes call into it, so this module stays below it: ``hooks`` has
    ``open_child(parent, opts, key, role, required, read_only)``,
    ``open_backing(parent, opts, filename, fmt, relative_to)`` (both return a :class:`Child` or
    None) and ``forget_node(node)`` (a node closed)."""
    global _graph
    _graph = hooks


class Child:
    """An edge from a user (a node, a backend, a job) to ``node``.

    ``perm`` is what the user takes, ``shared`` what it lets others take.
    The I/O methods forward to the node's layer under the same names.
    """

    __slots__ = ("parent", "node", "role", "perm", "shared", "preadv", "pwritev", "__weakref__")

    def __init__(self, parent, node, role, perm=0, shared=PERM_ALL):
        self.parent, self.role, self.perm, self.shared = parent, role, perm, shared
        self.node = None
        self._bind(node)

    def _bind(self, node):
        rebound = self.node is not None
        self.node = node
        # the two hottest calls skip one Python frame
        self.preadv = node.preadv
        self.pwritev = node.pwritev
        if rebound:
            bump_length_epoch()  # a backend's root may now be a node of another length
            hook = getattr(self.parent, "_child_rebound", None)
            if hook is not None:
                hook(self)

    @property
    def user(self):
        """Who holds this edge, for messages: ``node 'x' (file)``, ``backend 'disk0'``..."""
        p = self.parent
        desc = getattr(p, "describe", None)
        return f"{desc()} ({self.role})" if desc else f"{p!r} ({self.role})"

    def pread(self, offset, length):
        return self.node.pread(offset, length)

    def pwrite(self, offset, data, flags=0):
        return self.node.pwrite(offset, data, flags)

    def pwrite_zeroes(self, offset, length, flags=0):
        return self.node.pwrite_zeroes(offset, length, flags)

    def pdiscard(self, offset, length):
        return self.node.pdiscard(offset, length)

    def flush(self):
        return self.node.flush()

    def truncate(self, length):
        return self.node.truncate(length)

    def getlength(self):
        return self.node.length

    def block_status(self, offset, length):
        return self.node.block_status(offset, length)

    def __repr__(self):
        return f"<Child {self.role} -> {self.node.name if self.node else None}>"


class Node(RequestTracking):
    """A node of the block graph; see the module docstring for its I/O layer."""

    def __init__(self, name, drv, opts, auto_named=False, prefix=""):
        self.name = name
        self.option_prefix = prefix     # key path of this node's options ("file.backing."), for messages
        self.auto_named = auto_named
        self.drv = drv
        self.opts = opts
        self.driver = None
        self.children = {}
        self.parents = []
        self.read_only = bool(opts.get("read-only", False))
        self.inactive = False
        self.closed = False
        self.monitor_owned = False      # added by blockdev_add: lives until blockdev_del
        self.opened_as_protocol = False  # opened where a protocol is expected (a bare filename names one)
        self.filename = None            # set by protocol drivers (and inherited by formats)
        self.align = 1
        self.discard_unmap = opts.get("discard") in ("unmap", "on")
        self.no_flush = bool((opts.get("cache") or {}).get("no-flush", False))
        self.detect_zeroes = opts.get("detect-zeroes", "off")
        self.blockers = {}              # op -> [reason, ...]
        self._write_notifiers = []
        self._notifier_skips = []
        self._init_tracking()
        self._ops_bound = False
        self._refresh_paths()

    # ------------------------------------------------------------- naming
    def describe(self):
        return f"node '{self.name}'"

    def __repr__(self):
        drv = self.drv.format_name if self.drv else "?"
        return f"<Node {self.name} driver={drv}{' ro' if self.read_only else ''}>"

    @property
    def is_filter(self):
        return self.drv.is_filter

    @property
    def file(self):
        """The node of the ``file`` child, or None."""
        c = self.children.get("file")
        return c.node if c is not None else None

    @property
    def backing(self):
        """The node of the ``backing`` child, or None."""
        c = self.children.get("backing")
        return c.node if c is not None else None

    @property
    def length(self):
        return self.driver.getlength()

    # ----------------------------------------------------------- children
    def open_child(self, opts, key, role=None, required=True, read_only=None):
        """Open (or reference) the child described by ``opts[key]`` and attach it as ``role``: the
        drivers' name for :func:`pyrep.graph.open_child` (see there). Returns the :class:`Child`
        or None."""
        return _graph.open_child(self, opts, key, role=role, required=required, read_only=read_only)

    def open_backing(self, opts, filename=None, fmt=None, relative_to=None):
        """Open the backing child: the drivers' name for :func:`pyrep.graph.open_backing`."""
        return _graph.open_backing(self, opts, filename=filename, fmt=fmt, relative_to=relative_to)

    def option_key(self, key):
        """``key`` as the user spelled its path, for messages: ``"file.offset"`` for a file child's."""
        return f"{self.option_prefix}{key}"

    def attach_child(self, child_node, role, perm=None, shared=None):
        """Attach ``child_node`` as ``role``; permissions are the driver's ``child_perm`` unless given."""
        if role in self.children:
            raise OptionError(f"node '{self.name}' already has a '{role}' child")
        if child_node is self or reaches(child_node, self):
            raise OptionError(f"attaching '{child_node.name}' as {role} of '{self.name}' would make a loop")
        child = Child(self, child_node, role, 0, PERM_ALL)
        if perm is None:
            perm, shared = self._child_perm_for(role)
        child_node.add_parent(child, perm, shared)
        self.children[role] = child
        self._refresh_paths()
        return child

    def detach_child(self, child):
        """Detach ``child``; an implicitly created child node with no parent left is closed."""
        if self.children.get(child.role) is child:
            del self.children[child.role]
        node = child.node
        node.remove_parent(child)
        self._refresh_paths()
        if not node.parents and not node.monitor_owned and not node.closed:
            node.close()

    def _child_perm_for(self, role):
        perm, shared = self.cumulative_perm()
        return self.driver.child_perm(role, perm, shared)

    def _child_rebound(self, child):
        """A child edge now points at another node: let the driver refresh what it cached."""
        if self.driver is not None:
            self.driver.child_rebound(child)
            if self._ops_bound:
                self.bind_driver()
        self._refresh_paths()

    def replace(self, new, keep=()):
        """Make every parent edge of this node (except those in ``keep``, and those from nodes at or
        below ``new``, which would make a loop) point at ``new``. All or nothing: on a permission
        conflict every edge moves back and the error is raised. Returns the moved edges."""
        moved = []
        try:
            for c in list(self.parents):
                if c in keep or (isinstance(c.parent, Node) and reaches(new, c.parent)):
                    continue
                new.add_parent(c, c.perm, c.shared)
                self.parents.remove(c)
                c._bind(new)
                moved.append(c)
        except BaseException:
            for c in reversed(moved):
                if c in new.parents:
                    new.parents.remove(c)
                c._bind(self)
                self.parents.append(c)
            for n in (new, self):
                try:
                    n.refresh_perms()
                except Exception:
                    pass
            raise
        try:
            self.refresh_perms()
        except PermissionConflict:
            pass
        return moved

    def cumulative_perm(self):
        """What the parents together take and share."""
        return perms.cumulative_perm(self)

    # ---------------------------------------------- permissions, blockers (pyrep.perms)
    def add_parent(self, child, perm, shared):
        """Register ``child`` as a parent edge taking ``perm``/``shared``; raise on conflict."""
        perms.add_parent(self, child, perm, shared)

    def remove_parent(self, child):
        perms.remove_parent(self, child)

    def update_parent_perm(self, child, perm, shared):
        """Change what ``child`` takes/shares; on conflict nothing changes."""
        perms.update_parent_perm(self, child, perm, shared)

    def refresh_perms(self):
        perms.refresh_perms(self)

    def block_op(self, op, reason):
        perms.block_op(self, op, reason)

    def unblock_op(self, op, reason):
        perms.unblock_op(self, op, reason)

    def block_all_ops(self, reason, except_ops=()):
        for op in OPS:
            if op not in except_ops:
                perms.block_op(self, op, reason)

    def unblock_all_ops(self, reason):
        for op in list(self.blockers):
            perms.unblock_op(self, op, reason)

    def check_op(self, op):
        """Raise PermissionConflict if ``op`` is blocked on this node."""
        perms.check_op(self, op)

    # --------------------------------------------------------- I/O layer
    def _refresh_paths(self):
        """Recompute the fast-path flags after a state change."""
        base = self.closed or self.inactive or self.align > 1 or not self._ops_bound
        self._rslow = base or self._track_users > 0
        self._rc = not base
        self._wslow = (self._rslow or self.read_only or bool(self._write_notifiers) or self.detect_zeroes != "off")
        only_skippable = len(self._write_notifiers) == 1 and self._notifier_skips[0] is not None
        self._wc = (not base and not self.read_only and self.detect_zeroes == "off"
                    and (not self._write_notifiers or only_skippable))
        self._set_notifier_skip(self._notifier_skips[0] if only_skippable else None)

    def _check_access(self, write):
        if self.closed:
            raise BlockError(errno.EBADF, f"node '{self.name}' is closed")
        if self.inactive:
            raise BlockError(errno.EPERM, f"node '{self.name}' is inactive")
        if write and self.read_only:
            raise BlockError(errno.EPERM, f"node '{self.name}' is read-only")

    # preadv/pwritev are NodeIO's (Cython) fast paths; they call these when a flag says so
    def _preadv_slow(self, offset, length, iov):
        if length <= 0 or offset < 0:
            if length == 0 and offset >= 0:
                return
            raise BlockError(errno.EINVAL, f"node '{self.name}': bad request offset={offset} length={length}")
        self._check_access(False)
        a = self.align
        if (offset | length) & (a - 1):
            return self._preadv_padded(offset, length, iov)
        req = self._track_begin(offset, length, False)
        try:
            return self.driver.preadv(offset, length, iov)
        finally:
            if req is not None:
                self._track_end(req)

    def _pwritev_slow(self, offset, length, iov, flags):
        if length <= 0 or offset < 0:
            if length == 0 and offset >= 0:
                return
            raise BlockError(errno.EINVAL, f"node '{self.name}': bad request offset={offset} length={length}")
        self._check_access(True)
        if self.detect_zeroes != "off" and iov.is_zero():
            zflags = REQ_MAY_UNMAP if self.detect_zeroes == "unmap" else 0
            return self.pwrite_zeroes(offset, length, zflags)
        a = self.align
        if (offset | length) & (a - 1):
            return self._pwritev_padded(offset, length, iov, flags & ~REQ_SERIALISING)
        req = self._track_begin(offset, length, bool(flags & REQ_SERIALISING))
        flags &= ~REQ_SERIALISING
        try:
            for fn in self._write_notifiers:
                fn(self, offset, length, flags)
            return self.driver.pwritev(offset, length, iov, flags)
        finally:
            if req is not None:
                self._track_end(req)

    def preadv_untracked(self, offset, length, iov):
        """Read without registering a tracked request — for write notifiers, which run inside
        the write that triggered them (a tracked read could wait for that very write)."""
        if (offset | length) & (self.align - 1):
            return self.preadv(offset, length, iov)
        self._check_access(False)
        return self.driver.preadv(offset, length, iov)

    def _notify_write(self, offset, length, flags):
        for fn in self._write_notifiers:  # replaced, never mutated: safe to iterate while others change it
            fn(self, offset, length, flags)

    def _aligned_span(self, offset, length):
        a = self.align
        start = offset & ~(a - 1)
        end = (offset + length + a - 1) & ~(a - 1)
        node_len = self.length
        if end > node_len and offset + length <= node_len:
            end = max(node_len, offset + length)
        return start, end

    def _preadv_padded(self, offset, length, iov):
        start, end = self._aligned_span(offset, length)
        buf = bytearray(end - start)
        with self.tracked(start, end - start):
            self.driver.preadv(start, end - start, IOVector(buf))
        iov.copy_from(0, memoryview(buf)[offset - start:offset - start + length])

    def _pwritev_padded(self, offset, length, iov, flags):
        start, end = self._aligned_span(offset, length)
        buf = bytearray(end - start)
        with self.tracked(start, end - start, serialising=True):
            # read-modify-write: serialised so a concurrent padded write cannot interleave
            self.driver.preadv(start, end - start, IOVector(buf))
            buf[offset - start:offset - start + length] = iov.to_bytes()
            self._notify_write(start, end - start, flags)
            self.driver.pwritev(start, end - start, IOVector(buf), flags)

    def pread(self, offset, length):
        """``length`` bytes at ``offset`` as bytes."""
        buf = bytearray(length)
        self.preadv(offset, length, IOVector(buf))
        return bytes(buf)

    def pwrite(self, offset, data, flags=0):
        iov = data if isinstance(data, IOVector) else IOVector(data)
        self.pwritev(offset, iov.size, iov, flags)

    def _valid_write(self, offset, length):
        """False for an empty request; raises for a bad one or a node that cannot be written."""
        if length == 0:
            return False
        if length < 0 or offset < 0:
            raise BlockError(errno.EINVAL, f"node '{self.name}': bad request offset={offset} length={length}")
        self._check_access(True)
        return True

    def pwrite_zeroes(self, offset, length, flags=0):
        """Make the range read as zeroes; falls back to writing zero buffers."""
        if not self._valid_write(offset, length):
            return
        if not self.discard_unmap:
            flags &= ~REQ_MAY_UNMAP
        a = self.align
        if (offset | length) & (a - 1):
            return self._pwritev_padded(offset, length, IOVector(bytes(length)), flags)
        with self.tracked(offset, length):
            self._notify_write(offset, length, flags)
            try:
                return self.driver.pwrite_zeroes(offset, length, flags)
            except BlockError as e:
                if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
            zero = bytes(min(length, _ZERO_CHUNK))
            pos, end = offset, offset + length
            while pos < end:
                n = min(len(zero), end - pos)
                self.driver.pwritev(pos, n, IOVector(memoryview(zero)[:n]), flags)
                pos += n

    def pdiscard(self, offset, length):
        """Discard the range (a hint; ignored unless the node was opened with discard=unmap)."""
        if not self._valid_write(offset, length) or not self.discard_unmap:
            return
        with self.tracked(offset, length):
            self._notify_write(offset, length, 0)
            return self.driver.pdiscard(offset, length)

    def flush(self):
        if self.closed or self.no_flush:
            return
        return self.driver.flush()

    def truncate(self, length):
        self._check_access(True)
        self.check_op("resize")
        try:
            return self.driver.truncate(length)
        finally:
            bump_length_epoch()

    def make_empty(self):
        """Drop this layer's data (overlays: active/hidden disks at a checkpoint). The users above the
        node are drained first (their requests in flight finish, new ones wait): a write still in
        flight would otherwise land in a cluster the emptied layer frees and hands out again."""
        self._check_access(True)
        with drained(self):
            return self.driver.make_empty()

    def block_status(self, offset, length):
        """:class:`BlockStatus` of ``[offset, offset+pnum)``; follows filters and protocols
        (``BS_RECURSE``) and marks unallocated ranges without a backing as zero."""
        self._check_access(False)
        return block_status(self, offset, length)

    # ----------------------------------------------------- write notifiers
    def add_write_notifier(self, fn, skip=None):
        """Call ``fn(node, offset, length, flags)`` before every write/zero/discard reaches the driver.

        ``skip`` (a Bitmap over this node) promises that ``fn`` does nothing for a data write lying
        wholly in set granules; such writes then keep the C fast path. The owner changes ``skip``
        only while the node is drained, or by setting bits. ``skip`` may instead be a
        :class:`pyrep._core.cowgate.CowGate` (a :class:`~pyrep._core.fastpath.WriteGate`) whose ``copied`` bitmap is the skip bitmap: the C path
        then also makes the copies itself, calling ``fn`` only for what it cannot finish."""
        self._write_notifiers = self._write_notifiers + [fn]
        self._notifier_skips = self._notifier_skips + [skip]
        self._refresh_paths()

    def remove_write_notifier(self, fn):
        keep = [i for i, f in enumerate(self._write_notifiers) if f != fn]  # bound methods are equal, not identical
        self._write_notifiers = [self._write_notifiers[i] for i in keep]
        self._notifier_skips = [self._notifier_skips[i] for i in keep]
        self._refresh_paths()

    # ------------------------------------------------------------- close
    def close(self):
        """Close the driver and drop the children (closing implicit ones left without parents)."""
        if self.closed:
            return
        self.closed = True
        self._refresh_paths()
        try:
            if self.driver is not None:
                self.driver.close()
        finally:
            for child in list(self.children.values()):
                self.detach_child(child)
            _graph.forget_node(self)

    def bind_driver(self):
        """Called once the driver is open: requests may now take the fast path."""
        self.bind_driver_ops(self.driver)
        self._ops_bound = True
        self._refresh_paths()

    def driver_ops_changed(self):
        """The driver replaced its ``preadv``/``pwritev`` (replication does, with its stage): the fast
        path follows once the node is bound (before that, :meth:`bind_driver` picks them up)."""
        if self._ops_bound:
            self.bind_driver_ops(self.driver)

    def set_read_only_flag(self, read_only):
        self.read_only = read_only
        self._refresh_paths()

    def set_inactive(self, inactive):
        self.inactive = inactive
        self._refresh_paths()

    def set_align(self, align):
        if align & (align - 1):
            raise OptionError(f"node '{self.name}': request alignment {align} is not a power of two")
        self.align = align
        self._refresh_paths()


def reaches(start, target):
    """True if ``target`` is ``start`` or below it (a walk of the children)."""
    stack, seen = [start], set()
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if id(n) in seen:
            continue
        seen.add(id(n))
        stack.extend(c.node for c in n.children.values())
    return False


# ------------------------------------------------------------------ drain

def users_above(nodes_):
    """Backends and jobs (the users that are not nodes) above any of ``nodes_``."""
    found, stack, seen = [], list(nodes_), set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        for c in n.parents:
            if isinstance(c.parent, Node):
                stack.append(c.parent)
            elif c.parent not in found:
                found.append(c.parent)
    return found


@contextmanager
def drained(*nodes_):
    """Quiesce every backend and job above ``nodes_``: new requests wait, in-flight ones finish.
    A user takes part by having ``drained_begin()``/``drained_end()`` (QEMU's drained sections);
    this module knows no kind of user by name."""
    users = [u for u in users_above(nodes_) if hasattr(u, "drained_begin")]
    done = []
    try:
        for u in users:
            u.drained_begin()
            done.append(u)
        yield
    finally:
        for u in reversed(done):
            u.drained_end()
