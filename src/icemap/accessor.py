"""The ``.icemap`` accessor on xarray objects: the API, spelled as methods.

``cube.icemap.ndsi()`` is ``icemap.ndsi(cube)``, and so on; nothing here computes anything
of its own. It is registered when icemap hands out its first cube (``icemap.load``,
``icemap.open_cube``) or when this module is imported, so ``import icemap`` stays light.

Every method goes through the package's public API (``icemap.<name>``), never through the stage
modules themselves: the stages that register this accessor import it, and it imports none of
them, so there is no import cycle.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import xarray as xr

import icemap

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Sequence
    from pathlib import Path

    import geopandas as gpd
    import pandas as pd

    from icemap.dem import DemSource
    from icemap.guards import Guard

__all__ = ["CubeAccessor", "MaskAccessor"]


@xr.register_dataset_accessor("icemap")
class CubeAccessor:
    """Methods on cubes (``reflectance``) and products (``ice``, ``ndsi``...)."""

    def __init__(self, obj: xr.Dataset) -> None:
        self._obj = obj

    def ndsi(self) -> xr.DataArray:
        """NDSI = (green - swir16) / (green + swir16), lazily (:func:`icemap.index.ndsi`)."""
        return icemap.ndsi(self._obj)

    def ndwi(self) -> xr.DataArray:
        """NDWI = (green - nir08) / (green + nir08) (:func:`icemap.index.ndwi`)."""
        return icemap.ndwi(self._obj)

    def ice_mask(self, threshold: float | None = None, guards: Sequence[str | Guard] = (), dem: DemSource | None = None,
                 **params: float | None) -> xr.DataArray:
        """Thresholded NDSI with optional guards (:func:`icemap.index.ice_mask`)."""
        return icemap.ice_mask(self._obj, method="ndsi", threshold=threshold, guards=guards, dem=dem, out=None, **params)

    def predict(self, model: str | os.PathLike[str] | None = None, **kwargs: Any) -> xr.Dataset:
        """U-Net ice probability and mask (:func:`icemap.infer.predict`); ``model=None`` is the
        model shipped with icemap, as for :func:`icemap.predict`."""
        return icemap.predict(self._obj, model, **kwargs)

    def quicklook(self, path: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Write a false-colour PNG (:func:`icemap.quicklook.quicklook`)."""
        return icemap.quicklook(self._obj, path, **kwargs)

    def composite(self, out: str | os.PathLike[str] | None = None, **kwargs: Any) -> xr.Dataset | icemap.store.WriteReport:
        """One composite per season-year (:func:`icemap.composite.composite`)."""
        return icemap.composite(self._obj, out, **kwargs)

    def fill_gaps(self, max_distance_px: float, **kwargs: Any) -> xr.Dataset:
        """Inverse-distance gap filling of ``reflectance`` (:func:`icemap.composite.fill_gaps`)."""
        return icemap.fill_gaps(self._obj, max_distance_px=max_distance_px, **kwargs)

    def write(self, path: str | os.PathLike[str], **kwargs: Any) -> icemap.store.WriteReport:
        """Write resumably to Zarr: a cube with :func:`~icemap.store.write_cube`, else a product
        (a composite, which has no ``qa_pixel``, is written like a product)."""

        if "reflectance" in self._obj and "clear_count" not in self._obj:
            return icemap.write_cube(self._obj, path, **kwargs)
        return icemap.write_timesteps(self._obj, path, **kwargs)


@xr.register_dataarray_accessor("icemap")
class MaskAccessor:
    """Methods on ice masks (uint8: 1 ice, 0 not, 255 nodata)."""

    def __init__(self, obj: xr.DataArray) -> None:
        self._obj = obj

    def area_km2(self) -> xr.DataArray:
        """Ice area per time step (:func:`icemap.vector.ice_area_km2`)."""
        return icemap.ice_area_km2(self._obj)

    def area_per_glacier(self, outlines: str | os.PathLike[str] | gpd.GeoDataFrame) -> pd.DataFrame:
        """Ice area of every glacier in ``outlines`` at every date, as a DataFrame."""
        ids, table = icemap.glacier_ids(outlines, self._obj)
        return icemap.ice_area_per_glacier(self._obj, ids, table)

    def series(self, outlines: str | os.PathLike[str] | gpd.GeoDataFrame, **kwargs: Any) -> pd.DataFrame:
        """Per-glacier area series with uncertainty and rates (:func:`icemap.series.glacier_series`)."""
        return icemap.glacier_series(self._obj, outlines, **kwargs)

    def polygonise(self, **kwargs: Any) -> gpd.GeoDataFrame:
        """Ice outlines with areas, as a GeoDataFrame (:func:`icemap.vector.polygonise`)."""
        return icemap.polygonise(self._obj, **kwargs)

    def evaluate(self, outlines: str | os.PathLike[str] | gpd.GeoDataFrame, **kwargs: Any) -> dict[str, float | int] | tuple[dict[str, float | int], pd.DataFrame]:
        """Scores against reference outlines (:func:`icemap.metrics.evaluate`)."""
        return icemap.evaluate(self._obj, outlines, **kwargs)
