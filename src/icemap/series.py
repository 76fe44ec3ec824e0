"""Per-glacier and regional ice-area series: areas, uncertainties, observed shares, change rates.

The counting is the kernel layer's :func:`icemap.kernels.glacier_stats`: one pass per chunk gives,
for every glacier, its outline pixels, valid pixels, ice pixels and the sides of its ice pixels
that lie on the ice's perimeter. Chunks are grown by a one-pixel halo (``dask.array.overlap``)
so that sides between chunks are judged with both neighbours in view, and the per-chunk counts
are summed: the reduction is lazy, needs memory for one chunk plus a few numbers per glacier,
and equals the count on the whole raster exactly.

Uncertainty follows the buffer method (Granshaw and Fountain 2006; Paul et al. 2013): the area
between the mapped ice outline and a copy buffered by half a pixel, i.e. the outline's perimeter
times half a pixel. The perimeter is taken on the raster itself, as the length of the pixel sides
between ice of the glacier and anything else: the exact perimeter of the set of pixels that was
mapped (the vector outline of :func:`icemap.vector.polygonise` follows the same pixel sides), so
no vectorisation is needed to get it.

Change is computed as glaciologists publish it (:func:`trends`): a weighted least-squares line
through one area per season-year, weights ``1 / sigma**2`` from the buffer uncertainty, using only
the years whose outline was observed to at least ``min_observed`` (an area under cloud is a lower
bound, not a measurement), with its standard error and a 2-sigma significance flag. Two dates of
one season are never turned into a rate: eight days apart, their difference is cloud and snow,
not glacier change.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
import pandas as pd
import rioxarray  # noqa: F401  (registers .rio: the grid and CRS of masks built by hand)
import shapely
import xarray as xr

from icemap._atomic import atomic_path
from icemap.composite import default_season, season_groups
from icemap.errors import IcemapError
from icemap.kernels import GLACIER_STATS, glacier_stats
from icemap.labels import check_outlines_overlap, glacier_ids
from icemap.options import get_option, resolve
from icemap.store import open_cube
from icemap.vector import pixel_area_m2

if TYPE_CHECKING:  # pragma: no cover
    import geopandas as gpd
    import pandas as pd
    import xarray as xr

__all__ = [
    "REGION_COLUMNS",
    "REGION_ID",
    "SERIES_COLUMNS",
    "TREND_COLUMNS",
    "check_table_path",
    "glacier_counts",
    "glacier_series",
    "region_series",
    "trends",
    "wls_trend",
    "write_table",
]

#: Columns of :func:`glacier_series`, in order.
SERIES_COLUMNS = ("glacier_id", "time", "year", "area_km2", "area_uncertainty_km2", "observed_fraction",
                  "outline_area_km2", "change_km2_per_yr", "change_pct_per_yr", "change_note")
#: Columns of :func:`region_series`, in order.
REGION_COLUMNS = ("time", "year", "area_km2", "area_uncertainty_sum_km2", "area_uncertainty_rss_km2",
                  "observed_fraction", "outline_area_km2", "observed_outline_area_km2", "n_glaciers",
                  "change_km2_per_yr", "change_pct_per_yr", "change_note")
#: Columns of :func:`trends`, in order (the first eight are the published ones).
TREND_COLUMNS = ("glacier_id", "first_year", "last_year", "n_years", "rate_km2_per_yr", "rate_stderr_km2_per_yr",
                 "rate_pct_per_yr", "significant", "area_fit_first_year_km2", "n_lower_bound", "reason")
#: ``glacier_id`` of the region's row in :func:`trends`.
REGION_ID = "region"

_SECONDS_PER_YEAR = 365.25 * 86400.0


def _stats_block(ice: np.ndarray, ids: np.ndarray, n_ids: int) -> np.ndarray:
    s = glacier_stats(ice, ids, n_ids, halo=1)
    return s[:, None, None]


def glacier_counts(ice: xr.DataArray, ids: xr.DataArray, n_ids: int) -> xr.DataArray:
    """Per-glacier counts of every time step, lazily: an int64 DataArray ``(time, stat, gid)``.

    Parameters
    ----------
    ice
        uint8 ice mask ``(time, y, x)``: 1 ice, 0 not, 255 nodata.
    ids
        Glacier-id raster ``(y, x)`` on the same grid (from :func:`icemap.labels.glacier_ids`).
    n_ids
        Largest id.

    Returns
    -------
    xarray.DataArray
        ``stat`` is :data:`icemap.kernels.GLACIER_STATS` (pixels, valid, ice, edges_x,
        edges_y), ``gid`` 0..n_ids (0: outside every outline).
    """
    ice_d = ice.data
    if not isinstance(ice_d, da.Array):
        size = get_option("chunksize")
        ice_d = da.from_array(np.asarray(ice_d), chunks=(1, size, size))
    ids_d = ids.data if hasattr(ids, "data") else ids
    ids_d = da.asarray(ids_d).rechunk(ice_d.chunks[1:])
    # A one-pixel halo, with the raster's own border padded as "not ice" in no glacier: the
    # kernel counts the sides there as perimeter, as it does on an unpadded whole raster.
    ice_o = da.overlap.overlap(ice_d, depth={0: 0, 1: 1, 2: 1}, boundary={0: "none", 1: 0, 2: 0})
    ids_o = da.overlap.overlap(ids_d, depth={0: 1, 1: 1}, boundary={0: 0, 1: 0})
    k = len(GLACIER_STATS)
    per_block = da.map_blocks(
        _stats_block, ice_o, ids_o, int(n_ids), new_axis=[3, 4], dtype=np.int64,
        chunks=(ice_d.chunks[0], (1,) * len(ice_d.chunks[1]), (1,) * len(ice_d.chunks[2]), (k,), (int(n_ids) + 1,)),
    )
    counts = per_block.sum(axis=(1, 2))
    return xr.DataArray(counts, dims=("time", "stat", "gid"),
                        coords={"time": ice["time"].values, "stat": list(GLACIER_STATS),
                                "gid": np.arange(int(n_ids) + 1)}, name="glacier_counts")


def _as_ice(pred_or_ice: Any) -> Any:
    """The ``ice`` DataArray of a product path, product Dataset or ice mask."""
    if isinstance(pred_or_ice, (str, os.PathLike)):
        pred_or_ice = open_cube(pred_or_ice)
    if isinstance(pred_or_ice, xr.Dataset):
        if "ice" not in pred_or_ice:
            raise IcemapError("the product has no `ice` variable; write one with `icemap map`")
        ice = pred_or_ice["ice"]
        if ice.rio.crs is None and pred_or_ice.rio.crs is not None:
            ice = ice.rio.write_crs(pred_or_ice.rio.crs)
        pred_or_ice = ice
    if not isinstance(pred_or_ice, xr.DataArray):
        raise IcemapError(f"expected a product store, product Dataset or ice DataArray, got {type(pred_or_ice).__name__}")
    if "time" not in pred_or_ice.dims:
        raise IcemapError("a series needs an ice mask with a time dimension (one step per date or per year)")
    if pred_or_ice.dtype != np.uint8:
        raise IcemapError(f"the ice mask must be uint8 (1 ice, 0 not, 255 nodata), got {pred_or_ice.dtype}")
    return pred_or_ice


def _season_years(ice: Any, times: Any, season: str | None) -> np.ndarray:
    """The season-year of every time step: its group in :func:`icemap.composite.season_groups`
    (the ablation season of the grid's hemisphere by default; a wrapping window gives December
    to the next year), else its calendar year. A composite is labelled with its season's last
    day, so its season-year is its year."""
    if season is None:
        season = default_season(ice)
    years = pd.DatetimeIndex(times).year.to_numpy(np.int64).copy()
    for year, positions in season_groups(np.asarray(times), season).items():
        years[positions] = year
    return years


def _step_changes(area: np.ndarray, times: np.ndarray, years: np.ndarray, observed: np.ndarray,
                  min_observed: float) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Change per year of each step (rows in time order) against the latest earlier step of an
    earlier season-year that was observed to at least ``min_observed``; NaN with the reason
    otherwise (a lower bound, the first season, or only dates of the same season before it)."""
    n = area.size
    km2, pct, notes = np.full(n, np.nan), np.full(n, np.nan), [""] * n
    t_years = times.astype("datetime64[ns]").astype(np.int64) / 1e9 / _SECONDS_PER_YEAR
    good = np.nan_to_num(observed, nan=-1.0) >= min_observed
    for i in range(n):
        if not good[i]:
            shown = "no outline pixel" if np.isnan(observed[i]) else f"observed {100 * observed[i]:.0f}%"
            notes[i] = f"lower bound: {shown} < min_observed {100 * min_observed:.0f}%"
            continue
        earlier = np.flatnonzero((years[:i] < years[i]) & good[:i])
        if earlier.size:
            j = int(earlier[-1])
            km2[i] = (area[i] - area[j]) / (t_years[i] - t_years[j])
            pct[i] = 100.0 * km2[i] / area[j] if area[j] > 0 else np.nan
        elif i > 0 and (years[:i] == years[i]).all():
            notes[i] = "same season as the earlier date(s): no rate within a season"
        elif i > 0:
            notes[i] = f"no earlier season observed to min_observed {100 * min_observed:.0f}%"
        else:
            notes[i] = "first step"
    return km2, pct, notes


def wls_trend(x: Any, y: Any, sigma: Any) -> tuple[float, float, float]:
    """Weighted least-squares line ``y = a + b x`` with weights ``1 / sigma**2``.

    Returns ``(slope, intercept, slope_stderr)``. The standard error propagates the given
    uncertainties (``sigma`` is absolute, as the buffer method's is) and is inflated by the
    square root of the reduced chi-square where the points scatter more than their
    uncertainties say (more than two points only): the larger of what the errors claim and
    what the data show, so a noisy series is not called significant on its error bars alone.

    Raises
    ------
    IcemapError
        With fewer than two distinct ``x`` or a ``sigma`` that is not positive and finite.
    """
    x, y, s = (np.asarray(v, dtype=np.float64) for v in (x, y, sigma))
    if x.size < 2 or np.unique(x).size < 2:
        raise IcemapError("a trend needs at least two distinct years")
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise IcemapError("trend weights need positive, finite uncertainties")
    w = 1.0 / s**2
    sw, sx, sy = w.sum(), (w * x).sum(), (w * y).sum()
    # Centred on the weighted mean year: the same closed form, better conditioned for years ~2000.
    xm, ym = sx / sw, sy / sw
    sxx = (w * (x - xm) ** 2).sum()
    slope = float((w * (x - xm) * (y - ym)).sum() / sxx)
    intercept = float(ym - slope * xm)
    var = 1.0 / sxx
    if x.size > 2:
        chi2 = float((w * (y - intercept - slope * x) ** 2).sum()) / (x.size - 2)
        var *= max(1.0, chi2)
    return slope, intercept, float(np.sqrt(var))


def glacier_series(
    pred_or_ice: str | os.PathLike[str] | xr.Dataset | xr.DataArray,
    reference: str | os.PathLike[str] | gpd.GeoDataFrame,
    *,
    id_column: str | None = None,
    buffer_px: float | None = None,
    season: str | None = None,
    min_observed: float | None = None,
) -> pd.DataFrame:
    """Ice area of every reference glacier at every time step, with uncertainty and change rates.

    Parameters
    ----------
    pred_or_ice
        A product store (path), product Dataset with ``ice``, or an ice mask ``(time, y, x)``
        with a projected CRS. Time steps may be dates or one composite per year.
    reference
        Glacier outlines (path or GeoDataFrame) that overlap the product.
    id_column
        Column of the outlines that identifies a glacier; default the first present of
        ``glacier_id``, ``RGIId`` (RGI 6), ``rgi_id`` (RGI 7), ``glac_id``, ``GLIMSId``, ``ID``,
        ``id`` (:func:`icemap.labels.glacier_ids`), else ``G00001``... in file order.
    buffer_px
        Buffer width of the uncertainty in pixels (default the ``area_buffer_px`` option, 0.5).
    season
        Season window ``MM-DD/MM-DD`` that groups dates into season-years (default the
        ablation season of the grid's hemisphere, options ``season_north``/``season_south``).
    min_observed
        Observed share below which an area is a lower bound (default the ``min_observed``
        option, 0.9).

    Returns
    -------
    pandas.DataFrame
        Long form, one row per glacier and time step, columns :data:`SERIES_COLUMNS`:
        ``year`` (the season-year: a date's group in the season window, else its calendar
        year); ``area_km2`` (ice pixels x pixel area); ``area_uncertainty_km2`` (perimeter of the
        glacier's mapped ice along pixel sides x ``buffer_px`` pixels); ``observed_fraction``
        (share of the outline with valid data: valid pixels over the outline's pixels, times
        the share of the outline's area on the grid, so an outline half off the image is at
        most half observed; NaN for an outline that holds no pixel centre); ``outline_area_km2``
        (the polygon's area); ``change_km2_per_yr`` and ``change_pct_per_yr`` against the
        latest step of an *earlier* season-year observed to ``min_observed``, over the real time
        between them, and empty with the reason in ``change_note`` where there is none, where
        the step itself is a lower bound, and between two dates of one season. Areas under
        cloud or fill are not ice: where ``observed_fraction < 1`` the area is a lower bound.
        For change over years use :func:`trends`.

    Raises
    ------
    NoOverlapError
        When no outline overlaps the product.
    IcemapError
        For an unknown ``id_column``, a product without ``ice``, a mask without time, or a
        geographic CRS.
    """
    ice = _as_ice(pred_or_ice)
    buffer_px = float(resolve("area_buffer_px", buffer_px))
    min_observed = float(resolve("min_observed", min_observed))
    px_m2 = pixel_area_m2(ice)
    gdf = check_outlines_overlap(reference, ice)
    ids, table = glacier_ids(gdf, ice, id_column=id_column)
    frame = _series_rows(ice, ids, table, px_m2=px_m2, buffer_px=buffer_px, season=season)
    frame = _with_step_changes(frame, min_observed)
    frame.attrs = {"id_column": id_column or "auto", "buffer_px": buffer_px, "pixel_area_m2": px_m2,
                   "min_observed": min_observed, "crs": ice.rio.crs.to_string()}
    return frame[list(SERIES_COLUMNS)]


def _series_rows(ice: Any, ids: Any, table: Any, *, px_m2: float, buffer_px: float, season: str | None) -> Any:
    """One row per glacier and time step: area, buffer uncertainty, observed share, outline area.

    The counts come from one :func:`glacier_counts` pass; the uncertainty is the ice's
    pixel-edge perimeter times ``buffer_px`` pixels.
    """
    t = ice.rio.transform(recalc=True)
    dx, dy = float(np.hypot(t.a, t.d)), float(np.hypot(t.b, t.e))
    counts = glacier_counts(ice, ids, int(table["gid"].max())).values  # (time, stat, gid)
    gids = table["gid"].to_numpy()
    c = counts[:, :, gids]  # (time, stat, glacier) in table order
    pixels, valid, icepx, ex, ey = (c[:, i].astype(np.float64) for i in range(5))
    with np.errstate(invalid="ignore", divide="ignore"):
        observed = np.where(pixels > 0, valid / pixels, np.nan) * _share_on_grid(table, ice)
    perimeter_m = ex * dy + ey * dx
    buffer_m = buffer_px * 0.5 * (dx + dy)
    times = pd.DatetimeIndex(ice["time"].values)
    n_t, n_g = len(times), len(table)
    return pd.DataFrame({
        "glacier_id": np.tile(table["glacier_id"].astype(str).to_numpy(), n_t),
        "time": np.repeat(times.to_numpy(), n_g),
        "year": np.repeat(_season_years(ice, times, season), n_g).astype(np.int64),
        "area_km2": (icepx * px_m2 / 1e6).ravel(),
        "area_uncertainty_km2": (perimeter_m * buffer_m / 1e6).ravel(),
        "observed_fraction": observed.ravel(),
        "outline_area_km2": np.tile(table["outline_area_km2"].to_numpy(np.float64), n_t),
        "_gid": np.tile(gids, n_t),
    })


def _share_on_grid(table: Any, ice: Any) -> np.ndarray:
    """Share of each outline's area on the grid: 1 exactly for outlines inside it.

    An outline half off the image can be at most half observed, whatever its pixels say.
    """
    grid = shapely.box(*ice.rio.bounds())
    geoms = np.asarray(table.geometry.array, dtype=object)
    inside = shapely.within(geoms, grid)
    on_grid = np.ones(len(table))
    part = ~inside
    if part.any():
        area = shapely.area(geoms[part])
        on_grid[part] = np.where(area > 0, shapely.area(shapely.intersection(geoms[part], grid)) / area, 0.0)
    return on_grid


def _with_step_changes(frame: Any, min_observed: float) -> Any:
    """Sort glaciers in the outlines' order, each in time order, and add the step-to-step change columns.

    Rates are computed within each glacier by gid, so repeated ids in an inventory stay apart.
    """
    frame = frame.sort_values(["_gid", "time"], kind="stable", ignore_index=True)
    km2 = np.full(len(frame), np.nan)
    pct = np.full(len(frame), np.nan)
    notes = np.empty(len(frame), dtype=object)
    cols = {c: frame[c].to_numpy() for c in ("area_km2", "time", "year", "observed_fraction")}
    for idx in frame.groupby("_gid", sort=False).indices.values():
        km2[idx], pct[idx], notes[idx] = _step_changes(
            cols["area_km2"][idx], cols["time"][idx], cols["year"][idx], cols["observed_fraction"][idx], min_observed)
    frame["change_km2_per_yr"] = km2
    frame["change_pct_per_yr"] = pct
    frame["change_note"] = notes.astype(str)
    frame["glacier_id"] = frame["glacier_id"].astype(str)
    return frame


def _series_min_observed(table: Any, min_observed: float | None, columns: tuple[str, ...]) -> float:
    """The ``min_observed`` a series table is read with (given, else the table's own, else the
    option), once the table is known to have ``columns`` (also a table read back from a file)."""
    value = float(resolve("min_observed", min_observed if min_observed is not None
                          else table.attrs.get("min_observed")))
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise IcemapError(f"not a glacier_series table: no column(s) {', '.join(missing)}")
    return value


def region_series(table: pd.DataFrame, *, min_observed: float | None = None) -> pd.DataFrame:
    """The region's totals per time step, from a :func:`glacier_series` table.

    ``area_km2`` and ``outline_area_km2`` are sums over glaciers. The uncertainty comes twice,
    named by how the glaciers' errors combine: ``area_uncertainty_sum_km2`` takes them as fully
    correlated (the same sensor, date, threshold and pixel grid misplace all outlines alike, so
    they do not cancel: the conservative choice, and the one :func:`trends` weights the region
    with), ``area_uncertainty_rss_km2`` as independent (root-sum-square, which shrinks with the
    number of glaciers). ``observed_fraction`` is weighted by outline area and
    ``observed_outline_area_km2`` is the outline area that was observed (the fair base for a
    difference to the outlines: cloud-hidden outline is neither ice nor not ice). Change
    columns follow the rules of :func:`glacier_series` on the region's totals.
    """
    min_observed = _series_min_observed(table, min_observed, ("time", "year", "area_km2", "area_uncertainty_km2",
                                                              "observed_fraction", "outline_area_km2"))
    t = table.assign(_w=table["outline_area_km2"].where(table["observed_fraction"].notna(), 0.0).fillna(0.0),
                     _var=table["area_uncertainty_km2"] ** 2,
                     _obs=table["outline_area_km2"] * table["observed_fraction"].fillna(0.0))
    t = t.assign(_wf=t["_w"] * t["observed_fraction"].fillna(0.0))
    g = t.groupby("time", sort=True)
    out = pd.DataFrame({
        "year": g["year"].first().astype(np.int64),
        "area_km2": g["area_km2"].sum(),
        "area_uncertainty_sum_km2": g["area_uncertainty_km2"].sum(),
        "area_uncertainty_rss_km2": np.sqrt(g["_var"].sum()),
        "observed_fraction": g["_wf"].sum() / g["_w"].sum().replace(0.0, np.nan),
        "outline_area_km2": g["outline_area_km2"].sum(),
        "observed_outline_area_km2": g["_obs"].sum(),
        "n_glaciers": g.size().astype(np.int64),
    }).reset_index()
    km2, pct, notes = _step_changes(out["area_km2"].to_numpy(), out["time"].to_numpy(), out["year"].to_numpy(),
                                    out["observed_fraction"].to_numpy(np.float64), min_observed)
    out["change_km2_per_yr"], out["change_pct_per_yr"], out["change_note"] = km2, pct, notes
    out.attrs = {"min_observed": min_observed}
    return out[list(REGION_COLUMNS)]


def _yearly(times: np.ndarray, years: np.ndarray, area: np.ndarray, sigma: np.ndarray, observed: np.ndarray,
            min_observed: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One area per season-year: of the year's steps observed to ``min_observed``, the best
    observed one (the latest among equals). Returns years, areas, sigmas and the number of
    season-years that had only lower bounds."""
    good = np.nan_to_num(observed, nan=-1.0) >= min_observed
    xs, ys, ss = [], [], []
    lower = 0
    for year in np.unique(years):
        sel = np.flatnonzero(years == year)
        ok = sel[good[sel]]
        if ok.size == 0:
            lower += 1
            continue
        best = ok[np.lexsort((times[ok], observed[ok]))[-1]]
        xs.append(float(year))
        ys.append(float(area[best]))
        ss.append(float(sigma[best]))
    return np.asarray(xs), np.asarray(ys), np.asarray(ss), lower


def _trend_row(gid: str, x: np.ndarray, y: np.ndarray, sigma: np.ndarray, lower: int, floor: float,
               min_observed: float) -> dict[str, Any]:
    row: dict[str, Any] = {"glacier_id": gid, "first_year": int(x[0]) if x.size else None,
                           "last_year": int(x[-1]) if x.size else None, "n_years": int(x.size),
                           "rate_km2_per_yr": np.nan, "rate_stderr_km2_per_yr": np.nan, "rate_pct_per_yr": np.nan,
                           "significant": None, "area_fit_first_year_km2": np.nan, "n_lower_bound": int(lower),
                           "reason": ""}
    if x.size < 2:
        row["reason"] = (f"{x.size} season-year(s) observed to min_observed {100 * min_observed:.0f}%"
                         f"{f' ({lower} lower bound(s) left out)' if lower else ''}; a trend needs 2")
        return row
    # A glacier mapped without ice has no perimeter, so no buffer uncertainty; its area is still
    # uncertain by at least one pixel (the smallest patch the map resolves).
    slope, intercept, stderr = wls_trend(x, y, np.maximum(sigma, floor))
    start = intercept + slope * x[0]
    row.update(rate_km2_per_yr=slope, rate_stderr_km2_per_yr=stderr,
               rate_pct_per_yr=100.0 * slope / start if start > 0 else np.nan,
               significant=bool(abs(slope) > 2.0 * stderr), area_fit_first_year_km2=start)
    if not start > 0:
        row["reason"] = "no ice at the first year on the fitted line: no relative rate"
    return row


def _region_trend(rows: list[dict[str, Any]], table: Any, min_observed: float) -> dict[str, Any]:
    """The region's trend: the sum of its glaciers' trends, each from its own well observed years.

    Not a line through the region's yearly totals: a total includes the visible part of every
    glacier that was partly clouded that year (a lower bound), so a year with more cloud over
    the glaciers reads as a smaller region and the line shows a change that is only cloud. The
    sum's standard error is the sum of the glaciers' (errors fully correlated: the same method,
    sensor and buffer everywhere), the conservative choice. Glaciers without a trend are left
    out and counted in ``reason`` with the share of the outline area the sum covers.
    """
    with_rate = [r for r in rows if r["rate_km2_per_yr"] == r["rate_km2_per_yr"]]
    row: dict[str, Any] = {"glacier_id": REGION_ID, "first_year": None, "last_year": None, "n_years": 0,
                           "rate_km2_per_yr": np.nan, "rate_stderr_km2_per_yr": np.nan, "rate_pct_per_yr": np.nan,
                           "significant": None, "area_fit_first_year_km2": np.nan,
                           "n_lower_bound": int(sum(r["n_lower_bound"] for r in rows)), "reason": ""}
    if not with_rate:
        row["reason"] = f"no glacier has a trend (each needs 2 season-years observed to {100 * min_observed:.0f}%)"
        return row
    rate = float(sum(r["rate_km2_per_yr"] for r in with_rate))
    stderr = float(sum(r["rate_stderr_km2_per_yr"] for r in with_rate))
    start = float(sum(r["area_fit_first_year_km2"] for r in with_rate))
    years = table.loc[table["glacier_id"].astype(str).isin({r["glacier_id"] for r in with_rate}), "year"]
    row.update(first_year=min(r["first_year"] for r in with_rate), last_year=max(r["last_year"] for r in with_rate),
               n_years=int(years.nunique()), rate_km2_per_yr=rate, rate_stderr_km2_per_yr=stderr,
               rate_pct_per_yr=100.0 * rate / start if start > 0 else np.nan,
               significant=bool(abs(rate) > 2.0 * stderr), area_fit_first_year_km2=start)
    if len(with_rate) < len(rows):
        outline = table.drop_duplicates("glacier_id").set_index(table.drop_duplicates("glacier_id")["glacier_id"]
                                                                .astype(str))["outline_area_km2"] \
            if "outline_area_km2" in table.columns else None
        share = ""
        if outline is not None and outline.sum() > 0:
            covered = outline.reindex([r["glacier_id"] for r in with_rate]).sum() / outline.sum()
            share = f" ({100 * covered:.1f} % of the outline area)"
        row["reason"] = (f"sum of the trends of {len(with_rate)} of {len(rows)} glaciers{share}; the others have "
                         "fewer than 2 well observed season-years")
    return row


def trends(table: pd.DataFrame, *, min_observed: float | None = None, region: bool = True) -> pd.DataFrame:
    """Per-glacier and regional trends over season-years, by weighted least squares.

    Parameters
    ----------
    table
        A :func:`glacier_series` table (also one read back from CSV/Parquet).
    min_observed
        Observed share a year needs to enter a trend (default: the table's, else the
        ``min_observed`` option, 0.9).
    region
        Also give the region's trend, as a last row with ``glacier_id`` :data:`REGION_ID`: the
        sum of the glaciers' trends, with the sum of their standard errors (fully correlated),
        never a line through yearly totals that mix in partly clouded glaciers
        (:func:`_region_trend`).

    Returns
    -------
    pandas.DataFrame
        One row per glacier, columns :data:`TREND_COLUMNS`. For each season-year the best
        observed step with ``observed_fraction >= min_observed`` gives the area (a season with
        several dates is one point, never a rate); ``rate_km2_per_yr`` is the slope of the
        weighted least-squares line through those areas with weights ``1 / sigma**2`` from the
        buffer uncertainty (floored at one pixel, where no ice means no perimeter);
        ``rate_stderr_km2_per_yr`` its standard error (:func:`wls_trend`); ``rate_pct_per_yr``
        the slope relative to the line's area in ``first_year``; ``significant`` is
        ``|rate| > 2 stderr``; ``area_fit_first_year_km2`` the line's area in ``first_year`` (with
        the rate, the whole line). ``n_lower_bound`` counts the season-years left out as lower
        bounds. With fewer than two qualifying years the rate is empty (NaN, ``significant``
        NA) and ``reason`` says why.
    """
    min_observed = _series_min_observed(table, min_observed, ("glacier_id", "time", "year", "area_km2",
                                                              "area_uncertainty_km2", "observed_fraction"))
    px_m2 = table.attrs.get("pixel_area_m2")
    sig = table["area_uncertainty_km2"].to_numpy(np.float64)
    floor = float(px_m2) / 1e6 if px_m2 else (float(sig[sig > 0].min()) if (sig > 0).any() else 1e-6)
    rows = []
    t = table.sort_values("time", kind="stable")
    for gid, g in t.groupby("glacier_id", sort=False):
        x, y, s, lower = _yearly(g["time"].to_numpy(), g["year"].to_numpy(np.int64), g["area_km2"].to_numpy(np.float64),
                                 g["area_uncertainty_km2"].to_numpy(np.float64),
                                 g["observed_fraction"].to_numpy(np.float64), min_observed)
        rows.append(_trend_row(str(gid), x, y, s, lower, floor, min_observed))
    if region:
        rows.append(_region_trend(rows, t, min_observed))
    out = pd.DataFrame(rows, columns=list(TREND_COLUMNS))
    for c in ("first_year", "last_year"):
        out[c] = out[c].astype("Int64")
    out["significant"] = out["significant"].astype("boolean")
    out["reason"] = out["reason"].astype(str)
    out.attrs = {"min_observed": min_observed}
    return out


def check_table_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path if :func:`write_table` can write it (known suffix, existing folder).

    Callers check before computing, so a typo in an output name costs nothing.
    """
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".parquet"):
        raise IcemapError(f"cannot tell the table format of {path.name!r}; use .csv or .parquet")
    if not path.parent.is_dir():
        raise IcemapError(f"folder {path.parent} does not exist; create it before writing {path.name}")
    return path


def write_table(table: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write a table as CSV or Parquet by suffix, atomically (temporary file, then rename).

    Parquet keeps the types (datetime64 times, int years, float NaN); CSV writes ISO times and
    empty cells for NaN, which spreadsheets and ``pandas.read_csv`` read back.
    """
    path = check_table_path(path)
    suffix = path.suffix.lower()
    with atomic_path(path, suffix=suffix) as tmp:
        if suffix == ".csv":
            table.to_csv(tmp, index=False)
        else:
            table.to_parquet(tmp, index=False)
    return path
