"""One QMP message in, one reply out: parse → validate → call → reply. No I/O.

The steps, each a small function:

- :func:`check_message`: the input must be an object with ``execute`` (a
  string), optional ``arguments`` (an object) and ``id`` (anything, echoed);
- :func:`check_args`: the arguments against the command's :class:`Opt`
  schema, with QEMU's messages naming the argument by its path
  (``Parameter 'addr.path' is missing``);
- the handler runs; its value becomes ``{"return": ...}``; a
  :class:`~pyrep.qmp.registry.QMPError` or a :class:`pyrep.Error` becomes
  ``{"error": {"class": ..., "desc": ...}}`` (pyrep errors are
  ``GenericError``, as QEMU reports block-layer errors).

:func:`event` builds an event message (``event``, ``data``, ``timestamp``).
"""
import time

from ..errors import Error
from .registry import ArgError, QMPError

__all__ = ["dispatch", "check_message", "check_args", "error_reply", "event", "NEGOTIATION_ONLY"]

# the QAPI type names QEMU uses in "expected:" messages
_JSON_TYPE = {"string": "string", "bool": "boolean", "number": "integer", "size": "integer", "enum": "string",
              "child": "object", "children": "array", "list": "array"}


def error_reply(desc, error_class="GenericError", msg_id=None, has_id=False):
    reply = {"error": {"class": error_class, "desc": desc}}
    if has_id:
        reply["id"] = msg_id
    return reply


def event(name, data=None):
    """An event message stamped with the current time (QEMU's shape)."""
    now = time.time()
    msg = {"event": name, "data": data if data is not None else {},
           "timestamp": {"seconds": int(now), "microseconds": int((now % 1) * 1_000_000)}}
    return msg


def check_message(msg):
    """``(command name, arguments, id, has_id)`` from an input message; QMPError if it is malformed."""
    if not isinstance(msg, dict):
        raise QMPError("QMP input must be a JSON object")
    for key in msg:
        if key not in ("execute", "exec-oob", "arguments", "id", "control"):
            raise QMPError(f"QMP input member '{key}' is unexpected")
    if "execute" in msg and "exec-oob" in msg:
        raise QMPError("QMP input must not have both 'execute' and 'exec-oob'")
    name = msg.get("execute", msg.get("exec-oob"))
    if name is None:
        raise QMPError("QMP input lacks member 'execute'")
    if not isinstance(name, str):
        raise QMPError("QMP input member 'execute' must be a string")
    args = msg.get("arguments", {})
    if not isinstance(args, dict):
        raise QMPError("QMP input member 'arguments' must be an object")
    return name, args, msg.get("id"), "id" in msg


def check_args(schema, args, prefix=""):
    """The arguments converted against ``schema`` (a tuple of Opt), defaults filled in.

    Raises :class:`ArgError` naming the argument as QEMU does."""
    declared = {o.name: o for o in schema}
    out = {}
    for key, value in args.items():
        opt = declared.get(key)
        if opt is None:
            raise ArgError(f"Parameter '{prefix}{key}' is unexpected")
        out[key] = _check_value(opt, value, prefix + key)
    for opt in schema:
        if opt.name not in out:
            if opt.required:
                raise ArgError(f"Parameter '{prefix}{opt.name}' is missing")
            if opt.default is not None:
                out[opt.name] = opt.default
    return out


def _check_value(opt, value, where):
    t = opt.type
    ok = {
        "string": lambda v: isinstance(v, str),
        "bool": lambda v: isinstance(v, bool),
        "number": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "enum": lambda v: isinstance(v, str),
        "child": lambda v: isinstance(v, (dict, str)),
        "children": lambda v: isinstance(v, list),
        "list": lambda v: isinstance(v, list),
        "any": lambda v: True,
    }[t](value)
    if not ok:
        raise ArgError(f"Invalid parameter type for '{where}', expected: {_JSON_TYPE[t]}")
    if t == "enum" and value not in opt.choices:
        raise ArgError(f"Parameter '{where}' does not accept value '{value}'")
    if t in ("number", "size"):
        if opt.min is not None and value < opt.min:
            raise ArgError(f"Parameter '{where}' expects a value of at least {opt.min}")
        if opt.max is not None and value > opt.max:
            raise ArgError(f"Parameter '{where}' expects a value of at most {opt.max}")
    return value


NEGOTIATION_ONLY = "Expecting capabilities negotiation with 'qmp_capabilities'"


def dispatch(table, ctx, msg, negotiated):
    """The reply to ``msg`` (a decoded JSON value) in a session that has (or has not yet)
    completed capabilities negotiation. ``ctx`` is handed to the handler unchanged."""
    try:
        name, args, msg_id, has_id = check_message(msg)
    except QMPError as e:
        msg_id = msg.get("id") if isinstance(msg, dict) else None
        has_id = isinstance(msg, dict) and "id" in msg
        return error_reply(e.desc, e.error_class, msg_id, has_id)
    if "exec-oob" in msg:
        return error_reply(f"The command {name} does not support OOB", "GenericError", msg_id, has_id)
    command = table.get(name)
    if not negotiated and (command is None or not command.before_negotiation):
        return error_reply(NEGOTIATION_ONLY, "CommandNotFound", msg_id, has_id)
    if command is None:
        return error_reply(f"The command {name} has not been found", "CommandNotFound", msg_id, has_id)
    try:
        checked = dict(args) if command.boxed else check_args(command.args, args)
        value = command.handler(ctx, checked)
    except QMPError as e:
        return error_reply(e.desc, e.error_class, msg_id, has_id)
    except Error as e:
        return error_reply(str(e), "GenericError", msg_id, has_id)
    except OSError as e:            # e.g. a socket that cannot be bound
        return error_reply(f"{name}: {e.strerror or e}", "GenericError", msg_id, has_id)
    except Exception as e:  # noqa: BLE001 - a handler's bug must not end the session
        return error_reply(f"{name}: internal error: {type(e).__name__}: {e}", "GenericError", msg_id, has_id)
    reply = {"return": {} if value is None else value}
    if has_id:
        reply["id"] = msg_id
    return reply
