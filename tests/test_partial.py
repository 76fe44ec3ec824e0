"""Partial products: real scenes without QA_PIXEL (Liverpool L2SP crop) or with six bands (HLS).

Expected pixels are computed independently from the TIFFs with rasterio and the product
guides' scale/offset; the georeference of the Liverpool crop is read from its MTL file.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

import icemap
from icemap.errors import LoadError, MissingAssetWarning, NoQAWarning
from icemap.interop import decode_attrs
from icemap.stac import item_from_files

from .conftest import REPO, icemap_cli, shared_path

pytestmark = pytest.mark.shared_data

LIVERPOOL = "xlandsat_liverpool_l2sp"
SCENE = "LC08_L2SP_204023_20200927_20201006_02_T1"
LANDSAT_NUMBERS = {"coastal": 1, "blue": 2, "green": 3, "red": 4, "nir08": 5, "swir16": 6, "swir22": 7}
HLS_CODES = {"blue": "B02", "green": "B03", "red": "B04", "nir08": "B05", "swir16": "B06", "swir22": "B07"}


def _mtl(key: str) -> float:
    text = shared_path(LIVERPOOL, f"{SCENE}_MTL.txt").read_text()
    return float(re.search(rf"^\s*{key} = ([-\d.]+)", text, flags=re.M).group(1))  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def liverpool(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The crop's bands as georeferenced GeoTIFFs in a temporary folder.

    The xlandsat authors stripped the TIFFs' georeferencing; their MTL keeps it (UTM 30N, UL
    pixel *centre* 487020 / 5929980). The pixels are copied unchanged.
    """
    out = tmp_path_factory.mktemp("liverpool")
    res = _mtl("GRID_CELL_SIZE_REFLECTIVE")
    transform = from_origin(_mtl("CORNER_UL_PROJECTION_X_PRODUCT") - res / 2,
                            _mtl("CORNER_UL_PROJECTION_Y_PRODUCT") + res / 2, res, res)
    files = {}
    for name, number in LANDSAT_NUMBERS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(shared_path(LIVERPOOL, f"{SCENE}_SR_B{number}.TIF")) as src:
                dn = src.read(1)
        path = out / f"{SCENE}_SR_B{number}.TIF"
        with rasterio.open(path, "w", driver="GTiff", width=dn.shape[1], height=dn.shape[0], count=1,
                           dtype=dn.dtype, crs=f"EPSG:326{int(_mtl('UTM_ZONE')):02d}", transform=transform) as dst:
            dst.write(dn, 1)
        files[name] = path
    return files


def _liverpool_item(files: dict[str, Path]) -> dict[str, Any]:
    return item_from_files(files, id=SCENE, datetime="2020-09-27T11:03:00Z", platform="landsat-8")


def test_scene_without_qa_pixel_needs_no_qa(liverpool: dict[str, Path]) -> None:
    item = _liverpool_item(liverpool)
    with pytest.raises(LoadError, match=r"QA_PIXEL.*qa=None \(CLI --no-qa\)"):
        icemap.load([item], bands=["green", "swir16"])
    with pytest.warns(NoQAWarning, match="NOT masked") as rec:
        ds = icemap.load([item], bands=["green", "swir16"], qa=None)
    assert sum(issubclass(w.category, NoQAWarning) for w in rec) == 1
    assert ds.attrs["cloud_masked"] == 0
    for band in ("green", "swir16"):
        with rasterio.open(liverpool[band]) as src:
            dn = src.read(1)
            assert ds.rio.transform() == src.transform and ds.rio.crs == src.crs
        expected = np.where(dn == 0, np.nan, dn.astype(np.float32) * np.float32(2.75e-5) + np.float32(-0.2))
        np.testing.assert_allclose(ds["reflectance"].sel(band=band).values[0], expected, rtol=0, atol=1e-6)


def test_cli_ingest_no_qa_records_it(liverpool: dict[str, Path], tmp_path: Path) -> None:
    import zarr

    items = tmp_path / "item.json"
    items.write_text(json.dumps(_liverpool_item(liverpool)))
    out = tmp_path / "cube.zarr"
    cmd = ["ingest", "--catalog", str(items), "--bands", "green,swir16", "--out", str(out), "--quiet"]
    refused = icemap_cli(*cmd, cwd=REPO)
    assert refused.returncode == 1 and "--no-qa" in refused.stderr and "Traceback" not in refused.stderr
    done = icemap_cli(*cmd, "--no-qa", cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("NoQAWarning") == 1
    # One line, named by class, without Python's "file:line: ... warnings.warn(" form.
    assert "icemap: warning (NoQAWarning): qa=None" in done.stderr and "warnings.warn(" not in done.stderr
    attrs = decode_attrs(zarr.open_group(str(out), mode="r").attrs)  # dict attributes are JSON text on disk
    assert attrs["cloud_masked"] == 0 and attrs["load"]["qa"] is None
    cube = icemap.open_cube(out)
    with rasterio.open(liverpool["swir16"]) as src:
        dn = src.read(1)
    got = cube["reflectance"].sel(band="swir16").values[0]
    np.testing.assert_array_equal(np.isnan(got), dn == 0)


def _hls_item(codes: dict[str, str]) -> dict[str, Any]:
    files = {name: shared_path("athabasca_hls_l30", f"athabasca_2020229_{code}_L30.tif") for name, code in codes.items()}
    return item_from_files(files, id="HLS.L30.athabasca", datetime="2020-08-16T00:00:00Z", collection="hls",
                           platform="landsat-8", crs="EPSG:32611")


def test_default_bands_take_what_the_hls_crop_has() -> None:
    with pytest.warns(MissingAssetWarning, match="no coastal") as rec:
        ds = icemap.load([_hls_item(HLS_CODES)])
    assert sum(issubclass(w.category, MissingAssetWarning) for w in rec) == 1
    assert list(ds["band"].values) == list(HLS_CODES)
    for name, code in HLS_CODES.items():
        with rasterio.open(shared_path("athabasca_hls_l30", f"athabasca_2020229_{code}_L30.tif")) as src:
            dn = src.read(1)
        expected = np.where(dn == -9999, np.nan, dn.astype(np.float32) * np.float32(1e-4))
        np.testing.assert_array_equal(ds["reflectance"].sel(band=name).values[0], expected)


def test_default_bands_fail_only_for_the_methods_bands() -> None:
    codes = {k: v for k, v in HLS_CODES.items() if k != "swir16"}
    with pytest.raises(LoadError, match=r"no item has swir16, which NDSI needs"):
        icemap.load([_hls_item(codes)])
    # Asked for explicitly, other bands still load without swir16.
    ds = icemap.load([_hls_item(codes)], bands=["green", "red"])
    assert list(ds["band"].values) == ["green", "red"]
