"""Layers depend one way and modules keep their private names to themselves.

Both tests read the source (``ast`` for .py, the import lines of .pyx) of
``pyrep/``, ``drivers/`` (installed as ``pyrep.drivers``) and ``tools/``
(``pyrep.tools``), counting imports inside functions too: an import
dodged into a function body is still a dependency.
"""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = {"pyrep": "pyrep", "drivers": "pyrep.drivers", "tools": "pyrep.tools"}

# attributes that carry an underscore by the standard library's convention, not as private names
STDLIB_UNDERSCORE_API = {"_replace", "_asdict", "_fields", "_make", "_exit", "_getframe"}


def _sources():
    """{module name: (path, is_package)} for every .py/.pyx of the three trees."""
    mods = {}
    for top, pkg in PACKAGES.items():
        base = os.path.join(ROOT, top)
        for dirpath, dirnames, files in os.walk(base):
            dirnames[:] = [d for d in dirnames if d not in ("__pycache__", "build")]
            rel = os.path.relpath(dirpath, base)
            parts = [pkg] + ([] if rel == "." else rel.split(os.sep))
            for name in files:
                stem, ext = os.path.splitext(name)
                if ext not in (".py", ".pyx"):
                    continue
                if stem == "__init__":
                    mods[".".join(parts)] = (os.path.join(dirpath, name), True)
                else:
                    mods[".".join(parts + [stem])] = (os.path.join(dirpath, name), False)
    return mods


MODULES = _sources()


def _is_type_checking(test):
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree):
    """Every Import/ImportFrom in ``tree``, at any depth, except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve_from(module, is_pkg, level, target):
    if not level:
        return target
    base = module.split(".")
    if not is_pkg:
        base = base[:-1]
    if level > 1:
        base = base[:-(level - 1)]
    return ".".join(base + ([target] if target else []))


def _deps(module):
    """{imported project module: line} for ``module``: ``from p import m`` counts as a dependency on
    ``p.m`` when that is a module, else on ``p``."""
    path, is_pkg = MODULES[module]
    out = {}
    with open(path) as f:
        text = f.read()
    if path.endswith(".pyx"):            # run-time imports only (cimport is compile time)
        for m in re.finditer(r"^[ \t]*from[ \t]+([\w.]+)[ \t]+import[ \t]+([\w, ]+)", text, re.M):
            for name in (n.strip() for n in m.group(2).split(",")):
                full = f"{m.group(1)}.{name}"
                out.setdefault(full if full in MODULES else m.group(1), text[:m.start()].count("\n") + 1)
        for m in re.finditer(r"^[ \t]*import[ \t]+([\w.]+)", text, re.M):
            out.setdefault(m.group(1), text[:m.start()].count("\n") + 1)
        return {k: v for k, v in out.items() if k in MODULES and k != module}
    for node in _import_nodes(ast.parse(text, path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.setdefault(alias.name, node.lineno)
        else:
            src = _resolve_from(module, is_pkg, node.level, node.module)
            for alias in node.names:
                full = f"{src}.{alias.name}"
                out.setdefault(full if full in MODULES else src, node.lineno)
    return {k: v for k, v in out.items() if k in MODULES and k != module}


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, comps = {}, {}, set(), [], []
    counter = [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph[w])))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        comps.append(sorted(comp))
    return comps


def test_the_walk_sees_the_modules_and_the_imports_inside_functions():
    # the walk is only worth something if it finds what it claims to look at
    assert {"pyrep.graph", "pyrep.node", "pyrep.jobs.job", "pyrep.drivers.file", "pyrep._core.cowgate"} <= set(MODULES)
    assert any(name.startswith("pyrep.tools.") for name in MODULES)
    deps = _deps("pyrep")
    assert "pyrep.drivers.blkdebug" in deps            # imported inside inject_error()
    assert "pyrep.errors" in _deps("pyrep._core.cowgate")
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]


def test_imports_form_no_cycle():
    graph = {m: sorted(_deps(m)) for m in MODULES}
    cycles = _cycles(graph)
    detail = []
    for comp in cycles:
        members = set(comp)
        edges = [f"{a} -> {b} (line {_deps(a)[b]})" for a in comp for b in graph[a] if b in members]
        detail.append("cycle: " + ", ".join(comp) + "\n    " + "\n    ".join(edges))
    assert not cycles, "\n".join(detail)
