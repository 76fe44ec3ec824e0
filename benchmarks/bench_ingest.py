"""Ingest throughput: COGs (a static STAC catalog) -> lazy cube -> resumable Zarr store.

What a user's ``icemap ingest`` costs per byte and per pixel, at three region sizes so that
growth of cost with size shows. Data: the sample region (one scene per date, 2 dates, all 7
reflective bands + QA), generated once into the benchmark cache.

Rates: MB/s counts the uncompressed cube written (float32 reflectance + uint16 QA_PIXEL);
Mpixel/s counts (date, y, x) pixels, each holding every band.
"""

from __future__ import annotations

import shutil
from typing import Any

from .common import best_time, cube_mpixels, cube_nbytes, fresh_dir, load_cube, quiet, region_items

CHUNK = 512


class Ingest:
    """``icemap.load`` + ``icemap.write_cube`` into a new store each call."""

    params = [256, 512, 1024]
    param_names = ["size"]
    timeout = 300  # the first run generates the regions (about 15 s at 1024 px)
    number = 1
    repeat = (1, 3, 30.0)
    warmup_time = 0.0

    def setup(self, size: int) -> None:

        self.items = region_items(size, split=False)
        with quiet():
            cube = load_cube(self.items, chunksize=CHUNK)
        self.nbytes = cube_nbytes(cube)
        self.mpixels = cube_mpixels(cube)
        self.out = fresh_dir("asv-ingest-")
        self.n = 0

    def teardown(self, size: int) -> None:
        shutil.rmtree(self.out, ignore_errors=True)

    def _ingest(self) -> Any:
        import icemap

        self.n += 1
        with quiet():
            return icemap.write_cube(load_cube(self.items, chunksize=CHUNK), self.out / f"{self.n}.zarr")

    def time_ingest(self, size: int) -> None:
        self._ingest()

    def peakmem_ingest(self, size: int) -> None:
        self._ingest()

    def track_ingest_mb_per_s(self, size: int) -> float:
        return self.nbytes / 1e6 / best_time(self._ingest, repeat=2)

    track_ingest_mb_per_s.unit = "MB/s"  # type: ignore[attr-defined]

    def track_ingest_mpixel_per_s(self, size: int) -> float:
        return self.mpixels / best_time(self._ingest, repeat=2)

    track_ingest_mpixel_per_s.unit = "Mpixel/s"  # type: ignore[attr-defined]
