"""Training data: chips, labels, hard negatives, the leak-free Monte-Carlo split, lazy reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from icemap.errors import IcemapError, ModelError
from icemap.lab.data import (
    HARD_NEGATIVE_CATEGORIES,
    ChipDataset,
    ChipSource,
    fit_normalisation,
    glacier_table,
    make_chips,
    padded_size,
    scan_cube,
    shape_factor,
    split_chips,
)
from icemap.model.inputs import Normalisation


@pytest.fixture(scope="module")
def cube_path(sample_cube: Path) -> Path:
    return sample_cube


@pytest.fixture(scope="module")
def cube(cube_path: Path) -> Any:
    from icemap.store import open_cube

    return open_cube(cube_path)


@pytest.fixture(scope="module")
def index(cube: Any, sample_region: Any) -> Any:
    # "drop": disjoint windows, grouped when they share a glacier (leaves room for random chips).
    return make_chips(cube, sample_region.outlines, size=32, overlap="drop", n_hard_negative=3, n_random=2, seed=0)


def test_shape_factor() -> None:
    from shapely.geometry import Point, box

    assert shape_factor(Point(0, 0).buffer(100, quad_segs=64)) == pytest.approx(1.0, abs=1e-3)
    square = shape_factor(box(0, 0, 10, 10))
    assert square == pytest.approx(2 * np.sqrt(np.pi * 100) / 40)
    assert shape_factor(box(0, 0, 100, 1)) < 0.2 < square < 1.0


def test_glacier_table(cube: Any, sample_region: Any) -> None:
    import geopandas as gpd

    table = glacier_table(sample_region.outlines, cube)
    truth = gpd.read_file(sample_region.outlines, layer="glaciers")
    assert len(table) == len(truth)
    assert list(table["gid"]) == list(range(1, len(truth) + 1))
    np.testing.assert_allclose(table["area_km2"], truth["area_km2"], rtol=1e-3)
    assert table["shape_factor"].between(0, 1).all()


def test_windows_are_disjoint_and_centred(index: Any, cube: Any) -> None:
    ws = index.windows
    assert {w.kind for w in ws} >= {"glacier", "hard_negative", "random"}
    h, w_ = index.shape
    for i, a in enumerate(ws):
        assert 0 <= a.y0 <= h - a.size and 0 <= a.x0 <= w_ - a.size
        for b in ws[i + 1:]:
            assert not a.overlaps(b), "drop mode keeps disjoint windows"
    glacier = [w for w in ws if w.kind == "glacier"]
    assert glacier and all(w.centre_gid in w.gids for w in glacier)
    # Study a's priority: the first glacier window holds the most whole glaciers.
    assert len(glacier[0].whole) == max(len(w.whole) for w in glacier)
    assert all(0.5 <= s.valid_fraction <= 1 for s in index.samples)


def test_labels_equal_the_rasterised_outlines(index: Any, cube: Any, sample_region: Any) -> None:
    from icemap.labels import rasterize_outlines

    src = ChipSource(cube, sample_region.outlines, index)
    for buffer_m in (0.0, 15.0):
        full = rasterize_outlines(sample_region.outlines, cube, buffer_m=buffer_m).values
        for k, w in enumerate(index.windows):
            np.testing.assert_array_equal(src.labels(k, buffer_m), full[w.y0:w.y0 + w.size, w.x0:w.x0 + w.size])
    # The extended mask holds the original one and more.
    k = next(i for i, w in enumerate(index.windows) if w.kind == "glacier")
    assert src.labels(k, 15.0).sum() > src.labels(k, 0.0).sum()
    assert (src.labels(k, 15.0) >= src.labels(k, 0.0)).all()


def test_hard_negatives_hold_their_category(index: Any, cube: Any, sample_region: Any) -> None:
    from icemap.sample import CLASS_CODES

    src = ChipSource(cube, sample_region.outlines, index)
    hard = [(i, w) for i, w in enumerate(index.windows) if w.kind == "hard_negative"]
    assert hard and all(w.category in HARD_NEGATIVE_CATEGORIES for _, w in hard)
    water = [i for i, w in hard if w.category == "water"]
    assert water, "the sample region has lakes: a water chip is expected"
    dates = [str(np.datetime_as_string(t, unit="D")) for t in cube["time"].values]
    found = 0
    for s, sample in enumerate(index.samples):
        if sample.window in water:
            cls = src.truth(s, sample_region.truth(dates[sample.time]))
            found += int((cls == CLASS_CODES["water"]).sum())
    assert found > 0


def test_split_has_no_glacier_in_two_sets_and_is_reproducible(index: Any, sample_region: Any) -> None:
    import geopandas as gpd
    from shapely.geometry import box

    a = split_chips(index, iterations=60, seed=4)
    b = split_chips(index, iterations=60, seed=4)
    assert a.groups == b.groups and a.report == b.report
    assert sorted(g for gs in a.groups.values() for g in gs) == index.groups
    assert all(a.groups[s] for s in ("train", "val", "test"))
    # Independent check from the geometry: the glaciers touching each set's windows.
    gdf = gpd.read_file(sample_region.outlines, layer="glaciers").to_crs(index.crs)
    t = index.transform
    touched: dict[str, set[int]] = {}
    for name, groups in a.groups.items():
        ids: set[int] = set()
        for s in index.samples_of(groups):
            w = index.windows[index.samples[s].window]
            x0, y0 = t[2] + w.x0 * t[0], t[5] + w.y0 * t[4]
            win = box(x0, y0 + w.size * t[4], x0 + w.size * t[0], y0)
            ids |= set(gdf.index[gdf.geometry.intersects(win)])
        touched[name] = ids
    assert not touched["train"] & touched["val"]
    assert not touched["train"] & touched["test"]
    assert not touched["val"] & touched["test"]
    # The KS report.
    rep = a.report
    assert rep["iterations"] == 60 and rep["seed"] == 4
    assert {"area_km2", "shape_factor"} <= set(rep["distributions"])
    for name in ("train", "val", "test"):
        s = rep["sets"][name]
        for key in ("ks_area", "p_area", "ks_shape", "p_shape"):
            assert 0.0 <= s[key] <= 1.0
        assert s["samples"] == len(a.samples(index, name))
    assert rep["objective_max_ks"] == pytest.approx(
        max(max(v["ks_area"], v["ks_shape"]) for v in rep["sets"].values()))


def test_split_seed_changes_the_split_and_more_iterations_never_worsen(index: Any) -> None:
    splits = [split_chips(index, iterations=30, seed=s) for s in range(4)]
    assert len({str(s.groups) for s in splits}) > 1
    few = split_chips(index, iterations=5, seed=1)
    many = split_chips(index, iterations=60, seed=1)  # the same stream, extended
    assert many.report["objective_max_ks"] <= few.report["objective_max_ks"]


def test_independent_mode_gives_one_group_per_window(cube: Any, sample_region: Any) -> None:
    idx = make_chips(cube, sample_region.outlines, size=32)  # the default mode
    assert idx.params["overlap"] == "independent"
    ws = idx.windows
    assert len({w.group for w in ws}) == len(ws)
    for i, a in enumerate(ws):
        for b in ws[i + 1:]:
            assert not a.overlaps(b) and not set(a.gids) & set(b.gids)


def test_group_mode_merges_overlapping_windows(cube: Any, sample_region: Any) -> None:
    idx = make_chips(cube, sample_region.outlines, size=48, overlap="group")
    ws = idx.windows
    assert any(a.overlaps(b) for i, a in enumerate(ws) for b in ws[i + 1:])
    for i, a in enumerate(ws):
        for b in ws[i + 1:]:
            if a.overlaps(b) or set(a.gids) & set(b.gids):
                assert a.group == b.group


def test_bad_arguments(cube: Any, sample_region: Any, tmp_path: Path) -> None:
    import geopandas as gpd
    from shapely.affinity import translate

    with pytest.raises(ModelError, match="overlap"):
        make_chips(cube, sample_region.outlines, overlap="merge")
    with pytest.raises(ModelError, match="smaller than one"):
        make_chips(cube, sample_region.outlines, size=4096)
    far = gpd.read_file(sample_region.outlines, layer="glaciers")
    far = far.set_geometry(far.geometry.apply(lambda g: translate(g, 1e6, 0)))
    with pytest.raises(IcemapError, match="none of the .* outlines overlaps the cube"):
        make_chips(cube, far, size=32)


def test_dataset_reads_one_window_lazily(cube: Any, index: Any, sample_region: Any) -> None:
    import dask

    src = ChipSource(cube, sample_region.outlines, index, cache=False)
    # The read of one chip touches only the chunks its window overlaps (dask culls the rest).
    w = index.windows[0]
    sub = src.refl.isel(time=[0], y=slice(w.y0, w.y0 + w.size), x=slice(w.x0, w.x0 + w.size))
    (opt,) = dask.optimize(sub.data)
    full_chunks = int(np.prod(src.refl.data.numblocks))
    touched = len([k for k in dict(opt.__dask_graph__()) if isinstance(k, tuple)])
    assert touched < full_chunks / 4
    ch = ("green", "swir16", "ndsi")
    norm = fit_normalisation(src, list(range(len(index.samples))), ch)
    ds = ChipDataset(src, list(range(len(index.samples))), ch, normalisation=norm, multiple=16, cache=False)
    x, y, v = ds[0]
    assert x.shape == (3, 32, 32) and y.shape == (1, 32, 32) and v.dtype.is_floating_point is False
    ds24 = ChipDataset(src, [0], ch, normalisation=norm, multiple=16)
    assert padded_size(32, 16) == 32 and padded_size(120, 16) == 128 and padded_size(120, 8) == 120
    assert not src._windows, "cache=False keeps nothing"
    x2, _, _ = ds24[0]
    np.testing.assert_array_equal(x2.numpy(), x.numpy())


def test_padding_is_ignored_and_channel_hiding(cube: Any, sample_region: Any) -> None:
    idx = make_chips(cube, sample_region.outlines, size=40)
    src = ChipSource(cube, sample_region.outlines, idx)
    ch = ("green", "swir16")
    norm = fit_normalisation(src, [0], ch)
    ds = ChipDataset(src, [0], ch, normalisation=norm, multiple=16)
    x, y, v = ds[0]
    assert x.shape[-1] == 48 and ds.offset == 4
    assert not v[0, :4].any() and not v[0, -4:].any() and not v[0, :, :4].any()
    assert (x[:, :4] == 0).all()
    np.testing.assert_array_equal(ds.crop(v.numpy())[0], ds.arrays(0)[2])
    hidden = ChipDataset(src, [0], ch, normalisation=norm, multiple=16, hide_channel=1)
    xh, _, _ = hidden[0]
    assert (xh[1] == 0).all() and (xh[0] == x[0]).all()


def test_streaming_normalisation_equals_the_stacked_fit(cube: Any, index: Any, sample_region: Any) -> None:
    src = ChipSource(cube, sample_region.outlines, index)
    ch = ("green", "swir16", "ndsi")
    ids = list(range(len(index.samples)))
    stacked = np.stack([src.inputs(i, ch) for i in ids])
    a = fit_normalisation(src, ids, ch)
    b = Normalisation.fit(stacked)
    np.testing.assert_array_equal(a.lo, b.lo)
    np.testing.assert_array_equal(a.hi, b.hi)
    p = fit_normalisation(src, ids, ch, method="percentile")
    assert (p.lo >= a.lo).all() and (p.hi <= a.hi).all()


def test_scan_counts_valid_pixels(cube: Any, sample_region: Any) -> None:
    table = glacier_table(sample_region.outlines, cube)
    scan = scan_cube(cube, table, cell=8)
    valid = cube["reflectance"].notnull().all("band").values
    np.testing.assert_array_equal(scan.layer("valid").sum(axis=(1, 2)), valid.sum(axis=(1, 2)))
    assert set(scan.layers) == {"valid", *HARD_NEGATIVE_CATEGORIES}


def _labels_on_cube(cube: Any, outlines: Any) -> np.ndarray:
    from icemap.labels import rasterize_outlines

    return np.asarray(rasterize_outlines(outlines, cube["reflectance"]).values)


def test_grid_chips_cover_every_labelled_pixel(cube: Any, sample_region: Any) -> None:
    lab = _labels_on_cube(cube, sample_region.outlines) > 0
    grid = make_chips(cube, sample_region.outlines, size=32, layout="grid")
    per_outline = make_chips(cube, sample_region.outlines, size=32)
    for idx in (grid, per_outline):
        seen = np.zeros(lab.shape, dtype=bool)
        for w in {idx.samples[s].window for s in range(len(idx.samples))}:
            win = idx.windows[w]
            seen[win.y0:win.y0 + win.size, win.x0:win.x0 + win.size] = True
        # The reported coverage is the coverage of the labels rasterised independently.
        assert idx.params["labelled_pixels"] == int(lab.sum())
        assert idx.params["labelled_pixels_in_chips"] == int((lab & seen).sum())
    assert grid.params["label_coverage"] == 1.0 and grid.params["layout"] == "grid"
    assert per_outline.params["label_coverage"] < 1.0  # one chip per outline leaves labels out
    assert {w.kind for w in grid.windows} == {"grid"}
    # Windows that share pixels (the clamped last row/column) are one group.
    ws = grid.windows
    for i, a in enumerate(ws):
        for b in ws[i + 1:]:
            if a.overlaps(b) or set(a.gids) & set(b.gids):
                assert a.group == b.group


def test_location_split_holds_out_places_of_one_large_glacier(cube: Any, sample_region: Any) -> None:
    import geopandas as gpd
    from shapely.ops import unary_union

    gdf = gpd.read_file(sample_region.outlines, layer="glaciers")
    # One glacier: the outlines dissolved into a single polygon (its convex hull).
    one = gpd.GeoDataFrame({"glacier_id": ["G1"]}, geometry=[unary_union(list(gdf.geometry)).convex_hull],
                           crs=gdf.crs)
    by_glacier = make_chips(cube, one, size=32, layout="grid")
    with pytest.raises(ModelError, match=r"at least 3 \(one each\).*--split location"):
        split_chips(by_glacier, iterations=5)
    idx = make_chips(cube, one, size=32, layout="grid", group_by="location")
    a, b = split_chips(idx, seed=2), split_chips(idx, seed=2)
    assert a.groups == b.groups and all(a.groups[s] for s in ("train", "val", "test"))
    assert a.report["method"].startswith("location")
    # No pixel is in two sets.
    owner = np.full(idx.shape, "", dtype=object)
    for name, groups in a.groups.items():
        for s in idx.samples_of(groups):
            w = idx.windows[idx.samples[s].window]
            block = owner[w.y0:w.y0 + w.size, w.x0:w.x0 + w.size]
            assert set(np.unique(block)) <= {"", name}
            block[:] = name
    with pytest.raises(ModelError, match="chip layout"):
        make_chips(cube, one, size=32, layout="tiles")
