"""qcow2 reference counts: the refcount table and blocks, cluster allocation, deferred frees
(QEMU's qcow2-refcount.c).

``Refcounts`` owns ``lock``, which guards every field here (the C part, ``RefcountCore``, lists them).
When the cluster map's lock is held too it is taken first (``Clusters.lock`` → ``Refcounts.lock``);
nothing here ever takes the cluster lock.

Crash safety: a cluster is reserved (refcount 1) in memory before anything points to it, and refcount
blocks reach the file before the L2 tables that point to the clusters they count (the L2 cache's
``before_write`` is :meth:`Refcounts.write_back_durable`). A cluster that loses its last reference
is only decremented after the L2/L1 change that dropped it is durable ("pending frees"), and only
once the data requests that found the old entry before it changed have finished (they run outside
any lock; counted per epoch in C, see :meth:`Refcounts.settle_frees`), so a crash can leak clusters
but never corrupt, and a late write never lands in a cluster handed out again.
"""
import errno
import threading
from array import array

from pyrep.errors import BlockError

from . import format as F
from ._fast import RefcountCore
from .cache import Qcow2Cache
from .format import REFT_OFFSET_MASK

__all__ = ["Refcounts"]


class Refcounts(RefcountCore):
    """The refcounts of one image. ``img`` is the driver (file child, geometry, corruption reports,
    data-request epochs); ``cache_bytes`` bounds the refcount-block cache."""

    def __init__(self, img, header, reftable, file_size, cache_bytes, on_frees=None):
        self.lock = threading.Lock()
        self.img = img
        self.file = img.file
        cs = self.cluster_size = img.cluster_size
        self.cluster_bits = img.cluster_bits
        self.order = header.refcount_order
        self.block_bits = img.cluster_bits + 3 - header.refcount_order
        self.block_mask = (1 << self.block_bits) - 1
        self.max = (1 << (1 << header.refcount_order)) - 1
        self.header = header
        self.table = reftable
        self.table_offset = header.refcount_table_offset
        self.table_clusters = header.refcount_table_clusters
        self.blocks = Qcow2Cache(img.file, cache_bytes // cs, lambda b: b.tobytes())
        self.free_hint = 1
        self.file_size = file_size
        self.reserved_end = -(-file_size // cs)     # clusters at or past this index were never written
        self.free_byte_offset = 0   # host byte where the next compressed cluster may go (0: none)
        self.pending = []           # (offset, bytes) whose last reference is gone, to free after a flush
        self.grace = []             # ... and waiting for the data requests of epoch grace_epoch
        self.grace_epoch = 0
        self._on_frees = on_frees   # called (lock held) when frees are applied: cached copies must go

    # ------------------------------------------------------------ blocks
    def _block(self, off):
        """Lock held: the refcount block at ``off`` (cache, else the file)."""
        b = self.blocks.tables.get(off)
        if b is not None:
            return b
        cs = self.cluster_size
        if off & (cs - 1) or off < cs or off + cs > self.file_size:
            raise self.img.corrupt(f"refcount block offset {off:#x} is invalid")
        b = F.RefBlock(self.order, self.file.pread(off, cs))
        self.blocks.add(off, b)
        return b

    def get(self, c):
        """Lock held: the refcount of cluster ``c`` (0 where no block covers it)."""
        r = c >> self.block_bits
        if r >= len(self.table):
            return 0
        off = self.table[r] & REFT_OFFSET_MASK
        if not off:
            return 0
        return self._block(off).get(c & self.block_mask)

    def set(self, c, v):
        """Lock held: set the refcount of a cluster whose refcount block exists."""
        off = self.table[c >> self.block_bits] & REFT_OFFSET_MASK
        self._block(off).set(c & self.block_mask, v)
        self.blocks.mark_dirty(off)

    def write_back(self):
        """Lock held: write the dirty refcount blocks. True if there were any."""
        return self.blocks.write_back()

    def write_back_durable(self):
        """Write the dirty refcount blocks and flush the file: what must precede writing an L2 table."""
        with self.lock:
            self.blocks.write_back()
        self.file.flush()

    # ------------------------------------------------------------ allocation
    def alloc_clusters(self, k):
        """Reserve ``k`` contiguous free clusters (refcount 1); returns the host offset of the first."""
        with self.lock:
            return self._alloc_clusters(k)

    def _alloc_clusters(self, k):
        img = self.img
        if img._corrupt_msg:
            raise BlockError(errno.EIO, img._corrupt_msg)
        c = self.free_hint
        bb, bm = self.block_bits, self.block_mask
        first_free = None
        while True:
            start = c
            ok = True
            j = 0
            while j < k:
                cc = start + j
                r = cc >> bb
                if r >= len(self.table):
                    self._grow_table(cc)
                    ok = False
                    break
                boff = self.table[r] & REFT_OFFSET_MASK
                if not boff:
                    self._new_block(r, cc)
                    ok = False
                    break
                if self._block(boff).get(cc & bm):
                    c = cc + 1
                    ok = False
                    break
                if first_free is None:
                    first_free = cc
                j += 1
            if ok:
                break
        for j in range(k):
            self.set(start + j, 1)
        self.free_hint = start + k if first_free is None or first_free >= start else first_free
        # everything reserved lies below reserved_end (what ensure_file_size never truncates below);
        # callers that test "known zero" read it before they allocate
        if start + k > self.reserved_end:
            self.reserved_end = start + k
        return start << self.cluster_bits

    def _new_block(self, r, c):
        """Create the refcount block for range ``r`` at cluster ``c`` (free, inside that range)."""
        cs = self.cluster_size
        off = c << self.cluster_bits
        blk = F.RefBlock(self.order, bytes(cs))
        blk.set(c & self.block_mask, 1)
        self.file.pwrite(off, blk.tobytes())
        self.note_written(off + cs)
        self.reserved_end = max(self.reserved_end, c + 1)
        self.file.flush()
        self.table[r] = off
        self.file.pwrite(self.table_offset + r * 8, off.to_bytes(8, "big"))
        self.blocks.add(off, blk)

    def _grow_table(self, c):
        """The refcount table must cover cluster ``c`` (and everything from ``c`` on is free)."""
        cs = self.cluster_size
        cb, bb = self.cluster_bits, self.block_bits
        old_n = len(self.table)
        need = (c >> bb) + 1
        new_n = max(need, old_n * 2)
        nb = 1
        while True:
            rtc = -(-new_n * 8 // cs)
            end = c + nb + rtc
            first, last = c >> bb, (end - 1) >> bb
            if last + 1 > new_n:
                new_n = last + 1
                continue
            if last - first + 1 == nb:
                break
            nb = last - first + 1
        if rtc * cs > F.MAX_REFTABLE_BYTES:
            raise BlockError(errno.EFBIG, f"qcow2: refcount table would exceed {F.MAX_REFTABLE_BYTES} bytes "
                                          f"(image {self.img.filename})")
        self.blocks.write_back()
        new_rt = array("Q", self.table) + array("Q", [0]) * (rtc * (cs // 8) - old_n)
        used = range(c, end)
        for i, r in enumerate(range(first, last + 1)):
            boff = (c + i) << cb
            blk = F.RefBlock(self.order, bytes(cs))
            for cc in used:
                if cc >> bb == r:
                    blk.set(cc & self.block_mask, 1)
            self.file.pwrite(boff, blk.tobytes())
            self.blocks.add(boff, blk)
            new_rt[r] = boff
        rt_off = (c + nb) << cb
        self.file.pwrite(rt_off, F.array_to_be64(new_rt))
        self.note_written(end << cb)
        self.reserved_end = max(self.reserved_end, end)
        self.file.flush()
        self.file.pwrite(48, rt_off.to_bytes(8, "big") + rtc.to_bytes(4, "big"))
        self.file.flush()
        old_off, old_c = self.table_offset, self.table_clusters
        self.table = new_rt
        self.table_offset, self.table_clusters = rt_off, rtc
        self.header.refcount_table_offset, self.header.refcount_table_clusters = rt_off, rtc
        for i in range(old_c):
            cc = (old_off >> cb) + i
            self.set(cc, self.get(cc) - 1)
            self.free_hint = min(self.free_hint, cc)

    def alloc_bytes(self, nbytes):
        """``nbytes`` (a multiple of 512) of host space for compressed data, packed after the previous
        compressed cluster when it fits (in its host cluster, or running on into the free clusters right
        after it); the refcount of every host cluster the range touches is incremented (a host cluster's
        refcount is the number of compressed clusters in it). Returns the host byte offset."""
        with self.lock:
            cb, cs = self.cluster_bits, self.cluster_size
            cur = self.free_byte_offset
            if cur and cur & (cs - 1):
                first = cur >> cb
                last = (cur + nbytes - 1) >> cb
                ok = self.get(first) >= 1
                if ok and last > first:
                    # the range runs on into the next clusters: they must be free and plain data space
                    ok = (last >> self.block_bits) < len(self.table) and not self.img.meta_overlap(
                        (first + 1) << cb, (last - first) << cb)
                    for c in range(first + 1, last + 1):
                        if not ok:
                            break
                        if not (self.table[c >> self.block_bits] & REFT_OFFSET_MASK) or self.get(c):
                            ok = False
                rc = self.get(first)
                if ok and rc < self.max:
                    # (a full refcount, e.g. with refcount_bits=1, starts a new host cluster instead)
                    self.set(first, rc + 1)
                    for c in range(first + 1, last + 1):
                        self.set(c, 1)
                    if last + 1 > self.reserved_end:
                        self.reserved_end = last + 1
                    if first + 1 <= self.free_hint <= last:
                        self.free_hint = last + 1
                    self.free_byte_offset = cur + nbytes
                    return cur
            host = self._alloc_clusters(-(-nbytes // cs))
            self.free_byte_offset = host + nbytes
            return host

    def give_back(self, host, nbytes):
        """Give back host bytes [host, host+nbytes) that :meth:`alloc_clusters` or :meth:`alloc_bytes`
        reserved for a write that failed before anything pointed to them: their refcounts drop at the
        next flush, like any free (data of that write may still be landing there until then)."""
        with self.lock:
            self.pending.append((host, nbytes))
            if self.free_byte_offset == host + nbytes:
                self.free_byte_offset = 0

    # ------------------------------------------------------------ the file's extent
    def ensure_file_size(self, end, start):
        """The file must reach ``end`` (so data clusters never hang past EOF); grow in chunks. ``start``:
        where the caller's own new clusters begin (it has reserved [start, end) and writes it next).

        Other requests may be writing clusters they reserved at any moment, past ``file_size`` (which
        they raise only once their write is done): growing never truncates below the last reserved
        cluster (``reserved_end``), and zeroes are written only over the caller's own clusters."""
        if end <= self.file_size:
            return
        with self.lock:
            if end <= self.file_size:
                return
            cs = self.cluster_size
            grow = max(end, self.reserved_end << self.cluster_bits,
                       self.file_size + min(max(self.file_size // 8, 1 << 20), 64 << 20))
            grow = (grow + cs - 1) & ~(cs - 1)
            if self.img._can_truncate:
                try:
                    self.file.truncate(grow)
                    self.file_size = grow
                    return
                except BlockError as e:
                    # a protocol that cannot grow by truncate (a block device, ...) gets zeroes written
                    # from now on; a real error (EFBIG, ENOSPC, EIO) fails this request only
                    if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                        raise
                    self.img._can_truncate = False
            pos = max(self.file_size, start)
            self.file.pwrite_zeroes(pos, end - pos)
            self.file_size = end

    # ------------------------------------------------------------ frees
    def free_later(self, off, nbytes):
        """Queue host bytes [off, off+nbytes) for a refcount decrement once the L2 change that dropped
        them is durable (the caller holds the cluster lock and made that change)."""
        with self.lock:
            self.pending.append((off, nbytes))

    def settle_frees(self):
        """Right after a flush made durable the L2 changes that dropped the pending clusters: apply the
        frees that are safe; returns the clusters that became free.

        A data request reads its L2 entry under the cluster lock and then reads or writes the host
        cluster without it: one that started before an entry changed may still be using the old cluster.
        Such a cluster must not be freed (and handed out again for other data) until that request is
        done, or its late write would land in someone else's data. Data requests are counted per epoch
        (the C side, ``dio_*``): pending frees move to a grace list when the epoch flips, and are applied
        once the epoch they were queued in has no request left running. With nothing in flight (the
        usual case) that is at once."""
        img = self.img
        with self.lock:
            out = self._apply_grace()
            # flip only when the other epoch is empty, so every request that started before the flip
            # is counted in the epoch the grace list waits for
            if self.pending and not self.grace and img.dio_idle(img.dio_epoch ^ 1):
                self.grace_epoch = img.dio_flip()
                self.grace, self.pending = self.pending, []
                out += self._apply_grace()
            return out

    def _apply_grace(self):
        """The grace list's frees, if no request of its epoch is still running (else nothing yet)."""
        if not self.grace or not self.img.dio_idle(self.grace_epoch):
            return []
        frees, self.grace = self.grace, []
        return self._apply(frees)

    def _apply(self, frees):
        cb = self.cluster_bits
        freed = []
        if self._on_frees is not None:
            self._on_frees()
        for off, n in frees:
            for c in range(off >> cb, ((off + n - 1) >> cb) + 1):
                rc = self.get(c)
                if rc <= 0:
                    continue  # already free: leave it (check will say)
                self.set(c, rc - 1)
                if rc == 1:
                    if c < self.free_hint:
                        self.free_hint = c
                    if self.free_byte_offset and ((self.free_byte_offset - 1) >> cb) == c:
                        self.free_byte_offset = 0
                    freed.append(c)
        return freed

    # ------------------------------------------------------------ whole-table changes
    def reload(self, table_offset, table_clusters, file_size):
        """Lock held: read the refcount table again (after check -r or make_empty rewrote it), drop
        every cached block and pending free, and start looking for free clusters from the start."""
        self.table = F.be64_to_array(self.file.pread(table_offset, table_clusters * self.cluster_size))
        self.table_offset, self.table_clusters = table_offset, table_clusters
        self.blocks.clear()
        self.pending = []
        self.grace = []
        self.free_hint = 1
        self.free_byte_offset = 0
        self.file_size = file_size
