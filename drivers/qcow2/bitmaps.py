"""Persistent dirty bitmaps of qcow2 images (the bitmaps header extension).

pyrep does not record writes in dirty bitmaps, but keeps an image's bitmaps well-formed: before the first
write of guest data through a read/write open, every bitmap is flagged ``in_use`` (the spec's "may be
inconsistent", what a writer that does not keep a bitmap in sync must set; opening read/write alone, a
rebase -u or a refcount repair leave them as they are), and the bitmaps extension stays valid (its
auto-clear bit stays set). Their clusters stay referenced, so the image stays clean for ``qemu-img check``,
and QEMU still lists the bitmaps (as in-use) and can remove them. An image whose bitmaps cannot be parsed
gets the old treatment instead: the auto-clear bit is cleared, which tells every reader that the extension
is stale (its clusters then leak, which ``check -r leaks`` repairs).

Layout facts from the qcow2 specification ("Bitmaps extension", docs/interop/qcow2.txt in QEMU).
"""
import struct

IN_USE = 1 << 0
AUTO = 1 << 1
ENTRY_HEAD = struct.Struct(">QIIBBHI")     # table offset, table size, flags, type, granularity, name, extra
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
MAX_DIRECTORY = 64 << 20                   # QEMU's own limit on the directory


class Directory:
    """The bitmap directory: ``raw`` bytes at ``offset`` and the parsed ``entries`` (dicts with ``pos`` in
    the directory, ``table_offset``, ``table_size``, ``flags``, ``granularity_bits`` and ``name``)."""

    def __init__(self, offset, raw, entries):
        self.offset, self.raw, self.entries = offset, raw, entries

    def marked_in_use(self):
        """The directory bytes with every entry's ``in_use`` flag set."""
        out = bytearray(self.raw)
        for e in self.entries:
            struct.pack_into(">I", out, e["pos"] + 12, e["flags"] | IN_USE)
        return bytes(out)


def parse_extension(data):
    """(nb_bitmaps, directory_size, directory_offset) of the extension's data."""
    if len(data) < 24:
        raise ValueError(f"bitmaps extension is {len(data)} bytes, expected 24")
    nb, _reserved, size, offset = struct.unpack_from(">IIQQ", data)
    return nb, size, offset


def load_directory(ext, read, file_len, cluster_size):
    """Read and parse the directory the extension points to; ValueError says what is wrong."""
    nb, size, offset = parse_extension(ext)
    if nb == 0 or size == 0:
        raise ValueError("bitmaps extension lists no bitmap")
    if size > MAX_DIRECTORY or offset % cluster_size or offset < cluster_size or offset + size > file_len:
        raise ValueError(f"bitmap directory at {offset:#x} ({size} bytes) is not inside the file")
    raw = read(offset, size)
    if len(raw) != size:
        raise ValueError("bitmap directory is truncated")
    entries, pos = [], 0
    for _ in range(nb):
        if pos + ENTRY_HEAD.size > size:
            raise ValueError(f"bitmap directory entry at {pos} runs past the directory")
        toff, tsize, flags, _type, gran, name_size, extra = ENTRY_HEAD.unpack_from(raw, pos)
        end = pos + ENTRY_HEAD.size + extra + name_size
        if name_size == 0 or end > size:
            raise ValueError(f"bitmap directory entry at {pos} is malformed")
        if toff % cluster_size or (tsize and (toff < cluster_size or toff + tsize * 8 > file_len)):
            raise ValueError(f"bitmap table at {toff:#x} ({tsize} entries) is not inside the file")
        name = raw[end - name_size:end].decode("utf-8", "replace")
        entries.append({"pos": pos, "table_offset": toff, "table_size": tsize, "flags": flags,
                        "granularity_bits": gran, "name": name})
        pos = (end + 7) & ~7
    return Directory(offset, raw, entries)


def referenced(directory, read, cluster_size):
    """The (offset, length) ranges of the file the bitmaps use: directory, tables, data clusters."""
    out = [(directory.offset, len(directory.raw))]
    for e in directory.entries:
        n = e["table_size"]
        if not n:
            continue
        out.append((e["table_offset"], n * 8))
        table = read(e["table_offset"], n * 8)
        for (v,) in struct.iter_unpack(">Q", table[:len(table) // 8 * 8]):
            off = v & TABLE_OFFSET_MASK
            if off:
                out.append((off, cluster_size))
    return out


def info(directory):
    """qemu-img info's view of the bitmaps: name, granularity, flags."""
    out = []
    for e in directory.entries:
        flags = [f for bit, f in ((IN_USE, "in-use"), (AUTO, "auto")) if e["flags"] & bit]
        out.append({"flags": flags, "name": e["name"], "granularity": 1 << e["granularity_bits"]})
    return out
