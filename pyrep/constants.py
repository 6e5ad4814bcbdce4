"""Flags shared by the block layer (QEMU's names, our values)."""

# permissions a user of a node may take (and share with others)
PERM_CONSISTENT_READ = 0x01
PERM_WRITE = 0x02
PERM_WRITE_UNCHANGED = 0x04
PERM_RESIZE = 0x08
PERM_GRAPH_MOD = 0x10
PERM_ALL = 0x1F
PERM_NAMES = {
    PERM_CONSISTENT_READ: "consistent-read",
    PERM_WRITE: "write",
    PERM_WRITE_UNCHANGED: "write-unchanged",
    PERM_RESIZE: "resize",
    PERM_GRAPH_MOD: "graph-mod",
}


def perm_names(perm):
    """``"write, resize"`` for a permission mask."""
    names = [name for bit, name in PERM_NAMES.items() if perm & bit]
    return ", ".join(names) if names else "none"


def perm_from(value):
    """A permission mask from a mask, a name, a list of names, or "all"/"none"."""
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    mask = 0
    for name in value:
        if name == "all":
            mask |= PERM_ALL
            continue
        if name == "none":
            continue
        for bit, known in PERM_NAMES.items():
            if known == name:
                mask |= bit
                break
        else:
            from .errors import OptionError
            raise OptionError(f"unknown permission {name!r} (expected one of: {', '.join(PERM_NAMES.values())}, all, none)")
    return mask


# request flags
REQ_FUA = 0x1            # write: force unit access (data is stable when the call returns)
REQ_MAY_UNMAP = 0x2      # write_zeroes: the range may be deallocated
REQ_NO_FALLBACK = 0x4    # write_zeroes: fail with ENOTSUP rather than write explicit zeroes
REQ_WRITE_UNCHANGED = 0x8  # write: data is what the node already reads (copy-on-read, backup)
REQ_SERIALISING = 0x10   # internal: wait for and block overlapping requests

# block status flags (block_status result)
BS_DATA = 0x01           # reads return data from this node or below
BS_ZERO = 0x02           # reads return zeroes
BS_OFFSET_VALID = 0x04   # map offset is valid in the returned file node
BS_ALLOCATED = 0x08      # the content comes from this layer (not from backing)
BS_RECURSE = 0x10        # ask the returned file node for a more precise answer
BS_EOF = 0x20            # the range reaches the end of the node
