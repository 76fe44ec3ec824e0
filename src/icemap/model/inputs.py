"""Network inputs as named channel sets, built lazily from a cube.

A channel is a cube band (``green``, ``swir16``...), an index (``ndsi``, ``ndwi``) or terrain
(``elevation``, ``slope`` from a DEM on the cube grid). Study a's five input combinations and
study b's 6-5-2 composite are available by name. Training and inference build their inputs
with the same function, so a model always sees what it was trained on.

This module needs no torch: it runs on the client while graphs are built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from icemap.dem import dem_on_grid, slope_degrees
from icemap.errors import ModelError
from icemap.index import ndsi, ndwi
from icemap.kernels import normalise_channels

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

    from icemap.dem import DemSource


__all__ = ["CHANNEL_SETS", "DERIVED_CHANNELS", "resolve_channels", "required_bands", "check_bands", "build_inputs",
           "Normalisation", "normalise"]

_ALL_BANDS = ("coastal", "blue", "green", "red", "nir08", "swir16", "swir22", "lwir11")

#: Named input combinations. Study a (METHOD.md): all bands + DEM, all bands, B3 + B6, NDSI,
#: NDSI + DEM. Study b: OLI bands 6-5-2.
CHANNEL_SETS: dict[str, tuple[str, ...]] = {
    "all_bands_dem": (*_ALL_BANDS, "elevation"),
    "all_bands": _ALL_BANDS,
    "b3_b6": ("green", "swir16"),
    "ndsi": ("ndsi",),
    "ndsi_dem": ("ndsi", "elevation"),
    "b6_b5_b2": ("swir16", "nir08", "blue"),
    # The reflective bands only: what a default `icemap ingest` cube holds.
    "reflective": _ALL_BANDS[:-1],
    "reflective_ndsi": (*_ALL_BANDS[:-1], "ndsi"),
}

#: Value of an index channel where the ratio is 0/0 (both bands clipped to 0): the ratio's limit
#: along equal bands (see :func:`icemap.kernels.normalized_difference`).
_UNDEFINED_INDEX = 0.0

#: Channels computed from bands or a DEM, with what they need.
DERIVED_CHANNELS: dict[str, tuple[str, ...]] = {
    "ndsi": ("green", "swir16"),
    "ndwi": ("green", "nir08"),
    "elevation": (),
    "slope": (),
}


def resolve_channels(spec: str | Sequence[str]) -> tuple[str, ...]:
    """A channel-set name (``"b3_b6"``), a comma-separated list, or a sequence of channels."""
    if isinstance(spec, str):
        if spec in CHANNEL_SETS:
            return CHANNEL_SETS[spec]
        spec = [s for s in spec.replace(",", " ").split() if s]
    channels = tuple(spec)
    if not channels:
        raise ModelError("no input channels given; name a set such as " + ", ".join(CHANNEL_SETS))
    known = set(_ALL_BANDS) | set(DERIVED_CHANNELS)
    unknown = [c for c in channels if c not in known]
    if unknown:
        raise ModelError(
            f"unknown input channel(s) {unknown}; channels are bands ({', '.join(_ALL_BANDS)}), "
            f"{', '.join(DERIVED_CHANNELS)}, or a set: {', '.join(CHANNEL_SETS)}"
        )
    if len(set(channels)) != len(channels):
        raise ModelError(f"channels {channels} list one channel twice")
    return channels


def required_bands(channels: Sequence[str]) -> tuple[str, ...]:
    """Cube bands the channels are built from, in a stable order."""
    need: list[str] = []
    for c in channels:
        for b in DERIVED_CHANNELS.get(c, (c,)):
            if b in _ALL_BANDS and b not in need:
                need.append(b)
    return tuple(need)


def needs_dem(channels: Sequence[str]) -> bool:
    return any(c in ("elevation", "slope") for c in channels)


def check_bands(refl: xr.DataArray, channels: Sequence[str]) -> None:
    """Raise a clear error if the reflectance lacks a band the channels are built from."""
    have = [str(b) for b in refl["band"].values]
    missing = [b for b in required_bands(channels) if b not in have]
    if missing:
        raise ModelError(
            f"the cube lacks band(s) {missing} that the inputs {list(channels)} need; it has "
            f"{have}. Ingest with --bands {','.join(sorted(set(have) | set(missing)))}"
        )


def build_inputs(cube: xr.Dataset | xr.DataArray, channels: Sequence[str], *,
                 dem: DemSource | None = None) -> xr.DataArray:
    """Stack the channels as a lazy float32 DataArray (time, channel, y, x) on the cube grid.

    Parameters
    ----------
    cube
        A cube (``reflectance`` with a ``band`` coordinate).
    channels
        From :func:`resolve_channels`.
    dem
        DEM file, DataArray on the cube grid, or anything :func:`icemap.dem.dem_on_grid`
        takes; needed for ``elevation``/``slope``.
    """
    refl = cube["reflectance"] if isinstance(cube, xr.Dataset) else cube
    check_bands(refl, channels)
    terrain: dict[str, Any] = {}
    if needs_dem(channels):
        if dem is None:
            raise ModelError(f"inputs {list(channels)} include terrain: pass a DEM (dem=... / --dem)")

        elevation = dem if isinstance(dem, xr.DataArray) and dem.sizes.get("x") == refl.sizes["x"] else dem_on_grid(dem, refl)
        terrain = {"elevation": elevation, "slope": slope_degrees(elevation)}
    layers = []
    for c in channels:
        # An index is 0 where both its bands are at or below 0 (deep shadow, atmospheric
        # over-correction): the pixel is measured, so it is mapped, not nodata. Only a masked
        # (NaN) band makes a pixel nodata; negative bands go to the network as they are.
        if c == "ndsi":
            layer = ndsi(cube, undefined=_UNDEFINED_INDEX)
        elif c == "ndwi":
            layer = ndwi(cube, undefined=_UNDEFINED_INDEX)
        elif c in terrain:
            layer = terrain[c].broadcast_like(refl.isel(band=0, drop=True))
        else:
            layer = refl.sel(band=c, drop=True)
        layers.append(layer.astype(np.float32).drop_vars([v for v in layer.coords if v not in ("time", "y", "x")]))
    stacked = xr.concat(layers, dim="channel").assign_coords(channel=list(channels))
    return stacked.transpose("time", "channel", "y", "x")


class Normalisation:
    """Per-channel scaling to roughly [0, 1]: ``(x - lo) / (hi - lo)``, stored with a model.

    ``method="minmax"`` uses the training chips' minimum and maximum (study a);
    ``"percentile"`` the 1st and 99th percentiles, robust to a few extreme pixels.
    """

    def __init__(self, lo: Sequence[float], hi: Sequence[float], method: str = "minmax") -> None:
        self.lo = np.asarray(lo, dtype=np.float32)
        self.hi = np.asarray(hi, dtype=np.float32)
        if self.lo.shape != self.hi.shape:
            raise ModelError("normalisation lo/hi have different lengths")
        self.method = method

    @classmethod
    def fit(cls, samples: np.ndarray, method: str = "minmax") -> Normalisation:
        """From training data ``(N, C, H, W)`` (NaN ignored)."""
        flat = np.moveaxis(samples, 1, 0).reshape(samples.shape[1], -1)
        if method == "minmax":
            lo, hi = np.nanmin(flat, axis=1), np.nanmax(flat, axis=1)
        elif method == "percentile":
            lo, hi = np.nanpercentile(flat, 1, axis=1), np.nanpercentile(flat, 99, axis=1)
        else:
            raise ModelError(f"normalisation must be 'minmax' or 'percentile', not {method!r}")
        hi = np.where(hi > lo, hi, lo + 1)  # constant channels: avoid dividing by zero
        return cls(lo, hi, method)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "lo": self.lo.tolist(), "hi": self.hi.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalisation:
        return cls(d["lo"], d["hi"], d.get("method", "minmax"))


def normalise(x: np.ndarray, norm: Normalisation, channel_axis: int = -3) -> tuple[np.ndarray, np.ndarray]:
    """Normalise ``x`` and fill NaN with 0; return ``(filled, nodata)``.

    ``nodata`` is True where any channel was NaN: those pixels are restored as nodata in the
    output. The fill is per pixel, so a pixel's value never depends on where a tile starts.
    """
    return normalise_channels(x, norm.lo, norm.hi, channel_axis)
