"""Ice areas per glacier and per region.

Areas are counted, not vectorised: each chunk contributes a ``bincount`` of its ice pixels by
glacier id, and the per-chunk counts are summed, so the reduction is lazy and needs memory
for one chunk plus one number per glacier, whatever the size of the region.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from icemap.errors import IcemapError

__all__ = ["pixel_area_m2", "ice_area_per_glacier", "ice_area_km2"]


def pixel_area_m2(like: Any) -> float:
    """Area of one pixel of a cube's grid in m² (projected CRS in metres only)."""
    crs = like.rio.crs
    if crs is None or not crs.is_projected:
        raise IcemapError("areas need a projected CRS in metres (e.g. UTM); reproject the cube")
    t = like.rio.transform(recalc=True)
    return abs(t.a * t.e - t.b * t.d)


def _count_block(ice: np.ndarray, gid: np.ndarray, n: int) -> np.ndarray:
    sel = ice == 1
    counts = np.bincount(gid[sel].ravel(), minlength=n + 1)[: n + 1]
    return counts.reshape(1, 1, n + 1).astype(np.int64)


def _counts(ice2d: Any, gid2d: Any, n: int) -> Any:
    import dask.array as da

    ice_d = ice2d.data if hasattr(ice2d, "data") else ice2d
    gid_d = gid2d.data if hasattr(gid2d, "data") else gid2d
    if not isinstance(ice_d, da.Array):
        ice_d = da.from_array(np.asarray(ice_d), chunks=(1024, 1024))
    gid_d = da.asarray(gid_d).rechunk(ice_d.chunks)
    per_block = da.map_blocks(_count_block, ice_d, gid_d, n, new_axis=2,
                              chunks=(1, 1, n + 1), dtype=np.int64)
    return per_block.sum(axis=(0, 1))


def ice_area_per_glacier(ice: Any, ids: Any, table: Any) -> Any:
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
    import dask
    import pandas as pd

    px_km2 = pixel_area_m2(ice) / 1e6
    n = int(table["gid"].max()) if len(table) else 0
    times = ice["time"].values if "time" in ice.dims else [None]
    lazy = []
    for i in range(len(times)):
        frame = ice.isel(time=i) if "time" in ice.dims else ice
        lazy.append((_counts(frame, ids, n), _counts((frame == 255).astype(np.uint8), ids, n)))
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


def ice_area_km2(ice: Any) -> Any:
    """Total ice area (km²) per time step of an ice mask, lazily (an xarray DataArray)."""
    return (ice == 1).sum(dim=("y", "x")) * (pixel_area_m2(ice) / 1e6)
