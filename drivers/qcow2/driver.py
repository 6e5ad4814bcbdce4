"""The qcow2 format driver.

Metadata (L1, L2 tables, refcount table and blocks) is cached in memory and guarded by one lock
(``self._lock``) that is released around data I/O. L2 tables and refcount blocks are written back
lazily, in crash-safe order, on flush / eviction:

  1. data clusters are written before the L2 entry that points to them is changed (in memory);
  2. refcount blocks (which only ever hold increments or already-safe decrements) are written,
     then the file is flushed (data and refcounts durable), then L2 tables, then — only when L1
     entries changed — a flush, then L1 entries, then a flush again. An evicted dirty L2 table
     is written the same way (refcounts, flush, table): even a power loss leaves leaks at worst;
  3. clusters that lose their last reference are only decremented after step 2 made the L2/L1
     change durable ("pending frees"), so a crash can leak clusters but never corrupt; and only
     once the data requests that found the old entry before it changed have finished (they run
     outside the lock; counted per epoch in C, see ``_settle_frees``), so a late write never
     lands in a cluster handed out again.

Concurrent allocating writes to the same guest cluster are serialised with an in-flight set and a
condition variable on the metadata lock. Every cluster reserved is below ``_zero_from``, and the
file is never truncated below it while growing, whatever requests are still writing.
Persistent dirty bitmaps are kept valid and flagged in use (see bitmaps.py).
"""
import errno
import os
import struct
import threading
import zlib
from array import array

from pyrep._core.iovec import IOVector
from pyrep.constants import (BS_ALLOCATED, BS_DATA, BS_OFFSET_VALID, BS_ZERO, REQ_FUA, REQ_MAY_UNMAP)
from pyrep.driver import BlockDriver
from pyrep.errors import BlockError, OptionError
from pyrep.options import Opt

from . import bitmaps as B
from . import format as F
from ._fast import Qcow2Core
from .format import (COMPRESSED, L1E_OFFSET_MASK, L2E_OFFSET_MASK, NORMAL, OFLAG_COMPRESSED, OFLAG_COPIED,
                     OFLAG_ZERO, REFT_OFFSET_MASK, UNALLOC, ZERO_ALLOC, ZERO_PLAIN)

__all__ = ["Qcow2Driver"]

_DEFAULT_L2_CACHE = 32 * 1024 * 1024
_DEFAULT_RB_CACHE = 8 * 1024 * 1024
_FAST_MASK = OFLAG_COPIED | OFLAG_COMPRESSED | OFLAG_ZERO


def _check_chain_loop(image, backing_path, limit=1024):
    """Follow qcow2 backing names from the headers (plain reads) and refuse a chain that loops."""
    seen = [os.path.realpath(image)]
    cur = backing_path
    for _ in range(limit):
        real = os.path.realpath(cur)
        if real in seen:
            chain = " -> ".join(seen + [real])
            raise OptionError(f"qcow2: backing chain loop: {chain} (image {image})")
        seen.append(real)
        try:
            with open(cur, "rb") as f:
                head = f.read(72)
                if len(head) < 72 or head[:4] != F.MAGIC:
                    return
                bf_off = int.from_bytes(head[8:16], "big")
                bf_size = int.from_bytes(head[16:20], "big")
                if not bf_off or bf_size > F.MAX_BACKING_NAME:
                    return
                f.seek(bf_off)
                name = f.read(bf_size).decode("utf-8", "replace")
        except OSError:
            return
        if name.startswith("json:"):
            return
        cur = name if os.path.isabs(name) else os.path.join(os.path.dirname(os.path.abspath(cur)), name)
    raise OptionError(f"qcow2: backing chain of {image} is deeper than {limit} images")


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

    # ================================================================ open / close
    def open(self, opts):
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._closed = True          # until open succeeds: close() must not flush anything
        self.backing = None
        self.file = self.node.open_child(opts, "file", role="file")
        fnode = self.file.node
        self.filename = fn = getattr(fnode, "filename", None) or getattr(self.node, "filename", None) or fnode.name
        if getattr(self.node, "filename", None) is None:
            self.node.filename = fn
        self.read_only = bool(self.node.read_only)
        file_len = self.file.getlength()
        self._file_size = file_len

        def rd(off, n):
            n = max(0, min(n, file_len - off))
            return self.file.pread(off, n) if n else b""

        h = self.header = F.parse_header(rd, file_len, fn)
        self.version = h.version
        cb = self.cluster_bits = h.cluster_bits
        cs = self.cluster_size = 1 << cb
        self._cmask = cs - 1
        self._l2_bits = cb - 3
        self._l2_entries = cs >> 3
        self._l2_mask = self._l2_entries - 1
        self.size = h.size
        self.refcount_order = h.refcount_order
        self._rb_bits = cb + 3 - h.refcount_order
        self._rb_mask = (1 << self._rb_bits) - 1
        self._rc_max = (1 << (1 << h.refcount_order)) - 1
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
        if h.autoclear & ~F.AUTOCLEAR_BITMAPS and not self.read_only:
            pass  # cleared below, unknown autoclear bits must be cleared before writing

        # L1 table
        if h.l1_size:
            self._l1 = F.be64_to_array(self.file.pread(h.l1_table_offset, h.l1_size * 8))
        else:
            self._l1 = array("Q")
        self._l1_offset = h.l1_table_offset
        # refcount table
        rt_bytes = h.refcount_table_clusters * cs
        self._reftable = F.be64_to_array(self.file.pread(h.refcount_table_offset, rt_bytes))
        self._reftable_offset = h.refcount_table_offset
        self._reftable_clusters = h.refcount_table_clusters

        # caches
        l2c = opts.get("l2-cache-size") or _DEFAULT_L2_CACHE
        self._l2_cache_max = max(4, int(l2c) // cs)
        rbc = opts.get("refcount-cache-size") or _DEFAULT_RB_CACHE
        self._rb_cache_max = max(4, int(rbc) // cs)
        self._l2_cache = {}
        self._l2_dirty = set()
        self._rb_cache = {}
        self._rb_dirty = set()
        self._l1_dirty = set()
        self._pending_free = []         # clusters whose last reference is gone (written at the next flush)
        self._grace_free = []           # ... and waiting for data requests of epoch _grace_epoch
        self._grace_epoch = 0
        self._inflight = set()
        self._free_hint = 1
        self._zero_from = -(-file_len // cs)       # clusters at or past this index were never written
        self._comp_cache = (None, None)
        self._comp_next = 0      # host byte offset where the next compressed cluster may go (0: none)
        self._corrupt_msg = None
        if self._repair_only:
            self._corrupt_msg = (f"qcow2: image {fn} is marked corrupt; it is open only to be repaired "
                                 f"(check -r all), writes are refused")
        self._can_truncate = True

        # backing
        bname = h.backing_file
        if bname and "backing" not in opts:
            if not bname.startswith("json:"):
                base = os.path.dirname(os.path.abspath(fn)) if fn else ""
                full = bname if os.path.isabs(bname) else os.path.join(base, bname)
                try:
                    same = fn and os.path.exists(full) and os.path.samefile(full, fn)
                except OSError:
                    same = False
                if same:
                    raise OptionError(f"qcow2: image {fn} names itself as its backing file ({bname!r}): "
                                      f"backing chain loop")
                _check_chain_loop(fn, full)
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

    def close(self):
        if getattr(self, "_closed", True):
            return
        try:
            if not self.read_only and self.file is not None and not self._repair_only:
                with self._lock:
                    self._flush_meta_locked()
                    self._flush_meta_locked()  # applies frees left by the first pass
                self.file.flush()
        finally:
            self._closed = True
            self._l2_cache = {}
            self._rb_cache = {}

    def getlength(self):
        return self.size

    # ================================================================ helpers
    def _eio(self, what):
        return BlockError(errno.EIO, f"qcow2: {what} (image {self.filename})")

    def _corrupt(self, what):
        """Runtime detection of a corrupted structure: fail the request, stop writing."""
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

    def _note_written(self, end):
        if end > self._file_size:
            self._file_size = end

    # ------------------------------------------------------------ L2 tables
    def _l2_load(self, off):
        """The L2 table at ``off`` (cache, else disk). Lock held."""
        t = self._l2_cache.get(off)
        if t is not None:
            return t
        cs = self.cluster_size
        if off & self._cmask or off < cs:
            raise self._corrupt(f"L2 table offset {off:#x} is invalid (misaligned or in the header)")
        if off + cs > self._file_size:
            raise self._corrupt(f"L2 table at {off:#x} lies past the end of the file")
        t = F.be64_to_array(self.file.pread(off, cs))
        if len(self._l2_cache) >= self._l2_cache_max:
            self._l2_evict()
        self._l2_cache[off] = t
        return t

    def _l2_evict(self):
        victims = list(self._l2_cache)[:max(1, self._l2_cache_max // 8)]
        dirty = [off for off in victims if off in self._l2_dirty]
        if dirty:
            self._write_l2_tables(dirty)
        for off in victims:
            del self._l2_cache[off]

    def _write_l2_tables(self, offs):
        """Lock held: write the dirty L2 tables at ``offs``. A dirty table may point to clusters allocated
        since the last flush: their refcounts and their data reach stable storage first, so that a crash
        or power loss at any point leaves, at worst, leaked clusters: never an L2 entry pointing to a
        cluster whose refcount is 0 (another allocation would reuse it) or that still holds old data
        (QEMU orders its L2 cache after the refcount cache and a flush the same way)."""
        self._write_refblocks()
        self.file.flush()
        for off in offs:
            self.file.pwrite(off, F.array_to_be64(self._l2_cache[off]))
            self._note_written(off + self.cluster_size)
            self._l2_dirty.discard(off)

    def _l2_table(self, l1i, alloc):
        """(table, offset) for L1 index ``l1i``; allocate a zero table if ``alloc``. Lock held."""
        if l1i >= len(self._l1):
            raise self._eio(f"guest offset beyond the L1 table (index {l1i})")
        e = self._l1[l1i]
        off = e & L1E_OFFSET_MASK
        if off:
            return self._l2_load(off), off
        if not alloc:
            return None, 0
        off = self._alloc_clusters(1)
        t = array("Q", bytes(self.cluster_size))
        if len(self._l2_cache) >= self._l2_cache_max:
            self._l2_evict()
        self._l2_cache[off] = t
        self._l2_dirty.add(off)
        self._l1[l1i] = off | OFLAG_COPIED
        self._l1_dirty.add(l1i)
        return t, off

    def _wait_inflight(self):
        """Lock held: wait for an in-flight allocation to finish (counted, so finishers skip notify_all
        when nobody waits)."""
        self._waiters += 1
        try:
            self._cond.wait()
        finally:
            self._waiters -= 1

    def _kind(self, e):
        if e & OFLAG_COMPRESSED:
            return COMPRESSED
        if e & self._zero_flag:
            return ZERO_ALLOC if e & L2E_OFFSET_MASK else ZERO_PLAIN
        if e & L2E_OFFSET_MASK:
            return NORMAL
        return UNALLOC

    # ------------------------------------------------------------ refcounts
    def _refblock(self, off):
        b = self._rb_cache.get(off)
        if b is not None:
            return b
        cs = self.cluster_size
        if off & self._cmask or off < cs or off + cs > self._file_size:
            raise self._corrupt(f"refcount block offset {off:#x} is invalid")
        b = F.RefBlock(self.refcount_order, self.file.pread(off, cs))
        if len(self._rb_cache) >= self._rb_cache_max:
            for o in list(self._rb_cache)[:max(1, self._rb_cache_max // 8)]:
                if o in self._rb_dirty:
                    self.file.pwrite(o, self._rb_cache[o].tobytes())
                    self._rb_dirty.discard(o)
                del self._rb_cache[o]
        self._rb_cache[off] = b
        return b

    def _get_refcount(self, c):
        r = c >> self._rb_bits
        if r >= len(self._reftable):
            return 0
        off = self._reftable[r] & REFT_OFFSET_MASK
        if not off:
            return 0
        return self._refblock(off).get(c & self._rb_mask)

    def _set_refcount(self, c, v):
        """Set the refcount of an already covered cluster (its refcount block exists)."""
        r = c >> self._rb_bits
        off = self._reftable[r] & REFT_OFFSET_MASK
        b = self._refblock(off)
        b.set(c & self._rb_mask, v)
        self._rb_dirty.add(off)

    def _write_refblocks(self):
        if self._rb_dirty:
            for off in sorted(self._rb_dirty):
                self.file.pwrite(off, self._rb_cache[off].tobytes())
                self._note_written(off + self.cluster_size)
            self._rb_dirty.clear()
            return True
        return False

    def _alloc_clusters(self, k):
        """Allocate ``k`` contiguous free clusters, set their refcount to 1; return the host offset."""
        if self._corrupt_msg:
            raise BlockError(errno.EIO, self._corrupt_msg)
        c = self._free_hint
        rb_bits = self._rb_bits
        rb_mask = self._rb_mask
        first_free = None
        while True:
            start = c
            ok = True
            j = 0
            while j < k:
                cc = start + j
                r = cc >> rb_bits
                if r >= len(self._reftable):
                    self._grow_reftable(cc)
                    ok = False
                    break
                boff = self._reftable[r] & REFT_OFFSET_MASK
                if not boff:
                    self._new_refblock(r, cc)
                    ok = False
                    break
                b = self._rb_cache.get(boff)
                if b is None:
                    b = self._refblock(boff)
                if b.get(cc & rb_mask):
                    c = cc + 1
                    ok = False
                    break
                if first_free is None:
                    first_free = cc
                j += 1
            if ok:
                break
        for j in range(k):
            self._set_refcount(start + j, 1)
        if first_free is None or first_free >= start:
            self._free_hint = start + k
        else:
            self._free_hint = first_free
        # everything reserved lies below _zero_from (what _ensure_file_size never truncates below);
        # callers that test "known zero" read it before they allocate
        if start + k > self._zero_from:
            self._zero_from = start + k
        return start << self.cluster_bits

    def _new_refblock(self, r, c):
        """Create the refcount block for range ``r`` at cluster ``c`` (free, inside that range)."""
        cs = self.cluster_size
        off = c << self.cluster_bits
        blk = F.RefBlock(self.refcount_order, bytes(cs))
        blk.set(c & self._rb_mask, 1)
        self.file.pwrite(off, blk.tobytes())
        self._note_written(off + cs)
        self._zero_from = max(self._zero_from, c + 1)
        self.file.flush()
        self._reftable[r] = off
        self.file.pwrite(self._reftable_offset + r * 8, off.to_bytes(8, "big"))
        self._rb_cache[off] = blk

    def _grow_reftable(self, c):
        """The refcount table must cover cluster ``c`` (and everything from ``c`` on is free)."""
        cs = self.cluster_size
        rb_bits = self._rb_bits
        old_n = len(self._reftable)
        need = (c >> rb_bits) + 1
        new_n = max(need, old_n * 2)
        nb = 1
        while True:
            rtc = -(-new_n * 8 // cs)
            end = c + nb + rtc
            first, last = c >> rb_bits, (end - 1) >> rb_bits
            if last + 1 > new_n:
                new_n = last + 1
                continue
            if last - first + 1 == nb:
                break
            nb = last - first + 1
        if rtc * cs > F.MAX_REFTABLE_BYTES:
            raise BlockError(errno.EFBIG, f"qcow2: refcount table would exceed {F.MAX_REFTABLE_BYTES} bytes "
                                          f"(image {self.filename})")
        self._write_refblocks()
        new_rt = array("Q", self._reftable) + array("Q", [0]) * (rtc * (cs // 8) - old_n)
        used = range(c, end)
        for i, r in enumerate(range(first, last + 1)):
            boff = (c + i) << self.cluster_bits
            blk = F.RefBlock(self.refcount_order, bytes(cs))
            for cc in used:
                if cc >> rb_bits == r:
                    blk.set(cc & self._rb_mask, 1)
            self.file.pwrite(boff, blk.tobytes())
            self._rb_cache[boff] = blk
            new_rt[r] = boff
        rt_off = (c + nb) << self.cluster_bits
        self.file.pwrite(rt_off, F.array_to_be64(new_rt))
        self._note_written(end << self.cluster_bits)
        self._zero_from = max(self._zero_from, end)
        self.file.flush()
        self.file.pwrite(48, rt_off.to_bytes(8, "big") + rtc.to_bytes(4, "big"))
        self.file.flush()
        old_off, old_c = self._reftable_offset, self._reftable_clusters
        self._reftable = new_rt
        self._reftable_offset, self._reftable_clusters = rt_off, rtc
        self.header.refcount_table_offset, self.header.refcount_table_clusters = rt_off, rtc
        for i in range(old_c):
            cc = (old_off >> self.cluster_bits) + i
            self._set_refcount(cc, self._get_refcount(cc) - 1)
            self._free_hint = min(self._free_hint, cc)

    def _free_later(self, e):
        """Queue the host clusters of L2 entry ``e`` for a refcount decrement after the next flush."""
        if e & OFLAG_COMPRESSED:
            off = (e & self._coffset_mask) & ~511
            nsec = ((e >> self._csize_shift) & self._csize_mask) + 1
            self._pending_free.append((off, nsec * 512))
        else:
            off = e & L2E_OFFSET_MASK
            if off:
                self._pending_free.append((off, self.cluster_size))

    def _settle_frees(self):
        """Lock held, right after a flush made durable the L2 changes that dropped the pending clusters.
        Apply the frees that are safe; returns the clusters that became free.

        A data request reads its L2 entry under the lock and then reads or writes the host cluster
        without it: one that started before an entry changed may still be using the old cluster. Such a
        cluster must not be freed (and handed out again for other data) until that request is done, or
        its late write would land in someone else's data. Data requests are counted per epoch (the C
        side, ``dio_*``): pending frees move to a grace list when the epoch flips, and are applied once
        the epoch they were queued in has no request left running. With nothing in flight (the usual
        case) that is at once."""
        out = self._apply_grace_frees()
        # flip only when the other epoch is empty, so every request that started before the flip
        # is counted in the epoch the grace list waits for
        if self._pending_free and not self._grace_free and self.dio_idle(self.dio_epoch ^ 1):
            self._grace_epoch = self.dio_flip()
            self._grace_free, self._pending_free = self._pending_free, []
            out += self._apply_grace_frees()
        return out

    def _apply_grace_frees(self):
        """The grace list's frees, if no request of its epoch is still running (else nothing yet)."""
        if not self._grace_free or not self.dio_idle(self._grace_epoch):
            return []
        frees, self._grace_free = self._grace_free, []
        return self._apply_frees(frees)

    def _data_io(self, fn, *args):
        """``fn(*args)``: I/O on a host cluster found in an L2 entry, outside the lock, counted so that
        the cluster is not freed and reused under it (``_settle_frees``)."""
        de = self.dio_enter()
        try:
            return fn(*args)
        finally:
            self.dio_leave(de)

    def _apply_frees(self, frees):
        cb = self.cluster_bits
        discard = []
        # a compressed cluster freed here may be rewritten at the same place with the same entry:
        # the decompressed copy cached under that entry must go
        self._comp_cache = (None, None)
        for off, n in frees:
            for c in range(off >> cb, ((off + n - 1) >> cb) + 1):
                rc = self._get_refcount(c)
                if rc <= 0:
                    continue  # already free: leave it (check will say)
                self._set_refcount(c, rc - 1)
                if rc == 1:
                    if c < self._free_hint:
                        self._free_hint = c
                    if self._comp_next and ((self._comp_next - 1) >> cb) == c:
                        self._comp_next = 0
                    discard.append(c)
        return discard

    # ------------------------------------------------------------ flush
    def _flush_meta_locked(self):
        if self._l2_dirty or self._l1_dirty:
            # refcounts and data, then the L2 tables pointing to them, then the L1 entries pointing
            # to new tables: each step on stable storage before the next one refers to it
            wrote_l2 = bool(self._l2_dirty)
            self._write_l2_tables(sorted(self._l2_dirty))
            if self._l1_dirty and wrote_l2:
                self.file.flush()
            if self._l1_dirty:
                chunks = sorted({i >> 6 for i in self._l1_dirty})
                l1 = self._l1
                for ch in chunks:
                    lo, hi = ch << 6, min(len(l1), (ch + 1) << 6)
                    self.file.pwrite(self._l1_offset + lo * 8, F.array_to_be64(l1[lo:hi]))
                self._l1_dirty.clear()
            self.file.flush()
        else:
            self._write_refblocks()
            if self._pending_free:
                # the L2 tables that dropped these clusters may have been written by an eviction
                # with no flush since: on stable storage before a refcount drops and frees them
                self.file.flush()
        if self._pending_free or self._grace_free:
            for c in self._settle_frees():
                try:
                    if c >= 1:
                        self.file.pdiscard(c << self.cluster_bits, self.cluster_size)
                except Exception:
                    pass

    def flush(self):
        if self.read_only or self._closed:
            return self.file.flush()
        with self._lock:
            self._flush_meta_locked()
        self.file.flush()

    # ================================================================ reads
    def _preadv_slow(self, offset, length, iov):
        done = 0
        cb = self.cluster_bits
        cmask = self._cmask
        l2b = self._l2_bits
        l2m = self._l2_mask
        lock = self._lock
        while done < length:
            pos = offset + done
            rem = length - done
            cidx = pos >> cb
            in_off = pos & cmask
            n = self.cluster_size - in_off
            if n > rem:
                n = rem
            with lock:
                e = self._l1[cidx >> l2b]
                toff = e & L1E_OFFSET_MASK
                if toff:
                    t = self._l2_cache.get(toff)
                    if t is None:
                        t = self._l2_load(toff)
                    l2i = cidx & l2m
                    e = t[l2i]
                    if (e & _FAST_MASK) == OFLAG_COPIED or (e and not e & (OFLAG_COMPRESSED | self._zero_flag)):
                        kind = NORMAL
                        host = e & L2E_OFFSET_MASK
                        # extend over physically contiguous clusters in the same table
                        nxt = host + self.cluster_size
                        while n < rem and l2i + 1 <= l2m:
                            e2 = t[l2i + 1]
                            if (e2 & L2E_OFFSET_MASK) != nxt or e2 & (OFLAG_COMPRESSED | self._zero_flag):
                                break
                            l2i += 1
                            nxt += self.cluster_size
                            n += min(rem - n, self.cluster_size)
                    else:
                        kind = self._kind(e)
                        if kind != COMPRESSED:
                            n = self._extend_same(t, cidx & l2m, kind, n, rem)
                else:
                    kind = UNALLOC
                    n = min(rem, ((((cidx >> l2b) + 1) << (l2b + cb)) - pos))
            if kind == NORMAL:
                if host & cmask or host < self.cluster_size:
                    raise self._corrupt(f"data cluster offset {host:#x} for guest offset {pos} is invalid")
                self._data_io(self.file.preadv, host + in_off, n, iov.slice(done, n) if n != length else iov)
            elif kind == UNALLOC:
                self._read_backing(pos, n, iov, done)
            elif kind == COMPRESSED:
                data = self._data_io(self._decompress, e, pos)
                iov.copy_from(done, memoryview(data)[in_off:in_off + n])
            else:
                iov.memset(done, 0, n)
            done += n

    def _extend_same(self, t, l2i, kind, n, rem):
        """Grow ``n`` over following entries of the same (non-data) kind in table ``t``."""
        cs = self.cluster_size
        kf = self._kind
        l2m = self._l2_mask
        while n < rem and l2i < l2m:
            l2i += 1
            if kf(t[l2i]) != kind:
                break
            n += min(rem - n, cs)
        return n

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

    def _decompress(self, e, pos):
        key, data = self._comp_cache
        if key == e:
            return data
        off = e & self._coffset_mask
        nsec = ((e >> self._csize_shift) & self._csize_mask) + 1
        clen = nsec * 512 - (off & 511)
        clen = max(0, min(clen, self._file_size - off))
        raw = self.file.pread(off, clen) if clen else b""
        try:
            d = zlib.decompressobj(-12)
            out = d.decompress(raw, self.cluster_size)
        except zlib.error as ex:
            raise self._eio(f"cannot decompress the cluster at guest offset {pos} (host {off:#x}): {ex}") from None
        if len(out) != self.cluster_size:
            raise self._eio(f"compressed cluster at guest offset {pos} (host {off:#x}) is truncated")
        self._comp_cache = (e, out)
        return out

    def _old_bytes(self, cidx, e, start, n):
        """Current content of guest cluster ``cidx`` bytes [start, start+n) given its entry ``e``;
        None if it reads as zeroes."""
        kind = self._kind(e)
        pos = (cidx << self.cluster_bits) + start
        if kind == NORMAL:
            return self.file.pread((e & L2E_OFFSET_MASK) + start, n)
        if kind == COMPRESSED:
            return self._decompress(e, pos)[start:start + n]
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
        with self._lock:
            if not self._bm_pending:
                return
            d = self._bm_dir            # as read when the image went read/write (we never change it)
            self.file.pwrite(d.offset, d.marked_in_use())
            self.file.flush()
            self._bm_pending = False

    def _pwritev_slow(self, offset, length, iov, flags):
        self._check_writable()
        done = 0
        cb = self.cluster_bits
        cs = self.cluster_size
        cmask = self._cmask
        l2b = self._l2_bits
        l2m = self._l2_mask
        lock = self._lock
        while done < length:
            pos = offset + done
            rem = length - done
            cidx = pos >> cb
            in_off = pos & cmask
            n = cs - in_off
            if n > rem:
                n = rem
            with lock:
                while cidx in self._inflight:
                    self._wait_inflight()
                e = self._l1[cidx >> l2b]
                toff = e & L1E_OFFSET_MASK
                t = None
                if toff:
                    t = self._l2_cache.get(toff)
                    if t is None:
                        t = self._l2_load(toff)
                    l2i = cidx & l2m
                    e = t[l2i]
                else:
                    e = 0
                if (e & _FAST_MASK) == OFLAG_COPIED:
                    host = e & L2E_OFFSET_MASK
                    nxt = host + cs
                    while n < rem and l2i < l2m:
                        e2 = t[l2i + 1]
                        if (e2 & _FAST_MASK) != OFLAG_COPIED or (e2 & L2E_OFFSET_MASK) != nxt \
                                or (cidx + (n + in_off) // cs) in self._inflight:
                            break
                        l2i += 1
                        nxt += cs
                        n += min(rem - n, cs)
                    plan = None
                else:
                    plan = self._plan_alloc(cidx, in_off, rem, t)
                    n = plan[2]
            if plan is None:
                if host & cmask or host < cs or self.meta_overlap(host, n + in_off):
                    raise self._corrupt(f"data cluster offset {host:#x} for guest offset {pos} is invalid")
                self._data_io(self.file.pwritev, host + in_off, n, iov.slice(done, n) if n != length else iov)
            else:
                self._alloc_write(plan, in_off, iov, done)
            done += n
        if flags & REQ_FUA:
            self.flush()

    def _plan_alloc(self, cidx, in_off, rem, t):
        """Lock held. Reserve guest clusters [cidx, cidx+k) and k new host clusters."""
        cs = self.cluster_size
        l2m = self._l2_mask
        l1i = cidx >> self._l2_bits
        n = min(rem, cs - in_off)
        k = 1
        if t is not None:
            l2i = cidx & l2m
            while n < rem and l2i + k <= l2m and (cidx + k) not in self._inflight:
                e2 = t[l2i + k]
                if (e2 & _FAST_MASK) == OFLAG_COPIED:
                    break
                n += min(rem - n, cs)
                k += 1
        else:
            while n < rem and ((cidx + k) & l2m) and (cidx + k) not in self._inflight:
                n += min(rem - n, cs)
                k += 1
        t, toff = self._l2_table(l1i, alloc=True)
        l2i = cidx & l2m
        olds = [t[l2i + j] for j in range(k)]
        zero_from = self._zero_from
        host = self._alloc_clusters(k)
        hc = host >> self.cluster_bits
        known_zero = hc >= zero_from
        if hc + k > self._zero_from:
            self._zero_from = hc + k
        for j in range(k):
            self._inflight.add(cidx + j)
        return (cidx, k, n, host, olds, known_zero)

    def _alloc_write(self, plan, in_off, iov, done):
        cidx, k, n, host, olds, known_zero = plan
        cs = self.cluster_size
        try:
            head = tail = None
            tail_len = k * cs - in_off - n
            if in_off:
                head = self._old_bytes(cidx, olds[0], 0, in_off)
            if tail_len:
                tail = self._old_bytes(cidx + k - 1, olds[-1], cs - tail_len, tail_len)
            if (not in_off or head is None and known_zero) and (not tail_len or tail is None and known_zero):
                if tail_len:
                    self._ensure_file_size(host + k * cs, host)
                if self.meta_overlap(host, k * cs) or host < cs:
                    raise self._corrupt(f"newly allocated cluster {host:#x} overlaps metadata")
                self._file_pwritev(host + in_off, n, iov.slice(done, n) if done or n != iov.size else iov)
                start, total = host + in_off, n
                self._commit_alloc(cidx, k, host, olds, start, total)
                return
            v = IOVector()
            start = host + in_off
            total = n
            if in_off:
                if head is None and known_zero:
                    pass
                else:
                    v.add(head if head is not None else bytes(in_off))
                    start = host
                    total += in_off
            v.concat(iov, done, n)
            if tail_len:
                if tail is None and known_zero:
                    self._ensure_file_size(host + k * cs, host)
                else:
                    v.add(tail if tail is not None else bytes(tail_len))
                    total += tail_len
            if self.meta_overlap(host, k * cs) or host < cs:
                raise self._corrupt(f"newly allocated cluster {host:#x} overlaps metadata")
            self._file_pwritev(start, total, v)
            self._commit_alloc(cidx, k, host, olds, start, total)
        finally:
            with self._lock:
                for j in range(k):
                    self._inflight.discard(cidx + j)
                if self._waiters:
                    self._cond.notify_all()

    def _commit_alloc(self, cidx, k, host, olds, start, total):
        cs = self.cluster_size
        with self._lock:
            self._note_written(start + total)
            t, _ = self._l2_table(cidx >> self._l2_bits, alloc=False)
            l2i = cidx & self._l2_mask
            for j in range(k):
                t[l2i + j] = (host + j * cs) | OFLAG_COPIED
                if olds[j]:
                    self._free_later(olds[j])
            self._l2_dirty.add(self._l1[cidx >> self._l2_bits] & L1E_OFFSET_MASK)

    # ------------------------------------------------------------ compressed writes
    def pwritev_compressed(self, offset, length, iov):
        """Write one whole guest cluster deflate-compressed (as qemu-img convert -c does).

        ``offset`` must be cluster aligned and ``length`` one cluster (or the shorter last cluster of the
        image, padded with zeroes); the guest cluster must be unallocated or a plain zero cluster.
        Data that does not compress to less than a cluster is written uncompressed. Several compressed
        clusters share host clusters (packed in 512-byte sectors); each host cluster's refcount is the
        number of compressed clusters in it. Order: refcounts (in memory, written first on flush), data,
        then the L2 entry."""
        self._check_writable()
        if self.read_only:
            raise BlockError(errno.EROFS, f"qcow2: image {self.filename} is read-only")
        cs = self.cluster_size
        if offset < 0 or offset & self._cmask:
            raise BlockError(errno.EINVAL, f"qcow2: compressed write at offset {offset} is not aligned to the "
                                           f"cluster size {cs}")
        if offset >= self.size:
            raise BlockError(errno.EINVAL, f"qcow2: compressed write at offset {offset} is past the end of the "
                                           f"image ({self.size} bytes)")
        if length != cs and not (0 < length < cs and offset + length == self.size):
            raise BlockError(errno.EINVAL, f"qcow2: compressed write of {length} bytes at offset {offset}: must be "
                                           f"one whole cluster ({cs} bytes; only the last cluster may be shorter)")
        if iov.size != length:
            raise BlockError(errno.EINVAL, f"qcow2: compressed write: the buffer holds {iov.size} bytes, "
                                           f"not {length}")
        data = iov.copy_to(0, length)
        if length < cs:
            data += bytes(cs - length)
        co = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12)
        comp = co.compress(data) + co.flush()
        if len(comp) >= cs:
            # incompressible: an ordinary write (the cluster still has to be unallocated or zero)
            self._compressed_target_check(offset)
            return self.pwritev(offset, length, iov, 0)
        nsec = -(-len(comp) // 512)
        nbytes = nsec * 512
        cb = self.cluster_bits
        cidx = offset >> cb
        l1i = cidx >> self._l2_bits
        l2i = cidx & self._l2_mask
        with self._lock:
            while cidx in self._inflight:
                self._wait_inflight()
            self._compressed_target_check(offset, locked=True)
            t, _ = self._l2_table(l1i, alloc=True)
            old = t[l2i]
            host = self._alloc_compressed(nbytes)
            self._inflight.add(cidx)
        try:
            try:
                end = host + nbytes
                self._ensure_file_size((((end - 1) >> cb) + 1) << cb, host)
                if host < cs or self.meta_overlap(host, nbytes):
                    raise self._corrupt(f"compressed data at {host:#x} would overlap metadata")
                self.file.pwrite(host, comp + bytes(nbytes - len(comp)))
                self._comp_cache = (None, None)     # the new entry may equal a freed one's
            except BaseException:
                with self._lock:   # give the space back (a leak at worst if this fails too)
                    self._pending_free.append((host, nbytes))
                    if self._comp_next == host + nbytes:
                        self._comp_next = 0
                raise
            with self._lock:
                self._note_written(end)
                t, toff = self._l2_table(l1i, alloc=False)
                t[l2i] = host | OFLAG_COMPRESSED | ((nsec - 1) << self._csize_shift)
                if old & L2E_OFFSET_MASK:
                    self._free_later(old)
                self._l2_dirty.add(toff)
        finally:
            with self._lock:
                self._inflight.discard(cidx)
                if self._waiters:
                    self._cond.notify_all()
        return None

    def _compressed_target_check(self, offset, locked=False):
        """The guest cluster at ``offset`` must be unallocated or a plain zero cluster (as in QEMU)."""
        if not locked:
            with self._lock:
                return self._compressed_target_check(offset, locked=True)
        cidx = offset >> self.cluster_bits
        t, _ = self._l2_table(cidx >> self._l2_bits, alloc=False)
        e = t[cidx & self._l2_mask] if t is not None else 0
        kind = self._kind(e)
        if kind not in (UNALLOC, ZERO_PLAIN):
            what = {NORMAL: "data", ZERO_ALLOC: "a preallocated zero cluster",
                    COMPRESSED: "compressed data"}.get(kind, "data")
            raise BlockError(errno.ENOTSUP, f"qcow2: compressed write at offset {offset}: the cluster already "
                                            f"holds {what}; compressed writes only go to unallocated or zero "
                                            f"clusters (image {self.filename})")

    def _alloc_compressed(self, nbytes):
        """Lock held. ``nbytes`` (a multiple of 512) of host space for compressed data, packed after the
        previous compressed cluster when it fits (in its host cluster, or running on into the free clusters
        right after it); refcounts of every host cluster the range touches are incremented."""
        cb = self.cluster_bits
        cs = self.cluster_size
        cur = self._comp_next
        if cur and cur & self._cmask:
            first = cur >> cb
            last = (cur + nbytes - 1) >> cb
            ok = self._get_refcount(first) >= 1
            if ok and last > first:
                # the range runs on into the next clusters: they must be free and plain data space
                ok = (last >> self._rb_bits) < len(self._reftable) and not self.meta_overlap(
                    (first + 1) << cb, (last - first) << cb)
                for c in range(first + 1, last + 1):
                    if not ok:
                        break
                    r = c >> self._rb_bits
                    if not (self._reftable[r] & REFT_OFFSET_MASK) or self._get_refcount(c):
                        ok = False
            if ok:
                rc = self._get_refcount(first)
                if rc >= self._rc_max:
                    raise BlockError(errno.EMLINK, f"qcow2: refcount overflow for host cluster {first << cb:#x} "
                                                   f"(image {self.filename})")
                self._set_refcount(first, rc + 1)
                for c in range(first + 1, last + 1):
                    self._set_refcount(c, 1)
                if last + 1 > self._zero_from:
                    self._zero_from = last + 1
                if self._free_hint in range(first + 1, last + 1):
                    self._free_hint = last + 1
                self._comp_next = cur + nbytes
                return cur
        k = -(-nbytes // cs)
        host = self._alloc_clusters(k)
        hc = host >> cb
        if hc + k > self._zero_from:
            self._zero_from = hc + k
        self._comp_next = host + nbytes
        return host

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
        with self._lock:
            self._flush_meta_locked()
            self.file.flush()
            c0 = self.file.pread(0, min(cs, self._file_size))
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
            self._note_written(len(new))
            self.file.flush()
            h.backing_file = name
            h.backing_format = fmt
            h.backing_file_offset, h.backing_file_size = bf_off, len(bname)
            h.has_bitmaps_ext = F.EXT_BITMAPS not in drop

    def _ensure_file_size(self, end, start):
        """The file must reach ``end`` (so data clusters never hang past EOF); grow in chunks. ``start``:
        where the caller's own new clusters begin (it has reserved [start, end) and writes it next).

        Other requests may be writing clusters they reserved at any moment, past ``_file_size`` (which
        they raise only once their write is done): growing never truncates below the last reserved
        cluster (``_zero_from``), and zeroes are written only over the caller's own clusters."""
        if end <= self._file_size:
            return
        with self._lock:
            if end <= self._file_size:
                return
            cs = self.cluster_size
            grow = max(end, self._zero_from << self.cluster_bits,
                       self._file_size + min(max(self._file_size // 8, 1 << 20), 64 << 20))
            grow = (grow + cs - 1) & ~(cs - 1)
            if self._can_truncate:
                try:
                    self.file.truncate(grow)
                    self._file_size = grow
                    return
                except BlockError:
                    self._can_truncate = False
            pos = max(self._file_size, start)
            self.file.pwrite_zeroes(pos, end - pos)
            self._file_size = end

    # ------------------------------------------------------------ zeroes / discard
    def _reads_zero_unalloc(self, pos, n):
        b = self.backing
        return b is None or pos >= b.node.length

    def pwrite_zeroes(self, offset, length, flags=0):
        self._check_writable()
        self._zero_or_discard(offset, length, flags, discard=False)
        if flags & REQ_FUA:
            self.flush()

    def pdiscard(self, offset, length):
        self._check_writable()
        self._zero_or_discard(offset, length, REQ_MAY_UNMAP, discard=True)

    def _zero_or_discard(self, offset, length, flags, discard, full=False):
        cs = self.cluster_size
        end = offset + length
        a = (offset + cs - 1) & ~(cs - 1)
        b = end & ~(self._cmask)
        if end == self.size:
            b = (end + cs - 1) & ~(cs - 1)   # the tail cluster past the end counts as whole
        if a >= b:
            if not discard:
                self._zero_partial(offset, length)
            return
        if not discard:
            if offset < a:
                self._zero_partial(offset, a - offset)
            if min(b, end) < end:
                self._zero_partial(b, end - b)
        fallback = []
        cb = self.cluster_bits
        c = a >> cb
        cend = b >> cb
        while c < cend:
            with self._lock:
                while c in self._inflight:
                    self._wait_inflight()
                l1i = c >> self._l2_bits
                t, _ = self._l2_table(l1i, alloc=False)
                stop = min(cend, (l1i + 1) << self._l2_bits)
                if t is None and ((discard and (self.version == 2 or full))
                                  or self._reads_zero_unalloc(c << cb, (stop - c) << cb)):
                    c = stop
                    continue
                if t is None and self.version == 2:
                    fallback.append((c << cb, (stop - c) << cb))
                    c = stop
                    continue
                if t is None:
                    t, _ = self._l2_table(l1i, alloc=True)
                toff = self._l1[l1i] & L1E_OFFSET_MASK
                changed = False
                while c < stop:
                    if c in self._inflight:
                        break
                    l2i = c & self._l2_mask
                    e = t[l2i]
                    kind = self._kind(e)
                    pos = c << cb
                    if self.version >= 3:
                        if discard:
                            new = 0 if full or self._reads_zero_unalloc(pos, cs) else OFLAG_ZERO
                        elif flags & REQ_MAY_UNMAP or kind in (COMPRESSED, UNALLOC, ZERO_PLAIN):
                            new = OFLAG_ZERO
                        else:   # keep the allocation: NORMAL / ZERO_ALLOC
                            new = (e & L2E_OFFSET_MASK) | OFLAG_ZERO | (e & OFLAG_COPIED)
                            if not e & OFLAG_COPIED:   # shared cluster: cannot keep it
                                new = OFLAG_ZERO
                        if kind == UNALLOC and new == 0:
                            c += 1
                            continue
                    else:
                        unalloc_zero = self._reads_zero_unalloc(pos, cs)
                        if discard or (flags & REQ_MAY_UNMAP and unalloc_zero):
                            new = 0
                        elif kind == UNALLOC and unalloc_zero:
                            c += 1
                            continue
                        elif kind == NORMAL and e & OFLAG_COPIED:
                            fallback.append(("host", e & L2E_OFFSET_MASK))
                            c += 1
                            continue
                        else:
                            fallback.append((pos, cs))
                            c += 1
                            continue
                    if new != e:
                        t[l2i] = new
                        changed = True
                        if e and (e & L2E_OFFSET_MASK) != (new & L2E_OFFSET_MASK) or kind == COMPRESSED:
                            self._free_later(e)
                    c += 1
                if changed:
                    self._l2_dirty.add(toff)
        for item in fallback:
            if item[0] == "host":
                self._data_io(self.file.pwrite_zeroes, item[1], cs)
            else:
                pos, n = item
                n = min(n, self.size - pos)
                if n > 0:
                    self._zero_partial(pos, n)
        if discard:
            # pdiscard asks for space back: make the frees happen
            with self._lock:
                if self._pending_free:
                    self._flush_meta_locked()

    def _zero_partial(self, pos, n):
        """Write explicit zeroes over [pos, pos+n) unless it already reads as zeroes."""
        if n <= 0:
            return
        cb = self.cluster_bits
        if (pos >> cb) == ((pos + n - 1) >> cb):
            with self._lock:
                l1i = (pos >> cb) >> self._l2_bits
                t, _ = self._l2_table(l1i, alloc=False)
                e = t[(pos >> cb) & self._l2_mask] if t is not None else 0
                kind = self._kind(e)
            if kind in (ZERO_PLAIN, ZERO_ALLOC) or (kind == UNALLOC and self._reads_zero_unalloc(pos, n)):
                return
        z = bytes(min(n, 1 << 20))
        done = 0
        while done < n:
            m = min(len(z), n - done)
            self.pwritev(pos + done, m, IOVector(memoryview(z)[:m]), 0)
            done += m

    # ================================================================ status
    def block_status(self, offset, length):
        cb = self.cluster_bits
        cidx = offset >> cb
        in_off = offset & self._cmask
        n = min(length, self.cluster_size - in_off)
        with self._lock:
            l1i = cidx >> self._l2_bits
            t, _ = self._l2_table(l1i, alloc=False)
            if t is None:
                n = min(length, (((l1i + 1) << (self._l2_bits + cb)) - offset))
                return (0, n, None, None)
            l2i = cidx & self._l2_mask
            e = t[l2i]
            kind = self._kind(e)
            if kind == NORMAL:
                host = e & L2E_OFFSET_MASK
                nxt = host + self.cluster_size
                while n < length and l2i < self._l2_mask:
                    e2 = t[l2i + 1]
                    if self._kind(e2) != NORMAL or (e2 & L2E_OFFSET_MASK) != nxt:
                        break
                    l2i += 1
                    nxt += self.cluster_size
                    n += min(length - n, self.cluster_size)
                return (BS_DATA | BS_ALLOCATED | BS_OFFSET_VALID, n, host + in_off, self.file.node)
            n = self._extend_same(t, l2i, kind, n, length)
        if kind == UNALLOC:
            return (0, n, None, None)
        if kind == COMPRESSED:
            return (BS_DATA | BS_ALLOCATED, n, None, None)
        return (BS_ZERO | BS_ALLOCATED, n, None, None)

    # ================================================================ resize
    def truncate(self, length):
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
        need = -(-length // (cs * self._l2_entries))
        if need * 8 > F.MAX_L1_BYTES or length > F.MAX_VIRTUAL_SIZE:
            raise BlockError(errno.EFBIG, f"qcow2: size {length} is too large for cluster size {cs}")
        with self._lock:
            self._flush_meta_locked()
            if need > len(self._l1):
                new_l1 = array("Q", self._l1) + array("Q", [0]) * (need - len(self._l1))
                nclus = -(-need * 8 // cs)
                off = self._alloc_clusters(nclus)
                self._write_refblocks()
                self.file.pwrite(off, F.array_to_be64(new_l1) + bytes(nclus * cs - need * 8))
                self._note_written(off + nclus * cs)
                self.file.flush()
                self.file.pwrite(36, need.to_bytes(4, "big") + off.to_bytes(8, "big"))
                self.file.flush()
                old_off, old_n = self._l1_offset, len(self._l1)
                self._l1, self._l1_offset = new_l1, off
                self.header.l1_size, self.header.l1_table_offset = need, off
                if old_n:
                    self._pending_free.append((old_off, old_n * 8))
            self.file.pwrite(24, length.to_bytes(8, "big"))
            self.file.flush()
            self.size = self.header.size = length
            self._flush_meta_locked()

    # ================================================================ make_empty
    def make_empty(self):
        self._check_writable()
        h = self.header
        if h.nb_snapshots or h.has_bitmaps_ext or h.has_crypto_ext:
            # slow path: drop every cluster mapping one by one
            self._zero_or_discard(0, self.size, REQ_MAY_UNMAP, discard=True, full=True)
            return self.flush()
        cs = self.cluster_size
        cb = self.cluster_bits
        with self._lock:
            while self._inflight:
                self._wait_inflight()
            l1_size = len(self._l1)
            end_c = max(-(-self._file_size // cs), self._zero_from)
            # phase 1: a fresh layout past everything in use; switch the header to it
            lay1 = F.plan_layout(end_c, cb, self.refcount_order, l1_size)
            self._write_layout(lay1, l1_size)
            # phase 2: the compact layout right after the header (now free), then truncate
            lay2 = F.plan_layout(1, cb, self.refcount_order, l1_size)
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
                    self._file_size = max(new_end, cs)
                except BlockError:
                    pass
            self._file_size = self.file.getlength()
            self._l1 = array("Q", [0]) * l1_size
            self._l1_offset = final["l1_off"]
            self._reftable = F.be64_to_array(self.file.pread(final["rt_off"], final["rt_clusters"] * cs))
            self._reftable_offset, self._reftable_clusters = final["rt_off"], final["rt_clusters"]
            h.l1_table_offset = final["l1_off"]
            h.refcount_table_offset, h.refcount_table_clusters = final["rt_off"], final["rt_clusters"]
            self._l2_cache.clear()
            self._l2_dirty.clear()
            self._l1_dirty.clear()
            self._rb_cache.clear()
            self._rb_dirty.clear()
            self._pending_free = []
            self._grace_free = []
            self._comp_cache = (None, None)
            self._comp_next = 0
            self._free_hint = 1
            self._zero_from = -(-self._file_size // cs)

    def _write_layout(self, lay, l1_size):
        cs = self.cluster_size
        for off, data in F.layout_blobs(lay, self.cluster_bits, self.refcount_order):
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
            with self._lock:
                self._flush_meta_locked()
                self._flush_meta_locked()
            self.file.flush()

    def reopen_commit(self):
        to = getattr(self, "_reopen_to", None)
        if to is None:
            return
        was = self.read_only
        self.read_only = to
        if was and not to:
            self._file_size = self.file.getlength()
            self._zero_from = -(-self._file_size // self.cluster_size)
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
        with self._lock:
            if not self.read_only:
                self._flush_meta_locked()
                self._flush_meta_locked()
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
                cs = self.cluster_size
                self._rb_cache.clear()
                self._rb_dirty.clear()
                self._l2_cache.clear()
                self._l2_dirty.clear()
                self._l1 = F.be64_to_array(self.file.pread(self._l1_offset, len(self._l1) * 8))
                self._reftable = F.be64_to_array(self.file.pread(self._reftable_offset,
                                                                 self._reftable_clusters * cs))
                self._free_hint = 1
                self._comp_next = 0
                self._file_size = self.file.getlength()
        return res

    @classmethod
    def create(cls, filename, size, opts):
        F.create_file(filename, size, opts or {})
