"""The built-in drivers (installed as ``pyrep.drivers``).

``pyrep.drivers()`` is also the public call that lists driver names; since
importing any driver binds this package to the attribute ``pyrep.drivers``,
the package itself is made callable and answers that call.
"""
import sys
import types


class _DriversPackage(types.ModuleType):
    def __call__(self):
        """Sorted names of every driver that can be looked up."""
        from pyrep._core.registry import drivers
        return drivers()


sys.modules[__name__].__class__ = _DriversPackage
