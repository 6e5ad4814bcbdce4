"""``replication``: the COLO block replication filter (after QEMU's block/replication.c).

Options: ``file`` (the child), ``mode`` (``primary`` | ``secondary``, required)
and ``top-id`` (secondary only, required there: the node-name or backend name
of the root node that contains this filter).

Primary: ``quorum(local disk, replication(mode=primary) -> file: the
secondary disk)``. The filter never serves reads; while RUNNING it forwards
writes to its file and records forwarding errors (reported by
:meth:`get_error`, never returned to the primary's user).

Secondary: ``top -> replication(mode=secondary) -> file: active -> backing:
hidden -> backing: secondary disk``. While RUNNING a backup job (sync=none,
copy-before-write) copies the old content of every cluster the primary
overwrites on the secondary disk into the hidden disk, and the secondary's own
writes land in the active disk, so the secondary reads "the disk at the last
checkpoint plus its own writes". A checkpoint empties active and hidden.
Failover commits active and hidden into the secondary disk.

Stages and I/O (the table in ARCHITECTURE.md):

=================  ============  =========================  ============  ======================
stage              primary read  primary write              sec. read     sec. write
=================  ============  =========================  ============  ======================
none               EIO           EIO                        EIO           EIO
running            EIO           forwarded, errors recorded file          file (active)
failover           EIO           EIO                        file          file
failover_failed    EIO           EIO                        file          active where allocated
                                                                          above the secondary
                                                                          disk, else that disk
done               EIO           EIO                        file          file
=================  ============  =========================  ============  ======================

The control operations (start, checkpoint, get_error, stop) are driven by
:mod:`pyrep.replication` (``start_all`` ...).
"""
import errno
import threading
import time

from pyrep import replication as _registry
from pyrep._core.fastpath import pwritev_each
from pyrep._core.forwarder import Forwarder
from pyrep.constants import PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED
from pyrep.driver import BlockDriver
from pyrep.errors import BlockError, OptionError, ReplicationError
from pyrep.options import Opt
from pyrep.replication_state import IGNORED, TRANSITIONS, Event, Stage, next_stage

__all__ = ["ReplicationDriver", "NONE", "RUNNING", "FAILOVER", "FAILOVER_FAILED", "DONE"]

# the stages, for callers that compare (Stage is a str enum: "running" == RUNNING)
NONE, RUNNING, FAILOVER, FAILOVER_FAILED, DONE = (Stage.NONE, Stage.RUNNING, Stage.FAILOVER,
                                                  Stage.FAILOVER_FAILED, Stage.DONE)

_SHARED = PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE



class ReplicationDriver(BlockDriver):
    format_name = "replication"
    is_filter = True
    options = (
        Opt("file", "child", required=True,
            help="primary: the secondary disk (link); secondary: the active disk"),
        Opt("mode", "enum", required=True, choices=("primary", "secondary"),
            help="which side of the replication this node is"),
        Opt("top-id", "string",
            help="secondary only: node-name or backend name of the root node containing this node"),
    )

    # ------------------------------------------------------------ life cycle
    def open(self, opts):
        path = self.node.option_prefix
        mode = opts["mode"]
        top_id = opts.get("top-id")
        if mode == "primary" and top_id is not None:
            raise OptionError(f"replication: option '{path}top-id' is not supported in primary mode "
                              f"(only a secondary names its top node)")
        if mode == "secondary" and not top_id:
            raise OptionError(f"replication: option '{path}top-id' is required in secondary mode (the node-name "
                              f"or backend name of the root node that contains this replication node)")
        self.mode = mode
        self.top_id = top_id
        self._stage = Stage.NONE       # changed only by _move (the transition table of pyrep.replication_state)
        self._ctl = threading.RLock()
        self._error = None            # message of the first error since start, or None
        self._error_errno = None
        self._backup = None           # the copy-before-write job (secondary, running)
        self._commit = None           # the failover commit job
        self._commit_done = threading.Event()
        self._commit_done.set()
        self._top = None
        self._blocker = None
        self._restore_ro = []         # [(node, read_only)] to restore on stop
        self._stopping = False
        self._active = self._hidden = self._secondary = None
        self._closing = False
        self._stats = {"forward_errors": 0, "bytes_copied_before_write": 0, "checkpoints": 0,
                       "checkpoint_durations": [], "failover_time": None, "failover_started": None}
        self.file = self.node.open_child(opts, "file", role="file")
        # the primary's writes while RUNNING: forwarded and counted in C (see the stage setter)
        self._fwd = Forwarder(self.file, self._forward_failed)
        _registry.register(self)

    def close(self):
        if not hasattr(self, "_ctl"):
            return              # open() failed before the state existed
        self._closing = True
        try:
            with self._ctl:
                if self.stage == RUNNING:
                    if self.mode == "secondary":
                        self._stop_backup()
                        self._release(restore=True)
                    self._move(Event.STOP)
                elif self.stage == FAILOVER:
                    job = self._commit
                    if job is not None:
                        try:
                            job.cancel(sync=True)
                        except Exception:  # noqa: BLE001 - closing: nothing may stay behind
                            pass
                    self._release(restore=False)
                    self._commit_done.set()
                else:
                    self._release(restore=False)
        finally:
            _registry.unregister(self)

    def child_perm(self, role, perm, shared):
        perm = PERM_CONSISTENT_READ
        if not self.node.read_only and not self.node.inactive:
            perm |= PERM_WRITE
        return perm, _SHARED

    def getlength(self):
        return self.node.file.length

    def reopen_prepare(self, read_only):
        pass

    # ------------------------------------------------------------ naming
    @property
    def name(self):
        return self.node.name

    def _who(self):
        return f"replication '{self.node.name}' ({self.mode})"

    def _eio(self, what):
        return BlockError(errno.EIO, f"{self._who()}: {what} refused in stage {self.stage}" +
                          (": the primary side never serves reads" if what == "read" and self.mode == "primary"
                           else ""))

    # ------------------------------------------------------------ I/O
    def preadv(self, offset, length, iov):
        if self.mode == "primary" or self.stage == NONE:
            raise self._eio("read")
        return self.node.children["file"].preadv(offset, length, iov)

    def pwritev(self, offset, length, iov, flags=0):
        stage = self.stage
        if self.mode == "primary":
            if stage != RUNNING:
                raise self._eio("write")
            return self._fwd(offset, length, iov, flags)
        if stage == NONE:
            raise self._eio("write")
        if stage == FAILOVER_FAILED:
            return self._split_write(offset, length,
                                     lambda n, off, ln, done: n.pwritev(off, ln, iov.slice(done, ln), flags))
        return self.node.children["file"].pwritev(offset, length, iov, flags)

    def pwritev_batch_start(self, reqs):
        if self.mode != "primary" or self.stage != RUNNING:
            return pwritev_each(self.pwritev, reqs).copy
        # forwarded together (one message to the secondary over NBD); as for one write, a forwarding
        # error is recorded for get_error and never fails the guest's write
        done = self.file.node.pwritev_batch_start(reqs)

        def finish():
            fwd = self._fwd
            for (offset, length, _, _), err in zip(reqs, done()):
                if err is None:
                    fwd.count(length)
                elif isinstance(err, BlockError):
                    self._forward_failed("write", offset, length, err)
                else:
                    raise err
            return [None] * len(reqs)
        return finish

    def pwrite_zeroes(self, offset, length, flags=0):
        stage = self.stage
        if self.mode == "primary":
            if stage != RUNNING:
                raise self._eio("write")
            return self._forward("zero", offset, length,
                                 lambda: self.node.children["file"].pwrite_zeroes(offset, length, flags))
        if stage == NONE:
            raise self._eio("write")
        if stage == FAILOVER_FAILED:
            return self._split_write(offset, length, lambda n, off, ln, done: n.pwrite_zeroes(off, ln, flags))
        return self.node.children["file"].pwrite_zeroes(offset, length, flags)

    def pdiscard(self, offset, length):
        # as QEMU's filter: discards are not passed on (the disks must stay identical)
        return None

    def flush(self):
        if self.mode == "primary":
            if self.stage == RUNNING:
                self._forward("flush", 0, 0, lambda: self.node.children["file"].flush())
            return None
        child = self.node.children.get("file")
        if child is not None:
            child.flush()

    def truncate(self, length):
        raise BlockError(errno.ENOTSUP, f"{self._who()}: resize is not supported")

    def _forward(self, op, offset, length, fn):
        """Run ``fn`` (a forwarded request); an error is recorded for get_error, never raised."""
        try:
            fn()
        except BlockError as e:
            self._forward_failed(op, offset, length, e)
            return None
        if length:
            self._fwd.count(length)
        return None

    def _forward_failed(self, op, offset, length, e):
        self._stats["forward_errors"] += 1
        self._set_error(f"forwarding a {op} at {offset} (+{length}) to '{self.node.file.name}' failed: {e}",
                        e.errno)

    @property
    def stage(self):
        """The current :class:`~pyrep.replication_state.Stage`."""
        return self._stage

    @property
    def promoted(self):
        """True once a failover started (stage failover or done): start, checkpoint and stop are ignored."""
        return TRANSITIONS.get((self._stage, Event.START)) is IGNORED

    def _allowed(self, event):
        """The stage ``event`` leads to now (IGNORED: a promoted node ignores it); ReplicationError if the
        table refuses it. Nothing changes."""
        return next_stage(self._who(), self._stage, event)

    def _move(self, event):
        """Apply ``event``: the one place the stage changes. Returns False if the event is ignored."""
        value = next_stage(self._who(), self._stage, event)
        if value is IGNORED:
            return False
        self._stage = value
        if self.mode == "primary":
            # RUNNING: the node layer calls the C forwarder directly; otherwise pwritev refuses
            if value == RUNNING:
                self.pwritev = self._fwd
            else:
                self.__dict__.pop("pwritev", None)
            self.node.driver_ops_changed()
        return True

    @property
    def backup_job(self):
        """The copy-before-write backup job of a running secondary, else None."""
        return self._backup

    @property
    def stats(self):
        """Counters of this node's replication: what was forwarded, copied, checkpointed, failed over."""
        return dict(self._stats, bytes_forwarded=self._fwd.bytes, writes_forwarded=self._fwd.writes)

    def _split_write(self, offset, length, write):
        """Failover failed: write to active where active/hidden hold the range, else to the secondary disk."""
        from pyrep.node import is_allocated_above
        active = self.node.file
        secondary = self._secondary
        pos, end = offset, offset + length
        while pos < end:
            allocated, n = is_allocated_above(active, secondary, pos, end - pos)
            n = max(1, min(n, end - pos))
            write(active if allocated else secondary, pos, n, pos - offset)
            pos += n

    # ------------------------------------------------------------ errors
    def _set_error(self, message, err=errno.EIO):
        if self._error is None:
            self._error = message
            self._error_errno = err

    def current_error(self):
        """The error message replication would report now, or None."""
        if self._error is not None:
            return self._error
        job = self._backup
        if self.mode == "secondary" and self.stage == RUNNING and job is not None:
            if job.cbw_error is not None:
                return (f"copy-before-write to the hidden disk failed ({job.cbw_failures} write(s) into the "
                        f"secondary disk refused): {job.cbw_error}")
            if job.error is not None:
                return f"copy-before-write (backup job '{job.id}') failed: {job.error}"
            if job.status == "concluded":
                return f"the backup job '{job.id}' ended unexpectedly"
        return None

    def get_error(self):
        """Raise ReplicationError if replication is not started or hit an error."""
        if self.stage == NONE:
            raise ReplicationError(f"{self._who()}: block replication is not running")
        err = self.current_error()
        if err is not None:
            raise ReplicationError(f"{self._who()}: {err}")

    # ------------------------------------------------------------ control
    def start(self, mode):
        """Start in ``mode``; False if ignored (promoted by a failover: continuous replication)."""
        with self._ctl:
            if self._allowed(Event.START) is IGNORED:
                return False
            if mode != self.mode:
                raise ReplicationError(f"{self._who()}: cannot start it in {mode} mode: it is a {self.mode} node")
            if self.mode == "primary":
                self._error = None
                return self._move(Event.START)
            self._start_secondary()
            return True

    def _chain(self):
        """Validate the secondary's graph; return (active, hidden, secondary, top) or raise."""
        from pyrep.backend import BlockBackend
        from pyrep.graph import is_root, lookup
        from pyrep.node import reaches
        who = self._who()
        active = self.node.file
        if active is None or active.backing is None:
            raise ReplicationError(f"{who}: the active disk '{active.name if active else None}' has no backing "
                                   f"(expected active -> hidden -> secondary disk)")
        hidden = active.backing
        if hidden.backing is None:
            raise ReplicationError(f"{who}: the hidden disk '{hidden.name}' has no backing (it must be the "
                                   f"secondary disk)")
        secondary = hidden.backing
        if not any(isinstance(c.parent, BlockBackend) for c in secondary.parents):
            raise ReplicationError(f"{who}: the secondary disk '{secondary.name}' has no backend (open one on it "
                                   f"with pyrep.open_backend('{secondary.name}', share_rw=True))")
        self._check_failover_can_write(secondary, hidden)
        la, lh, ls = active.length, hidden.length, secondary.length
        if not la == lh == ls:
            raise ReplicationError(f"{who}: the active disk '{active.name}' ({la} bytes), hidden disk "
                                   f"'{hidden.name}' ({lh} bytes) and secondary disk '{secondary.name}' "
                                   f"({ls} bytes) must have the same length")
        for what, n in (("active", active), ("hidden", hidden)):
            if not n.drv.implements("make_empty"):
                raise ReplicationError(f"{who}: the {what} disk '{n.name}' (driver {n.drv.format_name}) does not "
                                       f"support make_empty (use a memory or qcow2 overlay)")
        try:
            top = lookup(self.top_id)
        except OptionError:
            raise ReplicationError(f"{who}: top-id '{self.top_id}' names no node or backend") from None
        if not is_root(top):
            parents = ", ".join(c.user for c in top.parents)
            raise ReplicationError(f"{who}: top-id '{self.top_id}' (node '{top.name}') is not a root node: it is "
                                   f"used by {parents}")
        if top is not self.node and not reaches(top, self.node):
            raise ReplicationError(f"{who}: top-id '{self.top_id}' (node '{top.name}') does not contain this "
                                   f"replication node")
        return active, hidden, secondary, top

    def _check_failover_can_write(self, secondary, hidden):
        """Refuse now what would make the failover fail later: the failover commit writes the secondary
        disk, so every other user of it must share writes (a backend opened with share_rw, a writable
        export)."""
        from pyrep.constants import perm_names
        from pyrep.jobs.commit import BASE_PERM
        for c in secondary.parents:
            if c.parent is hidden:
                continue
            missing = BASE_PERM & ~c.shared
            if missing:
                raise ReplicationError(
                    f"{self._who()}: {c.user} does not share '{perm_names(missing)}' on the secondary disk "
                    f"'{secondary.name}': a failover commits the active and hidden disks into that disk, which "
                    f"needs it (open the backend with share_rw=True, export it writable)")

    def _start_secondary(self):
        from pyrep.graph import reopen_multiple
        import pyrep.jobs as jobs
        active, hidden, secondary, top = self._chain()
        who = self._who()
        restore = [(n, n.read_only) for n in (hidden, secondary) if n.read_only]
        if restore:
            try:
                reopen_multiple([(n, False) for n, _ in restore])
            except Exception as e:
                raise ReplicationError(f"{who}: cannot reopen the hidden and secondary disks read-write: {e}") from e
        blocker = f"block replication ('{self.node.name}') is running on it"
        top.block_all_ops(blocker, except_ops=("dataplane",))
        self._active, self._hidden, self._secondary = active, hidden, secondary
        self._top, self._blocker, self._restore_ro = top, blocker, restore
        self._stopping = False
        try:
            # break-guest-write: a write into the secondary disk whose old data cannot reach the hidden
            # disk fails, so the secondary's view never changes without its copy (QEMU 7's default)
            self._backup = jobs.backup(secondary, hidden, sync="none", on_error="report",
                                       on_cbw_error="break-guest-write", on_complete=self._backup_concluded)
            # nobody else may end it: without it, writes into the secondary disk would change the view
            self._backup.owner = f"replication '{self.node.name}'"
        except Exception as e:
            self._release(restore=True)
            raise ReplicationError(f"{who}: cannot start the copy-before-write backup job: {e}") from e
        self._move(Event.START)
        self._error = None
        try:
            self._checkpoint()
        except BaseException:
            self._error = None
            self._stop_backup()
            self._release(restore=True)
            self._move(Event.START_FAILED)
            raise

    def _backup_concluded(self, job):
        # runs in the job's thread: no locks here
        if self._backup is job and not self._stopping and self.stage == RUNNING:
            if job.error is not None:
                self._set_error(f"copy-before-write (backup job '{job.id}') failed: {job.error}",
                                getattr(job.error, "errno", errno.EIO) or errno.EIO)
            else:
                self._set_error(f"the backup job '{job.id}' was cancelled unexpectedly")
        self._stats["bytes_copied_before_write"] += getattr(job, "bytes_copied", 0)

    def _stop_backup(self):
        job = self._backup
        self._stopping = True
        if job is not None and job.cbw_error is not None:
            self._set_error(self.current_error(), getattr(job.cbw_error, "errno", errno.EIO) or errno.EIO)
        if job is not None:
            try:
                job.cancel(sync=True, force=True)
            except Exception:  # noqa: BLE001
                pass
        self._backup = None

    def _release(self, restore):
        """Drop the blocker on top and (if ``restore``) put hidden/secondary back read-only."""
        top, blocker = self._top, self._blocker
        if top is not None and blocker is not None:
            top.unblock_all_ops(blocker)
        self._top = self._blocker = None
        if restore and self._restore_ro:
            from pyrep.graph import reopen_multiple
            todo = [(n, ro) for n, ro in self._restore_ro if not n.closed]
            self._restore_ro = []
            if todo:
                try:
                    reopen_multiple(todo)
                except Exception:  # noqa: BLE001 - best effort, as QEMU's cleanup
                    pass

    def _checkpoint(self):
        from pyrep.graph import drained
        who = self._who()
        job = self._backup
        if job is None or job.status == "concluded":
            msg = "the backup job was cancelled unexpectedly" if job is None or job.error is None else \
                f"the backup job failed: {job.error}"
            self._set_error(msg)
            raise ReplicationError(f"{who}: cannot checkpoint: {msg}")
        active, hidden, secondary = self._active, self._hidden, self._secondary
        t0 = time.perf_counter()
        with drained(active, hidden, secondary):
            try:
                job.do_checkpoint(drain=False)
            except Exception as e:
                self._set_error(f"checkpoint of the backup job failed: {e}")
                raise ReplicationError(f"{who}: checkpoint of the backup job failed: {e}") from e
            for what, n in (("active", active), ("hidden", hidden)):
                try:
                    n.make_empty()
                except Exception as e:
                    self._set_error(f"cannot make the {what} disk '{n.name}' empty: {e}",
                                    getattr(e, "errno", errno.EIO) or errno.EIO)
                    raise ReplicationError(f"{who}: cannot make the {what} disk '{n.name}' empty: {e}") from e
        dt = time.perf_counter() - t0
        self._stats["checkpoints"] += 1
        self._stats["checkpoint_durations"].append(dt)
        return dt

    def do_checkpoint(self):
        with self._ctl:
            if self._allowed(Event.CHECKPOINT) is IGNORED or self.mode == "primary":
                return None       # promoted: ignored; a primary has nothing to drop
            return self._checkpoint()

    def stop(self, failover):
        """Stop (a secondary with ``failover``: commit active and hidden into the secondary disk);
        False if ignored (promoted by a failover)."""
        with self._ctl:
            event = Event.FAILOVER if failover and self.mode == "secondary" else Event.STOP
            if self._allowed(event) is IGNORED:
                return False
            if self.mode == "primary":
                self._error = None
                return self._move(Event.STOP)
            if not failover:
                try:
                    if self.current_error() is None:
                        self._checkpoint()
                finally:
                    self._stop_backup()
                    self._release(restore=True)
                    self._move(Event.STOP)
                return True
            self._start_failover()
            return True

    def _start_failover(self):
        import pyrep.jobs as jobs
        who = self._who()
        self._move(Event.FAILOVER)
        self._stats["failover_started"] = time.perf_counter()
        self._stop_backup()
        self._release(restore=False)    # hidden and secondary stay writable: the commit writes them
        self._commit_done.clear()
        if not hasattr(jobs, "commit"):
            self._failover_failed("the commit job is not available (pyrep.jobs.commit)")
            raise ReplicationError(f"{who}: failover failed: pyrep.jobs.commit is not available")
        try:
            self._commit = jobs.commit(self._active, base=self._secondary, on_error="report",
                                       on_complete=self._commit_concluded)
        except Exception as e:
            self._failover_failed(f"cannot start the failover commit: {e}")
            raise ReplicationError(f"{who}: failover failed: cannot start the commit job: {e}") from e

    def _failover_failed(self, message):
        self._move(Event.COMMIT_FAILED)
        self._error = None
        self._set_error(f"failover failed: {message}")
        self._commit_done.set()

    def _commit_concluded(self, job):
        # runs in the job's thread
        t = self.stats.get("failover_started")
        if t is not None:
            self._stats["failover_time"] = time.perf_counter() - t
        if job.error is None and not getattr(job, "cancelled", False):
            self._move(Event.COMMIT_DONE)
            self._error = None
            self._active = self._hidden = None
            self._commit_done.set()
        elif job.error is None:
            self._failover_failed(f"the commit job '{job.id}' was cancelled")
        else:
            self._failover_failed(f"the commit job '{job.id}' failed: {job.error}")
        self._commit = None

    def wait_failover(self, timeout=None):
        """Wait until a failover commit ended; True if it did within ``timeout``."""
        return self._commit_done.wait(timeout)

    def status(self):
        return {"node": self.node.name, "mode": self.mode, "stage": self.stage.value,
                "error": self.current_error() if self.stage != NONE else None}
