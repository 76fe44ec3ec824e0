"""Finding scenes: one search over STAC APIs, static catalogs and item files.

:func:`search` validates its parameters at once and does no I/O; iterating the returned
:class:`Search` (or calling :meth:`Search.items`) talks to the catalog. The same filters apply to
every kind of source. A STAC API filters collections, datetime and the area (``bbox`` or an
``intersects`` geometry) itself, and cloud cover and platform too where its conformance classes
say it can: CQL2 ``filter`` first, else the ``query`` extension (checked with pystac-client on
the API's landing page). Where it cannot (a plain item-search API such as rustac's in-memory
server, which would answer such a request with no items at all), they are filtered here, as
for static catalogs and item files; icemap re-checks them here in every case.

URL signing (e.g. Planetary Computer's SAS tokens) is *not* done here: items keep their plain
hrefs, and the loader signs each URL only when a worker opens it, so no token ends up in a dask
graph, a log or a store's attributes.
"""

from __future__ import annotations

import calendar
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pystac
import rasterio
import requests
from pyproj import CRS
from pyproj.exceptions import CRSError
from pystac_client import Client
from pystac_client.conformance import ConformanceClasses
from pystac_client.exceptions import APIError
from pystac_client.stac_api_io import StacApiIO
from rasterio.errors import RasterioError
from rasterio.warp import transform_bounds
from shapely.errors import GEOSException
from shapely.geometry import box, mapping, shape
from shapely.ops import unary_union
from urllib3 import Retry

from icemap.checks import user_scale_offset
from icemap.errors import CatalogError, SearchError
from icemap.redact import redact
from icemap.retry import STAC_BACKOFF_S, STAC_RETRIES, STAC_RETRY_STATUS, STAC_TIMEOUT_S

if TYPE_CHECKING:  # pragma: no cover
    import shapely.geometry.base

__all__ = ["Search", "search", "parse_bbox", "parse_intersects", "parse_datetime", "item_datetime", "item_from_files",
           "property_filters", "STAC_TIMEOUT_S", "STAC_RETRIES", "STAC_BACKOFF_S", "STAC_RETRY_STATUS"]

Bbox = tuple[float, float, float, float]
Item = dict[str, Any]



def parse_bbox(bbox: Sequence[float] | str | None) -> Bbox | None:
    """Validate a lon/lat bounding box ``(west, south, east, north)``.

    Accepts a sequence of four numbers or a string ``"W,S,E,N"``. A box crossing the
    antimeridian has west > east, as in the STAC API spec (``170,-80,-170,-70``).
    """
    if bbox is None:
        return None
    if isinstance(bbox, str):
        parts = [p for p in re.split(r"[,\s]+", bbox.strip()) if p]
    else:
        parts = list(bbox)
    try:
        w, s, e, n = (float(v) for v in parts)
    except (TypeError, ValueError):
        raise SearchError(
            f"bbox must be four numbers WEST SOUTH EAST NORTH in degrees, got {bbox!r}"
        ) from None
    if not all(math.isfinite(v) for v in (w, s, e, n)):
        raise SearchError(f"bbox values must be finite numbers, got {bbox!r}")
    if not (-180 <= w <= 180 and -180 <= e <= 180 and -90 <= s <= 90 and -90 <= n <= 90):
        raise SearchError(
            f"bbox {bbox!r} is outside lon [-180, 180] / lat [-90, 90]; "
            "give it in degrees as WEST SOUTH EAST NORTH"
        )
    if s >= n:
        raise SearchError(f"bbox south ({s}) must be less than north ({n}); order is W S E N")
    if w == e:
        raise SearchError(
            f"bbox west and east are both {w}: the box has no width; order is W S E N "
            "(west > east crosses the antimeridian)"
        )
    return (w, s, e, n)


_PARTIAL = re.compile(r"^(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?$")


def _parse_instant(text: str, *, end: bool) -> datetime | None:
    text = text.strip()
    if text in ("", ".."):
        return None
    m = _PARTIAL.match(text)
    if m:
        # A year, month or day stands for the whole period: the start of it for a range's
        # start, the end of it for a range's end (as pystac-client does).
        year, month, day = int(m[1]), int(m[2] or 0), int(m[3] or 0)
        try:
            if not end:
                return datetime(year, month or 1, day or 1, tzinfo=timezone.utc)
            month_e = month or 12
            day_e = day or calendar.monthrange(year, month_e)[1]
            return datetime(year, month_e, day_e, 23, 59, 59, 999999, tzinfo=timezone.utc)
        except ValueError as exc:
            raise SearchError(f"invalid date {text!r}: {exc}") from None
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise SearchError(
            f"cannot read {text!r} as a date; use ISO 8601 such as 2021-02-01, "
            "2021-02-01T10:00:00Z, or a range START/END (either side may be '..')"
        ) from None
    # A stated UTC offset is converted, not dropped: 10:00+05:00 is 05:00 UTC, and every
    # datetime icemap keeps (cube time, search range) is UTC.
    return dt.astimezone(timezone.utc) if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def parse_datetime(value: str | None) -> tuple[datetime | None, datetime | None] | None:
    """Parse ``START/END``, a single date, or a partial date (``2021``, ``2021-02``).

    Returns ``(start, end)`` in UTC, either of which may be None for an open range.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise SearchError(f"datetime must be a string such as 2021-01-01/2021-12-31, got {value!r}")
    parts = value.split("/")
    if len(parts) == 1:
        start, end = _parse_instant(parts[0], end=False), _parse_instant(parts[0], end=True)
    elif len(parts) == 2:
        start, end = _parse_instant(parts[0], end=False), _parse_instant(parts[1], end=True)
    else:
        raise SearchError(f"datetime {value!r} has more than one '/'; use START/END")
    if start is None and end is None:
        raise SearchError("datetime '../..' is open at both ends; leave it out instead")
    if start and end and start > end:
        raise SearchError(f"datetime range {value!r} ends before it starts")
    return (start, end)


def _format_range(rng: tuple[datetime | None, datetime | None]) -> str:
    def fmt(d: datetime | None) -> str:
        return ".." if d is None else d.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    return f"{fmt(rng[0])}/{fmt(rng[1])}"


def item_datetime(item: Mapping[str, Any]) -> datetime:
    """The acquisition time of an item dict (``datetime``, else ``start_datetime``), in UTC."""
    props = item.get("properties", {})
    text = props.get("datetime") or props.get("start_datetime")
    if not text:
        raise CatalogError(f"item {item.get('id')!r} has no datetime or start_datetime")
    dt = _parse_instant(text, end=False)
    if dt is None:  # pragma: no cover - '..' is not a valid item datetime
        raise CatalogError(f"item {item.get('id')!r} has an open datetime")
    return dt


def _is_url(text: str) -> bool:
    return urlparse(text).scheme in ("http", "https")


@dataclass(frozen=True)
class Search:
    """A validated search, not yet run. Iterate it (or call :meth:`items`) to fetch items.

    Build it with :func:`search`; its fields are the normalised parameters and are recorded
    in the provenance of the cubes made from its items.
    """

    catalog: str
    collections: tuple[str, ...] | None = None
    bbox: Bbox | None = None
    datetime: str | None = None
    max_cloud: float | None = None
    platforms: tuple[str, ...] | None = None
    max_items: int | None = None
    #: A lon/lat GeoJSON geometry the items must intersect (instead of ``bbox``).
    intersects: Mapping[str, Any] | None = field(default=None, compare=False)
    limit: int = 100
    timeout: float = STAC_TIMEOUT_S
    retries: int = STAC_RETRIES
    backoff: float = STAC_BACKOFF_S
    headers: Mapping[str, str] | None = field(default=None, repr=False, compare=False)

    # -- what the search asks for, as plain data (provenance, CLI --json) ------------------
    def parameters(self) -> dict[str, Any]:
        """The search parameters as JSON-ready data (headers are left out: they may hold keys)."""
        return {
            # Stored in cube attributes and shown in reports: without user info or query tokens.
            "catalog": redact(self.catalog),
            "collections": list(self.collections) if self.collections else None,
            "bbox": list(self.bbox) if self.bbox else None,
            "datetime": self.datetime,
            "max_cloud": self.max_cloud,
            "platforms": list(self.platforms) if self.platforms else None,
            "max_items": self.max_items,
            **({"intersects": dict(self.intersects)} if self.intersects is not None else {}),
        }

    @property
    def extent(self) -> Bbox | None:
        """The lon/lat box a cube of this search covers: ``bbox``, or the bounds of ``intersects``."""
        if self.bbox is not None or self.intersects is None:
            return self.bbox

        w, s, e, n = shape(self.intersects).bounds
        return (w, s, e, n)

    # -- I/O ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Item]:
        if _is_url(self.catalog) and not self.catalog.endswith(".json"):
            source = self._api_items()
        else:
            source = (it for it in self._static_items() if self._matches_spatiotemporal(it))
        n = 0
        for item in source:
            if not self._matches_properties(item):
                continue
            yield item
            n += 1
            if self.max_items is not None and n >= self.max_items:
                return

    def items(self) -> list[Any]:
        """Run the search and return the matching items as ``pystac.Item`` objects, oldest first.

        pystac Items are what the ecosystem takes (``odc.stac.load``, ``stackstac.stack``,
        ``pystac.ItemCollection``); :func:`icemap.load` takes them too.
        """
        out = []
        for d in self.item_dicts():
            try:
                item = pystac.Item.from_dict(d, preserve_dict=True)
            except (KeyError, TypeError, ValueError, pystac.STACError) as exc:
                raise CatalogError(f"item {d.get('id')!r} from {self.catalog} is not a valid STAC item: {exc}") from None
            # pystac migrates projection v1 to v2 (proj:epsg -> proj:code); stackstac (0.5) reads
            # only proj:epsg, so keep it beside the code (extra fields are valid STAC).
            for fields in (item.properties, *(a.extra_fields for a in item.assets.values())):
                code = fields.get("proj:code")
                if isinstance(code, str) and code.upper().startswith("EPSG:") and "proj:epsg" not in fields:
                    fields["proj:epsg"] = int(code.split(":", 1)[1])
            out.append(item)
        return out

    def item_dicts(self) -> list[Item]:
        """Run the search and return the matching items as plain dicts (GeoJSON), oldest first."""
        return sorted(self, key=lambda it: (item_datetime(it), it.get("id", "")))

    def _api_items(self) -> Iterator[Item]:
        retry = Retry(
            total=self.retries,
            connect=self.retries,
            read=self.retries,
            status=self.retries,
            backoff_factor=self.backoff,
            status_forcelist=STAC_RETRY_STATUS,
            # POST searches are idempotent reads; retry them like GETs.
            allowed_methods=frozenset({"GET", "POST"}),
            raise_on_status=True,
            respect_retry_after_header=True,
        )
        io = StacApiIO(headers=dict(self.headers or {}), timeout=self.timeout, max_retries=retry)
        rng = parse_datetime(self.datetime) if self.datetime else None
        dt = _format_range(rng) if rng else None
        try:
            client = Client.open(self.catalog, stac_io=io, timeout=self.timeout)
            if not client.conforms_to("ITEM_SEARCH"):
                raise CatalogError(
                    f"{self.catalog} is a STAC catalog without item search; point --catalog at "
                    "its catalog.json to walk it as a static catalog"
                )

            server_side = property_filters(
                self.max_cloud, self.platforms,
                cql2=client.conforms_to(ConformanceClasses.FILTER),
                query=client.conforms_to(ConformanceClasses.QUERY),
            )
            result = client.search(
                collections=list(self.collections) if self.collections else None,
                bbox=list(self.bbox) if self.bbox else None,
                intersects=dict(self.intersects) if self.intersects is not None else None,
                datetime=dt,
                max_items=None,
                limit=self.limit,
                **server_side,
            )
            yield from result.items_as_dicts()
        except (requests.RequestException, APIError) as exc:
            raise CatalogError(
                f"STAC API {self.catalog} failed after {self.retries} retries: "
                f"{_short_reason(exc)}. Check the URL and your network, or raise --retries/--timeout."
            ) from exc

    def _static_items(self) -> Iterator[Item]:
        path = self.catalog
        if _is_url(path):
            yield from _walk_pystac(path, self.collections)
            return
        p = Path(os.path.expanduser(path))
        if not p.exists():
            raise CatalogError(
                f"catalog {path!r} does not exist; give a STAC API URL (https://...), a catalog.json, "
                "an item JSON / FeatureCollection / .ndjson file, or a folder of item JSON files"
            )
        if p.is_dir():
            if (p / "catalog.json").exists() or (p / "collection.json").exists():
                target = p / "catalog.json" if (p / "catalog.json").exists() else p / "collection.json"
                yield from _walk_pystac(str(target), self.collections)
            else:
                for f in sorted(p.glob("*.json")):
                    yield from _items_from_file(f)
            return
        data = _read_json_or_ndjson(p)
        if isinstance(data, Mapping) and data.get("type") in ("Catalog", "Collection"):
            yield from _walk_pystac(str(p), self.collections)
        else:
            yield from _items_from_data(data, p)

    # -- local filters -------------------------------------------------------------------------
    def _matches_spatiotemporal(self, item: Item) -> bool:
        if self.collections and item.get("collection") not in self.collections:
            return False
        if self.bbox is not None and not _intersects(item, self.bbox):
            return False
        if self.intersects is not None and not _intersects_geometry(item, self.intersects):
            return False
        if self.datetime is not None:
            start, end = parse_datetime(self.datetime) or (None, None)
            t = item_datetime(item)
            if (start and t < start) or (end and t > end):
                return False
        return True

    def _matches_properties(self, item: Item) -> bool:
        props = item.get("properties", {})
        if self.max_cloud is not None:
            cc = props.get("eo:cloud_cover")
            # Items that do not state their cloud cover are kept: dropping them would hide
            # scenes silently; the QA mask handles their clouds on load.
            if cc is not None and float(cc) > self.max_cloud:
                return False
        if self.platforms:
            plat = str(props.get("platform", props.get("eo:platform", ""))).lower().replace("_", "-")
            if plat not in self.platforms:
                return False
        return True


def _platform_spellings(platforms: Sequence[str]) -> list[str]:
    """The spellings providers use for each platform (``landsat-8``, USGS ``LANDSAT_8``...):
    an API compares strings exactly, icemap case- and separator-insensitively."""
    out: list[str] = []
    for p in platforms:
        for v in (p, p.upper(), p.replace("-", "_"), p.upper().replace("-", "_"), p.title()):
            if v not in out:
                out.append(v)
    return out


def property_filters(max_cloud: float | None, platforms: Sequence[str] | None, *, cql2: bool,
                     query: bool) -> dict[str, Any]:
    """The server-side form of ``max_cloud`` and ``platforms`` for an API's conformance classes.

    ``cql2`` (the API conforms to item-search#filter): a CQL2-JSON ``filter``; items without
    ``eo:cloud_cover`` are kept (``isNull``), as icemap keeps them locally. ``query`` (the
    query extension): a ``query`` object; it cannot test for a missing property, so there cloud
    cover is left to the local filter, which keeps such items. Neither: ``{}`` (all local).
    """
    if max_cloud is None and not platforms:
        return {}
    if cql2:
        args: list[Any] = []
        if max_cloud is not None:
            cc = {"property": "eo:cloud_cover"}
            args.append({"op": "or", "args": [{"op": "isNull", "args": [cc]}, {"op": "<=", "args": [cc, max_cloud]}]})
        if platforms:
            args.append({"op": "in", "args": [{"property": "platform"}, _platform_spellings(platforms)]})
        return {"filter": args[0] if len(args) == 1 else {"op": "and", "args": args}, "filter_lang": "cql2-json"}
    if query and platforms:
        return {"query": {"platform": {"in": _platform_spellings(platforms)}}}
    return {}


def parse_intersects(geometry: Any) -> dict[str, Any] | None:
    """A lon/lat area as a GeoJSON geometry dict, validated.

    Accepts a GeoJSON geometry, Feature or FeatureCollection (dict), anything with
    ``__geo_interface__`` (a shapely geometry), or a path to a GeoJSON file. Several features are
    merged into one (multi)geometry.
    """
    if geometry is None:
        return None

    source = "intersects"
    if isinstance(geometry, (str, os.PathLike)):
        path = Path(os.path.expanduser(os.fspath(geometry)))
        source = str(path)
        if not path.is_file():
            raise SearchError(f"intersects file {path} does not exist; give a GeoJSON file (lon/lat)")
        try:
            geometry = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SearchError(f"cannot read {path} as GeoJSON: {exc}") from None
    if hasattr(geometry, "__geo_interface__"):
        geometry = geometry.__geo_interface__
    if not isinstance(geometry, Mapping):
        raise SearchError(f"intersects must be a GeoJSON geometry, Feature(Collection), shapely geometry or file, "
                          f"got {type(geometry).__name__}")
    kind = geometry.get("type")
    try:
        if kind == "FeatureCollection":
            geoms = [shape(f["geometry"]) for f in geometry.get("features") or [] if f.get("geometry")]
            geom = unary_union(geoms) if geoms else None
        elif kind == "Feature":
            geom = shape(geometry["geometry"]) if geometry.get("geometry") else None
        else:
            geom = shape(geometry)
    except (KeyError, TypeError, ValueError, AttributeError, GEOSException) as exc:
        raise SearchError(f"{source} is not a valid GeoJSON geometry ({exc})") from None
    if geom is None or geom.is_empty:
        raise SearchError(f"{source} holds no geometry; give a polygon of the area in lon/lat")
    w, s, e, n = geom.bounds
    if not (-180 <= w <= 180 and -180 <= e <= 180 and -90 <= s <= 90 and -90 <= n <= 90):
        raise SearchError(f"{source} has coordinates outside lon [-180, 180] / lat [-90, 90]; GeoJSON is lon/lat "
                          "(reproject it to EPSG:4326)")
    if not geom.is_valid:
        geom = geom.buffer(0)
    return dict(mapping(geom))


def _intersects_geometry(item: Mapping[str, Any], geometry: Mapping[str, Any]) -> bool:
    """Whether an item's footprint (its geometry, else its bbox) meets a lon/lat geometry."""
    area = shape(geometry)
    try:
        if item.get("geometry"):
            return bool(shape(item["geometry"]).intersects(area))
    except (TypeError, ValueError, AttributeError):
        pass
    ib = item.get("bbox")
    if ib is None:
        return True  # nothing to test: kept, as for bbox
    w, s, e, n = ib[0], ib[1], ib[-2], ib[-1]
    return any(box(*b).intersects(area) for b in ([(w, s, e, n)] if w <= e else [(w, s, 180, n), (-180, s, e, n)]))


def _short_reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]


def _intersects(item: Mapping[str, Any], bbox: Bbox) -> bool:
    ib = item.get("bbox")
    if ib is None and item.get("geometry"):
        ib = shape(item["geometry"]).bounds
    if ib is None:
        return True
    w, s, e, n = ib[0], ib[1], ib[-2], ib[-1]
    if n < bbox[1] or s > bbox[3]:
        return False
    # Longitudes as intervals; one crossing the antimeridian (west > east) is two of them.
    def spans(a: float, b: float) -> list[tuple[float, float]]:
        return [(a, b)] if a <= b else [(a, 180.0), (-180.0, b)]

    return any(not (e1 < w0 or w1 > e0) for w0, e0 in spans(bbox[0], bbox[2]) for w1, e1 in spans(w, e))


def _read_json_or_ndjson(path: Path) -> Any:
    try:
        text = path.read_text()
        if path.suffix in (".ndjson", ".jsonl", ".geojsonl"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise CatalogError(f"cannot read {path}: {exc}") from exc


def _items_from_file(path: Path) -> Iterator[Item]:
    yield from _items_from_data(_read_json_or_ndjson(path), path)


def _items_from_data(data: Any, source: Path) -> Iterator[Item]:
    if isinstance(data, list):
        features: Iterable[Any] = data
    elif isinstance(data, Mapping) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
    elif isinstance(data, Mapping) and data.get("type") == "Feature":
        features = [data]
    else:
        raise CatalogError(
            f"{source} is neither a STAC item, a FeatureCollection of items, an .ndjson of items "
            "nor a catalog/collection"
        )
    for feat in features:
        if not isinstance(feat, Mapping) or feat.get("type") != "Feature":
            raise CatalogError(f"{source} holds something that is not a STAC item: {str(feat)[:80]}")
        yield _absolute_hrefs(dict(feat), source.parent)


def _absolute_hrefs(item: Item, base: Path) -> Item:
    """Resolve relative asset hrefs against the file the item came from."""
    assets = {}
    for key, asset in item.get("assets", {}).items():
        asset = dict(asset)
        href = asset.get("href", "")
        if href and not urlparse(href).scheme and not os.path.isabs(href):
            asset["href"] = str((base / href).resolve())
        assets[key] = asset
    item["assets"] = assets
    return item


def _walk_pystac(href: str, collections: Sequence[str] | None) -> Iterator[Item]:
    try:
        root = pystac.read_file(href)
    except Exception as exc:  # pystac raises many types for unreadable/invalid JSON
        raise CatalogError(f"cannot read STAC catalog {href}: {_short_reason(exc)}") from exc
    if not isinstance(root, pystac.Catalog):
        raise CatalogError(f"{href} is a STAC {type(root).__name__}, not a catalog or collection")
    for item in root.get_items(recursive=True):
        if collections and item.collection_id not in collections:
            continue
        item.make_asset_hrefs_absolute()
        # The self link (the Item's absolute href) lets products link back to their inputs
        # (STAC derived_from).
        d = item.to_dict(include_self_link=True, transform_hrefs=False)
        for asset in d.get("assets", {}).values():
            href_ = asset.get("href", "")
            if href_.startswith("file://"):
                asset["href"] = href_[len("file://"):]
        yield d


class NoEPSGError(CatalogError):
    """Files whose CRS has no EPSG code (a custom WKT): ``crs=`` must name the equivalent code."""


_Sources = dict[Path, tuple[Any, ...]]


def _file_sources(assets: Mapping[str, str | os.PathLike[str]] | str | os.PathLike[str],
                  band_map: Mapping[str, int] | None) -> dict[str, tuple[Path, int]]:
    """Common band name -> (file, 1-based band index), from a file per band or one file and a band map."""
    if isinstance(assets, (str, os.PathLike)):
        if not band_map:
            raise CatalogError("a single (multi-band) file needs band_map={'green': 3, ...} (CLI --band-map green=3,...)")
        sources = {name: (Path(os.fspath(assets)), index) for name, index in band_map.items()}
    else:
        if band_map:
            raise CatalogError("band_map goes with one multi-band file; with a file per band leave it out")
        sources = {name: (Path(os.fspath(f)), 1) for name, f in assets.items()}
    if not sources:
        raise CatalogError("item_from_files needs at least one band file")
    return sources


def _read_headers(sources: Mapping[str, tuple[Path, int]]) -> _Sources:
    """Each file's header (transform, shape, bounds, CRS, band count, nodata); no pixel is read.

    Also checks that each file exists, has a UTF-8 name (GDAL needs one) and holds the band
    index asked of it.
    """
    headers: _Sources = {}
    for name, (f, index) in sources.items():
        if not f.exists():
            raise CatalogError(f"file for band {name!r} does not exist: {f}")
        try:
            os.fsencode(f).decode("utf-8")
        except UnicodeDecodeError:
            # GDAL takes UTF-8 names only; a Latin-1 name from an old archive cannot be opened.
            raise CatalogError(f"the file name {os.fsdecode(f)!r} is not valid UTF-8, which GDAL needs; rename "
                               "the file (e.g. with convmv -f latin1 -t utf8)") from None
        if f not in headers:
            try:
                with rasterio.open(f) as src:
                    headers[f] = (list(src.transform)[:6], [src.height, src.width], src.bounds, src.crs, src.count,
                                  src.nodata)
            except RasterioError as exc:
                raise CatalogError(f"cannot read {f} as a raster ({exc}); is it a complete GeoTIFF?") from None
        count = headers[f][4]
        if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= count:
            raise CatalogError(f"band {name!r}: index {index!r} is not a band of {f.name}, which has bands 1..{count} "
                               "(1-based, as rasterio counts)")
    return headers


def _one_grid(headers: _Sources) -> tuple[Path, tuple[Any, ...]]:
    """The first file and its header, after checking that every file shares its grid and CRS."""
    first = next(iter(headers))
    transform, shape, _, file_crs, _, _ = headers[first]
    for f, (t, sh, _, c, _, _) in headers.items():
        if (t, sh) != (transform, shape) or c != file_crs:
            raise CatalogError(f"{f.name} and {first.name} are not on one grid (transform, shape or CRS differ); "
                               "give files of one grid per item")
    return first, headers[first]


def _files_epsg(crs: Any, file_crs: Any, first: Path) -> tuple[Any, int]:
    """The item's CRS and EPSG code: ``crs=`` where it names the files' own CRS, else the files'."""
    try:
        target = CRS.from_user_input(crs if crs is not None else file_crs) if (crs or file_crs) else None
    except CRSError as exc:
        raise CatalogError(f"cannot understand crs={crs!r}: {exc}; use e.g. 'EPSG:32611'") from None
    epsg = target.to_epsg() if target is not None else None
    own = CRS.from_user_input(file_crs).to_epsg() if file_crs else None
    if crs is not None and own is not None and target is not None and own != epsg:
        # crs= names the files' own CRS (for WKT without a code); taking another zone's code
        # would put the pixels hundreds of kilometres away (a 1 x 1 px all-NaN cube).
        raise CatalogError(
            f"{first.name} is in EPSG:{own}, not {crs}; crs= states the files' own CRS where they carry no EPSG "
            f"code. To warp them to {crs}, load them with crs= (CLI: ingest --crs does that)"
        )
    if epsg is None:
        raise NoEPSGError(
            f"{first} has no CRS with an EPSG code; pass crs='EPSG:NNNN' (the "
            "equivalent code, e.g. EPSG:32611 for a custom 'UTM zone 11N' WKT)"
        )
    return target, epsg


def _footprint(target: Any, b: Any) -> tuple[list[float], dict[str, Any]]:
    """The lon/lat bbox and GeoJSON footprint of the grid's bounds ``b`` in CRS ``target``."""
    # Densified edges: a polar grid's footprint reaches past its corners, and GDAL reports a box
    # across the antimeridian with west > east (STAC's convention) and one around a pole to +-90.
    w, s, e, n = transform_bounds(target, "EPSG:4326", b.left, b.bottom, b.right, b.top, densify_pts=21)
    if w > e:
        geometry: dict[str, Any] = {"type": "MultiPolygon", "coordinates": [
            [[[w, s], [180.0, s], [180.0, n], [w, n], [w, s]]], [[[-180.0, s], [e, s], [e, n], [-180.0, n], [-180.0, s]]]]}
    else:
        geometry = {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}
    return [w, s, e, n], geometry


def _file_assets(sources: Mapping[str, tuple[Path, int]], headers: _Sources, scale: float | None,
                 offset: float | None, nodata: float | None) -> dict[str, Any]:
    """One asset per band: the file (or its band through ``vrt://``) and its ``raster:bands``."""
    out_assets: dict[str, Any] = {}
    for name, (f, index) in sources.items():
        path = str(f.resolve())
        asset: dict[str, Any] = {
            # vrt://...?bands=k: GDAL (>= 3.7) exposes band k of the file as a one-band dataset.
            "href": f"vrt://{path}?bands={index}" if headers[f][4] > 1 else path,
            "type": "image/tiff; application=geotiff",
            "roles": ["data"],
        }
        rb = {k: float(v) for k, v in (("scale", scale), ("offset", offset), ("nodata", nodata)) if v is not None}
        if rb:
            asset["raster:bands"] = [rb]
        out_assets[name] = asset
    return out_assets


def item_from_files(
    assets: Mapping[str, str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    id: str,
    datetime: str,
    collection: str = "landsat-c2-l2",
    platform: str | None = None,
    crs: Any = None,
    properties: Mapping[str, Any] | None = None,
    band_map: Mapping[str, int] | None = None,
    scale: float | None = None,
    offset: float | None = None,
    nodata: float | None = None,
) -> Item:
    """A STAC item for GeoTIFFs on disk that no catalog describes.

    Scenes downloaded by hand, crops shipped with papers and Earth Engine exports come without
    STAC metadata. This states what a catalog would: the grid (``proj:*``, read from the files'
    headers, so no pixel is read), the lon/lat footprint, and one asset per band, keyed by
    common band name, ready for :func:`icemap.load`.

    Parameters
    ----------
    assets
        Either common band name -> single-band file (``{"green": ".../B03.tif", ...}``), or
        one multi-band file together with ``band_map``. All files must share one grid.
    id, datetime, collection, platform
        Item identity and acquisition time (ISO 8601); the collection picks the sensor table
        (``"hls"`` for HLS, ``"landsat-c2-l2"`` for Collection 2 Level-2, ``"sentinel-2-l2a"``).
    crs
        Override the files' CRS, e.g. ``"EPSG:32611"`` for files whose WKT is a custom
        equivalent of a UTM zone without an EPSG code.
    properties
        Further item properties (``eo:cloud_cover``...).
    band_map
        Common band name -> 1-based band index in the multi-band file, as rasterio counts
        (``{"green": 3, "swir16": 12}`` for a 13-band Sentinel-2 export). The asset points at
        that band through GDAL's ``vrt://`` connection string, so readers see a single band.
    scale, offset, nodata
        ``physical = DN * scale + offset`` and the fill DN, stated as each asset's
        ``raster:bands``; default the sensor table's (nodata: the file's own when it has one).
        A scale without an offset means offset 0, never the sensor table's (Landsat's -0.2
        belongs to Landsat's DNs); scales must be finite, in 1e-7..1, offsets within +-1.
    """
    instant = _parse_instant(datetime, end=False)  # validate now
    if instant is None:
        raise CatalogError(f"datetime {datetime!r} is open; give the acquisition time, e.g. 2022-02-01")
    # Stored in UTC, in one form: the cube's time axis is UTC, and items mixing plain dates and
    # offsets would otherwise reach the stacker as naive and aware times at once.
    datetime = instant.strftime("%Y-%m-%dT%H:%M:%SZ")
    scale, offset = user_scale_offset(scale, offset)
    sources = _file_sources(assets, band_map)
    headers = _read_headers(sources)
    first, (transform, shape, b, file_crs, _, file_nodata) = _one_grid(headers)
    target, epsg = _files_epsg(crs, file_crs, first)
    bbox, geometry = _footprint(target, b)
    props: dict[str, Any] = {"datetime": datetime, "proj:epsg": epsg, "proj:transform": transform,
                             "proj:shape": shape, **dict(properties or {})}
    if platform:
        props["platform"] = platform
    out_assets = _file_assets(sources, headers, scale, offset, file_nodata if nodata is None else nodata)
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "id": id,
        "collection": collection,
        "bbox": bbox,
        "geometry": geometry,
        "properties": props,
        "assets": out_assets,
        "links": [],
    }


def _check_search_numbers(max_cloud: float | None, max_items: int | None, limit: int, timeout: float,
                          retries: int, backoff: float) -> float | None:
    """Validate :func:`search`'s numbers now, not at iteration; return ``max_cloud`` as a float."""
    if max_cloud is not None:
        try:
            max_cloud = float(max_cloud)
        except (TypeError, ValueError):
            raise SearchError(f"max_cloud must be a percentage 0-100, got {max_cloud!r}") from None
        if not 0 <= max_cloud <= 100:
            raise SearchError(f"max_cloud must be a percentage 0-100, got {max_cloud}")
    if max_items is not None and max_items < 1:
        raise SearchError(f"max_items must be at least 1, got {max_items}")
    if limit < 1:
        raise SearchError(f"limit (page size) must be at least 1, got {limit}")
    if timeout <= 0:
        raise SearchError(f"timeout must be positive seconds, got {timeout}")
    if retries < 0:
        raise SearchError(f"retries must be 0 or more, got {retries}")
    if not backoff >= 0:  # (NaN too)
        raise SearchError(f"backoff must be 0 or more seconds, got {backoff}")
    return max_cloud


def _catalog_location(catalog: str | os.PathLike[str]) -> str:
    """The catalog as an http(s) URL or a local path (``file://`` URLs become paths)."""
    cat = os.fspath(catalog)
    if not cat:
        raise SearchError("catalog is empty; give a STAC API URL or a path to a catalog or items")
    scheme = urlparse(cat).scheme.lower()
    if scheme == "file":
        cat = urlparse(cat).path  # file:///abs/path -> /abs/path: read as a local catalog
    elif len(scheme) > 1 and scheme not in ("http", "https"):
        # (one-letter "schemes" are Windows drive letters: local paths)
        raise SearchError(
            f"catalog {cat!r} uses the unsupported URL scheme '{scheme}://'; give an http(s):// STAC "
            "API or catalog URL, a file:// URL or a local path (copy catalogs from object stores "
            "to local disk, or serve them over https)"
        )
    return cat


def search(
    catalog: str | os.PathLike[str],
    *,
    collections: str | Sequence[str] | None = None,
    bbox: Sequence[float] | str | None = None,
    datetime: str | None = None,
    max_cloud: float | None = None,
    platforms: str | Sequence[str] | None = None,
    max_items: int | None = None,
    limit: int = 100,
    timeout: float = STAC_TIMEOUT_S,
    retries: int = STAC_RETRIES,
    backoff: float = STAC_BACKOFF_S,
    headers: Mapping[str, str] | None = None,
    intersects: Mapping[str, Any] | shapely.geometry.base.BaseGeometry | str | os.PathLike[str] | None = None,
) -> Search:
    """Build a search for Landsat scenes. No request is made until the result is iterated.

    Parameters
    ----------
    catalog
        A STAC API root URL (``https://planetarycomputer.microsoft.com/api/stac/v1``), a static
        catalog (``catalog.json``, local or http), an item JSON, a FeatureCollection, an
        ``.ndjson`` file of items, or a folder of item JSON files.
    collections
        Collection id(s), e.g. ``"landsat-c2-l2"``.
    bbox
        ``(west, south, east, north)`` in degrees.
    intersects
        Instead of ``bbox``: the area as a lon/lat geometry (GeoJSON dict, Feature or
        FeatureCollection, a shapely geometry, or a GeoJSON file path). Items whose footprint
        meets it are found; a cube ingested from the search covers its bounds.
    datetime
        ``START/END`` in ISO 8601; either side may be ``..``; partial dates such as ``2021-02``
        stand for the whole period.
    max_cloud
        Keep items whose ``eo:cloud_cover`` is at most this percentage (0-100); items that do
        not state it are kept. Sent to an API that supports CQL2 filters (see
        :func:`property_filters`); filtered here otherwise.
    platforms
        e.g. ``"landsat-8"``; matched case-insensitively (USGS writes ``LANDSAT_8``).
    max_items
        Stop after this many items.
    limit
        Page size asked of an API.
    timeout, retries, backoff
        Per-request timeout in seconds; retries of failed connections, time-outs and
        408/429/5xx answers, GET and POST alike, waiting ``backoff * 2**n`` seconds between them
        (defaults :data:`STAC_TIMEOUT_S`, :data:`STAC_RETRIES`, :data:`STAC_BACKOFF_S`).
    headers
        Extra HTTP headers (e.g. an API key). They are never written to a store.

    Returns
    -------
    Search
        Iterate it for item dicts, or call ``.items()`` for a sorted list of ``pystac.Item``
        (``.item_dicts()`` for the same as dicts).
    """
    if isinstance(collections, str):
        collections = [collections]
    if isinstance(platforms, str):
        platforms = [platforms]
    max_cloud = _check_search_numbers(max_cloud, max_items, limit, timeout, retries, backoff)
    parse_datetime(datetime)  # validate now, not at iteration
    area = parse_intersects(intersects)
    if area is not None and bbox is not None:
        raise SearchError("give bbox or intersects, not both (a STAC API accepts one of them)")
    cat = _catalog_location(catalog)
    return Search(
        catalog=cat,
        collections=tuple(collections) if collections else None,
        bbox=parse_bbox(bbox),
        datetime=datetime,
        max_cloud=max_cloud,
        platforms=tuple(p.lower().replace("_", "-") for p in platforms) if platforms else None,
        max_items=max_items,
        intersects=area,
        limit=limit,
        timeout=float(timeout),
        retries=int(retries),
        backoff=float(backoff),
        headers=dict(headers) if headers else None,
    )
