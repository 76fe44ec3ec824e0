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

CF metadata is added to every store when it is written (:func:`cf_attrs`): ``Conventions``,
units and standard names on ``x``/``y``, ``flag_values``/``flag_meanings`` (or ``flag_masks``)
on the flag and mask variables. Integer variables (``qa_pixel``, ``ice``, ``clear_count``,
``complete``, ``filled``) carry no CF ``_FillValue``: CF decoding would turn them into float
with NaN (and break bitwise QA tests), although their "fill" is a value with a meaning
(255 = nodata is one of the mask's flags). They stay integers in a plain ``xr.open_zarr``.
:func:`restore_mask` still turns a mask of an older store (float with NaN) back.

Attributes netCDF cannot hold (dicts, booleans, None, lists of strings) are stored as JSON
strings, their names listed in the ``icemap:json`` attribute (:func:`encode_attrs`), so that
``to_netcdf`` works on an opened store; icemap's readers decode them back (:func:`decode_attrs`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import fsspec
import numpy as np
import zarr
from rioxarray.exceptions import RioXarrayError

from icemap.errors import StoreError
from icemap.kernels import ICE_NODATA

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

_XrObj = TypeVar("_XrObj", "xr.Dataset", "xr.DataArray")

__all__ = ["cf_attrs", "decode_attrs", "encode_attrs", "finish_store", "keep_grid", "resolve_store", "restore_mask",
           "zarr_options"]

#: Media type of a Zarr store (STAC asset ``type``).
ZARR = "application/vnd+zarr"

#: The CF conventions the stores follow.
CONVENTIONS = "CF-1.8"

#: Attribute listing the attributes stored as JSON text (comma-separated).
JSON_ATTR = "icemap:json"

# Landsat Collection 2 QA_PIXEL bits 0-7 (USGS LSDS-1619); higher bits are confidence pairs.
_QA_BITS = ("fill", "dilated_cloud", "cirrus", "cloud", "cloud_shadow", "snow", "clear", "water")

#: CF flag attributes of icemap's flag and mask variables (nodata is a flag of its own: these
#: variables carry no _FillValue, so plain readers keep them integer). The ice mask's nodata
#: value, :data:`icemap.kernels.ICE_NODATA`, is added in :func:`_flags` (the kernel layer loads
#: numba, which reading a store does not need).
_FLAGS: dict[str, dict[str, Any]] = {
    "ice": {"flag_values": [0, 1], "flag_meanings": "no_ice ice no_data"},
    "complete": {"flag_values": [0, 1], "flag_meanings": "incomplete complete"},
    "filled": {"flag_values": [0, 1], "flag_meanings": "observed filled"},
    "qa_pixel": {"flag_masks": [1 << i for i in range(len(_QA_BITS))], "flag_meanings": " ".join(_QA_BITS)},
}


def _flags() -> dict[str, dict[str, Any]]:
    """:data:`_FLAGS` with the ice mask's nodata value among its ``flag_values``."""
    ice = _FLAGS["ice"]
    return {**_FLAGS, "ice": {**ice, "flag_values": [*ice["flag_values"], int(ICE_NODATA)]}}

#: Coordinates that must come back as coordinates under ``decode_coords=True``.
_GLOBAL_COORDS = ("spatial_ref",)


def zarr_options(storage_options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``storage_options`` as ``zarr.open_group`` takes them: a dict (callers may hand any mapping)."""
    return None if storage_options is None else dict(storage_options)


def finish_store(path: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Name the CRS coordinate for plain readers and consolidate the metadata (v2 or v3)."""
    group = zarr.open_group(path, mode="r+", storage_options=zarr_options(storage_options), use_consolidated=False)
    present = [c for c in _GLOBAL_COORDS if c in group]
    if present:
        group.attrs["coordinates"] = " ".join(present)
    with warnings.catch_warnings():
        # zarr 3 notes that consolidated metadata is not (yet) in the v3 spec; xarray and zarr
        # read it all the same, and it is what silences xarray's warning on open.
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(group.store)


def restore_mask(a: _XrObj) -> _XrObj:
    """An ice mask as icemap writes it (uint8: 1 ice, 0 not, 255 nodata), lazily.

    A mask read by plain ``xr.open_zarr`` is float with NaN where the store holds 255; any
    other array is returned unchanged.
    """
    if not np.issubdtype(a.dtype, np.floating):
        return a

    attrs = dict(a.attrs)
    out = a.fillna(int(ICE_NODATA)).astype(np.uint8)
    out.attrs = attrs
    return out


def cf_attrs(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with the CF attributes of a store: ``Conventions``, ``x``/``y`` and flag variables.

    ``x``/``y`` get ``units`` and ``standard_name`` from the CRS (``projection_x_coordinate``
    in metres for a projected CRS, longitude/latitude in degrees otherwise), which QGIS,
    GDAL and cf-xarray read.
    """
    ds = ds.copy()
    crs = ds.rio.crs
    if crs is not None and not crs.is_geographic:
        unit = (crs.linear_units or "metre").lower()
        units = "m" if unit in ("metre", "meter", "m") else unit
        for dim, axis in (("x", "X"), ("y", "Y")):
            if dim in ds.coords:
                ds[dim].attrs.update({"standard_name": f"projection_{dim}_coordinate", "units": units,
                                      "axis": axis, "long_name": f"{dim} coordinate of projection"})
    elif crs is not None:
        for dim, name, units, axis in (("x", "longitude", "degrees_east", "X"), ("y", "latitude", "degrees_north", "Y")):
            if dim in ds.coords:
                ds[dim].attrs.update({"standard_name": name, "units": units, "axis": axis, "long_name": name})
    if "time" in ds.coords:
        ds["time"].attrs.update({"standard_name": "time", "axis": "T"})
    for name, flags in _flags().items():
        if name in ds.data_vars and np.issubdtype(ds[name].dtype, np.integer):
            ds[name].attrs.update(flags)
    ds.attrs = {**ds.attrs, "Conventions": CONVENTIONS}
    return ds


def _needs_json(value: Any) -> bool:
    if isinstance(value, (dict, bool, np.bool_)) or value is None:
        return True
    if isinstance(value, (list, tuple)):
        return not value or not all(
            isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) for v in value)
    return False


def encode_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes that netCDF (and every Zarr reader) can hold: the others as JSON text.

    Their names are listed in ``icemap:json`` so that :func:`decode_attrs` restores exactly
    those; a string attribute that merely looks like JSON is left alone.
    """
    out: dict[str, Any] = {}
    encoded = [str(k) for k in attrs.get(JSON_ATTR, "").split(",") if k] if isinstance(attrs.get(JSON_ATTR), str) else []
    for key, value in attrs.items():
        if key == JSON_ATTR:
            continue
        if _needs_json(value):
            out[key] = json.dumps(value, default=str)
            encoded.append(key)
        else:
            out[key] = value
    encoded = [k for k in dict.fromkeys(encoded) if k in out]
    if encoded:
        out[JSON_ATTR] = ",".join(encoded)
    return out


def decode_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Undo :func:`encode_attrs`: the attributes named in ``icemap:json`` as Python values."""
    out = dict(attrs)
    names = out.pop(JSON_ATTR, None)
    if not isinstance(names, str):
        return out
    for key in names.split(","):
        if isinstance(out.get(key), str):
            try:
                out[key] = json.loads(out[key])
            except ValueError:  # written by someone else: leave the text as it is
                pass
    return out


def _url(path: str) -> bool:
    return "://" in path


def resolve_store(path: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The Zarr store a STAC Item (``*.json``) describes, by its ``application/vnd+zarr`` asset;
    any other path is returned unchanged."""
    if not path.rstrip("/").lower().endswith(".json"):
        return path

    try:
        with fsspec.open(path, "r", **dict(storage_options or {})) as f:
            item = json.load(f)
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read the STAC Item {path}: {exc}") from None
    assets = item.get("assets") if isinstance(item, dict) else None
    zarr_assets = [a for a in (assets or {}).values()
                   if isinstance(a, dict) and str(a.get("type", "")).startswith(ZARR) and a.get("href")]
    if not zarr_assets:
        raise StoreError(f"{path} is not a STAC Item with a Zarr asset (type {ZARR}); give the cube's Item "
                         "written by icemap, or the store itself")
    href = str(zarr_assets[0]["href"])
    if _url(href) or os.path.isabs(href):
        return href
    if _url(path):
        return path.rsplit("/", 1)[0] + "/" + href.removeprefix("./")
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), href))


def keep_grid(out: _XrObj, like: xr.Dataset | xr.DataArray) -> _XrObj:
    """``out`` on ``like``'s grid: its CRS and its transform, written on a shallow copy.

    The transform is copied, not left to be recomputed from coordinates: a grid one pixel
    wide or high has no coordinate spacing, and rioxarray then cannot tell its resolution (pixel
    areas, bounds and STAC footprints of such products failed or came out as 1 m). In place on a
    shallow copy: rioxarray's default deep-copies the data (a full pass over an in-memory result).
    """
    crs = like.rio.crs if hasattr(like, "rio") else None
    if crs is None:
        return out
    out = out.copy(deep=False)
    out.rio.write_crs(crs, inplace=True)
    try:
        transform = like.rio.transform(recalc=True)
    except RioXarrayError:  # a one-pixel grid that never knew its transform: nothing to copy
        return out
    out.rio.write_transform(transform, inplace=True)
    return out
