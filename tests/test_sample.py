"""Tests of the embedded sample region (icemap.sample) and of write_cog (icemap.export).

One region is generated per session (160 x 160 pixels, 3 dates, the first split in two scenes)
and every file-level claim of the generator is checked on it: valid COGs on one grid, Collection 2
encoding, QA flags that agree with the truth, spectral behaviour that NDSI relies on, outlines
that match their rasterisation, and a STAC catalog that pystac can walk. Reuse, overwrite and
determinism are checked on tiny separate regions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine
from scipy import ndimage

from icemap.bands import LANDSAT_C2_L2, QA_PIXEL, qa_mask, radsat_mask
from icemap.errors import IcemapError
from icemap.export import write_cog
from icemap.sample import (
    CLASS_CODES,
    SampleRegion,
    make_sample_region,
    open_sample_region,
)

SIZE = 160
N_DATES = 3

# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def region(tmp_path_factory: pytest.TempPathFactory) -> SampleRegion:
    root = tmp_path_factory.mktemp("sample") / "region"
    return make_sample_region(root, size=SIZE, n_dates=N_DATES, seed=1)


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def _item(region: SampleRegion, item_id: str) -> dict[str, Any]:
    path = region.root / region.collection / item_id / f"{item_id}.json"
    return json.loads(path.read_text())


def _asset_path(region: SampleRegion, item_id: str, key: str) -> Path:
    item = _item(region, item_id)
    return (region.root / region.collection / item_id / item["assets"][key]["href"]).resolve()


def _decode(region: SampleRegion, item_id: str, key: str) -> np.ndarray:
    """Physical values of a band, decoded with the item's own raster:bands (NaN at nodata)."""
    rb = _item(region, item_id)["assets"][key]["raster:bands"][0]
    dn = _read(_asset_path(region, item_id, key))
    out = dn * rb["scale"] + rb["offset"]
    return np.where(dn == rb["nodata"], np.nan, out)


def _ndsi(region: SampleRegion, item_id: str) -> np.ndarray:
    green = np.clip(_decode(region, item_id, "green"), 0.0, None)
    swir = np.clip(_decode(region, item_id, "swir16"), 0.0, None)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (green - swir) / (green + swir)


def _flag(qa: np.ndarray, name: str) -> np.ndarray:
    field = next(f for f in QA_PIXEL if f.name == name)
    return field.extract(qa).astype(bool)


# --------------------------------------------------------------------------------------------
# Region layout and grid
# --------------------------------------------------------------------------------------------


def test_region_description(region: SampleRegion) -> None:
    assert region.crs == "EPSG:32719"
    assert region.shape == (SIZE, SIZE)
    a, b, c, d, e, f = region.transform
    assert (a, b, d, e) == (30.0, 0.0, 0.0, -30.0)
    # Real Landsat grids: pixel corners on multiples of 30 m plus 15 m.
    assert c % 30 == 15 and f % 30 == 15
    west, south, east, north = region.bbox
    assert west < -69.95 < east and south < -30.3 < north
    assert len(region.datetimes) == N_DATES
    assert len(region.item_ids) == N_DATES + 1  # the first date is split in two scenes
    assert all(t.startswith(f"{2021 + k}-02") for k, t in enumerate(region.datetimes))
    for path in (region.catalog, region.outlines, region.dem, region.glacier_ids):
        assert path.is_file()
    for date in region.dates:
        assert region.truth(date).is_file()
        assert region.ice_fraction(date).is_file()
    assert open_sample_region(region.root) == region


def test_truth_lookup_by_item_date_or_datetime(region: SampleRegion) -> None:
    first, second = region.item_ids[:2]
    assert region.truth(first) == region.truth(second) == region.truth(region.dates[0])
    assert region.truth(region.datetimes[1]) == region.truth(region.item_ids[2])
    with pytest.raises(IcemapError, match="neither a date nor an item"):
        region.truth("1999-01-01")


def test_every_raster_is_a_cog_on_the_region_grid(region: SampleRegion) -> None:
    rasters = sorted(region.root.rglob("*.tif")) + sorted(region.root.rglob("*.TIF"))
    assert len(rasters) == 2 + 2 * N_DATES + 10 * len(region.item_ids)
    for path in rasters:
        with rasterio.open(path) as src:
            assert src.driver == "GTiff"
            assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG", path
            assert src.profile["tiled"], path
            assert src.overviews(1), f"{path} has no overviews"
            assert src.tags(ns="IMAGE_STRUCTURE").get("COMPRESSION") == "DEFLATE"
            assert src.crs.to_epsg() == 32719
            assert tuple(src.transform)[:6] == region.transform
            assert src.shape == region.shape


# --------------------------------------------------------------------------------------------
# Encoding, QA and truth
# --------------------------------------------------------------------------------------------


def test_items_carry_collection2_encoding_from_bands_table(region: SampleRegion) -> None:
    for item_id in region.item_ids:
        assets = _item(region, item_id)["assets"]
        for band in LANDSAT_C2_L2.bands:
            rb = assets[band.name]["raster:bands"][0]
            assert (rb["scale"], rb["offset"]) == (band.scale, band.offset)
            assert rb["nodata"] == band.nodata
            assert rb["data_type"] == band.dtype
            eo = assets[band.name]["eo:bands"][0]
            assert eo["common_name"] == band.name
        assert assets["qa_pixel"]["raster:bands"][0]["nodata"] == 1
        assert assets["qa_pixel"]["raster:bands"][0]["unit"] == "bit index"


def test_fill_is_exactly_outside_the_footprint(region: SampleRegion) -> None:
    for item_id in region.item_ids:
        qa = _read(_asset_path(region, item_id, "qa_pixel"))
        fill = qa_mask(qa, ["fill"])
        assert np.all(qa[fill] == 1)  # USGS writes exactly 1 for fill
        for key in ("coastal", "green", "swir16", "swir22", "lwir11"):
            dn = _read(_asset_path(region, item_id, key))
            assert np.array_equal(dn == 0, fill), (item_id, key)


def test_qa_flags_agree_with_truth(region: SampleRegion) -> None:
    checked_cloud = checked_shadow = 0
    for item_id in region.item_ids:
        qa = _read(_asset_path(region, item_id, "qa_pixel"))
        truth = _read(region.truth(item_id))
        inside = ~_flag(qa, "fill")
        cloud = _flag(qa, "cloud")
        shadow = _flag(qa, "cloud_shadow")
        snow = _flag(qa, "snow")
        water = _flag(qa, "water")
        dilated = _flag(qa, "dilated_cloud")

        # Flags are only ever set where the truth says so (Fmask here misses, never invents).
        assert np.all(truth[cloud] == CLASS_CODES["cloud"])
        assert np.all(truth[shadow] == CLASS_CODES["cloud_shadow"])
        assert np.all(truth[water] == CLASS_CODES["water"])
        assert np.all(np.isin(truth[snow], [CLASS_CODES["ice"], CLASS_CODES["snow"]]))
        # ... and catch most of it.
        true_cloud = (truth == CLASS_CODES["cloud"]) & inside
        if true_cloud.sum() > 50:
            assert cloud[true_cloud].mean() > 0.7
            checked_cloud += 1
        true_shadow = (truth == CLASS_CODES["cloud_shadow"]) & inside
        if true_shadow.sum() > 50:
            assert shadow[true_shadow].mean() > 0.5
            checked_shadow += 1
        icy = np.isin(truth, [CLASS_CODES["ice"], CLASS_CODES["snow"]]) & inside
        assert snow[icy].all()
        # Dilated cloud is a ring of at most 3 pixels around detected cloud, never on it. QA is
        # made for the whole pass, so a ring may also come from a cloud just beyond the footprint.
        assert not np.any(dilated & cloud)
        near = ndimage.binary_dilation(cloud | ~inside, np.ones((3, 3), bool), iterations=3)
        assert np.all(near[dilated & inside])
        # "clear" is the complement of cloud and dilated cloud inside the footprint.
        clear = _flag(qa, "clear")
        assert np.array_equal(clear[inside], ~(cloud | dilated)[inside])
    assert checked_cloud and checked_shadow  # the fixture does contain clouds and shadows


def test_pure_surfaces_have_their_ndsi_signature(region: SampleRegion) -> None:
    gids = _read(region.glacier_ids)
    n_ice = n_rock = n_water = 0
    for item_id in region.item_ids:
        ndsi = _ndsi(region, item_id)
        truth = _read(region.truth(item_id))
        frac = _read(region.ice_fraction(item_id))
        ice = (truth == CLASS_CODES["ice"]) & (frac >= 0.999)
        rock = (
            ndimage.binary_erosion(truth == CLASS_CODES["rock"], iterations=2)
            & (frac == 0)
            & (gids == 0)
            & np.isfinite(ndsi)
        )
        water = ndimage.binary_erosion(truth == CLASS_CODES["water"]) & np.isfinite(ndsi)
        ice &= np.isfinite(ndsi)
        if ice.any():
            assert np.all(ndsi[ice] > 0.6)
            n_ice += int(ice.sum())
        if rock.sum() > 100:
            assert np.median(ndsi[rock]) < -0.1
            assert np.mean(ndsi[rock] < 0.1) > 0.99
            n_rock += int(rock.sum())
        if water.any():
            # Water is NDSI's classic false positive: as "snowy" as ice by this index.
            assert np.median(ndsi[water]) > 0.4
            n_water += int(water.sum())
    assert n_ice > 100 and n_rock > 1000 and n_water > 0


def test_reflectance_and_temperature_are_plausible(region: SampleRegion) -> None:
    item_id = region.item_ids[-1]
    truth = _read(region.truth(item_id))
    green = _decode(region, item_id, "green")
    swir = _decode(region, item_id, "swir16")
    temp = _decode(region, item_id, "lwir11")
    snow = truth == CLASS_CODES["snow"]
    rock = truth == CLASS_CODES["rock"]
    ice = truth == CLASS_CODES["ice"]
    assert np.nanmedian(green[snow]) > 0.4  # snow lies mostly on shaded slopes
    assert 0.05 < np.nanmedian(green[rock]) < 0.35
    assert np.nanmedian(swir[rock]) > np.nanmedian(green[rock])
    assert np.nanmin(green) > -0.05  # only slightly negative where anything is
    assert np.nanmedian(temp[ice]) < 274.0 < np.nanmedian(temp[rock])
    cloud = truth == CLASS_CODES["cloud"]
    if cloud.sum() > 20:
        assert np.nanmedian(temp[cloud]) < np.nanmedian(temp[ice])


def test_saturation_marks_brightest_snow(region: SampleRegion) -> None:
    found = 0
    for item_id in region.item_ids:
        radsat = _read(_asset_path(region, item_id, "qa_radsat"))
        sat = radsat_mask(radsat, bands=[1, 2])
        if not sat.any():
            continue
        found += int(sat.sum())
        truth = _read(region.truth(item_id))
        assert np.all(truth[sat] == CLASS_CODES["snow"])
        for key in ("coastal", "blue"):
            assert np.all(_read(_asset_path(region, item_id, key))[sat] == 65535)
        assert np.all(_read(_asset_path(region, item_id, "green"))[sat] < 65535)
    assert found > 0


def test_ice_fraction_matches_truth_classes(region: SampleRegion) -> None:
    gids = _read(region.glacier_ids)
    for date in region.dates:
        frac = _read(region.ice_fraction(date))
        truth = _read(region.truth(date))
        assert np.nanmin(frac) >= 0.0 and np.nanmax(frac) <= 1.0
        # Mixed pixels exist (5 x 5 sub-pixel cover), and visible ice is always glacier ice.
        assert np.any((frac > 0.05) & (frac < 0.95))
        assert np.mean(gids[frac >= 0.5] > 0) > 0.95
        # Mostly-ice pixels are "ice" in the truth unless a cloud shadow lies over them.
        visible = [CLASS_CODES["ice"], CLASS_CODES["cloud_shadow"]]
        assert np.all(np.isin(truth[frac >= 0.5], visible))
        assert np.all(frac[truth == CLASS_CODES["ice"]] > 0.15)
        assert np.all(frac[truth == CLASS_CODES["debris"]] < 0.5)
        # Debris-covered ice is glacier (in the outlines) but not visible ice.
        debris = truth == CLASS_CODES["debris"]
        assert np.mean(gids[debris] > 0) > 0.9  # edge pixels may have their centre outside


# --------------------------------------------------------------------------------------------
# Outlines
# --------------------------------------------------------------------------------------------


def test_outlines_match_their_rasterisation(region: SampleRegion) -> None:
    import geopandas as gpd

    glaciers = gpd.read_file(region.outlines, layer="glaciers")
    assert glaciers.crs.to_epsg() == 32719
    assert list(glaciers["gid"]) == list(range(1, len(glaciers) + 1))
    assert glaciers["glacier_id"].is_unique
    assert set(glaciers["kind"]) <= {"cirque", "valley", "glacieret"}
    assert len(glaciers) >= 5
    np.testing.assert_allclose(glaciers["area_km2"], glaciers.geometry.area / 1e6, rtol=1e-9)
    assert glaciers["area_km2"].min() >= 0.005
    # Non-overlapping: the union's area is the sum of the areas.
    union = glaciers.geometry.union_all()
    assert union.area == pytest.approx(glaciers.geometry.area.sum(), rel=1e-9)

    gids = _read(region.glacier_ids)
    assert set(np.unique(gids)) <= {0, *glaciers["gid"]}
    counts = np.bincount(gids.ravel(), minlength=len(glaciers) + 1)
    big = glaciers[glaciers["area_km2"] > 0.1]
    assert len(big) >= 2
    for gid, area in zip(big["gid"], big["area_km2"]):
        assert counts[gid] * 900 / 1e6 == pytest.approx(area, rel=0.05)
    assert (glaciers["debris_km2"] > 0).any()
    assert (glaciers["debris_km2"] < glaciers["area_km2"] * 0.5).all()


# --------------------------------------------------------------------------------------------
# Split first date and STAC catalog
# --------------------------------------------------------------------------------------------


def test_split_first_date_gives_complementary_scenes(region: SampleRegion) -> None:
    a, b = (_item(region, i) for i in region.item_ids[:2])
    pa, pb = a["properties"], b["properties"]
    assert pa["datetime"][:10] == pb["datetime"][:10] == region.dates[0]
    assert pa["landsat:wrs_path"] == pb["landsat:wrs_path"]
    assert int(pb["landsat:wrs_row"]) == int(pa["landsat:wrs_row"]) + 1
    assert pa["proj:shape"] == pb["proj:shape"] == list(region.shape)
    assert pa["proj:transform"] == pb["proj:transform"] == list(region.transform)

    fill_a = qa_mask(_read(_asset_path(region, region.item_ids[0], "qa_pixel")), ["fill"])
    fill_b = qa_mask(_read(_asset_path(region, region.item_ids[1], "qa_pixel")), ["fill"])
    assert fill_a.any() and fill_b.any()
    assert not np.any(fill_a & fill_b)  # together they cover the whole grid
    overlap = ~fill_a & ~fill_b
    assert overlap.any()
    # The northern scene covers the top rows, the southern one the bottom rows.
    assert not fill_a[0].any() and fill_a[-1].all()
    assert fill_b[0].all() and not fill_b[-1].any()
    # Same pass: identical values where the scenes overlap.
    for key in ("red", "qa_pixel"):
        va = _read(_asset_path(region, region.item_ids[0], key))
        vb = _read(_asset_path(region, region.item_ids[1], key))
        assert np.array_equal(va[overlap], vb[overlap])


def test_catalog_loads_with_pystac_and_hrefs_resolve(region: SampleRegion) -> None:
    import pystac

    catalog = pystac.Catalog.from_file(str(region.catalog))
    items = list(catalog.get_items(recursive=True))
    assert sorted(i.id for i in items) == sorted(region.item_ids)
    for item in items:
        assert item.collection_id == region.collection
        assert set(item.assets) >= {
            "coastal", "blue", "green", "red", "nir08", "swir16", "swir22",
            "lwir11", "qa_pixel", "qa_radsat",
        }
        for asset in item.assets.values():
            assert Path(asset.get_absolute_href()).is_file()
            assert asset.media_type == "image/tiff; application=geotiff; profile=cloud-optimized"
    collection = catalog.get_child(region.collection)
    assert collection is not None
    assert "procedurally generated" in collection.description


def test_item_metadata_matches_pixels(region: SampleRegion) -> None:
    from pyproj import Transformer
    from shapely.geometry import shape

    to_utm = Transformer.from_crs("EPSG:4326", region.crs, always_xy=True)
    for item_id in region.item_ids:
        item = _item(region, item_id)
        props = item["properties"]
        assert props["proj:epsg"] == 32719  # kept for stackstac, which reads only this key
        assert props["platform"] in ("landsat-8", "landsat-9")
        assert props["instruments"] == ["oli", "tirs"]
        assert 55.0 - 1 <= props["view:sun_elevation"] <= 60.0
        assert 60.0 - 1 <= props["view:sun_azimuth"] <= 80.0
        assert props["landsat:correction"] == "L2SP"
        assert props["landsat:collection_category"] == "T1"
        assert item_id.startswith(("LC08_L2SP_233", "LC09_L2SP_233"))
        # eo:cloud_cover is the truth cloud share inside the footprint.
        qa = _read(_asset_path(region, item_id, "qa_pixel"))
        inside = ~qa_mask(qa, ["fill"])
        truth = _read(region.truth(item_id))
        expected = 100.0 * np.mean(truth[inside] == CLASS_CODES["cloud"])
        assert props["eo:cloud_cover"] == pytest.approx(expected, abs=0.01)
        # The geometry (lon/lat) is the footprint: its area is the unfilled pixel area.
        geom = shape(item["geometry"])
        w, s, e, n = item["bbox"]
        assert geom.bounds == pytest.approx((w, s, e, n), abs=1e-6)
        utm = np.column_stack(to_utm.transform(*np.asarray(geom.exterior.coords).T))
        from shapely.geometry import Polygon

        area = Polygon(utm).area
        assert area == pytest.approx(inside.sum() * 900.0, rel=0.03)
    # Each date has 0-25 % cloud over the region (one scene of a split date may see more).
    for date in region.dates:
        assert np.mean(_read(region.truth(date)) == CLASS_CODES["cloud"]) <= 0.251
    # Platforms alternate from date to date.
    platforms = [_item(region, i)["properties"]["platform"] for i in region.item_ids[1:]]
    assert platforms[0] != platforms[1]


# --------------------------------------------------------------------------------------------
# Reuse, overwrite, determinism, validation
# --------------------------------------------------------------------------------------------


def _tiny(root: Path, **kw: Any) -> SampleRegion:
    params: dict[str, Any] = {"size": 64, "n_dates": 1, "seed": 3, "split_first_date": False}
    params.update(kw)
    return make_sample_region(root, **params)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = _tiny(tmp_path / "a")
    b = _tiny(tmp_path / "b")
    c = _tiny(tmp_path / "c", seed=4)
    band = f"{a.item_ids[0]}/{a.item_ids[0]}_SR_B3.TIF"
    bytes_a = (a.root / a.collection / band).read_bytes()
    assert bytes_a == (b.root / b.collection / band).read_bytes()
    assert bytes_a != (c.root / c.collection / band).read_bytes()
    assert a.glacier_ids.read_bytes() == b.glacier_ids.read_bytes()


def test_several_acquisitions_per_season(tmp_path: Path) -> None:
    one = _tiny(tmp_path / "one", n_dates=2)
    many = _tiny(tmp_path / "many", n_dates=2, per_season=3)
    assert many.per_season == 3 and one.per_season == 1 and many.years == (2021, 2022)
    dates = np.array(many.dates, dtype="datetime64[D]")
    assert len(dates) == 6 and set(np.diff(dates)[[0, 1, 3, 4]].astype(int)) == {8}
    platforms = [iid[:4] for iid in many.item_ids]
    assert platforms[:3] == ["LC08", "LC09", "LC08"] and platforms[3:] == ["LC09", "LC08", "LC09"]
    # The first acquisition of each year is the per_season=1 region's, byte for byte.
    for first in (0, 3):
        iid = many.item_ids[first]
        assert iid in one.item_ids
        for suffix in ("SR_B3", "SR_B6", "QA_PIXEL"):
            rel = f"{iid}/{iid}_{suffix}.TIF"
            assert (many.root / many.collection / rel).read_bytes() == (one.root / one.collection / rel).read_bytes()
    # Clouds and snow change between the acquisitions of a season.
    truths = [_read(many.truth(d)) for d in many.dates[:3]]
    assert not np.array_equal(truths[0], truths[1]) and not np.array_equal(truths[1], truths[2])
    # The yearly truth: clean glacier ice whatever covers it, on the outlines only (border pixels
    # whose centre is outside still hold their sub-pixel share).
    ice = _read(many.glacier_ice_fraction(2022))
    near = ndimage.binary_dilation(_read(many.glacier_ids) > 0)
    assert ice.max() > 0.9 and not ice[~near].any()
    for d in many.dates[:3]:
        assert np.all(np.nan_to_num(_read(many.ice_fraction(d))) <= ice + 1e-6)
    with pytest.raises(IcemapError, match="per_season > 1"):
        one.glacier_ice_fraction(2021)
    with pytest.raises(IcemapError, match="per_season must be between"):
        _tiny(tmp_path / "bad", per_season=7)


def test_seasonal_surface(tmp_path: Path) -> None:
    """surface="seasonal": a snowline that moves between dates, snow-covered accumulation areas
    above bare ice, a date of fresh snow on glacier and ground alike, and the same outlines
    (labels) as the classic surface, whose files it leaves alone."""
    classic = _tiny(tmp_path / "classic", size=128, seed=7)
    region = _tiny(tmp_path / "seasonal", size=128, seed=7, n_dates=6, surface="seasonal")
    assert json.loads((region.root / "sample.json").read_text())["params"]["surface"] == "seasonal"
    assert "surface" not in json.loads((classic.root / "sample.json").read_text())["params"]
    assert region.glacier_ids.read_bytes() == classic.glacier_ids.read_bytes()
    glacier = _read(region.glacier_ids) > 0
    dem = _read(region.dem)
    snow, ice = CLASS_CODES["snow"], CLASS_CODES["ice"]
    on, off, melt = [], [], 0
    for d in region.dates:
        truth = _read(region.truth(d))
        on.append(float((truth[glacier] == snow).mean()))
        off.append(float((truth[~glacier] == snow).mean()))
        if on[-1] > 3 * off[-1] and (truth[glacier] == ice).sum() > 50:
            melt += 1
            # Melt season: snow above the snowline, bare ice below it.
            assert np.median(dem[glacier & (truth == snow)]) > np.median(dem[glacier & (truth == ice)])
    assert max(on) - min(on) > 0.3, on  # the snowline moves between dates and years
    assert melt >= 2 and max(off) > 0.3, (on, off)  # melt-season dates and a fresh-snow date
    with pytest.raises(IcemapError, match="surface must be one of"):
        _tiny(tmp_path / "bad", surface="summer")


def test_rerun_with_same_parameters_reuses_files(tmp_path: Path) -> None:
    first = _tiny(tmp_path / "r")
    probe = first.root / first.collection / first.item_ids[0] / f"{first.item_ids[0]}_QA_PIXEL.TIF"
    before = probe.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = _tiny(tmp_path / "r")
    assert time.perf_counter() - t0 < 0.5
    assert again == first
    assert probe.stat().st_mtime_ns == before


def test_other_parameters_need_overwrite(tmp_path: Path) -> None:
    root = tmp_path / "o"
    _tiny(root)
    with pytest.raises(IcemapError, match="overwrite=True"):
        _tiny(root, seed=5)
    region = _tiny(root, seed=5, overwrite=True)
    meta = json.loads((root / "sample.json").read_text())
    assert meta["params"]["seed"] == 5
    assert region.item_ids and all(p.is_file() for p in (region.dem, region.catalog))


def test_foreign_folder_is_refused_unless_overwrite(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(IcemapError, match="not empty"):
        _tiny(root)
    _tiny(root, overwrite=True)
    assert (root / "notes.txt").read_text() == "keep me"


def test_interrupted_region_is_regenerated_without_overwrite(tmp_path: Path) -> None:
    root = tmp_path / "crash"
    region = _tiny(root)
    # Simulate a crash mid-way through a run: completion marker gone, partial marker present.
    (root / "sample.json").unlink()
    (root / ".icemap-sample-partial").write_text("{}")
    region.dem.unlink()
    again = _tiny(root)
    assert again.dem.is_file() and (root / "sample.json").is_file()
    assert not (root / ".icemap-sample-partial").exists()


def test_open_without_region_raises(tmp_path: Path) -> None:
    with pytest.raises(IcemapError, match="make_sample_region"):
        open_sample_region(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 32}, "size must be between"),
        ({"size": 64.0}, "size must be an integer"),
        ({"n_dates": 0}, "n_dates must be at least 1"),
        ({"seed": -1}, "seed must be a non-negative"),
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(IcemapError, match=message) as info:
        make_sample_region(tmp_path / "x", **kwargs)
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------
# write_cog
# --------------------------------------------------------------------------------------------


def test_write_cog_multiband_atomic(tmp_path: Path) -> None:
    data = np.arange(3 * 200 * 240, dtype=np.float32).reshape(3, 200, 240)  # larger than one 128-px tile
    transform = (30.0, 0.0, 15.0, 0.0, -30.0, 9015.0)
    out = write_cog(
        tmp_path / "x.tif",
        data,
        transform=transform,
        crs=32719,
        nodata=float("nan"),
        band_names=["a", "b", "c"],
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tif"]  # no temporary left behind
    with rasterio.open(out) as src:
        assert src.count == 3 and src.descriptions == ("a", "b", "c")
        assert src.overviews(1) and src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.transform == Affine(*transform)
        np.testing.assert_array_equal(src.read(), data)


def test_write_cog_rejects_bad_input_and_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "keep.tif"
    write_cog(target, np.ones((64, 64), np.uint8), transform=Affine.translation(15, 15), crs=32719)
    before = target.read_bytes()
    with pytest.raises(ValueError, match="2-D"):
        write_cog(target, np.ones(10), transform=Affine.identity(), crs=32719)
    with pytest.raises(ValueError, match="band names"):
        write_cog(
            target, np.ones((2, 8, 8)), transform=Affine.identity(), crs=32719, band_names=["a"]
        )
    with pytest.raises(ValueError, match="multiple of 16"):
        write_cog(target, np.ones((8, 8)), transform=Affine.identity(), crs=32719, blocksize=100)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.tif"]
