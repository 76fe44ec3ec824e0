"""Products described by STAC: an Item beside every store and file, a Collection per run, each
validated offline against the bundled core and extension schemas (tests/stac_schemas)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import referencing.exceptions
import xarray as xr

import icemap
from icemap.describe import COG, ZARR, collection_path, item_path
from icemap.interop import resolve_store

from .conftest import icemap_cli
from .stacschemas import validate


def _load(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _follow(item_at: str | Path, href: str) -> Path:
    return (Path(item_at).parent / href).resolve()


@pytest.fixture(scope="module")
def run(sample_region: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ingest -> map (from the cube's Item, with COGs and outlines) -> composite, as the API runs them."""
    tmp = tmp_path_factory.mktemp("stacprod")
    paths = {"cube": tmp / "cube.zarr", "ice": tmp / "ice.zarr", "tif": tmp / "tif", "outlines": tmp / "ice.gpkg",
             "comp": tmp / "comp.zarr"}
    icemap.ingest(icemap.search(sample_region.catalog), paths["cube"], bands=["green", "swir16", "nir08"],
                  chunksize=64)
    icemap.map_cube(item_path(paths["cube"]), paths["ice"], geotiff_dir=paths["tif"],
                    outlines_path=paths["outlines"])
    icemap.composite(paths["cube"], paths["comp"])
    return paths


def test_every_item_and_collection_validates_offline(run: dict[str, Path]) -> None:
    items = [item_path(run[k]) for k in ("cube", "ice", "outlines", "comp")]
    items += [item_path(p) for p in sorted(run["tif"].glob("*.tif"))]
    assert len(items) > 4
    for path in items:
        item = _load(path)
        used = validate(item)
        assert any("projection/v2.0.0" in u for u in used) and any("processing/v1.2.0" in u for u in used), path
        assert item["properties"]["processing:software"] == {"icemap": icemap.__version__}
        asset = item["assets"]["data"]
        assert asset["roles"] == ["data"] and _follow(path, asset["href"]).exists()
        # Every item belongs to its run's Collection, which links back to it.
        coll_link = next(lk for lk in item["links"] if lk["rel"] == "collection")
        coll = _load(_follow(path, coll_link["href"]))
        assert item["collection"] == coll["id"]
        assert any(_follow(_follow(path, coll_link["href"]), lk["href"]) == Path(path).resolve()
                   for lk in coll["links"] if lk["rel"] == "item")
    for main in ("cube", "ice", "comp"):
        validate(_load(collection_path(run[main])))


def test_store_items_describe_grid_bands_and_lineage(run: dict[str, Path], sample_region: Any) -> None:
    cube = icemap.open_cube(run["cube"])
    item = _load(item_path(run["cube"]))
    props = item["properties"]
    assert props["proj:code"] == f"EPSG:{cube.rio.crs.to_epsg()}"
    assert props["proj:shape"] == [cube.sizes["y"], cube.sizes["x"]]
    assert props["proj:transform"] == list(cube.rio.transform())[:6]
    assert props["start_datetime"] < props["end_datetime"] and props["start_datetime"].startswith(
        str(cube["time"].values[0])[:10])
    asset = item["assets"]["data"]
    assert asset["type"] == ZARR
    bands = asset["raster:bands"]
    assert [b["name"] for b in bands] == ["qa_pixel"] + [f"reflectance:{b}" for b in cube["band"].values]
    assert bands[0] == {"name": "qa_pixel", "data_type": "uint16", "nodata": 1}
    assert bands[1]["data_type"] == "float32" and bands[1]["nodata"] == "nan" and bands[1]["unit"] == "1"
    # derived_from: the input scenes' own Items.
    inputs = {_follow(item_path(run["cube"]), lk["href"]) for lk in item["links"] if lk["rel"] == "derived_from"}
    expected = {Path(it.get_self_href()).resolve() for it in icemap.search(sample_region.catalog).items()}
    assert inputs == expected and all(h.exists() for h in inputs)
    # The product is derived from the cube's Item; its COGs and outlines from the product's.
    ice = _load(item_path(run["ice"]))
    assert [_follow(item_path(run["ice"]), lk["href"]) for lk in ice["links"] if lk["rel"] == "derived_from"] == [
        Path(item_path(run["cube"])).resolve()]
    assert ice["properties"]["icemap:method"] == "ndsi" and ice["properties"]["icemap:threshold"] == 0.4
    ice_band = next(b for b in ice["assets"]["data"]["raster:bands"] if b["name"] == "ice")
    assert ice_band == {"data_type": "uint8", "nodata": 255, "name": "ice"}
    for tif in run["tif"].glob("*.tif"):
        cog = _load(item_path(tif))
        assert cog["assets"]["data"]["type"] == COG
        assert [lk["href"] for lk in cog["links"] if lk["rel"] == "derived_from"] == ["../ice.zarr.json"]
    outlines = _load(item_path(run["outlines"]))
    assert outlines["assets"]["data"]["type"] == "application/geopackage+sqlite3"
    comp = _load(item_path(run["comp"]))
    assert comp["properties"]["icemap:kind"] == "composite"


def test_open_cube_and_map_accept_a_cube_item(run: dict[str, Path], tmp_path: Path) -> None:
    via_item = icemap.open_cube(item_path(run["cube"]))
    xr.testing.assert_identical(via_item, icemap.open_cube(run["cube"]))
    assert resolve_store(str(run["cube"])) == str(run["cube"])
    out = tmp_path / "ice.zarr"
    res = icemap_cli("map", "--cube", item_path(run["cube"]), "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(icemap.open_cube(out)["ice"].values, icemap.open_cube(run["ice"])["ice"].values)
    validate(_load(item_path(out)))
    # An Item without a Zarr asset is a one-line error, not a traceback.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "Feature", "assets": {}}))
    res = icemap_cli("map", "--cube", str(bad), "--out", str(tmp_path / "x.zarr"))
    assert res.returncode == 1 and "Zarr asset" in res.stderr and "Traceback" not in res.stderr


def test_areas_tables_get_items(run: dict[str, Path], sample_region: Any, tmp_path: Path) -> None:
    out, region = tmp_path / "areas.csv", tmp_path / "region.csv"
    res = icemap_cli("areas", "--pred", str(run["ice"]), "--reference", str(sample_region.outlines),
                     "--out", str(out), "--region-out", str(region))
    assert res.returncode == 0, res.stderr
    for path in (out, region):
        item = _load(item_path(path))
        validate(item)
        assert item["assets"]["data"]["type"] == "text/csv"
        assert [lk["href"] for lk in item["links"] if lk["rel"] == "derived_from"][0].endswith("ice.zarr.json")
    validate(_load(collection_path(out)))


def test_validation_is_real_and_offline(run: dict[str, Path]) -> None:
    item = _load(item_path(run["cube"]))
    broken = json.loads(json.dumps(item))
    broken["properties"]["proj:shape"] = ["rows", "cols"]
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    broken = json.loads(json.dumps(item))
    broken["assets"]["data"]["raster:bands"][0]["data_type"] = "float33"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    unknown = {**item, "stac_extensions": [*item["stac_extensions"], "https://example.com/ext/v1.0.0/schema.json"]}
    with pytest.raises(referencing.exceptions.NoSuchResource):  # bundled schemas only, never a download
        validate(unknown)


def test_model_folder_item_with_mlm(tmp_path: Path) -> None:
    import hashlib
    import shutil

    from icemap.model.item import MODEL_ITEM, describe_model
    from icemap.errors import ModelError
    from icemap.model.packaged import default_model_dir

    folder = tmp_path / "default-model"
    shutil.copytree(default_model_dir(), folder)
    item = describe_model(folder)
    assert _load(folder / MODEL_ITEM) == item
    used = validate(item)
    assert any("mlm/v1.5.2" in u for u in used) and any("file/v2.1.0" in u for u in used)
    meta = _load(folder / "model.json")
    props = item["properties"]
    (inp,) = props["mlm:input"]
    assert inp["bands"] == meta["channels"]
    assert [(s["minimum"], s["maximum"]) for s in inp["value_scaling"]] == list(
        zip(meta["normalisation"]["lo"], meta["normalisation"]["hi"]))
    assert props["mlm:output"][0]["name"] == "ice_probability" and props["icemap:threshold"] == meta["threshold"]
    weights = item["assets"]["weights"]
    assert "mlm:model" in weights["roles"] and props["mlm:framework"] == "PyTorch"
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert weights["file:checksum"] == "1220" + digest == "1220" + meta["weights_sha256"]
    assert [b["name"] for b in weights["raster:bands"]] == meta["channels"]
    with pytest.raises(ModelError, match="model.json"):
        describe_model(tmp_path)
