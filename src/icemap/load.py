"""Items -> a lazy, masked, CRS-aware reflectance cube.

The recipe, in order:

1. **normalise** each item: find its band and QA assets through the sensor table (whatever the
   provider calls them), rename them to common band names, state scale/offset/nodata on every
   asset (from its ``raster:bands``, else the table), and state ``proj:epsg`` (pystac >= 1.12
   writes ``proj:code``; stackstac reads only the former);
2. **grid**: target CRS (default: the items' most common), resolution (the sensor's), bounds (the
   items' union, a lon/lat bbox or explicit bounds) snapped onto the items' own pixel grid so
   nothing is resampled when the CRS matches;
3. **read** with a loader engine onto that grid, one dask array per asset and item: odc-stac
   (the default) reads DNs in their native integer type through icemap's reader driver
   (:class:`icemap.reader_odc.IcemapDriver`); stackstac (the ``icemap[stackstac]`` extra) stacks
   them as float32 through :class:`icemap.reader_stackstac.IcemapReader`. Both sign URLs when a
   worker opens a file and apply the same unreadable-asset policy; both give the same cube;
4. **scale and mask** in the kernel layer (:func:`icemap.kernels.scale_mask`): NaN where QA_PIXEL says fill/cloud/dilated cloud/cirrus/cloud shadow, and in each
   band where QA_RADSAT says that band saturated. Snow/ice is never masked;
5. **mosaic** scenes of the same day and WRS path (consecutive rows) into one time step,
   taking each pixel from the first scene that has a valid value there;
6. **wrap** as an ``xarray.Dataset`` (``reflectance``, ``qa_pixel``) with the CRS written the
   rioxarray way.

Only metadata is touched: no pixel is read until the result is computed.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import dask.array as da
import numpy as np
import odc.stac
import pystac
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from affine import Affine
from odc.geo.geobox import GeoBox
from odc.geo.xr import xr_coords
from pyproj import CRS
from pyproj.exceptions import CRSError

from icemap import kernels
from icemap.bands import MASK_FLAGS_DEFAULT, Sensor, class_qa_to_bits, get_sensor, qa_flag_bits, translate_class_qa
from icemap.checks import (
    check_bbox_hits_footprints,
    check_grid,
    default_bands,
    keep_overlapping,
    match_stacked,
    project_bbox,
    raster_number,
    warn_mixed_crs,
)
from icemap.errors import EmptySearchError, GridError, LoadError, MissingAssetWarning, NoQAWarning
from icemap.extras import require
from icemap.options import get_option, resolve
from icemap.reader import GDAL_RETRY, OnError, resolve_signer
from icemap.reader_odc import IcemapDriver
from icemap.stac import item_datetime

if TYPE_CHECKING:  # pragma: no cover
    import pyproj
    import pystac
    import xarray as xr

    from icemap.reader import Signer

__all__ = ["load", "normalise_items", "grid_for_items", "resolve_engine", "ENGINES", "QA_FILL"]

#: The loader engines ``icemap.load(engine=...)`` accepts; ``"auto"`` picks odc-stac.
ENGINES = ("auto", "odc-stac", "stackstac")
Engine = Literal["auto", "odc-stac", "stackstac"]

QA_FILL = kernels.QA_FILL
_QA = "qa_pixel"
_RADSAT = "qa_radsat"


def _item_epsg(item: Mapping[str, Any]) -> int | None:
    props = item.get("properties", {})
    epsg = props.get("proj:epsg")
    if epsg is None:
        code = props.get("proj:code")
        if isinstance(code, str) and code.upper().startswith("EPSG:"):
            epsg = code.split(":", 1)[1]
    if epsg is None:
        for asset in item.get("assets", {}).values():
            if asset.get("proj:epsg"):
                epsg = asset["proj:epsg"]
                break
    return int(epsg) if epsg is not None else None


def _as_dict(item: Any) -> dict[str, Any]:
    if isinstance(item, Mapping):
        return dict(item)
    to_dict = getattr(item, "to_dict", None)
    if to_dict is None:
        raise LoadError(f"expected STAC items (dicts or pystac.Item), got {type(item).__name__}")
    return to_dict(include_self_link=False, transform_hrefs=False)


def _asset_scale_offset(asset: Mapping[str, Any]) -> tuple[float | None, float | None, Any]:
    rb = asset.get("raster:bands") or []
    first = rb[0] if isinstance(rb, list) and rb and isinstance(rb[0], Mapping) else {}
    return (raster_number(first.get("scale"), "scale", asset), raster_number(first.get("offset"), "offset", asset),
            raster_number(first.get("nodata"), "nodata", asset))


def normalise_items(
    items: Iterable[Any], sensor: Sensor, bands: Sequence[str], *, use_qa: bool = True
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rewrite items into the plain shape stackstac reads, and collect their metadata.

    Returns ``(clean_items, meta)``: clean items have assets keyed by common band name (plus
    ``qa_pixel``/``qa_radsat`` when the sensor has them), each with ``raster:bands`` stating
    scale, offset and nodata, and ``proj:epsg`` in the properties. ``meta`` holds per item
    what the cube keeps: id, datetime, platform, WRS path/row, cloud cover. With
    ``use_qa=False`` the QA_PIXEL asset is neither looked for nor required.
    """
    clean: list[dict[str, Any]] = []
    meta: list[dict[str, Any]] = []
    missing: dict[str, list[str]] = defaultdict(list)
    for raw in items:
        item = _as_dict(raw)
        iid = item.get("id", "<no id>")
        assets = item.get("assets") or {}
        props = dict(item.get("properties") or {})
        new_assets: dict[str, dict[str, Any]] = {}
        for band in bands:
            key = sensor.find_asset(assets, band)
            if key is None:
                missing[band].append(iid)
                continue
            src = assets[key]
            spec = sensor.band(band)
            scale, offset, nodata = _asset_scale_offset(src)
            new_assets[band] = _clean_asset(
                src,
                scale=spec.scale if scale is None else scale,
                offset=sensor.default_offset(spec, props) if offset is None else offset,
                nodata=spec.nodata if nodata is None else nodata,
            )
        for qa_name, radsat in ((_QA, False), (_RADSAT, True)):
            if not (use_qa or radsat):
                continue
            key = sensor.find_qa_asset(assets, radsat=radsat)
            if key is not None:
                # QA values are bit fields: never rescale them, and let fill come from bit 0
                # (QA_PIXEL) rather than a nodata value, so read them without one.
                new_assets[qa_name] = _clean_asset(assets[key], scale=1.0, offset=0.0, nodata=None)
            elif sensor.qa_asset_keys and not radsat:
                missing[qa_name].append(iid)
        epsg = _item_epsg(item)
        if epsg is not None:
            props["proj:epsg"] = epsg
        props.pop("proj:code", None)
        # One datetime form for stackstac, in UTC: items mixing "2022-02-01" and
        # "2022-02-05T10:00:00+05:00" would otherwise give it naive and aware times to compare.
        props["datetime"] = item_datetime(item).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        # Per-asset grids (Earth Search) are copied onto the assets by _clean_asset; stale
        # item-level eo:bands (USGS 0.7 items list band *indices* there) would trip stackstac.
        props.pop("eo:bands", None)
        clean.append(
            {
                "type": "Feature",
                "stac_version": item.get("stac_version", "1.0.0"),
                "id": iid,
                "bbox": item.get("bbox"),
                "geometry": item.get("geometry"),
                "properties": props,
                "assets": new_assets,
                "links": [],
            }
        )
        meta.append(
            {
                "id": iid,
                "datetime": item_datetime(item),
                "platform": str(props.get("platform", props.get("eo:platform", ""))).lower().replace("_", "-"),
                "wrs_path": props.get("landsat:wrs_path"),
                "wrs_row": props.get("landsat:wrs_row"),
                "cloud_cover": props.get("eo:cloud_cover"),
                "epsg": epsg,
                # Earth Search states grids per asset only (10 m and 20 m bands differ).
                "transform": props.get("proj:transform") or _asset_grid(new_assets, "proj:transform"),
                "shape": props.get("proj:shape") or _asset_grid(new_assets, "proj:shape"),
                "bbox": item.get("bbox"),
            }
        )
    if not clean:
        raise EmptySearchError("no items to load; widen the search (bbox, datetime, max cloud)")
    for band, ids in missing.items():
        if len(ids) == len(clean):
            what = "QA_PIXEL" if band == _QA else f"band {band!r}"
            raise LoadError(
                f"no item has {what} (looked for assets {', '.join(_candidate_keys(sensor, band))}); "
                + ("load without cloud masking with qa=None (CLI --no-qa), or pass sensor= for this collection"
                   if band == _QA else "pick other bands or pass sensor= for this collection")
            )
        warnings.warn(
            f"{len(ids)} item(s) lack {band!r} and give nodata for it: {', '.join(ids[:5])}"
            + (" ..." if len(ids) > 5 else ""),
            MissingAssetWarning,
            stacklevel=3,
        )
    return clean, meta


def _asset_grid(assets: Mapping[str, Mapping[str, Any]], key: str) -> Any:
    """``proj:transform``/``proj:shape`` of the first band asset that states one (or None)."""
    for name, asset in assets.items():
        if name not in (_QA, _RADSAT) and asset.get(key):
            return asset[key]
    return None


def _candidate_keys(sensor: Sensor, band: str) -> tuple[str, ...]:
    if band == _QA:
        return sensor.qa_asset_keys
    return sensor.band(band).asset_keys


def _clean_asset(src: Mapping[str, Any], *, scale: float, offset: float, nodata: Any) -> dict[str, Any]:
    rb: dict[str, Any] = {"scale": float(scale), "offset": float(offset)}
    if nodata is not None:
        rb["nodata"] = nodata
    asset = {
        "href": src["href"],
        "type": src.get("type", "image/tiff; application=geotiff"),
        "roles": ["data"],
        "raster:bands": [rb],
    }
    for key in ("proj:epsg", "proj:shape", "proj:transform", "proj:bbox"):
        if key in src:
            asset[key] = src[key]
    if "proj:code" in src and "proj:epsg" not in src:
        code = str(src["proj:code"])
        if code.upper().startswith("EPSG:"):
            asset["proj:epsg"] = int(code.split(":", 1)[1])
    return asset


def _parse_crs(crs: Any) -> int:
    try:
        epsg = CRS.from_user_input(crs).to_epsg()
    except CRSError as exc:
        raise LoadError(f"cannot understand crs={crs!r}: {exc}; use e.g. 'EPSG:32619'") from None
    if epsg is None:
        raise LoadError(f"crs={crs!r} has no EPSG code; icemap cubes need one (e.g. 'EPSG:32619')")
    return epsg


#: How much finer than the sensor's own pixels a grid may be, per axis.
_MAX_OVERSAMPLING = 16.0


def _check_oversampling(epsg: int, res: tuple[float, float], sensor: Sensor) -> None:
    """Refuse a grid in metres far finer than the sensor's pixels (a typo such as 0.03 for 30).

    Each pixel cut into more than 256 copies of itself maps nothing new and only multiplies
    memory and time (10^12 pixels for a small region). The sensor table's resolution is the
    reference: items' own ``proj:transform`` may describe a thumbnail. Grids in degrees are not
    compared (their units are not the table's metres).
    """
    axes = CRS.from_epsg(epsg).axis_info
    if not axes or axes[0].unit_name not in ("metre", "meter"):
        return
    if min(res) < sensor.resolution / _MAX_OVERSAMPLING:
        raise GridError(
            f"resolution {min(res):g} m is finer than 1/{_MAX_OVERSAMPLING:g} of the {sensor.name} pixel "
            f"({sensor.resolution:g} m); give --resolution (resolution=) in metres, e.g. {sensor.resolution:g}"
        )


def grid_for_items(
    meta: Sequence[Mapping[str, Any]],
    *,
    crs: Any = None,
    resolution: float | tuple[float, float] | None = None,
    bounds: Sequence[float] | None = None,
    bbox: Sequence[float] | None = None,
) -> tuple[int, tuple[float, float], tuple[float, float, float, float]]:
    """Choose ``(epsg, (res_x, res_y), (left, bottom, right, top))`` for a set of items.

    Bounds from ``bbox`` or from the items are snapped outward onto the pixel grid of the items themselves (Landsat UTM
    grids have edges at 15 m past a multiple of 30 m), so pixels are copied, not resampled,
    when the target CRS is the items' own.
    """
    if crs is not None:
        epsg = _parse_crs(crs)
    else:
        counts = Counter(m["epsg"] for m in meta if m["epsg"] is not None)
        if not counts:
            raise LoadError("the items state no CRS (proj:epsg/proj:code); pass crs='EPSG:NNNN'")
        epsg = counts.most_common(1)[0][0]
    if resolution is None:
        resolution = get_option("resolution") or get_sensor("landsat-c2-l2").resolution
    if isinstance(resolution, (int, float)):
        res = (float(resolution), float(resolution))
    else:
        res = (float(resolution[0]), float(resolution[1]))
    if not all(math.isfinite(r) and r > 0 for r in res):
        raise LoadError(f"resolution must be positive metres (or CRS units), got {resolution!r}")

    anchor = (0.0, 0.0)
    for m in meta:
        t = m.get("transform")
        if m.get("epsg") == epsg and t and len(t) >= 6:
            anchor = (float(t[2]) % res[0], float(t[5]) % res[1])
            break

    if bounds is not None:
        left, bottom, right, top = (float(v) for v in bounds)
        if not (left < right and bottom < top):
            raise LoadError(f"bounds {tuple(bounds)} are empty; order is (left, bottom, right, top)")
        # Explicit bounds define the grid: use them as given.
        return epsg, res, (left, bottom, right, top)
    if bbox is not None:
        left, bottom, right, top = project_bbox(bbox, epsg)
    else:
        boxes = []
        for m in meta:
            t, shape = m.get("transform"), m.get("shape")
            if m.get("epsg") == epsg and t and shape:
                x0, y0 = float(t[2]), float(t[5])
                x1, y1 = x0 + float(t[0]) * shape[1], y0 + float(t[4]) * shape[0]
                boxes.append((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
            elif m.get("bbox"):
                b = m["bbox"]
                boxes.append(project_bbox((b[0], b[1], b[-2], b[-1]), epsg))
        if not boxes:
            raise LoadError("cannot tell where the items are (no proj:transform/shape, no bbox); pass bounds=")
        left = min(b[0] for b in boxes)
        bottom = min(b[1] for b in boxes)
        right = max(b[2] for b in boxes)
        top = max(b[3] for b in boxes)
    if not (left < right and bottom < top):
        raise LoadError(f"empty bounds {(left, bottom, right, top)}; check bbox/bounds order (W S E N)")

    def snap_down(v: float, r: float, a: float) -> float:
        return math.floor(round((v - a) / r, 6)) * r + a

    def snap_up(v: float, r: float, a: float) -> float:
        return math.ceil(round((v - a) / r, 6)) * r + a

    snapped = (
        snap_down(left, res[0], anchor[0]),
        snap_down(bottom, res[1], anchor[1]),
        snap_up(right, res[0], anchor[0]),
        snap_up(top, res[1], anchor[1]),
    )
    return epsg, res, snapped


def _scale_and_mask(dn: Sequence[Any], nodata: Sequence[float | None], scale: np.ndarray, offset: np.ndarray,
                    qa: Any, radsat: Any, sensor: Sensor, bands: Sequence[str], mask_flags: Sequence[str]) -> Any:
    """Reflectance (time, band, y, x) from per-band DN arrays through :func:`icemap.kernels.scale_mask`.

    One task per band block, reading the DN block, the QA_PIXEL block and the QA_RADSAT block
    of the same scene and place, and writing the masked reflectance in one pass: no rechunk of
    the asset axis (which would copy every band into a merged block) and no float temporaries.
    ``dn[j]`` is float32 with NaN where nothing was read (``nodata[j]`` None), or integers as
    read with ``nodata[j]`` there.
    """
    qa_bits = int(_qa_bits(mask_flags)) if qa is not None else 0
    per_band = []
    for j, band in enumerate(bands):
        number = sensor.band(band).number
        # QA_RADSAT bit n-1 flags band n; bands without a number (or above 11) have no bit.
        sat_bits = (1 << (int(number) - 1)) if radsat is not None and number and 1 <= number <= 11 else 0
        sc = da.from_array(scale[:, j], chunks=1)
        of = da.from_array(offset[:, j], chunks=1)
        args: list[Any] = [dn[j], "tyx", sc, "t", of, "t"]
        args += [qa, "tyx"] if qa is not None else [None, None]
        args += [radsat, "tyx"] if radsat is not None and sat_bits else [None, None]
        per_band.append(da.blockwise(
            _scale_mask_block, "tyx", *args, qa_bits=qa_bits, sat_bits=sat_bits, nodata=nodata[j],
            dtype=np.float32, meta=np.empty((0, 0, 0), np.float32),
        ))
    return da.stack(per_band, axis=1)


def _scale_mask_block(dn: np.ndarray, scale: np.ndarray, offset: np.ndarray, qa: np.ndarray | None,
                      radsat: np.ndarray | None, *, qa_bits: int, sat_bits: int, nodata: float | None) -> np.ndarray:
    return kernels.scale_mask(dn, scale, offset, qa=qa, qa_bits=qa_bits, radsat=radsat, sat_bits=sat_bits,
                              nodata=nodata)


def _qa_bits(flags: Sequence[str]) -> int:
    """The QA_PIXEL bits of ``flags`` as one integer (validates the names)."""
    return qa_flag_bits(flags)


def _group_key(m: Mapping[str, Any]) -> tuple[Any, ...]:
    # Same UTC day and same WRS path (and platform): consecutive rows of one overpass.
    # Items without a path are grouped by day and platform only.
    return (m["datetime"].date(), m["platform"], m["wrs_path"])


def resolve_engine(engine: str | None) -> Literal["odc-stac", "stackstac"]:
    """The loader engine to use: ``engine``, else the ``engine`` option; ``"auto"`` is odc-stac.

    stackstac comes with the ``icemap[stackstac]`` extra (it pins pandas < 3): choosing it
    without it installed is a :class:`~icemap.errors.MissingExtraError` naming the extra.
    """
    name = resolve("engine", engine)
    if name == "stackstac":
        require("stackstac", "engine='stackstac' (CLI --engine stackstac)")
        return "stackstac"
    return "odc-stac"


@dataclass
class _Read:
    """What an engine read: per-asset lazy arrays (time, y, x) on the grid, for the items kept."""

    clean: list[dict[str, Any]]
    meta: list[dict[str, Any]]
    assets: dict[str, Any]
    #: Per band: the DN value that means "not read" (masked in the kernel), or None.
    nodata: list[float | None]
    y: np.ndarray
    x: np.ndarray


def _read_stackstac(clean: list[dict[str, Any]], meta: list[dict[str, Any]], sensor: Sensor, bands: list[str],
                    assets: list[str], epsg: int, res: tuple[float, float], bnds: tuple[float, float, float, float],
                    chunksize: int, signer: Any, on_error: OnError) -> _Read:
    """stackstac: one float32 stack of every asset (NaN where nothing was read)."""
    import stackstac

    from icemap.reader_stackstac import IcemapReader

    reader = functools.partial(IcemapReader, signer=signer, on_error=on_error)
    stack = stackstac.stack(
        clean,
        assets=assets,
        epsg=epsg,
        resolution=res,
        bounds=bnds,
        snap_bounds=False,
        dtype=np.dtype("float32"),
        fill_value=np.float32(np.nan),
        # stackstac refuses float32 rescaling (2.75e-5 is not exact in float32); scale here.
        rescale=False,
        chunksize=(1, 1, chunksize, chunksize),
        sortby_date=False,
        xy_coords="center",
        properties=False,
        band_coords=False,
        reader=reader,
        gdal_env=stackstac.DEFAULT_GDAL_ENV.updated(always=GDAL_RETRY),
    )
    clean, meta = match_stacked(stack, clean, meta, assets, epsg, bnds)
    nb = len(bands)
    has_qa = _QA in assets
    stack = translate_class_qa(stack, sensor, nb) if has_qa else stack
    data = stack.data
    arrays = {name: data[:, k] for k, name in enumerate(assets)}
    return _Read(clean, meta, arrays, [_band_nodata(clean, b) for b in bands], stack["y"].values, stack["x"].values)


def _band_nodata(clean: Sequence[Mapping[str, Any]], band: str) -> float | None:
    """The one finite nodata value every item states for ``band`` (raster:bands, else the
    sensor table), or None where they disagree or state NaN/none.

    Both engines mask it in the kernel: files often lack a nodata tag (the sample region's, many
    exports), and a DN 0 read as a valid reflectance of -0.2 would then win a mosaic.
    """
    values = [it["assets"][band]["raster:bands"][0].get("nodata") for it in clean if band in it["assets"]]
    if not values or any(v is None for v in values):
        return None
    distinct = {float(v) for v in values}
    if len(distinct) != 1:
        return None
    value = distinct.pop()
    return value if math.isfinite(value) else None


def _odc_band_dtype(sensor: Sensor, band: str, nodata: float | None) -> str:
    """The type odc-stac reads a band in: the table's integer type where ``nodata`` fits it (and
    marks "not read"), else float32 with NaN."""
    dtype = np.dtype(sensor.band(band).dtype)
    if nodata is not None and dtype.kind in "iu" and nodata.is_integer() \
            and np.iinfo(dtype).min <= nodata <= np.iinfo(dtype).max:
        return dtype.name
    return "float32"


def _read_odc(clean: list[dict[str, Any]], meta: list[dict[str, Any]], sensor: Sensor, bands: list[str],
              assets: list[str], epsg: int, res: tuple[float, float], bnds: tuple[float, float, float, float],
              chunksize: int, signer: Any, on_error: OnError) -> _Read:
    """odc-stac: one dask array per asset, DNs in their native integer type, through icemap's driver.

    Items are grouped by index (one time step each, in icemap's order: mosaics are icemap's),
    onto exactly icemap's grid (an explicit GeoBox, so odc-stac's own anchoring never applies).
    QA_PIXEL is read as uint16 with :data:`QA_FILL` where nothing was read, QA_RADSAT as uint16
    with 0 (no saturation), a class-valued QA band (SCL) as float32 with NaN, as stackstac does.
    """
    clean, meta = keep_overlapping(clean, meta, epsg, bnds)
    width, height = check_grid(epsg, res, bnds)
    left, _, _, top = bnds
    geobox = GeoBox((height, width), Affine(res[0], 0.0, left, 0.0, -res[1], top), f"EPSG:{epsg}")

    read_as: dict[str, tuple[str, float | None]] = {}
    for band in bands:
        nodata = _band_nodata(clean, band)
        dtype = _odc_band_dtype(sensor, band, nodata)
        read_as[band] = (dtype, nodata if dtype != "float32" else None)
    if _QA in assets:
        read_as[_QA] = ("float32", math.nan) if sensor.qa_classes else ("uint16", float(QA_FILL))
    if _RADSAT in assets:
        read_as[_RADSAT] = ("uint16", 0.0)

    items = []
    for it in clean:
        d = dict(it, stac_extensions=[_PROJ_EXT, _RASTER_EXT])
        props = dict(d["properties"])
        if props.get("proj:epsg") is not None:
            props["proj:code"] = f"EPSG:{props.pop('proj:epsg')}"
        d["properties"] = props
        new_assets = {}
        for name, asset in it["assets"].items():
            if name not in read_as:
                continue  # QA_RADSAT when saturation is not masked
            a = dict(asset)
            if a.get("proj:epsg") is not None:
                a["proj:code"] = f"EPSG:{a.pop('proj:epsg')}"
            dtype, nodata = read_as[name]
            # odc-stac fills what it does not read with the asset's nodata, in this type.
            a["raster:bands"] = [{"data_type": dtype, "nodata": nodata if nodata is not None else "nan"}]
            new_assets[name] = a
        d["assets"] = new_assets
        items.append(pystac.Item.from_dict(d, preserve_dict=False))

    def odc_load(selected: list[Any], names: list[str]) -> Any:
        return odc.stac.load(
            selected,
            bands=names,
            geobox=geobox,
            groupby="id",  # one time step per item, in the order given
            preserve_original_order=True,
            # Each band's type comes from its raster:bands data_type above (odc-stac 0.5's dtype=
            # mapping trips its own chunk resolution).
            chunks={"time": 1, "y": chunksize, "x": chunksize},
            resampling="nearest",
            # Never overviews: they hold averaged DNs (and averaged QA bit fields, which mean
            # nothing); a coarser grid takes the nearest full-resolution pixel, as stackstac does.
            use_overviews=False,
            driver=IcemapDriver(signer, on_error),
            fail_on_error=True,
        )

    if all(name in it["assets"] for it in clean for name in assets):
        ds = odc_load(items, list(assets))
        arrays = {name: ds[name].data for name in assets}
    else:
        # odc-stac learns a collection's bands from its first item: with an asset missing from
        # some items, each asset is read from the items that hold it, and the others get a
        # step of fill (nodata), as stackstac gives them.
        arrays = {}
        for name in assets:
            idx = [i for i, it in enumerate(clean) if name in it["assets"]]
            dtype, nodata = read_as[name]
            fill = math.nan if nodata is None else nodata
            if not idx:  # only items outside the grid held it
                arrays[name] = da.full((len(clean), height, width), fill, dtype=dtype,
                                       chunks=(1, chunksize, chunksize))
                continue
            part = odc_load([items[i] for i in idx], [name])
            pos = {i: k for k, i in enumerate(idx)}
            blank = da.full((1, height, width), fill, dtype=dtype, chunks=(1, chunksize, chunksize))
            arrays[name] = da.concatenate(
                [part[name].data[pos[i]:pos[i] + 1] if i in pos else blank for i in range(len(clean))], axis=0)
    if _QA in arrays:
        arrays[_QA] = class_qa_to_bits(arrays[_QA], sensor)
    band_nodata = [read_as[b][1] if read_as[b][0] != "float32" else _band_nodata(clean, b) for b in bands]
    coords = xr_coords(geobox)  # pixel centres, as odc-stac labels its arrays
    return _Read(clean, meta, arrays, band_nodata, coords["y"].values, coords["x"].values)


_PROJ_EXT = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
_RASTER_EXT = "https://stac-extensions.github.io/raster/v1.1.0/schema.json"


def _check_load_args(on_error: str, qa: str | None, chunksize: int | None) -> int:
    """Validate the plain arguments of :func:`load` and return the chunk edge in pixels.

    Checked before anything is read or allocated: each Zarr write allocates whole chunks, so a
    wrong ``chunksize`` must stop here, not on a worker.
    """
    if on_error not in ("raise", "nodata"):
        raise LoadError(f"on_error must be 'raise' or 'nodata', got {on_error!r}")
    if chunksize is None:
        chunksize = get_option("chunksize")
    if isinstance(chunksize, bool) or not isinstance(chunksize, int) or not 16 <= chunksize <= 8192:
        # Checked before anything is allocated: each Zarr write allocates whole chunks.
        raise LoadError(f"chunksize {chunksize!r} (CLI --chunksize) must be an integer in 16..8192 pixels; "
                        "1024 (the default) suits most clusters")
    if qa not in ("qa_pixel", None):
        raise LoadError(f"qa must be 'qa_pixel' or None (no QA band, no cloud mask), got {qa!r}")
    return chunksize


def _normalise_step(items: Iterable[Any], sensor: str | Sensor | None, bands: Sequence[str] | None,
                    mask_flags: Sequence[str], *, use_qa: bool) -> tuple[list[dict[str, Any]], Sensor, list[str],
                                                                   list[dict[str, Any]], list[dict[str, Any]]]:
    """Items as dicts in time order, the sensor table, the validated bands, and the normalised items.

    The sensor defaults to the first item's collection; the QA flag names are validated here too,
    before any graph is built. Returns ``(items, sensor, bands, clean, meta)``.
    """
    item_list = [_as_dict(it) for it in items]
    if not item_list:
        raise EmptySearchError("no items to load; widen the search (bbox, datetime, max cloud)")
    if sensor is None:
        sensor = item_list[0].get("collection") or "landsat-c2-l2"
    sensor_t = get_sensor(sensor)
    if bands is None:
        bands = default_bands(item_list, sensor_t)
    band_list = list(sensor_t.validate_bands(bands))
    if sensor_t.qa_bits:
        _qa_bits(mask_flags)  # validates flag names now, before any graph is built
    item_list.sort(key=lambda it: (item_datetime(it), it.get("id", "")))
    clean, meta = normalise_items(item_list, sensor_t, band_list, use_qa=use_qa)
    return item_list, sensor_t, band_list, clean, meta


def _warn_no_qa(n_items: int) -> None:
    """Say that ``qa=None`` leaves clouds unmasked (a :class:`NoQAWarning` at the caller of load)."""
    warnings.warn(
        f"qa=None: {n_items} item(s) are loaded without a QA band, so clouds, cloud shadows "
        "and cirrus are NOT masked (only nodata DNs are); the cube records cloud_masked=0",
        NoQAWarning,
        stacklevel=3,  # the caller of icemap.load
    )


def _load_grid(item_list: list[dict[str, Any]], meta: list[dict[str, Any]], sensor_t: Sensor, *, crs: Any,
               resolution: float | tuple[float, float] | None, bounds: Sequence[float] | None,
               bbox: Sequence[float] | None, chunksize: int) -> tuple[int, tuple[float, float], Any]:
    """Choose the output grid (EPSG, pixel size, snapped bounds) and check it is sane.

    Warns when the items span several CRSs and the caller left the grid to icemap, so a mixed
    result is never silent.
    """
    if bbox is not None and bounds is None:
        check_bbox_hits_footprints(item_list, bbox)
    if resolution is None:
        resolution = get_option("resolution") or sensor_t.resolution
    epsg, res, bnds = grid_for_items(meta, crs=crs, resolution=resolution, bounds=bounds, bbox=bbox)
    _check_oversampling(epsg, res, sensor_t)
    check_grid(epsg, res, bnds, chunksize)
    warn_mixed_crs(meta, epsg, res, bnds, crs_given=crs is not None, extent_given=bbox is not None or bounds is not None)
    return epsg, res, bnds


def _read_pixels(clean: list[dict[str, Any]], meta: list[dict[str, Any]], sensor_t: Sensor, bands: list[str],
                 epsg: int, res: tuple[float, float], bnds: Any, chunksize: int, signer_fn: Any, on_error: OnError,
                 *, engine: str, mask_saturated: bool) -> tuple[_Read, bool, bool]:
    """Read the bands and the QA/RADSAT assets lazily with the chosen engine onto the grid.

    Returns what the engine read and whether a QA band and a RADSAT band are among it.
    """
    has_qa = any(_QA in it["assets"] for it in clean)
    has_radsat = mask_saturated and any(_RADSAT in it["assets"] for it in clean)
    assets = bands + ([_QA] if has_qa else []) + ([_RADSAT] if has_radsat else [])
    stacker = _read_stackstac if engine == "stackstac" else _read_odc
    read = stacker(clean, meta, sensor_t, bands, assets, epsg, res, bnds, chunksize, signer_fn, on_error)
    return read, has_qa, has_radsat


def _masked_reflectance(read: _Read, sensor_t: Sensor, bands: list[str],
                        mask_flags: Sequence[str]) -> tuple[Any, Any]:
    """Scale DNs to reflectance, mask by QA/RADSAT in the kernel layer, and give the uint16 QA."""
    scale, offset = _scale_offset_table(read.clean, bands)
    qa_raw = read.assets.get(_QA)
    refl = _scale_and_mask([read.assets[b] for b in bands], read.nodata, scale, offset, qa_raw,
                           read.assets.get(_RADSAT), sensor_t, bands, mask_flags)
    return refl, _qa_uint16(qa_raw, refl)


def _scale_offset_table(clean: Sequence[Mapping[str, Any]], bands: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per (item, band) scale and offset from each asset's ``raster:bands`` (normalised earlier)."""
    scale = np.ones((len(clean), len(bands)), dtype=np.float32)
    offset = np.zeros((len(clean), len(bands)), dtype=np.float32)
    for i, it in enumerate(clean):
        for j, band in enumerate(bands):
            rb = it["assets"].get(band, {}).get("raster:bands", [{}])[0]
            scale[i, j] = rb.get("scale", 1.0)
            offset[i, j] = rb.get("offset", 0.0)
    return scale, offset


def _qa_uint16(qa_raw: Any, refl: Any) -> Any:
    """The QA_PIXEL array as uint16: read, converted from another dtype, or derived from reflectance.

    Without a QA band (``qa=None`` or HLS without Fmask) the QA layer is built from the
    reflectance itself so that fill pixels stay marked as fill.
    """
    if qa_raw is None:
        return da.map_blocks(kernels.qa_from_reflectance, refl, drop_axis=1, dtype=np.uint16)
    if qa_raw.dtype == np.uint16:
        return qa_raw  # read as uint16 with QA_FILL where nothing was read
    return da.map_blocks(kernels.qa_to_uint16, qa_raw, dtype=np.uint16)


def _mosaic_steps(refl: Any, qa: Any, meta: list[dict[str, Any]], mosaic: bool,
                  nb: int) -> tuple[Any, Any, list[list[int]]]:
    """Merge scenes of one day and WRS path into one time step each (first valid pixel wins).

    Returns the stacked reflectance and QA arrays and, per time step, the item indices merged.
    """
    groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for i, m in enumerate(meta):
        groups[_group_key(m) if mosaic else (i,)].append(i)
    order = sorted(groups.values(), key=lambda idx: (meta[idx[0]]["datetime"], idx[0]))
    refl_steps, qa_steps = [], []
    for idx in order:
        if len(idx) == 1:
            refl_steps.append(refl[idx[0]])
            qa_steps.append(qa[idx[0]])
            continue
        # One task per spatial block takes every band and the QA of every scene of the day
        # (blockwise contracts the band axis: its blocks arrive concatenated) and returns the
        # merged bands with QA last. Concatenating and rechunking the scenes first gave the
        # same pixels through 4 tasks per output chunk on top of the reads (now 2.6); the
        # sample region's cube (one such day of three) went from 1381 to 1037 tasks.
        scenes: list[Any] = []
        for i in idx:
            scenes += [refl[i], "byx", qa[i], "yx"]
        merged = da.blockwise(
            _mosaic_block, "cyx", *scenes, new_axes={"c": nb + 1}, concatenate=True, n_bands=nb,
            dtype=np.float32, meta=np.empty((0, 0, 0), np.float32),
        )
        refl_steps.append(merged[:nb].rechunk({0: 1}))
        qa_steps.append(merged[nb].astype(np.uint16))
    return da.stack(refl_steps), da.stack(qa_steps), order


def _mosaic_block(*blocks: np.ndarray, n_bands: int) -> np.ndarray:
    """One spatial block of a several-scene day: ``blocks`` are each scene's bands ``(band, y, x)``
    and QA ``(y, x)``, alternating, in scene order; returns ``(band + 1, y, x)``, QA last, as
    :func:`icemap.kernels.mosaic_first_valid` merges them (QA is exact in float32: 16 bits)."""
    stacked = np.stack([np.concatenate([refl, qa[None].astype(np.float32)])
                        for refl, qa in zip(blocks[::2], blocks[1::2], strict=True)])
    return kernels.mosaic_first_valid(stacked, n_bands)


def _wrap_cube(refl_out: Any, qa_out: Any, order: list[list[int]], meta: list[dict[str, Any]], read: _Read,
               bands: list[str], sensor_t: Sensor, mask_flags: Sequence[str], *, has_radsat: bool, has_qa: bool,
               epsg: int, res: tuple[float, float]) -> Any:
    """Wrap the arrays as the ``xarray.Dataset`` :func:`load` returns, CRS and transform written."""
    times = np.array(
        [np.datetime64(meta[idx[0]]["datetime"].replace(tzinfo=None), "ns") for idx in order]
    )
    ids = [",".join(meta[i]["id"] for i in idx) for idx in order]
    coords = {
        "time": times,
        "band": np.array(bands, dtype=str),
        "y": read.y,
        "x": read.x,
        "item_ids": ("time", np.array(ids, dtype=str)),
        "platform": ("time", np.array([meta[idx[0]]["platform"] for idx in order], dtype=str)),
    }
    ds = xr.Dataset(
        {
            "reflectance": (("time", "band", "y", "x"), refl_out, {
                "long_name": "surface reflectance",
                "units": "1",
                "scale_offset_applied": "per asset raster:bands, else sensor table",
            }),
            "qa_pixel": (("time", "y", "x"), qa_out, {
                "long_name": "Landsat Collection 2 QA_PIXEL bit field",
                "flag_masked_on_load": ",".join(mask_flags),
            }),
        },
        coords=coords,
        attrs={
            "sensor": sensor_t.name,
            "mask_flags": list(mask_flags),
            "mask_saturated": bool(has_radsat),
            # 1 when a QA band masked clouds; 0 for qa=None or sensors without one (HLS).
            "cloud_masked": int(has_qa),
        },
    )
    ds = ds.rio.write_crs(f"EPSG:{epsg}")
    # From the grid itself, not recalculated from coordinates: a grid one pixel wide or high has
    # no coordinate spacing to measure, and rioxarray then assumes 1 unit (1 m2 pixel areas).
    x0, y0 = float(read.x[0]), float(read.y[0])
    return ds.rio.write_transform(Affine(res[0], 0.0, x0 - res[0] / 2, 0.0, -res[1], y0 + res[1] / 2))


def load(
    items: Iterable[pystac.Item | Mapping[str, Any]],
    *,
    bands: Sequence[str] | None = None,
    sensor: str | Sensor | None = None,
    crs: str | int | pyproj.CRS | None = None,
    resolution: float | tuple[float, float] | None = None,
    bounds: Sequence[float] | None = None,
    bbox: Sequence[float] | None = None,
    chunksize: int | None = None,
    mask_flags: Sequence[str] = MASK_FLAGS_DEFAULT,
    mask_saturated: bool = True,
    mosaic: bool = True,
    signer: Signer | str | None = None,
    on_error: OnError = "raise",
    qa: Literal["qa_pixel"] | None = "qa_pixel",
    engine: Engine | None = None,
) -> xr.Dataset:
    """Turn STAC items into a lazy ``xarray.Dataset`` of masked surface reflectance.

    Parameters
    ----------
    items
        Item dicts or ``pystac.Item`` objects, e.g. ``icemap.search(...).items()``.
    bands
        Common band names; default the sensor's reflective bands that the items hold (one
        :class:`~icemap.errors.MissingAssetWarning` names the others). Only the default method's
        bands (NDSI: green, swir16) are required, so partial products load.
    sensor
        Sensor table name or collection id; default from the items' collection.
    crs
        Target CRS (anything pyproj reads); default the items' most common CRS.
    resolution
        Pixel size in CRS units, or ``(x, y)``; default the sensor's (30 m Landsat/HLS, 20 m
        Sentinel-2).
    bounds, bbox
        Output extent, either in the target CRS (``bounds``) or in lon/lat (``bbox``);
        default the union of the items. Snapped onto the items' pixel grid.
    chunksize
        Spatial chunk edge in pixels; default the ``chunksize`` option (1024). Each chunk
        holds one band of one scene, the unit a worker reads from one COG, and the Zarr chunk
        the store writes.
    mask_flags
        QA_PIXEL flags that become NaN. Snow/ice is deliberately not among the defaults.
    mask_saturated
        Also mask, band by band, pixels that QA_RADSAT marks saturated.
    mosaic
        Merge scenes of the same day and WRS path into one time step.
    signer
        ``"planetary-computer"``, ``"module:function"`` or a module-level callable that signs
        an href; applied by each worker when it opens a file.
    on_error
        ``"raise"`` stops on an unreadable asset; ``"nodata"`` warns and fills it with NaN.
    qa
        ``"qa_pixel"`` (default): mask with the sensor's QA band (QA_PIXEL; SCL for
        Sentinel-2). ``None``: use no QA band, for scenes shipped without one: nothing is
        cloud-masked (only nodata DNs become NaN), a :class:`~icemap.errors.NoQAWarning` says
        so, and the cube records it (attribute ``cloud_masked = 0``).
    engine
        The loader engine that reads the pixels: ``"odc-stac"``, ``"stackstac"`` (needs the
        ``icemap[stackstac]`` extra) or ``"auto"`` (odc-stac); default the ``engine`` option.
        Both give the same cube: values, QA, grid, time steps and attributes.

    Returns
    -------
    xarray.Dataset
        ``reflectance`` float32 (time, band, y, x) and ``qa_pixel`` uint16 (time, y, x), on
        pixel-centre ``x``/``y`` coordinates, with ``spatial_ref`` holding the CRS and
        ``item_ids`` per time step.
    """
    import icemap.accessor  # noqa: F401  (registers cube.icemap)

    chunksize = _check_load_args(on_error, qa, chunksize)
    engine_name = resolve_engine(engine)
    # 1. normalise
    item_list, sensor_t, bands, clean, meta = _normalise_step(items, sensor, bands, mask_flags, use_qa=qa is not None)
    signer_fn = resolve_signer(signer)
    # 2. grid
    epsg, res, bnds = _load_grid(item_list, meta, sensor_t, crs=crs, resolution=resolution, bounds=bounds,
                                 bbox=bbox, chunksize=chunksize)
    if qa is None:
        _warn_no_qa(len(clean))
    # 3. read
    read, has_qa, has_radsat = _read_pixels(clean, meta, sensor_t, bands, epsg, res, bnds, chunksize, signer_fn,
                                            on_error, engine=engine_name, mask_saturated=mask_saturated)
    # 4. scale and mask
    refl, qa_arr = _masked_reflectance(read, sensor_t, bands, mask_flags)
    # 5. mosaic
    refl_out, qa_out, order = _mosaic_steps(refl, qa_arr, read.meta, mosaic, len(bands))
    # 6. wrap
    return _wrap_cube(refl_out, qa_out, order, read.meta, read, bands, sensor_t, mask_flags,
                      has_radsat=has_radsat, has_qa=has_qa, epsg=epsg, res=res)
