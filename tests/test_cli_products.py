"""`icemap map`, `evaluate` and `calibrate` through the command line, on a real cube store."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.features import rasterize

import icemap
from icemap.labels import read_outlines

from .conftest import icemap_cli

EVALUATE_KEYS = {
    "f1", "precision", "recall", "iou", "balanced_accuracy", "overall_accuracy", "kappa",
    "missed_alarm", "false_alarm", "ice_area_km2", "reference_area_km2", "area_diff_pct",
}


_icemap = icemap_cli


@pytest.fixture(scope="module")
def cube_path(sample_cube: Path) -> Path:
    return sample_cube


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
    # Two in-process workers behind a TCP scheduler (the CLI refuses inproc:// addresses); the
    # `local?workers=...` form that starts worker processes is tests/test_cluster.py's.
    from distributed import Client

    from icemap.cluster import local_cluster

    with local_cluster(n_workers=2, threads_per_worker=1, processes=False, host="127.0.0.1",
                       protocol="tcp") as lc, Client(lc, set_as_default=False):
        cluster = _icemap(*args, "--scheduler", lc.scheduler_address)
    assert threads.returncode == 0 and cluster.returncode == 0, cluster.stderr
    assert json.loads(cluster.stdout) == json.loads(threads.stdout)


# -- inputs checked, failures in one line --------------------------------------------------------------
def _one_line(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    """A failed command's stderr: exit 1, one `icemap: error:` line, no traceback, naming ``needles``."""
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("icemap: error:")]
    assert len(errors) == 1, res.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _geotiff(path: Path, *, width: int = 12, height: int = 10, crs: str = "EPSG:32719") -> np.ndarray:
    from rasterio.transform import from_origin

    dn = np.random.default_rng(1).integers(7000, 20000, (2, height, width)).astype("uint16")
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=2, dtype="uint16", crs=crs,
                       transform=from_origin(500010.0, 4000020.0, 30.0, 30.0)) as dst:
        dst.write(dn)
    return dn


def test_scale_without_offset_means_offset_zero_and_says_so(tmp_path: Path) -> None:
    dn = _geotiff(tmp_path / "s2.tif")
    res = _icemap("ingest", "--files", str(tmp_path / "s2.tif"), "--band-map", "green=1,swir16=2",
                  "--datetime", "2022-02-01", "--scale", "0.0001", "--out", str(tmp_path / "c.zarr"), "--quiet")
    assert res.returncode == 0, res.stderr
    assert "offset 0" in res.stderr
    refl = icemap.open_cube(tmp_path / "c.zarr")["reflectance"].sel(band="green").values[0]
    np.testing.assert_allclose(refl, dn[0] * 0.0001, rtol=1e-6)  # not DN * 0.0001 - 0.2


@pytest.mark.parametrize("scale", ["-0.0001", "0", "nan", "inf", "1e9"])
def test_implausible_scales_are_refused(scale: str, tmp_path: Path) -> None:
    _geotiff(tmp_path / "s2.tif")
    res = _icemap("ingest", "--files", str(tmp_path / "s2.tif"), "--band-map", "green=1,swir16=2",
                  "--datetime", "2022-02-01", f"--scale={scale}", "--out", str(tmp_path / "c.zarr"), "--quiet")
    _one_line(res, "scale")
    assert not (tmp_path / "c.zarr").exists()


def test_datetimes_with_offsets_are_stored_in_utc_beside_plain_dates(tmp_path: Path) -> None:
    _geotiff(tmp_path / "a.tif")
    _geotiff(tmp_path / "b.tif")
    res = _icemap("ingest", "--files", str(tmp_path / "a.tif"), "--files", str(tmp_path / "b.tif"),
                  "--band-map", "green=1,swir16=2", "--datetime", "2022-02-01",
                  "--datetime", "2022-02-05T10:00:00+05:00", "--out", str(tmp_path / "c.zarr"), "--quiet")
    assert res.returncode == 0, res.stderr
    times = [str(t)[:19] for t in icemap.open_cube(tmp_path / "c.zarr")["time"].values]
    assert times == ["2022-02-01T00:00:00", "2022-02-05T05:00:00"]


def test_crs_on_local_files_is_the_grid_to_warp_to(tmp_path: Path) -> None:
    _geotiff(tmp_path / "a.tif", width=40, height=30)
    res = _icemap("ingest", "--files", str(tmp_path / "a.tif"), "--band-map", "green=1,swir16=2",
                  "--datetime", "2022-02-01", "--crs", "EPSG:32718", "--out", str(tmp_path / "c.zarr"), "--quiet")
    assert res.returncode == 0, res.stderr
    cube = icemap.open_cube(tmp_path / "c.zarr")
    assert cube.rio.crs.to_epsg() == 32718
    assert cube.sizes["x"] > 30 and cube.sizes["y"] > 20  # warped, not a 1 x 1 px cube
    assert int(cube["reflectance"].sel(band="green").notnull().sum()) > 0.5 * 40 * 30


def test_one_pixel_wide_product_has_the_grids_pixel_area(tmp_path: Path) -> None:
    from icemap.vector import pixel_area_m2

    _geotiff(tmp_path / "thin.tif", width=1, height=9)
    res = _icemap("ingest", "--files", str(tmp_path / "thin.tif"), "--band-map", "green=1,swir16=2",
                  "--datetime", "2022-02-01", "--out", str(tmp_path / "c.zarr"), "--quiet")
    assert res.returncode == 0, res.stderr
    res = _icemap("map", "--cube", str(tmp_path / "c.zarr"), "--out", str(tmp_path / "p.zarr"), "--quiet")
    assert res.returncode == 0, res.stderr
    for path in ("c.zarr", "p.zarr"):
        ds = icemap.open_cube(tmp_path / path)
        assert ds.sizes["x"] == 1
        assert pixel_area_m2(ds) == pytest.approx(900.0)
        assert ds.rio.transform().c == pytest.approx(500010.0)


def test_self_intersecting_outline_is_repaired_with_a_named_warning(product: dict[str, Path], sample_region: Any,
                                                                    tmp_path: Path) -> None:
    import geopandas as gpd
    from shapely.geometry import Polygon

    g = gpd.read_file(sample_region.outlines, layer="glaciers")
    x0, y0, _, _ = g.total_bounds
    # A bow tie across the grid's edge: two triangles of 0.42 km2 each, zero signed area.
    bow = Polygon([(x0 - 500, y0 + 300), (x0 + 900, y0 + 1500), (x0 + 900, y0 + 300), (x0 - 500, y0 + 1500)])
    assert not bow.is_valid
    bad = gpd.GeoDataFrame({"glacier_id": ["BOWTIE"], "geometry": [bow]}, crs=g.crs)
    bad.to_file(tmp_path / "bow.gpkg", layer="glaciers")
    res = _icemap("areas", "--pred", str(product["out"]), "--reference", str(tmp_path / "bow.gpkg"),
                  "--out", str(tmp_path / "a.csv"))
    assert res.returncode == 0, res.stderr
    assert "InvalidOutlineWarning" in res.stderr and "BOWTIE" in res.stderr
    with pytest.warns(icemap.errors.InvalidOutlineWarning, match="BOWTIE"):
        repaired = read_outlines(tmp_path / "bow.gpkg")
    assert repaired.geometry.iloc[0].is_valid
    assert repaired.geometry.iloc[0].area == pytest.approx(2 * 1400 * 600 / 2)


@pytest.mark.parametrize("case", [
    "status-product", "time-missing", "time-malformed", "id-column", "csv-outlines", "memory", "tls", "inproc",
    "chunksize", "resolution", "proc-out", "sys-out", "non-utf8", "corrupt-chunk",
])
def test_failures_are_one_line(case: str, cube_path: Path, product: dict[str, Path], sample_region: Any,
                               tmp_path: Path) -> None:
    pred, ref, cat = str(product["out"]), str(sample_region.outlines), str(sample_region.catalog)
    if case == "status-product":
        res = _icemap("status", pred)
        assert res.returncode == 0 and "Traceback" not in res.stderr and "ice" in res.stdout
        return
    if case == "csv-outlines":
        (tmp_path / "o.csv").write_text("gid,name\n1,a\n")
        ref = str(tmp_path / "o.csv")
    if case == "corrupt-chunk":
        import shutil

        shutil.copytree(product["out"], tmp_path / "bad.zarr")
        chunk = next(p for p in sorted((tmp_path / "bad.zarr" / "ice").rglob("*")) if p.is_file() and
                     p.name not in ("zarr.json", ".zarray", ".zattrs"))
        chunk.write_bytes(b"not a compressed chunk")
        pred = str(tmp_path / "bad.zarr")
    if case == "non-utf8":
        name = os.fsdecode(b"scene \xff.tif")
        _geotiff(tmp_path / "x.tif")
        os.rename(tmp_path / "x.tif", tmp_path / name)
    args, needles = {
        "corrupt-chunk": (["evaluate", "--pred", pred, "--reference", ref], ["corrupt"]),
        "time-missing": (["evaluate", "--pred", pred, "--reference", ref, "--time", "1999-01-01"], ["1999-01-01"]),
        "time-malformed": (["evaluate", "--pred", pred, "--reference", ref, "--time", "02/31/x"], ["02/31/x"]),
        "id-column": (["areas", "--pred", pred, "--reference", ref, "--id-column", "nope",
                       "--out", str(tmp_path / "a.csv")], ["nope"]),
        "csv-outlines": (["evaluate", "--pred", pred, "--reference", ref], ["o.csv", "geometry"]),
        "memory": (["ingest", "-c", cat, "-o", str(tmp_path / "c.zarr"), "--scheduler", "local?memory=lots"],
                   ["memory=lots"]),
        "tls": (["ingest", "-c", cat, "-o", str(tmp_path / "c.zarr"), "--scheduler", "tls://127.0.0.1:1"], ["TLS"]),
        "inproc": (["ingest", "-c", cat, "-o", str(tmp_path / "c.zarr"), "--scheduler", "inproc://x"], ["inproc"]),
        "chunksize": (["ingest", "-c", cat, "-o", str(tmp_path / "c.zarr"), "--chunksize", "100000000"],
                      ["--chunksize"]),
        "resolution": (["ingest", "-c", cat, "-o", str(tmp_path / "c.zarr"), "--resolution", "0.001"],
                       ["resolution"]),
        "proc-out": (["ingest", "-c", cat, "-o", "/proc/icemap-test.zarr", "--quiet"], ["/proc/icemap-test.zarr"]),
        "sys-out": (["map", "--cube", str(cube_path), "-o", "/sys/icemap-test.zarr", "--quiet"],
                    ["/sys/icemap-test.zarr"]),
        "non-utf8": (["ingest", "--files", str(tmp_path / name) if case == "non-utf8" else "", "--band-map",
                      "green=1,swir16=2", "--datetime", "2022-02-01", "-o", str(tmp_path / "c.zarr")], ["UTF-8"]),
    }[case]
    _one_line(_icemap(*args), *needles)
    assert not (tmp_path / "c.zarr").exists()
