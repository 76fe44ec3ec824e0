"""Sensor tables against real item JSON from Planetary Computer, Earth Search and USGS."""

from __future__ import annotations

import json

import numpy as np
import pytest

from icemap.bands import (
    HLS,
    LANDSAT_C2_L2,
    QA_PIXEL,
    encode_qa_pixel,
    get_sensor,
    qa_mask,
    radsat_mask,
)
from icemap.errors import BandError

from .conftest import shared_path

STAC = ("stac_landsat_c2_l2",)


def _pc_items() -> list[dict]:
    return json.loads(shared_path(*STAC, "extracted", "pc_items_landsat-c2-l2_page1.json").read_text())["features"]


def _es_item() -> dict:
    return json.loads(shared_path(*STAC, "extracted", "earthsearch_item_LC08_L2SP_033032_20231008_02_T1.json").read_text())


def _usgs_items() -> list[dict]:
    folder = shared_path(*STAC, "odc_stac_items")
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


@pytest.mark.shared_data
@pytest.mark.parametrize("source", ["pc", "earthsearch", "usgs"])
def test_every_band_found_with_its_file(source: str) -> None:
    items = {"pc": _pc_items, "earthsearch": lambda: [_es_item()], "usgs": _usgs_items}[source]()
    for item in items:
        for band in ("coastal", "blue", "green", "red", "nir08", "swir16", "swir22"):
            key = LANDSAT_C2_L2.find_asset(item["assets"], band)
            assert key is not None, (item["id"], band)
            number = LANDSAT_C2_L2.band(band).number
            # The asset found must be the file of that OLI band, whatever the key is called.
            assert item["assets"][key]["href"].split("?")[0].upper().split("_SR_")[-1].startswith(f"B{number}")
        qa = LANDSAT_C2_L2.find_qa_asset(item["assets"])
        assert qa is not None and "QA_PIXEL" in item["assets"][qa]["href"]


@pytest.mark.shared_data
def test_table_scale_offset_agree_with_published_raster_bands() -> None:
    for item in _pc_items() + [_es_item()]:
        for band in ("green", "swir16"):
            rb = item["assets"][LANDSAT_C2_L2.find_asset(item["assets"], band)]["raster:bands"][0]
            spec = LANDSAT_C2_L2.band(band)
            assert (rb["scale"], rb["offset"], rb["nodata"]) == (spec.scale, spec.offset, spec.nodata)
    lw = _es_item()["assets"]["lwir11"]["raster:bands"][0]
    assert (lw["scale"], lw["offset"]) == (LANDSAT_C2_L2.band("lwir11").scale, LANDSAT_C2_L2.band("lwir11").offset)


@pytest.mark.shared_data
def test_collection_ids_map_to_sensor() -> None:
    assert get_sensor(_pc_items()[0]["collection"]) is LANDSAT_C2_L2
    assert get_sensor(_usgs_items()[0]["collection"]) is LANDSAT_C2_L2
    assert get_sensor("hls") is HLS
    with pytest.raises(BandError, match="sensor="):
        get_sensor("modis-09a1")
    assert get_sensor("sentinel-2-l2a").name == "sentinel-2-l2a"


def test_hls_tables_differ_where_sentinel2_numbers_bands_differently() -> None:
    from icemap.bands import HLS_S30

    assets = {"B8A": {"href": "x_B8A.tif"}, "B05": {"href": "x_B05.tif"}, "B11": {"href": "x_B11.tif"},
              "B06": {"href": "x_B06.tif"}}
    assert HLS.find_asset(assets, "nir08") == "B05" and HLS_S30.find_asset(assets, "nir08") == "B8A"
    assert HLS.find_asset(assets, "swir16") == "B06" and HLS_S30.find_asset(assets, "swir16") == "B11"
    assert get_sensor("HLSS30.v2.0") is HLS_S30
    assert HLS_S30.band("green").scale == 1e-4 and HLS_S30.band("green").nodata == -9999


def test_unknown_band_error_lists_choices() -> None:
    with pytest.raises(BandError, match="choose from coastal, blue, green"):
        LANDSAT_C2_L2.validate_bands(["green", "swir1"])
    with pytest.raises(BandError, match="twice"):
        LANDSAT_C2_L2.validate_bands(["green", "green"])


def test_qa_encoding_matches_usgs_values() -> None:
    # Values USGS documents for Landsat 8/9 C2 QA_PIXEL (LSDS-1619 table 6-3).
    assert encode_qa_pixel() == 21824  # clear, low confidences
    assert encode_qa_pixel(water=True) == 21952
    assert encode_qa_pixel(snow=True) == 30048
    assert encode_qa_pixel(cloud=True) == 22280
    assert encode_qa_pixel(fill=True) == 1


def test_qa_mask_masks_cloud_not_snow() -> None:
    qa = encode_qa_pixel(
        fill=np.array([1, 0, 0, 0, 0, 0], bool),
        cloud=np.array([0, 1, 0, 0, 0, 0], bool),
        cloud_shadow=np.array([0, 0, 1, 0, 0, 0], bool),
        dilated_cloud=np.array([0, 0, 0, 1, 0, 0], bool),
        snow=np.array([0, 0, 0, 0, 1, 0], bool),
        water=np.array([0, 0, 0, 0, 0, 1], bool),
    )
    np.testing.assert_array_equal(qa_mask(qa), [True, True, True, True, False, False])
    bits = {b.name: b for b in QA_PIXEL}
    np.testing.assert_array_equal(bits["snow"].extract(qa), [0, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(bits["cloud_confidence"].extract(qa), [0, 3, 1, 1, 1, 1])


def test_radsat_mask_per_band() -> None:
    rs = np.array([0, 0b1, 0b100, 1 << 11], dtype=np.uint16)
    np.testing.assert_array_equal(radsat_mask(rs), [False, True, True, False])  # bit 11: occlusion
    np.testing.assert_array_equal(radsat_mask(rs, bands=[3]), [False, False, True, False])
    with pytest.raises(BandError):
        radsat_mask(rs, bands=[12])


@pytest.mark.shared_data
def test_real_qa_pixel_decodes_like_the_readme_says() -> None:
    import rasterio

    folder = shared_path("landsat_c2l2_fullscene_downsampled", "LC08_L2SP_005009_20150710_20200908_02_T2")
    with rasterio.open(next(folder.glob("*QA_PIXEL.TIF"))) as src:
        qa = src.read(1)
    bits = {b.name: b for b in QA_PIXEL}
    valid = bits["fill"].extract(qa) == 0
    cloud_frac = bits["cloud"].extract(qa)[valid].mean()
    snow_frac = bits["snow"].extract(qa)[valid].mean()
    # The data README measured 54.3 % cloud and 40.1 % snow on valid pixels of this scene.
    assert cloud_frac == pytest.approx(0.543, abs=0.005)
    assert snow_frac == pytest.approx(0.401, abs=0.005)
