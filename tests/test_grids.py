"""Grids: polar stereographic, southern UTM, USGS negative northings, the antimeridian, bboxes at
or beyond the items' footprints, mixed CRSs, and outlines that miss the prediction.

Each case ends in a cube whose pixels equal a plain rasterio read of the files, or in an
IcemapError that names the fix.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rasterio.warp import transform_bounds

import icemap
from icemap.errors import GridError, IcemapError, MixedCRSWarning, NoOverlapError
from icemap.stac import item_from_files, search

from .conftest import REPO, icemap_cli, shared_path
from .rasters import make_scene, read_expected

W, H, RES = 48, 40, 30.0
BANDS = ["green", "swir16"]


def scene(tmp: Path, name: str, epsg: int, left: float, top: float, seed: int = 0, date: str = "2022-01-05") -> tuple[dict[str, Any], dict[str, Path]]:
    files = make_scene(tmp / name, epsg=epsg, left=left, top=top, width=W, height=H, seed=seed)
    item = item_from_files(files, id=name, datetime=f"{date}T10:00:00Z", platform="landsat-9")
    return item, files


def assert_cube_is_files(ds: Any, files: dict[str, Path], bands: tuple[str, ...] = ("green", "swir16")) -> None:
    out = ds.compute()
    for b in bands:
        exp = read_expected(ds, files[b], qa_path=files["qa_pixel"])
        np.testing.assert_allclose(out["reflectance"].sel(band=b).values[0], exp, rtol=0, atol=1e-6)


def inner_bbox(epsg: int, left: float, top: float, frac: tuple[float, float, float, float]) -> tuple[float, ...]:
    """A lon/lat bbox around a fraction of a scene's projected extent (may exceed 0..1)."""
    x0, x1 = left + frac[0] * W * RES, left + frac[2] * W * RES
    y0, y1 = top - frac[3] * H * RES, top - frac[1] * H * RES
    return transform_bounds(f"EPSG:{epsg}", "EPSG:4326", x0, y0, x1, y1, densify_pts=21)


@pytest.mark.parametrize("epsg,left,top", [
    (3031, 2_346_015.0, 855_045.0),       # East Antarctica, Landsat's 15 m-offset grid
    (3413, -200_000.0, -2_100_000.0),     # Greenland
    (32719, 399_975.0, 6_650_025.0),      # Andes, southern UTM
    (32619, 399_975.0, -3_349_975.0),     # USGS southern scenes: northern zone, negative northings
])
def test_projected_grids_with_bbox(tmp_path: Path, epsg: int, left: float, top: float) -> None:
    item, files = scene(tmp_path, "a", epsg, left, top)
    ds = icemap.load([item], bands=BANDS, bbox=inner_bbox(epsg, left, top, (0.2, 0.2, 0.7, 0.9)))
    assert ds.rio.crs.to_epsg() == epsg
    # A lon/lat box is wider than the projected box it came from, more so near the poles.
    assert ds.sizes["x"] > 0.5 * W * 0.5 and ds.sizes["y"] > 0.7 * H * 0.5
    assert_cube_is_files(ds, files)
    # The whole scene, no bbox: exactly the file's grid.
    whole = icemap.load([item], bands=BANDS)
    assert tuple(whole.rio.transform())[:6] == (RES, 0.0, left, 0.0, -RES, top)
    assert_cube_is_files(whole, files)


def test_polar_bbox_at_the_footprint_edge(tmp_path: Path) -> None:
    """The reported failure: two EPSG:3031 items and a bbox at the edge of their footprints."""
    left, top = 2_346_015.0, 855_045.0
    a, fa = scene(tmp_path, "a", 3031, left, top, seed=1)
    b, _ = scene(tmp_path, "b", 3031, left + W * RES, top, seed=2, date="2022-01-21")
    # Half over item a's western edge: a cube of a's pixels (b holds none of the grid and drops out).
    ds = icemap.load([a, b], bands=BANDS, bbox=inner_bbox(3031, left, top, (-0.3, 0.3, 0.2, 0.6)))
    assert list(ds["item_ids"].values) == ["a"]
    assert_cube_is_files(ds, fa)
    # Wholly beyond the items' raster extent (explicit bounds skip the lon/lat test): a clear error.
    with pytest.raises(GridError, match="none of the 2 item.*overlaps the grid.*bbox="):
        icemap.load([a, b], bands=BANDS, bounds=(left - 3000, top - 600, left - 1500, top))


def test_bbox_across_the_antimeridian(tmp_path: Path) -> None:
    # UTM 60S: this scene straddles 180 degrees; STAC writes such a bbox with west > east.
    left, top = 797_925.0, 7_050_015.0
    item, files = scene(tmp_path, "fiji", 32760, left, top)
    w, s, e, n = item["bbox"]
    assert w > e  # the item's own bbox crosses the antimeridian
    bbox = (179.999, s + 0.001, -179.999, n - 0.001)
    ds = icemap.load([item], bands=BANDS, bbox=bbox)
    assert ds.sizes["x"] > 2
    assert_cube_is_files(ds, files)
    # ... and the search filter keeps the item for that bbox, drops it for one beside it.
    (tmp_path / "items.json").write_text(json.dumps(item))
    assert [it["id"] for it in search(tmp_path / "items.json", bbox=bbox).item_dicts()] == ["fiji"]
    assert search(tmp_path / "items.json", bbox=(170.0, s, 175.0, n)).item_dicts() == []


def test_bbox_off_the_real_footprint(tmp_path: Path) -> None:
    item, _ = scene(tmp_path, "a", 32719, 399_975.0, 6_650_025.0)
    w, s, e, n = item["bbox"]
    # A rotated footprint (as Landsat's are) inside the item bbox; the bbox's corner misses it.
    cx, cy = (w + e) / 2, (s + n) / 2
    item["geometry"] = {"type": "Polygon", "coordinates": [[[cx, s], [e, cy], [cx, n], [w, cy], [cx, s]]]}
    corner = (w, s, w + (e - w) * 0.1, s + (n - s) * 0.1)
    with pytest.raises(GridError, match="misses the footprints"):
        icemap.load([item], bands=BANDS, bbox=corner)
    with pytest.raises(GridError, match="misses the footprints"):
        icemap.load([item], bands=BANDS, bbox=(w - 2, s, w - 1, n))


def test_mixed_crs_warns_with_the_grid_size(tmp_path: Path) -> None:
    a, _ = scene(tmp_path, "a", 32719, 399_975.0, 6_650_025.0)
    b, _ = scene(tmp_path, "b", 3031, 2_346_015.0, 855_045.0)
    c, _ = scene(tmp_path, "c", 32719, 399_975.0 + W * RES, 6_650_025.0)
    with pytest.warns(MixedCRSWarning, match=r"2 CRSs .*EPSG:32719.*\d[\d,]* x [\d,]+ px.*crs=.*bbox="):
        ds = icemap.load([a, b, c], bands=BANDS, chunksize=8192)  # a huge grid: few tasks
    assert ds.rio.crs.to_epsg() == 32719  # the most common CRS


def test_outlines_that_miss_the_prediction(tmp_path: Path) -> None:
    hls = "athabasca_hls_l30"
    bands = {"green": "B03", "swir16": "B06"}
    item = item_from_files({b: shared_path(hls, f"athabasca_2020229_{c}_L30.tif") for b, c in bands.items()},
                           id="a", datetime="2020-08-16T00:00:00Z", collection="hls", crs="EPSG:32611")
    cube = icemap.load([item], bands=BANDS)
    ice = icemap.ice_mask(cube).isel(time=0)
    oetztal = shared_path("oggm_rgi_srtm_oetztal", "rgi_oetztal.shp")
    with pytest.raises(NoOverlapError, match=r"no reference outline overlaps.*EPSG:4326.*EPSG:32611"):
        icemap.evaluate(ice, oetztal)
    # The CLI says the same in one line, exit 1.
    store = tmp_path / "ice.zarr"
    icemap.write_product(icemap.ice_mask(cube).to_dataset(name="ice"), store)
    out = icemap_cli("evaluate", "--pred", str(store), "--reference", str(oetztal), cwd=REPO)
    assert out.returncode == 1 and "no reference outline overlaps" in out.stderr
    # One error line; a warning may name RGI outlines that needed make_valid (a few are bow ties).
    lines = [ln for ln in out.stderr.strip().splitlines() if not ln.startswith("icemap: warning (InvalidOutline")]
    assert "Traceback" not in out.stderr and len(lines) == 1


def test_grid_errors_are_icemap_errors() -> None:
    assert issubclass(GridError, IcemapError) and issubclass(NoOverlapError, IcemapError)


# -- real item metadata (graphs are built, never computed: the hrefs are remote) ---------------
@pytest.mark.shared_data
def test_real_antarctic_item_bbox_off_and_across_its_footprint() -> None:
    from .conftest import raise_if_dask_computes

    item = json.loads(shared_path("stac_landsat_c2_l2", "odc_stac_items",
                                  "LC08_L2SR_081119_20200101_20200823_02_T2.json").read_text())
    assert item["properties"]["proj:epsg"] == 3031
    with raise_if_dask_computes():
        # Inside the item's bbox, outside its rotated footprint: no pixel of the scene.
        with pytest.raises(GridError, match="misses the footprints"):
            icemap.load([item], bands=BANDS, bbox=(97.2, -81.9, 98.0, -81.7))
        # Across the footprint's southern corner: a lazy cube on the polar grid.
        ds = icemap.load([item], bands=BANDS, bbox=(100.5, -82.2, 102.5, -81.5))
    assert ds.rio.crs.to_epsg() == 3031 and ds.sizes["time"] == 1 and ds.sizes["x"] > 100 and ds.sizes["y"] > 100
    left, bottom, right, top = ds.rio.bounds()
    w, s, e, n = transform_bounds("EPSG:4326", "EPSG:3031", 100.5, -82.2, 102.5, -81.5, densify_pts=21)
    assert left <= w < left + 30 and right - 30 < e <= right and bottom <= s < bottom + 30 and top - 30 < n <= top


@pytest.mark.shared_data
def test_real_items_in_three_utm_zones_warn() -> None:
    from .conftest import raise_if_dask_computes

    page = json.loads(shared_path("stac_landsat_c2_l2", "extracted", "pc_items_landsat-c2-l2_page1.json").read_text())
    items = page["features"]
    zones = {it["properties"].get("proj:epsg") or it["properties"].get("proj:code") for it in items}
    assert len(zones) == 3
    with raise_if_dask_computes(), pytest.warns(MixedCRSWarning, match=r"3 CRSs.*x [\d,]+ px.*crs=.*bbox=") as rec:
        # Big chunks: the grid spans three zones (~1e5 px a side); the default chunks would
        # spend ~40 s building a graph of ~1e5 tasks that this test never computes.
        ds = icemap.load(items, bands=BANDS, chunksize=8192)
    # One warning, and the size it states is the grid the loader built.
    (msg,) = [str(w.message) for w in rec if issubclass(w.category, MixedCRSWarning)]
    width, height = (int(v.replace(",", "")) for v in re.search(r"([\d,]+) x ([\d,]+) px", msg).groups())  # type: ignore[union-attr]
    assert (width, height) == (ds.sizes["x"], ds.sizes["y"])
