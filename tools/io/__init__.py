"""``pyrep-io``: qemu-io's command line on pyrep's block layer.

    pyrep-io [-f fmt] [-r] [-U] [-t cache] -c 'write -P 0xab 0 64k' -c 'read -P 0xab 0 64k' image
    pyrep-io image            # interactive: commands from stdin at a "qemu-io> " prompt

Commands (``-c help`` lists them): read, write, discard, flush, length, aio_read, aio_write, aio_flush,
map, info, help, quit. Output and messages follow qemu-io 7.2 ("wrote N/N bytes at offset O",
"Pattern verification failed at offset O, N bytes"); the exit code is 1 if any command failed.
``cli.py`` is the command line, ``commands.py`` the command table, ``output.py`` qemu-io's formats.
"""
from .cli import main

__all__ = ["main"]
