"""The options several pyrep-img commands share, each defined once with its help text.

qemu-img spells them the same in every command (``-f``, ``--output``, ``-U``, ``--image-opts``,
``-q``, ``-p``, ``-t``/``-T``); a command's ``add_arguments`` calls these and adds its own.
"""
from .common import UsageError


def output_format(text):
    """``--output``: ``human`` or ``json`` (qemu-img's own message otherwise)."""
    if text not in ("human", "json"):
        raise UsageError("--output must be used with human or json as argument.")
    return text


def add_format(s, flag="-f", dest="fmt", what="the image"):
    s.add_argument(flag, dest=dest, metavar="FMT",
                   help=f"format of {what} (qcow2, raw, ...); probed from its first bytes when not given")


def add_image_opts(s):
    s.add_argument("--image-opts", action="store_true",
                   help="the filename is a drive string of node options (driver=qcow2,file.filename=x.qcow2)")


def add_output(s):
    s.add_argument("--output", type=output_format, default="human", metavar="{human,json}",
                   help="output as text for people (default) or as JSON")


def add_force_share(s):
    s.add_argument("-U", "--force-share", action="store_true",
                   help="open read-only without taking locks, sharing the image with a writer")


def add_quiet(s):
    s.add_argument("-q", dest="quiet", action="store_true", help="quiet: print no progress or summary")


def add_progress(s):
    s.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")


def add_cache(s, flag="-t", dest="cache", what="the image", default=None):
    s.add_argument(flag, dest=dest, metavar="CACHE", default=default,
                   help=f"cache mode of {what}: writeback (default), writethrough, none, directsync, unsafe")


def add_filename(s, what="the image"):
    s.add_argument("filename", help=f"{what} (a file, a json:{{...}} pseudo-filename or a URI)")
