"""Reference outlines -> rasters on a cube's grid.

Glacier inventories (RGI, GLIMS, national inventories) come as polygons in all sorts of files
and CRSs. This module reads them with geopandas, reprojects them to the cube's CRS and burns
them onto the cube grid chunk by chunk (``rasterio.features.rasterize`` per dask block), so a
regional mask never has to exist whole in memory.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import geopandas as gpd
import numpy as np
import pyogrio
import shapely
import xarray as xr
from rasterio.errors import NotGeoreferencedWarning
from rasterio.features import rasterize
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from icemap.errors import IcemapError, IcemapWarning, InvalidOutlineWarning, NoOverlapError
from icemap.kernels import NO_GLACIER
from icemap.options import get_option

if TYPE_CHECKING:  # pragma: no cover
    import geopandas as gpd
    import pandas as pd
    import pyproj
    import xarray as xr

__all__ = ["read_outlines", "rasterize_outlines", "glacier_ids", "grid_of", "NO_GLACIER"]


def read_outlines(source: str | os.PathLike[str] | gpd.GeoDataFrame, *, crs: str | int | pyproj.CRS | None = None,
                  layer: str | None = None) -> gpd.GeoDataFrame:
    """Read glacier outlines (Shapefile, GeoPackage, GeoJSON, GeoParquet) as a GeoDataFrame.

    Parameters
    ----------
    source
        A path, or a GeoDataFrame (returned reprojected).
    crs
        Reproject to this CRS (e.g. the cube's ``ds.rio.crs``).
    layer
        Layer of a multi-layer file (GeoPackage).
    """
    if isinstance(source, gpd.GeoDataFrame):
        gdf = source
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise IcemapError(f"outline file {path!r} does not exist")
        try:
            if path.endswith((".parquet", ".geoparquet")):
                gdf = gpd.read_parquet(path)
            else:
                gdf = gpd.read_file(path, layer=layer or _outline_layer(path))
        except Exception as exc:  # pyogrio/fiona raise many kinds
            raise IcemapError(f"cannot read outlines from {path}: {exc}") from None
    if not isinstance(gdf, gpd.GeoDataFrame) or gdf.geometry.name not in gdf.columns:
        # A CSV (or any table) without geometry: GDAL reads it as attributes only.
        raise IcemapError(
            f"{source} has no geometry column; give outlines as GeoPackage, Shapefile, GeoJSON or GeoParquet "
            "(convert a CSV with a WKT column, e.g. ogr2ogr -a_srs EPSG:4326 out.gpkg in.csv -oo GEOM_POSSIBLE_NAMES=WKT)"
        )
    if gdf.crs is None:
        raise IcemapError("the outlines have no CRS; add a .prj or set it with gdf.set_crs(...)")
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
    gdf = gdf[gdf.geometry.geom_type.isin(["Polygon", "MultiPolygon"])]
    if gdf.empty:
        raise IcemapError("the outline file holds no polygons")
    if crs is not None:
        gdf = gdf.to_crs(crs)
    return _repair(gdf)


def _outline_names(gdf: Any) -> list[str]:
    """How a user finds each outline in their file: its inventory id, else its row number."""
    for cand in ("glacier_id", "RGIId", "rgi_id", "glac_id", "GLIMSId", "ID", "id", "gid"):
        if cand in gdf.columns:
            return [f"{cand}={v}" for v in gdf[cand]]
    return [f"row {i}" for i in gdf.index]


def _repair(gdf: Any) -> Any:
    """Repair invalid outlines with shapely's ``make_valid``, naming them in one warning.

    A self-intersecting (bow-tie) ring has a signed area near zero and trips GEOS in overlays
    (a TopologyException at the grid edge): repaired, it counts its real area. Only the
    polygonal parts of the repair are kept (make_valid may return lines where a ring
    touches itself); an outline with none left is refused with its id.
    """
    bad = ~gdf.geometry.is_valid.to_numpy()
    if not bad.any():
        return gdf
    names = [n for n, b in zip(_outline_names(gdf), bad) if b]
    fixed = []
    for geom in shapely.make_valid(gdf.geometry.to_numpy()[bad]):
        parts = [p for p in shapely.get_parts(geom) if p.geom_type in ("Polygon", "MultiPolygon") and not p.is_empty]
        fixed.append(shapely.union_all(parts) if parts else None)
    empty = [n for n, g in zip(names, fixed) if g is None or g.is_empty]
    if empty:
        raise IcemapError(f"outline(s) {', '.join(empty[:10])} are invalid and hold no area once repaired; "
                          "fix or remove them")
    gdf = gdf.copy()
    geoms = gdf.geometry.to_numpy().copy()
    geoms[bad] = fixed
    gdf = gdf.set_geometry(_geoseries(geoms, gdf))
    warnings.warn(
        f"{len(names)} invalid outline(s) (self-intersecting rings) repaired with make_valid: "
        f"{', '.join(names[:10])}{' ...' if len(names) > 10 else ''}",
        InvalidOutlineWarning,
        stacklevel=4,
    )
    return gdf


def _geoseries(geoms: Any, like: Any) -> Any:
    return gpd.GeoSeries(geoms, index=like.index, crs=like.crs, name=like.geometry.name)


def _outline_layer(path: str) -> str | None:
    """The layer to read from a multi-layer file when none is named.

    A layer called like an inventory (``glaciers``, ``outlines``, ``rgi``...) wins; otherwise
    the first layer is used and a warning says how to pick another.
    """
    try:
        layers = [str(name) for name, _ in pyogrio.list_layers(path)]
    except Exception:  # not a multi-layer container: let read_file report problems
        return None
    if len(layers) <= 1:
        return None
    for name in layers:
        if name.lower() in ("glaciers", "glacier", "outlines", "rgi", "glims"):
            return name
    warnings.warn(
        f"{path} has layers {', '.join(layers)}; reading {layers[0]!r}. Pass layer= to choose another",
        IcemapWarning,
        stacklevel=3,
    )
    return layers[0]


def grid_of(like: Any) -> tuple[Any, tuple[int, int], Any]:
    """``(transform, (height, width), crs)`` of a cube or raster DataArray."""
    crs = like.rio.crs
    if crs is None:
        raise IcemapError("the target grid has no CRS; open cubes with icemap.open_cube")
    return like.rio.transform(recalc=True), (like.sizes["y"], like.sizes["x"]), crs


_SPURIOUS = "Dataset has no geotransform"


def _quiet_rasterize_warning() -> None:
    """Silence rasterio's spurious NotGeoreferencedWarning from concurrent ``rasterize`` calls.

    Under threads, rasterio's in-memory datasets sometimes report "no geotransform" although the
    burnt result is right (checked: threaded and single-threaded rasters are identical over many
    runs). Only that message is filtered, in whichever process rasterises (workers too); the
    filter list is checked each time because test runners and notebooks reset it.
    """
    for f in warnings.filters:
        if f[0] == "ignore" and f[1] is not None and f[1].pattern == _SPURIOUS:
            return
    warnings.filterwarnings("ignore", message=_SPURIOUS, category=NotGeoreferencedWarning)


def _burn_block(block: np.ndarray, shapes: Mapping[tuple[int, int], list[tuple[Any, int]]], transform: Any,
                all_touched: bool, dtype: str, block_info: dict[Any, Any] | None = None) -> np.ndarray:
    if block_info is None:  # dask passes it: the keyword is in the signature
        raise RuntimeError("dask called the burn kernel without block_info")
    info = block_info[None]
    (y0, y1), (x0, x1) = info["array-location"]
    out_shape = (y1 - y0, x1 - x0)
    mine = shapes.get(tuple(info["chunk-location"]), [])
    if not mine:
        return np.zeros(out_shape, dtype=dtype)
    _quiet_rasterize_warning()
    win = Window(x0, y0, x1 - x0, y1 - y0)
    return rasterize(mine, out_shape=out_shape, transform=window_transform(win, transform),
                     fill=NO_GLACIER, all_touched=all_touched, dtype=dtype)


def _shapes_per_block(gdf: Any, values: np.ndarray, transform: Any,
                      chunks: tuple[tuple[int, ...], tuple[int, ...]]) -> dict[tuple[int, int], list[tuple[Any, int]]]:
    """For every block, the (geometry, value) pairs whose geometry intersects it, in file order.

    A spatial index (shapely's STRtree) finds them in one bulk query, so each block burns only
    its own few outlines instead of all of a region's (10,066 for a 4096-px sample region):
    rasterising is then proportional to the outlines' area, not to outlines x blocks. Any pixel
    a polygon can burn (centre inside, or touched) lies in a block whose box the polygon
    intersects, so nothing is lost. File order is kept because later polygons overwrite earlier
    ones where outlines overlap.
    """
    geoms = np.asarray(gdf.geometry.array, dtype=object)
    ye = np.concatenate([[0], np.cumsum(chunks[0])])
    xe = np.concatenate([[0], np.cumsum(chunks[1])])
    keys = [(i, j) for i in range(len(chunks[0])) for j in range(len(chunks[1]))]
    corners = np.array([(transform * (xe[j], ye[i])) + (transform * (xe[j + 1], ye[i + 1])) for i, j in keys])
    boxes = shapely.box(np.minimum(corners[:, 0], corners[:, 2]), np.minimum(corners[:, 1], corners[:, 3]),
                        np.maximum(corners[:, 0], corners[:, 2]), np.maximum(corners[:, 1], corners[:, 3]))
    out: dict[tuple[int, int], list[tuple[Any, int]]] = {}
    if len(geoms):
        b_idx, g_idx = shapely.STRtree(geoms).query(boxes, predicate="intersects")
        order = np.lexsort((g_idx, b_idx))
        for b, g in zip(b_idx[order], g_idx[order]):
            out.setdefault(keys[b], []).append((geoms[g], int(values[g])))
    return out


def _burn(gdf: Any, values: np.ndarray, like: Any, *, all_touched: bool, dtype: str) -> Any:
    transform, (h, w), _ = grid_of(like)
    ref = like if isinstance(like, xr.DataArray) else like.get("reflectance", like)
    ref_chunks = getattr(ref, "chunks", None)
    if ref_chunks:
        chunks = (ref_chunks[ref.dims.index("y")], ref_chunks[ref.dims.index("x")])
    else:
        chunks = da.core.normalize_chunks((get_option("chunksize"),) * 2, (h, w))
    # The polygons enter the graph once, as one dependency of every block (shipped once per
    # worker), already split by block through a spatial index.
    # Named from one digest of the outlines' WKB: letting dask tokenize the per-block lists
    # pickles every geometry one by one (measured: half of evaluate's time with 10,066 outlines).
    digest = hashlib.sha256(b"".join(shapely.to_wkb(np.asarray(gdf.geometry.array, dtype=object)))).hexdigest()
    token = dask.base.tokenize(digest, np.asarray(values), tuple(transform), chunks, all_touched, dtype)
    shapes = dask.delayed(_shapes_per_block(gdf, values, transform, chunks), name=f"outline-shapes-{token}")
    template = da.empty((h, w), chunks=chunks, dtype=dtype)
    arr = template.map_blocks(_burn_block, shapes, transform, all_touched, dtype, dtype=dtype)
    out = xr.DataArray(arr, dims=("y", "x"), coords={"y": like["y"], "x": like["x"]})
    return out.rio.write_crs(like.rio.crs).rio.write_transform(transform)


def check_outlines_overlap(outlines: str | os.PathLike[str] | gpd.GeoDataFrame, like: xr.Dataset | xr.DataArray) -> gpd.GeoDataFrame:
    """Read outlines and refuse them when none overlaps the grid of ``like``.

    Outlines of another region (Oetztal outlines on an Athabasca map) rasterise to an all-zero
    reference, and scores against it (F1 0, reference area 0 km²) look like a result. Returns
    the outlines (in their own CRS) for the rasterisers, so the file is read once.
    """
    gdf = read_outlines(outlines)
    crs = like.rio.crs
    left, bottom, right, top = like.rio.bounds()
    try:
        ow, os_, oe, on = gdf.to_crs(crs).total_bounds
        inside = ow < right and oe > left and os_ < top and on > bottom
    except Exception:  # outlines that cannot be projected to the grid's CRS cannot overlap it
        inside = False
    if not inside:
        w, s_, e, n = gdf.total_bounds
        raise NoOverlapError(
            f"no reference outline overlaps the prediction: the outlines cover ({w:.6g}, {s_:.6g}, {e:.6g}, {n:.6g}) "
            f"in {gdf.crs.to_string()}, the prediction ({left:.6g}, {bottom:.6g}, {right:.6g}, {top:.6g}) in "
            f"{crs.to_string() if crs else 'no CRS'}; use outlines of the mapped region"
        )
    return gdf


def rasterize_outlines(outlines: str | os.PathLike[str] | gpd.GeoDataFrame, like: xr.Dataset | xr.DataArray, *,
                       all_touched: bool = False, buffer_m: float = 0.0) -> xr.DataArray:
    """A 0/1 uint8 reference mask on the grid of ``like``, lazily.

    Parameters
    ----------
    outlines
        Path or GeoDataFrame of glacier polygons.
    like
        The cube (or any DataArray with x/y and a CRS) whose grid to use.
    all_touched
        Burn every pixel a polygon touches, instead of pixels whose centre is inside.
    buffer_m
        Grow outlines outward by this many metres first: study a's "extended" mask uses 15 m
        so that mixed ice/rock border pixels count as ice.
    """
    gdf = read_outlines(outlines, crs=like.rio.crs)
    if buffer_m:
        if not gdf.crs.is_projected:
            raise IcemapError("buffering needs a projected CRS in metres; reproject the cube first")
        gdf = gdf.set_geometry(gdf.geometry.buffer(buffer_m))
    mask = _burn(gdf, np.ones(len(gdf), dtype=np.uint8), like, all_touched=all_touched, dtype="uint8")
    mask.name = "reference"
    mask.attrs = {"long_name": "reference glacier mask", "buffer_m": float(buffer_m), "all_touched": int(all_touched)}
    return mask


def glacier_ids(outlines: str | os.PathLike[str] | gpd.GeoDataFrame, like: xr.Dataset | xr.DataArray, *,
                id_column: str | None = None) -> tuple[xr.DataArray, pd.DataFrame]:
    """A glacier-id raster (int32, 0 = no glacier) and the table linking ids to outlines.

    Returns ``(ids, table)``: ``ids`` is lazy, ``table`` a GeoDataFrame with ``gid`` (the
    raster value, 1..N in file order), the outline's own id column and its area in km².
    """
    gdf = read_outlines(outlines, crs=like.rio.crs).reset_index(drop=True)
    if id_column is None:
        for cand in ("glacier_id", "RGIId", "rgi_id", "glac_id", "GLIMSId", "ID", "id"):
            if cand in gdf.columns:
                id_column = cand
                break
    gdf = gdf.copy()
    gdf["gid"] = np.arange(1, len(gdf) + 1, dtype=np.int32)
    if id_column is None:
        id_column = "glacier_id"
        gdf[id_column] = [f"G{g:05d}" for g in gdf["gid"]]
    elif id_column not in gdf.columns:
        raise IcemapError(f"outlines have no column {id_column!r}; columns: {', '.join(map(str, gdf.columns))}")
    gdf["outline_area_km2"] = gdf.geometry.area / 1e6 if gdf.crs.is_projected else np.nan
    ids = _burn(gdf, gdf["gid"].to_numpy(), like, all_touched=False, dtype="int32")
    ids.name = "glacier_id"
    ids.attrs = {"long_name": "glacier id (gid column of the outline table)", "nodata": NO_GLACIER}
    table = gdf[["gid", id_column, "outline_area_km2", "geometry"]].rename(columns={id_column: "glacier_id"})
    return ids, table
