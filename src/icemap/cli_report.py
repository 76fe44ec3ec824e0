"""Commands that turn a product into numbers and pictures: ``areas``, ``figure``, ``report``.

They register on the shared typer app (:mod:`icemap.cli_common`), like the model commands, and
call the same functions a notebook would (:mod:`icemap.series`, :mod:`icemap.figures`,
:mod:`icemap.report`). Input files are checked before any work, so a typo costs one line, not
a computation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from icemap.cli_common import SchedulerOpt, _console, app, safe
from icemap.errors import IcemapError

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


@app.command("areas")
def areas_cmd(
    pred: PredOpt,
    reference: ReferenceOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Per-glacier series: .csv or .parquet.")],
    id_column: IdColumnOpt = None,
    region_out: Annotated[Path | None, typer.Option("--region-out", help="Also write the region's series (.csv or .parquet).")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also draw area versus year (PNG; needs the report extra: pip install icemap\\[report]).")] = None,
    top: Annotated[int, typer.Option("--top", help="Largest glaciers drawn in --plot.", min=0)] = 5,
    scheduler: SchedulerOpt = None,
) -> None:
    """Ice area of every glacier per time step, with uncertainty, observed share and change rates."""
    if plot is not None:
        from icemap.extras import require

        require("report", "icemap areas --plot")
    _store_exists(pred, "product")
    _exists(reference, "outline file")
    from icemap.series import check_table_path, glacier_series, region_series, write_table

    for table_path in (out, region_out):
        if table_path is not None:
            check_table_path(table_path)
    if plot is not None and not plot.parent.is_dir():
        raise IcemapError(f"folder {plot.parent} does not exist; create it before writing {plot.name}")
    from icemap.cluster import connect

    with connect(scheduler):
        table = glacier_series(pred, reference, id_column=id_column)
    region = region_series(table)
    write_table(table, out)
    if region_out is not None:
        write_table(region, region_out)
    if plot is not None:
        from icemap.figures import area_plot, save_png

        save_png(area_plot(region, table, top=top), plot)
    con = _console(stderr=False)
    con.print(f"[bold]{safe(out)}[/]: {table['glacier_id'].nunique()} glaciers x {len(region)} time step(s)")
    for row in region.itertuples(index=False):
        con.print(f"  {str(row.time)[:10]}  {row.area_km2:.3f} ± {row.area_uncertainty_km2:.3f} km²  "
                  f"observed {100 * row.observed_fraction:.0f}%")
    for label, value in (("region", region_out), ("plot", plot)):
        if value is not None:
            con.print(f"{label}: {safe(value)}")


@app.command("figure")
def figure_cmd(
    cube: Annotated[str, typer.Option("--cube", help="Cube store the product was mapped from (false-colour background).")],
    pred: PredOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")],
    reference: Annotated[Path | None, typer.Option("--reference", help="Outlines to draw (coloured by area change).")] = None,
    time: Annotated[str | None, typer.Option("--time", help="Date (YYYY-MM-DD) or index of the product's time step; default the last.")] = None,
    id_column: IdColumnOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """A map of one time step: false colour, ice, outlines coloured by change, legend, scale bar, date, CRS."""
    from icemap.extras import require

    require("report", "icemap figure")
    _store_exists(cube, "cube")
    _store_exists(pred, "product")
    if reference is not None:
        _exists(reference, "outline file")
    if out.suffix.lower() != ".png":
        raise IcemapError(f"--out must be a .png file, not {out.name!r}")
    if not out.parent.is_dir():
        raise IcemapError(f"folder {out.parent} does not exist; create it before writing {out.name}")
    from icemap.cluster import connect
    from icemap.figures import map_figure, save_png
    from icemap.series import glacier_series
    from icemap.store import open_cube

    when: object = -1 if time is None else (int(time) if time.lstrip("-").isdigit() else time)
    with connect(scheduler):
        product = open_cube(pred)
        change = None
        if reference is not None and product.sizes.get("time", 0) > 1:
            change = glacier_series(product, reference, id_column=id_column)
        fig = map_figure(open_cube(cube), product, time=when, outlines=reference, change=change, id_column=id_column)
        save_png(fig, out)
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
    from icemap.extras import require

    require("report", "icemap report")
    _store_exists(cube, "cube")
    _store_exists(pred, "product")
    _exists(reference, "outline file")
    from icemap.cluster import connect
    from icemap.report import report

    with connect(scheduler):
        path = report(cube, pred, reference, out, id_column=id_column, top=top, title=title, series_out=series_out)
    _console(stderr=False).print(f"[bold]{safe(path)}[/]")
