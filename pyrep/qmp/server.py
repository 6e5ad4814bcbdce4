"""QMP monitors on Unix and TCP sockets: the only QMP code that touches sockets.

A :class:`QMPServer` is the daemon-wide state the command handlers use
(``session.state``): the command table, the version, the jobs the monitors
started, the quit hook. It listens on any number of chardev sockets
(``add_listener``); every connection is a :class:`~pyrep.qmp.session.Session`
with a reader thread and a writer thread. Commands from all sessions run one at
a time (QEMU's big lock): a handler never races another handler. Events go to
every session that finished negotiation, through each session's own bounded
queue, so a client that stops reading cannot hold up a job thread (it is
disconnected when its queue overflows).
"""
import errno as _errno
import itertools
import os
import queue
import socket
import threading

from ..errors import OptionError
from .dispatch import event
from .session import Session

__all__ = ["QMPServer", "socket_address"]

SEND_QUEUE_MAX = 10000
_ACCEPT_POLL = 0.2          # seconds between checks of the stop flag by an accept loop


def socket_address(spec, where="address", key="addr"):
    """``("unix", path)`` or ``("inet", host, port)`` from a flat SocketAddress dict
    (``{"type": "unix", "path": ...}``, ``{"type": "inet", "host": ..., "port": ...}``). Errors start
    with ``where`` and name the keys as ``key.path``."""
    if not isinstance(spec, dict):
        raise OptionError(f"{where}: expected an address object")
    kind = spec.get("type", "unix" if "path" in spec else "inet")
    if kind == "unix":
        extra = set(spec) - {"type", "path", "abstract", "tight"}
        if extra:
            raise OptionError(f"{where}: unknown key '{key}.{sorted(extra)[0]}' for type=unix")
        path = spec.get("path")
        if not isinstance(path, str) or not path:
            raise OptionError(f"{where}: '{key}.path' is required for type=unix")
        return ("unix", path)
    if kind == "inet":
        extra = set(spec) - {"type", "host", "port", "numeric", "to", "ipv4", "ipv6", "keep-alive"}
        if extra:
            raise OptionError(f"{where}: unknown key '{key}.{sorted(extra)[0]}' for type=inet")
        host, port = spec.get("host"), spec.get("port")
        if not isinstance(host, str) or port is None:
            raise OptionError(f"{where}: '{key}.host' and '{key}.port' are required for type=inet")
        try:
            port = int(port)
        except (TypeError, ValueError):
            raise OptionError(f"{where}: '{key}.port' must be a port number, got {port!r}") from None
        if not 0 <= port <= 65535:
            raise OptionError(f"{where}: '{key}.port' {port} is out of range")
        return ("inet", host, port)
    raise OptionError(f"{where}: '{key}.type' must be 'unix' or 'inet', got {kind!r}")


def listen(addr):
    """A listening socket for ``addr`` (see :func:`socket_address`). A Unix socket appears at its path
    only once it listens (bound under a temporary name, then renamed), so a client that waits for the
    file never meets a refusal; a stale socket file is replaced, anything else at the path is an error."""
    if addr[0] == "unix":
        return _listen_unix(addr[1])
    host, port = addr[1], addr[2]
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock


_tmp_names = itertools.count()


def _listen_unix(path):
    if os.path.lexists(path) and not _stale_unix_socket(path):
        raise OSError(_errno.EADDRINUSE, f"{path} exists and is not a stale socket", path)
    tmp = os.path.join(os.path.dirname(path) or ".", f".qmp{os.getpid()}-{next(_tmp_names)}")
    if len(os.fsencode(tmp)) >= 108 or len(os.fsencode(path)) >= 108:
        raise OSError(_errno.ENAMETOOLONG, f"socket path too long for a Unix socket: {path}", path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        try:
            sock.listen(16)
            os.rename(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except BaseException:
        sock.close()
        raise
    return sock


def _stale_unix_socket(path):
    """True if ``path`` is a socket nobody listens on (left by a process that died)."""
    import stat
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return True
    finally:
        probe.close()
    return False


def package_version():
    """pyrep's version as installed (this module must not import the pyrep package itself)."""
    from importlib import metadata
    try:
        return metadata.version("pyrep")
    except metadata.PackageNotFoundError:
        return "0.0.0"


class _Listener:
    def __init__(self, server, addr, sock, pretty):
        self.server, self.addr, self.sock, self.pretty = server, addr, sock, pretty
        self.stop = threading.Event()
        self.connected = threading.Event()      # a client connected (for chardev wait=on)
        self.thread = threading.Thread(target=self._accept_loop, name=f"pyrep-qmp-listen-{addr[1]}", daemon=True)

    def _accept_loop(self):
        self.sock.settimeout(_ACCEPT_POLL)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self.stop.is_set():
                    return
                continue
            conn.settimeout(None)
            self.server._start_connection(conn, self.pretty)
            self.connected.set()

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.sock.close()
        if self.addr[0] == "unix":
            try:
                os.unlink(self.addr[1])
            except OSError:
                pass

    @property
    def address(self):
        """The bound address: a path, or ``(host, port)`` with the port actually bound."""
        return self.addr[1] if self.addr[0] == "unix" else self.sock.getsockname()[:2]


class _Connection:
    """A session on a socket: reader thread, writer thread, bounded send queue."""

    def __init__(self, server, sock, pretty):
        self.server, self.sock = server, sock
        self.session = Session(server, pretty=pretty)
        self.queue = queue.Queue(SEND_QUEUE_MAX)
        self.closed = threading.Event()
        self.reader = threading.Thread(target=self._read_loop, name="pyrep-qmp-read", daemon=True)
        self.writer = threading.Thread(target=self._write_loop, name="pyrep-qmp-write", daemon=True)

    def start(self):
        self.send(self.session.greeting())
        self.writer.start()
        self.reader.start()

    def send(self, msg):
        try:
            self.queue.put_nowait(self.session.encode(msg))
        except queue.Full:
            self.close()          # a client that does not read its events is let go

    def _read_loop(self):
        try:
            while not self.closed.is_set():
                try:
                    data = self.sock.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                with self.server._lock:
                    replies = self.session.feed(data)
                for r in replies:
                    self.send(r)
                if self.session.closing:
                    self.server._after_quit(self)
                    break
        finally:
            self._finish()

    def _write_loop(self):
        while True:
            data = self.queue.get()
            if data is None:
                break
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed.set()
                break

    def _finish(self):
        """Reader side done: let the writer send what is queued, then close the socket."""
        self.server._forget(self)
        try:
            self.queue.put(None, timeout=5)
        except queue.Full:
            pass
        if threading.current_thread() is not self.writer:
            self.writer.join(5)
        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def close(self):
        """Disconnect (from any thread): wakes the reader, which finishes."""
        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class QMPServer:
    """The monitors of a process and the state their commands share.

    ``on_quit`` is called (in a monitor's reader thread, after the ``quit``
    reply and the SHUTDOWN event were queued) when a client sends ``quit``."""

    def __init__(self, table=None, on_quit=None):
        if table is None:
            from .commands import default_table
            table = default_table()
        self.table = table
        self.on_quit = on_quit
        self._lock = threading.RLock()         # one command at a time, across sessions
        self._conn_lock = threading.Lock()
        self._connections = []
        self._listeners = {}
        self._ids = itertools.count()
        self.jobs = None                       # set by the job commands (pyrep.qmp.commands.jobs.JobEvents)
        from .commands.exports import watch
        self._unwatch_exports = watch(self)    # BLOCK_EXPORT_DELETED
        self.quitting = False
        self.closed = False

    # ------------------------------------------------------------ facts
    def version(self):
        """QEMU's VersionInfo shape; ``package`` names pyrep."""
        version = package_version()
        numbers = [int(x) if x.isdigit() else 0 for x in (version.split(".") + ["0", "0"])[:3]]
        return {"qemu": dict(zip(("major", "minor", "micro"), numbers)), "package": f"pyrep {version}"}

    # ------------------------------------------------------------ listening
    def add_listener(self, addr, id=None, pretty=False, wait=False):
        """Listen on ``addr`` (``("unix", path)``, ``("inet", host, port)`` or a SocketAddress dict);
        returns the listener's id. ``wait``: return only once a client has connected (a chardev's
        ``wait=on``)."""
        if isinstance(addr, dict):
            addr = socket_address(addr)
        key = id or f"#monitor{next(self._ids)}"
        if key in self._listeners:
            raise OptionError(f"a monitor with id '{key}' exists")
        sock = listen(addr)
        lst = _Listener(self, addr, sock, pretty)
        self._listeners[key] = lst
        lst.thread.start()
        if wait:
            lst.connected.wait()
        return key

    def remove_listener(self, key):
        """Stop listening on the monitor ``key`` (its sessions go on until they end)."""
        lst = self._listeners.pop(key, None)
        if lst is not None:
            lst.close()

    def listeners(self):
        """Listener id → bound address (a Unix path, or ``(host, port)`` with the port bound)."""
        return {k: lst.address for k, lst in self._listeners.items()}

    def _start_connection(self, sock, pretty):
        conn = _Connection(self, sock, pretty)
        with self._conn_lock:
            if self.closed:
                sock.close()
                return
            self._connections.append(conn)
        conn.start()

    def _forget(self, conn):
        with self._conn_lock:
            if conn in self._connections:
                self._connections.remove(conn)

    # ------------------------------------------------------------ events
    def emit(self, name, data=None):
        """Send an event to every negotiated session (never blocks)."""
        msg = event(name, data)
        with self._conn_lock:
            conns = [c for c in self._connections if c.session.negotiated]
        for c in conns:
            c.send(msg)

    # ------------------------------------------------------------ quit
    def request_quit(self, session):
        """The ``quit`` command: the session closes after its reply; SHUTDOWN goes to everyone."""
        session.closing = True
        self.quitting = True

    def _after_quit(self, conn):
        self.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        if self.on_quit is not None:
            self.on_quit()

    def close(self):
        """Stop listening and disconnect every session (their queued messages are sent first)."""
        if self.closed:
            return
        self.closed = True
        for lst in list(self._listeners.values()):
            lst.close()
        self._listeners.clear()
        with self._conn_lock:
            conns = list(self._connections)
        for c in conns:
            try:
                c.queue.put(None, timeout=1)
            except queue.Full:
                pass
            c.writer.join(5)
            c.close()
            c.reader.join(5)
        if self.jobs is not None:
            self.jobs.close()
        self._unwatch_exports()
