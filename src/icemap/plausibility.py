"""Is this reflectance? A cheap check of a cube's value range, made at ingest and at map time.

A cube read with the wrong scale or offset still maps, into something that cannot be right:
Landsat Collection 2 Level-2 read without its -0.2 offset makes every pixel 0.2 brighter, and
the U-Net then maps no ice at all; an offset applied twice (Sentinel-2 processing baseline
04.00's -0.1 on data that already has it) pushes a quarter of the values below 0. Real surface
and top-of-atmosphere reflectance has a dark end near 0 (water, shadow, the SWIR of snow), a
bright end near 1 (fresh snow, cloud), and few values far below 0. :func:`check_reflectance`
reads a small sample (one chunk of a few dates, never the whole cube), compares its darkest
and brightest percentiles with those bounds, and warns with
:class:`~icemap.errors.ImplausibleReflectanceWarning`, naming the measured percentiles and the
``--scale``/``--offset`` options (``scale=``/``offset=`` in Python) that fix it.

The bounds below were set on the real data in ``../shared/data`` (percentiles pooled over the
six common bands; docs/architecture.md, "Is it reflectance?", has the table): correctly scaled, the darkest 1 % lies
between -0.025 (HLS Athabasca, shadows) and +0.12 (a 100 % cloudy Antarctic Landsat scene
without cloud mask), the brightest 1 % between 0.32 (Liverpool, water and town) and 1.33
(Landsat snow), and at most 0.7 % of the values are below -0.05. Without the -0.2 offset the
same pixels have their darkest 1 % at 0.18-0.32; with the offset twice, 17-93 % of the values
are below -0.05.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import xarray as xr

from icemap.errors import ImplausibleReflectanceWarning

__all__ = ["DARK_PERCENTILE", "BRIGHT_PERCENTILE", "DARK_MAX", "BRIGHT_MAX", "BRIGHT_MIN", "NEGATIVE_VALUE",
           "NEGATIVE_SHARE_MAX", "ReflectanceRange", "assess_reflectance", "check_reflectance"]

# -- the bounds: what surface or TOA reflectance can be (measured values in the module docstring)
#: The dark end and the bright end are these percentiles of the valid values (all bands pooled):
#: robust to a few saturated or over-corrected pixels, and present in any scene with some water,
#: shadow or snow (snow is dark in SWIR).
DARK_PERCENTILE = 1.0
BRIGHT_PERCENTILE = 99.0
#: A dark end at or above this means an offset is missing: correctly scaled real scenes stay at
#: or below 0.12 (even all cloud, unmasked), the same pixels without Landsat's -0.2 offset are
#: at 0.18 or more.
DARK_MAX = 0.15
#: A bright end above this is no reflectance (fresh snow at low sun reaches about 1.3-1.5): a
#: scale missing or wrong (DN read as reflectance, 1e-4 instead of 2.75e-5).
BRIGHT_MAX = 2.0
#: A bright end below this is no scene either (even open water has 0.03-0.06 in blue): a scale
#: applied twice or far too small.
BRIGHT_MIN = 0.01
#: Values below NEGATIVE_VALUE are atmospheric over-correction in deep shadow: at most 0.7 % of
#: real values, 17-93 % when an offset is applied twice. NEGATIVE_SHARE_MAX sits between.
NEGATIVE_VALUE = -0.05
NEGATIVE_SHARE_MAX = 0.05
#: Fewer valid values than this say nothing (a date that is all cloud or fill in the sample).
MIN_VALUES = 1000
#: The sample: at most this many dates, spread over the cube, one spatial chunk (or window) of
#: each near its centre, thinned to about this many pixels per date.
MAX_DATES = 4
SAMPLE_PIXELS = 64 * 1024
#: Bands that are not reflectance (thermal, in kelvin) are left out.
_NOT_REFLECTANCE_PREFIX = "lwir"

_FIXES = {
    "scale-large": ("the values are far above 1 (digital numbers, or a scale too large)",
                    "give the scale that turns DNs into reflectance (Landsat C2 L2: 2.75e-05 with offset -0.2; "
                    "Sentinel-2 and HLS: 0.0001)"),
    "scale-small": ("every value is below 0.01 (a scale applied twice, or far too small)",
                    "give the scale that turns DNs into reflectance once (Landsat C2 L2: 2.75e-05; "
                    "Sentinel-2 and HLS: 0.0001)"),
    "offset-missing": ("the dark end is far above 0, where water, shadow and the SWIR of snow are (an offset "
                       "looks missing: Landsat C2 L2 read without its -0.2)",
                       "give the offset (Landsat C2 L2: --scale 2.75e-05 --offset -0.2)"),
    "offset-doubled": ("many values are well below 0 (an offset applied twice, e.g. Landsat's -0.2, or "
                       "Sentinel-2's -0.1 on data before processing baseline 04.00)",
                       "give the offset once (or --offset 0 where the files already hold reflectance)"),
}


@dataclass(frozen=True)
class ReflectanceRange:
    """The measured range of one date's sample and what it says.

    ``dark`` and ``bright`` are the :data:`DARK_PERCENTILE` and :data:`BRIGHT_PERCENTILE`
    percentiles of the valid values, ``negative_share`` the share below :data:`NEGATIVE_VALUE`,
    ``n`` the number of values; ``problem`` is None (plausible, or too few values to tell) or
    one of ``"scale-large"``, ``"scale-small"``, ``"offset-missing"``, ``"offset-doubled"``.
    """

    dark: float
    bright: float
    negative_share: float
    n: int
    problem: str | None
    time: str = ""

    def describe(self) -> str:
        where = f"{self.time}: " if self.time else ""
        return (f"{where}{DARK_PERCENTILE:g}st percentile {self.dark:.3f}, {BRIGHT_PERCENTILE:g}th {self.bright:.3f}, "
                f"{100 * self.negative_share:.1f} % below {NEGATIVE_VALUE:g} ({self.n} values)")


def assess_reflectance(values: Any, time: str = "") -> ReflectanceRange:
    """The range of a sample of reflectance values (any shape; NaN ignored) and its verdict."""
    v = np.asarray(values, dtype=np.float32).ravel()
    v = v[np.isfinite(v)]
    if v.size < MIN_VALUES:
        return ReflectanceRange(np.nan, np.nan, np.nan, int(v.size), None, time)
    dark, bright = (float(q) for q in np.percentile(v, [DARK_PERCENTILE, BRIGHT_PERCENTILE]))
    negative = float(np.count_nonzero(v < NEGATIVE_VALUE)) / v.size
    problem = None
    if bright > BRIGHT_MAX:
        problem = "scale-large"
    elif bright < BRIGHT_MIN:
        problem = "scale-small"
    elif dark >= DARK_MAX:
        problem = "offset-missing"
    elif negative >= NEGATIVE_SHARE_MAX:
        problem = "offset-doubled"
    return ReflectanceRange(dark, bright, negative, int(v.size), problem, time)


def _window(chunks: tuple[int, ...] | None, size: int) -> slice:
    """The chunk holding the axis' centre (dask), or a window of at most 512 around it."""
    centre = size // 2
    if chunks is None:
        half = min(size, 512) // 2
        return slice(max(0, centre - half), max(0, centre - half) + min(size, 512))
    edges = np.cumsum((0, *chunks))
    i = int(np.searchsorted(edges, centre, side="right")) - 1
    return slice(int(edges[i]), int(edges[i + 1]))


def _sample(cube: Any) -> list[tuple[str, np.ndarray]]:
    """One window of reflectance per sampled date: ``[(date, (band, y, x) values), ...]``."""
    refl = cube["reflectance"] if isinstance(cube, xr.Dataset) else cube
    if "band" in refl.dims:
        keep = [b for b in refl["band"].values if not str(b).startswith(_NOT_REFLECTANCE_PREFIX)]
        refl = refl.sel(band=keep)
    else:
        refl = refl.expand_dims("band")
    if "time" not in refl.dims:
        refl = refl.expand_dims("time")
    refl = refl.transpose("time", "band", "y", "x")
    nt, _, ny, nx = refl.shape
    if 0 in refl.shape:
        return []
    steps = np.unique(np.linspace(0, nt - 1, min(nt, MAX_DATES)).round().astype(int))
    data = refl.data
    lazy = hasattr(data, "dask")
    ys = _window(data.chunks[2] if lazy else None, ny)
    xs = _window(data.chunks[3] if lazy else None, nx)
    stride = max(1, int(np.sqrt((ys.stop - ys.start) * (xs.stop - xs.start) / SAMPLE_PIXELS)))
    pieces = [data[t, :, ys, xs][:, ::stride, ::stride] for t in steps]
    if lazy:
        pieces = list(dask.compute(*pieces))
    times = refl["time"].values if "time" in refl.coords else steps
    return [(str(times[t])[:10], np.asarray(p)) for t, p in zip(steps, pieces)]


def check_reflectance(cube: Any, *, where: str = "the cube", warn: bool = True,
                      stacklevel: int = 2) -> list[ReflectanceRange]:
    """Check that a cube holds reflectance; warn when its range says scale or offset are wrong.

    Reads one spatial chunk (or a window of at most 512 x 512 for a cube in memory) of up to
    :data:`MAX_DATES` dates spread over the cube, thinned to about :data:`SAMPLE_PIXELS` pixels
    each: a few chunk reads, whatever the cube's size. ``icemap ingest`` runs it on the store
    it wrote, ``icemap map`` (:func:`icemap.workflow.map_cube`) on the cube it maps, and
    :func:`icemap.predict` on cubes already in memory; call it yourself on a lazy cube before
    a long computation.

    Parameters
    ----------
    cube
        A cube (``reflectance`` with ``time``, ``band``, ``y``, ``x``) or its DataArray.
        Thermal bands (``lwir*``) are left out.
    where
        What the cube is, for the message (``"the cube s2.zarr"``).
    warn
        Emit one :class:`~icemap.errors.ImplausibleReflectanceWarning` for all implausible
        dates (else only return the ranges).

    Returns
    -------
    list of ReflectanceRange
        One per sampled date.
    """
    ranges = [assess_reflectance(values, time) for time, values in _sample(cube)]
    bad = [r for r in ranges if r.problem]
    if warn and bad:
        what, fix = _FIXES[str(bad[0].problem)]
        dates = "; ".join(r.describe() for r in bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        warnings.warn(ImplausibleReflectanceWarning(
            f"{where} does not hold plausible reflectance on {len(bad)} of {len(ranges)} sampled date(s): {what} "
            f"[{dates}; real reflectance: {DARK_PERCENTILE:g}st percentile below {DARK_MAX:g}, {BRIGHT_PERCENTILE:g}th "
            f"between {BRIGHT_MIN:g} and {BRIGHT_MAX:g}, under {100 * NEGATIVE_SHARE_MAX:g} % below "
            f"{NEGATIVE_VALUE:g}]. Any map of it is wrong. Ingest again with the right --scale/--offset: {fix} "
            "(`icemap ingest --files ... --scale S --offset O`; in Python scale=/offset= of "
            "icemap.localfiles.items_from_local_files or icemap.stac.item_from_files), or fix the items' "
            "raster:bands scale/offset."), stacklevel=stacklevel)
    return ranges
