"""The pixel-reading seam: how a worker opens one asset, whichever engine stacks the cube.

Both loader engines read through icemap's own code: odc-stac through the reader driver
:class:`icemap.reader_odc.IcemapDriver`, stackstac (the ``icemap[stackstac]`` extra) through
:class:`icemap.reader_stackstac.IcemapReader`. Both add the same things to the engine's default
reader, from the helpers here:

* URL signing at open time. The graph holds the plain href and a *reference* to the signing
  function (pickled by module and name), so a signed URL or token never sits in a graph, a
  log line or a store. Each worker signs when it opens the file, which also keeps
  short-lived tokens fresh for long jobs.
* A stated policy for unreadable assets: ``on_error="raise"`` stops with an error naming the
  asset, ``on_error="nodata"`` turns it into nodata with a :class:`MissingAssetWarning`.

* Retries of transient HTTP errors (GDAL's ``GDAL_HTTP_MAX_RETRY``/``GDAL_HTTP_RETRY_DELAY``,
  :data:`GDAL_RETRY`), set in the GDAL environment each worker reads in.

Readers are created per asset inside tasks, never on the client, so building a graph opens
no file.
"""

from __future__ import annotations

import importlib
import pickle
import warnings
from collections.abc import Callable
from typing import Literal

from icemap.errors import LoadError, MissingAssetWarning
from icemap.redact import redact, redact_url
from icemap.retry import GDAL_RETRY

__all__ = ["resolve_signer", "redact_url", "redact_text", "OnError", "GDAL_RETRY",
           "unreadable_error", "warn_unreadable", "sign_href"]

Signer = Callable[[str], str]
OnError = Literal["raise", "nodata"]


_SIGNER_ALIASES = {
    "planetary-computer": "planetary_computer:sign_url",
    "planetary_computer": "planetary_computer:sign_url",
}


def redact_text(text: str) -> str:
    """Secrets out of a message (kept under this name for callers): :func:`icemap.redact.redact`."""
    return redact(text)


def _warn(message: str) -> None:
    """Emit a MissingAssetWarning where the user will see it.

    On a distributed worker a plain ``warnings.warn`` only reaches the worker's stderr (a pod
    log nobody reads); ``distributed.warn`` also forwards it to every connected client, so the
    CLI or notebook that ran the job shows it. Outside a worker it is ``warnings.warn``.
    """
    try:
        from distributed import warn
    except ImportError:  # pragma: no cover - distributed is a dependency
        warnings.warn(message, MissingAssetWarning, stacklevel=3)
    else:
        warn(message, MissingAssetWarning, stacklevel=3)


def resolve_signer(signer: Signer | str | None) -> Signer | None:
    """Turn ``signer`` into a picklable callable, or None.

    ``signer`` may be a callable, ``"module:function"``, or ``"planetary-computer"``. The
    callable must pickle *by reference* (a module-level function), because it travels to
    workers inside the graph: a lambda or a closure holding a token would put that token in
    the graph, so it is refused.
    """
    if signer is None:
        return None
    if isinstance(signer, str):
        target = _SIGNER_ALIASES.get(signer, signer)
        if ":" not in target:
            raise LoadError(
                f"signer {signer!r} is not 'module:function' nor one of {sorted(_SIGNER_ALIASES)}"
            )
        mod_name, func_name = target.split(":", 1)
        try:
            fn = getattr(importlib.import_module(mod_name), func_name)
        except (ImportError, AttributeError) as exc:
            raise LoadError(
                f"cannot import signer {target!r} ({exc}); install the package that provides it "
                "(e.g. `pip install planetary-computer`)"
            ) from None
        signer = fn
    if not callable(signer):
        raise LoadError(f"signer must be callable or 'module:function', got {type(signer).__name__}")
    if getattr(signer, "__name__", "") == "<lambda>" or "<locals>" in getattr(
        signer, "__qualname__", ""
    ):
        raise LoadError(
            "signer must be a module-level function (it is sent to workers by reference); "
            "a lambda or nested function could carry credentials into the task graph"
        )
    try:
        pickle.dumps(signer)
    except Exception as exc:
        raise LoadError(f"signer {signer!r} cannot be pickled for the workers: {exc}") from None
    return signer


def warn_unreadable(plain: str, reason: str, *, window: bool = False) -> None:
    """The ``on_error="nodata"`` warning for one asset (an open or a window read that failed)."""
    if window:
        _warn(f"asset {redact_url(plain)} failed to read a window and gives nodata there: {reason}")
    else:
        _warn(f"asset {redact_url(plain)} is unreadable and becomes nodata: {reason}")


def unreadable_error(plain: str, reason: str) -> LoadError:
    """The ``on_error="raise"`` error for one asset, naming the way out."""
    return LoadError(
        f"cannot read asset {redact_url(plain)}: {reason}. Fix or remove the item, or pass "
        "on_error='nodata' (CLI: --on-error nodata) to treat unreadable assets as nodata"
    )


def sign_href(signer: Signer, plain: str) -> str:
    """The signer's href for ``plain``; its failure as a :class:`LoadError` without its secrets.

    Both engines' readers call this when a worker opens a file. A signer that raises may quote
    the token it was refused (``403 ... sig=...``): that text is redacted, and the exception
    chain is dropped so that no traceback carries it either.
    """
    try:
        signed = signer(plain)
    except Exception as exc:  # any failure of user code: one line, redacted
        error = LoadError(
            f"the signer {getattr(signer, '__name__', 'signer')} failed for asset {redact_url(plain)}: "
            f"{type(exc).__name__}: {redact(str(exc))}. Check its credentials"
        )
    else:
        if not isinstance(signed, str):
            raise LoadError(f"the signer returned {type(signed).__name__} for asset {redact_url(plain)}, "
                            "not a URL string")
        return signed
    raise error  # outside the except block: no __context__ holding the token
