#!/usr/bin/env python
"""Measure the NDSI ice mask on every labelled data set icemap has and write a Markdown report.

Run from the repository root (``../shared/data`` must sit beside the repository)::

    python benchmarks/ndsi_report.py [--out docs/ndsi-results.md] [--size N]

What it measures, with the public library API only (``icemap.load`` / ``write_cube`` /
``open_cube`` -> ``ice_mask`` with and without guards -> ``icemap.metrics``):

1. The embedded sample region (``make_sample_region(size=N, n_dates=3, seed=0)``), where the
   truth is known per pixel: F1/precision/recall/kappa against the glacier outlines, F1
   against the truth "ice" class with snow and water left out, and the ice-area error against
   the visible clean-ice fraction and against the outlines, per date, at 0.4 and at a threshold
   calibrated on the outlines, each without and with the water and dark guards.
2. Real negative controls with no ice at all: the Liverpool Landsat-8 crop and the two ukis
   cloud chips (per reference class): the share of pixels flagged as ice.
3. Athabasca Glacier (HLS L30, real): scores against the partial GLIMS label, the best-F1
   threshold of a sweep, and the Otsu and valley thresholds of the NDSI histogram.

The numbers are written to ``--out`` (default ``docs/ndsi-results.md``) together with the date,
the machine, the icemap version and the exact command, so the page can be regenerated and
compared. Runtime on 2 CPU cores is well under two minutes at the default size.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEFAULT_OUT = Path("docs") / "ndsi-results.md"

ATHABASCA = "athabasca_hls_l30"
ATHABASCA_BANDS = {"blue": "B02", "green": "B03", "red": "B04", "nir08": "B05", "swir16": "B06",
                   "swir22": "B07"}
LIVERPOOL = "xlandsat_liverpool_l2sp"
LIVERPOOL_SCENE = "LC08_L2SP_204023_20200927_20201006_02_T1"
UKIS = "ukis_csmask_cloud_chips"
#: ukis reference classes (data README): 0 and 4 are the package's own, 1 and 3 inferred.
UKIS_CLASSES = {0: "cloud shadow", 1: "water", 3: "land", 4: "cloud"}

T_DEFAULT = 0.4
SPECTRAL_GUARDS = ("water", "dark")
#: The water guard with its optional NDWI test switched on (``ndwi_max=0.4``); its default is
#: the NIR test only, and the Athabasca section shows why.
WITH_NDWI: dict[str, Any] = {"guards": SPECTRAL_GUARDS, "ndwi_max": 0.4}
#: The guard configurations compared on the real scenes: ``ice_mask`` keyword arguments.
GUARD_CONFIGS: dict[str, dict[str, Any]] = {
    "NDSI alone": {"guards": ()},
    "+ water": {"guards": ("water",)},
    "+ dark": {"guards": ("dark",)},
    "+ water + dark": {"guards": SPECTRAL_GUARDS},
    "+ water with NDWI test (`ndwi_max=0.4`) + dark": WITH_NDWI,
}


class ReportError(RuntimeError):
    """Something the report needs is missing; the message says what and where."""


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def shared(*parts: str) -> Path:
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        raise ReportError(
            f"{p} is missing. This report reads the real data in ../shared/data, the folder "
            f"beside the repository ({REPO}); put the shared data there and run again."
        )
    return p


def f3(x: Any) -> str:
    """A number to 3 decimals; NaN/None as n/a."""
    if x is None:
        return "n/a"
    x = float(x)
    if math.isnan(x):
        return "n/a"
    return f"{x:.3f}"


def signed3(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:+.3f}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` is one letter per column (l/r), default l then r."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(map(str, header)) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def rate(flagged: int, n: int) -> str:
    """Share flagged to 3 decimals, with the pixel count so that small rates stay visible."""
    return "n/a (0 px)" if n == 0 else f"{flagged / n:.3f} ({flagged} px)"


def read_band(path: Path) -> np.ndarray:
    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            return src.read(1)


def guard_label(guards: Sequence[str]) -> str:
    return "none" if not guards else " + ".join(guards)


# ----------------------------------------------------------------------------------------------
# 1. the sample region
# ----------------------------------------------------------------------------------------------


def sample_section(workdir: Path, size: int, seed: int) -> dict[str, Any]:
    import rasterio

    import icemap
    from icemap import metrics as m
    from icemap.labels import rasterize_outlines, read_outlines
    from icemap.sample import CLASS_CODES, make_sample_region
    from icemap.vector import pixel_area_m2

    code = CLASS_CODES
    region = make_sample_region(workdir / "region", size=size, n_dates=3, seed=seed)
    items = icemap.search(str(region.catalog)).item_dicts()
    # The default pipeline: QA_PIXEL masks fill, cloud, dilated cloud, cirrus and cloud shadow.
    ds = icemap.load(items, bands=["green", "nir08", "swir16"], chunksize=256)
    store = workdir / "sample_cube.zarr"
    icemap.write_cube(ds, store)
    cube = icemap.open_cube(store).load()
    dates = [str(t)[:10] for t in cube["time"].values]
    if dates != list(region.dates):
        raise ReportError(f"cube dates {dates} differ from the region's {list(region.dates)}")
    px = pixel_area_m2(cube)
    km2 = px / 1e6

    classes, fracs = [], []
    for d in dates:
        with rasterio.open(region.truth(d)) as f:
            classes.append(f.read(1))
        with rasterio.open(region.ice_fraction(d)) as f:
            fracs.append(f.read(1).astype(np.float64))
    with rasterio.open(region.glacier_ids) as f:
        gid = f.read(1)
    outlines = read_outlines(region.outlines, layer="glaciers")
    cls_stack = np.stack(classes)
    blind = (code["snow"], code["water"])  # NDSI's known blind spots, left out of "visible ice"

    # Calibration: one threshold for the region, from a sweep of NDSI against the outlines over
    # all three dates (in-sample: the same pixels are then scored with it).
    index = icemap.ndsi(cube)
    curve = m.threshold_sweep(index, rasterize_outlines(outlines, index)).set_index("threshold")
    t_cal = m.best_threshold(curve.reset_index())
    # For comparison, the threshold the index itself prefers against visible ice.
    ref_cls = np.where(cls_stack == code["fill"], 255, cls_stack == code["ice"]).astype(np.uint8)
    curve_cls = m.threshold_sweep(index, ref_cls, valid=~np.isin(cls_stack, blind))
    curve_cls = curve_cls.set_index("threshold")
    t_cls = m.best_threshold(curve_cls.reset_index())

    # NDSI per truth class over the observed (not QA-masked) pixels of all dates.
    nd = index.values
    ndsi_by_class = {}
    for name in ("ice", "snow", "water", "debris", "rock", "vegetation", "cloud", "cloud_shadow"):
        v = nd[(cls_stack == code[name]) & np.isfinite(nd)]
        ndsi_by_class[name] = (v.size, *(np.percentile(v, [5, 50, 95]) if v.size else [np.nan] * 3))

    configs = [
        ("default", f"{T_DEFAULT:.3f}", T_DEFAULT, ()),
        ("default", f"{T_DEFAULT:.3f}", T_DEFAULT, SPECTRAL_GUARDS),
        ("calibrated", f"{t_cal:.3f} (calibrated)", t_cal, ()),
        ("calibrated", f"{t_cal:.3f} (calibrated)", t_cal, SPECTRAL_GUARDS),
    ]
    rows = []
    for kind, label, t, guards in configs:
        ice_all = icemap.ice_mask(cube, threshold=t, guards=guards).compute()
        for i, d in enumerate(dates):
            ice = ice_all.isel(time=i)
            iv = ice.values
            cls, frac = classes[i], fracs[i]
            observed = (iv != 255) & (cls != code["fill"])
            ev = m.evaluate(ice, outlines)
            ref = np.where(cls == code["fill"], 255, cls == code["ice"]).astype(np.uint8)
            valid = ~np.isin(cls, blind)
            sc = m.scores(m.confusion(ice, ref, valid=valid), pixel_area_m2=px)
            # Area against the sub-pixel truth: mapped ice vs the visible clean-ice fraction,
            # over the same observed pixels; once over all of them, once without snow/water.
            sel = observed & valid
            # False positives against the ice class (snow/water left out), by truth class.
            fp = sel & (iv == 1) & (cls != code["ice"])
            # Outline pixels NDSI missed, by what the truth says they show.
            missed = observed & (gid > 0) & (iv == 0)
            lakes = observed & (cls == code["water"])
            snow = observed & (cls == code["snow"])
            cloud = observed & (cls == code["cloud"])
            rows.append({
                "date": d, "kind": kind, "threshold": label, "t": t, "guards": guard_label(guards),
                "ev": ev, "cls": sc,
                "mapped_all": float(((iv == 1) & observed).sum()) * km2,
                "true_all": float(np.nansum(frac[observed])) * km2,
                "mapped_sw": float(((iv == 1) & sel).sum()) * km2,
                "true_sw": float(np.nansum(frac[sel])) * km2,
                "mapped_frac_mean": float(np.nanmean(frac[sel & (iv == 1)])),
                "lake_flagged": int(((iv == 1) & lakes).sum()), "lake_n": int(lakes.sum()),
                "snow_flagged": int(((iv == 1) & snow).sum()), "snow_n": int(snow.sum()),
                "cloud_flagged": int(((iv == 1) & cloud).sum()), "cloud_n": int(cloud.sum()),
                "fp_n": int(fp.sum()),
                "fp_shadow": int((fp & (cls == code["cloud_shadow"])).sum()),
                "fp_shadow_frac": float(np.nansum(frac[fp & (cls == code["cloud_shadow"])])),
                "fp_rock": int((fp & np.isin(cls, (code["rock"], code["debris"]))).sum()),
                "fp_cloud": int((fp & (cls == code["cloud"])).sum()),
                "missed_n": int(missed.sum()),
                "missed_debris": int((missed & (cls == code["debris"])).sum()),
                "missed_ice": int((missed & (cls == code["ice"])).sum()),
                "outline_debris": int((observed & (gid > 0) & (cls == code["debris"])).sum()),
                "qa_masked": int(((iv == 255) & (cls != code["fill"])).sum()),
                "covered_n": int((cls != code["fill"]).sum()),
            })

    # The water guard with its optional NDWI test, for the comparison in the Athabasca section.
    with_ndwi = icemap.ice_mask(cube, threshold=T_DEFAULT, **WITH_NDWI).values
    both = icemap.ice_mask(cube, threshold=T_DEFAULT, guards=SPECTRAL_GUARDS).values
    lakes_all = (cls_stack == code["water"]) & (both != 255)
    ice_all_cls = (cls_stack == code["ice"]) & (both != 255)

    debris = read_outlines(region.outlines, layer="debris")
    return {
        "size": size, "seed": seed, "dates": dates, "n_glaciers": len(outlines),
        "glacier_km2": float(outlines.geometry.area.sum()) / 1e6,
        "debris_km2": float(debris.geometry.area.sum()) / 1e6 if len(debris) else 0.0,
        "n_debris_glaciers": int(debris["gid"].nunique()) if len(debris) else 0,
        "t_cal": t_cal, "f1_cal": float(curve.loc[t_cal, "f1"]),
        "f1_cal_at_04": float(curve.loc[T_DEFAULT, "f1"]),
        "t_cls": t_cls, "f1_cls": float(curve_cls.loc[t_cls, "f1"]),
        "f1_cls_at_04": float(curve_cls.loc[T_DEFAULT, "f1"]),
        "ndsi_by_class": ndsi_by_class,
        "default_lakes": (int((both[lakes_all] == 1).sum()), int(lakes_all.sum())),
        "with_ndwi_recall": float((with_ndwi[ice_all_cls] == 1).mean()),
        "both_recall": float((both[ice_all_cls] == 1).mean()),
        "px_m2": px, "rows": rows,
    }


def pct(mapped: float, true: float) -> float:
    return 100.0 * (mapped - true) / true if true else float("nan")


def render_sample(s: dict[str, Any]) -> str:
    rows = s["rows"]
    out = [
        "## 1. Sample region (procedural, truth known per pixel)",
        "",
        f"`icemap.make_sample_region(size={s['size']}, n_dates=3, seed={s['seed']})`: "
        f"{s['size']} x {s['size']} px at 30 m ({s['size'] ** 2 * s['px_m2'] / 1e6:.1f} km²), "
        f"{s['n_glaciers']} glaciers covering {s['glacier_km2']:.3f} km² in their outlines, "
        "of which "
        f"{s['debris_km2']:.3f} km² is debris-covered ice on {s['n_debris_glaciers']} tongues; "
        f"dates {', '.join(s['dates'])}. Loaded through the default pipeline "
        "(`icemap.load` -> `write_cube` -> `open_cube`; QA_PIXEL fill, cloud, dilated cloud, "
        "cirrus and cloud shadow are nodata and not scored), bands green, nir08, swir16. The "
        "region is synthetic: every surface class has one fixed spectrum (`icemap.sample`), so "
        "it is easier than a real scene.",
        "",
        "Thresholds: the literature default 0.4, and a threshold calibrated as study a did, "
        "`best_threshold(threshold_sweep(ndsi, outlines))` (best F1 against the rasterised "
        f"outlines, all three dates pooled): **{s['t_cal']:.3f}** (pooled F1 {s['f1_cal']:.3f}, "
        f"against {s['f1_cal_at_04']:.3f} at 0.4). This calibration is in-sample: it is scored on "
        "the pixels it was fitted on. Guards: `guards=(\"water\", \"dark\")` with their defaults "
        "(NIR < 0.11 is water; green < 0.15 is dark).",
        "",
        "### Against the glacier outlines (`icemap.metrics.evaluate`)",
        "",
        "Outlines rasterised at pixel centres; they include debris-covered ice. Area error = "
        "mapped ice minus outline area, over the scored (observed) pixels.",
        "",
    ]
    out.append(table(
        ["date", "threshold", "guards", "F1", "precision", "recall", "kappa", "ice km²",
         "outlines km²", "area error %"],
        [[r["date"], r["threshold"], r["guards"], f3(r["ev"]["f1"]), f3(r["ev"]["precision"]),
          f3(r["ev"]["recall"]), f3(r["ev"]["kappa"]), f3(r["ev"]["ice_area_km2"]),
          f3(r["ev"]["reference_area_km2"]), signed3(r["ev"]["area_diff_pct"])] for r in rows],
        "lllrrrrrrr",
    ))
    out += [
        "",
        "### Against the truth ice class, and the area against the visible-ice fraction",
        "",
        "F1/precision/recall against the truth class \"ice\" (the dominant visible surface of the "
        "pixel), scoring every observed pixel except those whose truth is snow or water, the "
        "index's known blind spots (METHOD.md). Areas compare the mapped ice with the sum of the "
        "truth's sub-pixel visible clean-ice fraction over the same observed pixels: first over "
        "all of them (what a user gets), then without the snow and water pixels. The last three "
        "columns: share of the observed lake, seasonal-snow and cloud pixels mapped as ice.",
        "",
    ]
    out.append(table(
        ["date", "threshold", "guards", "F1 (no snow/water)", "precision", "recall",
         "mapped km²", "visible ice km²", "error km²", "error %", "error % (no snow/water)",
         "lakes flagged", "snow flagged", "cloud flagged"],
        [[r["date"], r["threshold"], r["guards"], f3(r["cls"]["f1"]), f3(r["cls"]["precision"]),
          f3(r["cls"]["recall"]), f3(r["mapped_all"]), f3(r["true_all"]),
          signed3(r["mapped_all"] - r["true_all"]), signed3(pct(r["mapped_all"], r["true_all"])),
          signed3(pct(r["mapped_sw"], r["true_sw"])),
          rate(r["lake_flagged"], r["lake_n"]), rate(r["snow_flagged"], r["snow_n"]),
          rate(r["cloud_flagged"], r["cloud_n"])]
         for r in rows],
        "lllrrrrrrrrrrr",
    ))
    nbc = s["ndsi_by_class"]
    out += [
        "",
        "NDSI of the observed pixels per truth class (all dates): why one threshold cannot "
        "separate snow from ice in general, and why the calibrated threshold works here.",
        "",
    ]
    out.append(table(["truth class", "pixels", "5th pct", "median", "95th pct"],
                     [[k.replace("_", " "), v[0], f3(v[1]), f3(v[2]), f3(v[3])]
                      for k, v in nbc.items()]))
    base = [r for r in rows if r["kind"] == "default" and r["guards"] == "none"]
    out += [
        "",
        "### Where the errors of NDSI >= 0.4 (no guards) come from",
        "",
        "Debris-covered tongues are inside the outlines (as in RGI/GLIMS) but spectrally they "
        "are rock (NDSI above): no optical index sees them, so any NDSI map omits them and its "
        "recall against outlines stays below 1, while against the visible-ice truth they are "
        "simply not ice. Omission against the outlines, by truth class of the missed pixels:",
        "",
    ]
    out.append(table(
        ["date", "observed outline px", "missed", "debris", "clean ice", "other",
         "debris px in outlines", "QA-masked (not scored)"],
        [[r["date"], r["ev"]["tp"] + r["ev"]["fn"], r["missed_n"],
          f"{r['missed_debris']} ({r['missed_debris'] / max(r['missed_n'], 1):.3f})",
          f"{r['missed_ice']} ({r['missed_ice'] / max(r['missed_n'], 1):.3f})",
          r["missed_n"] - r["missed_debris"] - r["missed_ice"], r["outline_debris"],
          rate(r["qa_masked"], r["covered_n"])] for r in base],
        "lrrrrrrr",
    ))
    out += [
        "",
        "Commission against the ice class (snow and water left out), by truth class of the "
        "false positives. The truth labels a pixel under a cloud shadow \"cloud shadow\" whatever "
        "lies below; the mean visible-ice fraction of those false positives says how much of "
        "them is ice (the rest are other surfaces in the shadows QA_PIXEL missed: seasonal "
        "snow, lakes, dark rock).",
        "",
    ]
    out.append(table(
        ["date", "false positives", "cloud shadow (QA missed)", "their mean ice fraction",
         "rock/debris", "cloud", "mean ice fraction of mapped px"],
        [[r["date"], r["fp_n"], r["fp_shadow"],
          f3(r["fp_shadow_frac"] / r["fp_shadow"] if r["fp_shadow"] else float("nan")),
          r["fp_rock"], r["fp_cloud"], f3(r["mapped_frac_mean"])] for r in base],
        "lrrrrrr",
    ))
    out += [
        "",
        "Mapped pixels count whole, while the truth counts the sub-pixel ice fraction: mixed "
        "border pixels make the map a few per cent larger than the visible ice even where every "
        "pixel is classified right.",
        "",
        f"Against the visible-ice class (snow and water left out) the best threshold of the same "
        f"sweep is {s['t_cls']:.3f} (pooled F1 {s['f1_cls']:.3f}; {s['f1_cls_at_04']:.3f} at 0.4): "
        "for visible ice against rock the default is already optimal. The outline calibration "
        f"lands at {s['t_cal']:.3f} because that value falls between this generator's snow "
        f"(median NDSI {nbc['snow'][2]:.3f}) and ice ({nbc['ice'][2]:.3f}) spectra: it removes "
        "most seasonal snow at the cost of visible ice (recall and the snow-free area error "
        "above). That split is an artefact of the fixed procedural spectra; on real scenes snow "
        "and ice NDSI overlap (METHOD.md lists snow among NDSI's failure modes; on Athabasca the "
        "icefield and the glacier tongue form one upper histogram mode, section 3).",
    ]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# 2. real negative controls
# ----------------------------------------------------------------------------------------------


def _mtl_value(text: str, key: str) -> str:
    # The first occurrence: the Level-2 surface-reflectance block comes before the Level-1 one.
    match = re.search(rf"^\s*{key} = \"?([^\"\n]+)\"?\s*$", text, re.MULTILINE)
    if match is None:
        raise ReportError(f"the Liverpool MTL has no {key}")
    return match.group(1)


def liverpool_cube() -> Any:
    """The Liverpool crop as a georeferenced reflectance cube; the grid comes from the MTL.

    The TIFFs carry no georeference (data README); the MTL corner coordinates are pixel
    centres, which is what the x/y coordinates below are.
    """
    import rioxarray  # noqa: F401
    import xarray as xr

    folder = shared(LIVERPOOL)
    mtl = shared(LIVERPOOL, f"{LIVERPOOL_SCENE}_MTL.txt").read_text()
    res = float(_mtl_value(mtl, "GRID_CELL_SIZE_REFLECTIVE"))
    ulx = float(_mtl_value(mtl, "CORNER_UL_PROJECTION_X_PRODUCT"))
    uly = float(_mtl_value(mtl, "CORNER_UL_PROJECTION_Y_PRODUCT"))
    lines = int(_mtl_value(mtl, "REFLECTIVE_LINES"))
    samples = int(_mtl_value(mtl, "REFLECTIVE_SAMPLES"))
    epsg = 32600 + int(_mtl_value(mtl, "UTM_ZONE"))
    bands = {"green": 3, "nir08": 5, "swir16": 6}
    data = []
    for number in bands.values():
        scale = float(_mtl_value(mtl, f"REFLECTANCE_MULT_BAND_{number}"))
        offset = float(_mtl_value(mtl, f"REFLECTANCE_ADD_BAND_{number}"))
        if (scale, offset) != (2.75e-5, -0.2):
            raise ReportError(f"unexpected Liverpool SR factors, band {number}: {scale}, {offset}")
        dn = read_band(folder / f"{LIVERPOOL_SCENE}_SR_B{number}.TIF")
        if dn.shape != (lines, samples):
            raise ReportError(f"Liverpool band {number} is {dn.shape}, MTL: {(lines, samples)}")
        refl = dn.astype(np.float32) * np.float32(scale) + np.float32(offset)
        data.append(np.where(dn == 0, np.float32(np.nan), refl))  # DN 0 is fill in C2 L2
    cube = xr.DataArray(
        np.stack(data)[None],
        dims=("time", "band", "y", "x"),
        coords={"time": [np.datetime64("2020-09-27T11:00:00", "ns")], "band": list(bands),
                "y": uly - res * np.arange(lines), "x": ulx + res * np.arange(samples)},
        name="reflectance",
    ).rio.write_crs(f"EPSG:{epsg}")
    return cube.rio.write_transform(cube.rio.transform(recalc=True))


def ukis_cube(chip: str) -> tuple[Any, np.ndarray]:
    import xarray as xr

    z = np.load(shared(UKIS, f"{chip}.npz"))
    img, msk = z["img"], z["msk"][..., 0]
    names = ["blue", "green", "red", "nir08", "swir16", "swir22"]  # README band order
    cube = xr.DataArray(np.moveaxis(img, -1, 0)[None].astype(np.float32),
                        dims=("time", "band", "y", "x"), coords={"band": names}, name="reflectance")
    return cube, msk


def controls_section() -> dict[str, Any]:
    import icemap

    liv = liverpool_cube()
    valid = liv.notnull().all("band").values[0]
    liverpool = {}
    for label, kw in GUARD_CONFIGS.items():
        ice = icemap.ice_mask(liv, threshold=T_DEFAULT, **kw).values[0]
        liverpool[label] = (int((ice[valid] == 1).sum()), int(valid.sum()))
    chips: dict[str, dict[str, dict[str, tuple[int, int]]]] = {}
    for chip in ("landsat5", "sentinel2"):
        cube, msk = ukis_cube(chip)
        chips[chip] = {}
        for label, kw in GUARD_CONFIGS.items():
            ice = icemap.ice_mask(cube, threshold=T_DEFAULT, **kw).values[0]
            per = {"overall": (int((ice == 1).sum()), int(ice.size))}
            for code, name in UKIS_CLASSES.items():
                sel = msk == code
                per[name] = (int((ice[sel] == 1).sum()), int(sel.sum()))
            per["nodata"] = (int((ice == 255).sum()), int(ice.size))
            chips[chip][label] = per
    return {"liverpool": liverpool, "chips": chips}


def render_controls(c: dict[str, Any]) -> str:
    n_liv = next(iter(c["liverpool"].values()))[1]
    out = [
        "## 2. Real negative controls (no ice anywhere)",
        "",
        "A correct ice map is empty on these scenes, so every pixel flagged is a false positive. "
        f"NDSI >= {T_DEFAULT} with the default guard parameters. Cells: share flagged (pixels "
        "flagged).",
        "",
        f"### Liverpool, Landsat-8 C2 L2, 2020-09-27 ({n_liv} valid px; sea, Mersey estuary, "
        "urban, vegetation)",
        "",
        "`xlandsat_liverpool_l2sp`; the TIFFs carry no georeference, the 30 m UTM 30N grid is "
        "taken from the MTL (corner coordinates are pixel centres); reflectance = DN x 2.75e-5 - "
        "0.2, DN 0 is fill. No QA_PIXEL in the crop, so nothing is cloud-masked.",
        "",
    ]
    out.append(table(["configuration", "share of valid px flagged as ice"],
                     [[k, rate(*v)] for k, v in c["liverpool"].items()]))
    for chip, title in (("landsat5", "Landsat-5 TM chip (dark forest, cumulus)"),
                        ("sentinel2", "Sentinel-2 MSI chip (farmland, cumulus; probably TOA)")):
        per = c["chips"][chip]
        first = next(iter(per.values()))
        cols = ["overall", *UKIS_CLASSES.values()]
        out += [
            "",
            f"### ukis {title}",
            "",
            "`ukis_csmask_cloud_chips/" + chip + ".npz`, 512 x 512 px, per reference class "
            "(" + ", ".join(f"{n} {first[n][1]} px" for n in UKIS_CLASSES.values()) + "). "
            "No pixel is nodata in any configuration.",
            "",
        ]
        out.append(table(["configuration", *cols],
                         [[label, *(rate(*v[col]) for col in cols)] for label, v in per.items()]))
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# 3. Athabasca (HLS L30)
# ----------------------------------------------------------------------------------------------


def hls_item() -> dict[str, Any]:
    """A STAC item for the crop. The files' custom WKT equals EPSG:32611 (data README)."""
    from icemap.stac import item_from_files

    return item_from_files({name: shared(ATHABASCA, f"athabasca_2020229_{code}_L30.tif")
                            for name, code in ATHABASCA_BANDS.items()},
                           id="HLS.L30.athabasca.2020229.v2.0", datetime="2020-08-16T00:00:00Z",
                           collection="hls", platform="landsat-8", crs="EPSG:32611")


def athabasca_section(workdir: Path) -> dict[str, Any]:
    import icemap
    from icemap import metrics as m
    from icemap.labels import rasterize_outlines

    outline = shared(ATHABASCA, "athabasca_outline.shp")
    ds = icemap.load([hls_item()], sensor="hls", crs="EPSG:32611", bands=list(ATHABASCA_BANDS))
    store = workdir / "athabasca_cube.zarr"
    icemap.write_cube(ds, store)
    cube = icemap.open_cube(store).load()

    index = icemap.ndsi(cube).isel(time=0)
    reference = rasterize_outlines(outline, index)
    curve = m.threshold_sweep(index, reference).set_index("threshold")
    t_best = m.best_threshold(curve.reset_index())
    t_otsu, _ = m.unsupervised_threshold(index, method="otsu")
    t_valley, hist = m.unsupervised_threshold(index, method="valley")

    rows = []
    for label, t in ((f"{T_DEFAULT:.3f} (default)", T_DEFAULT),
                     (f"{t_best:.3f} (best F1 of sweep)", t_best),
                     (f"{t_otsu:.3f} (Otsu)", t_otsu), (f"{t_valley:.3f} (valley)", t_valley)):
        if t == T_DEFAULT:
            configs = GUARD_CONFIGS
        else:
            configs = {k: GUARD_CONFIGS[k] for k in ("NDSI alone", "+ water + dark")}
        for glabel, kw in configs.items():
            ice = icemap.ice_mask(cube, threshold=t, **kw).isel(time=0).compute()
            ev = m.evaluate(ice, outline)
            rows.append({"threshold": label, "t": t, "guards": glabel, "ev": ev,
                         "pred_share": (ev["tp"] + ev["fp"]) / ev["n_pixels"]})

    # What the water guard removes inside the outline, criterion by criterion.
    ref = reference.values == 1
    plain = icemap.ice_mask(cube, threshold=T_DEFAULT).isel(time=0).values == 1
    removed = {}
    for label, kw in (("with the NDWI test (NIR < 0.11 or NDWI > 0.4, `ndwi_max=0.4`)", {"ndwi_max": 0.4}),
                      ("NDWI > 0.4 only (`ndwi_max=0.4, nir_min=None`)", {"ndwi_max": 0.4, "nir_min": None}),
                      ("default: NIR < 0.11 only", {})):
        guarded = icemap.ice_mask(cube, threshold=T_DEFAULT, guards=("water",), **kw)
        guarded = guarded.isel(time=0).values
        removed[label] = plain & (guarded != 1)
    gone = removed["with the NDWI test (NIR < 0.11 or NDWI > 0.4, `ndwi_max=0.4`)"] & ref
    refl = cube["reflectance"].isel(time=0)
    green = refl.sel(band="green").values
    nir = refl.sel(band="nir08").values
    dem = read_band(shared(ATHABASCA, "athabasca_dem.tif")).astype(np.float64)
    if dem.shape != gone.shape:
        raise ReportError(f"the Athabasca DEM is {dem.shape}, the bands {gone.shape}")
    dem[dem == -32768] = np.nan
    bright = gone & (green >= 0.25)
    diag = {
        "in_outline_ndsi": int((plain & ref).sum()),
        "removed": {k: (int((v & ref).sum()), int((v & ~ref).sum())) for k, v in removed.items()},
        "gone_green": np.percentile(green[gone], [25, 50, 75]) if gone.any() else [np.nan] * 3,
        "gone_nir": np.percentile(nir[gone], [25, 50, 75]) if gone.any() else [np.nan] * 3,
        "gone_elev": np.nanpercentile(dem[gone], [5, 50, 95]) if gone.any() else [np.nan] * 3,
        "kept_elev": np.nanpercentile(dem[plain & ref & ~gone], [5, 50, 95]),
        "bright": int(bright.sum()),
        "dark": int((gone & (green < 0.15)).sum()),
        "n_gone": int(gone.sum()),
    }
    first = rows[0]["ev"]
    return {
        "rows": rows, "t_best": t_best, "t_otsu": t_otsu, "t_valley": t_valley,
        "peaks": hist.attrs.get("peaks"), "n_valid": first["n_pixels"],
        "label_share": (first["tp"] + first["fn"]) / first["n_pixels"],
        "f1_sweep_04": float(curve.loc[T_DEFAULT, "f1"]),
        "f1_sweep_02": float(curve.loc[0.2, "f1"]),
        "diag": diag,
    }


def render_athabasca(a: dict[str, Any]) -> str:
    out = [
        "## 3. Athabasca Glacier, HLS L30 (Landsat-8 OLI), 2020-08-16 (real, partial label)",
        "",
        "`athabasca_hls_l30`: 215 x 205 px at 30 m, loaded as an HLS item through `icemap.load` "
        f"(`sensor=\"hls\"`, EPSG:32611) -> `write_cube` -> `open_cube`; {a['n_valid']} valid px. "
        "Reference: the GLIMS outline of Athabasca Glacier rasterised at pixel centres "
        f"({a['label_share']:.3f} of the valid pixels, "
        f"{a['rows'][0]['ev']['reference_area_km2']:.3f} km² scored). No QA band: nothing is "
        "cloud-masked.",
        "",
    ]
    out.append(table(
        ["threshold", "guards", "F1", "precision", "recall", "kappa", "share mapped as ice",
         "ice km²", "area error %"],
        [[r["threshold"], r["guards"], f3(r["ev"]["f1"]), f3(r["ev"]["precision"]),
          f3(r["ev"]["recall"]), f3(r["ev"]["kappa"]), f3(r["pred_share"]),
          f3(r["ev"]["ice_area_km2"]), signed3(r["ev"]["area_diff_pct"])] for r in a["rows"]],
        "llrrrrrrr",
    ))
    peaks = a["peaks"] or [float("nan"), float("nan")]
    d = a["diag"]
    out += [
        "",
        f"Thresholds: `best_threshold(threshold_sweep(ndsi, outline))` = {a['t_best']:.3f}; "
        f"`unsupervised_threshold(ndsi, method=\"otsu\")` = {a['t_otsu']:.3f}; "
        f"`method=\"valley\"` = {a['t_valley']:.3f} (histogram peaks at {peaks[0]:.3f} and "
        f"{peaks[1]:.3f}). On the sweep, F1 is {a['f1_sweep_02']:.3f} at study a's 0.2 and "
        f"{a['f1_sweep_04']:.3f} at 0.4.",
        "",
        "**Read these scores with the label in mind.** The outline covers Athabasca Glacier only. "
        "The rest of the Columbia Icefield in the crop (Dome Glacier, the Snow Dome plateau, the "
        "ice on Mt Athabasca and Andromeda) is real ice but labelled \"not glacier\", so a correct "
        "detector shows many false positives here: precision (and with it F1 and kappa) is a "
        "lower bound, and the area error mostly measures the unlabelled ice. Recall is the "
        "meaningful number: the share of the labelled glacier that NDSI finds. Near the terminus "
        "the outline (attribute 1984, probably its year) extends over ground the tongue has "
        "since left, which caps recall below 1. The \"best\" sweep threshold is therefore not a "
        "calibration of NDSI: it is the threshold that drops the most unlabelled pixels of "
        "intermediate NDSI for the fewest labelled ones. Complete labels for this crop were "
        "not found offline (data README).",
        "",
        "### What the water guard removes on the glacier",
        "",
        f"Inside the outline NDSI >= 0.4 finds {d['in_outline_ndsi']} px. Pixels that the water "
        "guard turns from ice into not-ice, inside and outside the outline:",
        "",
    ]
    out.append(table(["water guard criterion", "inside outline", "outside outline"],
                     [[k, f"{v[0]} ({v[0] / max(d['in_outline_ndsi'], 1):.3f})", v[1]]
                      for k, v in d["removed"].items()], "lrr"))
    g, n, e, k = d["gone_green"], d["gone_nir"], d["gone_elev"], d["kept_elev"]
    out += [
        "",
        f"The glacier pixels the guard with the NDWI test removes have green {g[0]:.3f} / {g[1]:.3f} / "
        f"{g[2]:.3f} and NIR {n[0]:.3f} / {n[1]:.3f} / {n[2]:.3f} (quartiles), {d['bright']} of "
        f"them with green >= 0.25, and lie at {e[0]:.0f} / {e[1]:.0f} / {e[2]:.0f} m "
        f"(5th / 50th / 95th percentile; the NDSI ice the guard keeps: {k[0]:.0f} / {k[1]:.0f} / "
        f"{k[2]:.0f} m). Most are bright pixels low on the glacier, by brightness and position "
        "bare ablation-zone ice of the tongue; their NIR is far below the 0.30 that the "
        "textbook clean-ice spectra assume, so their "
        f"NDWI exceeds 0.4. {d['dark']} of the {d['n_gone']} have green < 0.15 (water, shadow or "
        "dirty ice).",
    ]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# discussion, header, main
# ----------------------------------------------------------------------------------------------


def render_discussion(s: dict[str, Any], c: dict[str, Any], a: dict[str, Any]) -> str:
    rows = s["rows"]

    def pick(kind: str, guards: str) -> list[dict[str, Any]]:
        return [r for r in rows if r["kind"] == kind and r["guards"] == guards]

    plain, guarded = pick("default", "none"), pick("default", "water + dark")
    cal = pick("calibrated", "none")

    def span(vals: Sequence[float], fmt: str = "{:.3f}") -> str:
        lo, hi = min(vals), max(vals)
        a, b = fmt.format(lo), fmt.format(hi)
        return a if a == b else f"{a} to {b}"

    def pooled(rs: Sequence[dict[str, Any]], key: str) -> float:
        return sum(r[f"{key}_flagged"] for r in rs) / max(sum(r[f"{key}_n"] for r in rs), 1)

    liv, l5, s2 = c["liverpool"], c["chips"]["landsat5"], c["chips"]["sentinel2"]

    def share(v: tuple[int, int]) -> str:
        return f"{v[0] / v[1]:.3f}"

    ath = {(r["t"], r["guards"]): r["ev"] for r in a["rows"]}
    a0 = ath[(T_DEFAULT, "NDSI alone")]
    ad, awd = ath[(T_DEFAULT, "+ dark")], ath[(T_DEFAULT, "+ water + dark")]
    andwi = ath[(T_DEFAULT, "+ water with NDWI test (`ndwi_max=0.4`) + dark")]
    ndwi_label = "+ water with NDWI test (`ndwi_max=0.4`) + dark"
    debris_share = (sum(r["missed_debris"] for r in plain)
                    / max(sum(r["missed_n"] for r in plain), 1))
    nl = s["default_lakes"]
    cloud_flagged = sum(r["cloud_flagged"] for r in plain)
    cloud_n = sum(r["cloud_n"] for r in plain)
    return "\n".join([
        "## 4. What this means for users",
        "",
        "- **Visible clean ice is mapped well at the default 0.4.** On the sample region, scored "
        "against the visible-ice truth with snow and water left out, F1 is "
        f"{span([r['cls']['f1'] for r in plain])} per date and the mapped area is "
        f"{span([pct(r['mapped_sw'], r['true_sw']) for r in plain], '{:+.3f}')} % off the visible "
        "ice (mixed border pixels count whole). Study a reported F1 0.87 and +2.68 % area for its "
        "NDSI baseline on real outlines (METHOD.md); the procedural region is easier than a real "
        "scene, so read its numbers as an upper bound.",
        "- **Against glacier outlines, two errors mix.** At 0.4 the recall against the outlines is "
        f"{span([r['ev']['recall'] for r in plain])}: {debris_share:.3f} of the outline pixels "
        "NDSI misses are debris-covered ice, which looks like rock to any optical index. At the "
        "same time the mapped area is "
        f"{span([r['ev']['area_diff_pct'] for r in plain], '{:+.3f}')} "
        "% larger than the outlines, because NDSI also maps seasonal snow "
        f"({pooled(plain, 'snow'):.3f} of the observed snow pixels), much of it outside them; F1 "
        f"{span([r['ev']['f1'] for r in plain])}. If your reference is an inventory with "
        "debris-covered glaciers, expect the omission from any NDSI map and do not tune the "
        "threshold to chase it.",
        "- **Seasonal snow is the largest commission error on glacier scenes, and no guard "
        "removes it.** Over all observed pixels the map is "
        f"{span([pct(r['mapped_all'], r['true_all']) for r in plain], '{:+.3f}')} % larger than "
        "the visible ice. Choose end-of-ablation-season scenes with the least snow (METHOD.md) "
        "or compare dates. The sample region's calibrated threshold "
        f"({s['t_cal']:.3f}) cuts the snow to {pooled(cal, 'snow'):.3f} only because the "
        "generator's snow and ice spectra differ by a fixed NDSI step; it also loses visible ice "
        f"(recall {span([r['cls']['recall'] for r in cal])}, snow-free area "
        f"{span([pct(r['mapped_sw'], r['true_sw']) for r in cal], '{:+.3f}')} %). Do not carry a "
        "threshold calibrated this way to real scenes.",
        "- **Turn on `guards=(\"water\", \"dark\")` wherever there is water or dark ground.** "
        f"NDSI >= 0.4 alone flags {share(liv['NDSI alone'])} of the Liverpool crop (sea and "
        f"estuary), {share(l5['NDSI alone']['water'])} / {share(s2['NDSI alone']['water'])} of "
        "the water pixels of the Landsat-5 / Sentinel-2 chips and "
        f"{pooled(plain, 'lake'):.3f} of the sample region's lake pixels; with both guards "
        f"{share(liv['+ water + dark'])}, {share(l5['+ water + dark']['water'])} / "
        f"{share(s2['+ water + dark']['water'])} and {pooled(guarded, 'lake'):.3f}. On the "
        "sample region they cost little visible ice (recall against the ice class "
        f"{span([r['cls']['recall'] for r in plain])} without, "
        f"{span([r['cls']['recall'] for r in guarded])} with).",
        "- **Why the water guard tests only the NIR by default.** An NDWI test (NDWI > 0.4 is "
        "water) also catches turbid lakes, but on real bare glacier ice it is too strict: on "
        f"Athabasca, water + dark guards with the NDWI test give recall {andwi['recall']:.3f} "
        f"(F1 {andwi['f1']:.3f}) against {awd['recall']:.3f} (F1 {awd['f1']:.3f}) with the NIR "
        "test alone, because bright, wet bare ice on the tongue has NDWI above 0.4. The NIR test "
        "alone removes the water of every negative control (Liverpool "
        f"{share(liv['+ water + dark'])}, water pixels {share(l5['+ water + dark']['water'])} / "
        f"{share(s2['+ water + dark']['water'])}, sample-region lakes {nl[0] / max(nl[1], 1):.3f}"
        f"; with the NDWI test {share(liv[ndwi_label])}, {share(l5[ndwi_label]['water'])} / "
        f"{share(s2[ndwi_label]['water'])}), at a sample-region visible-ice recall of "
        f"{s['both_recall']:.3f} ({s['with_ndwi_recall']:.3f} with the NDWI test). Switch the "
        "NDWI test on (`ndwi_max=0.4`) only for sediment-laden lakes, after checking your bare "
        "ice stays below it.",
        "- **Cloud shadow over dark ground is the other real false positive**: "
        f"{share(l5['NDSI alone']['cloud shadow'])} of the Landsat-5 chip's shadow pixels "
        f"(forest), {share(l5['+ dark']['cloud shadow'])} with the dark guard. Keep QA_PIXEL "
        "masking on (the default of `icemap.load`): it removes the shadows Fmask finds; the "
        "guards remove the dark pixels among those it misses (false positives under QA-missed "
        f"cloud shadow on the sample region: {sum(r['fp_shadow'] for r in plain)} without, "
        f"{sum(r['fp_shadow'] for r in guarded)} with water + dark; what passes both is bright "
        "in green and NIR and dark in the SWIR, i.e. snow or ice in shadow). The price of the "
        "brightness tests is ice in cloud or deep terrain shadow, which is as dark as the false "
        "positives: on Athabasca "
        f"the dark guard alone moves recall from {a0['recall']:.3f} to {ad['recall']:.3f} (and "
        f"precision from {a0['precision']:.3f} to {ad['precision']:.3f}).",
        "- **Clouds are rarely flagged** at 0.4 (cumulus stays bright in the SWIR): "
        f"{cloud_flagged} of {cloud_n} observed cloud pixels on the sample region, "
        f"{share(l5['NDSI alone']['cloud'])} / {share(s2['NDSI alone']['cloud'])} of the cloud "
        "pixels of the two chips.",
        "- **Thresholds.** 0.4 is a sound default (the best threshold against visible ice on the "
        f"sample region is {s['t_cls']:.3f}). Calibrate (`icemap calibrate`, or `threshold_sweep` "
        "+ `best_threshold`) only against a complete, debris-free reference: against a partial "
        f"one (Athabasca: {a['t_best']:.3f}) or one with debris and snow (the sample outlines: "
        f"{s['t_cal']:.3f}) the F1 optimum describes the label, not the ice. The histogram "
        f"thresholds need no reference and land near 0.4 on a bimodal scene (Athabasca: Otsu "
        f"{a['t_otsu']:.3f}, valley {a['t_valley']:.3f}).",
        "- **Failure modes these data do not cover**: bright salt flats (METHOD.md; the `dem` "
        "guard with a regional `elevation_min_m` is the tool), and real snow/ice mixtures beyond "
        "one crop.",
    ])


def git_revision() -> str | None:
    try:
        def git(*cmd: str) -> str:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()

        rev = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}{' (with uncommitted changes)' if dirty else ''}" if rev else None


def command_line(argv: Sequence[str]) -> str:
    return shlex.join(["python", "benchmarks/ndsi_report.py", *argv])


def render(args_argv: Sequence[str], started: dt.datetime, timings: dict[str, float],
           s: dict[str, Any], c: dict[str, Any], a: dict[str, Any]) -> str:
    import icemap

    rev = git_revision()
    total = sum(timings.values())
    head = [
        "# NDSI ice mapping: measured results",
        "",
        "<!-- Generated by benchmarks/ndsi_report.py; edit the script, not this page. -->",
        "",
        f"- Generated: {started:%Y-%m-%d %H:%M} UTC, in {total:.1f} s "
        f"(sample region {timings['sample']:.1f} s, negative controls {timings['controls']:.1f} s, "
        f"Athabasca {timings['athabasca']:.1f} s)",
        f"- Machine: {platform.platform()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        f"- icemap {icemap.__version__}" + (f", commit {rev}" if rev else ""),
        "- Data: the sample region is generated by icemap; the real data are in `../shared/data` "
        "(see each folder's README for source, license and caveats).",
        "",
        "Reproduce from the repository root, with `../shared/data` beside it:",
        "",
        "```bash",
        command_line(args_argv),
        "```",
        "",
        "NDSI = (green - swir16) / (green + swir16), negative reflectances clipped to 0; a pixel "
        "is ice when NDSI >= threshold (`icemap.ice_mask`). Numbers are rounded to 3 decimals. "
        "Kappa is Cohen's kappa; area error % = 100 x (mapped - reference) / reference.",
        "",
    ]
    body = [render_sample(s), "", render_controls(c), "", render_athabasca(a), "",
            render_discussion(s, c, a), ""]
    return "\n".join(head + body)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="Markdown file to write, relative to the repository root unless "
                             "absolute (default docs/ndsi-results.md)")
    parser.add_argument("--size", type=int, default=512,
                        help="sample region edge in pixels (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="sample region seed (default 0)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the generated region and cubes here (default: a temporary "
                             "folder, removed at the end)")
    args = parser.parse_args(argv)

    import dask

    try:
        shared()  # fail early with a clear message when ../shared/data is missing
        for part in (ATHABASCA, LIVERPOOL, UKIS):
            shared(part)
        started = dt.datetime.now(dt.timezone.utc)
        timings: dict[str, float] = {}
        with dask.config.set(scheduler="threads", num_workers=min(2, os.cpu_count() or 1)), \
                tempfile.TemporaryDirectory(prefix="icemap-ndsi-report-") as tmp:
            work = Path(args.workdir) if args.workdir else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            s = sample_section(work, args.size, args.seed)
            timings["sample"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            c = controls_section()
            timings["controls"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            a = athabasca_section(work)
            timings["athabasca"] = time.perf_counter() - t0
    except ReportError as exc:
        print(f"ndsi_report: {exc}", file=sys.stderr)
        return 2

    text = render(argv, started, timings, s, c, a)
    out = args.out if args.out.is_absolute() else REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    from icemap._atomic import atomic_write_text

    atomic_write_text(out, text)
    print(f"wrote {out} in {sum(timings.values()):.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
