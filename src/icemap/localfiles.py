"""Users' own GeoTIFFs as items: one multi-band file (or one file per band) per date.

Earth Engine exports and clipped scenes are usually one multi-band GeoTIFF. The CLI's
``icemap ingest --files scene.tif --band-map green=3,swir16=12 --scale 0.0001 --datetime
2022-02-01`` turns each file into a STAC item with :func:`icemap.stac.item_from_files` (the one
place that describes local files), so the loader treats them like any catalog's items.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from icemap.bands import get_sensor
from icemap.errors import CatalogError
from icemap.stac import item_from_files

__all__ = ["parse_band_map", "items_from_local_files"]

_PAIR = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_]*)\s*=\s*(\d+)\s*$")


def parse_band_map(text: str | Mapping[str, int]) -> dict[str, int]:
    """``"green=3,swir16=12"`` -> ``{"green": 3, "swir16": 12}`` (1-based, as rasterio counts)."""
    if isinstance(text, Mapping):
        return {str(k): int(v) for k, v in text.items()}
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        m = _PAIR.match(part)
        if not m:
            raise CatalogError(
                f"cannot read {part!r} in the band map {text!r}; write NAME=INDEX pairs such as "
                "green=3,swir16=12 (band indexes start at 1, as rasterio counts them)"
            )
        name, index = m[1], int(m[2])
        if index < 1:
            raise CatalogError(f"band index {index} for {name!r}: indexes start at 1, as rasterio counts them")
        if name in out:
            raise CatalogError(f"band {name!r} appears twice in the band map {text!r}")
        out[name] = index
    if not out:
        raise CatalogError("the band map is empty; give e.g. --band-map green=3,swir16=12")
    return out


def items_from_local_files(
    files: Sequence[str | os.PathLike[str]],
    band_map: str | Mapping[str, int],
    datetimes: Sequence[str],
    *,
    collection: str = "landsat-c2-l2",
    scale: float | None = None,
    offset: float | None = None,
    nodata: float | None = None,
    crs: Any = None,
) -> list[dict[str, Any]]:
    """One item per multi-band file, the ``i``-th file acquired at ``datetimes[i]``.

    Parameters
    ----------
    files
        GeoTIFFs (or anything GDAL reads), one per date, all holding the bands of ``band_map``.
    band_map
        Band name -> 1-based band index, or its text form ``"green=3,swir16=12"``.
    datetimes
        ISO 8601 acquisition times, as many as files.
    collection
        Picks the sensor table, which validates band names and supplies scale/offset when
        ``scale``/``offset`` are not given.
    scale, offset, nodata, crs
        As :func:`icemap.stac.item_from_files`.
    """
    mapping = parse_band_map(band_map)
    sensor = get_sensor(collection)
    for name in mapping:
        sensor.band(name)  # BandError listing the valid names
    if not files:
        raise CatalogError("no files given; pass --files scene.tif (repeat it for several dates)")
    if len(datetimes) != len(files):
        raise CatalogError(
            f"{len(files)} file(s) but {len(datetimes)} --datetime value(s); give one acquisition date per file, "
            "in the same order (--files a.tif --datetime 2022-02-01 --files b.tif --datetime 2022-03-05)"
        )
    items = []
    for f, dt in zip(files, datetimes):
        path = Path(os.fspath(f))
        items.append(item_from_files(path, band_map=mapping, id=f"{path.stem}_{dt}", datetime=dt,
                                     collection=collection, crs=crs, scale=scale, offset=offset, nodata=nodata))
    ids = [it["id"] for it in items]
    if len(set(ids)) != len(ids):
        raise CatalogError("the same file and date are given twice; give each file and date once")
    return items
