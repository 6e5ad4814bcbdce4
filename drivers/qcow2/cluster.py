"""The qcow2 cluster map: L1 and L2 tables, allocating writes, zeroes and discards (QEMU's qcow2-cluster.c).

``Clusters`` owns ``lock`` (and ``cond`` on it), which guards every field (the C part, ``ClusterCore``,
lists them). It is released around data I/O. When the refcounts are needed too, ``Refcounts.lock`` is
taken inside it, never the other way round.

L2 tables are written back lazily, in crash-safe order, on flush and eviction:

  1. data clusters are written before the L2 entry that points to them is changed (in memory);
  2. refcount blocks (which only ever hold increments or already-safe decrements) are written, then
     the file is flushed (data and refcounts durable), then L2 tables, then, only when L1 entries
     changed, a flush, then L1 entries, then a flush again. An evicted dirty L2 table is written the
     same way (refcounts, flush, table): even a power loss leaves leaks at worst;
  3. clusters that lose their last reference are only decremented after step 2 made the L2/L1 change
     durable (``Refcounts.settle_frees``).

Concurrent allocating writes to the same guest cluster are serialised with the in-flight set and
``cond``. Every cluster reserved is below ``Refcounts.reserved_end``, and the file is never truncated
below it while growing, whatever requests are still writing.
"""
import threading
from array import array

from pyrep._core.iovec import IOVector
from pyrep.constants import REQ_MAY_UNMAP

from . import format as F
from ._fast import ClusterCore
from .cache import Qcow2Cache
from .format import (COMPRESSED, L1E_OFFSET_MASK, L2E_OFFSET_MASK, NORMAL, OFLAG_COMPRESSED, OFLAG_COPIED,
                     OFLAG_ZERO, UNALLOC, ZERO_ALLOC, ZERO_PLAIN)

__all__ = ["Clusters", "FAST_MASK"]

FAST_MASK = OFLAG_COPIED | OFLAG_COMPRESSED | OFLAG_ZERO


class Clusters(ClusterCore):
    """The cluster map of one image. ``img`` is the driver (file child, geometry, backing, corruption
    reports), ``refs`` its :class:`~.refcount.Refcounts`."""

    def __init__(self, img, refs, l1, l1_offset, cache_bytes):
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.waiters = 0
        self.img = img
        self.refs = refs
        self.file = img.file
        self.cluster_size = img.cluster_size
        self.cluster_bits = img.cluster_bits
        self.l2_bits = img._l2_bits
        self.l2_mask = img._l2_mask
        self.zero_flag = img._zero_flag
        self.l1 = l1
        self.l1_offset = l1_offset
        self.l1_dirty = set()
        self.l2 = Qcow2Cache(img.file, cache_bytes // img.cluster_size, F.array_to_be64,
                             on_written=refs.note_written, before_write=refs.write_back_durable)
        self.inflight = set()

    # ------------------------------------------------------------ entries
    def kind(self, e):
        """What L2 entry ``e`` describes: NORMAL, COMPRESSED, ZERO_PLAIN, ZERO_ALLOC or UNALLOC."""
        if e & OFLAG_COMPRESSED:
            return COMPRESSED
        if e & self.zero_flag:
            return ZERO_ALLOC if e & L2E_OFFSET_MASK else ZERO_PLAIN
        if e & L2E_OFFSET_MASK:
            return NORMAL
        return UNALLOC

    def extend_same(self, t, l2i, kind, n, rem):
        """Grow ``n`` over the entries after ``l2i`` in table ``t`` that are of the same non-data
        ``kind``, up to ``rem`` bytes."""
        cs = self.cluster_size
        kf = self.kind
        l2m = self.l2_mask
        while n < rem and l2i < l2m:
            l2i += 1
            if kf(t[l2i]) != kind:
                break
            n += min(rem - n, cs)
        return n

    def l2_load(self, off):
        """Lock held: the L2 table at ``off`` (cache, else the file)."""
        t = self.l2.tables.get(off)
        if t is not None:
            return t
        cs = self.cluster_size
        if off & (cs - 1) or off < cs:
            raise self.img.corrupt(f"L2 table offset {off:#x} is invalid (misaligned or in the header)")
        if off + cs > self.refs.file_size:
            raise self.img.corrupt(f"L2 table at {off:#x} lies past the end of the file")
        t = F.be64_to_array(self.file.pread(off, cs))
        self.l2.add(off, t)
        return t

    def l2_table(self, l1i, alloc):
        """Lock held: (table, offset) for L1 index ``l1i``; allocate a zero table if ``alloc``, else
        (None, 0) when there is none."""
        if l1i >= len(self.l1):
            raise self.img.eio(f"guest offset beyond the L1 table (index {l1i})")
        off = self.l1[l1i] & L1E_OFFSET_MASK
        if off:
            return self.l2_load(off), off
        if not alloc:
            return None, 0
        off = self.refs.alloc_clusters(1)
        t = array("Q", bytes(self.cluster_size))
        self.l2.add(off, t, dirty=True)
        self.l1[l1i] = off | OFLAG_COPIED
        self.l1_dirty.add(l1i)
        return t, off

    def entry(self, cidx):
        """Lock held: the L2 entry of guest cluster ``cidx`` (0 when it has no L2 table)."""
        t, _ = self.l2_table(cidx >> self.l2_bits, alloc=False)
        return t[cidx & self.l2_mask] if t is not None else 0

    def wait_inflight(self):
        """Lock held: wait for an in-flight allocation to finish."""
        self.waiters += 1
        try:
            self.cond.wait()
        finally:
            self.waiters -= 1

    def drain_inflight(self):
        """Lock held: wait until no allocation is in flight."""
        while self.inflight:
            self.wait_inflight()

    def end_inflight(self, cidx, k):
        """Guest clusters [cidx, cidx+k) are no longer being allocated (takes the lock)."""
        with self.lock:
            for j in range(k):
                self.inflight.discard(cidx + j)
            if self.waiters:
                self.cond.notify_all()

    def free_entry_later(self, e):
        """Lock held, entry ``e`` just replaced: its host space is freed once that change is durable."""
        img = self.img
        if e & OFLAG_COMPRESSED:
            off = (e & img._coffset_mask) & ~511
            nsec = ((e >> img._csize_shift) & img._csize_mask) + 1
            self.refs.free_later(off, nsec * 512)
        else:
            off = e & L2E_OFFSET_MASK
            if off:
                self.refs.free_later(off, self.cluster_size)

    # ------------------------------------------------------------ write-back
    def flush_locked(self):
        """Lock held: write every change back in crash-safe order (module doc), then apply the frees that
        became safe and discard what they freed."""
        refs = self.refs
        if self.l2.dirty or self.l1_dirty:
            # refcounts and data, then the L2 tables pointing to them, then the L1 entries pointing
            # to new tables: each step on stable storage before the next one refers to it
            wrote_l2 = self.l2.write_back()
            if self.l1_dirty and wrote_l2:
                self.file.flush()
            if self.l1_dirty:
                chunks = sorted({i >> 6 for i in self.l1_dirty})
                l1 = self.l1
                for ch in chunks:
                    lo, hi = ch << 6, min(len(l1), (ch + 1) << 6)
                    self.file.pwrite(self.l1_offset + lo * 8, F.array_to_be64(l1[lo:hi]))
                self.l1_dirty.clear()
            self.file.flush()
        else:
            with refs.lock:
                refs.write_back()
                pending = bool(refs.pending)
            if pending:
                # the L2 tables that dropped these clusters may have been written by an eviction
                # with no flush since: on stable storage before a refcount drops and frees them
                self.file.flush()
        if refs.pending or refs.grace:
            for c in refs.settle_frees():
                try:
                    if c >= 1:
                        self.file.pdiscard(c << self.cluster_bits, self.cluster_size)
                except Exception:
                    pass

    # ------------------------------------------------------------ allocating writes
    def plan_alloc(self, cidx, in_off, rem, t):
        """Lock held. Reserve guest clusters [cidx, cidx+k) (in flight) and k new host clusters for a
        write of ``rem`` bytes at ``in_off`` in guest cluster ``cidx`` (``t``: its L2 table or None).
        Returns the plan for :meth:`alloc_write`: (cidx, k, bytes covered, host, old entries, whether
        the host clusters are known to read as zeroes)."""
        cs = self.cluster_size
        l2m = self.l2_mask
        n = min(rem, cs - in_off)
        k = 1
        if t is not None:
            l2i = cidx & l2m
            while n < rem and l2i + k <= l2m and (cidx + k) not in self.inflight:
                if (t[l2i + k] & FAST_MASK) == OFLAG_COPIED:
                    break
                n += min(rem - n, cs)
                k += 1
        else:
            while n < rem and ((cidx + k) & l2m) and (cidx + k) not in self.inflight:
                n += min(rem - n, cs)
                k += 1
        t, toff = self.l2_table(cidx >> self.l2_bits, alloc=True)
        l2i = cidx & l2m
        olds = [t[l2i + j] for j in range(k)]
        refs = self.refs
        with refs.lock:
            zero_end = refs.reserved_end
            host = refs._alloc_clusters(k)
        known_zero = (host >> self.cluster_bits) >= zero_end
        for j in range(k):
            self.inflight.add(cidx + j)
        return (cidx, k, n, host, olds, known_zero)

    def alloc_write(self, plan, in_off, iov, done):
        """Write the data of a planned allocation (no lock held): the new bytes ``iov[done:done+n]`` at
        ``in_off`` of the first new cluster, with the old head and tail of the guest clusters copied
        around them unless the new clusters read as zeroes; then point the L2 entries at them."""
        cidx, k, n, host, olds, known_zero = plan
        img = self.img
        cs = self.cluster_size
        committed = False
        try:
            head = tail = None
            tail_len = k * cs - in_off - n
            if in_off:
                head = img._old_bytes(cidx, olds[0], 0, in_off)
            if tail_len:
                tail = img._old_bytes(cidx + k - 1, olds[-1], cs - tail_len, tail_len)
            if (not in_off or head is None and known_zero) and (not tail_len or tail is None and known_zero):
                if tail_len:
                    self.refs.ensure_file_size(host + k * cs, host)
                if img.meta_overlap(host, k * cs) or host < cs:
                    raise img.corrupt(f"newly allocated cluster {host:#x} overlaps metadata")
                img._file_pwritev(host + in_off, n, iov.slice(done, n) if done or n != iov.size else iov)
                committed = True
                self.commit_alloc(cidx, k, host, olds, host + in_off + n)
                return
            v = IOVector()
            start = host + in_off
            total = n
            if in_off and not (head is None and known_zero):
                v.add(head if head is not None else bytes(in_off))
                start = host
                total += in_off
            v.concat(iov, done, n)
            if tail_len:
                if tail is None and known_zero:
                    self.refs.ensure_file_size(host + k * cs, host)
                else:
                    v.add(tail if tail is not None else bytes(tail_len))
                    total += tail_len
            if img.meta_overlap(host, k * cs) or host < cs:
                raise img.corrupt(f"newly allocated cluster {host:#x} overlaps metadata")
            img._file_pwritev(start, total, v)
            committed = True
            self.commit_alloc(cidx, k, host, olds, start + total)
        finally:
            if not committed:           # the write failed: nothing points to the new clusters
                self.refs.give_back(host, k * cs)
            self.end_inflight(cidx, k)

    def commit_alloc(self, cidx, k, host, olds, end):
        """The data of a planned allocation is written (up to host byte ``end``): point the L2 entries
        at the new clusters and queue the old ones for freeing."""
        cs = self.cluster_size
        self.refs.note_written(end)
        with self.lock:
            t, toff = self.l2_table(cidx >> self.l2_bits, alloc=False)
            l2i = cidx & self.l2_mask
            for j in range(k):
                t[l2i + j] = (host + j * cs) | OFLAG_COPIED
                if olds[j]:
                    self.free_entry_later(olds[j])
            self.l2.mark_dirty(toff)

    # ------------------------------------------------------------ zeroes and discards
    def zero_or_discard(self, offset, length, flags, discard, full=False):
        """Make guest [offset, offset+length) read as zeroes (``discard``: give the space back, and let
        the range read from the backing where the image format allows it; ``full``: even then drop every
        mapping). Whole clusters change their L2 entries; partial ones are written as zeroes."""
        img = self.img
        cs = self.cluster_size
        cmask = cs - 1
        end = offset + length
        a = (offset + cs - 1) & ~cmask
        b = end & ~cmask
        if end == img.size:
            b = (end + cs - 1) & ~cmask   # the tail cluster past the end counts as whole
        if a >= b:
            if not discard:
                self.zero_partial(offset, length)
            return
        if not discard:
            if offset < a:
                self.zero_partial(offset, a - offset)
            if min(b, end) < end:
                self.zero_partial(b, end - b)
        fallback = []
        cb = self.cluster_bits
        c = a >> cb
        cend = b >> cb
        v3 = img.version >= 3
        while c < cend:
            with self.lock:
                while c in self.inflight:
                    self.wait_inflight()
                l1i = c >> self.l2_bits
                t, _ = self.l2_table(l1i, alloc=False)
                stop = min(cend, (l1i + 1) << self.l2_bits)
                if t is None and ((discard and (not v3 or full))
                                  or img.reads_zero_unalloc(c << cb, (stop - c) << cb)):
                    c = stop
                    continue
                if t is None and not v3:
                    fallback.append((c << cb, (stop - c) << cb))
                    c = stop
                    continue
                if t is None:
                    t, _ = self.l2_table(l1i, alloc=True)
                toff = self.l1[l1i] & L1E_OFFSET_MASK
                changed = False
                while c < stop:
                    if c in self.inflight:
                        break
                    l2i = c & self.l2_mask
                    e = t[l2i]
                    kind = self.kind(e)
                    pos = c << cb
                    if v3:
                        if discard:
                            new = 0 if full or img.reads_zero_unalloc(pos, cs) else OFLAG_ZERO
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
                        unalloc_zero = img.reads_zero_unalloc(pos, cs)
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
                            self.free_entry_later(e)
                    c += 1
                if changed:
                    self.l2.mark_dirty(toff)
        for item in fallback:
            if item[0] == "host":
                img._data_io(self.file.pwrite_zeroes, item[1], cs)
            else:
                pos, n = item
                n = min(n, img.size - pos)
                if n > 0:
                    self.zero_partial(pos, n)
        if discard:
            # pdiscard asks for space back: make the frees happen
            with self.lock:
                if self.refs.pending:
                    self.flush_locked()

    def zero_partial(self, pos, n):
        """Write explicit zeroes over guest [pos, pos+n) unless it already reads as zeroes."""
        if n <= 0:
            return
        img = self.img
        cb = self.cluster_bits
        if (pos >> cb) == ((pos + n - 1) >> cb):
            with self.lock:
                kind = self.kind(self.entry(pos >> cb))
            if kind in (ZERO_PLAIN, ZERO_ALLOC) or (kind == UNALLOC and img.reads_zero_unalloc(pos, n)):
                return
        z = bytes(min(n, 1 << 20))
        done = 0
        while done < n:
            m = min(len(z), n - done)
            img.pwritev(pos + done, m, IOVector(memoryview(z)[:m]), 0)
            done += m

