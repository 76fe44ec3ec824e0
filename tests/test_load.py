"""Loading: real USGS pixels, masks, laziness, chunk invariance, mosaics and bad assets."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio

import icemap
import icemap.bands
from icemap.bands import qa_mask, radsat_mask
from icemap.errors import EmptySearchError, LoadError, MissingAssetWarning
from icemap.stac import search

from .conftest import raise_if_dask_computes, shared_path

SCENES = ["LC08_L2SP_005009_20150710_20200908_02_T2", "LC08_L2SR_099120_20191129_20201016_02_T2"]


def usgs_item(scene: str) -> dict[str, Any]:
    """The scene's own USGS STAC item, pointed at the local files, with the grid of the files.

    The stored metadata describes the 30 m product; the files were downsampled, so the item
    gets the files' real grid, as a catalog of these files would state.
    """
    folder = shared_path("landsat_c2l2_fullscene_downsampled", scene)
    item = json.loads(next(folder.glob("*_SR_stac.json")).read_text())
    for asset in item["assets"].values():
        asset["href"] = str(folder / Path(asset["href"]).name)
    with rasterio.open(next(folder.glob("*_SR_B3.TIF"))) as src:
        item["properties"]["proj:epsg"] = src.crs.to_epsg()
        item["properties"]["proj:transform"] = list(src.transform)[:6]
        item["properties"]["proj:shape"] = [src.height, src.width]
    return item


def read_band(scene: str, suffix: str) -> tuple[np.ndarray, Any, Any]:
    folder = shared_path("landsat_c2l2_fullscene_downsampled", scene)
    with rasterio.open(next(folder.glob(f"*_{suffix}.TIF"))) as src:
        return src.read(1), src.transform, src.crs


@pytest.mark.shared_data
@pytest.mark.parametrize("scene", SCENES)
@pytest.mark.parametrize("flags", [("fill",), None], ids=["fill-only", "default-masks"])
def test_real_scene_values_masks_and_grid(scene: str, flags: tuple[str, ...] | None) -> None:
    item = usgs_item(scene)
    dn3, transform, crs = read_band(scene, "SR_B3")
    dn6, _, _ = read_band(scene, "SR_B6")
    qa, _, _ = read_band(scene, "QA_PIXEL")
    rs, _, _ = read_band(scene, "QA_RADSAT")
    kwargs = {} if flags is None else {"mask_flags": flags}
    ds = icemap.load([item], bands=["green", "swir16"], resolution=(transform.a, -transform.e), **kwargs)
    assert ds.rio.crs == crs
    assert ds.rio.transform() == transform
    out = ds.compute()
    np.testing.assert_array_equal(out["qa_pixel"].values[0], qa)
    for band, dn, number in (("green", dn3, 3), ("swir16", dn6, 6)):
        expected = np.float32(dn) * np.float32(2.75e-5) + np.float32(-0.2)
        bad = (dn == 0) | qa_mask(qa, flags or icemap.bands.MASK_FLAGS_DEFAULT) | radsat_mask(rs, [number])
        got = out["reflectance"].sel(band=band).values[0]
        assert np.isnan(got[bad]).all()
        np.testing.assert_allclose(got[~bad], expected[~bad], rtol=0, atol=1e-6)
        if flags == ("fill",):
            assert (~bad).mean() > 0.3  # the comparison covers most of the footprint


@pytest.mark.shared_data
def test_antarctic_scene_is_almost_all_cloud() -> None:
    ds = icemap.load([usgs_item(SCENES[1])], bands=["green"], resolution=(529.2, 528.0))
    qa = ds["qa_pixel"].values[0]
    valid = qa != 1
    masked = np.isnan(ds["reflectance"].values[0, 0])
    # README: the QA cloud bit is set on 99.3 % of valid pixels; all of those are masked.
    assert masked[valid].mean() >= 0.99


def test_load_is_lazy(small_region: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    items = search(small_region.catalog).item_dicts()
    opened: list[str] = []
    real_open = rasterio.open
    monkeypatch.setattr(rasterio, "open", lambda *a, **k: opened.append(str(a[0])) or real_open(*a, **k))
    with raise_if_dask_computes():
        ds = icemap.load(items, chunksize=64)
        icemap.ice_mask(ds)
    assert opened == []
    assert ds["reflectance"].dtype == np.float32 and ds["qa_pixel"].dtype == np.uint16


def test_chunked_equals_whole(small_region: Any) -> None:
    items = search(small_region.catalog).item_dicts()
    small = icemap.load(items, chunksize=48).compute()
    whole = icemap.load(items, chunksize=4096).compute()
    assert small["reflectance"].equals(whole["reflectance"])
    assert small["qa_pixel"].equals(whole["qa_pixel"])


def test_grid_is_native_and_snapped(small_region: Any) -> None:
    items = search(small_region.catalog).item_dicts()
    ds = icemap.load(items)
    t = ds.rio.transform()
    assert (t.c, t.f) == (small_region.transform[2], small_region.transform[5])
    assert (ds.sizes["y"], ds.sizes["x"]) == small_region.shape
    # A lon/lat bbox inside the region gives a grid aligned with the scenes' pixels.
    w, s, e, n = small_region.bbox
    sub = icemap.load(items, bbox=(w + (e - w) * 0.25, s + (n - s) * 0.25, e - (e - w) * 0.25, n - (n - s) * 0.25))
    st = sub.rio.transform()
    assert ((st.c - t.c) / 30) % 1 == 0 and ((st.f - t.f) / 30) % 1 == 0
    assert sub.sizes["x"] < ds.sizes["x"]


def test_same_day_same_path_is_mosaicked(small_region: Any) -> None:
    items = search(small_region.catalog).item_dicts()
    assert len(items) == len(small_region.datetimes) + 1
    ds = icemap.load(items, bands=["green"], chunksize=64)
    assert ds.sizes["time"] == len(small_region.datetimes)
    first = ds.isel(time=0).compute()
    assert "," in str(first["item_ids"].values)  # both scene ids recorded
    # The two halves cover the grid together: no fill remains after the mosaic.
    assert not (first["qa_pixel"].values == 1).any()
    # Each mosaic pixel equals the one scene that covers it, wherever only one does.
    separate = icemap.load(items[:2], bands=["green"], mosaic=False).compute()
    a, b = separate["reflectance"].values[:, 0]
    only_a = ~np.isnan(a) & np.isnan(b)
    np.testing.assert_array_equal(first["reflectance"].values[0][only_a], a[only_a])


def test_mosaic_day_costs_few_tasks_beyond_reading_its_scenes(small_region: Any) -> None:
    """Merging the scenes of a day adds at most ~3 tasks per output chunk to reading them.

    Counted on optimised graphs (as ``compute`` sends them): a two-scene day against its two
    scenes loaded as separate steps (the same reads, scaling and masking, no merge). Merging by
    concatenating and rechunking the scenes took 4 tasks per output chunk on top (now 2.6).
    """
    import dask

    items = search(small_region.catalog).item_dicts()[:2]  # the day of two scenes

    def tasks(ds: Any) -> int:
        (opt,) = dask.optimize(ds["reflectance"].data)
        return len(opt.__dask_graph__())

    merged = icemap.load(items, chunksize=32)
    separate = icemap.load(items, chunksize=32, mosaic=False)
    assert merged.sizes["time"] == 1 and separate.sizes["time"] == 2
    n_chunks = merged["reflectance"].data.npartitions
    assert tasks(merged) <= tasks(separate) + 3 * n_chunks, (tasks(merged), tasks(separate), n_chunks)


@pytest.mark.parametrize("key", ["proj:epsg", "proj:code"])
def test_items_with_either_projection_key_load(small_region: Any, key: str) -> None:
    # pystac >= 1.12 rewrites proj:epsg to proj:code; stackstac 0.5 reads only proj:epsg.
    items = search(small_region.catalog).item_dicts()
    epsg = int(small_region.crs.split(":")[1])
    for it in items:
        it["properties"].pop("proj:epsg", None)
        it["properties"].pop("proj:code", None)
        it["properties"][key] = epsg if key == "proj:epsg" else f"EPSG:{epsg}"
    ds = icemap.load(items)
    assert ds.rio.crs.to_epsg() == epsg
    assert (ds.sizes["y"], ds.sizes["x"]) == small_region.shape


def test_missing_band_warns_and_gives_nodata(small_region: Any) -> None:
    items = search(small_region.catalog).item_dicts()
    del items[-1]["assets"]["swir22"]
    with pytest.warns(MissingAssetWarning, match=items[-1]["id"]):
        ds = icemap.load(items, bands=["green", "swir22"])
    assert np.isnan(ds["reflectance"].sel(band="swir22").isel(time=-1).values).all()
    with pytest.raises(LoadError, match="no item has band 'lwir11'"):
        for it in items:
            it["assets"].pop("lwir11", None)
        icemap.load(items, bands=["lwir11"])


def test_unreadable_asset_error_or_nodata(small_region: Any, tmp_path: Path) -> None:
    items = search(small_region.catalog).item_dicts()
    bad = tmp_path / "corrupt_SR_B3.TIF"
    bad.write_bytes(b"II*\x00 this is not a tiff")
    items[-1]["assets"]["green"]["href"] = str(bad)
    ds = icemap.load(items, bands=["green"])
    with pytest.raises(LoadError, match="corrupt_SR_B3.TIF.*on_error='nodata'"):
        ds["reflectance"].isel(time=-1).compute()
    ds = icemap.load(items, bands=["green"], on_error="nodata")
    with pytest.warns(MissingAssetWarning, match="corrupt_SR_B3.TIF"):
        last = ds["reflectance"].isel(time=-1).compute()
    assert np.isnan(last.values).all()
    assert np.isfinite(ds["reflectance"].isel(time=0).values).any()


SIGNED_DIR: Path | None = None


def sign_for_test(href: str) -> str:
    """A module-level signer (as real ones are): maps the public href to the 'signed' location."""
    assert SIGNED_DIR is not None
    return str(SIGNED_DIR / Path(href).name)


def test_signing_happens_at_read_time_only(small_region: Any, tmp_path: Path) -> None:
    global SIGNED_DIR
    SIGNED_DIR = tmp_path / "token-S3CR3T"
    items = search(small_region.catalog).item_dicts()[-1:]
    SIGNED_DIR.mkdir()
    for asset in items[0]["assets"].values():
        shutil.copy(asset["href"], SIGNED_DIR / Path(asset["href"]).name)
        asset["href"] = "https://example.invalid/landsat/" + Path(asset["href"]).name
    ds = icemap.load(items, bands=["green"], signer=sign_for_test)
    import cloudpickle

    graph = cloudpickle.dumps(dict(ds["reflectance"].data.__dask_graph__()))
    assert b"S3CR3T" not in graph and b"example.invalid" in graph
    assert np.isfinite(ds["reflectance"].values).any()
    with pytest.raises(LoadError, match="module-level"):
        icemap.load(items, signer=lambda h: h)


def test_bad_arguments() -> None:
    with pytest.raises(EmptySearchError, match="widen the search"):
        icemap.load([])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(LoadError, match="on_error"):
            icemap.load([{"id": "x"}], on_error="ignore")  # type: ignore[arg-type]


def test_pickled_graph_is_small(small_region: Any) -> None:
    items = search(small_region.catalog).item_dicts()
    ds = icemap.load(items, chunksize=64)
    size = len(pickle.dumps(dict(ds["reflectance"].data.__dask_graph__())))
    n_chunks = ds["reflectance"].data.npartitions
    assert size / n_chunks < 20_000  # bytes per output chunk: references, not pixels
