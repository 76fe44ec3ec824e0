"""Whole jobs built from the pipeline stages: ingest, map a cube to products, evaluate, calibrate.

These are what ``icemap ingest``, ``icemap map``, ``icemap evaluate`` and ``icemap calibrate``
run, and what a notebook calls to do the same in one line. Each is a short recipe over the stage modules;
nothing here computes pixels itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import fsspec
import xarray as xr

from icemap._version import __version__
from icemap.describe import describe_cog, describe_store, describe_vector, item_path, write_collection
from icemap.errors import EmptySearchError, IcemapError
from icemap.export import export_geotiffs
from icemap.index import ndsi, ndsi_and_ice_mask
from icemap.infer import keep_resources, predict
from icemap.interop import keep_grid, resolve_store
from icemap.labels import rasterize_outlines
from icemap.load import load
from icemap.metrics import best_threshold, threshold_sweep, unsupervised_threshold
from icemap.options import get_option
from icemap.plausibility import check_reflectance
from icemap.quicklook import quicklook
from icemap.stac import Search
from icemap.store import check_not_input, open_cube, write_cube, write_timesteps
from icemap.vector import polygonise, write_vector

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Mapping

    import geopandas as gpd
    import pyproj
    import pystac
    import xarray as xr

    from icemap.dem import DemSource
    from icemap.guards import Guard
    from icemap.reader import Signer
    from icemap.stac import Search
    from icemap.store import Progress, WriteReport

__all__ = ["ingest", "map_ndsi", "write_product", "product_settings", "map_cube", "MapResult", "calibrate_threshold"]


def ingest(
    source: Search | Sequence[pystac.Item | Mapping[str, Any]],
    out: str | os.PathLike[str],
    *,
    bands: Sequence[str] | None = None,
    crs: str | int | pyproj.CRS | None = None,
    resolution: float | None = None,
    bbox: Sequence[float] | None = None,
    chunksize: int | None = None,
    zarr_format: Literal[2, 3] | None = None,
    signer: Signer | str | None = None,
    on_error: Literal["raise", "nodata"] = "raise",
    storage_options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    qa: Literal["qa_pixel"] | None = "qa_pixel",
    engine: Literal["auto", "odc-stac", "stackstac"] | None = None,
) -> WriteReport:
    """Search (or take items), load lazily, and write a resumable cube: the whole ingest.

    Parameters
    ----------
    source
        An :class:`icemap.stac.Search` (its bbox is used for the extent unless ``bbox`` is
        given) or a list of items.
    out
        Path or URL of the Zarr store. Rerunning with the same arguments finishes an
        interrupted store; running with a later date range appends the new dates.

    Other parameters are those of :func:`icemap.load` and :func:`write_cube`; ``qa=None``
    ingests scenes without a QA band (nothing cloud-masked; the store's ``cloud_masked``
    attribute is 0). When the store is written, a few of its chunks are checked
    (:func:`icemap.plausibility.check_reflectance`): values that cannot be reflectance (an
    offset missing or doubled, a wrong scale) give an
    :class:`~icemap.errors.ImplausibleReflectanceWarning`. ``engine`` picks the loader engine; both give
    the same cube, so the store does not depend on it (and a rerun may use the other).
    """
    params: dict[str, Any] | None = None
    if isinstance(source, Search):
        params = source.parameters()
        if bbox is None:
            bbox = source.extent  # its bbox, or the bounds of its intersects geometry
        items: Sequence[pystac.Item | Mapping[str, Any]] = source.item_dicts()
        if not items:
            raise EmptySearchError(
                f"the search matched no items ({json.dumps(params)}); widen --bbox/--datetime "
                "or --max-cloud, or check --collection"
            )
    else:
        items = list(source)
    # Resolved here so the store records the value used, not "default".
    chunksize = get_option("chunksize") if chunksize is None else chunksize
    ds = load(items, bands=bands, crs=crs, resolution=resolution, bbox=bbox, chunksize=chunksize,
              signer=signer, on_error=on_error, qa=qa, engine=engine)
    attrs: dict[str, Any] = {
        "icemap_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "search": params,
        "load": {"bands": [str(b) for b in ds["band"].values], "crs": ds.rio.crs.to_string(),
                 "resolution": resolution if resolution is not None else abs(float(ds.rio.resolution()[0])),
                 "chunksize": chunksize, "on_error": on_error, "qa": qa,
                 "signed": signer is not None},
        "conventions": "reflectance = DN * scale + offset per asset raster:bands; NaN where QA_PIXEL "
                       "flags fill/cloud/dilated cloud/cirrus/cloud shadow or QA_RADSAT saturation",
    }
    # What decides the pixels (a rerun or an append with other values is refused); the chunk
    # size and on_error do not (a rerun with --on-error nodata after a failed read is fine).
    settings = {"bands": attrs["load"]["bands"], "crs": attrs["load"]["crs"],
                "resolution": [abs(float(r)) for r in ds.rio.resolution()], "qa": qa,
                "grid": {"shape": [int(ds.sizes["y"]), int(ds.sizes["x"])],
                         "origin": [float(ds.rio.transform().c), float(ds.rio.transform().f)]}}
    report = write_cube(ds, out, zarr_format=zarr_format, chunksize=chunksize, attrs=attrs,
                        storage_options=storage_options, progress=progress, settings=settings)
    # A few chunks of what was written: a wrong scale or offset is said now, not by an empty map.
    stored = open_cube(out, storage_options=storage_options)
    check_reflectance(stored, where=f"the cube {os.fspath(out)}", stacklevel=3)
    describe_run(out, derived_from=_self_hrefs(items), description="icemap ingest: a cube of surface reflectance",
                 storage_options=storage_options, stored=stored)
    return report


def _self_hrefs(items: Sequence[Any]) -> list[str]:
    """The hrefs of the input Items that have one (a self link), for ``derived_from`` links."""
    hrefs = []
    for it in items:
        if hasattr(it, "get_self_href"):
            href = it.get_self_href()
        else:
            href = next((lk.get("href") for lk in it.get("links", []) if lk.get("rel") == "self"), None)
        if href:
            hrefs.append(str(href))
    return hrefs


def describe_run(main: str | os.PathLike[str], *, derived_from: Sequence[str], description: str,
                 others: Sequence[tuple[str, str | os.PathLike[str]]] = (),
                 storage_options: Mapping[str, Any] | None = None, stored: xr.Dataset | None = None) -> None:
    """Write the STAC Items of a run's products and its Collection (:mod:`icemap.describe`).

    ``main`` is the run's store, described with links to ``derived_from``; ``others`` are
    ``(kind, path)`` of the files written beside it (``cog``, ``vector``), each derived from the
    store. A run writing to an object store gets the store's Item only. ``stored`` is the
    store as the job opened it after writing, if it did (it is then not opened again).
    """
    if stored is None:
        stored = open_cube(main, storage_options=storage_options)
    describe_store(main, derived_from=derived_from, storage_options=storage_options, dataset=stored)
    if "://" in os.fspath(main):
        return
    for kind, path in others:
        if kind == "cog":
            describe_cog(path, derived_from=[item_path(main)])
        else:
            describe_vector(path, derived_from=[item_path(main)], times=list(stored["time"].values))
    write_collection(main, [main, *(p for _, p in others)], description=description)


def map_ndsi(
    cube: xr.Dataset | xr.DataArray,
    *,
    threshold: float | None = None,
    guards: Sequence[str | Guard] = (),
    dem: DemSource | None = None,
    **guard_params: float | None,
) -> xr.Dataset:
    """The NDSI product of a cube, lazily: ``ndsi`` (float32) and ``ice`` (uint8) on (time, y, x)."""
    # One kernel pass per chunk gives both products (the index is not computed twice).
    index, ice = ndsi_and_ice_mask(cube, threshold=threshold, guards=guards, dem=dem, **guard_params)
    product = xr.Dataset({"ndsi": index, "ice": ice})
    for name in ("item_ids", "platform"):
        if name in cube.coords:
            product = product.assign_coords({name: cube[name]})

    product = keep_grid(product, cube)
    product.attrs = {"method": "ndsi", **{k: v for k, v in ice.attrs.items() if k not in ("long_name",)}}
    return product


def write_product(
    product: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    zarr_format: Literal[2, 3] | None = None,
    chunksize: int | None = None,
    attrs: dict[str, Any] | None = None,
    progress: Progress | None = None,
    settings: Mapping[str, Any] | None = None,
) -> WriteReport:
    """Write a product store resumably, one time step at a time (same rules as cubes).

    ``settings`` default to the product's own record of how it was computed (method,
    threshold, guards, model checksum...); a rerun with others is refused.
    """
    meta = {"icemap_version": __version__, **(attrs or {})}
    if settings is None:
        settings = product_settings(product)
    return write_timesteps(product, path, zarr_format=zarr_format, chunksize=chunksize, attrs=meta,
                           progress=progress, settings=settings)


def product_settings(product: xr.Dataset, **extra: Any) -> dict[str, Any]:
    """The settings that decide a product's pixels, from the attributes its mapper set.

    The ice mask's attributes (method, threshold, every guard and its parameters, the DEM
    source) and the product's (model and checksum, channels); labels and display-only
    attributes are left out.
    """
    skip = {"long_name", "flag_values", "flag_meanings", "nodata", "gpu_resources", "model"}
    settings: dict[str, Any] = {k: v for k, v in product.attrs.items() if k not in skip and not k.startswith("icemap")}
    if "ice" in product:
        settings.update({k: v for k, v in product["ice"].attrs.items() if k not in skip})
    settings.update(extra)
    return settings


def _file_sha256(path: Any) -> str | None:
    """Checksum of a local file (a DEM), so a rerun with another file of the same name is caught."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except (OSError, TypeError):
        return None
    return digest.hexdigest()


@dataclass
class MapResult:
    """What :func:`map_cube` wrote."""

    product: Path
    written: list[str]
    skipped: list[str]
    geotiffs: list[Path] = field(default_factory=list)
    outlines: Path | None = None
    quicklook: Path | None = None


def map_cube(
    cube_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    method: Literal["ndsi", "unet"] = "ndsi",
    threshold: float | None = None,
    guards: Sequence[str | Guard] = (),
    dem: DemSource | None = None,
    zarr_format: Literal[2, 3] | None = None,
    geotiff_dir: str | os.PathLike[str] | None = None,
    outlines_path: str | os.PathLike[str] | None = None,
    quicklook_path: str | os.PathLike[str] | None = None,
    reference: str | os.PathLike[str] | gpd.GeoDataFrame | None = None,
    model: str | os.PathLike[str] | None = None,
    predict_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> MapResult:
    """Map a cube store to a product store, plus optional GeoTIFFs, outlines and a quicklook.

    Parameters
    ----------
    cube_path, out
        Input cube and output product store (Zarr; resumable like ingest).
    method
        ``"ndsi"`` (``ndsi`` and ``ice``) or ``"unet"`` (``ice_probability`` and ``ice``,
        plus ``ice_probability_std`` with TTA/MC dropout).
    threshold, guards, dem
        As :func:`icemap.index.ice_mask`; for the U-Net, ``threshold`` is the probability
        threshold (default the model's) and ``dem`` feeds terrain inputs.
    model, predict_options
        The U-Net checkpoint folder (None or ``"default"``: the model shipped with icemap,
        :mod:`icemap.lab.default`) and options of :func:`icemap.infer.predict`
        (``batch_size``, ``tta``, ``halo``...).
    geotiff_dir
        Also write one COG per variable and date there.
    outlines_path
        Also polygonise the ice mask into outlines (.gpkg, .geojson or .parquet), with glacier
        ids from ``reference`` (:func:`icemap.vector.polygonise`).
    quicklook_path
        Also draw a PNG of the clearest date, with ``reference`` outlines if given.

    A few chunks of the cube are checked first (:func:`icemap.plausibility.check_reflectance`);
    values that cannot be reflectance give an
    :class:`~icemap.errors.ImplausibleReflectanceWarning` naming ``--scale``/``--offset``.
    """
    cube = _open_for_mapping(cube_path, method, outputs=(out, geotiff_dir, outlines_path, quicklook_path),
                             dem=dem, reference=reference)
    attrs: dict[str, Any] = {"source_cube": os.fspath(cube_path), "method": method}
    product = _map_cube_product(cube, method, attrs, threshold=threshold, guards=guards, dem=dem, model=model,
                                predict_options=predict_options)
    report = _write_mapped_product(product, out, cube_path, attrs, dem=dem, predict_options=predict_options,
                                   zarr_format=zarr_format, progress=progress)
    stored = open_cube(out)
    result = MapResult(product=Path(out), written=report.written, skipped=report.skipped)
    others = _write_map_extras(result, cube, stored, geotiff_dir=geotiff_dir, outlines_path=outlines_path,
                               quicklook_path=quicklook_path, reference=reference)
    _describe_map(out, cube_path, method, others, stored)
    return result


def _open_for_mapping(cube_path: str | os.PathLike[str], method: str, *, outputs: Sequence[Any], dem: Any,
                      reference: Any) -> Any:
    """Open the cube after checking that no output overwrites an input and the method is known.

    A few chunks of the cube are checked for plausible reflectance first: values that cannot be
    reflectance would map to nothing (or to everything) without a word.
    """
    for output in outputs:
        if output is not None:
            check_not_input(output, {"--cube": cube_path, "--dem": dem, "--reference": reference})
    cube = open_cube(cube_path)
    if method not in ("ndsi", "unet"):
        raise IcemapError(f"unknown method {method!r}; use 'ndsi' or 'unet'")

    # A few chunks of the cube: values that cannot be reflectance would map to nothing (or to
    # everything) without a word; the job reads the whole cube next anyway.
    check_reflectance(cube, where=f"the cube {os.fspath(cube_path)}", stacklevel=4)  # the caller of map_cube
    return cube


def _map_cube_product(cube: Any, method: str, attrs: dict[str, Any], *, threshold: float | None,
                      guards: Sequence[str | Guard], dem: Any, model: Any, predict_options: dict[str, Any] | None) -> Any:
    """The lazy product of ``method`` (NDSI or U-Net); the model's identity goes into ``attrs``."""
    if method == "ndsi":
        if model is not None:
            raise IcemapError("--model is for --method unet; the NDSI method takes no model")
        return map_ndsi(cube, threshold=threshold, guards=guards, dem=dem)
    if guards:
        raise IcemapError("--guards apply to the NDSI method; the U-Net learns its own")

    product = predict(cube, model, threshold=threshold, dem=dem, **(predict_options or {}))
    attrs.update({"model": product.attrs["model"], "model_sha256": product.attrs["model_sha256"]})
    return product


def _write_mapped_product(product: Any, out: str | os.PathLike[str], cube_path: str | os.PathLike[str],
                          attrs: dict[str, Any], *, dem: Any, predict_options: dict[str, Any] | None,
                          zarr_format: Literal[2, 3] | None, progress: Any) -> Any:
    """Write the product store with the settings a resumed run must match (and GPU routing kept)."""
    routing = keep_resources() if product.attrs.get("gpu_resources") else contextlib.nullcontext()
    pixel_options = {k: v for k, v in (predict_options or {}).items()
                     if k in ("tta", "halo", "mc_samples") and v not in (None, False, 0)}
    settings = product_settings(product, source_cube=os.path.abspath(cube_path) if "://" not in os.fspath(
        cube_path) else os.fspath(cube_path), **pixel_options)
    if dem is not None and not hasattr(dem, "dims"):
        settings["dem_sha256"] = _file_sha256(dem)
    with routing:
        return write_product(product, out, zarr_format=zarr_format, attrs=attrs, progress=progress,
                             settings=settings)


def _write_map_extras(result: MapResult, cube: Any, stored: Any, *, geotiff_dir: str | os.PathLike[str] | None,
                      outlines_path: str | os.PathLike[str] | None, quicklook_path: str | os.PathLike[str] | None,
                      reference: Any) -> list[tuple[str, Any]]:
    """The optional COGs, outlines and quicklook, from the stored product; recorded in ``result``.

    Returns the (kind, path) pairs the run's STAC description lists beside the store.
    """
    others: list[tuple[str, Any]] = []
    if geotiff_dir is not None:
        variables = [v for v in ("ice", "ndsi", "ice_probability", "ice_probability_std") if v in stored]
        result.geotiffs = export_geotiffs(stored, geotiff_dir, variables=variables, describe=False)
        others += [("cog", p) for p in result.geotiffs]
    if outlines_path is not None:
        # The product's provenance (method, threshold, model checksum) and, with reference
        # outlines, each polygon's glacier id travel with the outlines into QGIS or an inventory.
        result.outlines = write_vector(polygonise(stored["ice"], reference=reference, attrs=dict(stored.attrs)),
                                       outlines_path)
        others.append(("vector", result.outlines))
    if quicklook_path is not None:
        valid = cube["reflectance"].isel(band=0).notnull().mean(dim=("y", "x")).values
        result.quicklook = quicklook(cube, quicklook_path, ice=stored["ice"], outlines=reference,
                                     time=int(valid.argmax()))
    return others


def _describe_map(out: str | os.PathLike[str], cube_path: str | os.PathLike[str], method: str,
                  others: list[tuple[str, Any]], stored: xr.Dataset) -> None:
    """Describe the run in STAC, derived from the cube's Item (or store) and listing the extras."""
    source = resolve_store(os.fspath(cube_path))
    source_item = os.fspath(cube_path) if os.fspath(cube_path).endswith(".json") else item_path(source)
    describe_run(out, derived_from=[source_item if _exists(source_item) else source],
                 description=f"icemap map ({method}): ice maps of {Path(source).name}", others=others,
                 stored=stored)


def _exists(path: str) -> bool:
    try:
        fs, root = fsspec.core.url_to_fs(path)
        return bool(fs.exists(root))
    except (ImportError, ValueError, OSError):
        return False


def calibrate_threshold(
    cube: Any,
    *,
    reference: Any = None,
    method: Literal["f1", "otsu", "valley"] = "f1",
    buffer_m: float = 0.0,
) -> tuple[float, Any]:
    """Choose an NDSI threshold: F1-maximising against outlines (study a) or from the histogram.

    Returns ``(threshold, curve)`` with the curve as a pandas DataFrame.
    """
    index = ndsi(cube)
    if method == "f1":
        if reference is None:
            raise IcemapError("method 'f1' needs reference outlines (--reference); or use --method otsu/valley")
        ref = rasterize_outlines(reference, cube, buffer_m=buffer_m)
        curve = threshold_sweep(index, ref)
        return best_threshold(curve, "f1"), curve
    if method in ("otsu", "valley"):
        return unsupervised_threshold(index, method=method)
    raise IcemapError(f"unknown calibration method {method!r}; use f1, otsu or valley")
