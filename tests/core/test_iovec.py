"""IOVector: construction, views (no copies), concat/slice edges, data ops."""
import gc
import mmap
import random

import pytest

from pyrep._core.iovec import IOVector

try:
    import numpy
except ImportError:  # pragma: no cover
    numpy = None


def vec_of(*parts):
    v = IOVector()
    for p in parts:
        v.add(p)
    return v


def test_empty():
    v = IOVector()
    assert v.size == 0 and v.niov == 0
    assert v.buffers() == [] and v.to_bytes() == b""
    assert v.is_zero() and v.writable
    assert v.slice(0, 0).size == 0
    assert v.copy_to(0, 0) == b""
    v.memset(0, 1, 0)
    with pytest.raises(ValueError):
        v.slice(0, 1)


def test_one_buffer_is_a_view_not_a_copy():
    b = bytearray(b"abcdef")
    v = IOVector(b)
    assert v.size == 6 and v.niov == 1 and v.writable
    b[0] = ord("X")
    assert v.to_bytes() == b"Xbcdef"
    v.copy_from(1, b"YZ")
    assert b == bytearray(b"XYZdef")
    mv = v.buffers()[0]
    mv[5] = ord("!")
    assert b[5] == ord("!")


def test_accepts_buffer_types(tmp_path):
    path = tmp_path / "m"
    path.write_bytes(b"0123456789")
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 10)
        objs = [b"ab", bytearray(b"cd"), memoryview(b"xxefxx")[2:4], mm]
        if numpy is not None:
            objs.append(numpy.frombuffer(b"ghij", dtype=numpy.uint16))
        v = vec_of(*objs)
        expect = b"abcdef0123456789" + (b"ghij" if numpy is not None else b"")
        assert v.to_bytes() == expect
        assert not v.writable            # bytes are read-only
        # The vector keeps the mmap exported: closing it must fail, not crash.
        with pytest.raises(BufferError):
            mm.close()
        v.reset()
        mm.close()


def test_keeps_memory_alive_and_blocks_resize():
    b = bytearray(b"hello")
    v = IOVector(b)
    with pytest.raises(BufferError):
        b.extend(b"x")                   # exported: cannot move under the vector
    s = v.slice(1, 3)
    del v
    gc.collect()
    with pytest.raises(BufferError):
        b.extend(b"x")                   # the slice still holds the export
    assert s.to_bytes() == b"ell"
    del s
    gc.collect()
    b.extend(b"x")                       # released with the last view


def test_source_object_may_die():
    v = IOVector(bytearray(b"temp"))     # only the vector references it
    gc.collect()
    assert v.to_bytes() == b"temp"
    parts = v.buffers()
    v.reset()
    assert bytes(parts[0]) == b"temp"    # memoryviews keep it alive too


def test_zero_length_buffers_are_dropped():
    v = vec_of(b"", bytearray(), b"a", memoryview(b"")[0:0])
    assert v.niov == 1 and v.size == 1


def test_rejects_non_buffers_and_non_contiguous():
    with pytest.raises(TypeError):
        IOVector(123)
    with pytest.raises(TypeError):
        IOVector().add("text")
    with pytest.raises((BufferError, ValueError)):
        IOVector(memoryview(bytearray(10))[::2])


def test_many_entries_growth():
    parts = [bytes([i % 256]) * (i % 7 + 1) for i in range(1000)]
    v = vec_of(*parts)
    assert v.niov == 1000
    assert v.size == sum(map(len, parts))
    assert v.to_bytes() == b"".join(parts)
    assert [bytes(m) for m in v.buffers()] == parts


def test_concat_and_slice_random_against_bytes():
    rng = random.Random(42)
    for _ in range(300):
        parts = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
                 for _ in range(rng.randrange(1, 6))]
        src = vec_of(*parts)
        flat = b"".join(parts)
        off = rng.randrange(len(flat) + 1)
        ln = rng.randrange(len(flat) - off + 1)
        s = src.slice(off, ln)
        assert s.to_bytes() == flat[off:off + ln]
        assert s.size == ln
        assert all(len(m) > 0 for m in s.buffers())
        dst = IOVector(b"<")
        dst.concat(src, off, ln)
        dst.add(b">")
        assert dst.to_bytes() == b"<" + flat[off:off + ln] + b">"
        o2 = rng.randrange(len(flat) + 1)
        l2 = rng.randrange(len(flat) - o2 + 1)
        assert src.copy_to(o2, l2) == flat[o2:o2 + l2]


def test_slice_entry_boundaries():
    v = vec_of(b"aaa", b"bbb", b"ccc")
    assert v.slice(3, 3).niov == 1              # exactly the middle entry
    assert v.slice(2, 2).niov == 2              # straddles one boundary
    assert v.slice(0, 9).niov == 3
    assert v.slice(9, 0).niov == 0
    assert v.slice(2, 5).to_bytes() == b"abbbc"
    assert v.slice(1, 7).slice(1, 5).to_bytes() == b"abbbc"


def test_concat_self():
    v = vec_of(b"ab", b"cd", b"ef")             # 3 entries: beyond inline storage
    v.concat(v, 1, 4)
    assert v.to_bytes() == b"abcdefbcde"
    assert v.niov == 6


def test_slice_shares_memory():
    b = bytearray(10)
    v = IOVector(b)
    s = v.slice(2, 3)
    s.memset(0, 0xAB, 3)
    assert b == bytearray(2) + b"\xab" * 3 + bytearray(5)


@pytest.mark.parametrize("op", [
    lambda v: v.slice(0, 7),
    lambda v: v.slice(7, 0),
    lambda v: v.slice(-1, 2),
    lambda v: v.slice(2, -1),
    lambda v: v.copy_to(5, 2),
    lambda v: v.memset(3, 0, 4),
    lambda v: v.copy_from(5, b"ab"),
    lambda v: v.copy_from(-1, b"a"),
    lambda v: IOVector().concat(v, 4, 3),
    lambda v: v.memset(0, 256, 1),
    lambda v: v.memset(0, -1, 1),
])
def test_bounds_errors(op):
    v = vec_of(bytearray(b"abc"), bytearray(b"def"))
    with pytest.raises(ValueError):
        op(v)
    assert v.to_bytes() == b"abcdef"        # nothing partially written


def test_readonly_writes_raise_without_partial_write():
    rw = bytearray(b"xxx")
    v = vec_of(rw, b"yyy")
    assert not v.writable
    with pytest.raises(BufferError):
        v.copy_from(1, b"1234")
    with pytest.raises(BufferError):
        v.memset(0, 0, 6)
    assert rw == bytearray(b"xxx")
    v.copy_from(0, b"12")                  # only the writable part: fine
    v.memset(2, ord("z"), 1)
    assert v.to_bytes() == b"12zyyy"
    ro = v.buffers()[1]
    assert ro.readonly
    with pytest.raises(TypeError):
        ro[0] = 1
    v.reset()
    assert v.writable and v.size == 0 and v.niov == 0


def test_memset_and_is_zero_across_entries():
    bufs = [bytearray(b"\x01" * n) for n in (1, 5, 4096, 3)]
    v = vec_of(*bufs)
    assert not v.is_zero()
    v.memset(0, 0, v.size)
    assert v.is_zero()
    assert all(b == bytearray(len(b)) for b in bufs)
    for pos in (0, 1, 5, 6, 3000, v.size - 1):
        v.memset(pos, 7, 1)
        assert not v.is_zero(), pos
        assert v.copy_to(pos, 1) == b"\x07"
        v.memset(pos, 0, 1)
        assert v.is_zero()
    v.memset(4, 0xFF, 4)
    assert v.to_bytes()[3:9] == b"\x00\xff\xff\xff\xff\x00"


def test_copy_from_overlapping_own_memory():
    b = bytearray(b"0123456789")
    v = IOVector(b)
    assert v.copy_from(2, memoryview(b)[0:5]) == 5
    assert b == bytearray(b"0101234789")


def test_buffers_are_exact_views():
    b1, b2 = bytearray(b"hello"), bytearray(b"world")
    v = vec_of(b1, b2).slice(3, 4)
    mvs = v.buffers()
    assert [bytes(m) for m in mvs] == [b"lo", b"wo"]
    assert mvs[0].format == "B" and mvs[0].nbytes == 2
    mvs[1][0] = ord("W")
    assert b2 == bytearray(b"World")


def test_repr_and_types():
    assert "niov=1" in repr(IOVector(b"x"))
    assert isinstance(IOVector(b"x").to_bytes(), bytes)


def test_large_copies_take_the_gil_free_path_and_stay_correct():
    # >= 64 KiB copies run without the GIL; check them across buffer boundaries
    import os
    from pyrep._core.iovec import IOVector
    bufs = [bytearray(n) for n in (70000, 1, 200000, 65536)]
    v = IOVector()
    for b in bufs:
        v.add(b)
    data = os.urandom(v.size - 10)
    assert v.copy_from(5, data) == len(data)
    assert v.copy_to(5, len(data)) == data
    assert v.to_bytes()[5:-5] == data
    v.memset(3, 0xAB, 300000)
    expect = bytearray(5) + bytearray(data) + bytearray(5)
    expect[3:300003] = b"\xab" * 300000
    assert v.to_bytes() == bytes(expect)
    assert b"".join(bufs) == bytes(expect)
