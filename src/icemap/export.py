"""Write products to files that other tools read: Cloud-Optimized GeoTIFFs.

A Cloud-Optimized GeoTIFF (COG) is an ordinary GeoTIFF laid out so that a reader can fetch one
tile or one overview level with a single HTTP range request: internal tiling, internal overviews
and the image file directory at the start of the file. Every raster icemap writes (the sample
region, ice maps, NDSI products) goes through :func:`write_cog`, so they all open the same way in
QGIS, GDAL, rasterio, stackstac and titiler.

Files are written atomically: GDAL writes a temporary file in the destination folder, which is
renamed over the destination only once it is complete. A crash or a full disk therefore never
leaves a truncated file under the final name, which matters because other steps (and reruns)
treat an existing file as done.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import rasterio
import xarray as xr
from affine import Affine
from rasterio.crs import CRS

from icemap._atomic import atomic_path
from icemap._version import __version__
from icemap.describe import describe_cog
from icemap.errors import IcemapError
from icemap.kernels import ICE_NODATA

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

__all__ = ["write_cog", "export_geotiffs", "ICE_COLORMAP"]

#: Colour table of ice-mask COGs (uint8): QGIS and GDAL show the classes without styling.
#: 0 no ice (grey), 1 ice (blue), 255 nodata (transparent).
ICE_COLORMAP: dict[int, tuple[int, int, int, int]] = {
    0: (200, 200, 200, 255), 1: (0, 114, 178, 255), int(ICE_NODATA): (0, 0, 0, 0)}

#: GDAL's tile sizes must be multiples of 16.
_MIN_COG_TILE = 128
_TILE_MULTIPLE = 16


def _as_affine(transform: Affine | Sequence[float]) -> Affine:
    if isinstance(transform, Affine):
        return transform
    values = tuple(float(v) for v in transform)
    # A 9-element sequence is a full 3x3 affine matrix; its last row is (0, 0, 1).
    if len(values) not in (6, 9):
        raise ValueError(
            "transform must be an affine.Affine or the six numbers (a, b, c, d, e, f) "
            f"of one (as in STAC proj:transform); got {len(values)} numbers"
        )
    return Affine(*values[:6])


def _effective_blocksize(blocksize: int, height: int, width: int) -> int:
    """Shrink the tile size for small arrays so that at least one overview level exists.

    GDAL's COG driver builds overviews only until they fit in one tile; an array no larger than
    a tile would get none, and readers that ask for a coarse level would then read it whole.
    """
    largest = max(height, width)
    size = blocksize
    # GDAL's COG driver refuses tiles under 128 px (it warns and falls back), so stop there.
    while size > _MIN_COG_TILE and size * 2 > largest:
        size //= 2
    size = max(_MIN_COG_TILE, size)
    return size - size % _TILE_MULTIPLE


def write_cog(
    path: str | os.PathLike[str],
    array: np.ndarray,
    *,
    transform: Affine | Sequence[float],
    crs: str | int | CRS,
    nodata: float | int | None = None,
    band_names: Sequence[str] | None = None,
    overview_resampling: Literal["average", "nearest"] = "average",
    blocksize: int = 256,
    tags: Mapping[str, Any] | None = None,
    colormap: Mapping[int, tuple[int, int, int, int]] | None = None,
) -> Path:
    """Write a 2-D or (band, y, x) array as a Cloud-Optimized GeoTIFF, atomically.

    Parameters
    ----------
    path
        Destination file. Its folder must exist; an existing file is replaced only once the new
        one is complete.
    array
        Pixel values, shape ``(y, x)`` or ``(band, y, x)``. The dtype is kept (booleans are
        written as uint8), so pass the dtype the file should have.
    transform
        Pixel-to-map affine transform: an :class:`affine.Affine` or its six numbers
        ``(a, b, c, d, e, f)`` as in STAC ``proj:transform``.
    crs
        Anything :meth:`rasterio.crs.CRS.from_user_input` understands (``"EPSG:32719"``, 32719,
        WKT, a CRS object).
    nodata
        Value that marks missing pixels, recorded in the file so readers mask it (and so that
        averaged overviews ignore it). ``None`` records none.
    band_names
        One description per band (e.g. STAC common names), shown by GDAL and QGIS.
    overview_resampling
        ``"average"`` for continuous quantities (reflectance, elevation, fractions);
        ``"nearest"`` for categories and bit fields (classes, QA bands, ids), where averaging
        would invent values that mean something else.
    blocksize
        Tile size in pixels, a multiple of 16. It is reduced for arrays too small to have at
        least one overview level otherwise, but never below 128 (GDAL's COG minimum).
    tags
        Dataset metadata (GDAL tags), e.g. ``TIFFTAG_DATETIME`` and provenance; values are
        written as text.
    colormap
        Colour table of band 1 (``{value: (r, g, b, alpha)}``), for single-band uint8 rasters.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    ValueError
        For an array that is not 2-D or 3-D, a band-name count that does not match, an unknown
        resampling or a tile size that GDAL cannot use.
    """
    path = Path(path)
    data = _cog_data(array, band_names)
    _check_cog_settings(path, overview_resampling, blocksize)
    profile = _cog_profile(data, transform=transform, crs=crs, nodata=nodata, blocksize=blocksize,
                           overview_resampling=overview_resampling)
    # The temporary name starts with a dot and ends in .tmp so that globbing for *.tif never
    # picks up a half-written file, and it lives in the same folder so the rename is atomic.
    with atomic_path(path, suffix="") as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data)
        if band_names is not None:
            for i, name in enumerate(band_names, start=1):
                dst.set_band_description(i, str(name))
        if tags:
            dst.update_tags(**{str(k): str(v) for k, v in tags.items()})
        if colormap is not None:
            dst.write_colormap(1, dict(colormap))
    return path


def _cog_data(array: np.ndarray, band_names: Sequence[str] | None) -> np.ndarray:
    """The pixels as a non-empty (band, y, x) array (booleans as uint8) matching the band names."""
    data = np.asarray(array)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if data.ndim == 2:
        data = data[np.newaxis]
    elif data.ndim != 3:
        raise ValueError(f"array must be 2-D (y, x) or 3-D (band, y, x), got shape {data.shape}")
    count, height, width = data.shape
    if count == 0 or height == 0 or width == 0:
        raise ValueError(f"array has an empty dimension: shape {data.shape}")
    if band_names is not None and len(band_names) != count:
        raise ValueError(f"got {len(band_names)} band names for {count} bands")
    return data


def _check_cog_settings(path: Path, overview_resampling: str, blocksize: int) -> None:
    """Check the resampling, the tile size and the destination folder before anything is written."""
    if overview_resampling not in ("average", "nearest"):
        raise ValueError(
            f"overview_resampling must be 'average' or 'nearest', not {overview_resampling!r}"
        )
    if blocksize < _TILE_MULTIPLE or blocksize % _TILE_MULTIPLE:
        raise ValueError(f"blocksize must be a positive multiple of 16, not {blocksize}")
    if not path.parent.is_dir():
        raise ValueError(
            f"folder {path.parent} does not exist; create it before writing {path.name}"
        )


def _cog_profile(data: np.ndarray, *, transform: Affine | Sequence[float], crs: str | int | CRS,
                 nodata: float | int | None, blocksize: int, overview_resampling: str) -> dict[str, Any]:
    """The rasterio profile of the COG: grid, dtype, nodata and GDAL's COG creation options."""
    count, height, width = data.shape
    return {
        "driver": "COG",
        "width": width,
        "height": height,
        "count": count,
        "dtype": data.dtype.name,
        "crs": CRS.from_user_input(crs),
        "transform": _as_affine(transform),
        "nodata": nodata,
        # COG creation options: DEFLATE with the predictor suited to the dtype (GDAL picks
        # horizontal differencing for integers, floating-point prediction for floats).
        "BLOCKSIZE": _effective_blocksize(blocksize, height, width),
        "COMPRESS": "DEFLATE",
        "PREDICTOR": "YES",
        "OVERVIEW_RESAMPLING": overview_resampling.upper(),
        "BIGTIFF": "IF_SAFER",
    }


def _nodata_for(var: Any) -> float | int | None:
    """Nodata of a product variable: its own ``nodata``/``_FillValue`` attr, else by dtype.

    uint8 products are ice masks (255 = undecided, :data:`icemap.index.ICE_NODATA`), floats use
    NaN; other integer types have no safe default, so nodata is left unset for them.
    """
    for key in ("nodata", "_FillValue"):
        if key in var.attrs and var.attrs[key] is not None:
            return var.attrs[key]
    if var.encoding.get("_FillValue") is not None:
        return var.encoding["_FillValue"]
    if var.dtype == np.uint8:
        return int(ICE_NODATA)
    if np.issubdtype(var.dtype, np.floating):
        return float("nan")
    return None


def _stamp(t: Any, all_times: Sequence[Any]) -> str:
    """``YYYY-MM-DD``, or the full time when two steps share a day (names must stay unique)."""
    day = str(np.datetime_as_string(np.datetime64(t, "D")))
    same_day = sum(str(np.datetime_as_string(np.datetime64(u, "D"))) == day for u in all_times)
    if same_day == 1:
        return day
    return str(np.datetime_as_string(np.datetime64(t, "s"))).replace(":", "")


def export_geotiffs(
    product_ds: xr.Dataset,
    folder: str | os.PathLike[str],
    variables: Sequence[str] = ("ice",),
    *,
    blocksize: int = 256,
    describe: bool = True,
    derived_from: Sequence[str | os.PathLike[str]] = (),
) -> list[Path]:
    """Write one Cloud-Optimized GeoTIFF per variable and time step (``ice_2021-02-12.tif``).

    Parameters
    ----------
    product_ds
        An ``xarray.Dataset`` (or a named DataArray) of products on the cube grid, each
        variable (time, y, x) or (y, x), with a CRS (``.rio.crs``).
    folder
        Output folder, created if missing.
    variables
        Variables to write. Each time step is computed on its own, so only one 2-D frame is in
        memory at a time.
    blocksize
        COG tile size (see :func:`write_cog`).
    describe
        Also write each file's STAC Item beside it (``ice_2021-02-12.tif.json``,
        :func:`icemap.describe.describe_cog`). A frame without a time (a 2-D product) gets
        none: a STAC Item needs a date.
    derived_from
        What the products came from (e.g. the product store's Item), linked from each Item.

    Returns
    -------
    list of pathlib.Path
        The files written, by variable then time.

    Notes
    -----
    Nodata is recorded in each file: the variable's ``nodata`` attribute if it has one, else
    255 for uint8 (ice masks) and NaN for floats. Integer variables get overviews by nearest
    neighbour (they are categories: averaging 0 and 1 would invent 0.5 that reads as a class),
    floats by averaging. A file name carries the day; two steps on one day get the full time.

    Each file carries GDAL tags: ``TIFFTAG_DATETIME`` and ``datetime`` (the time step, UTC),
    ``method``, ``threshold`` or ``model`` and ``model_sha256``, ``source_items`` (the item ids
    of the step), ``variable`` and ``icemap_version``; the band description is the variable's
    ``long_name``. An ice mask (uint8) also gets a colour table (:data:`ICE_COLORMAP`).
    """
    if isinstance(product_ds, xr.DataArray):
        if product_ds.name is None:
            raise IcemapError("a DataArray to export needs a name (it becomes the file prefix)")
        product_ds = product_ds.to_dataset()
    if not isinstance(product_ds, xr.Dataset):
        raise IcemapError(f"expected an xarray Dataset of products, got {type(product_ds).__name__}")
    if isinstance(variables, str):
        variables = (variables,)
    missing = [v for v in variables if v not in product_ds.data_vars]
    if missing:
        raise IcemapError(
            f"no variable {', '.join(map(repr, missing))} in the products; they have "
            f"{', '.join(map(str, product_ds.data_vars))}"
        )
    crs = product_ds.rio.crs
    if crs is None:
        raise IcemapError("the products have no CRS; write one with .rio.write_crs(...)")
    transform = product_ds.rio.transform(recalc=True)
    out_dir = Path(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    dated: list[Path] = []
    for name in variables:
        var = product_ds[name]
        extra = [d for d in var.dims if d not in ("time", "y", "x")]
        if extra or "y" not in var.dims or "x" not in var.dims:
            raise IcemapError(f"variable {name!r} has dims {var.dims}; expected (time, y, x) or (y, x)")
        nodata = _nodata_for(var)
        resampling: Literal["average", "nearest"] = (
            "nearest" if np.issubdtype(var.dtype, np.integer) or var.dtype == bool else "average"
        )
        times = list(var["time"].values) if "time" in var.dims else [None]
        colormap = ICE_COLORMAP if name == "ice" and var.dtype == np.uint8 else None
        for i, t in enumerate(times):
            frame = var.isel(time=i) if t is not None else var
            frame = frame.transpose("y", "x")
            fname = f"{name}_{_stamp(t, times)}.tif" if t is not None else f"{name}.tif"
            if t is not None:
                dated.append(out_dir / fname)
            paths.append(write_cog(out_dir / fname, np.asarray(frame.values), transform=transform,
                                   crs=crs, nodata=nodata, overview_resampling=resampling,
                                   blocksize=blocksize, tags=_cog_tags(product_ds, name, t, i),
                                   band_names=[str(var.attrs.get("long_name", name))], colormap=colormap))
    if describe:
        for p in dated:
            describe_cog(p, derived_from=derived_from)
    return paths


def _cog_tags(ds: Any, name: str, t: Any, i: int) -> dict[str, str]:
    """Provenance of one exported frame, as GDAL tags: date, method, threshold or model, items."""
    var = ds[name]
    tags: dict[str, str] = {"variable": name, "icemap_version": __version__}
    if t is not None:
        stamp = np.datetime64(t, "s").astype(object)
        tags["TIFFTAG_DATETIME"] = stamp.strftime("%Y:%m:%d %H:%M:%S")
        tags["datetime"] = stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
    for key in ("method", "threshold", "model", "model_sha256", "rule", "season"):
        value = var.attrs.get(key, ds.attrs.get(key))
        if value is not None:
            tags[key] = str(value)
    if "item_ids" in ds.coords and t is not None and "time" in ds["item_ids"].dims:
        tags["source_items"] = str(ds["item_ids"].values[i])
    return tags
