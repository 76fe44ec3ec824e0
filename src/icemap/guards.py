"""Guards against the known false positives of the NDSI ice mask.

NDSI = (green - swir16) / (green + swir16) is high for snow and ice because ice absorbs strongly
in the short-wave infrared. It is also high for anything that is dark in the SWIR relative to
green: open water (which absorbs the SWIR and most of the NIR), cloud shadow over dark ground,
and very dark pixels where a little green and almost no SWIR make a large ratio out of noise
(METHOD.md, "Known failure modes"). A ratio cannot tell these apart from ice; absolute
reflectance and terrain can. Each guard below is one such test. It only ever turns a pixel that
NDSI calls ice into "not ice" (or into nodata when its own inputs are missing); it never adds
ice. Every guard is optional, because each one costs some real ice somewhere (see the notes of
each), and the tests measure both sides on real data.

The guards are declarative: frozen dataclasses holding the parameters (with the literature or
physical reasoning for each default). The arithmetic lives in the kernel layer:
:func:`icemap.kernels.ice_mask` applies the NDSI threshold and every guard's parameters in ONE
fused pass per pixel, which :func:`icemap.index.ice_mask` applies blockwise with
``xarray.apply_ufunc(dask="parallelized")``, so adding guards adds inputs to the one task per
chunk, never extra tasks or temporaries.

Measured in tests/test_guards.py: share of pixels that NDSI >= 0.4 calls ice, alone and with the
default guards. The first four rows are real negative controls (no ice anywhere); the sample
region rows compare with its truth rasters (3 dates, QA masking off so that shadows stay in):

=====================================  ==========  ========  ========  ========
pixels                                 NDSI alone  + water   + dark    + both
=====================================  ==========  ========  ========  ========
Liverpool L8 (sea, estuary; 115611)    0.742       0.00003   0.0000    0.0000
Landsat-5 chip, cloud shadow           0.327       0.127     0.0007    0.0006
Landsat-5 chip, water                  0.281       0.076     0.024     0.015
Sentinel-2 chip, water                 0.224       0.005     0.002     0.002
sample region, lake pixels             0.870       0.000     0.079     0.000
sample region, sunlit ice (recall)     0.968       0.964     0.967     0.964
sample region, ice in cloud shadow     0.933       0.102     0.142     0.102
=====================================  ==========  ========  ========  ========

The last row is the price: ice under cloud shadow is as dark as water and shadowed forest.
QA_PIXEL masks cloud shadow by default on load, so in the default pipeline those pixels are
nodata anyway; the guards then catch the shadows Fmask misses.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

from icemap import kernels
from icemap.errors import IcemapError

__all__ = [
    "Guard",
    "WaterGuard",
    "DarkGuard",
    "DemGuard",
    "GUARDS",
    "resolve_guards",
    "required_inputs",
    "ice_kernel",
    "guard_attrs",
]


def _check_number(name: str, value: float | None, lo: float, hi: float) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise IcemapError(f"guard parameter {name} must be a number or None, got {value!r}")
    if not (lo <= float(value) <= hi) or math.isnan(float(value)):
        raise IcemapError(f"guard parameter {name} must lie in [{lo}, {hi}], got {value}")


@dataclass(frozen=True)
class Guard:
    """Base of all guards: a named, parametrised test that vetoes NDSI ice pixels.

    Subclasses set :attr:`name` (what users pass in ``guards=``) and :attr:`inputs` (the arrays
    the kernel needs: band common names, or ``"elevation"``/``"slope"`` from the DEM); their
    fields are keyword parameters of :func:`icemap.kernels.ice_mask`, which applies them. Where
    an input a guard needs is missing (NaN), the guard cannot vouch for an NDSI ice pixel, which
    therefore becomes nodata rather than ice: a guard that silently passed pixels it could not
    test would make the mask depend on which band happened to be masked.
    """

    name: ClassVar[str] = ""
    inputs: ClassVar[tuple[str, ...]] = ()

    def kernel_params(self) -> dict[str, float | None]:
        """Keyword arguments of :func:`icemap.kernels.ice_mask` (None = criterion off)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def params_inputs(self) -> tuple[str, ...]:
        """The inputs that the active criteria (those not None) actually read."""
        return self.inputs

    def params(self) -> dict[str, float]:
        """The guard's parameters that are set (None = criterion off), for attrs and reports."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: float(v) for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class WaterGuard(Guard):
    """Open water: NIR below ``nir_min`` (and, optionally, NDWI above ``ndwi_max``) -> not ice.

    Water is the largest NDSI false positive (74 % of the Liverpool crop, a quarter of the water
    pixels of the ukis chips): it absorbs the SWIR completely, so its NDSI is high, but it also
    absorbs the NIR, where glacier ice still reflects about a third of the light.

    Parameters
    ----------
    ndwi_max
        Pixels with ``(green - nir08) / (green + nir08) > ndwi_max`` are water. Default None
        (off). McFeeters (1996) uses NDWI > 0 for water, but snow and ice are positive too;
        textbook clean-ice spectra (green ~0.48 / NIR ~0.30) give 0.23, yet real bare summer
        ice is darker in the NIR: on the Athabasca tongue (HLS, 2020-08-16) a 0.4 cut removed
        9 % of the NDSI-ice pixels inside the outline (median green 0.35, NIR 0.13, NDWI ~0.45)
        while the NIR test alone already caught every water pixel of the negative controls
        (docs/ndsi-results.md). Set it (e.g. 0.5) for turbid lakes whose NIR is lifted above
        ``nir_min`` by sediment, after checking bare ice keeps below it on your scenes.
    nir_min
        Pixels with NIR reflectance below ``nir_min`` are water. Default 0.11, the NIR test of
        the SNOMAP/MOD10 snow algorithm (Hall, Riggs & Salomonson 1995; Hall et al. 2002), made
        for exactly this confusion. Clean ice reflects ~0.25-0.4 in the NIR, water 0.01-0.06.

    Notes
    -----
    Cost: ice in deep shadow (cloud shadow, or terrain shade with only diffuse light) drops below
    0.11 in the NIR and is removed too. In the sample region that is ice under cloud shadow, which
    QA_PIXEL masks by default anyway.
    Either criterion can be switched off with None; not both.
    """

    name: ClassVar[str] = "water"
    inputs: ClassVar[tuple[str, ...]] = ("green", "nir08")

    ndwi_max: float | None = None
    nir_min: float | None = 0.11

    def __post_init__(self) -> None:
        _check_number("ndwi_max", self.ndwi_max, -1.0, 1.0)
        _check_number("nir_min", self.nir_min, 0.0, 2.0)
        if self.ndwi_max is None and self.nir_min is None:
            raise IcemapError("the water guard needs ndwi_max or nir_min (or both); both are None")

    def params_inputs(self) -> tuple[str, ...]:
        return ("green", "nir08") if self.ndwi_max is not None else ("nir08",)


@dataclass(frozen=True)
class DarkGuard(Guard):
    """Dark pixels: green reflectance below ``green_min`` -> not ice.

    In dark pixels (cloud shadow over forest, shaded water, terrain shadow) both green and SWIR
    are a few percent, so noise and residual atmospheric effects produce large NDSI values. Ice
    that is lit is bright in the visible.

    Parameters
    ----------
    green_min
        Default 0.15. Glacier ice albedo is 0.34-0.51 clean, 0.26-0.33 slightly dirty and
        0.15-0.25 dirty (Cuffey & Paterson 2010, table 5.2); its green reflectance is above its
        broadband albedo (ice is brightest in the visible), so sunlit clean-to-dirty ice stays
        above 0.15. The MOD10 snow algorithm's visible test uses 0.10 (Hall et al. 2002), which
        is more permissive: on the Landsat-5 ukis chip it leaves 2.8 % of the cloud-shadow
        pixels flagged, against 0.07 % at 0.15.

    Notes
    -----
    Cost: ice in cloud shadow or deep terrain shade (diffuse light only, ~15-30 % of the direct
    light) falls below the threshold and is removed; study (a) filled such pixels by
    inverse-distance weighting instead. Measured on the sample region in tests/test_guards.py.
    """

    name: ClassVar[str] = "dark"
    inputs: ClassVar[tuple[str, ...]] = ("green",)

    green_min: float = 0.15

    def __post_init__(self) -> None:
        if self.green_min is None:
            raise IcemapError("the dark guard needs green_min; leave the guard out to switch it off")
        _check_number("green_min", self.green_min, 0.0, 2.0)


@dataclass(frozen=True)
class DemGuard(Guard):
    """Terrain: elevation below ``elevation_min_m`` or slope above ``slope_max_deg`` -> not ice.

    Parameters
    ----------
    elevation_min_m
        No ice below this elevation (metres, the DEM's datum). Default None (off): the right
        value is regional, e.g. the lowest terminus in the region's glacier inventory (RGI
        ``Zmin``) minus a margin. It removes sea, lowland lakes and salt flats (the salars of
        the Dry Andes lie at 2300-4000 m, its glaciers above ~5000 m). It cannot remove
        proglacial lakes, which lie at the glacier termini by definition.
    slope_max_deg
        No ice on slopes steeper than this (degrees, from the DEM on the cube grid). Default 60:
        snow and ice avalanche off steeper faces, so NDSI ice there is mostly snow dust or
        shadowed rock; hanging glaciers reach ~50-60°, and a 30-90 m DEM smooths slopes further,
        so the default is deliberately permissive.

    Notes
    -----
    Needs a DEM (``ice_mask(..., dem=...)``), resampled onto the cube grid by
    :func:`icemap.dem.dem_on_grid`. Pixels outside the DEM become nodata, not ice.
    """

    name: ClassVar[str] = "dem"
    inputs: ClassVar[tuple[str, ...]] = ("elevation", "slope")

    elevation_min_m: float | None = None
    slope_max_deg: float | None = 60.0

    def __post_init__(self) -> None:
        _check_number("elevation_min_m", self.elevation_min_m, -500.0, 9000.0)
        _check_number("slope_max_deg", self.slope_max_deg, 0.0, 90.0)
        if self.elevation_min_m is None and self.slope_max_deg is None:
            raise IcemapError("the dem guard needs elevation_min_m or slope_max_deg; both are None")

    def params_inputs(self) -> tuple[str, ...]:
        out = []
        if self.elevation_min_m is not None:
            out.append("elevation")
        if self.slope_max_deg is not None:
            out.append("slope")
        return tuple(out)



#: The guards users can name, in the order ice_mask applies and reports them.
GUARDS: dict[str, type[Guard]] = {g.name: g for g in (WaterGuard, DarkGuard, DemGuard)}


def resolve_guards(guards: Iterable[str | Guard] | str | None, **params: Any) -> tuple[Guard, ...]:
    """Turn guard names (or instances) plus flat keyword parameters into guard objects.

    Parameters
    ----------
    guards
        Names from :data:`GUARDS` (``"water"``, ``"dark"``, ``"dem"``) or Guard instances.
        A single string is accepted as one name.
    **params
        Parameters of the named guards by field name (``ndwi_max=0.3``, ``green_min=0.1``...).
        Keyword names are unique across guards, so they need no guard prefix.

    Raises
    ------
    IcemapError
        For an unknown guard name, a guard given twice, a parameter that no guard has, or one
        that belongs to a guard that is not enabled (a silent no-op would hide a typo).
    """
    if guards is None:
        guards = ()
    if isinstance(guards, (str, Guard)):
        guards = (guards,)
    owner: dict[str, str] = {}
    for gname, cls in GUARDS.items():
        for f in fields(cls):
            owner[f.name] = gname
    for key in params:
        if key not in owner:
            raise IcemapError(
                f"unknown guard parameter {key!r}; valid: "
                + ", ".join(f"{k} ({g})" for k, g in owner.items())
            )
    out: list[Guard] = []
    from_names: set[str] = set()
    for g in guards:
        if isinstance(g, Guard):
            if type(g) not in GUARDS.values():
                raise IcemapError(
                    f"{type(g).__name__} is not one of icemap's guards ({', '.join(GUARDS)}): guards are "
                    "parameters of the fused ice kernel (icemap.kernels.ice_mask), not code; use those"
                )
            obj = g
        elif isinstance(g, str) and g in GUARDS:
            obj = GUARDS[g](**{k: v for k, v in params.items() if owner[k] == g})
            from_names.add(g)
        else:
            raise IcemapError(f"unknown guard {g!r}; valid guards: {', '.join(GUARDS)}")
        if any(o.name == obj.name for o in out):
            raise IcemapError(f"guard {obj.name!r} given twice")
        out.append(obj)
    enabled = {o.name for o in out}
    for key in params:
        if owner[key] not in enabled:
            raise IcemapError(
                f"parameter {key!r} belongs to the {owner[key]!r} guard, which is not enabled; "
                f"add it to guards=(...)"
            )
        if owner[key] not in from_names:
            raise IcemapError(
                f"parameter {key!r} given as a keyword and the {owner[key]!r} guard as an "
                "instance; set it on the instance"
            )
    # Apply in the canonical order so the attrs and the result do not depend on the order given.
    order = list(GUARDS)
    return tuple(sorted(out, key=lambda o: order.index(o.name)))


def required_inputs(guards: Sequence[Guard]) -> tuple[str, ...]:
    """The arrays :func:`ice_kernel` needs for these guards besides green and swir16, in order."""
    need: list[str] = []
    for g in guards:
        for key in g.params_inputs():
            if key not in ("green", "swir16") and key not in need:
                need.append(key)
    return tuple(need)


def ice_kernel(
    arrays: Mapping[str, np.ndarray],
    threshold: float,
    guards: Sequence[Guard] = (),
    *,
    out: np.ndarray | None = None,
    ndsi_out: np.ndarray | None = None,
) -> np.ndarray:
    """NDSI threshold plus guards on plain numpy arrays: uint8 1 ice, 0 not, 255 nodata.

    Parameters
    ----------
    arrays
        ``green`` and ``swir16`` surface reflectance, plus whatever the guards need (``nir08``,
        ``elevation``, ``slope``), all broadcastable to one shape.
    threshold
        NDSI >= threshold is ice before the guards.
    guards
        From :func:`resolve_guards`.
    out
        Optional uint8 buffer for the result (may be a slice of a larger array).
    ndsi_out
        Optional float32 buffer that receives the NDSI from the same pass.

    Returns
    -------
    numpy.ndarray
        uint8. 255 where NDSI is undefined (NaN input, or green + swir16 = 0), and where NDSI
        says ice but no guard rejected the pixel and some guard's input is missing.
        A pixel one guard rejects is 0 even if another guard could not be evaluated.
    """
    params: dict[str, Any] = {}
    for g in guards:
        params.update(g.kernel_params())
    return kernels.ice_mask(
        arrays["green"], arrays["swir16"], threshold,
        nir08=arrays.get("nir08"), elevation=arrays.get("elevation"), slope=arrays.get("slope"),
        out=out, ndsi_out=ndsi_out, **params,
    )


def guard_attrs(guards: Sequence[Guard]) -> dict[str, Any]:
    """Attributes recording the guards and their parameters (flat, netCDF/Zarr friendly)."""
    attrs: dict[str, Any] = {"guards": [g.name for g in guards]}
    for g in guards:
        for key, value in g.params().items():
            attrs[f"guard_{g.name}_{key}"] = value
    return attrs
