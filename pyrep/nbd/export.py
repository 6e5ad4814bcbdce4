"""An NBD export: a name, a BlockBackend on a node, the capability flags the client is told.

The backend shares writes and resizes with the node's other users (as QEMU's exports do), so a disk
that something else writes — a replicated secondary disk — can be exported. The rare transmission
commands (FLUSH, TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS) run here; READ and WRITE go from the
server's C loop straight to the backend.

The registry of exports lives in :mod:`pyrep.nbd.server` (exports exist only while a server runs,
as in QEMU).
"""
import errno
import threading

from .. import constants as C
from ..backend import open_backend
from ..errors import BlockError, OptionError
from . import proto as P

MAX_EXTENTS = 2048          # descriptors in one BLOCK_STATUS reply (the client asks again for the rest)


class Export:
    """One export. ``id`` defaults to ``name`` (QEMU's block-export-add has both)."""

    def __init__(self, node, name, writable=False, description=None, id=None):
        if writable and node.read_only:
            raise OptionError(f"export '{name}': node '{node.name}' is read-only, it cannot be exported writable")
        if description is not None and len(description.encode()) > P.MAX_STRING:
            raise OptionError(f"export '{name}': description longer than {P.MAX_STRING} bytes")
        self.id = id or name
        self.name = name
        self.description = description
        self.writable = writable
        self.node = node
        self.blk = open_backend(node, read_only=not writable, share_rw=True)
        self.shutting_down = False
        # writethrough: every write, trim and zeroing is stable before it is acknowledged (as if the
        # client had set FUA); set before clients connect (pyrep-nbd --cache=writethrough/directsync)
        self.writethrough = False
        self.connections = set()        # server-side connection objects (guarded by lock)
        self.lock = threading.Lock()

    # ------------------------------------------------------------ what clients are told
    @property
    def size(self):
        return self.blk.length

    @property
    def tflags(self):
        f = (P.TFLAG_HAS_FLAGS | P.TFLAG_SEND_FLUSH | P.TFLAG_SEND_FUA | P.TFLAG_SEND_CACHE |
             P.TFLAG_SEND_DF | P.TFLAG_CAN_MULTI_CONN)
        if self.writable:
            f |= P.TFLAG_SEND_TRIM | P.TFLAG_SEND_WRITE_ZEROES | P.TFLAG_SEND_FAST_ZERO
        else:
            f |= P.TFLAG_READ_ONLY
        return f

    def info(self):
        """A dict for queries (QEMU's BlockExportInfo fields, plus NBD ones)."""
        return {"id": self.id, "type": "nbd", "node-name": self.node.name, "shutting-down": self.shutting_down,
                "name": self.name, "description": self.description, "writable": self.writable,
                "size": self.size, "clients": len(self.connections)}

    # ------------------------------------------------------------ rare commands (any thread)
    def command(self, cmd, flags, offset, length):
        """FLUSH, TRIM, WRITE_ZEROES, CACHE (already validated); errors raise BlockError."""
        if cmd == P.CMD_FLUSH:
            self.blk.flush()
        elif cmd == P.CMD_TRIM:
            self.blk.pdiscard(offset, length)
            if flags & P.CMD_FLAG_FUA or self.writethrough:
                self.blk.flush()
        elif cmd == P.CMD_WRITE_ZEROES:
            if flags & P.CMD_FLAG_FAST_ZERO:
                # the spec wants ENOTSUP unless zeroing is certain to be fast; the engine's drivers do
                # not report that (none honours REQ_NO_FALLBACK), so the client falls back at once
                raise BlockError(errno.ENOTSUP, f"export '{self.name}': fast zeroing is not available")
            f = C.REQ_FUA if flags & P.CMD_FLAG_FUA or self.writethrough else 0
            self.blk.pwrite_zeroes(offset, length, f, may_unmap=not flags & P.CMD_FLAG_NO_HOLE)
        elif cmd == P.CMD_CACHE:
            pass        # a hint: our reads are served from the node as they come; nothing to prefetch
        else:           # validation rejects everything else
            raise AssertionError(f"command {cmd} reached the export")

    def block_status(self, offset, length, flags):
        """``base:allocation`` descriptors for ``[offset, offset+length)`` as the chunk's bytes after
        the context id: ``(length, NBD_STATE_*)`` pairs, adjacent equal states merged, at most
        :data:`MAX_EXTENTS` (one with REQ_ONE)."""
        one = flags & P.CMD_FLAG_REQ_ONE
        end = offset + length
        out = []
        pos = offset
        while pos < end:
            bs = self.blk.block_status(pos, end - pos)
            n = bs.length
            if n <= 0:
                break
            state = (0 if bs.flags & C.BS_DATA else P.STATE_HOLE) | (P.STATE_ZERO if bs.flags & C.BS_ZERO else 0)
            if out and out[-1][1] == state:
                out[-1][0] += n
            elif len(out) == MAX_EXTENTS:
                break
            else:
                out.append([n, state])
            pos += n
            if one:
                break
        if not out:         # the node ended before the export did (cannot happen after validation)
            out.append([length, P.STATE_HOLE | P.STATE_ZERO])
        return b"".join(P.EXTENT.pack(n, s) for n, s in out)

    def close(self):
        """Flush (writable) and release the backend."""
        self.blk.close()

    def __repr__(self):
        return f"<Export {self.name!r} node={self.node.name} {'rw' if self.writable else 'ro'}>"
