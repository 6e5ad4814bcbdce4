"""``BlockBackend``: a user's handle on a root node (QEMU's BlockBackend).

Byte-granular sync I/O safe from any thread, async twins on a shared thread
pool, bounds checks, in-flight tracking, drain, flush and close. A backend
takes permissions on its root like any other user: by default it reads,
writes and resizes (unless read-only) and shares only reads and unchanged
writes with others, as a QEMU guest device or qemu-img does; pass
``shared="all"`` (or ``share_rw=True``) when other writers are expected, as an
NBD export of a replicated disk does.
"""
import os
import threading

from . import graph
from ._core.fastpath import BackendCore
from .constants import (PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED, REQ_MAY_UNMAP,
                        perm_from)
from .errors import OptionError
from .node import Child, Node, drained
from .options import normalize
from .pool import LazyPool

__all__ = ["BlockBackend", "open_backend", "backend", "backends"]

# the async twins and submit() run here
_io_pool = LazyPool("pyrep-io", 32)


def _pool():
    return _io_pool.executor()


def _loop():
    import asyncio
    return asyncio.get_running_loop()


class BlockBackend(BackendCore):
    """A handle on a root node. Use :func:`open_backend` to make one."""

    def __init__(self, node, name=None, read_only=False, perm=None, shared=None):
        self.name = name
        read_only = read_only or node.read_only
        if perm is None:
            perm = PERM_CONSISTENT_READ if read_only else PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE
        if shared is None:
            shared = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED
        root = Child(self, node, "root")
        self._init_core(None, threading.Condition(), read_only)
        node.add_parent(root, perm_from(perm), perm_from(shared))
        self._root = root

    # --------------------------------------------------------- identity
    @property
    def root(self):
        """The root :class:`~pyrep.node.Child` edge (requests through it skip the backend's gate:
        benchmarks compare the two paths); None once closed."""
        return self._root

    @property
    def node(self):
        return self._root.node if self._root is not None else None

    def describe(self):
        return f"backend '{self.name}'" if self.name else "an unnamed backend"

    def __repr__(self):
        return f"<BlockBackend {self.name or '(unnamed)'} node={self.node.name if self.node else None}>"

    @property
    def length(self):
        return self._root.node.length

    @property
    def perm(self):
        return self._root.perm

    @property
    def shared(self):
        return self._root.shared

    def set_perm(self, perm, shared):
        """Change what this backend takes and shares (names or masks); refused on conflict."""
        self.node.update_parent_perm(self._root, perm_from(perm), perm_from(shared))

    # ------------------------------------------------------------ I/O
    # pread, preadv, pwrite and pwritev are BackendCore's (Cython): bounds
    # check against a cached length, in-flight count, one call into the root.

    def pwrite_zeroes(self, offset, length, flags=0, may_unmap=False):
        """Make the range read as zeroes (``may_unmap``: it may be deallocated)."""
        if may_unmap:
            flags |= REQ_MAY_UNMAP
        self._call(offset, length, True, self._root.node.pwrite_zeroes, offset, length, flags)

    def pdiscard(self, offset, length):
        """Discard the range (a hint; honoured when the root was opened with discard=unmap)."""
        self._call(offset, length, True, self._root.node.pdiscard, offset, length)

    def flush(self):
        """Make every completed write stable."""
        self._call(0, 0, False, self._root.node.flush)

    def truncate(self, length):
        """Resize the disk (grow or shrink, as the driver allows). The requests in flight finish first
        and new ones wait until it is done (QEMU's truncate is a serialising request): a write still in
        flight past the new end would otherwise land after the shrink and grow the disk again."""
        self._check_request(0, 0, True)
        with drained(self._root.node):
            self._root.node.truncate(length)

    def block_status(self, offset, length):
        """:class:`~pyrep.node.BlockStatus` of the range's first extent."""
        self._check_request(offset, length)
        return self._root.node.block_status(offset, length)

    # -------------------------------------------------------- async I/O
    # asyncio is imported on first use: it costs ~30 ms of start-up that sync users never need
    async def co_pread(self, offset, length):
        return await _loop().run_in_executor(_pool(), self.pread, offset, length)

    async def co_pwrite(self, offset, data, flags=0):
        return await _loop().run_in_executor(_pool(), self.pwrite, offset, data, flags)

    async def co_preadv(self, offset, iov):
        return await _loop().run_in_executor(_pool(), self.preadv, offset, iov)

    async def co_pwritev(self, offset, iov, flags=0):
        return await _loop().run_in_executor(_pool(), self.pwritev, offset, iov, flags)

    async def co_pwrite_zeroes(self, offset, length, flags=0):
        return await _loop().run_in_executor(_pool(), self.pwrite_zeroes, offset, length, flags)

    async def co_pdiscard(self, offset, length):
        return await _loop().run_in_executor(_pool(), self.pdiscard, offset, length)

    async def co_flush(self):
        return await _loop().run_in_executor(_pool(), self.flush)

    def submit(self, fn, *args):
        """Run ``fn(*args)`` (e.g. ``blk.pread``) on the shared I/O pool; returns a Future."""
        return _pool().submit(fn, *args)

    # ------------------------------------------------------------ drain
    def drained_begin(self):
        """New requests wait; returns when the in-flight ones have finished."""
        with self._lock:
            self._quiesce += 1
            while self._in_flight:
                self._lock.wait(0.5)

    def drained_end(self):
        with self._lock:
            self._quiesce -= 1
            if not self._quiesce:
                self._lock.notify_all()

    def drain(self):
        """Wait until every in-flight request has finished."""
        self.drained_begin()
        self.drained_end()

    @property
    def in_flight(self):
        return self._in_flight

    # ------------------------------------------------------------ close
    def close(self):
        """Drain, flush (if writable) and release the root; implicit nodes close with it."""
        if self._closed:
            return
        self.drain()
        node = self._root.node
        try:
            if not self.read_only and not node.closed:
                node.flush()
        finally:
            self._closed = True
            if self.name:
                graph.remove_backend(self.name, self)
            node.remove_parent(self._root)
            self._root = None
            if not node.parents and not node.monitor_owned and not node.closed:
                node.close()

    @property
    def closed(self):
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_backend(options, name=None, read_only=False, perm=None, shared=None, share_rw=False):
    """A BlockBackend on a new root node built from ``options`` (any spelling), or on an
    existing node when ``options`` is a Node or the name of one; a string naming no node or
    backend but an image file (or a URI such as ``nbd://host/export``) opens it with its format probed.

    ``perm``/``shared`` override the default permissions (names such as
    ``"consistent-read,write"`` or ``"all"``, or masks); ``share_rw`` adds
    write and resize to what is shared."""
    if name is not None:
        graph.check_name(name, "backend name")
    if isinstance(options, Node):
        node, created = options, False
    else:
        node = _named_node(options)
        created = node is None
        if created:
            opts = normalize(_as_options(options))
            if read_only:
                opts.setdefault("read-only", True)
            node = graph.open_node(opts)
    if shared is None and share_rw:
        shared = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED | PERM_WRITE | PERM_RESIZE
    try:
        blk = BlockBackend(node, name=name, read_only=read_only, perm=perm, shared=shared)
    except BaseException:
        if created:
            node.close()
        raise
    if name is not None:
        graph.add_backend(name, blk)
    return blk


def _named_node(options):
    """The existing node a string names (a node-name or a backend's name), else None."""
    if isinstance(options, str) and not options.startswith("json:"):
        try:
            return graph.lookup(options)
        except OptionError:
            return None
    return None


def _as_options(options):
    """Options from what open_backend was given: a dict, a drive string, a ``json:`` filename, or the
    filename of an image (a path or a URI), opened with its format probed as ``qemu-io x.qcow2`` does."""
    if not isinstance(options, str) or options.startswith("json:"):
        return options
    if graph.uri_scheme(options) is not None or os.path.exists(options):
        return {"filename": options}
    if "=" in options:
        return options
    raise OptionError(f"no node, backend or file named '{options}'")


def backend(name):
    """The BlockBackend named ``name``."""
    blk = graph.get_backend(name)
    if blk is None:
        known = graph.backends()
        raise OptionError(f"no backend named '{name}'" + (f" (known: {', '.join(sorted(known))})" if known else ""))
    return blk


def backends():
    return graph.backends()


