"""A hint that the running request is about to wait on something slow (a network reply).

A server that runs requests inline on the thread that read them (the NBD server's reader role, see
:mod:`pyrep.nbd._server`) would otherwise notice a slow request only after a delay, and until then
the requests behind it wait. Whoever is about to block on a remote peer calls :func:`about_to_wait`;
the server that runs the request on this thread has installed, with :func:`set_hint`, what lets
another thread read on at once. Without a server on the thread it does nothing.

The hint changes only *when* other requests start, never what a request does: requests of one
connection may run concurrently anyway (NBD gives no order between requests in flight).
"""
import threading

__all__ = ["set_hint", "about_to_wait"]

_local = threading.local()


def set_hint(fn):
    """Install ``fn`` (no arguments; or None to remove it) as this thread's about-to-wait hint."""
    _local.hint = fn


def about_to_wait():
    """Tell the server running the current request (if any) that it is about to wait for a while."""
    fn = getattr(_local, "hint", None)
    if fn is not None:
        fn()
