"""Per-glacier series: areas, buffer uncertainties, observed shares and rates, against numpy.

The reference computation here shares nothing with icemap.series but the product it reads: the
glacier ids come from the sample region's own truth raster (burnt by the generator), areas and
perimeters from plain numpy on the whole array.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import rioxarray  # noqa: F401  (the .rio accessor of the synthetic masks)
import shapely
import xarray as xr

import icemap
from icemap.errors import IcemapError, NoOverlapError
from icemap.kernels import glacier_stats
from icemap.series import SERIES_COLUMNS, glacier_counts, glacier_series, region_series, write_table

from .conftest import raise_if_dask_computes, run_icemap

YEAR_S = 365.25 * 86400


@pytest.fixture(scope="module")
def stores(sample_region: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real cube store (64-px chunks) and the NDSI product store mapped from it."""
    from icemap.workflow import map_cube

    folder = tmp_path_factory.mktemp("series")
    cube = folder / "cube.zarr"
    icemap.ingest(icemap.search(str(sample_region.catalog)).item_dicts(), cube, chunksize=64,
                  bands=["green", "nir08", "swir16"])
    map_cube(cube, folder / "ice.zarr")
    return {"cube": cube, "pred": folder / "ice.zarr", "folder": folder}


def _perimeter_edges(s: np.ndarray) -> tuple[int, int]:
    p = np.pad(s, 1, constant_values=False)
    return int(np.count_nonzero(p[:, 1:] != p[:, :-1])), int(np.count_nonzero(p[1:, :] != p[:-1, :]))


def test_series_equals_numpy_on_the_sample_region(stores: dict[str, Path], sample_region: Any) -> None:
    table = glacier_series(stores["pred"], sample_region.outlines)
    assert tuple(table.columns) == SERIES_COLUMNS
    ice = icemap.open_cube(stores["pred"])["ice"].values
    times = pd.DatetimeIndex(icemap.open_cube(stores["pred"])["time"].values)
    with rasterio.open(sample_region.glacier_ids) as src:
        truth = src.read(1)
        res = abs(src.transform.a)
        bounds = shapely.box(*src.bounds)
    outlines = gpd.read_file(sample_region.outlines, layer="glaciers")
    assert len(table) == len(outlines) * len(times)
    px_km2 = res * res / 1e6
    checked = 0
    for _, gl in outlines.iterrows():
        rows = table[table["glacier_id"] == str(gl["glacier_id"])].sort_values("time")
        assert list(rows["year"]) == list(times.year) and list(rows["time"]) == list(times)
        inside = truth == gl["gid"]
        n_px = int(inside.sum())
        areas = []
        for k in range(len(times)):
            row = rows.iloc[k]
            s = (ice[k] == 1) & inside
            ex, ey = _perimeter_edges(s)
            area = s.sum() * px_km2
            areas.append(area)
            assert row["area_km2"] == pytest.approx(area, rel=1e-12, abs=1e-15)
            # Buffer method: pixel-edge perimeter x half a pixel.
            assert row["area_uncertainty_km2"] == pytest.approx((ex + ey) * res * (res / 2) / 1e6, rel=1e-12, abs=1e-15)
            if n_px and gl.geometry.within(bounds):
                valid = int(((ice[k] != 255) & inside).sum())
                assert row["observed_fraction"] == pytest.approx(valid / n_px, rel=1e-12)
                checked += 1
            elif n_px == 0:
                assert np.isnan(row["observed_fraction"])
        assert rows["outline_area_km2"].iloc[0] == pytest.approx(gl.geometry.area / 1e6)
        dt = np.diff(times.asi8) / 1e9 / YEAR_S
        want = np.diff(areas) / dt
        np.testing.assert_allclose(rows["change_km2_per_yr"].to_numpy()[1:], want, rtol=1e-12, atol=1e-15)
        assert np.isnan(rows["change_km2_per_yr"].iloc[0]) and np.isnan(rows["change_pct_per_yr"].iloc[0])
    assert checked >= len(outlines)  # every glacier, at every date, was compared
    # Something to compare: ice, partial observation and change all occur in the sample.
    assert (table["area_km2"] > 0).any() and (table["observed_fraction"] < 1).any()
    assert (table["change_km2_per_yr"].abs() > 0).any()


def test_counts_are_lazy_and_chunked_equals_whole(stores: dict[str, Path], sample_region: Any) -> None:
    from icemap.labels import glacier_ids

    ice = icemap.open_cube(stores["pred"])["ice"]
    ids, tab = glacier_ids(sample_region.outlines, ice)
    n = int(tab["gid"].max())
    rechunked = ice.chunk({"time": 2, "y": 37, "x": 50})  # uneven blocks, two dates per block
    with raise_if_dask_computes():
        lazy = glacier_counts(rechunked, ids, n)
    assert lazy.chunks is not None
    eager = glacier_counts(ice.compute(), ids.compute(), n)  # whole arrays in memory: one block
    whole = glacier_stats(ice.values, ids.values, n)
    np.testing.assert_array_equal(lazy.values, whole)
    np.testing.assert_array_equal(eager.values, whole)
    assert list(lazy["stat"].values) == ["pixels", "valid", "ice", "edges_x", "edges_y"]


def _synthetic(values: np.ndarray, times: list[str]) -> xr.DataArray:
    _, h, w = values.shape
    da = xr.DataArray(values.astype(np.uint8), dims=("time", "y", "x"),
                      coords={"time": pd.DatetimeIndex(times), "y": 7_000_000.0 - 30.0 * (np.arange(h) + 0.5),
                              "x": 500_000.0 + 30.0 * (np.arange(w) + 0.5)}, name="ice")
    return da.rio.write_crs("EPSG:32633")


def _box(col0: int, row0: int, col1: int, row1: int) -> Any:
    """A polygon covering pixel columns col0..col1-1 and rows row0..row1-1 of the synthetic grid."""
    return shapely.box(500_000 + 30 * col0, 7_000_000 - 30 * row1, 500_000 + 30 * col1, 7_000_000 - 30 * row0)


@pytest.fixture
def synthetic() -> tuple[xr.DataArray, gpd.GeoDataFrame]:
    ice = np.zeros((3, 20, 20), np.uint8)
    ice[0, 2:6, 2:6] = 1  # glacier A: 4x4, then 3x3, then 2x2 ice pixels
    ice[1, 2:5, 2:5] = 1
    ice[2, 2:4, 2:4] = 1
    ice[:, 10:14, 10:14] = 1  # glacier B: 4x4 ice at every date, half of it under cloud at the second
    ice[1, 10:12, 10:14] = 255
    outlines = gpd.GeoDataFrame(
        {"RGIId": ["RGI60-11.00001", "RGI60-11.00002"], "name": ["Alpha", "Beta"]},
        geometry=[_box(1, 1, 7, 7), _box(10, 10, 14, 14)], crs="EPSG:32633")
    # 2020 is a leap year: 366 days, then 730 days.
    return _synthetic(ice, ["2020-01-01", "2021-01-01", "2023-01-01"]), outlines


def test_rates_and_uncertainty_by_hand(synthetic: tuple[xr.DataArray, gpd.GeoDataFrame]) -> None:
    ice, outlines = synthetic
    table = glacier_series(ice, outlines)
    pd.testing.assert_frame_equal(ice.icemap.series(outlines), table)  # the accessor spells the same call
    a = table[table["glacier_id"] == "RGI60-11.00001"].reset_index(drop=True)
    assert list(a["year"]) == [2020, 2021, 2023]
    np.testing.assert_allclose(a["area_km2"], [16 * 900 / 1e6, 9 * 900 / 1e6, 4 * 900 / 1e6])
    # Perimeters 16, 12, 8 pixel sides of 30 m, times a 15 m buffer.
    np.testing.assert_allclose(a["area_uncertainty_km2"], [16 * 30 * 15 / 1e6, 12 * 30 * 15 / 1e6, 8 * 30 * 15 / 1e6])
    np.testing.assert_allclose(a["change_km2_per_yr"][1:], [-7 * 900 / 1e6 / (366 / 365.25), -5 * 900 / 1e6 / (730 / 365.25)])
    np.testing.assert_allclose(a["change_pct_per_yr"][1:], [-100 * 7 / 16 / (366 / 365.25), -100 * 5 / 9 / (730 / 365.25)])
    assert list(a["observed_fraction"]) == [1.0, 1.0, 1.0]
    assert a["outline_area_km2"][0] == pytest.approx(36 * 900 / 1e6)
    b = table[table["glacier_id"] == "RGI60-11.00002"].reset_index(drop=True)
    np.testing.assert_allclose(b["observed_fraction"], [1.0, 0.5, 1.0])
    np.testing.assert_allclose(b["area_km2"], [16 * 900 / 1e6, 8 * 900 / 1e6, 16 * 900 / 1e6])
    # The option changes the buffer width; a call's argument wins over it.
    with icemap.set_options(area_buffer_px=1.0):
        wide = glacier_series(ice, outlines)
    np.testing.assert_allclose(wide["area_uncertainty_km2"], 2 * table["area_uncertainty_km2"])
    np.testing.assert_allclose(glacier_series(ice, outlines, buffer_px=1.0)["area_uncertainty_km2"],
                               wide["area_uncertainty_km2"])

    region = region_series(table)
    np.testing.assert_allclose(region["area_km2"], [32 * 900 / 1e6, 17 * 900 / 1e6, 20 * 900 / 1e6])
    # Fully correlated: the region's uncertainty is the sum of the glaciers'.
    np.testing.assert_allclose(region["area_uncertainty_km2"], table.groupby("time")["area_uncertainty_km2"].sum())
    # Weighted by outline area (36 and 16 pixels): (36 * 1 + 16 * 0.5) / 52 at the second date.
    np.testing.assert_allclose(region["observed_fraction"], [1.0, (36 + 8) / 52, 1.0])
    np.testing.assert_allclose(region["change_km2_per_yr"][1:], [-15 * 900 / 1e6 / (366 / 365.25),
                                                                 3 * 900 / 1e6 / (730 / 365.25)])
    assert np.isnan(region["change_km2_per_yr"][0])


def test_id_column_is_carried_and_checked(synthetic: tuple[xr.DataArray, gpd.GeoDataFrame], tmp_path: Path) -> None:
    ice, outlines = synthetic
    path = tmp_path / "rgi.gpkg"
    outlines.to_file(path, layer="glaciers")
    assert set(glacier_series(ice, path)["glacier_id"]) == {"RGI60-11.00001", "RGI60-11.00002"}
    assert set(glacier_series(ice, path, id_column="name")["glacier_id"]) == {"Alpha", "Beta"}
    with pytest.raises(IcemapError, match="no column 'nope'"):
        glacier_series(ice, path, id_column="nope")
    far = outlines.set_geometry(outlines.geometry.translate(1e6, 0))
    with pytest.raises(NoOverlapError, match="no reference outline overlaps"):
        glacier_series(ice, far)
    with pytest.raises(IcemapError, match="time dimension"):
        glacier_series(ice.isel(time=0), outlines)


def test_csv_and_parquet_round_trip(synthetic: tuple[xr.DataArray, gpd.GeoDataFrame], tmp_path: Path) -> None:
    ice, outlines = synthetic
    table = glacier_series(ice, outlines)
    back = pd.read_parquet(write_table(table, tmp_path / "s.parquet"))
    pd.testing.assert_frame_equal(back, table)
    csv = pd.read_csv(write_table(table, tmp_path / "s.csv"), parse_dates=["time"], dtype={"glacier_id": str})
    pd.testing.assert_frame_equal(csv, table, check_dtype=False, check_exact=False, rtol=1e-12)
    with pytest.raises(IcemapError, match=r"use \.csv or \.parquet"):
        write_table(table, tmp_path / "s.xlsx")
    with pytest.raises(IcemapError, match="does not exist"):
        write_table(table, tmp_path / "missing" / "s.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.parquet"]  # no temporary files left


def test_cli_areas_writes_series_and_region(stores: dict[str, Path], sample_region: Any) -> None:
    out, region = stores["folder"] / "series.csv", stores["folder"] / "region.parquet"
    res = run_icemap("areas", "--pred", str(stores["pred"]), "--reference", str(sample_region.outlines),
                  "--out", str(out), "--region-out", str(region))
    assert res.returncode == 0, res.stderr
    table = pd.read_csv(out, dtype={"glacier_id": str})
    assert tuple(table.columns) == SERIES_COLUMNS
    outlines = gpd.read_file(sample_region.outlines, layer="glaciers")
    assert set(table["glacier_id"]) == set(outlines["glacier_id"].astype(str))
    reg = pd.read_parquet(region)
    np.testing.assert_allclose(reg["area_km2"].to_numpy(), table.groupby("time")["area_km2"].sum().to_numpy())


@pytest.mark.parametrize("case", ["missing-pred", "missing-reference", "no-overlap", "id-column", "format"])
def test_cli_areas_bad_input_is_one_line(case: str, stores: dict[str, Path], sample_region: Any,
                                         tmp_path: Path) -> None:
    pred, ref, out = str(stores["pred"]), str(sample_region.outlines), str(tmp_path / "s.csv")
    extra: list[str] = []
    if case == "missing-pred":
        pred, match = str(tmp_path / "none.zarr"), "does not exist"
    elif case == "missing-reference":
        ref, match = str(tmp_path / "none.gpkg"), "does not exist"
    elif case == "no-overlap":
        gdf = gpd.read_file(sample_region.outlines, layer="glaciers")
        ref = str(tmp_path / "elsewhere.gpkg")
        gdf.set_geometry(gdf.geometry.translate(5e5, 0)).to_file(ref)
        match = "no reference outline overlaps"
    elif case == "id-column":
        extra, match = ["--id-column", "RGIId"], "no column 'RGIId'"
    else:
        out, match = str(tmp_path / "s.xlsx"), "use .csv or .parquet"
    res = run_icemap("areas", "--pred", pred, "--reference", ref, "--out", out, *extra)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert match in res.stderr
    assert not (tmp_path / "s.csv").exists()
