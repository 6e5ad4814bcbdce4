"""qcow2 consistency check and repair: rebuild reference counts from the structures, compare, fix."""
import struct
from array import array

from . import bitmaps as B
from . import format as F
from .format import L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, REFT_OFFSET_MASK


class _Ctx:
    pass


def run_check(drv, repair):
    """Called with the driver's metadata flushed and both its locks held (clusters, then refcounts). Returns the result dict."""
    x = _Ctx()
    h = drv.header
    x.drv, x.h = drv, h
    cs = x.cs = drv.cluster_size
    cb = x.cb = drv.cluster_bits
    x.file = drv.file
    file_len = x.file_len = drv.file.getlength()
    nclus = x.nclus = -(-file_len // cs)
    x.used = array("I", [0]) * (nclus + 1)
    x.beyond = {}
    x.msgs = []
    x.corruptions = x.leaks = x.corr_fixed = x.leaks_fixed = x.errors = 0
    x.allocated = x.compressed = x.fragmented = 0
    x.prev_data = None
    x.copied_l1 = []     # (l1 index, l2 offset, copied)
    x.copied_l2 = []     # (l2 offset, index, host offset, copied)
    x.zero_flag = drv._zero_flag
    x.repair = repair

    def rd(off, n):
        n = max(0, min(n, file_len - off))
        return x.file.pread(off, n) if n else b""
    x.rd = rd

    _inc(x, 0, cs)   # header
    # active L1/L2
    l1 = F.be64_to_array(rd(drv.clusters.l1_offset, len(drv.clusters.l1) * 8).ljust(len(drv.clusters.l1) * 8, b"\0"))
    if len(drv.clusters.l1):
        _inc(x, drv.clusters.l1_offset, len(drv.clusters.l1) * 8)
    _walk_l1(x, l1, drv.clusters.l1_offset, active=True)
    # snapshots
    if h.nb_snapshots:
        _walk_snapshots(x)
    if drv._bitmaps_valid():
        # the bitmaps' directory, tables and data clusters are referenced like any metadata
        try:
            d = B.load_directory(h.bitmaps_ext, rd, file_len, cs)
        except ValueError as e:
            x.corruptions += 1
            x.msgs.append(f"ERROR bitmaps extension: {e}")
        else:
            for off, n in B.referenced(d, rd, cs):
                _inc(x, off, n)
    # refcount structures
    rt = F.be64_to_array(rd(drv.refs.table_offset, drv.refs.table_clusters * cs).ljust(drv.refs.table_clusters * cs, b"\0"))
    _inc(x, drv.refs.table_offset, drv.refs.table_clusters * cs)
    bad_rt = False
    blocks = {}
    for r, e in enumerate(rt):
        off = e & REFT_OFFSET_MASK
        if not off:
            continue
        if off & (cs - 1) or off >= file_len:
            x.corruptions += 1
            bad_rt = True
            x.msgs.append(f"ERROR refcount block {r} has an invalid offset {off:#x}")
            continue
        _inc(x, off, cs)
        blocks[r] = off
    rb_bits = drv.refs.block_bits
    E = 1 << rb_bits
    refs = {}

    def refcount(c):
        r = c >> rb_bits
        off = blocks.get(r)
        if off is None:
            return 0
        b = refs.get(off)
        if b is None:
            b = refs[off] = F.RefBlock(drv.refs.order, rd(off, cs).ljust(cs, b"\0"))
        return b.get(c & (E - 1))

    # compare
    mismatches = []
    last = nclus
    if blocks:
        last = max(last, (max(blocks) + 1) << rb_bits)
    highest = 0
    for r_c in range(0, last, E):
        r = r_c >> rb_bits
        off = blocks.get(r)
        b = None
        if off is not None:
            b = refs.get(off)
            if b is None:
                b = refs[off] = F.RefBlock(drv.refs.order, rd(off, cs).ljust(cs, b"\0"))
        for c in range(r_c, min(r_c + E, last)):
            u = x.used[c] if c < nclus else x.beyond.get(c, 0)
            rc = b.get(c & (E - 1)) if b is not None else 0
            if rc or u:
                highest = c
            if rc != u:
                mismatches.append((c, rc, u, off))
    for c, u in x.beyond.items():
        if c >= last:
            mismatches.append((c, 0, u, None))
    rebuild = False
    for c, rc, u, off in mismatches:
        if rc > u:
            x.leaks += 1
            x.msgs.append(f"Leaked cluster {c} refcount={rc} reference={u}")
        else:
            x.corruptions += 1
            x.msgs.append(f"ERROR cluster {c} refcount={rc} reference={u}")
    fix_leaks = repair in ("leaks", "all")
    fix_all = repair == "all"
    rc_max = drv.refs.max
    if fix_all and (bad_rt or any(rc < u for c, rc, u, off in mismatches)
                    or any(u > rc_max for c, rc, u, off in mismatches)):
        rebuild = True
    if rebuild:
        _rebuild(x, blocks, mismatches)
    elif fix_leaks or fix_all:
        dirty = set()
        for c, rc, u, off in mismatches:
            if rc > u or (fix_all and off is not None):
                b = refs[off]
                b.set(c & (E - 1), min(u, rc_max))
                dirty.add(off)
                if rc > u:
                    x.leaks_fixed += 1
                else:
                    x.corr_fixed += 1
        for off in sorted(dirty):
            x.file.pwrite(off, refs[off].tobytes())
        if dirty:
            x.file.flush()
        refs.clear()

    # OFLAG_COPIED consistency (active tables), using the (possibly repaired) refcounts
    if rebuild:
        def refcount(c):  # noqa: F811 - after a rebuild every reference has its exact count
            return x.used[c] if c < nclus else x.beyond.get(c, 0)
    l1_fix = {}
    l2_fix = {}
    for l1i, l2off, copied in x.copied_l1:
        want = refcount(l2off >> cb) == 1
        if want != copied:
            x.corruptions += 1
            x.msgs.append(f"ERROR OFLAG_COPIED L2 cluster: l1_index={l1i} l1_entry={l2off:x} "
                          f"refcount={refcount(l2off >> cb)}")
            if fix_all:
                l1_fix[l1i] = want
    for l2off, idx, host, copied in x.copied_l2:
        want = refcount(host >> cb) == 1
        if want != copied:
            x.corruptions += 1
            x.msgs.append(f"ERROR OFLAG_COPIED data cluster: l2_entry={host:x} refcount={refcount(host >> cb)}")
            if fix_all:
                l2_fix.setdefault(l2off, {})[idx] = want
    if l1_fix:
        for l1i, want in l1_fix.items():
            e = l1[l1i]
            e = (e | OFLAG_COPIED) if want else (e & ~OFLAG_COPIED)
            l1[l1i] = e
            x.file.pwrite(drv.clusters.l1_offset + l1i * 8, struct.pack(">Q", e))
            x.corr_fixed += 1
    if l2_fix:
        for l2off, fixes in l2_fix.items():
            t = F.be64_to_array(rd(l2off, cs))
            for idx, want in fixes.items():
                t[idx] = (t[idx] | OFLAG_COPIED) if want else (t[idx] & ~OFLAG_COPIED)
                x.corr_fixed += 1
            x.file.pwrite(l2off, F.array_to_be64(t))
    if l1_fix or l2_fix:
        x.file.flush()

    res = {
        "filename": drv.filename,
        "format": "qcow2",
        "check-errors": x.errors,
        "corruptions": x.corruptions - x.corr_fixed,
        "leaks": x.leaks - x.leaks_fixed,
        "corruptions-fixed": x.corr_fixed,
        "leaks-fixed": x.leaks_fixed,
        "image-end-offset": (highest + 1) * cs,
        "total-clusters": -(-drv.size // cs),
        "allocated-clusters": x.allocated,
        "fragmented-clusters": x.fragmented,
        "compressed-clusters": x.compressed,
        "messages": x.msgs,
    }
    return res


def _inc(x, off, n):
    cb = x.cb
    for c in range(off >> cb, ((off + n - 1) >> cb) + 1):
        if c < x.nclus:
            x.used[c] += 1
        else:
            x.beyond[c] = x.beyond.get(c, 0) + 1


def _walk_l1(x, l1, l1_off, active):
    cs, cb = x.cs, x.cb
    drv = x.drv
    for l1i, e in enumerate(l1):
        off = e & L1E_OFFSET_MASK
        if not off:
            continue
        if off & (cs - 1) or off < cs:
            x.corruptions += 1
            x.msgs.append(f"ERROR L1 entry {l1i}: L2 table offset {off:#x} is invalid (misaligned or in the header)")
            continue
        if off + cs > x.file_len:
            x.corruptions += 1
            x.msgs.append(f"ERROR L1 entry {l1i}: L2 table offset {off:#x} is past the end of the file")
            continue
        _inc(x, off, cs)
        if active:
            x.copied_l1.append((l1i, off, bool(e & OFLAG_COPIED)))
        t = F.be64_to_array(x.rd(off, cs))
        fixed = False
        for i, le in enumerate(t):
            if not le:
                continue
            if le & OFLAG_COMPRESSED:
                coff = le & drv._coffset_mask
                nsec = ((le >> drv._csize_shift) & drv._csize_mask) + 1
                if coff >= x.file_len:
                    x.corruptions += 1
                    x.msgs.append(f"ERROR compressed cluster at {coff:#x} (L2 {off:#x} index {i}) is past the end of the file")
                    if x.repair == "all":
                        t[i] = x.zero_flag
                        fixed = True
                        x.corr_fixed += 1
                    continue
                _inc(x, coff & ~511, nsec * 512)
                if active:
                    x.allocated += 1
                    x.compressed += 1
                if le & OFLAG_COPIED and active:
                    x.corruptions += 1
                    x.msgs.append(f"ERROR compressed cluster with OFLAG_COPIED set (L2 {off:#x} index {i})")
                    if x.repair == "all":
                        t[i] = le & ~OFLAG_COPIED
                        fixed = True
                        x.corr_fixed += 1
                continue
            host = le & L2E_OFFSET_MASK
            if not host:
                continue
            bad = None
            if host & (cs - 1):
                bad = f"offset {host:#x} is not cluster aligned"
            elif host < cs:
                bad = f"offset {host:#x} points into the header"
            elif host >= x.file_len:
                bad = f"offset {host:#x} is past the end of the file ({x.file_len} bytes)"
            if bad:
                x.corruptions += 1
                x.msgs.append(f"ERROR data cluster for guest cluster {(l1i << (cb - 3)) + i}: {bad}")
                if x.repair == "all":
                    t[i] = x.zero_flag if x.zero_flag else 0
                    fixed = True
                    x.corr_fixed += 1
                continue
            _inc(x, host, cs)
            if active:
                x.allocated += 1
                if x.prev_data is not None and host != x.prev_data + cs:
                    x.fragmented += 1
                x.prev_data = host
                x.copied_l2.append((off, i, host, bool(le & OFLAG_COPIED)))
        if fixed:
            x.file.pwrite(off, F.array_to_be64(t))
            x.file.flush()


def _walk_snapshots(x):
    h = x.h
    pos = h.snapshots_offset
    start = pos
    for s in range(h.nb_snapshots):
        raw = x.rd(pos, 40)
        if len(raw) < 40:
            x.errors += 1
            x.msgs.append(f"ERROR snapshot table entry {s} is truncated")
            return
        l1_off, l1_size, id_len, name_len, _d1, _d2, _clk, _vm, extra = struct.unpack(">QIHHIIQII", raw)
        ent = 40 + extra + id_len + name_len
        ent += (8 - ent % 8) % 8
        pos += ent
        if l1_size * 8 > F.MAX_L1_BYTES or l1_off & (x.cs - 1) or l1_off + l1_size * 8 > x.file_len:
            x.corruptions += 1
            x.msgs.append(f"ERROR snapshot {s}: invalid L1 table ({l1_off:#x}, {l1_size} entries)")
            continue
        if l1_size:
            _inc(x, l1_off, l1_size * 8)
            _walk_l1(x, F.be64_to_array(x.rd(l1_off, l1_size * 8)), l1_off, active=False)
    if pos > start:
        _inc(x, start, pos - start)


def _rebuild(x, old_blocks, mismatches):
    """Write a fresh refcount table and blocks past the end of the file from the computed references."""
    drv = x.drv
    cs, cb = x.cs, x.cb
    rb_bits = drv.refs.block_bits
    E = 1 << rb_bits
    # references without the old refcount structures
    counts = {}
    for c in range(x.nclus):
        u = x.used[c]
        if u:
            counts[c] = u
    for c, u in x.beyond.items():
        counts[c] = counts.get(c, 0) + u
    old_rt_first = drv.refs.table_offset >> cb
    for i in range(drv.refs.table_clusters):
        _dec(counts, old_rt_first + i)
    for off in old_blocks.values():
        _dec(counts, off >> cb)
    base = max([x.nclus] + [c + 1 for c in counts])
    rtc, nrb = 1, 1
    while True:
        m = rtc + nrb
        ranges = {c >> rb_bits for c in counts}
        ranges.update(range(base >> rb_bits, ((base + m - 1) >> rb_bits) + 1))
        n_entries = max(ranges) + 1
        new_rtc = max(1, -(-n_entries * 8 // cs))
        if (new_rtc, len(ranges)) == (rtc, nrb):
            break
        rtc, nrb = new_rtc, len(ranges)
    for i in range(rtc + nrb):
        counts[base + i] = counts.get(base + i, 0) + 1
    rt = array("Q", [0]) * (rtc * cs // 8)
    blobs = {}
    for i, r in enumerate(sorted(ranges)):
        boff = (base + i) << cb
        rt[r] = boff
        blobs[r] = (boff, F.RefBlock(drv.refs.order, bytes(cs)))
    for c, u in counts.items():
        blobs[c >> rb_bits][1].set(c & (E - 1), min(u, drv.refs.max))
    for r, (boff, b) in blobs.items():
        x.file.pwrite(boff, b.tobytes())
    rt_off = (base + nrb) << cb
    x.file.pwrite(rt_off, F.array_to_be64(rt))
    x.file.flush()
    x.file.pwrite(48, struct.pack(">QI", rt_off, rtc))
    x.file.flush()
    drv.refs.table_offset, drv.refs.table_clusters = rt_off, rtc
    drv.header.refcount_table_offset, drv.header.refcount_table_clusters = rt_off, rtc
    for c, rc, u, off in mismatches:
        if rc > u:
            x.leaks_fixed += 1
        else:
            x.corr_fixed += 1
    x.msgs.append(f"Rebuilt the refcount structures at {rt_off:#x}")
    # after the rebuild the references are exactly counted
    x.used = array("I", [0]) * (base + rtc + nrb + 1)
    x.nclus_rebuilt = base + rtc + nrb
    for c, u in counts.items():
        if c < len(x.used):
            x.used[c] = u
    x.nclus = len(x.used)


def _dec(counts, c):
    v = counts.get(c, 0) - 1
    if v > 0:
        counts[c] = v
    else:
        counts.pop(c, None)
