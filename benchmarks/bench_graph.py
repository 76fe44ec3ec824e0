"""Graph size: tasks per output chunk of the load, NDSI and U-Net graphs.

A graph that grows faster than the number of chunks (or carries pixels or weights) would make
the scheduler, not the workers, the bottleneck at regional scale. These ``track_`` benchmarks
build graphs only (no pixel is read) and count their tasks: the numbers should stay flat as
the region grows. Chunks of 256 px, so each size has 1, 4 and 16 chunks per band and date.
"""

from __future__ import annotations

from typing import Any

from .common import NDSI_BANDS, UNET_CHANNELS, load_cube, quiet, region_items, tasks_per_chunk, unet_checkpoint

CHUNK = 256


class GraphSize:
    """Tasks per output chunk of optimised graphs (culled and fused, as ``compute`` sends them)."""

    params = [256, 512, 1024]
    param_names = ["size"]
    timeout = 300

    def setup(self, size: int) -> None:

        with quiet():
            self.cube = load_cube(region_items(size), bands=sorted({*UNET_CHANNELS, *NDSI_BANDS}), chunksize=CHUNK)
        self.model = unet_checkpoint(depth=4, base=16)

    def track_load_tasks_per_chunk(self, size: int) -> float:
        return tasks_per_chunk(self.cube["reflectance"])

    track_load_tasks_per_chunk.unit = "tasks/chunk"  # type: ignore[attr-defined]

    def track_ndsi_tasks_per_chunk(self, size: int) -> float:
        import icemap

        with quiet():
            return tasks_per_chunk(icemap.ndsi(self.cube))

    track_ndsi_tasks_per_chunk.unit = "tasks/chunk"  # type: ignore[attr-defined]

    def track_ice_mask_tasks_per_chunk(self, size: int) -> float:
        import icemap

        with quiet():
            return tasks_per_chunk(icemap.ice_mask(self.cube))

    track_ice_mask_tasks_per_chunk.unit = "tasks/chunk"  # type: ignore[attr-defined]

    def track_predict_tasks_per_chunk(self, size: int) -> float:
        import icemap

        with quiet():
            out: Any = icemap.predict(self.cube, self.model, tile=256, device="cpu")
        return tasks_per_chunk(out["ice_probability"])

    track_predict_tasks_per_chunk.unit = "tasks/chunk"  # type: ignore[attr-defined]
