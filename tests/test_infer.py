"""Distributed U-Net inference: seams, laziness, graph contents, nodata, GPU routing, CLI."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import icemap
from icemap.errors import ModelError
from icemap.infer import ModelRef, default_halo, keep_resources, predict, predict_array
from icemap.model.checkpoint import CheckpointMeta, read_metadata, save_checkpoint
from icemap.model.inputs import Normalisation, build_inputs
from icemap.model.unet import UNet, UNetConfig
from icemap.stac import search

from .conftest import icemap_cli, raise_if_dask_computes, shared_path


def make_model(folder: Path, *, base: int = 4, depth: int = 3, seed: int = 0, dropout: float = 0.0) -> Path:
    """A small model with non-trivial weights and batch-norm statistics."""
    torch.manual_seed(seed)
    model = UNet(UNetConfig(in_channels=2, depth=depth, base=base, dropout=dropout))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    meta = CheckpointMeta(architecture={}, channels=["green", "swir16"], bands=["green", "swir16"],
                          normalisation=Normalisation([0.0, 0.0], [1.0, 0.5]).to_dict(), threshold=0.5)
    return save_checkpoint(model, meta, folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="module")
def items(sample_region: Any) -> list[dict[str, Any]]:
    return search(sample_region.catalog).item_dicts()


def whole_array(cube: Any, model_dir: Path) -> np.ndarray:
    """Reference: every time step through the network in one window, no tiles, no chunks."""
    meta = read_metadata(model_dir)
    x = build_inputs(cube, meta.channels).values
    norm = Normalisation.from_dict(meta.normalisation)
    ref = ModelRef.from_path(model_dir)
    return np.stack([predict_array(x[t], ref, norm, depth=meta.architecture["depth"], halo=10**6, tile=10**6)[0]
                     for t in range(x.shape[0])])


@pytest.mark.cluster
def test_chunked_equals_whole_on_a_cluster(items: list[dict[str, Any]], model_dir: Path) -> None:
    from distributed import Client

    from icemap.cluster import local_cluster

    cube = icemap.load(items, bands=["green", "swir16"], chunksize=64)
    expected = whole_array(cube, model_dir)
    with local_cluster(n_workers=2, threads_per_worker=1, processes=True) as cluster, Client(cluster):
        for chunks, tile in ((64, 32), (48, 24), (160, 64)):
            out = predict(icemap.load(items, bands=["green", "swir16"], chunksize=chunks), model_dir, tile=tile,
                          batch_size=3)
            got = out["ice_probability"].values
            assert np.array_equal(np.isnan(got), np.isnan(expected))
            np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0)


def test_halo_sizes(items: list[dict[str, Any]], model_dir: Path) -> None:
    # Read once (persist keeps the dask chunks): every halo below predicts from the same pixels.
    cube = icemap.load(items, bands=["green", "swir16"], chunksize=64).persist()
    expected = whole_array(cube, model_dir)
    meta = read_metadata(model_dir)
    rf = UNetConfig(**meta.architecture).receptive_field
    exact = default_halo(3, rf)
    assert exact % 8 == 0 and exact >= rf / 2
    for halo in (exact, exact + 8):
        got = predict(cube, model_dir, halo=halo, tile=32)["ice_probability"].values
        np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0)
    # No halo at all: seams appear at chunk edges (what the halo exists to prevent).
    seams = predict(cube, model_dir, halo=0, tile=32)["ice_probability"].values
    assert np.nanmax(np.abs(seams - expected)) > 1e-3


def test_study_scorer_runs_the_shipped_predictor(items: list[dict[str, Any]], model_dir: Path) -> None:
    """The experiment/report path (predict_window, in memory, a model object) gives the
    probabilities that ``icemap.predict`` (chunked, lazy, a model by reference) writes."""
    from icemap.model.checkpoint import load_checkpoint
    from icemap.lab.train import predict_window

    cube = icemap.load(items, bands=["green", "swir16"], chunksize=64)
    shipped = predict(cube, model_dir, tile=32)["ice_probability"].values
    model, meta = load_checkpoint(model_dir)
    studied = predict_window(model, meta, cube["reflectance"].load())
    assert np.array_equal(np.isnan(studied), np.isnan(shipped))
    np.testing.assert_allclose(studied, shipped, atol=2e-6, rtol=0)


def test_output_grid_and_values(items: list[dict[str, Any]], model_dir: Path) -> None:
    cube = icemap.load(items, bands=["green", "swir16"], chunksize=64)
    out = predict(cube, model_dir)
    assert out.rio.crs == cube.rio.crs and out.rio.transform() == cube.rio.transform()
    assert out["ice_probability"].dtype == np.float32 and out["ice"].dtype == np.uint8
    prob, ice = out["ice_probability"].values, out["ice"].values
    np.testing.assert_array_equal(ice[np.isnan(prob)], 255)
    np.testing.assert_array_equal(ice[~np.isnan(prob)], (prob[~np.isnan(prob)] >= 0.5).astype(np.uint8))
    # Nodata follows the inputs: masked (cloud, fill) pixels stay nodata.
    inputs_nan = np.isnan(cube["reflectance"].values).any(axis=1)
    np.testing.assert_array_equal(np.isnan(prob), inputs_nan)


def test_graph_is_lazy_and_holds_no_weights(items: list[dict[str, Any]], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import icemap.infer

    # Patched where the predictor looks it up (icemap.infer imports it at its top).
    monkeypatch.setattr(icemap.infer, "load_checkpoint", lambda *a, **k: pytest.fail("weights loaded while building"))
    cube = icemap.load(items, bands=["green", "swir16"], chunksize=64)
    small = make_model(tmp_path / "small", base=4)
    large = make_model(tmp_path / "large", base=32)
    assert (large / "model.safetensors").stat().st_size > 50 * (small / "model.safetensors").stat().st_size
    with raise_if_dask_computes():
        g_small = predict(cube, small)["ice_probability"].data.__dask_graph__()
        g_large = predict(cube, large)["ice_probability"].data.__dask_graph__()
    size_small, size_large = len(pickle.dumps(dict(g_small))), len(pickle.dumps(dict(g_large)))
    assert abs(size_large - size_small) < 2000  # model size does not reach the graph
    assert not any(isinstance(v, torch.Tensor) for v in dict(g_large).values())


def test_changed_checkpoint_changes_keys(items: list[dict[str, Any]], tmp_path: Path) -> None:
    cube = icemap.load(items, bands=["green", "swir16"], chunksize=64)
    folder = make_model(tmp_path / "m", seed=1)
    first = predict(cube, folder)["ice_probability"].data.name
    assert predict(cube, folder)["ice_probability"].data.name == first  # deterministic
    make_model(tmp_path / "m", seed=2)  # retrained in place
    assert predict(cube, folder)["ice_probability"].data.name != first


def test_all_nodata_chunks_cost_nothing(items: list[dict[str, Any]], model_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import icemap.infer as infer

    calls: list[int] = []
    real = infer._run_batches
    monkeypatch.setattr(infer, "_run_batches", lambda *a, **k: calls.append(1) or real(*a, **k))
    cube = icemap.load(items, bands=["green", "swir16"], chunksize=64)
    # Blank the top-left chunk of every date.
    refl = cube["reflectance"].copy()
    refl[:, :, :64, :64] = np.nan
    cube = cube.assign(reflectance=refl)
    out = predict(cube, model_dir, tile=64)
    prob = out["ice_probability"].values
    assert np.isnan(prob[:, :64, :64]).all()
    n_blocks = out["ice_probability"].data.npartitions
    assert 0 < len(calls) < n_blocks * 4  # the blank chunks ran no batch


def test_tta_and_mc_dropout(items: list[dict[str, Any]], model_dir: Path, tmp_path: Path) -> None:
    cube = icemap.load(items[-1:], bands=["green", "swir16"], chunksize=64)
    out = predict(cube, model_dir, tta=True)
    std = out["ice_probability_std"].values
    assert np.nanmin(std) >= 0 and np.nanmax(std) > 0
    # TTA is also seam-free: chunked equals one window.
    whole = predict(cube.chunk({"y": -1, "x": -1}), model_dir, tta=True)["ice_probability"].values
    np.testing.assert_allclose(out["ice_probability"].values, whole, atol=2e-6, rtol=0)
    with pytest.raises(ModelError, match="dropout"):
        predict(cube, model_dir, mc_samples=4)
    dropped = make_model(tmp_path / "d", dropout=0.3)
    mc = predict(cube, dropped, mc_samples=3)
    assert np.nanmax(mc["ice_probability_std"].values) > 0


@pytest.mark.cluster
def test_gpu_workers_take_the_inference_tasks(items: list[dict[str, Any]], model_dir: Path) -> None:
    """Tasks carry the GPU resource; only workers advertising it run them (CPU torch here)."""
    from distributed import Client, LocalCluster, get_task_stream

    cube = icemap.load(items[-1:], bands=["green", "swir16"], chunksize=64)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      resources={"GPU": 1}) as cluster, Client(cluster) as client:
        # A second, CPU-only worker in its own process, as on a mixed cluster.
        cpu = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
                                "--nthreads", "1", "--no-dashboard"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        try:
            client.wait_for_workers(2, timeout=60)
            workers = client.scheduler_info()["workers"]
            gpu_addr = [a for a, w in workers.items() if w.get("resources", {}).get("GPU")]
            assert len(gpu_addr) == 1 and len(workers) == 2
            out = predict(cube, model_dir)  # default: annotate because the cluster has a GPU worker
            assert out.attrs["gpu_resources"] == 1
            with get_task_stream(client) as ts, keep_resources():
                out["ice_probability"].values
            ran_on = {t["worker"] for t in ts.data if "icemap-unet" in str(t["key"])}
            # Reading tasks: odc-stac's are named after the band ("green-<token>"), stackstac's
            # "fetch_raster..." / "stackstac-...".
            read_keys = ("stackstac", "fetch_raster", "('green-", "('swir16-")
            loaded_on = {t["worker"] for t in ts.data if any(k in str(t["key"]) for k in read_keys)}
            assert ran_on == set(gpu_addr)
            assert loaded_on  # reading ran too (on either worker)
        finally:
            cpu.terminate()
            cpu.wait(timeout=30)


def test_cli_map_unet_resumes(items: list[dict[str, Any]], model_dir: Path, tmp_path: Path) -> None:
    cube_path = tmp_path / "cube.zarr"
    icemap.ingest(items, cube_path, bands=["green", "swir16", "nir08"], chunksize=64)
    out = tmp_path / "unet.zarr"
    args = ["map", "--cube", str(cube_path), "--method", "unet", "--model", str(model_dir), "--out", str(out),
            "--batch-size", "4", "--tile", "32", "--quiet"]
    res = icemap_cli(*args)
    assert res.returncode == 0, res.stderr
    prod = icemap.open_cube(out)
    assert set(prod.data_vars) >= {"ice_probability", "ice"}
    direct = predict(icemap.open_cube(cube_path), model_dir)["ice_probability"].values
    np.testing.assert_allclose(prod["ice_probability"].values, direct, atol=2e-6, rtol=0)
    assert prod.attrs["model_sha256"] == read_metadata(model_dir).weights_sha256
    again = icemap_cli(*args)
    assert again.returncode == 0 and "wrote 0 time step(s)" in again.stderr
    missing = icemap_cli(*args[:6], str(tmp_path / "nomodel"), *args[7:])
    assert missing.returncode == 1 and "no checkpoint" in missing.stderr


def test_cube_without_model_bands(items: list[dict[str, Any]], model_dir: Path) -> None:
    cube = icemap.load(items, bands=["green", "nir08"])
    with pytest.raises(ModelError, match="swir16"):
        predict(cube, model_dir)


def test_torch_threads_never_oversubscribe(monkeypatch: pytest.MonkeyPatch) -> None:
    from icemap.infer import _cpu_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what distributed's nanny sets for workers
    assert _cpu_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    import dask

    cores = len(__import__("os").sched_getaffinity(0))
    with dask.config.set(num_workers=cores):
        assert _cpu_threads() == 1
    with dask.config.set(num_workers=1):
        assert _cpu_threads() == cores


# ----------------------------------------------------------------------------------------------
# Any cube size, any chunk layout: the same probabilities as the whole-array run
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h, w", [(1, 1), (1, 50), (50, 1), (40, 40), (130, 7), (7, 130), (150, 97)])
def test_any_cube_size_equals_whole(items: list[dict[str, Any]], model_dir: Path, h: int, w: int) -> None:
    """Cubes smaller than the halo (which dask's overlap refuses) and layouts with a small last
    chunk map, with the whole-array run's probabilities and nodata."""
    meta = read_metadata(model_dir)
    halo = default_halo(meta.architecture["depth"], UNetConfig(**meta.architecture).receptive_field)
    # Each case has an axis shorter than the halo (dask's overlap refused it) or one that
    # splits into chunks with halos next to a single-chunk axis.
    assert min(h, w) < halo or max(h, w) >= 2 * halo
    base = icemap.load(items, bands=["green", "swir16"], chunksize=64)
    # Offsets off the chunk grid: the slice's last chunk is a small remainder (e.g. 61 + 64 + 25).
    sub = base.isel(y=slice(3, 3 + h), x=slice(21, 21 + w))
    expected = whole_array(sub, model_dir)
    assert expected.shape == (sub.sizes["time"], h, w) and np.isfinite(expected).any()
    for cube in (sub, sub.chunk({"y": 37, "x": 29}), sub.compute()):
        got = predict(cube, model_dir, tile=32, batch_size=3)["ice_probability"].values
        assert got.shape == expected.shape
        assert np.array_equal(np.isnan(got), np.isnan(expected))
        np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0)


@pytest.fixture(scope="module")
def athabasca() -> Any:
    """The real HLS L30 Athabasca crop: 18 % of its pixels have a negative band (shadow)."""
    from icemap.lab.default import _athabasca

    return _athabasca(shared_path("athabasca_hls_l30").parent)


def _default_whole(cube: Any) -> np.ndarray:
    """The default model on the whole window, each date in one piece (no chunks, no tiles)."""
    from icemap.model.packaged import default_model_dir

    return whole_array(cube, default_model_dir())


def test_negative_reflectance_is_mapped(athabasca: Any) -> None:
    """Only masked (NaN) bands make nodata: negative bands are mapped, as by the NDSI."""
    refl = athabasca["reflectance"]
    bands = [str(b) for b in refl["band"].values]
    r = refl.values
    masked = np.isnan(r).any(axis=1)
    negative = (r < 0).any(axis=1) & ~masked
    # Where green and nir08 (or swir16) are both <= 0 an index is 0/0: these are the pixels
    # that used to become nodata.
    g, n = r[:, bands.index("green")], r[:, bands.index("nir08")]
    zero_zero = (g <= 0) & (n <= 0) & ~masked
    assert negative.mean() > 0.1 and zero_zero.sum() > 100
    out = icemap.predict(athabasca)
    prob, ice = out["ice_probability"].values, out["ice"].values
    np.testing.assert_array_equal(np.isnan(prob), masked)
    assert set(np.unique(ice[negative]).tolist()) <= {0, 1}
    # Every pixel the NDSI maps, the U-Net maps too.
    ndsi_mapped = icemap.ice_mask(athabasca).values != 255
    assert (ice[ndsi_mapped] != 255).all()
    # The lazy, chunked run equals the whole-array run on these pixels as everywhere.
    np.testing.assert_allclose(prob, _default_whole(athabasca), atol=2e-6, rtol=0)


@pytest.mark.parametrize("h, w", [(1, 1), (1, 50), (40, 40), (130, 7)])
def test_cli_maps_tiny_cubes(athabasca: Any, tmp_path: Path, h: int, w: int) -> None:
    """``icemap map --method unet`` (in-process) on cubes smaller than the halo, stored in
    small chunks with a small last one: the whole-array run's probabilities."""
    from typer.testing import CliRunner

    from icemap.cli import app
    from icemap.store import write_cube

    sub = athabasca.isel(y=slice(60, 60 + h), x=slice(70, 70 + w))
    cube_path, out = tmp_path / "cube.zarr", tmp_path / "unet.zarr"
    write_cube(sub, cube_path, chunksize=16)
    result = CliRunner().invoke(app, ["map", "--cube", str(cube_path), "--method", "unet", "--out", str(out),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    prod = icemap.open_cube(out)
    got = prod["ice_probability"].values
    expected = _default_whole(icemap.open_cube(cube_path))
    assert got.shape == (1, h, w) and np.isfinite(expected).any()
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0)
    assert prod.rio.crs.to_epsg() == 32611
