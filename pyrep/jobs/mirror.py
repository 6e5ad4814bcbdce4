"""``mirror``: copy a node to another while writes keep arriving, then pivot (QEMU's drive-mirror).

The job marks every range written to the source in a dirty bitmap (a write
notifier on the source; :class:`pyrep.Bitmap`), starting from "everything"
(``sync="full"``), "what the source's top layer holds" (``sync="top"``) or
"nothing" (``sync="none"``: only writes from now on, for a target that already
holds the source's data).
It copies dirty ranges in chunks (up to 1 MiB): it clears the range's bits,
waits for writes to the source still in flight over it (the source has
request tracking on while the job runs), reads the source and writes the
target; a write that lands meanwhile sets the bits again and is copied
again. When nothing is dirty the job is ``ready`` and keeps copying new
writes. Then:

- ``job.complete()``: under drain (the users of the source wait) the last
  dirty ranges are copied and every parent of the source (backends, parent
  nodes) is moved to the target; the source is closed if nothing else uses
  it. ``wait()`` for the end; ``error`` says whether the pivot happened.
- ``job.cancel()``: the job stops and the graph is unchanged (after
  ``ready`` this is QEMU's clean "cancel = finish without pivot"):
  ``cancelled`` True, ``error`` None.

Errors of the job's copies follow ``on_error`` (:mod:`pyrep.jobs.job`): "report"
ends the job with the graph unchanged, "ignore" retries the range later,
"stop" pauses until ``resume()``. :class:`~pyrep.jobs.commit.CommitJob` is the
same machine with a different start (ranges allocated above the base) and
end (top replaced by base, top and intermediates dropped), and no ``ready``
wait: it completes on its own.
"""
import threading

from .._core.bitmap import Bitmap
from .._core.iovec import IOVector
from ..constants import PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, REQ_WRITE_UNCHANGED
from ..errors import BlockError, OptionError
from ..blockstatus import is_allocated
from ..node import drained
from ..perms import check_conflicts
from .job import Job, Cancelled, move_parents, resolve_pair

__all__ = ["MirrorJob", "mirror"]

CHUNK = 1 << 20
CONVERGED = 1 << 20       # dirty bytes left that count as "in sync" (copied under drain at completion)
GRANULARITY = 65536


class MirrorJob(Job):
    type = "mirror"
    auto_complete = False         # commit completes by itself once converged

    def __init__(self, source, target, sync="full", job_id=None, on_error="report", on_complete=None,
                 granularity=GRANULARITY):
        if sync not in ("full", "top", "none"):
            raise OptionError(f"mirror: sync must be 'full', 'top' or 'none', got {sync!r}")
        source, target = resolve_pair("mirror", source, target)
        source.check_op("mirror-source")
        target.check_op("mirror-target")
        check_pivot(source, target)
        super().__init__(job_id, on_error, on_complete)
        self.sync = sync
        self._init_engine(source, target, granularity)
        try:
            self._take(source, "mirror-source", PERM_CONSISTENT_READ, PERM_ALL)
            self._take(target, "mirror-target", PERM_WRITE, PERM_ALL & ~(PERM_WRITE | PERM_RESIZE))
            self._block(source, "mirror-source")
            self._block(target, "mirror-target")
            self._install()
        except BaseException:
            self._uninstall()
            self.abandon()
            raise

    # ---------------------------------------------------------------- engine
    def _init_engine(self, source, target, granularity):
        self.source, self.target = source, target
        self.length = source.length
        self.granularity = granularity
        self._dlock = threading.Lock()
        self._dirty = Bitmap(self.length, granularity)
        self._pos = 0
        self._copied = 0
        self._complete_requested = False
        self._tracking = False
        self._notifier_on = False
        self.pivoted = False

    def _install(self):
        self.source.enable_tracking()
        self._tracking = True
        with drained(self.source):
            self.source.add_write_notifier(self._on_write)
            self._notifier_on = True

    def _uninstall(self):
        if self._notifier_on:
            self.source.remove_write_notifier(self._on_write)
            self._notifier_on = False
        if self._tracking:
            self.source.disable_tracking()
            self._tracking = False

    def cleanup(self):
        self._uninstall()
        super().cleanup()

    def _on_write(self, node, offset, length, flags):
        if flags & REQ_WRITE_UNCHANGED or offset >= self.length:
            return
        with self._dlock:
            self._dirty.set(offset, min(length, self.length - offset))
        if self.status == "ready":
            self._kick()

    @property
    def progress(self):
        with self._dlock:
            return self._copied, self._copied + self._dirty.count()

    def _init_dirty(self):
        """Mark what the job must copy first (runs in the job thread, before the copy loop)."""
        if self.sync == "full":
            with self._dlock:
                self._dirty.set_all()
            return
        if self.sync == "none":        # only what is written from now on (the target already agrees)
            return
        self.mark_allocated(self._dirty, self._dlock, lambda pos, n: is_allocated(self.source, pos, n))

    def _copy_one(self):
        """Copy the next dirty chunk; False if nothing is dirty."""
        with self._dlock:
            off = self._dirty.next_set(self._pos)
            if off < 0:
                off = self._dirty.next_set(0)
                if off < 0:
                    return False
            start, n = next(iter(self._dirty.extents(off, min(CHUNK, self.length - off))))
            self._dirty.reset(start, n)
        try:
            # a write that ran its notifier (dirtying this range) may still be on its way to the driver
            self.source.wait_for_overlaps(start, n)
            buf = bytearray(n)
            iov = IOVector(buf)
            self.source.preadv(start, n, iov)
            self.target.pwritev(start, n, iov)
        except BaseException:
            with self._dlock:
                self._dirty.set(start, n)
            raise
        with self._dlock:
            self._copied += n
            self._pos = start + n
        return True

    def _check_cancel(self):
        if self._cancel:
            raise Cancelled()

    def _became_ready(self):
        with self._cond:
            if self.status == "running":
                self.transition("ready")
            elif self.status == "paused" and self._status_before_pause == "running":
                self._status_before_pause = "ready"

    def run(self):
        self._init_dirty()
        with self._dlock:
            initial = self._dirty.count()
        ready = False
        while True:
            self.pause_point()
            if self._complete_requested:
                break
            with self._dlock:
                left = self._dirty.count()
            # before "ready": copy until clean, or nearly clean once the first pass is done
            if left > CONVERGED or (left and not ready and self._copied < initial):
                try:
                    self._copy_one()
                except BlockError as e:
                    self._handle_error(e)
                continue
            # (nearly) in sync: what is left is copied under drain at completion, so writers
            # that keep dirtying ranges cannot keep the job from converging
            if not ready:
                ready = True
                self._became_ready()
            if self.auto_complete:
                break
            if left:
                try:
                    self._copy_one()
                except BlockError as e:
                    self._handle_error(e)
            else:
                self.sleep(0.05)
        self._converge()

    def _converge(self):
        """Under drain: copy what is still dirty, then switch the graph."""
        while True:
            err = None
            with drained(*self._drain_nodes()):
                try:
                    while self._copy_one():
                        self._check_cancel()
                    self._check_cancel()
                    self._switch()
                    return
                except BlockError as e:
                    err = e
            self._handle_error(err)

    def _drain_nodes(self):
        return (self.source, self.target)

    def _switch(self):
        """Pivot: the parents of the source now use the target (called under drain)."""
        self._uninstall()
        self._release_graph()          # our write permission on the target would conflict
        move_parents(self.source, self.target)
        self.pivoted = True
        src = self.source
        if not src.parents and not src.monitor_owned and not src.closed:
            src.close()

    # ---------------------------------------------------------------- control
    def complete(self, sync=False):
        """Pivot to the target (the job must be ``ready``); ``sync=True`` waits for the end."""
        with self._cond:
            if self.status == "concluded":
                raise OptionError(f"{self.describe()} has already concluded")
            ready = self.status == "ready" or (self.status == "paused" and self._status_before_pause == "ready")
            if not ready:
                raise OptionError(f"{self.describe()} is not ready (status {self.status}): "
                                  f"wait for status 'ready' before complete()")
            self._complete_requested = True
            self._cond.notify_all()
        if sync and threading.current_thread() is not self._thread:
            self.wait()


def check_pivot(old, new):
    """Raise PermissionConflict now if the parents of ``old`` could not move to ``new`` at the end."""
    for c in old.parents:
        if not isinstance(c.parent, Job):
            check_conflicts(new, c, c.perm, c.shared)


def mirror(source, target, sync="full", job_id=None, on_error="report", on_complete=None):
    """Start a mirror job from ``source`` to ``target`` (Nodes or names); see the module docstring."""
    job = MirrorJob(source, target, sync=sync, job_id=job_id, on_error=on_error, on_complete=on_complete)
    return job.start()
