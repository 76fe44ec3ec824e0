"""Products: ice outlines, vector files, per-glacier area change, one COG per variable and date."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import rioxarray  # noqa: F401  (registers .rio)
import xarray as xr

import icemap
from icemap.errors import IcemapError
from icemap.export import export_geotiffs
from icemap.labels import glacier_ids, read_outlines
from icemap.vector import area_change, ice_area_km2, ice_area_per_glacier, pixel_area_m2, polygonise, write_vector

HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None


@pytest.fixture(scope="module")
def cube(sample_region: Any) -> Any:
    from icemap.stac import search

    items = search(str(sample_region.catalog)).item_dicts()
    return icemap.load(items, chunksize=64, bands=["green", "nir08", "swir16"])


@pytest.fixture(scope="module")
def ice(cube: Any) -> Any:
    return icemap.ice_mask(cube, guards=("water", "dark")).compute()


def _mask(values: np.ndarray, res: float = 30.0, x0: float = 500_000.0, y0: float = 7_000_000.0) -> xr.DataArray:
    """A small (y, x) uint8 mask on a UTM grid with pixel centres at half pixels."""
    h, w = values.shape
    da = xr.DataArray(values.astype(np.uint8), dims=("y", "x"),
                      coords={"y": y0 - res * (np.arange(h) + 0.5), "x": x0 + res * (np.arange(w) + 0.5)},
                      name="ice")
    return da.rio.write_crs("EPSG:32633")


# -- polygonise ------------------------------------------------------------------------------------
def test_polygonise_areas_are_pixel_counts_times_pixel_area(ice: Any) -> None:
    gdf = polygonise(ice)
    px = pixel_area_m2(ice)
    assert px == 900.0
    assert list(gdf.columns) == ["glacier_id", "time", "source_item_ids", "method", "threshold", "model_sha256",
                                 "pixel_count", "area_km2", "area_uncertainty_km2", "geometry"]
    # Per polygon: the stored area is the count times the pixel area, and the geometry agrees.
    assert (gdf["area_km2"] == gdf["pixel_count"] * px / 1e6).all()
    np.testing.assert_allclose(gdf.geometry.area, gdf["pixel_count"] * px, rtol=1e-12)
    # Per time step: the polygons hold every ice pixel exactly once.
    counts = (ice == 1).sum(dim=("y", "x")).values
    per_time = gdf.groupby("time")["pixel_count"].sum()
    assert list(per_time.index) == list(pd.DatetimeIndex(ice["time"].values).tz_localize("UTC"))
    np.testing.assert_array_equal(per_time.to_numpy(), counts)
    np.testing.assert_allclose(gdf.groupby("time")["area_km2"].sum().to_numpy(), ice_area_km2(ice).values,
                               rtol=1e-12)


def test_polygonise_crs_is_cube_crs(ice: Any, cube: Any) -> None:
    gdf = polygonise(ice)
    assert gdf.crs == cube.rio.crs
    assert gdf.crs.to_epsg() == 32719
    # Outlines lie on the grid: inside its bounds, vertices on pixel edges.
    left, bottom, right, top = cube.rio.bounds()
    minx, miny, maxx, maxy = gdf.total_bounds
    assert left <= minx and maxx <= right and bottom <= miny and maxy <= top
    x, y = np.asarray(gdf.geometry.iloc[0].exterior.coords).T
    assert np.all((x - left) % 30 == 0) and np.all((top - y) % 30 == 0)


def test_polygonise_components_holes_nodata_and_min_area() -> None:
    m = np.zeros((7, 8), np.uint8)
    m[1:6, 1:6] = 1  # a 5x5 block...
    m[3, 3] = 0  # ...with a one-pixel hole
    m[0, 7] = 1  # a single pixel apart from the block
    m[6, 6] = 1  # diagonal neighbour of the block's corner (5, 5): a separate patch
    m[2, 7] = 255  # nodata is not ice
    gdf = polygonise(_mask(m))
    assert sorted(gdf["pixel_count"]) == [1, 1, 24]
    big = gdf.loc[gdf["pixel_count"].idxmax(), "geometry"]
    assert len(big.interiors) == 1 and big.area == 24 * 900.0
    assert gdf["time"].isna().all()  # a mask without time
    kept = polygonise(_mask(m), min_area_m2=2 * 900)
    assert list(kept["pixel_count"]) == [24]
    empty = polygonise(_mask(np.zeros((4, 4), np.uint8)))
    assert len(empty) == 0 and empty.crs.to_epsg() == 32633
    with pytest.raises(IcemapError, match="projected CRS"):
        polygonise(_mask(m).rio.write_crs("EPSG:4326"))


def test_outlines_carry_glacier_ids_time_provenance_and_uncertainty(tmp_path: Path) -> None:
    m = np.zeros((2, 8, 12), np.uint8)
    m[:, 1:5, 1:9] = 1  # one patch across two glaciers' outlines and beyond them
    m[1, 6, 10] = 1  # a pixel outside every outline, second date only
    ice = xr.DataArray(m, dims=("time", "y", "x"), coords={
        "time": pd.DatetimeIndex(["2021-02-12T14:30:00", "2022-02-15T14:30:00"]),
        "item_ids": ("time", ["LC08_A,LC08_B", "LC09_C"]),
        "y": 7_000_000.0 - 30.0 * (np.arange(8) + 0.5), "x": 500_000.0 + 30.0 * (np.arange(12) + 0.5)},
        attrs={"method": "ndsi", "threshold": 0.3}).rio.write_crs("EPSG:32633")
    box = _pixel_box
    ref = gpd.GeoDataFrame({"RGIId": ["RGI60-17.00001", "RGI60-17.00002"]},
                           geometry=[box(0, 0, 4, 6), box(4, 0, 7, 6)], crs="EPSG:32633")
    gdf = polygonise(ice, reference=ref)
    path = write_vector(gdf, tmp_path / "outlines.gpkg")
    back = gpd.read_file(path)
    assert back.crs == gdf.crs and len(back) == len(gdf) == 7
    back["time"] = pd.to_datetime(back["time"], utc=True)
    first = back[back["time"] == pd.Timestamp("2021-02-12T14:30:00", tz="UTC")]
    # Cut at the outlines: 4x3 px in the first glacier, 4x3 in the second, 4x2 east of both.
    per_id = first.groupby(first["glacier_id"].fillna("none"))["pixel_count"].sum().to_dict()
    assert per_id == {"RGI60-17.00001": 12, "RGI60-17.00002": 12, "none": 8}
    assert set(first["source_item_ids"]) == {"LC08_A,LC08_B"}
    second = back[back["time"] == pd.Timestamp("2022-02-15T14:30:00", tz="UTC")]
    assert set(second["source_item_ids"]) == {"LC09_C"} and second["glacier_id"].isna().sum() == 2
    assert set(back["method"]) == {"ndsi"} and set(back["threshold"]) == {0.3}
    assert set(back["model_sha256"].fillna("")) == {""}
    # Buffer method, as in the series: perimeter along pixel sides x half a pixel.
    np.testing.assert_allclose(back["area_uncertainty_km2"], back.geometry.length * 15 / 1e6, rtol=1e-12)
    one = back[back["pixel_count"] == 12].iloc[0]
    assert one["area_uncertainty_km2"] == pytest.approx((4 + 3) * 2 * 30 * 15 / 1e6)
    # The polygons of a glacier add up to the series' area of it, date by date.
    from icemap.series import glacier_series

    series = glacier_series(ice, ref)
    sums = back.dropna(subset=["glacier_id"]).groupby(["glacier_id", back["time"].dt.tz_localize(None)])["area_km2"].sum()
    for row in series.itertuples():
        assert sums.get((row.glacier_id, row.time), 0.0) == pytest.approx(row.area_km2)
    # A model's checksum and the product's attributes win over the mask's own.
    unet = polygonise(ice, attrs={"method": "unet", "threshold": 0.5, "model_sha256": "ab" * 32})
    assert set(unet["model_sha256"]) == {"ab" * 32} and set(unet["method"]) == {"unet"}
    assert unet["glacier_id"].isna().all()
    # One step of a product (isel) keeps its date.
    step = polygonise(ice.isel(time=1))
    assert (step["time"] == pd.Timestamp("2022-02-15T14:30:00", tz="UTC")).all()
    assert set(step["source_item_ids"]) == {"LC09_C"}


def _pixel_box(col0: int, row0: int, col1: int, row1: int) -> Any:
    """Polygon over pixel columns col0..col1-1 and rows row0..row1-1 of the grid of ``_mask``."""
    import shapely

    return shapely.box(500_000 + 30 * col0, 7_000_000 - 30 * row1, 500_000 + 30 * col1, 7_000_000 - 30 * row0)


# -- write_vector ------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".gpkg", ".geojson"])
def test_write_vector_round_trip(ice: Any, tmp_path: Path, suffix: str) -> None:
    gdf = polygonise(ice)
    path = write_vector(gdf, tmp_path / f"outlines{suffix}")
    assert path == tmp_path / f"outlines{suffix}"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    back = gpd.read_file(path)
    assert back.crs == gdf.crs and len(back) == len(gdf)
    np.testing.assert_array_equal(back["pixel_count"], gdf["pixel_count"])
    np.testing.assert_allclose(back["area_km2"], gdf["area_km2"], rtol=1e-12)
    assert (pd.to_datetime(back["time"], utc=True) == gdf["time"]).all()
    assert back.geometry.geom_equals_exact(gdf.geometry, tolerance=1e-6).all()
    # Overwriting replaces the file atomically with the new content.
    write_vector(gdf.iloc[:3], path)
    assert len(gpd.read_file(path)) == 3


def test_write_vector_parquet(ice: Any, tmp_path: Path) -> None:
    gdf = polygonise(ice)
    path = tmp_path / "outlines.parquet"
    if not HAS_PYARROW:
        # pyarrow is not installed in this environment: GeoParquet must fail clearly, not
        # silently (and leave nothing behind). The round trip below runs where it is installed.
        with pytest.raises(IcemapError, match="pyarrow"):
            write_vector(gdf, path)
        assert list(tmp_path.iterdir()) == []
        return
    write_vector(gdf, path)
    back = gpd.read_parquet(path)
    assert back.crs == gdf.crs and len(back) == len(gdf)
    assert back.geometry.geom_equals_exact(gdf.geometry, tolerance=0).all()


def test_write_vector_errors(ice: Any, tmp_path: Path) -> None:
    gdf = polygonise(ice)
    with pytest.raises(IcemapError, match=r"\.gpkg \(GeoPackage\), \.geojson \(GeoJSON\), \.parquet"):
        write_vector(gdf, tmp_path / "outlines.shp")
    with pytest.raises(IcemapError, match="does not exist"):
        write_vector(gdf, tmp_path / "missing" / "outlines.gpkg")


# -- area change ----------------------------------------------------------------------------------------
def test_area_change_matches_ice_area_per_glacier(sample_region: Any, cube: Any, ice: Any) -> None:
    outlines = read_outlines(sample_region.outlines, layer="glaciers")
    ids, table = glacier_ids(outlines, cube)
    d0, d1 = sample_region.dates[0], sample_region.dates[-1]
    change = area_change(ice, d0, d1, ids, table)
    per = ice_area_per_glacier(ice, ids, table)
    assert len(change) == len(table)
    t0, t1 = pd.DatetimeIndex(ice["time"].values)[[0, -1]]
    assert (change["time0"] == t0).all() and (change["time1"] == t1).all()
    a0 = per[per["time"] == t0].set_index("glacier_id")["ice_area_km2"]
    a1 = per[per["time"] == t1].set_index("glacier_id")["ice_area_km2"]
    c = change.set_index("glacier_id")
    np.testing.assert_array_equal(c["area0_km2"], a0.loc[c.index])
    np.testing.assert_array_equal(c["area1_km2"], a1.loc[c.index])
    np.testing.assert_allclose(c["change_km2"], a1.loc[c.index] - a0.loc[c.index], atol=1e-12)
    has0 = c["area0_km2"] > 0
    np.testing.assert_allclose(c.loc[has0, "change_pct"],
                               100 * c.loc[has0, "change_km2"] / c.loc[has0, "area0_km2"])
    assert c.loc[~has0, "change_pct"].isna().all()
    assert has0.sum() >= len(c) // 2  # most glaciers have visible ice on the first date
    # Integer positions and full times name the same steps; one day naming no step fails clearly.
    by_pos = area_change(ice, 0, -1, ids, table)
    pd.testing.assert_frame_equal(by_pos, change)
    with pytest.raises(IcemapError, match="no time step at"):
        area_change(ice, "2020-01-01", d1, ids, table)


# -- export_geotiffs ---------------------------------------------------------------------------------------
def test_export_geotiffs_cogs_equal_product(cube: Any, ice: Any, tmp_path: Path) -> None:
    products = xr.Dataset({"ice": ice, "ndsi": icemap.ndsi(cube)})
    paths = export_geotiffs(products, tmp_path / "cogs", variables=("ice", "ndsi"))
    days = [str(t)[:10] for t in ice["time"].values]
    assert [p.name for p in paths] == [f"ice_{d}.tif" for d in days] + [f"ndsi_{d}.tif" for d in days]
    ndsi = products["ndsi"].values
    for i, d in enumerate(days):
        for name, expected, nodata, dtype in (("ice", ice.values[i], 255, "uint8"),
                                              ("ndsi", ndsi[i], None, "float32")):
            with rasterio.open(tmp_path / "cogs" / f"{name}_{d}.tif") as src:
                assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
                assert src.profile["tiled"] and src.overviews(1)
                assert src.crs == cube.rio.crs
                assert src.transform == cube.rio.transform()
                assert src.dtypes[0] == dtype
                if nodata is None:
                    assert np.isnan(src.nodata)
                else:
                    assert src.nodata == nodata
                np.testing.assert_array_equal(src.read(1), expected)
    assert (ice.values == 255).any()  # the nodata value is really used in the files


def test_export_geotiffs_errors(ice: Any, tmp_path: Path) -> None:
    with pytest.raises(IcemapError, match="no variable 'ndsi'"):
        export_geotiffs(ice.to_dataset(), tmp_path, variables=("ndsi",))
    with pytest.raises(IcemapError, match="no CRS"):
        export_geotiffs(ice.drop_vars("spatial_ref").to_dataset(), tmp_path)
    # A DataArray works directly; a 2-D one gets no date in its name.
    assert export_geotiffs(ice.isel(time=0, drop=True), tmp_path)[0].name == "ice.tif"


def test_accessor_delegates_to_the_api(sample_region: Any) -> None:
    """`cube.icemap.*` gives the same results as the functions it stands for."""
    import icemap
    from icemap.stac import search

    # Read once (persist keeps the dask chunks): each side below computes from the same pixels.
    cube = icemap.load(search(sample_region.catalog).item_dicts(), chunksize=64).persist()
    np.testing.assert_array_equal(cube.icemap.ndsi().values, icemap.ndsi(cube).values)
    ice = cube.icemap.ice_mask(threshold=0.3, guards=["water"])
    np.testing.assert_array_equal(ice.values, icemap.ice_mask(cube, threshold=0.3, guards=["water"]).values)
    np.testing.assert_allclose(ice.icemap.area_km2().values, ((ice == 1).sum(("y", "x")) * 900 / 1e6).values)
    per_glacier = ice.icemap.area_per_glacier(icemap.read_outlines(sample_region.outlines))
    assert len(per_glacier) == ice.sizes["time"] * len(icemap.read_outlines(sample_region.outlines))
    assert ice.icemap.evaluate(sample_region.outlines)["f1"] > 0
