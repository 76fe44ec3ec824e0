"""Import a network trained elsewhere (an ONNX file) as an icemap model folder.

Most published glacier networks are PyTorch or TensorFlow code of their own. Exported to ONNX
(``torch.onnx.export``, ``tf2onnx``), such a network becomes an icemap checkpoint folder::

    MODEL_DIR/
      model.onnx   the network, byte for byte (protobuf: nothing is unpickled)
      model.json   as for icemap's own models, with architecture = {"kind": "onnx", ...}

that ``icemap map --method unet --model MODEL_DIR`` and :func:`icemap.predict` run unchanged:
the same exact-halo chunking, batching, TTA and GPU routing, the model by reference with the
sha256 of ``model.onnx`` (:class:`icemap.infer.ModelRef`).

What icemap must know about a network to tile it seam-free, and how import finds it out
(on the CPU, once, recorded in ``model.json``):

* **The multiple.** Networks that down-sample (max-pooling, strided convolutions) accept only
  sizes that are multiples of ``2**depth`` and pool fixed groups of pixels, so tiles must start
  on such multiples. Probed as the smallest power of two ``m`` (1-64) for which inputs of odd
  multiples of ``m`` (not multiples of ``2m``) run and keep their size; ``--multiple`` skips it.
* **The halo.** Every output pixel must see all the inputs it depends on. Probed by changing an
  ``m x m`` block in the middle of random inputs (several, with large changes, so no ReLU hides
  the effect) and finding how far the output changes; the input is enlarged until the change
  stays clear of its edges. The block's width makes the estimate err on the large side by up to
  ``m - 1`` px, and it is rounded up to a multiple of ``m``. ``--halo`` skips the probe.
* **A check.** With the multiple and halo found, a random window is scored through
  :func:`icemap.infer.predict_array` (icemap's one predictor) in small tiles and as a whole; they
  must agree to :data:`TILING_TOLERANCE` in probability. If they do not (a network whose tiles must align on a
  larger multiple than its sizes need), the next multiple is tried; a network with global
  context (global pooling, attention over the whole image) fails with an error, because no
  finite halo makes it tile exactly.

Inputs: one tensor ``batch x bands x H x W`` float32 with dynamic height and width (a fixed
batch size is allowed); output: one tensor ``batch x 1 x H x W``, a probability or a logit
(default: probability when the graph ends in a Sigmoid).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from google.protobuf.message import DecodeError

from icemap._version import __version__
from icemap.model.item import describe_model
from icemap.errors import ModelError
from icemap.extras import require
from icemap.infer import predict_array
from icemap.model.checkpoint import METADATA, ONNX_WEIGHTS, CheckpointMeta, _atomic_write, read_metadata
from icemap.model.inputs import Normalisation, required_bands, resolve_channels
from icemap.model.onnx_runner import OnnxRunner

if TYPE_CHECKING:
    from icemap.model.checkpoint import CheckpointMeta
    from icemap.model.onnx_runner import OnnxRunner

__all__ = ["OnnxInfo", "inspect_onnx", "parse_normalisation", "probe_multiple", "probe_reach", "tiling_error",
           "import_onnx", "TILING_TOLERANCE"]

#: Largest probability difference between tiled and whole-window output that import accepts.
#: Exact halos give 0 to 1e-7 (float rounding of differently sized windows); too short a halo on
#: random inputs shows from about 1e-6 (an untrained U-Net whose context fades fast) upwards.
TILING_TOLERANCE = 1e-5
_MAX_DEPTH = 6  # multiples up to 64 px, as for icemap's own U-Net (UNetConfig.depth <= 6)
_DYNAMIC_HINT = (
    "export it with dynamic height and width, e.g. torch.onnx.export(model, (x,), 'model.onnx', dynamo=True, "
    "dynamic_shapes={'x': {0: Dim('batch'), 2: Dim('h'), 3: Dim('w')}}) (docs/models.md)"
)


@dataclass(frozen=True)
class OnnxInfo:
    """What the ONNX graph says about its one input and output."""

    input: str
    output: str
    batch: int | None
    opset: int
    producer: str
    ends_in_sigmoid: bool


def _dims(value_info: Any) -> list[int | None] | None:
    """Static sizes of a graph input/output (None for dynamic axes); None when the rank is unknown."""
    tensor = value_info.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim]


def inspect_onnx(data: bytes, n_channels: int, *, source: str = "the ONNX file") -> OnnxInfo:
    """Parse and check an ONNX network's bytes; raise :class:`ModelError` if icemap cannot tile it.

    Parameters
    ----------
    data
        The file's bytes.
    n_channels
        Number of input channels the user says the network takes (``--bands``).
    source
        The file's name, for messages.
    """
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{source} is not a readable ONNX file ({exc}); export the network again") from None
    if not model.HasField("graph") or not model.graph.node:
        raise ModelError(f"{source} holds no ONNX graph; it is not an ONNX model or is corrupt")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise ModelError(f"{source} keeps its weights in separate external-data files; import it with "
                         "import_onnx, which embeds them")
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ModelError(f"{source} is not a valid ONNX model: {str(exc).splitlines()[0]}") from None
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise ModelError(f"{source} has {len(inputs)} inputs {[i.name for i in inputs]}; icemap feeds one tensor "
                         "batch x bands x H x W")
    x = inputs[0]
    if x.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        kind = onnx.TensorProto.DataType.Name(x.type.tensor_type.elem_type)
        raise ModelError(f"{source}: input {x.name!r} is {kind}; icemap feeds float32 (export the model in float32)")
    dims = _dims(x)
    if dims is None or len(dims) != 4:
        raise ModelError(f"{source}: input {x.name!r} has rank {len(dims) if dims is not None else 'unknown'}; "
                         "icemap feeds batch x bands x H x W (rank 4)")
    if dims[1] is not None and dims[1] != n_channels:
        raise ModelError(f"{source}: the network takes {dims[1]} input channel(s) but --bands names {n_channels}; "
                         "list the bands in the order the network was trained on")
    if dims[2] is not None or dims[3] is not None:
        raise ModelError(f"{source}: the network's input has a fixed height/width ({dims[2]} x {dims[3]}), so it "
                         f"cannot be tiled; {_DYNAMIC_HINT}")
    if len(graph.output) != 1:
        raise ModelError(f"{source} has {len(graph.output)} outputs {[o.name for o in graph.output]}; icemap needs "
                         "one (batch x 1 x H x W: ice probability or logit); export only the ice output")
    y = graph.output[0]
    ydims = _dims(y)
    if ydims is not None and len(ydims) != 4:
        raise ModelError(f"{source}: output {y.name!r} has rank {len(ydims)}; icemap needs batch x 1 x H x W")
    if ydims is not None and ydims[1] is not None and ydims[1] != 1:
        raise ModelError(
            f"{source}: output {y.name!r} has {ydims[1]} channels; icemap needs one ice channel (probability or "
            "logit). For a two-class softmax network export logits[:, 1:2] - logits[:, 0:1] (the ice logit)"
        )
    last = [n for n in graph.node if y.name in n.output]
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    producer = f"{model.producer_name} {model.producer_version}".strip()
    return OnnxInfo(input=x.name, output=y.name, batch=dims[0], opset=int(opset), producer=producer,
                    ends_in_sigmoid=bool(last) and last[0].op_type == "Sigmoid")


def _embed_external_data(data: bytes, source: Path) -> bytes:
    """One self-contained ONNX message: weights kept in external-data files are read in.

    torch's exporter writes ``model.onnx`` + ``model.onnx.data`` by default; the model folder
    holds one file, so that its sha256 covers the weights and it can be copied as it is.
    """
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError):
        return data  # inspect_onnx says what is wrong
    if not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return data
    try:
        # onnx refuses locations outside the model's folder (no path traversal).
        onnx.load_external_data_for_model(model, str(source.parent))
        onnx.external_data_helper.convert_model_from_external_data(model)
        return model.SerializeToString()
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelError(f"{source}: cannot read the weights it keeps in external-data files beside it ({exc}); "
                         "copy them along, or export with external_data=False") from None


def parse_normalisation(spec: Any, n_channels: int) -> Any:
    """A :class:`~icemap.model.inputs.Normalisation` from a dict, JSON text or a JSON file.

    ``{"lo": [...], "hi": [...]}`` scales each channel as ``(x - lo) / (hi - lo)`` (icemap's own
    models); ``{"mean": [...], "std": [...]}`` as ``(x - mean) / std`` (most published networks).
    ``None``: the network takes surface reflectance as it is (lo 0, hi 1).
    """
    if spec is None:
        return Normalisation([0.0] * n_channels, [1.0] * n_channels, "identity")
    if isinstance(spec, Normalisation):
        norm = spec
    else:
        if isinstance(spec, (str, os.PathLike)):
            text = str(spec)
            if not text.lstrip().startswith("{"):
                try:
                    text = Path(text).read_text()
                except OSError as exc:
                    raise ModelError(f"--normalisation {spec}: not JSON and not a readable file ({exc.strerror})") from None
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ModelError(f"--normalisation is not valid JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise ModelError('--normalisation must be a JSON object: {"lo": [...], "hi": [...]} or {"mean": [...], '
                             '"std": [...]}')
        try:
            if "mean" in spec or "std" in spec:
                mean = np.asarray(spec["mean"], dtype=np.float64)
                std = np.asarray(spec["std"], dtype=np.float64)
                if mean.shape != std.shape or not (std > 0).all():
                    raise ModelError("--normalisation: mean and std need one value per band, std > 0")
                # (x - mean) / std == (x - lo) / (hi - lo) with lo = mean, hi = mean + std.
                norm = Normalisation(mean.tolist(), (mean + std).tolist(), "meanstd")
            else:
                norm = Normalisation(spec["lo"], spec["hi"], str(spec.get("method", "minmax")))
        except KeyError as exc:
            raise ModelError(f"--normalisation lacks {exc}; give lo and hi, or mean and std") from None
        except (TypeError, ValueError) as exc:
            raise ModelError(f"--normalisation values must be lists of numbers: {exc}") from None
    if norm.lo.shape != (n_channels,):
        raise ModelError(f"--normalisation has {norm.lo.size} value(s) per list but the model takes {n_channels} band(s)")
    if not (np.isfinite(norm.lo).all() and np.isfinite(norm.hi).all() and (norm.hi > norm.lo).all()):
        raise ModelError("--normalisation values must be finite, with hi > lo (std > 0) for every band")
    return norm


def _odd_at_least(n: int) -> int:
    return n if n % 2 else n + 1


def probe_multiple(runner: Any, n_channels: int, *, seed: int = 0) -> int:
    """The smallest ``depth`` (0-6) such that inputs of odd multiples of ``2**depth`` run and keep their size."""
    rng = np.random.default_rng(seed)
    last = ""
    for depth in range(_MAX_DEPTH + 1):
        m = 2**depth
        k = _odd_at_least(max(3, -(-24 // m)))
        h, w = m * k, m * (k + 2)
        try:
            runner.run(rng.random((1, n_channels, h, w), dtype=np.float32))
        except ModelError as exc:
            last = str(exc)
            continue
        return depth
    raise ModelError(f"the network ran on no input size tried (odd multiples of 1 to 64 px; last: {last}); "
                     "icemap needs a fully convolutional network whose output has the input's height and width")


def probe_reach(runner: Any, n_channels: int, multiple: int, *, max_size: int = 1024, samples: int = 3,
                seed: int = 0) -> int:
    """How far (px) a change of the input moves the output, measured as the module docstring says.

    Raises :class:`ModelError` when the change reaches the edges of a ``max_size`` input (the
    network has global context, or a receptive field too large to probe: pass ``--halo``).
    """
    rng = np.random.default_rng(seed)
    m = multiple
    size = max(128, 8 * m)
    while size <= max_size:
        base = rng.random((samples, n_channels, size, size), dtype=np.float32)
        c = (size // 2) // m * m
        changed = base.copy()
        changed[:, :, c:c + m, c:c + m] = rng.uniform(-1.0, 2.0, (samples, n_channels, m, m)).astype(np.float32)
        y = runner.run(np.concatenate([base, changed]))
        y0, y1 = y[:samples, 0], y[samples:, 0]
        # Exact comparison, no tolerance: outputs out of reach see identical inputs through
        # identical arithmetic (same shapes, same kernels) and do not move by a single bit, while
        # the far end of a U-Net's reach may move them by as little as 1e-8 (an untrained deep
        # path): that still is the reach that makes tiles equal whole windows bit for bit.
        moved = (y1 != y0).any(axis=0)
        if not moved.any():
            raise ModelError("changing the input did not change the network's output; is it a constant network?")
        rows, cols = np.flatnonzero(moved.any(axis=1)), np.flatnonzero(moved.any(axis=0))
        if min(rows[0], cols[0]) > m and max(rows[-1], cols[-1]) < size - 1 - m:
            # Distance from the farthest pixel of the block: the conservative end of the estimate.
            return int(max(c + m - 1 - rows[0], rows[-1] - c, c + m - 1 - cols[0], cols[-1] - c))
        size *= 2
    raise ModelError(
        f"a change of one pixel moves the network's output more than {max_size // 2} px away (global pooling, "
        "attention or a very deep network?); icemap cannot measure an exact halo: pass --halo N "
        "(chunks then agree with whole-image output only as far as N px of context allow)"
    )


def tiling_error(runner: Any, n_channels: int, depth: int, halo: int, *, seed: int = 1) -> float:
    """Largest probability difference between tiled and whole-window scoring of a random window.

    Both go through :func:`icemap.infer.predict_array`, the predictor that chunked inference uses.
    The window is ragged (not a multiple of the tile or of ``2**depth``), so edge padding is checked too.
    """
    m = 2**depth
    tile = max(2 * m, -(-max(halo, 1) // m) * m)
    h, w = 3 * tile + m // 2 + 1, 2 * tile + m + 3
    x = np.random.default_rng(seed).random((n_channels, h, w), dtype=np.float32)
    norm = Normalisation([0.0] * n_channels, [1.0] * n_channels)
    whole = predict_array(x, runner, norm, depth=depth, halo=halo, tile=10**9, device="cpu")[0]
    tiled = predict_array(x, runner, norm, depth=depth, halo=halo, tile=tile, batch_size=4, device="cpu")[0]
    return float(np.max(np.abs(tiled - whole)))


def import_onnx(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    bands: str | Sequence[str],
    *,
    normalisation: Any = None,
    halo: int | None = None,
    multiple: int | None = None,
    threshold: float | None = None,
    output: str | None = None,
    max_probe: int = 1024,
) -> Path:
    """Turn an ONNX network into an icemap model folder (``model.onnx`` + ``model.json``).

    Parameters
    ----------
    source
        The ``.onnx`` file: input ``batch x bands x H x W`` float32 with dynamic H and W,
        output ``batch x 1 x H x W``.
    out
        Model folder to write. A folder holding an icemap-trained model is refused.
    bands
        The network's input channels in order: cube bands (``green``, ``swir16``...) or derived
        channels (``ndsi``...), comma-separated or a list, or a channel-set name.
    normalisation
        See :func:`parse_normalisation`; default: reflectance as it is.
    halo
        Context px each side that makes tiles exact; default: measured.
    multiple
        Power of two that tile sizes and positions must be multiples of; default: measured.
    threshold
        Probability above which a pixel is ice (default 0.5).
    output
        ``"probability"`` or ``"logit"``; default: probability when the graph ends in a Sigmoid.
    max_probe
        Largest input edge (px) the halo probe tries.

    Returns
    -------
    pathlib.Path
        The model folder, ready for ``icemap map --method unet --model`` and :func:`icemap.predict`.
    """
    require("onnx", "icemap model import")
    require("ml", "icemap model import")  # the tiling check runs icemap's torch batch loop

    channels = resolve_channels(bands)
    n = len(channels)
    norm = parse_normalisation(normalisation, n)
    thr = _check_import_settings(output=output, threshold=threshold, halo=halo, multiple=multiple)
    src, dest = Path(source), Path(out)
    data = _read_onnx(src)
    if (dest / METADATA).exists() and read_metadata(dest).kind != "onnx":
        raise ModelError(f"{dest} holds a model trained with icemap; import into another --out folder")

    info = inspect_onnx(data, n, source=str(src))
    kind = output or ("probability" if info.ends_in_sigmoid else "logit")
    arch: dict[str, Any] = {"kind": "onnx", "input": info.input, "output": info.output, "output_kind": kind,
                            "batch": info.batch, "opset": info.opset, "producer": info.producer}
    runner = OnnxRunner(data, arch, device="cpu", quiet=True)
    first = probe_multiple(runner, n) if multiple is None else multiple.bit_length() - 1
    if kind == "probability":
        _check_probability(runner, n, first)
    arch.update(_fit_tiling(runner, n, first, fixed=multiple is not None, halo=halo, max_probe=max_probe))
    meta = CheckpointMeta(
        architecture=arch, channels=list(channels), bands=list(required_bands(channels)),
        normalisation=norm.to_dict(), threshold=thr,
        training={"source": "onnx import", "file": src.name, "producer": info.producer},
        icemap_version=__version__, weights_sha256=hashlib.sha256(data).hexdigest(),
    )
    _write_model_folder(dest, data, meta)
    return dest


def _check_import_settings(*, output: str | None, threshold: float | None, halo: int | None,
                           multiple: int | None) -> float:
    """Refuse impossible settings before the network is read; the decision threshold."""
    if output is not None and output not in ("probability", "logit"):
        raise ModelError(f"--output must be 'probability' or 'logit', not {output!r}")
    thr = 0.5 if threshold is None else float(threshold)
    if not 0.0 < thr < 1.0:
        raise ModelError(f"--threshold must be a probability in (0, 1), got {thr}")
    if halo is not None and halo < 0:
        raise ModelError(f"--halo must be >= 0, got {halo}")
    if multiple is not None and (multiple < 1 or multiple & (multiple - 1) or multiple > 2**_MAX_DEPTH):
        raise ModelError(f"--multiple must be a power of two from 1 to {2**_MAX_DEPTH}, got {multiple}")
    return thr


def _read_onnx(src: Path) -> bytes:
    """The ONNX file's bytes, with any external weight files embedded (one file to copy)."""
    try:
        data = src.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read the ONNX file {src}: {exc.strerror}") from None
    return _embed_external_data(data, src)


def _check_probability(runner: OnnxRunner, n_channels: int, depth: int) -> None:
    """A network said to output probabilities must stay in [0, 1] on random inputs."""
    size = 4 * 2**depth
    p = runner.run(np.random.default_rng(2).random((2, n_channels, size, size), dtype=np.float32))
    if np.nanmin(p) < 0 or np.nanmax(p) > 1:
        raise ModelError("the network's output leaves [0, 1], so it is not a probability: pass --output logit")


def _fit_tiling(runner: OnnxRunner, n_channels: int, first: int, *, fixed: bool, halo: int | None,
                max_probe: int) -> dict[str, Any]:
    """The smallest multiple (from ``2**first``; only that one when ``fixed``) and its halo
    whose tiles reproduce whole-window output, as ``architecture`` fields.

    The halo is the given one or the measured reach, rounded up to the multiple; an error
    lists every pair tried when none is exact within :data:`TILING_TOLERANCE`.
    """
    tried = []
    for depth in range(first, (first if fixed else _MAX_DEPTH) + 1):
        m = 2**depth
        reach = probe_reach(runner, n_channels, m, max_size=max_probe) if halo is None else None
        h = -(-(halo if halo is not None else reach) // m) * m  # type: ignore[operator]
        try:
            err = tiling_error(runner, n_channels, depth, h)
        except ModelError as exc:  # e.g. a padded window size the network rejects
            tried.append(f"multiple {m} halo {h}: {str(exc)[:200]}")
            continue
        tried.append(f"multiple {m} halo {h}: {err:.1e}")
        if err <= TILING_TOLERANCE:
            return {"depth": depth, "multiple": m, "halo": h, "halo_source": "probe" if halo is None else "given",
                    "receptive_field": None if reach is None else 2 * reach + 1, "tiling_max_diff": err}
    fix = ("give a larger --halo, or omit it to have icemap measure it" if halo is not None else
           "the network is not translation-equivariant (global pooling, normalisation over the whole image, "
           "positional inputs?), so no halo makes its tiles exact")
    raise ModelError(f"tiles of this network do not reproduce whole-window output (max probability difference "
                     f"{'; '.join(tried)}; tolerance {TILING_TOLERANCE}): {fix}")


def _write_model_folder(dest: Path, data: bytes, meta: CheckpointMeta) -> None:
    """The network, then its model.json, then its STAC Item (``model.stac.json``)."""
    dest.mkdir(parents=True, exist_ok=True)
    _atomic_write(dest / ONNX_WEIGHTS, data)
    # The JSON last, as save_checkpoint does: a folder with a JSON has the network it describes.
    _atomic_write(dest / METADATA, meta.to_json().encode())
    describe_model(dest)  # its STAC Item (MLM extension), model.stac.json
