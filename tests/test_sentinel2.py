"""Sentinel-2 L2A (Earth Search and Planetary Computer items) and local multi-band GeoTIFFs.

Items follow the published shapes (asset keys, per-asset grids at 10 m and 20 m, raster:bands,
``s2:processing_baseline``); their COGs are written here. Expected pixels come from rasterio
reads and the ESA rules (DN * 1e-4, minus 0.1 from baseline 04.00; SCL classes 0, 1, 3, 8, 9,
10 masked, snow 11 kept).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds

import icemap
from icemap.bands import SENTINEL2_L2A, get_sensor
from icemap.errors import CatalogError, NoQAWarning

from .conftest import REPO, icemap_cli
from .rasters import write_tif

ES_KEYS = {"blue": "blue", "green": "green", "red": "red", "nir": "nir", "nir08": "nir08", "swir16": "swir16",
           "swir22": "swir22"}
PC_KEYS = {"blue": "B02", "green": "B03", "red": "B04", "nir": "B08", "nir08": "B8A", "swir16": "B11",
           "swir22": "B12"}
TEN_M = ("blue", "green", "red", "nir")
MASKED_SCL = (0, 1, 3, 8, 9, 10)
LEFT, TOP, N20 = 600_000.0, 5_300_040.0, 16  # 16 x 16 px at 20 m = 32 x 32 px at 10 m


def test_table_finds_both_providers_keys() -> None:
    assert get_sensor("sentinel-2-l2a") is SENTINEL2_L2A
    for keys, scl in ((ES_KEYS, "scl"), (PC_KEYS, "SCL")):
        assets = {k: {"href": "x"} for k in [*keys.values(), scl]}
        for band, key in keys.items():
            assert SENTINEL2_L2A.find_asset(assets, band) == key
        assert SENTINEL2_L2A.find_qa_asset(assets) == scl


def _s2_item(tmp: Path, provider: str, baseline: str, seed: int, with_offset: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    keys, scl_key = (ES_KEYS, "scl") if provider == "es" else (PC_KEYS, "SCL")
    assets: dict[str, Any] = {}
    dns: dict[str, np.ndarray] = {}
    for band, key in keys.items():
        res = 10.0 if band in TEN_M else 20.0
        n = N20 * 2 if band in TEN_M else N20
        dn = rng.integers(1000, 12000, size=(n, n), dtype=np.uint16)
        dn[0, :3] = 0  # nodata
        path = write_tif(tmp / f"{provider}_{key}.tif", dn, 32633, from_origin(LEFT, TOP, res, res))
        asset = {"href": str(path), "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                 "proj:shape": [n, n], "proj:transform": [res, 0, LEFT, 0, -res, TOP, 0, 0, 1]}
        if with_offset:  # Earth Search states scale and offset per asset
            asset["raster:bands"] = [{"nodata": 0, "data_type": "uint16", "scale": 0.0001, "offset": -0.1}]
        assets[key] = asset
        dns[band] = dn
    scl = rng.choice(np.arange(12, dtype=np.uint8), size=(N20, N20))
    path = write_tif(tmp / f"{provider}_scl.tif", scl, 32633, from_origin(LEFT, TOP, 20, 20))
    assets[scl_key] = {"href": str(path), "type": "image/tiff", "proj:shape": [N20, N20],
                       "proj:transform": [20.0, 0, LEFT, 0, -20.0, TOP, 0, 0, 1]}
    dns["scl"] = scl
    w, s, e, n = transform_bounds("EPSG:32633", "EPSG:4326", LEFT, TOP - N20 * 20, LEFT + N20 * 20, TOP)
    item = {
        "type": "Feature", "stac_version": "1.0.0", "id": f"S2B_33UWP_{provider}_{baseline}", "collection": "sentinel-2-l2a",
        "bbox": [w, s, e, n],
        "geometry": {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]},
        "properties": {"datetime": f"2022-0{seed}-10T10:00:00Z", "platform": "sentinel-2b", "proj:epsg": 32633,
                       "s2:processing_baseline": baseline},
        "assets": assets, "links": [],
    }
    return item, dns


@pytest.mark.parametrize("provider,baseline,with_offset,offset", [
    ("es", "05.10", True, -0.1),   # Earth Search: offset in raster:bands
    ("pc", "05.10", False, -0.1),  # Planetary Computer: offset from the processing baseline
    ("pc", "04.00", False, -0.1),
    ("pc", "03.01", False, 0.0),   # before 25 Jan 2022: no offset
])
def test_sentinel2_pixels_offsets_and_scl(tmp_path: Path, provider: str, baseline: str, with_offset: bool,
                                          offset: float) -> None:
    item, dns = _s2_item(tmp_path, provider, baseline, seed=2, with_offset=with_offset)
    ds = icemap.load([item], resolution=10).compute()
    assert list(ds["band"].values) == list(ES_KEYS)
    assert ds.sizes["x"] == ds.sizes["y"] == 2 * N20
    scl10 = np.repeat(np.repeat(dns["scl"], 2, 0), 2, 1)
    masked = np.isin(scl10, MASKED_SCL)
    for band in ES_KEYS:
        dn = dns[band] if band in TEN_M else np.repeat(np.repeat(dns[band], 2, 0), 2, 1)
        expected = np.where((dn == 0) | masked, np.nan, dn.astype(np.float32) * np.float32(1e-4) + np.float32(offset))
        np.testing.assert_allclose(ds["reflectance"].sel(band=band).values[0], expected, rtol=0, atol=1e-6)
    snow_bit = (ds["qa_pixel"].values[0] >> 5) & 1
    np.testing.assert_array_equal(snow_bit == 1, scl10 == 11)
    # The default grid is 20 m, the resolution of the SWIR band NDSI needs.
    assert icemap.load([item]).rio.resolution() == (20.0, -20.0)


def _multiband(path: Path, seed: int, count: int = 13) -> np.ndarray:
    dn = np.random.default_rng(seed).integers(1, 10000, size=(count, 24, 40), dtype=np.uint16)
    write_tif(path, dn, 32606, from_origin(399_960.0, 6_800_040.0, 20.0, 20.0), nodata=0)
    return dn


def test_item_from_files_multiband(tmp_path: Path) -> None:
    from icemap.stac import item_from_files

    _multiband(tmp_path / "export.tif", 1)
    item = item_from_files(tmp_path / "export.tif", band_map={"green": 3, "swir16": 12}, id="e",
                           datetime="2022-02-01", collection="sentinel-2-l2a", scale=1e-4, offset=0.0)
    with pytest.warns(NoQAWarning):
        ds = icemap.load([item], qa=None, bands=["green", "swir16"]).compute()
    with rasterio.open(tmp_path / "export.tif") as src:
        for band, idx in (("green", 3), ("swir16", 12)):
            np.testing.assert_array_equal(ds["reflectance"].sel(band=band).values[0],
                                          src.read(idx).astype(np.float32) * np.float32(1e-4))
    with pytest.raises(CatalogError, match=r"index 14 is not a band of export.tif, which has bands 1..13"):
        item_from_files(tmp_path / "export.tif", band_map={"green": 14}, id="e", datetime="2022-02-01")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return icemap_cli("ingest", *args, "--quiet", cwd=REPO)


def test_cli_ingest_local_multiband_files(tmp_path: Path) -> None:
    a, b = tmp_path / "feb.tif", tmp_path / "mar.tif"
    _multiband(a, 1), _multiband(b, 2)
    out = tmp_path / "cube.zarr"
    done = _cli("--files", str(a), "--datetime", "2022-02-01", "--files", str(b), "--datetime", "2022-03-05",
                "--band-map", "green=3,swir16=12", "--scale", "0.0001", "--offset", "-0.1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    cube = icemap.open_cube(out)
    assert [str(t)[:10] for t in cube["time"].values] == ["2022-02-01", "2022-03-05"]
    assert list(cube["band"].values) == ["green", "swir16"] and cube.attrs["cloud_masked"] == 0
    for t, f in enumerate((a, b)):
        with rasterio.open(f) as src:
            for band, idx in (("green", 3), ("swir16", 12)):
                exp = src.read(idx).astype(np.float32) * np.float32(1e-4) + np.float32(-0.1)
                np.testing.assert_allclose(cube["reflectance"].sel(band=band).values[t], exp, rtol=0, atol=1e-6)
    for args, message in (
        (["--band-map", "green=14"], "index 14 is not a band"),
        (["--band-map", "green=3", "--datetime", "2022-03-01"], "1 file(s) but 2 --datetime"),
        (["--band-map", "green:3"], "NAME=INDEX"),
        (["--band-map", "nope=3"], "unknown band 'nope'"),
        ([], "--files needs --band-map"),
    ):
        bad = _cli("--files", str(a), "--datetime", "2022-02-01", *args, "--out", str(tmp_path / "x.zarr"))
        assert bad.returncode == 1 and message in bad.stderr, (args, bad.stderr)
        assert "Traceback" not in bad.stderr


@pytest.mark.shared_data
def test_real_earth_search_item_and_its_planetary_computer_form() -> None:
    """A real Earth Search S2 L2A item (baseline 05.09): offsets from raster:bands, or from the
    baseline once the item is given Planetary Computer's keys without raster:bands."""
    import json

    from icemap.load import normalise_items

    from .conftest import shared_path, raise_if_dask_computes

    page = json.loads(shared_path("stac_landsat_c2_l2", "extracted", "earthsearch_v1_search_response_page1.json").read_text())
    item = next(f for f in page["features"] if f["collection"] == "sentinel-2-l2a")
    assert item["properties"]["s2:processing_baseline"] >= "04.00"
    pc = json.loads(json.dumps(item))
    pc["assets"] = {PC_KEYS[b]: {k: v for k, v in item["assets"][es].items() if k != "raster:bands"}
                    for b, es in ES_KEYS.items()}
    pc["assets"]["SCL"] = item["assets"]["scl"]
    for it in (item, pc):
        clean, meta = normalise_items([it], SENTINEL2_L2A, list(ES_KEYS))
        for band in ES_KEYS:
            rb = clean[0]["assets"][band]["raster:bands"][0]
            assert (rb["scale"], rb["offset"], rb["nodata"]) == (1e-4, -0.1, 0)
        assert "qa_pixel" in clean[0]["assets"]
        assert meta[0]["transform"][:6] == [10, 0, 399960, 0, -10, 4500000]
        with raise_if_dask_computes():
            ds = icemap.load([it], bands=["green", "swir16"])
        assert ds.rio.resolution() == (20.0, -20.0) and ds.sizes["x"] == ds.sizes["y"] == 5490
        assert ds.rio.bounds() == (399960.0, 4390200.0, 509760.0, 4500000.0)
