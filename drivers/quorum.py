"""``quorum``: N-way mirrored children with voting (QEMU's quorum driver).

Options:

- ``children``: the children, each a dict of options or the name of an
  existing node; attached under the roles ``children.0`` .. ``children.N-1``.
- ``vote-threshold``: how many children must agree (reads) or succeed
  (writes, zero writes, discards, flushes); 1 <= threshold <= number of children.
- ``read-pattern``: ``quorum`` (read every child, vote on the content) or
  ``fifo`` (read the first child, fall back to the next one on error).
- ``rewrite-corrupted``: with quorum reads, write the winning version back
  to the children that returned something else.

A child that fails (or loses a vote) is not fatal as long as the threshold is
met: it is recorded in the node's error log (:func:`child_errors`), as
QEMU reports QUORUM_REPORT_BAD events. Children can be added and removed at
run time with :func:`quorum_add_child` / :func:`quorum_del_child` (QEMU's
x-blockdev-change), never below the threshold; pyrep exports both.

The primary side of block replication is a quorum with vote-threshold=1 and
read-pattern=fifo over the local disk and a replication(mode=primary) filter.
"""
import collections
import errno
import hashlib
import threading
import time

from pyrep._core.iovec import IOVector
from pyrep.driver import BlockDriver
from pyrep.errors import BlockError, OptionError
from pyrep.options import Opt
from pyrep.pool import LazyPool

__all__ = ["QuorumDriver", "quorum_add_child", "quorum_del_child", "child_errors", "clear_child_errors"]

_ERROR_LOG_MAX = 1000

# a dedicated pool: child requests of a quorum run here; a request issued from a
# pool thread (a quorum below a quorum) runs its children sequentially instead,
# so nested quorums can never starve the pool
_pool = LazyPool("pyrep-quorum", 16)

# what counts as a child's failed vote: an I/O error. Anything else (a TypeError...) is a bug,
# and a bug must surface, not be outvoted.
_IO_ERRORS = (BlockError, OSError)


class QuorumDriver(BlockDriver):
    format_name = "quorum"
    is_filter = False
    options = (
        Opt("children", "children", required=True, help="the children: dicts of options or node names"),
        Opt("vote-threshold", "number", required=True, min=1,
            help="children that must agree on a read / succeed on a write"),
        Opt("read-pattern", "enum", default="quorum", choices=("quorum", "fifo"),
            help="quorum: read all children and vote; fifo: first child, next on error"),
        Opt("rewrite-corrupted", "bool", default=False,
            help="write the winning version back to children that disagreed (quorum reads only)"),
        Opt("parallel", "bool", default=False,
            help="send each request to the children from parallel threads (worth it for slow children "
                 "such as network links); off: one after the other in the caller's thread, fastest locally"),
    )

    def open(self, opts):
        node = self.node
        path = node.option_prefix
        self.parallel = opts["parallel"]
        specs = opts["children"]
        threshold = opts["vote-threshold"]
        if isinstance(threshold, float):
            if not threshold.is_integer():
                raise OptionError(f"quorum: option '{path}vote-threshold' must be a whole number, got {threshold}")
            threshold = int(threshold)
        if not specs:
            raise OptionError(f"quorum: option '{path}children' needs at least one child")
        if threshold > len(specs):
            raise OptionError(f"quorum: option '{path}vote-threshold' is {threshold} but there are only "
                              f"{len(specs)} children (the threshold must be at most the number of children)")
        self.read_pattern = opts["read-pattern"]
        self.rewrite_corrupted = opts["rewrite-corrupted"]
        if self.rewrite_corrupted and self.read_pattern != "quorum":
            raise OptionError(f"quorum: option '{path}rewrite-corrupted' needs read-pattern=quorum "
                              f"(got read-pattern={self.read_pattern})")
        self.threshold = threshold
        self._lock = threading.Lock()
        self.error_log = collections.deque(maxlen=_ERROR_LOG_MAX)
        self.error_counts = collections.Counter()       # node name -> errors
        self._children = []                               # Child objects, in role order
        self._next_index = 0
        try:
            for i, spec in enumerate(specs):
                role = f"children.{i}"
                child = node.open_child({role: spec}, role, role=role)
                self._children.append(child)
                self._next_index = i + 1
            length = self._children[0].node.length
            for c in self._children[1:]:
                if c.node.length != length:
                    raise OptionError(f"quorum: children of '{node.name}' differ in length: "
                                      f"'{self._children[0].node.name}' has {length} bytes, "
                                      f"'{c.node.name}' has {c.node.length}")
        except BaseException:
            for c in list(self._children):
                node.detach_child(c)
            self._children = []
            raise

    # ------------------------------------------------------------ helpers
    @property
    def children(self):
        """The current children (Child objects), in order."""
        return list(self._children)

    def getlength(self):
        return self._children[0].node.length

    def child_perm(self, role, perm, shared):
        # like a filter: every child gets what the parents take and share
        return perm, shared

    def _report(self, child, op, offset, length, exc):
        err = getattr(exc, "errno", None) or errno.EIO
        entry = {"time": time.time(), "node": child.node.name, "role": child.role, "op": op,
                 "offset": offset, "length": length, "errno": err, "message": str(exc)}
        with self._lock:
            self.error_log.append(entry)
            self.error_counts[child.node.name] += 1

    def _run_all(self, children, fn):
        """``[(child, result, exc)]`` of ``fn(child)`` for every child (in parallel with ``parallel=on``)."""
        if not self.parallel or len(children) == 1 or _pool.in_pool():
            out = []
            for c in children:
                try:
                    out.append((c, fn(c), None))
                except _IO_ERRORS as e:
                    out.append((c, None, e))
            return out
        futures = [(c, _pool.submit(fn, c)) for c in children[1:]]
        first = children[0]
        bug = None
        try:
            results = [(first, fn(first), None)]
        except _IO_ERRORS as e:
            results = [(first, None, e)]
        except BaseException as e:       # noqa: B902 - raised once every child request has ended
            bug, results = e, []
        for c, f in futures:
            try:
                results.append((c, f.result(), None))
            except _IO_ERRORS as e:
                results.append((c, None, e))
            except BaseException as e:   # noqa: B902
                bug = bug or e
        if bug is not None:
            raise bug
        return results

    def _vote_writes(self, op, offset, length, fn):
        children = list(self._children)
        if not self.parallel:
            # the common case, sequential: no per-child result list unless a child fails
            failed = None
            for c in children:
                try:
                    fn(c)
                except _IO_ERRORS as e:
                    failed = [] if failed is None else failed
                    failed.append((c, None, e))
            if failed is None:
                return
            bad = {id(c) for c, _, _ in failed}
            results = [(c, None, None) for c in children if id(c) not in bad] + failed
        else:
            results = self._run_all(children, fn)
        err = self._verdict(op, offset, length, results)
        if err is not None:
            raise err

    def _verdict(self, op, offset, length, results):
        """Report the children that failed one write; None if enough succeeded, else the BlockError."""
        ok = 0
        first_err = None
        for c, _, exc in results:
            if exc is None:
                ok += 1
            else:
                if first_err is None:
                    first_err = exc
                self._report(c, op, offset, length, exc)
        if ok >= self.threshold:
            return None
        err = getattr(first_err, "errno", None) or errno.EIO
        return BlockError(err, f"quorum '{self.node.name}': {op} at {offset} (+{length}) succeeded on only {ok} of "
                               f"{len(results)} children (vote-threshold {self.threshold}); first error: {first_err}")

    # ----------------------------------------------------------------- I/O
    def preadv(self, offset, length, iov):
        if self.read_pattern == "fifo":
            return self._read_fifo(offset, length, iov)
        return self._read_quorum(offset, length, iov)

    def _read_fifo(self, offset, length, iov):
        last = None
        for c in list(self._children):
            try:
                c.preadv(offset, length, iov)
                return
            except _IO_ERRORS as e:    # fall back to the next child
                self._report(c, "read", offset, length, e)
                last = e
        err = getattr(last, "errno", None) or errno.EIO
        raise BlockError(err, f"quorum '{self.node.name}': read at {offset} (+{length}) failed on every child; "
                              f"last error: {last}")

    def _read_quorum(self, offset, length, iov):
        children = list(self._children)

        def read(c):
            buf = bytearray(length)
            c.preadv(offset, length, IOVector(buf))
            return buf

        results = self._run_all(children, read)
        versions = {}          # digest -> [buf, [children]]
        for c, buf, exc in results:
            if exc is not None:
                self._report(c, "read", offset, length, exc)
                continue
            digest = hashlib.blake2b(buf, digest_size=20).digest()
            entry = versions.get(digest)
            if entry is None:
                versions[digest] = [buf, [c]]
            else:
                entry[1].append(c)
        if not versions:
            first = next(exc for _, _, exc in results if exc is not None)
            raise BlockError(getattr(first, "errno", None) or errno.EIO,
                             f"quorum '{self.node.name}': read at {offset} (+{length}) failed on every child; "
                             f"first error: {first}")
        # the most votes wins; on a tie the version of the earliest child
        order = {id(c): i for i, c in enumerate(children)}
        winner = max(versions.values(), key=lambda e: (len(e[1]), -min(order[id(c)] for c in e[1])))
        votes = len(winner[1])
        if votes < self.threshold:
            raise BlockError(errno.EIO, f"quorum '{self.node.name}': read at {offset} (+{length}): no version got "
                                        f"{self.threshold} votes (best: {votes} of {len(children)}, "
                                        f"{len(versions)} different versions)")
        losers = [c for e in versions.values() if e is not winner for c in e[1]]
        for c in losers:
            self._report(c, "read", offset, length,
                         BlockError(errno.EIO, f"child '{c.node.name}' returned data that lost the vote"))
        iov.copy_from(0, winner[0])
        if losers and self.rewrite_corrupted:
            data = bytes(winner[0])
            for c in losers:
                try:
                    c.pwrite(offset, data)
                except _IO_ERRORS as e:    # a failed repair is reported, not fatal
                    self._report(c, "write", offset, length, e)

    def pwritev(self, offset, length, iov, flags=0):
        self._vote_writes("write", offset, length, lambda c: c.pwritev(offset, length, iov, flags))

    def pwritev_batch(self, reqs):
        # every child gets the whole batch, then each request is voted on as pwritev votes. Children
        # that send theirs and wait later (a replication child over NBD) are started first, so the
        # secondary writes while the local disk does
        children = list(self._children)
        if self.parallel:
            per_child = self._run_all(children, lambda c: c.node.pwritev_batch(reqs))
        else:
            per_child = self._batch_children(children, reqs)
        if all(exc is None and not any(res) for _, res, exc in per_child):
            return [None] * len(reqs)          # the common case: nothing failed anywhere
        return [self._verdict("write", offset, length,
                              [(c, None, exc if exc is not None else res[i]) for c, res, exc in per_child])
                for i, (offset, length, _, _) in enumerate(reqs)]

    def _batch_children(self, children, reqs):
        """``[(child, errors, None)]`` in children order: the starting ones first, the others meanwhile."""
        started = {}
        for c in children:
            if c.node.batch_starts():
                started[id(c)] = c.node.pwritev_batch_start(reqs)
        done = {}
        try:
            for c in children:
                if id(c) not in started:
                    done[id(c)] = c.node.pwritev_batch(reqs)
        finally:
            # even after a bug in another child: what was started is waited for, not left in flight
            for key, finish in started.items():
                done[key] = finish()
        return [(c, done[id(c)], None) for c in children]

    def pwrite_zeroes(self, offset, length, flags=0):
        self._vote_writes("zero", offset, length, lambda c: c.pwrite_zeroes(offset, length, flags))

    def pdiscard(self, offset, length):
        self._vote_writes("discard", offset, length, lambda c: c.pdiscard(offset, length))

    def flush(self):
        self._vote_writes("flush", 0, 0, lambda c: c.flush())

    def truncate(self, length):
        raise BlockError(errno.ENOTSUP, f"quorum '{self.node.name}': resize is not supported")

    def get_info(self):
        return {"vote-threshold": self.threshold, "read-pattern": self.read_pattern,
                "rewrite-corrupted": self.rewrite_corrupted,
                "children": [{"role": c.role, "node": c.node.name, "errors": self.error_counts.get(c.node.name, 0)}
                             for c in self._children]}

    def reopen_prepare(self, read_only):
        pass

    # ----------------------------------------------------- run-time change
    def add_child(self, child_node):
        node = self.node
        if any(c.node is child_node for c in self._children):
            raise OptionError(f"quorum '{node.name}': node '{child_node.name}' is already a child")
        if child_node.length != self.getlength():
            raise OptionError(f"quorum '{node.name}': cannot add '{child_node.name}': its length "
                              f"{child_node.length} differs from the quorum's {self.getlength()}")
        role = f"children.{self._next_index}"
        from pyrep.graph import drained
        with drained(node):
            child = node.attach_child(child_node, role)
            self._children.append(child)
            self._next_index += 1
        return role

    def del_child(self, which):
        node = self.node
        child = None
        for c in self._children:
            if c.role == which or c.node.name == which:
                child = c
                break
        if child is None:
            roles = ", ".join(f"{c.role} ({c.node.name})" for c in self._children)
            raise OptionError(f"quorum '{node.name}' has no child '{which}' (children: {roles})")
        if len(self._children) <= self.threshold:
            raise OptionError(f"quorum '{node.name}': cannot remove '{which}': it has {len(self._children)} "
                              f"children and the vote threshold is {self.threshold} (the number of children "
                              f"cannot go below the threshold)")
        from pyrep.graph import drained
        with drained(node):
            self._children.remove(child)
            if child.role == f"children.{self._next_index - 1}":
                self._next_index -= 1
            node.detach_child(child)
        return child.role


def _quorum(node_name):
    from pyrep.graph import lookup
    node = lookup(node_name) if isinstance(node_name, str) else node_name
    if not isinstance(node.driver, QuorumDriver):
        raise OptionError(f"node '{node.name}' is a '{node.drv.format_name}' node, not quorum")
    return node.driver


def quorum_add_child(node_name, child_node_name):
    """Attach the existing node ``child_node_name`` as a new child of the quorum ``node_name``
    (QEMU's x-blockdev-change parent=..., node=...). Returns the new role (``children.N``)."""
    from pyrep.graph import lookup
    drv = _quorum(node_name)
    child = lookup(child_node_name) if isinstance(child_node_name, str) else child_node_name
    return drv.add_child(child)


def quorum_del_child(node_name, child):
    """Detach the child of the quorum ``node_name`` given by role (``children.N``) or node name
    (QEMU's x-blockdev-change parent=..., child=...); refused below the vote threshold."""
    return _quorum(node_name).del_child(child)


def child_errors(node_name):
    """The quorum's per-child error log: a list of dicts (time, node, role, op, offset, length, errno, message)."""
    drv = _quorum(node_name)
    with drv._lock:
        return list(drv.error_log)


def clear_child_errors(node_name):
    drv = _quorum(node_name)
    with drv._lock:
        drv.error_log.clear()
        drv.error_counts.clear()
