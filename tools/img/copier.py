"""The copy engine of ``pyrep-img convert``.

The main thread walks the source's block status and cuts its data into jobs of at most ``chunk``
bytes (cut at multiples of ``chunk``, so jobs line up with clusters). Reader threads each take a free
buffer and a job, read the job into the buffer and find its zero granules (C, ``nonzero_runs``); one
writer thread writes the buffers in job order (what qemu-img does unless ``-W``, so a new qcow2
target allocates its clusters in guest order) and hands them back. Buffers are few and reused: no
fresh pages to fault in, and a buffer is still in the CPU cache when it is written. The writer never
waits for a wake-up while the readers are ahead (they are: reading and scanning cost less than
writing, which on most file systems is serialised per file anyway).

Zero and unallocated source ranges are not read: a fresh target already reads them as zeroes; any
other target gets ``pwrite_zeroes``. Every I/O call releases the GIL (the file protocol's
preadv/pwritev, zlib), so the threads overlap for real.
"""
import os
import threading

from pyrep._core.copy import nonzero_runs
from pyrep._core.iovec import IOVector
from pyrep.constants import BS_ALLOCATED, BS_ZERO
from pyrep.node import skip_filters

CHUNK = 1 << 20                 # a job: small enough to stay in the cache between read, scan and write
MAX_WORKERS = 16                # qemu-img's limit for -m


def default_readers():
    return max(1, min(4, (os.cpu_count() or 1) - 1))


class Copier:
    """Copy ``size`` bytes of the source node to the target node (both open, same guest offsets).

    ``fresh``: the target reads zeroes everywhere (a new image without a backing file): zero ranges are
    skipped. ``min_sparse``: granule of the zero scan of data; 0: nothing is skipped, every byte of the
    target is written (qemu-img's -S 0, a fully allocated output) unless the target has a backing file.
    ``top_only``: copy only what the source's top layer allocates (the target has a backing file).
    ``cwrite``/``cs``: the target's compressed cluster write and cluster size (``-c``).
    ``status``: ``status(node, offset, length) -> (flags, pnum)`` through the whole chain.
    ``readers``: reader threads (qemu-img's ``-m``); ``ordered``: write in guest order (not ``-W``).
    ``progress(offset)``: called by the main thread as the walk advances."""

    def __init__(self, src, dst, size, *, status, fresh=True, min_sparse=4096, top_only=False, cwrite=None,
                 cs=0, readers=None, ordered=True, progress=None, chunk=CHUNK):
        self.src, self.dst, self.size = src, dst, size
        self.snode, self.dnode = src.node, dst.node
        self.status = status
        self.fresh, self.min_sparse, self.top_only = fresh, min_sparse, top_only
        self.cwrite, self.cs = cwrite, cs
        if cs:
            chunk = max(cs, chunk // cs * cs)
        self.chunk = chunk
        self.nreaders = max(1, min(MAX_WORKERS, readers or default_readers()))
        self.ordered = ordered
        self.progress = progress
        self._cond = threading.Condition()
        self._jobs = []                 # (seq, kind, off, n) not taken yet, in order
        self._seq = 0                   # jobs made so far
        self._end = None                # the number of jobs, once the walk is over
        self._ready = {}                # seq -> (plan, off, n, buf): read, waiting for the writer
        self._free = [bytearray(chunk) for _ in range(self.nreaders + 3)]
        self._err = None

    # ------------------------------------------------------------ main thread
    def run(self):
        readers = [threading.Thread(target=self._reader, daemon=True, name=f"pyrep-img-read-{i}")
                   for i in range(self.nreaders)]
        writer = threading.Thread(target=self._writer, daemon=True, name="pyrep-img-write")
        for t in readers + [writer]:
            t.start()
        try:
            self._produce()
        except BaseException as e:  # noqa: BLE001 - stop the threads, then raise
            self._fail(e)
        finally:
            with self._cond:
                self._end = self._seq
                self._cond.notify_all()
            for t in readers + [writer]:
                t.join()
        if self._err is not None:
            raise self._err

    def _produce(self):
        """Walk the block status; contiguous extents of one kind ('d' data, 'z' zeroes to write) are
        merged into jobs that end at multiples of ``chunk``."""
        size, chunk = self.size, self.chunk
        snode = self.snode
        top = skip_filters(snode)
        pend_kind, pend_start, off = None, 0, 0
        while off < size:
            if self._err is not None:
                return
            if self.top_only:
                st = top.block_status(off, size - off)
                flags, n = st.flags, st.length
                if not flags & (BS_ALLOCATED | BS_ZERO):
                    kind = None         # left to the target's backing file
                else:
                    kind = "z" if flags & BS_ZERO else "d"
            else:
                flags, n = self.status(snode, off, size - off)
                kind = "z" if flags & BS_ZERO and self.min_sparse else "d"    # -S 0: zeroes written as data
            if kind == "z" and self.fresh:
                kind = None             # the target reads zeroes already
            if kind != pend_kind:
                if pend_kind is not None:
                    self._emit(pend_kind, pend_start, off)
                pend_kind, pend_start = kind, off
            off += n
            if kind is not None:
                # emit the whole chunks; the rest stays pending (the next extent may continue it)
                cut = off // chunk * chunk
                if cut > pend_start:
                    self._emit(kind, pend_start, cut)
                    pend_start = cut
            self._progress(off)
        if pend_kind is not None and pend_start < off:
            self._emit(pend_kind, pend_start, off)

    def _emit(self, kind, start, end):
        chunk = self.chunk
        limit = 2 * self.nreaders       # jobs queued ahead of the readers
        while start < end:
            c = min(end, (start // chunk + 1) * chunk) - start
            with self._cond:
                while len(self._jobs) >= limit and self._err is None:
                    self._cond.wait()
                if self._err is not None:
                    return
                self._jobs.append((self._seq, kind, start, c))
                self._seq += 1
                self._cond.notify()
            start += c

    def _progress(self, off):
        if self.progress is not None:
            self.progress(off)

    # ------------------------------------------------------------ threads
    def _fail(self, e):
        with self._cond:
            if self._err is None:
                self._err = e
            self._cond.notify_all()

    def _reader(self):
        rd = self.snode.preadv
        cond = self._cond
        while True:
            with cond:
                # a job only with a buffer for it: the job the writer waits for can always be read
                while (not self._free or not self._jobs) and self._err is None:
                    if not self._jobs and self._end is not None:
                        return          # the walk is over and every job is taken
                    cond.wait()
                if self._err is not None:
                    return
                buf = self._free.pop()
                seq, kind, off, n = self._jobs.pop(0)
                cond.notify_all()       # room for the walk
            plan = None
            try:
                if kind == "d":
                    mv = memoryview(buf)
                    rd(off, n, IOVector(mv[:n]))
                    plan = self._plan(mv, n)
                elif kind == "z":
                    plan = "z"
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self._fail(e)
                plan = None
            with cond:
                self._ready[seq] = (plan, off, n, buf)
                cond.notify_all()

    def _plan(self, mv, n):
        """What to write of a data job: 'c' (compressed clusters), 'z' (zeroes), None (nothing) or runs."""
        if self.cwrite is not None:
            return "c"
        if not self.min_sparse:
            return [(0, n)]             # -S 0: every byte written, the output fully allocated
        if self.fresh:
            return nonzero_runs(mv, n, self.min_sparse) or None
        if IOVector(mv[:n]).is_zero():
            return "z"
        return [(0, n)]

    def _writer(self):
        cond = self._cond
        ready = self._ready
        nxt = 0
        while True:
            with cond:
                while True:
                    if self.ordered:
                        key = nxt if nxt in ready else None
                    else:
                        key = min(ready) if ready else None
                    if key is not None or self._err is not None or (self._end is not None and nxt >= self._end):
                        break
                    cond.wait()
                if key is None or self._err is not None:
                    return
                plan, off, n, buf = ready.pop(key)
            nxt += 1
            try:
                if plan is not None and self._err is None:
                    self._write(plan, off, n, buf)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self._fail(e)
            if buf is not None:
                with cond:
                    self._free.append(buf)
                    cond.notify_all()

    def _write(self, plan, off, n, buf):
        if plan == "z":
            self.dst.pwrite_zeroes(off, n)
            return
        mv = memoryview(buf)
        if plan == "c":
            write_compressed(self.cwrite, self.dst, off, mv[:n], self.cs, self.dst.length)
        else:
            wr = self.dnode.pwritev
            for st, c in plan:
                wr(off + st, c, IOVector(mv[st:st + c]))


def write_compressed(cwrite, dst, off, mv, cs, size):
    """Write ``mv`` at guest offset ``off`` of the target (``size`` bytes long): whole clusters compressed,
    pieces of clusters (the job starts or ends inside a cluster) as plain writes; zero clusters are left
    out (the target is fresh). The target's last cluster is compressed too, padded with zeroes up to the
    target's end (which may lie past the source's, rounded up to a sector)."""
    pos = 0
    n = len(mv)
    while pos < n:
        c = min(cs - (off + pos) % cs, n - pos)
        part = mv[pos:pos + c]
        if not IOVector(part).is_zero():
            start = off + pos
            cl_end = min(start - start % cs + cs, size)
            # a whole cluster, or the source's end inside the target's last cluster (the rest reads
            # as zeroes): compressed; a piece of a cluster: a plain write
            if start % cs == 0 and (start + c == cl_end or (pos + c == n and cl_end == size)):
                pad = cl_end - start - c
                cwrite(start, cl_end - start, IOVector(bytes(part) + bytes(pad) if pad else part))
            else:
                dst.pwritev(start, IOVector(part))
        pos += c
