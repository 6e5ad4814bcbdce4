"""Image files: create and check (the library side of ``pyrep-img create/check``)."""
from ._core.registry import get_driver
from .errors import OptionError
from .graph import backing_options, open_node, probe_format
from .options import parse_size

__all__ = ["create_image", "check_image"]


def create_image(filename, fmt, size, backing_file=None, backing_fmt=None, **fmt_options):
    """Create an image file of format ``fmt`` (``raw``, ``qcow2``...) and virtual ``size``.

    Extra keyword options go to the format (``cluster_size=65536``,
    ``compat="0.10"``, ``refcount_bits``, ``preallocation``). With a backing
    file and no size (``None``), the size is the backing file's."""
    drv = get_driver(fmt)
    if not drv.implements("create"):
        raise OptionError(f"driver '{fmt}' cannot create images")
    if backing_file is not None and not drv.supports_backing:
        raise OptionError(f"format '{fmt}' does not support backing files")
    if backing_file is not None:
        # the backing as the new image will open it: through the option layer (json: names too)
        bopts = backing_options(backing_file, backing_fmt, filename)
        if backing_fmt is None and not backing_file.startswith("json:"):
            backing_fmt = bopts["driver"]           # probed
        if size is None:
            bopts["read-only"] = True
            if isinstance(bopts.get("file"), dict) and bopts["file"].get("driver") == "file":
                bopts["file"]["locking"] = "off"
            node = open_node(bopts)
            try:
                size = node.length
            finally:
                node.close()
    if size is None:
        raise OptionError(f"create {filename}: a size is required (no backing file to take it from)")
    size = parse_size(size, "create: size")
    opts = {k.replace("-", "_"): v for k, v in fmt_options.items()}
    if backing_file is not None:
        opts["backing_file"] = backing_file
        opts["backing_fmt"] = backing_fmt
    drv.create(filename, size, opts)


def check_image(filename, fmt=None, repair=None):
    """Check an image's consistency; ``repair`` is None, ``"leaks"`` or ``"all"``.

    Returns a dict like ``qemu-img check --output=json`` (``corruptions``,
    ``leaks``, ``check-errors``, ...). Formats without metadata report a clean result."""
    if repair not in (None, "leaks", "all"):
        raise OptionError(f"check: repair must be None, 'leaks' or 'all', got {repair!r}")
    if fmt is None:
        fmt = probe_format(filename)
    drv = get_driver(fmt)
    opts = {"driver": fmt, "read-only": repair is None, "file": {"driver": "file", "filename": filename}}
    if drv.supports_backing:
        opts["backing"] = None  # a check looks at this image only
    if repair is not None and any(o.name == "x-check-repair" for o in drv.options):
        opts["x-check-repair"] = True  # lets a repair open an image marked corrupt (QEMU's BDRV_O_CHECK)
    node = open_node(opts)
    try:
        if not node.drv.implements("check"):
            return {"filename": filename, "format": fmt, "check-errors": 0, "corruptions": 0, "leaks": 0}
        result = node.driver.check(repair)
        result.setdefault("filename", filename)
        result.setdefault("format", fmt)
        return result
    finally:
        node.close()
