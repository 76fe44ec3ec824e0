"""Per-glacier area series and the HTML report, on an NDSI product store.

``glacier_series`` is one kernel pass per chunk (outline, valid and ice pixels and the ice's
pixel-edge perimeter per glacier) plus rasterising the outlines; the report adds two maps, the
area plot and the HTML table. Measured in km2 of region per second (30 m pixels, 2 dates).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .common import NDSI_BANDS, PIXEL_KM2, best_time, cache_dir, cube_store, fresh_dir, quiet, sample_region


def product_store(size: int) -> tuple[Path, Path]:
    """The cached cube (green, nir08, swir16) and its NDSI product store, written once."""
    import icemap
    from icemap.workflow import map_cube

    cube = cube_store(size, bands=(*NDSI_BANDS, "nir08"))
    pred = cache_dir() / f"ndsi-{size}.zarr"
    with quiet():
        if pred.exists():
            try:
                if not icemap.cube_status(pred).incomplete:
                    return cube, pred
            except Exception:  # noqa: BLE001 - unfinished in any way: rewrite it
                shutil.rmtree(pred, ignore_errors=True)
        map_cube(cube, pred)
    return cube, pred


class GlacierSeries:
    """icemap.glacier_series on a product store, and icemap.report on top of it."""

    params = [512, 1024]
    param_names = ["size"]
    timeout = 300
    number = 1
    repeat = (1, 3, 60.0)
    warmup_time = 0.0

    def setup(self, size: int) -> None:
        self.region = sample_region(size)
        self.cube, self.pred = product_store(size)
        self.km2 = size * size * PIXEL_KM2
        self.out = fresh_dir("asv-series-")

    def teardown(self, size: int) -> None:
        shutil.rmtree(self.out, ignore_errors=True)

    def _series(self) -> None:
        import icemap

        with quiet():
            icemap.glacier_series(self.pred, self.region.outlines)

    def _report(self) -> None:
        import icemap

        with quiet():
            icemap.report(self.cube, self.pred, self.region.outlines, self.out / "report.html")

    def time_glacier_series(self, size: int) -> None:
        self._series()

    def time_report(self, size: int) -> None:
        self._report()

    def track_glacier_series_km2_per_s(self, size: int) -> float:
        return self.km2 / best_time(self._series, repeat=2)

    track_glacier_series_km2_per_s.unit = "km2/s"  # type: ignore[attr-defined]
