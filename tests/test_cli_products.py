"""`icemap map`, `evaluate` and `calibrate` through the command line, on a real cube store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.features import rasterize

import icemap
from icemap.labels import read_outlines
from icemap.stac import search

EVALUATE_KEYS = {
    "f1", "precision", "recall", "iou", "balanced_accuracy", "overall_accuracy", "kappa",
    "missed_alarm", "false_alarm", "ice_area_km2", "reference_area_km2", "area_diff_pct",
}


def _icemap(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "icemap.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cube_path(sample_region: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cube") / "cube.zarr"
    icemap.ingest(search(sample_region.catalog).item_dicts(), path, chunksize=64)
    return path


@pytest.fixture(scope="module")
def product(cube_path: Path, sample_region: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("product")
    paths = {"out": folder / "ice.zarr", "tif": folder / "tif", "outlines": folder / "ice.gpkg",
             "png": folder / "quicklook.png"}
    res = _icemap("map", "--cube", str(cube_path), "--method", "ndsi", "--threshold", "0.4",
                  "--guards", "water", "--out", str(paths["out"]), "--geotiff", str(paths["tif"]),
                  "--outlines", str(paths["outlines"]), "--quicklook", str(paths["png"]),
                  "--reference", str(sample_region.outlines), "--quiet")
    assert res.returncode == 0, res.stderr
    return paths


def test_map_writes_ndsi_and_ice_on_the_cube_grid(cube_path: Path, product: dict[str, Path]) -> None:
    cube = icemap.open_cube(cube_path)
    prod = icemap.open_cube(product["out"])
    assert prod["ndsi"].dims == ("time", "y", "x") and prod["ndsi"].dtype == np.float32
    assert prod["ice"].dims == ("time", "y", "x") and prod["ice"].dtype == np.uint8
    assert prod.rio.crs == cube.rio.crs and prod.rio.transform() == cube.rio.transform()
    expected = icemap.ice_mask(cube, threshold=0.4, guards=["water"]).values
    np.testing.assert_array_equal(prod["ice"].values, expected)
    np.testing.assert_array_equal(prod["ndsi"].values, icemap.ndsi(cube).values)
    assert set(np.unique(prod["ice"].values)) <= {0, 1, 255}


def test_map_side_products(cube_path: Path, product: dict[str, Path], sample_region: Any) -> None:
    prod = icemap.open_cube(product["out"])
    tifs = sorted(product["tif"].glob("*.tif"))
    assert len(tifs) == 2 * prod.sizes["time"]
    first_ice = next(p for p in tifs if p.name.startswith("ice_"))
    with rasterio.open(first_ice) as src:
        assert src.crs == prod.rio.crs and src.transform == prod.rio.transform() and src.nodata == 255
        np.testing.assert_array_equal(src.read(1), prod["ice"].isel(time=0).values)
    outlines = read_outlines(product["outlines"])
    px = 900 / 1e6
    for t, group in outlines.groupby("time"):
        n_ice = int((prod["ice"].sel(time=np.datetime64(t.tz_localize(None))).values == 1).sum())
        assert group["area_km2"].sum() == pytest.approx(n_ice * px)
    # --reference gives the polygons inside an outline its glacier id; the product its provenance.
    ref_ids = set(read_outlines(sample_region.outlines)["glacier_id"].astype(str))
    assert outlines["glacier_id"].notna().any() and set(outlines["glacier_id"].dropna()) <= ref_ids
    assert set(outlines["method"]) == {"ndsi"} and set(outlines["threshold"]) == {0.4}
    assert (outlines["source_item_ids"] != "").all()
    assert product["png"].stat().st_size > 1000


def test_map_rerun_skips(cube_path: Path, product: dict[str, Path]) -> None:
    res = _icemap("map", "--cube", str(cube_path), "--threshold", "0.4", "--guards", "water",
                  "--out", str(product["out"]), "--quiet")
    assert res.returncode == 0 and "wrote 0 time step(s), skipped 3" in res.stderr


def test_evaluate_json_matches_numpy(product: dict[str, Path], sample_region: Any) -> None:
    res = _icemap("evaluate", "--pred", str(product["out"]), "--reference", str(sample_region.outlines), "--json")
    assert res.returncode == 0, res.stderr
    scores = json.loads(res.stdout)
    assert EVALUATE_KEYS <= set(scores)
    # Independent computation: outlines burnt at pixel centres, nodata pixels left out, all dates pooled.
    prod = icemap.open_cube(product["out"])
    gdf = read_outlines(sample_region.outlines, crs=prod.rio.crs)
    ref = rasterize(((g, 1) for g in gdf.geometry), out_shape=(prod.sizes["y"], prod.sizes["x"]),
                    transform=prod.rio.transform(), fill=0, dtype="uint8")
    ice = prod["ice"].values
    ok = ice != 255
    refb = np.broadcast_to(ref == 1, ice.shape)
    tp = int((ok & (ice == 1) & refb).sum())
    fp = int((ok & (ice == 1) & ~refb).sum())
    fn = int((ok & (ice == 0) & refb).sum())
    tn = int((ok & (ice == 0) & ~refb).sum())
    assert scores["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert scores["precision"] == pytest.approx(tp / (tp + fp))
    assert scores["missed_alarm"] == pytest.approx(fn / (tp + fn))
    n = tp + fp + fn + tn
    po = (tp + tn) / n
    pe = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / n**2
    assert scores["kappa"] == pytest.approx((po - pe) / (1 - pe))
    assert scores["ice_area_km2"] == pytest.approx((tp + fp) * 900 / 1e6)


def test_evaluate_one_date_and_per_glacier(product: dict[str, Path], sample_region: Any, tmp_path: Path) -> None:
    day = sample_region.dates[1]
    csv = tmp_path / "per_glacier.csv"
    res = _icemap("evaluate", "--pred", str(product["out"]), "--reference", str(sample_region.outlines),
                  "--time", day, "--buffer", "15", "--per-glacier", str(csv), "--json")
    assert res.returncode == 0, res.stderr
    assert csv.exists() and csv.stat().st_size > 0


def test_calibrate(cube_path: Path, sample_region: Any, tmp_path: Path) -> None:
    res = _icemap("calibrate", "--cube", str(cube_path), "--reference", str(sample_region.outlines),
                  "--curve", str(tmp_path / "curve.csv"), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert -1 <= out["threshold"] <= 1 and out["method"] == "f1"
    import pandas as pd

    curve = pd.read_csv(tmp_path / "curve.csv")
    assert out["f1"] == pytest.approx(curve["f1"].max())
    otsu = _icemap("calibrate", "--cube", str(cube_path), "--method", "otsu", "--json")
    assert otsu.returncode == 0 and -1 <= json.loads(otsu.stdout)["threshold"] <= 1
    missing = _icemap("calibrate", "--cube", str(cube_path), "--method", "f1")
    assert missing.returncode == 1 and "--reference" in missing.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["map", "--cube", "/nonexistent.zarr", "--out", "/tmp/x.zarr"], "no Zarr store"),
        (["evaluate", "--pred", "/nonexistent.zarr", "--reference", "x.gpkg"], "no Zarr store"),
    ],
)
def test_bad_input_exit_code(args: list[str], message: str) -> None:
    res = _icemap(*args)
    assert res.returncode == 1 and message in res.stderr and "Traceback" not in res.stderr


def test_map_unknown_guard(cube_path: Path, tmp_path: Path) -> None:
    res = _icemap("map", "--cube", str(cube_path), "--guards", "clouds", "--out", str(tmp_path / "p.zarr"), "--quiet")
    assert res.returncode == 1 and "water" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.cluster
def test_evaluate_on_a_cluster_equals_threads(product: dict[str, Path], sample_region: Any) -> None:
    args = ["evaluate", "--pred", str(product["out"]), "--reference", str(sample_region.outlines), "--json"]
    threads = _icemap(*args)
    cluster = _icemap(*args, "--scheduler", "local?workers=2&threads=1")
    assert threads.returncode == 0 and cluster.returncode == 0, cluster.stderr
    assert json.loads(cluster.stdout) == json.loads(threads.stdout)
