"""Study a's experiment grid, its NDSI baseline and its input ablation, on any cube.

Study a trained ten U-Nets (five input combinations x original/extended mask) on the same
chips and split, scored them and an NDSI threshold (calibrated on the training set) on the
test set (its Table 3), then hid one input channel at a time at inference (its Table 5).
:func:`run_experiment` does the same and writes:

``OUT/``
    ``table3.csv``/``.md``        test-set scores of NDSI (calibrated and 0.4) and every model
    ``table5.csv``/``.md``        channel-hiding ablation (F1 with one channel set to 0)
    ``false_positives.csv``/``.md``  false positives by truth class (water, shadow, ...), when a
                                  class truth is given (the sample region has one)
    ``experiment.json``           settings, split and KS report, NDSI curve, timings
    ``models/<run>/``             one checkpoint per run (resumable)

Scores are pooled over the test chips (every window x date) and computed against the
*original* outlines for every row, so rows are comparable; the F1 against the extended mask is
an extra column. Every row counts the same pixels: those where every cube band is valid.

:func:`score_scene` scores models and NDSI on a whole (small) scene in memory, e.g. a hold-out
region the models never saw, or the real Athabasca crop.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio
import xarray as xr
from rasterio.windows import from_bounds

from icemap.errors import ModelError
from icemap.index import ice_mask
from icemap.kernels import ICE_NODATA
from icemap.lab.data import MASK_BUFFERS, ChipDataset
from icemap.lab.train import (
    PreparedData,
    TrainConfig,
    TrainResult,
    counts,
    predict_dataset,
    predict_window,
    prepare_data,
    train,
)
from icemap.labels import rasterize_outlines
from icemap.metrics import best_threshold, scores, threshold_sweep
from icemap.model.inputs import CHANNEL_SETS, Normalisation, needs_dem, required_bands, resolve_channels
from icemap.sample import CLASS_CODES

__all__ = [
    "STUDY_A_INPUTS",
    "FP_CLASSES",
    "RunSpec",
    "default_runs",
    "ExperimentResult",
    "run_experiment",
    "calibrate_ndsi",
    "score_scene",
    "to_markdown",
]

#: Study a's five input combinations, in its order (models 1-5 original, 6-10 extended).
STUDY_A_INPUTS: tuple[str, ...] = ("all_bands_dem", "all_bands", "b3_b6", "ndsi", "ndsi_dem")
#: Truth classes whose false positives are reported (both studies: water and shadow; NDSI's
#: other known confusions: snow and cloud; rock as the background).
FP_CLASSES: tuple[str, ...] = ("water", "cloud_shadow", "snow", "cloud", "rock")
_TABLE3_COLS = ("f1", "balanced_accuracy", "precision", "recall", "ice_area_km2", "reference_area_km2",
                "area_diff_pct")


@dataclass(frozen=True)
class RunSpec:
    """One model of the grid: an input set, a mask type and optional setting overrides.

    ``overrides`` are :class:`TrainConfig` fields (e.g. study b's ``loss="bce",
    optimizer="adadelta"``); chip and split settings are shared by all runs and cannot differ.
    """

    inputs: str
    mask: str = "original"
    overrides: Mapping[str, Any] = field(default_factory=dict)
    label: str | None = None

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        base = self.inputs if self.inputs in CHANNEL_SETS else self.inputs.replace(",", "+")
        return f"{base}_{self.mask}"


def default_runs(inputs: Sequence[str] = STUDY_A_INPUTS, masks: Sequence[str] = ("original", "extended")) -> list[RunSpec]:
    """The grid ``inputs x masks`` in study a's order (all inputs with the first mask, then...)."""
    for m in masks:
        if m not in MASK_BUFFERS:
            raise ModelError(f"mask must be one of {', '.join(MASK_BUFFERS)}, not {m!r}")
    for i in inputs:
        resolve_channels(i)
    return [RunSpec(i, m) for m in masks for i in inputs]


@dataclass
class ExperimentResult:
    """Tables (pandas DataFrames) and trained runs of :func:`run_experiment`."""

    table3: Any
    table5: Any
    false_positives: Any
    runs: dict[str, TrainResult]
    ndsi_threshold: float
    data: PreparedData
    out: Path
    seconds: float


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def to_markdown(df: Any, *, floatfmt: str = ".3f") -> str:
    """A pipe table of a DataFrame (pandas' own needs tabulate, which icemap does not)."""
    cols = [str(c) for c in df.columns]

    def fmt(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if math.isnan(float(v)) else format(float(v), floatfmt)
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _write(df: Any, out: Path, stem: str, title: str) -> None:
    df.to_csv(out / f"{stem}.csv", index=False)
    (out / f"{stem}.md").write_text(f"# {title}\n\n" + to_markdown(df))


def _score_row(c: dict[str, int], px: float) -> dict[str, float]:
    s = scores(c, pixel_area_m2=px)
    return {k: s[k] for k in _TABLE3_COLS}


# ----------------------------------------------------------------------------------------------
# NDSI baseline
# ----------------------------------------------------------------------------------------------


def _ndsi_chips(data: PreparedData, samples: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NDSI, original-mask labels and valid pixels of the given samples, stacked."""
    src = data.source
    nd, ref, ok = [], [], []
    for s in samples:
        nd.append(src.inputs(s, ("ndsi",))[0])
        ref.append(src.sample_labels(s, 0.0))
        ok.append(src.valid(s))
    return np.stack(nd), np.stack(ref), np.stack(ok)


def calibrate_ndsi(data: PreparedData, samples: Sequence[int] | None = None) -> tuple[float, Any]:
    """Study a's NDSI threshold: the best F1 on the training chips (original outlines).

    Uses :func:`icemap.metrics.threshold_sweep` (every threshold -1.00 ... 1.00 by 0.01 in
    one pass) and :func:`icemap.metrics.best_threshold`. Returns ``(threshold, curve)``.
    """
    samples = data.samples("train") if samples is None else samples
    nd, ref, ok = _ndsi_chips(data, samples)
    index = xr.DataArray(np.where(ok, nd, np.nan).astype(np.float32), dims=("time", "y", "x"))
    reference = xr.DataArray(np.where(ok, ref, ICE_NODATA).astype(np.uint8), dims=("time", "y", "x"))
    curve = threshold_sweep(index, reference, pixel_area_m2=data.source.pixel_area_m2)
    return best_threshold(curve, "f1"), curve


def _ndsi_masks(data: PreparedData, samples: Sequence[int], threshold: float) -> list[np.ndarray]:
    """icemap.index.ice_mask on each sample's window (the NDSI product as users get it)."""
    return [np.asarray(ice_mask(data.source.window(s), threshold=threshold).values[0]) == 1 for s in samples]


# ----------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------


def _truth_path(truth: Any, date: str) -> Any:
    if truth is None:
        return None
    if hasattr(truth, "truth"):
        return truth.truth(date)
    if callable(truth):
        return truth(date)
    raise ModelError("truth must be a sample region (with .truth(date)) or a callable date -> class raster path")


def _check_runs(runs: Sequence[RunSpec], bands: Sequence[str], dem: Any) -> None:
    problems = []
    for r in runs:
        ch = resolve_channels(r.inputs)
        missing = [b for b in required_bands(ch) if b not in bands]
        if missing:
            problems.append(f"{r.name} needs band(s) {missing}")
        if needs_dem(ch) and dem is None:
            problems.append(f"{r.name} needs a DEM (--dem)")
        bad = [k for k in r.overrides if k in ("chip_size", "overlap", "n_random", "n_hard_negative",
                                                "min_valid", "split_seed", "split_iterations")]
        if bad:
            problems.append(f"{r.name} overrides shared chip/split settings {bad}")
    if problems:
        raise ModelError("cannot run the grid: " + "; ".join(problems) + f" (the cube has bands {list(bands)})")


def run_experiment(
    cube: Any,
    outlines: Any,
    out: str | os.PathLike[str],
    *,
    runs: Sequence[RunSpec] | None = None,
    config: TrainConfig | None = None,
    dem: Any = None,
    truth: Any = None,
    data: PreparedData | None = None,
    resume: bool = True,
    quiet: bool = False,
    console: Any = None,
    callback: Callable[[str, Any], Any] | None = None,
) -> ExperimentResult:
    """Train the grid on one set of chips and split; write Table 3, Table 5 and FP tables.

    Parameters
    ----------
    cube, outlines
        Cube store (path or opened) and reference outlines.
    out
        Output folder (tables, ``experiment.json``, ``models/``).
    runs
        The models to train (default :func:`default_runs`: study a's 5 inputs x 2 masks).
    config
        Settings shared by all runs (architecture, epochs, loss, chips, split...); each run
        sets ``inputs`` and ``mask`` and may override training settings.
    dem
        DEM for the terrain channels.
    truth
        Class truth for the false-positive table: a :class:`icemap.sample.SampleRegion` or a
        callable ``date -> class raster path`` (codes of :data:`icemap.sample.CLASS_CODES`).
    data
        Prepared chips/split to reuse (else made from ``config``'s chip settings).
    resume
        Reuse finished runs and resume interrupted ones from their training state.
    callback
        Called as ``callback(run_name, EpochRecord)`` after every epoch of every run.

    Returns
    -------
    ExperimentResult
    """
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = config or TrainConfig()
    runs = list(runs) if runs is not None else default_runs()
    if not runs:
        raise ModelError("no runs to train; name at least one input set")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ModelError(f"two runs share a name: {names}")
    data = _experiment_data(cube, outlines, runs, config, dem, data)
    test = _TestChips.of(data, truth)
    ndsi_t, curve = calibrate_ndsi(data)
    rows, fp_rows = _ndsi_rows(data, test, ndsi_t)
    results: dict[str, TrainResult] = {}
    ablation: list[dict[str, Any]] = []
    for k, run in enumerate(runs, start=1):
        cfg = replace(config, inputs=run.inputs, mask=run.mask, **dict(run.overrides))
        cb = None if callback is None else (lambda rec, _n=run.name: callback(_n, rec))
        res = train(None, None, out / "models" / run.name, cfg, data=data, resume=resume, callback=cb,
                    quiet=quiet, console=console, title=f"[{k}/{len(runs)}] {run.name}")
        results[run.name] = res
        _score_run(run, res, data, test, rows, fp_rows, ablation)
    table3, table5, fps = _write_tables(out, rows, ablation, fp_rows)
    seconds = time.perf_counter() - t0
    summary = {
        "cube": data.cube_path, "outlines": data.outlines_path, "dem": data.dem_path,
        "config": config.to_dict(), "runs": [{"name": r.name, "inputs": r.inputs, "mask": r.mask,
                                               "overrides": dict(r.overrides)} for r in runs],
        "chips": data.index.summary(), "chip_params": data.chip_params, "split": data.split.report,
        "test_samples": len(test.ids), "dates": test.dates,
        "ndsi_threshold": ndsi_t, "ndsi_curve": curve[["threshold", "f1", "precision", "recall"]].to_dict("list"),
        "seconds": round(seconds, 1),
        "train_seconds": {n: round(r.seconds, 1) for n, r in results.items()},
    }
    (out / "experiment.json").write_text(json.dumps(summary, indent=1, default=float))
    return ExperimentResult(table3=table3, table5=table5, false_positives=fps, runs=results,
                            ndsi_threshold=ndsi_t, data=data, out=out, seconds=seconds)


def _experiment_data(cube: Any, outlines: Any, runs: Sequence[RunSpec], config: TrainConfig, dem: Any,
                     data: PreparedData | None) -> PreparedData:
    """The chips and split every run shares: the given ones, or made with ``config``'s chip
    settings; either way the runs are checked against the cube's bands and the DEM first."""
    if data is not None:
        _check_runs(runs, data.source.bands, dem if dem is not None else data.source.dem)
        return data
    from icemap.lab.train import _open

    ds, _ = _open(cube)
    refl = ds["reflectance"] if "reflectance" in getattr(ds, "data_vars", {}) else ds
    _check_runs(runs, [str(b) for b in refl["band"].values], dem)
    data = prepare_data(ds, outlines, chip_size=config.chip_size, overlap=config.overlap,
                        n_random=config.n_random, n_hard_negative=config.n_hard_negative,
                        min_valid=config.min_valid, split_seed=config.effective_split_seed,
                        split_iterations=config.split_iterations, dem=dem)
    data.cube_path = os.fspath(cube) if isinstance(cube, (str, os.PathLike)) else None
    data.outlines_path = os.fspath(outlines) if isinstance(outlines, (str, os.PathLike)) else None
    return data


@dataclass
class _TestChips:
    """The test chips every row is scored on: their ids, labels (original and extended
    outlines), valid pixels and, when given, class truth for the false-positive table."""

    data: PreparedData
    ids: list[int]
    dates: list[str]
    ref_orig: list[np.ndarray]
    ref_ext: list[np.ndarray]
    valid: list[np.ndarray]
    truths: list[np.ndarray] | None

    @classmethod
    def of(cls, data: PreparedData, truth: Any) -> _TestChips:
        src = data.source
        test_ids = data.samples("test")
        if not test_ids:
            raise ModelError("the split has no test chip; use a larger cube or smaller chips")
        dates = [str(np.datetime_as_string(t, unit="D")) for t in src.refl["time"].values]
        truths = None
        if truth is not None:
            truths = [src.truth(s, _truth_path(truth, dates[src.index.samples[s].time])) for s in test_ids]
        return cls(data=data, ids=test_ids, dates=dates,
                   ref_orig=[src.sample_labels(s, 0.0) for s in test_ids],
                   ref_ext=[src.sample_labels(s, MASK_BUFFERS["extended"]) for s in test_ids],
                   valid=[src.valid(s) for s in test_ids], truths=truths)

    def pooled(self, preds: Sequence[np.ndarray], refs: Sequence[np.ndarray]) -> dict[str, int]:
        """Confusion counts over all test chips (valid pixels only)."""
        total: dict[str, int] = {}
        for p, r, v in zip(preds, refs, self.valid):
            c = counts(p, r, v)
            total = {k: total.get(k, 0) + c[k] for k in c}
        return total

    def scores(self, preds: Sequence[np.ndarray], refs: Sequence[np.ndarray] | None = None) -> dict[str, float]:
        return _score_row(self.pooled(preds, self.ref_orig if refs is None else refs), self.data.source.pixel_area_m2)

    def fp_row(self, method: str, preds: Sequence[np.ndarray]) -> dict[str, Any]:
        """Pixels of each truth class outside the outlines, and the share called ice."""
        row: dict[str, Any] = {"method": method}
        for cls in FP_CLASSES:
            code = CLASS_CODES[cls]
            fp = n = 0
            for p, r, v, tr in zip(preds, self.ref_orig, self.valid, self.truths or []):
                m = v & (r == 0) & (tr == code)
                n += int(m.sum())
                fp += int((p & m).sum())
            row[f"{cls}_px"] = n
            row[f"{cls}_fp"] = fp
            row[f"{cls}_fp_pct"] = 100.0 * fp / n if n else float("nan")
        return row


def _ndsi_rows(data: PreparedData, test: _TestChips,
               ndsi_t: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Table 3's NDSI rows (calibrated threshold and the usual 0.4) and their false positives."""
    rows: list[dict[str, Any]] = []
    fp_rows: list[dict[str, Any]] = []
    for label, t in (("NDSI (calibrated)", ndsi_t), ("NDSI 0.4", 0.4)):
        preds = _ndsi_masks(data, test.ids, t)
        rows.append({"model": label, "inputs": "ndsi", "mask": "-", "threshold": t, **test.scores(preds),
                     "f1_extended": test.scores(preds, test.ref_ext)["f1"],
                     "epochs_run": 0, "best_epoch": 0, "train_s": 0.0})
        if test.truths is not None:
            fp_rows.append(test.fp_row(label, preds))
    return rows, fp_rows


def _score_run(run: RunSpec, res: TrainResult, data: PreparedData, test: _TestChips, rows: list[dict[str, Any]],
               fp_rows: list[dict[str, Any]], ablation: list[dict[str, Any]]) -> None:
    """A trained run's Table 3 row, its false positives, and its Table 5 rows (each channel
    hidden in turn: its normalised value set to 0), appended to the tables."""
    src = data.source
    ch = tuple(res.meta.channels)
    norm = Normalisation.from_dict(res.meta.normalisation)
    ds = ChipDataset(src, test.ids, ch, mask=run.mask, normalisation=norm, multiple=res.model.config.multiple)
    probs = predict_dataset(res.model, ds)
    preds = [p >= res.threshold for p in probs]
    base_scores = test.scores(preds)
    rows.append({"model": run.name, "inputs": run.inputs, "mask": run.mask, "threshold": res.threshold,
                 **base_scores, "f1_extended": test.scores(preds, test.ref_ext)["f1"],
                 "epochs_run": len(res.history), "best_epoch": res.best_epoch,
                 "train_s": round(res.seconds, 1)})
    if test.truths is not None:
        fp_rows.append(test.fp_row(run.name, preds))
    if len(ch) > 1:
        for i, c in enumerate(ch):
            hidden = ChipDataset(src, test.ids, ch, mask=run.mask, normalisation=norm,
                                 multiple=res.model.config.multiple, hide_channel=i)
            hp = [p >= res.threshold for p in predict_dataset(res.model, hidden)]
            s = test.scores(hp)
            ablation.append({"model": run.name, "hidden": c, "f1": s["f1"], "delta_f1": s["f1"] - base_scores["f1"],
                             "precision": s["precision"], "recall": s["recall"],
                             "area_diff_pct": s["area_diff_pct"]})


def _write_tables(out: Path, rows: list[dict[str, Any]], ablation: list[dict[str, Any]],
                  fp_rows: list[dict[str, Any]]) -> tuple[Any, Any, Any]:
    """Tables 3 and 5 and the false-positive table, as CSV and Markdown in ``out``."""
    table3 = pd.DataFrame(rows)
    table5 = pd.DataFrame(ablation, columns=["model", "hidden", "f1", "delta_f1", "precision", "recall",
                                             "area_diff_pct"])
    fps = pd.DataFrame(fp_rows) if fp_rows else None
    _write(table3, out, "table3", "Table 3: test-set scores against the original outlines")
    _write(table5, out, "table5", "Table 5: channel hiding (normalised value set to 0) on the test set")
    if fps is not None:
        _write(fps, out, "false_positives", "False positives by truth class on the test set (reference = 0)")
    return table3, table5, fps


# ----------------------------------------------------------------------------------------------
# Whole-scene scoring
# ----------------------------------------------------------------------------------------------


def score_scene(
    cube: Any,
    outlines: Any,
    models: Mapping[str, tuple[Any, Any]],
    *,
    ndsi_thresholds: Mapping[str, float] | None = None,
    dem: Any = None,
    truth: Any = None,
    tile: int | None = None,
) -> tuple[Any, Any]:
    """Score models and NDSI thresholds on every date of a whole scene, in memory.

    For scenes that fit in memory (a hold-out region, a real crop): the models run through
    :func:`icemap.lab.train.predict_window`, NDSI through :func:`icemap.index.ice_mask`;
    all rows count the pixels where every band the cube has is valid, against the original
    outlines (F1 against the extended mask as an extra column).

    Parameters
    ----------
    cube
        Cube (path or opened).
    outlines
        Reference outlines.
    models
        ``name -> (model, meta)`` as :func:`icemap.model.checkpoint.load_checkpoint` returns.
    ndsi_thresholds
        ``name -> threshold`` NDSI rows (default ``{"NDSI 0.4": 0.4}``).
    truth
        Class truth (as in :func:`run_experiment`) for the false-positive table.

    Returns
    -------
    (pandas.DataFrame, pandas.DataFrame or None)
        Scores per row, and false positives by truth class.
    """
    from icemap.lab.train import _open

    ds, _ = _open(cube)
    refl = ds["reflectance"] if "reflectance" in getattr(ds, "data_vars", {}) else ds
    refl = refl.load()
    ref_o = np.asarray(rasterize_outlines(outlines, refl).values)
    ref_e = np.asarray(rasterize_outlines(outlines, refl, buffer_m=MASK_BUFFERS["extended"]).values)
    valid = np.asarray(refl.notnull().all("band").values)
    transform = refl.rio.transform(recalc=True)
    px = abs(transform.a * transform.e)
    dates = [str(np.datetime_as_string(t, unit="D")) for t in refl["time"].values]
    truths = None
    if truth is not None:
        truths = []
        h, w = ref_o.shape
        for d in dates:
            with rasterio.open(_truth_path(truth, d)) as src_t:
                left, top = transform * (0, 0)
                right, bottom = transform * (w, h)
                win = from_bounds(left, bottom, right, top, transform=src_t.transform).round_offsets().round_lengths()
                truths.append(src_t.read(1, window=win, boundless=True, fill_value=CLASS_CODES["fill"]))

    def row(name: str, pred: np.ndarray, threshold: float) -> tuple[dict[str, Any], dict[str, Any]]:
        c_o = counts(pred, np.broadcast_to(ref_o, pred.shape), valid)
        c_e = counts(pred, np.broadcast_to(ref_e, pred.shape), valid)
        s = scores(c_o, pixel_area_m2=px)
        r = {"model": name, "threshold": threshold, **{k: s[k] for k in _TABLE3_COLS},
             "f1_extended": scores(c_e, pixel_area_m2=px)["f1"]}
        fp: dict[str, Any] = {"method": name}
        if truths is not None:
            for cls in FP_CLASSES:
                m = valid & (ref_o == 0)[None] & (np.stack(truths) == CLASS_CODES[cls])
                n = int(m.sum())
                fp[f"{cls}_px"] = n
                fp[f"{cls}_fp"] = int((pred & m).sum())
                fp[f"{cls}_fp_pct"] = 100.0 * fp[f"{cls}_fp"] / n if n else float("nan")
        return r, fp

    rows, fps = [], []
    for name, t in (ndsi_thresholds or {"NDSI 0.4": 0.4}).items():
        pred = np.asarray(ice_mask(refl, threshold=t).values) == 1
        r, f = row(name, pred, t)
        rows.append(r)
        fps.append(f)
    for name, (model, meta) in models.items():
        probs = predict_window(model, meta, refl, dem=dem, tile=tile)
        pred = np.nan_to_num(probs, nan=0.0) >= meta.threshold
        r, f = row(name, pred, meta.threshold)
        rows.append(r)
        fps.append(f)
    return pd.DataFrame(rows), (pd.DataFrame(fps) if truths is not None else None)
