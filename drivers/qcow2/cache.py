"""The qcow2 metadata caches: L2 tables and refcount blocks, by host offset (QEMU's qcow2-cache.c).

A cache holds whole tables, keeps track of the ones changed since written (``dirty``) and writes them
back when told to or when a table must make room. It has no lock of its own: each cache belongs to one
object that guards it with its lock (the L2 cache: ``Clusters.lock``; the refcount-block cache:
``Refcounts.lock``), and every method here is called with that lock held.

Ordering between caches (QEMU's cache dependency): a dirty L2 table may point to clusters allocated
since the last flush, so before any L2 table is written the refcount blocks are written and the file
is flushed. The owner passes that step as ``before_write``.
"""
from ._fast import TableCore

__all__ = ["Qcow2Cache"]


class Qcow2Cache(TableCore):
    """``tables``: host offset → table; ``dirty``: offsets of tables changed since written;
    ``capacity``: tables kept at most (a full cache evicts the oldest eighth)."""

    def __init__(self, file, capacity, serialize, on_written=None, before_write=None):
        """``serialize(table)`` gives a table's on-disk bytes; ``on_written(end)`` is told how far each
        write reached; ``before_write()`` runs before any dirty table is written (see the module doc)."""
        self.tables = {}
        self.dirty = set()
        self.capacity = max(4, int(capacity))
        self._file = file
        self._serialize = serialize
        self._on_written = on_written
        self._before_write = before_write

    def get(self, off):
        """The cached table at ``off``, or None."""
        return self.tables.get(off)

    def add(self, off, table, dirty=False):
        """Cache ``table`` (read from, or to be written at, ``off``), evicting first when full."""
        if len(self.tables) >= self.capacity:
            self.evict()
        self.tables[off] = table
        if dirty:
            self.dirty.add(off)

    def mark_dirty(self, off):
        self.dirty.add(off)

    def evict(self):
        """Drop the oldest eighth of the tables, writing the dirty ones first."""
        victims = list(self.tables)[:max(1, self.capacity // 8)]
        dirty = [off for off in victims if off in self.dirty]
        if dirty:
            self.write_back(dirty)
        for off in victims:
            del self.tables[off]

    def write_back(self, offs=None):
        """Write the dirty tables at ``offs`` (default: all of them, in offset order). True if any."""
        offs = sorted(self.dirty) if offs is None else offs
        if not offs:
            return False
        if self._before_write is not None:
            self._before_write()
        cs_end = None
        for off in offs:
            data = self._serialize(self.tables[off])
            self._file.pwrite(off, data)
            end = off + len(data)
            cs_end = end if cs_end is None or end > cs_end else cs_end
            self.dirty.discard(off)
        if self._on_written is not None:
            self._on_written(cs_end)
        return True

    def clear(self):
        """Forget every table (dirty ones too: the caller has written them or is dropping them)."""
        self.tables.clear()
        self.dirty.clear()
