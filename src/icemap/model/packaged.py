"""Where the default U-Net shipped with icemap lives, resolved from the installed package.

Kept apart from :mod:`icemap.lab.default` (its training recipe and real-data scoring, which
use :mod:`icemap.infer`) so that :mod:`icemap.infer` can resolve ``model=None`` without an
import cycle. No torch: the workflow calls this before loading a network.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from importlib.resources import as_file, files
from pathlib import Path

from icemap.errors import ModelError
from icemap.model.checkpoint import METADATA, WEIGHTS

__all__ = ["DEFAULT_NAME", "default_model_dir", "resolve_model"]

#: The name ``--model default`` resolves to (and what ``--model`` omitted means).
DEFAULT_NAME = "default"
_PACKAGE_DIR = ("models", DEFAULT_NAME)
_EXTRACTED_PATH: Path | None = None


# ----------------------------------------------------------------------------------------------
# Finding the shipped model
# ----------------------------------------------------------------------------------------------


def default_model_dir() -> Path:
    """The folder of the shipped default model, inside the installed ``icemap`` package.

    Resolved with :mod:`importlib.resources`, so it works from a wheel install as well as from
    a source checkout; from a zipped install the two files are extracted once per process to
    a temporary folder (``as_file``), which lives until the interpreter exits.
    """
    global _EXTRACTED_PATH

    res = files("icemap").joinpath(*_PACKAGE_DIR)
    if isinstance(res, Path):
        folder = res
    else:  # pragma: no cover - zipped installs only
        if _EXTRACTED_PATH is None:
            tmp = Path(_tmpdir())
            for name in (WEIGHTS, METADATA):
                with as_file(res.joinpath(name)) as p:
                    shutil.copyfile(p, tmp / name)
            _EXTRACTED_PATH = tmp
        folder = _EXTRACTED_PATH
    if not (folder / METADATA).is_file() or not (folder / WEIGHTS).is_file():
        raise ModelError(f"the default model is missing from the icemap installation ({folder}); "
                         "reinstall icemap, or pass --model MODEL_DIR")
    return folder


def _tmpdir() -> str:  # pragma: no cover - zipped installs only

    path = tempfile.mkdtemp(prefix="icemap-default-model-")
    atexit.register(shutil.rmtree, path, True)
    return path


def resolve_model(model: str | os.PathLike[str] | None) -> str | os.PathLike[str]:
    """``None`` or ``"default"`` -> the shipped model's folder; anything else unchanged.

    A folder literally called ``default`` in the working directory wins over the alias, so a
    user's own checkpoint is never shadowed.
    """
    if model is None or (os.fspath(model) == DEFAULT_NAME and not Path(DEFAULT_NAME).is_dir()):
        return default_model_dir()
    return model


