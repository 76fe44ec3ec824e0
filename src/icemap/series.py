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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from icemap.errors import IcemapError

__all__ = [
    "REGION_COLUMNS",
    "SERIES_COLUMNS",
    "check_table_path",
    "glacier_counts",
    "glacier_series",
    "region_series",
    "write_table",
]

#: Columns of :func:`glacier_series`, in order.
SERIES_COLUMNS = ("glacier_id", "time", "year", "area_km2", "area_uncertainty_km2", "observed_fraction",
                  "outline_area_km2", "change_km2_per_yr", "change_pct_per_yr")
#: Columns of :func:`region_series`, in order.
REGION_COLUMNS = ("time", "year", "area_km2", "area_uncertainty_km2", "observed_fraction", "outline_area_km2",
                  "n_glaciers", "change_km2_per_yr", "change_pct_per_yr")

_SECONDS_PER_YEAR = 365.25 * 86400.0


def _stats_block(ice: np.ndarray, ids: np.ndarray, n_ids: int) -> np.ndarray:
    from icemap.kernels import glacier_stats

    s = glacier_stats(ice, ids, n_ids, halo=1)
    return s[:, None, None]


def glacier_counts(ice: Any, ids: Any, n_ids: int) -> Any:
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
    import dask.array as da
    import xarray as xr

    from icemap.kernels import GLACIER_STATS
    from icemap.options import get_option

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
    import rioxarray  # noqa: F401  (registers .rio: the grid and CRS of masks built by hand)
    import xarray as xr

    if isinstance(pred_or_ice, (str, os.PathLike)):
        from icemap.store import open_cube

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


def _rates(area: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Change per year against the previous step (rows in time order), NaN for the first."""
    km2 = np.full(area.shape, np.nan)
    pct = np.full(area.shape, np.nan)
    if area.size > 1:
        years = np.diff(times.astype("datetime64[ns]").astype(np.int64)) / 1e9 / _SECONDS_PER_YEAR
        with np.errstate(invalid="ignore", divide="ignore"):
            km2[1:] = np.diff(area) / years
            pct[1:] = np.where(area[:-1] > 0, 100.0 * km2[1:] / area[:-1], np.nan)
    return km2, pct


def glacier_series(
    pred_or_ice: Any,
    reference: Any,
    *,
    id_column: str | None = None,
    buffer_px: float | None = None,
) -> Any:
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

    Returns
    -------
    pandas.DataFrame
        Long form, one row per glacier and time step, columns :data:`SERIES_COLUMNS`:
        ``area_km2`` (ice pixels x pixel area); ``area_uncertainty_km2`` (perimeter of the
        glacier's mapped ice along pixel sides x ``buffer_px`` pixels); ``observed_fraction``
        (share of the outline with valid data: valid pixels over the outline's pixels, times
        the share of the outline's area on the grid, so an outline half off the image is at
        most half observed; NaN for an outline that holds no pixel centre); ``outline_area_km2``
        (the polygon's area); ``change_km2_per_yr`` and ``change_pct_per_yr`` against the
        previous step of the same glacier over the real time between them (NaN for the first).
        Areas under cloud or fill are not ice: where ``observed_fraction < 1`` the area and its
        change are lower bounds.

    Raises
    ------
    NoOverlapError
        When no outline overlaps the product.
    IcemapError
        For an unknown ``id_column``, a product without ``ice``, a mask without time, or a
        geographic CRS.
    """
    import pandas as pd
    import shapely

    from icemap.labels import check_outlines_overlap, glacier_ids
    from icemap.options import resolve
    from icemap.vector import pixel_area_m2

    ice = _as_ice(pred_or_ice)
    buffer_px = float(resolve("area_buffer_px", buffer_px))
    px_m2 = pixel_area_m2(ice)
    t = ice.rio.transform(recalc=True)
    dx, dy = float(np.hypot(t.a, t.d)), float(np.hypot(t.b, t.e))
    gdf = check_outlines_overlap(reference, ice)
    ids, table = glacier_ids(gdf, ice, id_column=id_column)
    n = int(table["gid"].max())
    counts = glacier_counts(ice, ids, n).values  # (time, stat, gid)
    gids = table["gid"].to_numpy()
    c = counts[:, :, gids]  # (time, stat, glacier) in table order
    pixels, valid, icepx, ex, ey = (c[:, i].astype(np.float64) for i in range(5))
    # Share of each outline's area on the grid: 1 exactly for outlines inside it.
    grid = shapely.box(*ice.rio.bounds())
    geoms = np.asarray(table.geometry.array, dtype=object)
    inside = shapely.within(geoms, grid)
    on_grid = np.ones(len(table))
    part = ~inside
    if part.any():
        area = shapely.area(geoms[part])
        on_grid[part] = np.where(area > 0, shapely.area(shapely.intersection(geoms[part], grid)) / area, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        observed = np.where(pixels > 0, valid / pixels, np.nan) * on_grid
    perimeter_m = ex * dy + ey * dx
    buffer_m = buffer_px * 0.5 * (dx + dy)
    times = pd.DatetimeIndex(ice["time"].values)
    n_t, n_g = len(times), len(table)
    frame = pd.DataFrame({
        "glacier_id": np.tile(table["glacier_id"].astype(str).to_numpy(), n_t),
        "time": np.repeat(times.to_numpy(), n_g),
        "year": np.repeat(times.year.to_numpy(), n_g).astype(np.int64),
        "area_km2": (icepx * px_m2 / 1e6).ravel(),
        "area_uncertainty_km2": (perimeter_m * buffer_m / 1e6).ravel(),
        "observed_fraction": observed.ravel(),
        "outline_area_km2": np.tile(table["outline_area_km2"].to_numpy(np.float64), n_t),
        "_gid": np.tile(gids, n_t),
    })
    # Glaciers in the outlines' order, each in time order; rates within each glacier (by gid,
    # so repeated ids in an inventory stay apart).
    frame = frame.sort_values(["_gid", "time"], kind="stable", ignore_index=True)
    km2 = np.full(len(frame), np.nan)
    pct = np.full(len(frame), np.nan)
    for idx in frame.groupby("_gid", sort=False).indices.values():
        km2[idx], pct[idx] = _rates(frame["area_km2"].to_numpy()[idx], frame["time"].to_numpy()[idx])
    frame["change_km2_per_yr"] = km2
    frame["change_pct_per_yr"] = pct
    frame["glacier_id"] = frame["glacier_id"].astype(str)
    frame.attrs = {"id_column": id_column or "auto", "buffer_px": buffer_px, "pixel_area_m2": px_m2,
                   "crs": ice.rio.crs.to_string()}
    return frame[list(SERIES_COLUMNS)]


def region_series(table: Any) -> Any:
    """The region's totals per time step, from a :func:`glacier_series` table.

    ``area_km2`` and ``outline_area_km2`` are sums over glaciers. ``area_uncertainty_km2`` is
    the *sum* of the glaciers' buffer uncertainties, i.e. their errors taken as fully correlated:
    the same sensor, date, threshold and pixel grid misplace all outlines alike, so they do not
    cancel, and the sum is the conservative choice (the root-sum-square would assume independent
    errors and shrink with the number of glaciers). ``observed_fraction`` is weighted by outline
    area. Rates compare consecutive time steps over the real time between them.
    """
    import pandas as pd

    missing = [c for c in ("time", "area_km2", "area_uncertainty_km2", "observed_fraction", "outline_area_km2")
               if c not in table.columns]
    if missing:
        raise IcemapError(f"not a glacier_series table: no column(s) {', '.join(missing)}")
    t = table.assign(_w=table["outline_area_km2"].where(table["observed_fraction"].notna(), 0.0).fillna(0.0))
    t = t.assign(_wf=t["_w"] * t["observed_fraction"].fillna(0.0))
    g = t.groupby("time", sort=True)
    out = pd.DataFrame({
        "area_km2": g["area_km2"].sum(),
        "area_uncertainty_km2": g["area_uncertainty_km2"].sum(),
        "observed_fraction": g["_wf"].sum() / g["_w"].sum().replace(0.0, np.nan),
        "outline_area_km2": g["outline_area_km2"].sum(),
        "n_glaciers": g.size().astype(np.int64),
    }).reset_index()
    out.insert(1, "year", pd.DatetimeIndex(out["time"]).year.astype(np.int64))
    out["change_km2_per_yr"], out["change_pct_per_yr"] = _rates(out["area_km2"].to_numpy(), out["time"].to_numpy())
    return out[list(REGION_COLUMNS)]


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


def write_table(table: Any, path: str | os.PathLike[str]) -> Path:
    """Write a table as CSV or Parquet by suffix, atomically (temporary file, then rename).

    Parquet keeps the types (datetime64 times, int years, float NaN); CSV writes ISO times and
    empty cells for NaN, which spreadsheets and ``pandas.read_csv`` read back.
    """
    path = check_table_path(path)
    suffix = path.suffix.lower()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{suffix}")
    try:
        if suffix == ".csv":
            table.to_csv(tmp, index=False)
        else:
            table.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
