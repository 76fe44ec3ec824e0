"""Exceptions and warnings that icemap raises.

Every error a user can reach derives from :class:`IcemapError`, so notebooks can catch them in
one place and the CLI can turn them into one-line messages with a non-zero exit code. Each
message names the thing that is wrong and the argument that fixes it.

Warnings follow the same idea (pystac-client style): a typed hierarchy under
:class:`IcemapWarning` lets users silence or escalate one kind with ``warnings.filterwarnings``.
"""

from __future__ import annotations

__all__ = [
    "IcemapError",
    "BandError",
    "CatalogError",
    "SearchError",
    "EmptySearchError",
    "LoadError",
    "GridError",
    "MissingExtraError",
    "StoreError",
    "SampleError",
    "ModelError",
    "MetricsError",
    "GridMismatchError",
    "NoOverlapError",
    "NoValidPixelsError",
    "IcemapWarning",
    "MissingAssetWarning",
    "StoreWarning",
    "NoQAWarning",
    "MixedCRSWarning",
    "ImplausibleReflectanceWarning",
    "ModelNoBetterWarning",
    "InvalidOutlineWarning",
]


class IcemapError(Exception):
    """Base class of all errors that icemap raises on bad input or unusable data."""


class BandError(IcemapError, ValueError):
    """A band, sensor or QA flag name that the sensor tables do not know."""


class CatalogError(IcemapError):
    """A catalog, API or item file that cannot be reached or parsed."""


class SearchError(IcemapError, ValueError):
    """Search parameters that are invalid (bbox, datetime, cloud cover...)."""


class EmptySearchError(IcemapError):
    """A search that matched no item, where items are needed to go on."""


class LoadError(IcemapError):
    """Items that cannot be turned into a cube (no common CRS, missing assets...)."""


class GridError(LoadError):
    """An output grid that cannot be built: a bbox that misses the items, an empty grid..."""


class MissingExtraError(IcemapError, ImportError):
    """An optional dependency (an extra such as ``icemap[ml]``) that a command needs is missing."""


class StoreError(IcemapError):
    """A Zarr store that does not match what is being written or read."""


class MetricsError(IcemapError, ValueError):
    """Inputs to an accuracy computation that cannot be compared (dtype, dims, arguments)."""


class GridMismatchError(MetricsError):
    """A reference, mask or id raster that is not on the prediction's grid."""


class NoOverlapError(GridMismatchError):
    """Reference outlines that do not overlap the prediction at all: nothing could be compared."""


class NoValidPixelsError(MetricsError):
    """Nothing left to score: every pixel is nodata in the prediction or reference, or invalid."""


class ModelError(IcemapError):
    """A model, checkpoint or input channel set that cannot be used as asked."""


class SampleError(IcemapError, ValueError):
    """Invalid arguments to the sample-region generator, or a folder it must not overwrite."""


class IcemapWarning(UserWarning):
    """Base class of icemap's warnings."""


class MissingAssetWarning(IcemapWarning):
    """An item lacks a requested asset; its pixels become nodata."""


class StoreWarning(IcemapWarning):
    """Something about a store worth knowing (e.g. an incomplete time step being redone)."""


class NoQAWarning(IcemapWarning):
    """Scenes are loaded without a QA band (``qa=None``): clouds and their shadows stay unmasked."""


class MixedCRSWarning(IcemapWarning):
    """Items in several CRSs were put on one grid chosen implicitly; the grid may be huge."""


class ImplausibleReflectanceWarning(IcemapWarning):
    """Reflectance whose darkest or brightest values no real scene has: a missing or doubled
    offset, or a wrong scale (:mod:`icemap.plausibility`). Maps made from it are wrong."""


class ModelNoBetterWarning(IcemapWarning):
    """A trained model scores no better on its validation outlines than NDSI or than calling
    every pixel ice: it has collapsed or not learnt, and should not be used as it is."""


class InvalidOutlineWarning(IcemapWarning):
    """Outlines that were invalid (self-intersecting, bow-tie rings) and were repaired with shapely's make_valid."""
