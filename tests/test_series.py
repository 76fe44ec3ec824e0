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
from icemap.series import (REGION_ID, SERIES_COLUMNS, TREND_COLUMNS, glacier_counts, glacier_series, region_series,
                           trends, wls_trend, write_table)

from .conftest import raise_if_dask_computes, icemap_cli

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
        # A rate only against a well observed step of an earlier season-year, never within one.
        obs = rows["observed_fraction"].to_numpy()
        for k in range(len(times)):
            row = rows.iloc[k]
            earlier = [j for j in range(k) if rows["year"].iloc[j] < row["year"] and obs[j] >= 0.9]
            if not obs[k] >= 0.9:
                assert np.isnan(row["change_km2_per_yr"]) and row["change_note"].startswith("lower bound")
            elif not earlier:
                assert np.isnan(row["change_km2_per_yr"]) and row["change_note"]
            else:
                j = earlier[-1]
                dt = (times[k] - times[j]).total_seconds() / YEAR_S
                assert row["change_km2_per_yr"] == pytest.approx((areas[k] - areas[j]) / dt, rel=1e-12, abs=1e-15)
                assert row["change_note"] == ""
    assert checked >= len(outlines)  # every glacier, at every date, was compared
    # Something to compare: ice, partial observation and both kinds of empty rate occur in the sample.
    assert (table["area_km2"] > 0).any() and (table["observed_fraction"] < 1).any()
    assert table["change_note"].str.startswith("lower bound").any()


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
    assert list(a["change_note"]) == ["first step", "", ""]
    assert list(a["observed_fraction"]) == [1.0, 1.0, 1.0]
    assert a["outline_area_km2"][0] == pytest.approx(36 * 900 / 1e6)
    b = table[table["glacier_id"] == "RGI60-11.00002"].reset_index(drop=True)
    np.testing.assert_allclose(b["observed_fraction"], [1.0, 0.5, 1.0])
    np.testing.assert_allclose(b["area_km2"], [16 * 900 / 1e6, 8 * 900 / 1e6, 16 * 900 / 1e6])
    # Half under cloud: a lower bound, no rate; the next step compares with the last well observed one.
    assert np.isnan(b["change_km2_per_yr"][1]) and b["change_note"][1] == "lower bound: observed 50% < min_observed 90%"
    assert b["change_km2_per_yr"][2] == 0.0 and b["change_note"][2] == ""
    # The option changes the buffer width; a call's argument wins over it.
    with icemap.set_options(area_buffer_px=1.0):
        wide = glacier_series(ice, outlines)
    np.testing.assert_allclose(wide["area_uncertainty_km2"], 2 * table["area_uncertainty_km2"])
    np.testing.assert_allclose(glacier_series(ice, outlines, buffer_px=1.0)["area_uncertainty_km2"],
                               wide["area_uncertainty_km2"])

    region = region_series(table)
    np.testing.assert_allclose(region["area_km2"], [32 * 900 / 1e6, 17 * 900 / 1e6, 20 * 900 / 1e6])
    # Named by how errors combine: fully correlated (sum) and independent (root-sum-square).
    by_time = table.groupby("time")["area_uncertainty_km2"]
    np.testing.assert_allclose(region["area_uncertainty_sum_km2"], by_time.sum())
    np.testing.assert_allclose(region["area_uncertainty_rss_km2"], by_time.apply(lambda v: np.sqrt((v ** 2).sum())))
    assert (region["area_uncertainty_rss_km2"] < region["area_uncertainty_sum_km2"]).all()
    # Weighted by outline area (36 and 16 pixels): (36 * 1 + 16 * 0.5) / 52 at the second date.
    np.testing.assert_allclose(region["observed_fraction"], [1.0, (36 + 8) / 52, 1.0])
    np.testing.assert_allclose(region["observed_outline_area_km2"], [52 * 900 / 1e6, 44 * 900 / 1e6, 52 * 900 / 1e6])
    # The second step is a lower bound (85% observed): the third compares with the first.
    assert np.isnan(region["change_km2_per_yr"][0]) and np.isnan(region["change_km2_per_yr"][1])
    assert region["change_note"][1].startswith("lower bound")
    assert region["change_km2_per_yr"][2] == pytest.approx(-12 * 900 / 1e6 / (1096 / 365.25))


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
    csv["change_note"] = csv["change_note"].fillna("")  # an empty cell reads back as NaN
    pd.testing.assert_frame_equal(csv, table, check_dtype=False, check_exact=False, rtol=1e-12)
    with pytest.raises(IcemapError, match=r"use \.csv or \.parquet"):
        write_table(table, tmp_path / "s.xlsx")
    with pytest.raises(IcemapError, match="does not exist"):
        write_table(table, tmp_path / "missing" / "s.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.parquet"]  # no temporary files left


def test_cli_areas_writes_series_and_region(stores: dict[str, Path], sample_region: Any) -> None:
    out, region = stores["folder"] / "series.csv", stores["folder"] / "region.parquet"
    res = icemap_cli("areas", "--pred", str(stores["pred"]), "--reference", str(sample_region.outlines),
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
    res = icemap_cli("areas", "--pred", pred, "--reference", ref, "--out", out, *extra)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert match in res.stderr
    assert not (tmp_path / "s.csv").exists()


# -- trends ---------------------------------------------------------------------------------------------
def test_wls_trend_equals_numpy_polyfit_and_the_closed_form() -> None:
    rng = np.random.default_rng(3)
    for n in (2, 3, 7):
        x = np.sort(rng.choice(np.arange(1990, 2030), size=n, replace=False)).astype(float)
        sigma = rng.uniform(0.05, 0.5, n)
        y = 10.0 - 0.2 * (x - 2000) + rng.normal(0, 1, n) * sigma * rng.uniform(0.3, 3)
        slope, intercept, se = wls_trend(x, y, sigma)
        (p1, p0), cov = np.polyfit(x, y, 1, w=1 / sigma, cov="unscaled")
        assert slope == pytest.approx(p1, rel=1e-9) and intercept == pytest.approx(p0, rel=1e-9, abs=1e-9)
        # Closed form of the absolute-sigma slope variance: S / (S Sxx - Sx^2), w = 1 / sigma^2.
        w = 1 / sigma**2
        var = w.sum() / (w.sum() * (w * x * x).sum() - (w * x).sum() ** 2)
        assert var == pytest.approx(cov[0, 0], rel=1e-6)
        chi2 = (w * (y - p0 - p1 * x) ** 2).sum() / (n - 2) if n > 2 else 0.0
        assert se == pytest.approx(np.sqrt(var * max(1.0, chi2)), rel=1e-6)
    with pytest.raises(IcemapError, match="two distinct years"):
        wls_trend([2020.0, 2020.0], [1.0, 2.0], [0.1, 0.1])
    with pytest.raises(IcemapError, match="positive, finite"):
        wls_trend([2020.0, 2021.0], [1.0, 2.0], [0.1, 0.0])


@pytest.fixture
def seasons() -> tuple[xr.DataArray, gpd.GeoDataFrame]:
    """Two dates in the 2020 ablation season, one in each of 2021-2023 (63 N: August-September)."""
    ice = np.zeros((5, 20, 20), np.uint8)
    ice[0, 2:6, 2:6] = 1  # glacier A: 16, then 12 px on the second date of the same season,
    ice[1, 2:6, 2:5] = 1
    ice[2, 2:5, 2:5] = 1  # 9 px in 2021, 6 in 2022,
    ice[3, 2:4, 2:5] = 1
    ice[4, 2:4, 2:4] = 1  # and 4 in 2023 with half the outline under cloud: a lower bound
    ice[4, 1:7, 1:4] = 255
    ice[:, 10:14, 10:14] = 1  # glacier B: half under cloud from 2021 on
    ice[2:, 10:12, 10:14] = 255
    outlines = gpd.GeoDataFrame({"RGIId": ["RGI60-11.00001", "RGI60-11.00002"]},
                                geometry=[_box(1, 1, 7, 7), _box(10, 10, 14, 14)], crs="EPSG:32633")
    return _synthetic(ice, ["2020-08-10", "2020-08-18", "2021-08-15", "2022-08-20", "2023-08-12"]), outlines


def test_trends_leave_out_lower_bounds_and_never_rate_within_a_season(
        seasons: tuple[xr.DataArray, gpd.GeoDataFrame]) -> None:
    ice, outlines = seasons
    table = glacier_series(ice, outlines)
    a = table[table["glacier_id"] == "RGI60-11.00001"].reset_index(drop=True)
    assert list(a["year"]) == [2020, 2020, 2021, 2022, 2023]
    # Second date of the 2020 season: no rate between two dates of one season, with the reason.
    assert np.isnan(a["change_km2_per_yr"][1]) and "within a season" in a["change_note"][1]
    # 2021 against the latest well observed date of 2020 (the second).
    dt = (pd.Timestamp("2021-08-15") - pd.Timestamp("2020-08-18")).total_seconds() / YEAR_S
    assert a["change_km2_per_yr"][2] == pytest.approx((9 - 12) * 900 / 1e6 / dt)
    assert np.isnan(a["change_km2_per_yr"][4]) and a["change_note"][4].startswith("lower bound")

    tr = trends(table)
    assert tuple(tr.columns) == TREND_COLUMNS and tr["glacier_id"].iloc[-1] == REGION_ID
    ta = tr.set_index("glacier_id").loc["RGI60-11.00001"]
    # One area per season-year: 2020 has two fully observed dates, the later one counts.
    rows = a.iloc[[1, 2, 3]]
    (p1, p0), cov = np.polyfit(rows["year"].to_numpy(float), rows["area_km2"], 1,
                               w=1 / rows["area_uncertainty_km2"], cov="unscaled")
    assert (ta["first_year"], ta["last_year"], ta["n_years"], ta["n_lower_bound"]) == (2020, 2022, 3, 1)
    assert ta["rate_km2_per_yr"] == pytest.approx(p1, rel=1e-9)
    assert ta["area_fit_first_year_km2"] == pytest.approx(p0 + p1 * 2020, rel=1e-9)
    assert ta["rate_pct_per_yr"] == pytest.approx(100 * p1 / (p0 + p1 * 2020), rel=1e-9)
    assert ta["rate_stderr_km2_per_yr"] >= np.sqrt(cov[0, 0]) * (1 - 1e-9)
    assert bool(ta["significant"]) == (abs(p1) > 2 * ta["rate_stderr_km2_per_yr"])
    assert ta["reason"] == ""
    # Glacier B: one well observed season-year -> no number, a reason.
    tb = tr.set_index("glacier_id").loc["RGI60-11.00002"]
    assert np.isnan(tb["rate_km2_per_yr"]) and pd.isna(tb["significant"]) and tb["n_years"] == 1
    assert tb["n_lower_bound"] == 3 and "a trend needs 2" in tb["reason"]

    # The option moves the limit: at 0.5 every year of both glaciers counts.
    with icemap.set_options(min_observed=0.5):
        loose = trends(glacier_series(ice, outlines)).set_index("glacier_id")
    assert list(loose.loc[["RGI60-11.00001", "RGI60-11.00002"], "n_years"]) == [4, 4]
    assert trends(table, min_observed=0.5).set_index("glacier_id").loc["RGI60-11.00002", "n_years"] == 4
    with pytest.raises(IcemapError, match="min_observed must be a share in"):
        icemap.set_options(min_observed=1.5)


def test_region_trend_is_the_sum_of_the_glacier_trends(synthetic: tuple[xr.DataArray, gpd.GeoDataFrame]) -> None:
    ice, outlines = synthetic
    table = glacier_series(ice, outlines)
    tr = trends(table).set_index("glacier_id")
    glaciers, r = tr.drop(index=REGION_ID), tr.loc[REGION_ID]
    has = glaciers[glaciers["rate_km2_per_yr"].notna()]
    assert len(has) > 0
    assert r["rate_km2_per_yr"] == pytest.approx(has["rate_km2_per_yr"].sum(), rel=1e-12)
    assert r["rate_stderr_km2_per_yr"] == pytest.approx(has["rate_stderr_km2_per_yr"].sum(), rel=1e-12)
    assert r["rate_pct_per_yr"] == pytest.approx(
        100 * has["rate_km2_per_yr"].sum() / has["area_fit_first_year_km2"].sum(), rel=1e-12)
    assert r["n_lower_bound"] == glaciers["n_lower_bound"].sum()
    assert (len(has) == len(glaciers)) == ("sum of the trends" not in r["reason"])


def test_region_trend_is_not_made_by_cloud() -> None:
    """A glacier half hidden in the first year must not make a region of unchanging glaciers grow.

    The yearly region total of that year is a lower bound (it holds only the visible half); a
    line through the totals would read that as growth. The region's trend is the sum of the
    glaciers' own trends, each from its well observed years: zero here.
    """
    rows = []
    for year, hidden in ((2020, True), (2021, False), (2022, False)):
        for gid, area in (("G1", 10.0), ("G2", 1.0)):
            seen = 0.5 if (hidden and gid == "G2") else 1.0
            rows.append({"glacier_id": gid, "time": pd.Timestamp(f"{year}-08-15"), "year": year,
                         "area_km2": area * seen, "area_uncertainty_km2": 0.05 * area,
                         "observed_fraction": seen, "outline_area_km2": area})
    table = pd.DataFrame(rows)
    tr = trends(table, min_observed=0.9).set_index("glacier_id")
    assert tr.loc["G1", "rate_km2_per_yr"] == pytest.approx(0.0, abs=1e-12)
    assert tr.loc["G2", "n_lower_bound"] == 1 and tr.loc["G2", "rate_km2_per_yr"] == pytest.approx(0.0, abs=1e-12)
    assert tr.loc[REGION_ID, "rate_km2_per_yr"] == pytest.approx(0.0, abs=1e-12)
    # What a line through the yearly totals would have said: growth from cloud alone.
    totals = table.groupby("year")["area_km2"].sum()
    assert np.polyfit(totals.index.to_numpy(float), totals.to_numpy(), 1)[0] > 0.2


def test_cli_areas_writes_trends(stores: dict[str, Path], sample_region: Any) -> None:
    out, tr = stores["folder"] / "s2.csv", stores["folder"] / "trends.parquet"
    res = icemap_cli("areas", "--pred", str(stores["pred"]), "--reference", str(sample_region.outlines),
                     "--out", str(out), "--trends", str(tr), "--min-observed", "0.5")
    assert res.returncode == 0, res.stderr
    back = pd.read_parquet(tr)
    assert tuple(back.columns[:8]) == ("glacier_id", "first_year", "last_year", "n_years", "rate_km2_per_yr",
                                       "rate_stderr_km2_per_yr", "rate_pct_per_yr", "significant")
    want = trends(pd.read_csv(out, parse_dates=["time"], dtype={"glacier_id": str}), min_observed=0.5)
    pd.testing.assert_frame_equal(back, want, check_dtype=False)
    csv = stores["folder"] / "trends.csv"
    res = icemap_cli("areas", "--pred", str(stores["pred"]), "--reference", str(sample_region.outlines),
                     "--out", str(out), "--trends", str(csv), "--min-observed", "2")
    assert res.returncode == 1 and "min_observed must be" in res.stderr and not csv.exists()
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
