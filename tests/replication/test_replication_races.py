"""Deterministic races of copy-before-write, forced with blkdebug hold rules.

The random concurrency test (test_replication_model.py) hopes to hit the dangerous
interleavings; these tests *force* them. The secondary disk is a raw image over a
blkdebug node (``sd_dbg``), so a hold rule on it holds exactly one request at a
chosen point, until the test releases it:

- a *read* of cluster C on ``sd_dbg`` is either the secondary's read falling through
  active -> hidden -> secondary disk, or the backup job's copy-before-write read of
  the old data (whichever comes first; ``once`` rules hold only that one);
- a *write* of cluster C on ``sd_dbg`` is the primary's write itself, after its copy.

The model is always "the secondary disk at the last checkpoint + the secondary's own
writes": what the secondary reads, what the hidden disk holds, what a checkpoint keeps.
Each test names the mechanism it guards (and the mutation of it that makes it fail).
"""
import pytest

import pyrep
from pyrep import replication
from pyrep.node import is_allocated

from helpers.replication import M, Primary, Secondary
from helpers.threads import spawn
from helpers.wait import stays_false

SIZE = 2 * M
CL = 65536                  # the backup's cluster size (memory hidden disk: 64 KiB clusters)
NCL = SIZE // CL
C = 5                       # the cluster the races are about


def old_cluster(c):
    """The checkpoint content of cluster c (every cluster different)."""
    return bytes([0x20 + c]) * CL


def setup(tmp_path):
    s = Secondary(tmp_path, "raw+memory", size=SIZE, fill=None, sd_debug="sd_dbg")
    s.local.pwrite(0, b"".join(old_cluster(c) for c in range(NCL)))
    p = Primary(tmp_path, "raw+memory", size=SIZE, fill=None)
    p.local.pwrite(0, b"".join(old_cluster(c) for c in range(NCL)))
    replication.start_all("secondary", skip_other_mode=True)
    replication.start_all("primary", skip_other_mode=True)
    return s, p


def hold(op, c=C):
    """Hold the next ``op`` request touching cluster c on the secondary disk's file until the rule is
    released (``rule.wait_held()`` tells when it is held)."""
    return pyrep.inject_error("sd_dbg", op=op, errno=None, hold=True, offset=c * CL, length=CL, once=True)


def patched(base, off, data):
    b = bytearray(base)
    b[off:off + len(data)] = data
    return bytes(b)


def hidden_holds(c=C):
    hidden = pyrep.lookup("hidden")
    alloc, n = is_allocated(hidden, c * CL, CL)
    return bool(alloc) and n >= CL


# ------------------------------------------------------------------------------------------------------------
# (1) a secondary read of C while a primary write to C is in its copy-before-write phase


def test_secondary_read_in_flight_when_primary_write_copies(tmp_path):
    """The secondary's read of C has missed active and hidden and is reading the secondary disk
    (held there) when a primary write to C arrives. The copy into hidden is a serialising write and
    hidden tracks requests, so the copy — and the primary write behind it — waits for the read:
    the read returns the checkpoint content, never the primary's new data.

    Catches: the copy written to hidden as an ordinary request (CowGate's target write or its
    adopted copy without a serialising tracked request, or no ``target.enable_tracking()``), and a
    copy made after the guest write instead of before."""
    s, p = setup(tmp_path)
    rule = hold("read")
    reader = spawn(s.top.pread, C * CL, CL)
    assert rule.wait_held()                   # the reader is inside hidden, reading the secondary disk
    new = b"\xee" * 4096
    writer = spawn(p.blk.pwrite, C * CL + 8192, new)
    assert stays_false(writer.done.is_set), "the primary write did not wait for the secondary's read"
    rule.release()
    got = reader.join()
    writer.join()
    assert got == old_cluster(C), "the secondary read saw the primary's write (or a torn cluster)"
    # afterwards: hidden holds the old cluster, the secondary still reads it, the disk has the new data
    assert hidden_holds()
    assert s.top.pread(C * CL, CL) == old_cluster(C)
    assert s.local.pread(C * CL, CL) == patched(old_cluster(C), 8192, new)
    replication.get_error_all()


def test_secondary_read_while_primary_write_is_copying(tmp_path):
    """A primary write to C is in its copy-before-write phase (the backup's read of the old data is
    held) when the secondary reads C, and C..C+1 (across the cluster boundary). The primary write must
    not reach the disk before its copy is in hidden, so both reads return the checkpoint content;
    after the write completed hidden serves the old cluster.

    Catches: the copy made after the guest write (or the notifier not called before the write),
    a notifier that does not claim and copy the cluster before returning."""
    s, p = setup(tmp_path)
    rule = hold("read")
    new = b"\xab" * 4096
    writer = spawn(p.blk.pwrite, C * CL + 4096, new)
    assert rule.wait_held()                   # the copy of C is reading the old data (held)
    got1 = s.top.pread(C * CL, CL)
    got2 = s.top.pread(C * CL + CL // 2, CL)  # half of C, half of C+1
    assert not writer.done.is_set(), "the primary write finished while its copy-before-write was held"
    rule.release()
    writer.join()
    assert got1 == old_cluster(C), "the secondary read saw the primary's write during its copy"
    assert got2 == old_cluster(C)[CL // 2:] + old_cluster(C + 1)[:CL // 2], "torn read across C, C+1"
    assert hidden_holds()
    assert pyrep.lookup("hidden").pread(C * CL, CL) == old_cluster(C)
    assert s.top.pread(C * CL, CL) == old_cluster(C)
    assert s.local.pread(C * CL, CL) == patched(old_cluster(C), 4096, new)
    replication.get_error_all()


# ------------------------------------------------------------------------------------------------------------
# (2) two writes to C racing the first copy of C


@pytest.mark.parametrize("second", ["primary", "secondary-disk backend"])
def test_second_write_waits_for_the_copy_in_progress(tmp_path, second):
    """Write 1 to C claims C and its copy reads the old data (held); write 2 to C (from the primary,
    or straight to the secondary disk's backend: copy-before-write catches every path) finds C being
    copied and must wait for that copy, then not copy again. Hidden gets the checkpoint content of C,
    not write 1's or write 2's data, and both writes land on the disk.

    Catches: write 2 not waiting for the in-progress copy (``_before_write`` skipping ``others``),
    no claim at all (both writes copy; the held copy then reads write 2's data), and copy-after-write."""
    s, p = setup(tmp_path)
    rule = hold("read")
    d1, d2 = b"\x01" * 4096, b"\x02" * 4096
    w1 = spawn(p.blk.pwrite, C * CL, d1)
    assert rule.wait_held()                   # write 1's copy of C is reading (held)
    blk2 = p.blk if second == "primary" else s.local
    w2 = spawn(blk2.pwrite, C * CL + 8192, d2)
    assert stays_false(w2.done.is_set), "write 2 to a cluster being copied did not wait for the copy"
    rule.release()
    w1.join()
    w2.join()
    hidden = pyrep.lookup("hidden")
    assert hidden_holds()
    assert hidden.pread(C * CL, CL) == old_cluster(C), "hidden holds a write's data, not the checkpoint's"
    assert s.top.pread(C * CL, CL) == old_cluster(C)
    assert s.local.pread(C * CL, CL) == patched(patched(old_cluster(C), 0, d1), 8192, d2)
    job = s.driver._backup
    assert job.clusters_copied == 1, f"cluster {C} copied {job.clusters_copied} times in one interval"
    replication.get_error_all()


# ------------------------------------------------------------------------------------------------------------
# (3) a checkpoint racing an in-flight primary write


@pytest.mark.parametrize("held", ["copy", "write"])
def test_checkpoint_waits_for_in_flight_primary_write(tmp_path, held):
    """A primary write to C is in flight — held in its copy-before-write (``copy``: the backup's read
    of the old data) or after it, in its own write to the secondary disk (``write``) — when the
    secondary checkpoints. The checkpoint drains: it returns only after the write completed, so the
    new checkpoint includes it, hidden is empty afterwards (no stale copy lands after make_empty),
    the secondary reads the disk as it is, and the next write to C is copied again (the copy
    bitmap was reset after the write's copy, not before).

    Catches: a checkpoint that does not drain (``drained(...)`` dropped from ``_checkpoint``: the
    checkpoint returns with the write still in flight), and, with the ``copy`` hold, a checkpoint that
    resets the bitmap and empties hidden without waiting for copies in flight (the late copy lands in
    the emptied hidden disk and masks the write)."""
    s, p = setup(tmp_path)
    s.top.pwrite(7 * CL, b"\x77" * CL)        # something in active too: the checkpoint drops it
    rule = hold("read" if held == "copy" else "write")
    new = b"\xc3" * 4096
    writer = spawn(p.blk.pwrite, C * CL + 12288, new)
    assert rule.wait_held()
    checkpoint = spawn(replication.do_checkpoint_all)
    returned_early = not stays_false(checkpoint.done.is_set)
    rule.release()
    checkpoint.join()
    writer.join()
    after = patched(old_cluster(C), 12288, new)
    assert s.local.pread(C * CL, CL) == after
    assert not hidden_holds(), "hidden is not empty after the checkpoint (a copy landed after make_empty)"
    assert s.top.pread(C * CL, CL) == after, "the secondary does not read the checkpointed write"
    assert not returned_early, "the checkpoint returned while a primary write was still in flight"
    assert s.top.pread(7 * CL, CL) == old_cluster(7)
    # the next interval: a write to C is copied again, with the content of this checkpoint
    p.blk.pwrite(C * CL, b"\x99" * 4096)
    assert hidden_holds()
    assert pyrep.lookup("hidden").pread(C * CL, CL) == after
    assert s.top.pread(C * CL, CL) == after
    replication.get_error_all()
    # and the model survives a failover: the disk ends as the last checkpoint (+ no secondary writes)
    p.blk.close()
    replication.stop_all(True, wait=True, timeout=30, mode="secondary")
    assert s.local.pread(C * CL, CL) == after
