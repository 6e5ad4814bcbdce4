"""``nbd``: the NBD protocol driver (QEMU's ``BlockdevOptionsNbd``).

Thin: options and URIs are read here, everything on the wire is
:class:`pyrep.nbd.client.NbdClient`'s. Options, as QEMU's::

    {"driver": "nbd", "server": {"type": "inet", "host": "h", "port": "10809"},   # or {"type": "unix", "path": p}
     "export": "disk", "tls-creds": "tls0", "tls-hostname": "h", "reconnect-delay": 5, "open-timeout": 10}

or a ``filename`` URI: ``nbd://host[:port]/export``, ``nbd+unix:///export?socket=PATH``,
``nbds://...`` (TLS; ``tls-creds`` required). Capabilities follow what the server
advertises: FUA (else a flush after the write), WRITE_ZEROES (+NO_HOLE unless
``REQ_MAY_UNMAP``, +FAST_ZERO for ``REQ_NO_FALLBACK``), TRIM, FLUSH, ``base:allocation``
block status; the request alignment is the server's minimum block size and large
requests are split at its maximum payload. Requests from any number of threads are
in flight at once on the one connection. A server that goes away fails requests with
``BlockError(EIO)``, or, with ``reconnect-delay``, holds them that long for a reconnect
and then resumes them with nothing lost.
"""
import errno
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from pyrep.constants import BS_ALLOCATED, BS_DATA, BS_OFFSET_VALID, BS_ZERO, REQ_FUA, REQ_MAY_UNMAP, REQ_NO_FALLBACK
from pyrep.driver import BlockDriver
from pyrep.errors import BlockError, OptionError
from pyrep.nbd import proto
from pyrep.nbd.client import DEFAULT_PORT, Address, NbdClient, tls_client_context
from pyrep.options import Opt

__all__ = ["NbdDriver", "parse_uri"]

_TLS_SCHEMES = ("nbds", "nbds+unix", "nbds+tcp")
_UNIX_SCHEMES = ("nbd+unix", "nbds+unix")


def parse_uri(uri, where="nbd: option 'filename'"):
    """``(Address, export, tls)`` of an NBD URI (the NBD project's URI format, as QEMU reads it)."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in NbdDriver.protocol_schemes:
        raise OptionError(f"{where}: {uri!r} is not an NBD URI (schemes: {', '.join(NbdDriver.protocol_schemes)})")
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if scheme in _UNIX_SCHEMES:
        if parts.netloc:
            raise OptionError(f"{where}: {scheme}:// takes no host ({parts.netloc!r}); the socket is ?socket=PATH")
        sockets = [v for k, v in query if k == "socket"]
        extra = sorted({k for k, _ in query if k != "socket"})
        if extra:
            raise OptionError(f"{where}: unknown URI parameter(s) {', '.join(extra)} (only 'socket')")
        if len(sockets) != 1 or not sockets[0]:
            raise OptionError(f"{where}: {scheme}:// needs exactly one ?socket=PATH")
        addr = Address("unix", path=sockets[0])
    else:
        if query:
            raise OptionError(f"{where}: {scheme}:// takes no URI parameters "
                              f"({', '.join(sorted({k for k, _ in query}))})")
        if not parts.hostname:
            raise OptionError(f"{where}: {uri!r} names no host")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise OptionError(f"{where}: {uri!r} has an invalid port") from None
        addr = Address("inet", host=parts.hostname, port=port)
    return addr, export, scheme in _TLS_SCHEMES


def make_uri(addr, export, tls=False):
    """The URI of an export (what the node shows as its filename)."""
    scheme = "nbds" if tls else "nbd"
    path = quote(export, safe="")
    if addr.type == "unix":
        return f"{scheme}+unix:///{path}?socket={quote(addr.path, safe='/')}"
    host = f"[{addr.host}]" if ":" in addr.host else addr.host
    port = "" if addr.port == DEFAULT_PORT else f":{addr.port}"
    return f"{scheme}://{host}{port}/{path}"


def _extent_flags(state):
    """pyrep's block-status flags of a ``base:allocation`` state. A hole that may not read as zeroes
    is reported as data: the node layer would otherwise take an unallocated protocol range for zeroes."""
    if state & proto.STATE_ZERO:
        return BS_ZERO | BS_ALLOCATED | BS_OFFSET_VALID | (0 if state & proto.STATE_HOLE else BS_DATA)
    return BS_DATA | BS_ALLOCATED | BS_OFFSET_VALID


class NbdDriver(BlockDriver):
    format_name = "nbd"
    protocol_name = "nbd"
    protocol_schemes = ("nbd", "nbd+unix", "nbd+tcp", "nbds", "nbds+unix", "nbds+tcp")
    options = (
        Opt("server", "any", help="SocketAddress: {type: inet, host, port} or {type: unix, path}"),
        Opt("export", "string", help="the export's name (default: the server's default export, \"\")"),
        Opt("filename", "string", help="an NBD URI instead of server/export: nbd://host[:port]/export, "
                                       "nbd+unix:///export?socket=PATH, nbds://..."),
        Opt("tls-creds", "string", help="id of a tls-creds-x509 object (endpoint=client)"),
        Opt("tls-hostname", "string", help="the name the server's certificate must carry "
                                           "(default: the inet host; required over unix sockets)"),
        Opt("reconnect-delay", "number", default=0, min=0, max=0xFFFFFFFF,
            help="seconds requests wait for a reconnect after the server goes away (0: fail at once)"),
        Opt("open-timeout", "number", default=0, min=0, max=0xFFFFFFFF,
            help="seconds to keep trying to connect when opening (0: try once)"),
        Opt("x-dirty-bitmap", "string", help="accepted for QEMU compatibility; not supported"),
    )

    # ------------------------------------------------------------ life cycle
    def open(self, opts):
        addr, export, tls = self._address(opts)
        creds_id, hostname = opts.get("tls-creds"), opts.get("tls-hostname")
        if tls and not creds_id:
            raise OptionError("nbd: an nbds:// URI needs option 'tls-creds' (a tls-creds-x509 object)")
        if opts.get("x-dirty-bitmap"):
            raise OptionError("nbd: option 'x-dirty-bitmap' is not supported")
        context = None
        if creds_id:
            if hostname is None:
                if addr.type != "inet":
                    raise OptionError("nbd: option 'tls-hostname' is required for TLS over a unix socket")
                hostname = addr.host
            context = tls_client_context(creds_id, "nbd: option 'tls-creds'")
        elif hostname is not None:
            raise OptionError("nbd: option 'tls-hostname' needs option 'tls-creds'")
        self.client = NbdClient(addr, export, tls=context, tls_hostname=hostname,
                                reconnect_delay=opts["reconnect-delay"], open_timeout=opts["open-timeout"])
        self.client.connect()
        info = self.client.info
        self.node.filename = make_uri(addr, export, bool(creds_id))
        if info.has(proto.TFLAG_READ_ONLY) and not self.node.read_only:
            if not opts.get("auto-read-only"):
                self.client.close()
                raise BlockError(errno.EPERM, f"nbd: export '{export}' on {addr} is read-only "
                                              f"(open with read-only=on)")
            self.node.set_read_only_flag(True)
        self.request_alignment = info.min_block

    def _address(self, opts):
        uri, server, export = opts.get("filename"), opts.get("server"), opts.get("export")
        if uri is not None:
            if server is not None or export is not None:
                raise OptionError("nbd: option 'filename' cannot be combined with 'server' or 'export'")
            return parse_uri(uri)
        if server is None:
            raise OptionError("nbd: option 'server' is required ({'type': 'unix', 'path': ...} or "
                              "{'type': 'inet', 'host': ..., 'port': ...}), or a 'filename' URI")
        return Address.from_dict(server), export or "", False

    def close(self):
        client = getattr(self, "client", None)
        if client is not None:
            client.close()

    def getlength(self):
        return self.client.info.size

    def reopen_prepare(self, read_only):
        if not read_only and self.client.info.has(proto.TFLAG_READ_ONLY):
            raise BlockError(errno.EPERM, f"nbd: export '{self.client.export}' on {self.client.address} "
                                          f"is read-only")

    # ------------------------------------------------------------------ I/O
    def preadv(self, offset, length, iov):
        self.client.read(offset, length, iov)

    def pwritev(self, offset, length, iov, flags=0):
        self.client.write(offset, length, iov, fua=bool(flags & REQ_FUA))

    def pwritev_batch_start(self, reqs):
        # one message for all of them, then every reply: a replication primary forwards a burst of
        # guest writes with one wake-up of the secondary instead of one per write
        return self.client.write_batch_start([(off, n, iov, bool(flags & REQ_FUA)) for off, n, iov, flags in reqs])

    def pwrite_zeroes(self, offset, length, flags=0):
        self.client.write_zeroes(offset, length, may_unmap=bool(flags & REQ_MAY_UNMAP),
                                 fast=bool(flags & REQ_NO_FALLBACK), fua=bool(flags & REQ_FUA))

    def pdiscard(self, offset, length):
        self.client.trim(offset, length)

    def flush(self):
        self.client.flush()

    def block_status(self, offset, length):
        """The first extent of ``base:allocation``, merged with the extents after it that have the same
        state (one request answers a whole run of them)."""
        extents = self.client.block_status(offset, length)
        n, state = extents[0]
        for ln, st in extents[1:]:
            if st != state:
                break
            n += ln
        return (_extent_flags(state), max(1, min(n, length)), offset, self.node)

    def get_info(self):
        info = self.client.info
        out = {"export": info.name, "server": self.client.address.to_dict()}
        if info.description:
            out["description"] = info.description
        return out
