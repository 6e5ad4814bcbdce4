"""``pyrep-img info``: show information about an image."""
import os

from pyrep.errors import Error

from ..opening import is_local, is_uri, open_image
from . import args
from .common import jdump, size_to_str
from .image import full_backing_name


def add_arguments(s):
    """The command's options and operands."""
    args.add_format(s)
    args.add_image_opts(s)
    args.add_output(s)
    s.add_argument("--backing-chain", action="store_true", help="show every image of the backing chain")
    args.add_force_share(s)
    args.add_filename(s)


_INFO_KEYS = ("backing-filename-format", "virtual-size", "filename", "cluster-size", "format", "actual-size",
              "encrypted", "format-specific", "full-backing-filename", "backing-filename", "dirty-flag")


def image_info(name, fmt=None, force_share=False, image_opts=False):
    """qemu-img's ImageInfo for one image (its backing chain is not opened)."""
    with open_image(name, fmt, image_opts=image_opts, backing=False, force_share=force_share) as blk:
        node = blk.node
        # a drive string or json: names a graph; the image is the file it opened, as qemu-img shows it
        filename = name if not image_opts and is_local(name) else (node.filename or name)
        fmt = node.drv.format_name
        extra = {}
        try:
            extra = node.driver.get_info() or {}
        except Error:
            extra = {}
        info = {}
        bfmt = extra.get("backing-filename-format")
        if bfmt:
            info["backing-filename-format"] = bfmt
        info["virtual-size"] = blk.length
        info["filename"] = filename
        if extra.get("cluster-size"):
            info["cluster-size"] = extra["cluster-size"]
        info["format"] = fmt
        try:
            st = os.stat(filename)
            info["actual-size"] = st.st_blocks * 512
        except OSError:
            pass
        if extra.get("encrypted"):
            info["encrypted"] = True
        spec = extra.get("format-specific")
        if spec:
            data = spec.get("data")
            if isinstance(data, dict):
                # qemu's field order
                data = {k: data[k] for k in [k for k in _SPEC_ORDER if k in data] +
                        [k for k in data if k not in _SPEC_ORDER]}
                spec = dict(spec, data=data)
            info["format-specific"] = spec
        bname = extra.get("backing-filename")
        if bname:
            if not is_uri(filename) or os.path.isabs(bname) or is_uri(bname):
                full = extra.get("full-backing-filename") or full_backing_name(filename, bname)
                info["full-backing-filename"] = full
            # else: a relative name beside a URI has no directory to be relative to (as qemu-img)
            info["backing-filename"] = bname
        info["dirty-flag"] = bool(extra.get("dirty-flag", extra.get("dirty", False)))
        return info


def _human_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


_SPEC_ORDER = ("compat", "compression-type", "lazy-refcounts", "refcount-bits", "corrupt", "extended-l2")


def dump_spec(data, indent):
    """Format-specific information as qemu-img and qemu-io print it (``key: value``, nested by indent)."""
    keys = [k for k in _SPEC_ORDER if k in data] + [k for k in data if k not in _SPEC_ORDER]
    for k in keys:
        v = data[k]
        name = k.replace("-", " ")
        if isinstance(v, dict):
            print(f"{' ' * indent}{name}:")
            dump_spec(v, indent + 4)
        elif isinstance(v, list):
            print(f"{' ' * indent}{name}:")
            for item in v:
                if isinstance(item, dict):
                    dump_spec(item, indent + 8)
                else:
                    print(f"{' ' * (indent + 4)}[{_human_value(item)}]")
        else:
            print(f"{' ' * indent}{name}: {_human_value(v)}")


def dump_human_info(info):
    print(f"image: {info['filename']}")
    print(f"file format: {info['format']}")
    print(f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)")
    if "actual-size" in info:
        print(f"disk size: {size_to_str(info['actual-size'])}")
    else:
        print("disk size: unavailable")
    if info.get("encrypted"):
        print("encrypted: yes")
    if "cluster-size" in info:
        print(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        print("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            line += f" (actual path: {full})"
        print(line)
        if "backing-filename-format" in info:
            print(f"backing file format: {info['backing-filename-format']}")
    spec = info.get("format-specific")
    if spec:
        print("Format specific information:")
        dump_spec(spec.get("data", {}), 4)


def run(a):
    infos = []
    filename, fmt, image_opts = a.filename, a.fmt, a.image_opts
    if a.backing_chain:
        # the engine's one backing-loop check (in the graph, through the option layer, so json: and nbd
        # backings count too) runs when the whole chain opens: a loop is refused here, before the walk
        with open_image(filename, fmt, image_opts=image_opts, backing=True, force_share=a.force_share):
            pass
    while True:
        info = image_info(filename, fmt, force_share=a.force_share, image_opts=image_opts)
        infos.append(info)
        if not a.backing_chain or "full-backing-filename" not in info:
            break
        filename, image_opts = info["full-backing-filename"], False
        fmt = info.get("backing-filename-format")
    if a.output == "json":
        jdump(infos if a.backing_chain else infos[0])
    else:
        for i, info in enumerate(infos):
            if i:
                print()
            dump_human_info(info)
    return 0
