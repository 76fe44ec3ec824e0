"""Stores that plain xarray reads: no warning, the CRS through rioxarray, and icemap accepting
what ``xr.open_zarr`` returns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import zarr

import icemap

from .conftest import REPO, icemap_cli, require_module

# Runs in a fresh interpreter that never imports icemap: what a user with plain xarray sees.
PLAIN = """
import json, sys, warnings
import xarray as xr, rioxarray
out = {}
for p in sys.argv[1:]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # opening must not warn (consolidated metadata, decoding...)
        ds = xr.open_zarr(p)
    var = "reflectance" if "reflectance" in ds else "ice"
    out[p] = {"crs": ds.rio.crs.to_epsg(), "var_crs": ds[var].rio.crs.to_epsg(),
              "transform": list(ds.rio.transform())[:6], "coords": sorted(map(str, ds.coords)),
              "times": int(ds.sizes["time"]), "icemap": "icemap" in sys.modules}
print(json.dumps(out))
"""


def _plain_open(*paths: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", PLAIN, *map(str, paths)], capture_output=True, text=True,
                         timeout=120, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def stores(small_region: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("interop")
    items = icemap.search(small_region.catalog).items()
    cube = icemap.load(items, bands=["green", "swir16", "nir08"], chunksize=64)
    paths = {}
    for fmt in (2, 3):
        paths[f"cube{fmt}"] = tmp / f"cube{fmt}.zarr"
        icemap.write_cube(cube, paths[f"cube{fmt}"], zarr_format=fmt)
        paths[f"ice{fmt}"] = tmp / f"ice{fmt}.zarr"
        ice = icemap.ice_mask(icemap.open_cube(paths[f"cube{fmt}"])).to_dataset(name="ice")
        icemap.write_product(ice, paths[f"ice{fmt}"], zarr_format=fmt)
        paths[f"comp{fmt}"] = tmp / f"comp{fmt}.zarr"
        icemap.composite(icemap.open_cube(paths[f"cube{fmt}"]), paths[f"comp{fmt}"], zarr_format=fmt)
    return paths


def test_plain_xarray_opens_every_store_with_its_crs(stores: dict[str, Path]) -> None:
    got = _plain_open(*stores.values())
    for name, path in stores.items():
        ours = icemap.open_cube(path)
        g = got[str(path)]
        assert not g["icemap"]
        assert g["crs"] == g["var_crs"] == ours.rio.crs.to_epsg(), name
        assert g["transform"] == list(ours.rio.transform())[:6]
        assert "spatial_ref" in g["coords"] and g["times"] == ours.sizes["time"]


def test_consolidated_metadata_follows_appends_and_resumes(small_region: Any, tmp_path: Path) -> None:
    items = icemap.search(small_region.catalog).items()
    cube = icemap.load(items, bands=["green", "swir16"], chunksize=64)
    path = tmp_path / "c.zarr"
    icemap.write_cube(cube.isel(time=[0]), path, zarr_format=2)
    assert (path / ".zmetadata").exists() and _plain_open(path)[str(path)]["times"] == 1
    icemap.write_cube(cube, path, zarr_format=2)  # appends the other dates
    assert _plain_open(path)[str(path)]["times"] == cube.sizes["time"]
    # The append kept the attributes netCDF cannot hold as JSON text.
    group_attrs = zarr.open_group(str(path), mode="r").attrs
    assert isinstance(group_attrs["mask_flags"], str) and "mask_flags" in group_attrs["icemap:json"]
    # An interrupted step is still found (icemap does not trust the consolidated view).
    zarr.open_group(str(path), mode="r+")["complete"][1] = 0
    with pytest.warns(icemap.errors.StoreWarning, match="incomplete"):
        assert icemap.open_cube(path).sizes["time"] == cube.sizes["time"] - 1
    report = icemap.write_cube(cube, path, zarr_format=2)
    assert len(report.written) == 1


def test_evaluate_and_accessor_take_plain_xarray_objects(stores: dict[str, Path], small_region: Any) -> None:
    import warnings

    import xarray as xr

    import icemap.accessor  # noqa: F401  (as `import icemap` does when xarray came first)

    outlines = small_region.outlines
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = xr.open_zarr(stores["ice3"])["ice"]
    assert plain.dtype == np.uint8  # no CF _FillValue on masks: plain xarray keeps them integer
    ours = icemap.open_cube(stores["ice3"])["ice"]
    expected = icemap.evaluate(ours, outlines)
    assert icemap.evaluate(plain, outlines) == expected
    assert plain.icemap.evaluate(outlines) == expected
    from icemap.interop import restore_mask

    # A mask of an older store (CF-decoded to float with NaN) is turned back.
    np.testing.assert_array_equal(restore_mask(plain.where(plain != 255)).values, ours.values)


def test_accessor_registered_when_xarray_came_first() -> None:
    code = "import xarray as xr, icemap; print(hasattr(xr.Dataset, 'icemap'))"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True).stdout.strip() == "True"


# -- CF metadata, dtypes and netCDF ---------------------------------------------------------------
def test_plain_xarray_reads_cf_metadata_and_integer_flags(stores: dict[str, Path]) -> None:
    import xarray as xr

    from icemap.composite import source_dates

    for name, path in stores.items():
        ds = xr.open_zarr(path)
        assert ds.attrs["Conventions"] == "CF-1.8", name
        for dim in ("x", "y"):
            assert ds[dim].attrs["units"] == "m" and ds[dim].attrs["standard_name"] == f"projection_{dim}_coordinate"
        ours = icemap.open_cube(path)
        # Flags and masks stay integer (no CF _FillValue), with the values icemap reads.
        for var in ("qa_pixel", "ice", "clear_count", "complete"):
            if var in ds:
                assert ds[var].dtype == ours[var].dtype and ds[var].dtype.kind == "u", (name, var)
                np.testing.assert_array_equal(ds[var].values, ours[var].values)
        if "ice" in ds:
            assert list(ds["ice"].attrs["flag_values"]) == [0, 1, 255]
            assert ds["ice"].attrs["flag_meanings"].split() == ["no_ice", "ice", "no_data"]
            assert set(np.unique(ds["ice"].values)) <= {0, 1, 255}
        if "qa_pixel" in ds:
            assert "cloud" in ds["qa_pixel"].attrs["flag_meanings"].split()
            # Bitwise QA tests work on what plain xarray returns.
            assert ((ds["qa_pixel"] & 1) == (ours["qa_pixel"] & 1)).all()
        if "source_date" in ds:
            # CF time: decodes as datetime64 (NaT where no observation), equal to icemap's reading.
            assert np.issubdtype(ds["source_date"].dtype, np.datetime64)
            got, want = ds["source_date"].values, source_dates(ours).values
            np.testing.assert_array_equal(np.isnat(got), np.isnat(want))
            assert np.abs(got[~np.isnat(got)] - want[~np.isnat(want)]).max() <= np.timedelta64(1, "s")
            assert (~np.isnat(got)).any()
            np.testing.assert_array_equal(source_dates(ds).values, got)


def test_opened_stores_go_to_netcdf_and_back(stores: dict[str, Path], tmp_path: Path) -> None:
    import xarray as xr

    from icemap.interop import decode_attrs

    restored = 0
    for name, path in stores.items():
        ds = xr.open_zarr(path)
        # scipy writes netCDF3, which has no unsigned integers: store those as int32 there (a
        # netCDF4 engine writes them as they are).
        enc = {v: {"dtype": "int32"} for v in ds.data_vars if ds[v].dtype.kind == "u"}
        nc = tmp_path / f"{name}.nc"
        ds.to_netcdf(nc, engine="scipy", encoding=enc)
        with xr.open_dataset(nc, engine="scipy") as back:
            for var in ds.data_vars:
                np.testing.assert_array_equal(back[var].values, ds[var].values, err_msg=f"{name} {var}")
            # The attributes icemap stored as JSON text come back as they were.
            ours = icemap.open_cube(path)
            for var in [None, *ds.data_vars]:
                attrs, want = (back.attrs, ours.attrs) if var is None else (back[var].attrs, ours[var].attrs)
                as_json = [k for k in str(attrs.get("icemap:json", "")).split(",") if k]
                decoded = decode_attrs(attrs)
                assert all(decoded[k] == want[k] for k in as_json), (name, var)
                restored += len(as_json)
            if name.startswith("comp"):
                assert isinstance(decode_attrs(back.attrs)["icemap:composite"], dict)
    assert restored >= 6  # e.g. the cube's mask_flags and mask_saturated, the mask's guards


def test_store_attributes_round_trip_through_json_text(tmp_path: Path) -> None:
    from icemap.interop import decode_attrs, encode_attrs

    attrs = {"search": {"bbox": [1.0, 2.0, 3.0, 4.0], "max_cloud": None}, "signed": False, "guards": [],
             "bands": ["green", "swir16"], "threshold": 0.4, "flag_values": [0, 1, 255], "text": "{not json"}
    enc = encode_attrs(attrs)
    assert all(isinstance(v, (str, int, float)) or (isinstance(v, list) and v and
                                                    all(isinstance(x, (int, float)) for x in v))
               for v in enc.values())
    assert enc["text"] == "{not json" and decode_attrs(enc) == attrs


# -- COGs -----------------------------------------------------------------------------------------
def test_cog_tags_and_colour_table(stores: dict[str, Path], tmp_path: Path) -> None:
    import rasterio

    product = icemap.open_cube(stores["ice3"])
    paths = icemap.export_geotiffs(product, tmp_path, variables=["ice"])
    assert len(paths) == product.sizes["time"]
    for i, p in enumerate(paths):
        with rasterio.open(p) as src:
            tags = src.tags()
            t = np.datetime64(product["time"].values[i], "s").astype(object)
            assert tags["datetime"] == t.strftime("%Y-%m-%dT%H:%M:%SZ")
            assert tags["TIFFTAG_DATETIME"] == t.strftime("%Y:%m:%d %H:%M:%S")
            assert tags["method"] == product["ice"].attrs["method"]
            assert float(tags["threshold"]) == product["ice"].attrs["threshold"]
            assert tags["source_items"] == str(product["item_ids"].values[i])
            assert src.descriptions == (product["ice"].attrs["long_name"],)
            cmap = src.colormap(1)
            assert cmap[1] != cmap[0] and cmap[255][3] == 0  # ice and no ice differ; nodata transparent


# -- API corrections ------------------------------------------------------------------------------
def test_area_has_its_own_attributes_and_one_date_keeps_its_time(stores: dict[str, Path]) -> None:
    ice = icemap.open_cube(stores["ice3"])["ice"]
    area = ice.icemap.area_km2()
    assert area.attrs == {"long_name": "ice area", "units": "km2"}
    one = ice.isel(time=1)
    gdf = icemap.polygonise(one)
    # Outlines carry UTC times (the mask's times are UTC, stored naive).
    assert len(gdf) and (gdf["time"] == pd.Timestamp(ice["time"].values[1]).tz_localize("UTC")).all()
    np.testing.assert_allclose(gdf["area_km2"].sum(), float(one.icemap.area_km2()))


def test_accessor_predict_uses_the_default_model(small_region: Any) -> None:
    from icemap.errors import ModelError

    cube = icemap.load(icemap.search(small_region.catalog).items(), bands=["green", "swir16"])
    # Both refuse the same way: the default model's bands are missing (no model was demanded).
    with pytest.raises(ModelError) as direct:
        icemap.predict(cube)
    with pytest.raises(ModelError) as via_accessor:
        cube.icemap.predict()
    assert str(via_accessor.value) == str(direct.value)


@pytest.mark.process
@pytest.mark.parametrize("entry", ["script", "-m icemap", "-m icemap.cli"])
def test_entry_points_run_the_cli(entry: str) -> None:
    """The console script and both ``python -m`` forms reach the same command line (the rest of
    the suite calls ``icemap.cli.main`` in-process): the version, and a usage error as exit 2."""
    exe = [str(Path(sys.executable).with_name("icemap"))] if entry == "script" else [sys.executable, *entry.split()]
    if entry == "script" and not Path(exe[0]).exists():
        pytest.fail(f"the icemap console script is not installed beside {sys.executable}: pip install -e .")
    out = subprocess.run([*exe, "--version"], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip() == f"icemap {icemap.__version__}", out.stderr
    bad = subprocess.run([*exe, "search", "--no-such-option"], capture_output=True, text=True, timeout=120,
                         check=False)
    assert bad.returncode == 2 and "No such option" in bad.stderr and "Traceback" not in bad.stderr


def test_version_option() -> None:
    out = icemap_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"icemap {icemap.__version__}"


def test_search_items_are_pystac_items_that_odc_stac_loads(small_region: Any) -> None:
    import pystac

    s = icemap.search(small_region.catalog)
    items = s.items()
    dicts = s.item_dicts()
    assert items and all(isinstance(it, pystac.Item) for it in items)
    assert [it.id for it in items] == [d["id"] for d in dicts]
    ours = icemap.load(items, bands=["green"])
    assert ours.sizes["time"] == icemap.load(dicts, bands=["green"]).sizes["time"]
    odc_stac = require_module("odc.stac", "bench")
    loaded = odc_stac.load(items, bands=["green"], chunks={})
    assert loaded.sizes["time"] == len(items) and loaded.odc.geobox.crs.epsg == ours.rio.crs.to_epsg()
    # stackstac.stack on the same Items: tests/test_loader_engines.py (the stackstac environment).
