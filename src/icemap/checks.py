"""Checks on items and grids made before (and right after) a cube is stacked.

:func:`icemap.load` builds its grid from item metadata and hands it to a loader engine (odc-stac
or stackstac). Several real inputs used to fall through to a raw numpy/dask error there: stackstac silently drops items and
bands whose assets lie outside the requested bounds, and the loader's per-item scale arrays
then no longer match the stack (``operands could not be broadcast together with shapes
(0, 0, 4735, 4605) (2, 7, 1, 1)``). The functions here turn each such case into an
:class:`~icemap.errors.IcemapError` that names the fix, or a typed warning, and keep the item
metadata consistent with what stackstac actually stacked.

They only read metadata: no pixel is touched.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from rasterio.errors import RasterioError
from rasterio.warp import transform_bounds
from shapely.errors import GEOSException
from shapely.geometry import box, shape
from shapely.ops import unary_union

from icemap.bands import Sensor
from icemap.errors import GridError, LoadError, MissingAssetWarning, MixedCRSWarning

__all__ = [
    "METHOD_BANDS",
    "default_bands",
    "check_bbox_hits_footprints",
    "check_grid",
    "warn_mixed_crs",
    "match_stacked",
    "keep_overlapping",
    "bbox_polygons",
    "project_bbox",
    "raster_number",
    "user_scale_offset",
    "MAX_GRID_PX",
    "MAX_GRID_CHUNKS",
]

#: The bands each ice-mapping method cannot do without. NDSI is the default method, so a cube
#: loaded with the default band set must hold these.
METHOD_BANDS: dict[str, tuple[str, ...]] = {"ndsi": ("green", "swir16")}

#: Above this many pixels per band and date, an implicitly chosen grid gets a warning.
_LARGE_GRID_PX = 20_000 * 20_000


def _reflective(sensor: Sensor) -> list[str]:
    return [b.name for b in sensor.bands if b.unit == "1"]


def default_bands(items: Sequence[Mapping[str, Any]], sensor: Sensor, method: str = "ndsi") -> list[str]:
    """The sensor's reflective bands that at least one item holds, in table order.

    Partial products are common (a tutorial crop with six bands, an HLS download without the
    coastal band): asking for every band of the table would refuse them although the method
    needs only a few. Missing bands are named in one :class:`MissingAssetWarning`; only the
    method's own bands (:data:`METHOD_BANDS`) are required.
    """
    wanted = _reflective(sensor)
    present = [b for b in wanted if any(sensor.find_asset(it.get("assets") or {}, b) for it in items)]
    missing = [b for b in wanted if b not in present]
    needed = [b for b in METHOD_BANDS.get(method, ()) if b in wanted]
    lacking = [b for b in needed if b not in present]
    if lacking:
        keys = "; ".join(f"{b}: {', '.join(sensor.band(b).asset_keys)}" for b in lacking)
        raise LoadError(
            f"no item has {', '.join(lacking)}, which {method.upper()} needs (asset keys looked for: {keys}); "
            f"check the items' asset names, pass sensor= for this collection, or use items that hold them"
        )
    if missing:
        warnings.warn(
            f"the items hold no {', '.join(missing)}; the cube has the other {sensor.name} bands "
            f"({', '.join(present)}). Pass bands= (CLI --bands) to choose them yourself",
            MissingAssetWarning,
            stacklevel=3,
        )
    return present


def bbox_polygons(bbox: Sequence[float]) -> list[Any]:
    """A lon/lat bbox as shapely boxes; one across the antimeridian (west > east) as two."""
    w, s, e, n = (float(v) for v in bbox)
    if w > e:
        return [box(w, s, 180.0, n), box(-180.0, s, e, n)]
    return [box(w, s, e, n)]


def _footprint(item: Mapping[str, Any]) -> Any:
    """The item's lon/lat footprint, or None where a planar lon/lat test would be wrong.

    Footprints that cross the antimeridian or enclose a pole (a span of more than 180 degrees
    of longitude in one ring) are left to the grid test in projected coordinates.
    """
    geom = item.get("geometry")
    try:
        poly = shape(geom) if geom else (box(*item["bbox"][:2], *item["bbox"][-2:]) if item.get("bbox") else None)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, GEOSException):
        return None  # malformed GeoJSON: no footprint test, the grid test still applies
    if poly is None or poly.is_empty:
        return None
    w, _, e, _ = poly.bounds
    if e - w > 180:
        return None
    return poly if poly.is_valid else poly.buffer(0)


def check_bbox_hits_footprints(items: Sequence[Mapping[str, Any]], bbox: Sequence[float]) -> None:
    """Refuse a lon/lat bbox that touches no item's real footprint (its geometry).

    An item's bbox is a rectangle around a rotated Landsat path/row; a box in its corner
    overlaps the bbox but holds no pixel. Loading it would give a cube of NaN only.
    """
    boxes = bbox_polygons(bbox)
    prints = [_footprint(it) for it in items]
    if any(p is None for p in prints):
        return  # cannot decide in lon/lat for some item: the projected test decides
    if any(p.intersects(b) for p in prints for b in boxes):
        return

    w, s, e, n = unary_union(prints).bounds
    raise GridError(
        f"bbox {tuple(float(v) for v in bbox)} misses the footprints of all {len(items)} item(s), which "
        f"cover lon {w:.4f}..{e:.4f}, lat {s:.4f}..{n:.4f} (their geometry, not just their bbox); "
        "move or widen bbox= (CLI --bbox) or search with the same bbox"
    )


def project_bbox(bbox: Sequence[float], epsg: int) -> tuple[float, float, float, float]:
    """A lon/lat bbox (west > east crosses the antimeridian) as bounds in ``EPSG:epsg``.

    GDAL's bounds transformation densifies the edges and handles the antimeridian and polar
    CRSs (EPSG:3031, 3413); where it cannot project the box at all, the error names the fix
    instead of a raw rasterio/pyproj exception.
    """
    w, s, e, n = (float(v) for v in bbox)
    if not (-90 <= s < n <= 90 and -180 <= w <= 180 and -180 <= e <= 180 and w != e):
        raise GridError(f"bbox {tuple(bbox)} is not WEST SOUTH EAST NORTH in degrees (west > east crosses the antimeridian)")
    try:
        out = transform_bounds("EPSG:4326", f"EPSG:{epsg}", w, s, e, n, densify_pts=21)
    except (RasterioError, ValueError, RuntimeError) as exc:
        raise GridError(
            f"cannot project bbox {tuple(bbox)} to EPSG:{epsg} ({exc}); pass crs= (CLI --crs) suited to the "
            "region, e.g. EPSG:3031 near the South Pole, EPSG:3413 in the Arctic, or the UTM zone"
        ) from None
    if not all(math.isfinite(v) for v in out):
        raise GridError(
            f"bbox {tuple(bbox)} has no finite extent in EPSG:{epsg}; pass crs= (CLI --crs) suited to the "
            "region, e.g. EPSG:3031 near the South Pole, EPSG:3413 in the Arctic, or the UTM zone"
        )
    return out


def raster_number(value: Any, what: str, asset: Mapping[str, Any]) -> float | None:
    """A ``raster:bands`` scale/offset/nodata as a float (None when absent), or a LoadError.

    Catalogs get these wrong (strings, nulls, lists); a bad one would otherwise surface as a
    numpy error while the per-band scale arrays are filled. NaN is a valid nodata.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (what != "nodata" and not math.isfinite(value)):
        if isinstance(value, str) and what == "nodata" and value.lower() in ("nan", "inf", "-inf"):
            return float(value)
        raise LoadError(
            f"asset {asset.get('href', '?')} states raster:bands {what}={value!r}, which is not a number; fix the "
            "item's raster:bands (or drop them to use the sensor table's values)"
        )
    if what == "scale" and value == 0:
        raise LoadError(f"asset {asset.get('href', '?')} states raster:bands scale=0; fix the item's raster:bands")
    return float(value)


#: Reflectance = DN * scale + offset. Scales outside this range (and offsets beyond +-1) cannot
#: give reflectance in 0..1 from any integer or float encoding a sensor uses: 2.75e-5 (Landsat
#: C2), 1e-4 (Sentinel-2), 1e-2 (percent), 1 (already reflectance).
_SCALE_RANGE = (1e-7, 1.0)
_OFFSET_LIMIT = 1.0


def user_scale_offset(scale: Any, offset: Any) -> tuple[float | None, float | None]:
    """Validate a scale/offset a user gives for files that state none.

    A scale without an offset means offset 0: the sensor table's offset (Landsat's -0.2) belongs
    to that sensor's DN encoding, and borrowing it for another file's DNs shifts every pixel.
    Returns ``(scale, offset)`` with that rule applied; ``(None, None)`` when neither is given.
    """
    out: list[float | None] = []
    for name, value in (("scale", scale), ("offset", offset)):
        if value is None:
            out.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise LoadError(f"{name}={value!r} is not a finite number (CLI --{name})")
        out.append(float(value))
    sc, off = out
    if sc is not None and not (_SCALE_RANGE[0] <= sc <= _SCALE_RANGE[1]):
        raise LoadError(
            f"scale={sc!r} (CLI --scale) cannot turn DNs into reflectance: use a positive factor between "
            f"{_SCALE_RANGE[0]:g} and {_SCALE_RANGE[1]:g}, e.g. 0.0001 for Sentinel-2 or 2.75e-05 for Landsat C2"
        )
    if off is not None and abs(off) > _OFFSET_LIMIT:
        raise LoadError(f"offset={off!r} (CLI --offset) is not a reflectance offset; use a value within "
                        f"+-{_OFFSET_LIMIT:g}, e.g. -0.2 for Landsat C2 or 0")
    if sc is not None and off is None:
        off = 0.0
    return sc, off


#: The largest grid a cube may have: 10^12 pixels per band and date is 4 TB of float32, beyond
#: any region icemap maps (Antarctica at 30 m is 2e11); a larger one is a typo in resolution=.
MAX_GRID_PX = 10**12
#: The most spatial chunks per band and date: dask's graph holds one task per chunk and band and
#: date, and past this it takes longer to build than to compute.
MAX_GRID_CHUNKS = 10**6


def check_grid(epsg: int, res: tuple[float, float], bounds: Sequence[float],
               chunksize: int | None = None) -> tuple[int, int]:
    """Width and height of a grid, refusing empty, non-finite or absurd ones with a fix.

    Checked from the numbers alone, before anything is allocated: a tiny resolution or a huge
    extent would otherwise end in a MemoryError (or a graph that never finishes building).
    """
    left, bottom, right, top = (float(v) for v in bounds)
    if not all(math.isfinite(v) for v in (left, bottom, right, top)):
        raise GridError(
            f"the grid bounds {tuple(bounds)} in EPSG:{epsg} are not finite: the bbox or items cannot be "
            f"projected to this CRS; pass crs= (CLI --crs) suited to the region, e.g. EPSG:3031 near the "
            "South Pole, EPSG:3413 in the Arctic, or the UTM zone"
        )
    width = round((right - left) / res[0])
    height = round((top - bottom) / res[1])
    if width < 1 or height < 1:
        raise GridError(
            f"the grid is empty ({width} x {height} px for bounds {tuple(bounds)} in EPSG:{epsg}); "
            "widen bbox=/bounds= or lower resolution="
        )
    if width * height > MAX_GRID_PX:
        raise GridError(
            f"the grid would be {width:,} x {height:,} px per band and date at resolution {res} in EPSG:{epsg}, "
            f"more than {MAX_GRID_PX:.0e}; raise resolution= (CLI --resolution) or narrow bbox= (CLI --bbox)"
        )
    if chunksize is not None:
        n_chunks = math.ceil(width / chunksize) * math.ceil(height / chunksize)
        if n_chunks > MAX_GRID_CHUNKS:
            raise GridError(
                f"the grid ({width:,} x {height:,} px) would have {n_chunks:,} chunks of {chunksize} px per band "
                f"and date, more than {MAX_GRID_CHUNKS:,}; raise chunksize= (CLI --chunksize) or resolution=, "
                "or narrow bbox="
            )
    return width, height


def warn_mixed_crs(
    meta: Sequence[Mapping[str, Any]], epsg: int, res: tuple[float, float], bounds: Sequence[float],
    *, crs_given: bool, extent_given: bool,
) -> None:
    """Warn when items in several CRSs were put on one implicitly chosen grid.

    Twenty items from Tasmania to Antarctica give a union grid of hundreds of thousands of
    pixels a side, reprojected from every zone: almost never what was meant.
    """
    counts = Counter(m.get("epsg") for m in meta if m.get("epsg") is not None)
    if len(counts) < 2 or (crs_given and extent_given):
        return
    width = round((bounds[2] - bounds[0]) / res[0])
    height = round((bounds[3] - bounds[1]) / res[1])
    zones = ", ".join(f"EPSG:{c} ({n})" for c, n in counts.most_common(6))
    advice = []
    if not crs_given:
        advice.append("crs= (CLI --crs) to choose the target CRS")
    if not extent_given:
        advice.append("bbox= (CLI --bbox) to limit the extent")
    size = f"{width:,} x {height:,} px per band and date"
    if width * height > _LARGE_GRID_PX:
        size += f" (~{width * height * 4 / 1e9:,.0f} GB per band and date as float32)"
    warnings.warn(
        f"the items are in {len(counts)} CRSs ({zones}); all are reprojected onto EPSG:{epsg}, a grid of "
        f"{size}. Pass {' and '.join(advice)}, or load each CRS separately",
        MixedCRSWarning,
        stacklevel=3,
    )


def match_stacked(
    stack: Any, clean: list[dict[str, Any]], meta: list[dict[str, Any]], assets: Sequence[str],
    epsg: int, bounds: Sequence[float],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Keep ``clean``/``meta`` in step with what stackstac really stacked.

    stackstac drops, without a word, every item whose assets all lie outside the bounds and
    every asset (band) that lies outside for all items. Items that fall away are dropped here
    too (they hold no pixel of the grid); a grid that no item reaches, or a band that vanished,
    is a :class:`~icemap.errors.GridError` rather than a broadcast error later on.
    """
    n_time = stack.sizes["time"]
    if n_time == 0:
        raise GridError(
            f"none of the {len(clean)} item(s) overlaps the grid {tuple(round(v, 3) for v in bounds)} "
            f"(EPSG:{epsg}); move or widen bbox=/bounds= (CLI --bbox), or leave them out to use the items' extent"
        )
    stacked_bands = [str(b) for b in stack["band"].values]
    if stacked_bands != list(assets):
        lost = [a for a in assets if a not in stacked_bands]
        raise GridError(
            f"the assets {', '.join(lost)} of every item lie outside the grid {tuple(round(v, 3) for v in bounds)} "
            f"(EPSG:{epsg}) although other bands reach it; their items' proj:* metadata disagree. Fix the "
            "items' proj:transform/proj:shape or leave those bands out (bands=)"
        )
    if n_time == len(clean):
        return clean, meta
    ids = [str(i) for i in stack["id"].values]
    keep: list[int] = []
    pos = 0
    # stackstac keeps the order of the items it was given: walk both lists together (ids
    # alone could repeat).
    for i, it in enumerate(clean):
        if pos < len(ids) and it["id"] == ids[pos]:
            keep.append(i)
            pos += 1
    if len(keep) != n_time:
        raise GridError("cannot match the stacked items to the input items; give every item a unique id")
    return [clean[i] for i in keep], [meta[i] for i in keep]


def item_extent(m: Mapping[str, Any], epsg: int) -> tuple[float, float, float, float] | None:
    """An item's extent in ``EPSG:epsg``: its raster grid where stated in that CRS, else its
    lon/lat bbox projected (None when it states neither)."""
    t, shape = m.get("transform"), m.get("shape")
    if m.get("epsg") == epsg and t and shape and len(t) >= 6:
        x0, y0 = float(t[2]), float(t[5])
        x1, y1 = x0 + float(t[0]) * shape[1], y0 + float(t[4]) * shape[0]
        return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)
    b = m.get("bbox")
    if b:
        try:
            return project_bbox((b[0], b[1], b[-2], b[-1]), epsg)
        except GridError:
            return None
    return None


def keep_overlapping(
    clean: list[dict[str, Any]], meta: list[dict[str, Any]], epsg: int, bounds: Sequence[float],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Drop the items that hold no pixel of the grid (strictly outside ``bounds``).

    The rule stackstac applies on its own (:func:`match_stacked` follows it), stated here for
    the odc-stac engine, which would otherwise give such items an all-nodata time step: both
    engines give the same time steps. Items whose extent is unknown are kept.
    """
    left, bottom, right, top = (float(v) for v in bounds)
    keep = []
    for i, m in enumerate(meta):
        ext = item_extent(m, epsg)
        if ext is None or (max(ext[0], left) < min(ext[2], right) and max(ext[1], bottom) < min(ext[3], top)):
            keep.append(i)
    if not keep:
        raise GridError(
            f"none of the {len(clean)} item(s) overlaps the grid {tuple(round(v, 3) for v in bounds)} "
            f"(EPSG:{epsg}); move or widen bbox=/bounds= (CLI --bbox), or leave them out to use the items' extent"
        )
    if len(keep) == len(clean):
        return clean, meta
    return [clean[i] for i in keep], [meta[i] for i in keep]
