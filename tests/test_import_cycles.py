"""No import cycle among Ember's modules.

Every ``import`` statement under ``ember/`` counts, wherever it is: module
level, inside functions, under ``if TYPE_CHECKING:``. (A lazy import hides a
cycle from the interpreter, not from the reader: the two modules still depend
on each other.) Implicit imports of parent packages do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "ember"
# Cycles known and left to their modules' owners; each entry must still be a
# cycle (remove it once broken).
KNOWN_CYCLES = [
]


def module_names() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module ``name`` (at ``path``) imports."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            # ``import a.b.c`` names module a.b.c; keep the longest prefix that is one of ours.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a closed path of module names) per strongly connected
    component with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.add(member)
                    if member == node:
                        break
                if len(comp) > 1:
                    components.append(comp)
    return [_cycle_in(comp, graph) for comp in components]


def _cycle_in(comp: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the first module of ``comp`` (breadth-first)."""
    start = min(comp)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & comp):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in parent:
                    parent[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    assert sorted(find_cycles(graph)) == [["a", "b", "c", "a"], ["e", "e2", "e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_imports_resolve_relative_and_from_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "ember" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import mod\n")
    (pkg / "mod.py").write_text("def f():\n    from ember.sub.other import g\n    import ember.sub\n")
    (pkg / "other.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .mod import f\n")
    modules = {"ember.sub": pkg / "__init__.py", "ember.sub.mod": pkg / "mod.py", "ember.sub.other": pkg / "other.py"}
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph == {"ember.sub": {"ember.sub.mod"}, "ember.sub.mod": {"ember.sub.other", "ember.sub"},
                     "ember.sub.other": {"ember.sub.mod"}}


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    new = [c for c in cycles if not any(set(c) <= known for known in KNOWN_CYCLES)]
    assert not new, "import cycles:\n" + "\n".join(" -> ".join(c) for c in new)
    gone = [known for known in KNOWN_CYCLES if not any(set(c) <= known for c in cycles)]
    assert not gone, f"no longer cycles (remove them from KNOWN_CYCLES): {gone}"
