"""U-Net inference over cubes of any size, lazily, on any Dask cluster.

How a region is mapped:

* **Inputs** are built lazily from the cube with the model's channel set
  (:func:`icemap.model.inputs.build_inputs`).
* **Halos.** Each chunk is extended by a halo taken from its neighbours (``dask.array.overlap``,
  no padding at the array's edges). With a halo of at least half the network's receptive
  field, every output pixel sees exactly the inputs it would see in whole-array inference,
  so chunked and whole-array probabilities agree to float rounding and seams vanish. An axis
  held in one chunk (any cube smaller than the halo, down to 1 x 1) takes no halo: that chunk
  is the whole axis, exactly as the whole-array run sees it.
* **Alignment.** Max-pooling groups pixels in blocks of ``2**depth``; a tile that started
  elsewhere would pool different groups. Chunk sizes and halos are therefore multiples of
  ``2**depth``, tiles start at such multiples of the global grid, and windows are padded
  with zeros only at the array's far end and only up to the next multiple, exactly as a
  whole-array pass is padded.
* **Batching.** Within a chunk, the output is cut into tiles of ``tile`` pixels, each read with
  its own halo, and the windows go through the network ``batch_size`` at a time (grouped by
  shape: only edge windows differ). Memory per task is bounded by ``batch_size`` windows.
* **Nodata.** NaN inputs are filled per pixel after normalisation and restored as nodata in
  the output; an all-nodata chunk returns at once without touching the model. Negative
  reflectance is not nodata: index channels clip it to 0 as the NDSI does, and where both of
  an index's bands are at or below 0 the index enters as 0 (:mod:`icemap.model.inputs`).
* **The model travels by reference.** The graph holds a :class:`ModelRef` (folder path and
  the weights' sha256), never weights: graph size does not depend on model size, and a changed
  checkpoint has another sha256, hence other task keys. Each worker process loads the model
  once (an in-process cache keyed by path, sha256 and device) and checks the sha256.
* **Devices.** On a worker with CUDA, tensors go to the GPU through pinned memory and run
  under bf16 (or fp16) autocast; on CPU, torch's intra-op threads are set so that dask's
  threads times torch's threads do not exceed the cores. When the cluster has workers with the
  ``GPU`` resource, the inference layer is annotated with ``resources={"GPU": 1}`` so only they
  run it, while CPU workers keep the I/O and index work.
* **Imported networks.** A checkpoint made by ``icemap model import`` from an ONNX file loads
  as an :class:`~icemap.model.onnx_runner.OnnxRunner` (onnxruntime, CUDA provider on GPU
  workers), called exactly like the U-Net: same halos, tiles, batches, TTA and routing.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import dask
import dask.array as da
import numpy as np
import xarray as xr

from icemap.cluster import gpu_workers
from icemap.errors import ModelError
from icemap.extras import require
from icemap.interop import keep_grid
from icemap.kernels import ICE_NODATA, probability_mask
from icemap.model.checkpoint import load_checkpoint, read_metadata
from icemap.model.inputs import Normalisation, build_inputs, normalise
from icemap.model.packaged import resolve_model
from icemap.options import get_option
from icemap.plausibility import check_reflectance

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

    from icemap.dem import DemSource

__all__ = ["ModelRef", "predict", "predict_array", "default_halo", "model_context", "keep_resources", "ICE_NODATA"]

_CACHE: dict[tuple[str, str, str], Any] = {}
_CACHE_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelRef:
    """A checkpoint by reference: its folder and the sha256 of its weights.

    This is what the task graph carries. ``__dask_tokenize__`` makes task names depend on the
    sha256, so a retrained model never reuses results computed with an older one.
    """

    path: str
    sha256: str

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> ModelRef:
        meta = read_metadata(path)
        if not meta.weights_sha256:
            raise ModelError(f"checkpoint {path} records no weights sha256; save it again with icemap")
        return cls(os.path.abspath(os.fspath(path)), meta.weights_sha256)

    def __dask_tokenize__(self) -> tuple[str, str]:
        return (self.path, self.sha256)

    def load(self, device: str) -> Any:
        """The model on ``device``, loaded once per process (thread-safe)."""
        key = (self.path, self.sha256, device)
        with _CACHE_LOCK:
            model = _CACHE.get(key)
            if model is None:
                # threads: an imported ONNX network's CPU session follows torch's thread policy.
                model, _ = load_checkpoint(self.path, device=device, expected_sha256=self.sha256,
                                           threads=_cpu_threads() if device == "cpu" else None)
                _CACHE[key] = model
        return model


def default_halo(depth: int, receptive_field: int) -> int:
    """Half the receptive field, rounded up to a multiple of ``2**depth``."""
    m = 2**depth
    half = (receptive_field + 1) // 2
    return -(-half // m) * m


def model_context(meta: Any) -> tuple[int, int]:
    """``(depth, exact halo)`` of a checkpoint: tiles align on ``2**depth``, halos give exactness.

    icemap's U-Net knows its receptive field from its architecture; an imported ONNX network
    carries the multiple and halo measured (or given) at import (:mod:`icemap.lab.onnx_import`).
    """
    arch = meta.architecture
    depth = int(arch.get("depth", 4))
    if meta.kind == "onnx":
        if not isinstance(arch.get("halo"), int):
            raise ModelError("model.json of an ONNX model states no architecture.halo; import it again with "
                             "`icemap model import`")
        m = 2**depth
        return depth, -(-int(arch["halo"]) // m) * m
    from icemap.model.unet import UNetConfig

    try:
        config = UNetConfig(**arch)
    except (TypeError, ValueError) as exc:  # an edited model.json: one line, not a traceback
        raise ModelError(f"model.json architecture {arch!r:.120} does not describe icemap's U-Net ({exc}); "
                         "copy the model folder again") from None
    return depth, default_halo(depth, config.receptive_field)


def _device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def _cpu_threads() -> int:
    """Torch intra-op threads for one dask thread, so the host's cores are not oversubscribed.

    ``OMP_NUM_THREADS`` wins when set: distributed's nanny sets it to 1 for every worker,
    because several workers share a host and none knows about the others (giving each torch
    ``cores / own threads`` threads ran 2 workers x 2 threads on 2 cores, 1.9-4.3x slower:
    docs/benchmarks.md). Otherwise (dask's threaded scheduler, a plain script) the cores this
    process may use are shared among dask's threads.
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    dask_threads = cores
    try:
        from distributed import get_worker

        dask_threads = get_worker().state.nthreads
    except (ImportError, ValueError):
        try:
            import dask

            dask_threads = dask.config.get("num_workers", None) or cores
        except ImportError:
            pass
    return max(1, cores // max(1, int(dask_threads)))


def _set_cpu_threads() -> None:
    import torch

    want = _cpu_threads()
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)


_DIHEDRAL = [(k, flip) for flip in (False, True) for k in range(4)]


def _transform(x: Any, k: int, flip: bool) -> Any:
    import torch

    if flip:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k, dims=(-2, -1))


def _untransform(x: Any, k: int, flip: bool) -> Any:
    import torch

    x = torch.rot90(x, -k, dims=(-2, -1))
    if flip:
        x = torch.flip(x, dims=(-1,))
    return x


def _run_batches(model: Any, windows: list[np.ndarray], device: str, batch_size: int, tta: bool,
                 mc_samples: int) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Probabilities (and spreads) for same-shape windows ``(C, h, w)``, ``batch_size`` at a time."""
    import torch

    cuda = device.startswith("cuda")
    if cuda:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        autocast: Any = torch.autocast("cuda", dtype=dtype)
    else:
        autocast = contextlib.nullcontext()
    if mc_samples:
        # MC dropout: dropout layers sample, batch norm keeps its running statistics.
        for m in model.modules():
            if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d)):
                m.train()
    transforms = _DIHEDRAL if tta else [(0, False)]
    repeats = max(1, mc_samples)
    means: list[np.ndarray] = []
    spreads: list[np.ndarray] = []
    with torch.inference_mode(), autocast:
        for start in range(0, len(windows), batch_size):
            batch = torch.from_numpy(np.stack(windows[start:start + batch_size]))
            if cuda:
                batch = batch.pin_memory().to(device, non_blocking=True)
            samples = []
            for _ in range(repeats):
                for k, flip in transforms:
                    logits = model(_transform(batch, k, flip))
                    samples.append(_untransform(torch.sigmoid(logits.float()), k, flip)[:, 0])
            stack = torch.stack(samples)
            means.extend(stack.mean(0).cpu().numpy())
            if len(samples) > 1:
                spreads.extend(stack.std(0, unbiased=False).cpu().numpy())
    if mc_samples:
        model.eval()
    return means, (spreads if spreads else None)


def predict_array(
    x: np.ndarray,
    model_ref: ModelRef | Any,
    norm: Any,
    *,
    depth: int,
    halo: int,
    tile: int,
    batch_size: int = 8,
    device: str = "auto",
    tta: bool = False,
    mc_samples: int = 0,
    valid: tuple[int, int, int, int] | None = None,
    hide_channel: int | None = None,
) -> np.ndarray:
    """Ice probability for one window of inputs ``(C, H, W)``: icemap's one inference path.

    :func:`predict` runs it on every chunk (with neighbour halos), and every in-memory scorer
    (:func:`icemap.lab.train.predict_window`, the experiment tables, the reports) runs it on
    whole windows, so what the studies measure is what ``icemap map --method unet`` ships.
    ``model_ref`` is a :class:`ModelRef` (loaded once per process) or, for a model still in
    training, the ``torch.nn.Module`` itself. ``hide_channel`` zeroes one normalised input
    channel (study a's channel-hiding experiment, Table 5).

    ``valid = (top, bottom, left, right)`` are the halo widths on each side that belong to
    neighbours (not computed); ``None`` means the window is the whole array. The window's
    top-left corner must lie on a multiple of ``2**depth`` of the global grid. Returns
    ``(2, H', W')`` float32: probability and spread (NaN spread without TTA/MC) for the
    window minus its neighbour halos.
    """
    top, bottom, left, right = valid or (0, 0, 0, 0)
    C, H, W = x.shape
    oh, ow = H - top - bottom, W - left - right
    out = np.full((2, oh, ow), np.nan, dtype=np.float32)
    z, nodata = normalise(x, norm, channel_axis=0)
    if nodata[top:H - bottom, left:W - right].all():
        return out  # nothing to map: no model load, no compute
    if hide_channel is not None:
        z[hide_channel] = 0.0
    m = 2**depth
    device = _device(device)
    if device == "cpu":
        _set_cpu_threads()
    if isinstance(model_ref, ModelRef):
        model = model_ref.load(device)
    else:
        model = model_ref.to(device).eval()

    # Tiles of the output region, their windows with halo, clipped to the block and padded
    # at the far end to a multiple of m (never at the near end: alignment must be kept).
    groups: dict[tuple[int, int], list[tuple[int, int, int, int, int, int]]] = {}
    for ty in range(top, H - bottom, tile):
        for tx in range(left, W - right, tile):
            ty1, tx1 = min(ty + tile, H - bottom), min(tx + tile, W - right)
            wy0, wx0 = max(0, ty - halo), max(0, tx - halo)
            wy1, wx1 = min(H, ty1 + halo), min(W, tx1 + halo)
            shape = (-(-(wy1 - wy0) // m) * m, -(-(wx1 - wx0) // m) * m)
            groups.setdefault(shape, []).append((ty, ty1, tx, tx1, wy0, wx0))
    for (sh, sw), tiles in groups.items():
        windows = []
        for ty, ty1, tx, tx1, wy0, wx0 in tiles:
            win = np.zeros((C, sh, sw), dtype=np.float32)
            part = z[:, wy0:wy0 + sh, wx0:wx0 + sw]
            win[:, :part.shape[1], :part.shape[2]] = part
            windows.append(win)
        probs, spreads = _run_batches(model, windows, device, batch_size, tta, mc_samples)
        for i, (ty, ty1, tx, tx1, wy0, wx0) in enumerate(tiles):
            out[0, ty - top:ty1 - top, tx - left:tx1 - left] = probs[i][ty - wy0:ty1 - wy0, tx - wx0:tx1 - wx0]
            if spreads is not None:
                out[1, ty - top:ty1 - top, tx - left:tx1 - left] = spreads[i][ty - wy0:ty1 - wy0, tx - wx0:tx1 - wx0]
    out[:, nodata[top:H - bottom, left:W - right]] = np.nan
    return out


def _predict_block(block: np.ndarray, model_ref: ModelRef, norm: Any, depth: int, halo: int, tile: int,
                   batch_size: int, device: str, tta: bool, mc_samples: int, nblocks: tuple[int, int],
                   block_id: tuple[int, ...] | None = None) -> np.ndarray:
    if block.size == 0 or block_id is None:  # dask's meta probe
        return np.empty((0, 0, 0, 0), dtype=np.float32)
    _, by, bx = block_id[-3:] if len(block_id) >= 3 else (0, *block_id[-2:])
    top = halo if by > 0 else 0
    bottom = halo if by < nblocks[0] - 1 else 0
    left = halo if bx > 0 else 0
    right = halo if bx < nblocks[1] - 1 else 0
    res = predict_array(block[0], model_ref, norm, depth=depth, halo=halo, tile=tile, batch_size=batch_size,
                        device=device, tta=tta, mc_samples=mc_samples, valid=(top, bottom, left, right))
    return res[None]  # (1 time, 2, y, x)


def _aligned_chunks(size: int, chunk: int, halo: int, m: int) -> tuple[int, ...]:
    """Chunk sizes along one axis: multiples of ``m`` (but the last), none smaller than ``halo``.

    dask's overlap needs every chunk at least as large as the halo (it would rechunk on its
    own otherwise); a short last chunk is merged into the one before it. An axis shorter than
    a chunk is one chunk of its own size, which :func:`predict` gives no halo.
    """
    chunk = max(m, (chunk // m) * m, -(-halo // m) * m)
    sizes = [chunk] * (size // chunk)
    rest = size - sum(sizes)
    if rest:
        if sizes and rest < max(halo, 1):
            sizes[-1] += rest
        else:
            sizes.append(rest)
    return tuple(sizes) if sizes else (size,)


def keep_resources() -> Any:
    """A dask config context under which the ``GPU`` resource annotation survives optimisation.

    dask's low-level linear fusion turns the graph into a plain dict and drops every layer
    annotation, so GPU-only tasks could land on CPU workers. Compute (or ``to_zarr``) U-Net
    products inside ``with icemap.infer.keep_resources():`` on clusters with GPU workers;
    ``icemap map`` does this itself. Blockwise fusion still runs and keeps annotations.
    """
    return dask.config.set({"optimization.fuse.active": False})


def _model_for(model: str | os.PathLike[str] | ModelRef | None, cube: Any) -> tuple[ModelRef, Any]:
    """The model's reference and metadata, checked against the cube and the installed extras.

    Missing extras (``ml``; ``onnx`` for an imported network) are named before any graph is
    built: the workers would otherwise fail on the first task.
    """
    require("ml", "icemap.predict")  # workers need torch and safetensors: say so before building a graph

    ref = model if isinstance(model, ModelRef) else ModelRef.from_path(resolve_model(model))
    meta = read_metadata(ref.path)
    if meta.kind == "onnx":
        require("onnx", "an imported ONNX model")
    meta.check_cube(cube)
    return ref, meta


def _inference_settings(meta: Any, *, halo: int | None, tile: int | None, batch_size: int | None,
                        threshold: float | None, mc_samples: int) -> tuple[int, int, int, int, float]:
    """Resolve and check :func:`predict`'s settings against the model.

    Returns ``(depth, halo, tile, batch_size, threshold)``: halo and tile rounded up to multiples
    of ``2**depth`` (the U-Net's pooling factor), so windows line up with the network's grid.
    """
    depth, exact_halo = model_context(meta)
    m = 2**depth
    if mc_samples and float(meta.architecture.get("dropout", 0)) <= 0:
        raise ModelError("mc_samples needs a model trained with dropout > 0 (icemap train --dropout)")
    tile = get_option("tile") if tile is None else tile
    batch_size = get_option("batch_size") if batch_size is None else batch_size
    if mc_samples < 0 or batch_size < 1 or tile < 1:
        raise ModelError("mc_samples must be >= 0, batch_size and tile >= 1")
    halo = exact_halo if halo is None else -(-max(0, int(halo)) // m) * m
    tile = max(m, -(-int(tile) // m) * m)
    thr = float(meta.threshold if threshold is None else threshold)
    if not 0.0 < thr < 1.0:
        raise ModelError(f"threshold must be a probability in (0, 1), got {thr}")
    return depth, halo, tile, batch_size, thr


def _input_blocks(cube: Any, x: Any, halo: int, m: int) -> tuple[Any, Any, tuple[int, int]]:
    """The network input as dask blocks on multiples of ``m``, and the same with halos shared.

    Returns ``(x, x_with_halos, (blocks_y, blocks_x))``. An input already in memory is checked
    for plausible reflectance here (it costs nothing); a lazy cube stays lazy.
    """
    if not isinstance(x, da.Array):
        # In memory, the check costs nothing; a lazy cube stays lazy (icemap map checks its store).
        check_reflectance(cube, stacklevel=4)  # the caller of icemap.predict
        x = da.from_array(np.asarray(x), chunks=(1, -1, get_option("chunksize"), get_option("chunksize")))
    # One task per (time, spatial chunk), all channels together, chunk edges on multiples of m.
    cy = _aligned_chunks(x.shape[2], max(x.chunks[2]), halo, m)
    cx = _aligned_chunks(x.shape[3], max(x.chunks[3]), halo, m)
    x = x.rechunk({0: 1, 1: -1, 2: cy, 3: cx})
    nblocks = (len(cy), len(cx))
    # Halos only along axes cut into several chunks: a single chunk already holds the whole axis
    # (as the whole-array run does), and dask refuses a depth larger than the axis itself.
    hy, hx = (halo if n > 1 else 0 for n in nblocks)
    xo = da.overlap.overlap(x, depth={0: 0, 1: 0, 2: hy, 3: hx}, boundary="none") if hy or hx else x
    return x, xo, nblocks


def _forward_graph(x: Any, xo: Any, ref: ModelRef, meta: Any, depth: int, halo: int, tile: int, batch_size: int,
                   device: str, tta: bool, mc_samples: int, nblocks: tuple[int, int], *,
                   gpu_resources: bool) -> Any:
    """One forward-pass task per block: (time, 2, y, x) of probability and its spread.

    With ``gpu_resources`` the tasks are annotated to need a ``GPU`` worker resource.
    """
    norm = Normalisation.from_dict(meta.normalisation)
    # "icemap" is not a fusable annotation key: it keeps blockwise fusion from merging this layer
    # with its neighbours, which would drop the resource restriction on the way.
    annotations = {"resources": {"GPU": 1}, "icemap": "unet-inference"} if gpu_resources else {}
    with dask.annotate(**annotations):
        return da.map_blocks(
            _predict_block, xo, ref, norm, depth, halo, tile, batch_size, device, tta, mc_samples, nblocks,
            chunks=(x.chunks[0], (2,), x.chunks[2], x.chunks[3]), dtype=np.float32,
            name=f"icemap-unet-{dask.base.tokenize(xo, ref, halo, tile, batch_size, device, tta, mc_samples)}",
            meta=np.empty((0, 0, 0, 0), dtype=np.float32),
        )


def _prediction_dataset(both: Any, inputs: Any, ref: ModelRef, meta: Any, thr: float, *, halo: int, tta: bool,
                        mc_samples: int, gpu_resources: bool) -> Any:
    """Wrap probability, ice mask (thresholded in the kernel layer) and spread as a Dataset."""
    prob = both[:, 0]
    ice = da.map_blocks(probability_mask, prob, thr, dtype=np.uint8)
    coords = {"time": inputs["time"], "y": inputs["y"], "x": inputs["x"]}
    out = xr.Dataset(
        {
            "ice_probability": (("time", "y", "x"), prob, {
                "long_name": "U-Net ice probability", "units": "1", "model_sha256": ref.sha256,
                "halo": halo, "tta": int(tta), "mc_samples": mc_samples}),
            "ice": (("time", "y", "x"), ice, {
                "long_name": "ice mask", "flag_values": [0, 1], "flag_meanings": "no_ice ice",
                "nodata": int(ICE_NODATA), "method": "unet", "threshold": thr}),
        },
        coords=coords,
    )
    if tta or mc_samples:
        out["ice_probability_std"] = (("time", "y", "x"), both[:, 1],
                                      {"long_name": "spread of the ice probability over TTA/MC samples"})
    out.attrs = {"method": "unet", "model": ref.path, "model_sha256": ref.sha256,
                 "channels": list(meta.channels), "threshold": thr, "gpu_resources": int(bool(gpu_resources))}
    return out


def predict(
    cube: xr.Dataset | xr.DataArray,
    model: str | os.PathLike[str] | ModelRef | None = None,
    *,
    halo: int | None = None,
    tile: int | None = None,
    batch_size: int | None = None,
    device: Literal["auto", "cpu", "cuda"] | str = "auto",
    threshold: float | None = None,
    tta: bool = False,
    mc_samples: int = 0,
    dem: DemSource | None = None,
    gpu_resources: bool | None = None,
) -> xr.Dataset:
    """Lazy U-Net ice probability and ice mask on the cube grid.

    Parameters
    ----------
    cube
        A cube (``icemap.open_cube``) holding the bands the model needs.
    model
        A checkpoint folder (``icemap train --out``, or ``icemap model import --out`` for a
        network trained elsewhere: docs/models.md) or a :class:`ModelRef`; None or
        ``"default"`` is the model shipped with icemap (:mod:`icemap.lab.default`: six common
        bands, runs on Landsat, HLS and Sentinel-2 cubes; its real-data scores are in
        docs/default-model.md).
    halo
        Context in pixels read from neighbouring chunks and tiles; default half the
        receptive field (exact equality with whole-array inference). Smaller is faster, at
        the cost of small seams. Rounded up to a multiple of ``2**depth``.
    tile
        Output tile edge within a chunk, rounded to a multiple of ``2**depth``; default the
        ``tile`` option.
    batch_size
        Windows per forward pass; default the ``batch_size`` option.
    device
        ``"auto"`` (CUDA where the worker has it), ``"cpu"`` or ``"cuda"``.
    threshold
        Probability above which a pixel is ice; default the model's own.
    tta
        Average over the 8 dihedral transforms; ``ice_probability_std`` gives their spread.
    mc_samples
        Monte-Carlo dropout samples (needs a model trained with dropout); adds to the spread.
    dem
        DEM for models with terrain inputs.
    gpu_resources
        Annotate inference tasks with the ``GPU`` resource; default: when the active
        ``distributed`` cluster has GPU workers. Compute the result inside
        :func:`keep_resources` so the annotation survives dask's graph optimisation.

    A cube already in memory is checked for values that cannot be reflectance
    (:func:`icemap.plausibility.check_reflectance`, an
    :class:`~icemap.errors.ImplausibleReflectanceWarning`); a lazy cube is not read here.

    Returns
    -------
    xarray.Dataset
        ``ice_probability`` float32 (time, y, x), NaN where inputs are nodata; ``ice`` uint8
        (1 ice, 0 not, 255 nodata); ``ice_probability_std`` with ``tta``/``mc_samples``.
    """
    ref, meta = _model_for(model, cube)
    depth, halo, tile, batch_size, thr = _inference_settings(meta, halo=halo, tile=tile, batch_size=batch_size,
                                                             threshold=threshold, mc_samples=mc_samples)
    inputs = build_inputs(cube, meta.channels, dem=dem)
    x, xo, nblocks = _input_blocks(cube, inputs.data, halo, 2**depth)
    if gpu_resources is None:
        gpu_resources = gpu_workers()
    both = _forward_graph(x, xo, ref, meta, depth, halo, tile, batch_size, device, tta, mc_samples, nblocks,
                          gpu_resources=gpu_resources)
    out = _prediction_dataset(both, inputs, ref, meta, thr, halo=halo, tta=tta, mc_samples=mc_samples,
                              gpu_resources=gpu_resources)

    return keep_grid(out, cube)
