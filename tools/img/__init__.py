"""``pyrep-img``: qemu-img's command line on pyrep's block layer.

Subcommands: create, info, check, map, compare, convert, commit, rebase, bench, one module each
(``cli.py`` is the shared core). Output text, JSON field names and exit codes follow qemu-img 7.2, so
scripts written for qemu-img keep working:

- check: 0 clean, 1 check error, 2 corruptions, 3 leaks only, 63 format without checks;
- compare: 0 identical, 1 different, 2 error;
- everything else: 0 success, 1 error.

Images are opened format-agnostically as ``{"driver": fmt, "file": {"driver":
"file", "filename": path}}``; ``fmt`` is probed (``pyrep.graph.probe_format``)
unless ``-f`` names it.
"""
from .cli import main

__all__ = ["main"]
