"""Permissions and op blockers between nodes and their users (QEMU's permission code in block.c).

Every user of a node holds a :class:`~pyrep.node.Child` edge that says what it
takes (``perm``) and what it lets others take (``shared``). Adding or changing
an edge checks it against the node's other parents (:func:`check_conflicts`)
and then recomputes, down the graph, what each node takes on its children
(:func:`refresh_perms`); a driver's ``check_perm`` (file locks) runs for every
node before any ``set_perm``. Op blockers are per node: a job or replication
blocks ops (``"resize"``, ``"commit-source"``...) with a reason that the
refusal names.

Works on nodes through their public attributes only (``parents``, ``children``,
``driver``, ``opts``): this module sits below the node class and never imports it.
"""
from .constants import PERM_ALL, perm_names
from .errors import PermissionConflict

__all__ = ["OPS", "cumulative_perm", "check_conflicts", "refresh_perms", "block_op", "unblock_op", "check_op"]

# every op a blocker can stop (QEMU's BlockOpType)
OPS = ("backup-source", "backup-target", "change", "commit-source", "commit-target", "dataplane", "drive-del",
       "eject", "external-snapshot", "internal-snapshot", "internal-snapshot-delete", "mirror-source",
       "mirror-target", "resize", "stream", "replace", "graph-mod")


def cumulative_perm(node):
    """``(perm, shared)``: what the parents of ``node`` together take and share."""
    perm, shared = 0, PERM_ALL
    for c in node.parents:
        perm |= c.perm
        shared &= c.shared
    if node.opts.get("force-share"):
        shared = PERM_ALL
    return perm, shared


def check_conflicts(node, child, perm, shared):
    """Raise :class:`PermissionConflict` if edge ``child`` taking ``perm`` and sharing ``shared`` on
    ``node`` clashes with another parent edge of ``node``; the message names both users. Nothing
    changes: callers check first, then commit the edge (a job retargeting edges checks each one)."""
    for other in node.parents:
        if other is child:
            continue
        if perm & ~other.shared:
            raise PermissionConflict(
                f"permission conflict on node '{node.name}': {child.user} wants '{perm_names(perm & ~other.shared)}' "
                f"which {other.user} does not share")
        if other.perm & ~shared:
            raise PermissionConflict(
                f"permission conflict on node '{node.name}': {child.user} does not share "
                f"'{perm_names(other.perm & ~shared)}' which {other.user} holds")


def refresh_perms(node):
    """Recompute the permissions ``node`` takes on its children, down the graph.

    Edges are updated while planning (a conflict stops the walk); drivers'
    check_perm (file locks) all run before any set_perm. A caller that gets
    an error restores its own change and calls this again, which recomputes
    every edge from the restored state."""
    plan = []
    _plan_perms(node, plan, set())
    drivers = [(n.driver, perm, shared) for n, perm, shared in plan if n.driver is not None]
    for driver, perm, shared in drivers:
        driver.check_perm(perm, shared)
    for driver, perm, shared in drivers:
        driver.set_perm(perm, shared)


def _plan_perms(node, plan, seen):
    if id(node) in seen:
        return
    seen.add(id(node))
    perm, shared = cumulative_perm(node)
    plan.append((node, perm, shared))
    if node.driver is None:
        return
    for child in node.children.values():
        cperm, cshared = node.driver.child_perm(child.role, perm, shared)
        if (cperm, cshared) != (child.perm, child.shared):
            check_conflicts(child.node, child, cperm, cshared)
            child.perm, child.shared = cperm, cshared
        _plan_perms(child.node, plan, seen)


def add_parent(node, child, perm, shared):
    """Register ``child`` as a parent edge of ``node`` taking ``perm``/``shared``; raise on conflict
    (then nothing changed)."""
    check_conflicts(node, child, perm, shared)
    child.perm, child.shared = perm, shared
    node.parents.append(child)
    try:
        refresh_perms(node)
    except BaseException:
        node.parents.remove(child)
        refresh_perms(node)
        raise


def remove_parent(node, child):
    """Drop parent edge ``child`` of ``node`` (if it is one); what the node takes below may shrink."""
    if child in node.parents:
        node.parents.remove(child)
        try:
            refresh_perms(node)
        except PermissionConflict:
            pass


def update_parent_perm(node, child, perm, shared):
    """Change what ``child`` takes/shares on ``node``; on conflict nothing changes."""
    old = child.perm, child.shared
    check_conflicts(node, child, perm, shared)
    child.perm, child.shared = perm, shared
    try:
        refresh_perms(node)
    except BaseException:
        child.perm, child.shared = old
        refresh_perms(node)
        raise


# ------------------------------------------------------------------ op blockers

def block_op(node, op, reason):
    """Block ``op`` on ``node`` for ``reason`` (a description of the blocker, named by refusals)."""
    node.blockers.setdefault(op, []).append(reason)


def unblock_op(node, op, reason):
    reasons = node.blockers.get(op)
    if reasons and reason in reasons:
        reasons.remove(reason)
        if not reasons:
            del node.blockers[op]


def check_op(node, op):
    """Raise PermissionConflict if ``op`` is blocked on ``node``."""
    reasons = node.blockers.get(op)
    if reasons:
        raise PermissionConflict(f"node '{node.name}' is busy: '{op}' is blocked by {reasons[0]}")
