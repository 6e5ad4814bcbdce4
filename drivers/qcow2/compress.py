"""qcow2 compressed clusters: deflate reads (with a one-cluster cache) and compressed writes.

``Compressed`` has no lock of its own: ``cache`` is one tuple, read and replaced whole under the GIL
(its key is the L2 entry; ``forget`` runs whenever refcounts drop, because a freed compressed cluster
may come back at the same place with the same entry), and a write takes the cluster map's lock
(``Clusters.lock``) for the L2 entry and the refcounts' lock (inside ``Refcounts.alloc_bytes``) for
the space.
"""
import errno
import zlib

from pyrep.errors import BlockError

from .format import COMPRESSED, L2E_OFFSET_MASK, NORMAL, OFLAG_COMPRESSED, UNALLOC, ZERO_ALLOC, ZERO_PLAIN

__all__ = ["Compressed"]


class Compressed:
    def __init__(self, img):
        self.img = img
        self.cache = (None, None)       # (L2 entry, its decompressed cluster)

    def forget(self):
        self.cache = (None, None)

    def read(self, e, pos):
        """The decompressed cluster of compressed L2 entry ``e`` (guest offset ``pos``, for messages).
        A stream that does not inflate to exactly one cluster is an I/O error (EIO) naming the guest
        and host offsets; the image is not marked corrupt (only this cluster's data is lost)."""
        key, data = self.cache
        if key == e:
            return data
        img = self.img
        cs = img.cluster_size
        off = e & img._coffset_mask
        nsec = ((e >> img._csize_shift) & img._csize_mask) + 1
        clen = nsec * 512 - (off & 511)
        clen = max(0, min(clen, img.refs.file_size - off))
        raw = img.file.pread(off, clen) if clen else b""
        try:
            out = zlib.decompressobj(-12).decompress(raw, cs)
        except zlib.error as ex:
            raise img.eio(f"cannot decompress the cluster at guest offset {pos} (host {off:#x}): {ex}") from None
        if len(out) != cs:
            raise img.eio(f"compressed cluster at guest offset {pos} (host {off:#x}) is truncated")
        self.cache = (e, out)
        return out

    def write(self, offset, length, iov):
        """Write one whole guest cluster deflate-compressed (as qemu-img convert -c does); see
        ``Qcow2Driver.pwritev_compressed`` for the contract. Order: refcounts (in memory, written first
        on flush), data, then the L2 entry."""
        img = self.img
        cs = img.cluster_size
        if offset < 0 or offset & (cs - 1):
            raise BlockError(errno.EINVAL, f"qcow2: compressed write at offset {offset} is not aligned to the "
                                           f"cluster size {cs}")
        if offset >= img.size:
            raise BlockError(errno.EINVAL, f"qcow2: compressed write at offset {offset} is past the end of the "
                                           f"image ({img.size} bytes)")
        if length != cs and not (0 < length < cs and offset + length == img.size):
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
        m = img.clusters
        if len(comp) >= cs:
            # incompressible: an ordinary write (the cluster still has to be unallocated or zero)
            with m.lock:
                self._target_check(offset)
            return img.pwritev(offset, length, iov, 0)
        nsec = -(-len(comp) // 512)
        nbytes = nsec * 512
        cb = img.cluster_bits
        cidx = offset >> cb
        l1i = cidx >> img._l2_bits
        l2i = cidx & img._l2_mask
        refs = img.refs
        with m.lock:
            while cidx in m.inflight:
                m.wait_inflight()
            self._target_check(offset)
            t, _ = m.l2_table(l1i, alloc=True)
            old = t[l2i]
            host = refs.alloc_bytes(nbytes)
            m.inflight.add(cidx)
        try:
            try:
                end = host + nbytes
                refs.ensure_file_size((((end - 1) >> cb) + 1) << cb, host)
                if host < cs or img.meta_overlap(host, nbytes):
                    raise img.corrupt(f"compressed data at {host:#x} would overlap metadata")
                img.file.pwrite(host, comp + bytes(nbytes - len(comp)))
                self.forget()       # the new entry may equal a freed one's
            except BaseException:
                refs.give_back(host, nbytes)
                raise
            refs.note_written(end)
            with m.lock:
                t, toff = m.l2_table(l1i, alloc=False)
                t[l2i] = host | OFLAG_COMPRESSED | ((nsec - 1) << img._csize_shift)
                if old & L2E_OFFSET_MASK:
                    m.free_entry_later(old)
                m.l2.mark_dirty(toff)
        finally:
            m.end_inflight(cidx, 1)

    def _target_check(self, offset):
        """Cluster lock held: the guest cluster at ``offset`` must be unallocated or a plain zero cluster
        (as in QEMU)."""
        img = self.img
        m = img.clusters
        kind = m.kind(m.entry(offset >> img.cluster_bits))
        if kind not in (UNALLOC, ZERO_PLAIN):
            what = {NORMAL: "data", ZERO_ALLOC: "a preallocated zero cluster",
                    COMPRESSED: "compressed data"}.get(kind, "data")
            raise BlockError(errno.ENOTSUP, f"qcow2: compressed write at offset {offset}: the cluster already "
                                            f"holds {what}; compressed writes only go to unallocated or zero "
                                            f"clusters (image {img.filename})")
