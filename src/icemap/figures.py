"""Figures people would rather look at than read: a map of a time step and area-versus-year plots.

matplotlib is an optional dependency (``pip install "icemap[report]"``) and is imported inside the
functions only, so ``import icemap`` stays light. Figures are built on
:class:`matplotlib.figure.Figure` with the Agg canvas, never through ``pyplot``: no global figure
state, no GUI backend, safe in worker threads and on headless servers.

The map's scale bar is matplotlib's own ``AnchoredSizeBar`` (mpl_toolkits, shipped with
matplotlib): the axes are in the projected CRS's metres, so a bar of a round number of metres
is exact without another dependency (matplotlib-scalebar would add one for the same picture).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from icemap.errors import IcemapError

__all__ = ["area_plot", "glacier_change", "map_figure", "png_bytes", "save_png"]

_ICE_RGBA = (1.0, 0.0, 0.78, 0.55)  # magenta, as the quicklook: unlike any natural surface
_NODATA_RGBA = (0.5, 0.5, 0.5, 1.0)


def _require() -> None:
    from icemap.extras import require

    require("report", "figures and reports")


def _pick_time(da: Any, time: Any) -> Any:
    if isinstance(time, (int, np.integer)) and not isinstance(time, bool):
        n = da.sizes["time"]
        if not -n <= int(time) < n:
            raise IcemapError(f"time index {time} out of range for {n} time steps")
        return da.isel(time=int(time))
    from icemap.vector import _select_time

    return da.sel(time=_select_time(da, time))


def glacier_change(table: Any) -> Any:
    """Mean relative change per year of every glacier over a series: a pandas Series by id.

    (last area - first area) / first area / years between them, in %/yr: one number per
    glacier to colour its outline by; NaN where the first area is 0 or there is one step.
    """
    import pandas as pd

    t = table.sort_values("time", kind="stable")
    g = t.groupby("glacier_id", sort=False)
    first, last = g.first(), g.last()
    a0, a1 = first["area_km2"].to_numpy(np.float64), last["area_km2"].to_numpy(np.float64)
    years = ((last["time"] - first["time"]) / pd.Timedelta(days=365.25)).to_numpy(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where((a0 > 0) & (years > 0), 100.0 * (a1 - a0) / a0 / years, np.nan)
    return pd.Series(rate, index=first.index, name="change_pct_per_yr")


def _nice_length(span_m: float) -> float:
    """A round scale-bar length (1, 2 or 5 x 10^k metres) near a fifth of the map's width."""
    target = max(span_m / 5.0, 1e-9)
    k = 10.0 ** np.floor(np.log10(target))
    return float(max(m * k for m in (1, 2, 5) if m * k <= target))


def map_figure(
    cube: Any,
    pred: Any,
    *,
    time: Any = -1,
    outlines: Any = None,
    change: Any = None,
    id_column: str | None = None,
    max_size: int = 1000,
    title: str | None = None,
) -> Any:
    """A map of one time step: false colour, ice, outlines coloured by change, legend and scale.

    Parameters
    ----------
    cube
        Cube with ``reflectance`` (for the false-colour background, OLI 6-5-3).
    pred
        Product Dataset (or ice DataArray) on the cube's grid.
    time
        Index or date of the product's time step (default the last); the background is the
        cube's date nearest to it.
    outlines
        Reference outlines (path or GeoDataFrame) drawn on top.
    change
        A :func:`icemap.series.glacier_series` table: outlines are then coloured by each
        glacier's mean change (%/yr, red loss, blue gain) with a colour bar; without it they
        are yellow.
    id_column
        The outlines' id column, as given to the series (default: the same automatic choice).
    max_size
        Longest edge of the background in pixels (averaged down lazily before computing).

    Returns
    -------
    matplotlib.figure.Figure
        Save it with :func:`save_png`.
    """
    _require()
    import pandas as pd
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    from icemap.quicklook import _coarsen, false_colour
    from icemap.series import _as_ice

    if "reflectance" not in cube:
        raise IcemapError("the map needs a cube with `reflectance` (from `icemap ingest`) for its background")
    ice = _as_ice(pred)
    crs = cube.rio.crs
    ice_t = _pick_time(ice, time)
    when = pd.Timestamp(ice_t["time"].values)
    # The background is the cube's date nearest the product's step: the same date for a product
    # mapped from this cube, a date of that season for a yearly composite.
    frame = cube["reflectance"].sel(time=ice_t["time"].values, method="nearest")
    factor = int(np.ceil(max(frame.sizes["y"], frame.sizes["x"]) / max_size))
    small = _coarsen(frame, factor, "mean")
    rgb = false_colour(small)
    nodata = np.isnan(np.asarray(small.values, dtype=np.float32)).any(axis=0)
    ice_share = np.asarray(_coarsen((ice_t == 1).astype(np.float32), factor, "mean").values)
    left, bottom, right, top = small.rio.bounds() if hasattr(small, "rio") else frame.rio.bounds()
    extent = (left, right, bottom, top)

    fig = Figure(figsize=(8.5, 7.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(rgb, extent=extent, interpolation="nearest")
    overlay = np.zeros((*ice_share.shape, 4), np.float32)
    overlay[..., :3] = _ICE_RGBA[:3]
    overlay[..., 3] = _ICE_RGBA[3] * np.clip(ice_share, 0, 1)
    overlay[nodata] = _NODATA_RGBA
    ax.imshow(overlay, extent=extent, interpolation="nearest")
    handles = [Patch(facecolor=_ICE_RGBA, label="mapped ice"), Patch(facecolor=_NODATA_RGBA, label="no data (cloud, fill)")]
    if outlines is not None:
        from icemap.labels import glacier_ids, read_outlines

        gdf = read_outlines(outlines, crs=crs)
        if change is not None:
            _, table = glacier_ids(gdf, ice, id_column=id_column)
            rate = glacier_change(change)
            values = table["glacier_id"].astype(str).map(rate).to_numpy(dtype=np.float64)
            finite = values[np.isfinite(values)]
            lim = float(np.nanpercentile(np.abs(finite), 95)) if finite.size else 1.0
            lim = lim if lim > 0 else 1.0
            norm = TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)
            table = table.assign(_rate=values)
            table.boundary.plot(ax=ax, color="#ffe600", linewidth=0.6)  # glaciers without a rate
            handles.append(Patch(facecolor="none", edgecolor="#ffe600", label="outline, no rate (no ice at first step)"))
            has = table[np.isfinite(values)]
            if len(has):
                has.set_geometry(has.boundary).plot(ax=ax, column="_rate", cmap="RdBu", norm=norm, linewidth=1.4)
            from matplotlib.cm import ScalarMappable

            sm = ScalarMappable(norm=norm, cmap="RdBu")
            fig.colorbar(sm, ax=ax, shrink=0.7, extend="both",
                         label="outline colour: mean area change, %/yr (red loss, blue gain)")
        else:
            gdf.boundary.plot(ax=ax, color="#ffe600", linewidth=0.8)
            handles.append(Patch(facecolor="none", edgecolor="#ffe600", label="reference outline"))
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    length = _nice_length(right - left)
    label = f"{length / 1000:g} km" if length >= 1000 else f"{length:g} m"
    ax.add_artist(AnchoredSizeBar(ax.transData, length, label, "lower right", pad=0.6, color="white",
                                  frameon=True, size_vertical=(top - bottom) / 150, label_top=True))
    ax.artists[-1].patch.set_facecolor("black")
    ax.artists[-1].patch.set_alpha(0.5)
    ax.legend(handles=handles, loc="upper left", framealpha=0.85, fontsize=8)
    ax.set_xlabel("easting (m)")
    ax.set_ylabel("northing (m)")
    ax.ticklabel_format(style="plain", useOffset=False)
    ax.tick_params(labelsize=7)
    crs_name = crs.to_string() if crs is not None else "no CRS"
    ax.set_title(title or f"Ice on {when:%Y-%m-%d} (false colour SWIR1/NIR/green) - {crs_name}", fontsize=10)
    return fig


def area_plot(region_table: Any, glacier_table: Any, *, top: int = 5) -> Any:
    """Area versus year for the region and the largest glaciers, with uncertainty error bars.

    Parameters
    ----------
    region_table, glacier_table
        From :func:`icemap.series.region_series` and :func:`icemap.series.glacier_series`.
    top
        How many of the largest glaciers (by outline area) get their own line.
    """
    _require()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if top < 0:
        raise IcemapError(f"top must be >= 0, got {top}")
    fig = Figure(figsize=(10, 4.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_r, ax_g = fig.subplots(1, 2)
    fig.suptitle("Error bars: buffer-method uncertainty. Hollow points: partly hidden by cloud or fill "
                 "(area is a lower bound)", fontsize=8, color="#444")
    x = _decimal_year(region_table["time"])
    ax_r.errorbar(x, region_table["area_km2"], yerr=region_table["area_uncertainty_km2"], marker="o", capsize=4,
                  color="#1f4e79")
    _mark_partial(ax_r, x, region_table)
    ax_r.set_title("Region: mapped ice area", fontsize=10)
    ax_r.set_ylabel("area (km²)")
    largest = (glacier_table.groupby("glacier_id", sort=False)["outline_area_km2"].first()
               .sort_values(ascending=False).head(top).index)
    for gid in largest:
        g = glacier_table[glacier_table["glacier_id"] == gid].sort_values("time")
        gx = _decimal_year(g["time"])
        ax_g.errorbar(gx, g["area_km2"], yerr=g["area_uncertainty_km2"], marker="o", capsize=3, label=str(gid))
        _mark_partial(ax_g, gx, g)
    ax_g.set_title(f"The {len(largest)} largest glaciers (by outline area)", fontsize=10)
    if len(largest):
        ax_g.legend(fontsize=7)
    years = np.arange(np.floor(x.min()), np.floor(x.max()) + 1) if len(x) else np.array([])
    for ax in (ax_r, ax_g):
        ax.set_xlabel("year")
        ax.grid(alpha=0.3)
        # One tick per calendar year of the series, at 1 January (a step in February sits just after it).
        ax.set_xticks(years, [str(int(y)) for y in years])
        if len(x):
            ax.set_xlim(years[0] - 0.1, max(x.max(), years[-1]) + 0.3)
    return fig


def _mark_partial(ax: Any, x: np.ndarray, table: Any) -> None:
    """Hollow markers where cloud or fill hid part of the ice: there the area is a lower bound."""
    part = np.asarray(table["observed_fraction"], dtype=np.float64) < 0.999
    if part.any():
        ax.scatter(x[part], np.asarray(table["area_km2"], dtype=np.float64)[part], s=22, facecolor="white",
                   edgecolor="black", linewidth=0.8, zorder=5, label="_partly observed")


def _decimal_year(times: Any) -> np.ndarray:
    import pandas as pd

    t = pd.DatetimeIndex(times)
    start = pd.DatetimeIndex([f"{y}-01-01" for y in t.year])
    end = pd.DatetimeIndex([f"{y + 1}-01-01" for y in t.year])
    return np.asarray(t.year + (t - start) / (end - start), dtype=np.float64)


def png_bytes(fig: Any) -> bytes:
    """The figure as PNG bytes (for embedding)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def save_png(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write a figure as PNG, atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise IcemapError(f"folder {path.parent} does not exist; create it before writing {path.name}")
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        tmp.write_bytes(png_bytes(fig))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
