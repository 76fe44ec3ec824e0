"""The main job, end to end, on the embedded sample region (``icemap demo``).

It is the same sequence a user runs on real data, only pointed at a generated static catalog:
search -> ingest to a resumable Zarr cube -> NDSI ice mask -> ice area per glacier -> quicklook.
Nothing here is special-cased for the sample; it doubles as a smoke test of the whole chain.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    def print(self, console: Any) -> None:
        from rich.table import Table

        per_date = self.areas.groupby("time")[["ice_area_km2", "outline_area_km2", "nodata_area_km2"]].sum()
        table = Table(title="Ice area on the sample region (NDSI), all glaciers")
        for col in ("date", "ice km²", "outlines km²", "difference %", "under cloud km²"):
            table.add_column(col, justify="right")
        for t, row in per_date.iterrows():
            diff = 100 * (row.ice_area_km2 - row.outline_area_km2) / row.outline_area_km2
            table.add_row(str(t.date()), f"{row.ice_area_km2:.3f}", f"{row.outline_area_km2:.3f}",
                          f"{diff:+.1f}", f"{row.nodata_area_km2:.3f}")
        console.print(table)
        console.print(
            f"{self.n_items} scenes -> {self.n_time_steps} time steps in {self.seconds:.1f} s\n"
            f"cube:      {self.cube}\nareas:     {self.areas_csv}\nquicklook: {self.quicklook}"
        )


def run_demo(
    out: str | os.PathLike[str],
    *,
    size: int = 384,
    n_dates: int = 3,
    seed: int = 0,
    threshold: float | None = None,
    chunksize: int = 256,
    progress: Any = None,
) -> DemoResult:
    """Generate (or reuse) the sample region under ``out`` and run the main job on it."""
    from icemap.index import ice_mask
    from icemap.labels import glacier_ids, read_outlines
    from icemap.quicklook import quicklook
    from icemap.sample import make_sample_region
    from icemap.stac import search
    from icemap.store import open_cube
    from icemap.workflow import ingest
    from icemap.vector import ice_area_per_glacier

    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    region = make_sample_region(out / "region", size=size, n_dates=n_dates, seed=seed)
    s = search(str(region.catalog), collections=region.collection, bbox=region.bbox)
    items = s.items()
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
    return DemoResult(
        out=out, cube=cube_path, areas_csv=areas_csv, quicklook=png, n_items=len(items),
        n_time_steps=cube.sizes["time"], areas=areas, seconds=time.perf_counter() - start,
    )
