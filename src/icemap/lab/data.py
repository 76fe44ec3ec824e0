"""Training data for the U-Net: chips cut from a cube, labels from glacier outlines, a split.

Study a (METHOD.md) trained on one 120 x 120 px image per glacier, centred on it, removed
overlapping images so that no glacier is in two splits, and split the images 80/10/10 by a
Monte-Carlo search that keeps glacier area and shape alike in every set. Study b used 128 x 128
patches. Both studies' future-work sections ask for hard negatives (water, snow, cloud) in
training. This module provides all of it, on any cube :func:`icemap.open_cube` returns:

* :func:`glacier_table`: area, perimeter and shape factor of every outline;
* :func:`scan_cube`: one streaming pass over the cube that counts, per coarse cell and date,
  valid pixels and hard-negative candidates (water, shadow, snow, cloud outside the outlines);
* :func:`make_chips`: glacier-centred, hard-negative and random chip *windows* and their
  samples (window x date), with overlap removal and grouping so no glacier can be in two sets;
* :func:`split_chips`: the stratified Monte-Carlo split with Kolmogorov-Smirnov statistics;
* :class:`ChipSource` and :class:`ChipDataset`: lazy per-chip reads (a window of the cube, the
  labels burnt for that window only), an optional in-memory cache, normalisation and padding
  to the U-Net's multiple, as a ``torch.utils.data.Dataset``.

Chips are *windows* on the cube grid; a *sample* is a window on one date. Everything that is
decided (windows, groups, split) is plain data, so it can be written to JSON and reproduced.
Nothing reads the whole cube into memory: the scan is a dask reduction to coarse counts, and
each chip reads only its own window (dask culls the graph to the chunks the window touches).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import dask
import numpy as np
import pandas as pd
import rasterio
import xarray as xr
from rasterio.features import rasterize
from rasterio.windows import Window as RioWindow
from rasterio.windows import from_bounds
from rasterio.windows import transform as window_transform
from scipy import stats
from shapely import STRtree
from shapely.geometry import box
from shapely.geometry import box as _box

from icemap.dem import dem_on_grid
from icemap.errors import IcemapError, ModelError
from icemap.index import ndsi, ndwi
from icemap.labels import _quiet_rasterize_warning, glacier_ids, rasterize_outlines, read_outlines
from icemap.model.inputs import Normalisation, build_inputs, normalise, required_bands
from icemap.sample import CLASS_CODES

__all__ = [
    "MASK_BUFFERS",
    "HARD_NEGATIVE_CATEGORIES",
    "SETS",
    "OVERLAP_MODES",
    "CHIP_LAYOUTS",
    "GROUPINGS",
    "Window",
    "Sample",
    "ChipIndex",
    "Split",
    "CubeScan",
    "glacier_table",
    "shape_factor",
    "scan_cube",
    "make_chips",
    "split_chips",
    "split_by_year",
    "ChipSource",
    "ChipDataset",
    "fit_normalisation",
    "padded_size",
]

#: Mask types of study a: the outlines as drawn, or grown 15 m outward ("extended").
MASK_BUFFERS: dict[str, float] = {"original": 0.0, "extended": 15.0}

#: Hard-negative categories found by :func:`scan_cube`, in the order chips are drawn.
HARD_NEGATIVE_CATEGORIES: tuple[str, ...] = ("water", "shadow", "snow", "cloud")

#: Overlap handling of :func:`make_chips`.
OVERLAP_MODES: tuple[str, ...] = ("drop", "independent", "group")

#: Chip layouts of :func:`make_chips`: one window per outline, or a grid over the labels.
CHIP_LAYOUTS: tuple[str, ...] = ("outline", "grid")

#: How :func:`make_chips` groups windows (a group goes to one set as a whole).
GROUPINGS: tuple[str, ...] = ("glacier", "location")

#: The three sets of a split.
SETS: tuple[str, str, str] = ("train", "val", "test")

#: Outlines are grown by this much before deciding which glaciers a window touches and which
#: pixels are "outside the glaciers" for hard negatives: the extended mask reaches 15 m out,
#: so anything closer than that counts as touching (conservative for the no-leak rule).
_TOUCH_BUFFER_M = 15.0
#: Hard negatives are looked for this far from any outline, so mixed border pixels (which the
#: extended mask calls ice) are never picked as "not ice" examples.
_NEGATIVE_MARGIN_M = 60.0
#: At most this many candidate cells are tried per hard-negative category.
_MAX_NEGATIVE_TRIES = 5000

# Hard-negative rules on surface reflectance (fractions). They were set on the sample region's
# class truth (water: NDWI ~0.47 and NIR ~0.02; unflagged shadow: green ~0.05; seasonal snow:
# NDSI ~0.8 and green ~0.6; thin cloud: blue ~0.4 and SWIR1 ~0.3) and are deliberately simple:
# real data has no class truth, and a chip only needs to *contain* such pixels to be useful.
_WATER_NDWI_MIN = 0.3
_WATER_NIR_MAX = 0.08
_SHADOW_BRIGHT_MAX = 0.07
_SNOW_NDSI_MIN = 0.4
_SNOW_GREEN_MIN = 0.3
_CLOUD_BLUE_MIN = 0.3
_CLOUD_SWIR_MIN = 0.2


# ----------------------------------------------------------------------------------------------
# Glaciers
# ----------------------------------------------------------------------------------------------


def shape_factor(geometry: Any) -> float:
    """Perimeter of the equal-area circle divided by the real perimeter (1 = a circle).

    Study a's measure of how much of a glacier is border: compact glaciers are near 1, thin
    or ragged ones tend to 0. Holes (nunataks) count in the perimeter, since their borders
    are ice/rock borders too.
    """
    area, perimeter = float(geometry.area), float(geometry.length)
    if area <= 0 or perimeter <= 0:
        return float("nan")
    return 2.0 * math.sqrt(math.pi * area) / perimeter


def glacier_table(outlines: Any, like: Any) -> Any:
    """The outlines in the cube's CRS with ``gid``, ``glacier_id``, area and shape factor.

    Parameters
    ----------
    outlines
        Path or GeoDataFrame of glacier polygons (as :func:`icemap.labels.glacier_ids` reads).
    like
        The cube whose CRS (projected, metres) the measures are taken in.

    Returns
    -------
    geopandas.GeoDataFrame
        ``gid`` (1..N in file order, the id :func:`icemap.labels.glacier_ids` burns),
        ``glacier_id``, ``area_km2``, ``perimeter_m``, ``shape_factor`` and ``geometry``.
    """
    if like.rio.crs is None or not like.rio.crs.is_projected:
        raise ModelError("chips need a cube in a projected CRS (metres); open it with icemap.open_cube")
    # The id raster stays lazy and is never computed: only the table is used here.
    _, table = glacier_ids(outlines, like)
    table = table.copy()
    table["area_km2"] = table.geometry.area / 1e6
    table["perimeter_m"] = table.geometry.length
    table["shape_factor"] = [shape_factor(g) for g in table.geometry]
    return table[["gid", "glacier_id", "area_km2", "perimeter_m", "shape_factor", "geometry"]]


# ----------------------------------------------------------------------------------------------
# Windows, samples, index
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A square chip window on the cube grid (pixel offsets), and what it holds.

    Attributes
    ----------
    y0, x0, size
        Top-left pixel and edge length.
    kind
        ``"glacier"`` (centred on ``centre_gid``), ``"grid"`` (a cell of the grid over the
        labels), ``"hard_negative"`` or ``"random"``.
    category
        The hard-negative category (``water``, ``shadow``, ``snow``, ``cloud``) or ``None``.
    centre_gid
        The glacier the window was centred on (glacier windows).
    gids
        Every glacier whose (15 m grown) outline touches the window.
    whole
        The glaciers lying wholly inside the window.
    group
        Independence group: windows that share a glacier (or overlap, with
        ``overlap="group"``) share a group, and a group goes to one set as a whole.
    """

    y0: int
    x0: int
    size: int
    kind: str
    category: str | None = None
    centre_gid: int | None = None
    gids: tuple[int, ...] = ()
    whole: tuple[int, ...] = ()
    group: int = -1

    def overlaps(self, other: Window) -> bool:
        """True when the two windows share at least one pixel."""
        return (self.y0 < other.y0 + other.size and other.y0 < self.y0 + self.size
                and self.x0 < other.x0 + other.size and other.x0 < self.x0 + self.size)


@dataclass(frozen=True)
class Sample:
    """One training example: a window on one date (``time`` is the cube's time index)."""

    window: int
    time: int
    valid_fraction: float


@dataclass
class ChipIndex:
    """Every window and sample cut from a cube, with the glaciers they hold.

    Plain data (JSON-ready through :meth:`to_dict`), so a split and the chips a model was
    trained on can be recorded and rebuilt.
    """

    windows: list[Window]
    samples: list[Sample]
    glaciers: Any  # GeoDataFrame from glacier_table, restricted to glaciers in some window
    shape: tuple[int, int]
    transform: tuple[float, ...]
    crs: str
    times: list[str]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def groups(self) -> list[int]:
        """The group ids that have at least one sample, ascending."""
        return sorted({self.windows[s.window].group for s in self.samples})

    def samples_of(self, groups: Iterable[int]) -> list[int]:
        """Indices of the samples whose window belongs to one of ``groups``."""
        want = set(groups)
        return [i for i, s in enumerate(self.samples) if self.windows[s.window].group in want]

    def glaciers_of(self, groups: Iterable[int]) -> set[int]:
        """Glacier ids touched by the windows (with samples) of ``groups``."""
        want = set(groups)
        used = {s.window for s in self.samples}
        return {g for i, w in enumerate(self.windows) if i in used and w.group in want for g in w.gids}

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "transform": list(self.transform),
            "crs": self.crs,
            "times": self.times,
            "params": self.params,
            "windows": [asdict(w) for w in self.windows],
            "samples": [asdict(s) for s in self.samples],
        }

    def summary(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for w in self.windows:
            key = w.kind if w.category is None else f"{w.kind}:{w.category}"
            kinds[key] = kinds.get(key, 0) + 1
        return {"windows": len(self.windows), "samples": len(self.samples), "groups": len(self.groups),
                "glaciers": int(len(self.glaciers)), "kinds": kinds}


# ----------------------------------------------------------------------------------------------
# The coarse scan
# ----------------------------------------------------------------------------------------------


@dataclass
class CubeScan:
    """Coarse per-cell counts from one pass over the cube.

    ``counts`` has shape (time, layer, rows, cols) for ``layers`` ``valid`` (all bands
    present) and the hard-negative categories that the cube's bands allow; a cell is ``cell``
    x ``cell`` pixels (the last row/column of cells may be partial).
    """

    counts: np.ndarray
    layers: tuple[str, ...]
    cell: int
    shape: tuple[int, int]

    def layer(self, name: str) -> np.ndarray:
        return self.counts[:, self.layers.index(name)]

    def valid_fraction(self, y0: int, x0: int, size: int) -> np.ndarray:
        """Approximate share of valid pixels of a window, per date.

        Counted on the cells the window touches (so accurate to a cell's width at the edges):
        it only decides whether a chip is too cloudy to train on.
        """
        c = self.cell
        r0, r1 = y0 // c, -(-(y0 + size) // c)
        c0, c1 = x0 // c, -(-(x0 + size) // c)
        h, w = self.shape
        area = (min(r1 * c, h) - r0 * c) * (min(c1 * c, w) - c0 * c)
        return self.layer("valid")[:, r0:r1, c0:c1].sum(axis=(1, 2)) / max(area, 1)


def _refl(cube: Any) -> Any:
    if isinstance(cube, xr.Dataset):
        if "reflectance" not in cube:
            raise ModelError("the dataset has no 'reflectance' variable; open the cube with icemap.open_cube")
        return cube["reflectance"]
    return cube


def scan_cube(cube: Any, glaciers: Any, *, cell: int = 8) -> CubeScan:
    """Count valid pixels and hard-negative candidates per ``cell`` x ``cell`` block and date.

    The categories (computed only when the cube has the bands they need) are, outside the
    outlines grown by 60 m: ``water`` (NDWI > 0.3 and NIR < 0.08), ``shadow`` (mean of green
    and NIR < 0.07, not water), ``snow`` (NDSI >= 0.4 and green > 0.3: snow outside the
    glaciers, which NDSI calls ice) and ``cloud`` (blue > 0.3 and SWIR1 > 0.2: bright cloud
    that QA_PIXEL missed). One dask reduction; only the coarse counts come into memory.
    """
    refl = _refl(cube)
    have = {str(b) for b in refl["band"].values}
    band = lambda n: refl.sel(band=n, drop=True)  # noqa: E731
    valid = refl.notnull().all("band")
    layers: dict[str, Any] = {"valid": valid}
    near = rasterize_outlines(glaciers, refl, buffer_m=_NEGATIVE_MARGIN_M)
    outside = valid & (near == 0)
    water = None
    if {"green", "nir08"} <= have:
        water = outside & (ndwi(refl) > _WATER_NDWI_MIN) & (band("nir08") < _WATER_NIR_MAX)
        layers["water"] = water
        dark = (band("green") + band("nir08")) / 2 < _SHADOW_BRIGHT_MAX
        layers["shadow"] = outside & dark & ~water
    if {"green", "swir16"} <= have:
        snow = outside & (ndsi(refl) >= _SNOW_NDSI_MIN) & (band("green") > _SNOW_GREEN_MIN)
        layers["snow"] = snow if water is None else snow & ~water
    if {"blue", "swir16"} <= have:
        layers["cloud"] = outside & (band("blue") > _CLOUD_BLUE_MIN) & (band("swir16") > _CLOUD_SWIR_MIN)
    names = tuple(layers)
    stacked = xr.concat([layers[n].astype(np.int32).drop_vars("spatial_ref", errors="ignore") for n in names],
                        dim="layer").transpose("time", "layer", "y", "x")
    coarse = stacked.coarsen(y=cell, x=cell, boundary="pad").sum()
    with dask.config.set(scheduler="threads"):
        counts = np.asarray(coarse.values, dtype=np.int64)
    return CubeScan(counts=counts, layers=names, cell=int(cell), shape=(refl.sizes["y"], refl.sizes["x"]))


# ----------------------------------------------------------------------------------------------
# Chips
# ----------------------------------------------------------------------------------------------


def _grid(refl: Any) -> tuple[Any, tuple[int, int]]:
    return refl.rio.transform(recalc=True), (refl.sizes["y"], refl.sizes["x"])


def _window_box(transform: Any, y0: int, x0: int, size: int) -> Any:
    left, top = transform * (x0, y0)
    right, bottom = transform * (x0 + size, y0 + size)
    return box(min(left, right), min(top, bottom), max(left, right), max(top, bottom))


def _clamp(v: float, size: int, n: int) -> int:
    return int(min(max(round(v), 0), n - size))


def _time_labels(refl: Any) -> list[str]:
    if "time" not in refl.dims:
        return ["0"]
    return [str(np.datetime_as_string(t, unit="D")) if np.issubdtype(np.asarray(t).dtype, np.datetime64) else str(t)
            for t in refl["time"].values]


def _resolve_times(times: Sequence[int | str] | None, labels: list[str]) -> list[int]:
    if times is None:
        return list(range(len(labels)))
    out = []
    for t in times:
        if isinstance(t, (int, np.integer)):
            if not 0 <= int(t) < len(labels):
                raise ModelError(f"time index {t} is outside the cube's {len(labels)} dates")
            out.append(int(t))
        elif str(t)[:10] in labels:
            out.append(labels.index(str(t)[:10]))
        else:
            raise ModelError(f"the cube has no date {t}; dates: {', '.join(labels)}")
    return sorted(set(out))


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _disjoint(y0: int, x0: int, size: int, kept: list[tuple[int, int, int]]) -> bool:
    """True when the window shares no pixel with any kept ``(y0, x0, size)`` window."""
    if not kept:
        return True
    k = np.asarray(kept)
    hit = (k[:, 0] < y0 + size) & (y0 < k[:, 0] + k[:, 2]) & (k[:, 1] < x0 + size) & (x0 < k[:, 1] + k[:, 2])
    return not bool(hit.any())


def make_chips(
    cube: Any,
    outlines: Any,
    *,
    size: int = 120,
    overlap: str = "independent",
    n_random: int = 0,
    n_hard_negative: int = 0,
    min_valid: float = 0.5,
    min_negative_pixels: int = 20,
    times: Sequence[int | str] | None = None,
    seed: int = 0,
    scan: CubeScan | None = None,
    layout: str = "outline",
    group_by: str = "glacier",
) -> ChipIndex:
    """Cut chip windows from a cube: glacier-centred (or a grid), hard-negative and random.

    Parameters
    ----------
    cube
        A cube (:func:`icemap.open_cube`), read lazily.
    outlines
        Glacier outlines (path or GeoDataFrame), the training reference.
    size
        Chip edge in pixels: 120 (study a: the largest glacier, 6.97 km2, spans 110 x 115 px),
        128 (study b) or any other. The U-Net needs a multiple of ``2**depth``:
        :class:`ChipDataset` pads to it (the pad is ignored by losses and scores).
    overlap
        ``"drop"``: windows are kept greedily, those with the most whole glaciers first
        (study a's priority), and a window overlapping a kept one is dropped, so windows are
        disjoint; windows that touch the same glacier form one group.
        ``"independent"`` (the default; study a's "fully independent images"): as ``"drop"``,
        and a window that touches a glacier of a kept window is dropped too, so every window
        is its own group (fewer windows, more groups: a better balanced split).
        ``"group"``: every window is kept and overlapping windows form one group (all of
        them go to the same set); useful where glaciers are sparse.
        In every mode a glacier touched by two windows ties them into one group, so a glacier
        can never end up in two sets.
    n_random, n_hard_negative
        Numbers of random and hard-negative windows to add (0 = none, as in study a). Hard
        negatives are centred on the cells richest in water, shadow, snow or cloud (taken
        in turn) outside the outlines, from :func:`scan_cube`.
    min_valid
        A sample (window x date) is kept only when at least this share of its pixels is
        valid (not cloud/fill-masked), so cloudy dates do not become empty chips.
    min_negative_pixels
        A hard-negative window must contain at least this many pixels of its category.
    times
        Dates to sample (time indices or ``YYYY-MM-DD``); default all.
    seed
        Seed of the random windows.
    scan
        A :func:`scan_cube` result to reuse (it is computed otherwise).
    layout
        ``"outline"``: one window centred on each outline (study a), so parts of glaciers
        larger than a chip, and glaciers dropped by the overlap rule, are never seen.
        ``"grid"``: windows edge to edge over the bounding box of the outlines (clamped to the
        cube), so every labelled pixel is in a window; ``overlap`` then only matters for the
        hard-negative and random windows. The index's ``params`` report the labelled pixels
        and the share of them inside some window (``label_coverage``) for either layout.
    group_by
        ``"glacier"`` (the default): windows that touch the same glacier are one group, so a
        glacier is in one set as a whole (validation on glaciers the model has not seen).
        ``"location"``: windows are grouped only where they share pixels, so the parts of one
        large glacier can be in different sets; the way to split a region with one or two
        glaciers (validation on places the model has not seen, not on other glaciers).

    Returns
    -------
    ChipIndex

    Raises
    ------
    ModelError
        Bad arguments, a cube smaller than one chip, or no usable glacier window.
    IcemapError
        Outlines that do not overlap the cube.
    """
    _check_chip_args(size=size, overlap=overlap, layout=layout, group_by=group_by, min_valid=min_valid,
                     n_random=n_random, n_hard_negative=n_hard_negative)
    refl, transform, (h, w) = _chip_grid(cube, size)
    labels = _time_labels(refl)
    tidx = _resolve_times(times, labels)
    inside = _outlines_in_cube(outlines, refl, transform, h, w)
    placer = _WindowPlacer(inside=inside, transform=transform, size=size, h=h, w=w, overlap=overlap,
                           scan=scan if scan is not None else scan_cube(refl, inside), tidx=tidx, min_valid=min_valid)
    # Windows on the labels first, then hard negatives, then random ones: each must fit the rest.
    _place_label_windows(placer, layout)
    _place_hard_negatives(placer, n_hard_negative, min_negative_pixels)
    _place_random_windows(placer, n_random, seed)
    windows, first = _group_windows(placer.windows, grouped_by_pixels=overlap == "group" or group_by == "location"
                                    or layout == "grid", by_glacier=group_by == "glacier")
    params = {"size": size, "overlap": overlap, "n_random": n_random, "n_hard_negative": n_hard_negative,
              "min_valid": min_valid, "min_negative_pixels": min_negative_pixels, "seed": seed,
              "scan_cell": placer.scan.cell, "layout": layout, "group_by": group_by}
    return _chip_index(refl, placer, windows, first, [labels[t] for t in tidx], params)


def _check_chip_args(*, size: int, overlap: str, layout: str, group_by: str, min_valid: float, n_random: int,
                     n_hard_negative: int) -> None:
    """Refuse bad chip settings before any pixel is read."""
    if overlap not in OVERLAP_MODES:
        raise ModelError(f"overlap must be one of {', '.join(OVERLAP_MODES)}, not {overlap!r}")
    if layout not in CHIP_LAYOUTS:
        raise ModelError(f"chip layout must be one of {', '.join(CHIP_LAYOUTS)}, not {layout!r}")
    if group_by not in GROUPINGS:
        raise ModelError(f"split grouping must be one of {', '.join(GROUPINGS)}, not {group_by!r}")
    if size < 8:
        raise ModelError(f"chip size must be at least 8 pixels, got {size}")
    if not 0.0 <= min_valid <= 1.0:
        raise ModelError(f"min_valid must be in [0, 1], got {min_valid}")
    if n_random < 0 or n_hard_negative < 0:
        raise ModelError("n_random and n_hard_negative must be >= 0")


def _chip_grid(cube: Any, size: int) -> tuple[Any, Any, tuple[int, int]]:
    """The cube's reflectance, its affine transform and ``(height, width)``; an error when one
    chip does not fit in it."""
    refl = _refl(cube)
    transform, (h, w) = _grid(refl)
    if h < size or w < size:
        raise ModelError(f"the cube ({h} x {w} px) is smaller than one {size} px chip; use a smaller --chip-size")
    return refl, transform, (h, w)


def _outlines_in_cube(outlines: Any, refl: Any, transform: Any, h: int, w: int) -> Any:
    """The glacier table of the outlines that overlap the cube; an error when none does.

    Outlines and cube from different areas (or CRSs) would otherwise give chips without a
    single label, and a model that learns nothing.
    """
    table = glacier_table(outlines, refl)
    grid_box = _window_box(transform, 0, 0, 1).union(_window_box(transform, h - 1, w - 1, 1)).envelope
    inside = table[table.geometry.intersects(grid_box)].reset_index(drop=True)
    if inside.empty:
        b = grid_box.bounds
        raise IcemapError(
            f"none of the {len(table)} outlines overlaps the cube (extent {b[0]:.0f}, {b[1]:.0f}, "
            f"{b[2]:.0f}, {b[3]:.0f} in {refl.rio.crs}); check that the outlines and the cube cover "
            "the same area"
        )
    return inside


@dataclass
class _WindowPlacer:
    """The windows kept so far, and the overlap rule a new window must pass to join them.

    The glacier, grid, hard-negative and random steps of :func:`make_chips` place their windows
    through one placer, in that order, so a later kind never overlaps (or, with
    ``overlap="independent"``, shares a glacier with) an earlier one.
    """

    inside: Any
    transform: Any
    size: int
    h: int
    w: int
    overlap: str
    scan: CubeScan
    tidx: list[int]
    min_valid: float
    windows: list[Window] = field(default_factory=list)
    kept: list[tuple[int, int, int]] = field(default_factory=list)
    claimed: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.tree = STRtree(list(self.inside.geometry.buffer(_TOUCH_BUFFER_M)))
        self.geoms = list(self.inside.geometry)
        self.gids = self.inside["gid"].to_numpy()

    def contents(self, y0: int, x0: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Glaciers the window touches (grown outlines) and those wholly inside it."""
        wbox = _window_box(self.transform, y0, x0, self.size)
        hit = self.tree.query(wbox, predicate="intersects")
        whole = [int(self.gids[i]) for i in hit if wbox.contains(self.geoms[i])]
        return tuple(sorted(int(self.gids[i]) for i in hit)), tuple(sorted(whole))

    def window(self, y0: int, x0: int, kind: str, category: str | None = None,
               centre_gid: int | None = None) -> Window:
        touched, whole = self.contents(y0, x0)
        return Window(y0, x0, self.size, kind, category, centre_gid, touched, whole)

    def has_valid_date(self, y0: int, x0: int) -> bool:
        return bool((self.scan.valid_fraction(y0, x0, self.size)[self.tidx] >= self.min_valid).any())

    def add(self, win: Window) -> None:
        self.windows.append(win)
        self.kept.append((win.y0, win.x0, win.size))
        self.claimed.update(win.gids)

    def keep(self, win: Window) -> bool:
        """Add ``win`` if the overlap rule and the valid-pixel rule allow it; whether it was."""
        if self.overlap in ("drop", "independent") and not _disjoint(win.y0, win.x0, win.size, self.kept):
            return False
        if self.overlap == "independent" and self.claimed.intersection(win.gids):
            return False
        if not self.has_valid_date(win.y0, win.x0):
            return False
        self.add(win)
        return True


def _place_label_windows(p: _WindowPlacer, layout: str) -> None:
    """The windows on the labels: one per outline, or a grid; an error when none has a date
    with enough valid pixels (training on nothing would only fail later, less clearly)."""
    if layout == "outline":
        _place_outline_windows(p)
    else:
        _place_grid_windows(p)
    if not p.windows:
        raise ModelError(f"no glacier window has a date with at least {p.min_valid:.0%} valid pixels; lower "
                         "min_valid or choose clearer dates")


def _place_outline_windows(p: _WindowPlacer) -> None:
    """One window centred on each outline's bounding box, most whole glaciers first."""
    inv = ~p.transform
    cands = []
    for i, geom in enumerate(p.geoms):
        minx, miny, maxx, maxy = geom.bounds
        col, row = inv * ((minx + maxx) / 2, (miny + maxy) / 2)
        y0, x0 = _clamp(row - p.size / 2, p.size, p.h), _clamp(col - p.size / 2, p.size, p.w)
        cands.append(p.window(y0, x0, "glacier", centre_gid=int(p.gids[i])))
    # Study a kept the images with whole glaciers first: most whole glaciers, then largest.
    area = dict(zip(p.inside["gid"], p.inside["area_km2"]))
    cands.sort(key=lambda c: (-len(c.whole), -area[c.centre_gid], c.centre_gid))
    for c in cands:
        p.keep(c)


def _place_grid_windows(p: _WindowPlacer) -> None:
    """Windows edge to edge over the outlines' bounding box, those touching a glacier."""
    for y0, x0 in _grid_origins(p.inside, ~p.transform, p.size, p.h, p.w):
        win = p.window(y0, x0, "grid")
        if not win.gids:
            continue
        # Grid windows are kept whatever the overlap rule (they tile the labels by
        # construction); only dates with too few valid pixels leave them out.
        if p.has_valid_date(y0, x0):
            p.add(win)


def _place_hard_negatives(p: _WindowPlacer, n_hard_negative: int, min_negative_pixels: int) -> None:
    """Windows on the cells richest in each hard-negative category, categories in turn."""
    scan, size = p.scan, p.size
    cats = [c for c in HARD_NEGATIVE_CATEGORIES if c in scan.layers]
    if not (n_hard_negative and cats):
        return
    # Per category, the cells with any such pixel, richest first (best date per cell);
    # at most _MAX_NEGATIVE_TRIES are tried, so a huge cube cannot make this loop long.
    queues: dict[str, np.ndarray] = {}
    layers = {c: scan.layer(c)[p.tidx] for c in cats}
    for c in cats:
        best = layers[c].max(axis=0)
        order = np.argsort(best, axis=None, kind="stable")[::-1]
        queues[c] = order[best.flat[order] > 0][:_MAX_NEGATIVE_TRIES]
    pos = {c: 0 for c in cats}
    added, active = 0, list(cats)
    while added < n_hard_negative and active:
        for c in list(active):
            if added >= n_hard_negative:
                break
            placed = False
            while pos[c] < len(queues[c]) and not placed:
                r, q = divmod(int(queues[c][pos[c]]), layers[c].shape[2])
                pos[c] += 1
                cy, cx = (r + 0.5) * scan.cell, (q + 0.5) * scan.cell
                y0, x0 = _clamp(cy - size / 2, size, p.h), _clamp(cx - size / 2, size, p.w)
                r0, r1 = y0 // scan.cell, -(-(y0 + size) // scan.cell)
                c0, c1 = x0 // scan.cell, -(-(x0 + size) // scan.cell)
                if layers[c][:, r0:r1, c0:c1].sum(axis=(1, 2)).max() < min_negative_pixels:
                    continue
                placed = p.keep(p.window(y0, x0, "hard_negative", category=c))
            if placed:
                added += 1
            else:
                active.remove(c)


def _place_random_windows(p: _WindowPlacer, n_random: int, seed: int) -> None:
    """``n_random`` windows at seeded random places (at most 50 tries per window)."""
    rng = np.random.default_rng(seed)
    added, tries = 0, 0
    while added < n_random and tries < 50 * max(n_random, 1):
        tries += 1
        y0, x0 = int(rng.integers(0, p.h - p.size + 1)), int(rng.integers(0, p.w - p.size + 1))
        added += p.keep(p.window(y0, x0, "random"))


def _group_windows(windows: list[Window], *, grouped_by_pixels: bool,
                   by_glacier: bool) -> tuple[list[Window], dict[int, int]]:
    """The windows with their independence group set, and each glacier's first window.

    Windows sharing a glacier are one group (``by_glacier``), and so are overlapping windows
    when shared pixels are what must not leak (``grouped_by_pixels``: ``overlap="group"``,
    grouping by location, or a grid layout).
    """
    uf = _UnionFind(len(windows))
    first: dict[int, int] = {}
    for i, win in enumerate(windows):
        for g in win.gids:
            if g in first:
                if by_glacier:
                    uf.union(first[g], i)
            else:
                first[g] = i
    if grouped_by_pixels and windows:
        boxes = [_box(w_.x0, w_.y0, w_.x0 + w_.size, w_.y0 + w_.size) for w_ in windows]
        wtree = STRtree(boxes)
        for i, b in enumerate(boxes):
            for j in wtree.query(b):
                if int(j) != i and windows[i].overlaps(windows[int(j)]):
                    uf.union(i, int(j))
    roots = sorted({uf.find(i) for i in range(len(windows))})
    rank = {r: k for k, r in enumerate(roots)}
    return [Window(**{**asdict(win), "group": rank[uf.find(i)]}) for i, win in enumerate(windows)], first


def _chip_index(refl: Any, p: _WindowPlacer, windows: list[Window], first: dict[int, int], times: list[str],
                params: dict[str, Any]) -> ChipIndex:
    """The index: a sample per window and date with enough valid pixels, the glaciers the
    windows touch (with their group), and the label coverage in ``params``."""
    samples = []
    for i, win in enumerate(windows):
        frac = p.scan.valid_fraction(win.y0, win.x0, win.size)
        for t in p.tidx:
            if frac[t] >= p.min_valid:
                samples.append(Sample(i, t, round(float(frac[t]), 4)))
    labelled, covered = _label_coverage(p.inside, p.transform, (p.h, p.w),
                                        [windows[i] for i in sorted({s.window for s in samples})])
    used = {g for win in windows for g in win.gids}
    glaciers = p.inside[p.inside["gid"].isin(used)].reset_index(drop=True)
    glaciers["group"] = [windows[first[int(g)]].group for g in glaciers["gid"]]
    return ChipIndex(
        windows=windows, samples=samples, glaciers=glaciers, shape=(p.h, p.w),
        transform=tuple(float(v) for v in list(p.transform)[:6]), crs=refl.rio.crs.to_string(), times=times,
        params={**params, "labelled_pixels": labelled, "labelled_pixels_in_chips": covered,
                "label_coverage": round(covered / labelled, 4) if labelled else None},
    )

def _grid_origins(outlines: Any, inv: Any, size: int, h: int, w: int) -> list[tuple[int, int]]:
    """Top-left pixels of windows edge to edge over the outlines' bounding box (in the cube).

    The last row and column are clamped to the cube, so they may overlap their neighbours
    (such windows are grouped together, so no pixel is in two sets).
    """
    minx, miny, maxx, maxy = outlines.total_bounds
    cols, rows = zip(*(inv * (x, y) for x in (minx, maxx) for y in (miny, maxy)))
    r0, r1 = max(int(math.floor(min(rows))), 0), min(int(math.ceil(max(rows))), h)
    c0, c1 = max(int(math.floor(min(cols))), 0), min(int(math.ceil(max(cols))), w)
    ys = sorted({_clamp(y, size, h) for y in range(r0, max(r1, r0 + 1), size)})
    xs = sorted({_clamp(x, size, w) for x in range(c0, max(c1, c0 + 1), size)})
    return [(y, x) for y in ys for x in xs]


def _label_coverage(outlines: Any, transform: Any, shape: tuple[int, int], windows: Sequence[Window]) -> tuple[int, int]:
    """Labelled pixels of the cube (pixel-centre rule) and how many of them lie in a window.

    One uint8 raster of the cube's size: a few MB for a large cube, and it answers the
    question a user must be able to ask (how much of my labels did training see?).
    """
    _quiet_rasterize_warning()
    lab = rasterize([(g, 1) for g in outlines.geometry], out_shape=shape, transform=transform, fill=0,
                    all_touched=False, dtype="uint8")
    total = int(lab.sum())
    seen = np.zeros(shape, dtype=bool)
    for win in windows:
        seen[win.y0:win.y0 + win.size, win.x0:win.x0 + win.size] = True
    return total, int(lab[seen].sum())


# ----------------------------------------------------------------------------------------------
# The Monte-Carlo split
# ----------------------------------------------------------------------------------------------


@dataclass
class Split:
    """Groups per set (``train``, ``val``, ``test``) and the KS report of the chosen split.

    A split by year (:func:`split_by_year`) holds its samples per set in ``sample_sets`` (the
    same window is in several sets, on different dates) and its years in ``groups``.
    """

    groups: dict[str, list[int]]
    report: dict[str, Any]
    sample_sets: dict[str, list[int]] | None = None

    def samples(self, index: ChipIndex, which: str) -> list[int]:
        if which not in SETS:
            raise ModelError(f"a split has sets {SETS}, not {which!r}")
        if self.sample_sets is not None:
            return list(self.sample_sets[which])
        return index.samples_of(self.groups[which])

    def set_of(self, group: int) -> str:
        for name, gs in self.groups.items():
            if group in gs:
                return name
        raise KeyError(group)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"groups": self.groups, "report": self.report}
        if self.sample_sets is not None:
            d["sample_sets"] = self.sample_sets
        return d


def split_by_year(index: ChipIndex, dates: Sequence[str]) -> Split:
    """Hold out the latest year(s): test = the last year, validation = the one before.

    With two years there is no test set (validation = the last year). ``dates`` are the cube's
    dates (``YYYY-MM-DD``) by time index. The question this answers is "does a model trained on
    earlier years map a later one?", which a split by glacier or place cannot; the same places
    are in every set.
    """
    years = sorted({str(dates[s.time])[:4] for s in index.samples})
    if len(years) < 2:
        raise ModelError(f"a split by year needs dates in at least 2 years; the chips have {years or 'none'}: "
                         "ingest more years or use --split glacier or location")
    held = {"test": years[-1], "val": years[-2]} if len(years) >= 3 else {"val": years[-1]}
    year_set = {y: name for name, y in held.items()}
    sample_sets: dict[str, list[int]] = {name: [] for name in SETS}
    for i, smp in enumerate(index.samples):
        sample_sets[year_set.get(str(dates[smp.time])[:4], "train")].append(i)
    groups = {name: [int(y) for y in years if year_set.get(y, "train") == name] for name in SETS}
    report: dict[str, Any] = {"method": "year (latest years held out)", "years": groups, "sets": {}}
    for name in SETS:
        ids = sample_sets[name]
        windows = {index.samples[i].window for i in ids}
        gids = {g for w in windows for g in index.windows[w].gids}
        report["sets"][name] = {"groups": len(groups[name]), "windows": len(windows), "samples": len(ids),
                                "glaciers": len(gids), "ks_area": float("nan"), "ks_shape": float("nan")}
    return Split(groups=groups, report=report, sample_sets=sample_sets)


# Candidate distributions (scipy.stats names). Study a tried 93 and kept the power log-normal
# for area and Weibull-max for the shape factor; a handful that contains both is enough to get
# a good generator of draws, and keeps the fit to well under a second.
_AREA_DISTS = ("lognorm", "gamma", "weibull_min", "expon", "powerlognorm")
_SHAPE_DISTS = ("weibull_max", "beta", "norm", "gamma")


def _fit_best(values: np.ndarray, names: Sequence[str], positive: bool) -> dict[str, Any]:
    """Fit each candidate by maximum likelihood and keep the best KS p-value."""
    best: dict[str, Any] | None = None
    for name in names:
        dist = getattr(stats, name)
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                params = dist.fit(values, floc=0) if positive and name in ("lognorm", "gamma", "weibull_min", "expon") else dist.fit(values)
                res = stats.kstest(values, name, args=params)
        except Exception:  # a fit that fails to converge is simply not a candidate
            continue
        if not np.isfinite(res.statistic):
            continue
        if best is None or res.pvalue > best["p"]:
            best = {"name": name, "params": [float(p) for p in params], "ks": float(res.statistic),
                    "p": float(res.pvalue)}
    if best is None:
        raise ModelError("no distribution could be fitted to the glacier measures")
    return best


def _ks_statistic(sample: np.ndarray, sorted_all: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic of ``sample`` against sorted ``sorted_all``."""
    a = np.sort(sample)
    grid = np.concatenate([a, sorted_all])
    fa = np.searchsorted(a, grid, side="right") / a.size
    fb = np.searchsorted(sorted_all, grid, side="right") / sorted_all.size
    return float(np.max(np.abs(fa - fb)))


def split_chips(
    index: ChipIndex,
    *,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    iterations: int = 900,
    seed: int = 0,
) -> Split:
    """Split the chip groups into train/val/test, stratified by glacier area and shape.

    Study a's Monte-Carlo procedure: fit a distribution to the glacier areas and one to the
    shape factors (best KS fit among a few candidates); in each iteration fill the test and
    validation sets by drawing an (area, shape) pair from the fitted distributions and taking
    the unused group whose representative glacier (its largest whole glacier, else its
    largest glacier) is nearest, in standardised (log area, shape) space; the rest is the
    training set. After ``iterations`` iterations the split whose sets fit the whole best is
    kept: the one with the smallest largest two-sample KS statistic over the three sets and
    the two measures. Groups without glaciers (hard-negative or random chips) are dealt to
    the sets at random in the given proportions.

    Parameters
    ----------
    index
        From :func:`make_chips`.
    fractions
        Shares of train, validation and test (of the groups with glaciers); validation and
        test get at least one group each.
    iterations
        Monte-Carlo iterations (900 in study a).
    seed
        The same seed and index give the same split.

    Returns
    -------
    Split
        With ``report``: the fitted distributions, per set the numbers of groups, windows,
        samples and glaciers, glacier area, and KS statistic and p-value for area and shape
        against all glaciers, and the objective.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ModelError(f"fractions must be three non-negative shares summing to 1, got {fractions}")
    if iterations < 1:
        raise ModelError(f"iterations must be >= 1, got {iterations}")
    m = _SplitMeasures.of(index)
    by_location = index.params.get("group_by") == "location"
    _require_three_groups(len(m.with_ice), by_location)
    n_val = max(1, int(round(fractions[1] * len(m.with_ice))))
    n_test = max(1, int(round(fractions[2] * len(m.with_ice))))
    if n_val + n_test >= len(m.with_ice):
        n_val = n_test = 1
    if by_location:
        return _location_split(index, m.with_ice, m.empty, m.area, m.all_area, m.all_shape, n_val, n_test,
                               fractions, seed)
    dist_area = _fit_best(m.all_area, _AREA_DISTS, positive=True)
    dist_shape = _fit_best(m.all_shape, _SHAPE_DISTS, positive=False)
    objective, best_it, sets = _monte_carlo_split(m, dist_area, dist_shape, n_val=n_val, n_test=n_test,
                                                  iterations=iterations, seed=seed)
    ks = _ks_against_all(m, sets)
    sets = _deal_glacier_free(sets, m.empty, fractions, seed)
    report: dict[str, Any] = {
        "seed": seed, "iterations": iterations, "best_iteration": best_it, "objective_max_ks": objective,
        "fractions": list(fractions), "distributions": {"area_km2": dist_area, "shape_factor": dist_shape},
        "n_glaciers": len(m.all_gids), "sets": {},
    }
    for name in SETS:
        gids = sorted(index.glaciers_of(sets[name]))
        samples = index.samples_of(sets[name])
        report["sets"][name] = {
            "groups": len(sets[name]),
            "windows": len({index.samples[i].window for i in samples}),
            "samples": len(samples),
            "glaciers": len(gids),
            "glacier_area_km2": round(float(sum(m.area[g] for g in gids)), 4),
            **ks[name],
        }
    return Split(groups=sets, report=report)


@dataclass
class _SplitMeasures:
    """What the split draws on: per chip group its glaciers (``members``, and those wholly in
    a window, ``whole``), each glacier's area and shape factor, and the groups with and
    without glaciers. Only windows that hold a sample count."""

    area: dict[int, float]
    shape: dict[int, float]
    members: dict[int, set[int]]
    whole: dict[int, set[int]]
    with_ice: list[int]
    empty: list[int]

    @classmethod
    def of(cls, index: ChipIndex) -> _SplitMeasures:
        groups = index.groups
        gl = index.glaciers
        used_windows = {s.window for s in index.samples}
        members: dict[int, set[int]] = {g: set() for g in groups}
        whole: dict[int, set[int]] = {g: set() for g in groups}
        for i, w in enumerate(index.windows):
            if i in used_windows:
                members[w.group].update(w.gids)
                whole[w.group].update(w.whole)
        return cls(area=dict(zip(gl["gid"].astype(int), gl["area_km2"].astype(float))),
                   shape=dict(zip(gl["gid"].astype(int), gl["shape_factor"].astype(float))),
                   members=members, whole=whole, with_ice=[g for g in groups if members[g]],
                   empty=[g for g in groups if not members[g]])

    @property
    def all_gids(self) -> list[int]:
        return sorted(g for m in self.members.values() for g in m)

    @property
    def all_area(self) -> np.ndarray:
        return np.array([self.area[g] for g in self.all_gids])

    @property
    def all_shape(self) -> np.ndarray:
        return np.array([self.shape[g] for g in self.all_gids])


def _require_three_groups(n_with_ice: int, by_location: bool) -> None:
    """A train/val/test split needs a group with glaciers for each set; say how to get them."""
    if n_with_ice >= 3:
        return
    how = ("use smaller chips (--chip-size) or a larger cube" if by_location else
           "split by location instead (--split location, which lets the parts of one large glacier go to "
           "different sets), cover the labels with a grid of chips (--chips grid), use smaller chips "
           "(--chip-size) or a larger cube")
    raise ModelError(
        f"only {n_with_ice} independent chip group(s) hold glaciers; a train/val/test split "
        f"needs at least 3 (one each): {how}"
    )


def _monte_carlo_split(m: _SplitMeasures, dist_area: dict[str, Any], dist_shape: dict[str, Any], *, n_val: int,
                       n_test: int, iterations: int, seed: int) -> tuple[float, int, dict[str, list[int]]]:
    """Study a's search: the best of ``iterations`` draws, as ``(objective, iteration, sets)``.

    Each iteration fills test then validation with the free group whose representative
    glacier (its largest whole glacier, else its largest) is nearest a draw from the fitted
    distributions, in standardised (log area, shape) space; the objective is the largest
    two-sample KS statistic of any set against all glaciers, for area or shape.
    """
    all_area, all_shape = m.all_area, m.all_shape
    la = np.log(all_area)
    mu = np.array([la.mean(), all_shape.mean()])
    sd = np.array([la.std() or 1.0, all_shape.std() or 1.0])
    rep = {}
    for g in m.with_ice:
        pool = m.whole[g] or m.members[g]
        big = max(pool, key=lambda k: (m.area[k], -k))
        rep[g] = (np.array([math.log(m.area[big]), m.shape[big]]) - mu) / sd
    rep_groups = np.array(m.with_ice)
    rep_z = np.array([rep[g] for g in m.with_ice])
    adist = getattr(stats, dist_area["name"])(*dist_area["params"])
    sdist = getattr(stats, dist_shape["name"])(*dist_shape["params"])
    min_area = float(all_area.min())
    rng = np.random.default_rng(seed)
    sorted_area, sorted_shape = np.sort(all_area), np.sort(all_shape)
    group_area = {g: np.array([m.area[k] for k in m.members[g]]) for g in m.with_ice}
    group_shape = {g: np.array([m.shape[k] for k in m.members[g]]) for g in m.with_ice}

    def objective_of(sets: dict[str, list[int]]) -> float:
        # The search only needs the statistics: computed directly (about 100x faster than
        # scipy's ks_2samp with its p-value); the report recomputes both with scipy.
        worst = 0.0
        for gs in sets.values():
            if not gs:
                return 1.0
            a = np.concatenate([group_area[g] for g in gs])
            s = np.concatenate([group_shape[g] for g in gs])
            worst = max(worst, _ks_statistic(a, sorted_area), _ks_statistic(s, sorted_shape))
        return worst

    best: tuple[float, int, dict[str, list[int]]] | None = None
    for it in range(iterations):
        free = np.ones(len(m.with_ice), dtype=bool)
        chosen: dict[str, list[int]] = {"test": [], "val": []}
        for name, n in (("test", n_test), ("val", n_val)):
            draws_a = np.maximum(adist.rvs(size=n, random_state=rng), min_area)
            draws_s = sdist.rvs(size=n, random_state=rng)
            for a, s in zip(draws_a, draws_s):
                z = (np.array([math.log(float(a)), float(s)]) - mu) / sd
                d = np.where(free, ((rep_z - z) ** 2).sum(axis=1), np.inf)
                k = int(np.argmin(d))
                free[k] = False
                chosen[name].append(int(rep_groups[k]))
        sets = {"train": [int(g) for g in rep_groups[free]], "val": chosen["val"], "test": chosen["test"]}
        objective = objective_of(sets)
        if best is None or objective < best[0] - 1e-12:
            best = (objective, it, sets)
    if best is None:  # unreachable (iterations >= 1), kept for type checkers
        raise ModelError("the Monte-Carlo split ran no iteration")
    return best


def _ks_against_all(m: _SplitMeasures, sets: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """Per set, scipy's two-sample KS statistic and p-value of its glaciers' area and shape
    against all glaciers (1 and 0 for a set without glaciers)."""
    all_area, all_shape = m.all_area, m.all_shape
    out = {}
    for name, gs in sets.items():
        gids = sorted(g for grp in gs for g in m.members.get(grp, ()))
        a = np.array([m.area[g] for g in gids])
        s = np.array([m.shape[g] for g in gids])
        ka = stats.ks_2samp(a, all_area) if a.size else None
        ksh = stats.ks_2samp(s, all_shape) if s.size else None
        out[name] = {
            "ks_area": float(ka.statistic) if ka else 1.0, "p_area": float(ka.pvalue) if ka else 0.0,
            "ks_shape": float(ksh.statistic) if ksh else 1.0, "p_shape": float(ksh.pvalue) if ksh else 0.0,
        }
    return out


def _deal_glacier_free(sets: dict[str, list[int]], empty: list[int], fractions: tuple[float, float, float],
                       seed: int) -> dict[str, list[int]]:
    """The sets with the glacier-free groups dealt at random in the given proportions, each
    set sorted. The draws come from their own stream, so adding negatives does not change
    which glacier groups go where."""
    neg_rng = np.random.default_rng([seed, 1])
    for g in empty:
        which = SETS[int(neg_rng.choice(3, p=np.asarray(fractions) / sum(fractions)))]
        sets[which].append(int(g))
    return {k: sorted(v) for k, v in sets.items()}

def _location_split(index: ChipIndex, with_ice: list[int], empty: list[int], area: dict[int, float], all_area: np.ndarray, all_shape: np.ndarray, n_val: int, n_test: int,
                    fractions: tuple[float, float, float], seed: int) -> Split:
    """Groups of places (``group_by="location"``) dealt to the sets at random, seeded.

    No stratification by glacier area and shape: with a handful of glaciers split into parts
    there is no distribution to match; what is held out is places the model has not seen.
    """
    rng = np.random.default_rng(seed)
    order = [int(g) for g in rng.permutation(np.asarray(with_ice))]
    sets = {"train": order[n_test + n_val:], "val": order[n_test:n_test + n_val], "test": order[:n_test]}
    neg_rng = np.random.default_rng([seed, 1])
    for g in empty:
        sets[SETS[int(neg_rng.choice(3, p=np.asarray(fractions) / sum(fractions)))]].append(int(g))
    sets = {k: sorted(v) for k, v in sets.items()}
    report: dict[str, Any] = {"seed": seed, "method": "location (random groups of places)",
                              "fractions": list(fractions), "n_glaciers": int(all_area.size), "sets": {}}
    shape_of = dict(zip(index.glaciers["gid"].astype(int), index.glaciers["shape_factor"].astype(float)))
    for name in SETS:
        gids = sorted(index.glaciers_of(sets[name]))
        samples = index.samples_of(sets[name])
        a = np.array([area[g] for g in gids])
        sh = np.array([shape_of[g] for g in gids])
        ka = stats.ks_2samp(a, all_area) if a.size else None
        ks = stats.ks_2samp(sh, all_shape) if sh.size else None
        report["sets"][name] = {
            "groups": len(sets[name]), "windows": len({index.samples[i].window for i in samples}),
            "samples": len(samples), "glaciers": len(gids),
            "glacier_area_km2": round(float(a.sum()), 4) if a.size else 0.0,
            "ks_area": float(ka.statistic) if ka else 1.0, "p_area": float(ka.pvalue) if ka else 0.0,
            "ks_shape": float(ks.statistic) if ks else 1.0, "p_shape": float(ks.pvalue) if ks else 0.0,
        }
    return Split(groups=sets, report=report)


# ----------------------------------------------------------------------------------------------
# Reading chips
# ----------------------------------------------------------------------------------------------


def padded_size(size: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that holds ``size`` (what a chip is padded to)."""
    return -(-int(size) // int(multiple)) * int(multiple)


class ChipSource:
    """Reads chip windows and their labels from a cube, lazily, with an optional cache.

    One source serves every channel set and mask type (the experiment grid trains ten models
    on the same chips), so what it caches is the raw reflectance window of each sample (all
    bands) and the burnt labels per mask type; :meth:`inputs` builds any channel set from the
    cached window with :func:`icemap.model.inputs.build_inputs`, the function inference uses.

    Parameters
    ----------
    cube
        The cube the index was cut from (a lazy Dataset is fine: each read computes only the
        chunks its window touches).
    outlines
        The outlines (path or GeoDataFrame) the labels are burnt from.
    index
        From :func:`make_chips`.
    dem
        A DEM (path, DataArray...) for the ``elevation``/``slope`` channels, warped onto the
        cube grid lazily by :func:`icemap.dem.dem_on_grid`.
    cache
        Keep read windows (and the channels built from them) in memory: ``True``, ``False``
        or ``None`` (default: when the windows of all samples together take less than
        ``cache_limit_mb``; the channel arrays of each input set used add about as much
        again). Without a cache every read goes back to the store, one window at a time.
    label_time
        A column of the outlines with each outline's year (e.g. 2019) or date
        (``YYYY-MM-DD``): a sample on a cube date is then labelled only by the outlines of
        that year (or date), so one file of yearly outlines labels a multi-year cube
        (:func:`label_keys`). ``None``: every outline labels every date.
    """

    def __init__(self, cube: Any, outlines: Any, index: ChipIndex, *, dem: Any = None,
                 cache: bool | None = None, cache_limit_mb: float = 1024.0, label_time: str | None = None) -> None:
        self.refl = _refl(cube)
        self.index = index
        transform, shape = _grid(self.refl)
        if shape != tuple(index.shape) or not np.allclose(list(transform)[:6], index.transform):
            raise ModelError("the chip index was cut from another grid than this cube's")
        self.transform = transform
        self.bands = [str(b) for b in self.refl["band"].values]
        gdf = read_outlines(outlines, crs=self.refl.rio.crs)
        self._geoms = list(gdf.geometry)
        self.label_time = label_time
        self._keys: list[str] | None = None
        self._date_keys: list[str | None] = []
        if label_time is not None:
            self._keys, mode = label_keys(gdf, label_time)
            self._date_keys = [(d[:4] if mode == "year" else d) for d in _time_labels(self.refl)]
        self._trees: dict[float, tuple[Any, list[Any]]] = {0.0: (STRtree(self._geoms), self._geoms)}
        self.dem = dem
        self._elevation: Any = None
        per_sample = len(self.bands) * index.params["size"] ** 2 * 4
        self.cache = (len(index.samples) * per_sample < cache_limit_mb * 2**20) if cache is None else bool(cache)
        self._windows: dict[int, Any] = {}
        self._labels: dict[tuple[int, float, str | None], np.ndarray] = {}
        self._elev_cache: dict[int, Any] = {}
        self._inputs: dict[tuple[int, tuple[str, ...]], np.ndarray] = {}
        self._valid: dict[int, np.ndarray] = {}

    @property
    def pixel_area_m2(self) -> float:
        return abs(self.transform.a * self.transform.e - self.transform.b * self.transform.d)

    def _slices(self, window: Window) -> dict[str, slice]:
        return {"y": slice(window.y0, window.y0 + window.size), "x": slice(window.x0, window.x0 + window.size)}

    def window(self, sample: int) -> Any:
        """The reflectance of a sample: a DataArray (time=1, band, y, x) in memory."""
        if sample in self._windows:
            return self._windows[sample]
        s = self.index.samples[sample]
        w = self.index.windows[s.window]
        sub = self.refl.isel(time=[s.time], **self._slices(w))
        # Synchronous: a chip is a handful of chunks, and torch already uses the cores.
        with dask.config.set(scheduler="synchronous"):
            sub = sub.load()
        if self.cache:
            self._windows[sample] = sub
        return sub

    def elevation(self, window_id: int) -> Any:
        """The DEM on a window's pixels, (y, x) float32 metres."""
        if self.dem is None:
            raise ModelError("these inputs include terrain: pass a DEM (dem=... / --dem)")
        if window_id in self._elev_cache:
            return self._elev_cache[window_id]
        if self._elevation is None:
            on_grid = isinstance(self.dem, xr.DataArray) and self.dem.sizes.get("x") == self.refl.sizes["x"] \
                and self.dem.sizes.get("y") == self.refl.sizes["y"]
            self._elevation = self.dem if on_grid else dem_on_grid(self.dem, self.refl, chunks=256)
        with dask.config.set(scheduler="synchronous"):
            elev = self._elevation.isel(**self._slices(self.index.windows[window_id])).load()
        if self.cache:
            self._elev_cache[window_id] = elev
        return elev

    def inputs(self, sample: int, channels: Sequence[str]) -> np.ndarray:
        """Channels of a sample, (C, H, W) float32, NaN where masked (a read-only array).

        Cached per (sample, channels) when the source caches: building channels from a window
        costs more than reading it (xarray bookkeeping), and the normalisation fit, training,
        validation and every ablation read the same chips again.
        """
        key = (sample, tuple(channels))
        if key in self._inputs:
            return self._inputs[key]
        refl = self.window(sample)
        missing = [b for b in required_bands(channels) if b not in self.bands]
        if missing:
            raise ModelError(
                f"the cube lacks band(s) {missing} that the inputs {list(channels)} need; it has "
                f"{self.bands}. Ingest with --bands {','.join(sorted(set(self.bands) | set(missing)))}"
            )
        dem = None
        if any(c in ("elevation", "slope") for c in channels):
            dem = self.elevation(self.index.samples[sample].window)
        x = np.asarray(build_inputs(refl, channels, dem=dem).values[0], dtype=np.float32)
        x.setflags(write=False)
        if self.cache:
            self._inputs[key] = x
        return x

    def valid(self, sample: int) -> np.ndarray:
        """Pixels where every cube band is present: the pixels scored, whatever the inputs.

        One mask for every model and for the NDSI baseline, so their scores count the same
        pixels (the thermal band, for one, is masked differently from the reflective ones).
        """
        if sample in self._valid:
            return self._valid[sample]
        v = np.asarray(self.window(sample).notnull().all("band").values[0])
        v.setflags(write=False)
        self._valid[sample] = v  # 1 byte per pixel: always kept
        return v

    def sample_labels(self, sample: int, buffer_m: float = 0.0) -> np.ndarray:
        """The labels of a sample: its window's, from the outlines of its date with ``label_time``."""
        s = self.index.samples[sample]
        key = self._date_keys[s.time] if self._keys is not None else None
        return self.labels(s.window, buffer_m, key=key)

    def labels(self, window_id: int, buffer_m: float = 0.0, *, key: str | None = None) -> np.ndarray:
        """The outlines burnt on a window (uint8 0/1), pixel-centre rule, grown by ``buffer_m``.

        Equal, pixel for pixel, to the same window of :func:`icemap.labels.rasterize_outlines`
        (same polygons, buffer and rule), but only the polygons that touch the window are burnt.
        ``key`` (a year or date, with ``label_time``) burns only the outlines of that year or date.
        """
        cache_key = (window_id, float(buffer_m), key)
        if cache_key in self._labels:
            return self._labels[cache_key]
        if float(buffer_m) not in self._trees:
            grown = [g.buffer(buffer_m) for g in self._geoms]
            self._trees[float(buffer_m)] = (STRtree(grown), grown)
        tree, geoms = self._trees[float(buffer_m)]
        w = self.index.windows[window_id]
        hit = tree.query(_window_box(self.transform, w.y0, w.x0, w.size), predicate="intersects")
        if key is not None and self._keys is not None:
            hit = [i for i in hit if self._keys[int(i)] == key]
        out = np.zeros((w.size, w.size), dtype=np.uint8)
        if len(hit):
            _quiet_rasterize_warning()
            out = rasterize([(geoms[i], 1) for i in hit], out_shape=(w.size, w.size),
                            transform=window_transform(RioWindow(w.x0, w.y0, w.size, w.size), self.transform),
                            fill=0, all_touched=False, dtype="uint8")
        out.setflags(write=False)
        self._labels[cache_key] = out  # small (1 byte per pixel): always cached
        return out

    def truth(self, sample: int, path: Any) -> np.ndarray:
        """A class raster (e.g. the sample region's truth) read on a sample's window.

        The raster must lie on the cube's pixel lattice (same CRS and 30 m grid, any extent);
        pixels outside it read as the sample truth's ``fill`` class.
        """
        w = self.index.windows[self.index.samples[sample].window]
        box = _window_box(self.transform, w.y0, w.x0, w.size)
        with rasterio.open(path) as src:
            win = from_bounds(*box.bounds, transform=src.transform)
            if abs(win.col_off - round(win.col_off)) > 1e-3 or abs(win.row_off - round(win.row_off)) > 1e-3:
                raise ModelError(f"{path} is not on the cube's pixel grid; reproject it first")
            win = win.round_offsets().round_lengths()
            return src.read(1, window=win, boundless=True, fill_value=CLASS_CODES["fill"])


def label_keys(outlines: Any, column: str) -> tuple[list[str], str]:
    """Each outline's year or date from ``column``, as strings, and the mode (``year``/``date``).

    A column of integers (or of 4-digit strings) is years, matched to a cube date's year; any
    other values are read as dates (``YYYY-MM-DD``, datetimes) and matched to the cube date
    exactly. An empty or unparsable value is an error that names the row.
    """
    if column not in outlines.columns:
        have = ", ".join(c for c in outlines.columns if c != "geometry")
        raise ModelError(f"the outlines have no column {column!r} (for the label dates); columns: {have}")
    values = outlines[column]
    text = [str(v).strip() for v in values]
    if all(t.isdigit() and len(t) == 4 for t in text) or pd.api.types.is_integer_dtype(values):
        return [t.zfill(4) for t in text], "year"
    out = []
    for i, v in enumerate(values):
        try:
            out.append(pd.Timestamp(v).strftime("%Y-%m-%d"))
        except (ValueError, TypeError):
            raise ModelError(f"outline {i}: {column} = {v!r} is neither a year nor a date (YYYY-MM-DD)") from None
    return out, "date"


def fit_normalisation(source: ChipSource, samples: Sequence[int], channels: Sequence[str], *,
                      method: str = "minmax", max_pixels: int = 2_000_000, seed: int = 0) -> Normalisation:
    """Fit a :class:`~icemap.model.inputs.Normalisation` on training samples, one chip at a time.

    ``"minmax"`` (study a: per channel over all training images) is exact and streams chip by
    chip; ``"percentile"`` is estimated from at most ``max_pixels`` valid pixels drawn evenly
    from every chip, so memory stays bounded for any number of chips.
    """
    if not samples:
        raise ModelError("no training samples to fit the normalisation on")
    if method == "minmax":
        lo = np.full(len(channels), np.inf, dtype=np.float64)
        hi = np.full(len(channels), -np.inf, dtype=np.float64)
        for i in samples:
            x = source.inputs(i, channels).reshape(len(channels), -1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN channel in a chip
                lo = np.fmin(lo, np.nanmin(x, axis=1))
                hi = np.fmax(hi, np.nanmax(x, axis=1))
        if not np.isfinite(lo).all():
            raise ModelError(f"a channel of {list(channels)} has no valid pixel in the training chips")
        stacked = np.stack([lo, hi], axis=0).astype(np.float32)[:, :, None, None]
        return Normalisation.fit(stacked, "minmax")
    if method == "percentile":
        rng = np.random.default_rng(seed)
        per = max(1, max_pixels // len(samples))
        parts = []
        for i in samples:
            x = source.inputs(i, channels).reshape(len(channels), -1)
            ok = np.flatnonzero(~np.isnan(x).any(axis=0))
            if ok.size:
                parts.append(x[:, rng.choice(ok, size=min(per, ok.size), replace=False)])
        if not parts:
            raise ModelError("the training chips have no valid pixel")
        pix = np.concatenate(parts, axis=1).T[:, :, None, None]
        return Normalisation.fit(pix, "percentile")
    raise ModelError(f"normalisation must be 'minmax' or 'percentile', not {method!r}")


try:  # torch is a dependency of the model extra; the data model above works without it
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover
    _TorchDataset = object  # type: ignore[assignment,misc]


class ChipDataset(_TorchDataset):
    """A torch Dataset of chips: ``(x, y, valid)`` tensors per sample.

    ``x`` is (C, P, P) float32, normalised, NaN filled with 0; ``y`` (1, P, P) float32 0/1;
    ``valid`` (1, P, P) bool, False on masked pixels and on the padding, which is added
    around the chip (``P`` = the chip size rounded up to ``multiple``, e.g. 120 -> 128 for a
    4-level U-Net) so losses and scores ignore it. Reads go through the :class:`ChipSource`
    (per chip, lazily); with ``cache`` the normalised arrays are kept too.

    Parameters
    ----------
    source
        Where chips come from.
    samples
        Indices into ``source.index.samples``.
    channels
        Input channels (a resolved channel tuple).
    mask
        ``"original"`` or ``"extended"`` (outlines grown 15 m): the labels.
    normalisation
        Fitted on training chips (:func:`fit_normalisation`).
    multiple
        Pad chips to a multiple of this (``UNetConfig.multiple``).
    hide_channel
        Index of a channel set to 0 after normalisation (study a's ablation), or None.
    cache
        Keep the normalised arrays (default: when the source caches).
    """

    def __init__(self, source: ChipSource, samples: Sequence[int], channels: Sequence[str], *,
                 mask: str = "original", normalisation: Normalisation, multiple: int = 1,
                 hide_channel: int | None = None, cache: bool | None = None) -> None:
        if mask not in MASK_BUFFERS:
            raise ModelError(f"mask must be one of {', '.join(MASK_BUFFERS)}, not {mask!r}")
        if hide_channel is not None and not 0 <= hide_channel < len(channels):
            raise ModelError(f"hide_channel {hide_channel} is not a channel index of {list(channels)}")
        self.source = source
        self.samples = list(samples)
        self.channels = tuple(channels)
        self.mask = mask
        self.buffer_m = MASK_BUFFERS[mask]
        self.normalisation = normalisation
        self.size = int(source.index.params["size"])
        self.padded = padded_size(self.size, multiple)
        self.offset = (self.padded - self.size) // 2
        self.hide_channel = hide_channel
        self.cache = source.cache if cache is None else bool(cache)
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Numpy ``(x, y, valid)`` of item ``i`` before padding: (C, S, S), (S, S), (S, S)."""
        if i in self._arrays:
            return self._arrays[i]
        s = self.samples[i]
        raw = self.source.inputs(s, self.channels)
        x, nodata = normalise(raw, self.normalisation, channel_axis=0)
        if x is raw:  # normalise may return its input: never write into the source's cache
            x = x.copy()
        if self.hide_channel is not None:
            x[self.hide_channel] = 0.0
        valid = self.source.valid(s) & ~nodata
        y = self.source.sample_labels(s, self.buffer_m)
        out = (x, np.where(valid, y, 0).astype(np.uint8), valid)
        if self.cache:
            self._arrays[i] = out
        return out

    def __getitem__(self, i: int) -> tuple[Any, Any, Any]:
        import torch

        x, y, valid = self.arrays(i)
        p, o, s = self.padded, self.offset, self.size
        xp = np.zeros((len(self.channels), p, p), dtype=np.float32)
        yp = np.zeros((1, p, p), dtype=np.float32)
        vp = np.zeros((1, p, p), dtype=bool)
        xp[:, o:o + s, o:o + s] = x
        yp[0, o:o + s, o:o + s] = y
        vp[0, o:o + s, o:o + s] = valid
        # Padded tensors are made afresh (a cheap copy): only the unpadded arrays are cached.
        return torch.from_numpy(xp), torch.from_numpy(yp), torch.from_numpy(vp)

    def crop(self, a: np.ndarray) -> np.ndarray:
        """Remove the padding from a (..., P, P) array."""
        o, s = self.offset, self.size
        return a[..., o:o + s, o:o + s]
