"""Elevation on the cube grid: read a DEM, warp it onto the image pixels, derive slope.

Study (a) uses a DEM (ASTER/SRTM/Copernicus 30 m) as an extra channel resampled to the image
grid, and the ``dem`` guard of :func:`icemap.index.ice_mask` needs elevation and slope at every
image pixel. DEMs come in their own CRS (SRTM and Copernicus DEM tiles are in EPSG:4326 at 1 or
3 arc-seconds), so they are warped, not just cropped.

Warping is bilinear: elevation is continuous and nearest-neighbour resampling of a coarser DEM
onto 30 m pixels makes terraces whose steps show up as bogus slopes. Each dask block reads only
the part of the source it needs through a GDAL ``WarpedVRT``, so a continental COG can serve a
small region and a large region is never warped in one piece.
"""

from __future__ import annotations

import os
import posixpath
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

import dask.array as da
import numpy as np
import rasterio
import rioxarray  # noqa: F401  (registers .rio)
import xarray as xr
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from icemap import kernels
from icemap.errors import IcemapError
from icemap.labels import grid_of

if TYPE_CHECKING:  # pragma: no cover
    import pystac
    import xarray as xr

    #: A DEM as icemap takes it: a GeoTIFF/COG path or URL, a STAC item or asset, or elevations on a grid.
    DemSource: TypeAlias = str | os.PathLike[str] | pystac.Item | pystac.Asset | xr.DataArray

__all__ = ["dem_on_grid", "slope_degrees", "resolve_dem_href", "DEM_ASSET_KEYS"]

#: Asset keys tried, in order, when a STAC item is given as the DEM source (Copernicus DEM items
#: on Planetary Computer and Earth Search use "data"; some catalogs use "elevation" or "dem").
DEM_ASSET_KEYS = ("elevation", "data", "dem")

#: SRTM and several other int16 DEMs mark voids with -32768 without declaring a nodata value.
_INT16_VOID = -32768


def resolve_dem_href(source: str | os.PathLike[str] | pystac.Item | pystac.Asset | Mapping[str, Any]) -> str:
    """The file path or URL of a DEM given as a path, a STAC item or a STAC asset.

    Parameters
    ----------
    source
        A path or URL; a STAC item (dict or ``pystac.Item``) with an asset named in
        :data:`DEM_ASSET_KEYS`; or a single asset dict with an ``href``. Relative hrefs are
        resolved against the item's ``self`` link, as STAC specifies.
    """
    if hasattr(source, "to_dict") and not isinstance(source, Mapping):
        source = source.to_dict()
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if not isinstance(source, Mapping):
        raise IcemapError(
            f"a DEM is a file path, a STAC item or asset dict, or an xarray DataArray; got "
            f"{type(source).__name__}"
        )
    if "assets" in source:
        assets = source["assets"] or {}
        key = next((k for k in DEM_ASSET_KEYS if k in assets), None)
        if key is None:
            raise IcemapError(
                f"the STAC item {source.get('id', '?')!r} has no DEM asset; looked for "
                f"{', '.join(DEM_ASSET_KEYS)}, it has {', '.join(assets) or 'none'}"
            )
        href = assets[key].get("href")
        self_href = next(
            (lk.get("href") for lk in source.get("links", []) if lk.get("rel") == "self"), None
        )
    elif "href" in source:
        href, self_href = source["href"], None
    else:
        raise IcemapError("a DEM dict must be a STAC item (with 'assets') or an asset (with 'href')")
    if not href:
        raise IcemapError("the DEM asset has no href")
    href = str(href)
    if self_href and not urllib.parse.urlparse(href).scheme and not os.path.isabs(href):
        base = str(self_href)
        if urllib.parse.urlparse(base).scheme in ("http", "https", "s3", "gs"):
            href = urllib.parse.urljoin(base, href)
        else:
            base = base[7:] if base.startswith("file://") else base
            href = posixpath.normpath(posixpath.join(posixpath.dirname(base), href))
    return href


def _target_grid(like: Any) -> tuple[Any, tuple[int, int], Any, Any, Any]:
    """Transform, shape, CRS, y/x coordinates and spatial chunks of the cube grid."""
    if not isinstance(like, (xr.Dataset, xr.DataArray)):
        raise IcemapError(f"'like' must be an xarray cube or DataArray, got {type(like).__name__}")
    ref = like["reflectance"] if isinstance(like, xr.Dataset) and "reflectance" in like else like
    if "x" not in ref.dims or "y" not in ref.dims:
        raise IcemapError("'like' needs x and y dimensions")
    transform, shape, crs = grid_of(like)
    chunks = None
    if getattr(ref, "chunks", None) and isinstance(ref, xr.DataArray) and ref.chunks is not None:
        chunks = (ref.chunks[ref.dims.index("y")], ref.chunks[ref.dims.index("x")])
    return transform, shape, crs, (like["y"], like["x"]), chunks


def _warp_block(
    block: np.ndarray,
    href: str,
    dst_crs: Any,
    dst_transform: Any,
    resampling: str,
    block_info: dict[Any, Any] | None = None,
) -> np.ndarray:
    """Warp the part of the DEM under one output block (y0:y1, x0:x1) of the target grid."""
    if block_info is None:  # dask's meta probe
        return np.empty(block.shape, dtype=np.float32)
    info = block_info[None]
    (y0, y1), (x0, x1) = info["array-location"]
    height, width = info["shape"]
    with rasterio.open(href) as src:
        src_nodata = src.nodata
        if src_nodata is None and src.dtypes[0] == "int16":
            src_nodata = _INT16_VOID
        with WarpedVRT(
            src,
            crs=dst_crs,
            transform=dst_transform,
            width=width,
            height=height,
            resampling=Resampling[resampling],
            src_nodata=src_nodata,
            nodata=np.nan,
            dtype="float32",
        ) as vrt:
            out = vrt.read(1, window=Window(x0, y0, x1 - x0, y1 - y0), masked=True)
    return np.ma.filled(out.astype(np.float32), np.nan)


def dem_on_grid(
    dem: DemSource,
    like: xr.Dataset | xr.DataArray,
    *,
    resampling: str = "bilinear",
    chunks: tuple[Any, Any] | int | None = None,
) -> xr.DataArray:
    """A DEM warped onto the grid of a cube: float32 metres, NaN outside the DEM, CRS set.

    Parameters
    ----------
    dem
        A GeoTIFF/COG path or URL, a STAC item or asset (see :func:`resolve_dem_href`), or an
        xarray DataArray with a CRS (e.g. from ``rioxarray.open_rasterio``).
    like
        The cube (Dataset from :func:`icemap.open_cube`/:func:`icemap.load`) or any DataArray
        with ``x``/``y`` coordinates and a CRS, whose grid the result takes.
    resampling
        A :class:`rasterio.enums.Resampling` name. Bilinear by default: smooth elevation, and
        thus sensible slopes, from a coarser DEM.
    chunks
        Spatial chunks of the result: ``(y_chunks, x_chunks)`` or one edge length. Default: the
        cube's own spatial chunks when it is dask-backed (so the DEM lines up block for block
        with the image), else one eager numpy array.

    Returns
    -------
    xarray.DataArray
        ``elevation`` (y, x) float32 on ``like``'s pixel-centre coordinates, lazily (one GDAL
        warp per block, reading only the source window it needs) when chunked.
    """
    if resampling not in Resampling.__members__:
        raise IcemapError(f"unknown resampling {resampling!r}; use one of {', '.join(Resampling.__members__)}")
    transform, (h, w), crs, (ycoord, xcoord), like_chunks = _target_grid(like)
    if chunks is None:
        chunks = like_chunks
    elif isinstance(chunks, int):
        chunks = (chunks, chunks)

    if isinstance(dem, xr.DataArray):
        if dem.rio.crs is None:
            raise IcemapError("the DEM DataArray has no CRS; set it with .rio.write_crs(...)")
        src = dem.squeeze(drop=True) if "band" in dem.dims else dem
        src = src.astype(np.float32)
        nodata = src.rio.nodata
        if nodata is not None and not np.isnan(nodata):
            src = src.where(src != nodata)
        src = src.rio.write_nodata(np.nan, encoded=False)
        target = xr.DataArray(np.empty((h, w), np.float32), dims=("y", "x"),
                              coords={"y": ycoord.values, "x": xcoord.values})
        target = target.rio.write_crs(crs).rio.write_transform(transform)
        warped = src.rio.reproject_match(target, resampling=Resampling[resampling], nodata=np.nan)
        data: Any = np.asarray(warped.values, dtype=np.float32)
        if chunks is not None:
            data = da.from_array(data, chunks=chunks)
        source = "DataArray"
    else:
        href = resolve_dem_href(dem)

        try:
            with rasterio.open(href) as src_ds:
                if src_ds.crs is None:
                    raise IcemapError(f"the DEM {href} has no CRS; it cannot be placed on the cube grid")
        except rasterio.errors.RasterioIOError as exc:
            raise IcemapError(f"cannot open the DEM {href}: {exc}") from None
        blocks = da.empty((h, w), chunks=chunks if chunks is not None else (h, w), dtype=np.float32)
        data = blocks.map_blocks(_warp_block, href, crs, transform, resampling, dtype=np.float32)
        if chunks is None:
            data = data.compute(scheduler="synchronous")
        source = href

    out = xr.DataArray(data, dims=("y", "x"), coords={"y": ycoord.values, "x": xcoord.values},
                       name="elevation")
    out = out.rio.write_crs(crs).rio.write_transform(transform)
    out = out.rio.write_nodata(np.nan, encoded=False)
    out.attrs.update({"long_name": "elevation", "units": "m", "source": str(source),
                      "resampling": resampling})
    return out


def _slope_kernel(z: np.ndarray, dy: float, dx: float) -> np.ndarray:
    if z.shape[0] < 2 or z.shape[1] < 2:
        raise IcemapError(f"slope needs at least 2 x 2 pixels, got a block of {z.shape}")
    return kernels.slope_degrees(z, dy, dx)


def slope_degrees(dem_grid: xr.DataArray) -> xr.DataArray:
    """Slope in degrees (0 flat, 90 vertical) of a DEM on a projected grid, lazily if chunked.

    Central differences (``numpy.gradient``) over the grid spacing in x and y, one-sided at the
    edges; NaN next to missing elevations. Dask-backed DEMs are processed with a 1-pixel
    ``map_overlap`` so that block edges get the same central differences as the inside, i.e.
    chunked == whole.

    Parameters
    ----------
    dem_grid
        From :func:`dem_on_grid`: (y, x) elevation in metres with a projected CRS in metres.
    """
    crs = dem_grid.rio.crs
    if crs is None or not crs.is_projected:
        raise IcemapError("slope needs a DEM on a projected grid in metres; use dem_on_grid first")
    if crs.linear_units_factor[1] != 1.0:
        raise IcemapError(f"slope needs a CRS in metres, this one is in {crs.linear_units_factor[0]}")
    t = dem_grid.rio.transform(recalc=True)
    if t.b != 0 or t.d != 0:
        raise IcemapError("slope needs a north-up grid (no rotation in the transform)")
    dx, dy = abs(t.a), abs(t.e)
    z = dem_grid.data
    if isinstance(z, da.Array):
        # depth 1 and no padding at the outer border: inner block edges see their neighbours,
        # outer edges fall back to one-sided differences exactly as numpy does on the whole.
        slope = z.map_overlap(_slope_kernel, depth=1, boundary="none", dy=dy, dx=dx,
                              dtype=np.float32)
    else:
        slope = _slope_kernel(np.asarray(z), dy, dx)
    out = dem_grid.copy(data=slope)
    out.name = "slope"
    out.attrs = {"long_name": "terrain slope", "units": "degree"}
    return out.rio.write_nodata(np.nan, encoded=False)
