# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Helpers of the image copy engine (``pyrep-img convert``), with the GIL released.

``nonzero_runs(buf, length, gran)`` finds the parts of a buffer that are not zero, granule by granule:
a granule holding data is usually recognised by its first bytes (the scan of a granule stops at its
first non-zero word), so data costs one cache line per granule and only zero granules are read whole.
"""
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from libc.stdint cimport uint64_t
from libc.string cimport memcmp, memcpy


cdef inline bint _granule_zero(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i = 0
    cdef uint64_t w
    # head word by word (data is almost always caught here), then memcmp against the first 64 bytes
    while i < n and i < 64:
        if n - i >= 8:
            memcpy(&w, p + i, 8)        # an unaligned load, without aliasing trouble
            if w:
                return False
            i += 8
        else:
            if p[i]:
                return False
            i += 1
    if i >= n:
        return True
    # p[0:i] is zero: p[i:n] is zero iff it equals the bytes 64 before it (sliding comparison)
    return memcmp(p, p + 64, n - 64) == 0


def nonzero_runs(buf, Py_ssize_t length, Py_ssize_t gran):
    """[(start, length)] of the granules of ``buf[:length]`` holding a non-zero byte, adjacent ones merged
    (granules are counted from the start of ``buf``; the last one may be short)."""
    cdef Py_buffer view
    cdef const unsigned char *p
    cdef Py_ssize_t pos = 0, c, start = -1
    cdef bint nz
    if gran <= 0:
        raise ValueError("nonzero_runs: granularity must be positive")
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    runs = []
    try:
        if length > view.len:
            raise ValueError(f"nonzero_runs: length {length} is past the end of the buffer ({view.len} bytes)")
        p = <const unsigned char *>view.buf
        while pos < length:
            c = gran if gran < length - pos else length - pos
            with nogil:
                # scan on while the state does not change (one GIL round trip per run, not per granule)
                while True:
                    nz = not _granule_zero(p + pos, c)
                    if nz != (start >= 0):
                        break
                    pos += c
                    if pos >= length:
                        break
                    c = gran if gran < length - pos else length - pos
            if pos >= length:
                break
            if nz:
                start = pos
            else:
                runs.append((start, pos - start))
                start = -1
            pos += c
        if start >= 0:
            runs.append((start, length - start))
    finally:
        PyBuffer_Release(&view)
    return runs

