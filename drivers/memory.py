"""``memory``: a sparse in-RAM disk that stores clusters compressed with blosc.

The recommended home of COLO active and hidden disks: it can have a backing
(so it serves as an overlay), ``make_empty`` is one dict clear, and block
status says which clusters this layer holds. Reads of clusters it does not
hold fall through to the backing (or read zeroes). Its real memory use
(compressed payload plus per-cluster overhead) is ``memory_used``.
"""
import errno
import sys
import threading

import blosc

from pyrep._core.iovec import IOVector
from pyrep.constants import BS_ALLOCATED, BS_DATA, BS_ZERO
from pyrep.driver import BlockDriver
from pyrep.errors import BlockError, OptionError
from pyrep.options import Opt

__all__ = ["MemoryDriver"]

blosc.set_releasegil(True)
# clusters are small (64 KiB): blosc's own worker threads cost more than they save, and
# pyrep's I/O threads already compress in parallel with the GIL released
blosc.set_nthreads(1)
_ZERO = b""                      # a cluster this layer holds that reads as zeroes
_PROBE = 4096                    # bytes compressed to decide whether a cluster is worth compressing
_ENTRY_OVERHEAD = sys.getsizeof(b"") + 2 * 8 + 56  # bytes object + dict slot, roughly
_CODECS = ("blosclz", "lz4", "lz4hc", "zlib", "zstd", "none")


def _free_slowly(clusters):
    """Drop ``clusters`` item by item: a Python loop gives the GIL back to the I/O threads
    (one dict.clear() of thousands of buffers would hold it for milliseconds)."""
    pop = clusters.popitem
    while clusters:
        pop()


class MemoryDriver(BlockDriver):
    format_name = "memory"
    protocol_name = "memory"
    supports_backing = True
    options = (
        Opt("size", "size", help="the disk's length (default: the backing's length)"),
        Opt("cluster-size", "size", default=65536, help="allocation unit, a power of two from 512 to 2M"),
        Opt("codec", "enum", default="lz4", choices=_CODECS, help="blosc codec for stored clusters"),
        Opt("level", "number", default=1, min=0, max=9, help="blosc compression level"),
        Opt("shuffle", "bool", default=True, help="blosc byte shuffle"),
        Opt("backing", "child", help="the overlay's backing node (a dict of options or a node name)"),
    )

    def open(self, opts):
        cs = opts["cluster-size"]
        if cs & (cs - 1) or not 512 <= cs <= 2 << 20:
            raise OptionError(f"memory: option '{self.node._path}cluster-size' must be a power of two from 512 "
                              f"to 2M, got {cs}")
        self.cluster_size = cs
        self._shift = cs.bit_length() - 1
        self._mask = cs - 1
        self._codec = opts["codec"]
        self._level = int(opts["level"])
        self._shuffle = blosc.SHUFFLE if opts["shuffle"] else blosc.NOSHUFFLE
        self.backing = self.node.open_backing(opts)
        size = opts.get("size")
        if size is None:
            if self.backing is None:
                raise OptionError(f"memory: option '{self.node._path}size' is required when there is no backing")
            size = self.backing.node.length
        self.size = size
        self._clusters = {}
        self._lock = threading.Lock()
        self._used = 0

    def close(self):
        self._clusters = {}
        self._used = 0

    def getlength(self):
        return self.size

    @property
    def memory_used(self):
        """Bytes of RAM the stored clusters take (compressed payload plus bookkeeping)."""
        return self._used

    def get_info(self):
        return {"memory-used": self._used, "allocated-clusters": len(self._clusters),
                "cluster-size": self.cluster_size, "codec": self._codec}

    # ------------------------------------------------------------ storage
    # A stored cluster is ``bytes`` (blosc-compressed) or ``bytearray`` (kept as is: it did not compress).
    def _compress(self, buf):
        if self._codec == "none":
            return bytearray(buf)
        if len(buf) >= 4 * _PROBE:
            # probe the first and last 4 KiB: incompressible data (encrypted, already compressed) is
            # common on disks and would cost a full compression attempt for nothing
            view = memoryview(buf)
            if self._incompressible(view[:_PROBE]) and self._incompressible(view[-_PROBE:]):
                return bytearray(buf)
        out = blosc.compress(buf, typesize=8, clevel=self._level, shuffle=self._shuffle, cname=self._codec)
        return out if len(out) < len(buf) else bytearray(buf)

    def _incompressible(self, view):
        out = blosc.compress(view, typesize=8, clevel=self._level, shuffle=self._shuffle, cname=self._codec)
        return len(out) > len(view) * 15 // 16

    @staticmethod
    def _decompress(entry):
        if type(entry) is bytearray:
            return entry
        return blosc.decompress(entry)

    def _store(self, idx, iov):
        """Keep cluster ``idx`` holding ``iov`` (cluster_size bytes); caller holds the lock."""
        if iov.is_zero():
            entry = _ZERO if self.backing is not None else None
        else:
            bufs = iov.buffers()
            entry = self._compress(bufs[0] if len(bufs) == 1 else iov.to_bytes())
        old = self._clusters.pop(idx, None)
        if old is not None:
            self._used -= len(old) + _ENTRY_OVERHEAD
        if entry is not None:
            self._clusters[idx] = entry
            self._used += len(entry) + _ENTRY_OVERHEAD

    def _drop(self, idx):
        old = self._clusters.pop(idx, None)
        if old is not None:
            self._used -= len(old) + _ENTRY_OVERHEAD

    def _read_backing(self, offset, length, iov, at):
        """Fill ``iov[at:at+length]`` with what the backing holds at ``offset`` (zeroes past its end)."""
        back = self.backing
        if back is None:
            iov.memset(at, 0, length)
            return
        blen = back.node.length
        n = max(0, min(length, blen - offset))
        if n:
            back.preadv(offset, n, iov.slice(at, n))
        if n < length:
            iov.memset(at + n, 0, length - n)

    def _cluster_bytes(self, idx):
        """The full current content of cluster ``idx`` as a bytearray."""
        entry = self._clusters.get(idx)
        cs = self.cluster_size
        if entry is None:
            buf = bytearray(cs)
            self._read_backing(idx << self._shift, cs, IOVector(buf), 0)
            return buf
        if entry is _ZERO or not entry:
            return bytearray(cs)
        return bytearray(self._decompress(entry))

    # ----------------------------------------------------------------- I/O
    def preadv(self, offset, length, iov):
        clusters, shift, mask, cs = self._clusters, self._shift, self._mask, self.cluster_size
        pos, end, done = offset, offset + length, 0
        while pos < end:
            idx = pos >> shift
            entry = clusters.get(idx)
            if entry is None:
                # coalesce a run of clusters this layer does not hold into one backing read
                run_end = min(end, (idx + 1) << shift)
                while run_end < end and (run_end >> shift) not in clusters:
                    run_end = min(end, run_end + cs)
                n = run_end - pos
                self._read_backing(pos, n, iov, done)
            else:
                n = min(cs - (pos & mask), end - pos)
                if not entry:
                    iov.memset(done, 0, n)
                else:
                    data = self._decompress(entry)
                    start = pos & mask
                    iov.copy_from(done, memoryview(data)[start:start + n])
            pos += n
            done += n

    def pwritev(self, offset, length, iov, flags=0):
        shift, mask, cs = self._shift, self._mask, self.cluster_size
        pos, end, done = offset, offset + length, 0
        with self._lock:
            while pos < end:
                idx = pos >> shift
                start = pos & mask
                n = min(cs - start, end - pos)
                if n == cs:
                    self._store(idx, iov.slice(done, cs))
                else:
                    buf = self._cluster_bytes(idx)
                    buf[start:start + n] = iov.copy_to(done, n)
                    self._store(idx, IOVector(buf))
                pos += n
                done += n

    def pwrite_zeroes(self, offset, length, flags=0):
        shift, mask, cs = self._shift, self._mask, self.cluster_size
        pos, end = offset, offset + length
        with self._lock:
            while pos < end:
                idx = pos >> shift
                start = pos & mask
                n = min(cs - start, end - pos)
                if start == 0 and (n == cs or pos + n >= self.size):
                    if self.backing is None:
                        self._drop(idx)
                    else:
                        old = self._clusters.pop(idx, None)
                        if old is not None:
                            self._used -= len(old) + _ENTRY_OVERHEAD
                        self._clusters[idx] = _ZERO
                        self._used += _ENTRY_OVERHEAD
                else:
                    buf = self._cluster_bytes(idx)
                    buf[start:start + n] = bytes(n)
                    self._store(idx, IOVector(buf))
                pos += n

    def pdiscard(self, offset, length):
        # only whole clusters can be dropped; their content then comes from the backing
        shift, cs = self._shift, self.cluster_size
        first = (offset + cs - 1) >> shift
        last = (offset + length) >> shift
        if offset + length >= self.size:
            last = (self.size + cs - 1) >> shift
        with self._lock:
            for idx in range(first, last):
                self._drop(idx)

    def flush(self):
        pass

    def truncate(self, length):
        with self._lock:
            if length < self.size:
                first_gone = (length + self.cluster_size - 1) >> self._shift
                for idx in [i for i in self._clusters if i >= first_gone]:
                    self._drop(idx)
                tail = length & self._mask
                if tail and (length >> self._shift) in self._clusters:
                    buf = self._cluster_bytes(length >> self._shift)
                    buf[tail:] = bytes(self.cluster_size - tail)
                    self._store(length >> self._shift, IOVector(buf))
            self.size = length

    def make_empty(self):
        with self._lock:
            old, self._clusters = self._clusters, {}
            self._used = 0
        if len(old) > 1024:
            # freeing many clusters takes milliseconds: a checkpoint should not wait for it
            threading.Thread(target=_free_slowly, args=(old,), name="pyrep-memory-free", daemon=True).start()

    def block_status(self, offset, length):
        clusters, shift, cs = self._clusters, self._shift, self.cluster_size
        end = offset + length
        idx = offset >> shift

        def state(i):
            e = clusters.get(i)
            return 0 if e is None else (BS_ZERO | BS_ALLOCATED if not e else BS_DATA | BS_ALLOCATED)

        flags = state(idx)
        pos = (idx + 1) << shift
        while pos < end and state(pos >> shift) == flags:
            pos += cs
        return (flags, min(pos, end) - offset, None, None)

    def reopen_prepare(self, read_only):
        pass

    @classmethod
    def create(cls, filename, size, opts):
        raise BlockError(errno.ENOTSUP, "memory: a memory disk has no image file to create; open it with "
                                        "{'driver': 'memory', 'size': ...}")
