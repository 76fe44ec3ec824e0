"""Shared fixtures of the benchmark suite and the ratio report: cached data, models, counters.

Why a cache: generating a sample region costs seconds (about 30 s and 1.3 GB at 2048 px with
three dates) and asv calls ``setup`` in a fresh process for every benchmark and repeat. Every
region, ingested cube and model checkpoint is therefore written once under
:func:`cache_dir` and reused; :func:`icemap.sample.make_sample_region` itself returns at once
when the folder already holds a complete region with the same parameters, and cube stores are
only rewritten when :func:`icemap.cube_status` says they are incomplete.

Data is made and processed through icemap's public API, so the numbers measure what a user
gets; the two exceptions are :func:`load_cube` (the same function, imported from its module,
see there why) and :func:`icemap_unet_work`, which only *counts* the windows ``predict`` will
compute, with icemap's private chunk-alignment helper.
Nothing in this module has an asv prefix (``time_``, ``track_``, ``peakmem_``...): asv imports
every module under ``benchmarks/`` while discovering benchmarks.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

#: Environment variable naming the cache folder (default: ``<tmp>/icemap-bench-cache``).
CACHE_ENV = "ICEMAP_BENCH_CACHE"
#: Landsat pixels are 30 m: one pixel is 900 m2.
PIXEL_KM2 = 30.0 * 30.0 / 1e6
#: The bands the NDSI path needs; ingest benchmarks use all reflective bands (icemap's default).
NDSI_BANDS = ("green", "swir16")
#: Study b's 6-5-2 composite: a realistic, small input set for the U-Net benchmarks.
UNET_CHANNELS = ("swir16", "nir08", "blue")

_LOCK = threading.Lock()


def cache_dir() -> Path:
    """The folder holding cached regions, cubes and models (created on first use)."""
    root = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "icemap-bench-cache")
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence icemap's and the libraries' warnings: benchmarks report numbers, not advice."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def sample_region(size: int, *, n_dates: int = 2, split: bool = True, seed: int = 0, per_season: int = 1) -> Any:
    """A sample region of ``size`` x ``size`` pixels, generated once into the cache.

    ``split=True`` (icemap's default) delivers the first date as two scenes that must be
    mosaicked; ``split=False`` gives one scene per date, which keeps a hand-written baseline
    (one item -> one time step) doing exactly the same work as icemap.
    """
    from icemap.sample import make_sample_region

    season_tag = f"-p{per_season}" if per_season != 1 else ""
    folder = cache_dir() / f"region-{size}-d{n_dates}-{'split' if split else 'single'}-s{seed}{season_tag}"
    with _LOCK:
        return make_sample_region(folder, size=size, n_dates=n_dates, seed=seed, split_first_date=split,
                                  per_season=per_season)


def load_cube(items: Any, **kwargs: Any) -> Any:
    """:func:`icemap.load`, imported from its module.

    ``icemap.load`` is resolved lazily by ``icemap.__getattr__``; once the submodule
    ``icemap.load`` has been imported (``from icemap.load import ...``), Python's import system
    sets the package attribute ``load`` to the *module*, so ``icemap.load(items)`` raises
    "'module' object is not callable" depending on import order. Importing the function from
    its module is immune to that.
    """
    from icemap.load import load

    return load(items, **kwargs)


def region_items(size: int, *, n_dates: int = 2, split: bool = True, seed: int = 0) -> list[dict[str, Any]]:
    """The region's STAC items as dicts, through icemap's own search of its static catalog."""
    import icemap

    region = sample_region(size, n_dates=n_dates, split=split, seed=seed)
    return list(icemap.search(region.catalog).item_dicts())


def cube_store(size: int, *, bands: Sequence[str] | None = None, n_dates: int = 2, split: bool = True,
               chunksize: int = 512, seed: int = 0) -> Path:
    """An ingested, complete Zarr cube of the region, in the cache (written once)."""
    import icemap

    name = "all" if bands is None else "-".join(bands)
    seed_tag = f"-s{seed}" if seed else ""
    path = cache_dir() / f"cube-{size}-d{n_dates}-{'split' if split else 'single'}-{name}-c{chunksize}{seed_tag}.zarr"
    with quiet():
        if path.exists():
            try:
                if not icemap.cube_status(path).incomplete:
                    return path
            except Exception:  # noqa: BLE001 - unreadable or unfinished in any way: rewrite it
                shutil.rmtree(path, ignore_errors=True)
        cube = load_cube(region_items(size, n_dates=n_dates, split=split, seed=seed),
                           bands=list(bands) if bands else None, chunksize=chunksize)
        icemap.write_cube(cube, path)
    return path


def memory_cube(size: int, *, bands: Sequence[str] | None = None, n_dates: int = 2, split: bool = True,
                chunksize: int = 512, time_steps: int | None = None) -> Any:
    """The cube with its pixels in memory (numpy), re-chunked lazily as dask arrays.

    This isolates compute from I/O: the same numbers a baseline gets as plain numpy arrays.
    ``time_steps`` keeps only the last steps (the first date of a split region is a mosaic).
    """
    import icemap

    with quiet():
        cube = icemap.open_cube(cube_store(size, bands=bands, n_dates=n_dates, split=split,
                                           chunksize=chunksize))
    if time_steps is not None:
        cube = cube.isel(time=slice(-time_steps, None))
    cube = cube.load()
    return cube.chunk({"time": 1, "band": 1, "y": chunksize, "x": chunksize})


def cube_nbytes(cube: Any) -> int:
    """Uncompressed bytes of a cube's data variables (what an ingest delivers)."""
    return int(sum(cube[v].nbytes for v in cube.data_vars))


def cube_mpixels(cube: Any) -> float:
    """Millions of (time step, y, x) pixels: one pixel holds every band of one place and date."""
    return cube.sizes["time"] * cube.sizes["y"] * cube.sizes["x"] / 1e6


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def unet_checkpoint(*, depth: int = 4, base: int = 16, channels: Sequence[str] = UNET_CHANNELS,
                    seed: int = 0) -> Path:
    """A U-Net checkpoint with random but fixed weights (and batch-norm statistics), cached.

    Random weights cost exactly what trained ones cost; fixing the seed makes every run use
    the same model, so icemap and the baselines run the same network.
    """
    import torch

    from icemap.model.checkpoint import METADATA, CheckpointMeta, save_checkpoint
    from icemap.model.inputs import Normalisation
    from icemap.model.unet import UNet, UNetConfig

    folder = cache_dir() / f"unet-d{depth}-b{base}-{'-'.join(channels)}-s{seed}"
    if (folder / METADATA).exists():
        return folder
    with _LOCK:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = UNet(UNetConfig(in_channels=len(channels), depth=depth, base=base))
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.3, 0.3, generator=gen)
                    m.running_var.uniform_(0.5, 2.0, generator=gen)
        bands = [c for c in channels if c not in ("ndsi", "ndwi", "elevation", "slope")]
        norm = Normalisation([0.0] * len(channels), [0.6] * len(channels))
        meta = CheckpointMeta(architecture={}, channels=list(channels), bands=bands,
                              normalisation=norm.to_dict(), threshold=0.5)
        save_checkpoint(model, meta, folder)
    return folder


def unet_geometry(model_dir: Path | str) -> tuple[int, int]:
    """``(depth, exact_halo)`` of a checkpoint, as :func:`icemap.predict` computes them."""
    from icemap.infer import default_halo
    from icemap.model.checkpoint import read_metadata
    from icemap.model.unet import UNetConfig

    arch = read_metadata(model_dir).architecture
    depth = int(arch.get("depth", 4))
    return depth, default_halo(depth, UNetConfig(**arch).receptive_field)


def _axis_windows(size: int, chunks: Sequence[int], halo: int, tile: int, m: int) -> list[int]:
    """Window lengths along one axis that icemap's predict_array feeds the network."""
    out: list[int] = []
    start = 0
    n = len(chunks)
    for i, c in enumerate(chunks):
        top = halo if i > 0 else 0
        bottom = halo if i < n - 1 else 0
        h = c + top + bottom
        for t in range(top, h - bottom, tile):
            t1 = min(t + tile, h - bottom)
            w0, w1 = max(0, t - halo), min(h, t1 + halo)
            out.append(-(-(w1 - w0) // m) * m)
        start += c
    return out


def icemap_unet_work(shape: tuple[int, int], chunk: int, halo: int, tile: int, depth: int) -> tuple[int, int]:
    """``(tiles, model input pixels)`` icemap computes per time step for a ``(H, W)`` grid.

    Mirrors :func:`icemap.infer.predict`'s aligned chunks and :func:`predict_array`'s tiling
    (no time is spent running anything), so reports can say how many network pixels each
    useful output pixel costs.
    """
    from icemap.infer import _aligned_chunks

    m = 2**depth
    ys = _axis_windows(shape[0], _aligned_chunks(shape[0], chunk, halo, m), halo, tile, m)
    xs = _axis_windows(shape[1], _aligned_chunks(shape[1], chunk, halo, m), halo, tile, m)
    return len(ys) * len(xs), int(sum(ys) * sum(xs))


def icemap_unet_max_window(shape: tuple[int, int], chunk: int, halo: int, tile: int, depth: int) -> int:
    """Edge of the largest window :func:`icemap.predict` feeds the network for this grid."""
    from icemap.infer import _aligned_chunks

    m = 2**depth
    return max(max(_axis_windows(n, _aligned_chunks(n, chunk, halo, m), halo, tile, m)) for n in shape)


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------
def best_time(fn: Callable[[], Any], *, repeat: int = 3, budget_s: float = 30.0) -> float:
    """Best wall time of ``fn`` over up to ``repeat`` runs (fewer once ``budget_s`` is spent).

    The minimum is the least noisy estimate on a shared machine: other jobs only ever add time.
    """
    best = math.inf
    spent = 0.0
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best = min(best, dt)
        spent += dt
        if spent > budget_s:
            break
    return best


@contextlib.contextmanager
def threads(n: int | None = None) -> Iterator[int]:
    """Dask's threaded scheduler with ``n`` threads (default: every core) for the block."""
    import dask

    n = n or os.cpu_count() or 1
    with dask.config.set(scheduler="threads", num_workers=n):
        yield n


def tasks_per_chunk(arr: Any) -> float:
    """Tasks the scheduler receives for a collection, divided by its number of output chunks.

    The graph is optimised first (culled to what the output needs, blockwise-fused), as
    ``compute`` does: unused bands and fused element-wise steps do not count.
    """
    import dask

    data = getattr(arr, "data", arr)
    (opt,) = dask.optimize(data)
    return len(opt.__dask_graph__()) / max(1, math.prod(len(c) for c in data.chunks))


def fresh_dir(prefix: str) -> Path:
    """A new temporary folder for outputs (inside the cache's filesystem)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=cache_dir()))


def has_cuda() -> bool:
    """True when torch is importable and sees a CUDA device."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
