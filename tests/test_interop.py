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
import pytest
import zarr

import icemap

from .conftest import REPO

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
def stores(sample_region: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("interop")
    items = icemap.search(sample_region.catalog).items()
    cube = icemap.load(items, bands=["green", "swir16", "nir08"], chunksize=64)
    paths = {}
    for fmt in (2, 3):
        paths[f"cube{fmt}"] = tmp / f"cube{fmt}.zarr"
        icemap.write_cube(cube, paths[f"cube{fmt}"], zarr_format=fmt)
        paths[f"ice{fmt}"] = tmp / f"ice{fmt}.zarr"
        ice = icemap.ice_mask(icemap.open_cube(paths[f"cube{fmt}"])).to_dataset(name="ice")
        icemap.write_product(ice, paths[f"ice{fmt}"], zarr_format=fmt)
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


def test_consolidated_metadata_follows_appends_and_resumes(sample_region: Any, tmp_path: Path) -> None:
    items = icemap.search(sample_region.catalog).items()
    cube = icemap.load(items, bands=["green", "swir16"], chunksize=64)
    path = tmp_path / "c.zarr"
    icemap.write_cube(cube.isel(time=[0]), path, zarr_format=2)
    assert (path / ".zmetadata").exists() and _plain_open(path)[str(path)]["times"] == 1
    icemap.write_cube(cube, path, zarr_format=2)  # appends the other dates
    assert _plain_open(path)[str(path)]["times"] == cube.sizes["time"]
    # An interrupted step is still found (icemap does not trust the consolidated view).
    zarr.open_group(str(path), mode="r+")["complete"][1] = 0
    with pytest.warns(icemap.errors.StoreWarning, match="incomplete"):
        assert icemap.open_cube(path).sizes["time"] == cube.sizes["time"] - 1
    report = icemap.write_cube(cube, path, zarr_format=2)
    assert len(report.written) == 1


def test_evaluate_and_accessor_take_plain_xarray_objects(stores: dict[str, Path], sample_region: Any) -> None:
    import warnings

    import xarray as xr

    import icemap.accessor  # noqa: F401  (as `import icemap` does when xarray came first)

    outlines = sample_region.outlines
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = xr.open_zarr(stores["ice3"])["ice"]
    assert plain.dtype.kind == "f"  # CF decoding turned 255 into NaN
    ours = icemap.open_cube(stores["ice3"])["ice"]
    expected = icemap.evaluate(ours, outlines)
    assert icemap.evaluate(plain, outlines) == expected
    assert plain.icemap.evaluate(outlines) == expected
    from icemap.interop import restore_mask

    np.testing.assert_array_equal(restore_mask(plain).values, ours.values)


def test_accessor_registered_when_xarray_came_first() -> None:
    code = "import xarray as xr, icemap; print(hasattr(xr.Dataset, 'icemap'))"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True).stdout.strip() == "True"
