"""Zarr cubes: layout, resumable writes, appends, and reading back.

A cube store is written in three moves, so that a crash at any moment costs time, never data:

1. **template**: first an empty group whose ``icemap:store`` attribute (the *marker*) says that
   icemap created it; then the full layout (every array, coordinate, fill value and attribute,
   with the ``icemap:settings`` record) without data; then the ``icemap:layout`` attribute, set
   last. A store with the marker but without the layout holds no finished data and is started
   again; icemap removes nothing else (see :func:`_check_owned`).
2. **region writes** of every pending time step, in one task graph; once a step's pixels are
   written, its entry in the ``complete`` array (time,) is set to 1 (in step order). A step
   interrupted half-way keeps ``complete == 0`` and is redone on the next run.
3. **append**: dates not yet in the store are appended along ``time`` (layout first, then
   region writes as above).

:func:`open_cube` shows only complete time steps (with a :class:`~icemap.errors.StoreWarning`
naming the others), so an interrupted store never reads back wrong values.

Every write holds a lock beside the store (``<store>.icemap-lock``, with the writer's PID), so two
writers never interleave; local paths are made absolute before any graph is built, and after a
write the completion flags are read back from the store.

Dask chunks are kept identical to Zarr chunks: a dask chunk that straddles two Zarr chunks
would be written by two tasks at once, and zarr 3 silently loses one of the two writes.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import queue
import socket
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import dask
import dask.array as da
import dask.base
import fsspec
import numpy as np
import rioxarray  # noqa: F401  (registers .rio: a dataset built by hand may not have it yet)
import xarray as xr
import zarr
from dask.base import collections_to_expr
from dask.callbacks import Callback
from dask.core import flatten, get_dependencies, reverse_dict
from dask.highlevelgraph import HighLevelGraph
from fsspec.implementations.local import LocalFileSystem

from icemap._version import __version__
from icemap.errors import StoreError, StoreWarning
from icemap.interop import JSON_ATTR, cf_attrs, decode_attrs, encode_attrs, finish_store, resolve_store, zarr_options
from icemap.options import get_option

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr
    import zarr

__all__ = ["write_cube", "write_timesteps", "open_cube", "cube_status", "check_not_input", "WriteReport",
           "CubeStatus"]

LAYOUT_ATTR = "icemap:layout"
#: Written first into every store icemap creates: the proof that icemap may start it again.
MARKER_ATTR = "icemap:store"
#: The settings that decide a store's pixels; a write with other settings is refused.
SETTINGS_ATTR = "icemap:settings"
#: Per time step, the inputs it was computed from (a composite year's dates); a step whose
#: inputs changed is computed again.
INPUTS_ATTR = "icemap:step_inputs"
LOCK_SUFFIX = ".icemap-lock"
# Root entries of a Zarr group (v2 and v3); anything else in a store folder is not ours.
_ZARR_ROOT_FILES = ("zarr.json", ".zgroup", ".zattrs", ".zmetadata")
_ZARR_NODE_FILES = ("zarr.json", ".zarray", ".zgroup")
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


def _array(group: zarr.Group, name: str) -> zarr.Array[Any]:
    """The array ``name`` of a store's group; a group there means the store is not one icemap wrote."""
    arr = group[name]
    if not isinstance(arr, zarr.Array):
        raise StoreError(f"{name!r} in the store is a group, not an array: the store was not written by icemap "
                         "or is damaged; write it again")
    return arr


def _store_exists(path: str, storage_options: Mapping[str, Any] | None) -> bool:
    try:
        zarr.open_group(path, mode="r", storage_options=zarr_options(storage_options), use_consolidated=False)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError):
        return False
    return True


def _check_target_is_free(path: str, storage_options: Mapping[str, Any] | None) -> None:
    """Refuse to create a store where something else already lives.

    The template is written with ``mode="w"``, which clears whatever is at ``path``: pointed by
    mistake at a folder of other files (``--out ~/data``), it would delete them. A file, or a
    folder (prefix) holding anything but a Zarr store, is therefore refused; an empty folder is
    fine. A local parent that is a file gives a clear error instead of NotADirectoryError.
    """
    try:
        fs, root = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise StoreError(f"cannot write to {path}: {exc}") from None
    if isinstance(fs, LocalFileSystem):
        _check_parents(path, root)
    if fs.isfile(root):
        raise StoreError(f"{path} is a file, not a Zarr store; choose another --out (icemap never overwrites it)")
    if fs.exists(root):
        entries = fs.ls(root, detail=False)
        if entries:
            raise StoreError(
                f"{path} already holds {len(entries)} file(s) or folder(s) and is not a Zarr store; icemap "
                "will not overwrite it. Choose another --out, or remove it yourself if it is disposable"
            )


def _check_parents(path: str, root: str) -> None:
    """A local parent that is a file gives a clear error instead of NotADirectoryError."""
    for parent in Path(root).parents:
        if parent.exists():
            if not parent.is_dir():
                raise StoreError(f"cannot create {path}: {parent} is a file, not a folder; choose another --out")
            break


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _absolute(path: str) -> str:
    """A local path made absolute (URLs unchanged).

    Done before any graph is built: a task holding a relative path resolves it in the
    worker's folder, so a distributed worker started elsewhere would write (or read) another
    store, or none, while the client reports success.
    """
    if path.startswith("file://"):
        return "file://" + os.path.abspath(os.path.expanduser(path[len("file://"):]))
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def check_not_input(out: str | os.PathLike[str], inputs: Mapping[str, Any]) -> None:
    """Refuse an output path that is one of the command's inputs (or inside one, or holds one).

    Writing a product over its own cube, or a table over the outlines it was computed from,
    would destroy the input. ``inputs`` maps option names (``"--cube"``) to paths; None
    values are skipped.
    """
    def key(p: Any) -> tuple[str, ...]:
        text = os.fspath(p)
        if _is_local(text):
            text = text[len("file://"):] if text.startswith("file://") else text
            return Path(os.path.abspath(os.path.expanduser(text))).resolve().parts
        return tuple(text.rstrip("/").split("/"))

    mine = key(out)
    for name, value in inputs.items():
        if value is None or not isinstance(value, (str, os.PathLike)):
            continue
        theirs = key(value)
        shorter = min(len(mine), len(theirs))
        if mine[:shorter] == theirs[:shorter]:
            how = "is" if len(mine) == len(theirs) else ("is inside" if len(mine) > len(theirs) else "holds")
            raise StoreError(f"the output {os.fspath(out)} {how} the {name} input {os.fspath(value)}; "
                             "writing there would destroy it: choose another output path")


def _check_owned(path: str, attrs: Mapping[str, Any]) -> None:
    """Refuse to touch a Zarr store that icemap did not create (no marker, no layout)."""
    if MARKER_ATTR not in attrs and LAYOUT_ATTR not in attrs:
        raise StoreError(
            f"{path} is a Zarr store that icemap did not create; icemap will neither change nor remove it. "
            "Choose another --out, or delete it yourself if it is disposable"
        )


def _clear_unfinished(path: str, storage_options: Mapping[str, Any] | None) -> None:
    """Empty a store that icemap created but whose layout was never finished.

    Only a store that holds nothing but Zarr nodes is cleared (root metadata files, and
    folders that are Zarr arrays or groups); a file someone put there stops it, and the
    store is left exactly as it is.
    """
    fs, root = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
    entries = fs.ls(root, detail=False)
    foreign = []
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name in _ZARR_ROOT_FILES:
            continue
        if fs.isdir(entry) and any(fs.exists(f"{entry.rstrip('/')}/{f}") for f in _ZARR_NODE_FILES):
            continue
        foreign.append(name)
    if foreign:
        raise StoreError(
            f"{path} was left unfinished before any data, but holds {len(foreign)} file(s) or folder(s) icemap "
            f"did not write ({', '.join(sorted(foreign)[:4])}); icemap leaves it as it is. Move those away, or "
            "choose another --out"
        )
    for entry in entries:
        fs.rm(entry, recursive=True)


def _create_marked_group(path: str, zarr_format: Literal[2, 3], storage_options: Mapping[str, Any] | None) -> None:
    """Write the empty group with the marker: the first thing written into a new store."""
    zarr.open_group(path, mode="a", zarr_format=zarr_format, storage_options=zarr_options(storage_options),
                    use_consolidated=False, attributes={MARKER_ATTR: {"created_by": "icemap",
                                                                      "icemap_version": __version__}})


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _check_settings(path: str, stored: Mapping[str, Any] | None, settings: Mapping[str, Any]) -> None:
    """Refuse a write whose pixel-deciding settings differ from the store's record."""
    if stored is None:
        return
    new = _jsonable(dict(settings))
    diffs = [f"{k} {json.dumps(new.get(k))} (stored: {json.dumps(stored.get(k))})"
             for k in sorted(set(new) | set(stored)) if new.get(k) != stored.get(k)]
    if diffs:
        raise StoreError(
            f"{path} was written with other settings: {'; '.join(diffs)}. A store holds one product; write to "
            "another --out, or delete the store to start it again with these settings"
        )


def _lock_holder(lock: str, fs: Any) -> str:
    try:
        info = json.loads(fs.cat_file(lock))
        return f"PID {info.get('pid')} on {info.get('host')}, since {info.get('started')}"
    except Exception:  # noqa: BLE001 - the lock's text is informative only
        return "another process"


@contextlib.contextmanager
def _store_lock(path: str, storage_options: Mapping[str, Any] | None) -> Iterator[None]:
    """Hold ``<store>.icemap-lock`` while writing, so two writers never interleave.

    Locally the lock is an ``flock`` on that file: the kernel releases it when its process
    dies, so a lock left by a killed run (its file, with a dead PID) is simply taken over. On
    other filesystems (object stores have no locks) the file is created if absent and taken
    over when its PID is dead on this host; that is a best effort, not atomic.
    """
    fs, root = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
    lock = root.rstrip("/") + LOCK_SUFFIX
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode()
    busy = (f"another icemap process ({{holder}}) is writing {path}; wait for it to finish, or if it is gone, "
            f"delete {lock}")
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None  # type: ignore[assignment]
    if isinstance(fs, LocalFileSystem) and fcntl is not None:
        parent = os.path.dirname(lock)
        if not os.path.isdir(parent):
            _check_parents(path, root)
            os.makedirs(parent, exist_ok=True)
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise StoreError(f"cannot write {path}: {exc.strerror} ({lock}); choose a folder you can write to "
                                 "as --out") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise StoreError(busy.format(holder=_lock_holder(lock, fs))) from None
            # The file may have been removed (by its releasing holder) between open and flock.
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, record)
            yield
        finally:
            os.unlink(lock)
            os.close(fd)
        return
    if fs.exists(lock):
        try:
            info = json.loads(fs.cat_file(lock))
        except Exception:  # noqa: BLE001
            info = {}
        if info.get("host") != socket.gethostname() or _pid_alive(int(info.get("pid", -1))):
            raise StoreError(busy.format(holder=_lock_holder(lock, fs)))
    fs.pipe_file(lock, record)
    try:
        yield
    finally:
        fs.rm(lock)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_attrs(path: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    return decode_attrs(zarr.open_group(path, mode="r", storage_options=zarr_options(storage_options), use_consolidated=False).attrs)


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
    ds = cf_attrs(ds)
    # Attributes netCDF cannot hold become JSON text, so an opened store can go to_netcdf.
    for name in ds.variables:
        ds[name].attrs = encode_attrs(ds[name].attrs)
    ds.attrs = encode_attrs(ds.attrs)
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
    for name in [*_stepped_vars(ds), _COMPLETE]:
        fill = enc[name]["_FillValue"]
        if zarr_format == 3:
            # zarr 3 keeps its own fill value (default 0) apart from the CF _FillValue attribute;
            # state it, or unwritten qa_pixel chunks would read as 0 ("clear") instead of fill.
            enc[name]["fill_value"] = fill
        if not np.issubdtype(np.asarray(fill).dtype, np.floating):
            # Integer flags and masks carry no CF _FillValue: plain xarray would decode them to
            # float with NaN. Their fill is a value with a meaning (a flag), and only time steps
            # never completed (hidden by open_cube) can hold unwritten chunks. Zarr v2 has no
            # fill value apart from _FillValue, so unwritten chunks of such a step read as 0.
            enc[name]["_FillValue"] = None
    for name in ("item_ids", "platform"):
        if name in ds.coords:
            enc[name] = {"chunks": (1024,)}
    return enc


# Steps flagged by tasks of a local (threaded or synchronous) scheduler, per write call: the
# flag tasks report here and the scheduler's main thread reads it between tasks (see
# _write_steps). Task keys cannot be used for that: optimisation may fuse the last flag into
# the graph's final task under another name. Processes of a distributed cluster never see it.
_LOCAL_FLAGS: dict[str, queue.SimpleQueue[int]] = {}
_log = logging.getLogger(__name__)


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


def _layout_template(ds: Any) -> Any:
    """``ds`` with each dask variable replaced by an empty array of the same shape, chunks and dtype.

    xarray writes the store's layout from it (arrays, coordinates, CF encodings, attributes),
    so the layout stays xarray's own. What ``to_zarr(compute=False)`` would otherwise do with
    the real variables is build, merge and optimise their whole graph (every read and kernel
    task) into a write it returns and icemap discards: the pixels go in by
    :func:`_step_writes`. Placeholders make that a few tasks per chunk, nothing upstream.
    """
    def empty(var: Any) -> Any:
        return var.copy(data=da.empty(var.shape, dtype=var.dtype, chunks=var.chunks))

    lazy_coords = {name: empty(var) for name, var in ds.coords.items() if var.chunks is not None}
    return ds.assign_coords(lazy_coords).assign(
        {name: empty(var) for name, var in ds.data_vars.items() if var.chunks is not None})


def _step_writes(ds: Any, group: Any, i: int, index: int) -> list[Any]:
    """Tasks that put time step ``i`` of ``ds`` at ``index`` of the store, one per chunk.

    The arrays go straight into their Zarr arrays: the template fixed every encoding (plain
    dtypes, fill values, chunks equal to the dask chunks), so xarray's per-call encoding and
    region checks would only repeat themselves for every step. Coordinates along ``time``
    were written with the template or the append.
    """
    writes = []
    for name in _stepped_vars(ds):
        arr = _array(group, name)
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


def _wave_size() -> int:
    """Spatial chunks one wave of a store write may hold, and why (logged at DEBUG).

    The one place that decides it, for every store write (:func:`_write_steps`): the
    ``write_wave`` option when set, else two chunks per thread (of the local scheduler, or of
    every worker of a distributed cluster). Two per thread keep every thread busy while a
    wave's last chunks are written (measured on the 4096-px map job: within 2 % of one
    unbounded graph), and a wave's memory does not grow with the area.

    Returns
    -------
    int
        At least 1.
    """
    option = get_option("write_wave")
    if option is not None:
        _log.debug("a wave holds %d chunks: the write_wave option", option)
        return max(int(option), 1)
    client = _distributed_client()
    if client is not None:
        threads = sum(client.nthreads().values()) or 1
        where = "of the distributed cluster"
    else:
        threads = int(dask.config.get("num_workers", None) or os.cpu_count() or 1)
        where = "of the local scheduler"
    _log.debug("a wave holds %d chunks: two per thread %s (%d threads)", 2 * threads, where, threads)
    return max(2 * threads, 1)


def _write_steps(ds: Any, path: str, steps: list[tuple[int, int, str]],
                 storage_options: Mapping[str, Any] | None, progress: Progress | None) -> list[str]:
    """Write the pending time steps in waves of spatial slabs; flag each step once it is stored.

    Two things are bounded here. **Idle threads**: one graph per step would leave threads
    waiting at the end of each step for its last chunk, so a wave spans steps (the next step's
    reads start while the last chunks of this one are written). **Memory**: a graph of all
    the work lets a scheduler run reads ahead of the writes that free them (distributed does
    not hold back reads that are not root tasks, as the loader's are), so a worker's memory
    would grow with the area; a wave holds at most a few chunks per thread (the
    ``write_wave`` option, default two per thread, :func:`_wave_size`), whatever the area, on
    the local scheduler and on a distributed cluster alike.

    Each step's ``complete`` flag is a task of the wave holding the step's last slab; it
    depends on that wave's store tasks of the step *and* on the previous step's flag, so
    flags are set in step order: a run interrupted at any moment leaves every flagged step
    fully written, and ``progress`` (called in step order, as each flag lands) can stop the
    run after any step.
    """
    group = zarr.open_group(path, mode="r+", storage_options=zarr_options(storage_options), use_consolidated=False)
    flags_arr = _array(group, _COMPLETE)
    run = uuid.uuid4().hex
    writes = [_step_writes(ds, group, i, index) for i, index, _ in steps]
    y_blocks, x_blocks = writes[0][0].numblocks[-2:]
    labels = {index: t for _, index, t in steps}
    done: list[str] = []

    def step_done(label: str) -> None:
        done.append(label)
        if progress is not None:
            progress(len(done), len(steps), label)

    waves: list[tuple[list[Any], list[tuple[Any, str]]]] = []
    for wave in _waves(len(steps), y_blocks, x_blocks, _wave_size()):
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
        waves.append((targets, flags))
    client = _distributed_client()
    if client is not None:
        _compute_waves_distributed(client, waves, step_done)
    else:
        for targets, flags in waves:
            _compute_wave(targets, flags, run, labels, step_done)
    return done


def _compute_waves_distributed(client: Any, waves: list[tuple[list[Any], list[tuple[Any, str]]]],
                               step_done: Callable[[str], None]) -> None:
    """Compute the waves one after the other on a distributed cluster, sharing what they share.

    Slabs of one step share upstream tasks (a U-Net's halo: slices of the neighbouring row's
    reads). Submitted wave by wave as separate graphs, such a key would be released by the
    cluster after one wave and resubmitted by the next, and a key resubmitted while the
    cluster is still releasing it failed on a dask-gateway worker with a ``KeyError``. So:

    * every wave is cut from **one optimised graph** of all the waves: one optimisation pass
      sees that a step's products share their kernel task (NDSI and ice from one pass), and a
      key has the same name in every wave that needs it;
    * a key that a later wave reads is **held** (a future) from the wave that computes it
      until the last wave that needs it is done, and later waves are submitted without its
      definition, so it is computed once and never resubmitted. What is held is only the
      frontier the later waves read (a halo slice, the previous slab's flag), not its upstream.

    Memory is then bounded by two waves in flight plus the keys held for the next ones,
    whatever the area.
    """
    everything = [t for targets, _ in waves for t in targets]
    graph = dict(collections_to_expr(everything, optimize_graph=True).optimize().__dask_graph__())
    dependencies = {k: get_dependencies(graph, k) for k in graph}
    dependents = reverse_dict(dependencies)
    wave_keys = [[k for t in targets for k in flatten(t.__dask_keys__())] for targets, _ in waves]
    last_use: dict[Any, int] = {}
    for w, keys in enumerate(wave_keys):
        for k in _upstream(keys, dependencies, stop={}):
            last_use[k] = w
    held: dict[Any, Any] = {}
    in_flight: collections.deque[tuple[int, list[Any]]] = collections.deque()

    def finish_oldest() -> None:
        nonlocal held
        w, futures = in_flight.popleft()
        targets, flags = waves[w]
        labels_of = {id(t): label for t, label in flags}
        # In order: flags are chained, so they land in step order anyway. No default client
        # is needed (the Client may be set through dask.config only).
        for fut, target in zip(futures, targets):
            fut.result()
            if id(target) in labels_of:
                step_done(labels_of[id(target)])
        held = {k: f for k, f in held.items() if last_use[k] > w}

    try:
        for w, keys in enumerate(wave_keys):
            todo = _upstream(keys, dependencies, stop=held)
            # A wave's own targets (slab sums, flags) are never read by a later wave: each
            # wave chains its flags from scratch, and the waves run in step order.
            targets_here = set(keys)
            keep = [k for k in todo if k not in targets_here and last_use[k] > w
                    and any(d not in todo and d not in held and last_use[d] > w for d in dependents[k])]
            # A named HighLevelGraph: as a plain dict, the client would tokenize every task of
            # it to name the submission (0.05-0.1 s a wave on a small job, more than its work).
            wave = HighLevelGraph.from_collections(f"icemap-wave-{uuid.uuid4().hex}", {k: graph[k] for k in todo})
            futures = client.get(wave, [*keys, *keep], sync=False)
            held.update(zip(keep, futures[len(keys):]))
            in_flight.append((w, futures))
            # Two waves in flight: the cluster starts the next wave's reads while the last
            # chunks of this one are written (no idle workers at a wave's end, which one
            # round trip to the scheduler per wave would cost), and memory is two waves.
            if len(in_flight) > 1:
                finish_oldest()
        while in_flight:
            finish_oldest()
    except BaseException:
        # Only the waves' targets are cancelled (nothing depends on them); held keys are just
        # released. Cancelling a held key cancels its dependents in the next wave's submission
        # too, which the scheduler refuses with an AssertionError (seen on a failed read).
        client.cancel([f for w, futures in in_flight for f in futures[:len(wave_keys[w])]])
        held.clear()
        raise


def _upstream(keys: Sequence[Any], dependencies: Mapping[Any, set[Any]], stop: Mapping[Any, Any]) -> set[Any]:
    """``keys`` and every task they need, not looking past the keys in ``stop`` (held results)."""
    seen: set[Any] = set()
    todo = [k for k in keys if k not in stop]
    while todo:
        k = todo.pop()
        if k in seen:
            continue
        seen.add(k)
        todo.extend(d for d in dependencies[k] if d not in stop and d not in seen)
    return seen


def _compute_wave(targets: list[Any], flags: list[tuple[Any, str]], run: str, labels: Mapping[int, str],
                  step_done: Callable[[str], None]) -> None:
    """Compute one wave on the local scheduler; call ``step_done`` for each flag, in step order, as it lands."""
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
    ds: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    zarr_format: Literal[2, 3] | None = None,
    chunksize: int | None = None,
    attrs: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    settings: Mapping[str, Any] | None = None,
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
    settings
        The options that decide the pixels (bands, resolution, QA use...): recorded in the
        store; a rerun or append with other settings is refused (see :func:`write_timesteps`).

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
                           storage_options=storage_options, progress=progress, settings=settings)


def write_timesteps(
    ds: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    zarr_format: Literal[2, 3] | None = None,
    chunksize: int | None = None,
    attrs: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    settings: Mapping[str, Any] | None = None,
    step_inputs: Mapping[str, Any] | None = None,
) -> WriteReport:
    """Write every variable with a time dimension, resumably, each time step flagged once written.

    The machinery behind :func:`write_cube` and product stores (``ndsi``, ``ice``,
    ``ice_probability``): template, region writes with completion flags, appends. Fill
    values: NaN for floats, ``qa_pixel`` 1, otherwise the dtype's maximum (255 for uint8).

    ``settings`` (JSON-serialisable) are the options that decide the pixels (threshold, rule,
    model checksum...): recorded in a new store (attribute ``icemap:settings``), compared with
    the record on a rerun or append, and a difference is a :class:`StoreError` naming the
    options. ``step_inputs`` maps time labels (``YYYY-MM-DDTHH:MM:SSZ``) to what each step is
    computed from; a complete step whose inputs changed is computed again.
    """
    path = _absolute(os.fspath(path))
    if zarr_format is None:
        zarr_format = get_option("zarr_format")
    if zarr_format not in (2, 3):
        raise StoreError(f"zarr_format must be 2 or 3, got {zarr_format!r}")
    ds, (cy, cx) = _prepare(ds, chunksize)
    report = WriteReport(path=path)
    new_times = [_fmt_time(t) for t in ds["time"].values]
    if len(set(new_times)) != len(new_times):
        raise StoreError("the cube has repeated time steps; load with mosaic=True to merge them")

    with _store_lock(path, storage_options):
        _write_locked(ds, path, report, new_times, cy, cx, zarr_format, attrs, settings, step_inputs,
                      storage_options, progress)
    return report


def _write_locked(ds: Any, path: str, report: WriteReport, new_times: list[str], cy: int, cx: int,
                  zarr_format: Literal[2, 3], attrs: Mapping[str, Any] | None, settings: Mapping[str, Any] | None,
                  step_inputs: Mapping[str, Any] | None, storage_options: Mapping[str, Any] | None,
                  progress: Progress | None) -> None:
    """The body of :func:`write_timesteps`, run while the store's lock is held."""
    exists = _store_exists(path, storage_options)
    if exists:
        # Nothing is changed in a store before it is known to be icemap's.
        stored_attrs = _group_attrs(path, storage_options)
        _check_owned(path, stored_attrs)
        if stored_attrs.get(LAYOUT_ATTR) is None:
            # Created by icemap, interrupted before its layout was finished: no step can be
            # complete. Cleared (only if it holds nothing but Zarr nodes) and started over.
            _clear_unfinished(path, storage_options)
            warnings.warn(f"{path} was left unfinished before any data; starting it again", StoreWarning,
                          stacklevel=3)
            exists = False
        else:
            if settings is not None:
                _check_settings(path, stored_attrs.get(SETTINGS_ATTR), settings)
            if _repair_interrupted_append(path, storage_options):
                warnings.warn(f"{path}: repaired an interrupted append; its dates are written again", StoreWarning,
                              stacklevel=3)
    else:
        _check_target_is_free(path, storage_options)

    inputs = _jsonable(dict(step_inputs or {}))
    if not exists:
        _create_marked_group(path, zarr_format, storage_options)
        enc = _encoding(ds, cy, cx, zarr_format)
        tmpl = _layout_template(ds)
        tmpl.attrs = {**decode_attrs(ds.attrs), **dict(attrs or {}), "icemap:chunks": [cy, cx],
                      MARKER_ATTR: _group_attrs(path, storage_options)[MARKER_ATTR]}
        if settings is not None:
            tmpl.attrs[SETTINGS_ATTR] = _jsonable(dict(settings))
        if inputs:
            tmpl.attrs[INPUTS_ATTR] = inputs
        tmpl.attrs = encode_attrs(tmpl.attrs)
        # mode "a": the group with the marker exists already and must stay.
        tmpl.to_zarr(path, mode="a", compute=False, encoding=enc, zarr_format=zarr_format,
                     storage_options=storage_options, consolidated=False)
        _set_attrs(path, {LAYOUT_ATTR: LAYOUT_VERSION}, storage_options)
        report.created = True
        stored_times = list(new_times)
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
        if settings is not None and SETTINGS_ATTR not in existing.attrs:
            _set_attrs(path, {SETTINGS_ATTR: dict(settings)}, storage_options)  # a store from before the record
        if inputs:
            _reset_changed_steps(path, ds, existing, new_times, stored_times, complete, inputs, storage_options)
        to_append = [i for i, t in enumerate(new_times) if t not in stored_times]
        if to_append:
            extra = ds.isel(time=to_append)
            extra = extra.drop_vars([c for c in extra.coords if "time" not in extra[c].dims])
            # to_zarr rewrites the group attributes on append: carry the stored ones over.
            extra.attrs = encode_attrs(_group_attrs(path, storage_options))
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
        # Read back: a step reported written but not flagged in the store was written somewhere
        # else (a worker that resolves the path in another folder or on another machine).
        flags = np.asarray(_array(zarr.open_group(path, mode="r", storage_options=zarr_options(storage_options),
                                                 use_consolidated=False), _COMPLETE)[:])
        lost = [t for _, index, t in todo if not flags[index]]
        if lost:
            raise StoreError(
                f"{path}: {len(lost)} time step(s) were computed but are not flagged complete in the store "
                f"({', '.join(lost[:4])}{' ...' if len(lost) > 4 else ''}); the workers wrote them elsewhere. "
                "Give a path or URL that every worker reaches (a shared filesystem, or s3://...)"
            )
    if inputs:
        _set_attrs(path, {INPUTS_ATTR: {**_group_attrs(path, storage_options).get(INPUTS_ATTR, {}), **inputs}},
                   storage_options)
    # Last, once every step is written: plain xr.open_zarr then reads the finished state.
    finish_store(path, storage_options)


def _reset_changed_steps(path: str, ds: Any, existing: Any, new_times: list[str], stored_times: list[str],
                         complete: list[bool], inputs: Mapping[str, Any],
                         storage_options: Mapping[str, Any] | None) -> None:
    """Mark complete steps whose inputs changed (a composite year that gained dates) as pending.

    Their per-step labels (``item_ids``, ``platform``) are rewritten now; the pixels are
    written again by the run, and the inputs record is updated once they are.
    """
    before = existing.attrs.get(INPUTS_ATTR, {})
    group = zarr.open_group(path, mode="r+", storage_options=zarr_options(storage_options), use_consolidated=False)
    for i, t in enumerate(new_times):
        if t in stored_times and t in inputs and before.get(t) != inputs[t]:
            index = stored_times.index(t)
            if complete[index]:
                _array(group, _COMPLETE)[index] = 0
                complete[index] = False
            for name in ("item_ids", "platform"):
                if name in ds.coords and name in group and ds[name].dims == ("time",):
                    _array(group, name)[index] = ds[name].values[i]


def _set_attrs(path: str, values: Mapping[str, Any], storage_options: Mapping[str, Any] | None) -> None:
    group = zarr.open_group(path, mode="r+", storage_options=zarr_options(storage_options), use_consolidated=False)
    new = encode_attrs(json.loads(json.dumps(dict(values), default=str)))
    listed = [k for k in str(group.attrs.get(JSON_ATTR, "")).split(",") if k and k not in values]
    listed += [k for k in new.pop(JSON_ATTR, "").split(",") if k]
    if listed:
        new[JSON_ATTR] = ",".join(listed)
    group.attrs.update(new)


def _dimension_names(arr: zarr.Array[Any]) -> list[str]:
    """Dimension names of a Zarr array: v3 metadata, or v2's ``_ARRAY_DIMENSIONS`` attribute."""
    dims = getattr(arr.metadata, "dimension_names", None) or arr.attrs.get("_ARRAY_DIMENSIONS")
    return [str(d) for d in dims] if isinstance(dims, (list, tuple)) else []


def _time_lengths(path: str, storage_options: Mapping[str, Any] | None) -> dict[str, int]:
    """Length along ``time`` of every array of a store that has a time dimension."""
    group = zarr.open_group(path, mode="r", storage_options=zarr_options(storage_options), use_consolidated=False)
    lengths = {}
    for name, arr in group.arrays():
        dims = _dimension_names(arr)
        if dims and "time" in dims:
            lengths[name] = arr.shape[list(dims).index("time")]
    return lengths


def _repair_interrupted_append(path: str, storage_options: Mapping[str, Any] | None) -> list[str]:
    """Shrink arrays an interrupted append left longer than the others along ``time``.

    xarray appends by resizing one array after another; a crash in between leaves lengths
    that disagree. The extra rows were never marked complete, so cutting every array back to
    the shortest length loses no finished data; the rerun appends those dates again.
    """
    lengths = _time_lengths(path, storage_options)
    if not lengths or len(set(lengths.values())) == 1:
        return []
    keep = min(lengths.values())
    group = zarr.open_group(path, mode="r+", storage_options=zarr_options(storage_options), use_consolidated=False)
    fixed = []
    for name, n in lengths.items():
        if n > keep:
            arr = _array(group, name)
            dims = _dimension_names(arr)
            axis = list(dims).index("time")
            arr.resize(tuple(keep if i == axis else s for i, s in enumerate(arr.shape)))
            fixed.append(name)
    return fixed


def _open_raw(path: str, storage_options: Mapping[str, Any] | None) -> xr.Dataset:
    if len(set(_time_lengths(path, storage_options).values())) > 1:
        raise StoreError(
            f"{path}: an append of new dates was interrupted (arrays disagree on the number of "
            "time steps); rerun the same ingest/map command to repair and finish it"
        )
    # Masks and flags stay integers: their fill values are values (fill, nodata), not
    # "missing". Float variables are stored with NaN fill, so they read as NaN regardless.
    # Times are decoded on coordinates only: a data variable with CF time units (a composite's
    # source_date, float days) stays the number icemap computes with (see source_dates).
    ds: xr.Dataset = xr.open_zarr(
        path, storage_options=storage_options, consolidated=False, decode_coords="all", mask_and_scale=False,
        decode_times=False,
    )
    times = [c for c in ds.coords if "since" in str(ds[c].attrs.get("units", ""))]
    if times:
        ds = ds.assign_coords(xr.decode_cf(ds[times].reset_coords(), mask_and_scale=False).variables)
    ds.attrs = decode_attrs(ds.attrs)
    for name in ds.variables:
        ds[name].attrs = decode_attrs(ds[name].attrs)
    return ds


def open_cube(
    path: str | os.PathLike[str],
    *,
    complete_only: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Open a cube (or product) store lazily, with its CRS, time-sorted.

    Parameters
    ----------
    path
        The store written by :func:`write_cube` / ``icemap ingest``, or its STAC Item
        (``cube.zarr.json``, :mod:`icemap.describe`), whose Zarr asset is opened.
    complete_only
        Hide time steps whose writing was interrupted (they read as fill). A
        :class:`~icemap.errors.StoreWarning` names them; rerun the ingest to finish them.
    """
    import icemap.accessor  # noqa: F401  (registers cube.icemap)

    # Absolute: the lazy reads may run on workers started in another folder. A cube's STAC
    # Item (cube.zarr.json) stands for the store its Zarr asset points at.
    path = _absolute(resolve_store(os.fspath(path), storage_options))
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
    labels = [c for c in ("item_ids", "platform") if c in ds.coords]
    ds = ds.assign_coords(dict(zip(labels, dask.compute(*[ds[c] for c in labels]))))  # one compute
    # Stores are written in time order, so this rarely reorders; sortby would still put an
    # index-array getitem over every chunk of every variable (one more task per chunk).
    if not ds.indexes["time"].is_monotonic_increasing:
        ds = ds.sortby("time")
    crs = ds["spatial_ref"].attrs.get("crs_wkt") if "spatial_ref" in ds.coords else None
    if crs is not None and ds.rio.crs is None:
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
