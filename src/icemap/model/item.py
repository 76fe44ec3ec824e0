"""The STAC Item of a model folder (the MLM extension): what a user of the model elsewhere needs.

Part of the network runtime (it reads the folder through :func:`icemap.model.checkpoint.read_metadata`,
the one reader of ``model.json``) on top of :mod:`icemap.describe`'s STAC writing. ``icemap train``,
the default model's recipe and ``icemap model import`` write it after the weights (docs/stac.md).
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pystac

from icemap.describe import MODEL_EXTENSIONS, _finish
from icemap.errors import ModelError
from icemap.model.checkpoint import METADATA, read_metadata

__all__ = ["MODEL_ITEM", "describe_model"]

#: Name of a model folder's Item, inside the folder (it travels with the folder).
MODEL_ITEM = "model.stac.json"

def describe_model(folder: str | os.PathLike[str], *, write: bool = True) -> dict[str, Any]:
    """The STAC Item of a model folder (``model.json`` and its weights), with the MLM extension.

    It states what a user of the model elsewhere needs: the input channels in order (bands and
    the indices computed from them), the per-channel min-max normalisation, the output (ice
    probability, thresholded at the model's threshold), the framework and the weights' sha256
    (``file:checksum``, a multihash). Written to ``<folder>/model.stac.json``. The model has no
    footprint (geometry null); ``datetime`` is when its weights were written.
    """
    root = Path(folder)
    # The one reader of model.json: a folder without one, or with a broken one, is the same
    # ModelError here as when the model is loaded for inference.
    meta = read_metadata(root)
    onnx = meta.kind == "onnx"
    weights = root / meta.weights_file
    if not weights.exists():
        raise ModelError(f"{folder} has no weights file {weights.name}")
    channels = [str(c) for c in meta.channels]
    norm = meta.normalisation
    lo, hi = norm.get("lo", []), norm.get("hi", [])
    scaling = ([{"type": "min-max", "minimum": float(a), "maximum": float(b)} for a, b in zip(lo, hi)]
               if len(lo) == len(channels) == len(hi) else None)
    name = re.sub(r"[^a-zA-Z0-9_.\- ]", "-", root.resolve().name).strip("-_. ") or "model"
    if not name[0].isalpha():
        name = f"model-{name}"
    threshold = float(meta.threshold)
    spectral = [c for c in channels if c in meta.bands]
    props: dict[str, Any] = {
        "mlm:name": name,
        "mlm:architecture": "ONNX network (imported)" if onnx else "U-Net",
        "mlm:tasks": ["semantic-segmentation"],
        "mlm:framework": "ONNX" if onnx else "PyTorch",
        "mlm:input": [{
            "name": "reflectance and indices",
            "bands": channels,
            "input": {"shape": [-1, len(channels), -1, -1], "dim_order": ["batch", "bands", "height", "width"],
                      "data_type": "float32"},
            "value_scaling": scaling,
            "description": (f"surface reflectance of {', '.join(spectral)} (STAC common names) and the indices "
                            f"{', '.join(c for c in channels if c not in spectral) or 'none'}, in this order; "
                            f"min-max normalisation ({norm.get('method', 'minmax')} of the training data); "
                            "NaN pixels filled with 0 after normalisation"),
        }],
        "mlm:output": [{
            "name": "ice_probability",
            "tasks": ["semantic-segmentation"],
            "result": {"shape": [-1, 1, -1, -1], "dim_order": ["batch", "channel", "height", "width"],
                       "data_type": "float32"},
            "description": f"probability of uncovered glacier ice; ice where it is at least {threshold}",
        }],
        "icemap:threshold": threshold,
        "icemap:normalisation": norm,
    }
    if meta.validation:
        props["icemap:validation"] = meta.validation
    sha = meta.weights_sha256
    when = datetime.fromtimestamp(weights.stat().st_mtime, tz=timezone.utc).replace(microsecond=0)
    item = pystac.Item(id=name, geometry=None, bbox=None, datetime=when, properties=props,
                       stac_extensions=list(MODEL_EXTENSIONS.values()))
    weights_extra: dict[str, Any] = {"mlm:artifact_type": "onnx" if onnx else "safetensors.torch.save_file",
                                     "file:size": weights.stat().st_size,
                                     # MLM (v1.5) names the input bands through raster:bands of the
                                     # model asset: one per input channel, in order.
                                     "raster:bands": [{"name": c, "data_type": "float32"} for c in channels]}
    if sha:
        weights_extra["file:checksum"] = "1220" + sha  # multihash: sha2-256, 32 bytes
    item.add_asset("weights", pystac.Asset(f"./{weights.name}", media_type="application/octet-stream",
                                           roles=["mlm:model", "mlm:weights", "data"], title="model weights",
                                           extra_fields=weights_extra))
    item.add_asset("metadata", pystac.Asset(f"./{METADATA}", media_type="application/json", roles=["metadata"],
                                            title="icemap model metadata (channels, normalisation, threshold)"))
    return _finish(item, str(root / MODEL_ITEM), write)
