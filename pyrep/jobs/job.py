"""The job base class and the registry of running jobs (QEMU's Job/BlockJob).

A job runs in its own background thread and advances in chunks. Between
chunks it passes a *pause point*: there it stops while the user paused it
(:meth:`Job.pause`) or someone drained a node it uses
(:meth:`Job.drained_begin`, called by :func:`pyrep.drained` because the job
is a parent of its nodes through :class:`~pyrep.node.Child` edges), and there
a cancel takes effect.

Life cycle (``job.status``, a :class:`JobStatus`), drawn from :data:`TRANSITIONS`::

    created -> running [-> ready] -> concluded        (success or error)
                  |  ^
           pause()|  |resume()   (also: on_error="stop" pauses on an I/O error)
                  v  |
                 paused
    cancel(): created/running/paused/ready -> aborting -> concluded

Every status change goes through :meth:`Job.transition`, which looks the
move up in :data:`TRANSITIONS` (QEMU's job status table) and refuses an
illegal one with :class:`JobStatusError` naming the job, the status and the
event.

A concluded job has ``error`` (None on success and on cancel, else the
exception) and ``cancelled``. Completion callbacks ``fn(job)`` run once, in
the job's thread, after the status became ``concluded``; a callback added
later runs at once in the caller's thread. Concluded jobs leave the
registry (QEMU's auto-dismiss), so a job id can be reused.

Error policies (``on_error``), applied to errors of the job's own I/O:

- ``"report"``: the job ends; ``job.error`` is the error;
- ``"ignore"``: the error is counted (``job.errors_ignored``, ``job.last_error``) and the job goes on
  (commit/mirror retry the range later; backup's copy-before-write skips the cluster);
- ``"stop"``: the job pauses with ``job.io_error`` set; :meth:`Job.resume` retries.
"""
import enum
import itertools
import threading
import time
import warnings

from ..blockstatus import allocation_extents
from ..errors import BlockError, Error, OptionError
from ..graph import lookup
from ..node import Child, Node

__all__ = ["Job", "JobStatus", "JobStatusError", "TRANSITIONS", "Cancelled", "list_jobs", "get", "wait_all", "cancel_all", "ERROR_POLICIES", "add_status_listener",
           "remove_status_listener", "add_error_listener", "remove_error_listener"]

ERROR_POLICIES = ("report", "ignore", "stop")


class JobStatus(str, enum.Enum):
    """A job's status. A ``str``: it compares equal to (and prints as) its lower-case name."""
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    ABORTING = "aborting"
    CONCLUDED = "concluded"

    def __str__(self):
        return self.value

    __format__ = str.__format__


STATUSES = tuple(s.value for s in JobStatus)

_C, _R, _P, _Y, _A, _D = (JobStatus.CREATED, JobStatus.RUNNING, JobStatus.PAUSED, JobStatus.READY,
                          JobStatus.ABORTING, JobStatus.CONCLUDED)

#: event -> {status: next status}; a frozenset of statuses where the caller picks (resume goes back to
#: whichever of running/ready the job had before the pause). A move to the status the job already has
#: is a no-op. Anything not listed is an illegal move (:class:`JobStatusError`).
TRANSITIONS = {
    "start": {_C: _R},
    "pause": {_C: _P, _R: _P, _Y: _P},
    "resume": {_P: frozenset((_R, _Y))},
    "ready": {_R: _Y},
    "cancel": {_C: _A, _R: _A, _P: _A, _Y: _A, _A: _A},
    "conclude": {_R: _D, _P: _D, _Y: _D, _A: _D},
}


class JobStatusError(Error, RuntimeError):
    """An illegal status move: a bug in the job machinery or a subclass, never a user error."""

_lock = threading.RLock()
_jobs = {}                 # id -> Job, while not concluded
_ids = itertools.count()


_status_listeners = []     # fn(job, old, new), called on every status change (a monitor's events)


def add_status_listener(fn):
    """Call ``fn(job, old_status, new_status)`` on every status change of every job (a job is
    ``created`` from its construction; the first change told is its start). It runs in whichever thread moved the job, with the job's lock held:
    it must return quickly and must not call back into the job (queue the news instead)."""
    global _status_listeners
    _status_listeners = _status_listeners + [fn]


def remove_status_listener(fn):
    global _status_listeners
    _status_listeners = [f for f in _status_listeners if f is not fn]


def _tell(job, old, new):
    for fn in _status_listeners:
        try:
            fn(job, old, new)
        except Exception as e:  # a listener must not break the job machinery
            warnings.warn(f"{job.describe()}: status listener {fn!r} raised {e!r}", RuntimeWarning)


_error_listeners = []      # fn(job, error, action): an I/O error met the job's policy (QMP's BLOCK_JOB_ERROR)


def add_error_listener(fn):
    """Call ``fn(job, error, action)`` when an I/O error of a job's own copy meets its ``on_error``
    policy, before the policy acts (``action``: "report", "ignore" or "stop"). Same rules as a
    status listener: quick, in the job's thread, no calls back into the job."""
    global _error_listeners
    _error_listeners = _error_listeners + [fn]


def remove_error_listener(fn):
    global _error_listeners
    _error_listeners = [f for f in _error_listeners if f is not fn]


def _tell_error(job, error, action):
    for fn in _error_listeners:
        try:
            fn(job, error, action)
        except Exception as e:  # noqa: BLE001 - a listener must not break the job machinery
            warnings.warn(f"{job.describe()}: error listener {fn!r} raised {e!r}", RuntimeWarning)


class Cancelled(Exception):
    """Raised at a pause point when the job was cancelled; a job's ``run`` may raise it too, to end
    the same way (the job concludes as cancelled)."""


class Job:
    """Base of every job. Subclasses implement :meth:`run` (in the job thread) and :meth:`cleanup`."""

    type = "job"
    # who made this job for its own use ("replication 'rep'", QEMU's internal jobs): only the owner ends
    # it (cancel(force=True)); a user's cancel is refused, as ending it would break the owner's guarantees
    owner = None

    def __init__(self, job_id=None, on_error="report", on_complete=None):
        if on_error not in ERROR_POLICIES:
            raise OptionError(f"{self.type}: on_error must be one of {', '.join(ERROR_POLICIES)}, got {on_error!r}")
        self.on_error = on_error
        self._cond = threading.Condition(threading.RLock())
        self._status = JobStatus.CREATED
        self.error = None          # the error that ended the job (None: success or cancel)
        self.io_error = None       # the error that paused the job (on_error="stop"), cleared by resume()
        self.last_error = None     # the last ignored error (on_error="ignore")
        self.errors_ignored = 0
        self.cancelled = False
        self._cancel = False
        self._user_paused = False
        self._status_before_pause = None
        self._drain = 0
        self._busy = False          # the job thread is between two pause points
        self._done = threading.Event()
        self._callbacks = []
        self._children = []         # Child edges the job holds
        self._blocked = []          # (node, op, reason)
        self._current = 0
        self._total = 0
        self._thread = None
        if on_complete is not None:
            self._callbacks.append(on_complete)
        with _lock:
            if job_id is None:
                job_id = f"{self.type}{next(_ids)}"
                while job_id in _jobs:
                    job_id = f"{self.type}{next(_ids)}"
            elif not isinstance(job_id, str) or not job_id:
                raise OptionError(f"{self.type}: job_id must be a non-empty string, got {job_id!r}")
            elif job_id in _jobs:
                raise OptionError(f"{self.type}: a job with id '{job_id}' already exists "
                                  f"(status {_jobs[job_id].status})")
            self.id = job_id
            _jobs[job_id] = self       # reserve the id; start() or abandon() follows

    @property
    def status(self):
        """The :class:`JobStatus`; changed only by :meth:`transition`."""
        return self._status

    def transition(self, event, to=None):
        """Move the status as ``event`` says in :data:`TRANSITIONS` (``to`` picks the target where the
        table allows several); raise :class:`JobStatusError` naming the job, status and event if the
        table has no such move. Every change is told to the status listeners. Call with ``_cond`` held."""
        old = self._status
        to = JobStatus(to) if to is not None else None
        target = TRANSITIONS.get(event, {}).get(old)
        if isinstance(target, frozenset):
            if to not in target:
                raise JobStatusError(f"{self.describe()}: event '{event}' in status '{old}' cannot lead to "
                                     f"'{to}' (allowed: {', '.join(sorted(t.value for t in target))})")
        elif target is None or (to is not None and to != target):
            raise JobStatusError(f"{self.describe()}: event '{event}' is not allowed in status '{old}'")
        else:
            to = target
        new = JobStatus(to)
        if new != old:
            self._status = new
            _tell(self, old, new)

    # ------------------------------------------------------------ identity
    def describe(self):
        return f"{self.type} job '{self.id}'"

    def __repr__(self):
        return f"<{type(self).__name__} {self.id} {self.status}>"

    @property
    def progress(self):
        """``(current, total)`` in bytes."""
        with self._cond:
            return self._current, self._total

    @property
    def done(self):
        return self._done.is_set()

    # ------------------------------------------------------------ graph helpers
    def _take(self, node, role, perm, shared):
        """Hold an edge to ``node`` (a parent edge like a backend's); raises PermissionConflict."""
        child = Child(self, node, role, perm, shared)
        node.add_parent(child, perm, shared)
        self._children.append(child)
        return child

    def _block(self, node, op):
        reason = f"{self.type} job '{self.id}'"
        node.block_op(op, reason)
        self._blocked.append((node, op, reason))

    def _release_graph(self):
        """Drop every edge and blocker the job holds (the nodes stay open)."""
        for node, op, reason in self._blocked:
            node.unblock_op(op, reason)
        self._blocked = []
        for child in self._children:
            if child.node is not None:
                child.node.remove_parent(child)
        self._children = []

    # ------------------------------------------------------------ life cycle
    def start(self):
        with self._cond:
            if self.status != JobStatus.CREATED:
                raise OptionError(f"{self.describe()} was already started")
            self.transition("start")
        self._thread = threading.Thread(target=self._main, name=f"pyrep-job-{self.id}", daemon=True)
        self._thread.start()
        return self

    def abandon(self):
        """Forget a job whose setup failed before start()."""
        self._release_graph()
        with _lock:
            if _jobs.get(self.id) is self:
                del _jobs[self.id]

    def run(self):
        """The job's work, in the job thread; call :meth:`pause_point` between chunks."""

    def cleanup(self):
        """Undo what the job installed (notifiers, edges); runs in the job thread after run()."""
        self._release_graph()

    def _main(self):
        try:
            self.run()
        except Cancelled:
            pass
        except BaseException as e:       # noqa: B902 - the job records every failure
            if self.error is None:
                self.error = e
        finally:
            try:
                self.cleanup()
            except BaseException as e:   # noqa: B902
                if self.error is None:
                    self.error = e
            self._conclude()

    def _conclude(self):
        with self._cond:
            if self._cancel and self.error is None:
                self.cancelled = True
            self.transition("conclude")
            self._busy = False
            self._cond.notify_all()
            callbacks, self._callbacks = self._callbacks, None
        with _lock:
            if _jobs.get(self.id) is self:
                del _jobs[self.id]
        self._done.set()
        for fn in callbacks:
            self._call(fn)

    def _call(self, fn):
        try:
            fn(self)
        except Exception as e:  # a callback must not kill the job machinery
            warnings.warn(f"{self.describe()}: completion callback {fn!r} raised {e!r}", RuntimeWarning)

    def add_callback(self, fn):
        """Call ``fn(job)`` when the job concludes (at once if it already has)."""
        with self._cond:
            if self._callbacks is not None:
                self._callbacks.append(fn)
                return
        self._call(fn)

    # ------------------------------------------------------------ control
    def mark_allocated(self, bitmap, lock, allocated):
        """Set in ``bitmap`` every range for which ``allocated(pos, n)`` → ``(True, pnum)``,
        scanning the job's length with pause points between extents."""
        self.pause_point()
        for pos, n, alloc in allocation_extents(allocated, 0, self.length):
            if alloc:
                with lock:
                    bitmap.set(pos, n)
            self.pause_point()

    def pause_point(self):
        """Called by the job thread between chunks: stop while paused or drained; raise on cancel."""
        with self._cond:
            self._busy = False
            self._cond.notify_all()
            while (self._user_paused or self._drain) and not self._cancel:
                self._cond.wait()
            if self._cancel:
                raise Cancelled()
            self._busy = True

    def sleep(self, seconds):
        """Wait up to ``seconds`` at a pause point (woken early by cancel, resume or :meth:`_kick`)."""
        with self._cond:
            self._busy = False
            self._cond.notify_all()
            if not self._cancel:
                self._cond.wait(seconds)
        self.pause_point()

    def _kick(self):
        with self._cond:
            self._cond.notify_all()

    def pause(self):
        """Ask the job to stop at its next pause point (status ``paused``)."""
        with self._cond:
            if self.status in (JobStatus.CONCLUDED, JobStatus.ABORTING):
                return
            if not self._user_paused:
                self._user_paused = True
                if self.status in (JobStatus.RUNNING, JobStatus.READY, JobStatus.CREATED):
                    self._status_before_pause = JobStatus.READY if self.status == JobStatus.READY else JobStatus.RUNNING
                    self.transition("pause")
            self._cond.notify_all()

    def resume(self):
        """Undo :meth:`pause` (and clear ``io_error``, so a stopped job retries)."""
        with self._cond:
            self.io_error = None
            if self._user_paused:
                self._user_paused = False
                if self.status == JobStatus.PAUSED:
                    self.transition("resume", self._status_before_pause or JobStatus.RUNNING)
            self._cond.notify_all()

    @property
    def paused(self):
        """True if the job thread is stopped at a pause point because of pause() or a drain."""
        with self._cond:
            return (self._user_paused or self._drain > 0) and not self._busy and not self._done.is_set()

    def cancel(self, sync=False, force=False):
        """Stop the job; ``sync=True`` waits until it concluded. A cancelled job has
        ``cancelled == True`` and ``error is None`` (for mirror after ``ready`` the graph is unchanged).
        A job with an ``owner`` is cancelled only with ``force`` (by its owner, or when everything closes)."""
        if self.owner is not None and not force:
            raise OptionError(f"{self.describe()} belongs to {self.owner} and ends with it: stop that instead")
        with self._cond:
            if self.status == JobStatus.CONCLUDED:
                return
            self._cancel = True
            # created, or paused before start() (which then refuses): no job thread will ever conclude it
            unstarted = self._thread is None and self.status in (JobStatus.CREATED, JobStatus.PAUSED)
            self.transition("cancel")
            self._cond.notify_all()
        if unstarted:                   # run() never ran: only the edges taken at setup to give back
            self._release_graph()
            self._conclude()
            return
        self._on_cancel()
        if sync and threading.current_thread() is not self._thread:
            self.wait()

    def _on_cancel(self):
        """Hook: wake whatever the job thread waits on."""

    def wait(self, timeout=None):
        """Wait until the job concluded; True if it did, False on timeout. Never raises the
        job's error: check ``job.error`` (and ``job.cancelled``)."""
        if self._thread is None and self.status == "created":
            return False
        return self._done.wait(timeout)

    # ------------------------------------------------------------ drain
    def drained_begin(self):
        """Stop at the next pause point; returns once the job thread is there (or not running)."""
        with self._cond:
            self._drain += 1
            if threading.current_thread() is self._thread:
                return
            while self._busy and not self._done.is_set():
                self._cond.wait()

    def drained_end(self):
        with self._cond:
            self._drain -= 1
            self._cond.notify_all()

    # ------------------------------------------------------------ errors
    def _handle_error(self, e):
        """Apply the policy to an error of the job's own I/O (job thread). Returns normally for
        "ignore" and "stop" (after a resume) so the caller retries or skips; raises for "report"."""
        if not isinstance(e, BlockError):
            raise e
        _tell_error(self, e, self.on_error)
        if self.on_error == "report":
            raise e
        if self.on_error == "ignore":
            with self._cond:
                self.errors_ignored += 1
                self.last_error = e
            self.sleep(0.01)        # do not spin on a persistent error
            return
        with self._cond:            # stop
            self.io_error = e
        self.pause()
        self.pause_point()


# ---------------------------------------------------------------- registry

def list_jobs():
    """Every job not yet concluded."""
    with _lock:
        return [j for j in _jobs.values() if j.status != "concluded"]


def get(job_id):
    """The running job ``job_id``; OptionError if there is none."""
    with _lock:
        job = _jobs.get(job_id)
    if job is None:
        raise OptionError(f"no job with id '{job_id}'" +
                          (f" (running: {', '.join(sorted(_jobs))})" if _jobs else ""))
    return job


def wait_all(timeout=None):
    """Wait until every job concluded; True if all did within ``timeout``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for job in list_jobs():
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not job.wait(left):
            return False
    return True


def cancel_all():
    """Cancel every job and wait for them (used by :func:`pyrep.close_all`)."""
    jobs = list_jobs()
    for job in jobs:
        job.cancel(force=True)
    for job in jobs:
        job.wait(30)


# ---------------------------------------------------------------- I/O helpers

def resolve_node(value, what):
    """A Node from a Node or a node/backend name."""
    if isinstance(value, Node):
        if value.closed:
            raise OptionError(f"{what}: node '{value.name}' is closed")
        return value
    if isinstance(value, str):
        try:
            return lookup(value)
        except OptionError as e:
            raise OptionError(f"{what}: {e}") from None
    raise OptionError(f"{what}: expected a Node or a node name, got {value!r}")


def resolve_pair(kind, source, target):
    """A copy job's source and target nodes, resolved and checked (distinct, target writable and
    at least as long as the source)."""
    source = resolve_node(source, f"{kind} source")
    target = resolve_node(target, f"{kind} target")
    if source is target:
        raise OptionError(f"{kind}: source and target are the same node '{source.name}'")
    if target.read_only:
        raise OptionError(f"{kind}: target node '{target.name}' is read-only (reopen it read-write first)")
    if target.length < source.length:
        raise OptionError(f"{kind}: target node '{target.name}' ({target.length} bytes) is smaller than "
                          f"source node '{source.name}' ({source.length} bytes)")
    return source, target


def move_parents(old, new, keep=()):
    """Point every parent of ``old`` at ``new`` (all or nothing); see Node.replace."""
    return old.replace(new, keep)