"""The main job end to end, in km2 of region per second.

``icemap demo``'s recipe without the picture: search the sample region's static STAC catalog,
ingest every reflective band into a Zarr cube, map ice with the NDSI, and sum ice area per
glacier from the outlines. The region has 2 dates (the first split into two scenes that are
mosaicked). km2 counts the region's area once (30 m pixels), whatever the number of dates.
"""

from __future__ import annotations

import shutil

from .common import PIXEL_KM2, best_time, fresh_dir, quiet, sample_region

CHUNK = 512


class EndToEnd:
    """search -> ingest -> ice_mask -> ice area per glacier."""

    params = [256, 512, 1024]
    param_names = ["size"]
    timeout = 300
    number = 1
    repeat = (1, 3, 60.0)
    warmup_time = 0.0

    def setup(self, size: int) -> None:
        self.region = sample_region(size)
        self.km2 = size * size * PIXEL_KM2
        self.out = fresh_dir("asv-e2e-")
        self.n = 0

    def teardown(self, size: int) -> None:
        shutil.rmtree(self.out, ignore_errors=True)

    def _run(self) -> None:
        import icemap

        self.n += 1
        store = self.out / f"{self.n}.zarr"
        with quiet():
            search = icemap.search(str(self.region.catalog), collections=self.region.collection,
                                   bbox=self.region.bbox)
            icemap.ingest(search, store, chunksize=CHUNK)
            cube = icemap.open_cube(store)
            ice = icemap.ice_mask(cube)
            ids, table = icemap.glacier_ids(icemap.read_outlines(self.region.outlines, layer="glaciers"), cube)
            icemap.ice_area_per_glacier(ice, ids, table)

    def time_end_to_end(self, size: int) -> None:
        self._run()

    def peakmem_end_to_end(self, size: int) -> None:
        self._run()

    def track_end_to_end_km2_per_s(self, size: int) -> float:
        return self.km2 / best_time(self._run, repeat=2)

    track_end_to_end_km2_per_s.unit = "km2/s"  # type: ignore[attr-defined]
