"""``blkdebug``: a fault-injection filter for reliability tests.

Rules name an operation (read, write, zero, discard, flush, any), the byte
range a request must touch, the errno to fail with, whether to fire once,
and how many matching requests to let pass first. A rule with ``delay``
(seconds) holds matching requests that long before they go on (or fail, if
it also has an errno): races in tests become reproducible. A rule with ``hold`` holds matching
requests until :meth:`Rule.release` (at most ``HOLD_LIMIT`` seconds, then they fail with ETIMEDOUT):
a test then knows a request is in flight (``rule.held``) for as long as it needs. Rules can also be added
and cleared at run time with :func:`pyrep.inject_error` and
:func:`pyrep.clear_errors`. Everything else is forwarded to ``file``.
"""
import errno as _errno
import threading
import time

from pyrep.driver import BlockDriver
from pyrep.errors import BlockError, OptionError, errno_from
from pyrep.options import Opt, parse_bool, parse_size

__all__ = ["BlkdebugDriver", "Rule"]

_OPS = ("read", "write", "zero", "discard", "flush", "any")
_RULE_KEYS = {"op", "errno", "offset", "length", "once", "after", "delay", "hold"}
HOLD_LIMIT = 60.0       # a held request never waits longer: a test that forgot to release fails, not hangs


class Rule:
    """One injected error: fail requests of ``op`` touching ``[offset, offset+length)``."""

    __slots__ = ("op", "errno", "offset", "length", "once", "after", "delay", "seen", "fired", "hold", "held",
                 "_released", "_cond")

    def __init__(self, op="any", errno="EIO", offset=0, length=None, once=False, after=0, delay=None,
                 hold=False, where="inject-error"):
        if op not in _OPS:
            raise OptionError(f"blkdebug: {where}.op: expected one of {', '.join(_OPS)}, got {op!r}")
        self.op = op
        if delay is not None:
            try:
                delay = float(delay)
            except (TypeError, ValueError):
                raise OptionError(f"blkdebug: {where}.delay: expected seconds, got {delay!r}") from None
            if not 0 <= delay <= 60:
                raise OptionError(f"blkdebug: {where}.delay: expected 0 to 60 seconds, got {delay}")
        self.delay = delay
        try:
            # a delay rule without an explicit errno only delays
            self.errno = None if errno is None else errno_from(errno)
        except OptionError as e:
            raise OptionError(f"blkdebug: {where}.errno: {e}") from None
        self.offset = parse_size(offset, f"blkdebug: {where}.offset")
        self.length = None if length is None else parse_size(length, f"blkdebug: {where}.length")
        self.once = parse_bool(once, f"blkdebug: {where}.once")
        self.after = parse_size(after, f"blkdebug: {where}.after")
        self.hold = parse_bool(hold, f"blkdebug: {where}.hold")
        self.seen = 0
        self.fired = 0
        self.held = 0                       # requests waiting for release() right now
        self._released = False
        self._cond = threading.Condition()

    def release(self):
        """Let every request this rule holds (and every later one) go on."""
        with self._cond:
            self._released = True
            self._cond.notify_all()

    def wait_held(self, n=1, timeout=HOLD_LIMIT):
        """Wait until ``n`` requests are held; True if they are."""
        with self._cond:
            return self._cond.wait_for(lambda: self.held >= n, timeout)

    def _hold(self):
        with self._cond:
            self.held += 1
            self._cond.notify_all()
            try:
                if not self._cond.wait_for(lambda: self._released, HOLD_LIMIT):
                    raise BlockError(_errno.ETIMEDOUT, f"blkdebug: request held {HOLD_LIMIT} s and never released")
            finally:
                self.held -= 1

    def matches(self, op, offset, length):
        if self.op != "any" and self.op != op:
            return False
        if op == "flush":
            return True
        end = None if self.length is None else self.offset + self.length
        return offset + length > self.offset and (end is None or offset < end)

    def __repr__(self):
        return (f"Rule(op={self.op!r}, errno={self.errno}, offset={self.offset}, length={self.length}, "
                f"once={self.once}, after={self.after})")


class BlkdebugDriver(BlockDriver):
    format_name = "blkdebug"
    is_filter = True
    options = (
        Opt("file", "child", required=True, help="the node to forward to"),
        Opt("inject-error", "list", default=(), help="rules: op, errno, offset, length, once, after"),
        Opt("align", "size", default=1, help="request alignment to declare (tests the node layer's padding)"),
    )

    def open(self, opts):
        self.file = self.node.open_child(opts, "file", role="file")
        self._lock = threading.Lock()
        self.rules = []
        for i, spec in enumerate(opts.get("inject-error") or ()):
            where = f"{self.node.option_prefix}inject-error.{i}"
            if not isinstance(spec, dict):
                raise OptionError(f"blkdebug: {where}: expected a dict of op/errno/offset/length/once/after")
            unknown = set(spec) - _RULE_KEYS
            if unknown:
                raise OptionError(f"blkdebug: unknown option '{where}.{sorted(unknown)[0]}' "
                                  f"(rule keys: {', '.join(sorted(_RULE_KEYS))})")
            if "delay" in spec and "errno" not in spec:
                spec = dict(spec, errno=None)
            self.rules.append(Rule(where=where, **spec))
        align = opts["align"]
        if align & (align - 1):
            raise OptionError(f"blkdebug: option '{self.node.option_prefix}align' must be a power of two, got {align}")
        self.request_alignment = align

    def add_rule(self, rule):
        with self._lock:
            self.rules.append(rule)

    def clear_rules(self):
        with self._lock:
            rules, self.rules = self.rules, []
        for rule in rules:
            rule.release()              # nothing stays held by a rule nobody can reach any more

    def _check(self, op, offset, length):
        if not self.rules:
            return
        delay, fail, holds = 0.0, None, []
        with self._lock:
            for rule in list(self.rules):
                if not rule.matches(op, offset, length):
                    continue
                rule.seen += 1
                if rule.seen <= rule.after:
                    continue
                rule.fired += 1
                if rule.once:
                    self.rules.remove(rule)
                delay = max(delay, rule.delay or 0.0)
                if rule.hold:
                    holds.append(rule)
                if rule.errno is not None:
                    fail = rule
                    break
        if delay:
            time.sleep(delay)  # outside the lock: other requests keep flowing
        for rule in holds:
            rule._hold()
        if fail is not None:
            raise BlockError(fail.errno, f"blkdebug: injected error on {op} at {offset} "
                                         f"(+{length}) of node '{self.node.name}'")

    def preadv(self, offset, length, iov):
        self._check("read", offset, length)
        return self.file.preadv(offset, length, iov)

    def pwritev(self, offset, length, iov, flags=0):
        self._check("write", offset, length)
        return self.file.pwritev(offset, length, iov, flags)

    def pwrite_zeroes(self, offset, length, flags=0):
        self._check("zero", offset, length)
        return self.file.pwrite_zeroes(offset, length, flags)

    def pdiscard(self, offset, length):
        self._check("discard", offset, length)
        return self.file.pdiscard(offset, length)

    def flush(self):
        self._check("flush", 0, 0)
        return self.file.flush()

    def make_empty(self):
        return self.file.node.make_empty()


def inject_error(node_name, op="write", errno="EIO", offset=0, length=None, once=False, after=0, delay=None,
                 hold=False):
    """Add a rule to the blkdebug node ``node_name`` at run time; returns the Rule.

    With ``delay`` (seconds) and ``errno=None`` matching requests are only held up; with ``hold`` they
    wait for ``rule.release()``."""
    driver = _blkdebug(node_name)
    rule = Rule(op=op, errno=errno, offset=offset, length=length, once=once, after=after, delay=delay, hold=hold)
    driver.add_rule(rule)
    return rule


def clear_errors(node_name):
    """Remove every rule of the blkdebug node ``node_name``."""
    _blkdebug(node_name).clear_rules()


def _blkdebug(node_name):
    from pyrep.graph import lookup
    node = lookup(node_name)
    if not isinstance(node.driver, BlkdebugDriver):
        raise OptionError(f"node '{node_name}' is a '{node.drv.format_name}' node, not blkdebug")
    return node.driver
