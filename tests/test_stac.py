"""Search: parameter validation, static catalogs, real provider JSON, and a real STAC API."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from icemap.errors import CatalogError, SearchError
from icemap.stac import item_datetime, parse_datetime, search

from .conftest import StacServer, icemap_cli, shared_path


# -- built, not run ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bbox": [1, 2, 3]}, "four numbers"),
        ({"bbox": [10, 0, 10, 1]}, "no width"),
        ({"bbox": [0, 10, 1, 5]}, "south"),
        ({"bbox": [0, 0, 1, 95]}, "outside"),
        ({"datetime": "2021-13-01"}, "invalid date|cannot read"),
        ({"datetime": "2021-05-01/2021-01-01"}, "ends before"),
        ({"datetime": "yesterday"}, "ISO 8601"),
        ({"max_cloud": 140}, "0-100"),
        ({"max_items": 0}, "at least 1"),
    ],
)
def test_bad_parameters_fail_when_built(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(SearchError, match=match):
        search("/does/not/matter", **kwargs)


def test_building_does_no_io() -> None:
    s = search("/no/such/catalog.json", bbox="1,2,3,4", datetime="2021")
    assert s.bbox == (1.0, 2.0, 3.0, 4.0)
    with pytest.raises(CatalogError, match="does not exist"):
        s.items()


def test_file_that_is_not_stac_gives_clear_error(tmp_path: Any) -> None:
    bad = tmp_path / "notstac.json"
    bad.write_text('{"hello": "world"}')
    with pytest.raises(CatalogError, match="neither a STAC item"):
        search(bad).item_dicts()
    broken = tmp_path / "broken.json"
    broken.write_text('{"type": "Feature", ')
    with pytest.raises(CatalogError, match="cannot read"):
        search(broken).item_dicts()


def test_partial_dates_cover_the_whole_period() -> None:
    start, end = parse_datetime("2021-02")
    assert (start.isoformat(), end.isoformat()) == ("2021-02-01T00:00:00+00:00", "2021-02-28T23:59:59.999999+00:00")
    start, end = parse_datetime("../2020")
    assert start is None and end.year == 2020 and end.month == 12


# -- real provider JSON (local files) ----------------------------------------------------------
@pytest.mark.shared_data
def test_planetary_computer_page_filters_locally() -> None:
    page = shared_path("stac_landsat_c2_l2", "extracted", "pc_items_landsat-c2-l2_page1.json")
    raw = json.loads(page.read_text())["features"]
    everything = search(page).item_dicts()
    assert len(everything) == len(raw) == 10
    cloudy_ok = search(page, max_cloud=20).item_dicts()
    assert {i["id"] for i in cloudy_ok} == {i["id"] for i in raw if i["properties"]["eo:cloud_cover"] <= 20}
    assert search(page, platforms="LANDSAT_9").item_dicts() == everything  # USGS spelling accepted
    assert search(page, platforms="landsat-8").item_dicts() == []
    # A bbox around one item's footprint finds that item (and its overlapping neighbours only).
    target = raw[0]
    w, s, e, n = target["bbox"]
    hits = search(page, bbox=[w + 0.1, s + 0.1, w + 0.2, s + 0.2]).item_dicts()
    assert target["id"] in {h["id"] for h in hits} and len(hits) < len(raw)


@pytest.mark.shared_data
def test_earth_search_response_collection_filter() -> None:
    resp = shared_path("stac_landsat_c2_l2", "extracted", "earthsearch_v1_search_response_page1.json")
    items = search(resp, collections="landsat-c2-l2").item_dicts()
    assert [i["id"] for i in items] == ["LC08_L2SP_033032_20231008_02_T1"]
    assert item_datetime(items[0]).isoformat().startswith("2023-10-08T17:37")


# -- static catalog ----------------------------------------------------------------------------
def test_static_catalog_walk(small_region: Any) -> None:
    items = search(small_region.catalog, collections=small_region.collection).item_dicts()
    assert [i["id"] for i in items] == list(small_region.item_ids)
    for it in items:
        for asset in it["assets"].values():
            assert not asset["href"].startswith("./")
            assert __import__("os").path.exists(asset["href"]), asset["href"]
    assert search(small_region.catalog, bbox=[10, 10, 11, 11]).item_dicts() == []
    first_day = small_region.datetimes[0][:10]
    same_day = search(small_region.catalog, datetime=first_day).item_dicts()
    assert len(same_day) == 2  # the first date comes as two scenes of one path


# -- a real STAC API on loopback -----------------------------------------------------------------
def test_api_search_all_with_paging(stac_api: StacServer) -> None:
    s = search(stac_api.url, collections="landsat-c2-l2", limit=5)
    ids = [i.id for i in s.items()]  # pystac Items, over every page
    assert sorted(ids) == sorted(i["id"] for i in stac_api.items)
    assert len(ids) > 5  # more than one page was followed


def test_api_filters_match_local_filtering(stac_api: StacServer) -> None:
    kwargs = dict(collections="landsat-c2-l2", datetime="2019-03-01/2019-09-30", max_cloud=50,
                  platforms="landsat-9")
    from_api = {i["id"] for i in search(stac_api.url, limit=7, **kwargs).item_dicts()}
    expected = {
        i["id"] for i in stac_api.items
        if "2019-03-01" <= i["properties"]["datetime"][:10] <= "2019-09-30"
        and i["properties"]["eo:cloud_cover"] <= 50 and i["properties"]["platform"] == "landsat-9"
    }
    assert from_api == expected and expected


def test_api_bbox_and_max_items(stac_api: StacServer, small_region: Any) -> None:
    assert search(stac_api.url, bbox=[10, 10, 11, 11]).item_dicts() == []
    inside = search(stac_api.url, bbox=small_region.bbox, max_items=3).item_dicts()
    assert len(inside) == 3


def test_api_unknown_collection_is_empty(stac_api: StacServer) -> None:
    assert search(stac_api.url, collections="sentinel-2-l2a").item_dicts() == []


def test_unreachable_api_gives_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CatalogError, match="failed after 1 retries"):
        search(f"http://127.0.0.1:{port}/", retries=1, backoff=0.01, timeout=2).item_dicts()


def test_cli_search_json(stac_api: StacServer) -> None:
    out = icemap_cli("search", "--catalog", stac_api.url, "--collection", "landsat-c2-l2", "--datetime",
                     "2019-01-01/2019-12-31", "--json")
    assert out.returncode == 0, out.stderr
    fc = json.loads(out.stdout)
    assert fc["type"] == "FeatureCollection"
    assert len(fc["features"]) == sum(i["properties"]["datetime"].startswith("2019") for i in stac_api.items)


def test_cli_bad_bbox_exits_nonzero() -> None:
    out = icemap_cli("search", "--catalog", "x", "--bbox", "5", "0", "5", "1")
    assert out.returncode == 1
    assert "no width" in out.stderr and "Traceback" not in out.stderr


def test_cli_retries_timeout_and_backoff_reach_the_search() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = icemap_cli("search", "--catalog", f"http://127.0.0.1:{port}/", "--retries", "0", "--timeout", "2")
    assert out.returncode == 1 and "failed after 0 retries" in out.stderr
    bad = icemap_cli("search", "--catalog", f"http://127.0.0.1:{port}/", "--backoff", "-1")
    assert bad.returncode == 1 and "backoff must be 0 or more seconds" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.shared_data
def test_item_from_local_files_states_the_files_grid() -> None:
    import rasterio

    from icemap.stac import item_from_files

    folder = shared_path("athabasca_hls_l30")
    files = {"green": folder / "athabasca_2020229_B03_L30.tif", "swir16": folder / "athabasca_2020229_B06_L30.tif"}
    # The crop's WKT is a custom UTM 11N with no EPSG code: the error says how to state it.
    with pytest.raises(CatalogError, match="crs='EPSG:NNNN'"):
        item_from_files(files, id="a", datetime="2020-08-16", collection="hls")
    item = item_from_files(files, id="a", datetime="2020-08-16T00:00:00Z", collection="hls", crs="EPSG:32611")
    with rasterio.open(files["green"]) as src:
        assert item["properties"]["proj:transform"] == list(src.transform)[:6]
        assert item["properties"]["proj:shape"] == [src.height, src.width]
    w, s, e, n = item["bbox"]
    assert -117.33 < w < e < -117.22 and 52.15 < s < n < 52.22  # the README's extent
    assert search(item["assets"]["green"]["href"].rsplit("/", 1)[0] + "/nothing.json").bbox is None
    with pytest.raises(CatalogError, match="does not exist"):
        item_from_files({"green": folder / "missing.tif"}, id="a", datetime="2020-08-16")


# -- server-side filters, by conformance class; intersects ---------------------------------------
def test_rustac_has_no_filter_extension_so_icemap_filters_locally(stac_api: StacServer) -> None:
    from pystac_client import Client
    from pystac_client.conformance import ConformanceClasses

    from icemap.stac import property_filters

    client = Client.open(stac_api.url)
    assert client.conforms_to("ITEM_SEARCH")
    assert not client.conforms_to(ConformanceClasses.FILTER) and not client.conforms_to(ConformanceClasses.QUERY)
    # rustac's in-memory API answers a filter it does not support with no items at all: sending
    # one to it would lose every scene, hence the conformance check.
    from pystac_client.warnings import DoesNotConformTo

    with pytest.warns(DoesNotConformTo, match="FILTER"):
        sent = list(client.search(collections=["landsat-c2-l2"], filter={"op": "<=", "args": [
            {"property": "eo:cloud_cover"}, 100]}, filter_lang="cql2-json").items_as_dicts())
    assert sent == []
    assert property_filters(50, ("landsat-9",), cql2=False, query=False) == {}
    found = search(stac_api.url, max_cloud=50, platforms="landsat-9").item_dicts()
    assert found and all(i["properties"]["eo:cloud_cover"] <= 50 for i in found)


class _Cql2Api:
    """A small STAC API on loopback that implements CQL2-JSON filters or the query extension.

    rustac's in-memory server has neither; this one advertises one of them, evaluates the subset
    icemap sends (and, or, isNull, <=, in; query ``in``) over its items, and records each search
    body, so the test sees what icemap asked the server to do.
    """

    def __init__(self, items: list[dict[str, Any]], conformance: str) -> None:
        import http.server
        import threading

        self.items, self.bodies = items, []
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _send(self, doc: Any) -> None:
                data = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                root = f"http://127.0.0.1:{self.server.server_address[1]}"
                conforms = ["https://api.stacspec.org/v1.0.0/core", "https://api.stacspec.org/v1.0.0/item-search",
                            conformance]
                self._send({"type": "Catalog", "id": "t", "description": "t", "stac_version": "1.0.0",
                            "conformsTo": conforms,
                            "links": [{"rel": "self", "href": root + "/"}, {"rel": "root", "href": root + "/"},
                                      {"rel": "search", "href": root + "/search", "method": "POST",
                                       "type": "application/geo+json"}]})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.bodies.append(body)
                self._send({"type": "FeatureCollection", "features": [i for i in api.items if api.matches(i, body)],
                            "links": []})

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"

    @staticmethod
    def _eval(expr: dict[str, Any], props: dict[str, Any]) -> bool:
        op, args = expr["op"], expr["args"]
        def value(a: Any) -> Any:
            return props.get(a["property"]) if isinstance(a, dict) and "property" in a else a

        if op == "and":
            return all(_Cql2Api._eval(a, props) for a in args)
        if op == "or":
            return any(_Cql2Api._eval(a, props) for a in args)
        if op == "isNull":
            return value(args[0]) is None
        if op == "<=":
            v = value(args[0])
            return v is not None and v <= value(args[1])
        if op == "in":
            return value(args[0]) in value(args[1])
        raise ValueError(op)

    def matches(self, item: dict[str, Any], body: dict[str, Any]) -> bool:
        props = item["properties"]
        if "filter" in body and not self._eval(body["filter"], props):
            return False
        for prop, cond in (body.get("query") or {}).items():
            if "in" in cond and props.get(prop) not in cond["in"]:
                return False
        return True

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.mark.parametrize("conformance,sent", [
    ("https://api.stacspec.org/v1.0.0-rc.2/item-search#filter", "filter"),
    ("https://api.stacspec.org/v1.0.0/item-search#query", "query"),
])
def test_api_filters_cloud_and_platform_where_it_conforms(stac_api: StacServer, conformance: str, sent: str) -> None:
    items = [json.loads(json.dumps(i)) for i in stac_api.items]
    items[0]["properties"].pop("eo:cloud_cover", None)  # kept: icemap keeps items that do not state it
    items[1]["properties"]["platform"] = "LANDSAT_9"  # USGS spelling, matched server-side too
    api = _Cql2Api(items, conformance)
    try:
        found = {i["id"] for i in search(api.url, max_cloud=40, platforms="landsat-9").item_dicts()}
    finally:
        api.stop()
    expected = {
        i["id"] for i in items
        if (i["properties"].get("eo:cloud_cover") is None or i["properties"]["eo:cloud_cover"] <= 40)
        and i["properties"]["platform"].lower().replace("_", "-") == "landsat-9"
    }
    assert found == expected and items[1]["id"] in expected
    assert len(api.bodies) == 1 and sent in api.bodies[0]
    other = "query" if sent == "filter" else "filter"
    assert other not in api.bodies[0]
    if sent == "filter":
        assert api.bodies[0]["filter-lang"] == "cql2-json"


def _polygon(w: float, s: float, e: float, n: float) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}


def test_intersects_geometry_api_and_static_catalog(stac_api: StacServer, small_region: Any, tmp_path: Any) -> None:
    from shapely.geometry import shape

    w, s, e, n = small_region.bbox
    # A triangle in the south-west corner: the north scene of the split first date misses it.
    tri = {"type": "Polygon", "coordinates": [[[w, s], [w + (e - w) * 0.3, s], [w, s + (n - s) * 0.3], [w, s]]]}
    for source in (stac_api.url, small_region.catalog):
        everything = {i["id"] for i in search(source).item_dicts()}
        hits = search(source, intersects=tri).item_dicts()
        ids = {i["id"] for i in hits}
        assert ids and ids < everything
        assert all(shape(i["geometry"]).intersects(shape(tri)) for i in hits)
        assert search(source, intersects=shape(_polygon(10, 10, 11, 11))).item_dicts() == []
    region_ids = {i["id"] for i in search(small_region.catalog, intersects=tri).item_dicts()}
    api_ids = {i["id"] for i in search(stac_api.url, intersects=tri, collections="landsat-c2-l2").item_dicts()}
    assert region_ids <= api_ids  # the API also holds copies of the last scene on other dates
    s1 = search(small_region.catalog, intersects={"type": "Feature", "geometry": tri, "properties": {}})
    assert s1.extent == shape(tri).bounds and s1.parameters()["intersects"]["type"] == "Polygon"
    with pytest.raises(SearchError, match="bbox or intersects, not both"):
        search(stac_api.url, bbox=small_region.bbox, intersects=tri)
    with pytest.raises(SearchError, match="outside lon"):
        search(stac_api.url, intersects=_polygon(400_000, 6_000_000, 410_000, 6_010_000))
    path = tmp_path / "area.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": tri,
                                                                           "properties": {}}]}))
    out = icemap_cli("search", "--catalog", str(small_region.catalog), "--intersects", str(path), "--json")
    assert out.returncode == 0, out.stderr
    assert {f["id"] for f in json.loads(out.stdout)["features"]} == region_ids
    bad = icemap_cli("search", "--catalog", str(small_region.catalog), "--intersects",
                     str(tmp_path / "missing.geojson"))
    assert bad.returncode == 1 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
