"""Tiny GeoTIFF scenes written in tmp folders, and the independent reads tests compare with.

Scenes are Landsat C2 L2-like (uint16 DN, nodata 0, scale 2.75e-5, offset -0.2) on any CRS and
origin; the expected cube is read back with plain rasterio windows, never through icemap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import from_bounds

SCALE = np.float32(2.75e-5)
OFFSET = np.float32(-0.2)
#: QA_PIXEL bits masked by default: fill, dilated cloud, cirrus, cloud, cloud shadow (bits 0-4).
QA_MASKED_BITS = 0b11111


def write_tif(path: Path, data: np.ndarray, epsg: int, transform: Any, nodata: float | None = 0) -> Path:
    """Write (bands, y, x) or (y, x) data as a tiled GeoTIFF."""
    arr = data if data.ndim == 3 else data[None]
    profile = {"driver": "GTiff", "width": arr.shape[2], "height": arr.shape[1], "count": arr.shape[0],
               "dtype": arr.dtype, "crs": f"EPSG:{epsg}", "transform": transform, "nodata": nodata}
    if arr.shape[1] % 16 == 0 and arr.shape[2] % 16 == 0:
        profile.update(tiled=True, blockxsize=16, blockysize=16)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(arr)
    return path


def make_scene(folder: Path, *, epsg: int, left: float, top: float, width: int, height: int, res: float = 30.0,
               bands: Sequence[str] = ("green", "swir16"), seed: int = 0, qa: bool = True,
               fill_corner: bool = True) -> dict[str, Path]:
    """One file per band (+ ``qa_pixel``); random DNs with a fill wedge in one corner."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    transform = from_origin(left, top, res, res)
    yy, xx = np.mgrid[:height, :width]
    fill = (yy + xx < min(width, height) // 3) if fill_corner else np.zeros((height, width), bool)
    files = {}
    for b in bands:
        dn = rng.integers(7273, 30000, size=(height, width), dtype=np.uint16)
        dn[fill] = 0
        files[b] = write_tif(folder / f"{b}.tif", dn, epsg, transform)
    if qa:
        choices = np.array([21824, 21824, 21824, 22280, 23888, 30048], dtype=np.uint16)  # clear, cloud, shadow, snow
        q = choices[rng.integers(0, len(choices), size=(height, width))]
        q[fill] = 1
        files["qa_pixel"] = write_tif(folder / "qa_pixel.tif", q, epsg, transform, nodata=None)
    return files


def read_expected(ds: Any, path: Path | str, band: int = 1, *, scale: float = SCALE, offset: float = OFFSET,
                  nodata: float | None = 0, qa_path: Path | str | None = None) -> np.ndarray:
    """The reflectance a cube on ``ds``'s grid must hold, read with rasterio alone.

    Only for grids aligned with the file's own (same CRS and pixel size): a boundless window
    gives fill outside the file.
    """
    left, bottom, right, top = ds.rio.bounds()
    with rasterio.open(path) as src:
        win = from_bounds(left, bottom, right, top, src.transform).round_offsets().round_lengths()
        fill = 0 if nodata is None else nodata
        dn = src.read(band, window=win, boundless=True, fill_value=fill)
        outside = src.read_masks(band, window=win, boundless=True) == 0 if nodata is None else None
    out = dn.astype(np.float32) * np.float32(scale) + np.float32(offset)
    bad = (dn == nodata) if nodata is not None else outside
    if qa_path is not None:
        with rasterio.open(qa_path) as q:
            qa = q.read(1, window=win, boundless=True, fill_value=1)
        bad = bad | ((qa & QA_MASKED_BITS) != 0)
    return np.where(bad, np.float32(np.nan), out)
