"""The ``icemap`` command line: a thin layer over the Python API.

Each command parses its options, calls the same functions a notebook would, and reports.
Errors a user can cause (bad bbox, unknown band, empty search, unreadable asset) end as one
line on stderr and exit code 1; usage errors exit 2 (click's convention); Ctrl-C exits 130 and
SIGTERM 143, with one line saying which steps of the store are complete.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, cast

import typer

from icemap import cli_common
from icemap.cli_common import (
    BackoffOpt,
    BboxOpt,
    Catalog,
    CollectionOpt,
    DatetimeOpt,
    IntersectsOpt,
    MaxCloudOpt,
    PlatformOpt,
    QuietOpt,
    RetriesOpt,
    SchedulerOpt,
    TimeoutOpt,
    _console,
    _split_list,
    _StepProgress,
    app,
    interrupted_line,
    os_error_line,
    safe,
)
from icemap.errors import IcemapError, IcemapWarning
from icemap.extras import require
from icemap.redact import printable, redact
from icemap.retry import STAC_BACKOFF_S, STAC_RETRIES, STAC_TIMEOUT_S


def _build_search(catalog: str, collection: list[str] | None, bbox: Any, datetime: str | None,
                  max_cloud: float | None, platform: list[str] | None, max_items: int | None = None,
                  retries: int = STAC_RETRIES, timeout: float = STAC_TIMEOUT_S, intersects: Path | None = None,
                  backoff: float = STAC_BACKOFF_S) -> Any:
    from icemap.stac import search  # the STAC stack loads when a search is built, not at the CLI's start

    return search(
        catalog,
        collections=_split_list(collection),
        bbox=bbox,
        datetime=datetime,
        max_cloud=max_cloud,
        platforms=_split_list(platform),
        max_items=max_items,
        retries=retries,
        timeout=timeout,
        backoff=backoff,
        intersects=intersects,
    )


@app.command("search")
def search_cmd(
    catalog: Catalog,
    collection: CollectionOpt = None,
    bbox: BboxOpt = None,
    intersects: IntersectsOpt = None,
    datetime: DatetimeOpt = None,
    max_cloud: MaxCloudOpt = None,
    platform: PlatformOpt = None,
    max_items: Annotated[Optional[int], typer.Option("--max-items", help="Stop after N items.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a GeoJSON FeatureCollection.")] = False,
    retries: RetriesOpt = STAC_RETRIES,
    timeout: TimeoutOpt = STAC_TIMEOUT_S,
    backoff: BackoffOpt = STAC_BACKOFF_S,
) -> None:
    """Find scenes and list them (id, date, cloud cover, platform)."""
    s = _build_search(catalog, collection, bbox, datetime, max_cloud, platform, max_items, retries, timeout,
                      intersects=intersects, backoff=backoff)
    items = s.item_dicts()
    if as_json:
        json.dump({"type": "FeatureCollection", "features": items}, sys.stdout)
        sys.stdout.write("\n")
        return
    if not items:
        raise IcemapError("the search matched no items; widen --bbox/--datetime or --max-cloud")
    from rich.table import Table

    table = Table(title=f"{len(items)} item(s)")
    for col in ("id", "datetime", "cloud %", "platform"):
        table.add_column(col)
    for it in items:
        p = it.get("properties", {})
        cc = p.get("eo:cloud_cover")
        cc_text = f"{cc:.1f}" if isinstance(cc, (int, float)) and not isinstance(cc, bool) else safe(cc or "")
        table.add_row(safe(it.get("id", "?"), one_line=True), safe(p.get("datetime", ""), one_line=True), cc_text,
                      safe(p.get("platform", ""), one_line=True))
    _console(stderr=False).print(table)


@app.command("ingest")
def ingest_cmd(
    # str, not Path: pathlib turns s3://bucket/x into s3:/bucket/x (a local folder named "s3:").
    out: Annotated[str, typer.Option("--out", "-o", help="Zarr store (path or s3://, gs://, az:// URL) to create, finish or extend.")],
    catalog: Annotated[Optional[str], typer.Option("--catalog", "-c", help="STAC API URL, catalog.json, item file(s) folder or .ndjson (or use --files).")] = None,
    files: Annotated[Optional[list[Path]], typer.Option("--files", help="Local (multi-band) GeoTIFF, one per date (repeatable), instead of --catalog; needs --band-map and --datetime.")] = None,
    band_map: Annotated[Optional[str], typer.Option("--band-map", help="With --files: NAME=INDEX pairs, 1-based as rasterio counts, e.g. green=3,swir16=12.")] = None,
    scale: Annotated[Optional[float], typer.Option("--scale", help="With --files: reflectance = DN * SCALE + OFFSET (default: the sensor table's).")] = None,
    offset: Annotated[Optional[float], typer.Option("--offset", help="With --files: see --scale.")] = None,
    collection: CollectionOpt = None,
    bbox: BboxOpt = None,
    intersects: IntersectsOpt = None,
    datetime: Annotated[Optional[list[str]], typer.Option("--datetime", help="START/END for a search; with --files one acquisition date per file (repeatable).")] = None,
    max_cloud: MaxCloudOpt = None,
    platform: PlatformOpt = None,
    resolution: Annotated[Optional[float], typer.Option("--resolution", help="Pixel size in metres (default: the sensor's, 30 Landsat, 20 Sentinel-2).")] = None,
    crs: Annotated[Optional[str], typer.Option("--crs", help="Target CRS, e.g. EPSG:32619 (default: the items').")] = None,
    bands: Annotated[Optional[list[str]], typer.Option("--bands", help="Bands (repeatable or comma-separated).")] = None,
    chunksize: Annotated[Optional[int], typer.Option("--chunksize", help="Spatial chunk edge, pixels (default 1024, icemap.set_options).")] = None,
    zarr_format: Annotated[Optional[int], typer.Option("--zarr-format", help="3 (default) or 2.")] = None,
    on_error: Annotated[str, typer.Option("--on-error", help="Unreadable asset: raise or nodata.")] = "raise",
    signer: Annotated[Optional[str], typer.Option("--signer", help="URL signer: planetary-computer or module:function.")] = None,
    no_qa: Annotated[bool, typer.Option("--no-qa", help="Scenes without QA_PIXEL: ingest them with nothing cloud-masked (recorded in the store).")] = False,
    engine: Annotated[Optional[str], typer.Option("--engine", help="Loader engine: auto (odc-stac), odc-stac or stackstac (pip install \"icemap[stackstac]\"); both give the same cube.")] = None,
    retries: RetriesOpt = STAC_RETRIES,
    timeout: TimeoutOpt = STAC_TIMEOUT_S,
    backoff: BackoffOpt = STAC_BACKOFF_S,
    scheduler: SchedulerOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Search (or take local files), load lazily and write a resumable Zarr cube. Rerun to resume or append dates.

    Local files carry no QA band icemap can read, so they are ingested as with --no-qa.
    """
    from icemap.cluster import connect
    from icemap.localfiles import parse_band_map
    from icemap.workflow import ingest

    if engine is not None:
        from icemap.load import resolve_engine

        resolve_engine(engine)  # an unknown engine or a missing extra stops before the search
    source: Any
    if files:
        if intersects is not None:
            raise IcemapError("--intersects selects items of a --catalog; local --files are taken as they are")
        source = _local_items(catalog, files, band_map, datetime, collection, scale, offset, crs)
        no_qa = True
        if resolution is None:  # the files' own pixel size, not the sensor's: copy, do not resample
            t = source[0]["properties"]["proj:transform"]
            resolution = (abs(t[0]), abs(t[4]))  # type: ignore[assignment]
    else:
        if catalog is None:
            raise IcemapError("give --catalog (a STAC API, catalog or item files) or --files with --band-map")
        if band_map or scale is not None or offset is not None:
            raise IcemapError("--band-map, --scale and --offset go with --files; a catalog's items state their own")
        if datetime and len(datetime) > 1:
            raise IcemapError("give --datetime once for a search (START/END); repeat it only with --files")
        source = _build_search(catalog, collection, bbox, datetime[0] if datetime else None, max_cloud, platform,
                               retries=retries, timeout=timeout, backoff=backoff, intersects=intersects)
    band_list = _split_list(bands)
    if files and band_list is None:
        band_list = list(parse_band_map(band_map or ""))  # the bands the user mapped, in their order
    from icemap.stac import parse_bbox

    with connect(scheduler), _StepProgress(quiet, "ingest", out=str(out)) as progress:
        report = ingest(
            source, str(out), bands=band_list, crs=crs, resolution=resolution, chunksize=chunksize,
            zarr_format=zarr_format, signer=signer, on_error=on_error,  # type: ignore[arg-type]
            progress=progress, qa=None if no_qa else "qa_pixel", bbox=parse_bbox(bbox),
            engine=engine,  # type: ignore[arg-type]
        )
    _console().print(
        f"[bold]{safe(out)}[/]: wrote {len(report.written)} time step(s), "
        f"skipped {len(report.skipped)} already complete, appended {len(report.appended)}"
    )


def _local_items(catalog: str | None, files: list[Path], band_map: str | None, datetimes: list[str] | None,
                 collection: list[str] | None, scale: float | None, offset: float | None, crs: str | None) -> list[Any]:
    from icemap.localfiles import items_from_local_files
    from icemap.stac import NoEPSGError

    if catalog is not None:
        raise IcemapError("give either --catalog or --files, not both")
    if not band_map:
        raise IcemapError("--files needs --band-map NAME=INDEX,... (e.g. green=3,swir16=12; 1-based, as rasterio counts)")
    if not datetimes:
        raise IcemapError("--files needs one --datetime per file (the acquisition date, e.g. 2022-02-01)")
    cols = _split_list(collection) or ["landsat-c2-l2"]
    if len(cols) > 1:
        raise IcemapError("give one --collection (the sensor table) with --files")
    try:
        # --crs is the grid to warp to; the files keep their own CRS ...
        items = items_from_local_files(files, band_map, datetimes, collection=cols[0], scale=scale, offset=offset)
    except NoEPSGError:
        if crs is None:
            raise
        # ... unless they state none with an EPSG code: then --crs names theirs (and the grid's).
        items = items_from_local_files(files, band_map, datetimes, collection=cols[0], scale=scale, offset=offset,
                                       crs=crs)
    if scale is not None and offset is None:
        # Said aloud: the sensor table's offset (Landsat's -0.2) is never borrowed for a file.
        _console().print(f"icemap: --scale without --offset: reflectance = DN * {scale:g} + 0 (offset 0)",
                         highlight=False)
    return items


@app.command("map")
def map_cmd(
    cube: Annotated[str, typer.Option("--cube", help="Cube store (path or URL) written by `icemap ingest`.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Product store (Zarr, path or URL) to write or finish.")],
    method: Annotated[str, typer.Option("--method", help="ndsi or unet (the shipped default model, or --model).")] = "ndsi",
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="NDSI threshold (default 0.4) or U-Net probability threshold (default: the model's).")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", help="U-Net model folder (from `icemap train` or `icemap model import`); default: the model shipped with icemap (docs/default-model.md).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="U-Net windows per forward pass (default 8).")] = None,
    tta: Annotated[bool, typer.Option("--tta", help="U-Net: average the 8 flips/rotations; writes ice_probability_std.")] = False,
    halo: Annotated[Optional[int], typer.Option("--halo", help="U-Net context pixels (default: half the receptive field).")] = None,
    tile: Annotated[Optional[int], typer.Option("--tile", help="U-Net output tile edge in pixels (default 256).")] = None,
    device: Annotated[str, typer.Option("--device", help="U-Net device: auto, cpu or cuda.")] = "auto",
    guards: Annotated[Optional[list[str]], typer.Option("--guards", help="water, dark, dem (repeatable or comma-separated).")] = None,
    dem: Annotated[Optional[Path], typer.Option("--dem", help="DEM GeoTIFF for the dem guard.")] = None,
    geotiff: Annotated[Optional[Path], typer.Option("--geotiff", help="Also write COGs per date to this folder.")] = None,
    outlines: Annotated[Optional[Path], typer.Option("--outlines", help="Also write ice outlines (.gpkg/.geojson/.parquet).")] = None,
    quicklook: Annotated[Optional[Path], typer.Option("--quicklook", help="Also write a PNG of the clearest date.")] = None,
    reference: Annotated[Optional[Path], typer.Option("--reference", help="Glacier outlines (RGI/GLIMS): ids of the --outlines polygons, drawn on the quicklook.")] = None,
    zarr_format: Annotated[Optional[int], typer.Option("--zarr-format", help="3 (default) or 2.")] = None,
    scheduler: SchedulerOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Map ice on a cube: `ndsi` or `ice_probability` (float32) and `ice` (uint8; 255 = nodata) per date."""
    if method == "unet":
        require("ml", "icemap map --method unet")
    from icemap.cluster import connect
    from icemap.workflow import map_cube

    with connect(scheduler), _StepProgress(quiet, "map", out=str(out)) as progress:
        result = map_cube(
            # map_cube refuses a method other than ndsi/unet with a one-line error.
            cube, out, method=cast(Literal["ndsi", "unet"], method), threshold=threshold, guards=_split_list(guards) or (), dem=dem,
            zarr_format=zarr_format, geotiff_dir=geotiff, outlines_path=outlines,  # type: ignore[arg-type]
            quicklook_path=quicklook, reference=reference, model=model,
            predict_options={"batch_size": batch_size, "tta": tta, "halo": halo, "tile": tile, "device": device},
            progress=progress,
        )
    con = _console()
    con.print(f"[bold]{safe(out)}[/]: wrote {len(result.written)} time step(s), skipped {len(result.skipped)}")
    for label, value in (("geotiffs", f"{len(result.geotiffs)} files in {geotiff}" if geotiff else None),
                         ("outlines", result.outlines), ("quicklook", result.quicklook)):
        if value:
            con.print(f"{label}: {safe(value)}")


@app.command("composite")
def composite_cmd(
    cube: Annotated[str, typer.Option("--cube", help="Cube store (path or URL) written by `icemap ingest`.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Composite store (Zarr) to write or finish: one time step per season-year.")],
    season: Annotated[Optional[str], typer.Option("--season", help="MM-DD/MM-DD, inclusive, may wrap the year end (default: end of the ablation season of the cube's hemisphere, 08-01/09-30 north, 02-01/03-31 south).")] = None,
    rule: Annotated[Optional[str], typer.Option("--rule", help="min-ndsi (default: the clear date with the least snow), latest or median.")] = None,
    fill_gaps: Annotated[Optional[float], typer.Option("--fill-gaps", help="Also fill remaining gaps by inverse-distance weighting within N pixels (flagged in `filled`).")] = None,
    zarr_format: Annotated[Optional[int], typer.Option("--zarr-format", help="3 (default) or 2.")] = None,
    scheduler: SchedulerOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """One composite per season-year (clear observations only), a cube that `icemap map` reads like any other."""
    from icemap.cluster import connect
    from icemap.composite import composite
    from icemap.options import resolve

    if rule is not None:
        resolve("composite_rule", rule)  # an unknown rule is a one-line error before any work
    with connect(scheduler), _StepProgress(quiet, "composite", out=str(out)) as progress:
        report = composite(cube, out, season=season, rule=rule, fill_gaps_px=fill_gaps,  # type: ignore[arg-type]
                           zarr_format=zarr_format, progress=progress)  # type: ignore[arg-type]
    _console().print(f"[bold]{safe(out)}[/]: wrote {len(report.written)} season-year(s), "
                     f"skipped {len(report.skipped)} already complete")


@app.command("evaluate")
def evaluate_cmd(
    pred: Annotated[str, typer.Option("--pred", help="Product store (path or URL) with an `ice` variable.")],
    reference: Annotated[Path, typer.Option("--reference", help="Reference outlines (any vector format).")],
    buffer: Annotated[float, typer.Option("--buffer", help="Grow outlines by M metres (15 = study a's extended mask).")] = 0.0,
    all_touched: Annotated[bool, typer.Option("--all-touched", help="Burn every pixel an outline touches.")] = False,
    time: Annotated[Optional[str], typer.Option("--time", help="Score one date (YYYY-MM-DD); default all dates pooled.")] = None,
    per_glacier: Annotated[Optional[Path], typer.Option("--per-glacier", help="Also write per-glacier scores (CSV).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the scores as JSON.")] = False,
    scheduler: SchedulerOpt = None,
) -> None:
    """Score an ice product against reference outlines (F1, kappa, areas...)."""
    from icemap.cluster import connect

    with connect(scheduler):
        _evaluate(pred, reference, buffer, all_touched, time, per_glacier, as_json)


def _evaluate(pred: str, reference: Path, buffer: float, all_touched: bool, time: str | None,
              per_glacier: Path | None, as_json: bool) -> None:
    from icemap.metrics import evaluate
    from icemap.store import open_cube

    product = open_cube(pred)
    if "ice" not in product:
        raise IcemapError(f"{pred} has no `ice` variable; write it with `icemap map`")
    ice = product["ice"]
    if time is not None:
        from icemap.vector import _select_time

        ice = ice.sel(time=_select_time(ice, time))  # one step, or a one-line error listing the dates
    if per_glacier is not None:
        result, table = evaluate(ice, reference, buffer_m=buffer, all_touched=all_touched, per_glacier=True)
        table.reset_index().to_csv(per_glacier, index=False)
    else:
        result = evaluate(ice, reference, buffer_m=buffer, all_touched=all_touched)
    _print_scores(result, as_json)


def _print_scores(result: dict[str, Any], as_json: bool) -> None:
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()}
    if as_json:
        json.dump(clean, sys.stdout, default=float)
        sys.stdout.write("\n")
        return
    from rich.table import Table

    table = Table(show_header=False)
    for k, v in clean.items():
        table.add_row(safe(k), "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else safe(v)))
    _console(stderr=False).print(table)


@app.command("calibrate")
def calibrate_cmd(
    cube: Annotated[str, typer.Option("--cube", help="Cube store (path or URL).")],
    reference: Annotated[Optional[Path], typer.Option("--reference", help="Outlines for the F1 sweep.")] = None,
    method: Annotated[str, typer.Option("--method", help="f1 (needs --reference), otsu or valley.")] = "f1",
    buffer: Annotated[float, typer.Option("--buffer", help="Grow outlines by M metres.")] = 0.0,
    curve: Annotated[Optional[Path], typer.Option("--curve", help="Write the full curve as CSV.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print {threshold, method, ...} as JSON.")] = False,
    scheduler: SchedulerOpt = None,
) -> None:
    """Choose an NDSI threshold: F1 sweep against outlines, or Otsu/valley on the histogram."""
    from icemap.cluster import connect
    from icemap.store import open_cube
    from icemap.workflow import calibrate_threshold

    if method not in ("f1", "otsu", "valley"):
        raise IcemapError(f"--method must be f1, otsu or valley, not {method!r}")
    with connect(scheduler):
        threshold, table = calibrate_threshold(open_cube(cube), reference=reference, method=method,  # type: ignore[arg-type]
                                               buffer_m=buffer)
    if curve is not None:
        table.to_csv(curve, index=False)
    summary: dict[str, Any] = {"method": method, "threshold": float(threshold)}
    if method == "f1":
        row = table.iloc[(table["threshold"] - threshold).abs().argmin()]
        summary.update({k: float(row[k]) for k in ("f1", "precision", "recall") if k in row})
    _print_scores(summary, as_json)


@app.command("status")
def status_cmd(cube: Annotated[str, typer.Argument(help="A cube or product store (path or URL).")]) -> None:
    """Show a store's time steps and which are complete."""
    from icemap.store import cube_status

    st = cube_status(cube)
    con = _console(stderr=False)
    con.print(f"{safe(st.path)}: {st.shape[0]}x{st.shape[1]} px, {safe(st.crs)}, bands {safe(', '.join(st.bands))}",
              highlight=False)
    for t, c in zip(st.times, st.complete):
        con.print(f"  {safe(t)}  {'complete' if c else '[yellow]incomplete[/] (rerun the ingest)'}", highlight=False)


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the sample region and products.")] = Path("icemap-demo"),
    size: Annotated[int, typer.Option("--size", help="Region edge in pixels (30 m).")] = 384,
    years: Annotated[int, typer.Option("--years", "--dates", help="Number of seasons (years) of acquisitions.")] = 3,
    per_season: Annotated[int, typer.Option("--per-season", help="Acquisitions per season, 8 days apart (1-6).")] = 3,
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the region.")] = 0,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="NDSI threshold (default 0.4).")] = None,
    scheduler: SchedulerOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run the main job on the embedded sample region (no network): search -> ingest -> NDSI ->
    ice area per glacier -> quicklook; then a seasonal composite per year -> its map -> area
    series with uncertainties -> figures and an HTML report."""
    from icemap.cluster import connect
    from icemap.demo import run_demo

    with connect(scheduler), _StepProgress(quiet, "demo") as progress:
        result = run_demo(out, size=size, n_dates=years, per_season=per_season, seed=seed, threshold=threshold,
                          progress=progress)
    result.print(_console(stderr=False))


_default_showwarning = warnings.showwarning

# The other command groups live in their own modules and register on `app` (each imports
# cli_common, never this module). `icemap train`, `experiment` and `model import` are the lab's:
# the CLI face is the one product module that reaches icemap.lab (its commands import the
# training stack only when they run).
from icemap import cli_model_info, cli_report  # noqa: E402,F401  (model info; areas, figure, report)
from icemap.lab import cli as lab_cli  # noqa: E402,F401  (train, experiment, model import)


def _show_warning(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """icemap's own warnings as one line, named by their class (users filter on it); others as Python prints them."""
    if issubclass(category, IcemapWarning):
        _console().print(f"[yellow]icemap: warning ({category.__name__}):[/] {safe(message, one_line=True)}",
                         highlight=False, soft_wrap=True)
    else:
        # Others (GDAL, zarr, dask) as Python prints them, but without secrets or terminal escapes.
        _default_showwarning(printable(redact(message)), category, filename, lineno, file, line)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so the same unwinding runs."""


def _interrupted(signum: int) -> None:
    """One line saying which steps are complete and that a rerun resumes; exit 128 + signal."""
    _console().print(interrupted_line(signal.Signals(signum).name), highlight=False, markup=False, soft_wrap=True)
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``icemap`` console script."""
    warnings.showwarning = _show_warning
    received: list[int] = []

    def on_term(signum: int, frame: Any) -> None:
        received.append(signum)
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # pragma: no cover - not the main thread (main() called from a thread)
        previous = None
    try:
        _dispatch(argv, received)
    finally:
        if previous is not None:  # main() called in-process (tests, notebooks) gives SIGTERM back
            signal.signal(signal.SIGTERM, previous)


def _dispatch(argv: list[str] | None, received: list[int]) -> None:
    cli_common._ACTIVE = None  # an earlier in-process command's store is not this one's
    try:
        # Typer turns KeyboardInterrupt into a return value of 130 when not standalone.
        code = app(args=argv, standalone_mode=False)
        if code == 130:
            _interrupted(received[-1] if received else signal.SIGINT)
        if isinstance(code, int) and code:
            sys.exit(code)
    except IcemapError as exc:
        # Escaped: messages quote things like `pip install "icemap[ml]"` that rich reads as markup,
        # and item ids, paths and URLs from data (redacted, without terminal escapes).
        _console().print(f"[red]icemap: error:[/] {safe(exc, one_line=True)}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        _interrupted(received[-1] if received else signal.SIGINT)
    except OSError as exc:
        # Disk full, read-only or forbidden output, a vanished file: one line naming the path.
        _console().print(f"[red]icemap: error:[/] {safe(os_error_line(exc), one_line=True)}", highlight=False,
                         soft_wrap=True)
        sys.exit(1)
    except MemoryError:
        _console().print("[red]icemap: error:[/] out of memory; lower --chunksize, narrow --bbox or run on a "
                         "cluster (--scheduler)", highlight=False, soft_wrap=True)
        sys.exit(1)
    except Exception as exc:
        # Usage errors are click exceptions (typer vendors its own click, so match by shape).
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(exc.exit_code)
        if type(exc).__name__ == "Abort":
            _interrupted(received[-1] if received else signal.SIGINT)
        if _from_codec(exc):
            # A chunk that does not decode: a store damaged after it was written (bit rot, a copy
            # cut short). Dask reads it deep inside a compute, where no store path is known.
            _console().print(f"[red]icemap: error:[/] a chunk of a Zarr store given to this command is corrupt "
                             f"({safe(f'{type(exc).__name__}: {exc}', one_line=True)}); rerun the command that "
                             "wrote the store into a new --out, or restore it from a copy", highlight=False,
                             soft_wrap=True)
            sys.exit(1)
        raise


def _from_codec(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while decoding a Zarr chunk (numcodecs or zarr's codecs)."""
    if not isinstance(exc, (RuntimeError, ValueError, TypeError)):
        return False
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and any(("numcodecs" in f.filename or "zarr/codecs" in f.filename.replace("\\", "/"))
                                for f in frames[-4:])


if __name__ == "__main__":  # pragma: no cover
    # `python -m icemap.cli` runs this file as __main__, a second copy beside `icemap.cli`; the
    # model commands register on icemap.cli.app, so dispatch through that module.
    from icemap.cli import main as _main

    _main()
