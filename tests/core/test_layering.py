"""Layers depend one way and modules keep their private names to themselves.

Both read the source of ``pyrep/``, ``drivers/`` (installed as
``pyrep.drivers``) and ``tools/`` (``pyrep.tools``). The cycle check counts
imports inside functions too (an import dodged into a function body is still
a dependency) and the run-time imports of .pyx files; an import under ``if
TYPE_CHECKING:`` does not count, nor does the package ``__init__`` Python
runs before a submodule. The private-name check reads every .py with ``ast``.
"""
import ast
import os
import re
import sys

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
# ------------------------------------------------------------------ private names

def _defined_names(tree):
    """Underscore names a module defines: its functions, classes, globals and the attributes it assigns."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Name,)) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names.add((alias.asname or alias.name).split(".")[0])
    # a Cython base class declares its fields in the .pyx/.pxd beside it: those are the module's too
    return {n for n in names if n.startswith("_")}


def _private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_aliases(module, is_pkg, tree):
    """Names bound to project modules by imports: ``import pyrep.graph as g`` → {"g": "pyrep.graph"}."""
    aliases = {}
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                        alias.name.split(".")[0]
        else:
            src = _resolve_from(module, is_pkg, node.level, node.module)
            for alias in node.names:
                if f"{src}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{src}.{alias.name}"
    return aliases


def _unit(module):
    """What owns a private name: the module — or, for a driver split into a package
    (``drivers/qcow2/``), the whole package, as QEMU's qcow2-*.c share one state struct."""
    parts = module.split(".")
    if len(parts) > 3 and parts[:2] == ["pyrep", "drivers"] and MODULES.get(".".join(parts[:3]), (0, False))[1]:
        return ".".join(parts[:3])
    return module


def _unit_names(unit):
    names = set()
    for m, (path, _) in MODULES.items():
        if path.endswith(".py") and _unit(m) == unit:
            with open(path) as f:
                names |= _defined_names(ast.parse(f.read(), path))
    return names


def _private_uses(module):
    path, is_pkg = MODULES[module]
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    unit = _unit(module)
    own = _unit_names(unit) if unit != module else _defined_names(tree)
    aliases = _module_aliases(module, is_pkg, tree)
    found = []
    for node in _import_nodes(tree):
        if isinstance(node, ast.ImportFrom):
            src = _resolve_from(module, is_pkg, node.level, node.module)
            if src not in MODULES:
                continue
            for alias in node.names:
                # a module whose own name has an underscore (the Cython _core, qcow2's _fast) is public
                if _private(alias.name) and f"{src}.{alias.name}" not in MODULES and _unit(src) != unit:
                    found.append(f"{path}:{node.lineno}: imports {alias.name} from {src}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not _private(node.attr) or node.attr in STDLIB_UNDERSCORE_API:
            continue
        value = node.value
        if isinstance(value, ast.Name) and value.id in aliases:
            if _unit(aliases[value.id]) == unit:
                continue
            found.append(f"{path}:{node.lineno}: uses {node.attr} of module {aliases[value.id]}")
        elif isinstance(value, ast.Name) and value.id in ("self", "cls"):
            continue
        elif node.attr not in own:
            found.append(f"{path}:{node.lineno}: uses {ast.unparse(node)}, a private name it does not define")
    return found


def _fake_tree(tmp_path, monkeypatch, files):
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for top in PACKAGES:
        (tmp_path / top).mkdir(exist_ok=True)
        (tmp_path / top / "__init__.py").touch()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    monkeypatch.setattr(sys.modules[__name__], "MODULES", _sources())


def test_the_checks_catch_what_they_must_on_a_tree_made_for_it(tmp_path, monkeypatch):
    _fake_tree(tmp_path, monkeypatch, {
        "pyrep/graph.py": "from .node import Node\n_backends = {}\n",
        "pyrep/node.py": "class Node:\n    def close(self):\n        from . import graph\n        graph.forget(self)\n",
        "pyrep/backend.py": "from . import graph\n\ndef add(b):\n    graph._backends['x'] = b\n",
        "drivers/raw.py": "def where(self):\n    return self.node._path\n",
        "drivers/q/__init__.py": "",
        "drivers/q/a.py": "def l2(img):\n    return img._l2\n",
        "drivers/q/b.py": "class B:\n    def __init__(self):\n        self._l2 = 1\n",
    })
    assert _cycles({m: sorted(_deps(m)) for m in MODULES}) == [["pyrep.graph", "pyrep.node"]]
    assert _private_uses("pyrep.backend") == [f"{tmp_path}/pyrep/backend.py:4: uses _backends of module pyrep.graph"]
    assert [u.split(": ", 1)[1] for u in _private_uses("pyrep.drivers.raw")] == \
        ["uses self.node._path, a private name it does not define"]
    assert _private_uses("pyrep.drivers.q.a") == []        # one driver's package shares its names


@pytest.mark.parametrize("module", sorted(m for m, (p, _) in MODULES.items() if p.endswith(".py")))
def test_no_module_uses_another_modules_private_names(module):
    assert _private_uses(module) == []
