"""``commit``: merge a top node and its intermediates into a base below it (QEMU's block-commit).

Active commit (``top`` is the active layer, with backends or parent nodes
writing to it) works like a mirror from ``top`` to ``base``: every range
``is_allocated_above(top, base)`` says comes from above the base is marked
dirty, writes to ``top`` keep marking ranges dirty (a write notifier), and the
job copies dirty ranges (read through ``top``, so the newest data wins)
into ``base``. When nothing is left dirty, under drain (the users of ``top``
wait) it copies the last ranges and then:

- every parent edge of ``top`` (backends, parent nodes such as a replication
  filter, or the overlay above a non-active ``top``) now points at ``base``;
- ``top`` and the intermediates leave the graph: they are closed (a node
  still used by someone outside the chain stays open); a ``blockdev_add``
  ownership of them is dropped;
- ``base`` stays read-write; the job concludes with ``error`` None and
  ``job.pivoted`` True.

A non-active commit (``top`` has an overlay above it and no writers) is the
same code: the overlay's backing becomes ``base``.

``base`` is reopened read-write for the job when it is read-only, and back to
read-only if the job fails or is cancelled. On an error (policy "report") or
a cancel the graph is unchanged and ``job.error`` (or ``job.cancelled``) says
why (a failed commit may have written merged data into ``base``; what ``top``
shows is unchanged). The pivot's permissions are checked when the job starts
too: if a user of ``top`` does not share what a user of ``base`` holds (or the
reverse), ``commit()`` raises PermissionConflict at once. Intermediates must not be used by another job (cancel a backup whose
target is in the chain first: its copies would change the chain).
"""
from ..constants import PERM_ALL, PERM_CONSISTENT_READ, PERM_WRITE
from ..errors import OptionError
from ..graph import reopen
from ..blockstatus import is_allocated_above
from .job import Job, move_parents, resolve_node
from .mirror import GRANULARITY, MirrorJob, check_pivot

__all__ = ["CommitJob", "commit", "BASE_PERM"]

# what a commit takes on its base: others must share it for the commit to start (replication checks it
# at start, so a failover cannot fail on permissions)
BASE_PERM = PERM_WRITE | PERM_CONSISTENT_READ


class CommitJob(MirrorJob):
    type = "commit"
    auto_complete = True

    def __init__(self, top, base=None, job_id=None, on_error="report", on_complete=None,
                 granularity=GRANULARITY):
        top = resolve_node(top, "commit top")
        chain, node = [top], top.backing
        while node is not None:
            chain.append(node)
            node = node.backing
        if len(chain) == 1:
            raise OptionError(f"commit: node '{top.name}' has no backing node: nothing to commit into")
        if base is None:
            base = chain[-1]
        else:
            base = resolve_node(base, "commit base")
            if base is top or base not in chain:
                raise OptionError(f"commit: node '{base.name}' is not below '{top.name}' in its backing chain "
                                  f"({' -> '.join(n.name for n in chain)})")
        self.top, self.base = top, base
        self.intermediates = chain[1:chain.index(base)]
        for n in [top] + self.intermediates:
            for c in n.parents:
                if isinstance(c.parent, Job):
                    raise OptionError(f"commit: node '{n.name}' is used by {c.parent.describe()}; "
                                      f"cancel that job first")
        top.check_op("commit-source")
        base.check_op("commit-target")
        check_pivot(top, base)
        Job.__init__(self, job_id, on_error, on_complete)
        self.sync = "allocated-above"
        self._init_engine(top, base, granularity)
        self._reopened = False
        try:
            if base.read_only:
                reopen(base, False)
                self._reopened = True
            self._take(top, "commit-top", PERM_CONSISTENT_READ, PERM_ALL)
            self._take(base, "commit-base", BASE_PERM, PERM_ALL)
            self._block(top, "commit-source")
            self._block(base, "commit-target")
            for n in self.intermediates:
                self._block(n, "commit-source")
            self._install()
        except BaseException:
            self._uninstall()
            self.abandon()
            self._restore_base()
            raise

    def _init_dirty(self):
        self.mark_allocated(self._dirty, self._dlock,
                            lambda pos, n: is_allocated_above(self.top, self.base, pos, n))

    def _drain_nodes(self):
        return (self.top, self.base)

    def _switch(self):
        self._uninstall()
        self._release_graph()
        move_parents(self.top, self.base)
        self.pivoted = True
        for n in [self.top] + self.intermediates:
            n.monitor_owned = False
        if not self.top.parents and not self.top.closed:
            self.top.close()

    def _restore_base(self):
        if self._reopened and not self.base.closed:
            self._reopened = False
            try:
                reopen(self.base, True)
            except Exception as e:   # the job's own error matters more
                import warnings
                warnings.warn(f"{self.describe()}: could not make '{self.base.name}' read-only again: {e}",
                              RuntimeWarning)

    def cleanup(self):
        super().cleanup()
        if not self.pivoted:
            self._restore_base()

    def complete(self, sync=False):
        """A commit completes on its own once converged; this only waits when ``sync``."""
        if sync:
            self.wait()


def commit(top, base=None, job_id=None, on_error="report", on_complete=None):
    """Start a commit job of ``top`` (and the intermediates) into ``base`` (default: the bottom of the
    backing chain); see the module docstring."""
    job = CommitJob(top, base=base, job_id=job_id, on_error=on_error, on_complete=on_complete)
    return job.start()
