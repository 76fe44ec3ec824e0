"""Surviving faults without losing data, each with real processes.

* a worker process SIGKILLed while it runs a task of ``icemap map`` / ``icemap ingest`` (the
  nanny restarts it, the scheduler reruns the lost tasks): the store equals an uninterrupted
  run's, value by value;
* the ``icemap ingest`` process itself SIGKILLed after its first time step: the rerun skips the
  finished step and the store then equals an uninterrupted run's;
* a STAC API (real ``rustac serve``) behind a proxy that times out, resets and answers 5xx/429
  part of the time: search succeeds through retries; a permanently failing API is a clear error;
* corrupt and missing COGs read by a distributed cluster: the documented policy holds there too;
* many threads and processes writing many small chunks at once: every chunk arrives intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

import icemap
from icemap.cluster import local_cluster
from icemap.errors import StoreWarning
from icemap.stac import STAC_RETRIES, search

from .conftest import StacServer, icemap_cli
from .faultproxy import GATE_ENV, FaultProxy, KillOnExecute, gated_signer, wait_for

REPO = Path(__file__).resolve().parents[1]
SIGNER = "tests.faultproxy:gated_signer"
pytestmark = [pytest.mark.cluster, pytest.mark.slow]


# -- helpers ---------------------------------------------------------------------------------------
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "icemap.cli", *args]


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """In-process (a worker or client killed mid-run needs its own process: see ``_cli``).

    cwd=REPO: `tests.faultproxy` (the signer) is importable there.
    """
    return icemap_cli(*args, env=env, cwd=REPO)


def assert_stores_identical(a: str | Path, b: str | Path,
                            ignore_attrs: tuple[str, ...] = ("created", "icemap:last_run")) -> None:
    """Every array of two Zarr stores: same metadata, same values (NaN equal to NaN), same attrs.

    Only the time of creation and the provenance of a rerun (``icemap:last_run``) may differ.
    """
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    names_a = sorted(k for k, _ in ga.arrays())
    names_b = sorted(k for k, _ in gb.arrays())
    assert names_a == names_b
    for name in names_a:
        xa, xb = ga[name], gb[name]
        assert (xa.shape, xa.dtype, xa.chunks) == (xb.shape, xb.dtype, xb.chunks), name
        assert dict(xa.attrs) == dict(xb.attrs), name
        va, vb = xa[...], xb[...]
        if va.dtype.kind == "f":
            assert np.array_equal(va, vb, equal_nan=True), f"{name} differs"
        else:
            np.testing.assert_array_equal(va, vb, err_msg=name)
    assert _attrs_without(dict(ga.attrs), ignore_attrs) == _attrs_without(dict(gb.attrs), ignore_attrs)


def _attrs_without(attrs: dict[str, Any], ignore: tuple[str, ...]) -> dict[str, Any]:
    """Group attributes less ``ignore``; ``"A.b"`` drops key ``b`` of attribute ``A`` (JSON text
    attributes decoded first, e.g. the settings record's ``source_cube`` path)."""
    from icemap.interop import decode_attrs

    out = {k: v for k, v in decode_attrs(attrs).items() if k not in ignore}
    for entry in ignore:
        outer, _, inner = entry.rpartition(".")
        if outer and isinstance(out.get(outer), dict):
            out[outer] = {k: v for k, v in out[outer].items() if k != inner}
    return out


def _complete_flags(path: Path) -> list[int]:
    """The store's `complete` array, or [] while it does not exist yet (read while written)."""
    try:
        return [int(v) for v in zarr.open_group(str(path), mode="r")["complete"][...]]
    except Exception:  # noqa: BLE001 - any read error here only means "not yet"
        return []


def _date_keys(region: Any) -> list[str]:
    """Substrings of asset hrefs that identify each date (``YYYYMMDD`` in Landsat file names)."""
    return [d.replace("-", "") for d in region.dates]


@pytest.fixture(scope="module")
def cluster_client() -> Iterator[Any]:
    """2 worker processes under nannies (which restart killed workers), 2 threads each.

    ``lost-worker-timeout`` is long here: when a worker leaves, the cluster object schedules a
    check for 15 s later that closes the worker's nanny if no worker of that name is registered
    then. A check left from one test's kill fired during the next test's restart (the two
    kills less than 15 s apart) and closed a nanny that was restarting its worker.
    """
    import dask
    from distributed import Client

    with dask.config.set({"distributed.deploy.lost-worker-timeout": "10 minutes"}), \
            local_cluster(n_workers=2, threads_per_worker=2, processes=True) as cluster, \
            Client(cluster, set_as_default=False) as client:
        yield client


@pytest.fixture(scope="module")
def reference_cube(small_region: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted ingest, made exactly as the CLI makes it (same search, same signer)."""
    path = tmp_path_factory.mktemp("faults-ref") / "cube.zarr"
    icemap.ingest(search(str(small_region.catalog)), path, chunksize=64, signer=gated_signer)
    return path


@pytest.fixture(scope="module")
def reference_product(reference_cube: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("faults-ref") / "ice.zarr"
    icemap.map_cube(reference_cube, path)
    return path


def _kill_a_worker_mid_task(client: Any, marker: Path, proc: subprocess.Popen[str]) -> int:
    """Wait until a worker parks on a task (KillOnExecute wrote its pid), then SIGKILL it."""
    import psutil

    worker_pids = set(client.run(os.getpid).values())

    def parked() -> int | bool:
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"the job ended before a worker was killed: rc={proc.returncode} {err[-2000:]}")
        return marker.exists() and marker.read_text().strip() != "" and int(marker.read_text().split()[0])

    pid = int(wait_for(parked, 120, "a worker to start its task"))
    assert pid in worker_pids  # a worker of this cluster, started by this test, not anything else
    psutil.Process(pid).kill()  # SIGKILL: no cleanup, no goodbye to the scheduler
    return pid


def _after_restart(client: Any, killed: int) -> dict[str, Any]:
    """Wait for the nanny to replace the killed worker; return the workers' environment."""
    def replaced() -> bool:
        pids = client.run(os.getpid)
        return len(pids) == 2 and killed not in pids.values()

    # Bounded, but generous: a replacement worker starts a fresh interpreter, slow on a loaded host.
    wait_for(replaced, 150, "the nanny to restart the killed worker", interval=0.2)
    return client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))


# -- a worker dies mid-task ------------------------------------------------------------------------
@pytest.mark.process
@pytest.mark.parametrize("command", ["map", "ingest"])
def test_worker_killed_mid_task(command: str, cluster_client: Any, small_region: Any, reference_cube: Path,
                                reference_product: Path, tmp_path: Path) -> None:
    marker = tmp_path / "killed"
    plugin = KillOnExecute(str(marker), nth=4)
    cluster_client.register_plugin(plugin)
    try:
        out = tmp_path / f"{command}.zarr"
        if command == "map":
            args = ["map", "--cube", str(reference_cube), "--out", str(out)]
            reference = reference_product
        else:
            args = ["ingest", "--catalog", str(small_region.catalog), "--out", str(out), "--chunksize", "64",
                    "--signer", SIGNER]
            reference = reference_cube
        proc = subprocess.Popen(_cli(*args, "--scheduler", cluster_client.scheduler.address),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                env={**os.environ, "COLUMNS": "120"})
        try:
            killed = _kill_a_worker_mid_task(cluster_client, marker, proc)
            _, err = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, err
        # The progress display (one tick per time step) went on through the worker's death.
        assert f"{command}" in err and "3/3" in err and "wrote 3 time step(s)" in err
        assert_stores_identical(out, reference)
        # The replacement worker keeps the torch-friendly environment of the nanny.
        env = _after_restart(cluster_client, killed)
        assert set(env.values()) == {None}
    finally:
        cluster_client.unregister_worker_plugin(KillOnExecute.name)


# -- the client dies mid-ingest ----------------------------------------------------------------------
@pytest.mark.process
def test_client_killed_mid_ingest_resumes(small_region: Any, reference_cube: Path, tmp_path: Path) -> None:
    out = tmp_path / "cube.zarr"
    gate = tmp_path / "gate"
    gate.write_text("closed")
    later_dates = ",".join(_date_keys(small_region)[1:])
    args = ["ingest", "--catalog", str(small_region.catalog), "--out", str(out), "--chunksize", "64",
            "--signer", SIGNER, "--quiet"]
    # The gate holds every read of the 2nd and 3rd dates, so the kill lands after step 1
    # is complete and before step 2 is: deterministic, whatever the machine's speed.
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, GATE_ENV: f"{gate}|{later_dates}"})
    try:
        flags = wait_for(lambda: (_complete_flags(out) or [0])[0] == 1 and _complete_flags(out), 120,
                         "the first time step to complete")
        assert flags == [1, 0, 0]
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    with pytest.warns(StoreWarning, match="2 time step"):
        assert icemap.open_cube(out).sizes["time"] == 1
    gate.unlink()

    rerun = _run(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "wrote 2 time step(s), skipped 1 already complete" in rerun.stderr
    assert_stores_identical(out, reference_cube)


# -- an unreliable STAC API ---------------------------------------------------------------------------
def test_search_survives_timeouts_resets_and_5xx(stac_api: StacServer) -> None:
    direct = search(stac_api.url, limit=7).item_dicts()
    schedule = ["timeout", 503, "ok", "reset", 502, "ok", 429, 500, "ok", 504, "ok"]
    with FaultProxy(stac_api.url, schedule, hang_s=2.0, max_requests=200, max_seconds=90) as proxy:
        start = time.monotonic()
        items = search(proxy.url, limit=7, timeout=0.5, retries=4, backoff=0.01).item_dicts()
        elapsed = time.monotonic() - start
    assert [i["id"] for i in items] == [i["id"] for i in direct]
    # Faults were really injected, of every kind, and really retried.
    assert proxy.count("timeout") >= 1 and proxy.count("reset") >= 1
    assert all(proxy.count(code) >= 1 for code in (429, 500, 502, 503))
    assert proxy.count("ok") >= 3 and proxy.injected > proxy.count("ok")
    assert elapsed < 60


def test_cli_search_through_flaky_api(stac_api: StacServer) -> None:
    with FaultProxy(stac_api.url, [503, "ok"], max_requests=100, max_seconds=120) as proxy:
        res = _run("search", "--catalog", proxy.url, "--collection", "landsat-c2-l2", "--json")
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["features"]) == len(stac_api.items)
    assert proxy.count(503) >= 2


def test_cli_permanently_failing_api_is_a_clear_error(stac_api: StacServer, tmp_path: Path) -> None:
    """Every retry is spent, backing off as ``--backoff`` says, then one clear error.

    ``--backoff 0.05`` instead of the default 0.5: the same retries, waiting 1.5 s in all instead
    of 15 (urllib3 waits ``backoff * 2**(n-1)`` before the n-th retry, nothing before the first).
    """
    backoff = 0.05
    with FaultProxy(stac_api.url, [503], max_requests=100, max_seconds=120) as proxy:
        t0 = time.monotonic()
        res = _run("ingest", "--catalog", proxy.url, "--out", str(tmp_path / "c.zarr"), "--quiet",
                   "--backoff", str(backoff), timeout=120)
        elapsed = time.monotonic() - t0
    assert elapsed >= sum(backoff * 2 ** (n - 1) for n in range(2, STAC_RETRIES + 1))  # the waits happened
    assert res.returncode == 1
    assert f"failed after {STAC_RETRIES} retries" in res.stderr and "503" in res.stderr
    assert "Traceback" not in res.stderr
    assert proxy.count(503) == STAC_RETRIES + 1  # the first try and the retries, then it stopped asking
    assert not (tmp_path / "c.zarr").exists()


# -- unreadable assets on a distributed cluster ------------------------------------------------------
# This process's client is connected to the same scheduler and receives the forwarded warnings too.
@pytest.mark.filterwarnings("ignore::icemap.errors.MissingAssetWarning")
def test_unreadable_and_missing_cogs_on_a_cluster(cluster_client: Any, small_region: Any, tmp_path: Path) -> None:
    """The unreadable-asset policy, with the reads done by worker processes.

    By default: exit 1 with a one-line error naming the asset (the LoadError must survive the
    trip from worker to client as a LoadError); with --on-error nodata: NaN for those assets
    and a MissingAssetWarning naming each, shown by the CLI that ran the job, not only in a
    worker's log.
    """
    region = tmp_path / "region"
    shutil.copytree(small_region.root, region)
    last = _date_keys(small_region)[-1]
    corrupt = next(p for p in region.rglob("*_SR_B6.TIF") if last in p.name)  # swir16
    missing = next(p for p in region.rglob("*_SR_B3.TIF") if last in p.name)  # green
    corrupt.write_bytes(b"II*\x00 not a tiff any more")
    missing.unlink()
    args = ["ingest", "--catalog", str(region / "catalog.json"), "--chunksize", "64", "--quiet",
            "--scheduler", cluster_client.scheduler.address]

    res = _run(*args, "--out", str(tmp_path / "raise.zarr"))
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "icemap: error: cannot read asset" in res.stderr
    assert corrupt.name in res.stderr or missing.name in res.stderr
    assert "--on-error nodata" in res.stderr

    res = _run(*args, "--out", str(tmp_path / "nodata.zarr"), "--on-error", "nodata")
    assert res.returncode == 0, res.stderr
    cube = icemap.open_cube(tmp_path / "nodata.zarr")
    refl = cube["reflectance"].isel(time=-1)
    assert np.isnan(refl.sel(band="swir16").values).all() and np.isnan(refl.sel(band="green").values).all()
    assert np.isfinite(refl.sel(band="nir08").values).any()
    assert np.isfinite(cube["reflectance"].isel(time=0).sel(band="green").values).any()
    assert "MissingAssetWarning" in res.stderr
    assert corrupt.name in res.stderr and missing.name in res.stderr


# -- many concurrent writers -------------------------------------------------------------------------
def _synthetic_cube(n_time: int = 2, size: int = 128, chunk: int = 24) -> Any:
    """A cube of distinct, NaN-free values, with dask chunks deliberately not the store's."""
    import dask.array as da
    import pandas as pd
    import rioxarray  # noqa: F401  (.rio)
    import xarray as xr

    rng = np.random.default_rng(42)
    refl = rng.random((n_time, 2, size, size), dtype=np.float32)
    qa = rng.integers(0, 2**16, (n_time, size, size), dtype=np.uint16)
    ds = xr.Dataset(
        {"reflectance": (("time", "band", "y", "x"), da.from_array(refl, chunks=(1, 1, chunk, chunk))),
         "qa_pixel": (("time", "y", "x"), da.from_array(qa, chunks=(1, chunk, chunk)))},
        coords={"time": pd.date_range("2021-02-01", periods=n_time, freq="7D"),
                "band": ["green", "swir16"],
                "y": 5_000_000.0 - 30 * np.arange(size) - 15, "x": 400_000.0 + 30 * np.arange(size) + 15},
    )
    return ds.rio.write_crs("EPSG:32719")


def _checksums(blocks: Iterator[tuple[tuple[int, ...], np.ndarray]]) -> dict[tuple[int, ...], str]:
    return {idx: hashlib.sha256(np.ascontiguousarray(b).tobytes()).hexdigest() for idx, b in blocks}


def _blocks(arr: Any, chunks: tuple[int, ...]) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    grid = [range(-(-s // c)) for s, c in zip(arr.shape, chunks)]
    for idx in np.ndindex(*[len(g) for g in grid]):
        sel = tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, chunks))
        yield idx, np.asarray(arr[sel])


@pytest.mark.parametrize("scheduler", ["threads", "distributed"])
def test_concurrent_writes_lose_no_chunk(scheduler: str, cluster_client: Any, tmp_path: Path) -> None:
    import dask

    ds = _synthetic_cube()
    path = tmp_path / "many.zarr"
    chunk = 16  # 8 x 8 chunks per band and date: 256 reflectance + 128 qa chunks in all
    if scheduler == "threads":
        with dask.config.set(scheduler="threads", num_workers=16):
            icemap.write_cube(ds, path, chunksize=chunk)
    else:
        with dask.config.set(scheduler=cluster_client):
            icemap.write_cube(ds, path, chunksize=chunk)
    group = zarr.open_group(str(path), mode="r")
    for name, chunks in (("reflectance", (1, 1, chunk, chunk)), ("qa_pixel", (1, chunk, chunk))):
        stored = group[name]
        assert stored.chunks == chunks
        expected = _checksums(_blocks(ds[name].values, chunks))
        got = _checksums(_blocks(stored, chunks))
        assert got == expected, f"{sum(got[k] != v for k, v in expected.items())} {name} chunk(s) differ"
        # Every chunk was written to storage (none silently dropped or left to the fill value).
        assert stored.nchunks_initialized == len(expected) == stored.nchunks
    assert list(group["complete"][...]) == [1, 1]
