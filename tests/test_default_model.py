"""The shipped default U-Net: package data, runs on every kind of cube, and its documented scores.

The real-data scores are recomputed here on ../shared/data through ``icemap.predict`` (the path
``icemap map`` runs) and compared with the numbers docs/default-model.md states; the targets of
the default model (Athabasca F1 at least NDSI 0.4's + 0.02, water flagged on at most 2 % of the
water pixels of every real control) are asserted where met, and where missed the documented
shortfall is asserted instead, so the page cannot drift from what the model does.
"""

from __future__ import annotations

import json
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import tomllib
import xarray as xr
from rasterio.transform import from_origin

import icemap
from icemap.errors import ModelError
from icemap.model.checkpoint import METADATA, WEIGHTS, read_metadata, sha256_of, write_metadata
from icemap.lab.default import (
    CHANNELS,
    THRESHOLD_SELECTION,
    SpectralAugment,
    choose_restart,
    lowest_passing_threshold,
    real_data_scores,
    select_threshold,
    selection_markdown,
    visible_ice_labels,
)
from icemap.labels import rasterize_outlines
from icemap.model.packaged import default_model_dir, resolve_model
from icemap.sample import CLASS_CODES, make_sample_region
from icemap.stac import item_from_files, search

from .conftest import REPO, SHARED_DATA, icemap_cli, shared_path

DOC = REPO / "docs" / "default-model.md"
COMMON_BANDS = ("blue", "green", "red", "nir08", "swir16", "swir22")


def test_default_model_is_package_data() -> None:
    folder = default_model_dir()
    # Resolved through importlib.resources inside the imported icemap package, wherever that
    # is installed (a wheel install puts it in site-packages), never a source-tree path.
    package = Path(str(files("icemap")))
    assert folder == package / "models" / "default"
    assert Path(icemap.__file__).parent == package
    assert resolve_model(None) == folder and resolve_model("default") == folder
    assert resolve_model("/some/model") == "/some/model"
    # A wheel includes it: pyproject lists both files as package data of icemap.
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert {f"models/default/{WEIGHTS}", f"models/default/{METADATA}"} <= set(
        config["tool"]["setuptools"]["package-data"]["icemap"])

    weights = folder / WEIGHTS
    assert weights.stat().st_size < 2 * 1024 * 1024
    meta = read_metadata(folder)
    assert sha256_of(weights) == meta.weights_sha256
    assert meta.weights_sha256 in DOC.read_text()
    # float16 weights, stated in the safetensors header.
    raw = weights.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__" and not k.endswith("num_batches_tracked")}
    assert dtypes == {"F16"}
    # Only bands every icemap cube has (Landsat C2 L2, HLS, Sentinel-2), no DEM.
    assert tuple(meta.channels) == CHANNELS and set(meta.bands) == set(COMMON_BANDS)
    # The training block records what a rerun needs.
    for key in ("recipe", "region", "chip_settings", "train_settings", "augmentation", "config", "history"):
        assert key in meta.training, key


def test_augment_keeps_nodata_and_recomputes_indices() -> None:
    import torch

    from icemap.model.inputs import Normalisation

    rng = np.random.default_rng(0)
    refl = rng.uniform(0.02, 0.9, size=(3, 6, 16, 16)).astype(np.float32)
    g, n, s = refl[:, 1], refl[:, 3], refl[:, 4]
    raw = np.concatenate([refl, ((g - s) / (g + s))[:, None], ((g - n) / (g + n))[:, None]], axis=1)
    norm = Normalisation([0.0] * 6 + [-1.0, -1.0], [1.0] * 6 + [1.0, 1.0])
    z = (raw - norm.lo[None, :, None, None]) / (norm.hi - norm.lo)[None, :, None, None]
    valid = np.ones((3, 1, 16, 16), dtype=bool)
    valid[:, :, :4] = False
    out = SpectralAugment()(torch.from_numpy(z), torch.from_numpy(valid), norm, np.random.default_rng(1)).numpy()
    np.testing.assert_array_equal(out[:, :, :4], z[:, :, :4])  # nodata and padding untouched
    assert not np.allclose(out[:, :6, 4:], z[:, :6, 4:])
    back = out * (norm.hi - norm.lo)[None, :, None, None] + norm.lo[None, :, None, None]
    gb, nb, sb = (np.clip(back[:, i, 4:], 0, None) for i in (1, 3, 4))
    np.testing.assert_allclose(back[:, 6, 4:], (gb - sb) / (gb + sb), atol=1e-5)
    np.testing.assert_allclose(back[:, 7, 4:], (gb - nb) / (gb + nb), atol=1e-5)


@pytest.fixture(scope="module")
def landsat_cube(sample_region: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("default") / "cube.zarr"
    icemap.ingest(search(sample_region.catalog).item_dicts(), path, bands=list(COMMON_BANDS), chunksize=64)
    return path


def test_cli_map_unet_without_model(landsat_cube: Path, tmp_path: Path) -> None:
    out = tmp_path / "unet.zarr"
    res = icemap_cli("map", "--cube", str(landsat_cube), "--method", "unet", "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    prod = icemap.open_cube(out)
    assert prod.attrs["model_sha256"] == read_metadata(default_model_dir()).weights_sha256
    assert prod.rio.crs == icemap.open_cube(landsat_cube).rio.crs
    ice = prod["ice"].values
    assert set(np.unique(ice)) <= {0, 1, 255} and (ice == 1).any() and (ice == 0).any()
    # The product is what the Python API computes with the default model (one inference path).
    direct = icemap.predict(icemap.open_cube(landsat_cube))["ice_probability"].values
    np.testing.assert_allclose(prod["ice_probability"].values, direct, atol=2e-6, rtol=0)


def test_cube_without_a_common_band(sample_region: Any) -> None:
    cube = icemap.load(search(sample_region.catalog).item_dicts(), bands=["blue", "green", "red", "swir16", "swir22"])
    with pytest.raises(ModelError, match=r"nir08.*--bands"):
        icemap.predict(cube)


def _ukis_s2() -> np.ndarray:
    z = np.load(shared_path("ukis_csmask_cloud_chips", "sentinel2.npz"))
    return np.moveaxis(z["img"][:160, :192], -1, 0).astype(np.float32)


def test_runs_on_sentinel2_and_hls_cubes(tmp_path: Path) -> None:
    # Sentinel-2: real MSI reflectance written as a 6-band L2A-style GeoTIFF (DN = 1e4 x
    # reflectance), loaded through the Sentinel-2 sensor path like any S2 file.
    img = _ukis_s2()
    dn = np.round(img * 1e4).astype(np.uint16) + 1  # 0 is nodata in L2A
    path = tmp_path / "s2.tif"
    with rasterio.open(path, "w", driver="GTiff", width=dn.shape[2], height=dn.shape[1], count=6, dtype="uint16",
                       crs="EPSG:32633", transform=from_origin(500_000.0, 5_000_000.0, 20.0, 20.0), nodata=0) as dst:
        dst.write(dn)
    item = item_from_files(path, band_map={b: i + 1 for i, b in enumerate(COMMON_BANDS)}, id="s2",
                           datetime="2022-02-01", collection="sentinel-2-l2a", scale=1e-4, offset=0.0)
    with pytest.warns(icemap.errors.NoQAWarning):
        s2 = icemap.load([item], qa=None, bands=list(COMMON_BANDS))
    out = icemap.predict(s2)
    assert out.rio.crs.to_epsg() == 32633
    prob = out["ice_probability"].values
    assert np.isfinite(prob).all() and prob.shape == (1, 160, 192)
    # Lazy equals eager: the same cube computed first gives the same probabilities.
    np.testing.assert_allclose(icemap.predict(s2.compute())["ice_probability"].values, prob, atol=1e-6, rtol=0)

    # HLS: the real Athabasca L30 crop through the HLS sensor path; the glacier is found.
    from icemap.lab.default import _athabasca

    hls = _athabasca(SHARED_DATA if SHARED_DATA.exists() else shared_path())
    ice = icemap.predict(hls)["ice"].isel(time=0)
    label = rasterio.open(shared_path("athabasca_hls_l30", "DERIVED_athabasca_outline_mask_30m.tif")).read(1)
    assert ice.rio.crs.to_epsg() == 32611
    assert (ice.values[label == 1] == 1).mean() > 0.5


# ----------------------------------------------------------------------------------------------
# The documented real-data scores
# ----------------------------------------------------------------------------------------------

#: docs/default-model.md's table, rows as written there (3 decimals; shares in percent, 2 decimals).
METHODS = ("default U-Net", "default U-Net at 0.5", "default U-Net at 0.95", "NDSI 0.4", "NDSI 0.4 + guards")
CONTROLS = ("liverpool water", "landsat5 water", "sentinel2 water", "landsat5 shadow", "sentinel2 shadow",
            "landsat5 cloud", "sentinel2 cloud")
#: Scores can move in the last digit with torch's thread count (sums in another order).
TOL_SCORE = 0.002
TOL_SHARE_PCT = 0.05


def _documented() -> dict[str, dict[str, float]]:
    """Parse the two tables of docs/default-model.md between their markers."""
    text = DOC.read_text()
    rows: dict[str, dict[str, float]] = {}
    for block, cols in (("athabasca", ("f1", "precision", "recall", "ice_area_km2")), ("controls", CONTROLS)):
        body = re.search(rf"<!-- {block} -->(.*?)<!-- /{block} -->", text, re.DOTALL)
        assert body, f"docs/default-model.md lacks the {block} table markers"
        for line in body.group(1).strip().splitlines()[2:]:
            cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
            rows.setdefault(cells[0], {}).update({c: float(v) for c, v in zip(cols, cells[1:])})
    return rows


@pytest.fixture(scope="module")
def scores() -> dict[str, Any]:
    shared_path("athabasca_hls_l30")
    shared_path("xlandsat_liverpool_l2sp")
    shared_path("ukis_csmask_cloud_chips")
    return real_data_scores(SHARED_DATA)


@pytest.mark.shared_data
def test_documented_scores_hold(scores: dict[str, Any]) -> None:
    doc = _documented()
    assert set(doc) - {"pixels of the class"} == set(scores["athabasca"]) == set(METHODS)
    for method in METHODS:
        got = scores["athabasca"][method]
        for key in ("f1", "precision", "recall"):
            assert got[key] == pytest.approx(doc[method][key], abs=TOL_SCORE), (method, key)
        assert got["ice_area_km2"] == pytest.approx(doc[method]["ice_area_km2"], abs=0.05)
        for control in CONTROLS:
            share = 100 * scores["false_positive_share"][method][control]
            assert share == pytest.approx(doc[method][control], abs=TOL_SHARE_PCT), (method, control)
    # NDSI 0.4 is the data set's documented reference (F1 0.697, P 0.552, R 0.946).
    assert scores["athabasca"]["NDSI 0.4"]["f1"] == pytest.approx(0.697, abs=6e-4)


#: The targets: Athabasca F1 at least NDSI 0.4's + 0.02, and water mapped as ice on at most
#: 2 % of the water pixels of every real control.
F1_MARGIN = 0.02
WATER_MAX_PCT = 2.0
WATER = tuple(c for c in CONTROLS if c.endswith("water"))
#: Water targets the shipped model misses (docs/default-model.md, "Targets"): the share stated there.
MISSED_WATER: dict[str, float] = {}


@pytest.mark.shared_data
def test_targets(scores: dict[str, Any]) -> None:
    unet, ndsi = scores["athabasca"]["default U-Net"], scores["athabasca"]["NDSI 0.4"]
    assert unet["f1"] >= ndsi["f1"] + F1_MARGIN
    doc = _documented()["default U-Net"]
    for control in WATER:
        share = 100 * scores["false_positive_share"]["default U-Net"][control]
        if control in MISSED_WATER:
            # Missed, and the page says so with this number (met after a retrain? update both).
            assert share > WATER_MAX_PCT and doc[control] == MISSED_WATER[control], control
        else:
            assert share <= WATER_MAX_PCT, control


@pytest.mark.shared_data
def test_greenland_ice_sheet_interior_is_ice() -> None:
    """A real scene far from the generator: the Greenland ice sheet interior (a full Landsat 8 C2 L2
    scene downsampled to 515 m), every clear pixel snow or ice. docs/default-model.md quotes the
    share the default model calls ice (99.9 %)."""
    from .test_load import usgs_item

    scene = "LC08_L2SP_005009_20150710_20200908_02_T2"
    with rasterio.open(next(shared_path("landsat_c2l2_fullscene_downsampled", scene).glob("*_SR_B3.TIF"))) as src:
        res = (src.transform.a, -src.transform.e)
    cube = icemap.load([usgs_item(scene)], bands=list(COMMON_BANDS), resolution=res).compute()
    clear = np.isfinite(cube["reflectance"].values[0]).all(axis=0)  # QA cloud, shadow and fill are NaN
    ice = icemap.predict(cube)["ice"].values[0]
    share = 100 * float((ice[clear] == 1).mean())
    assert clear.sum() > 50_000 and share >= 99.5
    text = DOC.read_text()
    assert f"{int(clear.sum()):,} clear".replace(",", " ") in text and f"{share:.1f} % of the clear" in text


# ----------------------------------------------------------------------------------------------
# The shipped threshold: chosen on the real selection set
# ----------------------------------------------------------------------------------------------


def test_lowest_passing_threshold_is_the_lowest_with_every_control_in_bounds() -> None:
    grid = [0.5, 0.6, 0.7, 0.8]
    shares = {"water": [0.02, 0.004, 0.001, 0.0], "shadow": [0.001, 0.006, 0.004, 0.0], "ice": [0.9, 0.8, 0.7, 0.6]}
    # 0.6 passes on water but not on shadow: every control must be within the bound.
    assert lowest_passing_threshold(shares, grid, ["water", "shadow"], 0.005) == 0.7
    assert lowest_passing_threshold(shares, grid, ["water"], 0.005) == 0.6
    assert lowest_passing_threshold(shares, grid, ["water", "shadow"], 0.05) == 0.5
    with pytest.raises(ModelError, match="retrain it"):
        lowest_passing_threshold({"water": [0.3, 0.2, 0.1, 0.02]}, grid, ["water"], 0.005)


def test_choose_restart_takes_the_most_glacier_among_passing_restarts() -> None:
    """The recipe's restart choice on the real selection set: a restart no threshold saves is out
    (here the best synthetic F1), then the most glacier wins; ties go to synthetic F1, then the
    lower seed; no passing restart is an error, never a shipped model."""
    runs = [{"seed": 0, "val_f1": 0.984, "threshold": 0.9, "glacier_share": 0.74},
            {"seed": 1, "val_f1": 0.990, "threshold": None, "glacier_share": None},
            {"seed": 2, "val_f1": 0.985, "threshold": 0.9, "glacier_share": 0.85}]
    assert choose_restart(runs)["seed"] == 2
    tie = [dict(runs[0], glacier_share=0.85), runs[2]]
    assert choose_restart(tie)["seed"] == 2  # same glacier share: the better validation F1
    assert choose_restart([dict(runs[2], seed=3), runs[2]])["seed"] == 2  # then the lower seed
    with pytest.raises(ModelError, match="retrain with other seeds"):
        choose_restart([runs[1]])


@pytest.mark.shared_data
@pytest.mark.lab
def test_shipped_threshold_is_what_the_rule_chooses_on_the_selection_set(tmp_path: Path) -> None:
    """The recipe's last step, rerun on a copy of the shipped model put back at training's synthetic
    threshold, chooses the shipped threshold, records what it read, and the page shows that record."""
    shared_path("rgi_benchmark_glacier_spectra")
    shared_path("ukis_csmask_cloud_chips")
    shipped = read_metadata(default_model_dir())
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / WEIGHTS).write_bytes((default_model_dir() / WEIGHTS).read_bytes())
    meta = read_metadata(default_model_dir())
    synthetic = shipped.training["threshold_selection"]["synthetic_threshold"]
    meta.threshold = synthetic
    del meta.training["threshold_selection"]
    write_metadata(meta, folder)

    record = select_threshold(folder, SHARED_DATA)
    again = read_metadata(folder)
    assert again.threshold == record["threshold"] == shipped.threshold
    assert again.weights_sha256 == shipped.weights_sha256  # the weights are untouched
    assert record["synthetic_threshold"] == synthetic
    assert {k: record[k] for k in THRESHOLD_SELECTION} == THRESHOLD_SELECTION
    recorded = shipped.training["threshold_selection"]["shares"]
    for name, shares in record["shares"].items():
        np.testing.assert_allclose(shares, recorded[name], atol=5e-4, err_msg=name)
    # Every control within the bound at the chosen threshold, one of them over it just below.
    i = THRESHOLD_SELECTION["grid"].index(record["threshold"])
    assert all(record["shares"][c][i] <= THRESHOLD_SELECTION["max_control_share"] for c in record["controls"])
    if i:
        assert any(record["shares"][c][i - 1] > THRESHOLD_SELECTION["max_control_share"] for c in record["controls"])
    # docs/default-model.md shows the shipped record.
    table = re.search(r"<!-- threshold-selection -->.*?<!-- /threshold-selection -->", DOC.read_text(), re.DOTALL)
    assert table and table.group(0) == selection_markdown(shipped.training["threshold_selection"])


def test_recipe_command_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m icemap.lab.default``: a wrong folder or missing data is a one-line error and exit 1."""
    from icemap.lab.default import main

    assert main(["threshold", "--model", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert "error: no checkpoint at" in err and "Traceback" not in err
    assert main(["score", "--data", str(tmp_path)]) == 1
    assert "error:" in capsys.readouterr().err


def test_write_metadata_refuses_a_json_for_other_weights(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / WEIGHTS).write_bytes((default_model_dir() / WEIGHTS).read_bytes())
    meta = read_metadata(default_model_dir())
    meta.threshold = 0.4
    write_metadata(meta, folder)
    assert read_metadata(folder).threshold == 0.4
    (folder / WEIGHTS).write_bytes(b"other weights")
    meta.threshold = 0.3
    with pytest.raises(ModelError, match="is not the weights this metadata describes"):
        write_metadata(meta, folder)
    assert read_metadata(folder).threshold == 0.4  # nothing written


# ----------------------------------------------------------------------------------------------
# The recipe's labels
# ----------------------------------------------------------------------------------------------


def test_visible_ice_labels_are_the_glaciers_and_each_dates_snow_off_them(tmp_path: Path) -> None:
    """Burnt at pixel centres, a date's labels are exactly (inside an outline) or (truth class
    snow or ice) on that date, and the dates differ where the snow moved."""
    reg = make_sample_region(tmp_path / "region", size=96, n_dates=2, seed=7, surface="seasonal")
    path = visible_ice_labels(reg, tmp_path / "labels.gpkg")
    labels = gpd.read_file(path, layer="labels")
    assert sorted(set(labels["date"])) == sorted(reg.dates)
    with rasterio.open(reg.glacier_ids) as src:
        on_glacier = src.read(1) > 0
        like = xr.DataArray(np.zeros(on_glacier.shape, np.uint8), dims=("y", "x"), coords={
            "x": src.transform.c + src.transform.a * (np.arange(src.width) + 0.5),
            "y": src.transform.f + src.transform.e * (np.arange(src.height) + 0.5)}).rio.write_crs(src.crs)
    burnt = {}
    for date in reg.dates:
        with rasterio.open(reg.truth(date)) as src:
            cls = src.read(1)
        want = on_glacier | np.isin(cls, [CLASS_CODES["snow"], CLASS_CODES["ice"]])
        burnt[date] = np.asarray(rasterize_outlines(labels[labels["date"] == date], like).values) > 0
        np.testing.assert_array_equal(burnt[date], want, err_msg=date)
        assert (want & ~on_glacier).any(), f"{date}: no snow off the glaciers to label"
    a, b = (burnt[d] for d in reg.dates)
    assert (a != b).any()
