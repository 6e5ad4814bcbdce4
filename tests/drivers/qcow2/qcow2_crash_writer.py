"""Writer process of the crash test: random writes into disjoint slots, flush, then acknowledge.

Prints ``A <slot> <offset> <length> <byte>`` for every write covered by a completed flush."""
import random
import sys

import pyrep

path, seed, slot_size, nslots = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
used = set(int(s) for s in sys.argv[5].split(",") if s) if len(sys.argv) > 5 else set()
rng = random.Random(seed)
blk = pyrep.open_backend({"driver": "qcow2", "file": {"driver": "file", "filename": path}})
free = [s for s in range(nslots) if s not in used]
rng.shuffle(free)
pending = []
out = sys.stdout
while free:
    slot = free.pop()
    off = slot * slot_size + rng.randrange(0, slot_size // 2)
    n = rng.randrange(1, slot_size - (off - slot * slot_size) + 1)
    val = rng.randrange(1, 256)
    out.write("W %d\n" % slot)   # intent: this slot may hold data from now on
    out.flush()
    blk.pwrite(off, bytes([val]) * n)
    pending.append((slot, off, n, val))
    if rng.random() < 0.3:
        blk.flush()
        for p in pending:
            out.write("A %d %d %d %d\n" % p)
        out.flush()
        pending = []
blk.flush()
for p in pending:
    out.write("A %d %d %d %d\n" % p)
out.write("DONE\n")
out.flush()
blk.close()
