"""Quicklook PNGs a person can judge at a glance.

A SWIR1/NIR/green false-colour composite (OLI 6-5-3: ice and snow come out cyan, rock brown,
vegetation green, water near black), the ice mask as a translucent overlay, masked pixels in
grey, and reference outlines drawn on top. Large scenes are averaged down to ``max_size``
pixels lazily before anything is computed. A footer under the picture states the acquisition
date(s), the scene ids, the method and a legend of the colours, so a quicklook mailed or
archived alone still says what it shows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from rasterio.features import rasterize

from icemap._atomic import atomic_path
from icemap.errors import IcemapError
from icemap.kernels import stretch_uint8
from icemap.labels import read_outlines

if TYPE_CHECKING:  # pragma: no cover
    import geopandas as gpd
    import xarray as xr

__all__ = ["credit_line", "false_colour", "method_text", "quicklook", "source_date_range"]

_ICE_RGB = np.array([255, 0, 200], dtype=np.float32)  # magenta: unlike any natural surface here
_OUTLINE_RGB = np.array([255, 230, 0], dtype=np.uint8)
_NODATA_RGB = np.array([128, 128, 128], dtype=np.uint8)
#: Providers' requested credit, by sensor name of :mod:`icemap.bands` (prefix match).
_CREDITS = (
    ("landsat", "Landsat Collection 2 Level-2 courtesy of the U.S. Geological Survey"),
    ("hls", "Harmonized Landsat Sentinel-2 (HLS) courtesy of NASA EOSDIS LP DAAC"),
    ("sentinel-2", "Contains modified Copernicus Sentinel data {years}"),
)


def _sensor(cube: Any) -> str | None:
    """The cube's sensor name: its ``sensor`` attribute (ingest), else a composite's source's,
    else the searched collection."""
    attrs = dict(getattr(cube, "attrs", {}))
    source = attrs.get("icemap:composite", {}).get("source_attrs", {}) if isinstance(
        attrs.get("icemap:composite"), dict) else {}
    for a in (attrs, source):
        if a.get("sensor"):
            return str(a["sensor"])
    for a in (attrs, source):
        cols = (a.get("search") or {}).get("collections") if isinstance(a.get("search"), dict) else None
        if cols:
            return str(cols[0])
    return None


def credit_line(cube: Any, dates: tuple[Any, Any] | None = None) -> str:
    """The data credit a figure of this cube must carry, from the sensor in its attributes."""
    sensor = _sensor(cube)
    years = ""
    if dates is not None:
        y0, y1 = (d.year for d in dates)
        years = f"{y0}" if y0 == y1 else f"{y0}-{y1}"
    if sensor is None:
        return "Imagery: source not recorded in the cube"
    for prefix, text in _CREDITS:
        if sensor.lower().startswith(prefix):
            return text.format(years=years).strip()
    return f"Imagery: {sensor}"


def method_text(attrs: dict[str, Any]) -> str:
    """Method and threshold or model of a product, as a figure states it."""
    method = str(attrs.get("method", "") or "")
    thr = attrs.get("threshold")
    if method == "ndsi":
        return f"NDSI, threshold {thr:g}" if isinstance(thr, (int, float)) else "NDSI"
    if method == "unet":
        sha = str(attrs.get("model_sha256", "") or "")
        text = f"U-Net, model sha256 {sha[:12]}" if sha else "U-Net"
        return text + (f", probability threshold {thr:g}" if isinstance(thr, (int, float)) else "")
    return f"method {method}" if method else "method not recorded"


def source_date_range(cube: Any, time: Any) -> tuple[Any, Any]:
    """First and last acquisition date of the cube's step nearest ``time``.

    A composite (a cube with ``source_date``) takes each pixel from one of its season's dates:
    the range of those dates. A cube of single acquisitions: that step's own date, twice.
    """
    if "source_date" in cube:
        days = cube["source_date"].sel(time=time, method="nearest")
        lo, hi = (float(v) for v in (days.min(skipna=True).values, days.max(skipna=True).values))
        if np.isfinite(lo) and np.isfinite(hi):
            epoch = pd.Timestamp("1970-01-01")
            return epoch + pd.Timedelta(days=lo), epoch + pd.Timedelta(days=hi)
    when = pd.Timestamp(cube["time"].sel(time=time, method="nearest").values)
    return when, when


def _dates_text(dates: tuple[Any, Any]) -> str:
    a, b = (f"{d:%Y-%m-%d}" for d in dates)
    return f"acquired {a}" if a == b else f"acquired {a} to {b} (composite)"



def false_colour(frame: Any, bands: tuple[str, str, str] = ("swir16", "nir08", "green")) -> np.ndarray:
    """RGB uint8 (y, x, 3) of one time step of reflectance, 2-98 percentile stretch per band."""
    available = [str(b) for b in frame["band"].values]
    bands = tuple(b if b in available else available[min(i, len(available) - 1)] for i, b in enumerate(bands))  # type: ignore[assignment]
    rgb = np.stack([np.asarray(frame.sel(band=b).values, dtype=np.float32) for b in bands], axis=-1)
    out = np.empty(rgb.shape, dtype=np.uint8)
    for i in range(3):
        v = rgb[..., i]
        finite = v[np.isfinite(v)]
        lo, hi = (np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0))
        out[..., i] = stretch_uint8(v, float(lo), float(hi))
    return out


def _coarsen(da: Any, factor: int, how: str) -> Any:
    if factor <= 1:
        return da
    c = da.coarsen(y=factor, x=factor, boundary="trim")
    return c.mean() if how == "mean" else c.max()


def quicklook(
    cube: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    ice: xr.DataArray | None = None,
    outlines: str | os.PathLike[str] | gpd.GeoDataFrame | None = None,
    time: int | str | np.datetime64 = -1,
    max_size: int = 1200,
) -> Path:
    """Write a quicklook PNG of one time step.

    Parameters
    ----------
    cube
        Cube with ``reflectance`` (from :func:`icemap.open_cube`).
    path
        PNG file to write.
    ice
        Optional ice mask (time, y, x) or (y, x) to overlay.
    outlines
        Optional outline file or GeoDataFrame drawn in yellow.
    time
        Index (int) or label of the time step.
    max_size
        Longest edge of the picture in pixels.

    The footer names the date(s) (a composite: the range of its per-pixel ``source_date``),
    the step's ``item_ids``, the method of ``ice`` (from its attributes) and a legend.
    """
    refl = cube["reflectance"]
    frame = refl.isel(time=time) if isinstance(time, int) else refl.sel(time=time)
    factor = int(np.ceil(max(frame.sizes["y"], frame.sizes["x"]) / max_size))
    small = _coarsen(frame, factor, "mean")
    rgb = false_colour(small).astype(np.float32)
    nodata = np.isnan(np.asarray(small.values, dtype=np.float32)).any(axis=0)
    if ice is not None:
        ice_t = ice.isel(time=time) if "time" in ice.dims and isinstance(time, int) else (
            ice.sel(time=frame["time"].values) if "time" in ice.dims else ice)
        ice_small = np.asarray(_coarsen((ice_t == 1).astype(np.float32), factor, "mean").values)
        alpha = 0.55 * np.clip(ice_small, 0, 1)[..., None]
        rgb = rgb * (1 - alpha) + _ICE_RGB * alpha
    img = rgb.astype(np.uint8)
    img[nodata] = _NODATA_RGB
    if outlines is not None:
        gdf = read_outlines(outlines, crs=cube.rio.crs)
        t = small.rio.transform(recalc=True) if hasattr(small, "rio") else None
        if t is None:
            raise IcemapError("cannot place outlines: the cube has no transform")
        edges = rasterize(((g.boundary, 1) for g in gdf.geometry), out_shape=img.shape[:2],
                          transform=t, all_touched=True, fill=0, dtype="uint8")
        img[edges == 1] = _OUTLINE_RGB
    legend: list[tuple[str, tuple[int, ...] | None]] = [("false colour SWIR1/NIR/green", None)]
    if ice is not None:
        legend.append(("mapped ice", tuple(int(v) for v in _ICE_RGB)))
    if outlines is not None:
        legend.append(("reference outline", tuple(int(v) for v in _OUTLINE_RGB)))
    legend.append(("no data (cloud, fill)", tuple(int(v) for v in _NODATA_RGB)))
    picture = _with_footer(Image.fromarray(img, mode="RGB"), _footer_lines(cube, frame, ice), legend)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:  # always a PNG, whatever the name says
        picture.save(tmp)
    return path


def _footer_lines(cube: Any, frame: Any, ice: Any) -> list[str]:
    """Date(s), scenes and method of one quicklook."""
    t = frame["time"].values
    dates = source_date_range(cube, t)
    first = _dates_text(dates)
    if "item_ids" in frame.coords:
        first += f"  |  {frame['item_ids'].values}"
    second = method_text(dict(ice.attrs)) if ice is not None else "no ice mask"
    return [first, f"{second}  |  {credit_line(cube, dates)}"]


def _with_footer(img: Any, lines: list[str], legend: list[tuple[str, tuple[int, ...] | None]]) -> Any:
    """The picture with a white footer: text lines, then colour swatches with their labels."""
    width = max(img.width, 480)
    size = 12 if width >= 600 else 10
    font = ImageFont.load_default(size=size)
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def fit(text: str) -> str:
        # Long scene lists are shortened to the width, never wrapped off the image.
        while text and draw_probe.textlength(text, font=font) > width - 12:
            text = text[:-4] + "..."
        return text

    line_h = size + 5
    height = img.height + line_h * (len(lines) + 1) + 10
    out = Image.new("RGB", (width, height), (255, 255, 255))
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    y = img.height + 5
    for text in lines:
        draw.text((6, y), fit(text), fill=(20, 20, 20), font=font)
        y += line_h
    x = 6
    for label, rgb in legend:
        if rgb is not None:
            draw.rectangle((x, y + 1, x + size, y + size), fill=rgb, outline=(60, 60, 60))
            x += size + 4
        draw.text((x, y), label, fill=(20, 20, 20), font=font)
        x += int(draw.textlength(label, font=font)) + 14
    return out
