"""Structure checks: the module graph has no import cycles, and per-pixel arithmetic has one home."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

SRC = REPO / "src" / "icemap"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(("icemap", *parts)).removesuffix(".__init__")


def _imports() -> dict[str, set[str]]:
    """icemap modules each module imports, at module level or inside functions alike."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("icemap"):
                targets = [f"icemap.{a.name}" for a in node.names] if node.module == "icemap" else [node.module]
                deps.update(targets)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("icemap."))
        # The package itself resolves its API lazily (by name, in __getattr__): not an edge.
        graph[name] = {d for d in deps if d in modules and d not in (name, "icemap")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycles() -> None:
    graph = _imports()
    assert {"icemap.accessor", "icemap.store", "icemap.load", "icemap.cli", "icemap.cli_model"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_cycle_detector_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_kernel_layer_imports_nothing_of_icemap() -> None:
    assert _imports()["icemap.kernels"] == set()
