# cython: language_level=3
"""The driver registry: name -> driver class.

A private dict, filled three ways: built-in drivers are imported lazily the
first time their name is looked up; third-party drivers come from the
entry-point group ``pyrep.drivers`` (also loaded lazily, once); anything can
call :func:`register_driver`. A duplicate name is refused unless
``clobber=True``; an unknown name raises ``OptionError`` listing the known ones.
"""
import importlib

from pyrep.errors import OptionError

ENTRY_POINT_GROUP = "pyrep.drivers"

# built-in drivers: name -> "module:Class", imported on first use
cdef dict _builtin = {
    "file": "pyrep.drivers.file:FileDriver",
    "raw": "pyrep.drivers.raw:RawDriver",
    "memory": "pyrep.drivers.memory:MemoryDriver",
    "null": "pyrep.drivers.null:NullDriver",
    "blkdebug": "pyrep.drivers.blkdebug:BlkdebugDriver",
    "qcow2": "pyrep.drivers.qcow2:Qcow2Driver",
    "replication": "pyrep.drivers.replication:ReplicationDriver",
    "quorum": "pyrep.drivers.quorum:QuorumDriver",
    "nbd": "pyrep.drivers.nbd:NbdDriver",
}
cdef dict _drivers = {}
cdef dict _entry_points = {}
cdef bint _entry_points_loaded = False


cdef str _name_of(cls):
    name = getattr(cls, "format_name", None)
    if not isinstance(name, str) or not name:
        raise OptionError(f"driver class {cls!r} has no format_name")
    return name


def register_driver(cls, bint clobber=False):
    """Register a driver class under its ``format_name``; returns the class (usable as a decorator)."""
    name = _name_of(cls)
    old = _drivers.get(name)
    if old is not None and old is not cls and not clobber:
        raise OptionError(f"a driver named '{name}' is already registered ({old.__module__}.{old.__qualname__}); "
                          f"pass clobber=True to replace it")
    _drivers[name] = cls
    return cls


def unregister_driver(str name):
    """Forget a registered driver (built-ins come back on next lookup)."""
    _drivers.pop(name, None)


cdef _load_entry_points():
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        _entry_points.setdefault(ep.name, ep)


def reload_entry_points():
    """Look at installed packages again (after installing a plugin at run time)."""
    global _entry_points_loaded
    _entry_points_loaded = False
    _entry_points.clear()


cdef object _import_target(str target):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def get_driver(str name):
    """The driver class registered as ``name``."""
    cls = _drivers.get(name)
    if cls is not None:
        return cls
    target = _builtin.get(name)
    if target is not None:
        try:
            cls = _import_target(target)
        except (ImportError, AttributeError):
            cls = None
        if cls is not None:
            _drivers.setdefault(name, cls)
            return _drivers[name]
    _load_entry_points()
    ep = _entry_points.get(name)
    if ep is not None:
        try:
            cls = ep.load()
        except Exception as e:
            raise OptionError(f"driver '{name}': its entry point {ep.value!r} failed to load: {e}") from e
        if _name_of(cls) != name:
            raise OptionError(f"driver '{name}': entry point {ep.value!r} gives a driver named '{_name_of(cls)}'")
        _drivers.setdefault(name, cls)
        return _drivers[name]
    raise OptionError(f"unknown driver '{name}' (known drivers: {', '.join(drivers())})")


def drivers():
    """Sorted names of every driver that can be looked up (registered, built-in, entry points)."""
    _load_entry_points()
    names = set(_drivers) | set(_entry_points)
    for name, target in _builtin.items():
        if name not in names:
            try:
                _import_target(target)
            except (ImportError, AttributeError):
                continue
            names.add(name)
    return sorted(names)
