"""Spectral indices and the NDSI ice mask.

Three layers, as in flox: a numpy kernel that does the arithmetic on plain arrays, applied
blockwise to dask arrays by ``xarray.apply_ufunc(dask="parallelized")``, wrapped by functions
that take and return cubes. The same code path serves numpy-backed and dask-backed cubes, so
lazy and eager results are equal by construction, and the graph grows by one task per chunk.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from icemap.errors import BandError, IcemapError

__all__ = [
    "normalized_difference",
    "ndsi",
    "ndwi",
    "ice_mask",
    "ICE_NODATA",
    "DEFAULT_NDSI_THRESHOLD",
]

#: Value of ``ice`` where the input was nodata (cloud, fill...). 0 = no ice, 1 = ice.
ICE_NODATA = np.uint8(255)
#: The literature default; studies a and b found 0.2 and 0.1 best on their scenes (METHOD.md).
DEFAULT_NDSI_THRESHOLD = 0.4


def normalized_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(a - b) / (a + b)`` in float32, robust to the quirks of surface reflectance.

    Negative reflectances (atmospheric over-correction in dark pixels) are clipped to 0
    before the ratio, so the result stays within [-1, 1]; where both are 0 the ratio is
    undefined and NaN is returned, as for NaN inputs.
    """
    a = np.clip(np.asarray(a, dtype=np.float32), 0, None)
    b = np.clip(np.asarray(b, dtype=np.float32), 0, None)
    denom = a + b
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (a - b) / denom
    out[~(denom > 0)] = np.nan
    return out.astype(np.float32, copy=False)


def _reflectance(cube: Any) -> Any:
    import xarray as xr

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


def _index(cube: Any, a: str, b: str, name: str, long_name: str) -> Any:
    import xarray as xr

    refl = _reflectance(cube)
    out = xr.apply_ufunc(
        normalized_difference,
        _band(refl, a),
        _band(refl, b),
        dask="parallelized",
        output_dtypes=[np.float32],
        keep_attrs=False,
    )
    out.name = name
    out.attrs = {"long_name": long_name, "units": "1", "valid_range": [-1.0, 1.0]}
    return _keep_grid(out, refl)


def _keep_grid(out: Any, like: Any) -> Any:
    if "spatial_ref" in like.coords and "spatial_ref" not in out.coords:
        out = out.assign_coords(spatial_ref=like["spatial_ref"])
    crs = getattr(like.rio, "crs", None) if hasattr(like, "rio") else None
    if crs is not None:
        out = out.rio.write_crs(crs)
    return out


def ndsi(cube: Any) -> Any:
    """Normalised Difference Snow Index ``(green - swir16) / (green + swir16)``, lazily.

    NaN where either band is NaN (masked) or both are zero. Snow and ice are high (> 0.4
    in the literature), but so is water: see :func:`ice_mask`'s guards.
    """
    return _index(cube, "green", "swir16", "ndsi", "normalised difference snow index")


def ndwi(cube: Any) -> Any:
    """McFeeters' Normalised Difference Water Index ``(green - nir08) / (green + nir08)``."""
    return _index(cube, "green", "nir08", "ndwi", "normalised difference water index")


def _threshold_kernel(index: np.ndarray, threshold: float) -> np.ndarray:
    out = np.where(index >= threshold, np.uint8(1), np.uint8(0))
    out[np.isnan(index)] = ICE_NODATA
    return out


def ice_mask(cube: Any, method: str = "ndsi", threshold: float | None = None) -> Any:
    """Map ice as uint8: 1 ice, 0 not ice, :data:`ICE_NODATA` (255) where the input is masked.

    Parameters
    ----------
    cube
        A cube from :func:`icemap.open_cube` or :func:`icemap.load`.
    method
        ``"ndsi"`` (thresholded NDSI).
    threshold
        NDSI threshold; pixels with NDSI >= threshold are ice. Default 0.4.
    """
    import xarray as xr

    if method != "ndsi":
        raise IcemapError(f"unknown method {method!r}; use 'ndsi' (the U-Net runs through icemap.predict)")
    t = DEFAULT_NDSI_THRESHOLD if threshold is None else float(threshold)
    if not -1.0 <= t <= 1.0:
        raise IcemapError(f"an NDSI threshold lies in [-1, 1], got {t}")
    index = ndsi(cube)
    ice = xr.apply_ufunc(_threshold_kernel, index, t, dask="parallelized", output_dtypes=[np.uint8])
    ice.name = "ice"
    ice.attrs = {
        "long_name": "ice mask",
        "flag_values": [0, 1],
        "flag_meanings": "no_ice ice",
        "nodata": int(ICE_NODATA),
        "method": method,
        "threshold": t,
    }
    return _keep_grid(ice, _reflectance(cube))
