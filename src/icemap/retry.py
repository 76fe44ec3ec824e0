"""Retries and timeouts of network I/O: the one home of these numbers.

A leaf module (standard library only), so the CLI's option defaults can read it without loading
the STAC and loader stacks. :mod:`icemap.stac` (``search()``, ``Search``, the CLI's
``--timeout``/``--retries``) reads the STAC request settings; :mod:`icemap.reader` puts
:data:`GDAL_RETRY` into the GDAL environment of every pixel read, for both loader engines.
"""

from __future__ import annotations

__all__ = ["STAC_TIMEOUT_S", "STAC_RETRIES", "STAC_BACKOFF_S", "STAC_RETRY_STATUS", "GDAL_RETRY"]

# A slow or briefly failing API (Planetary Computer under load, a gateway restarting) answers
# within 30 s and comes back within 5 retries backing off from 0.5 s (urllib3 waits 0, 1, 2, 4,
# 8 s before them: 15 s in all, measured); a dead one fails in well under a minute.
#: Seconds to wait for each STAC request.
STAC_TIMEOUT_S: float = 30.0
#: Retries of failed connections, time-outs and :data:`STAC_RETRY_STATUS` answers.
STAC_RETRIES: int = 5
#: Backoff factor: urllib3 waits ``STAC_BACKOFF_S * 2**(n-1)`` seconds before the n-th retry
#: (nothing before the first).
STAC_BACKOFF_S: float = 0.5
#: HTTP statuses a STAC request is retried on (timeout, rate limit, server errors).
STAC_RETRY_STATUS: tuple[int, ...] = (408, 429, 500, 502, 503, 504)

#: GDAL's own retries of HTTP reads (pixels of remote COGs): a transient 5xx or a dropped
#: connection is retried up to 10 times, 0.5 s apart and longer (GDAL backs off), instead of
#: failing a whole job on one hiccup of an object store (odc-stac's own cloud defaults, applied
#: here to both engines). Local files are unaffected. The user's own values (``rasterio.Env``)
#: win over these.
GDAL_RETRY: dict[str, str] = {"GDAL_HTTP_MAX_RETRY": "10", "GDAL_HTTP_RETRY_DELAY": "0.5"}
