"""Test-only drivers live for one test: registered on entry, forgotten on exit, so no test sees a
driver another test left in the global registry."""
import contextlib

import pyrep


@contextlib.contextmanager
def registered(*classes):
    """Register driver ``classes`` for the ``with`` block."""
    for cls in classes:
        pyrep.register_driver(cls)
    try:
        yield
    finally:
        for cls in classes:
            pyrep.unregister_driver(cls.format_name)
