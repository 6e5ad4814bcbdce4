"""User-creatable objects (QEMU's ``--object`` / ``object-add``), looked up by id.

Today one type: ``tls-creds-x509``, x509 credentials read from a directory laid out as QEMU expects::

    ca-cert.pem                        the CA that signs the peer's certificate
    server-cert.pem, server-key.pem    endpoint "server"
    client-cert.pem, client-key.pem    endpoint "client" (optional; needed when the server verifies peers)

``object_add`` checks the files now, as QEMU does when it loads the credentials, so a typo fails at
creation with an :class:`~pyrep.errors.OptionError` naming the object and the file, not at the first
connection. :meth:`TLSCredsX509.ssl_context` builds an :class:`ssl.SSLContext` for the endpoint.
"""
import os
import ssl
import threading

from .errors import OptionError

__all__ = ["object_add", "object_del", "lookup_object", "objects", "TLSCredsX509"]

_objects = {}
_lock = threading.Lock()


def _bool(value, where):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("on", "yes", "true", "1", "off", "no", "false", "0"):
        return value.lower() in ("on", "yes", "true", "1")
    raise OptionError(f"{where}: expected a boolean (on/off), got {value!r}")


class TLSCredsX509:
    """x509 credentials for one endpoint (``"server"`` or ``"client"``)."""

    qom_type = "tls-creds-x509"

    def __init__(self, id, dir, endpoint="client", verify_peer=True, priority=None):
        where = f"object '{id}' (tls-creds-x509)"
        if endpoint not in ("server", "client"):
            raise OptionError(f"{where}: endpoint must be 'server' or 'client', not {endpoint!r}")
        if not isinstance(dir, str) or not os.path.isdir(dir):
            raise OptionError(f"{where}: dir {dir!r} is not a directory")
        self.id = id
        self.dir = dir
        self.endpoint = endpoint
        self.verify_peer = _bool(verify_peer, f"{where}: verify-peer")
        self.priority = priority    # accepted for command-line compatibility (GnuTLS priority strings)
        need = ["ca-cert.pem"] if self.verify_peer or endpoint == "client" else []
        if endpoint == "server":
            need += ["server-cert.pem", "server-key.pem"]
        for name in need:
            if not os.path.isfile(self.path(name)):
                raise OptionError(f"{where}: missing {self.path(name)}")
        self.ssl_context()      # load now: a bad certificate fails here, naming the object

    def path(self, name):
        return os.path.join(self.dir, name)

    def ssl_context(self):
        """A fresh :class:`ssl.SSLContext` for this endpoint (TLS 1.2+).

        Server: presents ``server-cert.pem``; with ``verify_peer`` it requires a client certificate
        signed by ``ca-cert.pem``. Client: verifies the server against ``ca-cert.pem`` (the caller
        passes the expected host name to ``wrap_socket``; with ``verify_peer=False`` nothing is
        checked) and presents ``client-cert.pem`` when the directory holds one."""
        where = f"object '{self.id}' (tls-creds-x509)"
        try:
            if self.endpoint == "server":
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.load_cert_chain(self.path("server-cert.pem"), self.path("server-key.pem"))
                if self.verify_peer:
                    ctx.verify_mode = ssl.CERT_REQUIRED
                    ctx.load_verify_locations(self.path("ca-cert.pem"))
            else:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                if self.verify_peer:
                    ctx.load_verify_locations(self.path("ca-cert.pem"))
                else:
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                if os.path.isfile(self.path("client-cert.pem")):
                    ctx.load_cert_chain(self.path("client-cert.pem"), self.path("client-key.pem"))
        except (ssl.SSLError, OSError) as e:
            raise OptionError(f"{where}: cannot load the credentials in {self.dir}: {e}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def describe(self):
        return {"id": self.id, "qom-type": self.qom_type, "dir": self.dir, "endpoint": self.endpoint,
                "verify-peer": self.verify_peer}

    def __repr__(self):
        return f"<TLSCredsX509 {self.id} {self.endpoint} dir={self.dir}>"


_TYPES = {TLSCredsX509.qom_type: TLSCredsX509}


def object_add(qom_type, id, **props):
    """Create an object of ``qom_type`` named ``id`` (QEMU's property names, ``-`` or ``_``).

    ``pyrep.object_add("tls-creds-x509", id="tls0", dir="/etc/pki/qemu", endpoint="server",
    verify_peer=True)``. Unknown types, duplicate ids and unknown properties → OptionError."""
    cls = _TYPES.get(qom_type)
    if cls is None:
        raise OptionError(f"unknown object type {qom_type!r} (known: {', '.join(sorted(_TYPES))})")
    if not isinstance(id, str) or not id:
        raise OptionError(f"object of type {qom_type}: id must be a non-empty string")
    kwargs = {}
    allowed = cls.__init__.__code__.co_varnames[2:cls.__init__.__code__.co_argcount]
    for key, value in props.items():
        k = key.replace("-", "_")
        if k not in allowed:
            raise OptionError(f"object '{id}' ({qom_type}): unknown property {key!r} "
                              f"(known: {', '.join(a.replace('_', '-') for a in allowed)})")
        kwargs[k] = value
    if "dir" not in kwargs:
        raise OptionError(f"object '{id}' ({qom_type}): property 'dir' is required")
    with _lock:
        if id in _objects:
            raise OptionError(f"duplicate object id '{id}'")
        obj = cls(id, **kwargs)
        _objects[id] = obj
    return obj


def object_del(id):
    """Remove the object ``id`` (connections already made with it keep their TLS sessions)."""
    with _lock:
        if _objects.pop(id, None) is None:
            raise OptionError(f"no object with id '{id}'")


def lookup_object(id, qom_type=None):
    """The object ``id`` (of ``qom_type`` when given); OptionError if there is none."""
    obj = _objects.get(id)
    if obj is None:
        raise OptionError(f"no object with id '{id}'" +
                          (f" (known: {', '.join(sorted(_objects))})" if _objects else ""))
    if qom_type is not None and obj.qom_type != qom_type:
        raise OptionError(f"object '{id}' is a {obj.qom_type}, not a {qom_type}")
    return obj


def objects():
    """Every object, by id."""
    return dict(_objects)


def parse_object(text):
    """``--object`` syntax: ``tls-creds-x509,id=tls0,dir=/x,endpoint=server`` → (type, props)."""
    parts = text.split(",")
    qom_type = parts[0]
    props = {}
    for p in parts[1:]:
        if "=" not in p:
            raise OptionError(f"--object {text!r}: expected key=value, got {p!r}")
        k, v = p.split("=", 1)
        props[k] = v
    if qom_type.startswith("qom-type="):
        qom_type = qom_type[len("qom-type="):]
    return qom_type, props
