"""The kernel layer equals its plain-numpy reference, bit for bit.

Each reference below is the textbook numpy expression of the operation (full-size temporaries
and all): the kernels in :mod:`icemap.kernels` are fused loops whose only job is to compute the
same numbers faster. Inputs include the awkward values real scenes have: NaN, negative
reflectance, zeros in both bands, exact threshold ties, broadcast (y, x) operands.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from icemap import kernels as K


def _bands(rng: np.random.Generator, shape: tuple[int, ...], nan: float = 0.05) -> np.ndarray:
    a = rng.uniform(-0.05, 0.9, shape).astype(np.float32)
    a[rng.random(shape) < nan] = np.nan
    a[rng.random(shape) < 0.02] = 0.0
    return a


def ref_nd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.maximum(np.asarray(a, np.float32), np.float32(0))
    b = np.maximum(np.asarray(b, np.float32), np.float32(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a - b) / (a + b)


def ref_ice(g, s, thr, nir=None, elev=None, slope=None, nir_min=None, ndwi_max=None, green_min=None,
            elevation_min_m=None, slope_max_deg=None) -> np.ndarray:
    idx = ref_nd(g, s)
    out = np.where(idx >= np.float32(thr), 1, 0).astype(np.uint8)
    out[np.isnan(idx)] = 255
    shape = idx.shape
    rejected = np.zeros(shape, bool)
    unknown = np.zeros(shape, bool)
    if nir_min is not None or ndwi_max is not None:
        n = np.broadcast_to(nir, shape)
        unknown |= np.isnan(n)
        if nir_min is not None:
            rejected |= n < np.float32(nir_min)
        if ndwi_max is not None:
            rejected |= ref_nd(g, n) > np.float32(ndwi_max)
    if green_min is not None:
        rejected |= np.broadcast_to(g, shape) < np.float32(green_min)
    if elevation_min_m is not None:
        e = np.broadcast_to(elev, shape)
        unknown |= np.isnan(e)
        rejected |= e < np.float32(elevation_min_m)
    if slope_max_deg is not None:
        sl = np.broadcast_to(slope, shape)
        unknown |= np.isnan(sl)
        rejected |= sl > np.float32(slope_max_deg)
    cand = out == 1
    out[cand & rejected] = 0
    out[cand & ~rejected & unknown] = 255
    return out


@pytest.mark.parametrize("shape", [(7,), (5, 9), (3, 17, 31), (2, 1, 8, 8), (0, 4)])
def test_normalized_difference_equals_numpy(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(shape))
    a, b = _bands(rng, shape), _bands(rng, shape)
    np.testing.assert_array_equal(K.normalized_difference(a, b), ref_nd(a, b))


@pytest.mark.parametrize("undefined", [0.0, -1.0])
def test_normalized_difference_undefined_value(undefined: float) -> None:
    """``undefined`` replaces only the 0/0 of two clipped bands; NaN inputs stay NaN."""
    rng = np.random.default_rng(3)
    a, b = _bands(rng, (3, 17, 31)), _bands(rng, (3, 17, 31))
    a[0, :4], b[0, :4] = -0.02, rng.uniform(-0.05, 0.0, (4, 31))  # both at or below 0
    a[1, :2], b[1, :2] = np.nan, -0.01  # masked and negative
    ref = ref_nd(a, b)
    zero_zero = ~np.isnan(a) & ~np.isnan(b) & (np.maximum(a, 0) + np.maximum(b, 0) == 0)
    assert zero_zero.sum() >= 4 * 31 and np.isnan(ref[zero_zero]).all()
    ref[zero_zero] = undefined
    got = K.normalized_difference(a, b, undefined=undefined)
    np.testing.assert_array_equal(got, ref)
    assert np.isnan(got[1, :2]).all()
    np.testing.assert_array_equal(K.normalized_difference(a, b, undefined=np.nan), ref_nd(a, b))


def test_normalized_difference_writes_into_out_and_broadcasts() -> None:
    rng = np.random.default_rng(1)
    a, b = _bands(rng, (3, 40, 50)), _bands(rng, (40, 50))
    out = np.full((3, 40, 50), 7, np.float32)
    res = K.normalized_difference(a, b, out=out)
    assert res is out
    np.testing.assert_array_equal(out, ref_nd(a, b))
    # Non-contiguous inputs (a band sliced out of a cube) give the same numbers.
    cube = _bands(rng, (2, 4, 30, 20))
    np.testing.assert_array_equal(K.normalized_difference(cube[:, 1], cube[:, 3]), ref_nd(cube[:, 1], cube[:, 3]))
    # out= may be a slice of a larger destination (a chunk of a preallocated cube): written in place.
    dest = np.full((3, 60, 90), 9, np.float32)
    K.normalized_difference(a, b, out=dest[:, 10:50, 20:70])
    np.testing.assert_array_equal(dest[:, 10:50, 20:70], ref_nd(a, b))
    assert (dest[:, :10] == 9).all() and (dest[:, :, 70:] == 9).all()
    ice_dest = np.full((2, 3, 60, 90), 7, np.uint8)
    K.ice_mask(a[1], b, 0.4, out=ice_dest[1, 2, 10:50, 20:70])
    np.testing.assert_array_equal(ice_dest[1, 2, 10:50, 20:70], ref_ice(a[1], b, 0.4))
    assert (ice_dest[0] == 7).all()
    with pytest.raises(ValueError, match="out must be"):
        K.normalized_difference(a, b, out=np.empty((3, 40, 50), np.float64))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    thr=st.sampled_from([-1.0, 0.0, 0.1, 0.2, 0.4, 0.7, 1.0]),
    nir_min=st.sampled_from([None, 0.11, 0.3]),
    ndwi_max=st.sampled_from([None, 0.4]),
    green_min=st.sampled_from([None, 0.15]),
    elevation_min_m=st.sampled_from([None, 1500.0]),
    slope_max_deg=st.sampled_from([None, 60.0]),
    seed=st.integers(0, 1000),
)
def test_ice_mask_equals_numpy(thr, nir_min, ndwi_max, green_min, elevation_min_m, slope_max_deg, seed) -> None:
    rng = np.random.default_rng(seed)
    shape = (2, 23, 19)
    g, s, n = _bands(rng, shape), _bands(rng, shape), _bands(rng, shape, nan=0.1)
    # Exact ties with the threshold: NDSI == thr must be ice (>=).
    g[0, 0, :4], s[0, 0, :4] = np.float32(0.5), np.float32(0.5)
    elev = rng.uniform(1000, 2500, shape[1:]).astype(np.float32)
    elev[rng.random(shape[1:]) < 0.1] = np.nan
    slope = rng.uniform(0, 80, shape[1:]).astype(np.float32)
    slope[rng.random(shape[1:]) < 0.1] = np.nan
    kw = dict(nir_min=nir_min, ndwi_max=ndwi_max, green_min=green_min, elevation_min_m=elevation_min_m,
              slope_max_deg=slope_max_deg)
    want = ref_ice(g, s, thr, nir=n, elev=elev, slope=slope, **kw)
    ndsi = np.empty(shape, np.float32)
    got = K.ice_mask(g, s, thr, nir08=n, elevation=elev, slope=slope, ndsi_out=ndsi, **kw)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ndsi, ref_nd(g, s))


def test_ice_mask_needs_the_inputs_of_active_guards() -> None:
    g = np.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match="nir08"):
        K.ice_mask(g, g, 0.4, nir_min=0.11)


@pytest.mark.parametrize("with_qa,with_radsat", [(True, True), (True, False), (False, False)])
def test_scale_mask_equals_numpy(with_qa: bool, with_radsat: bool) -> None:
    rng = np.random.default_rng(3)
    shape = (3, 20, 30)
    dn = rng.integers(7000, 40000, shape).astype(np.float32)
    dn[rng.random(shape) < 0.05] = np.nan
    qa = rng.choice([21824, 21952, 22280, 1, 23888, 54596], size=shape).astype(np.float32)
    qa[rng.random(shape) < 0.05] = np.nan
    rs = rng.choice([0, 0, 0, 4, 8, 2048], size=shape).astype(np.float32)
    rs[rng.random(shape) < 0.05] = np.nan
    scale = np.array([2.75e-5, 2.75e-5, 1e-4], np.float32)
    offset = np.array([-0.2, -0.2, -0.1], np.float32)
    qa_bits, sat_bits = 0b11111 | (1 << 3), 4
    want = dn * scale[:, None, None] + offset[:, None, None]
    if with_qa:
        q = np.where(np.isnan(qa), 1, qa).astype(np.uint16)
        want[(q & np.uint16(qa_bits)) != 0] = np.nan
    if with_radsat:
        r = np.where(np.isnan(rs), 0, rs).astype(np.uint16)
        want[(r & np.uint16(sat_bits)) != 0] = np.nan
    got = K.scale_mask(dn, scale, offset, qa=qa if with_qa else None, qa_bits=qa_bits,
                       radsat=rs if with_radsat else None, sat_bits=sat_bits)
    np.testing.assert_array_equal(got, want)
    qa16 = K.qa_to_uint16(qa)
    np.testing.assert_array_equal(qa16, np.where(np.isnan(qa), 1, qa).astype(np.uint16))


@pytest.mark.parametrize("dtype,nodata", [(np.uint16, 0), (np.int16, -9999)])
def test_scale_mask_native_integers_equal_the_float_path(dtype: type, nodata: int) -> None:
    # odc-stac hands over DNs as read (uint16 Landsat/Sentinel-2, int16 HLS) with nodata where
    # nothing was read; stackstac hands over float32 with NaN there. Both give one reflectance.
    rng = np.random.default_rng(5)
    shape = (2, 17, 29)
    dn = rng.integers(1, 30000, shape).astype(dtype)
    dn[rng.random(shape) < 0.1] = nodata
    qa = rng.choice([21824, 22280, 1, 23888], size=shape).astype(np.uint16)
    rs = rng.choice([0, 0, 4, 8], size=shape).astype(np.uint16)
    scale, offset = np.float32(2.75e-5), np.float32(-0.2)
    as_float = np.where(dn == nodata, np.nan, dn).astype(np.float32)
    want = K.scale_mask(as_float, scale, offset, qa=qa.astype(np.float32), qa_bits=0b11111,
                        radsat=rs.astype(np.float32), sat_bits=4)
    got = K.scale_mask(dn, scale, offset, qa=qa, qa_bits=0b11111, radsat=rs, sat_bits=4,
                       nodata=np.array([nodata, nodata]))
    np.testing.assert_array_equal(got, want)
    assert np.isnan(got[dn == nodata]).all()


def test_probability_mask_equals_numpy() -> None:
    rng = np.random.default_rng(12)
    p = rng.random((2, 30, 40)).astype(np.float32)
    p[rng.random(p.shape) < 0.1] = np.nan
    p[0, 0, :3] = np.float32(0.5)
    want = np.where(np.isnan(p), 255, (p >= np.float32(0.5)).astype(np.uint8)).astype(np.uint8)
    np.testing.assert_array_equal(K.probability_mask(p, 0.5), want)


def test_qa_from_reflectance_flags_only_pixels_no_band_covers() -> None:
    rng = np.random.default_rng(13)
    refl = _bands(rng, (2, 3, 17, 23), nan=0.5)
    refl[0, :, 4, 5] = np.nan
    want = np.where(np.isnan(refl).all(axis=-3), K.QA_FILL, 0).astype(np.uint16)
    assert want.any() and not want.all()
    np.testing.assert_array_equal(K.qa_from_reflectance(refl), want)
    out = np.zeros((2, 17, 23), np.uint16)
    assert K.qa_from_reflectance(refl, out=out) is out


@pytest.mark.parametrize("shape", [(2, 2), (2, 9), (31, 17)])
def test_slope_equals_numpy_gradient(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(14)
    z = rng.normal(2000, 300, shape).astype(np.float32)
    z[rng.random(shape) < 0.05] = np.nan
    gy, gx = np.gradient(z.astype(np.float64), 30.0, 25.0)
    want = np.degrees(np.arctan(np.hypot(gx, gy))).astype(np.float32)
    # Same float64 arithmetic; libm's atan may round the last float64 bit differently from
    # numpy's, which survives the cast to float32 at most as one float32 ulp.
    np.testing.assert_array_max_ulp(K.slope_degrees(z, 30.0, 25.0), want, maxulp=1)
    assert np.array_equal(np.isnan(K.slope_degrees(z, 30.0, 25.0)), np.isnan(want))


def test_filled_flag_equals_numpy() -> None:
    rng = np.random.default_rng(16)
    before = _bands(rng, (2, 3, 12, 9), nan=0.4)
    after = before.copy()
    after[rng.random(after.shape) < 0.5] = 0.3  # filled here, unless it had a value
    want = (np.isnan(before) & ~np.isnan(after)).any(axis=-3).astype(np.uint8)
    assert want.any() and not want.all()
    np.testing.assert_array_equal(K.filled_flag(before, after), want)


def test_stretch_uint8_equals_numpy() -> None:
    rng = np.random.default_rng(15)
    band = _bands(rng, (40, 30), nan=0.1)
    want = (np.clip(np.nan_to_num((band - np.float32(0.1)) / np.float32(0.5), nan=0.0), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(K.stretch_uint8(band, 0.1, 0.6), want)


def ref_confusion(pred, ref, valid=None, by=None, n_ids=0):
    pred = np.asarray(pred)
    ref = np.broadcast_to(ref, pred.shape)
    ok = ((pred == 0) | (pred == 1)) & ((ref == 0) | (ref == 1))
    if valid is not None:
        ok &= np.broadcast_to(valid, pred.shape) != 0
    lead = pred.shape[:-2]
    out = np.zeros((*lead, 4 * (n_ids + 1)), np.int64)
    for li in np.ndindex(*lead):
        for g in range(n_ids + 1):
            sel = ok[li] if by is None else ok[li] & (np.broadcast_to(by, pred.shape)[li] == g)
            if by is None and g > 0:
                continue
            for code, (r, p) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
                out[li + (4 * g + code,)] = int((sel & (ref[li] == r) & (pred[li] == p)).sum())
    return out


@pytest.mark.parametrize("ids", [False, True])
def test_confusion_counts_equal_numpy(ids: bool) -> None:
    rng = np.random.default_rng(4)
    pred = rng.choice(np.array([0, 1, 255], np.uint8), size=(3, 25, 33))
    ref = rng.choice(np.array([0, 1, 1, 255], np.uint8), size=(25, 33))
    valid = rng.random((25, 33)) > 0.1
    by = rng.integers(-1, 7, (25, 33)) if ids else None
    n = 5 if ids else 0
    np.testing.assert_array_equal(K.confusion_counts(pred, ref, valid, by, n), ref_confusion(pred, ref, valid, by, n))
    # Booleans and float references (NaN nodata) are accepted as 0/1 codes.
    b = rng.random((25, 33)) > 0.5
    f = np.where(rng.random((25, 33)) > 0.9, np.nan, rng.integers(0, 2, (25, 33))).astype(np.float32)
    np.testing.assert_array_equal(K.confusion_counts(b, f), ref_confusion(b.astype(np.uint8), np.nan_to_num(f, nan=9)))


def test_count_by_id_equals_bincount() -> None:
    rng = np.random.default_rng(5)
    ice = rng.choice(np.array([0, 1, 255], np.uint8), size=(40, 60))
    gid = rng.integers(0, 12, (40, 60)).astype(np.int32)
    for value in (1, 255):
        want = np.bincount(gid[ice == value], minlength=12)[:11]
        np.testing.assert_array_equal(K.count_by_id(ice, gid, 10, value), want)


def test_threshold_histogram_suffix_sums_equal_thresholding() -> None:
    rng = np.random.default_rng(6)
    idx = _bands(rng, (2, 30, 30)) * 2 - 1
    ref = rng.choice(np.array([0, 1, 255], np.uint8), size=(30, 30))
    edges = np.round(np.arange(-100, 101) / 100.0, 2).astype(np.float32)
    h = K.threshold_histogram(idx, edges, ref)
    assert h.shape == (2, 2 * (edges.size + 1))
    m1 = edges.size + 1
    for t in (0, 2, 100, 140, 200):
        for cls in (0, 1):
            above = h[:, cls * m1 + t + 1:(cls + 1) * m1].sum()
            want = int(((idx >= edges[t]) & (np.broadcast_to(ref, idx.shape) == cls)).sum())
            assert above == want


def test_mosaic_first_valid_takes_the_first_scene_with_data() -> None:
    block = np.full((2, 3, 2, 2), np.nan, np.float32)
    block[:, 2] = K.QA_FILL
    block[1, :2, 0, 0] = 0.3
    block[1, 2, 0, 0] = 21824
    block[0, :2, 1, 1] = 0.1
    block[0, 2, 1, 1] = 21824
    block[1, 2, 0, 1] = 22280  # cloud flag on an otherwise masked pixel survives
    out = K.mosaic_first_valid(block, 2)
    assert out[0, 0, 0] == np.float32(0.3) and out[0, 1, 1] == np.float32(0.1)
    assert out[2, 0, 1] == 22280 and out[2, 1, 0] == K.QA_FILL


def ref_composite(refl: np.ndarray, ig: int, isw: int, rule: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whole-array numpy: clear = NDSI defined; argmin / last / nanmedian over time."""
    idx = ref_nd(refl[:, ig], refl[:, isw])  # (time, y, x)
    clear = ~np.isnan(idx)
    count = clear.sum(axis=0).astype(np.uint16)
    nt = refl.shape[0]
    if rule == "min-ndsi":
        # argmin returns the first of equal minima: ties keep the earliest date.
        chosen = np.argmin(np.where(clear, idx, np.inf), axis=0)
    elif rule == "latest":
        chosen = nt - 1 - np.argmax(clear[::-1], axis=0)
    else:
        masked = np.where(clear[:, None], refl, np.nan)
        with warnings.catch_warnings():  # "All-NaN slice": those pixels are NaN, as wanted
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(masked, axis=0).astype(np.float32)
        chosen = np.full(count.shape, -1)
        return med, count, np.where(count > 0, chosen, -1).astype(np.int16)
    comp = np.take_along_axis(refl, chosen[None, None], axis=0)[0]
    comp = np.where(count > 0, comp, np.float32(np.nan))
    return comp.astype(np.float32), count, np.where(count > 0, chosen, -1).astype(np.int16)


@pytest.mark.parametrize("rule", K.COMPOSITE_RULES)
@pytest.mark.parametrize("nt", [1, 2, 5])
def test_composite_equals_numpy(rule: str, nt: int) -> None:
    rng = np.random.default_rng(nt)
    refl = _bands(rng, (nt, 4, 23, 19), nan=0.3)
    refl[:, :, 0, :3] = np.nan  # never clear
    refl[:, 2, 1, 0] = 0.0  # green and swir16 both 0: NDSI undefined, not clear
    refl[:, 3, 1, 0] = -0.01
    if nt > 1:
        refl[:, :, 2, 2] = refl[0, :, 2, 2]  # equal NDSI on every date: the earliest wins
        refl[-1, 1, 3, 3] = np.nan  # one band masked alone: still clear (median skips it)
    got = K.composite(refl, 2, 3, rule)
    want = ref_composite(refl, 2, 3, rule)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)
    assert (got[1] == 0).sum() >= 3 and (got[2] == -1).sum() >= (got[1] == 0).sum()


def test_composite_writes_into_out_and_rejects_bad_arguments() -> None:
    refl = _bands(np.random.default_rng(0), (3, 2, 5, 6))
    out = np.zeros((4, 5, 6), np.float32)
    cnt = np.zeros((5, 6), np.uint16)
    idx = np.zeros((5, 6), np.int16)
    K.composite(refl, 0, 1, "latest", out=out[1:3], count_out=cnt, index_out=idx)
    np.testing.assert_array_equal(out[1:3], ref_composite(refl, 0, 1, "latest")[0])
    assert not out[0].any() and not out[3].any()
    with pytest.raises(ValueError, match="rule"):
        K.composite(refl, 0, 1, "max")
    with pytest.raises(ValueError, match="band positions"):
        K.composite(refl, 0, 2)
    with pytest.raises(ValueError, match="time, band, y, x"):
        K.composite(refl[0], 0, 1)


def test_kernel_layer_imports_no_dask_xarray_or_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, icemap.kernels as k; bad = [m for m in ('dask', 'xarray', 'torch') if m in sys.modules];"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _cube(rng: np.random.Generator, chunks: int | None):
    import rioxarray  # noqa: F401
    import xarray as xr

    refl = _bands(rng, (2, 3, 150, 130))
    cube = xr.Dataset(
        {"reflectance": (("time", "band", "y", "x"), refl)},
        coords={"band": ["green", "swir16", "nir08"], "y": 7e6 - 15 - 30 * np.arange(150),
                "x": 5e5 + 15 + 30 * np.arange(130),
                "time": np.array(["2021-02-01", "2022-02-01"], dtype="datetime64[ns]")},
    ).rio.write_crs("EPSG:32633")
    return cube.chunk({"y": chunks, "x": chunks}) if chunks else cube


@pytest.mark.parametrize("chunks", [None, 64, 37])
def test_index_layer_lazy_eager_and_into_agree(chunks: int | None) -> None:
    """ndsi/ice_mask: lazy (dask) == eager (numpy) == computed into a given buffer, and equal to
    the numpy reference; the graph runs the fused kernel once per chunk for both products."""
    import xarray as xr

    import icemap
    from icemap.index import ndsi_and_ice_mask

    from .conftest import raise_if_dask_computes

    rng = np.random.default_rng(8)
    cube = _cube(rng, chunks)
    refl = _cube(rng := np.random.default_rng(8), None)["reflectance"].values
    g, s, n = refl[:, 0], refl[:, 1], refl[:, 2]
    dem = xr.DataArray(rng.uniform(0, 3000, (150, 130)).astype(np.float32), dims=("y", "x"),
                       coords={"y": cube["y"], "x": cube["x"]}).rio.write_crs("EPSG:32633")
    with raise_if_dask_computes():
        lazy = icemap.ice_mask(cube, threshold=0.3, guards=("water", "dark"))
        lazy_ndsi = icemap.ndsi(cube)
    want = ref_ice(g, s, 0.3, nir=n, nir_min=0.11, green_min=0.15)
    np.testing.assert_array_equal(lazy.values, want)
    np.testing.assert_array_equal(lazy_ndsi.values, ref_nd(g, s))
    buf = np.full(want.shape, 7, np.uint8)
    into = icemap.ice_mask(cube, threshold=0.3, guards=("water", "dark"), out=buf)
    assert np.shares_memory(into.values, buf) and into.rio.crs == cube.rio.crs
    np.testing.assert_array_equal(buf, want)
    nbuf = np.empty(want.shape, np.float32)
    np.testing.assert_array_equal(icemap.ndsi(cube, out=nbuf).values, ref_nd(g, s))
    # A (y, x) DEM beside (time, y, x) bands, into a buffer: broadcast without copies.
    ebuf = np.empty(want.shape, np.uint8)
    icemap.ice_mask(cube, threshold=0.3, guards=("dem",), dem=dem, elevation_min_m=1000.0, slope_max_deg=None,
                    out=ebuf)
    np.testing.assert_array_equal(ebuf, ref_ice(g, s, 0.3, elev=dem.values, elevation_min_m=1000.0))
    with pytest.raises(icemap.errors.IcemapError, match="out= must be"):
        icemap.ndsi(cube, out=np.empty((2, 150, 130), np.float64))
    # Both products from one pass.
    index, ice = ndsi_and_ice_mask(cube, threshold=0.3, guards=("water", "dark"))
    np.testing.assert_array_equal(index.values, ref_nd(g, s))
    np.testing.assert_array_equal(ice.values, want)


def test_both_products_cost_one_kernel_call_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    import dask

    import icemap.index
    from icemap.workflow import map_ndsi

    cube = _cube(np.random.default_rng(9), 64)
    calls = []
    real = icemap.index.ice_kernel  # guards.ice_kernel, as the dask layer imports it
    monkeypatch.setattr(icemap.index, "ice_kernel", lambda *a, **k: calls.append(1) or real(*a, **k))
    product = map_ndsi(cube, threshold=0.4, guards=("water",))
    dask.compute(product["ndsi"].data, product["ice"].data, scheduler="sync")
    assert len(calls) == product["ice"].data.npartitions == product["ndsi"].data.npartitions


def test_normalise_channels_equals_numpy() -> None:
    rng = np.random.default_rng(13)
    x = rng.uniform(-0.1, 1.0, (3, 20, 30)).astype(np.float32)
    x[1, 2, 3] = np.nan
    lo, hi = np.array([0.0, 0.1, -0.2], np.float32), np.array([1.0, 0.6, 0.9], np.float32)
    z, nodata = K.normalise_channels(x, lo, hi, channel_axis=0)
    want = (x - lo[:, None, None]) / (hi - lo)[:, None, None]
    np.testing.assert_array_equal(nodata, np.isnan(want).any(axis=0))
    np.testing.assert_array_equal(z, np.nan_to_num(want, nan=0.0))
    assert z.dtype == np.float32 and z[:, 2, 3].tolist() == [z[0, 2, 3], 0.0, z[2, 2, 3]]


def ref_glacier_stats(ice: np.ndarray, gid: np.ndarray, n_ids: int) -> np.ndarray:
    """Textbook version: per id, counts by bincount and the perimeter of the set
    ``ice == 1 & gid == g`` as the number of pixel sides where the padded set changes."""
    out = np.zeros((ice.shape[0], 5, n_ids + 1), np.int64)
    for p in range(ice.shape[0]):
        m = ice[p]
        out[p, 0] = np.bincount(gid.ravel(), minlength=n_ids + 1)[:n_ids + 1]
        out[p, 1] = np.bincount(gid[m != 255], minlength=n_ids + 1)[:n_ids + 1]
        out[p, 2] = np.bincount(gid[m == 1], minlength=n_ids + 1)[:n_ids + 1]
        for g in range(n_ids + 1):
            s = np.pad((m == 1) & (gid == g), 1, constant_values=False)
            out[p, 3, g] = np.count_nonzero(s[:, 1:] != s[:, :-1])
            out[p, 4, g] = np.count_nonzero(s[1:, :] != s[:-1, :])
    return out


def test_glacier_stats_equals_numpy_reference() -> None:
    rng = np.random.default_rng(11)
    ice = rng.choice(np.array([0, 1, 1, 255], np.uint8), size=(3, 37, 53))
    # Blocky ids, so glaciers touch each other and the raster's edge.
    gid = np.kron(rng.integers(0, 6, (8, 11)), np.ones((5, 5), np.int64))[:37, :53].astype(np.int32)
    np.testing.assert_array_equal(K.glacier_stats(ice, gid, 5), ref_glacier_stats(ice, gid, 5))
    # One (y, x) plane gives a (5, n + 1) table.
    np.testing.assert_array_equal(K.glacier_stats(ice[1], gid, 5), ref_glacier_stats(ice[1:2], gid, 5)[0])


def test_glacier_stats_single_pixel_and_halo_blocks_sum_to_whole() -> None:
    ice = np.zeros((1, 4, 4), np.uint8)
    ice[0, 1, 1] = 1
    gid = np.ones((4, 4), np.int32)
    # One ice pixel: 4 sides, 2 of them facing x, 2 facing y.
    np.testing.assert_array_equal(K.glacier_stats(ice, gid, 1)[0, :, 1], [16, 16, 1, 2, 2])
    rng = np.random.default_rng(12)
    ice = rng.choice(np.array([0, 1, 1, 255], np.uint8), size=(2, 30, 40))
    gid = np.kron(rng.integers(0, 4, (6, 8)), np.ones((5, 5), np.int64)).astype(np.int32)
    whole = K.glacier_stats(ice, gid, 3)
    # 2 x 2 blocks, each grown by a 1-pixel halo (the raster's border padded with "not ice", id 0).
    pi = np.pad(ice, ((0, 0), (1, 1), (1, 1)), constant_values=0)
    pg = np.pad(gid, 1, constant_values=0)
    total = np.zeros_like(whole)
    for y0, y1 in ((0, 13), (13, 30)):
        for x0, x1 in ((0, 21), (21, 40)):
            total += K.glacier_stats(pi[:, y0:y1 + 2, x0:x1 + 2], pg[y0:y1 + 2, x0:x1 + 2], 3, halo=1)
    np.testing.assert_array_equal(total, whole)
