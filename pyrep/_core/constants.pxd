# cython: language_level=3
"""Constants the Cython modules share: one declaration each, ``cimport``-ed where needed.

Request flags mirror ``pyrep.constants`` (the Python side's source of truth);
``tests/core/test_constants_pxd.py`` checks the two agree.
"""

cdef enum:
    REQ_FUA = 0x1               # pyrep.constants.REQ_FUA
    REQ_MAY_UNMAP = 0x2         # pyrep.constants.REQ_MAY_UNMAP
    REQ_NO_FALLBACK = 0x4       # pyrep.constants.REQ_NO_FALLBACK
    REQ_WRITE_UNCHANGED = 0x8   # pyrep.constants.REQ_WRITE_UNCHANGED
    REQ_SERIALISING = 0x10      # pyrep.constants.REQ_SERIALISING
