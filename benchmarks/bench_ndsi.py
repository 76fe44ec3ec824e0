"""NDSI and ice-mask throughput, in memory and Zarr to Zarr.

In memory (``NDSIMemory``): the cube's pixels are already numpy arrays (chunked lazily with
dask), so the numbers are the compute path alone: icemap's kernel applied per chunk on dask's
threads. Zarr to Zarr (``NDSIZarr``): what ``icemap map`` does, read a cube store, compute the
NDSI product (``ndsi`` float32 + ``ice`` uint8) and write it resumably.

Rates: Mpixel/s of (date, y, x); MB/s of the bytes an NDSI must move at least (two float32
bands read, one float32 written: 12 B per pixel), comparable with the machine's memory
bandwidth (see ``benchmarks/ratios.py`` for that comparison).
"""

from __future__ import annotations

import shutil

from .common import NDSI_BANDS, best_time, cube_store, fresh_dir, memory_cube, quiet

CHUNK = 512
SIZES = [256, 512, 1024]


class NDSIMemory:
    """``icemap.ndsi`` / ``icemap.ice_mask`` on an in-memory cube (2 dates)."""

    params = SIZES
    param_names = ["size"]
    timeout = 300

    def setup(self, size: int) -> None:
        self.cube = memory_cube(size, bands=NDSI_BANDS, chunksize=CHUNK)
        self.mpixels = self.cube.sizes["time"] * size * size / 1e6

    def _ndsi(self) -> None:
        import icemap

        _ = icemap.ndsi(self.cube).values

    def _ice(self) -> None:
        import icemap

        _ = icemap.ice_mask(self.cube).values

    def time_ndsi(self, size: int) -> None:
        self._ndsi()

    def time_ice_mask(self, size: int) -> None:
        self._ice()

    def peakmem_ice_mask(self, size: int) -> None:
        self._ice()

    def track_ndsi_mpixel_per_s(self, size: int) -> float:
        return self.mpixels / best_time(self._ndsi, repeat=5, budget_s=10)

    track_ndsi_mpixel_per_s.unit = "Mpixel/s"  # type: ignore[attr-defined]

    def track_ndsi_mb_per_s(self, size: int) -> float:
        return 12 * self.mpixels / best_time(self._ndsi, repeat=5, budget_s=10)

    track_ndsi_mb_per_s.unit = "MB/s"  # type: ignore[attr-defined]

    def track_ice_mask_mpixel_per_s(self, size: int) -> float:
        return self.mpixels / best_time(self._ice, repeat=5, budget_s=10)

    track_ice_mask_mpixel_per_s.unit = "Mpixel/s"  # type: ignore[attr-defined]


class NDSIZarr:
    """Cube store -> ``icemap.map_ndsi`` -> ``icemap.write_product`` (a new store each call)."""

    params = SIZES
    param_names = ["size"]
    timeout = 300
    number = 1
    repeat = (1, 3, 30.0)
    warmup_time = 0.0

    def setup(self, size: int) -> None:
        self.store = cube_store(size, bands=NDSI_BANDS, chunksize=CHUNK)
        self.mpixels = 2 * size * size / 1e6
        self.out = fresh_dir("asv-ndsi-")
        self.n = 0

    def teardown(self, size: int) -> None:
        shutil.rmtree(self.out, ignore_errors=True)

    def _run(self) -> None:
        import icemap

        self.n += 1
        with quiet():
            product = icemap.map_ndsi(icemap.open_cube(self.store))
            icemap.write_product(product, self.out / f"{self.n}.zarr")

    def time_ndsi_zarr_to_zarr(self, size: int) -> None:
        self._run()

    def peakmem_ndsi_zarr_to_zarr(self, size: int) -> None:
        self._run()

    def track_ndsi_zarr_to_zarr_mpixel_per_s(self, size: int) -> float:
        return self.mpixels / best_time(self._run, repeat=2)

    track_ndsi_zarr_to_zarr_mpixel_per_s.unit = "Mpixel/s"  # type: ignore[attr-defined]

    def track_ndsi_zarr_to_zarr_mb_per_s(self, size: int) -> float:
        """Uncompressed MB of the two input bands read per second."""
        return 8 * self.mpixels / best_time(self._run, repeat=2)

    track_ndsi_zarr_to_zarr_mb_per_s.unit = "MB/s"  # type: ignore[attr-defined]
