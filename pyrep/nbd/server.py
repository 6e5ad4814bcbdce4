"""The NBD server: listening, negotiation, and the exports registry (the only server module with sockets).

One server per process (as in QEMU: ``nbd-server-start``), any number of exports and clients.
A thread accepts connections; each connection gets a thread that negotiates (Python, through the
sans-I/O :class:`~pyrep.nbd.handshake.Handshake`), then runs the C transmission loop
(:class:`pyrep.nbd._server.ServerConn`) on that thread plus ``workers - 1`` more, so a connection's
requests run concurrently and reply in any order. A TLS connection uses one thread.

Public API (re-exported by :mod:`pyrep`)::

    nbd_server_start(addr, tls_creds=None, max_connections=0)   # addr: QEMU SocketAddress dict
    export_add(node_or_name, name=None, writable=False, description=None, id=None)
    export_del(name)            # by name or id
    nbd_server_stop()
    nbd_exports()               # [dict]: QEMU's BlockExportInfo fields + name, description, writable, size, clients
    add_export_deleted_hook(fn) # fn(export_id) after an export is gone (QMP's BLOCK_EXPORT_DELETED)

Failure containment: anything a client sends wrong ends at most that client's connection (logged
at debug level on ``pyrep.nbd.server``); the listener and other connections carry on.
"""
import errno
import logging
import os
import signal
import socket
import stat
import threading
import time

from ..errors import OptionError
from ..graph import lookup
from ..node import Node
from . import handshake as H
from . import proto as P
from ._server import ServerConn
from .export import Export
from .proto import ProtocolError

__all__ = ["nbd_server_start", "nbd_server_stop", "export_add", "export_del", "nbd_exports", "nbd_server",
           "add_export_deleted_hook", "remove_export_deleted_hook", "NBDServer"]

_log = logging.getLogger("pyrep.nbd.server")

META_ID = 1                 # our one context, base:allocation, has this id on every connection
HANDSHAKE_SECONDS = 10      # a client must finish negotiating in this time (QEMU's default too)
DEFAULT_WORKERS = 4         # threads per plaintext connection

_lock = threading.RLock()
_server = None              # the running NBDServer
_exports = {}               # name -> Export
_deleted_hooks = []


# ------------------------------------------------------------------ addresses
def _listen(addr):
    """A listening socket for a QEMU SocketAddress dict; OptionError names the bad key."""
    if not isinstance(addr, dict) or "type" not in addr:
        raise OptionError(f"NBD server address: expected a dict with 'type' ('inet' or 'unix'), got {addr!r}")
    kind = addr["type"]
    if kind == "unix":
        path = addr.get("path")
        if not path:
            raise OptionError("NBD server address: 'path' is required for type 'unix'")
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)         # a stale socket of an earlier server, as qemu-nbd replaces it
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(path)
        except OSError as e:
            s.close()
            raise OptionError(f"NBD server address: cannot bind unix socket {path!r}: {e.strerror}") from None
    elif kind == "inet":
        host = addr.get("host", "")
        port = addr.get("port", P.DEFAULT_PORT)
        try:
            port = int(port)
        except (TypeError, ValueError):
            raise OptionError(f"NBD server address: port {port!r} is not a number") from None
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise OptionError(f"NBD server address: host {host!r}: {e}") from None
        fam, typ, proto, _, sa = infos[0]
        s = socket.socket(fam, typ, proto)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sa)
        except OSError as e:
            s.close()
            raise OptionError(f"NBD server address: cannot bind {host}:{port}: {e.strerror}") from None
    else:
        raise OptionError(f"NBD server address: unknown type {kind!r} (expected 'inet' or 'unix')")
    s.listen(64)
    return s


# ------------------------------------------------------------------ one connection
class _Connection:
    def __init__(self, server, sock):
        self.server = server
        self.sock = sock            # the plain socket (shut down to stop)
        self.io = sock              # what we talk through: the plain socket, or the SSLSocket after STARTTLS
        self.export = None
        self.core = None
        self.stopping = False

    def stop(self):
        """Read no further request; in-flight ones finish and reply; then the connection closes."""
        self.stopping = True
        core = self.core
        if core is not None:
            core.stop()
        try:
            # on the descriptor (not SSLSocket.shutdown, which tears down the TLS object in use)
            socket.socket.shutdown(self.io, socket.SHUT_RD if core is not None else socket.SHUT_RDWR)
        except OSError:
            pass

    def serve(self):
        try:
            self.sock.settimeout(HANDSHAKE_SECONDS)
            got = self._negotiate()
            if got is not None:
                self._transmit(*got)
        except (ProtocolError, OSError, ValueError) as e:
            _log.debug("NBD connection closed: %s", e)
        except Exception:   # noqa: BLE001 - one connection must never take the server down
            _log.exception("NBD connection failed")
        finally:
            if self.export is not None:
                with self.export.lock:
                    self.export.connections.discard(self)
            try:
                self.io.close()
            except OSError:
                pass
            self.server._connection_done(self)

    # ------------------------------------------------------------ negotiation
    def _send(self, hs, ev):
        self.io.sendall(hs.send(ev))

    def _next(self, hs, deadline):
        while True:
            ev = hs.next_event()
            if ev is not H.NEED_DATA:
                return ev
            if time.monotonic() > deadline:
                raise ProtocolError("the client did not finish negotiating in time")
            hs.receive_data(self.io.recv(65536))

    def _negotiate(self):
        """Run the handshake; (export, handshake, meta id) for transmission, or None to close."""
        srv = self.server
        hs = H.Handshake(H.SERVER)
        deadline = time.monotonic() + HANDSHAKE_SECONDS
        self._send(hs, H.Greeting(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
        self._next(hs, deadline)                    # ClientFlags
        meta_export = None                          # export named by the last SET_META_CONTEXT with a context
        while not self.stopping:
            ev = self._next(hs, deadline)
            if srv.tls is not None and not hs.tls_active:
                if isinstance(ev, H.ExportName):
                    return None                     # no way to send an error: close, as the spec says
                if isinstance(ev, H.Abort):
                    self._send(hs, H.Ack())
                    return None
                if isinstance(ev, H.StartTLS):
                    self._send(hs, H.Ack())
                    self.io = srv.tls.wrap_socket(self.sock, server_side=True)
                    hs.tls_established()
                    continue
                self._send(hs, H.OptionError(P.REP_ERR_TLS_REQD, "TLS is required on this server"))
                continue
            if isinstance(ev, (H.Go, H.Info)):
                exp = _exports.get(ev.name)
                if exp is None or exp.shutting_down:
                    self._send(hs, H.OptionError(P.REP_ERR_UNKNOWN, f"no export named {ev.name!r}"))
                    continue
                self._send(hs, H.InfoExport(exp.size, exp.tflags))
                if P.INFO_NAME in ev.requests:
                    self._send(hs, H.InfoName(exp.name))
                if exp.description and P.INFO_DESCRIPTION in ev.requests:
                    self._send(hs, H.InfoDescription(exp.description))
                self._send(hs, H.InfoBlockSize(P.MIN_BLOCK, P.PREFERRED_BLOCK, P.MAX_PAYLOAD))
                self._send(hs, H.Ack())
                if isinstance(ev, H.Go):
                    return exp, hs, (META_ID if meta_export == exp.name else 0)
            elif isinstance(ev, H.ExportName):
                exp = _exports.get(ev.name)
                if exp is None or exp.shutting_down:
                    return None
                self._send(hs, H.ExportNameReply(exp.size, exp.tflags))
                return exp, hs, 0
            elif isinstance(ev, H.List):
                for exp in list(_exports.values()):
                    self._send(hs, H.Server(exp.name, exp.description or ""))
                self._send(hs, H.Ack())
            elif isinstance(ev, H.StructuredReply):
                self._send(hs, H.OptionError(P.REP_ERR_INVALID, "structured replies already negotiated")
                           if hs.structured_reply else H.Ack())
            elif isinstance(ev, (H.SetMetaContext, H.ListMetaContext)):
                setting = isinstance(ev, H.SetMetaContext)
                if setting and not hs.structured_reply:
                    self._send(hs, H.OptionError(P.REP_ERR_INVALID, "negotiate structured replies first"))
                    continue
                if ev.export not in _exports:
                    self._send(hs, H.OptionError(P.REP_ERR_UNKNOWN, f"no export named {ev.export!r}"))
                    continue
                queries = ev.queries or ((P.META_BASE_ALLOCATION,) if not setting else ())
                chosen = any(q in (P.META_BASE_ALLOCATION, "base:") if not setting else q == P.META_BASE_ALLOCATION
                             for q in queries)
                if chosen:
                    self._send(hs, H.MetaContext(META_ID, P.META_BASE_ALLOCATION))
                if setting:
                    meta_export = ev.export if chosen else None
                self._send(hs, H.Ack())
            elif isinstance(ev, H.StartTLS):
                self._send(hs, H.OptionError(P.REP_ERR_INVALID, "TLS is already active") if hs.tls_active else
                           H.OptionError(P.REP_ERR_POLICY, "this server has no TLS credentials"))
            elif isinstance(ev, H.Abort):
                self._send(hs, H.Ack())
                return None
            elif isinstance(ev, H.InvalidOption):
                self._send(hs, H.OptionError(P.REP_ERR_INVALID, ev.reason))
            else:
                self._send(hs, H.OptionError(P.REP_ERR_UNSUP, f"option {ev.code} is not supported"))
        return None

    # ------------------------------------------------------------ transmission
    def _transmit(self, exp, hs, meta_id):
        with exp.lock:
            if exp.shutting_down:
                return
            exp.connections.add(self)
        self.export = exp
        self.io.settimeout(None)        # blocking: the C loop calls recv/sendmsg on the descriptor
        tls = self.io is not self.sock
        core = ServerConn(-1 if tls else self.sock.fileno(), self.io if tls else None, exp.blk, exp, exp.size,
                          exp.tflags, hs.structured_reply, meta_id, hs.trailing_data())
        self.core = core
        if self.stopping:
            core.stop()
        n = 1 if tls else self.server.workers
        helpers = [threading.Thread(target=core.run, name="nbd-worker", daemon=True) for _ in range(n - 1)]
        for t in helpers:
            t.start()
        try:
            core.run()
        finally:
            for t in helpers:
                t.join()
        if core.reason:
            _log.debug("NBD connection to export %r closed: %s", exp.name, core.reason)


# ------------------------------------------------------------------ the server
class NBDServer:
    """A listening NBD server; use :func:`nbd_server_start`."""

    def __init__(self, addr, tls_creds=None, max_connections=0, workers=DEFAULT_WORKERS):
        from ..objects import lookup_object
        self.tls = None
        if tls_creds is not None:
            creds = lookup_object(tls_creds, "tls-creds-x509")
            if creds.endpoint != "server":
                raise OptionError(f"NBD server: tls-creds '{tls_creds}' has endpoint 'client', not 'server'")
            self.tls = creds.ssl_context()
        if not isinstance(max_connections, int) or max_connections < 0:
            raise OptionError(f"NBD server: max-connections must be a non-negative integer, not {max_connections!r}")
        self.addr = dict(addr) if isinstance(addr, dict) else addr
        self.max_connections = max_connections
        self.workers = max(1, int(workers))
        self.sock = _listen(addr)
        self.address = self._bound_address()
        self._conns = set()
        self._cond = threading.Condition()
        self._stopping = False
        self._idle_callbacks = []
        self._thread = threading.Thread(target=self._accept_loop, name="nbd-accept", daemon=True)
        # Our threads (the acceptor and every connection thread it starts) run with the stop signals
        # blocked, so the kernel delivers a process-directed SIGTERM/SIGINT/SIGHUP to a thread of the
        # embedding program: landing on one of ours it would only set Python's flag while the main
        # thread sleeps on.
        sigs = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
        try:
            self._thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _bound_address(self):
        if self.sock.family == socket.AF_UNIX:
            return {"type": "unix", "path": self.sock.getsockname()}
        host, port = self.sock.getsockname()[:2]
        return {"type": "inet", "host": host, "port": str(port)}

    @property
    def connections(self):
        """The number of open client connections (negotiating or transmitting)."""
        return len(self._conns)

    def _accept_loop(self):
        while True:
            try:
                s, _ = self.sock.accept()
            except OSError as e:
                if self._stopping:
                    return
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    time.sleep(0.05)        # out of descriptors: let connections close, do not spin
                continue
            with self._cond:
                if self._stopping or (self.max_connections and len(self._conns) >= self.max_connections):
                    s.close()               # over the limit: refused at once, others unaffected
                    continue
                conn = _Connection(self, s)
                self._conns.add(conn)
            threading.Thread(target=conn.serve, name="nbd-conn", daemon=True).start()

    def _connection_done(self, conn):
        with self._cond:
            self._conns.discard(conn)
            self._cond.notify_all()
            idle = not self._conns
            callbacks = list(self._idle_callbacks) if idle else []
        for fn in callbacks:
            fn()

    def on_idle(self, fn):
        """Call ``fn()`` (on a connection thread) whenever the last open connection closes."""
        self._idle_callbacks.append(fn)

    def wait_connections(self, pred, timeout=None):
        """Wait until ``pred(number of connections)`` holds; returns whether it did."""
        with self._cond:
            return self._cond.wait_for(lambda: pred(len(self._conns)), timeout)

    def stop_connections(self, conns, timeout=None):
        for c in conns:
            c.stop()
        with self._cond:
            return self._cond.wait_for(lambda: not (self._conns & set(conns)), timeout)

    def close(self, timeout=None):
        """Stop listening, let in-flight requests finish and reply, close every connection."""
        with self._cond:
            self._stopping = True
            conns = list(self._conns)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)    # wakes accept()
        except OSError:
            pass
        self._thread.join()
        path = self.address.get("path")
        self.sock.close()
        if path:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.stop_connections(conns, timeout)


# ------------------------------------------------------------------ module API
def nbd_server_start(addr, tls_creds=None, max_connections=0, workers=DEFAULT_WORKERS):
    """Start this process's NBD server on ``addr`` (``{"type": "inet", "host", "port"}`` or
    ``{"type": "unix", "path"}``); ``tls_creds``: id of a server ``tls-creds-x509`` object (clients
    must then STARTTLS); ``max_connections``: 0 = unlimited. Returns the :class:`NBDServer` (its
    ``address`` has the bound port)."""
    global _server
    with _lock:
        if _server is not None:
            raise OptionError("an NBD server is already running")
        _server = NBDServer(addr, tls_creds, max_connections, workers)
        return _server


def nbd_server():
    """The running :class:`NBDServer`, or None."""
    return _server


def nbd_server_stop(timeout=None):
    """Stop the server: no new connections; in-flight requests finish and reply; every export is
    flushed and removed (the deleted hooks run)."""
    global _server
    with _lock:
        srv = _server
        if srv is None:
            raise OptionError("no NBD server is running")
        srv.close(timeout)
        _server = None
        for name in list(_exports):
            _remove_export(name)


def export_add(node_or_name, name=None, writable=False, description=None, id=None):
    """Export a node (a Node, node-name or backend name) as ``name`` (default: the node's name).

    The export's backend shares writes with the node's other users. Needs a running server."""
    with _lock:
        if _server is None:
            raise OptionError("export_add: no NBD server is running (call nbd_server_start first)")
        node = node_or_name if isinstance(node_or_name, Node) else lookup(node_or_name)
        if name is None:
            name = node.name
        if not isinstance(name, str) or len(name.encode()) > P.MAX_STRING:
            raise OptionError(f"export_add: invalid export name {name!r}")
        ident = id or name
        for e in _exports.values():
            if e.name == name or e.id == ident:
                raise OptionError(f"export_add: an export named '{name}' (id '{ident}') exists")
        exp = Export(node, name, writable=bool(writable), description=description, id=ident)
        _exports[name] = exp
        return exp


def _find(name):
    exp = _exports.get(name)
    if exp is None:
        exp = next((e for e in _exports.values() if e.id == name), None)
    if exp is None:
        raise OptionError(f"no NBD export named '{name}'" +
                          (f" (known: {', '.join(sorted(_exports))})" if _exports else ""))
    return exp


def _remove_export(name, timeout=None):
    exp = _exports[name]
    with exp.lock:
        exp.shutting_down = True
        conns = list(exp.connections)
    if conns and _server is not None:
        _server.stop_connections(conns, timeout)
    del _exports[name]
    try:
        exp.close()
    finally:
        for fn in list(_deleted_hooks):
            try:
                fn(exp.id)
            except Exception:   # noqa: BLE001 - a listener's bug must not stop the removal
                _log.exception("export-deleted hook failed")


def export_del(name, timeout=None):
    """Remove the export ``name`` (or with that id): new clients cannot open it, its clients'
    in-flight requests finish and reply, their connections close, the backend is flushed and released."""
    with _lock:
        _remove_export(_find(name).name, timeout)


def nbd_exports():
    """The exports as dicts: ``id``, ``type`` ("nbd"), ``node-name``, ``shutting-down`` (QEMU's
    BlockExportInfo), and ``name``, ``description``, ``writable``, ``size``, ``clients``."""
    with _lock:
        return [e.info() for e in _exports.values()]


def add_export_deleted_hook(fn):
    """Call ``fn(export_id)`` after each export is removed (export_del or server stop)."""
    _deleted_hooks.append(fn)


def remove_export_deleted_hook(fn):
    _deleted_hooks.remove(fn)
