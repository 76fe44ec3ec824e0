"""Accuracy of ice maps: confusion counts, scores, per-glacier tables and threshold calibration.

Everything here is a *count*. Comparing an ice map with a reference only needs, for every
pixel, which of four outcomes it is (true/false positive/negative); comparing an index with a
reference at many thresholds only needs a histogram of the index per reference class. Both
are computed as in :mod:`icemap.vector`: a numpy kernel ``bincount``\\ s one block, the blocks
are laid out by ``dask.array.blockwise`` and their small count vectors summed, so no full-size
intermediate (no broadcast boolean cube, no outcome raster) ever exists, and the graph grows
by one task per chunk. Nothing is computed until the caller asks: :func:`confusion` and
:func:`confusion_sweep` return lazy ``xarray.DataArray``\\ s when their inputs are lazy;
:func:`scores`, :func:`scores_per_id`, :func:`threshold_sweep`, :func:`unsupervised_threshold`
and :func:`evaluate` compute, because what they return is made of numbers.

The layers:

* kernels (:func:`icemap.kernels.confusion_counts`, :func:`icemap.kernels.threshold_histogram`)
  on plain numpy blocks;
* ``_block_counts``: blockwise kernel application and the sum of per-block counts;
* public functions taking and returning xarray/pandas objects, checking grids on the way in.

One rule is shared with :func:`icemap.index.ice_mask`: a pixel is ice when ``index >=
threshold``, compared in float32 (the index's dtype). The sweep's bin edges *are* the
thresholds, cast to float32, and pixels are binned with ``searchsorted(side="right")``, so
the counts at every threshold equal those of ``ice_mask(cube, threshold=t)`` + :func:`confusion`
exactly, not up to binning error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

import dask
import dask.array as da
import numpy as np
import pandas as pd
import rioxarray  # noqa: F401
import xarray as xr
from pyproj import CRS
from scipy.ndimage import gaussian_filter1d

from icemap.errors import GridMismatchError, MetricsError, NoValidPixelsError
from icemap.interop import restore_mask
from icemap.kernels import confusion_counts, threshold_histogram
from icemap.labels import check_outlines_overlap, glacier_ids, rasterize_outlines
from icemap.vector import pixel_area_m2

if TYPE_CHECKING:  # pragma: no cover
    import os

    import geopandas as gpd
    import pandas as pd
    import xarray as xr

__all__ = [
    "OUTCOMES",
    "SCORE_KEYS",
    "DEFAULT_THRESHOLDS",
    "MetricsError",
    "GridMismatchError",
    "NoValidPixelsError",
    "confusion",
    "scores",
    "scores_per_id",
    "evaluate",
    "confusion_sweep",
    "threshold_sweep",
    "best_threshold",
    "index_histogram",
    "unsupervised_threshold",
]

#: Order of the ``outcome`` dimension. Outcome code = 2 * reference + prediction, so the
#: kernel's bincount lands in this order without a lookup.
OUTCOMES: tuple[str, str, str, str] = ("tn", "fp", "fn", "tp")

#: Keys of :func:`scores`, in order (``icemap evaluate --json`` prints exactly these).
SCORE_KEYS: tuple[str, ...] = (
    "f1",
    "precision",
    "recall",
    "iou",
    "balanced_accuracy",
    "overall_accuracy",
    "kappa",
    "missed_alarm",
    "false_alarm",
    "ice_area_km2",
    "reference_area_km2",
    "area_diff_pct",
    "tp",
    "fp",
    "fn",
    "tn",
    "n_pixels",
)

#: Default thresholds of :func:`threshold_sweep`: the whole NDSI range -1.00 ... 1.00 in steps
#: of 0.01 (201 values). Study a's 0.2, study b's 0.0-0.7 grid and the literature's 0.4 are all
#: on it; a finer grid costs nothing in the pass over the pixels (one bin per threshold).
DEFAULT_THRESHOLDS: np.ndarray = np.round(np.arange(-100, 101) / 100.0, 2)



# ----------------------------------------------------------------------------------------------
# numpy kernels
# ----------------------------------------------------------------------------------------------


def _confusion_block(pred: np.ndarray, ref: np.ndarray, valid: np.ndarray | None,
                     by: np.ndarray | None, n_ids: int) -> np.ndarray:
    """:func:`icemap.kernels.confusion_counts` of one block, shaped (*lead, 1, 1, k) for blockwise."""
    counts = confusion_counts(pred, ref, valid, by, n_ids)
    return counts.reshape(*counts.shape[:-1], 1, 1, counts.shape[-1])


def _bin_block(index: np.ndarray, ref: np.ndarray | None, valid: np.ndarray | None,
               edges: np.ndarray) -> np.ndarray:
    """:func:`icemap.kernels.threshold_histogram` of one block, shaped (*lead, 1, 1, k)."""
    counts = threshold_histogram(index, edges, ref, valid)
    return counts.reshape(*counts.shape[:-1], 1, 1, counts.shape[-1])


# ----------------------------------------------------------------------------------------------
# dask layer
# ----------------------------------------------------------------------------------------------


def _block_counts(kernel: Any, main: Any, extras: Sequence[Any], k: int, keep_lead: bool,
                  **kwargs: Any) -> Any:
    """Apply ``kernel(main_block, *extra_blocks, **kwargs)`` blockwise and sum the counts.

    ``main`` is a dask array (*lead, y, x); each extra is None, a (y, x) dask array (the same
    block is handed to every leading block: no broadcast copy in the graph) or an array of
    main's full shape, chunked like it. Returns a dask array (*lead, k) or (k,).
    """
    nd = main.ndim
    letters = "abcdefghijklmnopqrstuvw"[: nd - 2] + "yx"
    args: list[Any] = [main, letters]
    for ex in extras:
        if ex is None:
            args += [None, None]
        elif ex.ndim == 2:
            args += [ex, "yx"]
        else:
            args += [ex, letters]
    per_block = da.blockwise(
        kernel, letters + "z", *args,
        new_axes={"z": k},
        adjust_chunks={"y": 1, "x": 1},
        dtype=np.int64,
        meta=np.empty((0,) * (nd + 1), dtype=np.int64),
        **kwargs,
    )
    if nd > 2:
        # Gather the (tiny) counts of every time step of one spatial block into one chunk
        # before reducing over space. Without this, each time step is its own reduction tree
        # and the scheduler finishes one tree before starting the next, keeping every block of
        # a (y, x) operand (the reference, the id raster) alive in between: a full-size
        # reference in memory. Measured on 2 x 9000 x 9000: 880 MB peak without, ~200 with.
        lead_axes = tuple(range(nd - 2))
        per_block = per_block.rechunk({a: -1 for a in lead_axes})
        if not keep_lead:
            per_block = per_block.sum(axis=lead_axes)
    return per_block.sum(axis=(-3, -2), split_every=8)


# ----------------------------------------------------------------------------------------------
# inputs: conversion and grid checks
# ----------------------------------------------------------------------------------------------


def _as_dataarray(x: Any, what: str) -> Any:
    if isinstance(x, xr.DataArray):
        return x
    if isinstance(x, xr.Dataset):
        raise MetricsError(f"{what} must be a DataArray, not a Dataset; pick a variable, e.g. ds['ice']")
    arr = x if hasattr(x, "ndim") and hasattr(x, "dtype") else np.asarray(x)
    if arr.ndim == 2:
        dims: tuple[str, ...] = ("y", "x")
    elif arr.ndim == 3:
        dims = ("time", "y", "x")
    else:
        raise MetricsError(f"{what} must be 2-D (y, x) or 3-D (time, y, x), got {arr.ndim} dimensions")
    return xr.DataArray(arr, dims=dims)


def _crs_of(a: Any) -> Any:
    try:
        return a.rio.crs
    except Exception:  # no accessor, or a grid rioxarray cannot read: nothing to compare
        return None


def _same_crs(a: Any, b: Any) -> bool:
    """CRS equality that accepts equivalent definitions (a custom UTM WKT vs its EPSG code)."""
    if a == b:
        return True
    try:
        pa, pb = CRS.from_user_input(a), CRS.from_user_input(b)
    except Exception:
        return False
    if pa.equals(pb, ignore_axis_order=True):
        return True
    ea, eb = pa.to_epsg(min_confidence=70), pb.to_epsg(min_confidence=70)
    return ea is not None and ea == eb


_FIX = ("rasterise outlines on the prediction grid (icemap.labels.rasterize_outlines(outlines, "
        "like=pred)) or reproject the raster onto it (r.rio.reproject_match(pred, "
        "resampling=Resampling.nearest))")


def _check_grid(pred: Any, other: Any, what: str) -> None:
    """Raise :class:`GridMismatchError` unless ``other`` lies on ``pred``'s grid."""
    for d in ("y", "x"):
        if d not in other.dims:
            raise GridMismatchError(f"{what} has no {d!r} dimension (dims {other.dims}); {_FIX}")
    extra = [d for d in other.dims if d not in pred.dims]
    if extra:
        raise MetricsError(
            f"{what} has dimensions {extra} that the prediction lacks (dims {pred.dims}); "
            f"select or squeeze them first, e.g. {what}.squeeze({extra[0]!r}, drop=True)"
        )
    for d in other.dims:
        if other.sizes[d] != pred.sizes[d]:
            raise GridMismatchError(
                f"{what} has {other.sizes[d]} pixels along {d!r}, the prediction {pred.sizes[d]}: "
                f"the grids differ; {_FIX}"
            )
    for d in ("y", "x"):
        if d in other.coords and d in pred.coords:
            a = np.asarray(pred[d].values, dtype=np.float64)
            b = np.asarray(other[d].values, dtype=np.float64)
            step = abs(a[1] - a[0]) if a.size > 1 else 1.0
            if not np.allclose(a, b, rtol=0, atol=1e-6 * step):
                off = float(np.max(np.abs(a - b)))
                raise GridMismatchError(
                    f"{what}'s {d} coordinates differ from the prediction's (by up to {off:g} CRS "
                    f"units, or flipped): the grids differ; {_FIX}"
                )
    if "time" in other.dims and "time" in other.coords and "time" in pred.coords:
        if not np.array_equal(other["time"].values, pred["time"].values):
            raise MetricsError(f"{what}'s time steps differ from the prediction's; select matching dates")
    ca, cb = _crs_of(pred), _crs_of(other)
    if ca is not None and cb is not None and not _same_crs(ca, cb):
        raise GridMismatchError(f"{what} is in {cb}, the prediction in {ca}: the grids differ; {_FIX}")


def _check_int(a: Any, what: str, hint: str) -> Any:
    if a.dtype == bool:
        return a.astype(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        raise MetricsError(f"{what} must hold integer codes, got dtype {a.dtype}; {hint}")
    return a


def _dask(a: Any, chunks: Any = None) -> Any:
    data = a.data if hasattr(a, "data") and not isinstance(a, np.ndarray) else a
    if isinstance(data, da.Array):
        return data if chunks is None else data.rechunk(chunks)
    if chunks is None:
        # A numpy-backed input: one block per 2048 x 2048 tile (one task for small arrays).
        chunks = tuple(1 if i < data.ndim - 2 else 2048 for i in range(data.ndim))
    return da.from_array(np.asarray(data), chunks=chunks)


def _is_lazy(*arrays: Any) -> bool:
    return any(a is not None and isinstance(getattr(a, "data", a), da.Array) for a in arrays)


def _operand(main: Any, main_d: Any, other: Any, what: str) -> Any:
    """``other`` as a dask array chunked like ``main``: (y, x) as it is, else main's full shape."""
    other = _as_dataarray(other, what)
    _check_grid(main, other, what)
    if set(other.dims) == {"y", "x"}:
        return _dask(other.transpose("y", "x"), main_d.chunks[-2:])
    order = [d for d in main.dims if d in other.dims]
    data = _dask(other.transpose(*order))
    # Insert the missing leading axes, then broadcast lazily (a view per block, not a copy).
    index = tuple(slice(None) if d in other.dims else None for d in main.dims)
    data = da.broadcast_to(data[index], main_d.shape)
    return data.rechunk(main_d.chunks)


def _main(a: Any, what: str) -> Any:
    """The array that sets the grid, as a DataArray with ``y``, ``x`` last."""
    a = _as_dataarray(a, what)
    for d in ("y", "x"):
        if d not in a.dims:
            raise MetricsError(f"{what} needs 'y' and 'x' dimensions, got {a.dims}")
    return a.transpose(..., "y", "x")


def _pixel_area(like: Any) -> float | None:
    try:
        return float(pixel_area_m2(like))
    except Exception:  # no CRS, geographic CRS, plain arrays: areas stay unknown (NaN)
        return None


# ----------------------------------------------------------------------------------------------
# confusion
# ----------------------------------------------------------------------------------------------


def _reference_and_valid(main_a: Any, main_d: Any, reference: Any, valid: Any) -> tuple[Any, Any, Any]:
    """The reference (0/1, 255 nodata) and optional validity mask, checked, as operands on main's grid."""
    ref_a = _check_int(_as_dataarray(reference, "reference"), "reference",
                       "rasterise outlines with icemap.labels.rasterize_outlines")
    ref_d = _operand(main_a, main_d, ref_a, "reference")
    valid_d = None
    if valid is not None:
        valid_a = _as_dataarray(valid, "valid")
        if valid_a.dtype != bool:
            valid_a = _check_int(valid_a, "valid", "pass a boolean mask")
        valid_d = _operand(main_a, main_d, valid_a, "valid")
    return ref_a, ref_d, valid_d


def confusion(
    pred: xr.DataArray | np.ndarray,
    reference: xr.DataArray | np.ndarray,
    *,
    valid: xr.DataArray | np.ndarray | None = None,
    by: xr.DataArray | np.ndarray | None = None,
    ids: int | Sequence[int] | np.ndarray | None = None,
    per_time: bool = False,
) -> xr.DataArray:
    """Confusion counts of an ice mask against a reference, lazily.

    Parameters
    ----------
    pred
        Ice mask, integer (uint8 from :func:`icemap.ice_mask`: 1 ice, 0 not, 255 nodata) or
        bool, dims (y, x) or (time, y, x); any other value than 0/1 counts as nodata.
    reference
        Reference mask on the same grid, 1 ice / 0 not (255 or any other value: nodata),
        dims (y, x) (broadcast over time) or the prediction's dims.
    valid
        Optional mask (bool or 0/nonzero), (y, x) or the prediction's dims: only pixels where it
        is true are scored (e.g. a study area, or "not cloud" from another source).
    by
        Optional integer id raster (y, x), e.g. from :func:`icemap.labels.glacier_ids`
        (0 = no glacier): counts are split by id. Negative ids are dropped.
    ids
        The ids to report with ``by``: an int ``n`` (ids 0..n) or a sequence of ids; pixels with
        other ids are dropped from the counts. Default 0..max(by); note that for a lazy ``by``
        this max is computed now (one pass over ``by``): pass ``ids`` to keep this call free of
        computation (:func:`evaluate` does).
    per_time
        Keep the prediction's non-spatial dimensions (normally ``time``) instead of summing
        counts over them.

    Returns
    -------
    xarray.DataArray
        int64 counts with dims ``([time,] outcome[, id])``; ``outcome`` is
        ``["tn", "fp", "fn", "tp"]`` (:data:`OUTCOMES`). Dask-backed (nothing computed) when
        any input is dask-backed, else computed. ``attrs["pixel_area_m2"]`` holds the pixel
        area when the prediction has a projected CRS, for :func:`scores`.

    Notes
    -----
    Pixels where the prediction or reference is nodata, or ``valid`` is false, are excluded
    from every count. Each block contributes one ``bincount`` of ``2 * ref + pred (+ 4 * id)``,
    so memory is one block plus ``4 * (n_ids + 1)`` integers per block.
    """
    hint = "threshold an index first, e.g. icemap.ice_mask(cube, threshold=0.4)"
    pred_a = _check_int(_main(pred, "pred"), "pred", hint)
    pred_d = _dask(pred_a)
    ref_a, ref_d, valid_d = _reference_and_valid(pred_a, pred_d, reference, valid)
    by_d, id_values, n_ids = _id_operand(pred_a, pred_d, by, ids)
    counts = _block_counts(_confusion_block, pred_d, [ref_d, valid_d, by_d], 4 * (n_ids + 1),
                           per_time, n_ids=n_ids)
    out = _confusion_array(counts, pred_a, by_d is not None, id_values, n_ids, per_time)
    if not _is_lazy(pred_a, ref_a, valid, by):
        out = out.compute()
    return out


def _id_operand(pred_a: Any, pred_d: Any, by: Any, ids: int | Sequence[int] | np.ndarray | None) -> tuple[Any, np.ndarray | None, int]:
    """The ``by`` id raster as a dask operand aligned with the prediction, the ids to report, and the largest.

    Returns ``(by or None, id values or None, max id)``. Without ``ids`` the largest id of ``by``
    is computed now (one pass over ``by``).
    """
    if by is None:
        if ids is not None:
            raise MetricsError("ids only makes sense together with by=")
        return None, None, 0
    by_a = _check_int(_as_dataarray(by, "by"), "by", "pass an integer id raster (labels.glacier_ids)")
    if set(by_a.dims) != {"y", "x"}:
        raise MetricsError(f"by must be a (y, x) id raster, got dims {by_a.dims}")
    by_d = _operand(pred_a, pred_d, by_a, "by")
    if ids is None:
        n_ids = max(int(by_d.max().compute()), 0)
        id_values = np.arange(n_ids + 1)
    elif isinstance(ids, (int, np.integer)):
        n_ids = int(ids)
        id_values = np.arange(n_ids + 1)
    else:
        id_values = np.asarray(list(ids), dtype=np.int64)
        if id_values.size == 0 or (id_values < 0).any():
            raise MetricsError("ids must be a non-empty list of ids >= 0 (0 = no glacier)")
        n_ids = int(id_values.max())
    if n_ids < 0:
        raise MetricsError(f"ids must be >= 0, got {ids!r}")
    return by_d, id_values, n_ids


def _confusion_array(counts: Any, pred_a: Any, by_id: bool, id_values: np.ndarray | None, n_ids: int,
                     per_time: bool) -> Any:
    """Label the summed counts: dims ``([time,] outcome[, id])``, the pixel area in the attributes."""
    lead = list(pred_a.dims[:-2]) if per_time else []
    if by_id:
        counts = counts.reshape(*counts.shape[:-1], n_ids + 1, 4)
        counts = counts.swapaxes(-1, -2)
        dims = (*lead, "outcome", "id")
        if id_values is not None and not np.array_equal(id_values, np.arange(n_ids + 1)):
            counts = counts[..., id_values]
    else:
        dims = (*lead, "outcome")
    coords: dict[str, Any] = {"outcome": list(OUTCOMES)}
    if by_id:
        coords["id"] = id_values
    for d in lead:
        if d in pred_a.coords:
            coords[d] = pred_a[d].values
    out = xr.DataArray(counts, dims=dims, coords=coords, name="confusion")
    px = _pixel_area(pred_a)
    out.attrs = {
        "long_name": "confusion counts (pixels)",
        "outcome_meaning": "tn: ref 0 pred 0, fp: ref 0 pred 1, fn: ref 1 pred 0, tp: ref 1 pred 1",
    }
    if px is not None:
        out.attrs["pixel_area_m2"] = px
    return out


# ----------------------------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------------------------


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a / b`` with NaN where ``b == 0``: an undefined ratio is missing, not an error."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, 1.0), np.nan)


def _score_arrays(tp: Any, fp: Any, fn: Any, tn: Any, px_m2: float | None) -> dict[str, np.ndarray]:
    """Every score of :data:`SCORE_KEYS`, vectorised over any shape of counts."""
    tp, fp, fn, tn = (np.asarray(v, dtype=np.int64) for v in (tp, fp, fn, tn))
    # float64 from here: n**2 in kappa overflows int64 beyond ~3e9 pixels.
    ftp, ffp, ffn, ftn = (v.astype(np.float64) for v in (tp, fp, fn, tn))
    n = ftp + ffp + ffn + ftn
    precision = _div(ftp, ftp + ffp)
    recall = _div(ftp, ftp + ffn)
    specificity = _div(ftn, ftn + ffp)
    overall = _div(ftp + ftn, n)
    # Cohen's kappa: agreement beyond the chance agreement of two raters with these marginals.
    pe = _div((ftp + ffp) * (ftp + ffn) + (ffn + ftn) * (ffp + ftn), n * n)
    kappa = _div(overall - pe, 1.0 - pe)
    area = np.nan if px_m2 is None else px_m2 / 1e6
    ice_area = (ftp + ffp) * area
    ref_area = (ftp + ffn) * area
    return {
        "f1": _div(2 * ftp, 2 * ftp + ffp + ffn),
        "precision": precision,
        "recall": recall,
        "iou": _div(ftp, ftp + ffp + ffn),
        "balanced_accuracy": (recall + specificity) / 2,
        "overall_accuracy": overall,
        "kappa": kappa,
        "missed_alarm": _div(ffn, ftp + ffn),
        "false_alarm": _div(ffp, ftp + ffp),
        "ice_area_km2": ice_area,
        "reference_area_km2": ref_area,
        "area_diff_pct": 100.0 * _div(ice_area - ref_area, ref_area),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "n_pixels": tp + fp + fn + tn,
    }


def _counts_of(conf: Any) -> dict[str, Any]:
    """tn/fp/fn/tp arrays (computed) from a confusion DataArray or a mapping."""
    if isinstance(conf, Mapping):
        missing = [o for o in OUTCOMES if o not in conf]
        if missing:
            raise MetricsError(f"confusion counts lack {missing}; pass icemap.metrics.confusion(...)")
        return {o: np.asarray(conf[o]) for o in OUTCOMES}
    if "outcome" not in getattr(conf, "dims", ()):
        raise MetricsError("expected the output of icemap.metrics.confusion (a DataArray with an 'outcome' dim)")
    conf = conf.compute() if hasattr(conf, "compute") else conf
    return {o: conf.sel(outcome=o).values for o in OUTCOMES}


def _px_of(conf: Any, pixel_area_m2: float | None) -> float | None:
    if pixel_area_m2 is not None:
        if not (math.isfinite(pixel_area_m2) and pixel_area_m2 > 0):
            raise MetricsError(f"pixel_area_m2 must be a positive area, got {pixel_area_m2!r}")
        return float(pixel_area_m2)
    attrs = getattr(conf, "attrs", {}) or {}
    return attrs.get("pixel_area_m2")


def scores(confusion: xr.DataArray | Mapping[str, int], *, pixel_area_m2: float | None = None) -> dict[str, float | int]:
    """Accuracy scores from confusion counts, as one flat JSON-ready dict.

    Parameters
    ----------
    confusion
        Output of :func:`confusion` without ``id``/``time`` dims (sum them first, e.g.
        ``conf.sum("id")``), or a mapping with ``tn``, ``fp``, ``fn``, ``tp``. Computed here if
        lazy.
    pixel_area_m2
        Pixel area for the area scores; default ``confusion.attrs["pixel_area_m2"]`` (set when
        the prediction had a projected CRS). Without either, areas are NaN.

    Returns
    -------
    dict
        Exactly :data:`SCORE_KEYS`: ``f1``, ``precision``, ``recall``, ``iou``,
        ``balanced_accuracy`` (mean of recall and specificity), ``overall_accuracy``, ``kappa``
        (Cohen's), ``missed_alarm`` = FN/(TP+FN), ``false_alarm`` = FP/(TP+FP) (study b),
        ``ice_area_km2`` (predicted ice, TP+FP), ``reference_area_km2`` (TP+FN),
        ``area_diff_pct`` = 100 (pred - ref) / ref (study a), and the counts ``tp``, ``fp``,
        ``fn``, ``tn``, ``n_pixels`` as ints. Undefined ratios (0/0) are ``nan`` (JSON null).

    Raises
    ------
    NoValidPixelsError
        When no pixel was scored: a score of nothing would only hide a wrong input.
    """
    counts = _counts_of(confusion)
    shapes = {np.shape(v) for v in counts.values()}
    if shapes != {()}:
        raise MetricsError(
            f"scores() takes counts of one comparison, got shape {shapes.pop()}; use scores_per_id() "
            "for per-glacier/per-time tables or sum the extra dimensions first"
        )
    px = _px_of(confusion, pixel_area_m2)
    if int(sum(int(v) for v in counts.values())) == 0:
        raise NoValidPixelsError(
            "no pixel is valid in both the prediction and the reference (all nodata, masked, or "
            "outside the valid mask): check the dates, the cloud mask and that both cover the same area"
        )
    arr = _score_arrays(counts["tp"], counts["fp"], counts["fn"], counts["tn"], px)
    out: dict[str, float | int] = {}
    for key in SCORE_KEYS:
        v = arr[key]
        out[key] = int(v) if key in ("tp", "fp", "fn", "tn", "n_pixels") else float(v)
    return out


def _scores_frame(conf: Any, px: float | None) -> Any:
    """A DataFrame of counts and scores, one row per combination of conf's non-outcome dims."""
    conf = conf.compute() if hasattr(conf, "compute") else conf
    other = [d for d in conf.dims if d != "outcome"]
    frame = conf.transpose(*other, "outcome").to_dataset(dim="outcome").to_dataframe()
    frame = frame[list(OUTCOMES)]
    arr = _score_arrays(frame["tp"].to_numpy(), frame["fp"].to_numpy(), frame["fn"].to_numpy(),
                        frame["tn"].to_numpy(), px)

    return pd.DataFrame({k: arr[k] for k in SCORE_KEYS}, index=frame.index)


def scores_per_id(
    confusion: xr.DataArray,
    *,
    pixel_area_m2: float | None = None,
    table: pd.DataFrame | None = None,
    include_none: bool = False,
) -> pd.DataFrame:
    """Scores per glacier id (and per time, if kept), as a pandas DataFrame.

    Parameters
    ----------
    confusion
        Output of :func:`confusion` with ``by=`` (dim ``id``; other dims such as ``time``
        become index levels too).
    pixel_area_m2
        As in :func:`scores`.
    table
        The table from :func:`icemap.labels.glacier_ids`: adds its ``glacier_id`` and
        ``outline_area_km2`` columns, joined on ``gid`` = ``id``.
    include_none
        Keep id 0 (pixels outside every glacier), where only false positives can occur.

    Returns
    -------
    pandas.DataFrame
        One row per id (index ``id``) with the columns of :func:`scores`. An id with no valid
        pixel (e.g. under a cloud) gets zero counts and NaN scores rather than an error.

    Notes
    -----
    Against rasterised outlines every pixel of a glacier is reference ice, so per glacier
    ``precision`` is 1 or NaN and ``recall`` is the share of the glacier mapped as ice;
    ``area_diff_pct`` compares mapped ice with the outline's pixel area.
    """
    if "id" not in getattr(confusion, "dims", ()):
        raise MetricsError("scores_per_id needs counts split by id: confusion(..., by=ids_raster)")
    px = _px_of(confusion, pixel_area_m2)
    frame = _scores_frame(confusion, px)
    if not include_none:
        ids = frame.index.get_level_values("id")
        frame = frame[ids != 0]
    if int(frame["n_pixels"].sum()) == 0 and len(frame):
        raise NoValidPixelsError("no glacier has a valid pixel in both the prediction and the reference")
    if table is not None:
        cols = [c for c in ("gid", "glacier_id", "outline_area_km2") if c in table.columns]
        if "gid" not in cols:
            raise MetricsError("table must be the table of icemap.labels.glacier_ids (a 'gid' column)")
        t = table[cols].set_index("gid")
        t.index.name = "id"
        frame = frame.join(t, on="id")
        lead = [c for c in ("glacier_id", "outline_area_km2") if c in frame.columns]
        frame = frame[lead + [c for c in frame.columns if c not in lead]]
    return frame


# ----------------------------------------------------------------------------------------------
# evaluate against outlines
# ----------------------------------------------------------------------------------------------


# Typed by ``per_glacier``: the scores alone, or the scores and the per-glacier table.
@overload
def evaluate(pred: xr.Dataset | xr.DataArray, outlines: str | os.PathLike[str] | gpd.GeoDataFrame, *, buffer_m: float = 0.0,
             all_touched: bool = False, per_glacier: Literal[False] = False, valid: xr.DataArray | np.ndarray | None = None,
             id_column: str | None = None) -> dict[str, float | int]: ...
@overload
def evaluate(pred: xr.Dataset | xr.DataArray, outlines: str | os.PathLike[str] | gpd.GeoDataFrame, *, buffer_m: float = 0.0,
             all_touched: bool = False, per_glacier: Literal[True], valid: xr.DataArray | np.ndarray | None = None,
             id_column: str | None = None) -> tuple[dict[str, float | int], pd.DataFrame]: ...
@overload
def evaluate(pred: xr.Dataset | xr.DataArray, outlines: str | os.PathLike[str] | gpd.GeoDataFrame, *, buffer_m: float = 0.0,
             all_touched: bool = False, per_glacier: bool = False, valid: xr.DataArray | np.ndarray | None = None,
             id_column: str | None = None) -> dict[str, float | int] | tuple[dict[str, float | int], pd.DataFrame]: ...
def evaluate(
    pred: xr.Dataset | xr.DataArray,
    outlines: str | os.PathLike[str] | gpd.GeoDataFrame,
    *,
    buffer_m: float = 0.0,
    all_touched: bool = False,
    per_glacier: bool = False,
    valid: xr.DataArray | np.ndarray | None = None,
    id_column: str | None = None,
) -> dict[str, float | int] | tuple[dict[str, float | int], pd.DataFrame]:
    """Score an ice mask against glacier outlines rasterised on its own grid.

    Parameters
    ----------
    pred
        Ice mask from :func:`icemap.ice_mask` (uint8 1/0/255, CRS-aware), (y, x) or
        (time, y, x); counts are summed over time (select a date with ``.isel(time=i)``).
    outlines
        Path or GeoDataFrame of glacier polygons (reprojected to the prediction's CRS).
    buffer_m
        Grow outlines by this many metres first; 15 gives study a's "extended" mask.
    all_touched
        Burn every pixel an outline touches rather than pixels whose centre is inside.
    per_glacier
        Also return a per-glacier DataFrame (:func:`scores_per_id` joined to the outline ids).
    valid
        Optional mask of pixels to score, as in :func:`confusion`.
    id_column
        Outline id column for the per-glacier table (default: guessed, see
        :func:`icemap.labels.glacier_ids`).

    Returns
    -------
    dict or (dict, pandas.DataFrame)
        :func:`scores`; with ``per_glacier`` also the per-glacier table. Per-glacier rows count
        the pixels whose centre is in that (unbuffered) outline.

    Notes
    -----
    The reference and the id raster are rasterised lazily onto ``pred``'s grid, so they can
    never disagree with it; the whole comparison is one pass over the prediction.
    """
    # A mask opened with plain xr.open_zarr is float with NaN for 255: make it uint8 again.
    pred_a = restore_mask(_as_dataarray(pred, "pred"))
    if _crs_of(pred_a) is None:
        raise GridMismatchError("the prediction has no CRS, so outlines cannot be placed on it; "
                                "compute it from a cube opened with icemap.open_cube / icemap.load")
    outlines = check_outlines_overlap(outlines, pred_a)
    px = _pixel_area(pred_a)
    if not per_glacier:
        reference = rasterize_outlines(outlines, pred_a, all_touched=all_touched, buffer_m=buffer_m)
        return scores(confusion(pred_a, reference, valid=valid), pixel_area_m2=px)
    ids, table = glacier_ids(outlines, pred_a, id_column=id_column)
    if buffer_m or all_touched:
        reference = rasterize_outlines(outlines, pred_a, all_touched=all_touched, buffer_m=buffer_m)
    else:
        # The same outlines by the same pixel-centre rule: the id raster already is the
        # reference (id > 0), so the outlines are burnt once per chunk, not twice.
        reference = (ids > 0).astype(np.uint8)
    # One pass: counts by id include id 0 (outside every outline), so their sum is the total.
    conf = confusion(pred_a, reference, valid=valid, by=ids,
                     ids=np.concatenate([[0], table["gid"].to_numpy()]))
    (conf,) = dask.compute(conf)
    total = scores(conf.sum("id"), pixel_area_m2=px)
    per = scores_per_id(conf, pixel_area_m2=px, table=table)
    return total, per


# ----------------------------------------------------------------------------------------------
# threshold calibration
# ----------------------------------------------------------------------------------------------


def _index_da(index: Any) -> tuple[Any, Any]:
    a = _main(index, "index")
    if not np.issubdtype(a.dtype, np.floating):
        raise MetricsError(f"index must be a float index (e.g. icemap.ndsi(cube)), got dtype {a.dtype}")
    return a, _dask(a)


def _edges(thresholds: Any) -> tuple[np.ndarray, np.ndarray]:
    """Sorted thresholds as given (float64) and as compared (float32), one per float32 value.

    ``ice_mask`` compares the float32 index with a Python float, which NumPy casts to float32,
    so binning on the float32 edges reproduces it exactly; the float64 values are kept for
    display (0.2, not 0.20000000298). Thresholds equal in float32 are the same threshold.
    """
    t = np.unique(np.asarray(thresholds, dtype=np.float64).ravel())
    if t.size == 0 or not np.isfinite(t).all():
        raise MetricsError("thresholds must be a non-empty list of finite numbers")
    t32 = t.astype(np.float32)
    keep = np.concatenate([[True], t32[1:] != t32[:-1]])
    return t[keep], t32[keep]


def confusion_sweep(index: xr.DataArray | np.ndarray, reference: xr.DataArray | np.ndarray, *, thresholds: Sequence[float] | np.ndarray | None = None,
                    valid: xr.DataArray | np.ndarray | None = None) -> xr.DataArray:
    """Confusion counts at many thresholds of an index at once, lazily (one pass).

    Parameters
    ----------
    index
        Float index, e.g. :func:`icemap.ndsi` (NaN = nodata), (y, x) or (time, y, x); counts
        are summed over time.
    reference
        0/1 reference (255 nodata) on the same grid, as in :func:`confusion`.
    thresholds
        Thresholds to evaluate (default :data:`DEFAULT_THRESHOLDS`); ice = ``index >= t``.
    valid
        Optional mask of pixels to score.

    Returns
    -------
    xarray.DataArray
        int64 counts, dims ``(threshold, outcome)``; lazy when an input is lazy.

    Notes
    -----
    The pass histograms the index separately for reference-ice and reference-non-ice pixels
    on bins whose edges are the thresholds; reversed cumulative sums then give TP/FN (ice
    pixels at or above / below each threshold) and FP/TN (the same for non-ice) for all
    thresholds. Counts equal ``confusion(index >= t, reference)`` exactly.
    """
    idx_a, idx_d = _index_da(index)
    shown, edges = _edges(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
    ref_a, ref_d, valid_d = _reference_and_valid(idx_a, idx_d, reference, valid)
    m1 = edges.size + 1
    hist = _block_counts(_bin_block, idx_d, [ref_d, valid_d], 2 * m1, False, edges=edges)
    hist = hist.reshape(2, m1)  # [reference class, bin]
    # at_or_above[c, k] = pixels of class c with index >= edges[k] (bins k+1 .. m).
    at_or_above = da.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]
    total = hist.sum(axis=1, keepdims=True)
    below = total - at_or_above
    tn, fp = below[0], at_or_above[0]
    fn, tp = below[1], at_or_above[1]
    counts = da.stack([tn, fp, fn, tp], axis=1)
    out = xr.DataArray(counts, dims=("threshold", "outcome"),
                       coords={"threshold": shown, "outcome": list(OUTCOMES)},
                       name="confusion")
    out.attrs = {"long_name": "confusion counts per threshold (ice = index >= threshold)"}
    px = _pixel_area(idx_a)
    if px is not None:
        out.attrs["pixel_area_m2"] = px
    if not _is_lazy(idx_a, ref_a, valid):
        out = out.compute()
    return out


def threshold_sweep(index: xr.DataArray | np.ndarray, reference: xr.DataArray | np.ndarray, *, thresholds: Sequence[float] | np.ndarray | None = None,
                    valid: xr.DataArray | np.ndarray | None = None, pixel_area_m2: float | None = None) -> pd.DataFrame:
    """Scores of ``index >= t`` against a reference for every threshold ``t`` (one pass).

    Study a chose its NDSI threshold (0.2) by maximising F1 on training data; this gives the
    whole curve at the cost of one histogram, to pick with :func:`best_threshold`.

    Parameters
    ----------
    index, reference, thresholds, valid
        As in :func:`confusion_sweep`. The default thresholds are -1.00 ... 1.00 in steps of
        0.01 (:data:`DEFAULT_THRESHOLDS`).
    pixel_area_m2
        For the area columns; default from the index's grid.

    Returns
    -------
    pandas.DataFrame
        One row per threshold, ascending: ``threshold`` then the columns of :func:`scores`
        (``f1``, ``precision``, ``recall``, ``iou``, ``kappa``, ..., ``tp``, ``fp``, ``fn``,
        ``tn``, ``n_pixels``). Thresholds that are equal in float32 (the index's dtype) are
        one threshold.
    """
    conf = confusion_sweep(index, reference, thresholds=thresholds, valid=valid).compute()
    if int(conf.isel(threshold=0).sum()) == 0:
        raise NoValidPixelsError("no pixel has both a valid index and a valid reference")
    frame = _scores_frame(conf, _px_of(conf, pixel_area_m2)).reset_index()
    return frame


def best_threshold(curve: Any, metric: str = "f1", *, maximize: bool | None = None,
                   tolerance: float = 0.0) -> float:
    """The threshold of a sweep curve with the best ``metric`` (F1 by default).

    Ties (flat optimum) resolve to the middle of the tied thresholds, so the choice does not
    drift to one end of a plateau. Lower is better for ``missed_alarm``, ``false_alarm`` and
    ``|area_diff_pct|`` (pass ``"abs_area_diff_pct"``); higher for the rest unless ``maximize``
    says otherwise.

    With ``tolerance > 0`` every threshold whose ``metric`` is within ``tolerance`` of the best
    counts as tied, and the *highest* of them is chosen: the most conservative call the curve
    cannot tell from the best. A validation set that lacks the hard cases (dark, hazy water that
    looks like shaded snow) scores a wide plateau of thresholds alike; the middle of that plateau
    is arbitrary, and the top of it is the choice that flags the least.
    """
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise MetricsError(f"tolerance must be a number >= 0, got {tolerance}")
    if metric == "abs_area_diff_pct":
        values = -np.abs(curve["area_diff_pct"].to_numpy(dtype=np.float64))
    else:
        if metric not in curve.columns:
            raise MetricsError(f"the curve has no column {metric!r}; columns: {', '.join(map(str, curve.columns))}")
        values = curve[metric].to_numpy(dtype=np.float64)
        if maximize is None:
            maximize = metric not in ("missed_alarm", "false_alarm")
        if not maximize:
            values = -values
    if np.isnan(values).all():
        raise NoValidPixelsError(f"{metric} is undefined at every threshold")
    best = np.nanmax(values)
    thresholds = curve["threshold"].to_numpy()
    if tolerance > 0:
        return float(thresholds[values >= best - tolerance].max())
    tied = np.flatnonzero(values == best)
    return float(thresholds[tied[len(tied) // 2]])


def index_histogram(index: Any, *, bins: int = 2000, range: tuple[float, float] = (-1.0, 1.0),
                    valid: Any = None) -> Any:
    """Histogram of an index over ``bins`` equal bins of ``range``, lazily.

    Values below/above the range count in the first/last bin (NDSI never leaves [-1, 1]).
    Bin ``j`` holds ``edges[j] <= v < edges[j + 1]`` in float32, so "bins >= k" are exactly
    the pixels that ``ice_mask(threshold=edges[k])`` calls ice.

    Returns
    -------
    xarray.DataArray
        int64 counts, dim ``bin`` with coords ``left``, ``right`` and ``centre``.
    """
    if int(bins) < 3:
        raise MetricsError(f"bins must be at least 3, got {bins}")
    lo, hi = float(range[0]), float(range[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise MetricsError(f"range must be (low, high) with low < high, got {range!r}")
    idx_a, idx_d = _index_da(index)
    # Rounded so thresholds print as 0.16, not 0.15999999999999992 (float32 edges unchanged).
    edges64 = np.round(np.linspace(lo, hi, int(bins) + 1), 12)
    edges = edges64.astype(np.float32)
    valid_d = None
    if valid is not None:
        valid_a = _as_dataarray(valid, "valid")
        if valid_a.dtype != bool:
            valid_a = _check_int(valid_a, "valid", "pass a boolean mask")
        valid_d = _operand(idx_a, idx_d, valid_a, "valid")
    # Searching all edges gives bins 0 (< lo) .. bins+1 (>= hi): fold the two outer ones in.
    raw = _block_counts(_bin_block, idx_d, [None, valid_d], edges.size + 1, False, edges=edges)
    inner = raw[1:-1]
    counts = da.concatenate([inner[:1] + raw[:1], inner[1:-1], inner[-1:] + raw[-1:]])
    left, right = edges64[:-1], edges64[1:]
    out = xr.DataArray(counts, dims=("bin",),
                       coords={"left": ("bin", left), "right": ("bin", right),
                               "centre": ("bin", (left + right) / 2)}, name="count")
    if not _is_lazy(idx_a, valid):
        out = out.compute()
    return out


def _otsu(counts: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Between-class variance for a split before each bin k (class 0 = bins < k)."""
    c = counts.astype(np.float64)
    n = c.sum()
    w0 = np.cumsum(c)[:-1]  # split before bin k = 1..nb-1
    s0 = np.cumsum(c * centres)[:-1]
    w1 = n - w0
    s1 = (c * centres).sum() - s0
    mu0 = _div(s0, w0)
    mu1 = _div(s1, w1)
    var = w0 * w1 * (mu0 - mu1) ** 2 / (n * n)
    return np.concatenate([[np.nan], var])  # no split before the first bin


def _smooth(counts: np.ndarray, sigma_bins: float) -> np.ndarray:
    return gaussian_filter1d(counts.astype(np.float64), sigma_bins, mode="constant")


def unsupervised_threshold(
    index: xr.DataArray | np.ndarray,
    *,
    method: Literal["otsu", "valley"] = "otsu",
    valid: xr.DataArray | np.ndarray | None = None,
    bins: int = 2000,
    range: tuple[float, float] = (-1.0, 1.0),
    smooth: float = 0.02,
    min_separation: float = 0.1,
    min_prominence: float = 0.02,
) -> tuple[float, pd.DataFrame]:
    """Pick an index threshold from the index's histogram alone (no reference).

    Study b read the NDSI threshold off the histogram's two peaks (ice and the rest). Two
    classic readings are offered:

    * ``"otsu"``: the split maximising the between-class variance of the histogram;
    * ``"valley"``: the lowest point of the Gaussian-smoothed histogram between its two most
      prominent peaks at least ``min_separation`` apart.

    Parameters
    ----------
    index
        Float index (NaN = nodata), e.g. :func:`icemap.ndsi`.
    method
        ``"otsu"`` or ``"valley"``.
    valid
        Optional mask of pixels to use (e.g. only within a study area).
    bins, range
        Histogram resolution (default 2000 bins over [-1, 1], 0.001 wide).
    smooth
        Gaussian smoothing sigma for ``"valley"``, in index units (default 0.02): noise in a
        sparse histogram would otherwise create spurious local minima.
    min_separation
        Minimum distance between the two peaks for ``"valley"``, in index units.
    min_prominence
        Minimum prominence of a peak for ``"valley"``, as a share of the highest smoothed
        count: sampling noise left in the tails after smoothing is not a second class.

    Returns
    -------
    (float, pandas.DataFrame)
        The threshold (a bin edge, so ``index >= threshold`` splits the histogram exactly)
        and the curve: ``threshold`` (each bin's left edge), ``right``, ``centre``, ``count``
        and ``between_class_variance`` (otsu, for the split at ``threshold``) or ``smoothed``
        (valley; the peaks are in ``curve.attrs["peaks"]``).

    Raises
    ------
    NoValidPixelsError
        Empty histogram.
    MetricsError
        ``"valley"`` on a histogram with fewer than two peaks.
    """
    if method not in ("otsu", "valley"):
        raise MetricsError(f"method must be 'otsu' or 'valley', got {method!r}")
    hist = index_histogram(index, bins=bins, range=range, valid=valid).compute()
    counts = hist.values.astype(np.int64)
    if counts.sum() == 0:
        raise NoValidPixelsError("the index has no valid pixel to build a histogram from")
    left = hist["left"].values
    curve = pd.DataFrame({"threshold": left, "right": hist["right"].values,
                          "centre": hist["centre"].values, "count": counts})
    width = (float(range[1]) - float(range[0])) / int(bins)
    if method == "otsu":
        var = _otsu(counts, curve["centre"].to_numpy())
        curve["between_class_variance"] = var
        if not np.isfinite(var).any() or np.nanmax(var) <= 0:
            raise MetricsError("the histogram has a single populated bin; no split exists")
        best = np.nanmax(var)
        tied = np.flatnonzero(var == best)
        k = int(tied[len(tied) // 2])
        return float(left[k]), curve
    sm = _smooth(counts, max(smooth / width, 1e-9))
    curve["smoothed"] = sm
    # scipy.signal costs about 1 s at import (it loads scipy.stats): every `icemap` command
    # would pay it for this one method of this one function.
    from scipy.signal import find_peaks

    peaks, props = find_peaks(np.concatenate([[0.0], sm, [0.0]]), prominence=min_prominence * sm.max())
    peaks = peaks - 1
    if peaks.size < 2:
        raise MetricsError("the smoothed histogram has fewer than two peaks; use method='otsu' or "
                           "calibrate with threshold_sweep against a reference")
    order = np.argsort(props["prominences"])[::-1]
    first = int(peaks[order[0]])
    sep = max(int(round(min_separation / width)), 1)
    second = next((int(peaks[i]) for i in order[1:] if abs(int(peaks[i]) - first) >= sep), None)
    if second is None:
        raise MetricsError(f"no two histogram peaks are {min_separation} apart; use method='otsu' or "
                           "a smaller min_separation")
    a, b = sorted((first, second))
    seg = sm[a: b + 1]
    tied = np.flatnonzero(seg == seg.min())
    k = a + int(tied[len(tied) // 2])
    curve.attrs["peaks"] = [float(curve["centre"].iloc[a]), float(curve["centre"].iloc[b])]
    return float(left[k]), curve
