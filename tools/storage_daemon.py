"""``pyrep-storage-daemon``: a long-running storage process with qemu-storage-daemon's command line and QMP.

    pyrep-storage-daemon --blockdev driver=file,node-name=f0,filename=disk.qcow2 \\
        --blockdev driver=qcow2,node-name=q0,file=f0 \\
        --nbd-server addr.type=unix,addr.path=nbd.sock \\
        --export type=nbd,id=e0,node-name=q0,name=disk,writable=on \\
        --chardev socket,id=m0,path=qmp.sock,server=on,wait=off --monitor chardev=m0

Options are applied in the order given, as qemu-storage-daemon applies them
(``--config FILE`` applies the file's tables at its place). The whole command
line is checked before anything is made: a bad one is one line on stderr and
exit status 1, with nothing created or truncated (what was built before a
later failure is closed again, sockets removed). ``--daemonize``: the parent
returns once everything listens (and the pidfile is written). SIGTERM, SIGINT
or QMP ``quit``: the monitors and the NBD server stop (in-flight requests
finish), jobs are cancelled, every node is flushed and closed, exit 0.
"""
import json
import os
import signal
import sys
import threading

PROG = "pyrep-storage-daemon"

USAGE = f"""Usage: {PROG} [options]
pyrep storage daemon (qemu-storage-daemon's command line)

  -h, --help             display this help and exit
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,read-only=on|off][,driver specific parameters...]
  --blockdev '{{"driver": ..., ...}}'
                         add a block node
  --chardev socket,id=<id>,path=<path>|host=<host>,port=<port>,server=on[,wait=off]
                         a socket for a QMP monitor
  --monitor [chardev=]<id>[,mode=control][,pretty=on|off]
                         a QMP monitor on that chardev
  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>[,tls-creds=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>[,tls-creds=<id>][,max-connections=<n>]
                         start an NBD server for exporting block nodes
  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>][,writable=on|off]
           [,description=<text>]
                         export a block node over NBD (requires --nbd-server)
  --object tls-creds-x509,id=<id>,dir=<dir>[,endpoint=server|client][,verify-peer=on|off]
                         add an object (TLS credentials)
  --config <file.toml|file.json>
                         apply a pyrep config file (blockdev, backend, object, monitor,
                         nbd-server, export and replication tables)
  --pidfile <path>       write the process ID to a file after startup
  --daemonize            daemonize, the parent exiting once startup is complete
"""

_WITH_ARG = ("--blockdev", "--chardev", "--monitor", "--nbd-server", "--export", "--object", "--config",
             "--pidfile", "-T", "--trace")


class UsageError(Exception):
    """A bad command line: the message is the one line printed."""


# ---------------------------------------------------------------- parsing (no side effects)

def _kv(text, opt, implied=None):
    """A dotted dict from ``key=value,...``; a first item without ``=`` is the ``implied`` key."""
    from pyrep.options import parse_drive
    from pyrep.errors import OptionError
    if implied and text and "=" not in text.split(",")[0]:
        first, _, rest = text.partition(",")
        text = f"{implied}={first}" + (f",{rest}" if rest else "")
    try:
        return parse_drive(text)
    except OptionError as e:
        raise UsageError(f"{opt} {text}: {e}") from None


def _nested(dotted, where):
    from pyrep.errors import OptionError
    from pyrep.options import unflatten
    try:
        return unflatten(dotted)
    except OptionError as e:
        raise UsageError(f"{where}: {e}") from None


def _blockdev(text):
    opt = "--blockdev"
    if text.lstrip().startswith("{"):
        try:
            spec = json.loads(text)
        except ValueError as e:
            raise UsageError(f"{opt} {text}: not valid JSON: {e}") from None
        if not isinstance(spec, dict):
            raise UsageError(f"{opt} {text}: the JSON form must be an object")
        return spec
    return _kv(text, opt, implied="driver")


_CHARDEV_KEYS = {"backend", "id", "path", "host", "port", "server", "wait", "nodelay", "telnet", "ipv4", "ipv6"}


def _chardev(text):
    where = f"--chardev {text}"
    spec = _kv(text, "--chardev", implied="backend")
    if spec.get("backend") != "socket":
        raise UsageError(f"{where}: only 'socket' chardevs are supported (got {spec.get('backend')!r})")
    bad = sorted(set(spec) - _CHARDEV_KEYS)
    if bad:
        raise UsageError(f"{where}: unknown option '{bad[0]}' (options: id, path, host, port, server, wait)")
    if not spec.get("id"):
        raise UsageError(f"{where}: 'id' is required")
    if "server" not in spec:
        raise UsageError(f"{where}: a monitor's socket must be a server (add server=on)")
    out = {"id": spec["id"], "server": spec["server"], "wait": spec.get("wait", "on")}  # QEMU waits by default
    for key in ("path", "host", "port"):
        if key in spec:
            out[key] = spec[key]
    return out


def _monitor(text):
    where = f"--monitor {text}"
    spec = _kv(text, "--monitor", implied="chardev")
    bad = sorted(set(spec) - {"chardev", "mode", "pretty", "id"})
    if bad:
        raise UsageError(f"{where}: unknown option '{bad[0]}' (options: chardev, mode, pretty)")
    if not spec.get("chardev"):
        raise UsageError(f"{where}: 'chardev' is required")
    if spec.get("mode", "control") != "control":
        raise UsageError(f"{where}: only mode=control (QMP) is supported")
    return spec


def _object(text):
    spec = _kv(text, "--object", implied="qom-type")
    if spec.get("qom-type") == "help" or spec.get("help") is not None:
        raise UsageError("--object: object types: tls-creds-x509")
    return {k.replace("_", "-"): v for k, v in spec.items()}


def parse_command_line(argv):
    """``(items, flags)``: ``items`` is the ordered list of ``(kind, spec, where)``; ``flags`` holds
    pidfile, daemonize, help, version. Raises UsageError; makes nothing."""
    from pyrep.config import check_service
    from pyrep.errors import OptionError
    items, flags = [], {"pidfile": None, "daemonize": False, "help": False, "version": False}
    chardevs = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        value = None
        if arg.startswith("--") and "=" in arg:
            arg, value = arg.split("=", 1)
        if arg in ("-h", "--help"):
            flags["help"] = True
            continue
        if arg in ("-V", "--version"):
            flags["version"] = True
            continue
        if arg == "--daemonize":
            flags["daemonize"] = True
            continue
        if arg not in _WITH_ARG:
            if arg.startswith("-"):
                raise UsageError(f"unrecognized option '{arg}'")
            raise UsageError(f"unexpected argument '{arg}' (options start with --)")
        if value is None:
            if i >= len(argv):
                raise UsageError(f"option '{arg}' requires an argument")
            value = argv[i]
            i += 1
        where = f"{arg} {value}"
        try:
            if arg == "--blockdev":
                items.append(("blockdev", _blockdev(value), where))
            elif arg == "--chardev":
                spec = _chardev(value)
                if spec["id"] in chardevs:
                    raise UsageError(f"{where}: duplicate chardev id '{spec['id']}'")
                chardevs[spec["id"]] = spec
            elif arg == "--monitor":
                spec = _monitor(value)
                cd = chardevs.get(spec["chardev"])
                if cd is None:
                    raise UsageError(f"{where}: chardev '{spec['chardev']}' not found (a --chardev must come first)")
                mon = dict(cd)
                if "pretty" in spec:
                    mon["pretty"] = spec["pretty"]
                items.append(("monitor", check_service("monitor", mon, where), where))
            elif arg == "--nbd-server":
                spec = _nested(_kv(value, arg), where)
                items.append(("nbd-server", check_service("nbd-server", spec, where), where))
            elif arg == "--export":
                spec = _nested(_kv(value, arg, implied="type"), where)
                if spec.get("type") != "nbd":
                    raise UsageError(f"{where}: only type=nbd exports are supported (got {spec.get('type')!r})")
                items.append(("export", check_service("export", spec, where), where))
            elif arg == "--object":
                items.append(("object", check_service("object", _object(value), where), where))
            elif arg == "--config":
                if not os.path.isfile(value):
                    raise UsageError(f"{where}: no such file")
                items.append(("config", value, where))
            elif arg == "--pidfile":
                flags["pidfile"] = os.path.abspath(value)
            elif arg in ("-T", "--trace"):
                raise UsageError(f"{arg}: tracing is not supported")
        except OptionError as e:
            msg = str(e)
            raise UsageError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    kinds = [k for k, _, _ in items]
    if "export" in kinds and "nbd-server" not in kinds and "config" not in kinds:
        raise UsageError("--export: an NBD export needs --nbd-server")
    return items, flags


# ---------------------------------------------------------------- running

class Daemon:
    """What the command line built, and how to take it down again."""

    def __init__(self):
        from pyrep.config import Graph
        from pyrep.qmp import QMPServer
        self.stop = threading.Event()
        self.qmp = QMPServer(on_quit=self.stop.set)
        self.graph = Graph("<command line>")
        self.configs = []
        self._pid_fd = None
        self.pidfile = None

    def build(self, items):
        """Apply every item in order; on an error everything made so far is undone."""
        import pyrep
        from pyrep.config import add_item
        for kind, spec, where in items:
            if kind == "config":
                self.configs.append(pyrep.load_config(spec, qmp=self.qmp))
            else:
                add_item(self.graph, kind, spec, where, None, self.qmp)

    def write_pidfile(self, path):
        """Write and lock the pidfile. A pidfile locked by a running daemon is refused; the file appears
        whole (written under a temporary name, locked, then renamed), so a reader never sees it empty."""
        import fcntl
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise UsageError(f"--pidfile {path}: cannot open pid file: {e.strerror}") from None
        else:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise UsageError(f"--pidfile {path}: cannot lock pid file: another daemon holds it") from None
            finally:
                os.close(fd)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise UsageError(f"--pidfile {path}: cannot open pid file: {e.strerror}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        self._pid_fd, self.pidfile = fd, path

    def shutdown(self):
        """Stop serving, finish in-flight requests, cancel jobs, flush and close every node."""
        import pyrep
        from pyrep.nbd import server as nbd
        if not self.qmp.quitting:           # a signal: the monitors hear it as QEMU's do
            self.qmp.emit("SHUTDOWN", {"guest": False, "reason": "host-signal"})
        self.qmp.close()
        for cfg in reversed(self.configs):
            _quietly(cfg.close)
        _quietly(self.graph.close)
        if nbd.nbd_server() is not None:        # started over QMP
            _quietly(nbd.nbd_server_stop)
        pyrep.close_all()
        if self._pid_fd is not None:
            try:
                os.unlink(self.pidfile)
            except OSError:
                pass
            os.close(self._pid_fd)
            self._pid_fd = None


def _quietly(fn):
    from pyrep.errors import Error
    try:
        fn()
    except Error:
        pass


def _fail(msg):
    sys.stderr.write(f"{PROG}: {msg}\n")
    return 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        items, flags = parse_command_line(argv)
    except UsageError as e:
        return _fail(e)
    if flags["help"]:
        sys.stdout.write(USAGE)
        return 0
    if flags["version"]:
        import pyrep
        sys.stdout.write(f"{PROG} version {pyrep.__version__} (pyrep)\n")
        return 0
    notify = None
    if flags["daemonize"]:
        notify = _daemonize()
        if isinstance(notify, int):       # the parent: its child's verdict
            return notify
    return _run(items, flags, notify)


def _daemonize():
    """Fork. The parent waits for the child's startup verdict and returns its exit status; the
    child gets the pipe's write end (a file object) to report on."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as f:
            verdict = f.read().decode(errors="replace")
        if verdict.startswith("OK"):
            return 0
        sys.stderr.write(verdict if verdict else f"{PROG}: the daemon died during startup\n")
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        return 1
    os.close(r)
    os.setsid()
    return os.fdopen(w, "wb", buffering=0)


def _run(items, flags, notify):
    from pyrep.errors import Error
    daemon = Daemon()
    try:
        daemon.build(items)
        if flags["pidfile"]:
            daemon.write_pidfile(flags["pidfile"])
    except (Error, UsageError, OSError) as e:
        msg = str(e) if not isinstance(e, OSError) or isinstance(e, Error) else (e.strerror or str(e))
        daemon.shutdown()
        line = f"{PROG}: {msg}\n"
        if notify is not None:
            notify.write(line.encode())
            notify.close()
            os._exit(1)
        sys.stderr.write(line)
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: daemon.stop.set())
    if notify is not None:
        _detach_stdio()
        notify.write(b"OK\n")
        notify.close()
    while not daemon.stop.wait(1.0):
        pass
    daemon.shutdown()
    return 0


def _detach_stdio():
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
