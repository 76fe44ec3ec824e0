"""Zarr cubes: layout, resumable writes, appends, and reading back.

A cube store is written in three moves, so that a crash at any moment costs time, never data:

1. **template**: the full layout (every array, coordinate, fill value and attribute) is written
   without data, then the ``icemap:layout`` attribute is set last. A store without it holds no
   finished data and is simply recreated.
2. **region writes** of every pending time step, in one task graph; once a step's pixels are
   written, its entry in the ``complete`` array (time,) is set to 1 (in step order). A step
   interrupted half-way keeps ``complete == 0`` and is redone on the next run.
3. **append**: dates not yet in the store are appended along ``time`` (layout first, then
   region writes as above).

:func:`open_cube` shows only complete time steps (with a :class:`~icemap.errors.StoreWarning`
naming the others), so an interrupted store never reads back wrong values.

Dask chunks are kept identical to Zarr chunks: a dask chunk that straddles two Zarr chunks
would be written by two tasks at once, and zarr 3 silently loses one of the two writes.
"""

from __future__ import annotations

import json
import os
import queue
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from icemap.errors import StoreError, StoreWarning
from icemap.options import get_option
from icemap.interop import finish_store

__all__ = ["write_cube", "write_timesteps", "open_cube", "cube_status", "WriteReport", "CubeStatus"]

LAYOUT_ATTR = "icemap:layout"
LAYOUT_VERSION = 1
_COMPLETE = "complete"
_CUBE_VARS = ("reflectance", "qa_pixel")
_FILL = {"reflectance": np.float32(np.nan), "qa_pixel": np.uint16(1), _COMPLETE: np.uint8(0)}

Progress = Callable[[int, int, str], None]


@dataclass
class WriteReport:
    """What a write did: which time steps it wrote, skipped (already complete) or appended."""

    path: str
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    appended: list[str] = field(default_factory=list)
    created: bool = False


@dataclass(frozen=True)
class CubeStatus:
    """A store's state: every time step and whether it is complete."""

    path: str
    times: tuple[str, ...]
    complete: tuple[bool, ...]
    bands: tuple[str, ...]
    shape: tuple[int, int]
    crs: str | None

    @property
    def incomplete(self) -> tuple[str, ...]:
        return tuple(t for t, c in zip(self.times, self.complete) if not c)


def _fmt_time(t: Any) -> str:
    return str(np.datetime_as_string(np.datetime64(t, "s"), unit="s")) + "Z"


def _store_exists(path: str, storage_options: Mapping[str, Any] | None) -> bool:
    import zarr

    try:
        zarr.open_group(path, mode="r", storage_options=storage_options, use_consolidated=False)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError):  # type: ignore[attr-defined]
        return False
    return True


def _check_target_is_free(path: str, storage_options: Mapping[str, Any] | None) -> None:
    """Refuse to create a store where something else already lives.

    The template is written with ``mode="w"``, which clears whatever is at ``path``: pointed by
    mistake at a folder of other files (``--out ~/data``), it would delete them. A file, or a
    folder (prefix) holding anything but a Zarr store, is therefore refused; an empty folder is
    fine. A local parent that is a file gives a clear error instead of NotADirectoryError.
    """
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    try:
        fs, root = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise StoreError(f"cannot write to {path}: {exc}") from None
    if isinstance(fs, LocalFileSystem):
        from pathlib import Path

        for parent in Path(root).parents:
            if parent.exists():
                if not parent.is_dir():
                    raise StoreError(f"cannot create {path}: {parent} is a file, not a folder; choose another --out")
                break
    if fs.isfile(root):
        raise StoreError(f"{path} is a file, not a Zarr store; choose another --out (icemap never overwrites it)")
    if fs.exists(root):
        entries = fs.ls(root, detail=False)
        if entries:
            raise StoreError(
                f"{path} already holds {len(entries)} file(s) or folder(s) and is not a Zarr store; icemap "
                "will not overwrite it. Choose another --out, or remove it yourself if it is disposable"
            )


def _group_attrs(path: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    import zarr

    return dict(zarr.open_group(path, mode="r", storage_options=storage_options, use_consolidated=False).attrs)


def _fill_for(name: str, dtype: np.dtype) -> Any:
    """The fill value a variable is stored with: ours where we know it, else by dtype."""
    if name in _FILL:
        return _FILL[name]
    if np.issubdtype(dtype, np.floating):
        return dtype.type(np.nan)
    if np.issubdtype(dtype, np.unsignedinteger):
        return np.iinfo(dtype).max
    raise StoreError(f"variable {name!r} of dtype {dtype} has no fill value; give it a float or unsigned dtype")


def _stepped_vars(ds: Any) -> list[str]:
    return [v for v in ds.data_vars if v != _COMPLETE and "time" in ds[v].dims]


def _prepare(ds: Any, chunksize: int | None) -> Any:
    """Align dask chunks to the Zarr chunks we are about to declare, and clean coordinates."""
    import rioxarray  # noqa: F401  (registers .rio: a dataset built by hand may not have it yet)

    if ds.rio.crs is None:
        raise StoreError("the dataset has no CRS; load it with icemap.load or set one with ds.rio.write_crs")
    names = _stepped_vars(ds)
    if not names:
        raise StoreError("nothing to write: no variable has a time dimension")
    for name in names:
        if ds[name].dims[0] != "time" or ds[name].dims[-2:] != ("y", "x"):
            raise StoreError(f"{name} must have dims (time, ..., y, x), not {ds[name].dims}")
    first = ds[names[0]]
    if chunksize is None:
        chunks = dict(zip(first.dims, first.chunks)) if first.chunks else {}
        cy = max(chunks.get("y", (ds.sizes["y"],)))
        cx = max(chunks.get("x", (ds.sizes["x"],)))
    else:
        cy = cx = int(chunksize)
    ds = ds.chunk({"time": 1, "y": cy, "x": cx, **({"band": 1} if "band" in ds.dims else {})})
    # Variable-length strings (numpy-backed), so appended steps may carry longer id lists
    # than the first; zarr 3 has a stable spec for those, not for fixed-width unicode.
    for name in ("item_ids", "platform", "band"):
        if name in ds.coords:
            ds = ds.assign_coords({name: (ds[name].dims, np.asarray(ds[name].values, dtype=object))})
    ds[_COMPLETE] = ds["time"].copy(data=np.zeros(ds.sizes["time"], np.uint8)).chunk({"time": 1})
    ds[_COMPLETE].attrs = {"long_name": "1 once every pixel of the time step is written"}
    for name in names:
        # Explicit encodings replace .encoding, so keep the CRS link as an attribute.
        ds[name].attrs["grid_mapping"] = "spatial_ref"
    return ds, (cy, cx)


def _encoding(ds: Any, cy: int, cx: int, zarr_format: int) -> dict[str, dict[str, Any]]:
    enc: dict[str, dict[str, Any]] = {
        _COMPLETE: {"chunks": (1,), "_FillValue": _FILL[_COMPLETE]},
        "time": {"units": "seconds since 1970-01-01", "calendar": "proleptic_gregorian", "dtype": "int64", "chunks": (1024,)},
    }
    for name in _stepped_vars(ds):
        var = ds[name]
        chunks = tuple({"time": 1, "band": 1, "y": cy, "x": cx}.get(d, var.sizes[d]) for d in var.dims)
        enc[name] = {"chunks": chunks, "_FillValue": _fill_for(name, var.dtype)}
    if zarr_format == 3:
        # zarr 3 keeps its own fill value (default 0) apart from the CF _FillValue attribute;
        # state both, or unwritten qa_pixel chunks would read as 0 ("clear") instead of fill.
        for name in [*_stepped_vars(ds), _COMPLETE]:
            enc[name]["fill_value"] = enc[name]["_FillValue"]
    for name in ("item_ids", "platform"):
        if name in ds.coords:
            enc[name] = {"chunks": (1024,)}
    return enc


# Steps flagged by tasks of a local (threaded or synchronous) scheduler, per write call: the
# flag tasks report here and the scheduler's main thread reads it between tasks (see
# _write_steps). Task keys cannot be used for that: optimisation may fuse the last flag into
# the graph's final task under another name. Processes of a distributed cluster never see it.
_LOCAL_FLAGS: dict[str, queue.SimpleQueue[int]] = {}


def _mark_complete(written: np.ndarray, *previous: np.ndarray, flags: Any, index: int, run: str) -> np.ndarray:
    """Set one step's ``complete`` entry: a task that runs once the step's pixels are stored
    (``written``) and the previous step's flag is set (``previous``)."""
    flags[index] = np.uint8(1)
    reported = _LOCAL_FLAGS.get(run)
    if reported is not None:
        reported.put(index)
    return np.ones((), np.uint8)


def _store_block(block: np.ndarray, target: Any, index: int, block_info: Any = None) -> np.ndarray:
    """Write one dask block of a time step into its Zarr chunk; return a 1-element token.

    The token (not the block) is what the step's flag waits on, so nothing is gathered or
    concatenated: the pixels go from the kernel's output straight into the store.
    """
    location = block_info[0]["array-location"]
    target[(slice(index, index + 1), *(slice(lo, hi) for lo, hi in location[1:]))] = block
    return np.ones((1,) * block.ndim, np.uint8)


def _step_writes(ds: Any, group: Any, i: int, index: int) -> list[Any]:
    """Tasks that put time step ``i`` of ``ds`` at ``index`` of the store, one per chunk.

    The arrays go straight into their Zarr arrays: the template fixed every encoding (plain
    dtypes, fill values, chunks equal to the dask chunks), so xarray's per-call encoding and
    region checks would only repeat themselves for every step. Coordinates along ``time``
    were written with the template or the append.
    """
    import uuid

    writes = []
    for name in _stepped_vars(ds):
        arr = group[name]
        data = ds[name].data[i:i + 1]
        if data.dtype != arr.dtype:
            if not np.can_cast(data.dtype, arr.dtype, casting="same_kind"):
                raise StoreError(f"{name} is {data.dtype} but the store holds {arr.dtype}; write to a new --out")
            data = data.astype(arr.dtype)
        writes.append(data.map_blocks(
            _store_block, target=arr, index=index, dtype=np.uint8, meta=np.empty((0,) * data.ndim, np.uint8),
            chunks=tuple((1,) * len(c) for c in data.chunks),
            # Named, not hashed: tokenizing the Zarr array would cost more than the write.
            name=f"icemap-store-{name}-{index}-{uuid.uuid4().hex}",
        ))
    return writes


def _waves(steps: int, rows: int, row_chunks: int, max_chunks: int) -> list[list[tuple[int, int, int]]]:
    """Cut the pending work, step by step and row of chunks by row, into waves.

    Returns waves of ``(step position, first row, end row)`` slabs, each wave at most
    ``max_chunks`` spatial chunks (but at least one row), in step order.
    """
    per_wave = max(1, max_chunks // max(row_chunks, 1))
    waves: list[list[tuple[int, int, int]]] = [[]]
    room = per_wave
    for s in range(steps):
        r = 0
        while r < rows:
            if room == 0:
                waves.append([])
                room = per_wave
            take = min(room, rows - r)
            waves[-1].append((s, r, r + take))
            room -= take
            r += take
    return waves


def _wave_chunks(ds: Any) -> int:
    """Spatial chunks a wave may hold: the ``write_wave`` option, else two per thread.

    Two per thread keep every thread busy while a wave's last chunks are written (measured on
    the 4096-px map job: within 2 % of one unbounded graph), and bound what reads can run ahead
    (NDSI ingest, 512 -> 2048 px, when waves of slabs still ran on clusters too: peak worker
    memory x1.11, x1.19 with four per thread, x1.37 with no waves).
    """
    chunks = get_option("write_wave")
    if chunks is None:
        import dask

        client = _distributed_client()
        threads = sum(client.nthreads().values()) if client is not None else (
            dask.config.get("num_workers", None) or os.cpu_count() or 1)
        chunks = 2 * int(threads)
    return max(int(chunks), 1)


def _write_steps(ds: Any, path: str, steps: list[tuple[int, int, str]],
                 storage_options: Mapping[str, Any] | None, progress: Progress | None) -> list[str]:
    """Write the pending time steps in waves of spatial slabs; flag each step once it is stored.

    Two things are bounded here. **Idle threads**: one graph per step would leave threads
    waiting at the end of each step for its last chunk, so a wave spans steps (the next step's
    reads start while the last chunks of this one are written). **Memory**: a graph of all
    the work lets a scheduler run reads ahead of the writes that free them (distributed does
    not hold back reads that are not root tasks, as the loader's are), so a worker's memory
    would grow with the area; a wave holds at most a few chunks per thread (the
    ``write_wave`` option, default two per thread), whatever the area. On a distributed
    cluster a wave is one whole time step (see the comment below), as before the waves.

    Each step's ``complete`` flag is a task of the wave holding the step's last slab; it
    depends on that wave's store tasks of the step *and* on the previous step's flag, so
    flags are set in step order: a run interrupted at any moment leaves every flagged step
    fully written, and ``progress`` (called in step order, as each flag lands) can stop the
    run after any step.
    """
    import uuid

    import dask.array as da
    import zarr

    group = zarr.open_group(path, mode="r+", storage_options=storage_options, use_consolidated=False)
    flags_arr = group[_COMPLETE]
    run = uuid.uuid4().hex
    writes = [_step_writes(ds, group, i, index) for i, index, _ in steps]
    y_blocks, x_blocks = writes[0][0].numblocks[-2:]
    labels = {index: t for _, index, t in steps}
    done: list[str] = []

    def step_done(label: str) -> None:
        done.append(label)
        if progress is not None:
            progress(len(done), len(steps), label)

    max_chunks = _wave_chunks(ds)
    if _distributed_client() is not None:
        # On a cluster a wave is one whole step: slabs of one step in successive computes share
        # upstream tasks (a U-Net's halo reads), and a key resubmitted while the cluster was
        # still releasing it failed on a dask-gateway worker with a KeyError. Whole steps share
        # none, so memory is bounded by one step there, not by a slab.
        max_chunks = y_blocks * x_blocks
    for wave in _waves(len(steps), y_blocks, x_blocks, max_chunks):
        targets: list[Any] = []
        flags: list[tuple[Any, str]] = []
        previous: list[Any] = []
        for s, r0, r1 in wave:
            # The slab's write tokens, summed to one 0-d task.
            written = da.stack([w.blocks[(slice(None),) * (w.ndim - 2) + (slice(r0, r1),)].sum()
                                for w in writes[s]]).sum()
            if r1 < y_blocks:
                targets.append(written)
                continue
            _, index, label = steps[s]
            flag = da.map_blocks(
                _mark_complete, written, *previous, flags=flags_arr, index=index, run=run, dtype=np.uint8,
                meta=np.empty((), np.uint8), name=f"icemap-complete-{index}-{uuid.uuid4().hex}",
            )
            previous = [flag]
            targets.append(flag)
            flags.append((flag, label))
        # Computed together: one optimisation pass sees that a step's products share their
        # kernel task (NDSI and ice from one pass) and keeps it shared.
        _compute_wave(targets, flags, run, labels, step_done)
    return done


def _compute_wave(targets: list[Any], flags: list[tuple[Any, str]], run: str, labels: Mapping[int, str],
                  step_done: Callable[[str], None]) -> None:
    """Compute one wave; call ``step_done`` for each flag, in step order, as it lands."""
    import dask

    client = _distributed_client()
    if client is not None:
        futures = client.compute(targets)
        labels_of = {id(t): label for t, label in flags}
        try:
            # In order: flags are chained, so they land in step order anyway. No default
            # client is needed (the Client may be set through dask.config only).
            for fut, target in zip(futures, targets):
                fut.result()
                if id(target) in labels_of:
                    step_done(labels_of[id(target)])
        except BaseException:
            client.cancel(futures)
            raise
        return

    from dask.callbacks import Callback

    reported: queue.SimpleQueue[int] = queue.SimpleQueue()
    told: set[str] = set()

    def drain(*_: Any) -> None:
        # Runs in the scheduler's thread after each task and before the next ones start:
        # a progress callback that raises stops the run right after the step it was told of.
        while not reported.empty():
            label = labels[reported.get()]
            told.add(label)
            step_done(label)

    _LOCAL_FLAGS[run] = reported
    try:
        with Callback(posttask=drain):
            dask.compute(*targets)
        drain()
    finally:
        del _LOCAL_FLAGS[run]
    # A multiprocessing scheduler runs the flags elsewhere: they are all set by now.
    for _, label in flags:
        if label not in told:
            step_done(label)


def _distributed_client() -> Any:
    """The distributed Client that ``compute`` would use now, or None for a local scheduler."""
    import dask.base

    scheduler = dask.base.get_scheduler()
    owner = getattr(scheduler, "__self__", None)
    if owner is None or type(owner).__module__.split(".")[0] != "distributed":
        return None
    return owner


def _check_compatible(existing: Any, ds: Any, path: str) -> None:
    problems = []
    if "band" in ds.dims or "band" in existing.dims:
        bands_old = [str(b) for b in existing["band"].values] if "band" in existing.dims else []
        bands_new = [str(b) for b in ds["band"].values] if "band" in ds.dims else []
        if bands_old != bands_new:
            problems.append(f"bands {bands_new} != stored {bands_old}")
    if set(_stepped_vars(ds)) != set(_stepped_vars(existing)):
        problems.append(f"variables {sorted(_stepped_vars(ds))} != stored {sorted(_stepped_vars(existing))}")
    for dim in ("x", "y"):
        a, b = existing[dim].values, ds[dim].values
        if a.shape != b.shape or not np.allclose(a, b, rtol=0, atol=1e-6):
            problems.append(f"{dim} grid differs ({b.size} vs stored {a.size} pixels)")
    crs_old = existing.rio.crs
    if crs_old is not None and crs_old != ds.rio.crs:
        problems.append(f"CRS {ds.rio.crs} != stored {crs_old}")
    if problems:
        raise StoreError(
            f"{path} holds data on another grid, band or variable set ({'; '.join(problems)}). "
            "Write to a new --out, or repeat the first run's options"
        )


def write_cube(
    ds: Any,
    path: str | os.PathLike[str],
    *,
    zarr_format: Literal[2, 3] | None = None,
    chunksize: int | None = None,
    attrs: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> WriteReport:
    """Write (or finish, or extend) a cube store; each time step is flagged once written.

    Parameters
    ----------
    ds
        A cube from :func:`icemap.load` (``reflectance``, ``qa_pixel``, CRS).
    path
        Local path or fsspec URL (``s3://...``) of the Zarr store.
    zarr_format
        3 (default) or 2, for readers that only know Zarr v2.
    chunksize
        Spatial chunk edge of the store; default the dataset's own dask chunks.
    attrs
        Provenance to record (JSON-serialisable). Never put credentials here.
    storage_options
        fsspec options for remote stores (credentials come from the environment).
    progress
        Called as ``progress(done, total, label)`` after each time step.

    Returns
    -------
    WriteReport
        Time steps written, skipped because complete, and appended.
    """

    missing = [v for v in _CUBE_VARS if v not in ds]
    if missing:
        raise StoreError(f"a cube needs variables {_CUBE_VARS}; this dataset lacks {missing}")
    if ds["reflectance"].dims != ("time", "band", "y", "x"):
        raise StoreError(f"reflectance must have dims (time, band, y, x), not {ds['reflectance'].dims}")
    return write_timesteps(ds, path, zarr_format=zarr_format, chunksize=chunksize, attrs=attrs,
                           storage_options=storage_options, progress=progress)


def write_timesteps(
    ds: Any,
    path: str | os.PathLike[str],
    *,
    zarr_format: Literal[2, 3] | None = None,
    chunksize: int | None = None,
    attrs: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> WriteReport:
    """Write every variable with a time dimension, resumably, each time step flagged once written.

    The machinery behind :func:`write_cube` and product stores (``ndsi``, ``ice``,
    ``ice_probability``): template, region writes with completion flags, appends. Fill
    values: NaN for floats, ``qa_pixel`` 1, otherwise the dtype's maximum (255 for uint8).
    """
    path = os.fspath(path)
    if zarr_format is None:
        zarr_format = get_option("zarr_format")
    if zarr_format not in (2, 3):
        raise StoreError(f"zarr_format must be 2 or 3, got {zarr_format!r}")
    ds, (cy, cx) = _prepare(ds, chunksize)
    report = WriteReport(path=path)
    new_times = [_fmt_time(t) for t in ds["time"].values]
    if len(set(new_times)) != len(new_times):
        raise StoreError("the cube has repeated time steps; load with mosaic=True to merge them")

    exists = _store_exists(path, storage_options)
    if not exists:
        _check_target_is_free(path, storage_options)
    elif _repair_interrupted_append(path, storage_options):
        warnings.warn(f"{path}: repaired an interrupted append; its dates are written again", StoreWarning,
                      stacklevel=2)
    if exists and _group_attrs(path, storage_options).get(LAYOUT_ATTR) is None:
        # Interrupted before its layout was finished: no step can be complete. Start over.
        warnings.warn(f"{path} was left unfinished before any data; recreating it", StoreWarning, stacklevel=2)
        exists = False

    if not exists:
        enc = _encoding(ds, cy, cx, zarr_format)
        tmpl = ds.copy()
        tmpl.attrs = {**ds.attrs, **dict(attrs or {}), "icemap:chunks": [cy, cx]}
        tmpl.to_zarr(path, mode="w", compute=False, encoding=enc, zarr_format=zarr_format,
                     storage_options=storage_options, consolidated=False)
        _set_attrs(path, {LAYOUT_ATTR: LAYOUT_VERSION}, storage_options)
        report.created = True
        stored_times = new_times
        complete = [False] * len(new_times)
    else:
        existing = _open_raw(path, storage_options)
        _check_compatible(existing, ds, path)
        stored_chunks = existing.attrs.get("icemap:chunks")
        if stored_chunks and list(stored_chunks) != [cy, cx]:
            ds = ds.chunk({"y": stored_chunks[0], "x": stored_chunks[1]})
            cy, cx = stored_chunks
        stored_times = [_fmt_time(t) for t in existing["time"].values]
        complete = [bool(c) for c in existing[_COMPLETE].values]
        to_append = [i for i, t in enumerate(new_times) if t not in stored_times]
        if to_append:
            extra = ds.isel(time=to_append)
            extra = extra.drop_vars([c for c in extra.coords if "time" not in extra[c].dims])
            # to_zarr rewrites the group attributes on append: carry the stored ones over.
            extra.attrs = dict(existing.attrs)
            extra.to_zarr(path, append_dim="time", compute=False, storage_options=storage_options,
                          consolidated=False)
            stored_times += [new_times[i] for i in to_append]
            complete += [False] * len(to_append)
            report.appended = [new_times[i] for i in to_append]
        if attrs:
            _set_attrs(path, {"icemap:last_run": dict(attrs)}, storage_options)

    todo = [(i, stored_times.index(t), t) for i, t in enumerate(new_times) if not complete[stored_times.index(t)]]
    report.skipped = [t for t in new_times if complete[stored_times.index(t)]]
    if todo:
        report.written = _write_steps(ds, path, todo, storage_options, progress)
    # Last, once every step is written: plain xr.open_zarr then reads the finished state.
    finish_store(path, storage_options)
    return report


def _set_attrs(path: str, values: Mapping[str, Any], storage_options: Mapping[str, Any] | None) -> None:
    import zarr

    group = zarr.open_group(path, mode="r+", storage_options=storage_options, use_consolidated=False)
    group.attrs.update(json.loads(json.dumps(dict(values), default=str)))


def _time_lengths(path: str, storage_options: Mapping[str, Any] | None) -> dict[str, int]:
    """Length along ``time`` of every array of a store that has a time dimension."""
    import zarr

    group = zarr.open_group(path, mode="r", storage_options=storage_options, use_consolidated=False)
    lengths = {}
    for name, arr in group.arrays():
        dims = getattr(arr.metadata, "dimension_names", None) or arr.attrs.get("_ARRAY_DIMENSIONS")
        if dims and "time" in dims:
            lengths[name] = arr.shape[list(dims).index("time")]
    return lengths


def _repair_interrupted_append(path: str, storage_options: Mapping[str, Any] | None) -> list[str]:
    """Shrink arrays an interrupted append left longer than the others along ``time``.

    xarray appends by resizing one array after another; a crash in between leaves lengths
    that disagree. The extra rows were never marked complete, so cutting every array back to
    the shortest length loses no finished data; the rerun appends those dates again.
    """
    import zarr

    lengths = _time_lengths(path, storage_options)
    if not lengths or len(set(lengths.values())) == 1:
        return []
    keep = min(lengths.values())
    group = zarr.open_group(path, mode="r+", storage_options=storage_options, use_consolidated=False)
    fixed = []
    for name, n in lengths.items():
        if n > keep:
            arr = group[name]
            dims = getattr(arr.metadata, "dimension_names", None) or arr.attrs.get("_ARRAY_DIMENSIONS")
            axis = list(dims).index("time")
            arr.resize(tuple(keep if i == axis else s for i, s in enumerate(arr.shape)))
            fixed.append(name)
    return fixed


def _open_raw(path: str, storage_options: Mapping[str, Any] | None) -> Any:
    import xarray as xr

    if len(set(_time_lengths(path, storage_options).values())) > 1:
        raise StoreError(
            f"{path}: an append of new dates was interrupted (arrays disagree on the number of "
            "time steps); rerun the same ingest/map command to repair and finish it"
        )
    # Masks and flags stay integers: their fill values are values (fill, nodata), not
    # "missing". Float variables are stored with NaN fill, so they read as NaN regardless.
    return xr.open_zarr(
        path, storage_options=storage_options, consolidated=False, decode_coords="all", mask_and_scale=False
    )


def open_cube(
    path: str | os.PathLike[str],
    *,
    complete_only: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Open a cube (or product) store lazily, with its CRS, time-sorted.

    Parameters
    ----------
    path
        The store written by :func:`write_cube` / ``icemap ingest``.
    complete_only
        Hide time steps whose writing was interrupted (they read as fill). A
        :class:`~icemap.errors.StoreWarning` names them; rerun the ingest to finish them.
    """
    import rioxarray  # noqa: F401

    import icemap.accessor  # noqa: F401  (registers cube.icemap)

    path = os.fspath(path)
    if not _store_exists(path, storage_options):
        raise StoreError(f"no Zarr store at {path}; create one with `icemap ingest --out {path}`")
    ds = _open_raw(path, storage_options)
    if LAYOUT_ATTR not in ds.attrs:
        raise StoreError(f"{path} is not a finished icemap store (no {LAYOUT_ATTR} attribute); rerun the write")
    if complete_only and _COMPLETE in ds:
        done = ds[_COMPLETE].values.astype(bool)
        if not done.all():
            left = [_fmt_time(t) for t, d in zip(ds["time"].values, done) if not d]
            warnings.warn(
                f"{path}: {len(left)} time step(s) are incomplete and hidden ({', '.join(left[:4])}"
                f"{' ...' if len(left) > 4 else ''}); rerun the same ingest to finish them",
                StoreWarning,
                stacklevel=2,
            )
            ds = ds.isel(time=np.flatnonzero(done))
    # Small per-time-step labels are read now: lazy copies only confuse chunk bookkeeping.
    ds = ds.assign_coords({c: ds[c].load() for c in ("item_ids", "platform") if c in ds.coords})
    ds = ds.sortby("time")
    crs = ds["spatial_ref"].attrs.get("crs_wkt") if "spatial_ref" in ds.coords else None
    if crs is not None:
        ds = ds.rio.write_crs(crs)
    return ds


def cube_status(path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None) -> CubeStatus:
    """Report every time step of a store and whether it is complete."""
    ds = open_cube(path, complete_only=False, storage_options=storage_options)
    return CubeStatus(
        path=os.fspath(path),
        times=tuple(_fmt_time(t) for t in ds["time"].values),
        complete=tuple(bool(c) for c in ds[_COMPLETE].values),
        # A cube lists its bands; a product (no band axis) its variables.
        bands=tuple(str(b) for b in ds["band"].values) if "band" in ds.coords else tuple(_stepped_vars(ds)),
        shape=(ds.sizes["y"], ds.sizes["x"]),
        crs=ds.rio.crs.to_string() if ds.rio.crs else None,
    )
