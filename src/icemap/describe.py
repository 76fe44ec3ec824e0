"""STAC Items and Collections for the products icemap writes.

Inputs come from STAC; outputs are described in STAC too, so that pystac, QGIS's STAC browser,
stac-fastapi or a data repository read a product's extent, grid, dates, method and lineage
without opening it. Every product gets an Item **beside it, named after it with ``.json``
appended** (``cube.zarr`` -> ``cube.zarr.json``, ``ice_2021-02-12.tif`` ->
``ice_2021-02-12.tif.json``, ``outlines.gpkg`` -> ``outlines.gpkg.json``), and each run a
Collection linking the Items it wrote, beside its main product (``ice.zarr`` ->
``ice.zarr.collection.json``). docs/stac.md lists the fields.

The Items use the projection (v2.0.0: ``proj:code``, ``proj:shape``, ``proj:transform``,
``proj:bbox``), raster (v1.1.0: ``raster:bands`` with ``data_type`` and ``nodata``) and
processing (v1.2.0: ``processing:software``, ``processing:lineage``) extensions, and
``derived_from`` links to what the product was made from (the input scenes' Items, or the
Item of the cube or product store it was computed from). Hrefs are relative to the Item, so a
folder of products can be moved or uploaded as a whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec
import geopandas as gpd
import numpy as np
import pystac
import rasterio
import xarray as xr
import zarr
from rasterio.warp import transform_bounds

from icemap._atomic import atomic_write_text
from icemap._version import __version__
from icemap.errors import IcemapError
from icemap.interop import ZARR, zarr_options
from icemap.kernels import ICE_NODATA, QA_FILL
from icemap.store import open_cube

__all__ = [
    "EXTENSIONS",
    "MEDIA_TYPES",
    "collection_path",
    "describe_cog",
    "describe_store",
    "describe_table",
    "describe_vector",
    "item_path",
    "write_collection",
]

#: Extension schemas the Items declare (and that the tests validate against, offline).
EXTENSIONS = {
    "proj": "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
    "raster": "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "processing": "https://stac-extensions.github.io/processing/v1.2.0/schema.json",
}

COG = "image/tiff; application=geotiff; profile=cloud-optimized"

#: Media type of an asset, by file suffix.
MEDIA_TYPES = {
    ".zarr": ZARR,
    ".tif": COG,
    ".tiff": COG,
    ".gpkg": "application/geopackage+sqlite3",
    ".geojson": "application/geo+json",
    ".parquet": "application/vnd.apache.parquet",
    ".csv": "text/csv",
}

_RASTER_TYPES = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                 "float16", "float32", "float64"}

def item_path(product: str | os.PathLike[str]) -> str:
    """Where the Item of ``product`` lives: beside it, ``.json`` appended to its name."""
    return os.fspath(product).rstrip("/") + ".json"

def collection_path(product: str | os.PathLike[str]) -> str:
    """Where the Collection of the run whose main product is ``product`` lives."""
    return os.fspath(product).rstrip("/") + ".collection.json"

def _is_url(path: str) -> bool:
    return "://" in path

def _href(target: str, item_at: str) -> str:
    """``target`` as seen from the Item at ``item_at``: relative for local files, else as is."""
    if _is_url(target) or _is_url(item_at):
        return target
    rel = os.path.relpath(os.path.abspath(target), os.path.dirname(os.path.abspath(item_at))).replace(os.sep, "/")
    return rel if rel.startswith("../") else "./" + rel

def _iso(t: Any) -> str:
    return str(np.datetime_as_string(np.datetime64(t, "s"), unit="s")) + "Z"

def _dt(t: Any) -> datetime:
    return np.datetime64(t, "s").astype(datetime).replace(tzinfo=timezone.utc)

def _footprint(bounds: Sequence[float], crs: Any) -> tuple[list[float], dict[str, Any]]:
    """Lon/lat bbox and polygon of native ``bounds`` (densified, so curved edges are covered)."""
    w, s, e, n = transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=21)
    ring = [[w, s], [e, s], [e, n], [w, n], [w, s]]
    return [w, s, e, n], {"type": "Polygon", "coordinates": [ring]}

def _proj_code(crs: Any) -> str | None:
    epsg = crs.to_epsg() if crs is not None else None
    return f"EPSG:{epsg}" if epsg else None

def _processing(lineage: str, created: str | None = None) -> dict[str, Any]:
    when = created or datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {
        "processing:software": {"icemap": __version__},
        "processing:lineage": lineage,
        "processing:datetime": when.replace("+00:00", "Z"),
    }

def _times(props: dict[str, Any], times: Sequence[Any]) -> datetime | None:
    """Set ``start_datetime``/``end_datetime`` for several dates; return the single date or None."""
    if not len(times):
        raise IcemapError("a product without any date cannot be described in STAC")
    if len(times) == 1:
        return _dt(times[0])
    props["start_datetime"] = _iso(min(times))
    props["end_datetime"] = _iso(max(times))
    return None

def _band(dtype: Any, nodata: Any, **extra: Any) -> dict[str, Any]:
    name = np.dtype(dtype).name
    band: dict[str, Any] = {"data_type": name if name in _RASTER_TYPES else "other", **extra}
    if nodata is not None:
        value = float(nodata) if np.issubdtype(np.dtype(dtype), np.floating) else int(nodata)
        band["nodata"] = "nan" if value != value else value
    return band

def _links(item: Any, derived_from: Sequence[str | os.PathLike[str]], at: str) -> None:
    for src in derived_from:
        src = os.fspath(src)
        media = "application/json" if src.endswith(".json") else MEDIA_TYPES.get(Path(src.rstrip("/")).suffix.lower())
        item.add_link(pystac.Link("derived_from", _href(src, at), media_type=media))

def _dump(d: Mapping[str, Any], at: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write JSON to ``at`` (local path or fsspec URL), atomically where local."""
    text = json.dumps(d, indent=2, default=str) + "\n"
    if _is_url(at):
        with fsspec.open(at, "w", **dict(storage_options or {})) as f:
            f.write(text)
        return
    atomic_write_text(at, text)

def _finish(item: Any, at: str, write: bool, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    d = item.to_dict(include_self_link=False, transform_hrefs=False)
    if write:
        _dump(d, at, storage_options)
    return d

def _item(product: str, kind: Sequence[str], geometry: Any, bbox: Any, dt: datetime | None,
          props: dict[str, Any]) -> Any:
    name = Path(product.rstrip("/")).name
    return pystac.Item(id=name, geometry=geometry, bbox=bbox, datetime=dt, properties=props,
                       stac_extensions=[EXTENSIONS[k] for k in kind])

def _source_items(ds: Any) -> list[str]:
    if "item_ids" not in ds.coords:
        return []
    ids: list[str] = []
    for v in ds["item_ids"].values.ravel():
        ids += [i for i in str(v).split(",") if i and i not in ids]
    return ids

def _zarr_format(path: str, storage_options: Mapping[str, Any] | None) -> int:
    group = zarr.open_group(path, mode="r", storage_options=zarr_options(storage_options), use_consolidated=False)
    return int(group.metadata.zarr_format)

def describe_store(
    path: str | os.PathLike[str],
    *,
    derived_from: Sequence[str | os.PathLike[str]] = (),
    lineage: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    write: bool = True,
    dataset: xr.Dataset | None = None,
) -> dict[str, Any]:
    """The STAC Item of a Zarr store (cube, product or composite), written beside it.

    Parameters
    ----------
    path
        The store, as written by ``ingest``, ``map`` or ``composite``.
    derived_from
        Items (or stores) it was made from: the input scenes' Item hrefs, or the Item of the
        cube a product was computed from.
    lineage
        How it was made, in words (``processing:lineage``); default from the store's attributes.
    write
        Write the Item to :func:`item_path` (the default); else only return it.
    dataset
        The store as :func:`~icemap.store.open_cube` opened it, when the caller has it open
        already (a job describing what it just wrote): one open per store and job.

    Returns
    -------
    dict
        The Item, as JSON-ready data.
    """
    path = os.fspath(path).rstrip("/")
    ds = dataset if dataset is not None else open_cube(path, storage_options=storage_options)
    crs = ds.rio.crs
    bounds = ds.rio.bounds()
    bbox, geometry = _footprint(bounds, crs)
    props: dict[str, Any] = {}
    dt = _times(props, list(ds["time"].values))
    transform = ds.rio.transform(recalc=True)
    props.update({
        "proj:code": _proj_code(crs),
        "proj:shape": [int(ds.sizes["y"]), int(ds.sizes["x"])],
        "proj:transform": [float(v) for v in list(transform)[:6]],
        "proj:bbox": [float(v) for v in bounds],
    })
    attrs = ds.attrs
    method = attrs.get("method")
    if "icemap:composite" in attrs:
        meta = attrs["icemap:composite"]
        kind = "composite"
        text = f"{meta.get('rule')} composite per season-year ({meta.get('season')}) of clear observations"
    elif "reflectance" in ds and "qa_pixel" in ds:
        kind = "cube"
        text = "surface reflectance of the input scenes, masked with their QA bands, on one grid"
    else:
        kind = "product"
        text = {"ndsi": f"NDSI thresholded at {attrs.get('threshold')}",
                "unet": f"U-Net ice probability, model sha256 {attrs.get('model_sha256')}"}.get(
                    str(method), f"method {method}")
    props.update(_processing(lineage or f"icemap {kind}: {text}", attrs.get("created")))
    props["icemap:kind"] = kind
    for key in ("method", "threshold", "model_sha256"):
        if attrs.get(key) is not None:
            props[f"icemap:{key}"] = attrs[key]
    sources = _source_items(ds)
    if sources:
        props["icemap:source_items"] = sources

    flag_nodata = {"qa_pixel": int(QA_FILL), "ice": int(ICE_NODATA)}
    bands = []
    for name in sorted(map(str, ds.data_vars)):  # in name order: a store does not keep variable order
        var = ds[name]
        if name == "complete" or not {"y", "x"} <= set(var.dims):
            continue
        nodata = np.nan if np.issubdtype(var.dtype, np.floating) else flag_nodata.get(str(name))
        units = str(var.attrs.get("units", ""))
        extra = {"unit": units} if units and "since" not in units else {}
        if "band" in var.dims:
            bands += [_band(var.dtype, nodata, name=f"{name}:{b}", **extra) for b in ds["band"].values]
        else:
            bands.append(_band(var.dtype, nodata, name=str(name), **extra))
    at = item_path(path)
    item = _item(path, ("proj", "raster", "processing"), geometry, bbox, dt, props)
    title = f"icemap {kind} (Zarr v{_zarr_format(path, storage_options)})"
    item.add_asset("data", pystac.Asset(_href(path, at), media_type=ZARR, roles=["data"], title=title,
                                        extra_fields={"raster:bands": bands}))
    _links(item, derived_from, at)
    return _finish(item, at, write, storage_options)

def describe_cog(path: str | os.PathLike[str], *, derived_from: Sequence[str | os.PathLike[str]] = (),
                 write: bool = True) -> dict[str, Any]:
    """The STAC Item of a COG written by :func:`icemap.export.export_geotiffs` (from its tags)."""
    path = os.fspath(path)
    with rasterio.open(path) as src:
        tags = src.tags()
        bbox, geometry = _footprint(tuple(src.bounds), src.crs)
        props: dict[str, Any] = {
            "proj:code": _proj_code(src.crs),
            "proj:shape": [src.height, src.width],
            "proj:transform": [float(v) for v in list(src.transform)[:6]],
            "proj:bbox": [float(v) for v in src.bounds],
        }
        bands = [_band(dt, src.nodata) for dt in src.dtypes]
        description = src.descriptions[0]
    if "datetime" not in tags:
        raise IcemapError(f"{path} has no datetime tag; only COGs written by icemap's export can be described")
    dt = datetime.strptime(tags["datetime"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    what = tags.get("variable", "raster")
    method = tags.get("method", "")
    how = {"ndsi": f"NDSI thresholded at {tags.get('threshold')}",
           "unet": f"U-Net, model sha256 {tags.get('model_sha256')}"}.get(method, method)
    props.update(_processing(f"icemap export of {what} ({how}) for one date"))
    for key in ("method", "threshold", "model_sha256"):
        if key in tags:
            props[f"icemap:{key}"] = float(tags[key]) if key == "threshold" else tags[key]
    if tags.get("source_items"):
        props["icemap:source_items"] = tags["source_items"].split(",")
    at = item_path(path)
    item = _item(path, ("proj", "raster", "processing"), geometry, bbox, dt, props)
    item.add_asset("data", pystac.Asset(_href(path, at), media_type=COG, roles=["data"], title=description or what,
                                        extra_fields={"raster:bands": bands}))
    _links(item, derived_from, at)
    return _finish(item, at, write)

def describe_vector(path: str | os.PathLike[str], *, derived_from: Sequence[str | os.PathLike[str]] = (),
                    times: Sequence[Any] = (), lineage: str = "", write: bool = True) -> dict[str, Any]:
    """The STAC Item of an outline file (GeoPackage, GeoJSON, GeoParquet) with a ``time`` column.

    ``times`` are the dates mapped (the product's): a date without ice has no outline, and a
    file without any outline has no footprint (its Item then has no geometry).
    """
    path = os.fspath(path)
    gdf = gpd.read_parquet(path) if path.lower().endswith(".parquet") else gpd.read_file(path)
    props: dict[str, Any] = {"proj:code": _proj_code(gdf.crs)}
    bbox = geometry = None
    if not gdf.empty:
        bbox, geometry = _footprint(tuple(gdf.total_bounds), gdf.crs)
        props["proj:bbox"] = [float(v) for v in gdf.total_bounds]
    found = list(gdf["time"].dropna().values) if "time" in gdf else []
    dt = _times(props, sorted(np.unique(np.asarray([*found, *times], dtype="datetime64[s]"))))
    props.update(_processing(lineage or "icemap outlines: 4-connected patches of ice pixels, polygonised"))
    at = item_path(path)
    item = _item(path, ("proj", "processing"), geometry, bbox, dt, props)
    item.add_asset("data", pystac.Asset(_href(path, at), media_type=MEDIA_TYPES.get(Path(path).suffix.lower()),
                                        roles=["data"], title="ice outlines"))
    _links(item, derived_from, at)
    return _finish(item, at, write)

def describe_table(path: str | os.PathLike[str], table: Any, *,
                   derived_from: Sequence[str | os.PathLike[str]] = (),
                   bbox_of: str | os.PathLike[str] | None = None, lineage: str = "", write: bool = True,
                   times: Any = None) -> dict[str, Any]:
    """The STAC Item of an area table (CSV or Parquet) with a ``time`` column.

    ``bbox_of`` is the store whose footprint the table covers (the product it was computed
    from); without it the Item has no geometry. ``times`` stands in for a table without a
    ``time`` column (a trends table spans the dates of the series it was fitted to).
    """
    path = os.fspath(path)
    props: dict[str, Any] = {}
    when = table["time"] if times is None else times
    times = sorted(np.unique(np.asarray(when.dropna().values, dtype="datetime64[s]")))
    dt = _times(props, times)
    bbox = geometry = None
    if bbox_of is not None:
        ds = open_cube(bbox_of)
        bbox, geometry = _footprint(ds.rio.bounds(), ds.rio.crs)
    props.update(_processing(lineage or "icemap areas: ice area per glacier and time step, with uncertainty"))
    at = item_path(path)
    item = _item(path, ("processing",), geometry, bbox, dt, props)
    item.add_asset("data", pystac.Asset(_href(path, at), media_type=MEDIA_TYPES.get(Path(path).suffix.lower()),
                                        roles=["data"], title="ice area table"))
    _links(item, derived_from, at)
    return _finish(item, at, write)

def _parse(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))

def write_collection(main: str | os.PathLike[str], products: Sequence[str | os.PathLike[str]], *,
                     description: str) -> dict[str, Any]:
    """The Collection of one run, beside its main product: the extent of its Items and a link to each.

    Each Item (already written beside its product) gets ``collection`` and a link back.
    Local paths only: a run on an object store writes its Items, not a Collection.
    """
    at = collection_path(main)
    loaded = []
    for p in products:
        with open(item_path(p)) as f:
            loaded.append((item_path(p), json.load(f)))
    boxes = [d["bbox"] for _, d in loaded if d.get("bbox")]
    spatial = ([min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                max(b[3] for b in boxes)] if boxes else [-180.0, -90.0, 180.0, 90.0])
    starts = [_parse(d["properties"].get("start_datetime") or d["properties"]["datetime"]) for _, d in loaded]
    ends = [_parse(d["properties"].get("end_datetime") or d["properties"]["datetime"]) for _, d in loaded]
    cid = Path(os.fspath(main).rstrip("/")).name
    coll = pystac.Collection(
        id=cid, description=description, license="other",
        extent=pystac.Extent(pystac.SpatialExtent([spatial]), pystac.TemporalExtent([[min(starts), max(ends)]])),
        stac_extensions=[EXTENSIONS["processing"]],
        providers=[pystac.Provider(name="icemap", roles=[pystac.ProviderRole.PROCESSOR],
                                   extra_fields={"processing:software": {"icemap": __version__}})],
    )
    for path, d in loaded:
        coll.add_link(pystac.Link("item", _href(path, at), media_type="application/json"))
        d["collection"] = cid
        d["links"] = [lk for lk in d["links"] if lk.get("rel") != "collection"] + [
            {"rel": "collection", "href": _href(at, path), "type": "application/json"}]
        _dump(d, path)
    out = coll.to_dict(include_self_link=False, transform_hrefs=False)
    _dump(out, at)
    return out

#: Schemas of a model folder's Item (the machine-learning model extension, and file for checksums).
MODEL_EXTENSIONS = {
    "mlm": "https://stac-extensions.github.io/mlm/v1.5.2/schema.json",
    "file": "https://stac-extensions.github.io/file/v2.1.0/schema.json",
    "raster": EXTENSIONS["raster"],
}
