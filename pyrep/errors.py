"""The one error tree of pyrep: every message says what went wrong and where."""
import errno as _errno
import os

__all__ = ["Error", "OptionError", "BlockError", "PermissionConflict", "ReplicationError", "errno_from"]


class Error(Exception):
    """Base of every error pyrep raises on purpose."""


class OptionError(Error, ValueError):
    """A bad option, graph definition or configuration file."""


class BlockError(Error, OSError):
    """An I/O failure. ``.errno`` is always set (EIO, EINVAL, ENOSPC, EPERM, ...)."""

    def __init__(self, err, message=None, filename=None):
        err = errno_from(err)
        if message is None:
            message = os.strerror(err)
        if filename is None:
            OSError.__init__(self, err, message)
        else:
            OSError.__init__(self, err, message, filename)

    def __str__(self):
        name = _errno.errorcode.get(self.errno, str(self.errno))
        where = f" ({self.filename})" if self.filename else ""
        return f"[{name}] {self.strerror}{where}"

    def __reduce__(self):
        return (type(self), (self.errno, self.strerror, self.filename))


class PermissionConflict(Error):
    """Two users of a node want permissions the other does not share, or an op is blocked."""


class ReplicationError(Error):
    """Replication was misconfigured or hit an error while running."""


def errno_from(value):
    """An errno number from a number or a name such as ``"EIO"``."""
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        code = getattr(_errno, value.upper(), None)
        if isinstance(code, int):
            return code
        if value.isdigit():
            return int(value)
    raise OptionError(f"unknown errno {value!r} (expected a name such as 'EIO' or a number)")
