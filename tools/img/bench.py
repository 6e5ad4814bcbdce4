"""``pyrep-img bench``: run a simple image benchmark."""
import mmap
import threading
import time

from pyrep._core.iovec import IOVector
from pyrep.errors import Error

from ..opening import open_image
from . import args
from .common import cache_opts, qprint, size_arg, UsageError


def _int(text):
    return int(text, 0)


def add_arguments(s):
    """The command's options and operands."""
    s.add_argument("-c", dest="count", type=int, default=75000, metavar="COUNT",
                   help="number of requests (default 75000)")
    s.add_argument("-d", dest="depth", type=int, default=64, metavar="DEPTH",
                   help="requests in flight at once (default 64)")
    args.add_format(s)
    args.add_image_opts(s)
    s.add_argument("-s", dest="size", default="4096", metavar="BUFFER_SIZE",
                   help="bytes per request (default 4096)")
    s.add_argument("-S", dest="step", metavar="STEP_SIZE",
                   help="offset step between requests (default: the buffer size)")
    s.add_argument("-o", dest="offset", metavar="OFFSET", help="offset of the first request (default 0)")
    s.add_argument("-w", dest="write", action="store_true", help="write (default: read)")
    s.add_argument("-P", "--pattern", dest="pattern", type=_int, default=0, metavar="PATTERN",
                   help="byte value written by -w (default 0)")
    args.add_cache(s, default="writeback")
    s.add_argument("-n", dest="native", action="store_true", help="accepted for qemu-img compatibility (no effect)")
    s.add_argument("-i", dest="aio", metavar="AIO", help="accepted for qemu-img compatibility (no effect)")
    args.add_quiet(s)
    args.add_force_share(s)
    s.add_argument("--flush-interval", dest="flush_interval", type=int, default=0, metavar="N",
                   help="flush after every N requests (write tests)")
    s.add_argument("--no-drain", dest="no_drain", action="store_true",
                   help="flush without waiting for the requests in flight")
    s.add_argument("--threads", type=int, default=0,
                   help="pyrep only: worker threads for depth > 1 (default: depth, one per in-flight request)")
    s.add_argument("--path", choices=("backend", "node"), default="backend",
                   help="pyrep only: issue requests through the BlockBackend (default) or its root edge")
    args.add_filename(s)


def run(a):
    count = a.count
    depth = a.depth
    bufsize = size_arg(a.size, "buffer size")
    step = size_arg(a.step, "step size") if a.step is not None else 0
    offset = size_arg(a.offset, "offset") if a.offset is not None else 0
    pattern = a.pattern
    if count < 1:
        raise UsageError(f"Invalid request count specified: {count}")
    if depth < 1:
        raise UsageError(f"Invalid queue depth specified: {depth}")
    if bufsize < 1 or bufsize > (1 << 31):
        raise UsageError(f"Invalid buffer size specified: {a.size}")
    if a.flush_interval and a.flush_interval < depth:
        raise UsageError("Flush interval can't be smaller than depth")
    if a.flush_interval and not a.write:
        raise UsageError("--flush-interval is only available in write tests")
    if a.no_drain and not a.flush_interval:
        raise UsageError("--no-drain requires --flush-interval")
    if not step:
        step = bufsize
    cache = cache_opts(a.cache or "writeback")
    extra = None
    if a.native:
        extra = None  # aio=native has no meaning for pyrep: requests run on the caller's threads
    blk = open_image(a.filename, a.fmt, image_opts=a.image_opts, read_only=not a.write, cache=cache, force_share=a.force_share,
                     extra=extra)
    try:
        image_size = blk.length
        qprint(a.quiet, f"Sending {count} {'write' if a.write else 'read'} requests, {bufsize} bytes each, "
                        f"{depth} in parallel (starting at offset {offset}, step size {step})")
        if a.flush_interval:
            qprint(a.quiet, f"Sending flush every {a.flush_interval} requests")
        elapsed = run_bench(blk, count, depth, bufsize, step, offset, image_size, a.write, pattern,
                            a.flush_interval, a.path, a.threads)
        qprint(a.quiet, "Run completed in %.3f seconds." % elapsed)
    finally:
        blk.close()
    return 0


def _offsets(start, step, image_size, count, first, stride):
    """The offsets request i (i = first, first+stride, ...) uses: qemu's ``offset = (offset + step) % size``."""
    return [(start + i * step) % image_size for i in range(first, count, stride)]


def run_bench(blk, count, depth, bufsize, step, offset, image_size, write, pattern, flush_interval, path,
              threads=0):
    """Issue the requests; returns the elapsed seconds (setup excluded, as in qemu-img)."""
    # request function: the backend (public path) or its root edge (node graph, no in-flight gate)
    if path == "node":
        fn = blk.root.pwritev if write else blk.root.preadv
    else:
        fn = blk.pwritev if write else blk.preadv
    nthreads = min(threads or depth, depth, count)
    flush = blk.flush

    def worker(first, stride, out):
        # page-aligned (as qemu's qemu_blockalign): the kernel copies aligned buffers faster
        buf = mmap.mmap(-1, bufsize)
        if pattern:
            buf[:] = bytes([pattern & 0xff]) * bufsize
        iov = IOVector(buf)
        offs = _offsets(offset, step, image_size, count, first, stride)
        f = fn
        try:
            barrier.wait()
            if path == "node":
                n = bufsize
                if write:
                    for o in offs:
                        f(o, n, iov, 0)
                else:
                    for o in offs:
                        f(o, n, iov)
            elif flush_interval:
                done = 0
                for o in offs:
                    f(o, iov)
                    done += 1
                    if done % flush_interval == 0:
                        flush()
            else:
                for o in offs:
                    f(o, iov)
        except BaseException as e:  # noqa: BLE001
            out.append(e)

    errors = []
    barrier = threading.Barrier(nthreads + 1)
    if nthreads == 1:
        # depth 1: no thread at all, the loop runs here
        barrier = _NoBarrier()
        t0 = time.perf_counter()
        worker(0, 1, errors)
        if flush_interval:
            flush()
        t1 = time.perf_counter()
    else:
        # ``depth`` requests in flight: one thread per slot, request i goes to slot i % depth
        # (flush-interval then applies per slot, a close approximation of qemu's global count)
        threads = [threading.Thread(target=worker, args=(w, nthreads, errors), daemon=True)
                   for w in range(nthreads)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        if flush_interval:
            flush()
        t1 = time.perf_counter()
    if errors:
        e = errors[0]
        raise Error(f"Failed request: {e}")
    return t1 - t0


class _NoBarrier:
    def wait(self):
        pass
