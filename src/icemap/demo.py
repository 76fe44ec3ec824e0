"""The main job, end to end, on the embedded sample region (``icemap demo``).

It is the same sequence a user runs on real data, only pointed at a generated static catalog:
search -> ingest to a resumable Zarr cube -> NDSI ice mask per date -> ice area per glacier ->
quicklook; then the regional view over years: a seasonal composite per year (several
acquisitions per season, the least snowy clear one per pixel) -> its NDSI map -> per-glacier
and regional area series with uncertainties -> trends over season-years (weighted least squares,
well-observed years only) -> figures and an HTML report. Nothing here is
special-cased for the sample; it doubles as a smoke test of the whole chain.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from rich.table import Table

from icemap.composite import composite, season_groups
from icemap.figures import area_plot, credit_line, map_figure, save_png
from icemap.index import ice_mask
from icemap.kernels import ICE_NODATA
from icemap.labels import glacier_ids, read_outlines
from icemap.quicklook import quicklook
from icemap.report import report
from icemap.sample import make_sample_region
from icemap.series import REGION_ID, glacier_series, region_series, trends, write_table
from icemap.stac import search
from icemap.store import open_cube
from icemap.vector import ice_area_per_glacier
from icemap.workflow import ingest, map_cube

#: Glaciers printed in the demo's trend table (the largest); trends.csv holds every one.
TREND_ROWS = 8

__all__ = ["run_demo", "DemoResult"]


@dataclass
class DemoResult:
    """Paths and figures of a demo run."""

    out: Path
    cube: Path
    areas_csv: Path
    quicklook: Path
    n_items: int
    n_time_steps: int
    areas: Any  # pandas DataFrame per glacier and date
    seconds: float
    composite: Path | None = None
    composite_ice: Path | None = None
    series_csv: Path | None = None
    region_csv: Path | None = None
    report: Path | None = None
    figures: list[Path] = field(default_factory=list)
    region_series: Any = None  # pandas DataFrame per year
    trends: Any = None  # pandas DataFrame: trend per glacier and of the region
    trends_csv: Path | None = None
    nodata: Any = None  # pandas DataFrame: nodata share per date and of each year's composite
    note: str = ""

    def print(self, console: Any) -> None:
        per_date = self.areas.groupby("time")[["ice_area_km2", "outline_area_km2", "nodata_area_km2"]].sum()
        table = Table(title="Ice area on the sample region (NDSI), each acquisition, all glaciers")
        for col in ("date", "ice km²", "outlines km²", "under cloud km²", "seen outlines km²",
                    "clean ice vs seen outlines %"):
            table.add_column(col, justify="right")
        for t, row in per_date.iterrows():
            # Cloud-hidden outline is neither ice nor not ice: compare with the outline area that
            # was seen. What remains is the debris-covered ice NDSI cannot see (clean ice only).
            seen = row.outline_area_km2 - row.nodata_area_km2
            diff = f"{100 * (row.ice_area_km2 - seen) / seen:+.1f}" if seen > 0 else ""
            table.add_row(str(t.date()), f"{row.ice_area_km2:.3f}", f"{row.outline_area_km2:.3f}",
                          f"{row.nodata_area_km2:.3f}", f"{seen:.3f}", diff)
        console.print(table)
        if self.region_series is not None:
            years = Table(title="One map per year: seasonal composite (least snowy clear observation) + NDSI")
            for col in ("year", "nodata % of the dates", "nodata % composite", "ice km²", "± sum km²",
                        "± rss km²", "observed %", "clean ice vs seen outlines %"):
                years.add_column(col, justify="right")
            for _, row in self.region_series.iterrows():
                dates = self.nodata[(self.nodata["year"] == row.year) & (self.nodata["kind"] == "date")]
                comp = self.nodata[(self.nodata["year"] == row.year) & (self.nodata["kind"] == "composite")]
                seen = row.observed_outline_area_km2
                diff = f"{100 * (row.area_km2 - seen) / seen:+.1f}" if seen > 0 else ""
                years.add_row(str(row.year), " / ".join(f"{100 * v:.1f}" for v in dates["nodata_share"]),
                              f"{100 * comp['nodata_share'].iloc[0]:.1f}" if len(comp) else "",
                              f"{row.area_km2:.3f}", f"{row.area_uncertainty_sum_km2:.3f}",
                              f"{row.area_uncertainty_rss_km2:.3f}", f"{100 * row.observed_fraction:.1f}", diff)
            console.print(years)
        if self.trends is not None:
            min_obs = 100 * float(self.trends.attrs.get("min_observed", 0.9))
            glaciers = self.trends[self.trends["glacier_id"] != REGION_ID]
            # A region has dozens of glaciers: the largest are printed, every one is in trends.csv.
            shown = glaciers.sort_values("area_fit_first_year_km2", ascending=False).head(TREND_ROWS)
            title = f"Trends over season-years (weighted least squares, years observed >= {min_obs:.0f}%)"
            if len(shown) < len(glaciers):
                title += f"; the {len(shown)} largest of {len(glaciers)} glaciers and the region (all in trends.csv)"
            tr = Table(title=title)
            for col in ("glacier", "season-years", "km²/yr ± 1 sigma", "%/yr", "2 sigma", "lower bounds"):
                tr.add_column(col, justify="right", no_wrap=col == "glacier")
            for _, row in pd.concat([shown, self.trends[self.trends["glacier_id"] == REGION_ID]]).iterrows():
                has = row.rate_km2_per_yr == row.rate_km2_per_yr
                span = f"{row.first_year}-{row.last_year} ({row.n_years})" if row.n_years else "(0)"
                rate = f"{row.rate_km2_per_yr:+.4f} ± {row.rate_stderr_km2_per_yr:.4f}" if has else "no trend"
                pct = f"{row.rate_pct_per_yr:+.1f}" if has and row.rate_pct_per_yr == row.rate_pct_per_yr else ""
                tr.add_row(str(row.glacier_id), span, rate, pct,
                           ("significant" if row.significant else "n.s.") if has else "", str(row.n_lower_bound))
            console.print(tr)
        lines = [f"{self.n_items} scenes -> {self.n_time_steps} time steps in {self.seconds:.1f} s",
                 f"cube:       {self.cube}", f"areas:      {self.areas_csv}", f"quicklook:  {self.quicklook}"]
        if self.composite is not None:
            lines += [f"composite:  {self.composite}", f"map:        {self.composite_ice}",
                      f"series:     {self.series_csv} (per glacier), {self.region_csv} (region)",
                      f"trends:     {self.trends_csv}"]
        lines += [f"figure:     {f}" for f in self.figures]
        if self.report is not None:
            lines.append(f"report:     {self.report}")
        if self.note:
            lines.append(self.note)
        console.print("\n".join(lines))


def _nodata_shares(ice: Any, kind: str) -> Any:
    """Share of nodata (255) pixels of an ice mask, per time step, with the season's year."""
    shares = (ice == ICE_NODATA).mean(dim=("y", "x")).values
    times = pd.DatetimeIndex(ice["time"].values)
    return pd.DataFrame({"time": times, "kind": kind, "nodata_share": shares})


def run_demo(
    out: str | os.PathLike[str],
    *,
    size: int = 384,
    n_dates: int = 3,
    per_season: int = 3,
    seed: int = 0,
    threshold: float | None = None,
    chunksize: int = 256,
    progress: Any = None,
) -> DemoResult:
    """Generate (or reuse) the sample region under ``out`` and run the main job on it.

    ``n_dates`` is the number of seasons (years), each with ``per_season`` acquisitions 8 days
    apart, clouds and snow changing between them.
    """
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    region = make_sample_region(out / "region", size=size, n_dates=n_dates, per_season=per_season, seed=seed)
    s = search(str(region.catalog), collections=region.collection, bbox=region.bbox)
    items = s.item_dicts()
    cube_path = out / "cube.zarr"
    ingest(s, cube_path, chunksize=chunksize, progress=progress)
    cube = open_cube(cube_path)
    ice = ice_mask(cube, threshold=threshold)
    outlines = read_outlines(region.outlines, layer="glaciers")
    ids, table = glacier_ids(outlines, cube)
    areas = ice_area_per_glacier(ice, ids, table)
    areas_csv = out / "ice_area_per_glacier.csv"
    areas.to_csv(areas_csv, index=False)
    # The least cloudy date makes the most telling picture.
    valid = cube["reflectance"].isel(band=0).notnull().mean(dim=("y", "x")).values
    best = int(valid.argmax())
    png = quicklook(cube, out / "quicklook.png", ice=ice, outlines=outlines, time=best)
    result = DemoResult(
        out=out, cube=cube_path, areas_csv=areas_csv, quicklook=png, n_items=len(items),
        n_time_steps=cube.sizes["time"], areas=areas, seconds=0.0,
    )

    # One map per year: the season's clear observations composited, then mapped as any cube.
    comp_path, comp_ice = out / "composite.zarr", out / "composite-ice.zarr"
    composite(cube_path, comp_path, progress=progress)  # from the store: its STAC Item links the cube
    map_cube(comp_path, comp_ice, threshold=threshold, progress=progress)
    yearly = open_cube(comp_ice)["ice"]
    season = open_cube(comp_path).attrs.get("icemap:composite", {}).get("season")
    per_date = _nodata_shares(ice, "date")
    years = list(per_date["time"].dt.year)
    for year, positions in season_groups(cube["time"].values, season).items():
        for i in positions:
            years[i] = year
    per_date["year"] = years
    per_year = _nodata_shares(yearly, "composite")
    per_year["year"] = per_year["time"].dt.year
    result.nodata = pd.concat([per_date, per_year], ignore_index=True)
    series = glacier_series(yearly, outlines)
    result.region_series = region_series(series)
    result.series_csv = write_table(series, out / "glacier_series.csv")
    result.region_csv = write_table(result.region_series, out / "region_series.csv")
    result.trends = trends(series)
    result.trends_csv = write_table(result.trends, out / "trends.csv")
    result.composite, result.composite_ice = comp_path, comp_ice

    if importlib.util.find_spec("matplotlib") is None:
        result.note = 'figures and the HTML report need matplotlib: pip install "icemap[report]"'
    else:
        comp = open_cube(comp_path)
        result.figures = [
            save_png(map_figure(comp, open_cube(comp_ice), time=-1, outlines=outlines, change=series), out / "map.png"),
            save_png(area_plot(result.region_series, series, credit=credit_line(comp)), out / "area_per_year.png"),
        ]
        result.report = report(comp_path, comp_ice, outlines, out / "report.html", title="icemap demo: sample region")
    result.seconds = time.perf_counter() - start
    return result
