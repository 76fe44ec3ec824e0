"""Commands that turn a product into numbers and pictures: ``areas``, ``figure``, ``report``.

They register on the shared typer app (:mod:`icemap.cli_common`), like the model commands, and
call the same functions a notebook would (:mod:`icemap.series`, :mod:`icemap.figures`,
:mod:`icemap.report`). Input files are checked before any work, so a typo costs one line, not
a computation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from icemap.cli_common import SchedulerOpt, _console, app, safe
from icemap.errors import IcemapError
from icemap.extras import require

PredOpt = Annotated[str, typer.Option("--pred", help="Product store (path or URL) with an `ice` variable (`icemap map`).")]
ReferenceOpt = Annotated[Path, typer.Option("--reference", help="Glacier outlines (any vector format): the glaciers to report.")]
IdColumnOpt = Annotated[str | None, typer.Option(
    "--id-column", help="Outline column that identifies a glacier (default: glacier_id, RGIId, rgi_id... when present).")]


def _exists(path: Path, what: str) -> None:
    if not path.exists():
        raise IcemapError(f"{what} {str(path)!r} does not exist")


def _store_exists(path: str, what: str) -> None:
    if "://" not in path and not Path(path).exists():
        raise IcemapError(f"{what} {path!r} does not exist; write it with `icemap {'map' if what == 'product' else 'ingest'}`")


def _outputs_are_not_inputs(outputs: list[Path | None], inputs: dict[str, Any]) -> None:
    """An output given the path of an input (``--out`` = ``--reference``) would overwrite it: refused."""
    from icemap.store import check_not_input

    for output in outputs:
        if output is not None:
            check_not_input(output, inputs)


def _describe_tables(pred: str, tables: list[tuple[Path, Any]]) -> None:
    """STAC Items of the area tables, derived from the product store's Item, and their Collection."""
    from icemap.describe import describe_table, item_path, write_collection

    source = item_path(pred)
    link = source if Path(source).exists() else pred
    times = tables[0][1]["time"]  # the per-glacier series: every table spans its dates
    for path, table in tables:
        describe_table(path, table, derived_from=[link], bbox_of=pred,
                       times=None if "time" in table.columns else times)
    write_collection(tables[0][0], [p for p, _ in tables], description=f"icemap areas of {Path(pred).name}")


@app.command("areas")
def areas_cmd(
    pred: PredOpt,
    reference: ReferenceOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Per-glacier series: .csv or .parquet.")],
    id_column: IdColumnOpt = None,
    region_out: Annotated[Path | None, typer.Option("--region-out", help="Also write the region's series (.csv or .parquet).")] = None,
    trends_out: Annotated[Path | None, typer.Option("--trends", help="Also write per-glacier and regional trends over season-years (.csv or .parquet): weighted least squares, standard error, significance.")] = None,
    min_observed: Annotated[float | None, typer.Option("--min-observed", help="Observed share a year needs to enter a trend (default 0.9); below it the area is a lower bound.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also draw area versus year (.png, .pdf or .svg; needs the report extra: pip install icemap\\[report]).")] = None,
    top: Annotated[int, typer.Option("--top", help="Largest glaciers drawn in --plot.", min=0)] = 5,
    scheduler: SchedulerOpt = None,
) -> None:
    """Ice area of every glacier per time step, with uncertainty and observed share; trends over season-years."""
    if plot is not None:
        require("report", "icemap areas --plot")
    _store_exists(pred, "product")
    _exists(reference, "outline file")
    _outputs_are_not_inputs([out, region_out, plot, trends_out], {"--pred": pred, "--reference": reference})
    from icemap.options import resolve
    from icemap.series import REGION_ID, check_table_path, glacier_series, region_series, trends, write_table

    min_observed = resolve("min_observed", min_observed)  # a bad value is one line before any work
    for table_path in (out, region_out, trends_out):
        if table_path is not None:
            check_table_path(table_path)
    if plot is not None:
        if plot.suffix.lower().lstrip(".") not in ("png", "pdf", "svg"):
            raise IcemapError(f"--plot must be a .png, .pdf or .svg file, not {plot.name!r}")
        if not plot.parent.is_dir():
            raise IcemapError(f"folder {plot.parent} does not exist; create it before writing {plot.name}")
    from icemap.cluster import connect

    with connect(scheduler):
        table = glacier_series(pred, reference, id_column=id_column, min_observed=min_observed)
    region = region_series(table)
    trend = trends(table)
    write_table(table, out)
    if region_out is not None:
        write_table(region, region_out)
    if trends_out is not None:
        write_table(trend, trends_out)
    _describe_tables(pred, [(out, table), *([(region_out, region)] if region_out is not None else []),
                            *([(trends_out, trend)] if trends_out is not None else [])])
    if plot is not None:
        from icemap.figures import area_plot, save_figure

        save_figure(area_plot(region, table, top=top), plot)
    con = _console(stderr=False)
    con.print(f"[bold]{safe(out)}[/]: {table['glacier_id'].nunique()} glaciers x {len(region)} time step(s)")
    row: Any  # a row's columns as attributes (pandas-stubs types them as any scalar)
    for row in region.itertuples(index=False):
        con.print(f"  {str(row.time)[:10]}  {row.area_km2:.3f} km² ± {row.area_uncertainty_sum_km2:.3f} (sum) "
                  f"± {row.area_uncertainty_rss_km2:.3f} (root-sum-square)  observed {100 * row.observed_fraction:.0f}%")
    r = trend[trend["glacier_id"] == REGION_ID].iloc[0]
    if r["rate_km2_per_yr"] == r["rate_km2_per_yr"]:
        con.print(f"  trend {r['first_year']}-{r['last_year']} ({r['n_years']} season-years): "
                  f"{r['rate_km2_per_yr']:+.4f} ± {r['rate_stderr_km2_per_yr']:.4f} km²/yr "
                  f"({r['rate_pct_per_yr']:+.2f} %/yr), {'significant' if r['significant'] else 'not significant'} at 2 sigma")
    else:
        con.print(f"  no regional trend: {r['reason']}")
    for label, value in (("region", region_out), ("trends", trends_out), ("plot", plot)):
        if value is not None:
            con.print(f"{label}: {safe(value)}")


@app.command("figure")
def figure_cmd(
    cube: Annotated[str, typer.Option("--cube", help="Cube store the product was mapped from (false-colour background).")],
    pred: PredOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Figure to write: .png, .pdf or .svg.")],
    reference: Annotated[Path | None, typer.Option("--reference", help="Outlines to draw (coloured by their area trend).")] = None,
    time: Annotated[str | None, typer.Option("--time", help="Date (YYYY-MM-DD) or index of the product's time step; default the last.")] = None,
    id_column: IdColumnOpt = None,
    dpi: Annotated[int, typer.Option("--dpi", help="Resolution (dots per inch), recorded in the PNG.", min=10, max=2400)] = 300,
    fmt: Annotated[str | None, typer.Option("--format", help="png, pdf or svg (default: from the --out suffix).")] = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """A map of one time step: false colour, ice, outlines coloured by trend, legend, scale bar, graticule,
    acquisition dates, method, data credit."""
    require("report", "icemap figure")
    _store_exists(cube, "cube")
    _store_exists(pred, "product")
    if reference is not None:
        _exists(reference, "outline file")
    _outputs_are_not_inputs([out], {"--cube": cube, "--pred": pred, "--reference": reference})
    from icemap.figures import FIGURE_FORMATS

    kind = (fmt or out.suffix.lstrip(".")).lower()
    if kind not in FIGURE_FORMATS or out.suffix.lower().lstrip(".") != kind:
        raise IcemapError(f"--out must be a .png, .pdf or .svg file matching --format, not {out.name!r}"
                          + (f" with --format {fmt}" if fmt else ""))
    if not out.parent.is_dir():
        raise IcemapError(f"folder {out.parent} does not exist; create it before writing {out.name}")
    from icemap.cluster import connect
    from icemap.figures import map_figure, save_figure
    from icemap.series import glacier_series
    from icemap.store import open_cube

    when: int | str = -1 if time is None else (int(time) if time.lstrip("-").isdigit() else time)
    with connect(scheduler):
        product = open_cube(pred)
        change = None
        if reference is not None and product.sizes.get("time", 0) > 1:
            change = glacier_series(product, reference, id_column=id_column)
        fig = map_figure(open_cube(cube), product, time=when, outlines=reference, change=change, id_column=id_column,
                         dpi=dpi)
        save_figure(fig, out, dpi=dpi, format=kind)
    _console(stderr=False).print(f"[bold]{safe(out)}[/]")


@app.command("report")
def report_cmd(
    cube: Annotated[str, typer.Option("--cube", help="Cube store the product was mapped from.")],
    pred: PredOpt,
    reference: ReferenceOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML page to write (self-contained).")],
    id_column: IdColumnOpt = None,
    top: Annotated[int, typer.Option("--top", help="Largest glaciers drawn in the area plot.", min=0)] = 5,
    title: Annotated[str | None, typer.Option("--title", help="Page title.")] = None,
    series_out: Annotated[Path | None, typer.Option("--series-out", help="Also write the per-glacier series (.csv/.parquet).")] = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """One self-contained HTML page of a run: maps, area plots, per-glacier table, provenance."""
    require("report", "icemap report")
    _store_exists(cube, "cube")
    _store_exists(pred, "product")
    _exists(reference, "outline file")
    _outputs_are_not_inputs([out, series_out], {"--cube": cube, "--pred": pred, "--reference": reference})
    from icemap.cluster import connect
    from icemap.report import report

    with connect(scheduler):
        path = report(cube, pred, reference, out, id_column=id_column, top=top, title=title, series_out=series_out)
    _console(stderr=False).print(f"[bold]{safe(path)}[/]")
