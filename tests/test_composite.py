"""Seasonal composites and gap filling (icemap.composite) on a multi-acquisition sample region.

One region (96 px, 2 years x 3 acquisitions 8 days apart, first date split in two scenes) is
generated and ingested once per module. The composite is compared with an independent numpy
implementation, lazily and eagerly, chunked and whole on a real LocalCluster; the CLI runs
``icemap composite`` + ``icemap map`` end to end and the issue's claims are measured: fewer gaps
than any single date of the season, and an ice-area error inside the outlines no larger than
the best single date's.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
from rasterio.fill import fillnodata
from scipy import ndimage

import icemap
from icemap.composite import composite, default_season, fill_gaps, season_groups, source_dates
from icemap.errors import BandError, IcemapError, StoreWarning
from icemap.options import parse_season
from icemap.sample import make_sample_region
from icemap.stac import search

from .conftest import icemap_cli, raise_if_dask_computes, require_module

PER_SEASON = 3


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_sample_region(tmp_path_factory.mktemp("season") / "r", size=96, n_dates=2, seed=3,
                              per_season=PER_SEASON)


@pytest.fixture(scope="module")
def cube_path(region: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cube") / "cube.zarr"
    s = search(str(region.catalog), collections=region.collection, bbox=region.bbox)
    icemap.ingest(s, path, chunksize=48)
    return path


def numpy_composite(refl: np.ndarray, days: np.ndarray, ig: int, isw: int, rule: str) -> tuple[np.ndarray, ...]:
    """Independent whole-array reference of one season: (composite, count, source day)."""
    g = np.maximum(refl[:, ig], np.float32(0))
    s = np.maximum(refl[:, isw], np.float32(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        idx = (g - s) / (g + s)
    clear = ~np.isnan(idx)
    count = clear.sum(0)
    if rule == "median":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            comp = np.nanmedian(np.where(clear[:, None], refl, np.nan), axis=0).astype(np.float32)
        return comp, count, np.full(count.shape, np.nan)
    if rule == "min-ndsi":
        pick = np.nanargmin(np.where(clear, idx, np.inf), axis=0)
    else:
        pick = refl.shape[0] - 1 - np.argmax(clear[::-1], axis=0)
    comp = np.take_along_axis(refl, pick[None, None], axis=0)[0]
    comp[:, count == 0] = np.nan
    return comp, count, np.where(count > 0, days[pick], np.nan)


# --------------------------------------------------------------------------------------------
# Seasons
# --------------------------------------------------------------------------------------------


def test_season_grouping_plain_and_wrapping() -> None:
    times = np.array(["2020-12-05", "2021-01-20", "2021-02-28", "2021-03-01", "2021-08-15", "2021-12-01",
                      "2022-02-10"], dtype="datetime64[ns]")
    assert season_groups(times, "02-01/03-31") == {2021: [2, 3], 2022: [6]}
    # A window across the year end belongs to the year it ends in.
    assert season_groups(times, "12-01/02-28") == {2021: [0, 1, 2], 2022: [5, 6]}
    assert season_groups(times, "08-01/09-30") == {2021: [4]}
    assert parse_season("12-01/02-29") == ((12, 1), (2, 29))
    for bad in ("13-01/02-01", "02-30/03-01", "0201/0301", "02-01", "x", "02-01/03-01/04-01"):
        with pytest.raises(IcemapError, match="MM-DD/MM-DD"):
            parse_season(bad)


def test_default_season_follows_the_hemisphere(cube_path: Path) -> None:
    cube = icemap.open_cube(cube_path)
    assert default_season(cube) == icemap.get_option("season_south") == "02-01/03-31"
    north = xr.Dataset(coords={"x": [500000.0, 501000.0], "y": [5000000.0, 4999000.0]}).rio.write_crs("EPSG:32633")
    assert default_season(north) == icemap.get_option("season_north")
    with icemap.set_options(season_south="01-15/03-15"):
        assert default_season(cube) == "01-15/03-15"
    with pytest.raises(IcemapError, match="season_south"):
        icemap.set_options(season_south="summer")


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["min-ndsi", "latest", "median"])
def test_equals_independent_numpy_on_the_sample_region(cube_path: Path, rule: str) -> None:
    cube = icemap.open_cube(cube_path)
    with raise_if_dask_computes():
        lazy = composite(cube, rule=rule)
    assert lazy.sizes["time"] == 2 and lazy.rio.crs == cube.rio.crs
    got = lazy.compute()
    bands = [str(b) for b in cube["band"].values]
    refl = cube["reflectance"].values
    days = cube["time"].values.astype("datetime64[s]").astype(np.float64) / 86400.0
    groups = season_groups(cube["time"].values, "02-01/03-31")
    assert [len(p) for p in groups.values()] == [PER_SEASON, PER_SEASON]
    for k, pos in enumerate(groups.values()):
        comp, count, src = numpy_composite(refl[pos], days[pos], bands.index("green"), bands.index("swir16"), rule)
        np.testing.assert_array_equal(got["reflectance"].values[k], comp)
        np.testing.assert_array_equal(got["clear_count"].values[k], count)
        np.testing.assert_array_equal(got["source_date"].values[k], src)
        # Nodata only where no observation was clear.
        assert np.array_equal(np.isnan(got["reflectance"].values[k, bands.index("green")]), count == 0)
    # Lazy equals eager: the same on an in-memory cube.
    eager = composite(cube.load(), rule=rule)
    xr.testing.assert_identical(eager.compute(), got)
    if rule == "min-ndsi":
        dates = source_dates(got).values
        assert set(np.unique(dates[~np.isnat(dates)])) <= set(cube["time"].values.astype("datetime64[ns]"))
        assert got.attrs["icemap:composite"]["rule"] == "min-ndsi"


@pytest.mark.cluster
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # the reference's bare arrays
def test_chunked_equals_whole_on_a_local_cluster(cube_path: Path) -> None:
    from distributed import Client, LocalCluster

    # Three bands keep the graph small (distributed's per-task cost dominates on a tiny region).
    cube = icemap.open_cube(cube_path).sel(band=["green", "nir08", "swir16"])
    whole = composite(cube.chunk({"y": -1, "x": -1}), fill_gaps_px=6).compute(scheduler="sync")
    # fill_gaps equals GDAL's whole-array call on every plane.
    plain = composite(cube).compute(scheduler="sync")
    for t in range(plain.sizes["time"]):
        for b in range(plain.sizes["band"]):
            p = plain["reflectance"].values[t, b]
            want = fillnodata(p.copy(), mask=(~np.isnan(p)).astype(np.uint8), max_search_distance=6.0)
            np.testing.assert_array_equal(whole["reflectance"].values[t, b], want)
    assert whole["filled"].values.sum() > 0
    before, after = plain["reflectance"].values, whole["reflectance"].values
    assert np.array_equal(whole["filled"].values == 1, (np.isnan(before) & ~np.isnan(after)).any(1))
    # Threads in one worker process: a real scheduler and worker; enough to cut and reassemble
    # the halos, without process start-up on a shared test machine.
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster):
        for chunks in (32,):  # not a divisor of the cube's 98-px grid: ragged edge chunks too
            got = composite(cube.chunk({"y": chunks, "x": chunks}), fill_gaps_px=6).compute()
            xr.testing.assert_identical(got, whole)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # the reference's bare arrays
def test_fill_gaps_flags_and_reach() -> None:
    a = np.full((1, 1, 40, 40), 0.2, np.float32)
    a[0, 0, 10:14, 10:14] = np.nan  # a small hole: filled
    a[0, 0, 25:, :] = np.nan  # far from data at the bottom: stays NaN beyond the distance
    ds = xr.Dataset({"reflectance": (("time", "band", "y", "x"), a)})
    out = fill_gaps(ds.chunk({"y": 16, "x": 16}), max_distance_px=5).compute()
    r = out["reflectance"].values[0, 0]
    assert not np.isnan(r[10:14, 10:14]).any() and np.allclose(r[10:14, 10:14], 0.2)
    assert np.isnan(r[-5:]).all() and not np.isnan(r[25:29]).any()
    assert np.array_equal(out["filled"].values[0] == 1, np.isnan(a[0, 0]) & ~np.isnan(r))
    # Chunked equals GDAL's whole-array call, also with smoothing passes (each reaches one pixel
    # further, inside the halo) and a distance that is not an integer.
    rng = np.random.default_rng(5)
    field = rng.uniform(0, 1, (2, 1, 70, 61)).astype(np.float32)
    holes = ndimage.binary_dilation(rng.random((2, 1, 70, 61)) < 0.01, iterations=3)
    field[holes] = np.nan
    for dist, smooth in ((5, 0), (7.5, 2)):
        whole = np.stack([np.stack([fillnodata(p.copy(), mask=(~np.isnan(p)).astype(np.uint8),
                                               max_search_distance=float(dist), smoothing_iterations=smooth)
                                    for p in t]) for t in field])
        lazy = fill_gaps(xr.Dataset({"reflectance": (("time", "band", "y", "x"), field)}).chunk({"y": 17, "x": 23}),
                         max_distance_px=dist, smoothing_iterations=smooth)
        np.testing.assert_array_equal(lazy["reflectance"].values, whole)
    for bad in (0, -3, "5", True):
        with pytest.raises(IcemapError, match="distance"):
            fill_gaps(ds, max_distance_px=bad)


# --------------------------------------------------------------------------------------------
# Errors, resume, store
# --------------------------------------------------------------------------------------------


def test_errors_name_the_fix(cube_path: Path) -> None:
    cube = icemap.open_cube(cube_path)
    with pytest.raises(IcemapError, match="falls in the season 06-01/07-31.*--season"):
        composite(cube, season="06-01/07-31")
    with pytest.raises(IcemapError, match="MM-DD/MM-DD"):
        composite(cube, season="Feb-Mar")
    with pytest.raises(IcemapError, match="composite_rule"):
        composite(cube, rule="max")  # type: ignore[arg-type]
    with pytest.raises(BandError, match="swir16"):
        composite(cube.sel(band=["green", "nir08"]))


def test_resume_after_interruption(cube_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "comp.zarr"

    def crash(done: int, total: int, label: str) -> None:
        raise KeyboardInterrupt  # after the first year is written and flagged complete

    with pytest.raises(KeyboardInterrupt):
        composite(cube_path, out, progress=crash)
    with pytest.warns(StoreWarning, match="incomplete"):
        partial = icemap.open_cube(out)
    assert partial.sizes["time"] == 1
    report = composite(cube_path, out)
    assert len(report.skipped) == 1 and len(report.written) == 1
    stored = icemap.open_cube(out)
    want = composite(icemap.open_cube(cube_path)).compute()
    for name in ("reflectance", "clear_count", "source_date"):
        np.testing.assert_array_equal(stored[name].values, want[name].values)
    # The accessor writes a composite like a product (it has no qa_pixel), with the same result.
    again = tmp_path / "accessor.zarr"
    icemap.open_cube(cube_path).icemap.composite().icemap.write(again)
    xr.testing.assert_equal(icemap.open_cube(again)[["reflectance", "clear_count", "source_date"]],
                            stored[["reflectance", "clear_count", "source_date"]])
    # Plain xarray reads the CRS and the variables.
    plain = xr.open_zarr(out)
    assert plain.rio.crs == want.rio.crs and "clear_count" in plain


# --------------------------------------------------------------------------------------------
# End to end: icemap composite + icemap map, the claims measured
# --------------------------------------------------------------------------------------------


_cli = icemap_cli


def _on_cube_grid(path: Path, cube: Any) -> np.ndarray:
    import rioxarray

    like = cube["reflectance"].isel(time=0, band=0)
    return rioxarray.open_rasterio(path).squeeze(drop=True).rio.reproject_match(like, nodata=0).values


def test_cli_composite_then_map_beats_every_single_date(region: Any, cube_path: Path, tmp_path: Path) -> None:
    comp, single, mapped = tmp_path / "comp.zarr", tmp_path / "single.zarr", tmp_path / "mapped.zarr"
    res = _cli("composite", "--cube", str(cube_path), "--out", str(comp), "--quiet")
    assert res.returncode == 0, res.stderr
    res = _cli("map", "--cube", str(comp), "--out", str(mapped), "--quiet")
    assert res.returncode == 0, res.stderr
    icemap.map_cube(cube_path, single)  # the single dates, as `icemap map` maps them
    cube = icemap.open_cube(cube_path)
    per_date, per_year = icemap.open_cube(single)["ice"].values, icemap.open_cube(mapped)["ice"].values
    inside = _on_cube_grid(region.glacier_ids, cube) > 0
    km2 = 900 / 1e6
    groups = season_groups(cube["time"].values, icemap.open_cube(comp).attrs["icemap:composite"]["season"])
    assert len(groups) == per_year.shape[0] == 2
    for k, (year, pos) in enumerate(groups.items()):
        true_km2 = float(_on_cube_grid(region.glacier_ice_fraction(year), cube).sum()) * km2
        gaps = [(per_date[i] == 255).mean() for i in pos]
        errors = [abs((per_date[i][inside] == 1).sum() * km2 - true_km2) for i in pos]
        comp_gaps = (per_year[k] == 255).mean()
        comp_error = abs((per_year[k][inside] == 1).sum() * km2 - true_km2)
        print(f"{year}: nodata per date {np.round(gaps, 3)} composite {comp_gaps:.3f}; |area error| in outlines "
              f"per date {np.round(errors, 3)} km2, composite {comp_error:.3f} km2 (truth {true_km2:.3f} km2)")
        assert comp_gaps < min(gaps)
        assert comp_error <= min(errors)


def test_cli_errors_are_one_line(cube_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from icemap.cli import main

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() installs its own
    for args, words in ((["--season", "06-01/07-31"], "--season"), (["--rule", "max"], "composite_rule"),
                        (["--season", "Feb"], "MM-DD/MM-DD")):
        with pytest.raises(SystemExit) as info:
            main(["composite", "--cube", str(cube_path), "--out", str(tmp_path / "x.zarr"), "--quiet", *args])
        err = capsys.readouterr().err
        assert info.value.code == 1 and words in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.zarr").exists()


def test_map_unet_runs_on_a_composite(cube_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_module("torch", "ml")
    from .test_infer import make_model

    model = make_model(tmp_path / "model")
    comp = tmp_path / "comp.zarr"
    composite(cube_path, comp, fill_gaps_px=4)
    out = tmp_path / "unet.zarr"
    from icemap.cli import main

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() installs its own
    main(["map", "--cube", str(comp), "--out", str(out), "--method", "unet", "--model", str(model),
          "--tile", "32", "--batch-size", "4", "--quiet"])  # in-process: torch is imported once
    prod = icemap.open_cube(out)
    assert prod.sizes["time"] == 2 and prod.rio.crs is not None
    direct = icemap.predict(icemap.open_cube(comp), model)["ice_probability"].values
    np.testing.assert_allclose(prod["ice_probability"].values, direct, atol=2e-6, rtol=0)
