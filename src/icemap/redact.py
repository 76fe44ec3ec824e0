"""Secrets out, control characters out: the one filter for text that leaves the process.

Catalog URLs carry API keys (``https://user:pass@host/...``, ``?token=...``), signers return
SAS-signed hrefs (``?sv=...&sig=...``), gateways take passwords. Any of them can end up in a
message: an error quoting the URL it failed on, a store attribute recording the search, a
report printing that attribute, a warning from GDAL. :func:`redact` is applied wherever icemap
writes text it did not compose itself (store attributes, reports, errors, warnings, logs), so
there is one rule to audit instead of one per call site.

:func:`printable` removes terminal control characters (ESC sequences, OSC 8 hyperlinks,
carriage returns) from text that came from data or paths: an item id or a model name must be
shown, never executed by the terminal. The CLI adds rich-markup escaping on top
(:func:`icemap.cli_common.safe`).

Stdlib only: ``import icemap`` stays light.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["redact", "redact_url", "printable", "REDACTED"]

REDACTED = "<redacted>"

# scheme://user:password@host -> scheme://<redacted>@host (user info is credentials, always).
_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<info>[^\s/@'\"<>?#]+)@", re.IGNORECASE)
# A URL's query string (SAS tokens, signatures, API keys), wherever it appears in a message:
# GDAL quotes the signed URL it opened, sometimes behind /vsicurl/ and with its own quoting.
_URL_QUERY = re.compile(r"(?P<base>\b[a-z][a-z0-9+.-]*://[^\s'\"?]*)\?(?P<query>[^\s'\"]*)", re.IGNORECASE)
# key=value / key: value pairs whose name says secret, outside URLs too (a signer's exception
# text, an HTTP header echoed in an error, "Authorization: Bearer ...").
_SECRET_NAMES = (r"(?:x-amz-)?(?:security-)?(?:sig|signature|token|access[_-]?token|auth[_-]?token|api[_-]?key|"
                 r"apikey|subscription[_-]?key|secret|client[_-]?secret|password|passwd|credentials?|authorization)")
_PAIR = re.compile(rf"(?P<name>\b{_SECRET_NAMES}|\bkey(?==))(?P<sep>\s*[=:]\s*)"
                   r"(?P<value>(?:Bearer\s+|Basic\s+)?[^\s&'\",;)]+)", re.IGNORECASE)
_BEARER = re.compile(r"\b(?P<kind>Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{8,}")
# C0 controls except tab and newline, DEL and C1 controls (ESC [ ... CSI, OSC 8 hyperlinks,
# 0x9b single-byte CSI): a terminal acts on them instead of showing them.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def redact(text: Any) -> str:
    """``text`` with URL user info, URL query strings and ``secret=value`` pairs replaced.

    Idempotent, and safe on any object (``str()`` first). Query strings go whole: a SAS token
    is several parameters (``sv``, ``se``, ``sp``, ``sig``) and a catalog's own parameter names
    cannot be known, so a URL keeps its scheme, host and path, which is what a user needs to
    recognise it.
    """
    out = str(text)
    out = _USERINFO.sub(lambda m: m.group("scheme") + REDACTED + "@", out)
    out = _URL_QUERY.sub(lambda m: m.group("base") + ("?" + REDACTED if m.group("query") else "?"), out)
    out = _BEARER.sub(lambda m: m.group("kind") + " " + REDACTED, out)
    return _PAIR.sub(lambda m: m.group("name") + m.group("sep") + (m.group("value") if m.group("value") == REDACTED
                                                                   else REDACTED), out)


def redact_url(url: str) -> str:
    """A URL (or path) as it may be shown or stored: :func:`redact` of it."""
    return redact(url)


def printable(text: Any, *, one_line: bool = False) -> str:
    """``text`` without terminal control characters (``one_line``: newlines become spaces too)."""
    out = _CONTROL.sub("\ufffd", str(text))
    if one_line:
        out = out.replace("\n", " ").replace("\t", " ")
    return out


def redact_attrs(obj: Any) -> Any:
    """A copy of nested attributes (dicts, lists, strings) with every string redacted."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_attrs(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_attrs(v) for v in obj)
    return obj
