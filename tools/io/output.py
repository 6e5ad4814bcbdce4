"""qemu-io's output: sizes as it prints them, the per-request report, the hex dump of ``read -v``."""


def cvtstr(value):
    """qemu-io's cvtstr: ``64 KiB``, ``53.296 MiB``, ``32 bytes``."""
    for shift, suffix in ((60, " EiB"), (50, " PiB"), (40, " TiB"), (30, " GiB"), (20, " MiB"), (10, " KiB")):
        if value >= (1 << shift):
            s = "%.3f" % (value / (1 << shift))
            if s.endswith(".000"):
                s = s[:-4]
            return s + suffix
    s = "%.3f" % value
    if s.endswith(".000"):
        s = s[:-4]
    return s + " bytes"


def report(verb, done, total, offset, secs, cnt=1):
    """The two lines qemu-io prints after a request: what was done, then the rate."""
    print(f"{verb} {done}/{total} bytes at offset {offset}")
    secs = max(secs, 1e-9)
    print(f"{cvtstr(done)}, {cnt} ops; {'%05.2f' % secs} sec ({cvtstr(done / secs)}/sec and "
          f"{cnt / secs:.4f} ops/sec)")


def dump_buffer(buf, offset):
    """``read -v``: 16 bytes a line, hex then printable characters."""
    for i in range(0, len(buf), 16):
        chunk = buf[i:i + 16]
        hexs = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        print(f"{offset + i:08x}:  {hexs:<47}  {text}")
