"""Option schemas and the three equivalent spellings of a node's options.

A node is described by nested dicts (``{"file": {"filename": "a"}}``), dotted
dicts (``{"file.filename": "a"}``), drive strings
(``"driver=raw,file.filename=a"``) or ``json:{...}`` pseudo-filenames. All of
them normalise to one nested dict, where dicts whose keys are ``0..n-1``
become lists (``children.0.driver=...``).

Each driver declares its options as a tuple of :class:`Opt`; :func:`validate`
converts and checks a nested dict against it, and every error names the
driver, the full key path and what was expected.
"""
import re

from .errors import OptionError

__all__ = ["Opt", "parse_drive", "flatten", "unflatten", "normalize", "validate", "parse_size",
           "parse_bool", "COMMON_OPTIONS"]

_SIZE_SUFFIX = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPE]?)(?:I?B)?\s*$", re.IGNORECASE)
_TRUE = {"on", "true", "yes", "1"}
_FALSE = {"off", "false", "no", "0"}


def parse_size(value, what="size"):
    """Bytes from an int or a string such as ``"64K"``, ``"1.5G"``, ``"512"``."""
    if isinstance(value, bool):
        raise OptionError(f"{what}: expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise OptionError(f"{what}: a size cannot be negative ({value})")
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            number, suffix = m.groups()
            size = float(number) * _SIZE_SUFFIX[suffix.upper()]
            if size.is_integer():
                return int(size)
            if "." not in number:
                return int(number) * _SIZE_SUFFIX[suffix.upper()]
            raise OptionError(f"{what}: {value!r} is not a whole number of bytes")
    raise OptionError(f"{what}: expected a size such as 65536, '64K' or '1G', got {value!r}")


def parse_bool(value, what="value"):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE:
        return True
    if isinstance(value, str) and value.lower() in _FALSE:
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise OptionError(f"{what}: expected on/off (or true/false), got {value!r}")


class Opt:
    """One option of a driver's schema (QEMU's QemuOptDesc).

    ``type`` is one of ``string``, ``bool``, ``number``, ``size``, ``enum``
    (``choices`` required), ``child`` (a dict of a child's options, a string
    naming an existing node or backend, or None), ``children`` (a list of
    those), ``list`` (a list of values or dicts) and ``any``.
    """

    __slots__ = ("name", "type", "default", "help", "required", "choices", "min", "max")
    TYPES = ("string", "bool", "number", "size", "enum", "child", "children", "list", "any")

    def __init__(self, name, type="string", default=None, help="", required=False, choices=None,
                 min=None, max=None):
        if type not in self.TYPES:
            raise ValueError(f"option {name!r}: unknown type {type!r}")
        if type == "enum" and not choices:
            raise ValueError(f"option {name!r}: enum needs choices")
        self.name, self.type, self.default, self.help = name, type, default, help
        self.required, self.choices, self.min, self.max = required, tuple(choices or ()), min, max

    def __repr__(self):
        return f"Opt({self.name!r}, {self.type!r})"

    def expected(self):
        if self.type == "enum":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        return {
            "string": "a string", "bool": "on/off", "number": "a number", "size": "a size such as '64K'",
            "child": "a dict of options or the name of a node", "children": "a list of child options",
            "list": "a list", "any": "a value",
        }[self.type]

    def convert(self, value, where):
        """The value converted to this option's type; ``where`` names driver and key for errors."""
        t = self.type
        if t == "string":
            if isinstance(value, str):      # as QAPI: 123 is not a filename, and saying so beats guessing
                return value
        elif t == "bool":
            return parse_bool(value, where)
        elif t == "number":
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return self._bounded(value, where)
            if isinstance(value, str):
                try:
                    return self._bounded(int(value, 0), where)
                except ValueError:
                    try:
                        return self._bounded(float(value), where)
                    except ValueError:
                        pass
        elif t == "size":
            try:
                return self._bounded(parse_size(value), where)
            except OptionError:
                raise OptionError(f"{where}: expected a size such as 65536, '64K' or '1G', got {value!r}") from None
        elif t == "enum":
            if isinstance(value, bool):
                value = "on" if value else "off"
            if str(value) in self.choices:
                return str(value)
        elif t == "child":
            if value is None or isinstance(value, (dict, str)):
                return value
        elif t in ("children", "list"):
            if isinstance(value, dict):
                value = _as_list(value)
            if isinstance(value, (list, tuple)):
                if t == "children" and not all(isinstance(v, (dict, str)) for v in value):
                    raise OptionError(f"{where}: each child must be a dict of options or a node name")
                return list(value)
        else:
            return value
        raise OptionError(f"{where}: expected {self.expected()}, got {value!r}")

    def _bounded(self, value, where):
        if self.min is not None and value < self.min:
            raise OptionError(f"{where}: {value} is below the minimum {self.min}")
        if self.max is not None and value > self.max:
            raise OptionError(f"{where}: {value} is above the maximum {self.max}")
        return value


# Options every node accepts, whatever its driver (QEMU's bdrv_runtime_opts).
COMMON_OPTIONS = (
    Opt("driver", "string", required=True, help="the driver's name"),
    Opt("node-name", "string", help="the node's name (auto-named when absent)"),
    Opt("read-only", "bool", default=False, help="open read-only"),
    Opt("auto-read-only", "bool", default=False, help="fall back to read-only if read-write fails"),
    Opt("discard", "enum", default="ignore", choices=("ignore", "off", "unmap", "on"),
        help="pass discard requests down (unmap) or ignore them"),
    Opt("detect-zeroes", "enum", default="off", choices=("off", "on", "unmap"),
        help="turn writes of zeroes into zero writes"),
    Opt("cache", "any", help="cache.direct / cache.no-flush (accepted, no-flush honoured)"),
    Opt("force-share", "bool", default=False, help="share every permission (read-only use)"),
)
_COMMON_NAMES = {o.name for o in COMMON_OPTIONS}


def validate(schema, opts, driver, prefix=""):
    """Convert ``opts`` (a nested dict) against ``schema`` plus the common options.

    Returns a new dict holding every declared option (defaults filled in;
    absent options without default are left out so ``"backing" in opts``
    distinguishes absent from None). Raises :class:`OptionError` naming the
    driver and the full key path.
    """
    declared = {o.name: o for o in COMMON_OPTIONS}
    for o in schema:
        declared[o.name] = o
    out = {}
    for key, value in opts.items():
        opt = declared.get(key)
        where = f"{driver}: option '{prefix}{key}'"
        if opt is None:
            known = ", ".join(sorted(n for n in declared if n not in _COMMON_NAMES)) or "none"
            raise OptionError(f"{driver}: unknown option '{prefix}{key}' (options of {driver}: {known})")
        out[key] = opt.convert(value, where)
    for opt in declared.values():
        if opt.name not in out:
            if opt.required:
                raise OptionError(f"{driver}: option '{prefix}{opt.name}' is required ({opt.expected()})")
            if opt.default is not None:
                out[opt.name] = opt.default
    cache = out.get("cache")
    if cache is not None:
        if not isinstance(cache, dict) or set(cache) - {"direct", "no-flush"}:
            raise OptionError(f"{driver}: option '{prefix}cache' takes only cache.direct and cache.no-flush")
        out["cache"] = {k: parse_bool(v, f"{driver}: option '{prefix}cache.{k}'") for k, v in cache.items()}
    return out


# ---------------------------------------------------------------- spellings

def parse_drive(text):
    """A drive string (``key=value,...``, ``,,`` for a literal comma) or a
    ``json:{...}`` pseudo-filename, as a dotted dict."""
    if not isinstance(text, str):
        raise OptionError(f"drive string: expected a string, got {type(text).__name__}")
    if text.startswith("json:"):
        import json     # only json: filenames need it: not imported at start-up
        try:
            nested = json.loads(text[5:])
        except ValueError as e:
            raise OptionError(f"json: pseudo-filename is not valid JSON: {e}") from None
        if not isinstance(nested, dict):
            raise OptionError("json: pseudo-filename must hold a JSON object")
        return flatten(nested)
    out = {}
    for item in _split_commas(text):
        if not item:
            raise OptionError(f"drive string {text!r}: empty option (stray comma?)")
        key, eq, value = item.partition("=")
        if not eq:
            raise OptionError(f"drive string {text!r}: {item!r} has no '=' (expected key=value)")
        key = key.strip()
        if not key:
            raise OptionError(f"drive string {text!r}: {item!r} has an empty key")
        if key in out:
            raise OptionError(f"drive string {text!r}: key '{key}' given twice")
        out[key] = value
    return out


def _split_commas(text):
    items, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    items.append("".join(cur))
    return items


def flatten(nested, prefix=""):
    """A dotted dict from a nested one (lists become ``key.0``, ``key.1``...).

    Input may mix nested and dotted keys; a key given twice is an error."""
    out = {}
    _flatten_into(out, nested, prefix)
    return out


def _flatten_into(out, value, prefix):
    if isinstance(value, dict):
        if not value and prefix:
            out[prefix[:-1]] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                k = str(k)
            if isinstance(v, (dict, list, tuple)) and (v or isinstance(v, dict)):
                _flatten_into(out, v, f"{prefix}{k}.")
            else:
                _put(out, prefix + k, v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if isinstance(v, (dict, list, tuple)):
                _flatten_into(out, v, f"{prefix}{i}.")
            else:
                _put(out, f"{prefix}{i}", v)
    else:
        raise OptionError(f"options: expected a dict, got {type(value).__name__}")


def _put(out, key, value):
    if key in out:
        raise OptionError(f"options: key '{key}' given twice")
    out[key] = value


def unflatten(dotted):
    """A nested dict from a dotted one; numbered keys ``0..n-1`` become lists."""
    root = {}
    for key, value in dotted.items():
        parts = key.split(".")
        node = root
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise OptionError(f"options: '{'.'.join(parts[:i + 1])}' is both a value ({nxt!r}) and a group "
                                  f"(by '{key}')")
            node = nxt
        last = parts[-1]
        if last in node:
            if isinstance(node[last], dict) and not (isinstance(value, dict) and not value):
                raise OptionError(f"options: '{key}' is both a group and a value ({value!r})")
            if not (isinstance(value, dict) and not value):
                raise OptionError(f"options: key '{key}' given twice")
            continue
        node[last] = value
    return _listify(root)


def _listify(value):
    if isinstance(value, dict):
        value = {k: _listify(v) for k, v in value.items()}
        return _as_list(value, strict=False)
    return value


def _as_list(d, strict=True):
    """``{"0": a, "1": b}`` → ``[a, b]``; other dicts unchanged (or an error if strict)."""
    if d and all(isinstance(k, str) and k.isdigit() for k in d):
        idx = sorted(int(k) for k in d)
        if idx == list(range(len(d))):
            return [d[str(i)] for i in idx]
        if strict:
            raise OptionError(f"options: list indexes must run 0..{len(d) - 1}, got {sorted(d)}")
    return d


def normalize(options):
    """One nested dict from any spelling: nested/dotted/mixed dict, drive string or ``json:`` string."""
    if isinstance(options, str):
        options = parse_drive(options)
    elif not isinstance(options, dict):
        raise OptionError(f"options: expected a dict or a drive string, got {type(options).__name__}")
    return unflatten(flatten(options))
