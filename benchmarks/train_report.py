#!/usr/bin/env python
"""Reproduce the numbers of docs/unet-study.md: study a's U-Net grid on a sample region.

Run from the repository root (``../shared/data`` beside the repository for the Athabasca part)::

    python benchmarks/train_report.py --work /tmp/icemap-unet-study [--quick]

What it does, with icemap's public API only:

1. Generates the training region ``make_sample_region(size=768, n_dates=4, seed=0)`` and a
   hold-out region ``make_sample_region(size=512, n_dates=3, seed=1)`` (other terrain, other
   glaciers, never seen in training) and ingests both with all eight bands (lwir11 included,
   for study a's "all bands" inputs).
2. Runs :func:`icemap.lab.experiment.run_experiment` on the training region: study a's five
   input sets x {original, extended} masks, plus study b's set-up (bands 6-5-2, BCE, Adadelta)
   as an eleventh run, all on one chip set and one Monte-Carlo split (900 iterations). Writes
   Table 3, Table 5 and the false positives by truth class for the test chips.
3. Scores every model and NDSI (threshold calibrated on the training chips, and 0.4) on the
   whole hold-out region, every date, with false positives by truth class.
4. Scores the models whose inputs the real Athabasca crop has (HLS L30: no coastal, no
   thermal band; its own DEM for the DEM models) and NDSI on it, against its partial
   single-glacier GLIMS label.

Everything is written under ``--work``: ``experiment/`` (tables, models), ``holdout.csv``,
``holdout_fp.csv``, ``athabasca.csv`` and ``report.json`` (settings, timings, machine). The
training runs resume: rerunning the command after an interruption continues where it stopped.
``--quick`` shrinks everything (for checking the script, not for numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

#: The report's settings (see docs/unet-study.md for why each was chosen).
SETTINGS: dict[str, Any] = {
    "train_region": {"size": 768, "n_dates": 4, "seed": 0},
    "holdout_region": {"size": 512, "n_dates": 3, "seed": 1},
    "chip_size": 96,
    "depth": 4,
    "base": 8,
    "epochs": 40,
    "patience": 10,
    "batch_size": 8,
    "lr": 0.01,
    "loss": "dice",
    "optimizer": "adam",
    "threshold": "tune",
    "overlap": "independent",
    "n_hard_negative": 8,
    "n_random": 4,
    "split_iterations": 900,
    "seed": 0,
}
QUICK: dict[str, Any] = {
    "train_region": {"size": 384, "n_dates": 2, "seed": 0},
    "holdout_region": {"size": 256, "n_dates": 2, "seed": 1},
    "chip_size": 64, "base": 4, "depth": 3, "epochs": 2, "split_iterations": 50,
}
ALL_BANDS = ["coastal", "blue", "green", "red", "nir08", "swir16", "swir22", "lwir11"]
ATHABASCA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "athabasca_hls_l30"
HLS_BANDS = {"blue": "B02", "green": "B03", "red": "B04", "nir08": "B05", "swir16": "B06", "swir22": "B07"}


def region_cube(root: Path, size: int, n_dates: int, seed: int) -> tuple[Any, Path]:
    """Generate (or reuse) a sample region and its 8-band cube."""
    from icemap.sample import make_sample_region
    from icemap.stac import search
    from icemap.workflow import ingest

    region = make_sample_region(root / "region", size=size, n_dates=n_dates, seed=seed)
    cube = root / "cube.zarr"
    # ingest resumes and skips complete time steps, so a rerun costs nothing here.
    s = search(str(region.catalog), collections=region.collection, bbox=region.bbox)
    ingest(s, cube, bands=ALL_BANDS, chunksize=256)
    return region, cube


def athabasca_cube(work: Path) -> tuple[Path, Path] | None:
    """The Athabasca HLS crop as an icemap cube (as tests/test_athabasca.py builds it)."""

    # Imported from their modules: once icemap.load (the module) is imported, the lazy
    # package attribute `icemap.load` is shadowed by the module itself.
    from icemap.load import load
    from icemap.stac import item_from_files
    from icemap.store import write_cube

    if not ATHABASCA.exists():
        return None
    store = work / "athabasca.zarr"
    outline = ATHABASCA / "athabasca_outline.shp"
    if (store / "zarr.json").exists():
        return store, outline
    # The files' custom WKT equals EPSG:32611 (see the data set's README).
    item = item_from_files({name: ATHABASCA / f"athabasca_2020229_{code}_L30.tif" for name, code in HLS_BANDS.items()},
                           id="HLS.L30.athabasca.2020229.v2.0", datetime="2020-08-16T00:00:00Z",
                           collection="hls", platform="landsat-8", crs="EPSG:32611")
    ds = load([item], sensor="hls", crs="EPSG:32611", bands=list(HLS_BANDS))
    write_cube(ds, store)
    return store, outline


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/icemap-unet-study"))
    ap.add_argument("--quick", action="store_true", help="tiny settings, to check the script")
    ap.add_argument("--quiet", action="store_true", help="no progress display")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core machine, 2 OpenMP threads "
                         "spin against other processes and ran 2-4x slower than 1)")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")

    import pandas as pd
    import torch

    torch.set_num_threads(args.threads)

    from icemap.model.checkpoint import load_checkpoint
    from icemap.lab.experiment import RunSpec, default_runs, run_experiment, score_scene, to_markdown
    from icemap.lab.train import TrainConfig

    settings = dict(SETTINGS, **(QUICK if args.quick else {}))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    train_region, train_cube = region_cube(work / "train", **settings["train_region"])
    hold_region, hold_cube = region_cube(work / "holdout", **settings["holdout_region"])
    timings["regions_and_ingest_s"] = time.perf_counter() - t

    keys = ("chip_size", "depth", "base", "epochs", "patience", "batch_size", "lr", "loss", "optimizer",
            "threshold", "overlap", "n_hard_negative", "n_random", "split_iterations", "seed")
    config = TrainConfig(**{k: settings[k] for k in keys})
    runs = default_runs()
    # Study b's set-up on the same chips: bands 6-5-2, BCE, Adadelta (lr 1.0), batch 8.
    runs.append(RunSpec("b6_b5_b2", "original", {"loss": "bce", "optimizer": "adadelta", "lr": None},
                        label="b6_b5_b2_studyb"))
    t = time.perf_counter()
    exp = run_experiment(train_cube, train_region.outlines, work / "experiment", runs=runs, config=config,
                         dem=train_region.dem, truth=train_region, quiet=args.quiet)
    timings["experiment_s"] = time.perf_counter() - t

    t = time.perf_counter()
    models = {name: load_checkpoint(work / "experiment" / "models" / name) for name in exp.runs}
    ndsi = {"NDSI (calibrated)": exp.ndsi_threshold, "NDSI 0.4": 0.4}
    hold, hold_fp = score_scene(hold_cube, hold_region.outlines, models, ndsi_thresholds=ndsi,
                                dem=hold_region.dem, truth=hold_region)
    hold.to_csv(work / "holdout.csv", index=False)
    hold_fp.to_csv(work / "holdout_fp.csv", index=False)
    timings["holdout_s"] = time.perf_counter() - t

    t = time.perf_counter()
    ath = athabasca_cube(work)
    ath_table = None
    if ath is not None:
        store, outline = ath
        # Models whose bands the HLS crop has (no coastal, no thermal). The DEM models get the
        # crop's own DEM, although its elevations (1937-3449 m) lie below the training
        # region's (about 3500-5800 m): that row shows what an out-of-range channel does.
        usable = {n: m for n, m in models.items() if set(m[1].bands) <= set(HLS_BANDS)}
        ath_table, _ = score_scene(store, outline, usable, ndsi_thresholds=ndsi,
                                   dem=ATHABASCA / "athabasca_dem.tif")
        ath_table.to_csv(work / "athabasca.csv", index=False)
    timings["athabasca_s"] = time.perf_counter() - t

    report = {
        "command": "python benchmarks/train_report.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "settings": settings, "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "train_seconds": {n: round(r.seconds, 1) for n, r in exp.runs.items()},
        "ndsi_threshold": exp.ndsi_threshold, "chips": exp.data.index.summary(), "split": exp.data.split.report,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.is_available(), "platform": platform.platform()},
    }
    (work / "report.json").write_text(json.dumps(report, indent=1, default=float))
    pd.set_option("display.width", 200)
    cols = ["model", "threshold", "f1", "balanced_accuracy", "precision", "recall", "ice_area_km2", "area_diff_pct",
            "f1_extended"]
    print("## Table 3 (test chips)\n" + to_markdown(exp.table3[cols]))
    print("## Table 5 (channel hiding)\n" + to_markdown(exp.table5))
    if exp.false_positives is not None:
        print("## False positives on test chips\n" + to_markdown(exp.false_positives))
    print("## Hold-out region\n" + to_markdown(hold[cols]))
    print("## Hold-out false positives\n" + to_markdown(hold_fp))
    if ath_table is not None:
        print("## Athabasca\n" + to_markdown(ath_table[cols]))
    print(json.dumps(report["timings_s"]), json.dumps(report["train_seconds"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
