"""The replication nodes of this process and their control interface (QEMU's replication.c registry).

Every node of the ``replication`` driver registers here when it opens and
leaves when it closes. The control calls act on all of them:

    start_all(mode)             # the secondary before the primary
    do_checkpoint_all()         # after the rest of the state is in sync
    get_error_all()             # raises ReplicationError when a node has an error
    stop_all(failover, wait=False)
    status()                    # [{"node", "mode", "stage", "error"}]

They behave as QEMU's replication_*_all: each walks every node, and a node
promoted by a failover ignores start, checkpoint and stop in any mode
(continuous replication). As this process may hold both sides (the in-process
deployment), ``start_all(mode, skip_other_mode=True)`` starts one side and
leaves the other alone; the other calls take an optional ``mode`` to act on
one side only. The stages and their moves are in :mod:`pyrep.replication_state`.

:func:`stats` gives the numbers the demo prints: bytes forwarded by the
primary, bytes copied before write by the secondary's backup job, checkpoints
and their durations, failover time.
"""
import threading
import time

from .errors import ReplicationError

__all__ = ["start_all", "do_checkpoint_all", "get_error_all", "stop_all", "status", "stats", "nodes",
           "wait_failover"]

_lock = threading.RLock()
_drivers = []          # ReplicationDriver instances, in opening order
MODES = ("primary", "secondary")


def register(drv):
    """Count ``drv`` (a replication driver, at open) among this process's replication nodes."""
    with _lock:
        if drv not in _drivers:
            _drivers.append(drv)


def unregister(drv):
    """Forget ``drv`` (at close)."""
    with _lock:
        if drv in _drivers:
            _drivers.remove(drv)


def nodes(mode=None):
    """The replication drivers of this process (optionally of one mode)."""
    with _lock:
        return [d for d in _drivers if mode is None or d.mode == mode]


def _check_mode(mode, allow_none=True):
    if mode is None and allow_none:
        return
    if mode not in MODES:
        raise ReplicationError(f"replication mode must be 'primary' or 'secondary', got {mode!r}")


def start_all(mode, skip_other_mode=False):
    """Start every replication node in ``mode`` ("primary" | "secondary"), as QEMU's
    replication_start_all: every node is walked; a node promoted by a failover (stage failover or
    done) ignores the call whatever its mode (continuous replication); a node of the other mode that
    was not failed over is an error naming both modes — unless ``skip_other_mode`` (both sides in one
    process: start each side with its own call); no replication node at all is not an error.

    The modes are checked before any node starts; when a node cannot start, the nodes started by
    this call are stopped again."""
    _check_mode(mode, allow_none=False)
    todo = []
    for d in nodes():
        if d.promoted:
            continue
        if d.mode != mode:
            if skip_other_mode:
                continue
            raise ReplicationError(f"replication '{d.name}' is a {d.mode} node (stage {d.stage}, not failed "
                                   f"over): it cannot start in {mode} mode")
        todo.append(d)
    started = []
    for d in todo:
        try:
            if d.start(mode):
                started.append(d)
        except BaseException:
            for s in reversed(started):
                try:
                    s.stop(False)
                except Exception:  # noqa: BLE001
                    pass
            raise
    return None


def do_checkpoint_all(mode=None):
    """Checkpoint every replication node (secondaries drop their active/hidden disks)."""
    _check_mode(mode)
    errors = []
    for d in nodes(mode):
        try:
            d.do_checkpoint()
        except ReplicationError as e:
            errors.append(str(e))
    if errors:
        raise ReplicationError("; ".join(errors))


def get_error_all(mode=None):
    """Raise ReplicationError if any replication node is not started or hit an error."""
    _check_mode(mode)
    errors = []
    for d in nodes(mode):
        try:
            d.get_error()
        except ReplicationError as e:
            errors.append(str(e))
    if errors:
        raise ReplicationError("; ".join(errors))


def stop_all(failover, wait=False, timeout=None, mode=None):
    """Stop every replication node; with ``failover`` a secondary commits its active and hidden
    disks into the secondary disk in the background (``wait=True`` blocks until that ends and
    raises ReplicationError if it failed)."""
    _check_mode(mode)
    errors = []
    todo = nodes(mode)
    for d in todo:
        try:
            d.stop(bool(failover))
        except ReplicationError as e:
            errors.append(str(e))
    if wait:
        deadline = None if timeout is None else time.monotonic() + timeout
        for d in todo:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not d.wait_failover(left):
                errors.append(f"replication '{d.name}': failover still running after {timeout} s")
            elif d.stage == "failover_failed":
                errors.append(f"replication '{d.name}': {d.current_error()}")
    if errors:
        raise ReplicationError("; ".join(dict.fromkeys(errors)))


def wait_failover(timeout=None):
    """Wait for every failover commit in progress; True if all ended within ``timeout``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for d in nodes():
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not d.wait_failover(left):
            return False
    return True


def status():
    """``[{"node", "mode", "stage", "error"}]`` for every replication node of this process."""
    return [d.status() for d in nodes()]


def stats():
    """Per-node counters: ``{node: {...}}`` plus ``"total"`` (bytes forwarded, bytes copied before
    write, checkpoints, checkpoint durations, failover time)."""
    out = {}
    total = {"bytes_forwarded": 0, "bytes_copied_before_write": 0, "checkpoints": 0,
             "checkpoint_durations": [], "failover_time": None}
    for d in nodes():
        s = dict(d.stats)
        s["checkpoint_durations"] = list(s["checkpoint_durations"])
        job = d.backup_job
        if job is not None:
            s["bytes_copied_before_write"] += getattr(job, "bytes_copied", 0)
        s["mode"], s["stage"] = d.mode, d.stage.value
        out[d.name] = s
        total["bytes_forwarded"] += s["bytes_forwarded"]
        total["bytes_copied_before_write"] += s["bytes_copied_before_write"]
        total["checkpoints"] += s["checkpoints"]
        total["checkpoint_durations"] += s["checkpoint_durations"]
        if s["failover_time"] is not None:
            total["failover_time"] = max(total["failover_time"] or 0.0, s["failover_time"])
    out["total"] = total
    return out
