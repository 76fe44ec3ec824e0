"""An imported ONNX network, callable like icemap's own U-Net.

:func:`icemap.infer.predict_array` (icemap's one windowed predictor) and its batch loop call a
model on a float32 torch batch ``(N, C, H, W)`` and apply a sigmoid to what comes back. An
:class:`OnnxRunner` has that call interface: it runs the batch through an onnxruntime session
and returns *logits* ``(N, 1, H, W)``, converting a network that ends in a sigmoid back to
logits, so TTA averaging, nodata and thresholds downstream are exactly those of the native path
(no second inference loop to keep in step).

Sessions run on onnxruntime's CUDA provider when the worker's device is CUDA and that provider
is installed (``onnxruntime-gpu``), else on the CPU provider with the intra-op thread count that
:func:`icemap.infer._cpu_threads` gives torch. Batches go through host memory on both: the copy
(a few MB per batch) is small next to a U-Net's compute, and it keeps one code path.

Nothing here unpickles anything: an ONNX file is a protobuf message. This module imports no
other icemap module but the errors, so the checkpoint loader can dispatch to it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from icemap.errors import ModelError

__all__ = ["OnnxRunner", "ort_errors"]


def refuse_external_data(model: bytes) -> None:
    """Refuse an ONNX message that names external-data files.

    Built from bytes, an onnxruntime session resolves external-data locations against the
    current working directory: weights nobody checked (the folder's sha256 covers the ONNX
    file only) from wherever the command runs. ``icemap model import`` embeds external data, so
    a model folder's network never needs any; one that names some was edited after import.
    """
    import onnx

    try:
        proto = onnx.load_model_from_string(model)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"the model's ONNX file is not readable ONNX ({exc}); import the network again") from None
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    names = sorted({e.value for t in _get_all_tensors(proto) if uses_external_data(t)
                    for e in t.external_data if e.key == "location"})
    if names or any(uses_external_data(t) for t in _get_all_tensors(proto)):
        raise ModelError(
            f"the model's ONNX file names external weight files ({', '.join(map(repr, names[:5]))}) that its "
            "checksum does not cover; icemap runs only what the model folder holds: import the network again "
            "with `icemap model import` (it embeds external weights)"
        )


def ort_errors() -> tuple[type[BaseException], ...]:
    """onnxruntime's exception classes (plain ``Exception`` subclasses of its pybind module)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NoModel",
             "RuntimeException", "NotImplemented", "EngineError", "ModelLoaded")
    return tuple(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type))


class OnnxRunner:
    """An ONNX network behind the call interface of :class:`icemap.model.unet.UNet`.

    Parameters
    ----------
    model
        The ONNX file's bytes (already checked against the checkpoint's sha256).
    architecture
        The checkpoint's ``architecture`` (``kind="onnx"``): input and output names, output kind
        (``"probability"`` or ``"logit"``) and a fixed batch size if the network has one.
    device
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``: CUDA uses onnxruntime's CUDA provider when it is
        available, the CPU provider otherwise.
    threads
        Intra-op threads of the CPU provider (``None``: onnxruntime's default, every core).
    quiet
        Keep onnxruntime's own error log off stderr (import probes input sizes that fail on
        purpose; failures still raise :class:`ModelError`).
    """

    def __init__(self, model: bytes, architecture: dict[str, Any], *, device: str = "cpu",
                 threads: int | None = None, quiet: bool = False) -> None:
        import onnxruntime as ort

        refuse_external_data(model)
        self._bytes = model
        self.architecture = dict(architecture)
        self.device = device
        self.threads = threads
        self.quiet = quiet
        self.input = str(architecture["input"])
        self.output = str(architecture["output"])
        self.output_kind = str(architecture.get("output_kind", "logit"))
        if self.output_kind not in ("probability", "logit"):
            raise ModelError(f"ONNX output kind must be 'probability' or 'logit', not {self.output_kind!r}")
        batch = architecture.get("batch")
        self.batch = int(batch) if batch else None
        opts = ort.SessionOptions()
        if quiet:
            opts.log_severity_level = 4  # fatal only
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1  # dask already runs one task per thread
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            index = int(device.split(":", 1)[1]) if ":" in device else 0
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(model, sess_options=opts, providers=providers)
        except ort_errors() as exc:
            raise ModelError(f"onnxruntime cannot load the ONNX network: {exc}") from None
        self.providers = self.session.get_providers()

    # The module-like surface predict_array and _run_batches use on a model object.
    def to(self, device: str) -> OnnxRunner:
        """This network on ``device`` (a new session when the device differs)."""
        if str(device) == self.device:
            return self
        return OnnxRunner(self._bytes, self.architecture, device=str(device), threads=self.threads, quiet=self.quiet)

    def eval(self) -> OnnxRunner:
        return self

    def modules(self) -> list[Any]:
        return []  # no torch layers: MC dropout has nothing to switch on

    def run(self, x: np.ndarray) -> np.ndarray:
        """The network's raw output for a float32 batch ``(N, C, H, W)`` (numpy in, numpy out)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        step = self.batch or max(1, len(x))
        outs = []
        for start in range(0, len(x), step):
            part = x[start:start + step]
            if self.batch and len(part) < self.batch:  # a fixed-batch network: pad the last batch
                part = np.concatenate([part, np.zeros((self.batch - len(part), *part.shape[1:]), np.float32)])
            try:
                y = self.session.run([self.output], {self.input: part})[0]
            except ort_errors() as exc:
                raise ModelError(f"the ONNX network failed on a batch of shape {part.shape}: {exc}") from None
            outs.append(np.asarray(y)[:len(x) - start])
        y = np.concatenate(outs).astype(np.float32, copy=False)
        n, _, h, w = x.shape
        if y.shape != (n, 1, h, w):
            raise ModelError(
                f"the ONNX network returned shape {y.shape} for input {x.shape}; icemap needs one output "
                "channel of the input's height and width (batch x 1 x H x W)"
            )
        return y

    def __call__(self, x: Any) -> Any:
        """Logits ``(N, 1, H, W)`` for a torch batch, on the batch's device."""
        import torch

        y = torch.from_numpy(self.run(x.detach().to("cpu", torch.float32).numpy()))
        if self.output_kind == "probability":
            # _run_batches applies the sigmoid to logits; sigmoid(logit(p)) == p to float
            # rounding, and p = 0 or 1 round-trips through -inf/+inf exactly.
            y = torch.logit(y)
        return y.to(x.device)
