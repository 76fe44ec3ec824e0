"""Figures people would rather look at than read: a map of a time step and area-versus-year plots.

matplotlib is an optional dependency (``pip install "icemap[report]"``) and is imported inside the
functions only, so ``import icemap`` stays light. Figures are built on
:class:`matplotlib.figure.Figure` with the Agg canvas, never through ``pyplot``: no global figure
state, no GUI backend, safe in worker threads and on headless servers.

The map's scale bar is matplotlib's own ``AnchoredSizeBar`` (mpl_toolkits, shipped with
matplotlib): the axes are in the projected CRS's metres, so a bar of a round number of metres
is exact without another dependency (matplotlib-scalebar would add one for the same picture).
A lat/lon graticule is drawn by projecting meridians and parallels with pyproj (cartopy would
add a heavy dependency for a few lines).

Figures are meant for a paper: every title names the acquisition date(s) (for a composite, the
range of its per-pixel ``source_date``), the method and its threshold or model, and a credit
line names the data's provider. Glacier lines use the Okabe-Ito palette (distinguishable under
the common colour-vision deficiencies), each with its own marker and a label at its end, so
nothing depends on colour alone.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pyproj import Transformer

from icemap._atomic import atomic_path
from icemap.errors import IcemapError
from icemap.extras import require
from icemap.labels import glacier_ids, read_outlines
from icemap.options import resolve
from icemap.quicklook import _coarsen, _dates_text, credit_line, false_colour, method_text, source_date_range
from icemap.series import REGION_ID, _as_ice, trends
from icemap.vector import _select_time

if TYPE_CHECKING:  # pragma: no cover
    import geopandas as gpd
    import pandas as pd
    import xarray as xr
    from matplotlib.figure import Figure

__all__ = ["FIGURE_FORMATS", "OKABE_ITO", "area_plot", "credit_line", "map_figure", "method_text", "png_bytes",
           "save_figure", "save_png", "source_date_range"]

_ICE_RGBA = (1.0, 0.0, 0.78, 0.55)  # magenta, as the quicklook: unlike any natural surface
_NODATA_RGBA = (0.5, 0.5, 0.5, 1.0)
#: Okabe and Ito (2008): eight colours distinguishable with any common colour-vision deficiency.
OKABE_ITO = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7")
# Filled markers that differ in shape, so lines stay apart in greyscale and for any viewer.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "p", "h")
#: Formats :func:`save_figure` writes (matplotlib's Agg, PDF and SVG backends).
FIGURE_FORMATS = ("png", "pdf", "svg")


def _require() -> None:
    require("report", "figures and reports")


def _pick_time(da: Any, time: Any) -> Any:
    if isinstance(time, (int, np.integer)) and not isinstance(time, bool):
        n = da.sizes["time"]
        if not -n <= int(time) < n:
            raise IcemapError(f"time index {time} out of range for {n} time steps")
        return da.isel(time=int(time))

    return da.sel(time=_select_time(da, time))


def _graticule(ax: Any, crs: Any, extent: tuple[float, float, float, float]) -> None:
    """Meridians and parallels at a round step, labelled at the map's lower and left edges."""
    left, right, bottom, top = extent
    to_ll = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    to_xy = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    xs = np.linspace(left, right, 25)
    ys = np.linspace(bottom, top, 25)
    gx, gy = np.meshgrid(xs, ys)
    lon, lat = to_ll.transform(gx.ravel(), gy.ravel())
    span = max(np.ptp(lon), np.ptp(lat), 1e-6)
    step = min((s for s in (0.005, 0.01, 0.02, 0.025, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
                if span / s <= 6), default=10.0)
    style = {"color": "white", "linewidth": 0.5, "alpha": 0.6, "linestyle": ":", "gid": "graticule"}
    font = {"fontsize": 6.5, "color": "white",
            "bbox": {"facecolor": "black", "alpha": 0.45, "pad": 1.0, "linewidth": 0}}
    lat_s = np.linspace(np.min(lat), np.max(lat), 50)
    for lo in np.arange(np.ceil(np.min(lon) / step) * step, np.max(lon), step):
        x, y = to_xy.transform(np.full_like(lat_s, lo), lat_s)
        ax.plot(x, y, **style)
        xb, _ = to_xy.transform(lo, float(np.max(lat)))
        if left < xb < right:  # along the top edge: the scale bar and the credit use the bottom
            ax.text(xb, top, f"{abs(lo):.3f}°{'E' if lo >= 0 else 'W'}".replace(".000°", "°"), ha="center",
                    va="top", gid="graticule-label", **font)
    lon_s = np.linspace(np.min(lon), np.max(lon), 50)
    for la in np.arange(np.ceil(np.min(lat) / step) * step, np.max(lat), step):
        x, y = to_xy.transform(lon_s, np.full_like(lon_s, la))
        ax.plot(x, y, **style)
        _, yb = to_xy.transform(float(np.min(lon)), la)
        if bottom < yb < top:
            ax.text(left, yb, f"{abs(la):.3f}°{'N' if la >= 0 else 'S'}".replace(".000°", "°"), ha="left",
                    va="center", gid="graticule-label", **font)


def _nice_length(span_m: float) -> float:
    """A round scale-bar length (1, 2 or 5 x 10^k metres) near a fifth of the map's width."""
    target = max(span_m / 5.0, 1e-9)
    k = 10.0 ** np.floor(np.log10(target))
    return float(max(m * k for m in (1, 2, 5) if m * k <= target))


def _map_background(cube: Any, ice_t: Any, max_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                    tuple[float, float, float, float]]:
    """The false-colour background, the ice share per background pixel, its nodata mask and bounds.

    Both are averaged down lazily to at most ``max_size`` pixels a side before computing.
    """
    # The background is the cube's date nearest the product's step: the same date for a product
    # mapped from this cube, a date of that season for a yearly composite.
    frame = cube["reflectance"].sel(time=ice_t["time"].values, method="nearest")
    factor = int(np.ceil(max(frame.sizes["y"], frame.sizes["x"]) / max_size))
    small = _coarsen(frame, factor, "mean")
    rgb = false_colour(small)
    nodata = np.asarray(np.isnan(np.asarray(small.values, dtype=np.float32)).any(axis=0))
    ice_share = np.asarray(_coarsen((ice_t == 1).astype(np.float32), factor, "mean").values)
    bounds = small.rio.bounds() if hasattr(small, "rio") else frame.rio.bounds()
    return rgb, ice_share, nodata, bounds


def _draw_ice(ax: Any, rgb: np.ndarray, ice_share: np.ndarray, nodata: np.ndarray,
              extent: tuple[float, float, float, float]) -> list[Any]:
    """Draw the background and the ice overlay (nodata greyed); return their legend handles."""
    from matplotlib.patches import Patch

    ax.imshow(rgb, extent=extent, interpolation="nearest")
    overlay = np.zeros((*ice_share.shape, 4), np.float32)
    overlay[..., :3] = _ICE_RGBA[:3]
    overlay[..., 3] = _ICE_RGBA[3] * np.clip(ice_share, 0, 1)
    overlay[nodata] = _NODATA_RGBA
    ax.imshow(overlay, extent=extent, interpolation="nearest")
    return [Patch(facecolor=_ICE_RGBA, label="mapped ice"), Patch(facecolor=_NODATA_RGBA, label="no data (cloud, fill)")]


def _draw_outlines(fig: Any, ax: Any, outlines: Any, change: Any, ice: Any, *, crs: Any, id_column: str | None,
                   min_observed: float | None) -> list[Any]:
    """Draw the reference outlines, yellow or (with ``change``) coloured by trend; return legend handles."""
    from matplotlib.patches import Patch

    gdf = read_outlines(outlines, crs=crs)
    if change is not None:
        return _draw_trend_outlines(fig, ax, gdf, change, ice, id_column=id_column, min_observed=min_observed)
    gdf.boundary.plot(ax=ax, color="#ffe600", linewidth=0.8)
    return [Patch(facecolor="none", edgecolor="#ffe600", label="reference outline")]


def _draw_trend_outlines(fig: Any, ax: Any, gdf: Any, change: Any, ice: Any, *, id_column: str | None,
                         min_observed: float | None) -> list[Any]:
    """Outlines coloured by each glacier's area trend (%/yr), solid where significant, with a colour bar.

    The colour range is symmetric about 0 at the 95th percentile of the absolute trends, so one
    outlier glacier does not wash out the others. Glaciers without a trend stay yellow.
    """
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Patch

    handles: list[Any] = []
    _, table = glacier_ids(gdf, ice, id_column=id_column)
    trend = change if "rate_pct_per_yr" in change.columns else trends(change, min_observed=min_observed,
                                                                       region=False)
    trend = trend.set_index(trend["glacier_id"].astype(str))
    ids_ = table["glacier_id"].astype(str)
    values = ids_.map(trend["rate_pct_per_yr"]).to_numpy(dtype=np.float64)
    signif = ids_.map(trend["significant"].fillna(False)).fillna(False).to_numpy(dtype=bool)
    finite = values[np.isfinite(values)]
    lim = float(np.nanpercentile(np.abs(finite), 95)) if finite.size else 1.0
    lim = lim if lim > 0 else 1.0
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)
    table = table.assign(_rate=values)
    none = table[~np.isfinite(values)]
    if len(none):
        none.boundary.plot(ax=ax, color="#ffe600", linewidth=0.8)  # glaciers without a trend
    handles.append(Patch(facecolor="none", edgecolor="#ffe600",
                         label="outline, no trend (< 2 well observed season-years)"))
    for sig, style in ((True, "solid"), (False, "dashed")):
        has = table[np.isfinite(values) & (signif == sig)]
        if len(has):
            has.set_geometry(has.boundary).plot(ax=ax, column="_rate", cmap="RdBu", norm=norm,
                                                linewidth=1.4, linestyle=style)
    from matplotlib.lines import Line2D

    handles.append(Line2D([], [], color="#555", linestyle="dashed", label="trend not significant (2 sigma)"))
    from matplotlib.cm import ScalarMappable

    sm = ScalarMappable(norm=norm, cmap="RdBu")
    fig.colorbar(sm, ax=ax, shrink=0.7, extend="both",
                 label="outline colour: area trend over season-years, %/yr (red loss, blue gain)")
    return handles


def _draw_scale_bar(ax: Any, left: float, right: float, bottom: float, top: float) -> None:
    """A scale bar of a round length in the lower right, white on a half-transparent black box."""
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    length = _nice_length(right - left)
    label = f"{length / 1000:g} km" if length >= 1000 else f"{length:g} m"
    ax.add_artist(AnchoredSizeBar(ax.transData, length, label, "lower right", pad=0.6, color="white",
                                  frameon=True, size_vertical=(top - bottom) / 150, label_top=True))
    ax.artists[-1].patch.set_facecolor("black")
    ax.artists[-1].patch.set_alpha(0.5)


def _label_map(ax: Any, cube: Any, attrs: dict[str, Any], crs: Any, dates: Any, when: Any,
               title: str | None) -> None:
    """Axis labels, the title (dates, method, CRS) and the data credit in the map's lower left."""
    ax.set_xlabel("easting (m)")
    ax.set_ylabel("northing (m)")
    ax.ticklabel_format(style="plain", useOffset=False)
    ax.tick_params(labelsize=7)
    crs_name = crs.to_string() if crs is not None else "no CRS"
    first = title or f"Mapped ice, {_dates_text(dates)}"
    label = "" if dates[0] <= when <= dates[1] + pd.Timedelta(days=1) else f"; product step {when:%Y-%m-%d}"
    ax.set_title(f"{first}\n{method_text(attrs)}; false colour SWIR1/NIR/green; {crs_name}{label}", fontsize=9.5)
    # The credit sits in the map's lower left, as map attributions do: the legend is below the map.
    ax.text(0.01, 0.01, credit_line(cube, dates), transform=ax.transAxes, fontsize=6.5, color="white", ha="left",
            va="bottom", gid="credit", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1.5, "linewidth": 0})


def map_figure(
    cube: xr.Dataset,
    pred: xr.Dataset | xr.DataArray,
    *,
    time: int | str | np.datetime64 = -1,
    outlines: str | os.PathLike[str] | gpd.GeoDataFrame | None = None,
    change: pd.DataFrame | None = None,
    id_column: str | None = None,
    max_size: int = 1000,
    title: str | None = None,
    dpi: int = 150,
    min_observed: float | None = None,
) -> Figure:
    """A map of one time step: false colour, ice, outlines coloured by trend, legend, scale,
    graticule, acquisition dates, method and data credit.

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
        A :func:`icemap.series.glacier_series` table (or its :func:`icemap.series.trends`):
        outlines are then coloured by each glacier's trend over season-years (%/yr, red loss,
        blue gain; solid where significant at 2 sigma, dashed where not) with a colour bar;
        glaciers without a trend, and all outlines without ``change``, are yellow.
    id_column
        The outlines' id column, as given to the series (default: the same automatic choice).
    max_size
        Longest edge of the background in pixels (averaged down lazily before computing).
    title
        Replaces the first title line; the dates, method and credit lines stay.
    dpi
        Resolution the figure is drawn and saved at.
    min_observed
        For ``change`` given as a series: the share a year needs to enter a trend.

    Returns
    -------
    matplotlib.figure.Figure
        Save it with :func:`save_figure` (PNG, PDF or SVG).
    """
    _require()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if "reflectance" not in cube:
        raise IcemapError("the map needs a cube with `reflectance` (from `icemap ingest`) for its background")
    ice = _as_ice(pred)
    attrs = {**ice.attrs, **dict(getattr(pred, "attrs", {}))}
    crs = cube.rio.crs
    ice_t = _pick_time(ice, time)
    when = pd.Timestamp(ice_t["time"].values)
    dates = source_date_range(cube, ice_t["time"].values)
    rgb, ice_share, nodata, (left, bottom, right, top) = _map_background(cube, ice_t, max_size)

    fig = Figure(figsize=(8.5, 7.8), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    handles = _draw_ice(ax, rgb, ice_share, nodata, (left, right, bottom, top))
    if outlines is not None:
        handles += _draw_outlines(fig, ax, outlines, change, ice, crs=crs, id_column=id_column,
                                  min_observed=min_observed)
    _graticule(ax, crs, (left, right, bottom, top))
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    _draw_scale_bar(ax, left, right, bottom, top)
    fig.legend(handles=handles, loc="outside lower center", ncols=2, framealpha=0.85, fontsize=8)
    _label_map(ax, cube, attrs, crs, dates, when, title)
    return fig


def area_plot(region_table: pd.DataFrame, glacier_table: pd.DataFrame, *, top: int = 5, dpi: int = 150,
              min_observed: float | None = None, credit: str | None = None) -> Figure:
    """Area versus year for the region and the largest glaciers, with uncertainty and trends.

    Parameters
    ----------
    region_table, glacier_table
        From :func:`icemap.series.region_series` and :func:`icemap.series.glacier_series`.
    top
        How many of the largest glaciers (by outline area) get their own line; each has an
        Okabe-Ito colour, its own marker and its id written at the end of its line.
    dpi
        Resolution the figure is drawn and saved at.
    min_observed
        Share below which a point is a lower bound, drawn hollow (default the table's, else
        the option).
    credit
        A data credit line (:func:`credit_line`) at the bottom.
    """
    _require()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if top < 0:
        raise IcemapError(f"top must be >= 0, got {top}")
    min_observed = float(resolve("min_observed", min_observed if min_observed is not None
                                 else glacier_table.attrs.get("min_observed")))
    fig = Figure(figsize=(10, 4.6), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax_r, ax_g = fig.subplots(1, 2)
    times = pd.DatetimeIndex(region_table["time"])
    span = f"{times.min():%Y-%m-%d} to {times.max():%Y-%m-%d}" if len(times) else "no time step"
    fig.suptitle(f"Ice area per time step, {span}. Error bars: buffer-method uncertainty (region: sum over "
                 f"glaciers).\nHollow: observed < {100 * min_observed:.0f}% (a lower bound, left out of trends). "
                 "Dashed: weighted least-squares trend over season-years.",
                 fontsize=8, color="#444")
    trend = trends(glacier_table, min_observed=min_observed).set_index("glacier_id")
    x = _decimal_year(region_table["time"])
    colour = OKABE_ITO[5]
    ax_r.errorbar(x, region_table["area_km2"], yerr=region_table["area_uncertainty_sum_km2"], marker="o",
                  capsize=4, color=colour)
    _mark_partial(ax_r, x, region_table, min_observed, colour)
    _trend_line(ax_r, trend.loc[REGION_ID] if REGION_ID in trend.index else None, colour, x)
    ax_r.set_title("Region: mapped ice area", fontsize=10)
    ax_r.set_ylabel("area (km²)")
    largest = (glacier_table.groupby("glacier_id", sort=False)["outline_area_km2"].first()
               .sort_values(ascending=False).head(top).index)
    # Okabe-Ito without its yellow (too faint for text on white); the region's blue comes last.
    palette = ("#E69F00", "#56B4E9", "#009E73", "#D55E00", "#CC79A7", "#000000", "#0072B2")
    for k, gid in enumerate(largest):
        g = glacier_table[glacier_table["glacier_id"] == gid].sort_values("time")
        gx = _decimal_year(g["time"])
        c, m = palette[k % len(palette)], _MARKERS[k % len(_MARKERS)]
        ax_g.errorbar(gx, g["area_km2"], yerr=g["area_uncertainty_km2"], marker=m, capsize=3, label=str(gid),
                      color=c, markersize=6)
        _mark_partial(ax_g, gx, g, min_observed, c, marker=m)
        ax_g.annotate(str(gid), (gx[-1], float(g["area_km2"].iloc[-1])), xytext=(6, 0), textcoords="offset points",
                      fontsize=7, color=c, va="center", gid="direct-label")
        _trend_line(ax_g, trend.loc[str(gid)] if str(gid) in trend.index else None, c, gx)
    ax_g.set_title(f"The {len(largest)} largest glaciers (by outline area)", fontsize=10)
    if len(largest):  # below the axes, clear of the lines (each line is also labelled at its end)
        ax_g.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=min(len(largest), 3))
    years = np.arange(np.floor(x.min()), np.floor(x.max()) + 1) if len(x) else np.array([])
    for ax in (ax_r, ax_g):
        ax.set_xlabel("year")
        ax.grid(alpha=0.3)
        # One tick per calendar year of the series, at 1 January (a step in February sits just after it).
        ax.set_xticks(years, [str(int(y)) for y in years])
        if len(x):
            ax.set_xlim(years[0] - 0.1, max(x.max(), years[-1]) + 0.6)  # room for the direct labels
    if credit:
        fig.supxlabel(credit, fontsize=7, color="#333", x=0.01, ha="left", gid="credit")
    return fig


def _trend_line(ax: Any, row: Any, colour: str, x: np.ndarray) -> None:
    """The weighted least-squares trend over its season-years, dashed, placed at the points'
    position within the year (a composite's season end)."""
    if row is None or not np.isfinite(row["rate_km2_per_yr"]):
        return
    frac = float(np.mean(x - np.floor(x))) if len(x) else 0.0
    years = np.array([float(row["first_year"]), float(row["last_year"])])
    rate = float(row["rate_km2_per_yr"])
    sig = "significant" if bool(row["significant"]) else "not significant"
    ax.plot(years + frac, float(row["area_fit_first_year_km2"]) + rate * (years - years[0]), color=colour,
            linestyle="--", linewidth=1.0, gid="trend", label=f"_trend {rate:+.4f} km²/yr ({sig}, 2 sigma)")


def _mark_partial(ax: Any, x: np.ndarray, table: Any, min_observed: float, colour: str, marker: str = "o") -> None:
    """Hollow markers where cloud or fill hid too much of the ice: there the area is a lower bound."""
    obs = np.asarray(table["observed_fraction"], dtype=np.float64)
    part = ~(np.nan_to_num(obs, nan=-1.0) >= min_observed)
    if part.any():
        ax.scatter(x[part], np.asarray(table["area_km2"], dtype=np.float64)[part], s=30, facecolor="white",
                   edgecolor=colour, marker=marker, linewidth=1.0, zorder=5, label="_lower bound")


def _decimal_year(times: Any) -> np.ndarray:
    t = pd.DatetimeIndex(times)
    start = pd.DatetimeIndex([f"{y}-01-01" for y in t.year])
    end = pd.DatetimeIndex([f"{y + 1}-01-01" for y in t.year])
    return np.asarray(t.year + (t - start) / (end - start), dtype=np.float64)


def png_bytes(fig: Figure, dpi: int | None = None) -> bytes:
    """The figure as PNG bytes (for embedding), at the figure's dpi unless given."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi or fig.dpi)
    return buf.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: int | None = None, format: str | None = None) -> Path:
    """Write a figure as PNG, PDF or SVG (by ``format``, else the suffix), atomically.

    ``dpi`` (default the figure's) sets the raster resolution and is recorded in the PNG's
    ``pHYs`` chunk, so a layout program places it at its true size; PDF and SVG stay vector.
    """
    path = Path(path)
    fmt = (format or path.suffix.lstrip(".")).lower()
    if fmt not in FIGURE_FORMATS:
        raise IcemapError(f"cannot write a figure as {fmt or path.name!r}; use one of {', '.join(FIGURE_FORMATS)}")
    if format is not None and path.suffix.lower().lstrip(".") != fmt:
        raise IcemapError(f"--format {fmt} does not match the file name {path.name!r}; name it *.{fmt}")
    if dpi is not None and not (isinstance(dpi, int) and 10 <= dpi <= 2400):
        raise IcemapError(f"dpi must be an integer in [10, 2400], got {dpi!r}")
    if not path.parent.is_dir():
        raise IcemapError(f"folder {path.parent} does not exist; create it before writing {path.name}")
    # A fixed creation date keeps PDF/SVG output reproducible; the metadata names the writer.
    meta = {"Creator": "icemap"} if fmt in ("png", "pdf") else {"Creator": "icemap", "Date": None}
    with atomic_path(path, suffix=f".{fmt}") as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi or fig.dpi, metadata=meta)
    return path


def save_png(fig: Figure, path: str | os.PathLike[str], *, dpi: int | None = None) -> Path:
    """Write a figure as PNG, atomically (:func:`save_figure`)."""
    return save_figure(fig, path, dpi=dpi, format="png")
