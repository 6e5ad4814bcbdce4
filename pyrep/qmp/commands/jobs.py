"""Block jobs: blockdev-backup, blockdev-mirror, query-jobs, query-block-jobs, job-* and block-job-*.

The monitor shows the jobs its commands started (QEMU's internal jobs, such
as replication's, stay hidden). :class:`JobEvents` turns pyrep's job status
changes into QEMU's events::

    created -> running [-> ready] [-> paused ...]        JOB_STATUS_CHANGE each, BLOCK_JOB_READY
    success:  waiting, pending, BLOCK_JOB_COMPLETED, concluded
    error:    BLOCK_JOB_ERROR (action report), pending, BLOCK_JOB_COMPLETED with error, concluded
    cancel:   aborting, BLOCK_JOB_CANCELLED, concluded
    then null (auto-dismiss, or job-dismiss)

Every I/O error that meets a job's policy sends BLOCK_JOB_ERROR with the
action taken (``report``, ``ignore``, ``stop``; before the pause a stop causes). pyrep applies one error policy to a job, so
``on-source-error`` and ``on-target-error`` must agree when both are given.
"""
import threading

from ...errors import OptionError
from ...jobs import backup, mirror
from ...jobs import job as jobmod
from ...options import Opt
from ..registry import ArgError, CommandTable, QMPError

TABLE = CommandTable()

_ON_ERROR = ("report", "ignore", "enospc", "stop", "auto")
_POLICY = {"report": "report", "ignore": "ignore", "stop": "stop", "enospc": "stop", "auto": "report"}


class _Record:
    __slots__ = ("job", "auto_dismiss", "soft_cancel", "status", "error_told")

    def __init__(self, auto_dismiss):
        self.job, self.auto_dismiss, self.soft_cancel, self.status = None, auto_dismiss, False, "created"
        self.error_told = False


class JobEvents:
    """The jobs a server's monitors started, their QMP status and their events."""

    def __init__(self, server):
        self.server = server
        self._lock = threading.Lock()
        self._records = {}          # job id -> _Record (until dismissed)
        jobmod.add_status_listener(self._on_status)
        jobmod.add_error_listener(self._on_error)

    def close(self):
        jobmod.remove_status_listener(self._on_status)
        jobmod.remove_error_listener(self._on_error)

    def expect(self, job_id, auto_dismiss):
        """Reserve ``job_id`` for a job about to start (its first change is told before it is returned)."""
        with self._lock:
            rec = self._records.get(job_id)
            if rec is not None:
                raise QMPError(f"Job ID '{job_id}' already in use")
            self._records[job_id] = _Record(auto_dismiss)

    def started(self, job_id, job):
        with self._lock:
            rec = self._records.get(job_id)
            if rec is not None:
                rec.job = job

    def forget(self, job_id):
        with self._lock:
            rec = self._records.get(job_id)
            if rec is not None and rec.job is None:
                del self._records[job_id]

    def record(self, job_id):
        with self._lock:
            rec = self._records.get(job_id)
        if rec is None:
            raise QMPError("Job not found")
        return rec

    def records(self):
        with self._lock:
            return dict(self._records)

    def dismiss(self, job_id):
        rec = self.record(job_id)
        if rec.status != "concluded":
            raise QMPError(f"Job '{job_id}' in state '{rec.status}' cannot accept command verb 'dismiss'")
        with self._lock:
            self._records.pop(job_id, None)
        self._status(job_id, "null")

    # ------------------------------------------------------------ events
    def _status(self, job_id, status):
        self.server.emit("JOB_STATUS_CHANGE", {"id": job_id, "status": status})

    def _on_error(self, job, error, action):
        with self._lock:
            rec = self._records.get(job.id)
        if rec is None:
            return
        rec.error_told = True
        self.server.emit("BLOCK_JOB_ERROR", {"device": job.id, "operation": _operation(error), "action": action})

    def _on_status(self, job, old, new):
        with self._lock:
            rec = self._records.get(job.id)
        if rec is None:
            return
        if rec.job is None:
            rec.job = job
        if new == "running" and old == "created":
            self._status(job.id, "created")
        if new != "concluded":
            rec.status = new
            self._status(job.id, new)
            if new == "ready":
                self.server.emit("BLOCK_JOB_READY", self._block_data(job))
            return
        data = self._block_data(job)
        if job.cancelled and not rec.soft_cancel:
            self.server.emit("BLOCK_JOB_CANCELLED", data)
        else:
            if job.error is not None:
                if not rec.error_told:      # an error that did not pass the job's policy (a setup failure)
                    self.server.emit("BLOCK_JOB_ERROR", {"device": job.id, "operation": _operation(job.error),
                                                         "action": "report"})
                data["error"] = str(job.error)
            else:
                self._status(job.id, "waiting")
            self._status(job.id, "pending")
            self.server.emit("BLOCK_JOB_COMPLETED", data)
        rec.status = "concluded"
        self._status(job.id, "concluded")
        if rec.auto_dismiss:
            with self._lock:
                self._records.pop(job.id, None)
            self._status(job.id, "null")

    @staticmethod
    def _block_data(job):
        current, total = job.progress
        return {"type": job.type, "device": job.id, "len": total, "offset": current, "speed": 0}


def _operation(error):
    return "read" if "read" in str(error).lower() else "write"


def events(session):
    """The server's JobEvents (made on first use)."""
    server = session.state
    if server.jobs is None:
        server.jobs = JobEvents(server)
    return server.jobs


def _policy(args):
    src, tgt = args.get("on-source-error"), args.get("on-target-error")
    if src is not None and tgt is not None and _POLICY[src] != _POLICY[tgt]:
        raise ArgError(f"on-source-error={src} and on-target-error={tgt}: pyrep applies one error policy "
                       f"to a job, give one or make them agree")
    return _POLICY[tgt or src or "report"]


def _refuse(args, name, allowed, why):
    if name in args and args[name] not in allowed:
        raise ArgError(f"Parameter '{name}' does not accept value '{args[name]}' here: {why}")


def _start(session, args, make):
    job_id = args.get("job-id", args["device"])
    if not job_id:
        raise QMPError("Invalid job ID ''")
    _refuse(args, "auto-finalize", (True,), "jobs finalize on their own in pyrep")
    if args.get("filter-node-name"):
        raise ArgError("Parameter 'filter-node-name' is not supported by pyrep")
    ev = events(session)
    ev.expect(job_id, args.get("auto-dismiss", True))
    try:
        job = make(job_id, _policy(args))
    except BaseException:
        ev.forget(job_id)
        raise
    ev.started(job_id, job)


_COPY_ARGS = (Opt("job-id", "string"), Opt("device", "string", required=True),
              Opt("target", "string", required=True), Opt("speed", "number", min=0),
              Opt("on-source-error", "enum", choices=_ON_ERROR), Opt("on-target-error", "enum", choices=_ON_ERROR),
              Opt("auto-finalize", "bool"), Opt("auto-dismiss", "bool"), Opt("filter-node-name", "string"))


@TABLE.command("blockdev-backup", *_COPY_ARGS,
               Opt("sync", "enum", required=True, choices=("top", "full", "none", "incremental", "bitmap")),
               Opt("compress", "bool"), Opt("bitmap", "string"), Opt("bitmap-mode", "string"),
               Opt("x-perf", "any"), Opt("discard-source", "bool"))
def blockdev_backup(session, args):
    """Copy ``device`` to the node ``target``: sync full/top (a point-in-time copy) or none (copy-before-write)."""
    _refuse(args, "sync", ("top", "full", "none"), "pyrep's backup supports sync full, top and none")
    _refuse(args, "compress", (False,), "pyrep's backup does not compress")
    for name in ("bitmap", "bitmap-mode", "discard-source"):
        if args.get(name):
            raise ArgError(f"Parameter '{name}' is not supported by pyrep")
    _start(session, args, lambda job_id, policy: backup(
        args["device"], args["target"], sync=args["sync"], job_id=job_id, on_error=policy))


@TABLE.command("blockdev-mirror", *_COPY_ARGS,
               Opt("sync", "enum", required=True, choices=("top", "full", "none", "incremental", "bitmap")),
               Opt("replaces", "string"), Opt("granularity", "number", min=512),
               Opt("buf-size", "number", min=0), Opt("copy-mode", "enum", choices=("background", "write-blocking")),
               Opt("unmap", "bool"))
def blockdev_mirror(session, args):
    """Mirror ``device`` to ``target`` (ready once in sync; job-complete pivots, job-cancel leaves it)."""
    _refuse(args, "sync", ("top", "full", "none"), "pyrep's mirror supports sync full, top and none")
    _refuse(args, "copy-mode", ("background",), "pyrep's mirror copies in the background")
    if "replaces" in args and args["replaces"] != args["device"]:
        raise ArgError("Parameter 'replaces' must name the device itself in pyrep")
    _start(session, args, lambda job_id, policy: mirror(
        args["device"], args["target"], sync=args["sync"], job_id=job_id, on_error=policy))


@TABLE.command("query-jobs")
def query_jobs(session, args):
    """QEMU's JobInfo of every job the monitors started and not yet dismissed."""
    out = []
    for job_id, rec in events(session).records().items():
        job = rec.job
        if job is None:
            continue
        current, total = job.progress
        info = {"id": job_id, "type": job.type, "status": rec.status, "current-progress": current,
                "total-progress": total}
        if rec.status == "concluded" and job.error is not None:
            info["error"] = str(job.error)
        out.append(info)
    return out


@TABLE.command("query-block-jobs")
def query_block_jobs(session, args):
    """QEMU's BlockJobInfo of every running job the monitors started."""
    out = []
    for job_id, rec in events(session).records().items():
        job = rec.job
        if job is None or rec.status == "concluded":
            continue
        current, total = job.progress
        out.append({"type": job.type, "device": job_id, "len": total, "offset": current, "speed": 0,
                    "busy": not job.paused, "paused": rec.status == "paused", "io-status": "ok",
                    "ready": rec.status == "ready", "status": rec.status, "auto-finalize": True,
                    "auto-dismiss": rec.auto_dismiss})
    return out


def _running(session, job_id, verb):
    rec = events(session).record(job_id)
    if rec.job is None or rec.status == "concluded":
        raise QMPError(f"Job '{job_id}' in state '{rec.status}' cannot accept command verb '{verb}'")
    return rec


@TABLE.command("job-cancel", Opt("id", "string", required=True))
def job_cancel(session, args):
    """Cancel a job (a ready mirror stops without pivoting)."""
    _running(session, args["id"], "cancel").job.cancel()


@TABLE.command("block-job-cancel", Opt("device", "string", required=True), Opt("force", "bool", default=False))
def block_job_cancel(session, args):
    """Cancel a job; a ready mirror without ``force`` completes without pivoting (BLOCK_JOB_COMPLETED)."""
    rec = _running(session, args["device"], "cancel")
    if rec.status == "ready" and not args["force"]:
        rec.soft_cancel = True
    rec.job.cancel()


@TABLE.command("job-dismiss", Opt("id", "string", required=True))
def job_dismiss(session, args):
    """Forget a concluded job started with auto-dismiss=false."""
    events(session).dismiss(args["id"])


@TABLE.command("block-job-dismiss", Opt("id", "string", required=True))
def block_job_dismiss(session, args):
    """Forget a concluded job started with auto-dismiss=false (the block-job form)."""
    events(session).dismiss(args["id"])


def _complete(session, job_id):
    rec = _running(session, job_id, "complete")
    if not hasattr(rec.job, "complete"):
        raise QMPError(f"Job '{job_id}' of type {rec.job.type} cannot be completed")
    try:
        rec.job.complete()
    except OptionError as e:
        raise QMPError(str(e)) from None


@TABLE.command("job-complete", Opt("id", "string", required=True))
def job_complete(session, args):
    """Pivot a ready mirror to its target."""
    _complete(session, args["id"])


@TABLE.command("block-job-complete", Opt("device", "string", required=True))
def block_job_complete(session, args):
    """Pivot a ready mirror to its target (the block-job form)."""
    _complete(session, args["device"])


@TABLE.command("job-pause", Opt("id", "string", required=True))
def job_pause(session, args):
    """Pause a job at its next pause point."""
    _running(session, args["id"], "pause").job.pause()


@TABLE.command("job-resume", Opt("id", "string", required=True))
def job_resume(session, args):
    """Resume a paused job (a job stopped by an I/O error retries)."""
    _running(session, args["id"], "resume").job.resume()
