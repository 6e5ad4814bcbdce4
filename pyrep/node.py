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
"""
import errno
import threading
from collections import namedtuple
from contextlib import contextmanager

from ._core.fastpath import NodeIO, bump_length_epoch
from ._core.iovec import IOVector
from .constants import (BS_ALLOCATED, BS_DATA, BS_EOF, BS_OFFSET_VALID, BS_RECURSE, BS_ZERO, PERM_ALL,
                        REQ_MAY_UNMAP, REQ_SERIALISING, perm_names)
from .errors import BlockError, OptionError, PermissionConflict

__all__ = ["Node", "Child", "BlockStatus", "skip_filters", "is_allocated", "is_allocated_above", "allocation_extents"]

BlockStatus = namedtuple("BlockStatus", "flags length offset file")

_ZERO_CHUNK = 1 << 20


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


class Node(NodeIO):
    """A node of the block graph; see the module docstring for its I/O layer."""

    def __init__(self, name, drv, opts, auto_named=False, prefix=""):
        self.name = name
        self._path = prefix             # key path of this node's options, for messages
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
        self.filename = None            # set by protocol drivers (and inherited by formats)
        self.align = 1
        self.discard_unmap = opts.get("discard") in ("unmap", "on")
        self.no_flush = bool((opts.get("cache") or {}).get("no-flush", False))
        self.detect_zeroes = opts.get("detect-zeroes", "off")
        self.blockers = {}              # op -> [reason, ...]
        self._write_notifiers = []
        self._notifier_skips = []
        self._tracked = []
        self._track_users = 0
        self._track_cond = threading.Condition()
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
        """Open (or reference) the child described by ``opts[key]`` and attach it as ``role``.

        ``opts[key]`` may be a dict of the child's options, a string naming
        an existing node or backend, or None/absent (an error if required).
        Returns the :class:`Child` or None."""
        from . import graph
        role = role or key
        value = opts.get(key)
        if value is None:
            if required:
                raise OptionError(f"{self.drv.format_name}: option '{self._path}{key}' is required "
                                  f"(a dict of options or the name of a node)")
            return None
        if isinstance(value, str):
            child_node = graph.lookup_node_or_backend(value, f"{self.drv.format_name}: option '{self._path}{key}'")
            return self.attach_child(child_node, role)
        if read_only is None:
            read_only = self.read_only
        child_node = graph.open_node(value, prefix=f"{self._path}{key}.", inherit=self._inherited(read_only))
        try:
            return self.attach_child(child_node, role)
        except BaseException:
            if not child_node.parents and not child_node.monitor_owned:
                child_node.close()
            raise

    def _inherited(self, read_only):
        """Options a child opened from a dict takes from this node unless it sets them."""
        inherit = {"read-only": read_only, "discard": self.opts.get("discard", "ignore")}
        if self.opts.get("cache") is not None:
            inherit["cache"] = self.opts["cache"]
        return inherit

    def open_backing(self, opts, filename=None, fmt=None, relative_to=None):
        """Open the backing child: from ``opts["backing"]`` when given (None: no backing), else from
        ``filename``/``fmt`` (from the image header; relative names resolve against ``relative_to``)."""
        from . import graph
        if "backing" in opts:
            if opts["backing"] is None:
                return None
            return self.open_child(opts, "backing", role="backing", read_only=True)
        if not filename:
            return None
        return self.attach_child(graph.open_backing_file(self, filename, fmt, relative_to), "backing")

    def attach_child(self, child_node, role, perm=None, shared=None):
        """Attach ``child_node`` as ``role``; permissions are the driver's ``child_perm`` unless given."""
        if role in self.children:
            raise OptionError(f"node '{self.name}' already has a '{role}' child")
        if child_node is self or _reaches(child_node, self):
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
                if c in keep or (isinstance(c.parent, Node) and _reaches(new, c.parent)):
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
        perm, shared = 0, PERM_ALL
        for c in self.parents:
            perm |= c.perm
            shared &= c.shared
        if self.opts.get("force-share"):
            shared = PERM_ALL
        return perm, shared

    # -------------------------------------------------------- permissions
    def add_parent(self, child, perm, shared):
        """Register ``child`` as a parent edge taking ``perm``/``shared``; raise on conflict."""
        _check_conflicts(self, child, perm, shared)
        child.perm, child.shared = perm, shared
        self.parents.append(child)
        try:
            _refresh_perms(self)
        except BaseException:
            self.parents.remove(child)
            _refresh_perms(self)
            raise

    def remove_parent(self, child):
        if child in self.parents:
            self.parents.remove(child)
            try:
                _refresh_perms(self)
            except PermissionConflict:
                pass

    def update_parent_perm(self, child, perm, shared):
        """Change what ``child`` takes/shares; on conflict nothing changes."""
        old = child.perm, child.shared
        _check_conflicts(self, child, perm, shared)
        child.perm, child.shared = perm, shared
        try:
            _refresh_perms(self)
        except BaseException:
            child.perm, child.shared = old
            _refresh_perms(self)
            raise

    def refresh_perms(self):
        _refresh_perms(self)

    # ------------------------------------------------------------- blockers
    def block_op(self, op, reason):
        self.blockers.setdefault(op, []).append(reason)

    def unblock_op(self, op, reason):
        reasons = self.blockers.get(op)
        if reasons and reason in reasons:
            reasons.remove(reason)
            if not reasons:
                del self.blockers[op]

    def block_all_ops(self, reason, except_ops=()):
        for op in OPS:
            if op not in except_ops:
                self.block_op(op, reason)

    def unblock_all_ops(self, reason):
        for op in list(self.blockers):
            self.unblock_op(op, reason)

    def check_op(self, op):
        """Raise PermissionConflict if ``op`` is blocked on this node."""
        reasons = self.blockers.get(op)
        if reasons:
            raise PermissionConflict(f"node '{self.name}' is busy: '{op}' is blocked by {reasons[0]}")

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
        from .graph import drained      # graph imports this module
        with drained(self):
            return self.driver.make_empty()

    def block_status(self, offset, length):
        """:class:`BlockStatus` of ``[offset, offset+pnum)``; follows filters and protocols
        (``BS_RECURSE``) and marks unallocated ranges without a backing as zero."""
        self._check_access(False)
        total = self.length
        if offset >= total:
            return BlockStatus(BS_EOF, 0, None, None)
        length = min(length, total - offset)
        flags, pnum, mapped, file = self.driver.block_status(offset, length)
        if pnum <= 0:
            raise BlockError(errno.EIO, f"node '{self.name}': block status made no progress at {offset}")
        pnum = min(pnum, length)
        if flags & BS_RECURSE and file is not None:
            inner = file.block_status(mapped, pnum)
            if inner.flags & BS_EOF and not inner.length:
                # past the end of the protocol (a raw disk's tail, rounded up to a sector): zeroes
                flags = BS_ZERO | BS_OFFSET_VALID | (flags & BS_ALLOCATED & ~BS_RECURSE)
            else:
                pnum = min(pnum, inner.length) if inner.length else pnum
                flags = (inner.flags & ~BS_EOF) | (flags & BS_ALLOCATED & ~BS_RECURSE)
                mapped, file = inner.offset, inner.file
            if not self.is_filter:
                flags |= BS_ALLOCATED
                if not flags & (BS_DATA | BS_ZERO):
                    flags |= BS_DATA
        if not flags & BS_ALLOCATED:
            back = self.backing
            if back is None and not self.is_filter:
                flags |= BS_ZERO
            elif back is not None:
                blen = back.length
                if offset >= blen:
                    flags |= BS_ZERO
                else:
                    pnum = min(pnum, blen - offset)
        if offset + pnum >= total:
            flags |= BS_EOF
        return BlockStatus(flags, pnum, mapped if flags & BS_OFFSET_VALID else None, file)

    # ---------------------------------------------------------- tracking
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

    def enable_tracking(self):
        """Start tracking requests (needed by serialising users); pair with disable_tracking."""
        with self._track_cond:
            self._track_users += 1
        self._refresh_paths()

    def disable_tracking(self):
        with self._track_cond:
            self._track_users -= 1
        self._refresh_paths()

    @contextmanager
    def tracked(self, offset, length, serialising=False):
        """Track a request; a serialising one waits for and blocks every overlapping request,
        and any request waits for an overlapping serialising one."""
        req = self._track_begin(offset, length, serialising)
        try:
            yield
        finally:
            if req is not None:
                self._track_end(req)

    def _track_begin(self, offset, length, serialising):
        """Register a request (waiting as ``tracked`` says); None when nothing is tracked. On a node with
        a request alignment every request is tracked: an unaligned write is a serialising
        read-modify-write of whole blocks, and an aligned write landing between its read and its write
        would be overwritten with the old bytes around the unaligned part."""
        if not self._track_users and not serialising and self.align <= 1:
            return None
        end = offset + length
        req = self._track_try(offset, end, serialising)
        if req is not None:
            return req
        # queue: registered now, so a request arriving later that conflicts with this one waits behind
        # it (a serialising write is never overtaken for ever by a stream of overlapping reads, as in
        # QEMU); this one waits only for the conflicting requests registered before it, so the waits
        # follow arrival order and cannot form a cycle
        req = (offset, end, serialising)
        cond = self._track_cond
        with cond:
            self._track_waiters += 1        # before registering: a request ending now must wake us
            self._tracked.append(req)
            try:
                while self._track_blocked(req):
                    cond.wait()
            except BaseException:
                self._track_done(req)
                raise
            finally:
                self._track_waiters -= 1
        return req

    def _track_end(self, req):
        self._track_done(req)

    def _track_wake(self):
        with self._track_cond:
            self._track_cond.notify_all()

    def wait_for_overlaps(self, offset, length):
        """Block until no tracked request overlaps the range."""
        cond = self._track_cond
        end = offset + length
        with cond:
            self._track_waiters += 1
            try:
                while any(r[0] < end and offset < r[1] for r in list(self._tracked)):
                    cond.wait()
            finally:
                self._track_waiters -= 1

    # ------------------------------------------------------------- close
    def close(self):
        """Close the driver and drop the children (closing implicit ones left without parents)."""
        if self.closed:
            return
        from . import graph
        self.closed = True
        self._refresh_paths()
        try:
            if self.driver is not None:
                self.driver.close()
        finally:
            for child in list(self.children.values()):
                self.detach_child(child)
            graph._forget_node(self)

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


# every op a blocker can stop (QEMU's BlockOpType)
OPS = ("backup-source", "backup-target", "change", "commit-source", "commit-target", "dataplane", "drive-del",
       "eject", "external-snapshot", "internal-snapshot", "internal-snapshot-delete", "mirror-source",
       "mirror-target", "resize", "stream", "replace", "graph-mod")


def _reaches(start, target):
    """True if ``target`` is ``start`` or below it."""
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


def _check_conflicts(node, child, perm, shared):
    for other in node.parents:
        if other is child:
            continue
        if perm & ~other.shared:
            raise PermissionConflict(
                f"permission conflict on node '{node.name}': {child.user} wants '{perm_names(perm & ~other.shared)}' "
                f"which {other.user} does not share")
        if other.perm & ~shared:
            raise PermissionConflict(
                f"permission conflict on node '{node.name}': {child.user} does not share "
                f"'{perm_names(other.perm & ~shared)}' which {other.user} holds")


def _refresh_perms(node):
    """Recompute the permissions ``node`` takes on its children, down the graph.

    Edges are updated while planning (a conflict stops the walk); drivers'
    check_perm (file locks) all run before any set_perm. A caller that gets
    an error restores its own change and calls this again, which recomputes
    every edge from the restored state."""
    plan = []
    _plan_perms(node, plan, set())
    drivers = [(n.driver, perm, shared) for n, perm, shared in plan if n.driver is not None]
    for driver, perm, shared in drivers:
        driver.check_perm(perm, shared)
    for driver, perm, shared in drivers:
        driver.set_perm(perm, shared)


def _plan_perms(node, plan, seen):
    if id(node) in seen:
        return
    seen.add(id(node))
    perm, shared = node.cumulative_perm()
    plan.append((node, perm, shared))
    if node.driver is None:
        return
    for child in node.children.values():
        cperm, cshared = node.driver.child_perm(child.role, perm, shared)
        if (cperm, cshared) != (child.perm, child.shared):
            _check_conflicts(child.node, child, cperm, cshared)
            child.perm, child.shared = cperm, cshared
        _plan_perms(child.node, plan, seen)


def skip_filters(node):
    """The first node at or below ``node`` that is not a filter with a file child."""
    while node is not None and node.drv.is_filter and "file" in node.children:
        node = node.file
    return node


def is_allocated(node, offset, length):
    """``(allocated, pnum)``: whether this layer (filters skipped) provides ``[offset, offset+pnum)``."""
    st = skip_filters(node).block_status(offset, length)
    return bool(st.flags & BS_ALLOCATED), st.length


def is_allocated_above(top, base, offset, length, include_base=False):
    """``(allocated, pnum)``: whether any layer from ``top`` down to ``base`` (excluded unless
    ``include_base``) provides ``[offset, offset+pnum)`` — a range past the end of a shorter
    backing counts as allocated, since it reads as zeroes there."""
    node = skip_filters(top)
    base = skip_filters(base) if base is not None else None
    n = length
    while node is not None:
        if node is base and not include_base:
            break
        st = node.block_status(offset, n)
        if st.length == 0:
            return False, n
        if st.flags & BS_ALLOCATED:
            return True, st.length
        n = min(n, st.length)
        nxt = skip_filters(node.backing)
        if node is base:
            break
        if nxt is not None and offset >= nxt.length:
            return True, n
        node = nxt
    return False, n


def allocation_extents(probe, offset, end):
    """Walk ``[offset, end)`` with ``probe(pos, n) -> (allocated, pnum)`` (``is_allocated`` or
    ``is_allocated_above`` bound to their nodes); yield ``(pos, pnum, allocated)`` for each extent
    in order. Stops early if the probe makes no progress."""
    pos = offset
    while pos < end:
        alloc, n = probe(pos, end - pos)
        if n <= 0:
            return
        n = min(n, end - pos)
        yield pos, n, alloc
        pos += n
