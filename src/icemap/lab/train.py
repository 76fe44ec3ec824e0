"""Training the U-Net on chips from a cube and glacier outlines, resumably and reproducibly.

The defaults follow study a (METHOD.md): Dice loss, learning rate 0.01, min-max normalisation
fitted on the training chips, flips and rotations. Study b's set-up is one option away
(``loss="bce", optimizer="adadelta", batch_size=8, inputs="b6_b5_b2"``). Both studies' advice
is built in: early stopping on the validation F1 with the best validation model kept.

What makes a run reproducible and resumable:

* every random choice derives from ``seed``: the weights' initialisation, and per epoch the
  shuffling, the augmentation and dropout are re-seeded from ``(seed, epoch)``. A run resumed
  at epoch k therefore draws exactly what an uninterrupted run draws from epoch k on, and only
  the model, optimizer and early-stopping state need to be saved;
* on CPU, ``torch.use_deterministic_algorithms`` is switched on for the run (and restored);
* after every epoch the state is written to ``OUT/training/``: tensors as safetensors
  (model, best model, optimizer moments), everything else as JSON (epoch, history, optimizer
  hyper-parameters and step counts, normalisation, split). No pickle anywhere: a state file
  from elsewhere cannot run code.

The GPU is used when present (``device="auto"``) with autocast: bfloat16 where the GPU
supports it (no loss scaling needed), else float16 with a GradScaler. On CPU, training runs
in float32 (CPU autocast is slower than float32 for convolutions of this size).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from icemap.model.item import describe_model
from icemap.errors import ModelError, ModelNoBetterWarning
from icemap.infer import default_halo, predict_array
from icemap.kernels import ICE_NODATA, confusion_counts, ice_mask
from icemap.lab.augment import SpectralAugment
from icemap.lab.data import (
    CHIP_LAYOUTS,
    GROUPINGS,
    MASK_BUFFERS,
    OVERLAP_MODES,
    ChipDataset,
    ChipIndex,
    ChipSource,
    Split,
    _time_labels,
    fit_normalisation,
    label_keys,
    make_chips,
    split_by_year,
    split_chips,
)
from icemap.labels import read_outlines
from icemap.metrics import OUTCOMES, best_threshold, scores, threshold_sweep
from icemap.model.checkpoint import CheckpointMeta, _atomic_write, load_checkpoint, read_metadata, save_checkpoint
from icemap.model.inputs import (
    Normalisation,
    build_inputs,
    check_bands,
    required_bands,
    resolve_channels,
)
from icemap.model.packaged import resolve_model
from icemap.model.unet import UNet, UNetConfig
from icemap.options import resolve
from icemap.store import open_cube

__all__ = [
    "LOSSES",
    "OPTIMIZERS",
    "TrainConfig",
    "EpochRecord",
    "PreparedData",
    "TrainResult",
    "prepare_data",
    "train",
    "dice_loss",
    "bce_loss",
    "make_loss",
    "predict_dataset",
    "score_dataset",
    "counts",
    "predict_window",
    "validation_baselines",
    "STATE_DIR",
]

LOSSES: tuple[str, ...] = ("dice", "bce", "dice+bce")
OPTIMIZERS: tuple[str, ...] = ("adam", "adadelta")
#: Default learning rates: study a's 0.01 for Adam; Adadelta's own 1.0 (study b used Keras'
#: Adadelta, whose lr=1.0 means "the pure Adadelta rule").
DEFAULT_LR = {"adam": 0.01, "adadelta": 1.0}
#: How chips are split into train/validation/test (:func:`prepare_data`).
SPLITS: tuple[str, ...] = GROUPINGS + ("year",)
#: With ``init`` (fine-tuning) and no ``lr``, the default learning rate is multiplied by this.
FINE_TUNE_LR_FACTOR = 0.1
#: The architecture fields a fine-tune takes from its starting model.
_ARCH_FIELDS = ("depth", "base", "batch_norm", "dropout")
#: Sub-folder of a model folder that holds the resumable training state.
STATE_DIR = "training"
_STATE_TENSORS = "state.safetensors"
_STATE_JSON = "state.json"
_STATE_FORMAT = 1
#: Thresholds tried when the decision threshold is tuned on the validation set.
TUNE_THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)
#: Settings that may change when a run is resumed (all others must match the state).
_RESUMABLE_CHANGES = ("epochs", "patience", "device", "amp")


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything that defines a training run (recorded in the checkpoint).

    Parameters
    ----------
    inputs
        Channel-set name (:data:`icemap.model.inputs.CHANNEL_SETS`) or comma-separated channels.
    mask
        ``"original"`` outlines or ``"extended"`` (grown 15 m) as labels.
    chip_size
        Chip edge in pixels; padded to a multiple of ``2**depth`` (e.g. 120 -> 128 at depth 4,
        120 stays 120 at depth 3); the pad is ignored by loss and scores.
    depth, base, batch_norm, dropout
        U-Net architecture (:class:`~icemap.model.unet.UNetConfig`).
    epochs
        Maximum number of epochs (study a: 100, study b: 50).
    batch_size
        Chips per step (study b: 8).
    loss
        ``"dice"`` (study a), ``"bce"`` (study b) or ``"dice+bce"``.
    optimizer
        ``"adam"`` or ``"adadelta"`` (study b).
    lr
        Learning rate; default 0.01 for Adam (study a), 1.0 for Adadelta.
    patience
        Stop after this many epochs without a better validation F1 (None: never stop early).
    augment
        Random flips and 90-degree rotations of training chips.
    spectral_augment
        Also the default model's radiometric augmentation
        (:class:`icemap.lab.augment.SpectralAugment`: band gains and offsets, illumination,
        shading, haze, turbid water, noise) on every training batch, so a model trained or
        fine-tuned on one region and sensor holds on others. Needs band inputs (and ndsi/ndwi).
    init
        Start from a model's weights instead of random ones: ``"default"`` (the shipped model)
        or a model folder written by ``icemap train``. The run then takes that model's input
        channels, architecture and normalisation (the normalisation is not refitted, so the
        weights see the inputs they were trained on); ``inputs``, ``depth``, ``base``,
        ``batch_norm`` and ``dropout`` left at their defaults follow the model, set to other
        values they are an error. The decision threshold is ``threshold``, not the model's:
        fine-tuning moves the network's probabilities (``"tune"`` chooses it on validation).
        The learning rate defaults to a tenth of the optimizer's (a fine-tune, not a new
        start), and the starting model competes in early stopping (validation F1 at 0.5 every
        epoch), so a fine-tune never ends worse on that score than the model it started from.
    normalisation
        ``"minmax"`` (study a) or ``"percentile"`` (1st-99th), fitted on the training chips.
    threshold
        Decision threshold on the ice probability: a number (0.5 by default), or ``"tune"``
        to pick the best F1 on the validation set among 0.05, 0.10 ... 0.95. The test set is
        never used for choices.
    threshold_tolerance
        With ``threshold="tune"``: every threshold whose validation F1 is within this much of
        the best counts as equally good, and the highest of them is chosen
        (:func:`icemap.metrics.best_threshold`). 0 (default) picks the best F1 itself. A
        synthetic validation set scores a wide plateau of thresholds alike; the top of the
        plateau is the choice that flags least of what it lacks (the default model uses 0.005).
    seed
        Seeds the weights, shuffling, augmentation and dropout.
    restarts
        Train this many models, with seeds ``seed``, ``seed + 1``, ... on the same chips and
        split, and keep the one with the best validation F1 (some seeds collapse; the others
        are kept in ``OUT/restarts/seed-N`` for inspection).
    split_seed
        Seeds the Monte-Carlo split and the random chips (default: ``seed``).
    split_iterations
        Monte-Carlo iterations of the split (study a: 900).
    overlap
        Overlap handling of the chips (:func:`icemap.lab.data.make_chips`).
    chips
        ``"outline"`` (one chip per outline, study a) or ``"grid"`` (chips edge to edge over
        the outlines, so every labelled pixel is trained on or validated on).
    split
        ``"glacier"``: whole glaciers go to one set (validation on unseen glaciers);
        ``"location"``: chips are grouped by place only, so a region with one or two large
        glaciers can be split (validation on unseen parts of them); ``"year"``: the latest
        year is the test set and the one before it the validation set
        (:func:`icemap.lab.data.split_by_year`; with two years, no test set).
    label_time
        Column of the outlines with each outline's year or date: each cube date is labelled
        by the outlines of its year/date only (:func:`prepare_data`).
    n_random, n_hard_negative
        Random and hard-negative chips added to the glacier chips.
    min_valid
        Minimum share of valid pixels for a chip on a date to be used.
    device
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    amp
        Mixed precision on the GPU (ignored on CPU).
    """

    inputs: str = "b3_b6"
    mask: str = "original"
    chip_size: int = 128
    depth: int = 4
    base: int = 16
    batch_norm: bool = True
    dropout: float = 0.0
    epochs: int = 50
    batch_size: int = 8
    loss: str = "dice"
    optimizer: str = "adam"
    lr: float | None = None
    patience: int | None = 10
    augment: bool = True
    spectral_augment: bool = False
    init: str | None = None
    normalisation: str = "minmax"
    threshold: float | str = 0.5
    threshold_tolerance: float = 0.0
    seed: int = 0
    restarts: int = 1
    split_seed: int | None = None
    split_iterations: int = 900
    overlap: str = "independent"
    chips: str = "outline"
    split: str = "glacier"
    label_time: str | None = None
    n_random: int = 0
    n_hard_negative: int = 0
    min_valid: float = 0.5
    device: str = "auto"
    amp: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ModelError` (one clear line) for any setting that cannot work."""
        resolve_channels(self.inputs)
        if self.mask not in MASK_BUFFERS:
            raise ModelError(f"mask must be one of {', '.join(MASK_BUFFERS)}, not {self.mask!r}")
        if self.loss not in LOSSES:
            raise ModelError(f"loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ModelError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        if self.overlap not in OVERLAP_MODES:
            raise ModelError(f"overlap must be one of {', '.join(OVERLAP_MODES)}, not {self.overlap!r}")
        if self.chips not in CHIP_LAYOUTS:
            raise ModelError(f"chips must be one of {', '.join(CHIP_LAYOUTS)}, not {self.chips!r}")
        if self.split not in SPLITS:
            raise ModelError(f"split must be one of {', '.join(SPLITS)}, not {self.split!r}")
        if self.normalisation not in ("minmax", "percentile"):
            raise ModelError(f"normalisation must be 'minmax' or 'percentile', not {self.normalisation!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ModelError(f"device must be auto, cpu or cuda, not {self.device!r}")
        for name in ("epochs", "batch_size", "split_iterations", "restarts"):
            if int(getattr(self, name)) < 1:
                raise ModelError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.chip_size < 8:
            raise ModelError(f"chip size must be at least 8 pixels, got {self.chip_size}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ModelError(f"learning rate must be a positive number, got {self.lr}")
        if self.patience is not None and self.patience < 1:
            raise ModelError(f"patience must be >= 1 (or None), got {self.patience}")
        if isinstance(self.threshold, str):
            if self.threshold != "tune":
                try:
                    self.threshold = float(self.threshold)
                except ValueError:
                    raise ModelError(f"threshold must be a number in (0, 1) or 'tune', not {self.threshold!r}") from None
        if not isinstance(self.threshold, str) and not 0.0 < float(self.threshold) < 1.0:
            raise ModelError(f"threshold must be in (0, 1) or 'tune', got {self.threshold}")
        if not (math.isfinite(self.threshold_tolerance) and 0.0 <= self.threshold_tolerance < 1.0):
            raise ModelError(f"threshold tolerance must be in [0, 1), got {self.threshold_tolerance}")
        if self.threshold_tolerance and self.threshold != "tune":
            raise ModelError("a threshold tolerance applies only to threshold='tune' (--threshold tune)")
        try:
            UNetConfig(in_channels=1, depth=self.depth, base=self.base, batch_norm=self.batch_norm,
                       dropout=self.dropout)
        except ValueError as exc:
            raise ModelError(f"invalid U-Net settings: {exc}") from None

    @property
    def channels(self) -> tuple[str, ...]:
        return resolve_channels(self.inputs)

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        # Fine-tuning at a from-scratch rate throws away much of what the weights knew.
        return DEFAULT_LR[self.optimizer] * (FINE_TUNE_LR_FACTOR if self.init is not None else 1.0)

    @property
    def effective_split_seed(self) -> int:
        return self.seed if self.split_seed is None else int(self.split_seed)

    def unet(self) -> UNetConfig:
        return UNetConfig(in_channels=len(self.channels), depth=self.depth, base=self.base,
                          batch_norm=self.batch_norm, dropout=self.dropout)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class EpochRecord:
    """What one epoch did; passed to the callback and kept in the history."""

    epoch: int
    train_loss: float
    val_loss: float
    val_f1: float
    val_precision: float
    val_recall: float
    seconds: float
    improved: bool
    lr: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Data preparation (shared by train and experiment)
# ----------------------------------------------------------------------------------------------


@dataclass
class PreparedData:
    """Chips, their split and a reader: what :func:`train` needs besides its settings.

    Built once by :func:`prepare_data` and shared by the runs of an experiment, so all models
    see the same chips and the same split (as the ten models of study a did).
    """

    cube: Any
    outlines: Any
    index: ChipIndex
    split: Split
    source: ChipSource
    cube_path: str | None = None
    outlines_path: str | None = None
    dem_path: str | None = None
    chip_params: dict[str, Any] = field(default_factory=dict)
    #: The label outlines burnt into the chips, when they are not ``outlines`` (see :func:`prepare_data`).
    labels_path: str | None = None

    def samples(self, which: str) -> list[int]:
        return self.split.samples(self.index, which)


def _open(cube: Any) -> tuple[Any, str | None]:
    if isinstance(cube, (str, os.PathLike)):
        return open_cube(cube), os.fspath(cube)
    return cube, None


def prepare_data(cube: Any, outlines: Any, *, chip_size: int = 128, overlap: str = "independent",
                 n_random: int = 0, n_hard_negative: int = 0, min_valid: float = 0.5,
                 times: Sequence[int | str] | None = None, split_seed: int = 0,
                 split_iterations: int = 900, channels: Sequence[str] | None = None, dem: Any = None,
                 cache: bool | None = None, layout: str = "outline", split: str = "glacier",
                 label_time: str | None = None, labels: Any = None) -> PreparedData:
    """Cut chips, split them and set up the reader.

    Parameters
    ----------
    cube
        A cube store path or an opened cube.
    outlines
        Outline file or GeoDataFrame.
    channels
        When given, the cube is checked for the bands these need before anything is read, so a
        wrong cube fails in a second with a clear message.
    label_time
        A column of the outlines with each outline's year or date: every cube date is labelled
        by the outlines of its year (or date) only, and dates without any are left out (listed
        in ``index.params["dates_without_labels"]``). See :func:`icemap.lab.data.label_keys`.
        With ``labels``, the column is one of the label outlines.
    labels
        Label outlines (file or GeoDataFrame) burnt into the chips instead of ``outlines``.
        ``outlines`` still place the chips and group them for the split (whole glaciers held
        out); ``labels`` say what is ice on each date. The default model's recipe labels a
        date's glaciers together with that date's snow off them this way
        (:func:`icemap.lab.default.visible_ice_labels`); cut from such a file, every snow patch
        would become a "glacier" of its own, and one glacier's copies for each date could land
        on both sides of the split.

    Other parameters are those of :func:`icemap.lab.data.make_chips` and
    :func:`icemap.lab.data.split_chips`.
    """
    if split not in SPLITS:
        raise ModelError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    ds, cube_path = _open(cube)
    refl = ds["reflectance"] if "reflectance" in getattr(ds, "data_vars", {}) else ds
    if channels is not None:
        check_bands(refl, channels)
        if any(c in ("elevation", "slope") for c in channels) and dem is None:
            raise ModelError(f"inputs {list(channels)} include terrain: pass a DEM (dem=... / --dem)")
    outlines_path = os.fspath(outlines) if isinstance(outlines, (str, os.PathLike)) else None
    gdf = read_outlines(outlines, crs=refl.rio.crs) if outlines_path else outlines
    index = make_chips(ds, gdf, size=chip_size, overlap=overlap, n_random=n_random,
                       n_hard_negative=n_hard_negative, min_valid=min_valid, times=times, seed=split_seed,
                       layout=layout, group_by="glacier" if split == "glacier" else "location")
    labels_path = os.fspath(labels) if isinstance(labels, (str, os.PathLike)) else None
    label_gdf = gdf if labels is None else read_outlines(labels, crs=refl.rio.crs) if labels_path else labels
    if label_time is not None:
        index = _samples_with_labels(index, label_gdf, refl, label_time)
    if split == "year":
        chosen = split_by_year(index, _time_labels(refl))
    else:
        chosen = split_chips(index, iterations=split_iterations, seed=split_seed)
    source = ChipSource(ds, label_gdf, index, dem=dem, cache=cache, label_time=label_time)
    return PreparedData(
        cube=ds, outlines=gdf, index=index, split=chosen, source=source, cube_path=cube_path,
        outlines_path=outlines_path, dem_path=os.fspath(dem) if isinstance(dem, (str, os.PathLike)) else None,
        chip_params=dict(index.params, split_seed=split_seed, split_iterations=split_iterations),
        labels_path=labels_path,
    )


def _samples_with_labels(index: ChipIndex, outlines: Any, refl: Any, column: str) -> ChipIndex:
    """Keep the samples whose date has outlines of its year/date in ``column``.

    A date without outlines would otherwise be labelled "no ice" everywhere, a wrong label, not
    a missing one.
    """
    keys, mode = label_keys(outlines, column)
    have = set(keys)
    dates = _time_labels(refl)
    key_of = [(d[:4] if mode == "year" else d) for d in dates]
    kept = [s for s in index.samples if key_of[s.time] in have]
    used = sorted({dates[s.time] for s in index.samples})
    dropped = sorted({dates[s.time] for s in index.samples if key_of[s.time] not in have})
    if not kept:
        raise ModelError(f"no cube date ({', '.join(used)}) has outlines of its {mode} in column {column!r} "
                         f"(it holds {', '.join(sorted(have)[:10])}); ingest dates that match the outlines or "
                         "leave --label-time out")
    return replace(index, samples=kept, params=dict(index.params, label_time=column, label_match=mode,
                                                    dates_without_labels=dropped))


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss over the whole batch, on valid pixels only.

    Summed over the batch rather than averaged per chip: a hard-negative chip without ice would
    otherwise have an undefined (or, smoothed, arbitrary) Dice of its own.
    """
    p = torch.sigmoid(logits.float()) * valid
    t = target.float() * valid
    inter = (p * t).sum()
    return 1.0 - (2.0 * inter + eps) / (p.sum() + t.sum() + eps)


def bce_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits (numerically stable), mean over valid pixels."""
    per = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    v = valid.float()
    return (per * v).sum() / v.sum().clamp_min(1.0)


def make_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss function called ``name`` (one of :data:`LOSSES`)."""
    if name == "dice":
        return dice_loss
    if name == "bce":
        return bce_loss
    if name == "dice+bce":
        return lambda lg, t, v: dice_loss(lg, t, v) + bce_loss(lg, t, v)
    raise ModelError(f"loss must be one of {', '.join(LOSSES)}, not {name!r}")


# ----------------------------------------------------------------------------------------------
# Helpers: seeding, augmentation, batching, scoring
# ----------------------------------------------------------------------------------------------


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _dihedral(t: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips/rotations of a (..., H, W) tensor (k in 0..7)."""
    if k >= 4:
        t = torch.flip(t, dims=(-1,))
    return torch.rot90(t, k % 4, dims=(-2, -1)) if k % 4 else t


def _batch(ds: ChipDataset, idx: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    items = [ds[int(i)] for i in idx]
    return (torch.stack([a for a, _, _ in items]), torch.stack([b for _, b, _ in items]),
            torch.stack([c for _, _, c in items]))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for but no CUDA GPU is available; use --device auto or cpu")
    return torch.device(name)


def _autocast(device: torch.device, amp: bool) -> tuple[bool, torch.dtype]:
    if device.type != "cuda" or not amp:
        return False, torch.float32
    return True, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def counts(pred: np.ndarray, ref: np.ndarray, valid: np.ndarray) -> dict[str, int]:
    """Confusion counts of boolean-like ``pred`` against 0/1 ``ref`` on ``valid`` pixels.

    The same counter as :func:`icemap.metrics.confusion` (:func:`icemap.kernels.confusion_counts`),
    pooled over every leading axis.
    """
    p = np.asarray(pred).astype(bool)
    r = np.broadcast_to(np.asarray(ref) != 0, p.shape)
    c = confusion_counts(p, r, valid=np.broadcast_to(valid, p.shape)).reshape(-1, 4).sum(axis=0)
    return {k: int(v) for k, v in zip(OUTCOMES, c)}


def _add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b[k] for k in b}


def predict_dataset(model: UNet, dataset: ChipDataset, *, device: torch.device | str = "cpu") -> np.ndarray:
    """Ice probabilities of every chip: (N, S, S) float32, NaN where an input channel is nodata.

    A thin loop over :func:`icemap.infer.predict_array`, the one forward pass of icemap: each
    chip is one window, its raw inputs normalised, NaN-filled and (``hide_channel``) hidden
    there exactly as ``icemap.predict`` does on a cube. The chip is padded around (as
    :class:`ChipDataset` pads it for training) with nodata, which ``predict_array`` fills with
    0 like the training batches' padding, so these are the probabilities the training and
    validation passes see (tests/test_train.py checks both agree).
    """
    depth = model.config.depth
    p, o, s = dataset.padded, dataset.offset, dataset.size
    out = np.empty((len(dataset), s, s), dtype=np.float32)
    for i, sample in enumerate(dataset.samples):
        raw = dataset.source.inputs(sample, dataset.channels)
        x = np.full((len(dataset.channels), p, p), np.nan, dtype=np.float32)
        x[:, o:o + s, o:o + s] = raw
        out[i] = dataset.crop(predict_array(x, model, dataset.normalisation, depth=depth, halo=0, tile=p,
                                            batch_size=1, device=str(device),
                                            hide_channel=dataset.hide_channel)[0])
    return out


def score_dataset(model: UNet, dataset: ChipDataset, threshold: float = 0.5, *, mask: str | None = None,
                  probabilities: np.ndarray | None = None,
                  device: torch.device | str = "cpu") -> dict[str, float | int]:
    """Scores (:func:`icemap.metrics.scores`) of the thresholded model on every chip, pooled.

    ``mask`` scores against other labels than the dataset's (e.g. a model trained on
    extended masks against the original outlines); pass precomputed ``probabilities`` to
    score several thresholds or masks without running the model again.
    """
    probs = predict_dataset(model, dataset, device=device) if probabilities is None else probabilities
    buffer_m = MASK_BUFFERS[mask] if mask is not None else dataset.buffer_m
    total: dict[str, int] = {}
    for i in range(len(dataset)):
        _, _, valid = dataset.arrays(i)
        y = dataset.source.sample_labels(dataset.samples[i], buffer_m)
        total = _add(total, counts(probs[i] >= threshold, y, valid))
    return scores(total, pixel_area_m2=dataset.source.pixel_area_m2)


def _eval(model: UNet, ds: ChipDataset, loss_fn: Callable[..., torch.Tensor], device: torch.device,
          amp: bool, batch_size: int, threshold: float = 0.5) -> tuple[float, dict[str, int], np.ndarray]:
    """Validation pass: mean loss, confusion counts at ``threshold``, probabilities."""
    model.eval()
    use_amp, dtype = _autocast(device, amp)
    total: dict[str, int] = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    losses, weights, probs = [], [], []
    with torch.no_grad():
        for start in range(0, len(ds), batch_size):
            x, y, v = _batch(ds, range(start, min(start + batch_size, len(ds))))
            x, y, v = x.to(device), y.to(device), v.to(device)
            with torch.autocast(device_type=device.type, dtype=dtype, enabled=use_amp):
                logits = model(x)
            losses.append(float(loss_fn(logits, y, v)))
            weights.append(len(x))
            p = torch.sigmoid(logits.float())
            total = _add(total, counts((p >= threshold).cpu().numpy(), (y > 0).cpu().numpy(), v.cpu().numpy()))
            probs.append(p[:, 0].cpu().numpy())
    loss = float(np.average(losses, weights=weights)) if losses else float("nan")
    return loss, total, ds.crop(np.concatenate(probs)) if probs else np.zeros((0,))


def _f1(c: dict[str, int]) -> tuple[float, float, float]:
    tp, fp, fn = c["tp"], c["fp"], c["fn"]
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return f, p, r


# ----------------------------------------------------------------------------------------------
# Training state (no pickle)
# ----------------------------------------------------------------------------------------------


def _state_paths(out: Path) -> tuple[Path, Path]:
    return out / STATE_DIR / _STATE_TENSORS, out / STATE_DIR / _STATE_JSON


def _save_state(out: Path, model: UNet, best: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                scaler: Any, info: dict[str, Any]) -> None:
    """Write the training state: tensors (safetensors) first, then the JSON that names them."""
    from safetensors.torch import save

    tpath, jpath = _state_paths(out)
    tpath.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model/{k}"] = v.detach().cpu().contiguous().clone()
    for k, v in best.items():
        tensors[f"best/{k}"] = v.detach().cpu().contiguous().clone()
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim/{pid}/{name}"] = val.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[name] = val
    blob = save(tensors)
    _atomic_write(tpath, blob)
    info = dict(info, format=_STATE_FORMAT, tensors_sha256=hashlib.sha256(blob).hexdigest(),
                optimizer={"param_groups": opt["param_groups"], "scalars": scalars},
                scaler=scaler.state_dict() if scaler is not None and scaler.is_enabled() else {})
    _atomic_write(jpath, json.dumps(info, indent=1, default=float).encode())


def _load_state(out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    from safetensors import SafetensorError
    from safetensors.torch import load

    tpath, jpath = _state_paths(out)
    if not jpath.exists():
        return None
    try:
        info = json.loads(jpath.read_text())
        blob = tpath.read_bytes()
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"the training state in {jpath.parent} is unreadable ({exc}); rerun without --resume") from None
    if info.get("format", 0) > _STATE_FORMAT:
        raise ModelError(f"the training state in {jpath.parent} is newer than this icemap understands")
    if hashlib.sha256(blob).hexdigest() != info.get("tensors_sha256"):
        raise ModelError(f"the training state in {jpath.parent} is corrupt (tensor file does not match its "
                         "JSON); rerun without --resume")
    try:
        return info, load(blob)
    except SafetensorError as exc:
        raise ModelError(f"the training state {tpath} is not a valid safetensors file: {exc}") from None


def _restore_optimizer(optimizer: torch.optim.Optimizer, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        if key.startswith("optim/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = val
    for pid, sc in info["optimizer"]["scalars"].items():
        state.setdefault(int(pid), {}).update(sc)
    optimizer.load_state_dict({"state": state, "param_groups": info["optimizer"]["param_groups"]})



# ----------------------------------------------------------------------------------------------
# Starting model (fine-tuning), baselines and the verdict
# ----------------------------------------------------------------------------------------------


@dataclass
class _StartModel:
    """The model a fine-tune starts from (``TrainConfig.init``)."""

    name: str
    folder: str
    model: UNet
    meta: CheckpointMeta

    def record(self, start_f1: float | None) -> dict[str, Any]:
        return {"model": self.name, "folder": self.folder, "weights_sha256": self.meta.weights_sha256,
                "channels": list(self.meta.channels), "normalisation": "taken from the starting model",
                "start_val_f1": start_f1}


def _start_model(config: TrainConfig) -> tuple[TrainConfig, _StartModel | None]:
    """Load ``config.init`` and take its channels and architecture into the config.

    Settings left at their defaults follow the model; a setting given another value than the
    model's is an error, since the weights cannot be loaded into another network.
    """
    init = config.init
    if init is None:
        return config, None

    folder = resolve_model(config.init)
    meta = read_metadata(folder)
    if meta.kind != "unet":
        raise ModelError(f"init model {config.init} is an imported {meta.kind} network, which icemap train cannot "
                         "fine-tune; start from 'default' or a folder written by icemap train")
    model, meta = load_checkpoint(folder)
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    arch = meta.architecture
    wanted = resolve_channels(config.inputs)
    if config.inputs != defaults["inputs"] and wanted != tuple(meta.channels):
        raise ModelError(f"init model {config.init} reads the inputs {','.join(meta.channels)}, not {config.inputs}; "
                         "leave --inputs out to fine-tune it (its inputs are used)")
    for name in _ARCH_FIELDS:
        value = getattr(config, name)
        if value != defaults[name] and value != arch.get(name):
            raise ModelError(f"init model {config.init} has {name} {arch.get(name)!r}, not {value!r}; leave "
                             f"--{name.replace('_', '-')} out to fine-tune it")
    config = replace(config, inputs=",".join(meta.channels), **{k: arch[k] for k in _ARCH_FIELDS if k in arch})
    # The threshold is not taken from the starting model: fine-tuning moves the network's
    # probabilities. The Athabasca fine-tune of docs/adapt-model.md, at the shipped model's 0.95,
    # mapped 1-3 % of the glacier; at 0.5, 95 % of the half it trained on.
    return config, _StartModel(os.fspath(init), os.fspath(folder), model, meta)


def _all_ice_f1(ds: ChipDataset) -> float:
    """F1 of calling every valid pixel of ``ds`` ice (2 P / (2 P + N))."""
    pos = neg = 0
    for i in range(len(ds)):
        _, y, valid = ds.arrays(i)
        p = int(np.count_nonzero(y[valid]))
        pos, neg = pos + p, neg + int(np.count_nonzero(valid)) - p
    return 2 * pos / (2 * pos + neg) if pos + neg else 0.0


def validation_baselines(ds: ChipDataset, *, ndsi_threshold: float | None = None) -> dict[str, dict[str, Any]]:
    """Scores of two baselines on the same pixels and labels as a model's validation scores.

    A trained model must beat both, or it has learnt nothing the user could not have had
    without it: ``"all_ice"`` calls every valid pixel ice (what a collapsed model does),
    ``"ndsi"`` is the NDSI threshold (the option ``ndsi_threshold`` unless given;
    :func:`icemap.kernels.ice_mask`, the kernel ``icemap map`` runs) on the chips' green and
    SWIR1 reflectance; pixels where NDSI is undefined count as not ice, so the pixel set
    stays the model's. ``"ndsi"`` is left out when the cube lacks green or SWIR1.

    Returns
    -------
    dict
        ``{"all_ice": scores, "ndsi": scores + {"threshold": t}}``
        (:func:`icemap.metrics.scores`).
    """
    t = float(resolve("ndsi_threshold", ndsi_threshold))
    src = ds.source
    has_ndsi = {"green", "swir16"} <= set(src.bands)
    all_ice: dict[str, int] = {}
    ndsi: dict[str, int] = {}
    for i in range(len(ds)):
        _, y, valid = ds.arrays(i)
        all_ice = _add(all_ice, counts(np.ones(y.shape, dtype=bool), y, valid))
        if has_ndsi:
            refl = src.window(ds.samples[i])
            g = np.asarray(refl.sel(band="green").values[0], dtype=np.float32)
            sw = np.asarray(refl.sel(band="swir16").values[0], dtype=np.float32)
            ndsi = _add(ndsi, counts(ice_mask(g, sw, t) == 1, y, valid))
    out: dict[str, dict[str, Any]] = {"all_ice": scores(all_ice, pixel_area_m2=src.pixel_area_m2)}
    if has_ndsi:
        out["ndsi"] = dict(scores(ndsi, pixel_area_m2=src.pixel_area_m2), threshold=t)
    return out


def _verdict(model_scores: dict[str, Any], baselines: dict[str, dict[str, Any]]) -> list[str]:
    """The baselines the model does not beat on validation F1 (a NaN model F1 beats none)."""
    f1 = float(model_scores["f1"])
    return [name for name, b in baselines.items()
            if math.isfinite(float(b["f1"])) and not (math.isfinite(f1) and f1 > float(b["f1"]))]


_BASELINE_NAMES = {"all_ice": "calling everything ice", "ndsi": "NDSI"}


def _no_better(out: Path, model_scores: dict[str, Any], baselines: dict[str, dict[str, Any]], verdict: list[str],
               strict: bool) -> None:
    parts = []
    for name in verdict:
        label = _BASELINE_NAMES[name] + (f" at {baselines[name]['threshold']:g}" if name == "ndsi" else "")
        parts.append(f"{label} (F1 {float(baselines[name]['f1']):.3f})")
    msg = (f"the model in {out} scores validation F1 {float(model_scores['f1']):.3f}, no better than "
           f"{' or '.join(parts)} on the same {int(model_scores['n_pixels'])} validation pixels: it has not "
           "learnt to map ice here. Do not map with it as it is; try --init default, --augment spectral, more "
           "--epochs, other seeds (--seed, --restarts N) or more labelled glaciers")
    if strict:
        raise ModelError(msg + " (the checkpoint is kept for inspection)")
    warnings.warn(msg, ModelNoBetterWarning, stacklevel=4)  # the caller of train()


def _augment_record(augment_batch: Any) -> Any:
    if augment_batch is None:
        return None
    if hasattr(augment_batch, "to_dict"):
        return {"class": type(augment_batch).__name__, **augment_batch.to_dict()}
    return {"class": getattr(augment_batch, "__qualname__", type(augment_batch).__name__)}

# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """The outcome of :func:`train`."""

    model: UNet
    meta: CheckpointMeta
    history: list[EpochRecord]
    checkpoint: Path
    data: PreparedData
    threshold: float
    best_epoch: int
    stopped_early: bool
    resumed_from: int
    test: dict[str, Any] | None
    seconds: float
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    no_better_than: list[str] = field(default_factory=list)


class _Display:
    """Rich progress bar over epochs plus one printed line per epoch (nothing when quiet)."""

    def __init__(self, quiet: bool, title: str, total: int, console: Any = None) -> None:
        self.quiet = quiet
        self.title = title
        self.total = total
        self.console = console
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _Display:
        if not self.quiet:
            self.console = self.console or Console(stderr=True, soft_wrap=True)
            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=self.console)
            self._progress.start()
            self._task = self._progress.add_task(self.title, total=self.total, info="")
        return self

    def start(self, done: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done)

    def epoch(self, rec: EpochRecord, total: int) -> None:
        if self._progress is None:
            return
        line = (f"epoch {rec.epoch:>3}/{total}  loss {rec.train_loss:.4f}  val loss {rec.val_loss:.4f}  "
                f"F1 {rec.val_f1:.3f}  P {rec.val_precision:.3f}  R {rec.val_recall:.3f}  "
                f"{rec.seconds:.1f}s{'  *' if rec.improved else ''}")
        self._progress.console.print(line, highlight=False)
        self._progress.update(self._task, completed=rec.epoch, info=f"best F1 so far {rec.val_f1:.3f}" if rec.improved else "")

    def note(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, highlight=False)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()


def _config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    # A setting missing from a state written before it existed had its default value then.
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    a = {**{k: v for k, v in defaults.items() if k in b}, **a}
    return [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in _RESUMABLE_CHANGES and a.get(k) != b.get(k)]


def train(
    cube: Any,
    outlines: Any,
    out: str | os.PathLike[str],
    config: TrainConfig | None = None,
    *,
    dem: Any = None,
    data: PreparedData | None = None,
    resume: bool = False,
    callback: Callable[[EpochRecord], Any] | None = None,
    quiet: bool = False,
    console: Any = None,
    title: str | None = None,
    augment_batch: Callable[[torch.Tensor, torch.Tensor, Normalisation, np.random.Generator], torch.Tensor] | None = None,
    strict: bool = False,
) -> TrainResult:
    """Train a U-Net on a cube and outlines and write the checkpoint to ``out``.

    Parameters
    ----------
    cube
        Cube store path or opened cube (ignored when ``data`` is given).
    outlines
        Reference outlines, path or GeoDataFrame (ignored when ``data`` is given).
    out
        Model folder: ``model.safetensors`` + ``model.json`` (the checkpoint, with the
        normalisation, channels, bands, threshold, provenance and validation scores) and
        ``training/`` (resumable state, history, split).
    config
        :class:`TrainConfig` (defaults: study a's set-up at 128 px).
    dem
        DEM for the terrain channels.
    data
        Chips and split prepared by :func:`prepare_data` (shared by experiment runs); its chip
        settings win over ``config``'s.
    resume
        Continue from ``out/training`` when a state is there (else start afresh). The
        settings must match the state's, except ``epochs``, ``patience``, ``device``, ``amp``.
    callback
        Called with each :class:`EpochRecord` after the state of that epoch is saved; an
        exception raised there stops training (and the run can be resumed).
    quiet
        No progress display.
    augment_batch
        Extra augmentation of each training batch after flips and rotations, called as
        ``augment_batch(x, valid, normalisation, rng)`` with the normalised inputs ``x``
        (B, C, H, W), their validity and the epoch's generator (so a resumed run draws what an
        uninterrupted one draws); returns the new ``x``. The default model's spectral,
        illumination, haze and noise augmentation (:mod:`icemap.lab.default`) plugs in here.
        It is not part of :class:`TrainConfig`: record its settings in the checkpoint yourself.
        ``config.spectral_augment`` plugs in :class:`~icemap.lab.augment.SpectralAugment`
        when this is not given.
    strict
        When the model scores no better on the validation outlines than NDSI or than calling
        everything ice (:func:`validation_baselines`), raise :class:`ModelError` instead of
        warning (:class:`~icemap.errors.ModelNoBetterWarning`). The checkpoint is written
        either way, with the comparison in ``model.json``, so it can be inspected.

    Returns
    -------
    TrainResult
        The best-validation model (eval mode, CPU), its metadata, the history and test scores.

    Raises
    ------
    ModelError
        Settings that cannot work, a starting model (``config.init``) that cannot be
        fine-tuned, no training or validation chip, or (``strict``) a model no better than
        the baselines.
    """
    t_start = time.perf_counter()
    config = config or TrainConfig()
    config.validate()
    config, init_from = _start_model(config)
    channels = config.channels
    if config.spectral_augment and augment_batch is None:
        augment_batch = SpectralAugment(channels=channels)  # checks the channels before any read
    out = Path(out)
    data = _training_data(cube, outlines, config, data, dem)
    if config.restarts > 1:
        return _train_restarts(config, out, data, dem=dem, resume=resume, callback=callback, quiet=quiet,
                               console=console, title=title, augment_batch=augment_batch, strict=strict,
                               t_start=t_start)
    train_ids, val_ids, test_ids = (data.samples(s) for s in ("train", "val", "test"))
    if not train_ids or not val_ids:
        raise ModelError("the split left no training or no validation chip; use a larger cube or smaller chips")
    device = _device(config.device)
    use_amp, amp_dtype = _autocast(device, config.amp)
    with _deterministic(device):
        return _train(config, channels, out, data, train_ids, val_ids, test_ids, device, use_amp, amp_dtype,
                      resume, callback, quiet, console, title, t_start, augment_batch, init_from, strict)


def _training_data(cube: Any, outlines: Any, config: TrainConfig, data: PreparedData | None,
                   dem: Any) -> PreparedData:
    """The chips and split: prepared from the cube with ``config``'s chip settings, or the
    given ones, checked to hold the bands the inputs need."""
    channels = config.channels
    if data is None:
        return prepare_data(cube, outlines, chip_size=config.chip_size, overlap=config.overlap,
                            n_random=config.n_random, n_hard_negative=config.n_hard_negative,
                            min_valid=config.min_valid, split_seed=config.effective_split_seed,
                            split_iterations=config.split_iterations, channels=channels, dem=dem,
                            layout=config.chips, split=config.split, label_time=config.label_time)
    missing = [b for b in required_bands(channels) if b not in data.source.bands]
    if missing:
        raise ModelError(f"the cube lacks band(s) {missing} that the inputs {list(channels)} need; "
                         f"it has {data.source.bands}")
    return data


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Torch's deterministic algorithms (warning where one has none) while training, then the
    caller's setting again: the same seed gives the same model."""
    if device.type == "cuda":
        # cuBLAS needs this before its first call for deterministic algorithms.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)


def _train(config: TrainConfig, channels: tuple[str, ...], out: Path, data: PreparedData,
           train_ids: list[int], val_ids: list[int], test_ids: list[int], device: torch.device,
           use_amp: bool, amp_dtype: torch.dtype, resume: bool, callback: Callable[[EpochRecord], Any] | None,
           quiet: bool, console: Any, title: str | None, t_start: float,
           augment_batch: Callable[..., torch.Tensor] | None = None, init_from: _StartModel | None = None,
           strict: bool = False) -> TrainResult:
    """One training run, once :func:`train` has checked its settings and prepared the data.

    The recipe: the resumable state (when resuming) and the normalisation; the network and its
    optimiser; the epochs, each saved so the run can be resumed; then the best validation
    model scored, its threshold chosen and its checkpoint written.
    """
    cfg = config.to_dict()
    state = _resumable_state(out, cfg, data.split.groups) if resume else None
    norm = _run_normalisation(config, data, train_ids, channels, state, init_from)
    run = _make_run(config, cfg, channels, out, data, device, use_amp, amp_dtype, norm, train_ids, val_ids,
                    init_from, augment_batch)
    progress = _Progress(best_state=_cpu_state(run.model))
    # "Everything is ice" on the validation pixels: a model no better than that has learnt
    # nothing, so early stopping waits until the best model beats it (a collapsed first epoch
    # that calls everything ice must not be kept because nothing beat it for `patience` epochs).
    trivial_f1 = _all_ice_f1(run.val_ds)
    if init_from is not None and state is None:
        # The starting model is epoch 0 and competes: a fine-tune that only makes the model
        # worse on validation keeps the weights it started from.
        _, c0, _ = _eval(run.model, run.val_ds, run.loss_fn, device, use_amp, config.batch_size)
        progress.start_f1 = progress.best_f1 = _f1(c0)[0]
    if state is not None:
        progress.restore(run, *state)
    resumed_from = progress.start_epoch
    _run_epochs(run, progress, trivial_f1, title or f"train {config.inputs}/{config.mask}", quiet=quiet,
                console=console, callback=callback)
    return _finish_run(run, progress, test_ids, init_from=init_from, resumed_from=resumed_from, t_start=t_start,
                       strict=strict)


def _resumable_state(out: Path, cfg: dict[str, Any],
                     split_groups: dict[str, list[int]]) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The saved state in ``out`` (None when there is none), refused when its settings or its
    split differ from this run's: resuming would mix two different trainings."""
    state = _load_state(out)
    if state is None:
        return None
    info = state[0]
    diff = _config_diff(info["config"], cfg)
    if diff:
        raise ModelError(f"the training state in {out / STATE_DIR} was made with other settings "
                         f"({'; '.join(diff)}); rerun without --resume or with the same settings")
    if info["split_groups"] != {k: list(v) for k, v in split_groups.items()}:
        raise ModelError(f"the training state in {out / STATE_DIR} belongs to another split (other cube, "
                         "outlines or chip settings); rerun without --resume")
    return state


def _run_normalisation(config: TrainConfig, data: PreparedData, train_ids: list[int], channels: tuple[str, ...],
                       state: tuple[dict[str, Any], dict[str, torch.Tensor]] | None,
                       init_from: _StartModel | None) -> Normalisation:
    """The resumed run's normalisation, else the starting model's, else one fitted on the
    training chips."""
    if state is not None:
        return Normalisation.from_dict(state[0]["normalisation"])
    if init_from is not None:
        # The starting model's normalisation, not a refit: its weights expect these inputs.
        return Normalisation.from_dict(init_from.meta.normalisation)
    return fit_normalisation(data.source, train_ids, channels, method=config.normalisation, seed=config.seed)


def _cpu_state(model: UNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@dataclass
class _Run:
    """The fixed parts of one training run: settings, data, device, network, optimiser, loss."""

    config: TrainConfig
    cfg: dict[str, Any]
    channels: tuple[str, ...]
    out: Path
    data: PreparedData
    device: torch.device
    use_amp: bool
    amp_dtype: torch.dtype
    norm: Normalisation
    model: UNet
    optimizer: torch.optim.Optimizer
    scaler: Any
    loss_fn: Callable[..., torch.Tensor]
    train_ds: ChipDataset
    val_ds: ChipDataset
    augment_batch: Callable[..., torch.Tensor] | None

    def dataset(self, ids: list[int]) -> ChipDataset:
        return ChipDataset(self.data.source, ids, self.channels, mask=self.config.mask, normalisation=self.norm,
                           multiple=self.model.config.multiple)


def _make_run(config: TrainConfig, cfg: dict[str, Any], channels: tuple[str, ...], out: Path, data: PreparedData,
              device: torch.device, use_amp: bool, amp_dtype: torch.dtype, norm: Normalisation,
              train_ids: list[int], val_ids: list[int], init_from: _StartModel | None,
              augment_batch: Callable[..., torch.Tensor] | None) -> _Run:
    """The seeded network (or the starting model's weights), its datasets, optimiser and loss."""
    _seed_all(config.seed)
    model = UNet(config.unet()).to(device)
    if init_from is not None:
        model.load_state_dict(init_from.model.state_dict())
    train_ds, val_ds = (ChipDataset(data.source, ids, channels, mask=config.mask, normalisation=norm,
                                    multiple=model.config.multiple) for ids in (train_ids, val_ids))
    lr = config.learning_rate
    if config.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        optimizer = torch.optim.Adadelta(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16) if device.type == "cuda" else None
    return _Run(config=config, cfg=cfg, channels=channels, out=out, data=data, device=device, use_amp=use_amp,
                amp_dtype=amp_dtype, norm=norm, model=model, optimizer=optimizer, scaler=scaler,
                loss_fn=make_loss(config.loss), train_ds=train_ds, val_ds=val_ds, augment_batch=augment_batch)


@dataclass
class _Progress:
    """Where a run stands: its history and the best validation F1 so far, with the weights
    that gave it. All of it is in every epoch's saved state, so a resumed run goes on exactly."""

    best_state: dict[str, torch.Tensor]
    history: list[EpochRecord] = field(default_factory=list)
    best_f1: float = -1.0
    best_epoch: int = 0
    since_best: int = 0
    start_epoch: int = 0
    stopped: bool = False
    start_f1: float | None = None

    def restore(self, run: _Run, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Take up a saved state: the weights, the optimiser's and scaler's state, the history."""
        run.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
        self.best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best/")}
        _restore_optimizer(run.optimizer, info, tensors)
        if run.scaler is not None and info.get("scaler"):
            run.scaler.load_state_dict(info["scaler"])
        self.history = [EpochRecord(**r) for r in info["history"]]
        self.best_f1, self.best_epoch, self.since_best = info["best_f1"], info["best_epoch"], info["since_best"]
        self.start_epoch, self.stopped = info["epoch"], info.get("stopped_early", False)
        self.start_f1 = info.get("start_f1")

    def save(self, run: _Run, epoch: int, finished: bool) -> None:
        _save_state(run.out, run.model, self.best_state, run.optimizer, run.scaler, {
            "config": run.cfg, "epoch": epoch, "history": [r.to_dict() for r in self.history],
            "best_f1": self.best_f1, "best_epoch": self.best_epoch, "since_best": self.since_best,
            "stopped_early": self.stopped, "finished": finished, "normalisation": run.norm.to_dict(),
            "split_groups": run.data.split.groups, "start_f1": self.start_f1,
        })


def _run_epochs(run: _Run, progress: _Progress, trivial_f1: float, name: str, *, quiet: bool, console: Any,
                callback: Callable[[EpochRecord], Any] | None) -> None:
    """The epochs from where the run stands to ``config.epochs``, or to an early stop; each
    epoch's state is saved before ``callback`` sees its record."""
    config = run.config
    resumed_from = progress.start_epoch
    waited = False
    with _Display(quiet, name, config.epochs, console) as display:
        if resumed_from:
            display.start(resumed_from)
            display.note(f"resumed after epoch {resumed_from} (best F1 {progress.best_f1:.3f} at epoch "
                         f"{progress.best_epoch})")
        for epoch in range(progress.start_epoch + 1, config.epochs + 1):
            if progress.stopped:
                break
            t0 = time.perf_counter()
            train_loss = _train_epoch(run, epoch)
            val_loss, val_counts, _ = _eval(run.model, run.val_ds, run.loss_fn, run.device, run.use_amp,
                                            config.batch_size)
            f1, p, r = _f1(val_counts)
            improved = f1 > progress.best_f1
            if improved:
                progress.best_f1, progress.best_epoch, progress.since_best = f1, epoch, 0
                progress.best_state = _cpu_state(run.model)
            else:
                progress.since_best += 1
            rec = EpochRecord(epoch=epoch, train_loss=train_loss, val_loss=val_loss, val_f1=f1,
                              val_precision=p, val_recall=r, seconds=time.perf_counter() - t0,
                              improved=improved, lr=float(run.optimizer.param_groups[0]["lr"]))
            progress.history.append(rec)
            patient = (config.patience is not None and progress.since_best >= config.patience
                       and epoch < config.epochs)
            progress.stopped = patient and progress.best_f1 > trivial_f1
            progress.save(run, epoch, finished=progress.stopped or epoch == config.epochs)
            display.epoch(rec, config.epochs)
            if callback is not None:
                callback(rec)
            if progress.stopped:
                display.note(f"early stop: no better validation F1 for {config.patience} epochs "
                             f"(best {progress.best_f1:.3f} at epoch {progress.best_epoch})")
            elif patient and not waited:
                waited = True
                display.note(f"no early stop: the best validation F1 {progress.best_f1:.3f} is no better than "
                             f"calling everything ice ({trivial_f1:.3f}); training goes on")


def _train_epoch(run: _Run, epoch: int) -> float:
    """One pass over the training chips in the epoch's seeded order; the mean training loss.

    The epoch's generators are seeded from (seed, epoch), so a resumed run draws the order,
    the flips and the batch augmentation an uninterrupted one draws.
    """
    config, model, device = run.config, run.model, run.device
    n_train = len(run.train_ds)
    es = _epoch_seed(config.seed, epoch)
    torch.manual_seed(es)  # dropout and anything else drawing from torch's global RNG
    rng = np.random.default_rng(es)
    order = rng.permutation(n_train)
    ks = rng.integers(0, 8, size=n_train)
    model.train()
    total, seen = 0.0, 0
    for start in range(0, n_train, config.batch_size):
        idx = order[start:start + config.batch_size]
        x, y, v = _batch(run.train_ds, idx)
        if config.augment:
            x = torch.stack([_dihedral(a, int(k)) for a, k in zip(x, ks[idx])])
            y = torch.stack([_dihedral(a, int(k)) for a, k in zip(y, ks[idx])])
            v = torch.stack([_dihedral(a, int(k)) for a, k in zip(v, ks[idx])])
        if run.augment_batch is not None:
            x = run.augment_batch(x, v, run.norm, rng)
        x, y, v = x.to(device), y.to(device), v.to(device)
        run.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=run.amp_dtype, enabled=run.use_amp):
            logits = model(x)
        loss = run.loss_fn(logits, y, v)
        if run.scaler is not None and run.scaler.is_enabled():
            run.scaler.scale(loss).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            loss.backward()
            run.optimizer.step()
        total += float(loss.detach()) * len(idx)
        seen += len(idx)
    return total / max(seen, 1)


def _finish_run(run: _Run, progress: _Progress, test_ids: list[int], *, init_from: _StartModel | None,
                resumed_from: int, t_start: float, strict: bool) -> TrainResult:
    """The best validation model (study b) is the model: scored, thresholded, compared with
    the baselines and written, with the split beside its training state."""
    config, out, data = run.config, run.out, run.data
    run.model.load_state_dict(progress.best_state)
    model = run.model.to("cpu").eval()
    _, val_counts, val_probs = _eval(model, run.val_ds, run.loss_fn, torch.device("cpu"), False, config.batch_size)
    threshold, curve = _choose_threshold(config, run.val_ds, val_probs)
    val_scores = score_dataset(model, run.val_ds, threshold, probabilities=val_probs)
    test_scores = score_dataset(model, run.dataset(test_ids), threshold) if test_ids else None
    baselines = validation_baselines(run.val_ds)
    verdict = _verdict(val_scores, baselines)
    seconds = time.perf_counter() - t_start
    training = _training_record(run, progress, threshold_curve=curve, test_scores=test_scores, seconds=seconds,
                                init_from=init_from, resumed_from=resumed_from)
    training["baselines"] = dict(baselines, model={k: val_scores[k] for k in ("f1", "precision", "recall")},
                                 no_better_than=verdict)
    meta = CheckpointMeta(
        architecture=model.config.to_dict(), channels=list(run.channels), bands=list(required_bands(run.channels)),
        normalisation=run.norm.to_dict(), threshold=float(threshold), training=training,
        validation=dict(val_scores, f1_at_0_5=_f1(val_counts)[0], best_epoch=progress.best_epoch,
                        ndsi_f1=baselines["ndsi"]["f1"] if "ndsi" in baselines else None,
                        all_ice_f1=baselines["all_ice"]["f1"]),
    )
    if init_from is not None:
        meta.training["normalisation_fit"] = f"taken from the starting model ({config.init})"
    path = _save_model(model, meta, out)
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    _atomic_write(out / STATE_DIR / "split.json",
                  json.dumps({"split": data.split.to_dict(), "index": data.index.to_dict()}, default=float).encode())
    if verdict:
        _no_better(out, val_scores, baselines, verdict, strict)
    return TrainResult(model=model, meta=meta, history=progress.history, checkpoint=path, data=data,
                       threshold=float(threshold), best_epoch=progress.best_epoch, stopped_early=progress.stopped,
                       resumed_from=resumed_from, test=test_scores, seconds=seconds, baselines=baselines,
                       no_better_than=verdict)


def _training_record(run: _Run, progress: _Progress, *, threshold_curve: Any, test_scores: Any, seconds: float,
                     init_from: _StartModel | None, resumed_from: int) -> dict[str, Any]:
    """The checkpoint's ``training`` block (provenance), less the baseline comparison."""
    config, data = run.config, run.data
    return {
        "cube": data.cube_path, "outlines": data.outlines_path, "dem": data.dem_path,
        **({"labels": data.labels_path} if data.labels_path else {}),
        "config": run.cfg, "loss": config.loss, "optimizer": config.optimizer, "lr": config.learning_rate,
        "epochs": config.epochs, "epochs_run": len(progress.history), "best_epoch": progress.best_epoch,
        "stopped_early": progress.stopped, "resumed_from_epoch": resumed_from,
        "split_seed": data.chip_params.get("split_seed"), "chips": data.index.summary(),
        "chip_params": data.chip_params, "split": data.split.report,
        "threshold_rule": _threshold_rule(config),
        "threshold_curve": threshold_curve, "normalisation_fit": f"{config.normalisation} over the training chips",
        "device": str(run.device),
        "mixed_precision": str(run.amp_dtype).replace("torch.", "") if run.use_amp else "off",
        "history": [r.to_dict() for r in progress.history], "test": test_scores, "seconds": round(seconds, 2),
        "init": init_from.record(progress.start_f1) if init_from is not None else None,
        "augmentation": {"flips": bool(config.augment), "batch": _augment_record(run.augment_batch)},
    }


def _save_model(model: Any, meta: CheckpointMeta, out: Path) -> Path:
    """Write the checkpoint, then its STAC Item (``model.stac.json``), which reads the checkpoint."""
    path = save_checkpoint(model, meta, out)
    describe_model(path)
    return path


def _train_restarts(config: TrainConfig, out: Path, data: PreparedData, *, dem: Any, resume: bool,
                    callback: Callable[[EpochRecord], Any] | None, quiet: bool, console: Any, title: str | None,
                    augment_batch: Any, strict: bool, t_start: float) -> TrainResult:
    """``config.restarts`` runs on the same chips and split; the best validation F1 is the model.

    Each run is an ordinary :func:`train` run into ``out/restarts/seed-N`` (resumable on its
    own); the chosen one's checkpoint is written to ``out`` with every run's score in
    ``training.restarts``. Ties go to the lowest seed, so the choice is reproducible.
    """
    runs: list[TrainResult] = []
    for k in range(config.restarts):
        cfg = replace(config, seed=config.seed + k, split_seed=config.effective_split_seed, restarts=1)
        name = f"{title or 'train'} (restart {k + 1}/{config.restarts}, seed {cfg.seed})"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ModelNoBetterWarning)  # judged once, on the chosen run
            runs.append(train(None, None, out / "restarts" / f"seed-{cfg.seed}", cfg, dem=dem, data=data,
                              resume=resume, callback=callback, quiet=quiet, console=console, title=name,
                              augment_batch=augment_batch))

    def score(r: TrainResult) -> float:
        f1 = float(r.meta.validation["f1"])
        return f1 if math.isfinite(f1) else -1.0

    best = max(runs, key=lambda r: (score(r), -runs.index(r)))
    meta = best.meta
    meta.training = dict(meta.training, restarts=[
        {"seed": int(r.meta.training["config"]["seed"]), "val_f1": score(r), "best_epoch": r.best_epoch,
         "no_better_than": r.no_better_than, "folder": str(r.checkpoint)} for r in runs],
        chosen_seed=int(meta.training["config"]["seed"]), seconds=round(time.perf_counter() - t_start, 2))
    path = _save_model(best.model, meta, out)
    if best.no_better_than:
        _no_better(out, meta.validation, best.baselines, best.no_better_than, strict)
    return replace(best, checkpoint=path, seconds=time.perf_counter() - t_start)


def _threshold_rule(config: TrainConfig) -> str:
    """How the threshold was chosen, in words, for the checkpoint's provenance."""
    if config.threshold != "tune":
        return "fixed"
    if config.threshold_tolerance:
        return f"highest threshold within {config.threshold_tolerance:g} of the best validation F1"
    return "tuned on validation F1"


def _choose_threshold(config: TrainConfig, val_ds: ChipDataset, probs: np.ndarray) -> tuple[float, list[dict[str, float]] | None]:
    """The decision threshold: fixed, or chosen on the validation F1 over :data:`TUNE_THRESHOLDS`.

    Tuning uses :func:`icemap.metrics.threshold_sweep` on the validation probabilities, the
    same sweep the NDSI baseline is calibrated with, so both get the same kind of choice.
    """
    if config.threshold != "tune":
        return float(config.threshold), None

    refs, idxs = [], []
    for i in range(len(val_ds)):
        _, y, valid = val_ds.arrays(i)
        refs.append(np.where(valid, y, ICE_NODATA).astype(np.uint8))
        idxs.append(np.where(valid, probs[i], np.nan).astype(np.float32))
    index = xr.DataArray(np.stack(idxs), dims=("time", "y", "x"))
    ref = xr.DataArray(np.stack(refs), dims=("time", "y", "x"))
    curve = threshold_sweep(index, ref, thresholds=TUNE_THRESHOLDS, pixel_area_m2=val_ds.source.pixel_area_m2)
    t = best_threshold(curve, "f1", tolerance=config.threshold_tolerance)
    rows = [{"threshold": float(th), "f1": float(f1)} for th, f1 in zip(curve["threshold"], curve["f1"])]
    return float(t), rows


# ----------------------------------------------------------------------------------------------
# Inference on a window (in memory)
# ----------------------------------------------------------------------------------------------


def predict_window(model: UNet, meta: CheckpointMeta, cube: Any, *, dem: Any = None, tile: int | None = None,
                   hide_channel: int | None = None, device: str = "cpu", batch_size: int = 8) -> np.ndarray:
    """Ice probability for every date of a (small) cube or window, in memory.

    Runs :func:`icemap.infer.predict_array`, the predictor ``icemap.predict`` runs on every
    chunk, on the whole window: the same exact halo (half the receptive field, rounded to the
    U-Net's multiple), the same tiling, padding and nodata rules. So the scores of the
    experiment tables and reports are the scores of what ``icemap map --method unet`` writes
    (tests/test_infer.py checks the two agree on a scene).

    Returns
    -------
    numpy.ndarray
        (time, y, x) float32 probabilities, NaN where any input channel is nodata.
    """
    meta.check_cube(cube)
    x = build_inputs(cube, meta.channels, dem=dem)
    arr = np.asarray(x.values, dtype=np.float32)
    norm = Normalisation.from_dict(meta.normalisation)
    depth = model.config.depth
    m = 2**depth
    halo = default_halo(depth, model.config.receptive_field)
    tile = max(m, -(-int(resolve("tile", tile)) // m) * m)
    out = np.empty((arr.shape[0], arr.shape[2], arr.shape[3]), dtype=np.float32)
    for t in range(arr.shape[0]):
        out[t] = predict_array(arr[t], model, norm, depth=depth, halo=halo, tile=tile, batch_size=batch_size,
                               device=device, hide_channel=hide_channel)[0]
    return out
