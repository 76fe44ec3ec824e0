"""Reflectance that cannot be right is said to be wrong: real pixels, correctly scaled or not.

The real Landsat points of ``rgi_benchmark_glacier_spectra`` are stored without Collection 2's
-0.2 offset (its README): a real case of a missing offset. The Sentinel-2 points, the HLS
Athabasca crop and the Landsat Liverpool crop are correctly scaled (with negative values).
The wrong cases are the same real values with the offset missing, applied twice, or a wrong
scale; GeoTIFF fixtures are written here from those values, never copied.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

import icemap
from icemap.errors import ImplausibleReflectanceWarning
from icemap.plausibility import assess_reflectance, check_reflectance

from .conftest import shared_path

LANDSAT = ["SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7"]
S2 = ["B2", "B3", "B4", "B8A", "B11", "B12"]
BAND_MAP = "blue=1,green=2,red=3,nir08=4,swir16=5,swir22=6"


def _points(name: str, bands: list[str]) -> np.ndarray:
    import pandas as pd

    df = pd.read_csv(shared_path("rgi_benchmark_glacier_spectra", name))
    return df[[b for b in bands if b in df.columns]].to_numpy(np.float32)


@pytest.mark.parametrize("name", ["Landsat_training_data.csv", "Landsat_manually_classified_points.csv"])
def test_real_landsat_points(name: str) -> None:
    stored = _points(name, LANDSAT)  # DN * 2.75e-5, without the -0.2 offset
    refl = stored - np.float32(0.2)
    assert assess_reflectance(refl).problem is None
    assert (refl < 0).any()  # real negatives, and still plausible
    missing = assess_reflectance(stored)
    assert missing.problem == "offset-missing" and missing.dark > 0.15
    assert assess_reflectance(refl - np.float32(0.2)).problem == "offset-doubled"
    assert assess_reflectance(stored / np.float32(2.75e-5)).problem == "scale-large"  # DNs as reflectance
    assert assess_reflectance(refl * np.float32(2.75e-5)).problem == "scale-small"  # scaled twice


@pytest.mark.parametrize("name", ["Sentinel-2_SR_training_data.csv", "Sentinel-2_SR_manually_classified_points.csv"])
def test_real_sentinel2_points(name: str) -> None:
    refl = _points(name, S2)
    assert assess_reflectance(refl).problem is None
    # Processing baseline 04.00's -0.1 applied to data that does not carry it.
    assert assess_reflectance(refl - np.float32(0.1)).problem == "offset-doubled"
    assert assess_reflectance(refl * np.float32(1e4)).problem == "scale-large"
    assert assess_reflectance(refl * np.float32(1e-4)).problem == "scale-small"


def test_too_few_values_say_nothing() -> None:
    assert assess_reflectance(np.full(50, 0.3, np.float32)).problem is None
    assert assess_reflectance(np.full((3, 1000), np.nan, np.float32)).n == 0


@pytest.fixture(scope="module")
def athabasca() -> Any:
    from icemap.lab.default import _athabasca

    return _athabasca(shared_path("athabasca_hls_l30").parent)


def test_real_crops(athabasca: Any) -> None:
    from icemap.lab.default import _liverpool

    liverpool = _liverpool(shared_path("xlandsat_liverpool_l2sp").parent)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImplausibleReflectanceWarning)
        for cube in (athabasca, liverpool, liverpool.chunk({"y": 100, "x": 64})):
            ranges = check_reflectance(cube)
            assert ranges and all(r.problem is None and r.n > 1000 for r in ranges)
        assert (athabasca["reflectance"] < 0).any()
    shifted = athabasca.copy()
    shifted["reflectance"] = athabasca["reflectance"] + np.float32(0.2)
    with pytest.warns(ImplausibleReflectanceWarning, match=r"--scale/--offset.*--offset -0\.2") as rec:
        check_reflectance(shifted, where="the Athabasca crop")
    msg = str(rec[0].message)
    assert "the Athabasca crop" in msg and "1st percentile 0.176" in msg and "offset looks missing" in msg
    assert "items_from_local_files" in msg
    # The U-Net on an in-memory cube checks it too.
    with pytest.warns(ImplausibleReflectanceWarning):
        icemap.predict(shifted)


def _landsat_tif(folder: Path) -> Path:
    """Real Landsat DNs (the rgi points, DN = stored / 2.75e-5) as a 6-band 64 x 64 GeoTIFF."""
    stored = _points("Landsat_training_data.csv", LANDSAT)
    stored = stored[np.isfinite(stored).all(axis=1)]
    rows = np.random.default_rng(0).permutation(len(stored))[:64 * 64]
    dn = np.round(stored[rows] / 2.75e-5).astype(np.uint16).T.reshape(6, 64, 64)
    path = folder / "landsat.tif"
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=6, dtype="uint16", nodata=0,
                       crs="EPSG:32606", transform=from_origin(580_000.0, 7_020_000.0, 30.0, 30.0)) as dst:
        dst.write(dn)
    return path


@pytest.mark.parametrize("scale, offset, says", [
    (2.75e-5, -0.2, None),
    (2.75e-5, 0.0, "offset looks missing"),
    (2.75e-5, -0.4, "offset applied twice"),
    (1.0, 0.0, "far above 1"),
])
def test_cli_ingest_and_map_files(tmp_path: Path, scale: float, offset: float, says: str | None) -> None:
    """``icemap ingest --files`` with a right or wrong --scale/--offset, then ``icemap map``
    (in-process): a wrong one is said at both steps, a right one never."""
    from typer.testing import CliRunner

    from icemap.cli import app

    tif = _landsat_tif(tmp_path)
    cube = tmp_path / "cube.zarr"
    steps = [["ingest", "--files", str(tif), "--band-map", BAND_MAP, "--datetime", "2021-07-01", "--scale",
              repr(scale), "--offset", repr(offset), "--out", str(cube), "--quiet"],
             ["map", "--cube", str(cube), "--out", str(tmp_path / "ndsi.zarr"), "--quiet"]]
    for args in steps:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        said = [str(w.message) for w in rec if issubclass(w.category, ImplausibleReflectanceWarning)]
        if says is None:
            assert said == []
        else:
            assert len(said) == 1 and says in said[0] and "--scale/--offset" in said[0], said
            assert str(cube) in said[0]


def test_cli_prints_the_warning(tmp_path: Path) -> None:
    """As a user sees it: one line naming the warning class and the options."""
    from .conftest import icemap_cli

    tif = _landsat_tif(tmp_path)
    res = icemap_cli("ingest", "--files", str(tif), "--band-map", BAND_MAP, "--datetime", "2021-07-01",
                     "--scale", "2.75e-5", "--offset", "0", "--out", str(tmp_path / "cube.zarr"), "--quiet")
    assert res.returncode == 0, res.stderr
    assert "warning (ImplausibleReflectanceWarning)" in res.stderr and "--offset" in res.stderr
