"""``memory``: a sparse in-RAM disk; clusters are stored raw, compressed with blosc when idle.

The recommended home of COLO active and hidden disks: it can have a backing
(so it serves as an overlay), ``make_empty`` is one dict swap, and block
status says which clusters this layer holds. Reads of clusters it does not
hold fall through to the backing (or read zeroes). Its real memory use
(payload plus per-cluster overhead) is ``memory_used``.

Storage, and why:

- The write path never compresses (``compress=background``, the default): a
  cluster is copied into a cluster-sized buffer, and once more than
  ``compress-above`` bytes are stored raw and have stayed for
  ``compress-delay`` seconds without a ``make_empty``, a background thread
  compresses them, throttled so it never holds the GIL for long.
  Copy-before-write into a hidden disk sits on the primary's write path,
  where compressing costs more than the write; and an overlay emptied at
  every checkpoint is usually emptied before compressing it would pay. ``compress=inline`` compresses in the write path (least memory at any
  time); ``codec=none`` never compresses.
- Raw buffers are recycled: ``make_empty`` keeps the emptied layer's raw
  buffers as the pool for the next interval (only the last emptied layer's,
  so the pool never holds more than one interval's worth), and the
  compressor recycles the buffers it compressed. Fresh memory costs a page
  fault per 4 KiB; a hidden disk refilled at every checkpoint should not pay
  that again and again.
- A partial write into a raw cluster changes it in place; into a compressed
  or absent one it builds a raw buffer first.
- The hot paths are C (``pyrep._core.memstore.MemStore``), atomic under the GIL: no
  lock. ``make_empty`` requires that no request is in flight (the
  replication checkpoint drains first).
"""
import errno
import threading
import time

from pyrep._core.iovec import IOVector
from pyrep.constants import BS_ALLOCATED, BS_DATA, BS_ZERO
from pyrep.driver import BlockDriver
from pyrep._core.memstore import MemStore
from pyrep.errors import BlockError, OptionError
from pyrep.options import Opt

__all__ = ["MemoryDriver"]

_blosc_mod = None


def _blosc():
    """blosc, imported on first use: most overlays never compress (compress-above), and blosc
    imports numpy, whose BLAS threads cost start-up time and, on small machines, CPU."""
    global _blosc_mod
    if _blosc_mod is None:
        import blosc
        blosc.set_releasegil(True)
        # clusters are small: blosc's own worker threads cost more than they save, and pyrep's
        # I/O threads already compress in parallel with the GIL released
        blosc.set_nthreads(1)
        _blosc_mod = blosc
    return _blosc_mod


_ZERO = b""                      # a cluster this layer holds that reads as zeroes
_PROBE = 4096                    # bytes compressed to decide whether a cluster is worth compressing
_CODECS = ("blosclz", "lz4", "lz4hc", "zlib", "zstd", "none")
_COMPACT_BATCH = 32              # clusters a throttled compaction pass compresses between pauses


def _free_slowly(clusters):
    """Drop ``clusters`` in small batches, yielding the GIL between them: one dict.clear() of
    thousands of buffers would hold it for milliseconds, and so would a plain loop until the
    interpreter's switch interval (5 ms) forced it out — a checkpoint or I/O thread waits that long."""
    pop = clusters.popitem
    while clusters:
        for _ in range(min(256, len(clusters))):
            pop()
        time.sleep(0)


class MemoryDriver(BlockDriver):
    format_name = "memory"
    protocol_name = "memory"
    supports_backing = True
    # copying a cluster costs a memcpy, not a metadata update: a backup into this node may use
    # clusters as small as this node's own (see pyrep.jobs.backup)
    cheap_small_clusters = True
    options = (
        Opt("size", "size", help="the disk's length (default: the backing's length)"),
        Opt("cluster-size", "size", default=65536, help="allocation unit, a power of two from 512 to 2M"),
        Opt("codec", "enum", default="lz4", choices=_CODECS, help="blosc codec for stored clusters"),
        Opt("level", "number", default=1, min=0, max=9, help="blosc compression level"),
        Opt("shuffle", "bool", default=True, help="blosc byte shuffle"),
        Opt("compress", "enum", default="background", choices=("background", "inline"),
            help="compress stored clusters in a background thread, or in the write path"),
        Opt("compress-above", "size", default=64 << 20,
            help="compress=background: start compressing once this many bytes are stored raw"),
        Opt("compress-delay", "number", default=5, min=0,
            help="compress=background: seconds to wait before a pass; a make_empty meanwhile "
                 "(a replication checkpoint) cancels it"),
        Opt("backing", "child", help="the overlay's backing node (a dict of options or a node name)"),
    )

    def open(self, opts):
        self._wake = threading.Event()    # first: close() runs after a failed open too
        self._closing = False
        self._compressor = None
        self._passes = self._cancelled = 0  # background passes run / dropped by a make_empty (get_info)
        cs = opts["cluster-size"]
        if cs & (cs - 1) or not 512 <= cs <= 2 << 20:
            raise OptionError(f"memory: option '{self.node.option_prefix}cluster-size' must be a power of two from 512 "
                              f"to 2M, got {cs}")
        self.cluster_size = cs
        self._shift = cs.bit_length() - 1
        self._mask = cs - 1
        self._codec = opts["codec"]
        self._level = int(opts["level"])
        self._shuffle = 1 if opts["shuffle"] else 0      # blosc.SHUFFLE / blosc.NOSHUFFLE
        self._inline = opts["compress"] == "inline" and self._codec != "none"
        background = opts["compress"] == "background" and self._codec != "none"
        self.backing = self.node.open_backing(opts)
        size = opts.get("size")
        if size is None:
            if self.backing is None:
                raise OptionError(f"memory: option '{self.node.option_prefix}size' is required when there is no backing")
            size = self.backing.node.length
        self.size = size
        self._compress_above = opts["compress-above"]
        self._compress_delay = float(opts["compress-delay"])
        self._compact_lock = threading.Lock()   # one compaction pass at a time
        self._store = store = MemStore(self, cs, self.backing is not None, background)
        if self._inline:
            # every write notes the clusters it touches, as during a background pass: a write that
            # lands while another one's inline compression runs (blosc drops the GIL) must win
            store.compacting = True
        store.wake_bytes = self._compress_above
        self._lock = threading.Lock()       # only the slow, rare paths (truncate) take it
        # the node layer calls these directly (C)
        self.preadv = store.preadv
        self.pwritev = self._pwritev_inline if self._inline else store.pwritev

    def close(self):
        self._closing = True
        self._wake.set()
        t = self._compressor
        if t is not None and t is not threading.current_thread():
            t.join()
        if hasattr(self, "_store"):
            self._store.empty()
            self._store.pool = {}

    def getlength(self):
        return self.size

    @property
    def _clusters(self):
        return self._store.clusters

    @property
    def memory_used(self):
        """Bytes of RAM the stored clusters take (payload plus bookkeeping; pooled buffers not counted)."""
        return self._store.used

    def get_info(self):
        st = self._store
        return {"memory-used": st.used, "allocated-clusters": len(st.clusters),
                "cluster-size": self.cluster_size, "codec": self._codec, "raw-bytes": st.raw_bytes,
                "pooled-buffers": len(st.pool), "compress-passes": self._passes,
                "compress-cancelled": self._cancelled}

    # ------------------------------------------------------------ storage
    def _compress(self, buf):
        """``buf`` compressed, or None if that does not pay."""
        if len(buf) >= 4 * _PROBE:
            # probe the first and last 4 KiB: incompressible data (encrypted, already compressed) is
            # common on disks and would cost a full compression attempt for nothing
            view = memoryview(buf)
            if self._incompressible(view[:_PROBE]) and self._incompressible(view[-_PROBE:]):
                return None
        out = _blosc().compress(buf, typesize=8, clevel=self._level, shuffle=self._shuffle, cname=self._codec)
        return out if len(out) < len(buf) else None

    def _incompressible(self, view):
        out = _blosc().compress(view, typesize=8, clevel=self._level, shuffle=self._shuffle, cname=self._codec)
        return len(out) > len(view) * 15 // 16

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

    def _read_compressed(self, entry, start, n, iov, at):
        iov.copy_from(at, memoryview(_blosc().decompress(entry))[start:start + n])

    def _fill(self, idx, entry, buf):
        """Put the content of cluster ``idx`` (currently ``entry``) into the private buffer ``buf``."""
        if entry is None:
            self._read_backing(idx << self._shift, self.cluster_size, IOVector(buf), 0)
        elif not entry:
            buf[:] = bytes(self.cluster_size)
        else:
            buf[:] = _blosc().decompress(entry)

    def _write_partial(self, idx, start, n, iov, at):
        """Part of a cluster this layer holds compressed, as zeroes, or not at all: build the raw
        cluster in a private buffer, then install it if nobody changed the cluster meanwhile."""
        store = self._store
        while True:
            entry = store.clusters.get(idx)
            if type(entry) is bytearray:            # became raw meanwhile: the in-place path
                return store.pwritev((idx << self._shift) + start, n, iov.slice(at, n))
            buf = store.buffer()
            self._fill(idx, entry, buf)
            if store.patch_install(idx, entry, buf, start, n, iov, at):
                return

    def cow_store(self):
        """The MemStore a copy-before-write gate may fill directly (whole clusters, no bounce
        buffer); None with compress=inline, whose clusters must pass through the write path."""
        return None if self._inline else self._store

    def _pwritev_inline(self, offset, length, iov, flags=0):
        """compress=inline: write, then compress the clusters written (before returning)."""
        self._store.pwritev(offset, length, iov, flags)
        # one compressor at a time (as the background pass): taking a cluster for compression clears
        # its "touched" mark, so a second compressor of the same cluster would hide the writes the
        # first one's copy lacks
        with self._compact_lock:
            for idx in range(offset >> self._shift, ((offset + length - 1) >> self._shift) + 1):
                self._compress_cluster(idx)

    def _compress_cluster(self, idx):
        """``_compact_lock`` held: compress cluster ``idx`` if it is stored raw, outside any other lock
        (blosc releases the GIL); the copy replaces the cluster only if no write touched it meanwhile
        (in place, or by replacing it). Returns (bytes left raw as incompressible, replaced)."""
        store = self._store
        raw = store.take_for_compression(idx)
        if raw is None:
            return 0, False
        packed = self._compress(raw)
        if packed is None:
            return len(raw), False
        return 0, store.replace_if(idx, raw, packed, True)

    # --------------------------------------------------------- compressor
    def _start_compressor(self):
        t = self._compressor
        if t is None and not self._closing:
            t = threading.Thread(target=self._compress_loop, name=f"pyrep-memory-compress-{self.node.name}",
                                 daemon=True)
            self._compressor = t
            t.start()
        self._wake.set()

    def _compress_loop(self):
        store = self._store
        while not self._closing:
            if not store.wake_pending:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            # let the data settle first: an overlay emptied at every checkpoint (hidden and active
            # disks) is usually emptied before compressing it could pay
            emptied = store.empties
            deadline = time.monotonic() + self._compress_delay
            while not self._closing and store.empties == emptied and time.monotonic() < deadline:
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            if not self._closing and store.empties == emptied and store.wake_pending:
                self.compact(throttle=True)
                self._passes += 1

    def compact(self, throttle=False):
        """Compress every cluster stored raw that compresses (a background pass, done now); return
        how many were compressed. Writes go on meanwhile: a cluster written during the pass keeps
        its new raw content (the store notes what writes touch while ``compacting``).

        ``throttle`` (the background thread's passes): after every batch of clusters, sleep four times
        as long as the batch took, so the pass holds the GIL at most ~20 % of the time and the I/O
        threads keep their pace (compressing is for memory, not urgent)."""
        done = skipped = 0
        store = self._store
        with self._compact_lock:
            if not self._inline:            # inline stores always note touches (and may be mid-write)
                store.touched.clear()
                store.compacting = True
            try:
                t0 = time.perf_counter()
                for n, idx in enumerate(list(store.clusters)):
                    if self._closing:
                        break
                    if throttle and n % _COMPACT_BATCH == _COMPACT_BATCH - 1:
                        t1 = time.perf_counter()
                        time.sleep(4 * (t1 - t0))
                        t0 = time.perf_counter()
                    left, replaced = self._compress_cluster(idx)
                    skipped += left
                    done += replaced
            finally:
                if not self._inline:
                    store.compacting = False
                    store.touched.clear()
                # what did not compress stays raw: count it below the threshold, so the next pass
                # comes only when a good deal more is stored raw
                store.wake_bytes = self._compress_above + skipped
                store.wake_pending = store.raw_bytes >= store.wake_bytes    # written during the pass
        return done

    # ----------------------------------------------------------------- I/O
    # preadv/pwritev: MemStore's (bound in open)

    def pwrite_zeroes(self, offset, length, flags=0):
        shift, mask, cs, store = self._shift, self._mask, self.cluster_size, self._store
        pos, end = offset, offset + length
        while pos < end:
            idx = pos >> shift
            start = pos & mask
            n = min(cs - start, end - pos)
            if start == 0 and (n == cs or pos + n >= self.size):
                store.put(idx, _ZERO if self.backing is not None else None)
            elif not store.zero_part(idx, start, n):
                self._write_partial(idx, start, n, IOVector(bytes(n)), 0)
            pos += n

    def pdiscard(self, offset, length):
        # only whole clusters can be dropped; their content then comes from the backing
        shift, cs = self._shift, self.cluster_size
        first = (offset + cs - 1) >> shift
        last = (offset + length) >> shift
        if offset + length >= self.size:
            last = (self.size + cs - 1) >> shift
        for idx in range(first, last):
            self._store.put(idx, None)

    def flush(self):
        pass

    def truncate(self, length):
        store = self._store
        with self._lock:
            if length < self.size:
                first_gone = (length + self.cluster_size - 1) >> self._shift
                for idx in [i for i in list(store.clusters) if i >= first_gone]:
                    store.put(idx, None)
                tail = length & self._mask
                if tail and (length >> self._shift) in store.clusters:
                    self.pwrite_zeroes(length, self.cluster_size - tail)
            self.size = length

    def make_empty(self):
        """Drop every cluster (no request may be in flight). The raw buffers become the pool, and a
        background pass that was waiting for its delay is dropped."""
        if self._store.wake_pending:
            self._cancelled += 1
        stale = self._store.empty()
        if len(stale) > 1024:
            # freeing many buffers takes milliseconds: a checkpoint should not wait for it
            threading.Thread(target=_free_slowly, args=(stale,), name="pyrep-memory-free", daemon=True).start()

    def block_status(self, offset, length):
        clusters, shift, cs = self._store.clusters, self._shift, self.cluster_size
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
