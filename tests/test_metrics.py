"""Accuracy metrics: counts against numpy, chunk invariance, laziness, calibration, sample region.

Every expected value here is computed independently in the test with plain numpy boolean
arithmetic (sklearn is not a dependency), never with icemap.metrics' own helpers.
"""

from __future__ import annotations

import json
import math
from typing import Any

import dask.array as da
import numpy as np
import pytest
import rasterio
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import icemap
from icemap import metrics as m
from icemap.errors import IcemapError
from icemap.index import normalized_difference
from icemap.labels import glacier_ids, rasterize_outlines, read_outlines
from icemap.sample import CLASS_CODES
from icemap.stac import search

from .conftest import raise_if_dask_computes

ICE, SNOW, WATER, CLOUD = CLASS_CODES["ice"], CLASS_CODES["snow"], CLASS_CODES["water"], CLASS_CODES["cloud"]


# -- independent reference implementation ------------------------------------------------------
def numpy_counts(pred: np.ndarray, ref: np.ndarray, valid: np.ndarray | None = None) -> dict[str, int]:
    """tn/fp/fn/tp by boolean masks: 0/1 are values, anything else is nodata."""
    ref = np.broadcast_to(ref, pred.shape)
    ok = np.isin(pred, (0, 1)) & np.isin(ref, (0, 1))
    if valid is not None:
        ok &= np.broadcast_to(valid, pred.shape).astype(bool)
    p, r = (pred == 1) & ok, (ref == 1) & ok
    return {
        "tn": int((~p & ~r & ok).sum()),
        "fp": int((p & ~r).sum()),
        "fn": int((~p & r & ok).sum()),
        "tp": int((p & r).sum()),
    }


def numpy_scores(c: dict[str, int], px_m2: float) -> dict[str, float]:
    """Textbook formulas, written out on the 2x2 matrix."""
    tp, fp, fn, tn = (float(c[k]) for k in ("tp", "fp", "fn", "tn"))
    n = tp + fp + fn + tn
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    po = (tp + tn) / n
    # chance agreement: product of the two raters' marginal shares, summed over both classes
    pe = ((tp + fp) / n) * ((tp + fn) / n) + ((tn + fn) / n) * ((tn + fp) / n)
    pred_km2, ref_km2 = (tp + fp) * px_m2 / 1e6, (tp + fn) * px_m2 / 1e6
    return {
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall),
        "iou": tp / (tp + fp + fn),
        "balanced_accuracy": 0.5 * (tp / (tp + fn) + tn / (tn + fp)),
        "overall_accuracy": po,
        "kappa": (po - pe) / (1 - pe),
        "missed_alarm": fn / (tp + fn),
        "false_alarm": fp / (tp + fp),
        "ice_area_km2": pred_km2,
        "reference_area_km2": ref_km2,
        "area_diff_pct": 100 * (pred_km2 - ref_km2) / ref_km2,
    }


def random_case(seed: int, nt: int = 3, ny: int = 37, nx: int = 41) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "pred": rng.choice(np.array([0, 1, 255], np.uint8), size=(nt, ny, nx), p=[0.55, 0.35, 0.10]),
        "ref": rng.choice(np.array([0, 1, 255], np.uint8), size=(ny, nx), p=[0.6, 0.35, 0.05]),
        "valid": rng.random((ny, nx)) > 0.15,
        "ids": rng.integers(0, 6, size=(ny, nx)).astype(np.int32),
        "index": rng.uniform(-1, 1, size=(nt, ny, nx)).astype(np.float32),
    }


def cube_da(a: np.ndarray, chunks: Any) -> xr.DataArray:
    dims = ("time", "y", "x") if a.ndim == 3 else ("y", "x")
    return xr.DataArray(da.from_array(a, chunks=chunks), dims=dims)


# -- counts and scores against numpy -----------------------------------------------------------
def test_confusion_and_scores_equal_numpy() -> None:
    c = random_case(0)
    pred = cube_da(c["pred"], (2, 10, 13))
    conf = m.confusion(pred, c["ref"], valid=c["valid"])
    assert conf.dims == ("outcome",) and list(conf["outcome"].values) == ["tn", "fp", "fn", "tp"]
    assert isinstance(conf.data, da.Array)  # lazy, because the prediction is
    expected = numpy_counts(c["pred"], c["ref"], c["valid"])
    assert dict(zip(conf["outcome"].values, conf.values.tolist())) == expected

    got = m.scores(conf, pixel_area_m2=900.0)
    assert tuple(got) == m.SCORE_KEYS
    for key, value in numpy_scores(expected, 900.0).items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    for key in ("tp", "fp", "fn", "tn"):
        assert got[key] == expected[key] and isinstance(got[key], int)
    assert got["n_pixels"] == sum(expected.values())


def test_confusion_per_time_and_by_id_equal_numpy() -> None:
    c = random_case(1)
    pred = cube_da(c["pred"], (1, 16, 16))
    conf = m.confusion(pred, c["ref"], valid=c["valid"], by=c["ids"], ids=5, per_time=True).compute()
    assert conf.dims == ("time", "outcome", "id")
    for t in range(c["pred"].shape[0]):
        for gid in range(6):
            sel = c["valid"] & (c["ids"] == gid)
            exp = numpy_counts(c["pred"][t], c["ref"], sel)
            assert conf.sel(id=gid).isel(time=t).values.tolist() == [exp[o] for o in m.OUTCOMES]
    # A subset of ids drops the others, and sums over ids/time give the plain counts.
    sub = m.confusion(pred, c["ref"], by=c["ids"], ids=[2, 4]).compute()
    assert list(sub["id"].values) == [2, 4]
    exp4 = numpy_counts(c["pred"], c["ref"], c["ids"] == 4)
    assert sub.sel(id=4).values.tolist() == [exp4[o] for o in m.OUTCOMES]
    total = m.confusion(pred, c["ref"], valid=c["valid"]).compute()
    np.testing.assert_array_equal(conf.sum(("time", "id")).values, total.values)

    table = m.scores_per_id(conf.sum("time"), pixel_area_m2=900.0)
    assert list(table.index) == [1, 2, 3, 4, 5]  # id 0 (no glacier) left out by default
    exp3 = numpy_counts(c["pred"], c["ref"], c["valid"] & (c["ids"] == 3))
    assert table.loc[3, "f1"] == pytest.approx(numpy_scores(exp3, 900.0)["f1"])
    assert table.loc[3, "tp"] == exp3["tp"]


def test_numpy_inputs_give_computed_counts_and_reference_nodata_is_excluded() -> None:
    pred = np.array([[1, 1, 0, 0], [1, 0, 255, 1]], np.uint8)
    ref = np.array([[1, 0, 1, 0], [255, 0, 1, 1]], np.uint8)
    conf = m.confusion(pred, ref)
    assert isinstance(conf.data, np.ndarray)
    assert conf.values.tolist() == [2, 1, 1, 2]  # tn fp fn tp; (1,0) ref nodata, (1,2) pred nodata
    # bool masks are accepted as 0/1
    assert m.confusion(pred == 1, ref).values.tolist() == [2, 1, 2, 2]  # 255 became 0


def test_undefined_ratios_are_nan_not_errors() -> None:
    # No ice anywhere, in either map: every ratio about ice is 0/0.
    got = m.scores({"tn": 10, "fp": 0, "fn": 0, "tp": 0}, pixel_area_m2=900.0)
    for key in ("f1", "precision", "recall", "iou", "missed_alarm", "false_alarm", "area_diff_pct",
                "kappa", "balanced_accuracy"):
        assert math.isnan(got[key]), key
    assert got["overall_accuracy"] == 1.0 and got["ice_area_km2"] == 0.0
    # JSON: the CLI maps NaN to null; the dict itself must serialise without a crash.
    assert json.loads(json.dumps(got).replace("NaN", "null"))["f1"] is None
    # Ice predicted where the reference has none: precision 0, recall undefined.
    got = m.scores({"tn": 5, "fp": 5, "fn": 0, "tp": 0}, pixel_area_m2=900.0)
    assert got["precision"] == 0.0 and math.isnan(got["recall"]) and got["f1"] == 0.0


def test_errors_are_clear() -> None:
    pred = np.zeros((8, 8), np.uint8)
    with pytest.raises(m.NoValidPixelsError, match="no pixel is valid"):
        m.scores(m.confusion(np.full((8, 8), 255, np.uint8), pred))
    with pytest.raises(m.NoValidPixelsError):
        m.scores(m.confusion(pred, pred, valid=np.zeros((8, 8), bool)))
    with pytest.raises(m.GridMismatchError, match="rasterise"):
        m.confusion(pred, np.zeros((8, 9), np.uint8))
    with pytest.raises(m.MetricsError, match="ice_mask"):
        m.confusion(pred.astype(np.float32), pred)
    with pytest.raises(m.MetricsError, match="scores_per_id"):
        m.scores(m.confusion(pred, pred, by=pred.astype(np.int32), ids=1))
    with pytest.raises(m.MetricsError, match="method"):
        m.unsupervised_threshold(pred.astype(np.float32), method="kmeans")  # type: ignore[arg-type]
    assert issubclass(m.GridMismatchError, IcemapError) and issubclass(m.NoValidPixelsError, ValueError)


def test_grid_mismatch_on_georeferenced_rasters(sample_region: Any) -> None:
    ds = icemap.load(search(sample_region.catalog).item_dicts(), bands=["green", "swir16"], chunksize=64)
    ice = icemap.ice_mask(ds).isel(time=0)
    ref = rasterize_outlines(read_outlines(sample_region.outlines, layer="glaciers"), ice)
    m.confusion(ice, ref)  # same grid: fine
    shifted = ref.assign_coords(x=ref["x"] + 30.0)
    with pytest.raises(m.GridMismatchError, match="x coordinates differ"):
        m.confusion(ice, shifted)
    with pytest.raises(m.GridMismatchError, match="EPSG:32619"):
        m.confusion(ice, ref.rio.write_crs("EPSG:32619"))
    with pytest.raises(m.GridMismatchError):
        m.confusion(ice, ref.isel(y=slice(1, None)))
    # An equivalent CRS definition (WKT instead of the EPSG code) is the same grid.
    m.confusion(ice, ref.rio.write_crs(ice.rio.crs.to_wkt()))


# -- chunk invariance and the index's range (hypothesis) -------------------------------------
def _chunks(draw: Any, n: int) -> tuple[int, ...]:
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=4))) if n > 1 else []
    edges = [0, *cuts, n]
    return tuple(b - a for a, b in zip(edges, edges[1:]))


@st.composite
def chunked_case(draw: Any) -> tuple[dict[str, np.ndarray], tuple[tuple[int, ...], ...]]:
    seed = draw(st.integers(0, 2**16))
    nt, ny, nx = draw(st.integers(1, 3)), draw(st.integers(1, 20)), draw(st.integers(1, 20))
    case = random_case(seed, nt, ny, nx)
    return case, (_chunks(draw, nt), _chunks(draw, ny), _chunks(draw, nx))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunked_case())
def test_any_chunking_gives_identical_counts(case: Any) -> None:
    c, chunks = case
    ref = xr.DataArray(da.from_array(c["ref"], chunks=chunks[1:]), dims=("y", "x"))
    ids = xr.DataArray(c["ids"], dims=("y", "x"))
    whole = m.confusion(c["pred"], c["ref"], valid=c["valid"], by=c["ids"], ids=5, per_time=True)
    split = m.confusion(cube_da(c["pred"], chunks), ref, valid=c["valid"], by=ids, ids=5,
                        per_time=True).compute()
    np.testing.assert_array_equal(split.values, whole.values)
    sweep_whole = m.confusion_sweep(c["index"], c["ref"], thresholds=[-0.5, 0.0, 0.25, 0.4])
    sweep_split = m.confusion_sweep(cube_da(c["index"], chunks), ref, thresholds=[-0.5, 0.0, 0.25, 0.4])
    np.testing.assert_array_equal(sweep_split.compute().values, sweep_whole.values)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # float64 > float32 max
@settings(max_examples=300, deadline=None)
@given(
    hnp.arrays(np.float64, st.integers(1, 64), elements=st.floats(allow_nan=True, allow_infinity=True)),
    hnp.arrays(np.float64, st.integers(1, 64), elements=st.floats(allow_nan=True, allow_infinity=True)),
)
def test_normalized_difference_is_in_range_or_nan(a: np.ndarray, b: np.ndarray) -> None:
    n = min(a.size, b.size)
    # mix in the edge cases hypothesis might not hit: zeros, negatives, zero sums
    a, b = np.concatenate([a[:n], [0.0, -0.1, 0.3, -1.0]]), np.concatenate([b[:n], [0.0, 0.0, -0.2, 1.0]])
    out = normalized_difference(a, b)
    assert out.dtype == np.float32
    finite = ~np.isnan(out)
    assert ((out[finite] >= -1) & (out[finite] <= 1)).all()
    assert np.isnan(out[-4])  # 0 / 0
    assert np.isnan(out[-3])  # -0.1 clipped to 0, over 0: undefined
    assert out[-2] == 1.0  # swir clipped to 0
    assert out[-1] == -1.0


# -- laziness ------------------------------------------------------------------------------------
def test_building_counts_is_lazy(sample_region: Any) -> None:
    items = search(sample_region.catalog).item_dicts()
    outlines = read_outlines(sample_region.outlines, layer="glaciers")
    with raise_if_dask_computes():
        ds = icemap.load(items, bands=["green", "swir16"], chunksize=64)
        ice = icemap.ice_mask(ds, threshold=0.4)
        ref = rasterize_outlines(outlines, ice)
        ids, table = glacier_ids(outlines, ice)
        conf = m.confusion(ice, ref, by=ids, ids=int(table["gid"].max()), per_time=True)
        sweep = m.confusion_sweep(icemap.ndsi(ds), ref)
        hist = m.index_histogram(icemap.ndsi(ds))
        few = m.confusion_sweep(icemap.ndsi(ds), ref, thresholds=[0.2, 0.4])
    for lazy in (conf, sweep, hist):
        assert isinstance(lazy.data, da.Array)
    # One histogram task per chunk: the graph does not grow with the number of thresholds.
    assert len(sweep.data.__dask_graph__()) == len(few.data.__dask_graph__())


def _max_live_blocks(arr: da.Array, layer_prefix: str) -> int:
    """Replay dask's static order and count how many blocks of one input are held at once."""
    import dask
    from dask.core import get_dependencies
    from dask.order import order

    (opt,) = dask.optimize(arr)
    graph = dict(opt.__dask_graph__())
    deps = {k: get_dependencies(graph, k) for k in graph}
    waiting = dict.fromkeys(graph, 0)
    for ds in deps.values():
        for d in ds:
            waiting[d] += 1
    prio = order(graph)
    live: set[Any] = set()
    peak = 0
    for key in sorted(graph, key=lambda k: getattr(prio[k], "priority", prio[k])):
        live.add(key)
        for d in deps[key]:
            waiting[d] -= 1
            if waiting[d] == 0:
                live.discard(d)
        peak = max(peak, sum(1 for k in live if str(k).startswith(f"('{layer_prefix}")))
    return peak


@pytest.mark.parametrize("per_time", [False, True])
def test_reference_blocks_are_released_early(per_time: bool) -> None:
    # A (y, x) reference is shared by every time step. Reduced one time step at a time, the
    # scheduler would keep all 64 reference blocks alive until the last step (a full-size
    # reference in memory; 880 MB instead of 330 MB on 2 x 9000 x 9000). The counts of all
    # time steps of a spatial block are gathered first, so a reference block is freed as soon
    # as its time steps are done.
    pred = (da.random.random((3, 256, 256), chunks=(1, 32, 32)) > 0.5).astype(np.uint8)
    ref = da.random.randint(0, 2, (256, 256), chunks=(32, 32)).astype(np.uint8)
    pred_x, ref_x = xr.DataArray(pred, dims=("time", "y", "x")), xr.DataArray(ref, dims=("y", "x"))
    assert _max_live_blocks(m.confusion(pred_x, ref_x, per_time=per_time).data, "randint") <= 4
    sweep = m.confusion_sweep(pred_x.astype(np.float32), ref_x)
    assert _max_live_blocks(sweep.data, "randint") <= 4


# -- threshold calibration ---------------------------------------------------------------------
def test_sweep_equals_ice_mask_plus_confusion(sample_region: Any) -> None:
    # Read once (persist keeps the dask chunks): the sweep and every mask compute from the same pixels.
    ds = icemap.load(search(sample_region.catalog).item_dicts(), bands=["green", "swir16"], chunksize=64).persist()
    with rasterio.open(sample_region.truth(sample_region.dates[0])) as f:
        cls = f.read(1)
    ref = np.where(cls == ICE, 1, 0).astype(np.uint8)
    valid = cls != WATER
    thresholds = [-0.3, 0.0, 0.1, 0.2, 0.4, 0.55, 0.8, 0.86]
    curve = m.threshold_sweep(icemap.ndsi(ds), ref, thresholds=thresholds, valid=valid).set_index("threshold")
    assert list(curve.index) == thresholds  # shown as given, compared in float32
    ndsi_values = icemap.ndsi(ds).values
    for t in thresholds:
        conf = m.confusion(icemap.ice_mask(ds, threshold=t), ref, valid=valid).compute()
        assert curve.loc[t, list(m.OUTCOMES)].tolist() == conf.values.tolist(), t
        got = m.scores(conf)
        assert curve.loc[t, "f1"] == pytest.approx(got["f1"])
        assert curve.loc[t, "kappa"] == pytest.approx(got["kappa"])
        assert curve.loc[t, "ice_area_km2"] == pytest.approx(got["ice_area_km2"])
    # Values sitting exactly on a threshold count as ice (>=), as in ice_mask.
    on_edge = np.float32(ndsi_values[np.isfinite(ndsi_values)][123])
    edge_curve = m.threshold_sweep(icemap.ndsi(ds), ref, thresholds=[float(on_edge)])
    conf = m.confusion(icemap.ice_mask(ds, threshold=float(on_edge)), ref).compute()
    assert edge_curve[list(m.OUTCOMES)].values[0].tolist() == conf.values.tolist()


def test_best_threshold_picks_the_optimum_and_the_middle_of_ties() -> None:
    import pandas as pd

    curve = pd.DataFrame({"threshold": [0.0, 0.1, 0.2, 0.3, 0.4], "f1": [0.5, 0.9, 0.9, 0.9, np.nan],
                          "false_alarm": [0.3, 0.2, 0.1, 0.05, 0.01]})
    assert m.best_threshold(curve) == 0.2
    assert m.best_threshold(curve, "false_alarm") == 0.4  # lower is better


def test_best_threshold_with_a_tolerance_takes_the_top_of_the_plateau() -> None:
    import pandas as pd

    curve = pd.DataFrame({"threshold": [0.1, 0.3, 0.5, 0.7, 0.9], "f1": [0.90, 0.987, 0.990, 0.986, 0.95]})
    assert m.best_threshold(curve) == 0.5
    assert m.best_threshold(curve, tolerance=0.005) == 0.7  # 0.986 is within 0.005 of 0.990; 0.95 is not
    assert m.best_threshold(curve, tolerance=0.05) == 0.9
    with pytest.raises(m.MetricsError, match="tolerance"):
        m.best_threshold(curve, tolerance=-0.1)


def _two_modes(seed: int, low: float, high: float, share_high: float, n: int = 40_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = int(n * share_high)
    vals = np.concatenate([rng.normal(low, 0.08, n - k), rng.normal(high, 0.06, k)])
    vals = np.clip(vals, -1, 1).astype(np.float32)
    vals[::97] = np.nan  # nodata is ignored
    return vals.reshape(200, -1)


@pytest.mark.parametrize("method", ["otsu", "valley"])
@pytest.mark.parametrize(("low", "high", "share"), [(-0.35, 0.75, 0.08), (-0.1, 0.55, 0.3)])
def test_unsupervised_threshold_falls_between_the_modes(method: str, low: float, high: float, share: float) -> None:
    index = _two_modes(0, low, high, share)
    t, curve = m.unsupervised_threshold(cube_da(index, (100, 100)), method=method)
    # Both modes are >= 5 sigma from the gap's middle, so the split must lie in the gap.
    assert low + 3 * 0.08 < t < high - 3 * 0.06
    assert {"threshold", "count"} <= set(curve.columns)
    assert int(curve["count"].sum()) == int(np.isfinite(index).sum())
    # The threshold is a bin edge: the histogram above it is exactly what ice_mask calls ice.
    above = int(curve.loc[curve["threshold"] >= t, "count"].sum())
    assert above == int((index >= t).sum())
    if method == "valley":
        lo_peak, hi_peak = curve.attrs["peaks"]
        assert abs(lo_peak - low) < 0.05 and abs(hi_peak - high) < 0.05


def test_valley_needs_two_peaks() -> None:
    one_mode = np.random.default_rng(1).normal(0.2, 0.1, (100, 100)).astype(np.float32)
    with pytest.raises(m.MetricsError, match="two peaks"):
        m.unsupervised_threshold(one_mode, method="valley")
    with pytest.raises(m.NoValidPixelsError):
        m.unsupervised_threshold(np.full((4, 4), np.nan, np.float32))


# -- the sample region: NDSI at 0.4 against the generator's truth ---------------------------
@pytest.fixture(scope="module")
def region_ice(sample_region: Any) -> Any:
    ds = icemap.load(search(sample_region.catalog).item_dicts(), bands=["green", "swir16"], chunksize=64)
    ice = icemap.ice_mask(ds, threshold=0.4).compute()
    classes, fractions = [], []
    for d in sample_region.dates:
        with rasterio.open(sample_region.truth(d)) as f:
            classes.append(f.read(1))
        with rasterio.open(sample_region.ice_fraction(d)) as f:
            fractions.append(f.read(1))
    # The clearest date: fewest cloud pixels in the truth (2022-02-07 for seed 3, 3.4 % cloud).
    clear = int(np.argmin([(c == CLOUD).sum() for c in classes]))
    return ice, np.stack(classes), np.stack(fractions), clear


def test_sample_region_ice_against_class_truth(region_ice: Any) -> None:
    ice, classes, fractions, t = region_ice
    pred, cls, frac = ice.isel(time=t), classes[t], fractions[t]
    ref = np.where(cls == CLASS_CODES["fill"], 255, cls == ICE).astype(np.uint8)

    # 1. Every pixel: NDSI cannot tell seasonal snow (and turbid/clear water) from ice, so
    #    against "ice" alone it over-maps. Measured on seed 3 / 2022-02-07: F1 0.666,
    #    precision 0.507, recall 0.970 (1813 snow pixels are "false" positives).
    got = m.scores(m.confusion(pred, ref))
    exp = numpy_counts(pred.values, ref)
    assert [got[k] for k in ("tn", "fp", "fn", "tp")] == [exp[k] for k in ("tn", "fp", "fn", "tp")]
    assert got["recall"] > 0.95
    assert 0.45 < got["precision"] < 0.6  # snow/water commission, not a metrics bug
    assert got["fp"] >= int(((pred.values == 1) & (cls == SNOW)).sum())

    # 2. Scored where the truth is neither snow nor water (the index's known blind spots,
    #    METHOD.md), the NDSI map is the ice: measured F1 0.969, P 0.969, R 0.970, kappa 0.966.
    #    The remaining errors are mixed border pixels (ice fraction near 0.5 on either side of
    #    the dominant-class rule) and ice under the darkest cloud shadows.
    not_snow_water = ~np.isin(cls, (SNOW, WATER))
    got = m.scores(m.confusion(pred, ref, valid=not_snow_water))
    assert got["f1"] > 0.95 and got["kappa"] > 0.95
    assert abs(got["area_diff_pct"]) < 1.0  # measured +0.09 % against the class raster

    # 3. Area against the sub-pixel truth, sum(ice_fraction) * 900 m2 over the scored pixels:
    #    measured 1.9485 km2 mapped vs 1.9571 km2 true (-0.44 %). Border pixels are all-or-
    #    nothing in the map but fractional in the truth; on a clear date these errors cancel
    #    to well under 1 %. (On the cloudiest date, 44 % cloud, they do not: +13 %, because
    #    thin cloud edges over snow-free rock pass the mask; that is why the test uses the
    #    clear date.)
    scored = not_snow_water & (pred.values != 255)
    true_km2 = float(frac[scored].sum(dtype=np.float64)) * 900 / 1e6
    assert got["ice_area_km2"] == pytest.approx(true_km2, rel=0.01)


def test_sample_region_per_glacier(sample_region: Any, region_ice: Any) -> None:
    ice, classes, _, t = region_ice
    pred = ice.isel(time=t)
    outlines = read_outlines(sample_region.outlines, layer="glaciers")
    total, per = m.evaluate(pred, outlines, per_glacier=True)
    assert total == m.evaluate(pred, outlines)  # the one-pass per-id route sums to the same

    # Independent: the generator's own rasterised outlines (pixel centres) and numpy.
    with rasterio.open(sample_region.glacier_ids) as f:
        gid = f.read(1)
    exp_total = numpy_counts(pred.values, (gid > 0).astype(np.uint8))
    assert [total[k] for k in ("tn", "fp", "fn", "tp")] == [exp_total[k] for k in ("tn", "fp", "fn", "tp")]
    assert list(per["glacier_id"]) == list(outlines["glacier_id"])
    for g, row in per.iterrows():
        inside = gid == g
        exp = numpy_counts(pred.values, np.ones_like(gid, np.uint8), inside)
        assert (row["tp"], row["fn"], row["fp"], row["tn"]) == (exp["tp"], exp["fn"], 0, 0)
        assert row["ice_area_km2"] == pytest.approx(exp["tp"] * 900 / 1e6)
    # Against outlines, debris-covered tongues (glaciers 1 and 3 carry debris) are missed by
    # any optical index: their recall is visibly lower than that of clean glaciers.
    debris = outlines.set_index("gid")["debris_km2"] > 0
    clean_recall = per.loc[~debris.reindex(per.index).to_numpy(), "recall"].median()
    assert per.loc[debris[debris].index, "recall"].max() < clean_recall

    # Per glacier against the *class* truth (by = the id raster): recall of visible ice.
    ref = (classes[t] == ICE).astype(np.uint8)
    conf = m.confusion(pred, ref, by=gid, ids=int(gid.max()))
    table = m.scores_per_id(conf)
    for g in (1, 2, 4):
        exp = numpy_counts(pred.values, ref, gid == g)
        assert table.loc[g, "tp"] == exp["tp"] and table.loc[g, "fn"] == exp["fn"]


def test_extended_mask_grows_the_reference(sample_region: Any, region_ice: Any) -> None:
    ice, _, _, t = region_ice
    outlines = read_outlines(sample_region.outlines, layer="glaciers")
    plain = m.evaluate(ice.isel(time=t), outlines)
    extended = m.evaluate(ice.isel(time=t), outlines, buffer_m=15.0)
    touched = m.evaluate(ice.isel(time=t), outlines, all_touched=True)
    # A 15 m disc around a pixel centre lies inside the 30 m pixel, so every pixel the buffer
    # adds is one the outline touches: plain < extended <= all_touched (measured on the clear
    # date: 2.54, 2.91, 3.00 km2).
    assert plain["reference_area_km2"] < extended["reference_area_km2"] <= touched["reference_area_km2"]
    assert plain["n_pixels"] == extended["n_pixels"]  # same scored pixels, other labels
    # A mixed border pixel mapped as ice becomes a true positive under the 15 m buffer.
    assert extended["tp"] > plain["tp"]


@pytest.mark.parametrize("all_touched", [False, True])
def test_chunked_rasterisation_equals_one_whole_burn(all_touched: bool) -> None:
    """Each block burns only the outlines a spatial index gives it; the raster equals one
    rasterio burn of every outline on the whole grid, overlaps (file order) included."""
    import geopandas as gpd
    import rioxarray  # noqa: F401
    import shapely
    import xarray as xr
    from rasterio.features import rasterize
    from rasterio.transform import from_origin

    from icemap.labels import glacier_ids

    rng = np.random.default_rng(11)
    transform = from_origin(500000.0, 7000000.0, 30.0, 30.0)
    h, w = 203, 170
    centres = rng.uniform([500000 + 100, 7000000 - h * 30 + 100], [500000 + w * 30 - 100, 7000000 - 100], (60, 2))
    polys = [shapely.Point(x, y).buffer(r, quad_segs=4) for (x, y), r in zip(centres, rng.uniform(20, 700, 60))]
    gdf = gpd.GeoDataFrame({"glacier_id": [f"G{i}" for i in range(60)]}, geometry=polys, crs="EPSG:32633")
    like = xr.DataArray(np.zeros((h, w), np.float32), dims=("y", "x"),
                        coords={"y": 7000000 - 15 - 30 * np.arange(h), "x": 500000 + 15 + 30 * np.arange(w)})
    like = like.rio.write_crs("EPSG:32633")
    whole = rasterize([(g, i + 1) for i, g in enumerate(polys)], out_shape=(h, w), transform=transform,
                      all_touched=all_touched, dtype="int32")
    for chunks in ((64, 64), (50, 33), (203, 170)):
        if all_touched:
            from icemap.labels import _burn

            got = _burn(gdf, np.arange(1, 61), like.chunk({"y": chunks[0], "x": chunks[1]}),
                        all_touched=True, dtype="int32").values
        else:
            got = glacier_ids(gdf, like.chunk({"y": chunks[0], "x": chunks[1]}))[0].values
        np.testing.assert_array_equal(got, whole)
