"""Stores and objects that plain xarray reads and writes, without icemap.

Users open stores with ``xr.open_zarr(path)`` first. Two things make that work cleanly:

* **consolidated metadata**, written when a write completes (zarr v2 and v3). Without it
  xarray warns on every open. It is written last, so it always describes the last finished
  state; icemap itself reads with ``consolidated=False`` (xarray) and
  ``use_consolidated=False`` (zarr, whose ``open_group`` otherwise trusts the consolidated
  view and would miss an interrupted append's longer arrays) and the ``complete`` flags, so an
  interrupted write is still detected and resumed.
* **the CRS as a coordinate**: xarray leaves a variable named by a ``grid_mapping`` attribute
  out of the ``coordinates`` it writes, so a plain ``open_zarr`` (``decode_coords=True``)
  returned ``spatial_ref`` as a data variable and rioxarray found no CRS. A dataset-level
  ``coordinates`` attribute (CF) names it, which xarray decodes by default.

Plain xarray also decodes CF fill values: an ``ice`` mask (uint8, 255 = nodata) comes back as
float with NaN; :func:`restore_mask` turns it back for icemap's functions.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["finish_store", "restore_mask"]

#: Coordinates that must come back as coordinates under ``decode_coords=True``.
_GLOBAL_COORDS = ("spatial_ref",)


def finish_store(path: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Name the CRS coordinate for plain readers and consolidate the metadata (v2 or v3)."""
    import zarr

    group = zarr.open_group(path, mode="r+", storage_options=storage_options, use_consolidated=False)
    present = [c for c in _GLOBAL_COORDS if c in group]
    if present:
        group.attrs["coordinates"] = " ".join(present)
    with warnings.catch_warnings():
        # zarr 3 notes that consolidated metadata is not (yet) in the v3 spec; xarray and zarr
        # read it all the same, and it is what silences xarray's warning on open.
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(group.store)


def restore_mask(a: Any) -> Any:
    """An ice mask as icemap writes it (uint8: 1 ice, 0 not, 255 nodata), lazily.

    A mask read by plain ``xr.open_zarr`` is float with NaN where the store holds 255; any
    other array is returned unchanged.
    """
    if not np.issubdtype(a.dtype, np.floating):
        return a
    attrs = dict(a.attrs)
    out = a.fillna(255).astype(np.uint8)
    out.attrs = attrs
    return out
