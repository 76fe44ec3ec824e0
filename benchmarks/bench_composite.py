"""Seasonal composites: one cube per season-year from a cube store, with and without gap filling.

A region of one year with three acquisitions 8 days apart (``per_season=3``), ingested once
into the cache; each call composites it (``icemap.composite``) and writes the composite store
resumably, as ``icemap composite`` does. ``CompositeMemory`` times the compute path alone
(cube store -> composite arrays in memory), per rule; the rate is Mpixel/s of the (date, y, x)
pixels read.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .common import best_time, cache_dir, fresh_dir, quiet, sample_region

CHUNK = 512
SIZES = [256, 1024]
PER_SEASON = 3
RULES = ["min-ndsi", "median"]
FILL_GAPS = [0, 10]


def _season_cube(size: int) -> Path:
    """The ingested one-year, three-acquisition cube (all reflective bands), cached."""
    import icemap

    path = cache_dir() / f"cube-{size}-season{PER_SEASON}-c{CHUNK}.zarr"
    with quiet():
        if path.exists():
            try:
                if not icemap.cube_status(path).incomplete:
                    return path
            except Exception:  # noqa: BLE001 - unfinished in any way: rewrite it
                shutil.rmtree(path, ignore_errors=True)
        region = sample_region(size, n_dates=1, per_season=PER_SEASON)
        icemap.ingest(icemap.search(region.catalog), path, chunksize=CHUNK)
    return path


class CompositeMemory:
    """``icemap.composite(cube)`` computed into memory, per rule."""

    params = (SIZES, RULES)
    param_names = ["size", "rule"]
    timeout = 600

    def setup(self, size: int, rule: str) -> None:
        import icemap

        with quiet():
            self.cube = icemap.open_cube(_season_cube(size))
        self.mpixels = self.cube.sizes["time"] * self.cube.sizes["y"] * self.cube.sizes["x"] / 1e6

    def _run(self, rule: str) -> None:
        import icemap

        with quiet():
            icemap.composite(self.cube, rule=rule).compute()

    def time_composite(self, size: int, rule: str) -> None:
        self._run(rule)

    def track_composite_mpixel_per_s(self, size: int, rule: str) -> float:
        return self.mpixels / best_time(lambda: self._run(rule), repeat=3, budget_s=20)

    track_composite_mpixel_per_s.unit = "Mpixel/s"  # type: ignore[attr-defined]


class CompositeZarr:
    """Cube store -> composite store (``icemap composite``), plain and with ``--fill-gaps 10``."""

    params = (SIZES, FILL_GAPS)
    param_names = ["size", "fill_gaps"]
    timeout = 600
    number = 1
    repeat = (1, 3, 60.0)
    warmup_time = 0.0

    def setup(self, size: int, fill_gaps: int) -> None:
        self.store = _season_cube(size)

    def time_composite_zarr_to_zarr(self, size: int, fill_gaps: int) -> None:
        import icemap

        out = fresh_dir("composite") / "composite.zarr"
        try:
            with quiet():
                icemap.composite(self.store, out, fill_gaps_px=fill_gaps or None)
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)
