"""The house: packages import one way (``metactr.LAYERS``), no import cycles, no module too long."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import metactr

SRC = Path(metactr.__file__).parent


def _modules() -> dict[str, Path]:
    mods = {}
    for f in SRC.rglob("*.py"):
        rel = f.relative_to(SRC.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        mods[".".join(parts)] = f
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules of metactr that ``name`` imports (at any depth of the file: lazy imports count)."""
    out: set[str] = set()
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            cands = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        else:
            continue
        out |= {c for c in cands if c in mods and c != name}
    return out


def layer_of(module: str) -> int:
    """Index in ``metactr.LAYERS`` of the layer that holds ``module``."""
    rest = module.split(".", 1)[1] if "." in module else ""
    for i, layer in enumerate(metactr.LAYERS):
        for unit in layer:
            if rest == unit or rest.startswith(unit + "."):
                return i
    raise AssertionError(f"module {module} is in no layer of metactr.LAYERS: add it there")


def violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in graph.items():
        if mod == "metactr":
            continue  # the public API re-exports every layer
        for d in deps:
            if d != "metactr" and layer_of(d) > layer_of(mod):
                bad.append(f"{mod} (layer {layer_of(mod)}) imports {d} (layer {layer_of(d)})")
            if d == "metactr":
                bad.append(f"{mod} imports the public API package")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle's nodes (Tarjan's strongly connected components of size > 1)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    # a package's __init__ that only re-exports its own modules is part of it: drop pkg -> pkg.mod edges
    return {n: {d for d in _imports(n, p, mods) if not d.startswith(n + ".") and not n.startswith(d + ".")}
            for n, p in mods.items()}


def test_every_module_is_in_a_layer(graph):
    for mod in graph:
        if mod != "metactr":
            layer_of(mod)


def test_imports_run_one_way(graph):
    assert violations(graph) == []


def test_there_is_no_import_cycle(graph):
    assert cycles(graph) == []


def test_no_module_is_over_about_400_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 420}
    assert long == {}


def test_the_checks_catch_an_upward_import_and_a_cycle():
    """The checks themselves can fail: a data module importing the trainer, and a 2-cycle."""
    assert violations({"metactr.data.batch": {"metactr.train.trainer"}}) != []
    assert violations({"metactr.train.trainer": {"metactr.data.batch"}}) == []
    assert cycles({"metactr.a": {"metactr.b"}, "metactr.b": {"metactr.a"}}) == [["metactr.a", "metactr.b"]]
    with pytest.raises(AssertionError):
        layer_of("metactr.nowhere")
