"""Seasonal composites: the dates of one season turned into one cube per year, and gap filling.

A glacier inventory maps one ice extent per year, at the end of the ablation season, when
seasonal snow is least. Single acquisitions fall short of that: clouds leave holes and late
snowfalls hide the ice margin. :func:`composite` groups a cube's time steps by season-year and
keeps, per pixel, one clear observation of the season (by default the one with the least snow,
i.e. the lowest NDSI, with its whole spectrum), so the result is again a cube: ``reflectance``
(time, band, y, x) with the CRS and the store conventions of :func:`icemap.ingest`, and
``icemap map`` runs on it (NDSI or U-Net) unchanged. Per pixel it also records how many clear
observations there were (``clear_count``) and which date was used (``source_date``).

Layers, as elsewhere in icemap: the per-pixel rule is :func:`icemap.kernels.composite`; this
module decides which blocks meet (one dask task per season-year and spatial chunk, all of that
season's dates and bands in one block) and labels the result.

Conventions chosen here:

* **Season-year.** A season ``"MM-DD/MM-DD"`` is inclusive at both ends; a window that wraps
  the year end (``"12-01/02-28"``) belongs to the year it *ends* in, so the austral summer
  2022/23 is season 2023.
* **Time label.** Each composite's ``time`` is the last day of its season (00:00 UTC): the
  state of the ice at the end of the window it summarises. Two windows never share a label.
* **Default window** by hemisphere of the cube's centre (options ``season_north``,
  ``season_south``): the end of the ablation season.

Gap filling (:func:`fill_gaps`) closes the holes that remain by inverse-distance weighting
within a maximum distance, GDAL's ``FillNodata`` through :func:`rasterio.fill.fillnodata` (study
a's preprocessing, METHOD.md). It runs per chunk with a halo wide enough that every pixel it
writes sees exactly what the whole-array call sees, so chunked equals whole.
"""

from __future__ import annotations

import datetime as dt
import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, overload

import dask.array as da
import numpy as np
import xarray as xr
from pyproj import Transformer
from rasterio.errors import NotGeoreferencedWarning
from rasterio.fill import fillnodata

from icemap._version import __version__
from icemap.describe import item_path
from icemap.errors import BandError, IcemapError
from icemap.interop import finish_store, keep_grid, resolve_store
from icemap.kernels import COMPOSITE_RULES, filled_flag
from icemap.kernels import composite as composite_kernel
from icemap.options import get_option, parse_season, resolve
from icemap.store import _fmt_time, _group_attrs, _set_attrs, check_not_input, open_cube, write_timesteps
from icemap.workflow import _exists, describe_run

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

    from icemap.store import Progress, WriteReport

__all__ = ["composite", "default_season", "fill_gaps", "season_groups", "source_dates", "write_composite"]

Rule = Literal["min-ndsi", "latest", "median"]



def _season_end(year: int, end: tuple[int, int]) -> dt.date:
    m, d = end
    if (m, d) == (2, 29) and not (year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)):
        d = 28
    return dt.date(year, m, d)


def season_groups(times: Any, season: str) -> dict[int, list[int]]:
    """Time-step positions per season-year: ``{year: [i, ...]}``, years and positions ascending.

    Time steps outside the window belong to no group. A wrapping window (start after end)
    assigns December dates to the next year's season.
    """
    start, end = parse_season(season)
    wraps = start > end
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(np.asarray(times, "datetime64[s]").astype(object)):
        md = (t.month, t.day)
        if wraps:
            year = t.year + 1 if md >= start else (t.year if md <= end else None)
        else:
            year = t.year if start <= md <= end else None
        if year is not None:
            groups.setdefault(year, []).append(i)
    return dict(sorted(groups.items()))


def default_season(cube: xr.Dataset | xr.DataArray) -> str:
    """The default window for a cube: option ``season_north`` or ``season_south``, by the
    latitude of the cube's centre (the equator counts as north)."""
    crs = cube.rio.crs
    if crs is None:
        raise IcemapError("the cube has no CRS, so its hemisphere is unknown; give --season MM-DD/MM-DD")
    x = float(cube["x"].values[[0, -1]].mean())
    y = float(cube["y"].values[[0, -1]].mean())
    _, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x, y)
    return get_option("season_south" if lat < 0 else "season_north")


def _band_index(cube: Any, name: str) -> int:
    bands = [str(b) for b in cube["band"].values]
    if name not in bands:
        raise BandError(f"a composite needs the {name!r} band to tell clear observations and snow (the cube has "
                        f"{', '.join(bands)}); ingest with --bands green,swir16,...")
    return bands.index(name)


def _block(refl: np.ndarray, ig: int, isw: int, rule: str) -> np.ndarray:
    """One season's block (time, band, y, x) -> (band + 2, y, x) float32: composite, count, index.

    Count (<= 65535) and index (-1..32767) are exact in float32, so one task returns all three
    and the dask graph computes the kernel once per block.
    """
    nb = refl.shape[1]
    out = np.empty((nb + 2, *refl.shape[2:]), np.float32)
    _, count, idx = composite_kernel(refl, ig, isw, rule, out=out[:nb])
    out[nb] = count
    out[nb + 1] = idx
    return out


def _dates_of(idx: np.ndarray, days: np.ndarray) -> np.ndarray:
    i = idx.astype(np.int64)
    return np.where(i >= 0, days[np.clip(i, 0, None)], np.nan)


def _open_cube_arg(cube: Any, out: str | os.PathLike[str] | None) -> tuple[Any, str | None]:
    """Open ``cube`` when it is a store path (never the output itself); return it and that path."""
    if not isinstance(cube, (str, os.PathLike)):
        return cube, None

    if out is not None:
        check_not_input(out, {"--cube": cube})
    source = os.fspath(cube)
    return open_cube(cube), source


def _check_composite_inputs(cube: Any, rule: Rule | None,
                            season: str | None) -> tuple[Any, str, str, tuple[int, int], dict[int, list[int]]]:
    """Check the cube, resolve the rule and season, and group the time steps by season-year.

    Returns ``(reflectance, rule, season, (green, swir16) band positions, {year: time positions})``;
    a season that no time step falls in is an error that names the cube's dates.
    """
    if not isinstance(cube, xr.Dataset) or "reflectance" not in cube:
        raise IcemapError("a composite needs a cube with a 'reflectance' variable; open it with icemap.open_cube")
    refl = cube["reflectance"]
    if refl.dims != ("time", "band", "y", "x"):
        raise IcemapError(f"reflectance must have dims (time, band, y, x), not {refl.dims}")
    rule = resolve("composite_rule", rule)
    if rule not in COMPOSITE_RULES:  # pragma: no cover - the option's validator lists the same rules
        raise IcemapError(f"rule must be one of {', '.join(COMPOSITE_RULES)}, got {rule!r}")
    season = default_season(cube) if season is None else season
    parse_season(season)
    bands = _band_index(cube, "green"), _band_index(cube, "swir16")
    groups = season_groups(cube["time"].values, season)
    if not groups:
        span = f"{str(cube['time'].values.min())[:10]} .. {str(cube['time'].values.max())[:10]}"
        raise IcemapError(
            f"no time step of the cube ({cube.sizes['time']} dates, {span}) falls in the season {season}; "
            "give --season MM-DD/MM-DD covering some of them"
        )
    return refl, rule, season, bands, groups


def _composite_layers(cube: Any, refl: Any, groups: Mapping[int, list[int]],
                      rule: str, bands: tuple[int, int]) -> tuple[list[Any], list[Any], list[Any]]:
    """Per season-year, lazily: the composite reflectance, the clear count and the source date.

    One kernel task per spatial chunk sees all the year's dates at once (the rule picks per pixel).
    """
    ig, isw = bands
    data = refl.data if isinstance(refl.data, da.Array) else da.from_array(refl.values, chunks=(1, -1, -1, -1))
    nb = refl.sizes["band"]
    days_all = (cube["time"].values.astype("datetime64[s]").astype(np.float64)) / 86400.0
    comps, counts, dates = [], [], []
    for pos in groups.values():
        block = data[pos].rechunk({0: -1, 1: -1})
        stacked = da.map_blocks(_block, block, ig, isw, rule, dtype=np.float32, drop_axis=0,
                                chunks=((nb + 2,), *block.chunks[2:]),
                                meta=np.empty((0, 0, 0), np.float32))
        comps.append(stacked[:nb])
        counts.append(stacked[nb].astype(np.uint16))
        days = days_all[pos]
        dates.append(da.map_blocks(_dates_of, stacked[nb + 1], days=days, dtype=np.float64))
    return comps, counts, dates


def _composite_dataset(cube: Any, refl: Any, groups: Mapping[int, list[int]], season: str, comps: list[Any],
                       counts: list[Any], dates: list[Any]) -> Any:
    """Stack the yearly layers into the composite Dataset, labelled by each season's last day."""
    _, end = parse_season(season)
    years = list(groups)
    ids = None
    if "item_ids" in cube.coords:
        ids = np.array([",".join(str(v) for v in cube["item_ids"].values[pos]) for pos in groups.values()],
                       dtype=object)
    times = np.array([np.datetime64(_season_end(y, end), "ns") for y in years])
    ds = xr.Dataset(
        {
            "reflectance": (("time", "band", "y", "x"), da.stack(comps), {
                k: v for k, v in refl.attrs.items() if k not in ("_FillValue", "grid_mapping", "coordinates")}),
            "clear_count": (("time", "y", "x"), da.stack(counts),
                            {"long_name": "clear observations in the season", "units": "1"}),
            # Days since 1970-01-01 (float64: exact to the second, NaN = none) with CF time
            # units: plain xarray decodes it to datetime64 (NaT where none), icemap's readers
            # keep the number (the store's fill rules cover floats). source_dates() gives
            # datetime64 from either.
            "source_date": (("time", "y", "x"), da.stack(dates),
                            {"long_name": "acquisition used (NaN/NaT: no clear observation, or the median "
                                          "rule, whose value is no single date's)",
                             "standard_name": "time", "units": "days since 1970-01-01 00:00:00",
                             "calendar": "proleptic_gregorian"}),
        },
        coords={"time": times, "band": cube["band"].values, "y": cube["y"], "x": cube["x"]},
    )
    if ids is not None:
        ds = ds.assign_coords(item_ids=("time", ids))
    return keep_grid(ds, cube)


def _composite_provenance(cube: Any, rule: str, season: str, groups: Mapping[int, list[int]],
                          source: str | None) -> dict[str, Any]:
    """The ``icemap:composite`` attribute: rule, season, the dates behind each year, the source."""
    meta = {
        "rule": rule,
        "season": season,
        "season_years": {str(y): [str(t)[:19] + "Z" for t in cube["time"].values[pos]] for y, pos in groups.items()},
        "time_label": "last day of the season",
        "source_attrs": {k: v for k, v in cube.attrs.items() if k in ("sensor", "load", "search", "icemap_version")},
    }
    if source is not None:
        meta["source_cube"] = os.path.abspath(source) if "://" not in source else source
    return meta


def _describe_composite(out: str | os.PathLike[str], source: str | None) -> None:
    """Write the STAC description of a written composite, linked to its source cube when known."""
    if source is not None:
        store = resolve_store(source)
        link = source if source.endswith(".json") else item_path(store)
        describe_run(out, derived_from=[link if _exists(link) else store],
                     description=f"icemap composite of {os.path.basename(store.rstrip('/'))}")
    else:
        describe_run(out, derived_from=[], description="icemap composite")


# Typed by ``out``: the lazy composite without it, the write's report with it.
@overload
def composite(cube: xr.Dataset | str | os.PathLike[str], out: None = None, *, season: str | None = None,
              rule: Rule | None = None, fill_gaps_px: float | None = None, zarr_format: Literal[2, 3] | None = None,
              progress: Progress | None = None) -> xr.Dataset: ...
@overload
def composite(cube: xr.Dataset | str | os.PathLike[str], out: str | os.PathLike[str], *, season: str | None = None,
              rule: Rule | None = None, fill_gaps_px: float | None = None, zarr_format: Literal[2, 3] | None = None,
              progress: Progress | None = None) -> WriteReport: ...
def composite(
    cube: xr.Dataset | str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    season: str | None = None,
    rule: Rule | None = None,
    fill_gaps_px: float | None = None,
    zarr_format: Literal[2, 3] | None = None,
    progress: Progress | None = None,
) -> xr.Dataset | WriteReport:
    """One composite per season-year of a cube, lazily; written resumably when ``out`` is given.

    Parameters
    ----------
    cube
        A cube (``reflectance`` (time, band, y, x) with ``green`` and ``swir16``, a CRS), or the
        path of a cube store.
    out
        Zarr store to write (one time step per year, resumable as ingest's); None returns the
        lazy dataset only.
    season
        ``"MM-DD/MM-DD"``, inclusive; default by hemisphere (options ``season_north`` /
        ``season_south``: the end of the ablation season).
    rule
        ``"min-ndsi"`` (default, option ``composite_rule``), ``"latest"`` or ``"median"``; see
        :func:`icemap.kernels.composite`.
    fill_gaps_px
        Also fill the remaining nodata by inverse-distance weighting within this many pixels
        (:func:`fill_gaps`); adds the ``filled`` flag.

    Returns
    -------
    xarray.Dataset or WriteReport
        The lazy composite: ``reflectance`` (float32, NaN where no observation was clear),
        ``clear_count`` (uint16), ``source_date`` (float64 days since 1970-01-01 with CF time units, NaN where none
        and for the median rule; :func:`source_dates` gives datetime64), ``item_ids`` per year;
        or, with ``out``, what the write did.
    """
    cube, source = _open_cube_arg(cube, out)
    refl, rule_name, season, bands, groups = _check_composite_inputs(cube, rule, season)
    comps, counts, dates = _composite_layers(cube, refl, groups, rule_name, bands)
    ds = _composite_dataset(cube, refl, groups, season, comps, counts, dates)
    ds.attrs = {"icemap:composite": _composite_provenance(cube, rule_name, season, groups, source)}
    if fill_gaps_px is not None:
        ds = fill_gaps(ds, max_distance_px=fill_gaps_px)
    if out is None:
        return ds
    report = write_composite(ds, out, zarr_format=zarr_format, progress=progress)
    _describe_composite(out, source)
    return report


def source_dates(ds: xr.Dataset) -> xr.DataArray:
    """``source_date`` of a composite as datetime64 (NaT where no single date was used)."""
    src = ds["source_date"]
    if np.issubdtype(src.dtype, np.datetime64):  # decoded by plain xarray (CF time units)
        return src.astype("datetime64[ns]").rename("source_date")
    ns = (src * 86400e9).round()
    return ns.fillna(np.iinfo(np.int64).min).astype(np.int64).astype("datetime64[ns]").rename("source_date")


def write_composite(ds: xr.Dataset, out: str | os.PathLike[str], *, zarr_format: Literal[2, 3] | None = None,
                    storage_options: Mapping[str, Any] | None = None, progress: Progress | None = None
                    ) -> WriteReport:
    """Write a composite one year at a time with the store's resumable machinery."""
    meta = dict(ds.attrs.get("icemap:composite", {}))
    attrs = {"icemap_version": __version__, "icemap:composite": meta}
    # One product per store: the rule, the window, the gap filling and the cube it came from.
    # A year is computed again when its dates change (the cube gained an acquisition).
    settings = {"rule": meta.get("rule"), "season": meta.get("season"), "source_cube": meta.get("source_cube"),
                "fill_gaps": ds.attrs.get("icemap:fill_gaps"),
                "bands": [str(b) for b in ds["band"].values] if "band" in ds.coords else None}
    years = meta.get("season_years", {})
    step_inputs = {_fmt_time(t): years.get(str(np.datetime64(t, "Y").astype(int) + 1970))
                   for t in ds["time"].values}
    report = write_timesteps(ds, out, zarr_format=zarr_format, attrs=attrs, storage_options=storage_options,
                             progress=progress, settings=settings, step_inputs=step_inputs)
    if not report.created:
        # The record of each year's dates follows the years computed again or appended.
        stored = _group_attrs(report.path, storage_options).get("icemap:composite", {})
        merged = {**stored.get("season_years", {}), **years}
        if merged != stored.get("season_years"):
            _set_attrs(report.path, {"icemap:composite": {**stored, "season_years": merged}}, storage_options)
            finish_store(report.path, storage_options)  # the root metadata changed: consolidate again
    return report


# ----------------------------------------------------------------------------------------------
# Gap filling
# ----------------------------------------------------------------------------------------------


def _halo(max_distance_px: float, smoothing_iterations: int) -> int:
    """Pixels of context a filled pixel depends on.

    GDAL's FillNodata interpolates each gap pixel from valid pixels at most ``max_distance``
    away, then smooths the filled pixels ``smoothing_iterations`` times with a 3 x 3 kernel,
    each pass reaching one pixel further. The interpolation also reads the *filled* state of
    nothing else, so ``ceil(max_distance) + smoothing_iterations`` plus one pixel of margin
    (GDAL rounds distances) covers everything a pixel sees.
    """
    return int(np.ceil(max_distance_px)) + int(smoothing_iterations) + 1


def _fill_planes(block: np.ndarray, max_distance_px: float, smoothing_iterations: int) -> np.ndarray:
    """fillnodata on every (y, x) plane of a block; NaN is nodata and stays NaN out of reach."""
    out = np.array(block, dtype=np.float32, copy=True)
    planes = out.reshape(-1, *out.shape[-2:])
    for p in planes:
        valid = ~np.isnan(p)
        if valid.all() or not valid.any():
            continue
        with warnings.catch_warnings():  # a bare array: GDAL's grid is not needed to fill it
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            p[...] = fillnodata(p, mask=valid.astype(np.uint8), max_search_distance=float(max_distance_px),
                                smoothing_iterations=int(smoothing_iterations))
    return out


def fill_gaps(ds: xr.Dataset, *, max_distance_px: float, smoothing_iterations: int = 0) -> xr.Dataset:
    """Fill reflectance nodata by inverse-distance weighting within ``max_distance_px``, lazily.

    Study a filled the dark, shaded gaps of its scenes this way (METHOD.md); here it closes the
    holes a composite has left (pixels no date saw clearly). :func:`rasterio.fill.fillnodata`
    (GDAL's ``FillNodata``) does the interpolation: the well-kept implementation of the method
    the study used, rather than a second one. It runs on every (time, band) plane of every chunk
    with a halo of :func:`_halo` pixels (``dask.array.map_overlap``, no padding at the region's
    edges), so a chunked fill equals the whole-array call. Pixels farther than
    ``max_distance_px`` from any valid one stay NaN.

    Returns the dataset with ``reflectance`` filled and ``filled`` (uint8, (time, y, x)): 1 where
    a band of the pixel was filled, 0 elsewhere.
    """
    if not isinstance(max_distance_px, (int, float)) or isinstance(max_distance_px, bool) or not (
            0 < max_distance_px <= 1000):
        raise IcemapError(f"the gap-filling distance must be 1-1000 pixels, got {max_distance_px!r}")
    if not isinstance(smoothing_iterations, int) or smoothing_iterations < 0:
        raise IcemapError(f"smoothing_iterations must be a non-negative integer, got {smoothing_iterations!r}")
    refl = ds["reflectance"]
    data = refl.data if isinstance(refl.data, da.Array) else da.from_array(refl.values)
    depth = _halo(max_distance_px, smoothing_iterations)
    ny, nx = data.shape[-2:]
    # map_overlap needs chunks at least as large as the halo (except a single chunk).
    cy = max(max(data.chunks[-2]), min(ny, depth))
    cx = max(max(data.chunks[-1]), min(nx, depth))
    if cy != max(data.chunks[-2]) or cx != max(data.chunks[-1]):
        data = data.rechunk({data.ndim - 2: cy, data.ndim - 1: cx})
    lead = {i: 0 for i in range(data.ndim - 2)}
    filled = da.map_overlap(_fill_planes, data, depth={**lead, data.ndim - 2: depth, data.ndim - 1: depth},
                            boundary="none", dtype=np.float32, max_distance_px=max_distance_px,
                            smoothing_iterations=smoothing_iterations, meta=np.empty((0,) * data.ndim, np.float32))
    # The flag looks at all bands of a pixel at once: one band chunk (stores chunk band by band),
    # and the same blocks on both sides (map_overlap may have merged chunks smaller than its halo).
    before = data.rechunk({1: -1})
    flag = da.map_blocks(filled_flag, before, filled.rechunk(before.chunks), drop_axis=1, dtype=np.uint8)
    out = ds.copy()
    out["reflectance"] = refl.copy(data=filled)
    out["filled"] = xr.DataArray(flag, dims=("time", "y", "x"),
                                 attrs={"long_name": "1 where reflectance was filled by inverse-distance weighting",
                                        "max_distance_px": float(max_distance_px),
                                        "smoothing_iterations": int(smoothing_iterations)})
    out.attrs = {**ds.attrs, "icemap:fill_gaps": {"max_distance_px": float(max_distance_px),
                                                 "smoothing_iterations": int(smoothing_iterations),
                                                 "method": "GDAL FillNodata (rasterio.fill.fillnodata)"}}
    return out
