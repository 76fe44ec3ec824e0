"""The pixel-reading seam: how a worker opens one asset.

stackstac reads through a ``Reader`` (its ``reader_protocol.Reader``). icemap's reader adds two
things to stackstac's default one:

* URL signing at open time. The graph holds the plain href and a *reference* to the signing
  function (pickled by module and name), so a signed URL or token never sits in a graph, a
  log line or a store. Each worker signs when it opens the file, which also keeps
  short-lived tokens fresh for long jobs.
* A stated policy for unreadable assets: ``on_error="raise"`` stops with an error naming the
  asset, ``on_error="nodata"`` turns it into nodata with a :class:`MissingAssetWarning`.

Readers are created per asset inside tasks, never on the client, so building a graph opens
no file.
"""

from __future__ import annotations

import importlib
import pickle
import warnings
from collections.abc import Callable
from typing import Any, Literal

from stackstac.rio_reader import AutoParallelRioReader

from icemap.errors import LoadError, MissingAssetWarning
from icemap.redact import redact, redact_url

__all__ = ["IcemapReader", "resolve_signer", "redact_url", "redact_text", "OnError"]

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


class IcemapReader(AutoParallelRioReader):
    """stackstac's rasterio reader with read-time signing and icemap's error policy.

    Passed to stackstac as ``functools.partial(IcemapReader, signer=..., on_error=...)``.
    """

    def __init__(self, *, signer: Signer | None = None, on_error: OnError = "raise", **kwargs: Any):
        super().__init__(**kwargs)
        self.signer = signer
        self.on_error = on_error

    def _open(self) -> Any:
        plain = self.url
        try:
            if self.signer is not None:
                self.url = self._sign(plain)
            return super()._open()
        except RuntimeError as exc:
            reason = redact_text(str(exc.__cause__ or exc).replace(self.url, redact_url(self.url)))
            if self.on_error == "nodata":
                _warn(f"asset {redact_url(plain)} is unreadable and becomes nodata: {reason}")
                from stackstac.rio_reader import NodataReader

                return NodataReader(dtype=self.dtype, fill_value=self.fill_value)
            error = LoadError(
                f"cannot read asset {redact_url(plain)}: {reason}. Fix or remove the item, or pass "
                "on_error='nodata' (CLI: --on-error nodata) to treat unreadable assets as nodata"
            )
        finally:
            # Only the open needs the signed URL; keep the plain one for messages and pickles.
            self.url = plain
        # Raised outside the except block so that it has no __context__: rasterio's
        # CPLE_* errors in that chain cannot be unpickled, and distributed would then send the
        # client a bare Exception instead of a LoadError (a traceback instead of a one-line
        # CLI error). `from None` only hides the context; it still travels.
        raise error

    def _sign(self, plain: str) -> str:
        """The signer's href for ``plain``; its failure as a LoadError without its secrets.

        A signer that raises may quote the token it was refused (``403 ... sig=...``): that
        text is redacted, and the chain is dropped so no traceback carries it either.
        """
        try:
            signed = self.signer(plain)  # type: ignore[misc]
        except Exception as exc:  # any failure of user code: one line, redacted
            error = LoadError(
                f"the signer {getattr(self.signer, '__name__', 'signer')} failed for asset {redact_url(plain)}: "
                f"{type(exc).__name__}: {redact(str(exc))}. Check its credentials"
            )
        else:
            if not isinstance(signed, str):
                raise LoadError(f"the signer returned {type(signed).__name__} for asset {redact_url(plain)}, "
                                "not a URL string")
            return signed
        raise error  # outside the except block: no __context__ holding the token

    # stackstac's pickle state lists only its own fields; readers travel between workers.
    def __getstate__(self) -> dict[str, Any]:  # type: ignore[override]
        return {**super().__getstate__(), "signer": self.signer, "on_error": self.on_error}

    def __setstate__(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        self.__init__(**state)  # type: ignore[misc]

    def read(self, window: Any, **kwargs: Any) -> Any:
        try:
            return super().read(window, **kwargs)
        except RuntimeError as exc:
            reason = redact_text(str(exc.__cause__ or exc))
            if self.on_error == "nodata":
                from stackstac.rio_reader import nodata_for_window

                _warn(f"asset {redact_url(self.url)} failed to read a window and gives nodata there: {reason}")
                return nodata_for_window(window, self.fill_value, self.dtype)
            error = LoadError(
                f"cannot read asset {redact_url(self.url)}: {reason}. Pass "
                "on_error='nodata' to treat unreadable assets as nodata"
            )
        raise error  # outside the except block: see _open
