"""stackstac's side of the reading seam (the ``icemap[stackstac]`` extra).

:class:`IcemapReader` is stackstac's rasterio reader with icemap's read-time signing and
unreadable-asset policy (:mod:`icemap.reader`). Imported only when ``engine="stackstac"`` is
chosen, so an install without stackstac (beside pandas 3) never touches it.
"""

from __future__ import annotations

from typing import Any

from stackstac.rio_reader import AutoParallelRioReader

from icemap.reader import OnError, Signer, redact_text, redact_url, sign_href, unreadable_error, warn_unreadable

__all__ = ["IcemapReader"]


class IcemapReader(AutoParallelRioReader):
    """stackstac's rasterio reader with read-time signing and icemap's error policy.

    Passed to stackstac as ``functools.partial(IcemapReader, signer=..., on_error=...)``.
    """

    url: str  # set by stackstac's reader (stackstac ships no types)

    def __init__(self, *, signer: Signer | None = None, on_error: OnError = "raise", **kwargs: Any):
        super().__init__(**kwargs)
        self.signer = signer
        self.on_error = on_error

    def _open(self) -> Any:
        plain = self.url
        try:
            if self.signer is not None:
                self.url = sign_href(self.signer, plain)
            return super()._open()
        except RuntimeError as exc:
            reason = redact_text(str(exc.__cause__ or exc).replace(self.url, redact_url(self.url)))
            if self.on_error == "nodata":
                warn_unreadable(plain, reason)
                from stackstac.rio_reader import NodataReader

                return NodataReader(dtype=self.dtype, fill_value=self.fill_value)
            error = unreadable_error(plain, reason)
        finally:
            # Only the open needs the signed URL; keep the plain one for messages and pickles.
            self.url = plain
        # Raised outside the except block so that it has no __context__: rasterio's
        # CPLE_* errors in that chain cannot be unpickled, and distributed would then send the
        # client a bare Exception instead of a LoadError (a traceback instead of a one-line
        # CLI error). `from None` only hides the context; it still travels.
        raise error

    # stackstac's pickle state lists only its own fields; readers travel between workers.
    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "signer": self.signer, "on_error": self.on_error}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def read(self, window: Any, **kwargs: Any) -> Any:
        try:
            return super().read(window, **kwargs)
        except RuntimeError as exc:
            reason = redact_text(str(exc.__cause__ or exc))
            if self.on_error == "nodata":
                from stackstac.rio_reader import nodata_for_window

                warn_unreadable(self.url, reason, window=True)
                return nodata_for_window(window, self.fill_value, self.dtype)
            error = unreadable_error(self.url, reason)
        raise error  # outside the except block: see _open
