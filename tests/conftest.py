"""Shared fixtures: real data from ../shared, a real STAC API on loopback, and guards.

* ``shared_data`` resolves ``../shared/data`` from the repository root. Locally a test that
  needs it is skipped when it is missing; under ``CI=true`` it fails instead, so CI can never
  pass by silently skipping the real-data tests.
* Every test runs with outbound network blocked (loopback stays open): tests must not depend
  on a live service.
* ``stac_api`` starts ``rustac serve`` (a real STAC API server, in memory) on a free loopback
  port, serving items whose assets are COGs the tests wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# -- Hypothesis profiles (tests/test_fuzz.py) --------------------------------------------------
# "ci": fixed seed (derandomize), a few hundred cases, no per-example deadline (a case writes and
# reads tiny GeoTIFFs; timing varies with the machine). "dev" (local default): fewer, random
# cases. Choose one with ICEMAP_HYPOTHESIS_PROFILE=ci|dev.
from hypothesis import HealthCheck, settings  # noqa: E402

_HYPOTHESIS_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
                      "print_blob": True}
settings.register_profile("ci", max_examples=300, derandomize=True, **_HYPOTHESIS_COMMON)
settings.register_profile("dev", max_examples=60, **_HYPOTHESIS_COMMON)
settings.load_profile(os.environ.get("ICEMAP_HYPOTHESIS_PROFILE", "ci" if IN_CI else "dev"))

#: Outcomes of the fuzz cases tried in this session ("api:cube", "cli:GridError"...).
FUZZ_TRIED: Counter[str] = Counter()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Under pytest-xdist each worker counts its own fuzz cases: hand them to the controller."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["fuzz_tried"] = dict(FUZZ_TRIED)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """(xdist controller) add a finished worker's fuzz tally to this session's."""
    FUZZ_TRIED.update(getattr(node, "workeroutput", {}).get("fuzz_tried", {}))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Report how many fuzz cases ran and how they ended (a suite that tried nothing proves nothing)."""
    if FUZZ_TRIED:
        api = sum(v for k, v in FUZZ_TRIED.items() if k.startswith("api:"))
        cli = sum(v for k, v in FUZZ_TRIED.items() if k.startswith("cli"))
        terminalreporter.write_line(
            f"fuzz: {api} API and {cli} CLI cases tried (profile {settings._current_profile}); "
            + ", ".join(f"{k}={v}" for k, v in sorted(FUZZ_TRIED.items()))
        )


def shared_path(*parts: str) -> Path:
    """Path of a file under ../shared/data; skip (locally) or fail (CI) when missing."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        msg = f"real data {p} is missing (expected ../shared/data beside the repository)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return p


def require_module(name: str, extra: str) -> Any:
    """Import an optional dependency; skip (locally) or fail (CI, where `.[dev]` installs every
    extra) when it is missing, so an install gap can never turn tests into silent skips."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        msg = f"{name} is missing: pip install \"icemap[{extra}]\""
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


def run_icemap(*args: str, timeout: float = 300, env: Mapping[str, str] | None = None,
               cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """``icemap ARGS`` in a fresh interpreter, as a user runs it: output captured, never raising.

    For what only a real process shows (the console script, signals, a traceback-free exit as
    the operating system sees it, variables read at import). Tests mark themselves ``process``;
    everything else goes through :func:`icemap_cli` (in-process, seconds cheaper per call).
    """
    return subprocess.run([sys.executable, "-m", "icemap.cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=cwd, env=None if env is None else dict(env))


#: Python's default warning filters (``python -W`` unset): a fresh ``icemap`` process shows
#: UserWarnings and icemap's own once per place and hides Deprecation/Pending/Import/Resource
#: warnings outside ``__main__``. pytest's filters (``error``, recording) must not leak in.
_PYTHON_DEFAULT_FILTERS: tuple[tuple[str, type[Warning], str], ...] = (
    ("default", DeprecationWarning, "__main__"),
    ("ignore", DeprecationWarning, ""),
    ("ignore", PendingDeprecationWarning, ""),
    ("ignore", ImportWarning, ""),
    ("ignore", ResourceWarning, ""),
)


def _print_warning(msg: Any) -> None:
    """Python's own display of a warning: formatted, on (the current) sys.stderr."""
    import warnings

    sys.stderr.write(warnings._formatwarnmsg(msg))  # type: ignore[attr-defined]


def icemap_cli(*args: str, env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
               timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """``icemap ARGS`` run in this process through ``icemap.cli.main(argv)``, as
    :func:`run_icemap` runs it in a new one: the same exit code, stdout and stderr.

    * ``SystemExit`` gives the exit code (``None`` is 0); an exception that escapes ``main``
      is what a real process would print: its traceback on stderr and exit code 1, so the
      tests' "no traceback" checks keep their meaning.
    * ``env`` adds variables for the call (``COLUMNS``...) and ``cwd`` changes directory for
      it; both are restored. Variables read only at import time need :func:`run_icemap`.
    * Warnings are filtered as in a fresh interpreter and ``warnings.showwarning`` (which
      ``main`` replaces) is given back, so one call cannot change the next test.
    * ``timeout`` is accepted for the subprocess helpers' signature; pytest-timeout bounds
      the test instead.
    """
    import contextlib
    import io
    import logging
    import traceback
    import warnings

    from icemap import cli

    out, err = io.StringIO(), io.StringIO()
    # A process without logging configuration prints WARNING records on stderr (logging's
    # last-resort handler); under pytest the root logger has capture handlers instead.
    log_handler = logging.StreamHandler(err)
    log_handler.setLevel(logging.WARNING)
    saved_env = dict(os.environ)
    saved_cwd = os.getcwd()
    code: int = 0
    with warnings.catch_warnings():
        warnings.resetwarnings()
        for action, category, module in reversed(_PYTHON_DEFAULT_FILTERS):
            warnings.filterwarnings(action, category=category, module=module)  # type: ignore[arg-type]
        if hasattr(warnings, "_showwarnmsg_impl"):
            # pytest records warnings through this hook; a process prints them on stderr (the
            # CLI's own display hands other libraries' warnings to it). Restored on exit.
            warnings._showwarnmsg_impl = _print_warning  # type: ignore[attr-defined]
        try:
            if env:
                os.environ.update(env)
            if cwd is not None:
                os.chdir(cwd)
            logging.getLogger().addHandler(log_handler)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    cli.main(list(args))
                except SystemExit as exc:
                    if exc.code is None:
                        code = 0
                    elif isinstance(exc.code, int):
                        code = exc.code
                    else:  # sys.exit("message"): Python prints it and exits 1
                        print(exc.code, file=sys.stderr)
                        code = 1
                except Exception:  # what the interpreter would print for an uncaught exception
                    traceback.print_exc(file=sys.stderr)
                    code = 1
        finally:
            logging.getLogger().removeHandler(log_handler)
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
    return subprocess.CompletedProcess(["icemap", *args], code, out.getvalue(), err.getvalue())


# -- the stackstac engine (an extra that pins pandas < 3) ------------------------------------------
#: Which environment the suite runs in. ``.ci/run`` sets ``ICEMAP_TEST_ENV=stackstac`` for its
#: second, small environment (``.[test,stackstac]``), where it runs ``pytest -m stackstac``.
TEST_ENV = os.environ.get("ICEMAP_TEST_ENV", "main")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``stackstac`` compare the two loader engines and need stackstac.

    * In the stackstac environment (``ICEMAP_TEST_ENV=stackstac``) a missing stackstac fails them:
      that environment exists to run them.
    * In the main environment (``.[dev]``: pandas 3, no stackstac, by design) they skip, in CI too,
      and say where they run instead. Where stackstac is installed they run everywhere.
    """
    if item.get_closest_marker("stackstac") is None:
        return
    import importlib.util

    if importlib.util.find_spec("stackstac") is not None:
        return
    if TEST_ENV == "stackstac":
        pytest.fail('stackstac is missing in the stackstac test environment: pip install -e ".[test,stackstac]"')
    pytest.skip('needs stackstac (pip install "icemap[stackstac]"); CI runs it in .ci/run\'s stackstac environment')


# -- markers and scheduling ------------------------------------------------------------------------
#: Whole modules that carry a marker (``-m "not slow"`` is the fast core; ``-m lab`` the training
#: stack). Single slow tests elsewhere say so themselves (``@pytest.mark.slow``).
MODULE_MARKERS: dict[str, tuple[str, ...]] = {
    "test_engines": ("engines", "slow"),
    "test_faults": ("slow",),
    "test_notebook": ("slow",),
    "test_demo": ("slow",),
    "test_benchmarks": ("slow",),
    "test_fuzz": ("slow",),
    "test_train": ("lab", "slow"),
    "test_default_model": ("lab", "slow"),
    "test_onnx": ("slow",),
    "test_extras": ("process",),  # a fresh interpreter without torch or matplotlib each
    "test_store_state": ("slow",),
}
#: Marks that make a test slow wherever it is: it starts a real icemap process or an engine.
SLOW_MARKERS = ("process", "engines")
#: Single tests (all parametrizations together) over ~2.3 s of a parallel run on this 2-core
#: machine (module::function): out of the fast core, so that ``-m "not slow"`` stays near 2 min.
SLOW_TESTS = frozenset({
    "test_cli_products::test_map_writes_ndsi_and_ice_on_the_cube_grid",
    "test_composite::test_cli_composite_then_map_beats_every_single_date",
    "test_composite::test_default_season_follows_the_hemisphere",
    "test_composite::test_equals_independent_numpy_on_the_sample_region",
    "test_composite::test_map_unet_runs_on_a_composite",
    "test_composite::test_resume_after_interruption",
    "test_data::test_dataset_reads_one_window_lazily",
    "test_data::test_grid_chips_cover_every_labelled_pixel",
    "test_data::test_location_split_holds_out_places_of_one_large_glacier",
    "test_data::test_scan_counts_valid_pixels",
    "test_data::test_split_seed_changes_the_split_and_more_iterations_never_worsen",
    "test_deploy::test_gateway_commands_exist",
    "test_guards::test_dem_guard_chunked_equals_whole_and_is_lazy",
    "test_guards::test_sample_region_guards_cut_lake_and_shadow_false_positives",
    "test_infer::test_any_cube_size_equals_whole",
    "test_infer::test_cli_map_unet_resumes",
    "test_infer::test_cli_maps_tiny_cubes",
    "test_infer::test_halo_sizes",
    "test_infer::test_output_grid_and_values",
    "test_infer::test_study_scorer_runs_the_shipped_predictor",
    "test_infer::test_tta_and_mc_dropout",
    "test_interop::test_consolidated_metadata_follows_appends_and_resumes",
    "test_interop::test_opened_stores_go_to_netcdf_and_back",
    "test_interop::test_plain_xarray_opens_every_store_with_its_crs",
    "test_interop::test_plain_xarray_reads_cf_metadata_and_integer_flags",
    "test_kernels::test_index_layer_lazy_eager_and_into_agree",
    "test_load::test_chunked_equals_whole",
    "test_loader_engines::test_cli_ingest_engines_write_the_same_store",
    "test_loader_engines::test_missing_band_same_cube",
    "test_loader_engines::test_sample_region_same_cube",
    "test_loader_engines::test_stackstac_is_only_imported_for_its_engine",
    "test_metrics::test_any_chunking_gives_identical_counts",
    "test_metrics::test_sweep_equals_ice_mask_plus_confusion",
    "test_model::test_inputs_from_cube",
    "test_plausibility::test_cli_ingest_and_map_files",
    "test_products::test_accessor_delegates_to_the_api",
    "test_products::test_export_geotiffs_cogs_equal_product",
    "test_readme::test_public_functions_win_over_same_named_submodules",
    "test_real_pixels::test_unet_on_real_pixels",
    "test_report::test_figures_from_the_cli_and_api",
    "test_report::test_report_is_self_contained_and_escaped",
    "test_report::test_report_renders_in_chromium",
    "test_security::test_api_key_header_is_sent_but_never_stored",
    "test_security::test_onnx_naming_external_data_is_refused_even_beside_the_working_directory",
    "test_security::test_secrets_planted_in_every_command_never_come_out",
    "test_series::test_series_equals_numpy_on_the_sample_region",
    "test_stac_products::test_every_item_and_collection_validates_offline",
    "test_store::test_append_new_dates",
    "test_store::test_cli_ingest_from_api_resumes",
    "test_store::test_half_written_step_is_redone",
    "test_store::test_interrupted_append_is_repaired",
    "test_store::test_interrupted_run_reads_back_right_and_resumes",
    "test_store::test_other_grid_is_refused",
    "test_store::test_rerun_skips_complete_steps",
    "test_store::test_round_trip_equals_loaded_cube",
    "test_store::test_unfinished_store_of_icemap_is_started_again",
    "test_store::test_unfinished_store_with_a_user_file_is_left_alone",
    "test_store::test_waves_of_slabs_write_the_same_store_and_flag_steps_in_order",
    "test_store_safety::test_composite_year_whose_dates_changed_is_computed_again",
    "test_store_safety::test_foreign_outputs_are_refused_and_untouched",
    "test_store_safety::test_relative_paths_are_made_absolute",
    "test_store_safety::test_rerun_with_other_settings_is_refused_naming_them",
    "test_store_safety::test_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over",
    "test_store_safety::test_sigterm_during_map_and_composite",
})
#: Module fixtures that start worker processes (tests/test_cluster.py, tests/test_security.py).
PROCESS_CLUSTER_FIXTURES = {"client", "cluster_client"}

#: Modules started first (longest first) so that no long module is left running alone at the
#: end of a parallel run (pytest-xdist, ``--dist loadfile``: each module runs on one worker, so
#: its module fixtures are built once, the engines never run twice side by side and the demo
#: runs once). Measured in a parallel run (module totals, longest first); every other module keeps
#: pytest's order after these.
FIRST: tuple[str, ...] = (
    "test_engines", "test_infer", "test_faults", "test_store_safety", "test_fuzz", "test_benchmarks",
    "test_composite", "test_store", "test_onnx", "test_train", "test_security", "test_demo", "test_notebook",
    "test_interop", "test_data", "test_metrics", "test_report", "test_cli_products", "test_loader_engines",
    "test_products", "test_extras", "test_cluster", "test_guards", "test_default_model",
)


def _module_name(item: pytest.Item) -> str:
    return item.path.stem


def _starts_cluster(item: pytest.Item) -> bool:
    """A test marked `cluster` itself (not by its module: tests/test_cluster.py's are in-process
    and quick) starts one; so does one using a module's process cluster."""
    return any(m.name == "cluster" for m in getattr(item, "own_markers", ())) or bool(
        PROCESS_CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Markers by module, and the order pytest-xdist hands modules out in.

    * ``MODULE_MARKERS`` and ``SLOW_MARKERS`` add ``slow``, ``engines`` and ``lab``.
    * The longest modules come first (``FIRST``; ``--no-loadscope-reorder`` keeps this order
      instead of xdist's largest-count-first).
    """
    for item in items:
        module = _module_name(item)
        for name in MODULE_MARKERS.get(module, ()):
            item.add_marker(name)
        starts_cluster = _starts_cluster(item)
        measured_slow = f"{module}::{getattr(item, 'originalname', item.name)}" in SLOW_TESTS
        if (starts_cluster or measured_slow or any(item.get_closest_marker(m) for m in SLOW_MARKERS)) \
                and not item.get_closest_marker("slow"):
            item.add_marker("slow")
    rank = {m: i for i, m in enumerate(FIRST)}
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda it: (rank.get(_module_name(it), len(FIRST)), order[id(it)]))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_path()


# -- network guard ---------------------------------------------------------------------------
_real_connect = socket.socket.connect


def _guarded_connect(self: socket.socket, address: Any) -> Any:
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and self.family in (socket.AF_INET, socket.AF_INET6):
        if not (host.startswith("127.") or host in ("localhost", "::1")):
            raise ConnectionRefusedError(f"tests may not reach the network ({host})")
    return _real_connect(self, address)


@pytest.fixture(autouse=True)
def _block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)


# -- process clusters --------------------------------------------------------------------------
#: Imported once by the forkserver that the worker processes of the tests' LocalClusters are
#: forked from (what a worker of these tests imports anyway, for the tasks it unpickles).
FORKSERVER_PRELOAD = ["distributed", "numpy", "pandas", "torch", "icemap.workflow", "icemap.infer"]


@pytest.fixture(scope="session", autouse=True)
def _workers_from_a_forkserver(request: pytest.FixtureRequest) -> Iterator[None]:
    """The worker processes of process clusters started here are forked from one server.

    dask's default, ``spawn``, starts each worker as a new interpreter that imports distributed,
    then icemap and torch for its first task: about 3 s of a core per worker, a dozen clusters
    per run. ``forkserver`` (what distributed's own test suite uses, for this reason) forks
    them from a server that imported those once. The workers are still separate processes that
    share nothing with the test process: the server is a fresh interpreter, not a fork of the
    test, so options set in the test, caches and loaded models do not reach the workers, as
    with spawn, and every task is pickled to them. The server starts here, before any test, when
    the session has tests that start process clusters: it (and so every worker) has the
    session's environment, never what a test had set when its first cluster started. A test
    that means workers to see a variable passes it as the cluster's ``env=`` (the nanny sets it
    in the worker). Engines (SLURM, gateway, MPI), the CLI and benchmark processes are not
    affected: they start their own workers with dask's default. Measured on the 2-core machine
    (whole suite): 738 -> 629 s of CPU, 7:04-7:20 -> 6:42-6:49 of wall time.
    """
    import dask
    from distributed.utils import get_mp_context

    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        get_mp_context().set_forkserver_preload(FORKSERVER_PRELOAD)
        if any(_starts_cluster(item) for item in request.session.items):
            forkserver.ensure_running()  # returns at once; the server imports in the background
        yield


# -- dask guard --------------------------------------------------------------------------------
@contextlib.contextmanager
def raise_if_dask_computes() -> Iterator[None]:
    """Fail if anything inside the block computes a dask graph (graph building must be lazy)."""
    import dask

    def refuse(dsk: Any, keys: Any, **kwargs: Any) -> Any:
        raise AssertionError("a dask graph was computed where everything should stay lazy")

    with dask.config.set(scheduler=refuse):
        yield


# -- sample region -----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def sample_region(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A small sample region (3 dates, the first split into two scenes), generated once.

    160 px: the checks of what the maps say (guards, metrics, chips, areas, any-size U-Net
    crops) are calibrated on its lakes, shadows and glaciers.
    """
    from icemap.sample import make_sample_region

    return make_sample_region(tmp_path_factory.mktemp("region"), size=160, n_dates=3, seed=3)


@pytest.fixture(scope="session")
def small_region(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The same kind of region at 112 px, for the tests of how stores, runs and clusters behave.

    With the tests' 64 px chunks a time step is 2 x 2 chunks, the last row and column ragged
    (48 px): chunk edges and partial chunks are still exercised, with less than half the dask
    tasks of the 160 px region's 3 x 3 (a chunk costs ~10 tasks; an ingest takes ~2 s, not ~4.5 s).
    """
    from icemap.sample import make_sample_region

    return make_sample_region(tmp_path_factory.mktemp("small-region"), size=112, n_dates=3, seed=3)


@pytest.fixture(scope="session")
def sample_cube(sample_region: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample region ingested as the CLI does by default (every band, 64 px chunks), once
    per session (per xdist worker). Shared: tests read it; a test that changes a store copies it
    first. Its files are made read-only, so that a test writing into it fails (except as root)."""
    from icemap.stac import search
    from icemap.workflow import ingest

    path = tmp_path_factory.mktemp("sample-cube") / "cube.zarr"
    ingest(search(str(sample_region.catalog)).item_dicts(), path, chunksize=64)
    for f in path.rglob("*"):
        if f.is_file():
            f.chmod(0o444)
    return path


#: Arguments of the session's one demo run (small: 160 px, 2 seasons of 2 acquisitions).
DEMO_ARGS = ("--size", "160", "--years", "2", "--per-season", "2", "--quiet")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """``icemap demo`` once per session: its output folder and the finished command (in-process).
    Tests read the outputs; tests/test_demo.py's last test reruns it in the same folder."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    res = icemap_cli("demo", "--out", str(out), *DEMO_ARGS)
    assert res.returncode == 0, res.stderr
    return out, res


# -- STAC API on loopback -----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StacServer:
    """A running ``rustac serve`` process and what it serves."""

    def __init__(self, url: str, items: list[dict[str, Any]], proc: subprocess.Popen[bytes]):
        self.url = url
        self.items = items
        self.proc = proc


def _rustac() -> str:
    exe = shutil.which("rustac") or str(Path(sys.executable).with_name("rustac"))
    if not Path(exe).exists():
        pytest.fail("rustac is not installed; pip install -e '.[test]'")
    return exe


def serve_items(folder: Path, collection: dict[str, Any], items: list[dict[str, Any]]) -> StacServer:
    """Start ``rustac serve`` on the given collection and items; wait until it answers."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "collection.json").write_text(json.dumps(collection))
    with open(folder / "items.ndjson", "w") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [_rustac(), "serve", "--addr", f"127.0.0.1:{port}", str(folder / "collection.json"),
         str(folder / "items.ndjson")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rustac serve exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(url + "/", timeout=1) as r:
                if r.status == 200:
                    return StacServer(url, items, proc)
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("rustac serve did not answer within 30 s")


def sample_items_for_api(region: Any, n_extra: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The sample region's collection and items with absolute ``file://`` asset hrefs.

    ``n_extra`` adds copies of the items on other dates, cloud covers and platforms (same
    COGs), enough to exercise paging and filters.
    """
    from icemap.stac import search

    items = search(str(region.catalog)).item_dicts()
    out = []
    for it in items:
        it = json.loads(json.dumps(it))
        for a in it["assets"].values():
            a["href"] = Path(a["href"]).resolve().as_uri()
        it["links"] = []
        it["collection"] = region.collection
        out.append(it)
    base = out[-1]
    for k in range(n_extra):
        it = json.loads(json.dumps(base))
        it["id"] = f"{base['id']}_copy{k:02d}"
        it["properties"]["datetime"] = f"2019-{1 + k % 12:02d}-{1 + k % 27:02d}T14:30:00Z"
        it["properties"]["eo:cloud_cover"] = float((k * 7) % 100)
        it["properties"]["platform"] = "landsat-9" if k % 2 else "landsat-8"
        out.append(it)
    collection = json.loads(Path(region.root / region.collection / "collection.json").read_text())
    collection["links"] = []
    return collection, out


@pytest.fixture(scope="session")
def stac_api(small_region: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StacServer]:
    """A real STAC API (rustac) on loopback serving the small sample region plus 24 extra items."""
    collection, items = sample_items_for_api(small_region, n_extra=24)
    server = serve_items(tmp_path_factory.mktemp("stac-api"), collection, items)
    yield server
    server.proc.terminate()
    server.proc.wait(timeout=10)
