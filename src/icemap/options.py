"""``icemap.set_options``: the one home of icemap's defaults, validated.

As in xarray, every default that a user may want to change for a session or a block of code
(the NDSI threshold, chunk and tile sizes, the store format...) lives here, once. Functions take
``None`` for "not given" and look the value up with :func:`get_option` when they run; the CLI
passes "not given" through instead of restating a default. So changing a default is one line in
this file, and ``with icemap.set_options(chunksize=512): ...`` changes it for one block.

Importing this module imports nothing heavy (it must stay cheap: ``import icemap`` reaches it).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from typing import Any, Literal, TypedDict, Unpack, overload

from icemap.errors import IcemapError

__all__ = ["OPTIONS", "set_options", "get_option", "resolve", "parse_season"]


def parse_season(text: object) -> tuple[tuple[int, int], tuple[int, int]]:
    """A season window ``"MM-DD/MM-DD"`` -> ``((month, day), (month, day))``, inclusive.

    The window may wrap the year end (``"12-01/02-28"``); 02-29 is allowed (it ends February in
    every year). The format lives here, beside the options that hold season windows, so the
    options and :mod:`icemap.composite` read it one way.
    """
    parts = text.split("/") if isinstance(text, str) else []
    out = []
    for part in parts:
        try:
            m, d = (int(v) for v in part.strip().split("-"))
            dt.date(2000, m, d)  # a leap year: 02-29 is a valid window end
        except ValueError:
            break
        out.append((m, d))
    if len(parts) != 2 or len(out) != 2:
        raise IcemapError(
            f"a season is MM-DD/MM-DD (first and last day, may wrap the year end: 12-01/02-28), got {text!r}"
        )
    return out[0], out[1]


def _season(v: Any) -> bool:
    try:
        parse_season(v)
    except IcemapError:
        return False
    return True


def _positive_int(lo: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _number_in(lo: float, hi: float) -> Callable[[Any], bool]:
    return lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      and lo <= v <= hi)


# name: (default, validator, what a valid value is, why this default)
_SPEC: dict[str, tuple[Any, Callable[[Any], bool], str, str]] = {
    "ndsi_threshold": (
        0.4, _number_in(-1.0, 1.0), "a number in [-1, 1]",
        "the literature's NDSI threshold; studies a and b found 0.2 and 0.1 best on their scenes "
        "(METHOD.md), so calibrate per region with `icemap calibrate`",
    ),
    "chunksize": (
        # Bounded above: a Zarr write allocates whole chunks, and 8192^2 float32 is 256 MiB.
        1024, lambda v: _positive_int(16)(v) and v <= 8192, "an integer in 16..8192",
        "spatial chunk edge in pixels: one band of one scene per chunk is 4 MiB of float32, large "
        "enough that per-task overhead is small, small enough for 2 GiB workers",
    ),
    "tile": (
        256, _positive_int(1), "an integer >= 1",
        "U-Net output tile edge within a chunk (rounded to the network's multiple)",
    ),
    "batch_size": (
        8, _positive_int(1), "an integer >= 1",
        "U-Net windows per forward pass: bounds the memory of one inference task",
    ),
    "write_wave": (
        None, lambda v: v is None or _positive_int(1)(v), "None or an integer >= 1",
        "spatial chunks a store write keeps in flight (None: two per thread): bounds a worker's "
        "memory whatever the area, while the threads still overlap the end of one slab with the next",
    ),
    "zarr_format": (
        3, lambda v: v in (2, 3), "2 or 3",
        "Zarr 3 by default; 2 for readers that have not moved yet",
    ),
    "area_buffer_px": (
        0.5, _number_in(0.0, 100.0), "a number of pixels in [0, 100]",
        "the buffer method's area uncertainty: the mapped ice perimeter times half a pixel, since "
        "an edge pixel is misplaced by up to half its size (Granshaw and Fountain 2006; Paul et al. 2013)",
    ),
    "min_observed": (
        0.9, _number_in(0.0, 1.0), "a share in [0, 1]",
        "a glacier's yearly area enters a trend (and a change rate) only where at least this share of "
        "its outline was observed: below it, cloud or fill hid part of the ice and the area is a lower "
        "bound, which would read as loss (or, after a cloudy year, as gain)",
    ),
    "season_north": (
        "08-01/09-30", _season, "a season window MM-DD/MM-DD",
        "end of the ablation season in the northern hemisphere: least seasonal snow, so composites "
        "of August-September show the glacier ice an inventory maps",
    ),
    "season_south": (
        "02-01/03-31", _season, "a season window MM-DD/MM-DD",
        "end of the austral ablation season (February-March), the scenes both studies of METHOD.md chose",
    ),
    "composite_rule": (
        "min-ndsi", lambda v: v in ("min-ndsi", "latest", "median"), "min-ndsi, latest or median",
        "the clear observation with the least snow (lowest NDSI), whole spectrum: seasonal snow is "
        "what makes single dates overstate ice",
    ),
    "engine": (
        "auto", lambda v: v in ("auto", "odc-stac", "stackstac"), "auto, odc-stac or stackstac",
        "the loader engine icemap.load reads pixels with; auto is odc-stac (maintained, reads any "
        "pystac item as it is, installs beside pandas 3); stackstac is the icemap[stackstac] extra. "
        "Both give the same cube",
    ),
    "resolution": (
        None, lambda v: v is None or _number_in(1e-9, float("inf"))(v), "None or a positive number of CRS units",
        "None: each sensor's own (its table in icemap.bands: 30 m Landsat and HLS, 20 m Sentinel-2), "
        "so pixels are copied, not resampled",
    ),
}

class Options(TypedDict, total=False):
    """The options and their types, for :class:`set_options` (each one's default and why: ``_SPEC``)."""

    ndsi_threshold: float
    chunksize: int
    tile: int
    batch_size: int
    write_wave: int | None
    zarr_format: Literal[2, 3]
    area_buffer_px: float
    min_observed: float
    season_north: str
    season_south: str
    composite_rule: Literal["min-ndsi", "latest", "median"]
    engine: Literal["auto", "odc-stac", "stackstac"]
    resolution: float | None


#: The current values (read with :func:`get_option`; change with :func:`set_options`).
OPTIONS: dict[str, Any] = {name: spec[0] for name, spec in _SPEC.items()}


def _validate(name: str, value: Any) -> None:
    if name not in _SPEC:
        raise IcemapError(f"unknown icemap option {name!r}; options: {', '.join(_SPEC)}")
    _, ok, what, _ = _SPEC[name]
    if not ok(value):
        raise IcemapError(f"icemap option {name} must be {what}, got {value!r}")


class set_options:
    """Set icemap defaults for the session, or for a ``with`` block.

    Examples
    --------
    >>> import icemap
    >>> with icemap.set_options(ndsi_threshold=0.2, chunksize=512):
    ...     ice = icemap.ice_mask(cube)            # doctest: +SKIP
    >>> icemap.set_options(zarr_format=2)          # doctest: +SKIP

    Options
    -------
    ndsi_threshold, chunksize, tile, batch_size, write_wave, zarr_format, area_buffer_px, min_observed, resolution,
    season_north, season_south, composite_rule, engine; see
    ``icemap.options.describe()`` for each one's default and why.
    """

    def __init__(self, **kwargs: Unpack[Options]) -> None:
        for name, value in kwargs.items():
            _validate(name, value)
        self._old = {name: OPTIONS[name] for name in kwargs}
        OPTIONS.update(kwargs)

    def __enter__(self) -> set_options:
        return self

    def __exit__(self, *exc: Any) -> None:
        OPTIONS.update(self._old)


# Typed by the option's name (the types of :class:`Options`).
@overload
def get_option(name: Literal["chunksize", "tile", "batch_size"]) -> int: ...
@overload
def get_option(name: Literal["ndsi_threshold", "area_buffer_px", "min_observed"]) -> float: ...
@overload
def get_option(name: Literal["write_wave"]) -> int | None: ...
@overload
def get_option(name: Literal["resolution"]) -> float | None: ...
@overload
def get_option(name: Literal["zarr_format"]) -> Literal[2, 3]: ...
@overload
def get_option(name: Literal["season_north", "season_south"]) -> str: ...
@overload
def get_option(name: Literal["composite_rule"]) -> Literal["min-ndsi", "latest", "median"]: ...
@overload
def get_option(name: Literal["engine"]) -> Literal["auto", "odc-stac", "stackstac"]: ...
@overload
def get_option(name: str) -> object: ...  # a name known only at run time (an unknown one raises)
def get_option(name: str) -> object:
    """The current value of one option (typed per name: :class:`Options`)."""
    if name not in OPTIONS:
        raise IcemapError(f"unknown icemap option {name!r}; options: {', '.join(_SPEC)}")
    return OPTIONS[name]


def resolve(name: str, value: Any) -> Any:
    """``value`` if given (validated), else the option's current value: "not given" is None."""
    if value is None:
        return OPTIONS[name]
    _validate(name, value)
    return value


def describe() -> dict[str, dict[str, Any]]:
    """Every option with its current value, its default and the reason for the default."""
    return {name: {"value": OPTIONS[name], "default": spec[0], "valid": spec[2], "why": spec[3]}
            for name, spec in _SPEC.items()}
