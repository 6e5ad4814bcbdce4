"""How pyrep-img and pyrep-io turn the image named on their command line into a BlockBackend.

An image is named as qemu-img and qemu-io name it:

- a file name (``x.qcow2``), its format probed unless ``-f`` gives it;
- a ``json:{...}`` pseudo-filename, or with ``--image-opts`` a drive string
  (``driver=qcow2,file.filename=x.qcow2``): any graph the option layer can build;
- a URI that names a protocol (``nbd://host:port/export``, ``nbd+unix:///export?socket=path``), the
  format probed through that protocol.

Errors are worded as QEMU words them for the common cases (``open_error``), so a script that reads
qemu-img's messages reads ours.
"""
import errno
import os

import pyrep
from pyrep._core.registry import drivers, get_driver
from pyrep.errors import BlockError, Error
from pyrep.graph import probe_format, protocol_for, uri_scheme
from pyrep.options import normalize

QCOW2_MAGIC = b"QFI\xfb"


def formats():
    """The names ``-f`` most likely means: image formats (not protocols, not filters)."""
    return [name for name in drivers() if get_driver(name).is_format]


def unknown_format(name, template="Unknown driver '{name}'"):
    """The error for a ``-f``/``-O``/``-F`` that names no driver: QEMU's words, then the formats."""
    return Error(template.format(name=name) + f" (known formats: {', '.join(formats())})")


def driver_of(name, template="Unknown driver '{name}'"):
    """The driver class registered as ``name``; an unknown name is ``unknown_format``."""
    if name not in drivers():
        raise unknown_format(name, template)
    return get_driver(name)


def is_uri(name):
    """Whether ``name`` is a ``scheme://...`` URI (which names its protocol) rather than a path."""
    return uri_scheme(name) is not None


def is_local(name):
    """Whether ``name`` is a plain file name (not ``json:``, not a URI)."""
    return not name.startswith("json:") and not is_uri(name)


def _probe(file_opts):
    """QEMU's format probe through the protocol: qcow2 if its magic is at offset 0, else raw."""
    filename = file_opts.get("filename")
    if file_opts.get("driver", "file") == "file" and isinstance(filename, str) and is_local(filename):
        return probe_format(filename)
    opts = dict(file_opts)
    if "driver" not in opts and isinstance(filename, str):
        opts["driver"] = protocol_for(filename)     # the protocol itself, not a format probed over it
    with pyrep.open_backend(opts, read_only=True, shared="all") as blk:
        head = blk.pread(0, min(4, blk.length)) if blk.length else b""
    return "qcow2" if head == QCOW2_MAGIC else "raw"


def _file_child(name, force_share):
    if is_uri(name):
        return {"driver": protocol_for(name), "filename": name}
    f = {"driver": "file", "filename": name}
    if force_share:
        f["locking"] = "off"
    return f


def image_options(name, fmt=None, image_opts=False, backing=True, read_only=True, cache=None,
                  force_share=False, extra=None, repair=False, guarded_probe=False):
    """The option dict that opens ``name`` (a file name, URI, ``json:`` string or, with
    ``image_opts``, a drive string). ``backing=False`` opens the image alone (no backing chain);
    ``extra`` is merged into the top node's options; ``repair``: opened for a check's repair, which
    may open an image marked corrupt (QEMU's BDRV_O_CHECK). ``guarded_probe``: a format not given is
    probed by the engine (``filename`` without ``driver``), which keeps QEMU's guard on a probed raw
    image: no write may make its first sector look like another format (as qemu-io opens)."""
    if image_opts or name.startswith("json:"):
        opts = normalize(name)
        if "driver" not in opts:
            if fmt is None:
                child = opts.get("file")
                if isinstance(child, dict):
                    fmt = _probe(child)
                elif isinstance(opts.get("filename"), str):
                    child = _file_child(opts.pop("filename"), force_share)
                    opts["file"] = child
                    fmt = _probe(child)
                else:
                    raise Error("A block device must be specified for \"file\"" if image_opts
                                else "Cannot find device=\"\" nor node-name=\"\"")
            opts["driver"] = fmt
    elif guarded_probe and fmt is None and backing and not repair:
        f = _file_child(name, force_share)
        opts = {"filename": name, "file": {k: v for k, v in f.items() if k != "filename"}}
        return _common(opts, None, read_only, backing, cache, force_share, repair, extra)
    else:
        f = _file_child(name, force_share)
        if fmt is None:
            fmt = _probe(f)
        drv = driver_of(fmt)
        # -f file (a protocol named as the format) opens the protocol alone, as qemu-img does
        opts = dict(f, driver=fmt) if drv.protocol_name else {"driver": fmt, "file": f}
    return _common(opts, driver_of(opts["driver"]), read_only, backing, cache, force_share, repair, extra)


def _common(opts, drv, read_only, backing, cache, force_share, repair, extra):
    """The options every opening shares; ``drv`` is the top format's driver (None: probed at open)."""
    opts["read-only"] = read_only
    if not backing and drv is not None and drv.supports_backing:
        opts["backing"] = None
    if cache:
        opts["cache"] = dict(cache)
    if force_share:
        opts["force-share"] = True
    if repair and drv is not None and any(o.name == "x-check-repair" for o in drv.options):
        opts["x-check-repair"] = True
    if extra:
        opts.update(extra)
    return opts


def open_error(name, e, plain=True):
    """The reason ``name`` did not open, as QEMU words it (without qemu-img's "Could not open 'x': ").
    ``plain``: ``name`` is a plain file name (not a drive string, ``json:`` or URI)."""
    if isinstance(e, BlockError):
        if e.errno == errno.ENOENT and e.filename:
            if plain and os.path.abspath(e.filename) != os.path.abspath(name):
                # a missing backing file; QEMU names it as the image names it, relative to the image
                missing = e.filename if os.path.isabs(name) else os.path.relpath(e.filename)
                return f"Could not open backing file: Could not open '{missing}': No such file or directory"
            return f"Could not open '{e.filename}': No such file or directory"
        return e.strerror or os.strerror(e.errno)
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)


def open_image(name, fmt=None, image_opts=False, backing=True, read_only=True, cache=None,
               force_share=False, extra=None, repair=False, guarded_probe=False):
    """A BlockBackend on the image ``name`` (see ``image_options``). An image that does not open raises
    ``OpenError`` (its ``.reason`` in QEMU's words, see ``open_error``); ``-f`` with ``--image-opts``
    raises ``Error`` as qemu-img refuses it."""
    if image_opts and fmt is not None:
        raise Error("--image-opts and --format are mutually exclusive")
    if not image_opts and is_local(name):
        if not os.path.exists(name):
            raise OpenError(name, f"Could not open '{name}': No such file or directory")
        if fmt == "qcow2" and probe_format(name) != "qcow2":
            raise OpenError(name, "Image is not in qcow2 format")
    try:
        opts = image_options(name, fmt, image_opts, backing, read_only, cache, force_share, extra, repair,
                             guarded_probe)
        return pyrep.open_backend(opts, read_only=read_only, shared="all" if force_share else None)
    except (Error, OSError) as e:
        raise OpenError(name, open_error(name, e, not image_opts and is_local(name))) from None


class OpenError(Error):
    """An image that did not open: ``.name`` as given, ``.reason`` in QEMU's words."""

    def __init__(self, name, reason):
        super().__init__(f"Could not open '{name}': {reason}")
        self.name, self.reason = name, reason
