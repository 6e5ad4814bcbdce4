"""qcow2 on-disk format: constants, header parsing/validation, table codecs, layout and create().

Facts come from the public qcow2 specification (docs/interop/qcow2.txt); the code is our own.
Nothing in here does I/O through the block layer except ``create_file`` which writes a new image
with plain os calls.
"""
import errno
import os
import struct
import sys
from array import array

from pyrep.errors import BlockError, OptionError
from pyrep.options import parse_bool, parse_size

MAGIC = b"QFI\xfb"
HDR_V2 = struct.Struct(">4sIQIIQIIQQIIQ")     # 72 bytes
HDR_V3_EXTRA = struct.Struct(">QQQII")         # 32 bytes, at 72
V2_HEADER_LEN = 72
V3_HEADER_LEN = 104
V3_HEADER_LEN_WRITTEN = 112                    # 104 + compression_type byte + padding

OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_SUPPORTED = INCOMPAT_DIRTY | INCOMPAT_CORRUPT
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# names we write in (and fall back to when an image has no) feature name table
FEATURE_NAMES = {
    (0, 0): "dirty bit",
    (0, 1): "corrupt bit",
    (0, 2): "external data file",
    (0, 3): "compression type",
    (0, 4): "extended L2 entries",
    (1, 0): "lazy refcounts",
    (2, 0): "bitmaps",
    (2, 1): "raw external data",
}

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
MAX_BACKING_NAME = 1023
MAX_SNAPSHOTS = 65536
MAX_VIRTUAL_SIZE = 1 << 62

# cluster kinds
UNALLOC, NORMAL, ZERO_PLAIN, ZERO_ALLOC, COMPRESSED = range(5)

_LITTLE = sys.byteorder == "little"


def be64_to_array(data):
    a = array("Q")
    a.frombytes(data)
    if _LITTLE:
        a.byteswap()
    return a


def array_to_be64(a):
    if _LITTLE:
        b = array("Q", a)
        b.byteswap()
        return b.tobytes()
    return a.tobytes()


class RefBlock:
    """One refcount block in memory. ``get(i)``/``set(i, v)``; ``tobytes()`` gives the on-disk form."""

    __slots__ = ("order", "arr", "raw", "mask", "per_byte", "bits")
    _TC = {3: "B", 4: "H", 5: "I", 6: "Q"}

    def __init__(self, order, data):
        self.order = order
        self.bits = 1 << order
        self.mask = (1 << self.bits) - 1
        if order >= 3:
            tc = self._TC[order]
            a = array(tc)
            a.frombytes(data)
            if _LITTLE and order > 3:
                a.byteswap()
            self.arr = a
            self.raw = None
        else:
            self.arr = None
            self.raw = bytearray(data)
            self.per_byte = 8 >> order

    def get(self, i):
        if self.arr is not None:
            return self.arr[i]
        q, r = divmod(i, self.per_byte)
        return (self.raw[q] >> (r * self.bits)) & self.mask

    def set(self, i, v):
        if self.arr is not None:
            self.arr[i] = v
            return
        q, r = divmod(i, self.per_byte)
        shift = r * self.bits
        self.raw[q] = (self.raw[q] & ~(self.mask << shift) & 0xFF) | (v << shift)

    def tobytes(self):
        if self.arr is not None:
            if _LITTLE and self.order > 3:
                b = array(self.arr.typecode, self.arr)
                b.byteswap()
                return b.tobytes()
            return self.arr.tobytes()
        return bytes(self.raw)


def div_round_up(a, b):
    return -(-a // b)


class Header:
    """A parsed and validated qcow2 header (cluster 0)."""

    def __init__(self):
        self.ext_unknown = []
        self.feature_names = {}
        self.backing_format = None
        self.backing_file = None
        self.has_bitmaps_ext = False
        self.bitmaps_ext = b""          # the extension's data (see bitmaps.py)
        self.has_crypto_ext = False
        self.has_data_file_ext = False
        self.compression_type = 0

    def feature_name(self, kind, bit):
        return self.feature_names.get((kind, bit)) or FEATURE_NAMES.get((kind, bit)) or f"unknown feature bit {bit}"


def _bad(filename, what):
    return BlockError(errno.EINVAL, f"qcow2: {what} (image {filename})")


def parse_header(read, file_len, filename):
    """Parse and validate the header. ``read(offset, length)`` -> bytes. Raises BlockError on a bad image."""
    if file_len < V2_HEADER_LEN:
        raise _bad(filename, f"image is too short for a qcow2 header ({file_len} bytes, need at least 72)")
    raw = read(0, V2_HEADER_LEN)
    if len(raw) < V2_HEADER_LEN:
        raise _bad(filename, "truncated header")
    (magic, version, bf_off, bf_size, cluster_bits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
     nb_snap, snap_off) = HDR_V2.unpack(raw)
    if magic != MAGIC:
        raise _bad(filename, "not a qcow2 image (bad magic)")
    if version not in (2, 3):
        raise BlockError(errno.ENOTSUP, f"qcow2: unsupported qcow2 version {version} (image {filename}; supported: 2, 3)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise _bad(filename, f"cluster_bits {cluster_bits} out of range (cluster size must be 512 B to 2 MiB)")
    h = Header()
    h.version = version
    h.cluster_bits = cluster_bits
    cs = h.cluster_size = 1 << cluster_bits
    h.size = size
    h.crypt_method = crypt
    h.l1_size = l1_size
    h.l1_table_offset = l1_off
    h.refcount_table_offset = rt_off
    h.refcount_table_clusters = rt_clusters
    h.nb_snapshots = nb_snap
    h.snapshots_offset = snap_off
    h.backing_file_offset = bf_off
    h.backing_file_size = bf_size
    if version == 2:
        h.incompatible = h.compatible = h.autoclear = 0
        h.refcount_order = 4
        h.header_length = V2_HEADER_LEN
    else:
        if file_len < V3_HEADER_LEN:
            raise _bad(filename, f"truncated version 3 header ({file_len} bytes, need at least 104)")
        extra = read(V2_HEADER_LEN, V3_HEADER_LEN - V2_HEADER_LEN)
        if len(extra) < V3_HEADER_LEN - V2_HEADER_LEN:
            raise _bad(filename, "truncated version 3 header")
        h.incompatible, h.compatible, h.autoclear, h.refcount_order, h.header_length = HDR_V3_EXTRA.unpack(extra)
        if h.header_length < V3_HEADER_LEN or h.header_length % 8 or h.header_length > cs:
            raise _bad(filename, f"header_length {h.header_length} is invalid (must be a multiple of 8, "
                                 f">= 104 and <= the cluster size {cs})")
        if h.header_length > file_len:
            raise _bad(filename, f"truncated header (header_length {h.header_length} > file size {file_len})")
    if h.refcount_order > 6:
        raise _bad(filename, f"refcount_order {h.refcount_order} is invalid (must be <= 6)")
    # the rest of cluster 0: header fields beyond 104, extensions, backing name
    c0_len = min(cs, file_len)
    c0 = read(0, c0_len)
    if h.version == 3 and h.header_length > 104:
        h.compression_type = c0[104]
    _parse_extensions(h, c0, filename)
    if h.incompatible & ~INCOMPAT_SUPPORTED:
        names = []
        for bit in range(64):
            if (h.incompatible >> bit) & 1 and not (1 << bit) & INCOMPAT_SUPPORTED:
                names.append(f"'{h.feature_name(0, bit)}' (incompatible bit {bit})")
        raise BlockError(errno.ENOTSUP, f"qcow2: image {filename} uses unsupported incompatible feature(s): "
                                        + ", ".join(names))
    if crypt != 0:
        raise BlockError(errno.ENOTSUP, f"qcow2: encrypted images are not supported (crypt_method {crypt}, image {filename})")
    # backing file name
    if bf_off:
        if bf_size > MAX_BACKING_NAME:
            raise _bad(filename, f"backing file name too long ({bf_size} bytes, max {MAX_BACKING_NAME})")
        if bf_off + bf_size > cs or bf_off + bf_size > file_len or bf_off < V2_HEADER_LEN:
            raise _bad(filename, f"backing file name at offset {bf_off} (+{bf_size}) lies outside the header cluster")
        try:
            h.backing_file = c0[bf_off:bf_off + bf_size].decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(filename, "backing file name is not valid UTF-8") from None
    # sizes and tables
    if size > MAX_VIRTUAL_SIZE:
        raise _bad(filename, f"virtual size {size} is absurd (limit {MAX_VIRTUAL_SIZE})")
    l2_entries = cs // 8
    need_l1 = div_round_up(size, cs * l2_entries)
    if l1_size * 8 > MAX_L1_BYTES or need_l1 * 8 > MAX_L1_BYTES:
        raise _bad(filename, f"L1 table too large ({max(l1_size, need_l1) * 8} bytes, limit {MAX_L1_BYTES}); "
                             f"virtual size {size} is absurd for cluster size {cs}")
    if l1_size < need_l1:
        raise _bad(filename, f"L1 table too small: {l1_size} entries for virtual size {size} (need {need_l1})")
    if l1_size:
        _check_table(filename, "L1 table", l1_off, l1_size * 8, cs, file_len)
    if rt_clusters == 0:
        raise _bad(filename, "refcount table has zero clusters")
    if rt_clusters * cs > MAX_REFTABLE_BYTES:
        raise _bad(filename, f"refcount table too large ({rt_clusters} clusters, limit {MAX_REFTABLE_BYTES} bytes)")
    _check_table(filename, "refcount table", rt_off, rt_clusters * cs, cs, file_len)
    if l1_size and _overlap(l1_off, l1_size * 8, rt_off, rt_clusters * cs):
        raise _bad(filename, f"L1 table (offset {l1_off}) overlaps the refcount table (offset {rt_off})")
    if nb_snap > MAX_SNAPSHOTS:
        raise _bad(filename, f"too many snapshots ({nb_snap})")
    if nb_snap and (snap_off % cs or snap_off < cs or snap_off >= file_len):
        raise _bad(filename, f"snapshot table offset {snap_off} is invalid")
    return h


def _overlap(a, alen, b, blen):
    return a < b + blen and b < a + alen


def _check_table(filename, what, off, nbytes, cs, file_len):
    if off % cs:
        raise _bad(filename, f"{what} offset {off:#x} is not aligned to the cluster size {cs}")
    if off < cs:
        raise _bad(filename, f"{what} at offset {off:#x} overlaps the header")
    if off + nbytes > file_len:
        raise _bad(filename, f"{what} at offset {off:#x} (+{nbytes} bytes) lies past the end of the file ({file_len} bytes)")


def _parse_extensions(h, c0, filename):
    pos = h.header_length
    end = len(c0)
    if h.backing_file_offset:
        end = min(end, h.backing_file_offset)
    seen = set()
    while True:
        if pos + 8 > end:
            # v2 images without extensions may end right after the header
            if pos == end or h.version == 2 and pos >= end:
                return
            raise _bad(filename, f"header extension at offset {pos} runs past the header area")
        etype, elen = struct.unpack_from(">II", c0, pos)
        if etype == EXT_END:
            return
        data_end = pos + 8 + elen
        if data_end > end:
            raise _bad(filename, f"header extension {etype:#x} at offset {pos} (length {elen}) runs past the header area")
        data = c0[pos + 8:data_end]
        if etype in seen and etype != 0:
            pass  # tolerate duplicates: last wins
        seen.add(etype)
        if etype == EXT_BACKING_FORMAT:
            h.backing_format = data.decode("utf-8", "replace")
        elif etype == EXT_FEATURE_TABLE:
            for i in range(0, len(data) - 47, 48):
                kind, bit = data[i], data[i + 1]
                name = data[i + 2:i + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
                h.feature_names[(kind, bit)] = name
        elif etype == EXT_BITMAPS:
            h.has_bitmaps_ext = True
            h.bitmaps_ext = bytes(data)
        elif etype == EXT_CRYPTO:
            h.has_crypto_ext = True
        elif etype == EXT_DATA_FILE:
            h.has_data_file_ext = True
        else:
            h.ext_unknown.append(etype)
        pos = data_end + ((8 - elen % 8) % 8)


# ------------------------------------------------------------------ layout


def plan_layout(base, cluster_bits, refcount_order, l1_size, extra_used=(0,)):
    """Fresh metadata at cluster ``base``: refcount table, refcount blocks, L1 table (in that order).

    ``extra_used``: other clusters (index) that must get refcount 1 (the header).
    Returns dict with rt_off, rt_clusters, blocks {range_index: offset}, l1_off, l1_clusters, end_cluster,
    and 'used' (sorted cluster indexes with refcount 1).
    """
    cs = 1 << cluster_bits
    rb_bits = cluster_bits + 3 - refcount_order
    l1c = div_round_up(l1_size * 8, cs)
    rtc, nrb = 1, 1
    while True:
        m = rtc + nrb + l1c
        ranges = {c >> rb_bits for c in extra_used}
        ranges.update(range(base >> rb_bits, ((base + m - 1) >> rb_bits) + 1))
        n_entries = max(ranges) + 1
        new_rtc = max(1, div_round_up(n_entries * 8, cs))
        new_nrb = len(ranges)
        if (new_rtc, new_nrb) == (rtc, nrb):
            break
        rtc, nrb = new_rtc, new_nrb
    rt_off = base * cs
    blocks = {}
    for i, r in enumerate(sorted(ranges)):
        blocks[r] = (base + rtc + i) * cs
    l1_off = (base + rtc + nrb) * cs
    used = sorted(set(extra_used) | set(range(base, base + m)))
    return {"rt_off": rt_off, "rt_clusters": rtc, "blocks": blocks, "l1_off": l1_off, "l1_clusters": l1c,
            "end_cluster": base + m, "used": used, "rb_bits": rb_bits}


def layout_blobs(layout, cluster_bits, refcount_order):
    """(offset, bytes) writes for the refcount table and blocks of a plan (L1 not included)."""
    cs = 1 << cluster_bits
    rb_bits = layout["rb_bits"]
    rb_mask = (1 << rb_bits) - 1
    rt = array("Q", [0]) * (layout["rt_clusters"] * cs // 8)
    writes = []
    for r, off in sorted(layout["blocks"].items()):
        rt[r] = off
        blk = RefBlock(refcount_order, bytes(cs))
        for c in layout["used"]:
            if c >> rb_bits == r:
                blk.set(c & rb_mask, 1)
        writes.append((off, blk.tobytes()))
    writes.insert(0, (layout["rt_off"], array_to_be64(rt)))
    return writes


def build_header_cluster0(version, cluster_bits, size, l1_size, l1_off, rt_off, rt_clusters, refcount_order,
                          backing_file=None, backing_fmt=None, incompatible=0, compatible=0, autoclear=0):
    cs = 1 << cluster_bits
    exts = b""
    if backing_fmt:
        exts += _ext(EXT_BACKING_FORMAT, backing_fmt.encode())
    hlen = V2_HEADER_LEN if version == 2 else V3_HEADER_LEN_WRITTEN
    bname = backing_file.encode() if backing_file else b""
    if version == 3:
        table = b""
        for (kind, bit), name in sorted(FEATURE_NAMES.items()):
            table += bytes([kind, bit]) + name.encode().ljust(46, b"\0")
        ft = _ext(EXT_FEATURE_TABLE, table)
        if hlen + len(exts) + len(ft) + 8 + len(bname) <= cs:   # optional: only when it fits (512 B clusters)
            exts += ft
    exts += b"\0" * 8
    if len(bname) > MAX_BACKING_NAME:
        raise OptionError(f"qcow2: backing file name too long ({len(bname)} bytes, max {MAX_BACKING_NAME})")
    bf_off = hlen + len(exts) if bname else 0
    if hlen + len(exts) + len(bname) > cs:
        raise OptionError(f"qcow2: header, extensions and backing file name do not fit in one {cs}-byte cluster")
    hdr = HDR_V2.pack(MAGIC, version, bf_off, len(bname), cluster_bits, size, 0, l1_size, l1_off, rt_off,
                      rt_clusters, 0, 0)
    if version == 3:
        hdr += HDR_V3_EXTRA.pack(incompatible, compatible, autoclear, refcount_order, hlen)
        hdr += b"\0" * (hlen - V3_HEADER_LEN)
    return hdr + exts + bname


def _ext(etype, data):
    pad = (8 - len(data) % 8) % 8
    return struct.pack(">II", etype, len(data)) + data + b"\0" * pad


def _opt(opts, *names, default=None):
    for n in names:
        if n in opts and opts[n] is not None:
            return opts[n]
        alt = n.replace("_", "-")
        if alt in opts and opts[alt] is not None:
            return opts[alt]
    return default


def _backing_size(backing_file, fmt, filename):
    """Virtual size of the backing file named ``backing_file`` (for create without an explicit size),
    opened read-only through the option layer as the image will open it (``json:`` names too)."""
    from pyrep.graph import backing_options, open_node     # only create without a size needs the graph
    opts = backing_options(backing_file, fmt, filename)
    opts["read-only"] = True
    node = open_node(opts)
    try:
        return node.length
    finally:
        node.close()


def create_file(filename, size, opts):
    """Write a new, empty qcow2 image with plain os calls."""
    opts = dict(opts or {})
    cluster_size = parse_size(_opt(opts, "cluster_size", default=65536), "qcow2: option 'cluster_size'")
    if cluster_size < 512 or cluster_size > (2 << 20) or cluster_size & (cluster_size - 1):
        raise OptionError(f"qcow2: cluster_size {cluster_size} must be a power of two between 512 and 2M")
    cluster_bits = cluster_size.bit_length() - 1
    compat = str(_opt(opts, "compat", default="1.1"))
    if compat in ("1.1", "v3", "3"):
        version = 3
    elif compat in ("0.10", "v2", "2"):
        version = 2
    else:
        raise OptionError(f"qcow2: compat {compat!r} is invalid (expected '1.1' or '0.10')")
    refcount_bits = int(_opt(opts, "refcount_bits", default=16))
    if refcount_bits < 1 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
        raise OptionError(f"qcow2: refcount_bits {refcount_bits} must be a power of two between 1 and 64")
    if version == 2 and refcount_bits != 16:
        raise OptionError("qcow2: compat 0.10 images only support refcount_bits 16")
    refcount_order = refcount_bits.bit_length() - 1
    prealloc = str(_opt(opts, "preallocation", default="off"))
    if prealloc != "off":
        raise OptionError(f"qcow2: preallocation {prealloc!r} is not supported (only 'off')")
    lazy = parse_bool(_opt(opts, "lazy_refcounts", default=False), "qcow2: option 'lazy_refcounts'")
    if lazy and version == 2:
        raise OptionError("qcow2: lazy_refcounts requires compat 1.1")
    backing_file = _opt(opts, "backing_file")
    backing_fmt = _opt(opts, "backing_fmt")
    if backing_file is not None and not isinstance(backing_file, str):
        raise OptionError(f"qcow2: backing_file must be a file name, not {backing_file!r}")
    if size is None:
        if not backing_file:
            raise OptionError("qcow2: an image size is required when there is no backing file")
        size = _backing_size(backing_file, backing_fmt, filename)
    size = parse_size(size, "qcow2: size")
    if size % 512:
        size = (size + 511) & ~511   # qemu-img rounds up to sectors as well
    if size > MAX_VIRTUAL_SIZE:
        raise OptionError(f"qcow2: size {size} is too large")
    l2_entries = cluster_size // 8
    l1_size = div_round_up(size, cluster_size * l2_entries)
    if l1_size * 8 > MAX_L1_BYTES:
        raise OptionError(f"qcow2: size {size} needs an L1 table larger than {MAX_L1_BYTES} bytes; "
                          f"use a larger cluster size")
    lay = plan_layout(1, cluster_bits, refcount_order, l1_size)
    c0 = build_header_cluster0(version, cluster_bits, size, l1_size, lay["l1_off"] if l1_size else 0,
                               lay["rt_off"], lay["rt_clusters"], refcount_order, backing_file, backing_fmt,
                               compatible=COMPAT_LAZY_REFCOUNTS if lazy else 0)
    writes = [(0, c0)] + layout_blobs(lay, cluster_bits, refcount_order)
    end = lay["l1_off"] + l1_size * 8 if l1_size else lay["l1_off"]
    from pyrep.drivers.file import create_fd     # the file protocol's creation locks
    fd = create_fd(filename, str(_opt(opts, "locking", default="auto")) != "off", what="qcow2")
    try:
        for off, data in writes:
            os.pwrite(fd, data, off)
        os.ftruncate(fd, end)
        if l1_size:
            # the L1 table is all zeroes: the hole past the refcount blocks already reads as zero
            pass
        os.fsync(fd)
    except OSError as e:
        raise BlockError(e.errno or errno.EIO, f"qcow2: cannot write {filename}: {e.strerror}") from None
    finally:
        os.close(fd)
