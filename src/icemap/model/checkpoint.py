"""Model checkpoints: weights as safetensors, everything else as JSON.

A checkpoint is a folder::

    MODEL_DIR/
      model.safetensors   the weights (no pickle: safetensors holds plain tensors)
      model.json          architecture, input channels, bands, normalisation, decision
                          threshold, training provenance, validation metrics, icemap
                          version, and the sha256 of the weights file

A network trained elsewhere and imported with ``icemap model import``
(:mod:`icemap.lab.onnx_import`) is the same folder with ``model.onnx`` (a protobuf
message, no pickle either) in place of ``model.safetensors`` and
``architecture = {"kind": "onnx", ...}``; :func:`load_checkpoint` returns an
:class:`~icemap.model.onnx_runner.OnnxRunner` for it, which inference calls like a U-Net.

Nothing is ever unpickled, so a checkpoint from an untrusted source cannot run code. The JSON
alone (:func:`read_metadata`, no torch needed) is enough to build an inference graph; the
weights are loaded on the workers, checked against the recorded sha256.

:func:`read_metadata` is the one reader of ``model.json`` (inference, ``icemap model info``,
the folder's STAC Item, ONNX import and training all go through it; a test keeps it so), so
its type checks and ModelError messages hold wherever a model folder is opened.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icemap._atomic import atomic_write_bytes
from icemap._version import __version__
from icemap.errors import ModelError
from icemap.model.onnx_runner import OnnxRunner

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

    from icemap.model.unet import UNet

__all__ = ["CheckpointMeta", "save_checkpoint", "load_checkpoint", "read_metadata", "write_metadata", "sha256_of",
           "WEIGHTS", "ONNX_WEIGHTS", "METADATA"]

WEIGHTS = "model.safetensors"
ONNX_WEIGHTS = "model.onnx"
METADATA = "model.json"
FORMAT_VERSION = 1


def sha256_of(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class CheckpointMeta:
    """What a model needs besides its weights, as plain data."""

    architecture: dict[str, Any]
    channels: list[str]
    bands: list[str]
    normalisation: dict[str, Any]
    threshold: float = 0.5
    training: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    icemap_version: str = ""
    weights_sha256: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def kind(self) -> str:
        """``"unet"`` (icemap's own network, safetensors) or ``"onnx"`` (an imported network)."""
        return str(self.architecture.get("kind", "unet"))

    @property
    def weights_file(self) -> str:
        """Name of the weights file in the checkpoint folder."""
        return ONNX_WEIGHTS if self.kind == "onnx" else WEIGHTS

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=float)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointMeta:
        known = {f for f in cls.__dataclass_fields__}
        missing = [k for k in ("architecture", "channels", "bands", "normalisation") if k not in d]
        if missing:
            raise ModelError(f"checkpoint metadata lacks {missing}; it was not written by icemap")
        _check_types(d)  # first: the version comparison below trusts its type
        if d.get("format_version", 1) > FORMAT_VERSION:
            raise ModelError(
                f"checkpoint format {d['format_version']} is newer than this icemap understands "
                f"({FORMAT_VERSION}); upgrade icemap"
            )
        return cls(**{k: v for k, v in d.items() if k in known})

    def check_cube(self, cube: xr.Dataset | xr.DataArray) -> None:
        """Raise a clear error if the cube lacks a band the model was trained on."""
        refl = cube["reflectance"] if "reflectance" in getattr(cube, "data_vars", {}) else cube
        have = [str(b) for b in refl["band"].values]
        missing = [b for b in self.bands if b not in have]
        if missing:
            raise ModelError(
                f"the model needs band(s) {missing} (inputs {self.channels}) but the cube has {have}; "
                f"ingest a cube with --bands {','.join(self.bands)} or use a model trained on these bands"
            )


def _check_types(d: dict[str, Any]) -> None:
    """Refuse a model.json whose fields have the wrong types (edited by hand, or tampered).

    Every later use (the U-Net's config, the tiling, the threshold, ``model info``) trusts these
    types; checked once here, a bad file is one ModelError naming the field instead of a
    TypeError deep in inference.
    """
    def is_str_list(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, str) and x for x in v)

    checks: dict[str, tuple[Callable[[Any], bool], str]] = {
        "architecture": (lambda v: isinstance(v, dict), "an object"),
        "channels": (is_str_list, "a non-empty list of names"),
        # Empty for a network whose channels are not cube bands (benchmarks' synthetic inputs).
        "bands": (lambda v: v == [] or is_str_list(v), "a list of band names"),
        "normalisation": (lambda v: isinstance(v, dict), "an object"),
        "threshold": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      and 0.0 <= v <= 1.0, "a number in [0, 1]"),
        "training": (lambda v: isinstance(v, dict), "an object"),
        "validation": (lambda v: isinstance(v, dict), "an object"),
        "icemap_version": (lambda v: isinstance(v, str), "a string"),
        "weights_sha256": (lambda v: isinstance(v, str), "a string"),
        "format_version": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    }
    for key, (ok, what) in checks.items():
        if key in d and not ok(d[key]):
            raise ModelError(f"model.json field {key!r} must be {what}, not {d[key]!r:.80}; the file was edited "
                             "or is corrupt: copy the model folder again")
    arch = d["architecture"]
    for key in ("kind", "input", "output", "output_kind"):
        if key in arch and not isinstance(arch[key], str):
            raise ModelError(f"model.json architecture.{key} must be a string, not {arch[key]!r:.80}")
    for key in ("multiple", "halo", "depth", "base_channels", "in_channels", "batch", "opset"):
        v = arch.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ModelError(f"model.json architecture.{key} must be a whole number >= 0, not {v!r:.80}")


def read_metadata(folder: str | os.PathLike[str]) -> CheckpointMeta:
    """Read a checkpoint's JSON (cheap, no torch)."""
    path = Path(folder) / METADATA
    if not path.exists():
        raise ModelError(f"no checkpoint at {folder}: {METADATA} is missing (train one with `icemap train`)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"checkpoint metadata {path} is unreadable or corrupt: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"checkpoint metadata {path} is not a JSON object")
    return CheckpointMeta.from_dict(data)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write a checkpoint file whole or not at all, flushed to disk (weights are costly to lose)."""
    atomic_write_bytes(path, data, fsync=True)


def save_checkpoint(model: UNet, meta: CheckpointMeta, folder: str | os.PathLike[str]) -> Path:
    """Write weights then metadata (with the weights' sha256), each atomically.

    The folder's STAC Item is not written here: :func:`icemap.model.item.describe_model` adds it
    (``icemap train`` and the default-model recipe call it after this).
    """
    from safetensors.torch import save

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save(state)
    _atomic_write(out / WEIGHTS, blob)
    meta.weights_sha256 = hashlib.sha256(blob).hexdigest()
    meta.icemap_version = __version__
    meta.architecture = dict(model.config.to_dict())
    # The JSON is written last: a folder with a JSON always has the weights it describes.
    # Its STAC Item (model.stac.json) is the writer's to add (icemap.model.item.describe_model,
    # as training does): the network runtime stands below the STAC layer, which reads it.
    _atomic_write(out / METADATA, meta.to_json().encode())
    return out


def write_metadata(meta: CheckpointMeta, folder: str | os.PathLike[str]) -> Path:
    """Rewrite a checkpoint's JSON (a new threshold, more provenance), its weights untouched.

    The weights on disk must still be the ones ``meta`` names (its sha256): a JSON describing
    other weights is refused, never written.
    """
    out = Path(folder)
    wpath = out / meta.weights_file
    if not wpath.is_file():
        raise ModelError(f"checkpoint {folder} has no {meta.weights_file}: write the weights first (save_checkpoint)")
    digest = sha256_of(wpath)
    if digest != meta.weights_sha256:
        raise ModelError(f"{wpath} (sha256 {digest[:12]}...) is not the weights this metadata describes "
                         f"({str(meta.weights_sha256)[:12]}...); read the metadata of this folder again")
    _atomic_write(out / METADATA, meta.to_json().encode())
    return out


def load_checkpoint(folder: str | os.PathLike[str], *, device: str = "cpu", expected_sha256: str | None = None,
                    threads: int | None = None) -> tuple[Any, CheckpointMeta]:
    """Rebuild the model from a checkpoint folder, in eval mode, on ``device``.

    The weights file must match the sha256 in the metadata (and ``expected_sha256`` when the
    caller pinned one, as inference graphs do), so a corrupt or swapped file is refused. An
    imported ONNX network comes back as an :class:`~icemap.model.onnx_runner.OnnxRunner`
    (``threads``: its CPU intra-op threads; torch models take theirs from torch).
    """
    meta = read_metadata(folder)
    wpath = Path(folder) / meta.weights_file
    if not wpath.exists():
        raise ModelError(f"checkpoint {folder} has metadata but no {meta.weights_file}")
    blob = wpath.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    for want, what in ((meta.weights_sha256, "its metadata"), (expected_sha256, "the inference graph")):
        if want and digest != want:
            raise ModelError(
                f"weights {wpath} do not match {what} (sha256 {digest[:12]}... != {want[:12]}...); "
                "the file is corrupt or was replaced: retrain or copy the whole checkpoint folder again"
            )
    if meta.kind == "onnx":
        return OnnxRunner(blob, meta.architecture, device=device, threads=threads), meta
    if meta.kind != "unet":
        raise ModelError(f"checkpoint {folder} holds a model of kind {meta.kind!r}, which this icemap cannot run; "
                         "upgrade icemap")
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    from icemap.model.unet import UNet, UNetConfig

    try:
        state = load_bytes(blob)
    except SafetensorError as exc:
        raise ModelError(f"weights {wpath} are not a valid safetensors file: {exc}") from None
    try:
        model = UNet(UNetConfig(**meta.architecture))
        model.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"checkpoint {folder}: weights do not fit the architecture in its metadata: {exc}") from None
    return model.to(device).eval(), meta
