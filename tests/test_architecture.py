"""Structure checks: the module graph has no import cycles, per-pixel arithmetic has one home, and the
package ships its types (py.typed) with a mypy configuration that is strict for the typed layers."""

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


#: The layers mypy checks strictly (issue: the kernels, options, the network runtime, store, index).
STRICT_MODULES = {
    "icemap.kernels", "icemap.options", "icemap.model.unet", "icemap.model.checkpoint", "icemap.model.inputs",
    "icemap.model.onnx_runner", "icemap.model.packaged", "icemap.store", "icemap.index",
}
#: The settings that make an override strict (what `mypy --strict` adds per module).
STRICT_SETTINGS = {"disallow_untyped_defs", "disallow_incomplete_defs", "disallow_untyped_calls",
                   "disallow_any_generics", "warn_return_any"}


def _mypy_config() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]


def test_package_ships_py_typed() -> None:
    import tomllib

    assert (SRC / "py.typed").is_file()
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["icemap"]


def test_mypy_config_is_strict_for_the_typed_layers() -> None:
    config = _mypy_config()
    assert config["files"] == ["src/icemap"]
    strict: set[str] = set()
    for override in config.get("overrides", []):
        modules = override["module"] if isinstance(override["module"], list) else [override["module"]]
        if all(override.get(key) is True for key in STRICT_SETTINGS):
            strict.update(modules)
        # No override silences errors: a module is checked or it is not in src/icemap.
        assert "ignore_errors" not in override, modules
    assert STRICT_MODULES <= strict, STRICT_MODULES - strict
    # The strict modules exist (a renamed module would leave its strictness behind).
    for module in STRICT_MODULES:
        assert (SRC.parent / (module.replace(".", "/") + ".py")).is_file(), module
