"""Spectral indices and the NDSI ice mask.

Three layers, as in flox: a kernel of :mod:`icemap.kernels` does the arithmetic on plain arrays,
blockwise to dask arrays by ``xarray.apply_ufunc(dask="parallelized")``, wrapped by functions
that take and return cubes. The same code path serves numpy-backed and dask-backed cubes, so
lazy and eager results are equal by construction, and the graph grows by one task per chunk.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import dask.array as da
import numpy as np
import xarray as xr

from icemap.dem import dem_on_grid, resolve_dem_href, slope_degrees
from icemap.errors import BandError, IcemapError
from icemap.guards import guard_attrs, ice_kernel, required_inputs, resolve_guards
from icemap.interop import keep_grid
from icemap.kernels import ICE_NODATA, normalized_difference
from icemap.options import resolve

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

    from icemap.dem import DemSource
    from icemap.guards import Guard

__all__ = [
    "normalized_difference",
    "ndsi",
    "ndwi",
    "ice_mask",
    "ndsi_and_ice_mask",
    "ICE_NODATA",
]

def _reflectance(cube: Any) -> Any:
    if isinstance(cube, xr.Dataset):
        if "reflectance" not in cube:
            raise IcemapError("the dataset has no 'reflectance' variable; open it with icemap.open_cube")
        return cube["reflectance"]
    if isinstance(cube, xr.DataArray):
        return cube
    raise IcemapError(f"expected an xarray cube (Dataset or DataArray), got {type(cube).__name__}")


def _band(refl: Any, name: str) -> Any:
    bands = [str(b) for b in refl["band"].values]
    if name not in bands:
        raise BandError(
            f"the cube has no {name!r} band (it has {', '.join(bands)}); ingest it with --bands {name} ..."
        )
    return refl.sel(band=name, drop=True)


#: Attributes of the index products.
_ND_ATTRS = {
    "ndsi": {"long_name": "normalised difference snow index", "units": "1", "valid_range": [-1.0, 1.0]},
    "ndwi": {"long_name": "normalised difference water index", "units": "1", "valid_range": [-1.0, 1.0]},
}


def _apply(kernel: Any, inputs: Sequence[Any], dtype: Any, out: np.ndarray | None = None) -> Any:
    """The dask/xarray layer of this module's kernels: one task per chunk, or straight into ``out``.

    Without ``out``: ``xarray.apply_ufunc(dask="parallelized")``, lazy for lazy cubes (one task
    per chunk), one kernel call for in-memory cubes.

    With ``out`` (a numpy array of the result's shape and dtype, e.g. a buffer reused across
    dates or regions): computed now, each task running the kernel *into its own slice of out*.
    Computing a dask result and then ``.values`` costs two more passes over memory that the
    kernel does not need: every chunk is allocated (page faults on a fresh buffer) and then
    copied by the final concatenation; here nothing is allocated and nothing is copied. Runs on
    local threads (the destination is this process's memory), whatever scheduler is active.
    """
    if out is None:
        return xr.apply_ufunc(kernel, *inputs, dask="parallelized", output_dtypes=[dtype], keep_attrs=False)
    arrays = xr.broadcast(*inputs)
    template = arrays[0]
    data = [a.transpose(*template.dims).data for a in arrays]
    if not isinstance(out, np.ndarray) or out.shape != template.shape or out.dtype != np.dtype(dtype):
        raise IcemapError(f"out= must be a numpy {np.dtype(dtype)} array of shape {template.shape} "
                          f"{template.dims}, got {getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
    lazy = [d for d in data if isinstance(d, da.Array)]
    if not lazy:
        kernel(*data, out=out)
    else:
        chunks = lazy[0].chunks
        blocks = [d.rechunk(chunks) if isinstance(d, da.Array) else da.from_array(d, chunks=chunks) for d in data]

        def into(*b: np.ndarray, block_info: dict[Any, Any] | None = None) -> np.ndarray:
            if block_info is None:  # dask passes it: the keyword is in the signature
                raise RuntimeError("dask called the block writer without block_info")
            where = tuple(slice(lo, hi) for lo, hi in block_info[0]["array-location"])
            kernel(*b, out=out[where])
            return np.zeros((1,) * out.ndim, np.int8)

        # An explicit name: dask would otherwise hash ``out`` (the whole buffer) to name the graph.
        done = da.map_blocks(into, *blocks, dtype=np.int8, chunks=tuple((1,) * len(c) for c in chunks),
                             name=f"icemap-into-{uuid.uuid4().hex}", meta=np.empty((0,) * out.ndim, np.int8))
        done.compute(scheduler="threads")
    return xr.DataArray(out, dims=template.dims, coords=template.coords)


def _index(cube: xr.Dataset | xr.DataArray, a: str, b: str, name: str, out: np.ndarray | None = None,
           undefined: float = np.nan) -> xr.DataArray:
    refl = _reflectance(cube)
    kernel = normalized_difference if np.isnan(undefined) else functools.partial(normalized_difference,
                                                                                  undefined=float(undefined))
    res = _apply(kernel, [_band(refl, a), _band(refl, b)], np.float32, out)
    res.name = name
    res.attrs = dict(_ND_ATTRS[name])
    return _keep_grid(res, refl)


def _keep_grid(out: xr.DataArray, like: xr.Dataset | xr.DataArray) -> xr.DataArray:
    if "spatial_ref" in like.coords and "spatial_ref" not in out.coords:
        out = out.assign_coords(spatial_ref=like["spatial_ref"])

    return keep_grid(out, like)


def ndsi(cube: xr.Dataset | xr.DataArray, *, out: np.ndarray | None = None, undefined: float = np.nan) -> xr.DataArray:
    """Normalised Difference Snow Index ``(green - swir16) / (green + swir16)``, lazily.

    Negative reflectances count as 0. NaN where either band is NaN (masked); ``undefined``
    (NaN by default) where both are at or below zero, so the ratio is 0/0. Snow and ice are
    high (> 0.4 in the literature), but so is water: see :func:`ice_mask`'s guards. With
    ``out`` (a float32 numpy array of shape (time, y, x)), computed now straight into it: the
    fast way to get an index in memory, see :func:`_apply`.
    """
    return _index(cube, "green", "swir16", "ndsi", out, undefined)


def ndwi(cube: xr.Dataset | xr.DataArray, *, out: np.ndarray | None = None, undefined: float = np.nan) -> xr.DataArray:
    """McFeeters' Normalised Difference Water Index ``(green - nir08) / (green + nir08)``; as :func:`ndsi`."""
    return _index(cube, "green", "nir08", "ndwi", out, undefined)


def _ice_block(
    *arrays: np.ndarray, names: tuple[str, ...], threshold: float, guards: tuple[Any, ...], with_ndsi: bool,
    out: np.ndarray | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """apply_ufunc adapter: positional blocks -> :func:`icemap.guards.ice_kernel`'s mapping.

    With ``with_ndsi`` the same pass also fills the NDSI, returned first.
    """
    named = dict(zip(names, arrays))
    if not with_ndsi:
        return ice_kernel(named, threshold, guards, out=out)
    index = np.empty(np.broadcast_shapes(named["green"].shape, named["swir16"].shape), np.float32)
    ice = ice_kernel(named, threshold, guards, ndsi_out=index)
    return index, ice


def _dem_inputs(dem: Any, refl: Any, need: tuple[str, ...]) -> dict[str, Any]:
    """Elevation and/or slope on the cube grid, chunked like the cube's y/x blocks."""
    chunks = None
    if refl.chunks is not None:
        chunks = (refl.chunks[refl.dims.index("y")], refl.chunks[refl.dims.index("x")])
    on_grid = (
        isinstance(dem, xr.DataArray)
        and dem.dims == ("y", "x")
        and dem.sizes["y"] == refl.sizes["y"]
        and dem.sizes["x"] == refl.sizes["x"]
        and np.array_equal(dem["y"].values, refl["y"].values)
        and np.array_equal(dem["x"].values, refl["x"].values)
        and dem.rio.crs is not None
        and dem.rio.crs == refl.rio.crs
    )
    if on_grid:
        # Already on the grid (e.g. from dem_on_grid): reuse it, only align the blocks.
        elevation = dem.astype(np.float32)
        if chunks is not None:
            elevation = elevation.chunk({"y": chunks[0], "x": chunks[1]})
    else:
        elevation = dem_on_grid(dem, refl, chunks=chunks)
    out: dict[str, Any] = {}
    if "elevation" in need:
        out["elevation"] = elevation.drop_vars("spatial_ref", errors="ignore")
    if "slope" in need:
        out["slope"] = slope_degrees(elevation).drop_vars("spatial_ref", errors="ignore")
    return out


def ice_mask(
    cube: xr.Dataset | xr.DataArray,
    method: Literal["ndsi"] = "ndsi",
    threshold: float | None = None,
    guards: Sequence[str | Guard] = (),
    dem: DemSource | None = None,
    out: np.ndarray | None = None,
    **guard_params: float | None,
) -> xr.DataArray:
    """Map ice as uint8: 1 ice, 0 not ice, :data:`ICE_NODATA` (255) where the input is masked.

    NDSI alone also flags water, cloud shadow and other dark pixels (METHOD.md); the optional
    ``guards`` veto those pixels using absolute reflectance and terrain (see
    :mod:`icemap.guards` for the tests, their defaults and the false positives they remove on
    real data). The threshold and all guards run in one numpy kernel per chunk
    (:func:`icemap.guards.ice_kernel` through ``apply_ufunc(dask="parallelized")``), so the
    result is lazy for a lazy cube and equal to the eager result chunk for chunk.

    Parameters
    ----------
    cube
        A cube from :func:`icemap.open_cube` or :func:`icemap.load`, or a reflectance DataArray
        (time, band, y, x) with ``band`` labelled by common names.
    method
        ``"ndsi"`` (thresholded NDSI).
    threshold
        NDSI threshold; pixels with NDSI >= threshold are ice. Default 0.4.
    guards
        Any of ``"water"`` (needs the ``nir08`` band), ``"dark"`` and ``"dem"`` (needs
        ``dem``), or :class:`icemap.guards.Guard` instances. Empty (the default) is plain NDSI.
    dem
        Elevation for the ``"dem"`` guard: a GeoTIFF/COG path, a STAC item/asset, or a
        DataArray; warped onto the cube grid by :func:`icemap.dem.dem_on_grid` unless it is
        already on it.
    out
        A uint8 numpy array of the result's shape (time, y, x): compute now, straight into it
        (no allocation, no final copy; see :func:`_apply`). Default: lazy.
    **guard_params
        Parameters of the enabled guards: ``ndwi_max``, ``nir_min`` (water), ``green_min``
        (dark), ``elevation_min_m``, ``slope_max_deg`` (dem).

    Returns
    -------
    xarray.DataArray
        ``ice`` (time, y, x) uint8, with the method, threshold, guards and every guard
        parameter in its attrs, so a stored product says how it was made.

    Raises
    ------
    IcemapError
        For an unknown method, guard or guard parameter, a threshold outside [-1, 1], or the
        ``"dem"`` guard without a DEM. :class:`~icemap.errors.BandError` when the cube lacks a
        band that the NDSI or a guard needs.
    """
    ice: xr.DataArray = _ice(cube, method, threshold, guards, dem, guard_params, with_ndsi=False, out=out)
    return ice


def ndsi_and_ice_mask(
    cube: xr.Dataset | xr.DataArray,
    threshold: float | None = None,
    guards: Sequence[str | Guard] = (),
    dem: DemSource | None = None,
    **guard_params: float | None,
) -> tuple[xr.DataArray, xr.DataArray]:
    """:func:`ndsi` and :func:`ice_mask` from one kernel pass per chunk.

    A job that writes both products would otherwise read the bands and compute the index twice
    per chunk; here one task computes both (dask splits its two outputs without copying).
    Parameters as :func:`ice_mask`.
    """
    both: tuple[xr.DataArray, xr.DataArray] = _ice(cube, "ndsi", threshold, guards, dem, guard_params, with_ndsi=True,
                                                   out=None)
    return both


def _ice(cube: xr.Dataset | xr.DataArray, method: str, threshold: float | None, guards: Sequence[str | Guard],
         dem: DemSource | None,
         guard_params: dict[str, Any], *, with_ndsi: bool, out: np.ndarray | None) -> Any:
    if method != "ndsi":
        raise IcemapError(f"unknown method {method!r}; use 'ndsi' (the U-Net runs through icemap.predict)")
    if threshold is not None and not -1.0 <= float(threshold) <= 1.0:
        raise IcemapError(f"an NDSI threshold lies in [-1, 1], got {threshold}")
    t = float(resolve("ndsi_threshold", None if threshold is None else float(threshold)))
    resolved = resolve_guards(guards, **guard_params)
    need = required_inputs(resolved)
    if any(k in ("elevation", "slope") for k in need) and dem is None:
        raise IcemapError(
            "the 'dem' guard needs a DEM: pass dem=<GeoTIFF/COG path, STAC item or DataArray>"
        )
    if dem is not None and not any(g.name == "dem" for g in resolved):
        raise IcemapError("a DEM was given but the 'dem' guard is not enabled; add it to guards=(...)")

    refl = _reflectance(cube)
    inputs: dict[str, Any] = {"green": _band(refl, "green"), "swir16": _band(refl, "swir16")}
    for key in need:
        if key not in ("elevation", "slope"):
            inputs[key] = _band(refl, key)
    if dem is not None:
        inputs.update(_dem_inputs(dem, refl, need))
    names = tuple(inputs)
    kernel = functools.partial(_ice_block, names=names, threshold=t, guards=resolved, with_ndsi=with_ndsi)
    # One kernel for the threshold and every guard: one task per chunk in the graph.
    if with_ndsi:
        index, ice = xr.apply_ufunc(kernel, *inputs.values(), dask="parallelized", output_core_dims=[[], []],
                                    output_dtypes=[np.float32, np.uint8], keep_attrs=False)
    else:
        index, ice = None, _apply(kernel, list(inputs.values()), np.uint8, out)
    ice.name = "ice"
    ice.attrs = {
        "long_name": "ice mask",
        "flag_values": [0, 1],
        "flag_meanings": "no_ice ice",
        "nodata": int(ICE_NODATA),
        "method": method,
        "threshold": t,
        **guard_attrs(resolved),
    }
    if dem is not None and not isinstance(dem, xr.DataArray):
        ice.attrs["guard_dem_source"] = resolve_dem_href(dem)
    ice = _keep_grid(ice, refl)
    if not with_ndsi:
        return ice
    index.name = "ndsi"
    index.attrs = dict(_ND_ATTRS["ndsi"])
    return _keep_grid(index, refl), ice
