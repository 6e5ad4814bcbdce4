"""The qcow2 format driver: opening and closing, the request entry points, resize, make_empty, info.

The image's metadata lives in two objects that own their locks (QEMU's cuts of block/qcow2*.c):

  * ``cluster.Clusters`` — L1 table, L2 table cache, in-flight allocations; allocating writes, zeroes
    and discards. Guarded by ``Clusters.lock``.
  * ``refcount.Refcounts`` — refcount table, refcount-block cache, allocation of clusters and of
    compressed bytes, deferred frees, the file's extent. Guarded by ``Refcounts.lock``, always taken
    inside ``Clusters.lock`` when both are needed.

``cache.Qcow2Cache`` is the metadata cache both use, ``compress.Compressed`` the compressed-cluster
read and write, ``_fast.Qcow2Core`` the C hot paths (reads, overwrites, simple allocating writes) that
fall back to ``_preadv_slow`` / ``_pwritev_slow`` here. The crash-safe write-back order is described
in cluster.py, the deferred frees in refcount.py. Persistent dirty bitmaps are kept valid and flagged
in use (see bitmaps.py).
"""
import errno
import struct
from array import array

from pyrep._core.iovec import IOVector
from pyrep.constants import BS_ALLOCATED, BS_DATA, BS_OFFSET_VALID, BS_ZERO, REQ_FUA, REQ_MAY_UNMAP
from pyrep.driver import BlockDriver
from pyrep.errors import BlockError, OptionError
from pyrep.options import Opt

from . import bitmaps as B
from . import format as F
from ._fast import Qcow2Core
from .cluster import FAST_MASK, Clusters
from .compress import Compressed
from .format import (COMPRESSED, L1E_OFFSET_MASK, L2E_OFFSET_MASK, NORMAL, OFLAG_COMPRESSED, OFLAG_COPIED,
                     OFLAG_ZERO, UNALLOC, ZERO_ALLOC, ZERO_PLAIN)
from .refcount import Refcounts

__all__ = ["Qcow2Driver"]

_DEFAULT_L2_CACHE = 32 * 1024 * 1024
_DEFAULT_RB_CACHE = 8 * 1024 * 1024


class Qcow2Driver(Qcow2Core, BlockDriver):
    # the read/write hot paths (preadv, pwritev) and the fields they use are in _fast.Qcow2Core
    format_name = "qcow2"
    is_format = True
    supports_backing = True
    request_alignment = 1
    options = (
        Opt("file", "child", required=True, help="the protocol node holding the image"),
        Opt("backing", "child", help="backing node: options, a node name, or null for none "
                                     "(absent: from the image header)"),
        Opt("l2-cache-size", "size", help="maximum bytes of L2 tables kept in memory (default 32M)"),
        Opt("refcount-cache-size", "size", help="maximum bytes of refcount blocks kept in memory (default 8M)"),
        Opt("lazy-refcounts", "bool", help="accepted; pyrep never defers refcount updates"),
        Opt("x-check-repair", "bool", default=False,
            help="internal (check -r): open a corrupt image read/write only to repair it; writes are refused"),
    )
    create_options = (
        Opt("cluster_size", "size", default=65536, help="cluster size, 512 B to 2 MiB"),
        Opt("compat", "enum", default="1.1", choices=("1.1", "0.10", "v3", "v2"), help="image version"),
        Opt("refcount_bits", "number", default=16, help="refcount width (power of two, 1..64)"),
        Opt("backing_file", "string", help="backing file name stored in the header"),
        Opt("backing_fmt", "string", help="backing file format stored in the header"),
        Opt("preallocation", "enum", default="off", choices=("off",), help="only 'off'"),
        Opt("lazy_refcounts", "bool", default=False, help="set the lazy refcounts compatible bit"),
    )

    @classmethod
    def probe(cls, header, filename=None):
        return 100 if header[:4] == F.MAGIC else 0

    # ================================================================ open / close
    def open(self, opts):
        self._closed = True          # until open succeeds: close() must not flush anything
        self.backing = None
        self.file = self.node.open_child(opts, "file", role="file")
        fnode = self.file.node
        self.filename = fn = getattr(fnode, "filename", None) or getattr(self.node, "filename", None) or fnode.name
        if getattr(self.node, "filename", None) is None:
            self.node.filename = fn
        self.read_only = bool(self.node.read_only)
        file_len = self.file.getlength()

        def rd(off, n):
            n = max(0, min(n, file_len - off))
            return self.file.pread(off, n) if n else b""

        # the parsed header: its fields change with the file's header, under Clusters.lock (L1, size,
        # backing name, feature bits) or Refcounts.lock (refcount table location)
        h = self.header = F.parse_header(rd, file_len, fn)
        self.version = h.version
        cb = self.cluster_bits = h.cluster_bits
        cs = self.cluster_size = 1 << cb
        self._cmask = cs - 1
        self._l2_bits = cb - 3
        self._l2_mask = (cs >> 3) - 1
        self.size = h.size
        self._zero_flag = OFLAG_ZERO if h.version >= 3 else 0
        self._csize_shift = 62 - (cb - 8)
        self._csize_mask = (1 << (cb - 8)) - 1
        self._coffset_mask = (1 << self._csize_shift) - 1

        self._repair_only = False
        if h.incompatible & F.INCOMPAT_CORRUPT and not self.read_only and opts.get("x-check-repair"):
            self._repair_only = True
        elif h.incompatible & F.INCOMPAT_CORRUPT and not self.read_only:
            raise BlockError(errno.EACCES, f"qcow2: image {fn} is marked corrupt; cannot be opened read/write "
                                           f"(open it read-only, or repair it with check -r all)")
        if h.nb_snapshots and not self.read_only:
            raise BlockError(errno.ENOTSUP, f"qcow2: image {fn} has {h.nb_snapshots} internal snapshot(s); "
                                            f"writing such images is not supported (open it read-only)")

        l1 = F.be64_to_array(self.file.pread(h.l1_table_offset, h.l1_size * 8)) if h.l1_size else array("Q")
        reftable = F.be64_to_array(self.file.pread(h.refcount_table_offset, h.refcount_table_clusters * cs))
        self.compressed = Compressed(self)
        self.refs = Refcounts(self, h, reftable, file_len,
                              opts.get("refcount-cache-size") or _DEFAULT_RB_CACHE, on_frees=self.compressed.forget)
        self.clusters = Clusters(self, self.refs, l1, h.l1_table_offset,
                                 opts.get("l2-cache-size") or _DEFAULT_L2_CACHE)
        self._corrupt_msg = None
        if self._repair_only:
            self._corrupt_msg = (f"qcow2: image {fn} is marked corrupt; it is open only to be repaired "
                                 f"(check -r all), writes are refused")
        self._can_truncate = True       # the file can grow by truncate (cleared under Refcounts.lock)

        # backing: opened (and checked for loops) by the graph, through the option layer
        bname = h.backing_file
        self.backing = self.node.open_backing(opts, filename=bname, fmt=h.backing_format, relative_to=fn)
        self._backing_len = self.backing.node.length if self.backing is not None else 0
        self._file_preadv = self.file.preadv
        self._file_pwritev = self.file.pwritev

        if not self.read_only and not self._repair_only:
            self._open_rw_fixups()
        self._closed = False

    def _bitmaps_valid(self):
        """The image has persistent bitmaps that readers must honour (extension present, auto-clear bit set)."""
        h = self.header
        return h.version >= 3 and h.has_bitmaps_ext and bool(h.autoclear & F.AUTOCLEAR_BITMAPS)

    def _bitmap_directory(self):
        """The parsed bitmap directory (ValueError if it is malformed)."""
        return B.load_directory(self.header.bitmaps_ext, self.file.pread, self.file.getlength(), self.cluster_size)

    def _open_rw_fixups(self):
        h = self.header
        if h.version >= 3 and h.autoclear:
            # auto-clear features we do not maintain must be cleared before writing; bitmaps are kept,
            # flagged in use first (we do not record writes in them), unless they cannot be parsed
            keep = 0
            if self._bitmaps_valid():
                try:
                    d = self._bitmap_directory()
                except ValueError:
                    d = None
                if d is not None:
                    # flagged in use before the first write of guest data (_check_writable), not now:
                    # a header-only change (rebase -u) or a refcount repair leaves them consistent
                    self._bm_pending = any(not e["flags"] & B.IN_USE for e in d.entries)
                    self._bm_dir = d
                    keep = F.AUTOCLEAR_BITMAPS
            if h.autoclear != keep:
                self._write_header_u64(88, keep)
                h.autoclear = keep
                self.file.flush()
        if h.incompatible & F.INCOMPAT_DIRTY:
            res = self.check(repair="all")
            if res["corruptions"] - res["corruptions-fixed"] > 0:
                raise BlockError(errno.EIO, f"qcow2: image {self.filename} was dirty and its refcounts could "
                                            f"not be repaired: {'; '.join(res['messages'][:5])}")
            h.incompatible &= ~F.INCOMPAT_DIRTY
            self._write_header_u64(72, h.incompatible)
            self.file.flush()

    def _flush_twice_locked(self):
        """Cluster lock held: write everything back, then once more to apply the frees the first pass
        made safe."""
        self.clusters.flush_locked()
        self.clusters.flush_locked()

    def close(self):
        if getattr(self, "_closed", True):
            return
        try:
            if not self.read_only and self.file is not None and not self._repair_only:
                with self.clusters.lock:
                    self._flush_twice_locked()
                self.file.flush()
        finally:
            self._closed = True
            self.clusters.l2.clear()
            self.refs.blocks.clear()

    def getlength(self):
        return self.size

    # ================================================================ helpers
    def eio(self, what):
        """An I/O error (EIO) about this image."""
        return BlockError(errno.EIO, f"qcow2: {what} (image {self.filename})")

    def corrupt(self, what):
        """Corruption found at run time: returns the error to raise (EIO) for the request that met it,
        and stops every later write. The first time, a v3 image opened read/write gets its corrupt bit
        set on disk (so QEMU and a later open refuse to write it until ``check -r all``); the message
        says what was found and that writes are refused."""
        msg = f"qcow2: image {self.filename} is corrupt: {what}; further writes are refused"
        if self._corrupt_msg is None:
            self._corrupt_msg = msg
            if not self.read_only and self.version >= 3:
                try:
                    self.header.incompatible |= F.INCOMPAT_CORRUPT
                    self._write_header_u64(72, self.header.incompatible)
                    self.file.flush()
                except Exception:
                    pass
        return BlockError(errno.EIO, msg)

    def _write_header_u64(self, off, value):
        self.file.pwrite(off, value.to_bytes(8, "big"))

    def _data_io(self, fn, *args):
        """``fn(*args)``: I/O on a host cluster found in an L2 entry, outside the lock, counted so that
        the cluster is not freed and reused under it (``Refcounts.settle_frees``)."""
        de = self.dio_enter()
        try:
            return fn(*args)
        finally:
            self.dio_leave(de)

    # ================================================================ flush
    def flush(self):
        if self.read_only or self._closed:
            return self.file.flush()
        with self.clusters.lock:
            self.clusters.flush_locked()
        self.file.flush()

    # ================================================================ reads
    def _preadv_slow(self, offset, length, iov):
        done = 0
        m = self.clusters
        cb = self.cluster_bits
        cs = self.cluster_size
        cmask = self._cmask
        l2b = self._l2_bits
        l2m = self._l2_mask
        zf = self._zero_flag
        while done < length:
            pos = offset + done
            rem = length - done
            cidx = pos >> cb
            in_off = pos & cmask
            n = min(cs - in_off, rem)
            with m.lock:
                e = m.l1[cidx >> l2b]
                toff = e & L1E_OFFSET_MASK
                if toff:
                    t = m.l2.tables.get(toff)
                    if t is None:
                        t = m.l2_load(toff)
                    l2i = cidx & l2m
                    e = t[l2i]
                    if (e & FAST_MASK) == OFLAG_COPIED or (e and not e & (OFLAG_COMPRESSED | zf)):
                        kind = NORMAL
                        host = e & L2E_OFFSET_MASK
                        # extend over physically contiguous clusters in the same table
                        nxt = host + cs
                        while n < rem and l2i + 1 <= l2m:
                            e2 = t[l2i + 1]
                            if (e2 & L2E_OFFSET_MASK) != nxt or e2 & (OFLAG_COMPRESSED | zf):
                                break
                            l2i += 1
                            nxt += cs
                            n += min(rem - n, cs)
                    else:
                        kind = m.kind(e)
                        if kind != COMPRESSED:
                            n = m.extend_same(t, cidx & l2m, kind, n, rem)
                else:
                    kind = UNALLOC
                    n = min(rem, ((((cidx >> l2b) + 1) << (l2b + cb)) - pos))
            if kind == NORMAL:
                if host & cmask or host < cs:
                    raise self.corrupt(f"data cluster offset {host:#x} for guest offset {pos} is invalid")
                self._data_io(self.file.preadv, host + in_off, n, iov.slice(done, n) if n != length else iov)
            elif kind == UNALLOC:
                self._read_backing(pos, n, iov, done)
            elif kind == COMPRESSED:
                data = self._data_io(self.compressed.read, e, pos)
                iov.copy_from(done, memoryview(data)[in_off:in_off + n])
            else:
                iov.memset(done, 0, n)
            done += n

    def _read_backing(self, pos, n, iov, done):
        b = self.backing
        m = 0
        if b is not None:
            blen = self._backing_len = b.node.length
            if pos < blen:
                m = min(n, blen - pos)
                b.preadv(pos, m, iov.slice(done, m))
        if m < n:
            iov.memset(done + m, 0, n - m)

    def reads_zero_unalloc(self, pos, n):
        """Guest [pos, pos+n), if unallocated here, reads as zeroes (no backing data under it)."""
        b = self.backing
        return b is None or pos >= b.node.length

    def _old_bytes(self, cidx, e, start, n):
        """Current content of guest cluster ``cidx`` bytes [start, start+n) given its entry ``e``;
        None if it reads as zeroes."""
        kind = self.clusters.kind(e)
        pos = (cidx << self.cluster_bits) + start
        if kind == NORMAL:
            return self.file.pread((e & L2E_OFFSET_MASK) + start, n)
        if kind == COMPRESSED:
            return self.compressed.read(e, pos)[start:start + n]
        if kind in (ZERO_PLAIN, ZERO_ALLOC):
            return None
        b = self.backing
        if b is None or pos >= b.node.length:
            return None
        buf = bytearray(n)
        self._read_backing(pos, n, IOVector(buf), 0)
        return buf

    # ================================================================ writes
    def _check_not_corrupt(self):
        if self._corrupt_msg:
            raise BlockError(errno.EIO, self._corrupt_msg)

    def _check_writable(self):
        """Before any change of guest data."""
        self._check_not_corrupt()
        if self._bm_pending:
            self._flag_bitmaps_in_use()

    def _flag_bitmaps_in_use(self):
        """Set every bitmap's in_use flag (we do not record writes in them) before the first write."""
        with self.clusters.lock:
            if not self._bm_pending:
                return
            d = self._bm_dir            # as read when the image went read/write (we never change it)
            self.file.pwrite(d.offset, d.marked_in_use())
            self.file.flush()
            self._bm_pending = False

    def _pwritev_slow(self, offset, length, iov, flags):
        self._check_writable()
        done = 0
        m = self.clusters
        cb = self.cluster_bits
        cs = self.cluster_size
        cmask = self._cmask
        l2b = self._l2_bits
        l2m = self._l2_mask
        while done < length:
            pos = offset + done
            rem = length - done
            cidx = pos >> cb
            in_off = pos & cmask
            n = min(cs - in_off, rem)
            with m.lock:
                while cidx in m.inflight:
                    m.wait_inflight()
                e = m.l1[cidx >> l2b]
                toff = e & L1E_OFFSET_MASK
                t = None
                if toff:
                    t = m.l2.tables.get(toff)
                    if t is None:
                        t = m.l2_load(toff)
                    l2i = cidx & l2m
                    e = t[l2i]
                else:
                    e = 0
                if (e & FAST_MASK) == OFLAG_COPIED:
                    host = e & L2E_OFFSET_MASK
                    nxt = host + cs
                    while n < rem and l2i < l2m:
                        e2 = t[l2i + 1]
                        if (e2 & FAST_MASK) != OFLAG_COPIED or (e2 & L2E_OFFSET_MASK) != nxt \
                                or (cidx + (n + in_off) // cs) in m.inflight:
                            break
                        l2i += 1
                        nxt += cs
                        n += min(rem - n, cs)
                    plan = None
                else:
                    plan = m.plan_alloc(cidx, in_off, rem, t)
                    n = plan[2]
            if plan is None:
                if host & cmask or host < cs or self.meta_overlap(host, n + in_off):
                    raise self.corrupt(f"data cluster offset {host:#x} for guest offset {pos} is invalid")
                self._data_io(self.file.pwritev, host + in_off, n, iov.slice(done, n) if n != length else iov)
            else:
                m.alloc_write(plan, in_off, iov, done)
            done += n
        if flags & REQ_FUA:
            self.flush()

    def pwritev_compressed(self, offset, length, iov):
        """Write one whole guest cluster deflate-compressed (as qemu-img convert -c does).

        ``offset`` must be cluster aligned and ``length`` one cluster (or the shorter last cluster of the
        image, padded with zeroes); the guest cluster must be unallocated or a plain zero cluster.
        Data that does not compress to less than a cluster is written uncompressed. Several compressed
        clusters share host clusters (packed in 512-byte sectors); each host cluster's refcount is the
        number of compressed clusters in it."""
        self._check_writable()
        if self.read_only:
            raise BlockError(errno.EROFS, f"qcow2: image {self.filename} is read-only")
        self.compressed.write(offset, length, iov)

    def pwrite_zeroes(self, offset, length, flags=0):
        self._check_writable()
        self.clusters.zero_or_discard(offset, length, flags, discard=False)
        if flags & REQ_FUA:
            self.flush()

    def pdiscard(self, offset, length):
        self._check_writable()
        self.clusters.zero_or_discard(offset, length, REQ_MAY_UNMAP, discard=True)

    # ------------------------------------------------------------ backing file
    def change_backing_file(self, name, fmt=None):
        """Rewrite the backing file name and the backing format header extension (``name`` None or empty:
        no backing file, and no format). The open backing node is not changed. Everything in the header
        cluster (header, extensions, name) must fit in the first cluster."""
        self._check_not_corrupt()           # guest data does not change: bitmaps stay consistent
        if self.read_only:
            raise BlockError(errno.EROFS, f"qcow2: image {self.filename} is read-only; cannot change its "
                                          f"backing file")
        name = name or None
        fmt = (fmt or None) if name else None
        bname = name.encode("utf-8") if name else b""
        if len(bname) > F.MAX_BACKING_NAME:
            raise BlockError(errno.EINVAL, f"qcow2: backing file name too long ({len(bname)} bytes, max "
                                           f"{F.MAX_BACKING_NAME})")
        h = self.header
        cs = self.cluster_size
        with self.clusters.lock:
            self.clusters.flush_locked()
            self.file.flush()
            c0 = self.file.pread(0, min(cs, self.refs.file_size))
            hlen = h.header_length
            # keep every extension we do not rewrite (feature table, bitmaps, unknown ones), drop the
            # backing format (rewritten) and a stale bitmaps extension (its auto-clear bit is clear)
            drop = (F.EXT_BACKING_FORMAT,) if self._bitmaps_valid() else (F.EXT_BACKING_FORMAT, F.EXT_BITMAPS)
            keep = []
            pos = hlen
            end = len(c0)
            if h.backing_file_offset:
                end = min(end, h.backing_file_offset)
            while pos + 8 <= end:
                etype, elen = struct.unpack_from(">II", c0, pos)
                if etype == F.EXT_END or pos + 8 + elen > end:
                    break
                if etype not in drop:
                    keep.append(F._ext(etype, bytes(c0[pos + 8:pos + 8 + elen])))
                pos += 8 + elen + ((8 - elen % 8) % 8)
            exts = (F._ext(F.EXT_BACKING_FORMAT, fmt.encode("utf-8")) if fmt else b"") + b"".join(keep)
            exts += b"\0" * 8
            bf_off = hlen + len(exts) if bname else 0
            total = hlen + len(exts) + len(bname)
            if total > cs:
                raise BlockError(errno.ENOSPC, f"qcow2: header, header extensions and backing file name "
                                               f"({total} bytes) do not fit in the first cluster ({cs} bytes) "
                                               f"of {self.filename}")
            hdr = bytearray(c0[:hlen])
            struct.pack_into(">QI", hdr, 8, bf_off, len(bname))
            new = bytes(hdr) + exts + bname
            old_used = max(pos + 8, (h.backing_file_offset + h.backing_file_size) if h.backing_file_offset else 0)
            new += bytes(max(0, min(old_used, len(c0)) - len(new)))   # clear what the old layout used
            self.file.pwrite(0, new)
            self.refs.note_written(len(new))
            self.file.flush()
            h.backing_file = name
            h.backing_format = fmt
            h.backing_file_offset, h.backing_file_size = bf_off, len(bname)
            h.has_bitmaps_ext = F.EXT_BITMAPS not in drop

    # ================================================================ status
    def block_status(self, offset, length):
        m = self.clusters
        cb = self.cluster_bits
        cs = self.cluster_size
        cidx = offset >> cb
        in_off = offset & self._cmask
        n = min(length, cs - in_off)
        with m.lock:
            l1i = cidx >> self._l2_bits
            t, _ = m.l2_table(l1i, alloc=False)
            if t is None:
                n = min(length, (((l1i + 1) << (self._l2_bits + cb)) - offset))
                return (0, n, None, None)
            l2i = cidx & self._l2_mask
            e = t[l2i]
            kind = m.kind(e)
            if kind == NORMAL:
                host = e & L2E_OFFSET_MASK
                nxt = host + cs
                while n < length and l2i < self._l2_mask:
                    e2 = t[l2i + 1]
                    if m.kind(e2) != NORMAL or (e2 & L2E_OFFSET_MASK) != nxt:
                        break
                    l2i += 1
                    nxt += cs
                    n += min(length - n, cs)
                return (BS_DATA | BS_ALLOCATED | BS_OFFSET_VALID, n, host + in_off, self.file.node)
            n = m.extend_same(t, l2i, kind, n, length)
        if kind == UNALLOC:
            return (0, n, None, None)
        if kind == COMPRESSED:
            return (BS_DATA | BS_ALLOCATED, n, None, None)
        return (BS_ZERO | BS_ALLOCATED, n, None, None)

    # ================================================================ resize
    def truncate(self, length):
        """Grow the image to ``length`` bytes (a multiple of 512). Refused: shrinking (ENOTSUP), sizes
        the L1 table cannot map (EFBIG), images with persistent bitmaps (ENOTSUP), a corrupt image
        (EIO). A new, larger L1 table is written and made durable before the header points to it, and
        the header's size changes last, so a failure at any step leaves the old image, at worst with
        a leaked cluster."""
        if length < self.size:
            raise BlockError(errno.ENOTSUP, f"qcow2: shrinking is not supported ({self.size} -> {length} bytes, "
                                            f"image {self.filename})")
        if length % 512:
            raise BlockError(errno.EINVAL, f"qcow2: new size {length} is not a multiple of 512")
        if length == self.size:
            return
        if self._bitmaps_valid():
            # each bitmap's table is sized for the old length (QEMU refuses too)
            raise BlockError(errno.ENOTSUP, f"qcow2: image {self.filename} has persistent dirty bitmaps; resizing "
                                            f"it is not supported (remove them with qemu-img bitmap --remove)")
        self._check_writable()
        cs = self.cluster_size
        need = -(-length // (cs * (cs >> 3)))
        if need * 8 > F.MAX_L1_BYTES or length > F.MAX_VIRTUAL_SIZE:
            raise BlockError(errno.EFBIG, f"qcow2: size {length} is too large for cluster size {cs}")
        m, refs = self.clusters, self.refs
        with m.lock:
            m.flush_locked()
            if need > len(m.l1):
                new_l1 = array("Q", m.l1) + array("Q", [0]) * (need - len(m.l1))
                nclus = -(-need * 8 // cs)
                off = refs.alloc_clusters(nclus)
                try:
                    with refs.lock:
                        refs.write_back()
                    self.file.pwrite(off, F.array_to_be64(new_l1) + bytes(nclus * cs - need * 8))
                    refs.note_written(off + nclus * cs)
                    self.file.flush()
                except BaseException:
                    refs.give_back(off, nclus * cs)     # the header still names the old table
                    raise
                # from here the header may name the new table (a failure leaks the old one at worst)
                self.file.pwrite(36, need.to_bytes(4, "big") + off.to_bytes(8, "big"))
                self.file.flush()
                old_off, old_n = m.l1_offset, len(m.l1)
                m.l1, m.l1_offset = new_l1, off
                self.header.l1_size, self.header.l1_table_offset = need, off
                if old_n:
                    refs.free_later(old_off, old_n * 8)
            self.file.pwrite(24, length.to_bytes(8, "big"))
            self.file.flush()
            self.size = self.header.size = length
            m.flush_locked()

    # ================================================================ make_empty
    def make_empty(self):
        self._check_writable()
        h = self.header
        if h.nb_snapshots or h.has_bitmaps_ext or h.has_crypto_ext:
            # slow path: drop every cluster mapping one by one
            self.clusters.zero_or_discard(0, self.size, REQ_MAY_UNMAP, discard=True, full=True)
            return self.flush()
        cs = self.cluster_size
        cb = self.cluster_bits
        m, refs = self.clusters, self.refs
        with m.lock:
            m.drain_inflight()
            with refs.lock:
                l1_size = len(m.l1)
                end_c = max(-(-refs.file_size // cs), refs.reserved_end)
                # phase 1: a fresh layout past everything in use; switch the header to it
                lay1 = F.plan_layout(end_c, cb, refs.order, l1_size)
                self._write_layout(lay1, l1_size)
                # phase 2: the compact layout right after the header (now free), then truncate
                lay2 = F.plan_layout(1, cb, refs.order, l1_size)
                final = lay1
                if lay2["end_cluster"] <= end_c:
                    self._write_layout(lay2, l1_size)
                    final = lay2
                new_end = final["l1_off"] + l1_size * 8 if l1_size else final["l1_off"]
                new_end = max(new_end, final["end_cluster"] << cb) if final is lay1 else new_end
                if self.node.discard_unmap:
                    # give the space back (QEMU's behaviour). Without discard=unmap the file keeps its
                    # size and later allocations reuse the freed clusters: freeing the pages of a large
                    # overlay costs far more than a checkpoint may take (~70 ms per GiB on tmpfs)
                    try:
                        self.file.truncate(max(new_end, cs))
                    except BlockError:
                        pass
                m.l1 = array("Q", [0]) * l1_size
                m.l1_offset = final["l1_off"]
                m.l1_dirty.clear()
                m.l2.clear()
                h.l1_table_offset = final["l1_off"]
                h.refcount_table_offset, h.refcount_table_clusters = final["rt_off"], final["rt_clusters"]
                file_size = self.file.getlength()
                refs.reload(final["rt_off"], final["rt_clusters"], file_size)
                refs.reserved_end = -(-file_size // cs)
                self.compressed.forget()

    def _write_layout(self, lay, l1_size):
        cs = self.cluster_size
        for off, data in F.layout_blobs(lay, self.cluster_bits, self.refs.order):
            self.file.pwrite(off, data)
        if l1_size:
            self.file.pwrite_zeroes(lay["l1_off"], -(-l1_size * 8 // cs) * cs)
        self.file.flush()
        # one write switches l1_size, l1_table_offset, refcount_table_offset and refcount_table_clusters
        self.file.pwrite(36, struct.pack(">IQQI", l1_size, lay["l1_off"] if l1_size else 0, lay["rt_off"],
                                         lay["rt_clusters"]))
        self.file.flush()

    # ================================================================ info / reopen
    def get_info(self):
        h = self.header
        lazy = bool(h.compatible & F.COMPAT_LAZY_REFCOUNTS)
        spec = {"compat": "1.1" if h.version >= 3 else "0.10", "refcount-bits": 1 << h.refcount_order,
                "compression-type": "zlib"}
        if h.version >= 3:
            spec.update({"lazy-refcounts": lazy,
                         "corrupt": bool(h.incompatible & F.INCOMPAT_CORRUPT), "extended-l2": False})
            if self._bitmaps_valid():
                try:
                    spec["bitmaps"] = B.info(self._bitmap_directory())
                except ValueError:
                    pass
        return {
            "cluster-size": self.cluster_size,
            "compat": spec["compat"],
            "refcount-bits": 1 << h.refcount_order,
            "corrupt": bool(h.incompatible & F.INCOMPAT_CORRUPT),
            "dirty": bool(h.incompatible & F.INCOMPAT_DIRTY),
            "lazy-refcounts": lazy,
            "backing-filename": h.backing_file,
            "backing-filename-format": h.backing_format,
            "format-specific": {"type": "qcow2", "data": spec},
        }

    def reopen_prepare(self, read_only):
        self._reopen_to = read_only
        if not read_only and self.read_only:
            if self.header.incompatible & F.INCOMPAT_CORRUPT:
                raise BlockError(errno.EACCES, f"qcow2: image {self.filename} is marked corrupt; "
                                               f"cannot be reopened read/write")
            if self.header.nb_snapshots:
                raise BlockError(errno.ENOTSUP, f"qcow2: image {self.filename} has internal snapshots; "
                                                f"writing it is not supported")
        elif read_only and not self.read_only:
            with self.clusters.lock:
                self._flush_twice_locked()
            self.file.flush()

    def reopen_commit(self):
        to = getattr(self, "_reopen_to", None)
        if to is None:
            return
        was = self.read_only
        self.read_only = to
        if was and not to:
            refs = self.refs
            with refs.lock:
                refs.file_size = self.file.getlength()
                refs.reserved_end = -(-refs.file_size // self.cluster_size)
            self._open_rw_fixups()
        self._reopen_to = None

    def reopen_abort(self):
        self._reopen_to = None

    # ================================================================ check
    def check(self, repair=None):
        from .check import run_check
        if repair not in (None, "leaks", "all"):
            raise OptionError(f"qcow2: repair must be None, 'leaks' or 'all', not {repair!r}")
        if repair and self.read_only:
            raise BlockError(errno.EPERM, f"qcow2: cannot repair {self.filename}: it is open read-only")
        m, refs = self.clusters, self.refs
        with m.lock:
            if not self.read_only:
                self._flush_twice_locked()
            with refs.lock:
                res = run_check(self, repair)
            if repair == "all" and self.header.incompatible & F.INCOMPAT_CORRUPT and res["corruptions"] == 0:
                self.header.incompatible &= ~(F.INCOMPAT_CORRUPT | F.INCOMPAT_DIRTY)
                self._write_header_u64(72, self.header.incompatible)
                self.file.flush()
                self._corrupt_msg = None
                self._repair_only = False
                res["messages"].append("The corrupt flag was cleared")
            if repair and (res["leaks-fixed"] or res["corruptions-fixed"]):
                # reload metadata from disk
                m.l2.clear()
                m.l1 = F.be64_to_array(self.file.pread(m.l1_offset, len(m.l1) * 8))
                with refs.lock:
                    refs.reload(refs.table_offset, refs.table_clusters, self.file.getlength())
                self.compressed.forget()
        return res

    @classmethod
    def create(cls, filename, size, opts):
        F.create_file(filename, size, opts or {})
