"""The life cycle of a replication node: its stages, the events that move it, and the one table of moves.

Everything that changes a replication node's stage goes through :func:`next_stage` (the driver calls it
from one method), so an illegal move is caught in one place and its error names the node, the stage and
the event — h11's ``_state.py`` and QEMU's job transition table, applied to block/replication.c::

    NONE --start--> RUNNING --stop--> DONE
                     |  ^ |
      checkpoint ----+--+ +--failover--> FAILOVER --commit-done--> DONE
                     |                       |
                     +--start-failed--> NONE +--commit-failed--> FAILOVER_FAILED

A node that was promoted by a failover (FAILOVER, DONE) ignores start, checkpoint and stop in any mode
(continuous replication: QEMU's replication_start/do_checkpoint/stop return early there): the table
maps those moves to :data:`IGNORED`. Any move the table does not hold is refused.
"""
import enum

from .errors import ReplicationError

__all__ = ["Stage", "Event", "IGNORED", "TRANSITIONS", "next_stage"]


class Stage(str, enum.Enum):
    """QEMU's ReplicationStage; the value is what ``status()`` reports."""
    NONE = "none"
    RUNNING = "running"
    FAILOVER = "failover"
    FAILOVER_FAILED = "failover_failed"
    DONE = "done"

    def __str__(self):
        return self.value


class Event(str, enum.Enum):
    START = "start"                  # start(mode) succeeded (or is being attempted: see START_FAILED)
    START_FAILED = "start-failed"    # the secondary's first checkpoint failed: back to NONE
    CHECKPOINT = "checkpoint"
    STOP = "stop"                    # stop without failover (either side) or stop of a primary
    FAILOVER = "failover"            # a secondary's stop with failover: the commit starts
    COMMIT_DONE = "commit-done"
    COMMIT_FAILED = "commit-failed"

    def __str__(self):
        return self.value


IGNORED = object()      # the move is accepted and changes nothing (a promoted node)

S, E = Stage, Event
TRANSITIONS = {
    (S.NONE, E.START): S.RUNNING,
    (S.RUNNING, E.START_FAILED): S.NONE,
    (S.RUNNING, E.CHECKPOINT): S.RUNNING,
    (S.RUNNING, E.STOP): S.DONE,
    (S.RUNNING, E.FAILOVER): S.FAILOVER,
    (S.FAILOVER, E.COMMIT_DONE): S.DONE,
    (S.FAILOVER, E.COMMIT_FAILED): S.FAILOVER_FAILED,
    # promoted by a failover: start, checkpoint and stop are ignored, whatever the mode
    (S.FAILOVER, E.START): IGNORED, (S.FAILOVER, E.CHECKPOINT): IGNORED,
    (S.FAILOVER, E.STOP): IGNORED, (S.FAILOVER, E.FAILOVER): IGNORED,
    (S.DONE, E.START): IGNORED, (S.DONE, E.CHECKPOINT): IGNORED,
    (S.DONE, E.STOP): IGNORED, (S.DONE, E.FAILOVER): IGNORED,
}
del S, E

_WHY = {
    Stage.NONE: "block replication is not running",
    Stage.RUNNING: "block replication is already running",
    Stage.FAILOVER_FAILED: "the failover failed; the node serves its disks as they are",
}


def next_stage(who, stage, event):
    """The stage after ``event`` in ``stage`` (:data:`IGNORED`: nothing changes), or ReplicationError
    naming ``who`` (the node), the stage and the event."""
    new = TRANSITIONS.get((stage, event))
    if new is None:
        why = _WHY.get(stage, "")
        raise ReplicationError(f"{who}: '{event}' is not allowed in stage {stage}" + (f" ({why})" if why else ""))
    return new
