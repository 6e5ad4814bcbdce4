"""``backup``: copy-before-write (``sync="none"``) and point-in-time copies (``sync="full"|"top"``).

The job installs a write notifier on the source node. Before a write, a
write-zeroes or a discard reaches the source's driver, the notifier copies
the *old* content of every cluster the request touches into the target,
at most once per cluster: a copy bitmap (:class:`pyrep.Bitmap`, one bit per
cluster) remembers what was copied. ``do_checkpoint()`` resets it (sync=none:
a new checkpoint interval starts; the replication filter calls it at each
checkpoint after emptying the hidden disk).

Concurrency rules:

- A cluster being copied is *claimed*; a second write to it waits in its own
  notifier until the copy is done, then passes without copying again.
- The copy's write to the target is a serialising request and the job turns
  on request tracking on the target: a reader of the target's chain (e.g. an
  overlay whose backing is the target, whose reads of clusters the target
  does not hold fall through to the source) either finishes before the copy
  lands (and before the guest write, which waits for the copy, changes the
  source) or starts after it and finds the old data in the target. Readers
  never see a half-copied cluster.
- ``sync="full"``/``"top"`` copy in the background with the same claims, so a
  cluster is copied once, either by the background loop or by a write.

Errors of a copy made for a guest write (``on_error``, after QEMU's
``on-cbw-error``/``on-target-error``):

- ``"report"`` (default): the job ends (``status == "concluded"``, ``job.error``
  set), its notifier goes away, the guest write proceeds (the snapshot is
  broken, the guest is not);
- ``"ignore"``: the cluster is marked copied (its old data is lost from the
  target), the guest write proceeds, ``job.errors_ignored`` counts it;
- ``"stop"``: the guest write fails with the error, the job pauses with
  ``job.io_error`` set; the cluster stays uncopied, so the next write to it
  (or the background loop after ``resume()``) tries again.

``on_cbw_error`` (QEMU's copy-before-write option of that name) chooses between those
policies and a stricter one:

- ``"break-snapshot"`` (default): ``on_error`` decides, as above;
- ``"break-guest-write"``: the guest write fails with the copy's error (a BlockError with its
  errno), the cluster stays uncopied (the next write to it tries again), the job keeps
  running and keeps the first such error in ``cbw_error`` (``cbw_failures`` counts them).
  The target then never misses old data the source no longer holds: block replication's
  hidden disk needs exactly that.

Errors of the background copy (full/top): "report" ends the job, "ignore"
retries the range later, "stop" pauses until resume().

sync=none runs until cancelled; full/top conclude when everything is copied.
Cancel is the normal end of a sync=none job: ``cancelled`` is True and
``error`` None.
"""
import threading

from .._core.cowgate import CowGate
from ..constants import (PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, REQ_WRITE_UNCHANGED)
from ..errors import BlockError, OptionError
from ..blockstatus import allocation_extents, is_allocated, skip_filters
from ..node import drained
from .job import Job, resolve_pair

__all__ = ["BackupJob", "backup"]

SYNC_MODES = ("none", "full", "top")
CBW_ERROR_POLICIES = ("break-snapshot", "break-guest-write")
_MAX_RUN = 1 << 20          # background copies batch clusters up to 1 MiB


class BackupJob(Job):
    type = "backup"

    def __init__(self, source, target, sync="none", job_id=None, on_error="report", cluster_size=None,
                 on_complete=None, on_cbw_error="break-snapshot"):
        if sync not in SYNC_MODES:
            raise OptionError(f"backup: sync must be one of {', '.join(SYNC_MODES)}, got {sync!r}")
        if on_cbw_error not in CBW_ERROR_POLICIES:
            raise OptionError(f"backup: on_cbw_error must be one of {', '.join(CBW_ERROR_POLICIES)}, "
                              f"got {on_cbw_error!r}")
        source, target = resolve_pair("backup", source, target)
        length = source.length
        if cluster_size is None:
            # QEMU's rule (64 KiB, or the target's cluster if larger) amortises a copy's metadata work;
            # a target whose clusters cost only a memcpy (memory) is copied in its own clusters, so a
            # small guest write copies little
            tdrv = skip_filters(target).driver
            tcs = getattr(tdrv, "cluster_size", 0) or 0
            cluster_size = max(4096 if getattr(tdrv, "cheap_small_clusters", False) else 65536, tcs)
        if cluster_size < 512 or cluster_size & (cluster_size - 1):
            raise OptionError(f"backup: cluster_size must be a power of two >= 512, got {cluster_size}")
        source.check_op("backup-source")
        target.check_op("backup-target")
        super().__init__(job_id, on_error, on_complete)
        self.sync = sync
        self.on_cbw_error = on_cbw_error
        self.cbw_error = None          # break-guest-write: the first copy-before-write error
        self.cbw_failures = 0          # break-guest-write: guest writes failed by their copy
        self.source, self.target = source, target
        self.cluster_size = cluster_size
        self.length = length
        self._lock = threading.Condition()
        # copied/claimed bitmaps and the copy itself live in C (CowGate), shared with the node layer
        self._gate = gate = CowGate(source, target, length, cluster_size)
        gate.on_error = self._cow_failed
        store = target.driver.cow_store()
        if store is not None and cluster_size % store.cluster_size == 0:
            gate.set_target_store(store)        # copies go straight into the memory target's buffers
        gate.on_wake = self._wake
        self._copied = gate.copied
        self._fatal = None             # a copy-before-write error that ended the job ("report")
        self.checkpoints = 0
        self._tracking = False
        self._notifier_on = False
        try:
            self._take(source, "backup-source", PERM_CONSISTENT_READ, PERM_ALL)
            self._take(target, "backup-target", PERM_WRITE, PERM_ALL & ~(PERM_WRITE | PERM_RESIZE))
            self._block(source, "backup-source")
            self._block(target, "backup-target")
            if sync == "top":
                self._skip_unallocated()
            target.enable_tracking()
            self._tracking = True
            with drained(source):       # no write may be past the notifier hook without a copy
                source.add_write_notifier(self._before_write, skip=gate)
                self._notifier_on = True
        except BaseException:
            self._teardown()
            self.abandon()
            raise

    # ---------------------------------------------------------------- info
    @property
    def bytes_copied(self):
        """Bytes copied over the job's life."""
        return self._gate.bytes_copied

    @property
    def clusters_copied(self):
        """Clusters copied over the job's life."""
        return self._gate.clusters_copied

    @property
    def progress(self):
        with self._lock:
            return self._copied.count(), self.length

    @property
    def copied_bitmap(self):
        """A copy of the copy bitmap (set bit: cluster copied, or skipped, in this interval)."""
        with self._lock:
            return self._copied.copy()

    def do_checkpoint(self, drain=True):
        """Start a new checkpoint interval (sync=none): forget which clusters were copied.

        With ``drain`` (default) the users above the source are quiesced meanwhile, so no write
        is in flight past its copy; pass False if the caller already drained the source."""
        if self.sync != "none":
            raise OptionError(f"{self.describe()}: do_checkpoint needs sync=none (this job is sync={self.sync})")
        if self.status == "concluded":
            raise OptionError(f"{self.describe()} has concluded" +
                              (f" with an error: {self.error}" if self.error else ""))
        if drain:
            with drained(self.source):
                self._reset_copied()
        else:
            self._reset_copied()

    def _reset_copied(self):
        gate = self._gate
        with self._lock:
            gate.waiters += 1
            try:
                while not gate.claimed.is_empty():
                    self._lock.wait()
            finally:
                gate.waiters -= 1
            self._copied.reset_all()
            self.checkpoints += 1

    def _wake(self):
        with self._lock:
            self._lock.notify_all()

    # ---------------------------------------------------------------- setup
    def _skip_unallocated(self):
        """sync=top: only clusters allocated in the source's top layer are copied."""
        bm = self._copied
        bm.set_all()
        for pos, n, alloc in allocation_extents(lambda p, n: is_allocated(self.source, p, n), 0, self.length):
            if alloc:
                bm.reset(pos, n)

    def _teardown(self):
        gate = self._gate
        with self._lock:
            gate.stopped = True
            if self._notifier_on:
                self.source.remove_write_notifier(self._before_write)
                self._notifier_on = False
            gate.waiters += 1
            try:
                while gate.active:
                    self._lock.wait(0.05)
            finally:
                gate.waiters -= 1
        if self._tracking:
            self.target.disable_tracking()
            self._tracking = False

    def cleanup(self):
        self._teardown()
        super().cleanup()

    # ---------------------------------------------------------------- copying
    # The common case runs in C (CowGate.c_before_write, called by the node layer). This Python
    # notifier runs when the C path cannot finish: another request is copying a touched cluster,
    # or the write takes the node's slow path for another reason.
    def _before_write(self, node, offset, length, flags):
        """The write notifier: copy the old content of the touched clusters first."""
        gate = self._gate
        if flags & REQ_WRITE_UNCHANGED or gate.stopped:
            return
        end = min(offset + length, self.length)
        if offset >= end:
            return
        cs = self.cluster_size
        first, last = offset // cs, (end - 1) // cs
        nxt = self._copied.next_clear(first * cs)
        if nxt < 0 or nxt > (last + 1) * cs - 1:
            return  # every touched cluster was copied in this interval (a checkpoint drains writes first)
        gate.enter()
        try:
            while not gate.stopped:
                mine, others = gate.claim(first, last)
                if mine:
                    self._cow(mine)
                if not others:
                    return
                with self._lock:
                    gate.waiters += 1
                    try:
                        while gate.claimed_any(others):
                            self._lock.wait()
                    finally:
                        gate.waiters -= 1
                # loop: a cluster another write failed to copy (on_error=stop) is ours to try now
        finally:
            gate.leave()

    def _cow(self, idxs):
        runs, start = [], 0
        for i in range(1, len(idxs) + 1):
            if i == len(idxs) or idxs[i] != idxs[i - 1] + 1:
                runs.append((idxs[start], i - start))
                start = i
        for k, (first, count) in enumerate(runs):
            try:
                self._gate.copy_run(first, count)
            except BlockError as e:
                rest = [idx for f, c in runs[k + 1:] for idx in range(f, f + c)]
                if self._cow_failed(e, list(range(first, first + count)), rest):
                    continue
                return
            except BaseException:
                pending = [idx for f, c in runs[k:] for idx in range(f, f + c)]
                self._gate.release(pending, False)
                raise

    def _cow_failed(self, e, failed, rest):
        """A copy-before-write of the clusters ``failed`` failed; ``rest``: the claimed clusters of the
        same write not tried yet. True: go on copying ``rest`` (ignore: only ``failed`` is given up)."""
        policy = self.on_error
        if self.on_cbw_error == "break-guest-write":
            self._gate.release(failed + rest, False)
            with self._cond:
                self.cbw_failures += 1
                if self.cbw_error is None:
                    self.cbw_error = e
            raise BlockError(e.errno, f"{self.describe()}: the write to '{self.source.name}' is refused: copying "
                                      f"its old data to '{self.target.name}' failed: {e}") from e
        if policy == "ignore":
            self._gate.release(failed, True)
            with self._cond:
                self.errors_ignored += 1
                self.last_error = e
            return True
        self._gate.release(failed + rest, False)
        if policy == "stop":
            with self._cond:
                self.io_error = e
            self.pause()
            raise e
        # report: the job ends with the error; the guest write proceeds
        with self._lock:
            self._gate.stopped = True
            if self._fatal is None:
                self._fatal = e
        with self._cond:
            if self.error is None:
                self.error = e
        self._kick()
        return False

    # ---------------------------------------------------------------- the job thread
    def run(self):
        if self.sync == "none":
            while True:
                if self._fatal is not None:
                    return
                self.sleep(0.5)
        self._background()

    def _background(self):
        cs, gate = self.cluster_size, self._gate
        max_run = max(1, _MAX_RUN // cs)
        pos = 0
        while True:
            self.pause_point()
            if self._fatal is not None:
                return
            nxt = self._copied.next_clear(pos)
            if nxt < 0 and pos > 0:
                pos = 0
                nxt = self._copied.next_clear(0)
            if nxt < 0:
                # everything copied; wait for copies in flight (they may fail and leave holes)
                if gate.claimed.is_empty():
                    return
                with self._lock:
                    self._lock.wait(0.05)
                continue
            first = nxt // cs
            count = gate.claim_run(first, max_run)
            if not count:               # a write is copying it
                pos = (first + 1) * cs
                if pos >= self.length:
                    pos = 0
                    with self._lock:
                        self._lock.wait(0.01)
                continue
            try:
                gate.copy_run(first, count)
            except BlockError as e:
                gate.release(range(first, first + count), False)
                self._handle_error(e)
                pos = first * cs
                continue
            except BaseException:
                gate.release(range(first, first + count), False)
                raise
            pos = (first + count) * cs
            if pos >= self.length:
                pos = 0


def backup(source, target, sync="none", job_id=None, on_error="report", cluster_size=None, on_complete=None,
           on_cbw_error="break-snapshot"):
    """Start a backup job from ``source`` to ``target`` (Nodes or names); see the module docstring."""
    job = BackupJob(source, target, sync=sync, job_id=job_id, on_error=on_error, cluster_size=cluster_size,
                    on_complete=on_complete, on_cbw_error=on_cbw_error)
    return job.start()
