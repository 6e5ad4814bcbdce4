"""pyrep-nbd: serve a disk image over NBD, with qemu-nbd's command line and semantics.

    pyrep-nbd [-f fmt] [-r] [-x name] [-D text] [-k socket | -b addr -p port] [-e N] [-t]
              [--fork] [--pid-file F] [--object tls-creds-x509,id=..,dir=..,endpoint=server]
              [--tls-creds ID] [--image-opts] [--cache MODE] [--discard MODE] FILE
    pyrep-nbd -L [-k socket | -b addr -p port] [--tls-creds ID --object ...]    list a server's exports
    pyrep-nbd -V

As qemu-nbd: the export is named "" unless -x; at most ``-e`` clients at once (default 1, 0 for no
limit); without ``-t`` the server exits when its last client disconnects. SIGTERM/SIGINT stop it
cleanly: in-flight requests finish and reply, every acknowledged write is flushed to disk, exit 0.
``--cache``: ``writeback`` (the default) and ``none`` acknowledge writes from the page cache and make
them stable on flush or FUA (``none`` does not bypass the page cache: no O_DIRECT here);
``writethrough`` and ``directsync`` make every write stable before acknowledging it; ``unsafe`` ignores
flushes.
"""
import argparse
import os
import signal
import socket
import sys
import threading

import pyrep
from pyrep.errors import Error
from pyrep.graph import probe_format

PROG = "pyrep-nbd"


def _die(msg, code=1):
    print(f"{PROG}: {msg}", file=sys.stderr)
    return code


def _parser():
    ap = argparse.ArgumentParser(prog=PROG, description="Serve a disk image over NBD (qemu-nbd compatible)")
    ap.add_argument("filename", nargs="?")
    ap.add_argument("-f", "--format", dest="fmt")
    ap.add_argument("-r", "--read-only", action="store_true")
    ap.add_argument("-x", "--export-name", default="")
    ap.add_argument("-D", "--description")
    ap.add_argument("-k", "--socket")
    ap.add_argument("-p", "--port", default="10809")
    ap.add_argument("-b", "--bind", default="0.0.0.0")
    ap.add_argument("-e", "--shared", type=int, default=1)
    ap.add_argument("-t", "--persistent", action="store_true")
    ap.add_argument("--fork", action="store_true")
    ap.add_argument("--pid-file")
    ap.add_argument("--object", action="append", default=[])
    ap.add_argument("--tls-creds")
    ap.add_argument("--tls-hostname")
    ap.add_argument("--image-opts", action="store_true")
    ap.add_argument("--cache", choices=("none", "writeback", "writethrough", "directsync", "unsafe"))
    ap.add_argument("--discard", choices=("ignore", "off", "unmap", "on"), default="ignore")
    ap.add_argument("-L", "--list", action="store_true")
    ap.add_argument("-V", "--version", action="store_true")
    ap.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def _address(a):
    if a.socket:
        return {"type": "unix", "path": a.socket}
    return {"type": "inet", "host": a.bind, "port": str(a.port)}


def _node_options(a):
    if a.image_opts:
        opts = pyrep.parse_drive(a.filename)
    else:
        if not os.path.exists(a.filename):
            raise Error(f"Could not open '{a.filename}': No such file or directory")
        fmt = a.fmt or probe_format(a.filename)
        opts = {"driver": fmt, "file": {"driver": "file", "filename": a.filename}}
    if a.read_only:
        opts["read-only"] = True
    opts["discard"] = "unmap" if a.discard in ("unmap", "on") else "ignore"
    if a.cache == "unsafe":
        opts["cache"] = {"no-flush": True}
    return opts


# ------------------------------------------------------------------ -L
def list_exports(a):
    """Print a server's exports (qemu-nbd -L's layout)."""
    from pyrep.nbd import handshake as H
    from pyrep.nbd import proto as P
    addr = _address(a)
    if addr["type"] == "unix":
        s = socket.socket(socket.AF_UNIX)
        target = addr["path"]
    else:
        host = "localhost" if addr["host"] in ("0.0.0.0", "") else addr["host"]
        s = socket.create_connection((host, int(addr["port"])), timeout=30)
        target = None
    s.settimeout(30)
    if target:
        s.connect(target)
    hs = H.Handshake(H.CLIENT)
    io = [s]

    def ask(ev):
        if ev is not None:
            io[0].sendall(hs.send(ev))
        out = []
        while True:
            got = hs.next_event()
            if got is H.NEED_DATA:
                hs.receive_data(io[0].recv(65536))
                continue
            out.append(got)
            if isinstance(got, (H.Greeting, H.Ack, H.OptionError)):
                return out
    ask(None)
    io[0].sendall(hs.send(H.ClientFlags()))
    if a.tls_creds:
        ask(H.StartTLS())
        ctx = pyrep.lookup_object(a.tls_creds).ssl_context()
        io[0] = ctx.wrap_socket(s, server_hostname=a.tls_hostname or (target and "localhost") or
                                (addr["host"] if addr["type"] == "inet" else None))
        hs.tls_established()
    replies = ask(H.List())
    if isinstance(replies[-1], H.OptionError):
        err = replies[-1]
        why = "the server requires TLS" if err.code == P.REP_ERR_TLS_REQD else (err.message or hex(err.code))
        io[0].close()
        return _die(f"cannot list the exports: {why}")
    names = [e.name for e in replies if isinstance(e, H.Server)]
    print(f"exports available: {len(names)}")
    for name in names:
        print(f" export: '{name}'")
        replies = ask(H.Info(name, (P.INFO_DESCRIPTION, P.INFO_BLOCK_SIZE)))
        for r in replies:
            if isinstance(r, H.InfoDescription):
                print(f"  description: {r.description}")
            elif isinstance(r, H.InfoExport):
                print(f"  size:  {r.size}")
                print(f"  flags: {r.flags:#x}")
            elif isinstance(r, H.InfoBlockSize):
                print(f"  min block: {r.minimum}")
                print(f"  opt block: {r.preferred}")
                print(f"  max block: {r.maximum}")
        ctxs = [e.name for e in ask(H.ListMetaContext(name, ())) if isinstance(e, H.MetaContext)]
        print(f"  available meta contexts: {len(ctxs)}")
        for c in ctxs:
            print(f"   {c}")
    io[0].sendall(hs.send(H.Abort()))
    io[0].close()
    return 0


# ------------------------------------------------------------------ serve
def serve(a, ready_fd=None):
    from pyrep.nbd.server import DEFAULT_WORKERS
    stop = threading.Event()
    sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for sig in sigs:
        signal.signal(sig, lambda *_: stop.set())
    node = pyrep.blockdev_add(_node_options(a))
    # the server's threads block these signals, so they reach this thread and wake the wait below
    srv = pyrep.nbd_server_start(_address(a), tls_creds=a.tls_creds, max_connections=max(0, a.shared),
                                 workers=a.workers or DEFAULT_WORKERS)
    if not a.persistent:
        srv.on_idle(stop.set)
    exp = pyrep.export_add(node, name=a.export_name, writable=not a.read_only, description=a.description)
    exp.writethrough = a.cache in ("writethrough", "directsync")
    if a.pid_file:                  # written whole, then renamed: a reader never sees it empty
        tmp = f"{a.pid_file}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, a.pid_file)
    if ready_fd is not None:
        # detach from the parent's streams (whoever waits for the parent must not wait for us)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        os.write(ready_fd, b"ok")
        os.close(ready_fd)
    try:
        while not stop.wait(3600):
            pass
    finally:
        pyrep.nbd_server_stop()     # in-flight requests reply; the export's backend is flushed and closed
        pyrep.close_all()
        for sig in sigs:            # a late signal must not kill the exit (finalization restores SIG_DFL)
            signal.signal(sig, signal.SIG_IGN)
        if a.pid_file:
            try:
                os.unlink(a.pid_file)
            except OSError:
                pass
    return 0


def main(argv=None):
    a = _parser().parse_args(argv)
    if a.version:
        print(f"{PROG} {pyrep.__version__} (qemu-nbd compatible)")
        return 0
    try:
        for spec in a.object:
            from pyrep.objects import parse_object
            qom_type, props = parse_object(spec)
            pyrep.object_add(qom_type, **props)
        if a.list:
            return list_exports(a)
        if not a.filename:
            return _die("Expected exactly one filename argument (try --help)")
        if a.shared < 0:
            return _die(f"Invalid shared device number '{a.shared}'")
        if not a.fork:
            return serve(a)
        r, w = os.pipe()
        pid = os.fork()
        if pid:                                 # parent: exit once the child serves (or report why not)
            os.close(w)
            msg = b""
            while True:
                chunk = os.read(r, 4096)
                if not chunk:
                    break
                msg += chunk
            if msg == b"ok":
                return 0
            return _die(msg.decode(errors="replace") or "the server failed to start")
        os.close(r)
        try:
            os.setsid()
            return serve(a, ready_fd=w)
        except (Error, OSError) as e:
            os.write(w, str(e).encode())
            return 1
    except (Error, OSError) as e:
        return _die(str(e))


if __name__ == "__main__":
    sys.exit(main())
