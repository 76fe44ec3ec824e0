"""One self-contained HTML page of a run: a map per year, area plots, trends, per-glacier table, provenance.

The page is a single file a person can mail, archive next to the product or open from a shared
drive years later: the figures are embedded as base64 PNG (``data:`` URLs), the CSS is inline,
there is no script and no external URL, so it renders the same offline and in any browser. Every
piece of text that comes from data (glacier ids, item ids, attributes) is escaped with
:func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import time as _time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from icemap._atomic import atomic_write_text
from icemap._version import __version__
from icemap.errors import IcemapError
from icemap.figures import area_plot, credit_line, map_figure, png_bytes
from icemap.redact import redact_attrs
from icemap.series import _as_ice, check_table_path, glacier_series, region_series, trends, write_table
from icemap.store import open_cube

if TYPE_CHECKING:  # pragma: no cover
    import geopandas as gpd
    import xarray as xr

__all__ = ["provenance", "render_report", "report"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:72em;
padding:0 1em;color:#1b1b1b;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
.sub{color:#555}figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #ddd}
figcaption{color:#555;font-size:.9em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#eef2f6}
td.id,th.id{text-align:left;font-family:ui-monospace,monospace}
tr:nth-child(even) td{background:#fafafa}
.loss{color:#b2182b}.gain{color:#2166ac}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em}dt{font-weight:600}dd{margin:0;word-break:break-all}
.scroll{max-height:40em;overflow:auto}
"""


def _versions(method: str | None) -> dict[str, str]:
    names = ["numpy", "xarray", "dask", "zarr", "rasterio", "geopandas", "shapely", "pyproj", "numba", "matplotlib"]
    if method == "unet":
        names.append("torch")
    out = {"icemap": __version__}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def provenance(cube: Any, product: Any, reference: Any = None) -> dict[str, Any]:
    """What a run was made from: items per time step, method, threshold, model, versions.

    Taken from the stores' own attributes (written by ``icemap ingest`` and ``icemap map``), so
    the report states what was done, not what the defaults are today.
    """
    # Redacted again here: stores written before redaction existed may hold a keyed catalog URL.
    attrs = redact_attrs({k: v for k, v in product.attrs.items() if not str(k).startswith("icemap:")})
    method = attrs.get("method")
    steps = []
    for i, t in enumerate(product["time"].values):
        row = {"time": str(pd.Timestamp(t))[:19]}
        for name in ("item_ids", "platform"):
            if name in product.coords and product[name].ndim == 1:
                row[name] = str(product[name].values[i])
        steps.append(row)
    return {
        "method": method,
        "threshold": attrs.get("threshold"),
        "model": attrs.get("model"),
        "model_sha256": attrs.get("model_sha256"),
        "product_attrs": attrs,
        "cube_attrs": redact_attrs({k: v for k, v in cube.attrs.items() if not str(k).startswith("icemap:")}),
        "time_steps": steps,
        "reference": os.fspath(reference) if isinstance(reference, (str, os.PathLike)) else
        ("GeoDataFrame" if reference is not None else None),
        "versions": _versions(method),
        "generated": _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime()),
    }


def _img(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and math.isnan(v)):
        return "&ndash;"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _rate_cell(v: Any, digits: int = 4) -> str:
    cls = "loss" if isinstance(v, float) and v < 0 else "gain" if isinstance(v, float) and v > 0 else ""
    return f'<td class="{cls}">{_fmt(v, digits)}</td>'


def _table(df: Any, *, id_col: str | None, table_id: str) -> str:
    cols = list(df.columns)
    head = "".join(f'<th class="{"id" if c == id_col else ""}" scope="col">{html.escape(str(c))}</th>' for c in cols)
    rows = []
    for rec in df.itertuples(index=False):
        cells = []
        for c, v in zip(cols, rec):
            if c == id_col:
                cells.append(f'<td class="id">{html.escape(str(v))}</td>')
            elif c == "time":
                cells.append(f"<td>{html.escape(str(v)[:10])}</td>")
            elif str(c).startswith(("change_", "rate_")) and str(c) != "change_note" and "stderr" not in str(c):
                cells.append(_rate_cell(float(v)))
            else:
                cells.append(f"<td>{_fmt(float(v) if isinstance(v, float) else v)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>'
            + "\n".join(rows) + "</tbody></table></div>")


def _dl(items: dict[str, Any]) -> str:
    parts = []
    for k, v in items.items():
        if v is None:
            continue
        text = v if isinstance(v, str) else json.dumps(v, default=str)
        parts.append(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(text)}</dd>")
    return "<dl>" + "".join(parts) + "</dl>"


def render_report(
    *,
    title: str,
    series: Any,
    region: Any,
    figures: list[tuple[bytes, str, str]],
    prov: dict[str, Any],
    trends: Any = None,
) -> str:
    """The HTML text of a report from its computed parts (figures as ``(png, alt, caption)``).

    Per-step tables show areas, uncertainties and observed shares, not step-to-step rates: change
    is the ``trends`` table's (weighted least squares over season-years, with its standard error).
    """
    per_step = [c for c in series.columns if not str(c).startswith("change_")]
    region_cols = [c for c in region.columns if not str(c).startswith("change_")]
    min_obs = (trends.attrs.get("min_observed") if trends is not None else None)
    steps = prov.get("time_steps", [])
    method = prov.get("method") or "unknown"
    summary = {"method": method, "threshold": prov.get("threshold"), "model": prov.get("model"),
               "model sha256": prov.get("model_sha256"), "reference outlines": prov.get("reference"),
               "glaciers": str(series["glacier_id"].nunique()), "time steps": str(len(steps)),
               "report generated (UTC)": prov.get("generated"), "report took": prov.get("seconds")}
    prov_rest = {"cube (ingest) attributes": prov.get("cube_attrs"), "product attributes": prov.get("product_attrs"),
                 "versions": prov.get("versions")}
    steps_html = ("<table><thead><tr><th>time</th><th>platform</th><th class=\"id\">items</th></tr></thead><tbody>"
                  + "".join(f"<tr><td>{html.escape(s.get('time', ''))}</td><td>{html.escape(s.get('platform', ''))}</td>"
                            f"<td class=\"id\">{html.escape(s.get('item_ids', ''))}</td></tr>" for s in steps)
                  + "</tbody></table>")
    body = [
        f"<h1>{html.escape(title)}</h1>",
        (f'<p class="sub">Mapped glacier ice per time step by {html.escape(str(method))}; areas per glacier with '
        "buffer-method uncertainty (mapped ice perimeter &times; half a pixel); the region's uncertainty is given "
        "as the sum over glaciers (errors fully correlated, the conservative one) and as the root-sum-square "
        "(independent errors). Where the observed fraction is below 1, cloud or fill hid part of the glacier "
        "and its area is a lower bound.</p>"),
        "<h2>Run</h2>", _dl(summary),
        "<h2>Maps and areas</h2>", *[_img(*f) for f in figures],
        *(["<h2>Trends over season-years</h2>",
           ('<p class="sub">Weighted least squares through one area per season-year (weights 1/&sigma;&sup2; from '
            "the buffer uncertainty), using only years observed to at least "
            f"{100 * float(min_obs or 0):.0f}% of the outline (lower bounds left out and counted); standard "
            "error of the slope; significant where |rate| &gt; 2&sigma;. No rate is taken between dates of one "
            "season. The region's row is weighted by the summed uncertainty.</p>"),
           _table(trends, id_col="glacier_id", table_id="trend-table")] if trends is not None else []),
        "<h2>Region per time step</h2>", _table(region[region_cols], id_col=None, table_id="region-table"),
        "<h2>Glaciers per time step</h2>", _table(series[per_step], id_col="glacier_id", table_id="glacier-table"),
        "<h2>Provenance</h2>", "<h3>Input scenes</h3>", steps_html, _dl(prov_rest),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def report(
    cube: str | os.PathLike[str] | xr.Dataset,
    pred: str | os.PathLike[str] | xr.Dataset | xr.DataArray,
    reference: str | os.PathLike[str] | gpd.GeoDataFrame,
    out: str | os.PathLike[str],
    *,
    id_column: str | None = None,
    top: int = 5,
    title: str | None = None,
    series_out: str | os.PathLike[str] | None = None,
) -> Path:
    """Write one self-contained HTML report of a run.

    Parameters
    ----------
    cube
        The cube store (path) or Dataset the product was mapped from (map backgrounds,
        ingest provenance).
    pred
        The product store (path) or Dataset with ``ice`` (from ``icemap map``, or yearly
        composites).
    reference
        Glacier outlines (path or GeoDataFrame): the glaciers of the table.
    out
        The ``.html`` file to write (atomically: a temporary file renamed when complete).
    id_column
        The outlines' id column (default the RGI id or ``glacier_id`` when present).
    top
        How many of the largest glaciers get their own line in the area plot.
    title
        Page title (default names the product).
    series_out
        Also write the per-glacier table (.csv or .parquet).

    Returns
    -------
    pathlib.Path
        The page written.
    """
    start = _time.perf_counter()
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise IcemapError(f"the report is an HTML page: give --out a .html name, not {out.name!r}")
    if not out.parent.is_dir():
        raise IcemapError(f"folder {out.parent} does not exist; create it before writing {out.name}")
    if series_out is not None:
        check_table_path(series_out)
    cube_ds = open_cube(cube) if isinstance(cube, (str, os.PathLike)) else cube
    product = open_cube(pred) if isinstance(pred, (str, os.PathLike)) else pred
    ice = _as_ice(product)
    series = glacier_series(ice, reference, id_column=id_column)
    region = region_series(series)
    trend = trends(series)
    if series_out is not None:
        write_table(series, series_out)
    figures: list[tuple[bytes, str, str]] = []
    # One map per season-year: its last step (a composite's only one).
    years = series.drop_duplicates("time").set_index("time")["year"]
    times = list(ice["time"].values)
    last_of_year = {int(y): t for t, y in zip(years.index.to_numpy(), years.to_numpy())}
    for year, t in sorted(last_of_year.items()):
        i = times.index(np.datetime64(t, "ns"))
        when = str(ice["time"].values[i])[:10]
        fig = map_figure(cube_ds, product, time=i, outlines=reference, change=trend if len(last_of_year) > 1 else None,
                         id_column=id_column, dpi=110)
        figures.append((png_bytes(fig), f"map {year}",
                        (f"Season-year {year} (step {when}): mapped ice (magenta) on false colour; outlines coloured by "
                         "each glacier's trend over season-years (dashed: not significant); grey: no data.")))
    figures.append((png_bytes(area_plot(region, series, top=top, dpi=110,
                                        credit=credit_line(cube_ds))), "area versus year",
                    "Mapped ice area per time step, error bars the buffer-method uncertainty; dashed: the "
                    "weighted least-squares trend."))
    prov = provenance(cube_ds, product if hasattr(product, "data_vars") else ice, reference)
    prov["seconds"] = f"{_time.perf_counter() - start:.1f} s"
    name = Path(os.fspath(pred)).name if isinstance(pred, (str, os.PathLike)) else "product"
    text = render_report(title=title or f"icemap report: {name}", series=series, region=region,
                         figures=figures, prov=prov, trends=trend)
    return atomic_write_text(out, text, encoding="utf-8")
