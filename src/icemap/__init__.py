"""icemap: map uncovered glacier ice from Landsat 8/9 Collection 2 imagery, lazily and at scale.

The public API is imported on first use, so ``import icemap`` stays cheap (no dask graph
machinery, no torch) and a notebook pays only for what it touches.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from icemap._version import __version__

# name -> module that defines it
_API = {
    "search": "icemap.stac",
    "Search": "icemap.stac",
    "load": "icemap.load",
    "ingest": "icemap.workflow",
    "write_cube": "icemap.store",
    "open_cube": "icemap.store",
    "cube_status": "icemap.store",
    "make_sample_region": "icemap.sample",
    "open_sample_region": "icemap.sample",
    "ndsi": "icemap.index",
    "ndwi": "icemap.index",
    "ice_mask": "icemap.index",
    "read_outlines": "icemap.labels",
    "rasterize_outlines": "icemap.labels",
    "glacier_ids": "icemap.labels",
    "ice_area_per_glacier": "icemap.vector",
    "polygonise": "icemap.vector",
    "area_change": "icemap.vector",
    "confusion": "icemap.metrics",
    "scores": "icemap.metrics",
    "evaluate": "icemap.metrics",
    "threshold_sweep": "icemap.metrics",
    "unsupervised_threshold": "icemap.metrics",
    "map_ndsi": "icemap.workflow",
    "map_cube": "icemap.workflow",
    "write_product": "icemap.workflow",
    "quicklook": "icemap.quicklook",
    "export_geotiffs": "icemap.export",
    "predict": "icemap.infer",
    "ice_area_km2": "icemap.vector",
    "write_timesteps": "icemap.store",
    "set_options": "icemap.options",
    "get_option": "icemap.options",
    "glacier_series": "icemap.series",
    "region_series": "icemap.series",
    "trends": "icemap.series",
    "map_figure": "icemap.figures",
    "area_plot": "icemap.figures",
    "report": "icemap.report",
    "composite": "icemap.composite",
    "fill_gaps": "icemap.composite",
    # The lab (icemap.lab): the face of the package may reach it, the product never does.
    "train": "icemap.lab.train",
    "TrainConfig": "icemap.lab.train",
    "import_onnx": "icemap.lab.onnx_import",
}

__all__ = sorted(_API) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from icemap.export import export_geotiffs
    from icemap.index import ice_mask, ndsi, ndwi
    from icemap.infer import predict
    from icemap.labels import glacier_ids, rasterize_outlines, read_outlines
    from icemap.metrics import confusion, evaluate, scores, threshold_sweep, unsupervised_threshold
    from icemap.quicklook import quicklook
    from icemap.vector import area_change, ice_area_per_glacier, polygonise
    from icemap.workflow import map_cube, map_ndsi, write_product
    from icemap.load import load
    from icemap.sample import make_sample_region, open_sample_region
    from icemap.stac import Search, search
    from icemap.store import cube_status, open_cube, write_cube, write_timesteps
    from icemap.workflow import ingest
    from icemap.options import get_option, set_options
    from icemap.vector import ice_area_km2
    from icemap.series import glacier_series, region_series, trends
    from icemap.figures import area_plot, map_figure
    from icemap.report import report
    from icemap.composite import composite, fill_gaps
    from icemap.lab.onnx_import import import_onnx
    from icemap.lab.train import TrainConfig, train


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'icemap' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


class _Package(types.ModuleType):
    """The icemap package object: public functions win over same-named submodules.

    ``load``, ``quicklook`` and ``report`` are functions defined in submodules of the same name. The first
    import of such a submodule (``from icemap.load import load`` inside any function) makes
    Python bind the *module* as ``icemap.load``, after which ``icemap.load(items)`` fails with
    "'module' object is not callable", depending on import order. The submodules remain
    importable and reachable through ``sys.modules``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _API.get(name) == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

# Objects opened with plain xarray (xr.open_zarr) get the `.icemap` accessor when xarray was
# imported first; otherwise icemap registers it when it first hands out a cube (or on
# `import icemap.accessor`). Importing xarray here would make `import icemap` heavy.
if "xarray" in sys.modules:
    importlib.import_module("icemap.accessor")
