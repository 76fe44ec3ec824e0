"""Structure checks: no import cycles, layers that point down (the product never imports the lab), imports at
the top, the version from a leaf module, per-pixel arithmetic and other facts in one home, and the package's
types (py.typed, a mypy configuration strict for the typed layers)."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from .conftest import FIRST, MODULE_MARKERS, REPO, SLOW_TESTS

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


# -- one home for each fact ------------------------------------------------------------------


@functools.cache
def _trees() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text()) for p in sorted(SRC.rglob("*.py"))}


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _is_number(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) in (int, float)


def test_files_are_replaced_only_by_the_atomic_helper() -> None:
    """Temporary file + rename is written once (icemap._atomic): no other os.replace/os.rename/mkstemp."""
    found = []
    for name, tree in _trees().items():
        if name == "icemap._atomic":
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name)
                    and (node.func.value.id, node.func.attr) in {("os", "replace"), ("os", "rename"),
                                                                 ("tempfile", "mkstemp")}):
                found.append(f"{name}:{node.lineno} {node.func.value.id}.{node.func.attr}")
    assert not found, "use icemap._atomic.atomic_path: " + ", ".join(found)


def _is_colour(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """255 as a channel of an RGB(A) colour literal, not a nodata value."""
    parent = parents.get(node)
    return (isinstance(parent, (ast.Tuple, ast.List)) and len(parent.elts) in (3, 4)
            and all(_is_number(e) for e in parent.elts))


def test_ice_nodata_is_named_not_written_as_255() -> None:
    """The mask's nodata value lives in kernels.ICE_NODATA; bands (bit tables) and the sample
    generator (its class codes and brightness temperatures are data of their own) are exempt;
    the lab reads the sample truth's fill class by its name, CLASS_CODES["fill"]."""
    exempt = {"icemap.kernels", "icemap.bands", "icemap.sample"}
    found = []
    for name, tree in _trees().items():
        if name in exempt:
            continue
        parents = _parents(tree)
        for node in ast.walk(tree):
            if _is_number(node) and node.value == 255 and not _is_colour(node, parents):
                found.append(f"{name}:{node.lineno}")
    assert not found, "use icemap.kernels.ICE_NODATA: " + ", ".join(found)


def test_stac_request_settings_have_one_home() -> None:
    """Timeout, retries, backoff and retried statuses are defined in icemap.retry only; every other
    default of a `retries`/`timeout`/`backoff` parameter next to `retries` reads those constants."""
    from icemap import retry, stac

    assert (retry.STAC_TIMEOUT_S, retry.STAC_RETRIES, retry.STAC_BACKOFF_S) == (
        stac.Search.timeout, stac.Search.retries, stac.Search.backoff)
    found = []
    for name, tree in _trees().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = [*node.args.args, *node.args.kwonlyargs]
                defaults = [*([None] * (len(node.args.args) - len(node.args.defaults))), *node.args.defaults,
                            *node.args.kw_defaults]
                if "retries" not in {a.arg for a in args}:
                    continue
                found += [f"{name}:{node.lineno} {node.name}({a.arg}=...)" for a, d in zip(args, defaults)
                          if a.arg in ("retries", "timeout", "backoff") and _is_number(d)]
            elif isinstance(node, ast.ClassDef):
                found += [f"{name}:{s.lineno} {node.name}.{s.target.id}" for s in node.body
                          if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
                          and s.target.id in ("retries", "timeout", "backoff") and _is_number(s.value)]
            elif _is_number(node) and node.value == 429 and name != "icemap.retry":
                found.append(f"{name}:{node.lineno} status 429")
    assert not found, "use icemap.retry.STAC_TIMEOUT_S/STAC_RETRIES/STAC_BACKOFF_S/STAC_RETRY_STATUS: " + ", ".join(found)


def test_wave_size_is_decided_in_one_function() -> None:
    """The write_wave option is read by store._wave_size only (which logs what it chose and why)."""
    readers = []
    for name, tree in _trees().items():
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if (isinstance(node, ast.Call) and any(isinstance(a, ast.Constant) and a.value == "write_wave"
                                                       for a in node.args)):
                    readers.append(f"{name}.{fn.name}")
    assert sorted(set(readers)) == ["icemap.store._wave_size"]


def test_guards_find_what_they_forbid() -> None:
    """The checks above are not vacuous: each finds a planted copy."""
    tree = ast.parse("import os\nos.replace(a, b)\nx = m == 255\ncolour = (255, 0, 0)\n")
    parents = _parents(tree)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert calls and calls[0].func.attr == "replace"  # type: ignore[attr-defined]
    flagged = [n.lineno for n in ast.walk(tree) if _is_number(n) and n.value == 255 and not _is_colour(n, parents)]
    assert flagged == [3]
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
# ----------------------------------------------------------------------------------------------
# Layers: the product below, the lab above it, the faces on top (docs/architecture.md)
# ----------------------------------------------------------------------------------------------

# Bottom to top. A module not named here belongs to the product layer (stac, load, store,
# index, metrics, vector, cluster, ...). An arrow may point down or sideways, never up.
LAYERS: list[tuple[str, set[str]]] = [
    ("base", {"icemap._version", "icemap.retry", "icemap._atomic", "icemap.errors", "icemap.options", "icemap.kernels", "icemap.bands",
              "icemap.redact", "icemap.extras"}),
    ("product", set()),
    ("network runtime", {"icemap.model", "icemap.model.unet", "icemap.model.inputs", "icemap.model.checkpoint",
                         "icemap.model.onnx_runner", "icemap.model.packaged", "icemap.model.item"}),
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
    # scipy.signal loads scipy.stats (about 1 s): every command that imports metrics would pay it.
    ("icemap.metrics", "scipy.signal"): "find_peaks, for the valley threshold only",
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


def test_the_suites_lists_name_real_tests() -> None:
    """conftest's marker and order lists name modules and test functions that exist: a renamed
    test would otherwise drop out of them silently (back into the fast core, or to the end)."""
    tests = REPO / "tests"
    for module in (*FIRST, *MODULE_MARKERS):
        assert (tests / f"{module}.py").exists(), module
    defined = {module: {n.name for n in ast.walk(ast.parse((tests / f"{module}.py").read_text()))
                        if isinstance(n, ast.FunctionDef)}
               for module in {entry.split("::")[0] for entry in SLOW_TESTS}}
    missing = [e for e in SLOW_TESTS if e.split("::")[1] not in defined[e.split("::")[0]]]
    assert not missing, f"SLOW_TESTS names tests that do not exist: {missing}"
