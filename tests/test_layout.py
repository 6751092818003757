"""The package layout's rules, from the source (no imports executed): no import cycles between
modules, lazy (function-level) imports included, and no module below the engine reaching back up
to the engine or the public API."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("jaxserve", "pallas_kernels")


def modules() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for d, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
                    out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = \
                        os.path.join(d, f)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        for node in ast.walk(ast.parse(open(path).read())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = mod.split(".")
                    parts = parts if is_pkg else parts[:-1]
                    parts = parts[:len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                # `from pkg import sub` needs the submodule; any other name needs `pkg` itself.
                subs = [f"{base}.{a.name}" for a in node.names]
                names = [n for n in subs if n in mods]
                if len(names) < len(subs):
                    names.append(base)
            for n in names:
                # The deepest module the name resolves to.
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and n != mod:
                    graph[mod].add(n)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
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
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    return cycles


def test_no_import_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    cycles = find_cycles(import_graph())
    assert cycles == [], f"import cycles: {cycles}"


# Layers, bottom up: a module may import its own layer and the ones below, never above.
LAYERS = [
    ("pallas_kernels",),
    ("jaxserve.config", "jaxserve.sampling_params"),
    ("jaxserve.models", "jaxserve.text", "jaxserve.scheduler"),
    ("jaxserve.weights", "jaxserve.runner", "jaxserve.io"),
    ("jaxserve.engine",),
    ("jaxserve.api", "jaxserve.tools", "jaxserve.cluster", "jaxserve"),
]


def layer_of(mod: str) -> int:
    best, depth = None, -1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (mod == n or mod.startswith(n + ".")) and n.count(".") > depth:
                best, depth = i, n.count(".")
    return best


def test_no_module_reaches_up():
    bad = []
    for mod, deps in import_graph().items():
        for d in deps:
            if layer_of(d) > layer_of(mod):
                bad.append(f"{mod} -> {d}")
    assert bad == [], "imports reaching up a layer:\n" + "\n".join(sorted(bad))


def test_graph_sees_lazy_imports():
    """The checker is not vacuous: it finds a function-level import (api -> weights)."""
    assert "jaxserve.weights" in import_graph()["jaxserve.api"]
