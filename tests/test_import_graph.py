"""The package's modules import one another in one direction: no import circles (issue 16).

Every relative import is followed -- at module level and inside functions alike (a lazy import that
closes a circle is still a circle: the two modules need each other), plus ``importlib.import_module``
calls with a literal relative name. ``from .pkg import name`` is an edge to ``pkg.name`` when that is a
module, else to ``pkg`` itself.
"""
from __future__ import annotations

import ast
import os
import sys
from typing import Dict, List, Set

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("quant_core", "nodes", "kernels")


def _module_name(path: str, root: str = ROOT) -> str:
    rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
    if rel == "__init__":
        return ""
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def package_modules(root: str = ROOT) -> Dict[str, str]:
    mods = {"": os.path.join(root, "__init__.py")}
    for pkg in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, pkg)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for f in filenames:
                if f.endswith(".py"):
                    p = os.path.join(dirpath, f)
                    mods[_module_name(p, root)] = p
    return mods


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def import_edges(mods: Dict[str, str]) -> Dict[str, Set[str]]:
    """module -> the package modules it imports (relative imports, anywhere in the file)."""
    edges: Dict[str, Set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        package = mod if is_pkg else mod.rpartition(".")[0]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)

        def resolve(level: int, name: str) -> str:
            parts = package.split(".") if package else []
            if level - 1 > len(parts):
                raise AssertionError(f"{path}: relative import beyond the package root")
            base = ".".join(parts[: len(parts) - (level - 1)])
            return _join(base, name)

        for node in ast.walk(tree):
            targets: List[str] = []
            if isinstance(node, ast.ImportFrom) and node.level:
                base = resolve(node.level, node.module or "")
                for alias in node.names:
                    sub = _join(base, alias.name)
                    targets.append(sub if sub in mods else base)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "import_module" and node.args
                  and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                  and node.args[0].value.startswith(".")):
                name = node.args[0].value
                level = len(name) - len(name.lstrip("."))
                targets.append(resolve(level, name.lstrip(".")))
            for t in targets:
                if t not in mods:
                    raise AssertionError(f"{path}: import of {t!r}, which is not a module of the package")
                if t != mod:
                    edges[mod].add(t)
    return edges


def find_cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), each as one circle path."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    comps: List[List[str]] = []
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v: str):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [_circle(c, edges) for c in comps]


def _circle(comp: List[str], edges: Dict[str, Set[str]]) -> List[str]:
    """One circle through the component's first module (breadth-first back to it)."""
    members, start = set(comp), comp[0]
    prev = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & members):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return list(reversed(path)) + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def test_no_import_circles():
    cycles = find_cycles(import_edges(package_modules()))
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_walker_finds_a_circle_and_a_lazy_import(tmp_path):
    """The checker itself: a circle closed only by an import inside a function is found; a chain is not."""
    root = tmp_path
    (root / "__init__.py").write_text("")
    pkg = root / "quant_core"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from .sub import c\n    return c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("X = 1\n")
    edges = import_edges(package_modules(str(root)))
    assert edges["quant_core.a"] == {"quant_core.b"}
    assert edges["quant_core.b"] == {"quant_core.sub.c"}
    assert find_cycles(edges) == []
    (pkg / "sub" / "c.py").write_text("def g():\n    from ..a import f\n    return f\n")
    edges = import_edges(package_modules(str(root)))
    assert find_cycles(edges) == [["quant_core.a", "quant_core.b", "quant_core.sub.c", "quant_core.a"]]
    (pkg / "a.py").write_text("import importlib\nM = importlib.import_module('.missing', __package__)\n")
    with pytest.raises(AssertionError, match="missing"):
        import_edges(package_modules(str(root)))


def test_readme_architecture_table_names_every_module():
    """README's architecture table names every module of the package (issue 16: a newcomer finds any
    format, optimizer, node or kernel path from it). A row may name several files of one folder:
    ``quant_core/lora.py``, ``lora_keys.py``."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## Architecture"):]
    section = section[: section.index("\n## ", 1)]
    named = set()
    for line in section.splitlines():
        if not line.startswith("|"):
            continue
        cell = line.split("|")[1]
        folder = ""
        for name in (p.strip("` ") for p in cell.split(",")):
            if "/" in name:
                folder = name.rsplit("/", 1)[0] + "/"
                named.add(name)
            elif name.endswith(".py"):
                named.add(folder + name)
    missing = sorted(os.path.relpath(p, ROOT) for p in package_modules().values()
                     if os.path.relpath(p, ROOT) not in named)
    assert not missing, "modules missing from README's architecture table: " + ", ".join(missing)
