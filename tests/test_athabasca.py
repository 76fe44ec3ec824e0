"""Real data: NDSI ice on Athabasca Glacier (HLS L30, 2020-08-16) scored against its GLIMS outline.

The data and its caveats are described in ../shared/data/athabasca_hls_l30/README.md: the band
files carry a custom WKT equivalent to EPSG:32611, and the outline covers Athabasca Glacier
only, so ice elsewhere on the Columbia Icefield counts as false positives. The pipeline runs
end to end as a user would: STAC items -> icemap.load -> Zarr store -> open_cube -> ice_mask
-> evaluate; every number is checked against numpy on the TIFF arrays read with rasterio.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio

import icemap
from icemap import metrics as m
from icemap.labels import rasterize_outlines
from icemap.stac import item_from_files

from .conftest import shared_path

pytestmark = pytest.mark.shared_data

DATA = "athabasca_hls_l30"
BANDS = {"blue": "B02", "green": "B03", "red": "B04", "nir08": "B05", "swir16": "B06", "swir22": "B07"}
NODATA = -9999
SCALE = np.float32(1e-4)


def band_path(code: str) -> Path:
    return shared_path(DATA, f"athabasca_2020229_{code}_L30.tif")


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def hls_item() -> dict[str, Any]:
    """A STAC item for the crop. The files' custom WKT equals EPSG:32611 (data README)."""
    return item_from_files({name: band_path(code) for name, code in BANDS.items()},
                           id="HLS.L30.athabasca.2020229.v2.0", datetime="2020-08-16T00:00:00Z",
                           collection="hls", platform="landsat-8", crs="EPSG:32611")


@pytest.fixture(scope="module")
def cube(tmp_path_factory: pytest.TempPathFactory) -> Any:
    ds = icemap.load([hls_item()], sensor="hls", crs="EPSG:32611", bands=list(BANDS))
    store = tmp_path_factory.mktemp("athabasca") / "cube.zarr"
    icemap.write_cube(ds, store)
    return icemap.open_cube(store)


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    """Independent inputs straight from the TIFFs: DNs, validity, and the DERIVED label."""
    g, s = read(band_path("B03")), read(band_path("B06"))
    label = read(shared_path(DATA, "DERIVED_athabasca_outline_mask_30m.tif"))
    return {"green": g, "swir": s, "label": label}


def numpy_ndsi(g_dn: np.ndarray, s_dn: np.ndarray) -> np.ndarray:
    """NDSI from HLS DNs per the README: -9999 masked, reflectance = DN * 1e-4, negatives
    clipped to 0, G + S = 0 undefined. float32 throughout, the precision of a reflectance cube
    (see the tie note in test_evaluate_equals_numpy)."""
    g = np.clip(g_dn.astype(np.float32) * SCALE, 0, None)
    s = np.clip(s_dn.astype(np.float32) * SCALE, 0, None)
    with np.errstate(invalid="ignore", divide="ignore"):
        nd = (g - s) / (g + s)
    nd[(g_dn == NODATA) | (s_dn == NODATA) | ~(g + s > 0)] = np.nan
    return nd


def numpy_counts(ice: np.ndarray, label: np.ndarray, ok: np.ndarray) -> dict[str, int]:
    return {
        "tn": int((~ice & (label == 0) & ok).sum()),
        "fp": int((ice & (label == 0) & ok).sum()),
        "fn": int((~ice & (label == 1) & ok).sum()),
        "tp": int((ice & (label == 1) & ok).sum()),
    }


def test_cube_is_the_files(cube: Any, arrays: dict[str, np.ndarray]) -> None:
    assert cube.rio.crs.to_epsg() == 32611
    assert tuple(cube.rio.transform())[:6] == (30.0, 0.0, 477870.0, 0.0, -30.0, 5784480.0)
    green = cube["reflectance"].sel(band="green").isel(time=0).values
    dn = arrays["green"]
    np.testing.assert_array_equal(np.isnan(green), dn == NODATA)
    np.testing.assert_array_equal(green[dn != NODATA], dn[dn != NODATA].astype(np.float32) * SCALE)


def test_outline_raster_equals_derived_mask(cube: Any, arrays: dict[str, np.ndarray]) -> None:
    from rasterio.features import rasterize

    from icemap.labels import read_outlines

    ice = icemap.ice_mask(cube).isel(time=0)
    ref = rasterize_outlines(shared_path(DATA, "athabasca_outline.shp"), ice).values
    np.testing.assert_array_equal(ref, arrays["label"])
    # ... and our own rasterio rasterisation of the polygon (pixel-centre rule) agrees too.
    outline = read_outlines(shared_path(DATA, "athabasca_outline.shp"))
    with rasterio.open(band_path("B03")) as src:
        own = rasterize(outline.geometry, out_shape=src.shape, transform=src.transform, dtype="uint8")
    np.testing.assert_array_equal(own, arrays["label"])


def test_evaluate_equals_numpy(cube: Any, arrays: dict[str, np.ndarray]) -> None:
    ice = icemap.ice_mask(cube, threshold=0.4).isel(time=0)
    got = m.evaluate(ice, shared_path(DATA, "athabasca_outline.shp"))

    nd = numpy_ndsi(arrays["green"], arrays["swir"])
    ok = ~np.isnan(nd)
    exp = numpy_counts(nd >= np.float32(0.4), arrays["label"], ok)
    assert {k: got[k] for k in ("tn", "fp", "fn", "tp")} == exp
    assert got["n_pixels"] == int(ok.sum()) == 42663  # README: 42663 valid pixels

    tp, fp, fn, tn = (exp[k] for k in ("tp", "fp", "fn", "tn"))
    assert got["precision"] == pytest.approx(tp / (tp + fp), rel=1e-12)
    assert got["recall"] == pytest.approx(tp / (tp + fn), rel=1e-12)
    assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-12)
    assert got["ice_area_km2"] == pytest.approx((tp + fp) * 900 / 1e6)
    assert got["reference_area_km2"] == pytest.approx((tp + fn) * 900 / 1e6)

    # README's recomputed reference (float64, to 3 decimals): F1 0.697, P 0.552, R 0.946.
    # Measured here: F1 0.69712, P 0.55182, R 0.94630.
    assert got["f1"] == pytest.approx(0.697, abs=6e-4)
    assert got["precision"] == pytest.approx(0.552, abs=6e-4)
    assert got["recall"] == pytest.approx(0.946, abs=6e-4)
    # Predicted fraction 0.710, label fraction 0.414 of the valid pixels (README).
    assert (tp + fp) / got["n_pixels"] == pytest.approx(0.710, abs=6e-4)
    assert (tp + fn) / got["n_pixels"] == pytest.approx(0.414, abs=6e-4)

    # Tie note: DN pairs with (G - S) / (G + S) exactly 0.4 exist (G=63, S=27 at row 49,
    # col 52). float32 gives 0.40000004 (ice), float64 0.39999999999999997 (not ice): the
    # README's float64 check counts one false positive fewer. In exact rational arithmetic
    # the pixel is ice, like icemap: 5 (G - S) >= 2 (G + S) on clipped integer DNs.
    g = np.clip(arrays["green"].astype(np.int64), 0, None)
    s = np.clip(arrays["swir"].astype(np.int64), 0, None)
    exact = numpy_counts(5 * (g - s) >= 2 * (g + s), arrays["label"], ok)
    assert exact == exp

    # Per glacier: one outline, so the glacier row is the reference half of the matrix.
    total, per = m.evaluate(ice, shared_path(DATA, "athabasca_outline.shp"), per_glacier=True)
    assert total == got
    assert len(per) == 1
    row = per.iloc[0]
    assert (row["tp"], row["fn"], row["fp"], row["tn"]) == (tp, fn, 0, 0)
    assert row["outline_area_km2"] == pytest.approx(16.14, abs=0.01)


def test_threshold_sweep_and_best_threshold(cube: Any, arrays: dict[str, np.ndarray]) -> None:
    index = icemap.ndsi(cube).isel(time=0)
    reference = rasterize_outlines(shared_path(DATA, "athabasca_outline.shp"), index)
    curve = m.threshold_sweep(index, reference).set_index("threshold")
    assert len(curve) == 201 and curve.index[0] == -1.0 and curve.index[-1] == 1.0

    # Every threshold's counts equal numpy on the TIFF arrays with the same >= rule.
    nd = numpy_ndsi(arrays["green"], arrays["swir"])
    ok = ~np.isnan(nd)
    for t in curve.index:
        exp = numpy_counts(nd >= np.float32(t), arrays["label"], ok)
        assert curve.loc[t, ["tn", "fp", "fn", "tp"]].tolist() == [exp[k] for k in ("tn", "fp", "fn", "tp")], t
    at_04 = m.evaluate(icemap.ice_mask(cube, threshold=0.4).isel(time=0),
                       shared_path(DATA, "athabasca_outline.shp"))
    assert curve.loc[0.4, "f1"] == pytest.approx(at_04["f1"], rel=1e-12)

    # F1 rises slowly with the threshold up to 0.95 (F1 0.7240, P 0.600, R 0.912) and
    # collapses at 1.0. That optimum says more about the partial label than about NDSI: from
    # 0.4 to 0.95, 2863 false positives (unlabelled pixels of intermediate NDSI) leave for 615
    # true positives; with the icefield unlabelled (README), F1 rewards that trade.
    # Study a's 0.2 and the literature's 0.4 are within 0.04 F1 of it.
    best = m.best_threshold(curve.reset_index())
    assert best == pytest.approx(0.95)
    assert curve.loc[best, "f1"] == pytest.approx(0.7240, abs=1e-4)
    assert curve.loc[best, "f1"] - curve.loc[0.4, "f1"] < 0.03
    assert curve.loc[1.0, "f1"] < 0.3

    # Without a reference: the histogram is bimodal (rock/vegetation near -0.1, snow/ice near
    # 1); both unsupervised thresholds fall between the modes. Measured: Otsu 0.382, valley 0.478.
    t_otsu, _ = m.unsupervised_threshold(index, method="otsu")
    t_valley, hist = m.unsupervised_threshold(index, method="valley")
    assert t_otsu == pytest.approx(0.382, abs=1e-9) and t_valley == pytest.approx(0.478, abs=1e-9)
    assert hist.attrs["peaks"][0] < 0 < 0.9 < hist.attrs["peaks"][1]
