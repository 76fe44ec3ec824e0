"""`icemap demo`: the main job end to end through the command line.

The demo runs once per session (``demo_run`` in tests/conftest.py, in-process through
``icemap.cli.main``); each test reads its outputs, the last one reruns it in the same folder.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import icemap
from icemap.labels import glacier_ids
from icemap.vector import pixel_area_m2

from .conftest import DEMO_ARGS, icemap_cli

Demo = tuple[Path, subprocess.CompletedProcess[str]]


def _outlines(out: Path) -> gpd.GeoDataFrame:
    region = icemap.open_sample_region(out / "region")
    return gpd.read_file(region.outlines, layer="glaciers")


def test_demo_prints_its_three_tables(demo_run: Demo) -> None:
    _, res = demo_run
    assert "Ice area on the sample region" in res.stdout and "One map per year" in res.stdout
    assert "Trends over season-years" in res.stdout and "clean ice" in res.stdout
    assert "change %/yr" not in res.stdout  # no date-to-date rates


def test_demo_areas_add_up_to_the_mask(demo_run: Demo) -> None:
    out, _ = demo_run
    cube = icemap.open_cube(out / "cube.zarr")
    assert cube.sizes["time"] == 4 and cube.rio.crs.to_epsg() == 32719

    areas = pd.read_csv(out / "ice_area_per_glacier.csv", parse_dates=["time"])
    outlines = _outlines(out)
    assert set(areas["glacier_id"]) == set(outlines["glacier_id"])
    # Per-glacier areas add up to the region's ice area counted directly on the mask.
    ice = icemap.ice_mask(cube)
    ids = glacier_ids(outlines, cube)[0].values
    for t, group in areas.groupby("time"):
        mask = ice.sel(time=np.datetime64(t)).values
        direct = ((mask == 1) & (ids > 0)).sum() * pixel_area_m2(cube) / 1e6
        assert group["ice_area_km2"].sum() == np_approx(direct)
    # Outline areas are the polygons' own.
    merged = areas.drop_duplicates("glacier_id").merge(outlines[["glacier_id", "area_km2"]], on="glacier_id")
    np.testing.assert_allclose(merged["outline_area_km2"], merged["area_km2"], rtol=1e-9)


def test_demo_quicklook(demo_run: Demo) -> None:
    out, _ = demo_run
    with Image.open(out / "quicklook.png") as img:
        assert img.mode == "RGB" and min(img.size) >= 100
        pixels = np.asarray(img)
    assert (pixels == [255, 230, 0]).all(axis=-1).any()  # outlines drawn
    assert (pixels == [255, 0, 200]).all(axis=-1).any()  # the legend's ice swatch (the overlay is blended)
    assert (pixels[-10:] == 255).all(axis=-1).mean() > 0.5  # a white footer with the date and legend
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # a picture, not a flat fill


def test_demo_yearly_maps_series_trends_and_report(demo_run: Demo) -> None:
    out, _ = demo_run
    cube = icemap.open_cube(out / "cube.zarr")
    outlines = _outlines(out)
    # One map per year, with fewer gaps than any acquisition of its season.
    yearly = icemap.open_cube(out / "composite-ice.zarr")["ice"]
    assert yearly.sizes["time"] == 2 and yearly.rio.crs == cube.rio.crs
    gaps = (icemap.ice_mask(cube) == 255).mean(dim=("y", "x")).values
    for k, year_gaps in enumerate((yearly == 255).mean(dim=("y", "x")).values):
        assert year_gaps < gaps[2 * k: 2 * k + 2].min()
    series = pd.read_csv(out / "glacier_series.csv")
    assert set(series["glacier_id"]) == set(outlines["glacier_id"]) and sorted(set(series["year"])) == [2021, 2022]
    assert (series["area_uncertainty_km2"] > 0).any() and "change_note" in series.columns
    region_tab = pd.read_csv(out / "region_series.csv")
    np.testing.assert_allclose(region_tab["area_km2"], series.groupby("year")["area_km2"].sum().to_numpy())
    trends = pd.read_csv(out / "trends.csv", dtype={"glacier_id": str})
    assert set(trends["glacier_id"]) == set(outlines["glacier_id"]) | {"region"}
    assert (trends["n_years"] <= 2).all() and (trends["rate_km2_per_yr"].isna() == (trends["n_years"] < 2)).all()
    html = (out / "report.html").read_text()
    assert all(str(g) in html for g in outlines["glacier_id"])
    for name in ("map.png", "area_per_year.png"):
        with Image.open(out / name) as img:
            assert min(img.size) >= 200


def test_demo_rerun_reuses_the_region_and_cube(demo_run: Demo) -> None:
    """Last in this module: it runs the demo again in the same folder."""
    out, _ = demo_run
    again = icemap_cli("demo", "--out", str(out), *DEMO_ARGS)
    assert again.returncode == 0, again.stderr


def np_approx(value: float) -> object:
    return pytest.approx(value, rel=1e-9, abs=1e-12)
