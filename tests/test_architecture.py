"""Structure checks: no import cycles, layers that point down (the product never imports the lab), imports at
the top, the version from a leaf module, and per-pixel arithmetic in one home."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from .conftest import REPO

SRC = REPO / "src" / "icemap"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(("icemap", *parts)).removesuffix(".__init__")


@functools.cache
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
    assert {"icemap.accessor", "icemap.store", "icemap.load", "icemap.cli", "icemap.cli_model_info"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_cycle_detector_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_kernel_layer_imports_nothing_of_icemap() -> None:
    assert _imports()["icemap.kernels"] == set()


# ----------------------------------------------------------------------------------------------
# Layers: the product below, the lab above it, the faces on top (docs/architecture.md)
# ----------------------------------------------------------------------------------------------

# Bottom to top. A module not named here belongs to the product layer (stac, load, store,
# index, metrics, vector, cluster, ...). An arrow may point down or sideways, never up.
LAYERS: list[tuple[str, set[str]]] = [
    ("base", {"icemap._version", "icemap.errors", "icemap.options", "icemap.kernels", "icemap.bands",
              "icemap.redact", "icemap.extras"}),
    ("product", set()),
    ("network runtime", {"icemap.model", "icemap.model.unet", "icemap.model.inputs", "icemap.model.checkpoint",
                         "icemap.model.onnx_runner", "icemap.model.packaged"}),
    ("infer", {"icemap.infer"}),
    ("workflow", {"icemap.workflow", "icemap.composite", "icemap.series", "icemap.figures", "icemap.report",
                  "icemap.sample", "icemap.demo"}),
    ("lab", {"icemap.lab", "icemap.lab.data", "icemap.lab.train", "icemap.lab.augment", "icemap.lab.experiment",
             "icemap.lab.default", "icemap.lab.onnx_import"}),
    ("face", {"icemap", "icemap.__main__", "icemap.accessor", "icemap.cli", "icemap.cli_common", "icemap.cli_model_info",
              "icemap.cli_report", "icemap.lab.cli"}),
]
# Arrows that climb on purpose: a product module that hands out a cube registers the
# `cube.icemap` accessor (which delegates to the public API), inside the function that does.
CLIMBING = {("icemap.load", "icemap.accessor"), ("icemap.store", "icemap.accessor")}
# The faces of the package that may reach the lab: the command line registers the lab's
# commands, the lazy public API resolves icemap.train & co. on first use.
LAB_FACES = {"icemap", "icemap.cli"}

# Imports that stay inside functions: optional stacks (extras, engines installed where used) ...
OPTIONAL = {"torch", "safetensors", "matplotlib", "mpl_toolkits", "onnx", "onnxruntime", "onnxscript", "dask_gateway",
            "dask_jobqueue", "dask_mpi", "mpi4py", "stackstac", "dask_cuda", "pynvml", "planetary_computer"}
# ... the command line's modules, whose start stays fast (each command imports its stack) ...
FAST_START = {"icemap.cli", "icemap.cli_common", "icemap.cli_model_info", "icemap.cli_report", "icemap.lab.cli"}
# ... and these, per module (module, imported module):
IN_FUNCTION = {
    ("icemap.load", "icemap.accessor"): "registers the accessor when a cube is handed out (see CLIMBING)",
    ("icemap.store", "icemap.accessor"): "the same",
    # real_data_scores and point_scores both call an `ice_mask`: the kernel on points, the dask
    # layer on cubes; at module level one name would shadow the other.
    ("icemap.lab.default", "icemap.kernels"): "ice_mask, the kernel",
    ("icemap.lab.default", "icemap.index"): "ice_mask, the dask layer",
}


def _layer(module: str) -> int:
    return next((i for i, (_, mods) in enumerate(LAYERS) if module in mods), 1)


@functools.cache
def _statements() -> list[tuple[str, str, bool, bool, list[str]]]:
    """(module, imported module, inside a function, in a try/except ImportError, names) per import."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    out = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())

        def walk(node: ast.AST, in_func: bool, fallback: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    walk(child, True, False)
                elif isinstance(child, ast.Try) and any(
                        h.type is None or "ImportError" in ast.unparse(h.type) for h in child.handlers):
                    for part in child.body:
                        walk(ast.Module(body=[part], type_ignores=[]), in_func, True)
                    for part in (*child.handlers, *child.orelse, *child.finalbody):
                        walk(part, in_func, fallback)
                elif isinstance(child, ast.Import):
                    out.extend((name, a.name, in_func, fallback, [a.name]) for a in child.names)
                elif isinstance(child, ast.ImportFrom):
                    base = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
                    mod = child.module or ""
                    if child.level:
                        for _ in range(child.level - 1):
                            base = base.rsplit(".", 1)[0]
                        mod = f"{base}.{mod}" if mod else base
                    names = [a.name for a in child.names]
                    subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules]
                    for target in subs or [mod]:
                        out.append((name, target, in_func, fallback, names))
                else:
                    walk(child, in_func, fallback)

        walk(tree, False, False)
    return out


def _optional_heavy(statements: list[tuple[str, str, bool, bool, list[str]]]) -> set[str]:
    """icemap modules that import an optional stack at module level, directly or through others."""
    top = [(m, t) for m, t, in_func, fallback, _ in statements if not in_func and not fallback]
    heavy = {m for m, t in top if t.split(".")[0] in OPTIONAL}
    while True:
        more = {m for m, t in top if t in heavy} - heavy
        if not more:
            return heavy
        heavy |= more


def test_imports_are_at_the_top() -> None:
    """Structure is read at the top of a module: an import inside a function is an optional stack,
    a try/except ImportError fallback, a command's own stack, or a named exception."""
    statements = _statements()
    heavy = _optional_heavy(statements)
    bad = [f"{m} imports {t}" for m, t, in_func, fallback, _ in statements
           if in_func and not fallback and t.split(".")[0] not in OPTIONAL and t not in heavy
           and m not in FAST_START and (m, t) not in IN_FUNCTION]
    assert not bad, "imports inside functions (move them to the top, or name the reason here): " + "; ".join(bad)
    # The exceptions are still needed (a stale one hides nothing, but says something false).
    used = {(m, t) for m, t, in_func, *_ in statements if in_func}
    assert set(IN_FUNCTION) <= used, set(IN_FUNCTION) - used


def test_layers_point_down() -> None:
    graph = _imports()
    climbing = {(m, t) for m, deps in graph.items() for t in deps if _layer(t) > _layer(m)}
    assert climbing == CLIMBING, sorted(climbing - CLIMBING)


def test_the_product_never_imports_the_lab() -> None:
    lab = {m for m in _imports() if m == "icemap.lab" or m.startswith("icemap.lab.")}
    assert {"icemap.lab.train", "icemap.lab.default", "icemap.lab.cli"} <= lab
    bad = [f"{m} imports {t}" for m, t, *_ in _statements()
           if (t == "icemap.lab" or t.startswith("icemap.lab.")) and m not in lab | LAB_FACES]
    assert not bad, bad


def test_the_version_comes_from_a_leaf_module() -> None:
    """No module imports the package face for `__version__`: icemap._version is a leaf."""
    statements = _statements()
    assert not [m for m, t, _, _, names in statements if t == "icemap" and "__version__" in names]
    assert not [m for m, t, *_ in statements if m == "icemap._version" and t.startswith("icemap")]
    readers = {m for m, t, *_ in statements if t == "icemap._version"}
    assert {"icemap", "icemap.store", "icemap.workflow", "icemap.model.checkpoint"} <= readers
    # The face itself is imported by its own accessor only (it delegates to the public API).
    assert {m for m, t, *_ in statements if t == "icemap" and m != "icemap"} <= {"icemap.accessor"}
