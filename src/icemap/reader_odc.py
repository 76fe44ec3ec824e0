"""odc-stac's side of the reading seam: icemap's reader driver for odc-loader.

``odc.stac.load(..., driver=IcemapDriver(signer, on_error))`` reads every asset through
:class:`IcemapDriver`, odc-loader's ``ReaderDriver`` protocol on top of its rasterio driver
(``odc.loader._rio.RioDriver``). icemap adds to it what :mod:`icemap.reader` states for both
engines:

* **signing when a worker reads**: the graph holds the plain href and the signer *by
  reference*; :meth:`IcemapRasterReader.read` signs the URL right before rasterio opens it, so
  no token sits in a graph and long jobs always read with a fresh one;
* **the unreadable-asset policy**: ``on_error="raise"`` raises a :class:`~icemap.errors.LoadError`
  naming the asset (without its query string), ``on_error="nodata"`` warns with a
  :class:`~icemap.errors.MissingAssetWarning` (forwarded from distributed workers to the
  client) and leaves the chunk at nodata;
* **retries of transient HTTP errors**: :data:`icemap.reader.GDAL_RETRY` is part of the GDAL
  environment the driver captures on the client and restores on each worker.

The driver is created on the client and travels inside the graph (it pickles to the signer's
reference and the policy); readers are made per asset and per chunk, and opening one opens no
file: files are opened by :meth:`IcemapRasterReader.read` inside tasks only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import rasterio.errors
from odc.loader._rio import GlobalContext, LocalContext, RioDriver, _rio_read, capture_rio_env, rio_env

from icemap.reader import (
    GDAL_RETRY,
    OnError,
    Signer,
    redact_text,
    redact_url,
    sign_href,
    unreadable_error,
    warn_unreadable,
)

__all__ = ["IcemapDriver", "IcemapRasterReader"]


class IcemapRasterReader:
    """One asset, read by odc-loader through rasterio with icemap's signing and error policy."""

    def __init__(self, src: Any, signer: Signer | None, on_error: OnError) -> None:
        self._src = src
        self._signer = signer
        self._on_error = on_error

    def read(self, cfg: Any, dst_geobox: Any, *, dst: np.ndarray | None = None,
             selection: Any = None) -> tuple[tuple[slice, slice], np.ndarray]:
        """Sign, read the part of ``dst_geobox`` this asset covers, apply the policy on failure."""
        plain = url = self._src.uri
        try:
            if self._signer is not None:
                url = sign_href(self._signer, plain)
            src = self._src if url == plain else self._src.patch(uri=url)
            # odc's public rio_read logs failures with the URL it opened (a signed one would put
            # its token in a log) and may log-and-continue; icemap's policy decides instead.
            # icemap's assets are single bands (y, x), for which rio_read only adds that logging.
            return _rio_read(src, cfg, dst_geobox, dst=dst, selection=selection)
        except rasterio.errors.RasterioError as exc:
            reason = redact_text(str(exc).replace(url, redact_url(url)))
            if self._on_error == "nodata":
                warn_unreadable(plain, reason)
                # An empty region: odc-loader leaves the chunk at its fill value (nodata).
                empty = dst[0:0, 0:0] if dst is not None else np.empty((0, 0), dtype=cfg.dtype)
                return np.s_[0:0, 0:0], empty
            error = unreadable_error(plain, reason)
        # Raised outside the except block, so no rasterio error (which may not unpickle) travels
        # in its context to a distributed client: see icemap.reader_stackstac.
        raise error


class IcemapDriver(RioDriver):
    """odc-loader's rasterio driver with icemap's reader, signing and GDAL retry settings.

    Parameters
    ----------
    signer
        A module-level callable that signs an href (see :func:`icemap.reader.resolve_signer`),
        or None.
    on_error
        ``"raise"`` or ``"nodata"``: what an unreadable asset does.
    """

    def __init__(self, signer: Signer | None = None, on_error: OnError = "raise") -> None:
        super().__init__()
        self.signer = signer
        self.on_error = on_error

    def capture_env(self) -> dict[str, Any]:
        # odc-loader sends the client's GDAL settings (session keys excluded) to the workers;
        # icemap's retry defaults go with them unless the user set their own.
        return {**GDAL_RETRY, **capture_rio_env()}

    @contextmanager
    def restore_env(self, env: dict[str, Any], load_state: GlobalContext) -> Iterator[LocalContext]:
        with rio_env(**env):
            yield load_state.local_ctx(LocalContext)

    # odc-loader calls the reader's methods only (a protocol); ours wraps rasterio's, it does not subclass it.
    def open(self, src: Any, ctx: Any) -> IcemapRasterReader:  # type: ignore[override]
        return IcemapRasterReader(src, self.signer, self.on_error)

    def __getstate__(self) -> dict[str, Any]:
        return {"signer": self.signer, "on_error": self.on_error}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]
