"""Ice areas per glacier and per region, ice outlines, and vector files.

Areas are counted, not vectorised: each chunk contributes a ``bincount`` of its ice pixels by
glacier id, and the per-chunk counts are summed, so the reduction is lazy and needs memory
for one chunk plus one number per glacier, whatever the size of the region.

Outlines (:func:`polygonise`) are the exception that needs a whole time step: a polygon may
cross any number of chunks. They are made one time step at a time, and each polygon's area is
its pixel count times the pixel area, so outline areas and counted areas agree exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import geopandas as gpd
import numpy as np
import pandas as pd
from rasterio.features import shapes
from shapely.geometry import shape

from icemap._atomic import atomic_path
from icemap.errors import IcemapError
from icemap.kernels import ICE_NODATA, count_by_id
from icemap.labels import glacier_ids
from icemap.options import get_option, resolve

if TYPE_CHECKING:  # pragma: no cover
    import geopandas as gpd
    import pandas as pd
    import xarray as xr

__all__ = [
    "pixel_area_m2",
    "ice_area_per_glacier",
    "ice_area_km2",
    "polygonise",
    "OUTLINE_COLUMNS",
    "write_vector",
    "area_change",
    "VECTOR_FORMATS",
]

#: File suffix -> (OGR driver or "parquet", human name) for :func:`write_vector`.
VECTOR_FORMATS: dict[str, tuple[str, str]] = {
    ".gpkg": ("GPKG", "GeoPackage"),
    ".geojson": ("GeoJSON", "GeoJSON"),
    ".parquet": ("parquet", "GeoParquet"),
}


def pixel_area_m2(like: xr.Dataset | xr.DataArray) -> float:
    """Area of one pixel of a cube's grid in m² (projected CRS in metres only)."""
    crs = like.rio.crs
    if crs is None or not crs.is_projected:
        raise IcemapError("areas need a projected CRS in metres (e.g. UTM); reproject the cube")
    t = like.rio.transform(recalc=True)
    return abs(t.a * t.e - t.b * t.d)


def _count_block(ice: np.ndarray, gid: np.ndarray, n: int, value: int) -> np.ndarray:
    return count_by_id(ice, gid, n, value).reshape(1, 1, n + 1)


def _counts(ice2d: Any, gid2d: Any, n: int, value: int = 1) -> Any:
    ice_d = ice2d.data if hasattr(ice2d, "data") else ice2d
    gid_d = gid2d.data if hasattr(gid2d, "data") else gid2d
    if not isinstance(ice_d, da.Array):
        ice_d = da.from_array(np.asarray(ice_d), chunks=(get_option("chunksize"),) * 2)
    gid_d = da.asarray(gid_d).rechunk(ice_d.chunks)
    per_block = da.map_blocks(_count_block, ice_d, gid_d, n, value, new_axis=2,
                              chunks=(1, 1, n + 1), dtype=np.int64)
    return per_block.sum(axis=(0, 1))


def ice_area_per_glacier(ice: xr.DataArray, ids: xr.DataArray, table: pd.DataFrame) -> pd.DataFrame:
    """Ice area (km²) of every glacier at every time step, as a pandas DataFrame.

    Parameters
    ----------
    ice
        uint8 ice mask (time, y, x) or (y, x): 1 ice, 0 not, 255 nodata.
    ids, table
        From :func:`icemap.labels.glacier_ids` on the same grid.

    Returns
    -------
    pandas.DataFrame
        One row per glacier and time: ``glacier_id``, ``time``, ``ice_area_km2``,
        ``outline_area_km2``, ``nodata_area_km2`` (cloud or fill inside the outline, where the
        ice area is a lower bound).
    """
    px_km2 = pixel_area_m2(ice) / 1e6
    n = int(table["gid"].max()) if len(table) else 0
    times = ice["time"].values if "time" in ice.dims else [None]
    lazy = []
    for i in range(len(times)):
        frame = ice.isel(time=i) if "time" in ice.dims else ice
        lazy.append((_counts(frame, ids, n), _counts(frame, ids, n, value=int(ICE_NODATA))))
    computed = dask.compute(*lazy)
    rows = []
    for t, (ice_counts, nodata_counts) in zip(times, computed):
        for gid, gl_id, area in zip(table["gid"], table["glacier_id"], table["outline_area_km2"]):
            rows.append({
                "glacier_id": gl_id,
                "time": pd.Timestamp(t) if t is not None else pd.NaT,
                "ice_area_km2": ice_counts[gid] * px_km2,
                "outline_area_km2": area,
                "nodata_area_km2": nodata_counts[gid] * px_km2,
            })
    return pd.DataFrame(rows)


def ice_area_km2(ice: xr.DataArray) -> xr.DataArray:
    """Total ice area (km²) per time step of an ice mask, lazily (an xarray DataArray)."""
    # A new quantity: none of the mask's attributes (flags, nodata, threshold) describe it.
    area = (ice == 1).sum(dim=("y", "x"), keep_attrs=False) * (pixel_area_m2(ice) / 1e6)
    area.attrs = {"long_name": "ice area", "units": "km2"}
    return area.rename("ice_area")


def _times(ice: Any) -> list[Any]:
    """The time labels of a mask: one per step, the scalar ``time`` coordinate of a single step
    (``isel(time=0)`` keeps it), or ``[None]`` for a mask that carries no time at all."""
    if "time" in ice.dims:
        return list(ice["time"].values)
    if "time" in ice.coords and ice["time"].ndim == 0:
        return [ice["time"].values]
    return [None]


#: Columns of :func:`polygonise`, in order (``geometry`` last).
OUTLINE_COLUMNS = ("glacier_id", "time", "source_item_ids", "method", "threshold", "model_sha256",
                   "pixel_count", "area_km2", "area_uncertainty_km2")


def polygonise(
    ice: xr.DataArray,
    *,
    min_area_m2: float = 0.0,
    reference: str | os.PathLike[str] | gpd.GeoDataFrame | None = None,
    id_column: str | None = None,
    buffer_px: float | None = None,
    attrs: dict[str, Any] | None = None,
) -> gpd.GeoDataFrame:
    """Ice outlines with their provenance: one polygon per 4-connected patch of ice, per time step.

    Parameters
    ----------
    ice
        uint8 ice mask (time, y, x) or (y, x) with a projected CRS: 1 ice, 0 not, 255 nodata.
        Only value 1 becomes polygons; nodata is neither ice nor a hole filler.
    min_area_m2
        Drop patches smaller than this (e.g. ``2 * pixel area`` to drop single-pixel noise).
    reference
        Glacier outlines (path or GeoDataFrame, e.g. RGI or GLIMS). Patches are then cut at the
        outlines' edges, so every polygon lies in one glacier (or in none) and carries its id:
        the polygons of a glacier add up to the area :func:`icemap.series.glacier_series` counts.
    id_column
        The outlines' id column; default the same choice as the series (``glacier_id``,
        ``RGIId``, ``rgi_id``, ``glac_id``, ``GLIMSId``, ``ID``, ``id``).
    buffer_px
        Buffer width of the area uncertainty in pixels (default the ``area_buffer_px`` option).
    attrs
        Provenance that overrides the mask's own attributes (``method``, ``threshold``,
        ``model_sha256``), e.g. the product store's attributes.

    Returns
    -------
    geopandas.GeoDataFrame
        Columns :data:`OUTLINE_COLUMNS` and ``geometry`` (pixel edges, with holes), in the CRS
        of the mask: ``glacier_id`` (None outside every outline or without ``reference``);
        ``time`` in UTC (the mask's times are UTC; NaT only for a mask without any time);
        ``source_item_ids`` (the step's ``item_ids`` coordinate: the scenes it was mapped
        from); ``method``, ``threshold`` and ``model_sha256`` (empty for NDSI);
        ``pixel_count``; ``area_km2`` (= pixel count x pixel area, exactly what
        :func:`ice_area_km2` counts) and ``area_uncertainty_km2`` (the buffer method, as in the
        series: the polygon's perimeter, which follows pixel sides, times ``buffer_px`` pixels).

    Notes
    -----
    Patches are 4-connected, the connectivity ``rasterio.features.shapes`` uses, so diagonal
    neighbours are separate outlines. Each time step is computed (and held in memory, as a 2-D
    array) on its own.
    """
    px_m2 = pixel_area_m2(ice)
    if min_area_m2 < 0:
        raise IcemapError(f"min_area_m2 must be >= 0, got {min_area_m2}")
    buffer_px = float(resolve("area_buffer_px", buffer_px))
    transform = ice.rio.transform(recalc=True)
    dx, dy = float(np.hypot(transform.a, transform.d)), float(np.hypot(transform.b, transform.e))
    buffer_m = buffer_px * 0.5 * (dx + dy)
    key, names = _glacier_key(ice, reference, id_column)
    rows = _outline_rows(ice, key, names, _outline_provenance(ice, attrs), transform=transform, px_m2=px_m2,
                         min_area_m2=min_area_m2, buffer_m=buffer_m)
    if not rows:
        return _no_outlines(ice.rio.crs)
    gdf = gpd.GeoDataFrame(rows, geometry="geometry", crs=ice.rio.crs)
    gdf["time"] = pd.to_datetime(gdf["time"], utc=True)
    return gdf.sort_values(["time", "area_km2"], ascending=[True, False], ignore_index=True)


def _outline_provenance(ice: Any, attrs: dict[str, Any] | None) -> dict[str, Any]:
    """``method``, ``threshold`` (NaN if none) and ``model_sha256`` of the mask, ``attrs`` first."""
    meta = {**ice.attrs, **(attrs or {})}
    return {
        "method": str(meta.get("method", "")),
        "threshold": float(meta["threshold"]) if meta.get("threshold") is not None else np.nan,
        "model_sha256": str(meta.get("model_sha256", "") or ""),
    }


def _glacier_key(ice: Any, reference: Any, id_column: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The raster ``shapes()`` cuts patches by, and the glacier id of each of its values.

    One value per glacier (1 outside all, gid + 1 inside), so patches are cut at the outlines'
    edges; without ``reference`` one value everywhere and no names.
    """
    if reference is None:
        return np.ones(ice.shape[-2:], np.int32), None

    ids, table = glacier_ids(reference, ice, id_column=id_column)
    gid_raster = np.asarray(ids.values, dtype=np.int32)
    names = np.full(int(table["gid"].max()) + 1, None, dtype=object)
    names[table["gid"].to_numpy()] = table["glacier_id"].astype(str).to_numpy()
    return (gid_raster + 1).astype(np.int32), names


def _outline_rows(ice: Any, key: np.ndarray, names: np.ndarray | None, provenance: dict[str, Any], *,
                  transform: Any, px_m2: float, min_area_m2: float, buffer_m: float) -> list[dict[str, Any]]:
    """The outline rows of every time step, each step computed (as a 2-D array) on its own.

    Each row carries its step's UTC time and source items besides the mask's provenance.
    """
    items = ice["item_ids"] if "item_ids" in ice.coords else None
    rows: list[dict[str, Any]] = []
    for i, t in enumerate(_times(ice)):
        frame = np.asarray(ice.isel(time=i).values if "time" in ice.dims else ice.values)
        mask = frame == 1
        if not mask.any():
            continue
        source = ""
        if items is not None:
            source = str(items.values[i] if items.ndim == 1 else items.values)
        when = pd.Timestamp(t).tz_localize("UTC") if t is not None else pd.NaT
        step = {"time": when, "source_item_ids": source, **provenance}
        rows += _step_outlines(mask, key, names, step, transform=transform, px_m2=px_m2,
                               min_area_m2=min_area_m2, buffer_m=buffer_m)
    return rows


def _step_outlines(mask: np.ndarray, key: np.ndarray, names: np.ndarray | None, step: dict[str, Any], *,
                   transform: Any, px_m2: float, min_area_m2: float, buffer_m: float) -> list[dict[str, Any]]:
    """The outline rows of one time step: one per 4-connected patch of ``mask`` within one key value."""
    rows: list[dict[str, Any]] = []
    for geom, value in shapes(key, mask=mask, connectivity=4, transform=transform):
        poly = shape(geom)
        # Pixel-edge polygons: their area is a whole number of pixels.
        count = int(round(poly.area / px_m2))
        if count * px_m2 < min_area_m2:
            continue
        rows.append({
            "glacier_id": names[int(value) - 1] if names is not None else None,
            **step, "pixel_count": count, "area_km2": count * px_m2 / 1e6,
            "area_uncertainty_km2": poly.length * buffer_m / 1e6, "geometry": poly,
        })
    return rows


def _no_outlines(crs: Any) -> Any:
    """An empty outline table with the columns and dtypes of a full one (so concatenation keeps types)."""
    empty = pd.DataFrame({c: pd.Series([], dtype=object) for c in OUTLINE_COLUMNS})
    empty["time"] = pd.Series([], dtype="datetime64[ns, UTC]")
    empty["threshold"] = pd.Series([], dtype="float64")
    empty["pixel_count"] = pd.Series([], dtype="int64")
    for c in ("area_km2", "area_uncertainty_km2"):
        empty[c] = pd.Series([], dtype="float64")
    return gpd.GeoDataFrame(empty, geometry=gpd.GeoSeries([], crs=crs), crs=crs)


def write_vector(gdf: gpd.GeoDataFrame, path: str | os.PathLike[str], *, layer: str | None = None) -> Path:
    """Write a GeoDataFrame as GeoPackage, GeoJSON or GeoParquet by suffix, atomically.

    Parameters
    ----------
    gdf
        The outlines (e.g. from :func:`polygonise`).
    path
        Destination; ``.gpkg``, ``.geojson`` or ``.parquet`` picks the format. Its folder must
        exist. The file is written to a temporary name in the same folder and renamed over
        ``path`` once complete, so readers never see a half-written file and a failed write
        leaves any previous file intact.
    layer
        GeoPackage layer name; default the file's stem.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    IcemapError
        For an unknown suffix, a missing folder, or GeoParquet without pyarrow installed.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VECTOR_FORMATS:
        raise IcemapError(
            f"cannot tell the vector format of {path.name!r}; use one of "
            + ", ".join(f"{k} ({v[1]})" for k, v in VECTOR_FORMATS.items())
        )
    if not path.parent.is_dir():
        raise IcemapError(f"folder {path.parent} does not exist; create it before writing {path.name}")
    driver = VECTOR_FORMATS[suffix][0]
    if driver == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise IcemapError(
                "writing GeoParquet needs pyarrow, which is not installed; pip install pyarrow, "
                "or write .gpkg/.geojson"
            ) from None
    # The real suffix on the temporary file, so drivers that look at the suffix still recognise
    # the format; SQLite side files of a failed GeoPackage go with it.
    with atomic_path(path, suffix=suffix, side_files=("-journal", "-wal", "-shm")) as tmp:
        if driver == "parquet":
            gdf.to_parquet(tmp)
        elif driver == "GPKG":
            gdf.to_file(tmp, driver=driver, layer=layer or path.stem, engine="pyogrio")
        else:
            gdf.to_file(tmp, driver=driver, engine="pyogrio")
    return path


def _select_time(ice: Any, when: Any) -> Any:
    """The one time label of ``ice`` that ``when`` names: an exact time, or a day ("2021-02-12")."""
    if "time" not in ice.dims:
        raise IcemapError("area_change needs an ice mask with a time dimension")
    times = pd.DatetimeIndex(ice["time"].values)
    if isinstance(when, (int, np.integer)) and not isinstance(when, bool):
        if not -len(times) <= int(when) < len(times):
            raise IcemapError(f"time index {when} out of range for {len(times)} time steps")
        return times[int(when)]
    try:
        stamp = pd.Timestamp(when)
    except (ValueError, TypeError):
        raise IcemapError(f"cannot read {when!r} as a date; give YYYY-MM-DD (or a full ISO time) of one of "
                          f"{', '.join(str(t)[:10] for t in times)}") from None
    if pd.isna(stamp):
        raise IcemapError(f"{when!r} is not a date; give YYYY-MM-DD")
    if stamp.tzinfo is not None:  # store times are UTC without a zone
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    exact = times[times == stamp]
    if len(exact) == 1:
        return exact[0]
    same_day = times[times.normalize() == stamp.normalize()] if stamp == stamp.normalize() else exact
    if len(same_day) == 1:
        return same_day[0]
    available = ", ".join(str(t)[:19] for t in times)
    if len(same_day) > 1:
        raise IcemapError(f"{when!r} matches {len(same_day)} time steps; give the full time ({available})")
    raise IcemapError(f"no time step at {when!r}; the mask has {available}")


def area_change(ice: xr.DataArray, t0: str | int | np.datetime64, t1: str | int | np.datetime64, ids: xr.DataArray,
                table: pd.DataFrame) -> pd.DataFrame:
    """Ice area of every glacier at two dates and its change, as a pandas DataFrame.

    Parameters
    ----------
    ice
        uint8 ice mask (time, y, x).
    t0, t1
        The two time steps: a date (``"2021-02-12"``, matching the one step of that day), a full
        time, or an integer position.
    ids, table
        From :func:`icemap.labels.glacier_ids` on the same grid.

    Returns
    -------
    pandas.DataFrame
        One row per glacier: ``glacier_id``, ``time0``, ``time1``, ``area0_km2``,
        ``area1_km2``, ``change_km2`` (area1 - area0), ``change_pct`` (relative to area0; NaN
        where area0 is 0), ``outline_area_km2``, and ``nodata0_km2``/``nodata1_km2``: cloud or
        fill inside the outline, where the area is a lower bound and the change is uncertain.
        Areas come from :func:`ice_area_per_glacier`, so both tables agree exactly.
    """
    a, b = _select_time(ice, t0), _select_time(ice, t1)
    steps = [a] if a == b else [a, b]
    per = ice_area_per_glacier(ice.sel(time=steps), ids, table)
    # ice_area_per_glacier emits the glaciers in table order for every time step, so the rows
    # of the two steps line up by position (robust even to repeated glacier ids).
    first = per[per["time"] == a].reset_index(drop=True)
    second = per[per["time"] == b].reset_index(drop=True)
    out = pd.DataFrame({
        "glacier_id": first["glacier_id"],
        "time0": a,
        "time1": b,
        "area0_km2": first["ice_area_km2"],
        "area1_km2": second["ice_area_km2"],
        "outline_area_km2": first["outline_area_km2"],
        "nodata0_km2": first["nodata_area_km2"],
        "nodata1_km2": second["nodata_area_km2"],
    })
    out["change_km2"] = out["area1_km2"] - out["area0_km2"]
    with np.errstate(invalid="ignore", divide="ignore"):
        pct = 100.0 * out["change_km2"].to_numpy() / out["area0_km2"].to_numpy()
    out["change_pct"] = np.where(out["area0_km2"].to_numpy() > 0, pct, np.nan)
    cols = ["glacier_id", "time0", "time1", "area0_km2", "area1_km2", "change_km2", "change_pct",
            "outline_area_km2", "nodata0_km2", "nodata1_km2"]
    return out[cols].reset_index(drop=True)
