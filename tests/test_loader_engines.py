"""Two loader engines, one cube: odc-stac (the default) and stackstac (the ``icemap[stackstac]`` extra).

Every test marked ``stackstac`` loads the same items with both engines and requires identical
cubes: values (NaN where masked), QA, grid, time steps, coordinates and attributes. They need
stackstac, which pins pandas < 3 and is therefore not in ``.[dev]``: ``.ci/run`` runs them in a
second environment (``.[test,stackstac]``) with ``ICEMAP_TEST_ENV=stackstac``, where a missing
stackstac fails them (see ``tests/conftest.py``). The other tests here are odc-stac's own.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio

import icemap
from icemap.errors import IcemapError, LoadError, MissingExtraError
from icemap.stac import item_from_files, search

from .test_partial import liverpool  # noqa: F401  (the fixture: the real crop, georeferenced)


def load_both(items: list[dict[str, Any]], **kwargs: Any) -> tuple[Any, Any]:
    """The cube from each engine, computed; warnings of each recorded on the cube's attrs."""
    out = []
    for engine in ("odc-stac", "stackstac"):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            ds = icemap.load(items, engine=engine, **kwargs).compute()
        out.append((ds, sorted({(w.category.__name__, str(w.message)) for w in rec
                                if issubclass(w.category, UserWarning) and w.category.__module__.startswith("icemap")})))
    (a, wa), (b, wb) = out
    assert wa == wb, "the engines warn differently"
    return a, b


def assert_same_cube(a: Any, b: Any) -> None:
    assert a.identical(b), "the engines give different cubes"
    for name in ("reflectance", "qa_pixel"):
        assert a[name].dtype == b[name].dtype
    assert a.rio.crs == b.rio.crs and a.rio.transform() == b.rio.transform()
    assert (np.isfinite(a["reflectance"].values)).any(), "a cube of NaN proves nothing"


# -- the sample region ----------------------------------------------------------------------------
@pytest.mark.stackstac
@pytest.mark.parametrize("kwargs", [
    {},
    {"chunksize": 48, "bands": ["green", "swir16"]},
    {"bands": ["green", "swir16"], "mosaic": False, "mask_saturated": False},
    {"mask_flags": ("fill",), "resolution": 60},
    {"crs": "EPSG:32718"},  # the neighbouring UTM zone: every pixel reprojected
], ids=["default", "chunks48", "no-mosaic", "fill-only-60m", "reprojected"])
def test_sample_region_same_cube(small_region: Any, kwargs: dict[str, Any]) -> None:
    items = search(small_region.catalog).item_dicts()
    assert_same_cube(*load_both(items, **kwargs))


@pytest.mark.stackstac
def test_item_outside_the_grid_is_left_out_by_both(small_region: Any) -> None:
    # An item whose raster lies 30 km east of the requested bounds holds no pixel of the grid:
    # stackstac leaves it out on its own, odc-stac through icemap's rule (same time steps).
    items = search(small_region.catalog).item_dicts()
    far = json.loads(json.dumps(items[-1]))
    far["id"], far["properties"]["datetime"] = "far-east", "2024-01-01T14:30:00Z"
    far["properties"]["proj:transform"][2] += 30_000.0
    t, shape = items[0]["properties"]["proj:transform"], items[0]["properties"]["proj:shape"]
    bounds = (t[2], t[5] + t[4] * shape[0], t[2] + t[0] * shape[1], t[5])
    a, b = load_both([*items, far], bounds=bounds, mosaic=False)
    assert a.sizes["time"] == len(items) and "far-east" not in a["item_ids"].values
    assert_same_cube(a, b)


@pytest.mark.stackstac
def test_no_qa_and_unreadable_asset_same_cube(small_region: Any, tmp_path: Path) -> None:
    items = search(small_region.catalog).item_dicts()
    a, b = load_both(items, bands=["green", "swir16"], qa=None)
    assert a.attrs["cloud_masked"] == 0
    assert_same_cube(a, b)
    bad = tmp_path / "corrupt_SR_B3.TIF"
    bad.write_bytes(b"II*\x00 this is not a tiff")
    items[-1]["assets"]["green"]["href"] = str(bad)
    a, b = load_both(items, bands=["green", "swir16"], on_error="nodata")
    assert np.isnan(a["reflectance"].sel(band="green").isel(time=-1).values).all()
    assert_same_cube(a, b)


@pytest.mark.stackstac
@pytest.mark.parametrize("which", [-1, 0], ids=["last-item", "first-item"])
def test_missing_band_same_cube(small_region: Any, which: int) -> None:
    # odc-stac learns the bands from the first item: one that lacks a band must not hide it.
    items = search(small_region.catalog).item_dicts()
    del items[which]["assets"]["swir22"]
    del items[which]["assets"]["qa_radsat"]
    a, b = load_both(items, bands=["green", "swir22"], mosaic=False)
    assert np.isnan(a["reflectance"].sel(band="swir22").isel(time=which).values).all()
    assert np.isfinite(a["reflectance"].sel(band="swir22").values).any()
    assert_same_cube(a, b)


# -- Sentinel-2 fixtures (per-asset 10/20 m grids, SCL) and local multi-band files ------------------
@pytest.mark.stackstac
@pytest.mark.parametrize("provider,baseline,with_offset", [("es", "05.10", True), ("pc", "03.01", False)])
def test_sentinel2_same_cube(tmp_path: Path, provider: str, baseline: str, with_offset: bool) -> None:
    from .test_sentinel2 import _s2_item

    item, _ = _s2_item(tmp_path, provider, baseline, seed=2, with_offset=with_offset)
    for resolution in (10, None):
        assert_same_cube(*load_both([item], resolution=resolution))


@pytest.mark.stackstac
def test_multiband_local_file_same_cube(tmp_path: Path) -> None:
    from .test_sentinel2 import _multiband

    _multiband(tmp_path / "export.tif", 1)
    item = item_from_files(tmp_path / "export.tif", band_map={"green": 3, "swir16": 12}, id="e",
                           datetime="2022-02-01", collection="sentinel-2-l2a", scale=1e-4, offset=0.0)
    assert_same_cube(*load_both([item], qa=None, bands=["green", "swir16"]))


# -- real data in ../shared/data ---------------------------------------------------------------------
@pytest.mark.stackstac
@pytest.mark.shared_data
@pytest.mark.parametrize("scene", ["LC08_L2SP_005009_20150710_20200908_02_T2", "LC08_L2SR_099120_20191129_20201016_02_T2"])
def test_real_usgs_scene_same_cube(scene: str) -> None:
    from .test_load import read_band, usgs_item

    item = usgs_item(scene)
    _, transform, _ = read_band(scene, "SR_B3")
    res = (transform.a, -transform.e)
    # Fill-only masks: the Antarctic scene is 99 % cloud (its QA, compared too, says so).
    assert_same_cube(*load_both([item], bands=["green", "swir16", "nir08"], resolution=res, mask_flags=("fill",)))


@pytest.mark.stackstac
@pytest.mark.shared_data
def test_real_hls_crop_same_cube() -> None:
    from .test_athabasca import BANDS, hls_item

    assert_same_cube(*load_both([hls_item()], sensor="hls", crs="EPSG:32611", bands=list(BANDS)))


@pytest.mark.stackstac
@pytest.mark.shared_data
def test_real_liverpool_crop_without_nodata_tags_same_cube(liverpool: dict[str, Path]) -> None:  # noqa: F811
    from .test_partial import _liverpool_item

    assert_same_cube(*load_both([_liverpool_item(liverpool)], bands=["green", "swir16"], qa=None))


@pytest.mark.stackstac
def test_cli_ingest_engines_write_the_same_store(small_region: Any, tmp_path: Path) -> None:
    from .conftest import icemap_cli

    cubes = []
    for engine in ("odc-stac", "stackstac"):
        out = tmp_path / f"{engine}.zarr"
        done = icemap_cli("ingest", "--catalog", str(small_region.catalog), "--out", str(out), "--bands", "green,swir16",
                          "--engine", engine, "--quiet")
        assert done.returncode == 0, done.stderr
        cubes.append(icemap.open_cube(out).compute())
    a, b = cubes
    for name in ("reflectance", "qa_pixel"):
        assert a[name].equals(b[name])
    assert a.rio.transform() == b.rio.transform() and list(a["item_ids"].values) == list(b["item_ids"].values)


def test_cli_unknown_engine_is_one_line(small_region: Any, tmp_path: Path) -> None:
    from .conftest import icemap_cli

    done = icemap_cli("ingest", "--catalog", str(small_region.catalog), "--out", str(tmp_path / "c.zarr"),
                      "--engine", "gdal")
    assert done.returncode != 0 and "engine must be auto, odc-stac or stackstac" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "c.zarr").exists()


# -- odc-stac's own behaviour -----------------------------------------------------------------------
def test_dns_are_read_as_native_integers(small_region: Any) -> None:
    from icemap.bands import get_sensor
    from icemap.load import _read_odc, grid_for_items, normalise_items

    items = search(small_region.catalog).item_dicts()
    sensor = get_sensor("landsat-c2-l2")
    clean, meta = normalise_items(items, sensor, ["green", "swir16"])
    epsg, res, bnds = grid_for_items(meta, resolution=30)
    read = _read_odc(clean, meta, sensor, ["green", "swir16"], ["green", "swir16", "qa_pixel", "qa_radsat"],
                     epsg, res, bnds, 64, None, "raise")
    assert {read.assets[k].dtype for k in read.assets} == {np.dtype("uint16")}
    assert read.nodata == [0.0, 0.0]


def test_stackstac_is_only_imported_for_its_engine(small_region: Any) -> None:
    code = (
        "import sys, icemap; from icemap.stac import search\n"
        f"ds = icemap.load(search({str(small_region.catalog)!r}).item_dicts(), bands=['green'])\n"
        "ds.compute(); print('stackstac' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "False"


def test_missing_stackstac_names_the_extra(small_region: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "stackstac", None)  # as if not installed
    items = search(small_region.catalog).item_dicts()
    with pytest.raises(MissingExtraError, match=r'pip install "icemap\[stackstac\]"'):
        icemap.load(items, engine="stackstac")
    with pytest.raises(IcemapError, match="engine must be auto, odc-stac or stackstac"):
        icemap.load(items, engine="rasterio")  # type: ignore[arg-type]


class _FlakyFiles(http.server.SimpleHTTPRequestHandler):
    """Serves a folder over HTTP; answers 503 to the first ``fail_first`` reads of ``flaky`` (one
    file: GDAL's optional probes of side-car files would swallow failures meant for reads)."""

    fail_first = 0
    failed = 0
    flaky = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        cls = type(self)
        if self.path.endswith("/" + cls.flaky) and cls.failed < cls.fail_first:
            cls.failed += 1
            self.send_error(503, "try again")
            return
        super().do_GET()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("fail_first,retries", [(2, "5"), (2, "0")], ids=["retried", "no-retries"])
def test_transient_http_errors_are_retried(small_region: Any, fail_first: int, retries: str) -> None:
    items = search(small_region.catalog).item_dicts()[-1:]
    folder = Path(items[0]["assets"]["green"]["href"]).parent
    handler = type("Handler", (_FlakyFiles,), {"fail_first": fail_first, "failed": 0,
                                               "flaky": Path(items[0]["assets"]["green"]["href"]).name})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        for asset in items[0]["assets"].values():
            asset["href"] = url + Path(asset["href"]).name
        expected = icemap.load(search(small_region.catalog).item_dicts()[-1:], bands=["green"]).compute()
        # The user's own GDAL settings win over icemap's retry defaults (a short delay here).
        with rasterio.Env(GDAL_HTTP_RETRY_DELAY="0.05", GDAL_HTTP_MAX_RETRY=retries,
                          GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR", CPL_VSIL_CURL_CACHE_SIZE="0"):
            ds = icemap.load(items, bands=["green"])
            if retries == "0":
                with pytest.raises(LoadError, match="cannot read asset http://127.0.0.1"):
                    ds.compute()
                return
            got = ds.compute()
        assert handler.failed == fail_first
        np.testing.assert_array_equal(got["reflectance"].values, expected["reflectance"].values)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_driver_defaults_retry_and_pickles_by_reference() -> None:
    import pickle

    from icemap.reader import GDAL_RETRY
    from icemap.reader_odc import IcemapDriver

    from .test_load import sign_for_test

    drv = IcemapDriver(sign_for_test, "nodata")
    env = drv.capture_env()
    assert {k: env[k] for k in GDAL_RETRY} == GDAL_RETRY
    with rasterio.Env(GDAL_HTTP_MAX_RETRY="2"):
        assert drv.capture_env()["GDAL_HTTP_MAX_RETRY"] == "2"
    blob = pickle.dumps(drv)
    assert b"sign_for_test" in blob and len(blob) < 500
    back = pickle.loads(blob)
    assert back.signer is sign_for_test and back.on_error == "nodata"


@pytest.mark.stackstac
def test_plain_stackstac_stacks_search_items(small_region: Any) -> None:
    """``icemap.search(...).items()`` are pystac Items that plain ``stackstac.stack`` accepts
    (icemap keeps ``proj:epsg`` beside pystac's ``proj:code``, the only key stackstac 0.5 reads)."""
    import stackstac

    items = search(small_region.catalog).items()
    ours = icemap.load(items, bands=["green"])
    stack = stackstac.stack(items, assets=["green"])
    assert stack.sizes["time"] == len(items) and int(stack.attrs["crs"].split(":")[1]) == ours.rio.crs.to_epsg()
