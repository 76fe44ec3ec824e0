"""The lab's commands: ``icemap train``, ``icemap experiment`` and ``icemap model import`` (registered on
:data:`icemap.cli.app`; ``model import`` on :data:`icemap.cli_model_info.model_app`).

Kept apart from :mod:`icemap.cli` so the model commands can grow without touching the data
commands; torch is imported only when one of them runs. Settings are checked (and turned
into one-line :class:`~icemap.errors.IcemapError` messages) before any chip is read.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from icemap.cli_common import QuietOpt, SchedulerOpt, _console, _split_list, app, safe
from icemap.cli_model_info import model_app
from icemap.errors import IcemapError, ModelNoBetterWarning
from icemap.extras import require

if TYPE_CHECKING:
    from rich.console import Console

    from icemap.lab.train import TrainResult


# str, not Path: cubes may live on object stores (pathlib mangles s3:// URLs).
CubeOpt = Annotated[str, typer.Option("--cube", help="Cube store (path or URL) written by `icemap ingest`.")]
ReferenceOpt = Annotated[Path, typer.Option("--reference", help="Glacier outlines (any vector format): the labels.")]
EpochsOpt = Annotated[int, typer.Option("--epochs", help="Maximum epochs (early stopping on validation F1).")]
ChipOpt = Annotated[int, typer.Option("--chip-size", help="Chip edge in px (120 study a, 128 study b); padded to 2**depth.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Chips per step.")]
LossOpt = Annotated[str, typer.Option("--loss", help="dice (study a), bce (study b) or dice+bce.")]
OptimOpt = Annotated[str, typer.Option("--optimizer", help="adam or adadelta (study b).")]
LrOpt = Annotated[Optional[float], typer.Option("--lr", help="Learning rate (default 0.01 adam, 1.0 adadelta).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of weights, shuffling, augmentation and the split.")]
DemOpt = Annotated[Optional[Path], typer.Option("--dem", help="DEM GeoTIFF for the elevation channel.")]
DepthOpt = Annotated[int, typer.Option("--depth", help="U-Net levels (4 in study a).")]
BaseOpt = Annotated[int, typer.Option("--base", help="Feature maps of the first level.")]
PatienceOpt = Annotated[int, typer.Option("--patience", help="Stop after N epochs without a better validation F1 (0 = never).")]
ThresholdOpt = Annotated[str, typer.Option("--threshold", help="Decision threshold, or 'tune' (best validation F1).")]
OverlapOpt = Annotated[str, typer.Option("--overlap", help="independent (study a), drop or group.")]
HardOpt = Annotated[int, typer.Option("--hard-negatives", help="Hard-negative chips (water, shadow, snow, cloud).")]
RandomOpt = Annotated[int, typer.Option("--random-chips", help="Random chips.")]
IterOpt = Annotated[int, typer.Option("--split-iterations", help="Monte-Carlo iterations of the split (900 in study a).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (GPU when present), cpu or cuda.")]


#: ``--augment`` values: what each turns on (flips/rotations, the default model's radiometric
#: augmentation).
AUGMENT_CHOICES: dict[str, dict[str, bool]] = {
    "none": {"augment": False, "spectral_augment": False},
    "flips": {"augment": True, "spectral_augment": False},
    "spectral": {"augment": True, "spectral_augment": True},
}


def _config(**kw: Any) -> Any:
    from icemap.lab.train import TrainConfig

    threshold = kw.pop("threshold")
    kw["patience"] = kw["patience"] or None
    augment = kw.pop("augment", "flips")
    if augment not in AUGMENT_CHOICES:
        raise IcemapError(f"--augment must be one of {', '.join(AUGMENT_CHOICES)}, not {augment!r}")
    kw.update(AUGMENT_CHOICES[augment])
    if kw.get("inputs") is None:
        kw.pop("inputs", None)  # the TrainConfig default, or the --init model's inputs
    return TrainConfig(threshold=threshold if threshold == "tune" else _number(threshold, "--threshold"), **kw)


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise IcemapError(f"{what} must be a number or 'tune', not {text!r}") from None


def _check_paths(cube: str, reference: Path, dem: Path | None) -> None:
    # Plain existence checks first: the most common mistake gets the plainest message. URLs
    # (s3://...) are left to open_cube, which says the same for stores it cannot find.
    if "://" not in cube and not Path(cube).exists():
        raise IcemapError(f"no cube at {cube}; create one with `icemap ingest --out {cube}`")
    if not reference.exists():
        raise IcemapError(f"outline file {reference} does not exist")
    if dem is not None and not dem.exists():
        raise IcemapError(f"DEM file {dem} does not exist")


@app.command("train")
def train_cmd(
    cube: CubeOpt,
    reference: ReferenceOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Model folder to write (checkpoint + training state).")],
    inputs: Annotated[Optional[str], typer.Option(
        "--inputs", help="Input set (b3_b6, all_bands_dem, ndsi, b6_b5_b2, ...) or channels "
        "[default: b3_b6, or the --init model's]", show_default=False)] = None,
    init: Annotated[Optional[str], typer.Option(
        "--init", help="Fine-tune from a model: 'default' (the shipped one) or a model folder; its weights, "
        "inputs, architecture and normalisation are used (default learning rate a tenth).")] = None,
    augment: Annotated[str, typer.Option(
        "--augment", help="flips (flips and rotations), spectral (also the default model's band gains, "
        "illumination, haze, noise...) or none.")] = "flips",
    restarts: Annotated[int, typer.Option(
        "--restarts", help="Train N models (seeds SEED, SEED+1, ...) on the same chips and split; keep the best "
        "validation F1.")] = 1,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Fail (non-zero exit) when the model is no better than NDSI or everything-is-ice "
        "on validation, instead of warning.")] = False,
    mask: Annotated[str, typer.Option("--mask", help="original or extended (outlines grown 15 m).")] = "original",
    epochs: EpochsOpt = 50,
    chip_size: ChipOpt = 128,
    batch_size: BatchOpt = 8,
    loss: LossOpt = "dice",
    optimizer: OptimOpt = "adam",
    lr: LrOpt = None,
    seed: SeedOpt = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/training when a state is there.")] = False,
    dem: DemOpt = None,
    depth: DepthOpt = 4,
    base: BaseOpt = 16,
    dropout: Annotated[float, typer.Option("--dropout", help="Bottleneck dropout (also enables MC-dropout at inference).")] = 0.0,
    patience: PatienceOpt = 10,
    threshold: ThresholdOpt = "0.5",
    threshold_tolerance: Annotated[float, typer.Option(
        "--threshold-tolerance", help="With --threshold tune: the highest threshold whose validation F1 is "
        "within this of the best (0 = the best itself).")] = 0.0,
    overlap: OverlapOpt = "independent",
    chips: Annotated[str, typer.Option(
        "--chips", help="outline (one chip per outline) or grid (chips edge to edge over the outlines: every "
        "labelled pixel is used).")] = "outline",
    split: Annotated[str, typer.Option(
        "--split", help="glacier (whole glaciers held out for validation/test) or location (places held out: "
        "splits a region with one or two large glaciers) or year (latest year = test, the one before = "
        "validation).")] = "glacier",
    label_time: Annotated[Optional[str], typer.Option(
        "--label-time", help="Column of the outlines with each outline's year or date: each cube date is "
        "labelled by the outlines of its year/date (yearly outlines in one file).")] = None,
    hard_negatives: HardOpt = 0,
    random_chips: RandomOpt = 0,
    split_iterations: IterOpt = 900,
    device: DeviceOpt = "auto",
    scheduler: SchedulerOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Train a U-Net on chips of a cube labelled by glacier outlines; write a checkpoint."""
    require("ml", "icemap train")
    _check_paths(cube, reference, dem)
    cfg = _config(inputs=inputs, mask=mask, epochs=epochs, chip_size=chip_size, batch_size=batch_size,
                  loss=loss, optimizer=optimizer, lr=lr, seed=seed, depth=depth, base=base, dropout=dropout,
                  patience=patience,
                  threshold=threshold, threshold_tolerance=threshold_tolerance, overlap=overlap,
                  n_hard_negative=hard_negatives, n_random=random_chips,
                  split_iterations=split_iterations, device=device, init=init, augment=augment, chips=chips,
                  split=split, restarts=restarts,
                  label_time=label_time)

    from icemap.cluster import connect
    from icemap.lab.train import train

    # The cluster reads and scans the cube (chips, normalisation); torch trains in this process.
    # The no-better warning is printed below, beside the scores it is about.
    with connect(scheduler), warnings.catch_warnings():
        warnings.simplefilter("ignore", ModelNoBetterWarning)
        res = train(cube, reference, out, cfg, dem=dem, resume=resume, quiet=quiet, console=_console(),
                    strict=strict)
    _report_training(res, out)


def _report_training(res: TrainResult, out: Path) -> None:
    """What ``icemap train`` prints: the model's scores beside the baselines, the chips and
    split, the test scores, and the no-better warning beside the scores it is about."""
    con = _console(stderr=False)
    _print_scores(con, res, out)
    _print_chips_and_split(con, res)
    if res.test is not None:
        t = res.test
        con.print(f"test F1 {t['f1']:.3f} (P {t['precision']:.3f}, R {t['recall']:.3f}), "
                  f"ice area {t['ice_area_km2']:.3f} km2 ({t['area_diff_pct']:+.1f}% vs the outlines)",
                  highlight=False)
    if res.no_better_than:
        names = {"ndsi": "NDSI", "all_ice": "everything-is-ice"}
        _console().print(f"[bold yellow]ModelNoBetterWarning[/]: the model is no better than "
                         f"{' or '.join(names[n] for n in res.no_better_than)} on validation; do not map with it "
                         "as it is (try --init default, --augment spectral, more --epochs, --restarts N or another --seed, "
                         "more labelled glaciers)", highlight=False)


def _print_scores(con: Console, res: TrainResult, out: Path) -> None:
    """The starting model, the epochs and validation scores, the restarts, and the baselines
    on the same validation pixels."""
    v = res.meta.validation
    start = res.meta.training.get("init")
    if start:
        con.print(f"started from {start['model']} (validation F1 {start['start_val_f1']:.3f} before training)"
                  if start.get("start_val_f1") is not None else f"started from {start['model']}", highlight=False)
    con.print(f"[bold]{safe(out)}[/]: {len(res.history)} epoch(s), best epoch {res.best_epoch}, threshold "
              f"{res.threshold:.2f}, validation F1 {v['f1']:.3f} (P {v['precision']:.3f}, R {v['recall']:.3f})",
              highlight=False)
    if res.meta.training.get("restarts"):
        con.print("restarts (seed: validation F1): " + ", ".join(
            f"{r['seed']}: {r['val_f1']:.3f}" for r in res.meta.training["restarts"])
            + f"; kept seed {res.meta.training['chosen_seed']}", highlight=False)
    b = res.baselines
    line = f"same validation pixels: model F1 {v['f1']:.3f}"
    if "ndsi" in b:
        line += f", NDSI {b['ndsi']['threshold']:g} F1 {b['ndsi']['f1']:.3f}"
    line += f", everything-is-ice F1 {b['all_ice']['f1']:.3f}"
    con.print(line, highlight=False)


def _print_chips_and_split(con: Console, res: TrainResult) -> None:
    """How much of the labels the chips cover, how dates were labelled, and the split's sets."""
    params = res.data.index.params
    if params.get("labelled_pixels"):
        con.print(f"chips ({params['layout']}): {len(res.data.index.windows)} windows, "
                  f"{len(res.data.index.samples)} chip-dates; {params['labelled_pixels_in_chips']} of "
                  f"{params['labelled_pixels']} labelled pixels ({100 * params['label_coverage']:.1f} %) are in a chip",
                  highlight=False)
    if params.get("label_time"):
        skipped = params.get("dates_without_labels") or []
        con.print(f"labels per {params['label_match']} from column {params['label_time']}"
                  + (f"; dates without outlines left out: {', '.join(skipped)}" if skipped else ""), highlight=False)
    sets = res.data.split.report["sets"]
    con.print("split (KS vs all glaciers, area/shape): " + "; ".join(
        f"{n} {s['samples']} chips, {s['glaciers']} glaciers, KS {s['ks_area']:.2f}/{s['ks_shape']:.2f}"
        for n, s in sets.items()), highlight=False)


@app.command("experiment")
def experiment_cmd(
    cube: CubeOpt,
    reference: ReferenceOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the tables and the models.")],
    inputs: Annotated[Optional[list[str]], typer.Option("--inputs", help="Input sets (repeatable or comma-separated); default study a's five.")] = None,
    masks: Annotated[Optional[list[str]], typer.Option("--masks", help="original and/or extended (default both).")] = None,
    epochs: EpochsOpt = 50,
    chip_size: ChipOpt = 120,
    batch_size: BatchOpt = 8,
    loss: LossOpt = "dice",
    optimizer: OptimOpt = "adam",
    lr: LrOpt = None,
    seed: SeedOpt = 0,
    dem: DemOpt = None,
    truth: Annotated[Optional[Path], typer.Option("--truth", help="Sample-region folder whose class truth gives false positives by class.")] = None,
    depth: DepthOpt = 4,
    base: BaseOpt = 16,
    patience: PatienceOpt = 10,
    threshold: ThresholdOpt = "0.5",
    overlap: OverlapOpt = "independent",
    hard_negatives: HardOpt = 0,
    random_chips: RandomOpt = 0,
    split_iterations: IterOpt = 900,
    device: DeviceOpt = "auto",
    fresh: Annotated[bool, typer.Option("--fresh", help="Retrain every run (default: reuse finished, resume interrupted).")] = False,
    scheduler: SchedulerOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Study a's grid: input sets x masks on one split; Table 3 (vs NDSI) and Table 5 (ablation)."""
    require("ml", "icemap experiment")
    _check_paths(cube, reference, dem)
    cfg = _config(epochs=epochs, chip_size=chip_size, batch_size=batch_size, loss=loss, optimizer=optimizer,
                  lr=lr, seed=seed, depth=depth, base=base, patience=patience, threshold=threshold,
                  overlap=overlap, n_hard_negative=hard_negatives, n_random=random_chips,
                  split_iterations=split_iterations, device=device)
    from icemap.lab.experiment import STUDY_A_INPUTS, default_runs, run_experiment, to_markdown

    runs = default_runs(_split_list(inputs) or STUDY_A_INPUTS, _split_list(masks) or ("original", "extended"))
    region = None
    if truth is not None:
        from icemap.sample import open_sample_region

        region = open_sample_region(truth)
    from icemap.cluster import connect

    with connect(scheduler):
        res = run_experiment(cube, reference, out, runs=runs, config=cfg, dem=dem, truth=region, resume=not fresh,
                             quiet=quiet, console=_console())
    con = _console(stderr=False)
    cols = ["model", "threshold", "f1", "balanced_accuracy", "precision", "recall", "ice_area_km2", "area_diff_pct"]
    con.print(to_markdown(res.table3[cols]), highlight=False, markup=False)
    con.print(f"tables in {out} (table3, table5{', false_positives' if region else ''}); {res.seconds:.0f} s",
              highlight=False)


# -- icemap model import: a network trained elsewhere ----------------------------------------------
@model_app.command("import")
def model_import_cmd(
    onnx_file: Annotated[Path, typer.Argument(help="ONNX network: input batch x bands x H x W (dynamic H, W), "
                                                   "output batch x 1 x H x W.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model folder to write (for `icemap map --model`).")],
    bands: Annotated[str, typer.Option("--bands", help="The network's input channels in order: bands (green,swir16,...) "
                                                       "or derived channels (ndsi, ...).")],
    normalisation: Annotated[Optional[str], typer.Option(
        "--normalisation", help='JSON (or a JSON file): {"lo": [...], "hi": [...]} or {"mean": [...], "std": [...]} '
        "per band; default: reflectance as it is.")] = None,
    halo: Annotated[Optional[int], typer.Option("--halo", help="Context px that makes tiles exact (default: measured).")] = None,
    multiple: Annotated[Optional[int], typer.Option("--multiple", help="Power of two tile sizes must be multiples of "
                                                                       "(default: measured).")] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Ice probability threshold (default 0.5).")] = None,
    output: Annotated[Optional[str], typer.Option("--output", help="probability or logit (default: probability when "
                                                                   "the network ends in a Sigmoid).")] = None,
) -> None:
    """Turn an ONNX network into an icemap model folder (measures its halo; checks tiles equal whole windows)."""
    require("onnx", "icemap model import")
    require("ml", "icemap model import")
    from icemap.lab.onnx_import import import_onnx
    from icemap.model.checkpoint import read_metadata

    folder = import_onnx(onnx_file, out, bands, normalisation=normalisation, halo=halo, multiple=multiple,
                         threshold=threshold, output=output)
    meta = read_metadata(folder)
    a = meta.architecture
    _console(stderr=False).print(
        f"[bold]{safe(folder)}[/]: ONNX network on {safe(','.join(meta.channels))} ({a['output_kind']} output, opset {a['opset']}); "
        f"multiple {a['multiple']} px, halo {a['halo']} px ({'measured' if a['halo_source'] == 'probe' else 'given'}); "
        f"tiles equal whole windows to {a['tiling_max_diff']:.1e}; sha256 {meta.weights_sha256[:12]}...",
        highlight=False)
