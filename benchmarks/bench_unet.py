"""U-Net inference throughput with ``icemap.predict`` (exact halos), on CPU and on a GPU.

The model is a realistic U-Net (depth 4, base 16, study b's 6-5-2 inputs) with random but
fixed weights: inference costs the same as with trained weights. The cube is in memory, one
date, chunks of 256 px, tiles of 256 px, so the numbers are the inference engine alone.

Rates: tiles/s counts the network windows icemap feeds the model (each a tile plus its halo,
clipped at the array edge); Mpixel/s counts *useful* output pixels. The GPU variant raises
``NotImplementedError`` in ``setup`` without CUDA, which is how asv marks a benchmark skipped.
"""

from __future__ import annotations

from .common import UNET_CHANNELS, best_time, has_cuda, icemap_unet_work, memory_cube, unet_checkpoint, unet_geometry

CHUNK = 256
TILE = 256
BATCH = 4


class UNetCPU:
    """``icemap.predict(...)['ice_probability']`` computed on dask's threads, CPU torch."""

    params = [128, 256, 512]
    param_names = ["size"]
    timeout = 300
    number = 1
    repeat = (1, 3, 30.0)
    warmup_time = 0.0
    device = "cpu"

    def setup(self, size: int) -> None:
        self.model = unet_checkpoint(depth=4, base=16)
        self.cube = memory_cube(size, bands=tuple(sorted(UNET_CHANNELS)), chunksize=CHUNK, time_steps=1)
        depth, halo = unet_geometry(self.model)
        self.tiles, self.net_pixels = icemap_unet_work((size, size), CHUNK, halo, TILE, depth)
        self.mpixels = size * size / 1e6
        self._predict()  # loads the model into the per-process cache, as a warm worker has it

    def _predict(self) -> None:
        import icemap

        _ = icemap.predict(self.cube, self.model, tile=TILE, batch_size=BATCH,
                           device=self.device)["ice_probability"].values

    def time_predict(self, size: int) -> None:
        self._predict()

    def peakmem_predict(self, size: int) -> None:
        self._predict()

    def track_predict_tiles_per_s(self, size: int) -> float:
        return self.tiles / best_time(self._predict, repeat=2)

    track_predict_tiles_per_s.unit = "tiles/s"  # type: ignore[attr-defined]

    def track_predict_mpixel_per_s(self, size: int) -> float:
        """Useful output Mpixel per second (halo pixels are work, not output)."""
        return self.mpixels / best_time(self._predict, repeat=2)

    track_predict_mpixel_per_s.unit = "Mpixel/s"  # type: ignore[attr-defined]


class UNetGPU(UNetCPU):
    """The same on CUDA (bf16 autocast, pinned transfers); skipped where there is no GPU."""

    params = [256, 512, 1024]
    device = "cuda"

    def setup(self, size: int) -> None:
        if not has_cuda():
            raise NotImplementedError("no CUDA device: GPU benchmarks are skipped")
        super().setup(size)
