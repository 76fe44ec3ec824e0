"""The embedded sample region: a procedural Landsat 8/9 Collection 2 Level-2 glacier region.

icemap needs data that is always there: for ``icemap demo``, for tests that must not touch the
network, and for benchmarks that need a region of any size. Downloading real scenes is slow and
fragile, and real scenes come without a pixel-exact truth. This module therefore *generates* a
region that looks to every icemap reader exactly like a cropped real product (the same files,
the same encoding, the same STAC metadata as Planetary Computer's ``landsat-c2-l2``) and that
comes with the truth the generator used.

What is in a region (``make_sample_region(root)``)::

    root/
      sample.json                     parameters and summary; written LAST (completion marker)
      catalog.json                    static STAC catalog (relative links)
      landsat-c2-l2/collection.json   STAC collection with item_assets
      landsat-c2-l2/<item_id>/        one folder per item: <item_id>.json and 10 COGs
          <item_id>_SR_B1.TIF ... _SR_B7.TIF, _ST_B10.TIF, _QA_PIXEL.TIF, _QA_RADSAT.TIF
      glaciers.gpkg                   true outlines (layer "glaciers"; also "debris", "lakes")
      dem.tif                         elevation (float32 metres, same grid)
      truth/glacier_id.tif            outlines rasterised at pixel centres (int32, 0 = none)
      truth/<YYYY-MM-DD>_class.tif    dominant visible class per pixel (uint8, CLASS_CODES)
      truth/<YYYY-MM-DD>_ice_fraction.tif  visible clean-ice fraction per pixel (float32)

How the scene is built, and why:

- **Grid.** 30 m pixels in UTM 19S (EPSG:32719) centred near 69.95 W, 30.3 S (the Dry Andes of
  Chile, where glaciers are small and the two studies icemap follows worked). The origin sits on
  a multiple of 30 m plus 15 m, as on real Landsat grids, so the sample mosaics like real data.
- **Terrain.** Fractal (power-law spectrum) relief plus ridged noise, rescaled to roughly
  3500-5800 m (less relief for small regions, so slopes stay plausible).
- **Glaciers** are shapely polygons: round cirque glaciers on high, preferably south-facing
  (shaded, in the southern hemisphere) slopes; valley glaciers that follow the steepest descent
  of the smoothed terrain and taper towards the tongue; glacierets down to about 0.01 km2. They
  never overlap (a candidate that would is dropped). Their sub-pixel cover is computed by
  rasterising at 5 x 5 sub-pixels and averaging, so border pixels are mixtures, as in real data.
- **Debris-covered ice.** Some valley-glacier tongues are covered by rock debris. Spectrally this
  is rock, not ice: no optical index can see it. It is part of the glacier outlines (as in RGI
  and GLIMS), rasterised into ``glacier_id``, but its truth class is ``debris``, it counts as 0
  in the ice fraction, and QA_PIXEL does not flag it as snow/ice. Comparing an ice map with the
  outlines therefore shows the known debris omission; comparing it with the class truth does not.
  It is kept to a small share of the glacier area (a part of some tongues).
- **Other surfaces.** Bare rock of varied brightness and some reddish hydrothermal alteration,
  seasonal snow patches that change from date to date (more at high elevation and on shaded
  slopes), clear lakes in low flat ground and turbid proglacial lakes below glacier tongues (the
  lake floor is flattened in the DEM), and sparse vegetation (bofedal wetlands) in the lowest,
  flattest valley floors.
- **Light.** Reflectance is the fraction-weighted mix of per-class spectra (see ``_SPECTRA``),
  times an illumination factor from the hillshade at the item's sun elevation and azimuth;
  slopes facing away from the sun keep 15 % diffuse light. Cumulus clouds (0-25 % cover per date)
  are blended in by opacity, and their shadows are displaced away from the sun by the cloud
  height over the tangent of the sun elevation, darkening the surface to about 30 %. Sensor noise
  is added, so a few very dark pixels become slightly negative, as in real Level-2 data.
- **Encoding.** Exactly Collection 2 Level-2: ``DN = round((rho - offset) / scale)`` with the
  factors of :data:`icemap.bands.LANDSAT_C2_L2`, clipped to 1-65535, 0 for fill. QA_PIXEL comes
  from :func:`icemap.bands.encode_qa_pixel` with Fmask-like imperfections (thin cloud edges
  missed, a 3-pixel dilated-cloud ring, some cloud shadow missed); QA_RADSAT marks a handful of
  saturated pixels on the brightest snow (bands 1 and 2 at DN 65535).
- **Dates.** February (end of the austral ablation season, the scenes both studies chose) of
  consecutive years from 2021, alternating Landsat 8 and 9 on dates consistent with their
  16-day cycles on WRS-2 path 233. With ``split_first_date`` the first date comes as two
  scenes of the same path and consecutive rows (081 and 082), 24 s apart, each covering an
  overlapping part of the grid, so a loader has to mosaic same-day scenes.
  With ``per_season=k`` each year has k acquisitions, 8 days apart (Landsat 8 and 9 alternate on
  the combined 8-day revisit of path 233), each with its own clouds, seasonal snow and sun, so a
  seasonal composite (:mod:`icemap.composite`) has several looks per pixel. The glaciers do not
  change within a season; ``truth/<YYYY>_glacier_ice_fraction.tif`` holds each year's clean
  glacier ice whatever covers it on a date (the truth of a one-map-per-year product).

- **Seasonal surface** (``surface="seasonal"``, for training models that must hold on real
  scenes). The classic surface gives glaciers bare ice with the same snow patches as the ground,
  and textbook spectra; real glaciers are snow-covered above a snowline for much of the year,
  and every inventory counts that snow as glacier. The seasonal surface draws, per date, a
  glacier snowline (a quantile of the glaciers' elevations, so it moves between dates and
  years) with firn just above it and bare ice below, a higher snowline for the ground, and on
  about one date in four fresh snow on glacier and ground alike; its class spectra are the
  medians of real hand-labelled Landsat 8/9 and Sentinel-2 pixels (``_REAL_SPECTRA``). The
  outlines, the labels a model learns, are the same: snow on the glacier is glacier, snow off
  it is not.

Everything is deterministic for a given ``seed``; every component draws from its own random
stream, so e.g. asking for more dates does not change the terrain or the glaciers.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd  # imported here: only region generation needs it
import numpy as np
import scipy.fft as sfft
import shapely
import shapely.affinity
import shapely.geometry
from affine import Affine
from pyproj import Transformer
from rasterio import features
from scipy import ndimage
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from icemap._atomic import atomic_path, atomic_write_text
from icemap.bands import LANDSAT_C2_L2, QA_PIXEL, REFLECTIVE_BANDS, Band, encode_qa_pixel
from icemap.errors import SampleError
from icemap.export import write_cog

__all__ = [
    "CLASS_CODES",
    "SampleError",
    "SampleRegion",
    "make_sample_region",
    "open_sample_region",
]

#: Truth classes of ``truth/<date>_class.tif``: the dominant (largest-fraction) visible
#: surface of each pixel, so a pixel is "ice" whenever at least half of it is bare glacier ice.
#: Cloud (opacity >= 0.5) and then cloud shadow win over the surface below them. "debris" is
#: debris-covered glacier ice (inside the outlines, but looking like rock). ``fill`` marks
#: pixels that no item of that date covers.
CLASS_CODES: dict[str, int] = {
    "rock": 0,
    "ice": 1,
    "snow": 2,
    "water": 3,
    "debris": 4,
    "vegetation": 5,
    "cloud": 6,
    "cloud_shadow": 7,
    "fill": 255,
}

#: Bumped whenever the generator's output changes, so that a cached region made by an older
#: icemap is recognised as different (see make_sample_region's reuse rule).
GENERATOR_VERSION = 1

COLLECTION_ID = "landsat-c2-l2"
EPSG = 32719
CRS = f"EPSG:{EPSG}"
PIXEL = 30.0
CENTRE_LONLAT = (-69.95, -30.3)
SUPERSAMPLE = 5
MIN_SIZE = 64
#: Memory grows with the pixel count (about 1.3 GB at 2048 x 2048); 4096 needs about 5 GB.
MAX_SIZE = 4096

WRS_PATH = 233
WRS_ROW = 81
#: Landsat 8 on WRS-2 path 233 (reference date of this sample); Landsat 9 flies the same
#: 16-day cycle 8 days apart.
_L8_REFERENCE = dt.date(2021, 2, 12)
_CYCLE_DAYS = 16
_ACQ_TIME = dt.time(14, 30, 0)
#: Seconds between consecutive WRS-2 rows along a descending pass.
_ROW_SECONDS = 24
#: Angle of a scene's top/bottom edge to the grid rows: the ground track at 30 S runs about
#: 12 degrees west of south, and scene edges are perpendicular to it.
_SCENE_TILT_DEG = 12.0

_SAMPLE_JSON = "sample.json"
_PARTIAL_MARKER = ".icemap-sample-partial"
#: Top-level names a region owns; only these are removed when a region is regenerated.
_OWNED_NAMES = ("sample.json", "catalog.json", "glaciers.gpkg", "dem.tif", "truth", COLLECTION_ID)

_COG_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"

# Surface reflectance per class in OLI bands 1-7 (coastal, blue, green, red, nir08, swir16,
# swir22). Approximate values read from published signatures resampled to OLI: the USGS
# Spectral Library v7 (Kokaly et al. 2017) for rock, water and vegetation; Hall & Riggs (2007),
# Dozier (1989) and Paul et al. (2016) for snow and glacier ice (high visible, dropping through
# the NIR to a few percent in the SWIR, which is what NDSI exploits); cumulus cloud stays bright
# in the SWIR, which is why cloud is only a partial NDSI false positive.
_SPECTRA_BANDS = ("coastal", "blue", "green", "red", "nir08", "swir16", "swir22")
_SPECTRA: dict[str, tuple[float, ...]] = {
    "ice": (0.52, 0.51, 0.48, 0.43, 0.30, 0.035, 0.030),
    "snow": (0.91, 0.91, 0.89, 0.85, 0.72, 0.10, 0.08),
    "rock": (0.10, 0.11, 0.14, 0.18, 0.23, 0.30, 0.26),
    "debris": (0.08, 0.09, 0.11, 0.14, 0.18, 0.22, 0.19),
    "water_clear": (0.060, 0.055, 0.050, 0.030, 0.015, 0.010, 0.008),
    "water_turbid": (0.10, 0.12, 0.16, 0.14, 0.06, 0.020, 0.015),
    "vegetation": (0.03, 0.04, 0.08, 0.05, 0.35, 0.20, 0.10),
    "cloud": (0.70, 0.70, 0.72, 0.72, 0.72, 0.42, 0.28),
}
#: Surface models of :func:`make_sample_region` (``surface=``).
SURFACES = ("classic", "seasonal")

# The spectra of the "seasonal" surface: per-class medians of real hand-labelled pixels at four
# benchmark glaciers (Gulkana, Wolverine, South Cascade, Sperry; June-August 2021), pooled over
# Landsat 8/9 C2 L2 (corrected by Collection 2's -0.2 offset) and Sentinel-2 L2A SR
# (../shared/data/rgi_benchmark_glacier_spectra: snow 9596 points, ice 2747, rock/debris 6593,
# water 272; coastal = OLI B1 / MSI B1). tests/test_real_pixels.py recomputes them from the file.
# Real snow is much darker than the textbook spectrum above (green 0.72 against 0.89: summer
# snow is wet, old and dusty), real ice darker in the NIR (0.21 against 0.30), and both nearly
# black in the SWIR (0.01-0.02), which is what moves NDSI to 0.9 and above.
_REAL_SPECTRA: dict[str, tuple[float, ...]] = {
    "ice": (0.294, 0.317, 0.338, 0.327, 0.212, 0.011, 0.011),
    "snow": (0.602, 0.692, 0.724, 0.745, 0.629, 0.018, 0.016),
    "rock": (0.094, 0.109, 0.143, 0.156, 0.181, 0.226, 0.219),
    "water": (0.058, 0.085, 0.149, 0.104, 0.021, 0.009, 0.008),
}
#: Firn (last years' snow at the top of the ablation zone): halfway between real snow and ice.
_FIRN = tuple(round(0.5 * (a + b), 3) for a, b in zip(_REAL_SPECTRA["snow"], _REAL_SPECTRA["ice"]))
_SEASONAL_SPECTRA: dict[str, tuple[float, ...]] = {
    **_SPECTRA,
    "ice": _REAL_SPECTRA["ice"],
    "snow": _REAL_SPECTRA["snow"],
    "firn": _FIRN,
    "rock": _REAL_SPECTRA["rock"],
    # The real rock/debris class holds both; debris is the darker end of it.
    "debris": tuple(round(0.85 * v, 3) for v in _REAL_SPECTRA["rock"]),
    # The real water points are glacier-fed lakes and rivers, i.e. turbid.
    "water_turbid": _REAL_SPECTRA["water"],
}
#: Share of the "seasonal" dates with fresh snow that covers glacier and ground alike.
_P_FRESH_SNOW = 0.25
#: How much higher than the glacier snowline the ground's snowline lies in the melt season (m):
#: bare ground warms and loses its snow earlier than a glacier's accumulation area.
_GROUND_SNOWLINE_M = (100.0, 500.0)

#: Hydrothermally altered (iron-oxide) rock: relative change per band at full alteration.
_ALTERATION_TINT = (-0.25, -0.20, 0.05, 0.40, 0.25, 0.15, 0.10)

# Surface temperature (K) per class at 4500 m, before illumination and lapse rate.
_TEMPERATURE = {
    "ice": 272.0,
    "snow": 270.0,
    "rock": 281.0,
    "debris": 279.0,
    "water": 280.0,
    "vegetation": 284.0,
    "cloud": 255.0,
}
_LAPSE_K_PER_M = -0.0065

#: Share of light that is diffuse: what a slope facing away from the sun still receives.
_DIFFUSE = 0.15
#: Share of direct light a cloud shadow removes (leaves about 30 % on flat ground).
_SHADOW_DEPTH = 0.85

# Random streams, one per component.
_STREAM_TERRAIN = 1
_STREAM_SURFACE = 2
_STREAM_GLACIERS = 3
_STREAM_LAKES = 4
_STREAM_DATE = 100
#: Later acquisitions of a season (per_season > 1) draw from SeedSequence([seed, 100 + year, k]),
#: so the first acquisition of each year is the one a per_season=1 region has.

#: Most acquisitions per season: 6 at 8-day steps from mid-February stay within February-March,
#: the end of the austral ablation season.
MAX_PER_SEASON = 6
#: Days between acquisitions of one season: Landsat 8 and 9 alternate on the 16-day cycle.
_SEASON_STEP_DAYS = _CYCLE_DAYS // 2


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleRegion:
    """A generated sample region on disk: where its files are and what grid they share.

    Build one with :func:`make_sample_region` or reopen one with :func:`open_sample_region`.

    Attributes
    ----------
    root
        The region folder.
    catalog
        ``root/catalog.json``, a static STAC catalog; open it with
        ``pystac.Catalog.from_file`` or pass it to icemap's search.
    outlines
        ``root/glaciers.gpkg``: the true glacier outlines (layer ``glaciers``: ``gid``,
        ``glacier_id``, ``kind``, ``area_km2``, ``debris_km2``), EPSG:32719.
    dem
        ``root/dem.tif``: elevation in metres on the image grid.
    glacier_ids
        ``root/truth/glacier_id.tif``: the outlines rasterised at pixel centres (int32, value =
        ``gid``, 0 = no glacier). Includes debris-covered ice.
    crs
        ``"EPSG:32719"``.
    transform
        The affine pixel-to-map transform ``(a, b, c, d, e, f)`` shared by all rasters.
    shape
        ``(height, width)`` in pixels.
    bbox
        Longitude/latitude bounds of the grid (west, south, east, north).
    datetimes
        ISO acquisition time of each date (one per date, also when a date has two items).
    item_ids
        Every STAC item id, in date order.
    collection
        The STAC collection id (``"landsat-c2-l2"``).
    """

    root: Path
    catalog: Path
    outlines: Path
    dem: Path
    glacier_ids: Path
    crs: str
    transform: tuple[float, ...]
    shape: tuple[int, int]
    bbox: tuple[float, float, float, float]
    datetimes: tuple[str, ...]
    item_ids: tuple[str, ...]
    collection: str = COLLECTION_ID
    per_season: int = 1

    @property
    def dates(self) -> tuple[str, ...]:
        """The acquisition dates as ``YYYY-MM-DD``, one per date."""
        return tuple(d[:10] for d in self.datetimes)

    def _date_of(self, item_or_date: object) -> str:
        key = str(item_or_date)
        if key in self.item_ids:
            # Landsat ids carry the acquisition date as their fourth field: ..._YYYYMMDD_02_T1.
            ymd = key.split("_")[3]
            return f"{ymd[:4]}-{ymd[4:6]}-{ymd[6:8]}"
        if key[:10] in self.dates:
            return key[:10]
        raise SampleError(
            f"{key!r} is neither a date nor an item of this sample region; dates: "
            f"{', '.join(self.dates)}; items: {', '.join(self.item_ids)}"
        )

    def truth(self, item_or_date: str) -> Path:
        """Path of the class raster (uint8, :data:`CLASS_CODES`) for an item id or a date.

        ``item_or_date`` may be an item id, ``"YYYY-MM-DD"`` or any ISO datetime of that day.
        Both items of a split date share one truth raster (the mosaic).
        """
        return self.root / "truth" / f"{self._date_of(item_or_date)}_class.tif"

    def ice_fraction(self, item_or_date: str) -> Path:
        """Path of the visible clean-ice fraction raster (float32, 0-1) for an item or date.

        The fraction counts glacier ice that a sensor can see: snow-covered, debris-covered and
        cloud-covered parts count as 0 (ice under a cloud shadow is visible, only darker).
        """
        return self.root / "truth" / f"{self._date_of(item_or_date)}_ice_fraction.tif"

    @property
    def years(self) -> tuple[int, ...]:
        """The season years, one per group of ``per_season`` acquisitions."""
        return tuple(sorted({int(d[:4]) for d in self.dates}))

    def glacier_ice_fraction(self, year: int) -> Path:
        """Path of a year's clean glacier ice fraction (float32, 0-1), only with ``per_season > 1``.

        Unlike :meth:`ice_fraction` it does not depend on what a date sees: ice under seasonal
        snow or cloud counts, debris-covered ice does not. It is the truth of a product that
        maps one ice extent per year (a seasonal composite), against which each single date and
        the composite can be scored alike.
        """
        path = self.root / "truth" / f"{int(year):04d}_glacier_ice_fraction.tif"
        if self.per_season == 1 or int(year) not in self.years:
            raise SampleError(
                f"no yearly glacier ice truth for {year}: it is written for regions made with per_season > 1 "
                f"(this one: per_season={self.per_season}, years {', '.join(map(str, self.years))})"
            )
        return path


def make_sample_region(
    root: str | os.PathLike[str],
    *,
    size: int = 256,
    n_dates: int = 3,
    seed: int = 0,
    split_first_date: bool = True,
    overwrite: bool = False,
    per_season: int = 1,
    surface: str = "classic",
) -> SampleRegion:
    """Generate (or reuse) a procedural Landsat 8/9 C2 L2 glacier region in ``root``.

    Parameters
    ----------
    root
        Folder of the region; created if needed.
    size
        Width and height of the grid in 30 m pixels (64-4096). 256 is about 59 km2 with
        roughly 15-40 glaciers.
    n_dates
        Number of acquisition years (February of consecutive years from 2021); with
        ``per_season=1`` also the number of dates.
    seed
        Seed of every random choice; the same seed gives byte-identical files.
    split_first_date
        Deliver the first date as two overlapping scenes (WRS-2 rows 081 and 082, 24 s
        apart) with fill outside each footprint, as real scenes cut at a row boundary are.
    overwrite
        Replace a region made with other parameters (or a folder that holds other files; only
        the names a region uses are removed).
    per_season
        Acquisitions per year (1-6), 8 days apart from the first (Landsat 8 and 9 alternating),
        each with its own clouds, seasonal snow and sun: what a seasonal composite combines.
        1 (default) gives exactly the files of earlier icemap versions.
    surface
        ``"classic"`` (default, the files of earlier icemap versions): textbook spectra, bare
        glaciers with the same patchy seasonal snow as the ground around them. ``"seasonal"``:
        glaciers as they look through a real melt season, for training models that must hold
        on real scenes. Each date has a snowline that moves between dates and years: above it
        the glacier is snow-covered (its accumulation area, with a band of firn at the
        snowline), below it bare ice, with debris on some tongues; the ground's snow melts
        earlier (its snowline lies higher) apart from shaded patches; on about one date in
        four fresh snow covers glacier and ground alike down to some elevation. Class spectra
        are medians of real hand-labelled Landsat 8/9 and Sentinel-2 pixels (see
        ``_REAL_SPECTRA``), with a per-date and per-pixel spread. The outlines (the labels)
        are the same in both: the glacier as inventories draw it, so snow on the glacier is
        glacier and snow off it is not.

    Returns
    -------
    SampleRegion
        Paths and grid of the region.

    Raises
    ------
    SampleError
        For invalid arguments, or when ``root`` holds a different region or other files and
        ``overwrite`` is False.

    Notes
    -----
    ``root/sample.json`` is written last. When it exists and records the same parameters (and
    generator version), the region is returned at once without rewriting anything, so demos and
    test fixtures can call this freely. A folder left incomplete by an interrupted run is
    regenerated without needing ``overwrite``.
    """
    params = _validate(size=size, n_dates=n_dates, seed=seed, split_first_date=split_first_date,
                       per_season=per_season, surface=surface)
    root = Path(root).expanduser().resolve()
    meta_path = root / _SAMPLE_JSON
    if root.exists() and not root.is_dir():
        raise SampleError(f"{root} is a file, not a folder; pass a folder for the sample region")

    if meta_path.is_file():
        existing = _read_meta(meta_path)
        same = existing is not None and existing.get("params") == params
        if same and existing is not None and _is_complete(root, existing):
            return _region_from_meta(root, existing)
        if not same and not overwrite:
            old = existing.get("params") if existing else "unreadable parameters"
            raise SampleError(
                f"{root} already holds a sample region made with {old}, not {params}; pass "
                "overwrite=True to replace it, or choose another folder"
            )
    elif root.is_dir() and any(root.iterdir()) and not (root / _PARTIAL_MARKER).exists():
        if not overwrite:
            raise SampleError(
                f"{root} is not empty and holds no icemap sample region; pass overwrite=True "
                "to write one there anyway (only the sample's own file names are replaced), "
                "or choose another folder"
            )

    _clear(root)
    root.mkdir(parents=True, exist_ok=True)
    _write_json(root / _PARTIAL_MARKER, {"params": params})
    meta = _generate(root, **params)
    _write_json(meta_path, meta)
    (root / _PARTIAL_MARKER).unlink(missing_ok=True)
    return _region_from_meta(root, meta)


def open_sample_region(root: str | os.PathLike[str]) -> SampleRegion:
    """Reopen a region written by :func:`make_sample_region`, from its ``sample.json``.

    Raises
    ------
    SampleError
        When ``root`` holds no complete sample region.
    """
    root = Path(root).expanduser().resolve()
    meta = _read_meta(root / _SAMPLE_JSON)
    if meta is None:
        raise SampleError(
            f"no complete sample region in {root} (sample.json is missing or unreadable); "
            "create one with make_sample_region(root)"
        )
    return _region_from_meta(root, meta)


# --------------------------------------------------------------------------------------------
# Bookkeeping
# --------------------------------------------------------------------------------------------


def _validate(*, size: Any, n_dates: Any, seed: Any, split_first_date: Any, per_season: Any = 1,
              surface: Any = "classic") -> dict[str, Any]:
    for name, value in (("size", size), ("n_dates", n_dates), ("seed", seed), ("per_season", per_season)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise SampleError(f"{name} must be an integer, got {value!r}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise SampleError(
            f"size must be between {MIN_SIZE} and {MAX_SIZE} pixels (a {MIN_SIZE}-pixel region "
            f"is {MIN_SIZE * PIXEL / 1000:.1f} km across), got {size}"
        )
    if n_dates < 1:
        raise SampleError(f"n_dates must be at least 1, got {n_dates}")
    if seed < 0:
        raise SampleError(f"seed must be a non-negative integer, got {seed}")
    if not 1 <= per_season <= MAX_PER_SEASON:
        raise SampleError(
            f"per_season must be between 1 and {MAX_PER_SEASON} (acquisitions 8 days apart within "
            f"February-March), got {per_season}"
        )
    params = {
        "size": int(size),
        "n_dates": int(n_dates),
        "seed": int(seed),
        "split_first_date": bool(split_first_date),
        "generator_version": GENERATOR_VERSION,
    }
    # Recorded only when used: a per_season=1 region keeps the sample.json of earlier versions,
    # so regions cached by them are reused, not regenerated.
    if per_season != 1:
        params["per_season"] = int(per_season)
    if surface not in SURFACES:
        raise SampleError(f"surface must be one of {', '.join(map(repr, SURFACES))}, got {surface!r}")
    if surface != "classic":
        params["surface"] = surface
    return params


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _is_complete(root: Path, meta: Mapping[str, Any]) -> bool:
    try:
        paths = [root / p for p in meta["files"]]
    except (KeyError, TypeError):
        return False
    return all(p.is_file() for p in paths)


def _region_from_meta(root: Path, meta: Mapping[str, Any]) -> SampleRegion:
    try:
        return SampleRegion(
            root=root,
            catalog=root / "catalog.json",
            outlines=root / "glaciers.gpkg",
            dem=root / "dem.tif",
            glacier_ids=root / "truth" / "glacier_id.tif",
            crs=str(meta["crs"]),
            transform=tuple(float(v) for v in meta["transform"]),
            shape=(int(meta["shape"][0]), int(meta["shape"][1])),
            bbox=tuple(float(v) for v in meta["bbox"]),  # type: ignore[arg-type]
            datetimes=tuple(meta["datetimes"]),
            item_ids=tuple(meta["item_ids"]),
            collection=str(meta.get("collection", COLLECTION_ID)),
            per_season=int(meta.get("params", {}).get("per_season", 1)),
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise SampleError(
            f"{root / _SAMPLE_JSON} is not a valid sample description ({exc!r}); regenerate the "
            "region with make_sample_region(root, overwrite=True)"
        ) from None


def _clear(root: Path) -> None:
    """Remove the files a region owns (and nothing else) from ``root``."""
    if not root.is_dir():
        return
    # The completion marker goes first, so that a crash below leaves a folder that is
    # recognisably incomplete rather than one that claims to be complete.
    (root / _SAMPLE_JSON).unlink(missing_ok=True)
    for name in _OWNED_NAMES:
        p = root / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    # Temporary files an interrupted run left next to the top-level files (".dem.tif.<pid>...").
    stems = tuple(f".{Path(n).stem}." for n in _OWNED_NAMES if "." in n)
    for p in root.glob(".*.tmp*"):
        if p.name.startswith(stems) and p.is_file():
            p.unlink()


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream]))


# --------------------------------------------------------------------------------------------
# Fields
# --------------------------------------------------------------------------------------------


def _wavenumbers(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    ky = sfft.fftfreq(shape[0], d=PIXEL).astype(np.float32)[:, None]
    kx = sfft.rfftfreq(shape[1], d=PIXEL).astype(np.float32)[None, :]
    return ky, kx


def _standardise(a: np.ndarray) -> np.ndarray:
    a = a - a.mean(dtype=np.float64)
    sd = float(a.std(dtype=np.float64))
    return (a / (sd if sd > 0 else 1.0)).astype(np.float32, copy=False)


def _noise(rng: np.random.Generator, shape: tuple[int, int], scale_m: float) -> np.ndarray:
    """Smooth Gaussian random field (mean 0, sd 1) with correlation length ``scale_m``.

    Filtering white noise in the Fourier domain costs the same at any scale, unlike
    ``ndimage.gaussian_filter`` with a large sigma; the field is periodic, which is harmless here.
    """
    white = rng.standard_normal(shape, dtype=np.float32)
    spec = sfft.rfft2(white, workers=-1)
    ky, kx = _wavenumbers(shape)
    spec *= np.exp(np.float32(-2.0 * math.pi**2 * scale_m**2) * (ky * ky + kx * kx))
    return _standardise(sfft.irfft2(spec, s=shape, workers=-1))


def _terrain(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Mountain relief in metres: a fractal surface shaped into sharp peaks and wide valleys.

    The spectrum follows a power law (real relief is close to self-similar, with amplitude
    falling as wavenumber^-1.05 here), rolled off beyond 15 km so that large regions do not
    become one tilted plane and below 100 m so that 30 m slopes stay plausible. Raising the
    normalised surface to a power > 1 sharpens crests and flattens valley floors, the shape
    that glacial erosion leaves.
    """
    ky, kx = _wavenumbers(shape)
    k2 = ky * ky + kx * kx
    k_low, k_high = 1.0 / 15000.0, 1.0 / 100.0
    amp = (k2 + np.float32(k_low * k_low)) ** np.float32(-1.05)
    amp *= np.exp(-k2 / np.float32(k_high**2))
    amp[0, 0] = 0.0
    spec = sfft.rfft2(rng.standard_normal(shape, dtype=np.float32), workers=-1) * amp
    z = sfft.irfft2(spec, s=shape, workers=-1)
    z = ((z - z.min()) / max(float(np.ptp(z)), 1e-12)) ** 1.6
    z = ndimage.gaussian_filter(z.astype(np.float32), 0.7)
    z = (z - z.min()) / max(float(np.ptp(z)), 1e-12)
    # Small regions get less relief, so that their slopes stay those of real mountains.
    extent_km = max(shape) * PIXEL / 1000.0
    relief = float(np.clip(700.0 + 110.0 * extent_km, 1000.0, 2300.0))
    z_low = 3500.0 + 0.5 * (2300.0 - relief)
    return (z_low + z * relief).astype(np.float32)


@dataclass
class _Topo:
    dem: np.ndarray
    nx: np.ndarray  # unit surface normal, east component
    ny: np.ndarray  # north component
    nz: np.ndarray  # up component
    slope_deg: np.ndarray

    @property
    def southness(self) -> np.ndarray:
        """Positive on slopes facing south (poleward and shaded in the southern hemisphere)."""
        return -self.ny

    def cos_incidence(self, sun_elevation: float, sun_azimuth: float) -> np.ndarray:
        el, az = math.radians(sun_elevation), math.radians(sun_azimuth)
        sx = np.float32(math.sin(az) * math.cos(el))
        sy = np.float32(math.cos(az) * math.cos(el))
        sz = np.float32(math.sin(el))
        return self.nx * sx + self.ny * sy + self.nz * sz


def _topography(dem: np.ndarray) -> _Topo:
    gy, gx = np.gradient(dem.astype(np.float32), PIXEL)
    dzdx, dzdn = gx, -gy  # rows run south, so the northward gradient is minus the row gradient
    norm = np.sqrt(dzdx * dzdx + dzdn * dzdn + 1.0)
    return _Topo(
        dem=dem,
        nx=(-dzdx / norm).astype(np.float32),
        ny=(-dzdn / norm).astype(np.float32),
        nz=(1.0 / norm).astype(np.float32),
        slope_deg=np.degrees(np.arccos(1.0 / norm)).astype(np.float32),
    )


# --------------------------------------------------------------------------------------------
# Glaciers and lakes
# --------------------------------------------------------------------------------------------


@dataclass
class _Glacier:
    """A glacier outline with the parts that other features depend on."""

    geom: BaseGeometry
    kind: str
    debris: BaseGeometry | None = None
    #: Tongue end and flow direction (unit vector), for placing a proglacial lake.
    end: tuple[float, float] | None = None
    direction: tuple[float, float] | None = None
    tongue_radius: float = 0.0


class _Buckets:
    """Polygons binned by their bounds on a coarse grid, to test closeness to nearby ones only.

    A candidate glacier is compared with the few polygons in its cells rather than all of them,
    which keeps placing thousands of glaciers (a 2048-pixel region) linear in their number.
    """

    def __init__(self, cell: float) -> None:
        self.cell = cell
        self.cells: dict[tuple[int, int], list[BaseGeometry]] = {}

    def _keys(self, g: BaseGeometry, pad: float = 0.0) -> Iterable[tuple[int, int]]:
        x0, y0, x1, y1 = g.bounds
        c = self.cell
        for i in range(int((x0 - pad) // c), int((x1 + pad) // c) + 1):
            for j in range(int((y0 - pad) // c), int((y1 + pad) // c) + 1):
                yield i, j

    def near(self, g: BaseGeometry, distance: float) -> bool:
        """True if ``g`` comes within ``distance`` metres of a stored polygon."""
        seen: set[int] = set()
        for k in self._keys(g, distance):
            for o in self.cells.get(k, ()):
                if id(o) not in seen:
                    seen.add(id(o))
                    if shapely.dwithin(g, o, distance):
                        return True
        return False

    def add(self, g: BaseGeometry) -> None:
        for k in self._keys(g):
            self.cells.setdefault(k, []).append(g)


def _blob(
    rng: np.random.Generator,
    centre: tuple[float, float],
    area_m2: float,
    elongation: float,
    angle: float,
    roughness: float = 0.12,
) -> Polygon:
    """An irregular, roughly elliptical polygon of about ``area_m2``, long axis at ``angle``."""
    theta = np.linspace(0.0, 2.0 * math.pi, 48, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 6):
        r += rng.uniform(0.0, roughness / math.sqrt(k - 1)) * np.cos(
            k * theta + rng.uniform(0.0, 2.0 * math.pi)
        )
    radius = math.sqrt(area_m2 / (math.pi * elongation))
    x = radius * elongation * r * np.cos(theta)
    y = radius * r * np.sin(theta)
    ca, sa = math.cos(angle), math.sin(angle)
    pts = np.column_stack([centre[0] + ca * x - sa * y, centre[1] + sa * x + ca * y])
    # r stays above 0.6 (the harmonics sum to at most about 0.35), so the outline is
    # star-shaped around its centre and therefore a valid simple polygon.
    return Polygon(pts)


def _flowline(
    start: tuple[float, float],
    length_m: float,
    grad_e: np.ndarray,
    grad_n: np.ndarray,
    to_pixel: Affine,
) -> np.ndarray:
    """Follow the steepest descent of a smoothed DEM from ``start`` for up to ``length_m``."""
    h, w = grad_e.shape
    pos = np.array(start, dtype=np.float64)
    direction = None
    pts = [pos.copy()]
    for _ in range(int(length_m / PIXEL)):
        col, row = to_pixel @ (pos[0], pos[1])
        i, j = int(row), int(col)
        if not (0 <= i < h and 0 <= j < w):
            break
        g = np.array([grad_e[i, j], grad_n[i, j]], dtype=np.float64)
        gn = float(np.hypot(*g))
        if gn < 0.02:  # flatter than about 1 degree: the ice would spread, not flow on
            break
        step = -g / gn
        # Momentum keeps the line from zig-zagging across a valley floor.
        direction = step if direction is None else 0.6 * direction + 0.4 * step
        direction /= float(np.hypot(*direction))
        pos = pos + PIXEL * direction
        pts.append(pos.copy())
    return np.asarray(pts)


#: Share of each kind among the glaciers of a region, placed largest kind first (the big
#: glaciers take the best sites, small ones fill in), and the area range (km2) of the blobs.
_GLACIER_MIX = (("valley", 0.20), ("cirque", 0.35), ("glacieret", 0.45))
_CIRQUE_KM2 = (0.06, 0.6)
_GLACIERET_KM2 = (0.01, 0.06)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def _valley_glacier(
    rng: np.random.Generator,
    start: tuple[float, float],
    max_length: float,
    grad: tuple[np.ndarray, np.ndarray],
    to_pixel: Affine,
    with_debris: bool,
) -> _Glacier | None:
    """A glacier along the descent line from ``start``: wide head, tapering tongue."""
    length = min(rng.uniform(1000.0, 3000.0), max_length)
    line = _flowline(start, length, grad[0], grad[1], to_pixel)
    if len(line) < max(8, 0.6 * length / PIXEL):
        return None  # ran into flat ground or the edge too soon: not a valley
    t = np.linspace(0.0, 1.0, len(line))
    r_head, r_tongue = rng.uniform(170.0, 300.0), rng.uniform(55.0, 110.0)
    radii = r_head + (r_tongue - r_head) * t**0.7
    # Discs every 90 m (radii >= 55 m, so they overlap) merged into a tapering tube, then
    # closed by 40 m to round off the scalloped edges.
    tube = shapely.union_all(shapely.buffer(shapely.points(line[::3]), radii[::3], quad_segs=6))
    geom = tube.buffer(40.0, quad_segs=4).buffer(-40.0, quad_segs=4)
    d = line[-1] - line[-4]
    d = d / max(float(np.hypot(*d)), 1e-9)
    g = _Glacier(
        geom=geom,
        kind="valley",
        end=(float(line[-1, 0]), float(line[-1, 1])),
        direction=(float(d[0]), float(d[1])),
        tongue_radius=float(r_tongue),
    )
    if with_debris:
        # Debris covers the lowest fifth to quarter of the tongue, across its whole width.
        tail = t >= rng.uniform(0.70, 0.82)
        cover = shapely.union_all(
            shapely.buffer(shapely.points(line[tail][::2]), radii[tail][::2] * 1.6, quad_segs=6)
        )
        g.debris = geom.intersection(cover)
    return g


def _make_glaciers(
    rng: np.random.Generator, topo: _Topo, transform: Affine, inner: Polygon
) -> list[_Glacier]:
    """Place non-overlapping glaciers of each kind, about one per 1.5 km2 of region."""
    h, w = topo.dem.shape
    area_km2 = h * w * PIXEL * PIXEL / 1e6
    n_target = max(4, round(area_km2 / 1.5))
    to_pixel = ~transform

    # Glaciers survive where it is high and, in the southern hemisphere, on shaded south-facing
    # slopes; steep walls hold no ice.
    z = topo.dem
    z_lo, z_hi = np.percentile(z, [45.0, 99.9])
    height_w = np.clip((z - z_lo) / max(z_hi - z_lo, 1.0), 0.0, 1.0) ** 2
    aspect_w = 1.0 + 2.0 * np.clip(topo.southness / 0.4, -0.4, 1.0)
    slope_w = np.clip((45.0 - topo.slope_deg) / 20.0, 0.0, 1.0)
    weight = (height_w * aspect_w * slope_w).ravel().astype(np.float64)
    if weight.sum() <= 0:
        weight = np.ones_like(weight)
    seeds = iter(rng.choice(weight.size, size=12 * n_target, p=weight / weight.sum()))

    smooth = ndimage.gaussian_filter(z, 6.0)
    gn_row, ge = np.gradient(smooth, PIXEL)
    grad = (ge, -gn_row)  # east and north components of the gradient

    placed = _Buckets(cell=2000.0)
    glaciers: list[_Glacier] = []
    for kind, share in _GLACIER_MIX:
        quota = max(1, round(share * n_target))
        n_kind = 0
        for _ in range(8 * quota):
            if n_kind >= quota:
                break
            seed_idx = next(seeds, None)
            if seed_idx is None:
                break
            i, j = divmod(int(seed_idx), w)
            x, y = transform @ (j + rng.uniform(), i + rng.uniform())
            if placed.near(shapely.Point(x, y), 120.0):  # cheap early rejection
                continue
            down = math.atan2(-grad[1][i, j], -grad[0][i, j])  # descent, radians from east
            if kind == "valley":
                # The first valley glacier always carries debris, so every region has some.
                debris = rng.uniform() < 0.6 or n_kind == 0
                g = _valley_glacier(
                    rng, (x, y), 0.4 * min(h, w) * PIXEL, grad, to_pixel, debris
                )
                if g is None:
                    continue
            elif kind == "cirque":
                area = _log_uniform(rng, *_CIRQUE_KM2) * 1e6
                # Cirque glaciers sit in a hollow just below their seed, elongated downslope.
                shift = 0.3 * math.sqrt(area / math.pi)
                centre = (x + shift * math.cos(down), y + shift * math.sin(down))
                g = _Glacier(_blob(rng, centre, area, rng.uniform(1.0, 1.6), down), "cirque")
            else:
                area = _log_uniform(rng, *_GLACIERET_KM2) * 1e6
                geom = _blob(rng, (x, y), area, rng.uniform(1.0, 2.2), rng.uniform(0, math.pi))
                g = _Glacier(geom, "glacieret")
            geom = g.geom
            if geom.is_empty or geom.geom_type != "Polygon" or not inner.contains(geom):
                continue
            # A 60 m gap keeps neighbours apart in the 30 m rasters, so each id stays separable.
            if placed.near(geom, 60.0):
                continue
            placed.add(geom)
            glaciers.append(g)
            n_kind += 1
    return glaciers


@dataclass
class _Lake:
    geom: BaseGeometry
    kind: str  # "proglacial" (turbid) or "clear"


def _make_lakes(
    rng: np.random.Generator,
    topo: _Topo,
    transform: Affine,
    inner: Polygon,
    glaciers: Sequence[_Glacier],
) -> list[_Lake]:
    """Turbid proglacial lakes below some valley tongues, clear lakes in low flat ground.

    Lakes matter to an ice mapper because water has a high NDSI too: they are the classic
    false positive that a learned model has to reject.
    """
    h, w = topo.dem.shape
    area_km2 = h * w * PIXEL * PIXEL / 1e6
    blocked = _Buckets(cell=2000.0)
    for g in glaciers:
        blocked.add(g.geom)
    lakes: list[_Lake] = []

    def try_add(geom: BaseGeometry, kind: str) -> None:
        if geom.is_empty or geom.geom_type != "Polygon" or not inner.contains(geom):
            return
        # Lakes keep 60 m from glaciers and each other: no pixel mixes ice and water.
        if geom.area < 0.004e6 or blocked.near(geom, 60.0):
            return
        blocked.add(geom)
        lakes.append(_Lake(geom, kind))

    # Proglacial lakes dam up just below some tongues, fed by turbid melt water.
    for g in glaciers:
        if g.end is None or g.direction is None or rng.uniform() > 0.5:
            continue
        r = rng.uniform(60.0, 150.0)
        gap = g.tongue_radius + 1.3 * r + 90.0
        centre = (g.end[0] + gap * g.direction[0], g.end[1] + gap * g.direction[1])
        angle = math.atan2(g.direction[1], g.direction[0])
        lake = _blob(rng, centre, math.pi * r * r, rng.uniform(1.0, 1.5), angle, 0.08)
        try_add(lake, "proglacial")

    # Clear lakes sit in low, flat ground.
    z = topo.dem
    z_lo, z_hi = np.percentile(z, [0.5, 60.0])
    low = np.clip((z_hi - z) / max(z_hi - z_lo, 1.0), 0.0, 1.0) ** 3
    flat = np.clip((14.0 - topo.slope_deg) / 8.0, 0.0, 1.0)
    weight = (low * flat).ravel().astype(np.float64)
    if weight.sum() > 0:
        n_clear = max(1, round(area_km2 / 20.0))
        tries = rng.choice(weight.size, size=10 * n_clear, p=weight / weight.sum())
        added = 0
        for idx in tries:
            if added >= n_clear:
                break
            i, j = divmod(int(idx), w)
            x, y = transform @ (j + 0.5, i + 0.5)
            r = rng.uniform(80.0, 220.0)
            before = len(lakes)
            elong, angle = rng.uniform(1.0, 1.8), rng.uniform(0, math.pi)
            try_add(_blob(rng, (x, y), math.pi * r * r, elong, angle, 0.1), "clear")
            added += len(lakes) > before
    return lakes


def _cover_fractions(
    shapes: Sequence[tuple[BaseGeometry, int]],
    values: Sequence[int],
    transform: Affine,
    shape: tuple[int, int],
) -> dict[int, np.ndarray]:
    """Sub-pixel cover of each burn value: rasterise at 5 x 5 sub-pixels and average.

    Works in strips of rows so that a 2048-pixel region needs tens of MB, not GB.
    """
    h, w = shape
    s = SUPERSAMPLE
    out = {v: np.zeros(shape, dtype=np.float32) for v in values}
    if not shapes:
        return out
    strip = max(1, min(h, (4_000_000 // (w * s * s)) or 1))
    bounds = np.array([g.bounds for g, _ in shapes])
    for r0 in range(0, h, strip):
        r1 = min(h, r0 + strip)
        top = transform.f + r0 * transform.e
        bottom = transform.f + r1 * transform.e
        sel = [shapes[int(k)] for k in np.flatnonzero((bounds[:, 1] < top) & (bounds[:, 3] > bottom))]
        if not sel:
            continue
        fine_t = transform @ Affine.translation(0, r0) @ Affine.scale(1.0 / s)
        fine = features.rasterize(
            sel, out_shape=((r1 - r0) * s, w * s), transform=fine_t, fill=0, dtype="uint8"
        )
        blocks = fine.reshape(r1 - r0, s, w, s)
        for v in values:
            out[v][r0:r1] = (blocks == v).sum(axis=(1, 3), dtype=np.uint16) / np.float32(s * s)
    return out


# --------------------------------------------------------------------------------------------
# Dates and items
# --------------------------------------------------------------------------------------------


@dataclass
class _ItemSpec:
    id: str
    platform: str
    row: int
    datetime: dt.datetime
    footprint_px: Polygon  # in pixel coordinates (col, row)
    sun_elevation: float
    sun_azimuth: float


def _acquisition_dates(n_dates: int, per_season: int = 1) -> list[tuple[dt.date, str, int, int]]:
    """February dates of consecutive years on the Landsat 8 / 9 16-day cycles of path 233.

    Returns ``(date, platform, year index, acquisition index within the season)``. The first
    acquisition of year ``i`` is the same whatever ``per_season``; the later ones follow it every
    8 days, alternating platform (the two satellites fly the same 16-day cycle 8 days apart).
    """
    out = []
    for i in range(n_dates):
        platform = "landsat-8" if i % 2 == 0 else "landsat-9"
        phase = 0 if platform == "landsat-8" else _CYCLE_DAYS // 2
        target = dt.date(2021 + i, 2, 12)
        first = _L8_REFERENCE + dt.timedelta(days=phase)
        k = round((target - first).days / _CYCLE_DAYS)
        date0 = first + dt.timedelta(days=_CYCLE_DAYS * k)
        for j in range(per_season):
            other = "landsat-9" if platform == "landsat-8" else "landsat-8"
            out.append((date0 + dt.timedelta(days=_SEASON_STEP_DAYS * j), platform if j % 2 == 0 else other, i, j))
    return out


def _item_id(platform: str, row: int, date: dt.date) -> str:
    sensor = "LC08" if platform == "landsat-8" else "LC09"
    return f"{sensor}_L2SP_{WRS_PATH:03d}{row:03d}_{date:%Y%m%d}_02_T1"


def _split_footprints(h: int, w: int) -> tuple[Polygon, Polygon]:
    """Footprints (pixel coordinates) of two consecutive-row scenes that overlap in the middle.

    The scene edge is tilted like a real one; the northern scene reaches 60 % down the grid at
    its centre column, the southern one starts 40 % down, so each sees 60 % of the grid.
    """
    tilt = math.tan(math.radians(_SCENE_TILT_DEG))
    box = shapely.box(0.0, 0.0, float(w), float(h))
    far = 10.0 * (h + w)

    def below(row_at_centre: float) -> Polygon:
        # Rows increase southwards. Scene edges run perpendicular to the SSW-heading descending
        # track, so they drop southwards towards the east (as in real footprints).
        y_west = row_at_centre - tilt * (w / 2.0)
        y_east = row_at_centre + tilt * (w / 2.0)
        return Polygon([(0, y_west), (w, y_east), (w, far), (0, far)])

    south_of_north_edge = below(0.6 * h)
    north = box.difference(south_of_north_edge)
    south = box.intersection(below(0.4 * h))
    return north, south


def _footprint_mask(poly: Polygon, shape: tuple[int, int]) -> np.ndarray:
    """True for pixels whose centre lies in ``poly`` (pixel coordinates)."""
    return features.rasterize(
        [(poly, 1)], out_shape=shape, transform=Affine.identity(), fill=0, dtype="uint8"
    ).astype(bool)


def _to_lonlat(geom: BaseGeometry, transformer: Transformer) -> BaseGeometry:
    def f(xy: np.ndarray) -> np.ndarray:
        lon, lat = transformer.transform(xy[:, 0], xy[:, 1])
        return np.round(np.column_stack([lon, lat]), 7)

    return shapely.transform(shapely.segmentize(geom, 500.0), f)


def _qa_bitfields() -> list[dict[str, Any]]:
    """QA_PIXEL's layout as STAC ``classification:bitfields``, from the bands.py table."""
    out = []
    for f in QA_PIXEL:
        if f.width == 1:
            classes = [
                {"name": f"not_{f.name}", "value": 0},
                {"name": f.name, "value": 1},
            ]
        else:
            classes = [
                {"name": n, "value": v}
                for v, n in enumerate(("not_set", "low", "medium", "high"))
            ]
        entry: dict[str, Any] = {
            "name": f.name,
            "offset": f.bit,
            "length": f.width,
            "classes": classes,
        }
        if f.description:
            entry["description"] = f.description
        out.append(entry)
    return out


def _band_asset_info(band: Band) -> tuple[str, str, str, list[str], dict[str, Any]]:
    """(file suffix, title, description, roles, eo:band) of a band asset."""
    if band.unit == "1":
        suffix = f"SR_B{band.number}"
        title = {
            "coastal": "Coastal/Aerosol Band",
            "blue": "Blue Band",
            "green": "Green Band",
            "red": "Red Band",
            "nir08": "Near Infrared Band 0.8",
            "swir16": "Short-wave Infrared Band 1.6",
            "swir22": "Short-wave Infrared Band 2.2",
        }.get(band.name, f"Band {band.number}")
        desc = f"Collection 2 Level-2 {title} ({suffix}) Surface Reflectance"
        roles = ["data", "reflectance"]
        eo_name = f"OLI_B{band.number}"
    else:
        suffix = f"ST_B{band.number}"
        title = "Surface Temperature Band"
        desc = f"Collection 2 Level-2 Thermal Infrared Band ({suffix}) Surface Temperature"
        roles = ["data", "temperature"]
        eo_name = f"TIRS_B{band.number}"
    eo = {"name": eo_name, "common_name": band.name, "center_wavelength": band.wavelength_um}
    return suffix, title, desc, roles, eo


def _asset_templates() -> dict[str, dict[str, Any]]:
    """Asset definitions (no href) in Planetary Computer's shape, keyed by PC's asset keys."""
    assets: dict[str, dict[str, Any]] = {}
    for band in LANDSAT_C2_L2.bands:
        suffix, title, desc, roles, eo = _band_asset_info(band)
        raster: dict[str, Any] = {
            "scale": band.scale,
            "offset": band.offset,
            "nodata": band.nodata,
            "data_type": band.dtype,
            "spatial_resolution": PIXEL,
        }
        if band.unit == "K":
            raster = {"unit": "kelvin", **raster}
        asset: dict[str, Any] = {
            "type": _COG_MEDIA_TYPE,
            "roles": roles,
            "title": title,
            "description": desc,
            "eo:bands": [eo],
            "raster:bands": [raster],
        }
        if band.unit == "K":
            asset["gsd"] = 100  # TIRS is 100 m, resampled to 30 m by USGS
        assets[band.name] = {"_suffix": suffix, **asset}
    # QA_PIXEL fill pixels hold exactly the value encode_qa_pixel writes for fill.
    qa_fill = int(encode_qa_pixel(fill=True))
    assets["qa_pixel"] = {
        "_suffix": "QA_PIXEL",
        "type": _COG_MEDIA_TYPE,
        "roles": ["cloud", "cloud-shadow", "snow-ice", "water-mask"],
        "title": "Pixel Quality Assessment Band",
        "description": "Collection 2 Level-1 Pixel Quality Assessment Band (QA_PIXEL)",
        "raster:bands": [
            {
                "unit": "bit index",
                "nodata": qa_fill,
                "data_type": "uint16",
                "spatial_resolution": PIXEL,
            }
        ],
        "classification:bitfields": _qa_bitfields(),
    }
    assets["qa_radsat"] = {
        "_suffix": "QA_RADSAT",
        "type": _COG_MEDIA_TYPE,
        "roles": ["saturation"],
        "title": "Radiometric Saturation and Terrain Occlusion Quality Assessment Band",
        "description": (
            "Collection 2 Level-1 Radiometric Saturation and Terrain Occlusion Quality "
            "Assessment Band (QA_RADSAT)"
        ),
        "raster:bands": [{"unit": "bit index", "data_type": "uint16", "spatial_resolution": PIXEL}],
    }
    return assets


_ITEM_EXTENSIONS = [
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "https://stac-extensions.github.io/eo/v1.0.0/schema.json",
    "https://stac-extensions.github.io/view/v1.0.0/schema.json",
    # v1.1.0 is the last projection version with proj:epsg, which stackstac reads.
    "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
    "https://landsat.usgs.gov/stac/landsat-extension/v1.1.1/schema.json",
    "https://stac-extensions.github.io/classification/v1.0.0/schema.json",
]


def _iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------


def _grid(size: int) -> tuple[Affine, tuple[float, float, float, float]]:
    """The region's transform (centred on CENTRE_LONLAT) and its lon/lat bounds."""
    to_utm = Transformer.from_crs("EPSG:4326", CRS, always_xy=True)
    cx, cy = to_utm.transform(*CENTRE_LONLAT)
    half = size * PIXEL / 2.0
    # Landsat grids put pixel corners on multiples of 30 m plus 15 m.
    x0 = math.floor((cx - half - 15.0) / PIXEL) * PIXEL + 15.0
    y0 = math.floor((cy + half - 15.0) / PIXEL) * PIXEL + 15.0
    transform = Affine(PIXEL, 0.0, x0, 0.0, -PIXEL, y0)
    to_ll = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)
    west, south, east, north = to_ll.transform_bounds(
        x0, y0 - size * PIXEL, x0 + size * PIXEL, y0, densify_pts=21
    )
    return (transform, (round(west, 7), round(south, 7), round(east, 7), round(north, 7)))


def _encode(values: np.ndarray, band: Band) -> np.ndarray:
    """Physical values to Collection 2 DNs; 0 is left free for fill."""
    dn = np.rint((values - band.offset) / band.scale)
    return np.clip(dn, 1, 65535).astype(np.uint16)


@dataclass
class _Landscape:
    """Everything that does not change between dates, on the full grid."""

    transform: Affine
    shape: tuple[int, int]
    dem: np.ndarray
    topo: _Topo
    glaciers: list[_Glacier]
    lakes: list[_Lake]
    glacier_ids: np.ndarray
    # Sub-pixel cover fractions.
    clean_ice: np.ndarray
    debris: np.ndarray
    turbid: np.ndarray
    clear: np.ndarray
    land: np.ndarray
    # Per-pixel variation of the surfaces.
    rock_brightness: np.ndarray
    alteration: np.ndarray
    ice_brightness: np.ndarray
    vegetation: np.ndarray  # share of (snow-free) land covered by plants

    @property
    def water(self) -> np.ndarray:
        return self.turbid + self.clear


def _build_landscape(seed: int, size: int, transform: Affine) -> _Landscape:
    shape = (size, size)
    dem = _terrain(_rng(seed, _STREAM_TERRAIN), shape)
    topo = _topography(dem)
    margin = 3 * PIXEL
    inner = shapely.box(
        transform.c + margin,
        transform.f - size * PIXEL + margin,
        transform.c + size * PIXEL - margin,
        transform.f - margin,
    )
    glaciers = _make_glaciers(_rng(seed, _STREAM_GLACIERS), topo, transform, inner)
    lakes = _make_lakes(_rng(seed, _STREAM_LAKES), topo, transform, inner, glaciers)

    # Burn order matters: debris over its glacier; lakes never touch glaciers.
    shapes: list[tuple[BaseGeometry, int]] = [(g.geom, 1) for g in glaciers]
    shapes += [(g.debris, 2) for g in glaciers if g.debris is not None and not g.debris.is_empty]
    shapes += [(lk.geom, 3 if lk.kind == "proglacial" else 4) for lk in lakes]
    cover = _cover_fractions(shapes, (1, 2, 3, 4), transform, shape)
    land = np.clip(1.0 - cover[1] - cover[2] - cover[3] - cover[4], 0.0, 1.0)

    gids = np.zeros(shape, dtype=np.int32)
    if glaciers:
        gids = features.rasterize(
            [(g.geom, k) for k, g in enumerate(glaciers, start=1)],
            out_shape=shape,
            transform=transform,
            fill=0,
            dtype="int32",
        )
    if lakes:
        # Lakes are flat: the lake floor is set to the lowest ground it covers.
        lake_ids = features.rasterize(
            [(lk.geom, k) for k, lk in enumerate(lakes, start=1)],
            out_shape=shape,
            transform=transform,
            fill=0,
            dtype="int32",
        )
        if lake_ids.any():
            levels = ndimage.minimum(dem, lake_ids, index=np.arange(1, len(lakes) + 1))
            levels = np.concatenate([[0.0], np.nan_to_num(np.asarray(levels, dtype=np.float64))])
            inside = lake_ids > 0
            dem[inside] = levels[lake_ids[inside]].astype(np.float32)
            topo = _topography(dem)

    rng = _rng(seed, _STREAM_SURFACE)
    rock = np.exp(0.22 * _noise(rng, shape, 600.0) + 0.10 * _noise(rng, shape, 60.0))
    alteration = np.clip(_noise(rng, shape, 1500.0) - 0.8, 0.0, 1.0)
    ice = np.clip(1.0 + 0.06 * _noise(rng, shape, 90.0), 0.85, 1.12)
    # Bofedal wetlands: in the lowest, flattest valley floors only.
    z_veg = float(np.percentile(dem, 6.0))
    veg = (
        np.clip((z_veg - dem) / 120.0, 0.0, 1.0)
        * np.clip((14.0 - topo.slope_deg) / 8.0, 0.0, 1.0)
        * np.clip(0.5 + 0.5 * _noise(rng, shape, 250.0), 0.0, 1.0)
        * 0.8
    )
    f32 = np.float32
    return _Landscape(
        transform=transform,
        shape=shape,
        dem=dem,
        topo=topo,
        glaciers=glaciers,
        lakes=lakes,
        glacier_ids=gids,
        clean_ice=cover[1],
        debris=cover[2],
        turbid=cover[3],
        clear=cover[4],
        land=land.astype(f32),
        rock_brightness=np.clip(rock, 0.55, 1.7).astype(f32),
        alteration=alteration.astype(f32),
        ice_brightness=ice.astype(f32),
        vegetation=veg.astype(f32),
    )


@dataclass
class _Scene:
    """One date on the full grid: what covers each pixel, the light, the truth and the QA."""

    sun_elevation: float
    sun_azimuth: float
    covered: np.ndarray  # pixels inside at least one item footprint
    visible: dict[str, np.ndarray]  # fraction of each truth class seen from above the cloud
    cloud: np.ndarray  # cloud opacity 0-1
    cloud_brightness: np.ndarray
    shadow: np.ndarray  # cloud-shadow strength 0-1
    direct: np.ndarray  # direct-light factor relative to flat ground
    illumination: np.ndarray  # total light factor incl. diffuse light and cloud shadow
    snow_brightness: float
    truth: np.ndarray
    ice_fraction: np.ndarray
    qa: dict[str, np.ndarray]  # encode_qa_pixel keyword -> layer (without fill)
    surface: str = "classic"
    #: "seasonal" only: share of the visible snow that is clean snow (the rest is firn), and the
    #: per-pixel brightness of snow and ice (the date's factor times a smooth field).
    snow_clean: np.ndarray | None = None
    snow_factor: np.ndarray | None = None
    ice_factor: np.ndarray | None = None


#: Order of the stack whose arg-max is the truth class (ties go to the earlier class).
_SURFACE_CLASSES = ("rock", "ice", "snow", "water", "debris", "vegetation")


def _render_scene(
    land: _Landscape,
    rng: np.random.Generator,
    sun_elevation: float,
    sun_azimuth: float,
    covered: np.ndarray,
    surface: str = "classic",
) -> _Scene:
    shape = land.shape
    size = shape[0]
    topo = land.topo

    # Seasonal snow: patchy, more of it high up and on shaded south-facing slopes.
    snow_target = float(rng.uniform(0.04, 0.12))
    field = (
        0.8 * _noise(rng, shape, 450.0)
        + 0.35 * _noise(rng, shape, 100.0)
        + 0.9 * _standardise(land.dem)
        + 2.0 * topo.southness
    )
    dry = land.water < 0.5
    threshold = float(np.quantile(field[dry], 1.0 - snow_target)) if dry.any() else np.inf
    snow = np.clip(0.5 + (field - threshold) / 0.5, 0.0, 1.0).astype(np.float32)
    del field
    snow_brightness = float(rng.uniform(0.85, 1.0))

    # Cumulus: threshold a smooth field at the quantile that gives the drawn cover; opacity
    # ramps up over the edges, so thin margins exist. The field is drawn on a padded grid so
    # that clouds just outside the region can cast shadows into it.
    cover = float(rng.uniform(0.02, 0.25))
    height = float(rng.uniform(1500.0, 3000.0))
    reach = height / math.tan(math.radians(sun_elevation)) / PIXEL
    d_row = int(round(math.cos(math.radians(sun_azimuth)) * reach))
    d_col = int(round(-math.sin(math.radians(sun_azimuth)) * reach))
    pad = max(abs(d_row), abs(d_col)) + 1
    pshape = (size + 2 * pad, size + 2 * pad)
    cfield = (
        _noise(rng, pshape, 550.0)
        + 0.3 * _noise(rng, pshape, 150.0)
        + 0.12 * _noise(rng, pshape, 50.0)
    )
    c_threshold = float(np.quantile(cfield[pad:-pad, pad:-pad], 1.0 - cover))
    opacity = np.clip(0.5 + (cfield - c_threshold) / 0.35, 0.0, 1.0).astype(np.float32)
    del cfield
    cloud = opacity[pad:-pad, pad:-pad].copy()
    # A cloud above pixel (r, c) shades the ground at (r + d_row, c + d_col), away from the sun
    # (terrain height under the cloud is ignored).
    shadow = opacity[pad - d_row : pad - d_row + size, pad - d_col : pad - d_col + size].copy()
    del opacity
    cloud_brightness = np.clip(0.92 + 0.06 * _noise(rng, shape, 150.0), 0.8, 1.05)

    seasonal: dict[str, np.ndarray] = {}
    if surface == "seasonal":
        snow_glacier, snow_ground, seasonal = _seasonal_snow(land, rng, snow)
    else:
        snow_glacier = snow_ground = snow
    open_ice = land.clean_ice * (1.0 - snow_glacier)
    if surface == "seasonal":
        glacier_snow = (land.clean_ice + land.debris) * snow_glacier + land.land * snow_ground
    else:
        glacier_snow = snow * (1.0 - land.water)
    visible = {
        "rock": land.land * (1.0 - snow_ground) * (1.0 - land.vegetation),
        "ice": open_ice,
        "snow": glacier_snow,
        "water": land.water,
        "debris": land.debris * (1.0 - snow_glacier),
        "vegetation": land.land * (1.0 - snow_ground) * land.vegetation,
    }
    codes = np.array([CLASS_CODES[k] for k in _SURFACE_CLASSES], dtype=np.uint8)
    truth = codes[np.argmax(np.stack([visible[k] for k in _SURFACE_CLASSES]), axis=0)]
    is_cloud = cloud >= 0.5
    truth[(shadow >= 0.5) & ~is_cloud] = CLASS_CODES["cloud_shadow"]
    truth[is_cloud] = CLASS_CODES["cloud"]
    truth[~covered] = CLASS_CODES["fill"]
    ice_fraction = np.where(covered, open_ice * (1.0 - cloud), np.nan).astype(np.float32)

    # Fmask-like QA: thin cloud edges (opacity 0.5-0.6) go undetected, detected cloud is grown
    # by 3 pixels into "dilated cloud", and patches of shadow (about 16 %) are missed. QA is
    # made once for the whole pass, so overlapping scenes of one date agree pixel for pixel.
    qa_cloud = cloud >= 0.6
    grown = ndimage.binary_dilation(qa_cloud, structure=np.ones((3, 3), bool), iterations=3)
    missed = _noise(rng, shape, 250.0) > 1.0
    qa = {
        "cloud": qa_cloud,
        "dilated_cloud": grown & ~qa_cloud,
        "cloud_shadow": (truth == CLASS_CODES["cloud_shadow"]) & ~missed,
        "snow": (truth == CLASS_CODES["ice"]) | (truth == CLASS_CODES["snow"]),
        "water": truth == CLASS_CODES["water"],
    }

    direct = np.clip(topo.cos_incidence(sun_elevation, sun_azimuth), 0.0, None)
    # Relative to flat ground; capped, since steep sunward slopes would otherwise glare.
    direct = np.minimum(direct / np.float32(math.sin(math.radians(sun_elevation))), 1.6)
    illumination = _DIFFUSE + (1.0 - _DIFFUSE) * direct * (1.0 - _SHADOW_DEPTH * shadow)
    return _Scene(
        sun_elevation=sun_elevation,
        sun_azimuth=sun_azimuth,
        covered=covered,
        visible=visible,
        cloud=cloud,
        cloud_brightness=cloud_brightness.astype(np.float32),
        shadow=shadow,
        direct=direct.astype(np.float32),
        illumination=illumination.astype(np.float32),
        snow_brightness=snow_brightness,
        truth=truth,
        ice_fraction=ice_fraction,
        qa=qa,
        surface=surface,
        **seasonal,
    )


def _ramp(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def _seasonal_snow(
    land: _Landscape, rng: np.random.Generator, patches: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Snow of one date of the "seasonal" surface: (on glaciers, on the ground, spectra fields).

    A date is either in the melt season (probability ``1 - _P_FRESH_SNOW``) or just after a
    snowfall. In the melt season the glacier snowline lies at a random quantile (5-95 %) of the
    glaciers' elevations, so the accumulation area (snow above it) covers 5-95 % of the glacier
    area and the snowline moves between dates and years; a band of firn (30-200 m of height)
    lies just above it. The ground's snow melts earlier: its snowline lies 100-500 m higher,
    plus the shaded patches of the classic surface (``patches``). After a snowfall, fresh
    (brighter) snow covers glacier and ground alike above an elevation anywhere from the
    valley floors to mid-slopes. Snowlines are not contours: a smooth 40 m field shifts them.
    """
    shape = land.shape
    on_glacier = land.glacier_ids > 0
    dry = land.water < 0.5
    z = land.dem
    z_glacier = z[on_glacier] if on_glacier.any() else z[dry] if dry.any() else z.ravel()
    jitter = (40.0 * _noise(rng, shape, 300.0)).astype(np.float32)
    zj = z + jitter
    if rng.uniform() < _P_FRESH_SNOW:
        z_line = float(np.quantile(z[dry] if dry.any() else z, rng.uniform(0.05, 0.6)))
        snow_glacier = _ramp((zj - z_line) / 30.0)
        snow_ground = snow_glacier
        clean = np.ones(shape, np.float32)
        factor = float(rng.uniform(1.0, 1.25))
    else:
        z_line = float(np.quantile(z_glacier, rng.uniform(0.05, 0.95)))
        snow_glacier = _ramp((zj - z_line) / 30.0)
        z_ground = z_line + float(rng.uniform(*_GROUND_SNOWLINE_M))
        snow_ground = np.maximum(_ramp((zj - z_ground) / 30.0), patches)
        clean = _ramp((zj - z_line) / float(rng.uniform(30.0, 200.0)))
        factor = float(rng.uniform(0.75, 1.15))
    snow_factor = factor * np.clip(1.0 + 0.08 * _noise(rng, shape, 200.0), 0.8, 1.2)
    # Bare ice: from clean blue ice to dusty, cryoconite-rich ice, per date.
    ice_factor = float(rng.uniform(0.75, 1.3))
    fields = {"snow_clean": clean, "snow_factor": snow_factor.astype(np.float32),
              "ice_factor": np.full(shape, ice_factor, np.float32)}
    return snow_glacier, snow_ground, fields


def _reflectance(
    land: _Landscape, scene: _Scene, band_index: int, rng: np.random.Generator
) -> np.ndarray:
    """Surface reflectance of one OLI band: mixed spectra, light, cloud, sensor noise."""
    seasonal = scene.surface == "seasonal"
    sp = {k: np.float32(v[band_index]) for k, v in (_SEASONAL_SPECTRA if seasonal else _SPECTRA).items()}
    vis = scene.visible
    tint = np.float32(_ALTERATION_TINT[band_index])
    if seasonal:
        if scene.ice_factor is None or scene.snow_clean is None or scene.snow_factor is None:
            raise RuntimeError("a seasonal scene is drawn with its snow and ice factors")
        ice = sp["ice"] * land.ice_brightness * scene.ice_factor
        snow = (sp["snow"] * scene.snow_clean + sp["firn"] * (1.0 - scene.snow_clean)) * scene.snow_factor
    else:
        ice = sp["ice"] * land.ice_brightness
        snow = sp["snow"] * np.float32(scene.snow_brightness)
    surface = (
        vis["ice"] * ice
        + vis["snow"] * snow
        + land.turbid * sp["water_turbid"]
        + land.clear * sp["water_clear"]
        + vis["debris"] * (sp["debris"] * land.rock_brightness)
        + vis["vegetation"] * sp["vegetation"]
        + vis["rock"] * (sp["rock"] * land.rock_brightness * (1.0 + land.alteration * tint))
    )
    rho = (1.0 - scene.cloud) * surface * scene.illumination
    rho += scene.cloud * (sp["cloud"] * scene.cloud_brightness)
    # Noise grows a little with signal; on the darkest shaded pixels it can go below zero.
    rho += rng.standard_normal(land.shape, dtype=np.float32) * (0.0025 + 0.01 * np.abs(rho))
    return rho.astype(np.float32, copy=False)


def _temperature(land: _Landscape, scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Surface temperature (K): class mix, warmer in sun, cooler with height, cold cloud tops.

    TIRS sees about 100 m; USGS delivers ST_B10 resampled to 30 m, so the field is blurred.
    """
    vis = scene.visible
    lapse = _LAPSE_K_PER_M * (land.dem - 4500.0)
    melting = np.float32(273.0)
    t = (
        vis["rock"] * (_TEMPERATURE["rock"] + 10.0 * scene.direct + lapse)
        + vis["ice"] * np.minimum(_TEMPERATURE["ice"] + 0.5 * lapse, melting)
        + vis["snow"] * np.minimum(_TEMPERATURE["snow"] + 0.5 * lapse, melting)
        # Lakes are mixed and near their summer temperature whatever their height.
        + vis["water"] * _TEMPERATURE["water"]
        + vis["debris"] * (_TEMPERATURE["debris"] + 6.0 * scene.direct + lapse)
        + vis["vegetation"] * (_TEMPERATURE["vegetation"] + 4.0 * scene.direct + lapse)
    )
    t = t - 6.0 * scene.shadow
    t = (1.0 - scene.cloud) * t + scene.cloud * _TEMPERATURE["cloud"]
    t = ndimage.gaussian_filter(t.astype(np.float32), 1.2)
    t += 0.3 * rng.standard_normal(land.shape, dtype=np.float32)
    return t


def _saturated(coastal: np.ndarray, snow: np.ndarray) -> np.ndarray:
    """A handful of the brightest snow pixels, where OLI's bands 1 and 2 would saturate."""
    out = np.zeros(coastal.shape, dtype=bool)
    candidates = np.flatnonzero(snow.ravel())
    if candidates.size == 0:
        return out
    n = min(int(np.clip(coastal.size // 40000, 3, 50)), candidates.size)
    brightest = candidates[np.argpartition(coastal.ravel()[candidates], -n)[-n:]]
    out.ravel()[brightest] = True
    return out


def _date_items(
    date: dt.date,
    platform: str,
    size: int,
    split: bool,
    sun_elevation: float,
    sun_azimuth: float,
) -> list[_ItemSpec]:
    t0 = dt.datetime.combine(date, _ACQ_TIME, tzinfo=dt.timezone.utc)
    if not split:
        full = shapely.box(0.0, 0.0, float(size), float(size))
        row_id = _item_id(platform, WRS_ROW, date)
        return [_ItemSpec(row_id, platform, WRS_ROW, t0, full, sun_elevation, sun_azimuth)]
    north, south = _split_footprints(size, size)
    return [
        _ItemSpec(
            _item_id(platform, WRS_ROW, date), platform, WRS_ROW, t0, north,
            sun_elevation, sun_azimuth,
        ),
        _ItemSpec(
            _item_id(platform, WRS_ROW + 1, date),
            platform,
            WRS_ROW + 1,
            t0 + dt.timedelta(seconds=_ROW_SECONDS),
            south,
            # The next scene south sees the sun a little lower and further north.
            sun_elevation - 0.35,
            sun_azimuth - 0.8,
        ),
    ]


def _generate(
    root: Path,
    *,
    size: int,
    n_dates: int,
    seed: int,
    split_first_date: bool,
    generator_version: int,
    per_season: int = 1,
    surface: str = "classic",
) -> dict[str, Any]:
    """Write every file of a region into ``root`` and return the content of sample.json."""
    t_start = time.perf_counter()
    shape = (size, size)
    transform, bbox = _grid(size)
    tf6 = (transform.a, transform.b, transform.c, transform.d, transform.e, transform.f)
    to_ll = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)
    files: list[str] = []

    def cog(rel: str, array: np.ndarray, **kw: Any) -> None:
        # 256-pixel tiles; write_cog shrinks them for small regions so they still get overviews.
        write_cog(root / rel, array, transform=transform, crs=CRS, blocksize=256, **kw)
        files.append(rel)

    if tuple(REFLECTIVE_BANDS) != _SPECTRA_BANDS:  # pragma: no cover - a sensor-table edit
        raise RuntimeError("bands.REFLECTIVE_BANDS changed; update sample._SPECTRA")

    land = _build_landscape(seed, size, transform)
    cog("dem.tif", land.dem, band_names=["elevation"])
    (root / "truth").mkdir(exist_ok=True)
    cog(
        "truth/glacier_id.tif",
        land.glacier_ids,
        overview_resampling="nearest",
        band_names=["glacier_id"],
    )
    _write_outlines(root / "glaciers.gpkg", land.glaciers, land.lakes)
    files.append("glaciers.gpkg")

    templates = _asset_templates()
    coll_dir = root / COLLECTION_ID
    coll_dir.mkdir(exist_ok=True)
    items: list[tuple[str, dict[str, Any]]] = []
    datetimes: list[str] = []

    if per_season > 1:
        # The glaciers are the landscape's: the same every year of this generator.
        for year in sorted({d.year for d, *_ in _acquisition_dates(n_dates, per_season)}):
            cog(f"truth/{year:04d}_glacier_ice_fraction.tif", land.clean_ice.astype(np.float32),
                band_names=["glacier_ice_fraction"])

    for di, (date, platform, year_index, k_season) in enumerate(_acquisition_dates(n_dates, per_season)):
        if k_season == 0:
            rng = _rng(seed, _STREAM_DATE + year_index)
        else:
            rng = np.random.default_rng(np.random.SeedSequence([seed, _STREAM_DATE + year_index, k_season]))
        sun_el = float(rng.uniform(55.0, 60.0))
        sun_az = float(rng.uniform(60.0, 80.0))
        specs = _date_items(date, platform, size, di == 0 and split_first_date, sun_el, sun_az)
        datetimes.append(_iso(specs[0].datetime))
        masks = [_footprint_mask(s.footprint_px, shape) for s in specs]
        scene = _render_scene(land, rng, sun_el, sun_az, np.logical_or.reduce(masks), surface=surface)

        day = f"{date:%Y-%m-%d}"
        cog(
            f"truth/{day}_class.tif",
            scene.truth,
            nodata=CLASS_CODES["fill"],
            overview_resampling="nearest",
            band_names=["class"],
        )
        cog(
            f"truth/{day}_ice_fraction.tif",
            scene.ice_fraction,
            nodata=float("nan"),
            band_names=["ice_fraction"],
        )

        for s in specs:
            (coll_dir / s.id).mkdir(exist_ok=True)

        def write_band(key: str, full: np.ndarray, fill: int, **kw: Any) -> None:
            # Both items of a split date are cut from one full-grid array: scenes of the same
            # pass hold identical values where they overlap, as real ones do.
            for s, m in zip(specs, masks):
                suffix = templates[key]["_suffix"]
                arr = np.where(m, full, full.dtype.type(fill))
                cog(f"{COLLECTION_ID}/{s.id}/{s.id}_{suffix}.TIF", arr, band_names=[key], **kw)

        saturated = np.zeros(shape, dtype=bool)
        for bi, name in enumerate(REFLECTIVE_BANDS):
            band = LANDSAT_C2_L2.band(name)
            rho = _reflectance(land, scene, bi, rng)
            if bi == 0:
                saturated = _saturated(rho, (scene.truth == CLASS_CODES["snow"]) & scene.covered)
            dn = _encode(rho, band)
            if band.number in (1, 2):
                dn[saturated] = 65535
            write_band(name, dn, band.nodata)
        lwir = LANDSAT_C2_L2.band("lwir11")
        write_band("lwir11", _encode(_temperature(land, scene, rng), lwir), lwir.nodata)
        # QA_RADSAT bit n-1 flags saturation of band n.
        radsat = np.where(saturated, np.uint16(0b11), np.uint16(0))
        write_band("qa_radsat", radsat, 0, overview_resampling="nearest")

        for s, m in zip(specs, masks):
            qa = encode_qa_pixel(fill=~m, **scene.qa)
            cog(
                f"{COLLECTION_ID}/{s.id}/{s.id}_QA_PIXEL.TIF",
                qa,
                overview_resampling="nearest",
                band_names=["qa_pixel"],
            )
            in_cloud = scene.truth[m] == CLASS_CODES["cloud"]
            cloud_cover = round(100.0 * float(in_cloud.mean()), 2) if in_cloud.size else 0.0
            item = _item_json(s, templates, tf6, shape, to_ll, transform, cloud_cover, date)
            items.append((s.id, item))
            rel = f"{COLLECTION_ID}/{s.id}/{s.id}.json"
            _write_json(root / rel, item)
            files.append(rel)

    _write_collection(coll_dir, items, bbox, datetimes, templates)
    _write_json(
        root / "catalog.json",
        {
            "type": "Catalog",
            "id": "icemap-sample",
            "stac_version": "1.0.0",
            "title": "icemap sample region",
            "description": (
                "A procedurally generated Landsat 8/9 Collection 2 Level-2 glacier region in the "
                "Dry Andes (icemap.sample). Not real data: for demos, tests and benchmarks."
            ),
            "links": [
                {"rel": "root", "href": "./catalog.json", "type": "application/json"},
                {
                    "rel": "child",
                    "href": f"./{COLLECTION_ID}/collection.json",
                    "type": "application/json",
                },
            ],
        },
    )
    files += ["catalog.json", f"{COLLECTION_ID}/collection.json"]

    return {
        "icemap_sample": GENERATOR_VERSION,
        "params": {
            "size": size,
            "n_dates": n_dates,
            "seed": seed,
            "split_first_date": split_first_date,
            "generator_version": generator_version,
            **({"per_season": per_season} if per_season != 1 else {}),
            **({"surface": surface} if surface != "classic" else {}),
        },
        "crs": CRS,
        "transform": list(tf6),
        "shape": list(shape),
        "bbox": list(bbox),
        "datetimes": datetimes,
        "item_ids": [iid for iid, _ in items],
        "collection": COLLECTION_ID,
        "class_codes": CLASS_CODES,
        "n_glaciers": len(land.glaciers),
        "glacier_area_km2": round(sum(g.geom.area for g in land.glaciers) / 1e6, 4),
        "debris_area_km2": round(
            sum(g.debris.area for g in land.glaciers if g.debris is not None) / 1e6, 4
        ),
        "n_lakes": len(land.lakes),
        "generation_seconds": round(time.perf_counter() - t_start, 2),
        "files": files,
    }


def _item_json(
    spec: _ItemSpec,
    templates: Mapping[str, Mapping[str, Any]],
    tf6: Sequence[float],
    shape: tuple[int, int],
    to_ll: Transformer,
    transform: Affine,
    cloud_cover: float,
    date: dt.date,
) -> dict[str, Any]:
    t = transform
    footprint = shapely.affinity.affine_transform(
        spec.footprint_px, [t.a, t.b, t.d, t.e, t.c, t.f]
    )
    # GeoJSON wants exterior rings counter-clockwise; the y flip of the transform reversed it.
    geom_ll = shapely.geometry.polygon.orient(_to_lonlat(footprint, to_ll), 1.0)
    assets = {}
    for key, tpl in templates.items():
        asset = {k: v for k, v in tpl.items() if not k.startswith("_")}
        assets[key] = {"href": f"./{spec.id}_{tpl['_suffix']}.TIF", **asset}
    sensor = "8" if spec.platform == "landsat-8" else "9"
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": _ITEM_EXTENSIONS,
        "id": spec.id,
        "collection": COLLECTION_ID,
        "bbox": [round(v, 7) for v in geom_ll.bounds],
        "geometry": shapely.geometry.mapping(geom_ll),
        "properties": {
            "datetime": _iso(spec.datetime),
            "platform": spec.platform,
            "instruments": ["oli", "tirs"],
            "description": "Landsat Collection 2 Level-2 (procedurally generated icemap sample)",
            "gsd": PIXEL,
            "eo:cloud_cover": cloud_cover,
            "proj:epsg": EPSG,
            "proj:shape": list(shape),
            "proj:transform": list(tf6),
            "view:off_nadir": 0,
            "view:sun_elevation": round(spec.sun_elevation, 6),
            "view:sun_azimuth": round(spec.sun_azimuth, 6),
            "landsat:wrs_type": "2",
            "landsat:wrs_path": f"{WRS_PATH:03d}",
            "landsat:wrs_row": f"{spec.row:03d}",
            "landsat:scene_id": f"LC{sensor}{WRS_PATH:03d}{spec.row:03d}{date:%Y%j}LGN00",
            "landsat:collection_category": "T1",
            "landsat:collection_number": "02",
            "landsat:correction": "L2SP",
        },
        "links": [
            {"rel": "root", "href": "../../catalog.json", "type": "application/json"},
            {"rel": "parent", "href": "../collection.json", "type": "application/json"},
            {"rel": "collection", "href": "../collection.json", "type": "application/json"},
        ],
        "assets": assets,
    }


def _write_collection(
    coll_dir: Path,
    items: Sequence[tuple[str, Mapping[str, Any]]],
    bbox: Sequence[float],
    datetimes: Sequence[str],
    templates: Mapping[str, Mapping[str, Any]],
) -> None:
    item_assets = {
        key: {k: v for k, v in tpl.items() if not k.startswith("_")}
        for key, tpl in templates.items()
    }
    links = [
        {"rel": "root", "href": "../catalog.json", "type": "application/json"},
        {"rel": "parent", "href": "../catalog.json", "type": "application/json"},
    ]
    links += [
        {"rel": "item", "href": f"./{iid}/{iid}.json", "type": "application/geo+json"}
        for iid, _ in items
    ]
    platforms = sorted({str(item["properties"]["platform"]) for _, item in items})
    _write_json(
        coll_dir / "collection.json",
        {
            "type": "Collection",
            "id": COLLECTION_ID,
            "stac_version": "1.0.0",
            "stac_extensions": [
                "https://stac-extensions.github.io/item-assets/v1.0.0/schema.json",
                "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
                "https://stac-extensions.github.io/eo/v1.0.0/schema.json",
                "https://stac-extensions.github.io/view/v1.0.0/schema.json",
                "https://stac-extensions.github.io/classification/v1.0.0/schema.json",
            ],
            "title": "Landsat Collection 2 Level-2 (icemap procedural sample)",
            "description": (
                "A procedurally generated sample in the shape of Planetary Computer's "
                "landsat-c2-l2 collection: Landsat 8/9 OLI/TIRS Collection 2 Level-2 surface "
                "reflectance, surface temperature and QA bands over a synthetic glacier region "
                "in the Dry Andes of Chile, with known truth. Generated by icemap.sample; it is "
                "not an observation of the real Earth."
            ),
            "license": "PDDL-1.0",
            "keywords": ["Landsat", "glacier", "synthetic", "sample"],
            "providers": [{"name": "icemap", "roles": ["producer", "processor"]}],
            "extent": {
                "spatial": {"bbox": [list(bbox)]},
                "temporal": {"interval": [[datetimes[0], datetimes[-1]]]},
            },
            "summaries": {"platform": platforms, "instruments": ["oli", "tirs"], "gsd": [PIXEL]},
            "item_assets": item_assets,
            "links": links,
        },
    )


def _write_outlines(path: Path, glaciers: Sequence[_Glacier], lakes: Sequence[_Lake]) -> None:
    glacier_df = gpd.GeoDataFrame(
        {
            "gid": np.arange(1, len(glaciers) + 1, dtype=np.int32),
            "glacier_id": [f"SAMPLE-{k:05d}" for k in range(1, len(glaciers) + 1)],
            "kind": [g.kind for g in glaciers],
            "area_km2": [g.geom.area / 1e6 for g in glaciers],
            "debris_km2": [0.0 if g.debris is None else g.debris.area / 1e6 for g in glaciers],
        },
        geometry=[g.geom for g in glaciers],
        crs=CRS,
    )
    debris = [
        (k, g.debris)
        for k, g in enumerate(glaciers, start=1)
        if g.debris is not None and not g.debris.is_empty
    ]
    debris_df = gpd.GeoDataFrame(
        {"gid": np.array([k for k, _ in debris], dtype=np.int32)},
        geometry=[d for _, d in debris],
        crs=CRS,
    )
    lakes_df = gpd.GeoDataFrame(
        {
            "lake_id": np.arange(1, len(lakes) + 1, dtype=np.int32),
            "kind": [lk.kind for lk in lakes],
            "area_km2": [lk.geom.area / 1e6 for lk in lakes],
        },
        geometry=[lk.geom for lk in lakes],
        crs=CRS,
    )
    # GDAL wants the .gpkg extension even on the temporary file.
    with atomic_path(path, side_files=("-journal", "-wal", "-shm")) as tmp:
        glacier_df.to_file(tmp, layer="glaciers", driver="GPKG")
        debris_df.to_file(tmp, layer="debris", driver="GPKG", mode="a")
        lakes_df.to_file(tmp, layer="lakes", driver="GPKG", mode="a")
