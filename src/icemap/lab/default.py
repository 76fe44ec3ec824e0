"""icemap's shipped default U-Net: where it lives, how it was trained, and how it is retrained.

``icemap map --method unet`` without ``--model`` (and :func:`icemap.predict` without a model)
runs the checkpoint in ``icemap/models/default`` (package data: ``model.safetensors`` in
float16 + ``model.json``). It reads only the bands Landsat C2 L2, HLS and Sentinel-2 cubes
all have (blue, green, red, nir08, swir16, swir22) plus NDSI and NDWI computed from them, so it
runs on every cube icemap makes, without a DEM.

Training is one command anyone can rerun (seeds, region, chips, augmentation and the weights'
sha256 end up in ``model.json``'s ``training`` block)::

    python -m icemap.lab.default train --out DIR [--work DIR] [--epochs N]

The data is icemap's procedural sample region (:func:`icemap.sample.make_sample_region`, its
"seasonal" surface: snow-covered accumulation areas above a moving snowline, real spectra),
labelled per date with the glaciers and the snow off them (:func:`visible_ice_labels`: what
an optical method can call ice), widened where real scenes differ from it by augmenting every
training batch
(:class:`SpectralAugment`): per-band gains and offsets of the size of the differences
between Landsat, HLS and Sentinel-2 band responses and of TOA versus surface reflectance,
illumination changes and smooth terrain-shading fields, haze (additive path radiance, strongest
in blue), and sensor noise. The sample region itself supplies terrain shading, lakes, seasonal
snow, debris cover, clouds and shadows; the chips add hard negatives (water, shadow, snow,
cloud windows) and random windows. How it scores on the real data beside NDSI is
docs/default-model.md (:func:`real_data_scores` recomputes the table).

Finding the shipped model (:func:`default_model_dir`, :func:`resolve_model`) lives in
:mod:`icemap.model.packaged`, which :mod:`icemap.infer` imports; nothing here imports torch at
module level.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import rasterio
import rioxarray  # noqa: F401  (registers .rio)
import xarray as xr
from rasterio import features
from shapely.geometry import shape

from icemap.model.item import describe_model
from icemap.errors import IcemapError, ModelError
from icemap.guards import DarkGuard, WaterGuard
from icemap.infer import ModelRef, _run_batches, predict
from icemap.kernels import ICE_NODATA, normalized_difference, probability_mask
from icemap.lab.augment import SpectralAugment
from icemap.load import load
from icemap.metrics import evaluate
from icemap.model.checkpoint import read_metadata, save_checkpoint, write_metadata
from icemap.model.inputs import Normalisation, normalise
from icemap.model.packaged import DEFAULT_NAME, default_model_dir, resolve_model
from icemap.sample import CLASS_CODES, SampleRegion, make_sample_region
from icemap.stac import item_from_files, search
from icemap.workflow import ingest

__all__ = [
    "CHANNELS",
    "CHIP_SETTINGS",
    "DEFAULT_NAME",
    "REGION",
    "TRAIN_SETTINGS",
    "SpectralAugment",
    "default_model_dir",
    "main",
    "point_scores",
    "point_sites",
    "point_spectra",
    "point_unet_probability",
    "points_markdown",
    "real_data_scores",
    "resolve_model",
    "scores_markdown",
    "sites_markdown",
    "train_default",
    "visible_ice_labels",
]

#: Input channels: the six bands every icemap cube has, and two indices computed from them.
CHANNELS: tuple[str, ...] = ("blue", "green", "red", "nir08", "swir16", "swir22", "ndsi", "ndwi")
_BANDS = CHANNELS[:6]
#: The training region (procedural; the same parameters give byte-identical files). The
#: "seasonal" surface gives glaciers a snowline that moves between dates and years (snow and
#: firn above it, bare ice below, debris on some tongues), real per-class spectra, and fresh snow
#: on glacier and ground alike on about one date in four.
REGION: dict[str, Any] = {"size": 1024, "n_dates": 4, "seed": 7, "surface": "seasonal"}
#: Chip settings: glacier-centred windows plus hard negatives (water, shadow, snow, cloud) and
#: random windows, so most of what the model sees around glaciers is not ice.
CHIP_SETTINGS: dict[str, Any] = {"chip_size": 96, "n_hard_negative": 32, "n_random": 16,
                                 "overlap": "independent", "split_iterations": 300}
#: The U-Net and optimisation: small (0.5 M parameters, about 1 MB in float16), Dice + BCE
#: (BCE keeps the hard-negative chips, which have no ice, in the gradient). Three seeds, the
#: best validation F1 kept. Threshold: the highest whose validation F1 is within 0.005 of the
#: best. With snow labelled ice, the synthetic validation F1 is flat (0.985-0.992 over the
#: seeds tried) from 0.05 to 0.95, so its best point is arbitrary; the top of the plateau is the choice that flags least
#: of what the generator lacks (dark hazy water, deep shade), which is what moved the real
#: water and shadow controls from seed to seed (docs/default-model.md, runs H).
TRAIN_SETTINGS: dict[str, Any] = {"depth": 4, "base": 8, "epochs": 40, "patience": 10, "loss": "dice+bce",
                                  "optimizer": "adam", "lr": 0.005, "normalisation": "percentile",
                                  "threshold": "tune", "threshold_tolerance": 0.005, "restarts": 3,
                                  "batch_size": 8, "seed": 0, "mask": "original"}

# ----------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------

# SpectralAugment lives in icemap.lab.augment (``icemap train --augment spectral`` uses it too);
# it is re-exported here, where the default model's recipe names it.


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def _region_cube(work: Path, region: dict[str, Any]) -> tuple[Path, SampleRegion]:
    reg = make_sample_region(work / "region", **region)
    cube = work / "cube.zarr"
    s = search(str(reg.catalog), collections=reg.collection, bbox=reg.bbox)
    ingest(s, cube, bands=list(_BANDS), chunksize=256)  # resumes: a rerun skips finished dates
    return cube, reg


def visible_ice_labels(region: SampleRegion, out: str | os.PathLike[str]) -> Path:
    """Per-date labels of what an optical method can call ice: the glaciers and that date's snow off them.

    Every date of ``region`` gets the glacier outlines (snow-covered accumulation areas,
    bare ice and debris tongues alike, as inventories draw them) plus the pixels whose truth
    class is snow or clean ice outside the outlines, vectorised (one polygon per patch), in a
    ``date`` column (``YYYY-MM-DD``) for ``label_time="date"``. Written as a GeoPackage,
    layer ``labels``; returns its path.

    Why snow off the glaciers is labelled ice: from reflectance and a few hundred metres of
    context, a wide snow field looks the same on a glacier's accumulation area and beside it.
    Labelled "glacier" on one side of an outline and "ground" on the other (runs E-G in
    docs/default-model.md), the network learnt that wide snow is ground and missed the
    snow-covered half of real glaciers. Labelled like this it maps glacier snow as NDSI does
    and is left to learn what NDSI cannot: water, shadow, cloud and dark ice. Seasonal snow
    is then separated the way the field does it, by mapping end-of-summer scenes and seasonal
    composites and by intersecting with outlines, not by the network.
    """
    glaciers = gpd.read_file(region.outlines, layer="glaciers")
    with rasterio.open(region.glacier_ids) as src:
        on_glacier = src.read(1) > 0
        transform, crs = src.transform, src.crs
    snow_codes = [CLASS_CODES["snow"], CLASS_CODES["ice"]]
    rows: list[dict[str, Any]] = []
    for date in region.dates:
        with rasterio.open(region.truth(date)) as src:
            off = ~on_glacier & np.isin(src.read(1), snow_codes)
        rows += [{"date": date, "glacier_id": g.glacier_id, "kind": "glacier", "geometry": g.geometry}
                 for g in glaciers.itertuples()]
        patches = features.shapes(off.astype(np.uint8), mask=off, transform=transform, connectivity=4)
        rows += [{"date": date, "glacier_id": f"SNOW-{date}-{k:05d}", "kind": "snow off glaciers",
                  "geometry": shape(geom)} for k, (geom, _) in enumerate(patches, 1)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    gpd.GeoDataFrame(rows, geometry="geometry", crs=crs).to_file(out, layer="labels", driver="GPKG")
    return out


def train_default(out: str | os.PathLike[str], *, work: str | os.PathLike[str] | None = None,
                  epochs: int | None = None, region: dict[str, Any] | None = None,
                  chips: dict[str, Any] | None = None, settings: dict[str, Any] | None = None,
                  augment: SpectralAugment | None = None, quiet: bool = False,
                  real_data: str | os.PathLike[str] | None = None) -> Path:
    """Train the default model from scratch and write it (float16 weights) to ``out``.

    Parameters
    ----------
    out
        Model folder (``model.safetensors``, ``model.json``, ``training/``); copy the first two
        to ``src/icemap/models/default`` to ship it.
    work
        Folder for the generated region and its cube (default ``out/work``); reused on reruns.
    epochs, region, chips, settings, augment
        Overrides of :data:`TRAIN_SETTINGS` (``epochs``), :data:`REGION`, :data:`CHIP_SETTINGS`,
        :data:`TRAIN_SETTINGS` and the augmentation, for quick trial runs.
    real_data
        The real data folder (``../shared/data``): the restart and its threshold are then chosen
        on its selection set (:func:`select_on_real_data`), as the shipped model's were. ``None``
        keeps training's choices on synthetic validation chips (trial runs).
    """
    import torch

    from icemap.lab.train import TrainConfig, prepare_data, train

    t0 = time.perf_counter()
    out = Path(out)
    work = Path(work) if work is not None else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    region = dict(REGION, **(region or {}))
    chips = dict(CHIP_SETTINGS, **(chips or {}))
    settings = dict(TRAIN_SETTINGS, **(settings or {}))
    if epochs is not None:
        settings["epochs"] = int(epochs)
    augment = augment or SpectralAugment()
    cube, reg = _region_cube(work, region)
    # Chips are cut around the glaciers and split by glacier; the labels burnt into them are
    # each date's glaciers and snow off them (visible_ice_labels says why).
    labels = visible_ice_labels(reg, work / "labels.gpkg")
    t_data = time.perf_counter() - t0
    config = TrainConfig(inputs=",".join(CHANNELS), chip_size=chips["chip_size"], overlap=chips["overlap"],
                         n_random=chips["n_random"], n_hard_negative=chips["n_hard_negative"],
                         split_iterations=chips["split_iterations"], device="cpu", label_time="date", **settings)
    data = prepare_data(cube, reg.outlines, chip_size=config.chip_size, overlap=config.overlap,
                        n_random=config.n_random, n_hard_negative=config.n_hard_negative,
                        min_valid=config.min_valid, split_seed=config.effective_split_seed,
                        split_iterations=config.split_iterations, channels=config.channels,
                        label_time=config.label_time, labels=labels)
    result = train(cube, labels, out, config, data=data, quiet=quiet, title="default model",
                   augment_batch=augment)
    # Ship float16 weights: half the size, and the scores in the docs are measured on them
    # (the loaded model runs in float32 after an exact widening of the stored halves).
    meta = read_metadata(out)
    meta.training.update({
        "recipe": "python -m icemap.lab.default train --out DIR",
        "cube": "generated: make_sample_region(**region), ingested with the six common bands",
        "outlines": "the region's glaciers.gpkg (chips and split)",
        "labels": "visible_ice_labels(region): per date, the glaciers and the snow off them",
        "region": region, "chip_settings": chips, "train_settings": settings,
        "augmentation": augment.to_dict(), "weights_dtype": "float16",
        "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
        # The instruction set torch's and numpy's kernels ran with: a run is reproducible (same
        # sha256) on the same one; AVX2 and AVX-512 hosts sum in other orders, from the
        # generated region on (docs/default-model.md).
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "seconds_data": round(t_data, 1), "seconds_total": round(time.perf_counter() - t0, 1),
    })
    # Each restart's folder relative to the model folder: the record ships inside the package.
    meta.training["restarts"] = [dict(r, folder=os.path.relpath(r["folder"], out))
                                 for r in meta.training.get("restarts", [])]
    model = result.model.half()
    save_checkpoint(model, meta, out)
    if real_data is not None:
        select_on_real_data(out, real_data, work)  # on float16 weights, as every score is
    describe_model(out)  # its STAC Item again: the weights changed
    return out


# ----------------------------------------------------------------------------------------------
# Real-data scores
# ----------------------------------------------------------------------------------------------

_HLS = {"blue": "B02", "green": "B03", "red": "B04", "nir08": "B05", "swir16": "B06", "swir22": "B07"}
_L8 = {"blue": "B2", "green": "B3", "red": "B4", "nir08": "B5", "swir16": "B6", "swir22": "B7"}
#: Liverpool's water: McFeeters NDWI (green vs NIR) above 0. The crop has no ice and no snow,
#: and land (vegetation, city) has NIR above green, so NDWI > 0 is its sea, estuary and docks.
LIVERPOOL_WATER_NDWI = 0.0
#: ukis chip classes (data README): 0 cloud shadow, 1 water, 3 clear land, 4 cloud.
_UKIS_CLASSES = {"shadow": 0, "water": 1, "land": 3, "cloud": 4}


def _athabasca(root: Path) -> Any:
    d = root / "athabasca_hls_l30"
    item = item_from_files({n: d / f"athabasca_2020229_{c}_L30.tif" for n, c in _HLS.items()},
                           id="HLS.L30.athabasca.2020229.v2.0", datetime="2020-08-16T00:00:00Z",
                           collection="hls", platform="landsat-8", crs="EPSG:32611")
    return load([item], sensor="hls", crs="EPSG:32611", bands=list(_HLS)).compute()


def _liverpool(root: Path) -> Any:
    """The Liverpool crop as a cube; its georeference is only in the MTL (data README)."""
    d = root / "xlandsat_liverpool_l2sp"
    stem = "LC08_L2SP_204023_20200927_20201006_02_T1"
    bands = []
    for code in _L8.values():
        with rasterio.open(d / f"{stem}_SR_{code}.TIF") as src:
            dn = src.read(1)
        r = dn.astype(np.float32) * np.float32(2.75e-5) - np.float32(0.2)
        bands.append(np.where(dn == 0, np.nan, r).astype(np.float32))
    h, w = bands[0].shape
    # MTL corner coordinates are pixel centres: UL centre (487020, 5929980), 30 m, EPSG:32630.
    x = 487020.0 + 30.0 * np.arange(w)
    y = 5929980.0 - 30.0 * np.arange(h)
    da = xr.DataArray(np.stack(bands)[None], dims=("time", "band", "y", "x"),
                      coords={"time": [np.datetime64("2020-09-27")], "band": list(_L8), "y": y, "x": x})
    return xr.Dataset({"reflectance": da}).rio.write_crs("EPSG:32630")


def _ukis(root: Path, name: str) -> tuple[Any, np.ndarray]:
    """A ukis cloud chip as a cube on a dummy 30 m UTM grid (the chips have no georeference)."""
    z = np.load(root / "ukis_csmask_cloud_chips" / f"{name}.npz")
    img = np.moveaxis(z["img"].astype(np.float32), -1, 0)  # blue, green, red, nir, swir16, swir22
    h, w = img.shape[1:]
    da = xr.DataArray(img[None], dims=("time", "band", "y", "x"),
                      coords={"time": [np.datetime64("2020-01-01")], "band": list(_BANDS),
                              "y": 5_000_000.0 - 30.0 * np.arange(h), "x": 500_000.0 + 30.0 * np.arange(w)})
    return xr.Dataset({"reflectance": da}).rio.write_crs("EPSG:32633"), z["msk"][..., 0]


#: The hand-labelled point spectra (rgi_benchmark_glacier_spectra): name -> (file, band columns
#: in the order of the six common bands, offset to add, classes). The Landsat files store
#: DN * 2.75e-5 without Collection 2's -0.2 offset; Sentinel-2 SR (2019-2021, before baseline
#: 04.00) has none. The training files (four glaciers) label snow, shadowed snow, ice, rock/debris
#: and water; the validation files (two other glaciers) snow / not snow, and the Sentinel-2 one
#: has no B12 (swir22), so the U-Net, which reads it, is not scored there.
_TRAINING_CLASSES = {1: "snow", 2: "shadowed snow", 3: "ice", 4: "rock/debris", 5: "water"}
_VALIDATION_CLASSES = {1: "snow", 0: "not snow"}
POINT_FILES: dict[str, tuple[str, tuple[str | None, ...], float, dict[int, str]]] = {
    "landsat": ("Landsat_training_data.csv", ("SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7"), -0.2,
                _TRAINING_CLASSES),
    "sentinel2": ("Sentinel-2_SR_training_data.csv", ("B2", "B3", "B4", "B8A", "B11", "B12"), 0.0,
                  _TRAINING_CLASSES),
    "landsat validation": ("Landsat_manually_classified_points.csv",
                           ("SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7"), -0.2, _VALIDATION_CLASSES),
    "sentinel2 validation": ("Sentinel-2_SR_manually_classified_points.csv", ("B2", "B3", "B4", "B8A", "B11", None),
                             0.0, _VALIDATION_CLASSES),
}
#: Side of the uniform field a point's spectrum fills for the U-Net: a whole-array pass on a
#: 32 x 32 cube (a multiple of 2**depth, so nothing is padded).
POINT_FIELD = 32


def _point_rows(data_root: str | os.PathLike[str]) -> dict[str, list[dict[str, str]]]:
    """The rows of every :data:`POINT_FILES` file, read once: ``{set: rows}``."""
    out: dict[str, list[dict[str, str]]] = {}
    for name, (fname, _, _, _) in POINT_FILES.items():
        path = Path(data_root) / "rgi_benchmark_glacier_spectra" / fname
        if not path.is_file():
            raise IcemapError(f"{path} is missing; pass the folder that holds rgi_benchmark_glacier_spectra/ "
                              "(score --data DIR)")
        with open(path, newline="") as f:
            out[name] = list(csv.DictReader(f))
    return out


def point_spectra(data_root: str | os.PathLike[str],
                  rows: dict[str, list[dict[str, str]]] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The real labelled pixels as reflectance: ``{set: (refl (N, 6), class (N,))}``.

    Bands are the six common bands (:data:`CHANNELS`' first six), corrected to surface
    reflectance as the data README says (Landsat - 0.2); a band a file lacks (or a blank cell)
    is NaN. Sets and classes are :data:`POINT_FILES`. ``rows`` are the files already read.
    """
    rows = rows if rows is not None else _point_rows(data_root)

    def num(r: dict[str, str], c: str | None) -> float:
        v = r.get(c, "") if c else ""
        return float(v) if v not in ("", "nan", "NaN") else np.nan

    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, (_, cols, offset, _) in POINT_FILES.items():
        refl = np.array([[num(r, c) for c in cols] for r in rows[name]], dtype=np.float32) + np.float32(offset)
        cls = np.array([int(float(r["class"])) for r in rows[name]], dtype=np.int16)
        out[name] = (refl, cls)
    return out


def point_sites(data_root: str | os.PathLike[str],
                rows: dict[str, list[dict[str, str]]] | None = None) -> dict[str, np.ndarray]:
    """The glacier each real labelled pixel was taken at: ``{set: site names (N,)}``, in the
    order of :func:`point_spectra` (the files' ``site_name`` column)."""
    rows = rows if rows is not None else _point_rows(data_root)
    return {name: np.array([r["site_name"] for r in rows[name]]) for name in POINT_FILES}


def _point_channels(refl: np.ndarray) -> np.ndarray:
    """``(N, 6)`` reflectance -> ``(N, 8)`` model channels (NDSI and NDWI as the cube path
    computes them: :func:`icemap.kernels.normalized_difference` on the bands)."""
    g, n, s = refl[:, 1], refl[:, 3], refl[:, 4]
    return np.concatenate([refl, normalized_difference(g, s)[:, None], normalized_difference(g, n)[:, None]],
                          axis=1).astype(np.float32)


def point_unet_probability(refl: np.ndarray, model: str | os.PathLike[str] | None = None,
                           batch_size: int = 64) -> np.ndarray:
    """The U-Net's ice probability for a uniform ``POINT_FIELD``-pixel field of each spectrum.

    A point has no spatial context; a uniform field is the U-Net's answer for "a wide area of
    this surface", through the same normalisation and network batches as
    :func:`icemap.infer.predict_array` (the centre pixel is returned). NaN where an input
    channel is undefined (a missing band, or NDSI/NDWI of two non-positive bands), as the
    cube path leaves such pixels nodata.
    """
    folder = resolve_model(model)
    meta = read_metadata(folder)
    if tuple(meta.channels) != CHANNELS:
        raise ModelError(f"model {folder} reads {list(meta.channels)}; the point fields are built for the default "
                         f"model's inputs {list(CHANNELS)}")
    norm = Normalisation.from_dict(meta.normalisation)
    z, nodata = normalise(_point_channels(refl)[:, :, None, None], norm, channel_axis=1)
    net = ModelRef.from_path(folder).load("cpu")
    c = POINT_FIELD // 2
    windows = [np.broadcast_to(z[i], (z.shape[1], POINT_FIELD, POINT_FIELD)).copy() for i in range(len(z))]
    probs, _ = _run_batches(net, windows, "cpu", batch_size, False, 0)
    p = np.array([pr[c, c] for pr in probs], dtype=np.float32)
    p[nodata[:, 0, 0]] = np.nan
    return p


def point_scores(data_root: str | os.PathLike[str], model: str | os.PathLike[str] | None = None,
                 unet: bool = True) -> dict[str, Any]:
    """Share of each real class called ice by NDSI 0.4, NDSI 0.4 + guards and the U-Net.

    Returns ``{set: {method: {class name: share}}, "pixels": {set: {method: {class: n}}},
    "by_site": {set: {site: {method: {class: share}}}}, "site_pixels": {set: {site: {method:
    {class: n}}}}}``: the share of the class's points a method calls ice, of those it can
    decide (NDSI needs green and swir16; the U-Net all six bands), per point set and per
    glacier of each set. The U-Net row is the default model (or ``model``) at its threshold on
    uniform fields (:func:`point_unet_probability`); ``unet=False`` leaves it out.
    """
    from icemap.kernels import ice_mask

    guards: dict[str, Any] = {**WaterGuard().kernel_params(), **DarkGuard().kernel_params()}  # --guards water,dark
    threshold = read_metadata(resolve_model(model)).threshold if unet else None
    out: dict[str, Any] = {"pixels": {}, "by_site": {}, "site_pixels": {}}
    rows = _point_rows(data_root)
    sites = point_sites(data_root, rows)
    for name, (refl, cls) in point_spectra(data_root, rows).items():
        classes = POINT_FILES[name][3]
        g, n, s = refl[:, 1], refl[:, 3], refl[:, 4]
        calls: dict[str, np.ndarray] = {"NDSI 0.4": ice_mask(g, s, 0.4),
                                        "NDSI 0.4 + guards": ice_mask(g, s, 0.4, nir08=n, **guards)}
        if unet and np.isfinite(refl).all(axis=1).any():
            p = point_unet_probability(refl, model)
            calls["default U-Net"] = np.where(np.isfinite(p), (p >= threshold).astype(np.uint8), ICE_NODATA)
        out[name], out["pixels"][name] = _shares(calls, cls, classes, np.ones(len(cls), bool))
        out["by_site"][name], out["site_pixels"][name] = {}, {}
        for site in sorted(set(sites[name])):
            out["by_site"][name][site], out["site_pixels"][name][site] = _shares(calls, cls, classes,
                                                                                 sites[name] == site)
    return out


def _shares(calls: dict[str, np.ndarray], cls: np.ndarray, classes: dict[int, str],
            where: np.ndarray) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]]]:
    """Per method: share of each class's decided points (within ``where``) called ice, and their count."""
    shares: dict[str, dict[str, float]] = {}
    counts: dict[str, dict[str, int]] = {}
    for method, mask in calls.items():
        ok = (mask != ICE_NODATA) & where
        n = {c: int(((cls == k) & ok).sum()) for k, c in classes.items()}
        shares[method] = {c: float((mask[(cls == k) & ok] == 1).sum() / n[c]) if n[c] else float("nan")
                          for k, c in classes.items()}
        counts[method] = n
    return shares, counts


#: Where the real data sits in a checkout: ``../shared/data`` beside the repository.
DEFAULT_DATA = Path(__file__).resolve().parents[4] / "shared" / "data"

#: Other U-Net thresholds scored for the docs (information for users choosing --threshold): 0.5,
#: a probability's midpoint, and 0.95, the threshold the synthetic validation rule gave.
EXTRA_THRESHOLDS: tuple[float, ...] = (0.5, 0.95)


# ----------------------------------------------------------------------------------------------
# The shipped threshold: chosen on real data held apart from the scores
# ----------------------------------------------------------------------------------------------

#: How the shipped decision threshold is chosen, after training, on real data. With snow labelled
#: ice the synthetic validation F1 is flat from 0.05 to 0.95 (docs/default-model.md), so it cannot
#: choose; real scenes can, as long as the scores reported are not the data that chose.
#:
#: * Selection set (the only data the choice reads): the Landsat 8/9 hand-labelled points of the
#:   four training glaciers (their rock/debris and water are controls) and the ukis Landsat-5
#:   chips (water, cloud shadow, cloud).
#: * Held out from it: every Sentinel-2 set (points and ukis chips), the HLS Athabasca scene,
#:   Liverpool and the two validation glaciers: what docs/default-model.md reports as held out.
#: * Rule: the lowest threshold of ``grid`` at which no control class has more than
#:   ``max_control_share`` of its pixels called ice. Every glacier class's share called ice
#:   falls as the threshold rises, so this is the most glacier for a bounded false-positive rate;
#:   the bound is half the 1 % of ice-free pixels the project's targets allow, a margin for
#:   scenes the choice has not seen. The grid starts at 0.5: below it the network itself says
#:   "more likely not ice".
THRESHOLD_SELECTION: dict[str, Any] = {
    "grid": [round(0.05 * k, 2) for k in range(10, 20)],
    "max_control_share": 0.005,
    "controls": ["landsat rock/debris", "landsat water", "landsat5 water", "landsat5 shadow", "landsat5 cloud"],
    "glacier": ["landsat snow", "landsat shadowed snow", "landsat ice"],
}


def _selection_inputs(data_root: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, Any, np.ndarray]:
    """The selection set read once: Landsat point reflectance and classes, the ukis Landsat-5 cube
    and its class mask (the restarts of one recipe run all score on them)."""
    refl, cls = point_spectra(data_root)["landsat"]
    cube, msk = _ukis(Path(data_root), "landsat5")
    return refl, cls, cube, msk


def selection_shares(data_root: str | os.PathLike[str], model: str | os.PathLike[str] | None = None, *,
                     inputs: tuple[np.ndarray, np.ndarray, Any, np.ndarray] | None = None) -> dict[str, list[float]]:
    """Share of each selection-set class called ice at each threshold of the grid.

    The selection set is :data:`THRESHOLD_SELECTION`'s: the Landsat points (through
    :func:`point_unet_probability`, as the docs' point table scores them) and the ukis Landsat-5
    chips (through :func:`icemap.predict`, as ``icemap map`` runs). Returns ``{class: [share at
    each grid threshold]}`` for the controls and the glacier classes, decided by
    :func:`icemap.kernels.probability_mask` as the product decides a pixel. ``inputs``: the
    selection set already read (:func:`_selection_inputs`).
    """
    folder = resolve_model(model)
    refl, cls, cube, msk = inputs if inputs is not None else _selection_inputs(data_root)
    grid = THRESHOLD_SELECTION["grid"]
    probs: dict[str, np.ndarray] = {}
    p = point_unet_probability(refl, folder)
    for k, c in _TRAINING_CLASSES.items():
        probs[f"landsat {c}"] = p[(cls == k) & np.isfinite(p)]
    prob = predict(cube, folder, device="cpu")["ice_probability"].isel(time=0).values
    for c in ("water", "shadow", "cloud"):
        probs[f"landsat5 {c}"] = prob[(msk == _UKIS_CLASSES[c]) & np.isfinite(prob)]
    wanted = [*THRESHOLD_SELECTION["controls"], *THRESHOLD_SELECTION["glacier"]]
    return {name: [float((probability_mask(probs[name], t) == 1).mean()) for t in grid] for name in wanted}


def lowest_passing_threshold(shares: Mapping[str, Sequence[float]], grid: Sequence[float], controls: Sequence[str],
                             max_share: float) -> float:
    """The rule of :data:`THRESHOLD_SELECTION`: the lowest ``grid`` threshold at which every
    control's share is at most ``max_share``. An error when none is: a model that flags that
    much of the controls even at the top of the grid must not ship with any threshold."""
    for i, t in enumerate(grid):
        if all(shares[c][i] <= max_share for c in controls):
            return float(t)
    worst = {c: f"{100 * shares[c][-1]:.2f} %" for c in controls if shares[c][-1] > max_share}
    raise ModelError(f"no threshold up to {grid[-1]} keeps every real control at most {100 * max_share:.1f} % "
                     f"ice (at {grid[-1]}: {worst}); this model flags water, shadow or rock: retrain it "
                     "(another seed) rather than ship it")


def _selection(folder: Path, data_root: str | os.PathLike[str], *,
               inputs: tuple[np.ndarray, np.ndarray, Any, np.ndarray] | None = None) -> dict[str, Any]:
    """What :data:`THRESHOLD_SELECTION` finds for one model: every share it read, and the chosen
    threshold with the mean share of the glacier classes there; when no threshold passes, both
    are ``None`` and ``error`` says why (the rule's own message)."""
    shares = selection_shares(data_root, folder, inputs=inputs)
    try:
        chosen = lowest_passing_threshold(shares, THRESHOLD_SELECTION["grid"], THRESHOLD_SELECTION["controls"],
                                          THRESHOLD_SELECTION["max_control_share"])
    except ModelError as exc:
        return {"shares": shares, "threshold": None, "glacier_share": None, "error": str(exc)}
    i = THRESHOLD_SELECTION["grid"].index(chosen)
    glacier = float(np.mean([shares[g][i] for g in THRESHOLD_SELECTION["glacier"]]))
    return {"shares": shares, "threshold": chosen, "glacier_share": glacier}


def _write_selection(folder: Path, found: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Write a passing selection's threshold and record into ``folder``'s ``model.json``."""
    meta = read_metadata(folder)
    before = meta.training.get("threshold_selection", {}).get("synthetic_threshold", meta.threshold)
    record = {"rule": "lowest grid threshold with every selection control at most max_control_share ice",
              **THRESHOLD_SELECTION, "shares": found["shares"], "threshold": found["threshold"],
              "glacier_share": found["glacier_share"], "synthetic_threshold": before,
              "held_out": "every Sentinel-2 set, HLS Athabasca, Liverpool, the validation glaciers", **extra}
    meta.threshold = found["threshold"]
    meta.training["threshold_selection"] = record
    write_metadata(meta, folder)
    return record


def select_threshold(model: str | os.PathLike[str], data_root: str | os.PathLike[str]) -> dict[str, Any]:
    """Choose ``model``'s threshold by :data:`THRESHOLD_SELECTION` and write it to its ``model.json``.

    The choice and everything it read go to ``training["threshold_selection"]`` (the rule, the
    shares at each grid threshold, the threshold training's synthetic rule had given); the
    weights are untouched. Rerunning it gives the same threshold. A model for which no threshold
    passes is an error (:func:`lowest_passing_threshold`'s), and nothing is written.
    """
    folder = Path(model)
    found = _selection(folder, data_root)
    if found["threshold"] is None:
        raise ModelError(f"{folder}: {found['error']}")
    return _write_selection(folder, found)


def choose_restart(candidates: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The restart the real selection set prefers: among those with a passing threshold, the most
    glacier (mean share of the glacier classes at that threshold); ties go to the better synthetic
    validation F1, then the lower seed. An error when no restart passes.

    ``candidates``: one dict per restart with ``seed``, ``val_f1``, ``threshold`` (``None`` when
    none passes) and ``glacier_share``.
    """
    passing = [c for c in candidates if c["threshold"] is not None]
    if not passing:
        raise ModelError(f"none of the {len(candidates)} restart(s) (seeds {[c['seed'] for c in candidates]}) keeps "
                         f"every real control at most {100 * THRESHOLD_SELECTION['max_control_share']:.1f} % ice at "
                         "any threshold: retrain with other seeds (TRAIN_SETTINGS seed/restarts) rather than ship one")
    return max(passing, key=lambda c: (c["glacier_share"], c["val_f1"], -c["seed"]))


#: The recipe's own provenance in ``model.json``'s training block (what :func:`train_default`
#: adds to a run's record); kept when the real selection set prefers another restart.
_RECIPE_KEYS = ("recipe", "cube", "outlines", "labels", "region", "chip_settings", "train_settings", "augmentation",
                "weights_dtype", "torch_version", "torch_threads", "cpu_capability", "seconds_data", "seconds_total",
                "restarts")


def select_on_real_data(out: str | os.PathLike[str], data_root: str | os.PathLike[str],
                        work: str | os.PathLike[str]) -> dict[str, Any]:
    """The recipe's last step: choose the restart and its threshold on the real selection set.

    Every restart of the training run in ``out`` (``training["restarts"]``; the model itself when
    there were none) is stored as float16, as the shipped weights are, in ``work``, and gets the
    threshold of :data:`THRESHOLD_SELECTION`; :func:`choose_restart` picks one. When it is not
    the restart synthetic validation F1 picked, its weights and its own run record replace those
    in ``out`` (the recipe's provenance, :data:`_RECIPE_KEYS`, is kept). The record of every
    restart goes to ``training["threshold_selection"]["restarts"]``. Returns that record.
    """
    from icemap.model.checkpoint import load_checkpoint

    out, work = Path(out), Path(work)
    meta = read_metadata(out)
    runs = meta.training.get("restarts") or [{"seed": int(meta.training["config"]["seed"]), "folder": ".",
                                               "val_f1": float(meta.validation.get("f1", float("nan")))}]
    inputs = _selection_inputs(data_root)  # read once for every restart
    candidates = []
    for r in runs:
        model, run_meta = load_checkpoint(out / r["folder"])
        f16 = work / "real-selection" / f"seed-{r['seed']}"
        save_checkpoint(model.half(), run_meta, f16)
        found = _selection(f16, data_root, inputs=inputs)
        candidates.append({"seed": int(r["seed"]), "val_f1": float(r["val_f1"]), "folder": f16, **found})
    best = choose_restart(candidates)
    synthetic_seed = int(meta.training.get("chosen_seed", best["seed"]))
    if best["seed"] != synthetic_seed:
        model, run_meta = load_checkpoint(best["folder"])
        run_meta.training.update({k: meta.training[k] for k in _RECIPE_KEYS if k in meta.training})
        run_meta.training["chosen_seed"] = best["seed"]
        save_checkpoint(model.half(), run_meta, out)  # the float16 values again: the same bytes
    summary = [{k: c[k] for k in ("seed", "val_f1", "threshold", "glacier_share")} for c in candidates]
    return _write_selection(out, best, restarts=summary, synthetic_seed=synthetic_seed, chosen_seed=best["seed"])


def selection_markdown(record: dict[str, Any]) -> str:
    """The selection table of docs/default-model.md (``<!-- threshold-selection -->``): percent
    of each selection class called ice at each grid threshold, the chosen one in bold."""
    names = [*record["controls"], *record["glacier"]]
    lines = ["<!-- threshold-selection -->", "| threshold | " + " | ".join(names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for i, t in enumerate(record["grid"]):
        label = f"**{t:.2f}**" if t == record["threshold"] else f"{t:.2f}"
        lines.append(f"| {label} | " + " | ".join(f"{100 * record['shares'][n][i]:.2f}" for n in names) + " |")
    lines.append("<!-- /threshold-selection -->")
    return "\n".join(lines)


def _methods(model: str | os.PathLike[str]) -> dict[str, Any]:
    """name -> function(cube) returning the (y, x) uint8 ice mask of the first date."""
    from icemap.index import ice_mask

    cache: dict[int, Any] = {}

    def unet(cube: Any, threshold: float | None = None) -> Any:
        # One network pass per scene; other thresholds reuse its probabilities.
        if id(cube) not in cache:
            cache[id(cube)] = predict(cube, model, device="cpu").isel(time=0).compute()
        out = cache[id(cube)]
        if threshold is None:
            return out["ice"]
        return out["ice"].copy(data=probability_mask(out["ice_probability"].values, threshold))

    methods: dict[str, Any] = {"default U-Net": unet}
    methods.update({f"default U-Net at {t}": (lambda c, t=t: unet(c, t)) for t in EXTRA_THRESHOLDS})
    methods["NDSI 0.4"] = lambda c: ice_mask(c, threshold=0.4).isel(time=0).compute()
    methods["NDSI 0.4 + guards"] = lambda c: ice_mask(c, threshold=0.4, guards=("water", "dark")).isel(time=0).compute()
    return methods


def real_data_scores(data_root: str | os.PathLike[str], model: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Score the default model (or ``model``), NDSI 0.4 and NDSI 0.4 + guards on the real data.

    Every U-Net number goes through :func:`icemap.predict` (hence
    :func:`icemap.infer.predict_array`), the path ``icemap map`` runs.

    Returns
    -------
    dict
        ``{"athabasca": {method: {f1, precision, recall, ice_area_km2, reference_area_km2}},
        "false_positive_share": {method: {"liverpool water": share, "landsat5 water": ...}},
        "pixels": {class: count}}``; shares are ice-flagged pixels / valid pixels of the class.
    """
    root = Path(data_root)
    model = resolve_model(model)
    methods = _methods(model)
    ath = _athabasca(root)
    outline = root / "athabasca_hls_l30" / "athabasca_outline.shp"
    scores: dict[str, Any] = {"athabasca": {}, "false_positive_share": {}, "pixels": {}}
    for name, fn in methods.items():
        got = evaluate(fn(ath), outline)
        scores["athabasca"][name] = {k: float(got[k]) for k in
                                     ("f1", "precision", "recall", "ice_area_km2", "reference_area_km2")}
    controls: dict[str, tuple[Any, dict[str, np.ndarray]]] = {}
    liv = _liverpool(root)
    refl = liv["reflectance"].isel(time=0)
    g, n = refl.sel(band="green").values, refl.sel(band="nir08").values
    with np.errstate(invalid="ignore", divide="ignore"):
        ndwi = (np.clip(g, 0, None) - np.clip(n, 0, None)) / (np.clip(g, 0, None) + np.clip(n, 0, None))
    controls["liverpool"] = (liv, {"water": ndwi > LIVERPOOL_WATER_NDWI, "all": np.isfinite(ndwi)})
    for chip in ("landsat5", "sentinel2"):
        cube, msk = _ukis(root, chip)
        controls[chip] = (cube, {c: msk == v for c, v in _UKIS_CLASSES.items() if c != "land"})
    for name, fn in methods.items():
        row: dict[str, float] = {}
        for scene, (cube, classes) in controls.items():
            ice = np.asarray(fn(cube).values)
            ok = ice != ICE_NODATA
            for cls, where in classes.items():
                sel = where & ok
                row[f"{scene} {cls}"] = float((ice[sel] == 1).sum() / max(int(sel.sum()), 1))
                scores["pixels"][f"{scene} {cls}"] = int(sel.sum())
        scores["false_positive_share"][name] = row
    return scores


_CONTROL_COLUMNS = ("liverpool water", "landsat5 water", "sentinel2 water", "landsat5 shadow", "sentinel2 shadow",
                    "landsat5 cloud", "sentinel2 cloud")


def scores_markdown(scores: dict[str, Any]) -> str:
    """The two tables of docs/default-model.md (between the markers tests/test_default_model.py
    reads), from :func:`real_data_scores`."""
    lines = ["<!-- athabasca -->", "| method | F1 | precision | recall | ice km2 |", "|---|---|---|---|---|"]
    for name, r in scores["athabasca"].items():
        lines.append(f"| {name} | {r['f1']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['ice_area_km2']:.2f} |")
    lines += ["<!-- /athabasca -->", "", "<!-- controls -->",
              "| method | " + " | ".join(_CONTROL_COLUMNS) + " |", "|---" * (len(_CONTROL_COLUMNS) + 1) + "|"]
    for name, r in scores["false_positive_share"].items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * r[c]:.2f}" for c in _CONTROL_COLUMNS) + " |")
    lines.append("| pixels of the class | " + " | ".join(str(scores["pixels"][c]) for c in _CONTROL_COLUMNS) + " |")
    lines.append("<!-- /controls -->")
    return "\n".join(lines)


def points_markdown(points: dict[str, Any]) -> str:
    """The real-pixel table of docs/default-model.md (between ``<!-- points -->`` markers), from
    :func:`point_scores`: percent of each class called ice, per point set and method."""
    lines = ["<!-- points -->", "| point set | method | " + " | ".join(
        f"{c} (n)" for c in _TRAINING_CLASSES.values()) + " |", "|---|---" + "|---" * len(_TRAINING_CLASSES) + "|"]
    for name in POINT_FILES:
        for method, row in points[name].items():
            n = points["pixels"][name][method]
            cells = [f"{100 * row[c]:.1f} ({n[c]})" if c in row else "" for c in _TRAINING_CLASSES.values()]
            if "not snow" in row:  # validation sets: snow / not snow
                cells = [f"{100 * row['snow']:.1f} ({n['snow']})", "", "", f"not snow: {100 * row['not snow']:.1f} "
                         f"({n['not snow']})", ""]
            lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    lines.append("<!-- /points -->")
    return "\n".join(lines)


def sites_markdown(points: dict[str, Any]) -> str:
    """The per-glacier real-pixel table of docs/default-model.md (``<!-- points-by-site -->``),
    from :func:`point_scores`: percent of each class called ice at each site, by method."""
    lines = ["<!-- points-by-site -->", "| point set | site | method | " + " | ".join(
        f"{c} (n)" for c in _TRAINING_CLASSES.values()) + " | not snow (n) |",
             "|---|---|---" + "|---" * (len(_TRAINING_CLASSES) + 1) + "|"]
    for name in POINT_FILES:
        for site, methods in points["by_site"][name].items():
            for method, row in methods.items():
                n = points["site_pixels"][name][site][method]
                cells = [f"{100 * row[c]:.1f} ({n[c]})" if n.get(c) else "" for c in _TRAINING_CLASSES.values()]
                cells.append(f"{100 * row['not snow']:.1f} ({n['not snow']})" if n.get("not snow") else "")
                lines.append(f"| {name} | {site} | {method} | " + " | ".join(cells) + " |")
    lines.append("<!-- /points-by-site -->")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m icemap.lab.default train --out DIR`` | ``threshold --model DIR`` | ``score [--model DIR]``."""
    p = argparse.ArgumentParser(prog="python -m icemap.lab.default", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the default model from scratch")
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--work", type=Path, default=None)
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="real data folder whose selection set chooses the threshold (default ../shared/data)")
    t.add_argument("--synthetic-threshold", action="store_true",
                   help="keep the threshold chosen on synthetic validation chips (trial runs without real data)")
    th = sub.add_parser("threshold", help="choose a model's threshold on the real selection set and write it")
    th.add_argument("--model", required=True, type=Path)
    th.add_argument("--data", type=Path, default=DEFAULT_DATA)
    s = sub.add_parser("score", help="score a model, NDSI 0.4 and NDSI + guards on the real data")
    s.add_argument("--model", default=None)
    s.add_argument("--data", type=Path, default=DEFAULT_DATA)
    s.add_argument("--markdown", action="store_true", help="print docs/default-model.md's tables")
    s.add_argument("--points", action="store_true",
                   help="also score the hand-labelled real pixels (rgi_benchmark_glacier_spectra)")
    args = p.parse_args(argv)
    try:
        _run_command(args)
    except IcemapError as exc:  # what a user can get wrong (a folder, missing data): one line, no traceback
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _run_command(args: argparse.Namespace) -> None:
    if args.cmd == "train":
        path = train_default(args.out, work=args.work, epochs=args.epochs,
                             real_data=None if args.synthetic_threshold else args.data)
        meta = read_metadata(path)
        print(f"{path}: sha256 {meta.weights_sha256}, threshold {meta.threshold}")
    elif args.cmd == "threshold":
        record = select_threshold(args.model, args.data)
        print(selection_markdown(record))
        print(f"\n{args.model}: threshold {record['threshold']} (synthetic rule: {record['synthetic_threshold']})")
    else:
        scores = real_data_scores(args.data, args.model)
        if args.points:
            scores["points"] = point_scores(args.data, args.model)
        if args.markdown:
            print(scores_markdown(scores))
            if args.points:
                print("\n" + points_markdown(scores["points"]))
                print("\n" + sites_markdown(scores["points"]))
        else:
            print(json.dumps(scores, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
