"""Optional dependencies (pip extras), checked before any work starts.

torch and safetensors come with ``icemap[ml]``; the NDSI path needs neither. onnx and
onnxruntime come with ``icemap[onnx]``, for networks imported with ``icemap model import``. A command that
will train, save or load a U-Net checks for them first, so a missing one is a one-line error at
once rather than a traceback after an hour of training (safetensors is imported only when the
checkpoint is saved).
"""

from __future__ import annotations

import importlib

from icemap.errors import MissingExtraError

__all__ = ["EXTRAS", "require"]

#: extra -> the modules it provides that icemap imports.
EXTRAS: dict[str, tuple[str, ...]] = {
    "ml": ("torch", "safetensors"),
    # Imported networks (icemap model import): onnx reads and checks the file, onnxruntime runs it.
    "onnx": ("onnx", "onnxruntime"),
    "report": ("matplotlib",),
    # The stackstac loader engine (icemap.load(engine="stackstac")); stackstac pins pandas < 3.
    "stackstac": ("stackstac",),
}


def require(extra: str, what: str) -> None:
    """Raise :class:`MissingExtraError` unless every module of ``extra`` imports.

    Parameters
    ----------
    extra
        The pip extra, a key of :data:`EXTRAS`.
    what
        What needs it, for the message (``"icemap train"``, ``"--method unet"``).
    """
    missing = []
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:  # also a module set to None in sys.modules, or a broken install
            missing.append(module)
    if missing:
        raise MissingExtraError(
            f"{what} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed; "
            f'run: pip install "icemap[{extra}]"'
        )
