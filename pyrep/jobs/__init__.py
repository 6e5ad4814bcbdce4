"""Block jobs: backup (copy-before-write / point-in-time copy), commit (active commit), mirror.

Every job runs in a background thread; see :mod:`pyrep.jobs.job` for the
life cycle, error policies and drain, and each module for its semantics.

    pyrep.jobs.backup(source, target, sync="none", ...) -> BackupJob
    pyrep.jobs.commit(top, base=None, ...) -> CommitJob
    pyrep.jobs.mirror(source, target, sync="full", ...) -> MirrorJob
    pyrep.jobs.list() ; pyrep.jobs.get(id) ; pyrep.jobs.wait_all(timeout=None)
"""
from . import job
from .backup import BackupJob, backup
from .commit import CommitJob, commit
from .job import Job, cancel_all, get, list_jobs, wait_all
from .mirror import MirrorJob, mirror

__all__ = ["Job", "BackupJob", "backup", "CommitJob", "commit", "MirrorJob", "mirror", "list", "get", "wait_all", "cancel_all", "job"]

list = list_jobs  # noqa: A001 - pyrep.jobs.list() is the documented name
