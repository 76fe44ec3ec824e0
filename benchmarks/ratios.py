#!/usr/bin/env python
"""icemap side by side with what a user would write instead: a table of ratios.

Run from the repository root::

    python benchmarks/ratios.py --json docs/benchmarks.json --markdown docs/benchmarks.md
    python benchmarks/ratios.py --smoke                 # tiny sizes, seconds; checks it all runs
    python benchmarks/ratios.py --sections ndsi,unet    # a subset

Why ratios: this project runs on shared machines (2 cores, other jobs training models), where
absolute times move by 2x from one minute to the next. Each comparison here runs both sides in
one process, on the same in-memory data, with the same threads, *interleaved* (A, B, A, B...)
and keeps each side's best time, so a slow minute hits both sides alike and the ratio survives.

Sections (each prints its rows as it finishes):

``ndsi``
    icemap's NDSI computed into a buffer (``icemap.ndsi(cube, out=...)``, dask, every core) and
    its fused kernel alone against plain numpy on the same in-memory arrays (one core, as
    numpy's element-wise operations are), and both against the memory-bandwidth limit: the
    bytes an NDSI must move (two float32 inputs read, one float32 output written) divided by
    the copy bandwidth measured here with ``np.copyto``.
``jobs``
    ``icemap map --method ndsi`` (Zarr cube -> Zarr product) against an I/O floor that reads
    the same input chunks and writes the same output bytes with zarr alone; ``icemap evaluate``
    with every outline of the region against ``icemap map`` on the same cube.
``ingest``
    ``icemap.load`` + ``icemap.write_cube`` (COGs -> Zarr) against a hand-written rasterio +
    zarr loop that reads the same COG windows, applies the same scale/offset and QA masks and
    writes the same arrays with the same chunks and compressor, on a thread pool of the same
    size. The two stores are checked to hold identical values.
``loaders``
    stackstac (through ``icemap.load``, and bare ``stackstac.stack``) against
    ``odc.stac.load`` on the same items, grid, chunks and threads.
``unet``
    ``icemap.predict`` (dask, exact halos) against a plain PyTorch sliding-window loop (numpy
    array in memory, padded, fixed windows with overlap, batched forward passes, centre crops
    stitched), on the same model, tiles, batch size and torch threads, in *useful* output
    pixels per second; the network pixels each useful pixel costs are reported alongside.
``scaling``
    The same job on 1x, 4x and 16x the area on a fresh ``LocalCluster`` (2 workers x 1
    thread) per size: the NDSI job end to end (search -> ingest -> NDSI product in Zarr) and
    U-Net prediction from a Zarr cube. Time per Mpixel and each worker's peak RSS
    (``VmHWM`` read in the worker after resetting it: the true peak, not a sample). A
    diagnostic repeat of the U-Net job patches each worker to one torch thread (icemap gives
    each worker ``cores // worker threads``), to separate thread oversubscription from scaling;
    its rows carry no target, since they are not icemap as shipped.

Outputs: the table on stdout, ``--json`` (every number, the machine and load) and
``--markdown`` (the generated block of ``docs/benchmarks.md``, between the
``<!-- ratios:begin -->`` and ``<!-- ratios:end -->`` markers, so hand-written text around
it is kept).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- ratios:begin -->", "<!-- ratios:end -->"
SECTIONS = ("ndsi", "jobs", "ingest", "loaders", "unet", "scaling")


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """Sizes of every comparison. ``full`` takes about 14 minutes on 2 cores (half of it the U-Net scaling)."""

    name: str
    ndsi_size: int
    ndsi_chunk: int
    ingest_size: int
    ingest_chunk: int
    unet_size: int
    unet_chunk: int
    unet_depth: int
    unet_base: int
    unet_tile: int
    unet_batch: int
    unet_overlap: int
    scaling_ndsi: tuple[int, ...]
    #: U-Net sizes start at 3x3 chunks: every window a larger cube has (a chunk with halos on
    #: all four sides, 480 px at chunks 256) is there at 1x, so the rows measure area, not the
    #: step from a one-chunk cube (no halo, 256 px windows) to haloed ones.
    scaling_unet: tuple[int, ...]
    scaling_chunk_ndsi: int
    scaling_chunk_unet: int
    jobs_size: int
    jobs_seed: int
    jobs_chunk: int
    repeat: int
    #: A fresh cluster per size (full) or one cluster reused, with the peak mark reset (smoke).
    fresh_cluster: bool = True
    #: One untimed call of each side before the timed ones (full). The smoke only checks that
    #: everything runs, so it skips them: half its time.
    warmup: bool = True
    #: Bytes the memory-bandwidth probe copies (a quarter of it for the parallel ceiling). Full:
    #: far beyond any cache, as a measurement must be. The smoke only runs the code: 8 MiB, not
    #: the 3.7 s that 256 MiB takes there.
    probe_bytes: int = 256 * 2**20


FULL = Config(
    name="full", ndsi_size=4096, ndsi_chunk=1024, ingest_size=1024, ingest_chunk=512,
    unet_size=1024, unet_chunk=512, unet_depth=4, unet_base=16, unet_tile=256, unet_batch=4,
    unet_overlap=32, scaling_ndsi=(512, 1024, 2048), scaling_unet=(768, 1536, 3072),
    scaling_chunk_ndsi=512, scaling_chunk_unet=256, jobs_size=4096, jobs_seed=3, jobs_chunk=1024, repeat=3,
)
SMOKE = Config(
    name="smoke", ndsi_size=256, ndsi_chunk=128, ingest_size=128, ingest_chunk=64,
    unet_size=128, unet_chunk=64, unet_depth=2, unet_base=4, unet_tile=32, unet_batch=4,
    unet_overlap=8, scaling_ndsi=(64, 128), scaling_unet=(64, 128), scaling_chunk_ndsi=64,
    scaling_chunk_unet=64, jobs_size=128, jobs_seed=3, jobs_chunk=64, repeat=1, fresh_cluster=False,
    warmup=False, probe_bytes=8 * 2**20,
)


@dataclass
class Row:
    """One line of the table: icemap against a baseline (or a limit), as a ratio."""

    section: str
    what: str
    icemap: str
    baseline: str
    ratio: float
    ratio_means: str
    target: float | None = None
    met: bool | None = None
    note: str = ""
    numbers: dict[str, Any] = field(default_factory=dict)


def _fmt_ratio(r: float) -> str:
    return "n/a" if not math.isfinite(r) else f"{r:.2f}"


def interleaved(fns: dict[str, Callable[[], Any]], repeat: int, budget_s: float = 120.0,
                warmup: bool = True) -> dict[str, float]:
    """Best time of each function, run in turns (A, B, C, A, B, C...) so load drift cancels.

    With ``warmup``, one untimed call each first (imports, thread pools, model caches, page
    cache); callers that already ran every function once pass ``warmup=False``.
    """
    if warmup:
        for fn in fns.values():
            fn()
    best = {k: math.inf for k in fns}
    t_start = time.perf_counter()
    for _ in range(max(1, repeat)):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
        if time.perf_counter() - t_start > budget_s:
            break
    return best


def loadavg() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover - not on Linux
        return (math.nan, math.nan, math.nan)


# ---------------------------------------------------------------------------------------------
# NDSI: icemap (dask, all cores) vs numpy (one core) vs the memory-bandwidth limit
# ---------------------------------------------------------------------------------------------
def copy_bandwidth(nbytes: int, threads: int = 1, repeat: int = 5) -> float:
    """Bytes per second a copy moves (read + write), with ``threads`` threads on slices."""
    n = nbytes // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(n), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts if len(p)]

    def one(b: tuple[int, int]) -> None:
        np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]])

    best = math.inf
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for _ in range(repeat):
            t0 = time.perf_counter()
            list(pool.map(one, bounds))
            best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def parallel_ceiling(threads: int, nbytes: int, repeat: int = 5) -> float:
    """Best speed-up ``threads`` threads get over one on allocation-free element-wise numpy.

    ``np.add``/``np.multiply`` with ``out=`` on slices (no temporaries, GIL released): the most a
    dask graph of element-wise chunks can hope for on this machine, since such work is bound by
    memory bandwidth, which the cores share.
    """
    n = nbytes // 4
    a = np.ones(n, np.float32)
    b = np.ones(n, np.float32)
    c = np.empty_like(a)
    parts = [(int(p[0]), int(p[-1]) + 1) for p in np.array_split(np.arange(n), 8)]

    def one(bounds: tuple[int, int]) -> None:
        i, j = bounds
        np.add(a[i:j], b[i:j], out=c[i:j])
        np.multiply(c[i:j], a[i:j], out=c[i:j])

    best = {1: math.inf, threads: math.inf}
    for _ in range(repeat):
        for k in (1, threads):
            with concurrent.futures.ThreadPoolExecutor(k) as pool:
                t0 = time.perf_counter()
                list(pool.map(one, parts))
                best[k] = min(best[k], time.perf_counter() - t0)
    return best[1] / best[threads]


def section_ndsi(cfg: Config) -> list[Row]:
    import icemap
    from icemap import kernels

    cube = C.memory_cube(cfg.ndsi_size, bands=C.NDSI_BANDS, chunksize=cfg.ndsi_chunk)
    refl = cube["reflectance"]
    arr = refl.data.compute()  # the same numpy memory the dask graph slices
    green, swir = np.ascontiguousarray(arr[:, 0]), np.ascontiguousarray(arr[:, 1])
    assert [str(b) for b in refl["band"].values] == list(C.NDSI_BANDS)
    n_px = green.size
    ncores = os.cpu_count() or 1
    # Reused destinations: what a notebook looping over dates or regions does with out=.
    buf = np.empty(green.shape, np.float32)
    ice_buf = np.empty(green.shape, np.uint8)

    def icemap_ndsi(n: int) -> Callable[[], Any]:
        def run() -> Any:
            with C.threads(n):
                return icemap.ndsi(cube, out=buf)
        return run

    def icemap_values() -> Any:
        with C.threads(ncores):
            return icemap.ndsi(cube).values

    def numpy_naive() -> Any:
        return (green - swir) / (green + swir)

    def kernel_alone() -> Any:
        return kernels.normalized_difference(green, swir, out=buf)

    def kernel_fresh() -> Any:
        return kernels.normalized_difference(green, swir)

    def ice_kernel_alone() -> Any:
        return kernels.ice_mask(green, swir, 0.4, out=ice_buf)

    g_dask = refl.sel(band="green", drop=True).data
    s_dask = refl.sel(band="swir16", drop=True).data

    def dask_floor() -> Any:
        with C.threads(ncores):
            return ((g_dask - s_dask) / (g_dask + s_dask)).compute()

    def icemap_ice() -> Any:
        with C.threads(ncores):
            return icemap.ice_mask(cube, out=ice_buf)

    def numpy_ice() -> Any:
        nd = (green - swir) / (green + swir)
        ice = (nd >= 0.4).astype(np.uint8)
        ice[np.isnan(nd)] = 255
        return ice

    with np.errstate(invalid="ignore", divide="ignore"), C.quiet():
        # Same result (icemap clips negative reflectance, so compare where both are in range).
        a, b = np.array(icemap_ndsi(ncores)()), numpy_naive()
        ok = np.isfinite(a) & np.isfinite(b) & (green >= 0) & (swir >= 0)
        max_diff = float(np.max(np.abs(a[ok] - b[ok]))) if ok.any() else 0.0
        del a, b
        times = interleaved({
            "icemap": icemap_ndsi(ncores), "icemap_1thread": icemap_ndsi(1), "icemap_values": icemap_values,
            "numpy": numpy_naive, "kernel": kernel_alone, "kernel_fresh": kernel_fresh,
            "ice_kernel": ice_kernel_alone, "icemap_ice": icemap_ice, "numpy_ice": numpy_ice,
            "dask_floor": dask_floor,
        }, cfg.repeat, warmup=cfg.warmup)
    bw = max(copy_bandwidth(cfg.probe_bytes, threads=1), copy_bandwidth(cfg.probe_bytes, threads=ncores))
    ceiling = parallel_ceiling(ncores, nbytes=cfg.probe_bytes // 4)
    limit_ndsi = n_px * 12 / bw  # read 2 x float32, write 1 x float32
    limit_ice = n_px * 9 / bw  # read 2 x float32, write 1 x uint8
    mpx = n_px / 1e6
    common_numbers = {"pixels": n_px, "chunk": cfg.ndsi_chunk, "threads": ncores,
                      "parallel_ceiling": ceiling,
                      "copy_bandwidth_GBps": bw / 1e9, "max_abs_diff_vs_numpy": max_diff,
                      "times_s": times, "limit_s": {"ndsi": limit_ndsi, "ice": limit_ice}}

    def mps(t: float) -> str:
        return f"{mpx / t:.0f} Mpx/s"

    par_eff = times["icemap_1thread"] / times["icemap"]
    rows = [
        Row("ndsi", f"NDSI in memory, {cfg.ndsi_size}x{cfg.ndsi_size} px x {green.shape[0]} dates",
            f"icemap.ndsi(cube, out=buffer), dask {ncores} threads: {mps(times['icemap'])}",
            f"numpy `(g-s)/(g+s)`, 1 core: {mps(times['numpy'])}",
            times["numpy"] / times["icemap"], "speed-up of icemap over numpy", 1.6,
            note=f"icemap on 1 thread: {mps(times['icemap_1thread'])} ({times['numpy'] / times['icemap_1thread']:.2f}x "
                 f"numpy); parallel speed-up {par_eff:.2f}x on {ncores} threads, where allocation-free element-wise "
                 f"numpy gets {ceiling:.2f}x on this machine; the lazy result's `.values` (fresh chunks, then a "
                 f"concatenation copy): {mps(times['icemap_values'])} ({times['numpy'] / times['icemap_values']:.2f}x)",
            numbers=common_numbers),
        Row("ndsi", "NDSI kernel alone (kernels.normalized_difference into a reused buffer), 1 core",
            f"fused kernel: {mps(times['kernel'])}",
            f"numpy `(g-s)/(g+s)`: {mps(times['numpy'])}",
            times["numpy"] / times["kernel"], "speed of icemap's kernel relative to the bare formula", 3.0,
            note=f"into a fresh array (page faults on first touch): {mps(times['kernel_fresh'])} "
                 f"({times['numpy'] / times['kernel_fresh']:.2f}x)"),
        Row("ndsi", "Ice-mask kernel (NDSI >= 0.4, uint8 with nodata) against the memory-bandwidth limit, 1 core",
            f"kernels.ice_mask: {mps(times['ice_kernel'])}",
            f"limit: 9 B/px at {bw / 1e9:.1f} GB/s copy bandwidth = {mps(limit_ice)}",
            limit_ice / times["ice_kernel"], "share of the bandwidth limit reached", 0.5,
            note=f"numpy's thresholded formula reaches {limit_ice / times['numpy_ice']:.2f} of it"),
        Row("ndsi", "NDSI against the memory-bandwidth limit",
            f"icemap.ndsi(out=): {mps(times['icemap'])}",
            f"limit: 12 B/px at {bw / 1e9:.1f} GB/s copy bandwidth = {mps(limit_ndsi)}",
            limit_ndsi / times["icemap"], "share of the bandwidth limit reached",
            note=f"plain numpy reaches {limit_ndsi / times['numpy']:.2f} of it, the kernel alone "
                 f"{limit_ndsi / times['kernel']:.2f}"),
        Row("ndsi", "Dask floor: the bare formula `(g-s)/(g+s)` on the same dask chunks and threads (no icemap)",
            f"icemap.ndsi(out=): {mps(times['icemap'])}",
            f"dask `(g-s)/(g+s)`, {ncores} threads: {mps(times['dask_floor'])}",
            times["dask_floor"] / times["icemap"], "icemap speed relative to the plainest dask graph",
            note=f"the dask floor itself runs at {times['numpy'] / times['dask_floor']:.2f}x single-core numpy here"),
        Row("ndsi", "Ice mask in memory (icemap.ice_mask(cube, out=buffer))",
            f"icemap.ice_mask, dask {ncores} threads: {mps(times['icemap_ice'])}",
            f"numpy, 1 core: {mps(times['numpy_ice'])}",
            times["numpy_ice"] / times["icemap_ice"], "speed-up of icemap over numpy",
            note=f"bandwidth limit (9 B/px): {mps(limit_ice)}, icemap reaches {limit_ice / times['icemap_ice']:.2f} of it"),
    ]
    for r in rows:
        if r.target is not None:
            r.met = r.ratio >= r.target
    return rows


# ---------------------------------------------------------------------------------------------
# jobs: icemap map (Zarr -> Zarr) against an I/O floor; icemap evaluate against icemap map
# ---------------------------------------------------------------------------------------------
def io_floor(cube_path: Path, out: Path, *, bands: Sequence[str], products: dict[str, np.ndarray],
             like: Path, threads: int) -> None:
    """Read the input bands chunk by chunk and write the products' arrays, with zarr alone.

    No arithmetic: the bytes written are ``products`` (icemap's own results, loaded beforehand,
    so compression costs the same), the bytes read are the bands ``icemap map`` reads. Same
    chunks, compressors and threads as the icemap store ``like``.
    """
    import zarr

    src = zarr.open_group(str(cube_path), mode="r")
    refl = src["reflectance"]
    band_names = [str(b) for b in src["band"][:]]
    idx = [band_names.index(b) for b in bands]
    ref = zarr.open_group(str(like), mode="r")
    dst = zarr.open_group(str(out), mode="w")
    arrays = {name: dst.create_array(name, shape=v.shape, chunks=ref[name].chunks, dtype=v.dtype,
                                     compressors=ref[name].compressors, fill_value=ref[name].fill_value)
              for name, v in products.items()}
    t_n, _, h, w = refl.shape
    cy, cx = refl.chunks[-2:]
    jobs = [(t, y, x) for t in range(t_n) for y in range(0, h, cy) for x in range(0, w, cx)]

    def one(job: tuple[int, int, int]) -> None:
        t, y, x = job
        for j in idx:
            refl[t, j, y:y + cy, x:x + cx]
        for name, a in arrays.items():
            a[t, y:y + cy, x:x + cx] = products[name][t, y:y + cy, x:x + cx]

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, jobs))


def section_jobs(cfg: Config) -> list[Row]:
    """`icemap map --method ndsi` against reading and writing the same bytes with zarr alone, and
    `icemap evaluate` (all outlines of the region) against `icemap map` on the same cube."""
    import shutil

    import zarr

    import icemap
    from icemap.workflow import map_cube

    region = C.sample_region(cfg.jobs_size, seed=cfg.jobs_seed)
    cube_path = C.cube_store(cfg.jobs_size, bands=("green", "swir16"), chunksize=cfg.jobs_chunk,
                             seed=cfg.jobs_seed)
    ncores = os.cpu_count() or 1
    out = C.fresh_dir("jobs-")
    counter = iter(range(10**6))
    try:
        with C.quiet(), C.threads(ncores):
            probe = out / "probe.zarr"
            map_cube(cube_path, probe)
            stored = zarr.open_group(str(probe), mode="r")
            products = {"ndsi": stored["ndsi"][:], "ice": stored["ice"][:]}
            n_outlines = len(icemap.read_outlines(region.outlines))

        def run_map() -> None:
            with C.quiet(), C.threads(ncores):
                map_cube(cube_path, out / f"m{next(counter)}.zarr")

        def run_floor() -> None:
            io_floor(cube_path, out / f"f{next(counter)}.zarr", bands=("green", "swir16"), products=products,
                     like=probe, threads=ncores)

        def run_evaluate() -> None:
            with C.quiet(), C.threads(ncores):
                icemap.evaluate(icemap.open_cube(probe)["ice"], region.outlines)

        times = interleaved({"map": run_map, "floor": run_floor, "evaluate": run_evaluate}, cfg.repeat,
                            warmup=cfg.warmup)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    mpx = products["ice"].size / 1e6
    what = f"{cfg.jobs_size}x{cfg.jobs_size} px x {products['ice'].shape[0]} dates (seed {cfg.jobs_seed})"
    r_floor = times["floor"] / times["map"]
    r_eval = times["map"] / times["evaluate"]
    return [
        Row("jobs", f"icemap map --method ndsi, Zarr -> Zarr (ndsi + ice), {what}",
            f"map_cube: {times['map']:.2f} s ({mpx / times['map']:.0f} Mpx/s)",
            f"I/O floor, zarr alone (same reads, same writes, no arithmetic): {times['floor']:.2f} s",
            r_floor, "icemap speed relative to the I/O floor", 0.9, r_floor >= 0.9,
            numbers={"times_s": times}),
        Row("jobs", f"icemap evaluate against all {n_outlines} outlines, {what}",
            f"evaluate: {times['evaluate']:.2f} s", f"icemap map of the same cube: {times['map']:.2f} s",
            r_eval, "map time / evaluate time (>= 0.67: evaluate takes at most 1.5x map)", 1 / 1.5,
            r_eval >= 1 / 1.5,
            note=f"evaluate takes {1 / r_eval:.2f}x map's time; outlines burnt once per chunk, each chunk only "
                 "those a spatial index gives it"),
    ]


# ---------------------------------------------------------------------------------------------
# ingest: icemap.load + write_cube vs rasterio windows + zarr, same chunks, compressor, threads
# ---------------------------------------------------------------------------------------------
def baseline_ingest(items: Sequence[dict[str, Any]], path: Path, *, like: Any, chunk: int,
                    compressors: Any, threads: int) -> None:
    """What a user writes without icemap: read COG windows with rasterio, mask, write Zarr.

    One task per (item, chunk window) on a thread pool: open each asset, read the window,
    ``DN * scale + offset`` in float32, NaN where DN is nodata (0), where QA_PIXEL flags fill,
    dilated cloud, cirrus, cloud or cloud shadow (bits 0-4), and where QA_RADSAT flags the
    band; write the float32 reflectance and the uint16 QA with zarr directly. The grid (``like``)
    is the cube icemap would write, so both stores hold the same arrays.
    """
    import rasterio
    import zarr
    from rasterio.windows import from_bounds

    bands = [str(b) for b in like["band"].values]
    numbers = {"coastal": 1, "blue": 2, "green": 3, "red": 4, "nir08": 5, "swir16": 6, "swir22": 7}
    T, B, H, W = len(items), len(bands), like.sizes["y"], like.sizes["x"]
    x0 = float(like["x"][0]) - 15.0
    y0 = float(like["y"][0]) + 15.0
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    refl = root.create_array("reflectance", shape=(T, B, H, W), chunks=(1, 1, chunk, chunk), dtype="float32",
                             fill_value=np.float32(np.nan), compressors=compressors,
                             dimension_names=("time", "band", "y", "x"))
    qa_arr = root.create_array("qa_pixel", shape=(T, H, W), chunks=(1, chunk, chunk), dtype="uint16",
                               fill_value=np.uint16(1), compressors=compressors, dimension_names=("time", "y", "x"))
    for name, values in (("x", like["x"].values), ("y", like["y"].values)):
        root.create_array(name, data=values, dimension_names=(name,))
    root.attrs["crs"] = str(like.rio.crs)

    def task(t: int, iy: int, ix: int) -> None:
        item = items[t]
        ys, xs = slice(iy, min(iy + chunk, H)), slice(ix, min(ix + chunk, W))
        bounds = (x0 + 30.0 * xs.start, y0 - 30.0 * ys.stop, x0 + 30.0 * xs.stop, y0 - 30.0 * ys.start)

        def read(asset: str) -> np.ndarray:
            with rasterio.open(item["assets"][asset]["href"]) as src:
                win = from_bounds(*bounds, transform=src.transform).round_offsets().round_lengths()
                return src.read(1, window=win, boundless=True, fill_value=0)

        qa = read("qa_pixel")
        cloudy = (qa & 0b11111) != 0
        radsat = read("qa_radsat")
        for b, band in enumerate(bands):
            asset = item["assets"][band]
            rb = asset["raster:bands"][0]
            dn = read(band)
            r = dn.astype(np.float32) * np.float32(rb["scale"]) + np.float32(rb["offset"])
            r[(dn == 0) | cloudy | ((radsat & (1 << (numbers[band] - 1))) != 0)] = np.nan
            refl[t, b, ys, xs] = r
        qa_arr[t, ys, xs] = qa

    jobs = [(t, iy, ix) for t in range(T) for iy in range(0, H, chunk) for ix in range(0, W, chunk)]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(task, *j) for j in jobs]:
            f.result()


def section_ingest(cfg: Config) -> list[Row]:
    import shutil

    import zarr

    import icemap

    items = C.region_items(cfg.ingest_size, split=False)
    ncores = os.cpu_count() or 1
    out = C.fresh_dir("ingest-")
    counter = iter(range(10**6))
    with C.quiet():
        like = C.load_cube(items, chunksize=cfg.ingest_chunk)
        probe = out / "probe.zarr"
        with C.threads(ncores):
            icemap.write_cube(like, probe)
    compressors = zarr.open_array(str(probe / "reflectance")).compressors
    nbytes = C.cube_nbytes(like)
    mpx = C.cube_mpixels(like)

    def run_icemap() -> None:
        with C.quiet(), C.threads(ncores):
            icemap.write_cube(C.load_cube(items, chunksize=cfg.ingest_chunk), out / f"i{next(counter)}.zarr")

    def run_baseline() -> None:
        baseline_ingest(items, out / f"b{next(counter)}.zarr", like=like, chunk=cfg.ingest_chunk,
                        compressors=compressors, threads=ncores)

    try:
        times = interleaved({"icemap": run_icemap, "baseline": run_baseline}, cfg.repeat, warmup=cfg.warmup)
        # Same values in both stores (checked once, untimed).
        baseline_ingest(items, out / "check.zarr", like=like, chunk=cfg.ingest_chunk, compressors=compressors,
                        threads=ncores)
        got = zarr.open_group(str(out / "check.zarr"))
        ref = zarr.open_group(str(probe))
        same = bool(np.array_equal(got["reflectance"][:], ref["reflectance"][:], equal_nan=True)
                    and np.array_equal(got["qa_pixel"][:], ref["qa_pixel"][:]))
        size_i = sum(f.stat().st_size for f in probe.rglob("*") if f.is_file())
        size_b = sum(f.stat().st_size for f in (out / "check.zarr").rglob("*") if f.is_file())
    finally:
        shutil.rmtree(out, ignore_errors=True)

    def rate(t: float) -> str:
        return f"{nbytes / 1e6 / t:.0f} MB/s, {mpx / t:.1f} Mpx/s"

    ratio = times["baseline"] / times["icemap"]
    return [Row("ingest", f"COGs -> Zarr, {cfg.ingest_size}x{cfg.ingest_size} px x {like.sizes['time']} dates x "
                f"{like.sizes['band']} bands + QA, chunks {cfg.ingest_chunk}",
                f"icemap.load + write_cube ({ncores} dask threads): {rate(times['icemap'])}",
                f"rasterio windows + zarr ({ncores} threads): {rate(times['baseline'])}",
                ratio, "icemap speed relative to the hand-written loop", 1.0, ratio >= 1.0,
                note=f"stores identical: {same}; on disk {size_i / 1e6:.1f} MB (icemap) vs {size_b / 1e6:.1f} MB; "
                     "MB/s counts the uncompressed cube (float32 reflectance + uint16 QA)",
                numbers={"times_s": times, "bytes": nbytes, "mpixels": mpx, "identical": same,
                         "compressors": str(compressors)})]


# ---------------------------------------------------------------------------------------------
# loaders: icemap.load (odc-stac engine, and stackstac where installed) vs bare odc-stac
# ---------------------------------------------------------------------------------------------
def section_loaders(cfg: Config) -> list[Row]:
    import pystac

    from icemap.bands import get_sensor
    from icemap.load import grid_for_items, normalise_items

    import odc.stac
    from affine import Affine
    from odc.geo.geobox import GeoBox

    try:
        import stackstac
    except ImportError:  # the icemap[stackstac] extra (pandas < 3)
        stackstac = None

    items = C.region_items(cfg.ingest_size, split=False)
    ncores = os.cpu_count() or 1
    chunk = cfg.ingest_chunk
    with C.quiet():
        cube = C.load_cube(items, chunksize=chunk)
    bands = [str(b) for b in cube["band"].values]
    assets = bands + ["qa_pixel", "qa_radsat"]
    tr = cube.rio.transform()
    geobox = GeoBox((cube.sizes["y"], cube.sizes["x"]), Affine(tr.a, tr.b, tr.c, tr.d, tr.e, tr.f),
                    str(cube.rio.crs))
    pitems = [pystac.Item.from_dict(dict(it)) for it in items]
    sensor = get_sensor("landsat-c2-l2")
    clean, meta = normalise_items(items, sensor, bands)
    epsg, res, bnds = grid_for_items(meta)

    def run_icemap() -> Any:
        with C.quiet(), C.threads(ncores):
            return C.load_cube(items, chunksize=chunk, engine="odc-stac").compute()

    def run_icemap_stackstac() -> Any:
        with C.quiet(), C.threads(ncores):
            return C.load_cube(items, chunksize=chunk, engine="stackstac").compute()

    def run_odc() -> Any:
        # The same DNs in their own type (uint16, as the items' raster:bands state), no scaling.
        with C.quiet(), C.threads(ncores):
            return odc.stac.load(pitems, bands=assets, geobox=geobox, chunks={"x": chunk, "y": chunk},
                                 groupby="solar_day").compute()

    def run_stackstac() -> Any:
        with C.quiet(), C.threads(ncores):
            return stackstac.stack(clean, assets=assets, epsg=epsg, resolution=res, bounds=bnds,
                                   snap_bounds=False, dtype=np.dtype("float32"), fill_value=np.float32(np.nan),
                                   rescale=False, chunksize=(1, 1, chunk, chunk), xy_coords="center",
                                   properties=False, band_coords=False).compute()

    # Check: odc-stac reads the same DN where icemap keeps a value.
    o, i = run_odc(), run_icemap()
    g_odc = o["green"].values * np.float32(2.75e-5) + np.float32(-0.2)
    g_ice = i["reflectance"].sel(band="green").values
    ok = np.isfinite(g_ice)
    same_px = bool(np.allclose(g_odc[ok], g_ice[ok], atol=1e-6)) if ok.any() else False
    runs = {"icemap": run_icemap, "odc": run_odc}
    if stackstac is not None:
        runs.update({"icemap-stackstac": run_icemap_stackstac, "stackstac": run_stackstac})
    times = interleaved(runs, cfg.repeat, warmup=cfg.warmup)
    mpx = C.cube_mpixels(cube)
    n_assets = len(assets)

    def rate(t: float) -> str:
        return f"{mpx / t:.1f} Mpx/s"

    rows = [
        Row("loaders", f"{len(items)} items x {n_assets} assets, {cfg.ingest_size}x{cfg.ingest_size} px, chunks {chunk}",
            f"icemap.load (odc-stac engine, uint16 DNs + scale + QA masks), computed: {rate(times['icemap'])}",
            f"odc.stac.load (the same uint16 DNs), computed: {rate(times['odc'])}",
            times["odc"] / times["icemap"], "icemap.load speed relative to bare odc-stac", 0.9,
            times["odc"] / times["icemap"] >= 0.9,
            note=f"same pixels where icemap keeps a value: {same_px}",
            numbers={"times_s": times, "mpixels": mpx, "same_pixels": same_px}),
    ]
    if stackstac is not None:
        rows.append(Row("loaders", "engines: icemap.load with stackstac vs with odc-stac (identical cubes)",
                        f"stackstac engine: {rate(times['icemap-stackstac'])}", f"odc-stac engine: {rate(times['icemap'])}",
                        times["icemap"] / times["icemap-stackstac"], "stackstac engine speed relative to odc-stac engine",
                        note=f"bare stackstac.stack (float32): {rate(times['stackstac'])}"))
    return rows


# ---------------------------------------------------------------------------------------------
# U-Net: icemap.predict vs a plain PyTorch sliding-window loop
# ---------------------------------------------------------------------------------------------
def plain_torch_loop(x: np.ndarray, model: Any, lo: np.ndarray, hi: np.ndarray, *, tile: int, halo: int,
                     batch: int) -> tuple[np.ndarray, int, int]:
    """The usual script: pad, cut fixed windows ``tile + 2*halo`` at stride ``tile``, batch, stitch.

    ``x`` is ``(C, H, W)`` float32 with NaN as nodata. Returns the probability ``(H, W)``, the
    number of windows and the network input pixels computed.
    """
    import torch

    C_, H, W = x.shape
    z = (x - lo[:, None, None]) / (hi - lo)[:, None, None]
    nodata = np.isnan(z).any(axis=0)
    z = np.nan_to_num(z, nan=0.0).astype(np.float32)
    Hp, Wp = -(-H // tile) * tile, -(-W // tile) * tile
    win = tile + 2 * halo
    padded = np.zeros((C_, Hp + 2 * halo, Wp + 2 * halo), np.float32)
    padded[:, halo:halo + H, halo:halo + W] = z
    origins = [(ty, tx) for ty in range(0, Hp, tile) for tx in range(0, Wp, tile)]
    out = np.empty((Hp, Wp), np.float32)
    with torch.inference_mode():
        for i in range(0, len(origins), batch):
            part = origins[i:i + batch]
            xb = torch.from_numpy(np.stack([padded[:, ty:ty + win, tx:tx + win] for ty, tx in part]))
            prob = torch.sigmoid(model(xb))[:, 0, halo:halo + tile, halo:halo + tile].numpy()
            for (ty, tx), p in zip(part, prob):
                out[ty:ty + tile, tx:tx + tile] = p
    out = out[:H, :W]
    out[nodata] = np.nan
    return out, len(origins), len(origins) * win * win


def section_unet(cfg: Config) -> list[Row]:
    import torch

    import icemap
    from icemap.model.checkpoint import load_checkpoint, read_metadata

    model_dir = C.unet_checkpoint(depth=cfg.unet_depth, base=cfg.unet_base)
    meta = read_metadata(model_dir)
    depth, exact = C.unet_geometry(model_dir)
    cube = C.memory_cube(cfg.unet_size, bands=tuple(sorted(meta.bands)), chunksize=cfg.unet_chunk, time_steps=1)
    x = cube["reflectance"].sel(band=list(meta.channels)).values[0].astype(np.float32)
    H, W = x.shape[1:]
    model, _ = load_checkpoint(model_dir)
    lo = np.asarray(meta.normalisation["lo"], np.float32)
    hi = np.asarray(meta.normalisation["hi"], np.float32)
    ncores = os.cpu_count() or 1
    m = 2**depth
    overlap = -(-cfg.unet_overlap // m) * m

    def run_icemap(halo: int | None) -> Callable[[], Any]:
        def run() -> Any:
            with C.threads(ncores):
                return icemap.predict(cube, model_dir, tile=cfg.unet_tile, batch_size=cfg.unet_batch,
                                      device="cpu", halo=halo)["ice_probability"].values[0]
        return run

    def run_plain(halo: int, torch_threads: int) -> Callable[[], Any]:
        def run() -> Any:
            # torch's thread count is process-wide (icemap sets it from inside its tasks), so
            # every run sets its own.
            torch.set_num_threads(torch_threads)
            return plain_torch_loop(x, model, lo, hi, tile=cfg.unet_tile, halo=halo, batch=cfg.unet_batch)[0]
        return run

    # Agreement on the same tiles, away from the array edges (where the plain loop pads zeros
    # and icemap, like whole-array inference, does not).
    a, b = run_icemap(None)(), run_plain(exact, ncores)()
    inner = (slice(exact, H - exact), slice(exact, W - exact))
    diff = np.abs(a[inner] - b[inner])
    max_diff = float(np.nanmax(diff)) if np.isfinite(diff).any() else math.nan
    del a, b
    torch_threads_before = torch.get_num_threads()
    # The plain loop runs with torch on every core (a script's default) and with one thread
    # (better when other jobs share the cores: OpenMP's barriers wait for preempted threads);
    # the faster of the two is the baseline, so the ratio never flatters icemap.
    fns = {"icemap_exact": run_icemap(None), "icemap_overlap": run_icemap(overlap)}
    for n in sorted({ncores, 1}):
        fns[f"plain_exact_t{n}"] = run_plain(exact, n)
        fns[f"plain_overlap_t{n}"] = run_plain(overlap, n)
    # Warm already: the agreement check ran icemap (model cached) and the loop once.
    times = interleaved(fns, max(1, min(cfg.repeat, 2)), warmup=False)
    torch.set_num_threads(torch_threads_before)
    best_exact = min((k for k in times if k.startswith("plain_exact")), key=times.__getitem__)
    best_overlap = min((k for k in times if k.startswith("plain_overlap")), key=times.__getitem__)
    times["plain_exact"], times["plain_overlap"] = times[best_exact], times[best_overlap]
    useful = H * W
    w_ie = C.icemap_unet_work((H, W), cfg.unet_chunk, exact, cfg.unet_tile, depth)
    w_io = C.icemap_unet_work((H, W), cfg.unet_chunk, overlap, cfg.unet_tile, depth)
    n_tiles = (-(-H // cfg.unet_tile)) * (-(-W // cfg.unet_tile))
    w_pe = (n_tiles, n_tiles * (cfg.unet_tile + 2 * exact) ** 2)
    w_po = (n_tiles, n_tiles * (cfg.unet_tile + 2 * overlap) ** 2)

    def rate(t: float, work: tuple[int, int]) -> str:
        return (f"{useful / 1e6 / t:.3f} useful Mpx/s, {work[0] / t:.2f} tiles/s, "
                f"{work[1] / useful:.2f} net px per useful px")

    def threads_of(key: str) -> str:
        return f"torch {key.rsplit('_t', 1)[1]} thread(s)"

    def per_net_px(t_i: float, w_i: tuple[int, int], t_p: float, w_p: tuple[int, int]) -> float:
        return (w_i[1] / t_i) / (w_p[1] / t_p)

    arch = f"U-Net depth {depth} base {cfg.unet_base}, {len(meta.channels)} channels"
    geometry = f"tile {cfg.unet_tile}, batch {cfg.unet_batch}, chunks {cfg.unet_chunk}"
    numbers = {"times_s": times, "useful_pixels": useful, "exact_halo": exact, "overlap": overlap,
               "work": {"icemap_exact": w_ie, "plain_exact": w_pe, "icemap_overlap": w_io, "plain_overlap": w_po},
               "max_abs_diff_interior": max_diff, "dask_threads": ncores, "torch_threads_per_dask_thread": 1,
               "plain_best": {"exact": best_exact, "overlap": best_overlap}}
    plain_threads = ", ".join(f"{k[6:]}: {useful / 1e6 / v:.3f} Mpx/s" for k, v in times.items()
                              if k.startswith("plain_") and "_t" in k)
    rows = [
        Row("unet", f"{arch}, {H}x{W} px, exact halo {exact} on both sides ({geometry})",
            f"icemap.predict ({ncores} dask threads x 1 torch thread): {rate(times['icemap_exact'], w_ie)}",
            f"plain torch loop ({threads_of(best_exact)}): {rate(times['plain_exact'], w_pe)}",
            times["plain_exact"] / times["icemap_exact"], "icemap useful px/s relative to the plain loop", 0.9,
            note=f"per network pixel icemap runs at {per_net_px(times['icemap_exact'], w_ie, times['plain_exact'], w_pe):.2f}x "
                 f"the loop (icemap clips windows at the array edge, the loop pads them); max |difference| of "
                 f"probabilities away from the edges: {max_diff:.1e}; plain loop by threads: {plain_threads}",
            numbers=numbers),
        Row("unet", f"icemap exact (halo {exact}) vs a script's usual overlap (halo {overlap})",
            f"icemap.predict: {rate(times['icemap_exact'], w_ie)}",
            f"plain torch loop, halo {overlap} ({threads_of(best_overlap)}): {rate(times['plain_overlap'], w_po)}",
            times["plain_overlap"] / times["icemap_exact"], "icemap useful px/s relative to the plain loop", 0.9,
            note=f"exactness costs network pixels ({w_ie[1] / useful:.2f} vs {w_po[1] / useful:.2f} per useful px): "
                 f"the receptive field is {2 * exact - 2 ** depth}..{2 * exact} px wide, and a {overlap}-px "
                 "overlap leaves seams"),
        Row("unet", f"same halo {overlap} on both sides (equal work per tile)",
            f"icemap.predict(halo={overlap}): {rate(times['icemap_overlap'], w_io)}",
            f"plain torch loop ({threads_of(best_overlap)}): {rate(times['plain_overlap'], w_po)}",
            times["plain_overlap"] / times["icemap_overlap"], "icemap useful px/s relative to the plain loop",
            note=f"isolates the engine (dask, overlap, normalisation, threads) from the halo choice; per network "
                 f"pixel {per_net_px(times['icemap_overlap'], w_io, times['plain_overlap'], w_po):.2f}x"),
    ]
    for r in rows:
        if r.target is not None:
            r.met = r.ratio >= r.target
    return rows


# ---------------------------------------------------------------------------------------------
# scaling on a LocalCluster: time per Mpixel and peak RSS per worker at 1x, 4x, 16x the area
# ---------------------------------------------------------------------------------------------
def _proc_status_mb(key: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{key}:\s+(\d+) kB", text, flags=re.MULTILINE)
    return int(found.group(1)) / 1024.0 if found else None


def _worker_peak_mb() -> float:
    """Peak RSS of this process since the last reset: ``VmHWM`` (Linux), else ``ru_maxrss``.

    ``ru_maxrss`` is not used first because it survives ``exec``: a worker spawned from a big
    client process would report the client's size.
    """
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _worker_warmup(model_dir: str | None) -> float:
    """Import what the job needs (and load the model) so neither lands in the timing.

    Then reset the peak-RSS mark (``/proc/self/clear_refs``) and return the resident size the
    job starts from.
    """
    import gc

    import icemap.index
    import icemap.load
    import icemap.store

    if model_dir:
        import icemap.infer

        icemap.infer.ModelRef.from_path(model_dir).load("cpu")
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    rss = _proc_status_mb("VmRSS")
    return rss if rss is not None else _worker_peak_mb()


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _pin_torch_threads(n: int) -> int:
    """Diagnostic: make icemap's per-task thread sizing give torch ``n`` threads in this worker."""
    import torch

    import icemap.infer

    original = icemap.infer.__dict__.setdefault("_bench_original_set_cpu_threads", icemap.infer._set_cpu_threads)
    if n <= 0:  # restore icemap's own sizing
        icemap.infer._set_cpu_threads = original  # type: ignore[attr-defined]
        return 0
    icemap.infer._set_cpu_threads = lambda: torch.set_num_threads(n)  # type: ignore[attr-defined]
    torch.set_num_threads(n)
    return n


def ndsi_job(size: int, chunk: int, workdir: Path) -> float:
    """The NDSI job end to end, as a user runs it: search -> ingest -> NDSI product (Zarr)."""
    import icemap

    region = C.sample_region(size)
    t0 = time.perf_counter()
    items = icemap.search(region.catalog).item_dicts()
    icemap.write_cube(C.load_cube(items, bands=list(C.NDSI_BANDS), chunksize=chunk), workdir / "cube.zarr")
    icemap.write_product(icemap.map_ndsi(icemap.open_cube(workdir / "cube.zarr")), workdir / "ndsi.zarr")
    return time.perf_counter() - t0


def unet_job(size: int, chunk: int, model_dir: Path, tile: int, batch: int) -> float:
    """U-Net probabilities for one date of a Zarr cube, computed on the cluster."""
    import icemap

    store = C.cube_store(size, bands=("blue", "nir08", "swir16"), chunksize=chunk)
    cube = icemap.open_cube(store).isel(time=slice(-1, None))
    t0 = time.perf_counter()
    _ = icemap.predict(cube, model_dir, tile=tile, batch_size=batch, device="cpu")["ice_probability"].values
    return time.perf_counter() - t0


def section_scaling(cfg: Config) -> list[Row]:
    import contextlib
    import shutil

    from distributed import Client

    from icemap.cluster import local_cluster

    model_dir = C.unet_checkpoint(depth=cfg.unet_depth, base=cfg.unet_base)
    depth, exact = C.unet_geometry(model_dir)
    unet_bands = ("blue", "nir08", "swir16")
    # Data first (cached), so generation never runs on the cluster or inside the timing.
    for size in cfg.scaling_ndsi:
        C.sample_region(size)
    for size in cfg.scaling_unet:
        C.cube_store(size, bands=unet_bands, chunksize=cfg.scaling_chunk_unet)

    def cluster() -> Any:
        stack = contextlib.ExitStack()
        cl = stack.enter_context(local_cluster(n_workers=2, threads_per_worker=1, processes=True))
        client = stack.enter_context(Client(cl))
        return stack, client

    rows: list[Row] = []
    diag: dict[str, Any] = {}
    by_job: dict[str, list[dict[str, Any]]] = {}
    shared = None if cfg.fresh_cluster else cluster()
    try:
        for job in ("ndsi", "unet", "unet-1thread"):
            sizes = cfg.scaling_ndsi if job == "ndsi" else cfg.scaling_unet
            chunk = cfg.scaling_chunk_ndsi if job == "ndsi" else cfg.scaling_chunk_unet
            results = []
            for size in sizes:
                workdir = C.fresh_dir(f"scale-{job}-{size}-")
                stack, client = shared if shared is not None else cluster()
                try:
                    with C.quiet():
                        base = client.run(_worker_warmup, str(model_dir) if job != "ndsi" else None)
                        if job == "unet-1thread":
                            # Diagnostic: one torch thread per worker, as the suggested fix of
                            # icemap.infer._set_cpu_threads would give on this cluster.
                            client.run(_pin_torch_threads, 1)
                        if job == "ndsi":
                            t = ndsi_job(size, chunk, workdir)
                            dates, net, max_window = 2, None, None
                        else:
                            t = unet_job(size, chunk, model_dir, cfg.unet_tile, cfg.unet_batch)
                            dates = 1
                            net = C.icemap_unet_work((size, size), chunk, exact, cfg.unet_tile, depth)[1]
                            max_window = C.icemap_unet_max_window((size, size), chunk, exact, cfg.unet_tile, depth)
                        peak = client.run(_worker_peak_mb)
                        if job == "unet" and size == sizes[-1]:
                            # torch's thread count is per OS thread: ask inside a task, where predict ran.
                            futs = [client.submit(_torch_threads, pure=False, workers=[w], allow_other_workers=False)
                                    for w in client.scheduler_info()["workers"]]
                            diag["torch_threads_set_by_icemap"] = max(client.gather(futs))
                        if job == "unet-1thread":
                            client.run(_pin_torch_threads, 0)  # back to icemap's own sizing
                finally:
                    if shared is None:
                        with C.quiet():
                            stack.close()
                    shutil.rmtree(workdir, ignore_errors=True)
                mpx = size * size * dates / 1e6
                results.append({"size": size, "seconds": t, "mpixels": mpx, "s_per_mpx": t / mpx,
                                "net_px_per_px": (net / (size * size)) if net else None, "max_window": max_window,
                                "peak_worker_mb": max(peak.values()), "start_worker_mb": max(base.values()),
                                "job_worker_mb": max(peak[w] - base[w] for w in peak)})
            by_job[job] = results
            rows.extend(_scaling_rows(job, chunk, by_job[job]))
    finally:
        if shared is not None:
            with C.quiet():
                shared[0].close()
    if "unet" in by_job and "unet-1thread" in by_job:
        n = diag.get("torch_threads_set_by_icemap", 0)
        shipped, pinned = by_job["unet"][-1], by_job["unet-1thread"][-1]
        rows.append(Row(
            "scaling", f"U-Net on a LocalCluster of 2 workers x 1 thread, {shipped['size']} px: torch threads per worker",
            f"as icemap sets them ({n} per worker, {2 * n} on {os.cpu_count()} cores): {shipped['seconds']:.1f} s",
            f"1 per worker (diagnostic patch): {pinned['seconds']:.1f} s",
            pinned["seconds"] / shipped["seconds"],
            "speed with icemap's thread setting relative to one torch thread per worker",
            note="icemap gives torch OMP_NUM_THREADS threads when set (distributed's nanny sets 1), else "
                 "the cores divided by dask's threads", numbers={**diag, "shipped": shipped, "pinned": pinned}))
    return rows


def _scaling_rows(job: str, chunk: int, results: list[dict[str, Any]]) -> list[Row]:
    first = results[0]
    rows = []
    for r in results[1:]:
        area = (r["size"] / first["size"]) ** 2
        t_ratio = r["s_per_mpx"] / first["s_per_mpx"]
        m_ratio = r["peak_worker_mb"] / first["peak_worker_mb"]
        note = (f"s/Mpx {first['s_per_mpx']:.2f} -> {r['s_per_mpx']:.2f}; peak RSS/worker "
                f"{first['peak_worker_mb']:.0f} -> {r['peak_worker_mb']:.0f} MB, of which "
                f"{first['job_worker_mb']:.0f} -> {r['job_worker_mb']:.0f} MB above the warmed-up worker")
        if job != "ndsi":
            per_net = (r["seconds"] / (r["net_px_per_px"] * r["size"] ** 2)) / (
                first["seconds"] / (first["net_px_per_px"] * first["size"] ** 2))
            note += (f"; network px per useful px {first['net_px_per_px']:.2f} -> {r['net_px_per_px']:.2f} "
                     f"(exact halos), time per network px x{per_net:.2f}; largest network window "
                     f"{first['max_window']} -> {r['max_window']} px (torch's activations scale with it)")
        label = {"ndsi": "NDSI end to end (search, ingest, NDSI product)", "unet": "U-Net predict from Zarr",
                 "unet-1thread": "U-Net predict from Zarr, 1 torch thread per worker (diagnostic patch)"}[job]
        worst = max(t_ratio, m_ratio)
        diagnostic = job == "unet-1thread"  # not icemap as shipped: no target
        rows.append(Row("scaling", f"{label}: {first['size']}->{r['size']} px ({area:.0f}x area), chunks {chunk}",
                        f"time/Mpx x{t_ratio:.2f}", f"peak RSS/worker x{m_ratio:.2f}", worst,
                        "largest growth of time per Mpixel or of peak memory per worker",
                        None if diagnostic else 1.15, None if diagnostic else worst <= 1.15,
                        note=note, numbers={"results": results}))
    return rows


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """Where the numbers were taken, with the versions that decide them."""
    from importlib import metadata

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        mem_gb = psutil.virtual_memory().total / 2**30
    except ImportError:
        mem_gb = math.nan
    versions = {}
    for pkg in ("icemap", "numpy", "dask", "distributed", "xarray", "zarr", "rasterio", "stackstac", "odc-stac",
                "torch"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "memory_gb": mem_gb, "versions": versions, "git": rev}


def table(rows: Sequence[Row]) -> str:
    head = "| section | comparison | icemap | baseline | ratio | target | met |\n|---|---|---|---|---|---|---|\n"
    lines = []
    for r in rows:
        target = "-" if r.target is None else (f"<= {r.target:g}" if r.section == "scaling" else f">= {r.target:.3g}")
        met = "-" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(f"| {r.section} | {r.what} | {r.icemap} | {r.baseline} | {_fmt_ratio(r.ratio)} | {target} | {met} |")
    return head + "\n".join(lines)


def notes(rows: Sequence[Row]) -> str:
    out = []
    for i, r in enumerate(rows, 1):
        shortfall = ""
        if r.met is False and r.target is not None:
            if r.section == "scaling":
                shortfall = f" Missed by {100 * (r.ratio / r.target - 1):.0f} %."
            else:
                shortfall = f" Missed by {100 * (1 - r.ratio / r.target):.0f} % ({_fmt_ratio(r.ratio)} vs {r.target})."
        out.append(f"{i}. **{r.section}: {r.what}** - ratio = {r.ratio_means}.{shortfall} {r.note}".rstrip())
    return "\n".join(out)


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    loads = report["load"]
    rows = [Row(**r) for r in report["rows"]]
    return "\n".join([
        BEGIN,
        (f"_Generated by `{report['command']}` on {report['started']} in {report['duration_s']:.0f} s "
         f"({report['config']} sizes)._"),
        "",
        f"Machine: {m['platform']}, Python {m['python']}, {m['cpu']}, {m['cpu_count']} CPUs, "
        f"{m['memory_gb']:.0f} GiB RAM; icemap {m['versions'].get('icemap')} (git {m['git']}), "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if k != "icemap" and v) + ".",
        "",
        "Load average (1 min) at the start of each section: "
        + ", ".join(f"{k} {v[0]:.1f}" for k, v in loads.items())
        + f" on {m['cpu_count']} CPUs. A load above the CPU count means other jobs took a share of the "
          "cores during the measurement: both sides of every ratio ran interleaved in the same minutes.",
        "",
        table(rows),
        "",
        "Row notes:",
        "",
        notes(rows),
        END,
    ])


def write_markdown(path: Path, block: str) -> None:
    """Replace the generated block in ``path`` (or create the file around it)."""
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            pre, rest = text.split(BEGIN, 1)
            post = rest.split(END, 1)[1]
            path.write_text(pre + block + post)
            return
        path.write_text(text.rstrip() + "\n\n" + block + "\n")
        return
    path.write_text("# Benchmarks\n\n" + block + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--markdown", type=Path, help="update the generated block of this Markdown file")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that everything runs")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--repeat", type=int, help="timed runs per side (default 3; 1 with --smoke)")
    args = parser.parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    if args.repeat:
        cfg = Config(**{**asdict(cfg), "repeat": args.repeat})
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")

    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/ratios.py" + ("" if not argv_list else " " + shlex.join(argv_list))
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    funcs = {"ndsi": section_ndsi, "jobs": section_jobs, "ingest": section_ingest, "loaders": section_loaders, "unet": section_unet,
             "scaling": section_scaling}
    rows: list[Row] = []
    loads: dict[str, tuple[float, float, float]] = {}
    durations: dict[str, float] = {}
    print(f"icemap ratio report ({cfg.name}); cache {C.cache_dir()}; load {loadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs", flush=True)
    for name in chosen:
        loads[name] = loadavg()
        ts = time.perf_counter()
        new = funcs[name](cfg)
        durations[name] = time.perf_counter() - ts
        for r in new:
            flag = "" if r.met is None else ("  [target met]" if r.met else "  [TARGET MISSED]")
            print(f"[{name} {durations[name]:.0f}s] {r.what}\n    icemap:   {r.icemap}\n    baseline: {r.baseline}\n"
                  f"    ratio {_fmt_ratio(r.ratio)} ({r.ratio_means}){flag}\n    {r.note}", flush=True)
        rows.extend(new)
    report = {"command": command, "started": started.isoformat(timespec="seconds"),
              "duration_s": time.perf_counter() - t0, "config": cfg.name, "config_values": asdict(cfg),
              "machine": machine(), "load": loads, "section_seconds": durations,
              "rows": [asdict(r) for r in rows]}
    print()
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    if args.markdown:
        write_markdown(args.markdown, render_markdown(report))
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


if __name__ == "__main__":
    raise SystemExit(main())
