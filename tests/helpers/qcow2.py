"""Builders of the qcow2 tests (real qemu-img / qemu-io on tmp_path images: see ``helpers.referees``)."""
import pyrep


def open_q(path, read_only=False, **extra):
    opts = {"driver": "qcow2", "discard": "unmap", "file": {"driver": "file", "filename": str(path)}}
    opts.update(extra)
    return pyrep.open_backend(opts, read_only=read_only)


def random_model_op(blk, model, rng, max_len, p_write, p_zero, discard_granule):
    """One random write (a fill byte), write-zeroes or discard on ``blk``, applied to the bytearray
    ``model`` too: probability ``p_write`` of a write, ``p_zero`` of zeroes, else a discard, which
    only drops whole ``discard_granule`` blocks (they then read as zeroes: no backing)."""
    size = len(model)
    off = rng.randrange(size - 1)
    n = rng.randrange(1, min(max_len, size - off) + 1)
    r = rng.random()
    if r < p_write:
        data = bytes([rng.randrange(1, 256)]) * n
        blk.pwrite(off, data)
        model[off:off + n] = data
    elif r < p_write + p_zero:
        blk.pwrite_zeroes(off, n, may_unmap=rng.random() < 0.5)
        model[off:off + n] = bytes(n)
    else:
        blk.pdiscard(off, n)
        a, b = -(-off // discard_granule) * discard_granule, (off + n) // discard_granule * discard_granule
        if b > a:
            model[a:b] = bytes(b - a)
