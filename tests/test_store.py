"""Zarr cubes: round trips, resume after interruption, appends, formats and a real cluster."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

import icemap
from icemap.errors import StoreError, StoreWarning
from icemap.stac import search

from .conftest import StacServer, icemap_cli


def _items(region: Any) -> list[dict[str, Any]]:
    return search(region.catalog).item_dicts()


def _assert_same_cube(a: Any, b: Any) -> None:
    assert list(a["time"].values) == list(b["time"].values)
    np.testing.assert_array_equal(a["reflectance"].values, b["reflectance"].values)
    np.testing.assert_array_equal(a["qa_pixel"].values, b["qa_pixel"].values)
    assert a.rio.crs == b.rio.crs and a.rio.transform() == b.rio.transform()


@pytest.fixture(scope="module")
def reference(small_region: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An uninterrupted ingest of the small region (64 px chunks, every band), to compare everything else with."""
    path = tmp_path_factory.mktemp("store-reference") / "cube.zarr"
    icemap.ingest(_items(small_region), path, chunksize=64)
    return icemap.open_cube(path).compute()


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_round_trip_equals_loaded_cube(small_region: Any, tmp_path: Path, zarr_format: int) -> None:
    items = _items(small_region)
    loaded = icemap.load(items, chunksize=64)
    report = icemap.write_cube(loaded, tmp_path / "c.zarr", zarr_format=zarr_format)
    assert report.created and len(report.written) == loaded.sizes["time"]
    cube = icemap.open_cube(tmp_path / "c.zarr")
    _assert_same_cube(cube, loaded.compute())
    assert cube["qa_pixel"].dtype == np.uint16
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    assert group.metadata.zarr_format == zarr_format
    # Fill values are stated, not left to zarr's default of 0 (zarr v2 has no fill value apart
    # from the CF _FillValue, which integer flags do not carry: plain xarray keeps them integer).
    assert np.isnan(group["reflectance"].fill_value)
    assert group["qa_pixel"].fill_value == (1 if zarr_format == 3 else None)
    assert "_FillValue" not in group["qa_pixel"].attrs
    # Dask chunks are the Zarr chunks.
    assert group["reflectance"].chunks == (1, 1, 64, 64)
    assert cube["reflectance"].data.chunksize == (1, 1, 64, 64)


def test_rerun_skips_complete_steps(small_region: Any, tmp_path: Path, reference: Any) -> None:
    path = tmp_path / "c.zarr"
    icemap.ingest(_items(small_region), path, chunksize=64)
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file() and "reflectance" in p.parts}
    report = icemap.ingest(_items(small_region), path, chunksize=64)
    assert report.written == [] and len(report.skipped) == reference.sizes["time"]
    after = {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file() and "reflectance" in p.parts}
    assert before == after


class Boom(Exception):
    pass


def test_interrupted_run_reads_back_right_and_resumes(small_region: Any, tmp_path: Path, reference: Any) -> None:
    path = tmp_path / "c.zarr"

    def stop_after_first(done: int, total: int, label: str) -> None:
        if done == 1:
            raise Boom()

    with pytest.raises(Boom):
        icemap.ingest(_items(small_region), path, chunksize=64, progress=stop_after_first)
    with pytest.warns(StoreWarning, match="2 time step"):
        partial = icemap.open_cube(path)
    assert partial.sizes["time"] == 1
    _assert_same_cube(partial.compute(), reference.isel(time=[0]))
    status = icemap.cube_status(path)
    assert status.complete == (True, False, False)

    report = icemap.ingest(_items(small_region), path, chunksize=64)
    assert len(report.written) == 2 and len(report.skipped) == 1
    _assert_same_cube(icemap.open_cube(path).compute(), reference)


@pytest.mark.parametrize("wave", [1, 3])
def test_waves_of_slabs_write_the_same_store_and_flag_steps_in_order(
        small_region: Any, tmp_path: Path, reference: Any, wave: int) -> None:
    """Bounded waves (one chunk, or slabs that straddle two steps) change nothing but memory:
    same values, and each step is flagged, in order, only after all of its slabs."""
    from icemap.store import _waves

    # 2 steps x 3 rows of 2 chunks, 4 chunks a wave: two rows, then a row of each step, then one.
    assert _waves(2, 3, 2, 4) == [[(0, 0, 2)], [(0, 2, 3), (1, 0, 1)], [(1, 1, 3)]]
    path = tmp_path / "c.zarr"
    seen: list[tuple[int, tuple[bool, ...]]] = []

    def record(done: int, total: int, label: str) -> None:
        flags = zarr.open_group(str(path), mode="r")["complete"][:]
        seen.append((done, tuple(bool(f) for f in flags)))

    with icemap.set_options(write_wave=wave):
        report = icemap.ingest(_items(small_region), path, chunksize=64, progress=record)
    n = reference.sizes["time"]
    assert len(report.written) == n
    assert seen == [(k, tuple(i < k for i in range(n))) for k in range(1, n + 1)]
    _assert_same_cube(icemap.open_cube(path).compute(), reference)


def test_wave_size_is_chosen_in_one_place_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    """The option, else two chunks per thread: of the local scheduler, or of every worker of a
    distributed cluster; the choice and its reason are logged."""
    import dask
    from distributed import Client, LocalCluster

    from icemap.store import _wave_size

    caplog.set_level("DEBUG", logger="icemap.store")
    with dask.config.set(scheduler="threads", num_workers=3):
        assert _wave_size() == 6
        assert "two per thread of the local scheduler (3 threads)" in caplog.text
        with icemap.set_options(write_wave=5):
            assert _wave_size() == 5
    caplog.clear()
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster):
        assert _wave_size() == 8
        assert "two per thread of the distributed cluster (4 threads)" in caplog.text
        with icemap.set_options(write_wave=5):
            assert _wave_size() == 5


#: Calls of :func:`_counted` per (block, run): computed on in-process workers, so they are seen here.
CALLS: dict[tuple[Any, ...], int] = {}


def _counted(block: np.ndarray, run: str, block_info: Any = None) -> np.ndarray:
    where = tuple(block_info[0]["chunk-location"])
    CALLS[(run, where)] = CALLS.get((run, where), 0) + 1
    return block * 2


def test_distributed_waves_compute_shared_halo_tasks_once(small_region: Any, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """On a distributed cluster a store write goes in bounded waves too. Waves of one chunk
    share every halo (a neighbourhood product reads the next chunk's block): each block is
    computed once, held while a later wave needs it, never resubmitted, and the store equals
    the threaded write with each step flagged in order."""
    import uuid

    import xarray as xr
    from distributed import Client, LocalCluster

    cube = icemap.open_cube(_product_source(small_region, tmp_path))
    run = uuid.uuid4().hex
    doubled = cube["reflectance"].isel(band=0).data.map_blocks(_counted, run=run, dtype=np.float32)
    smooth = doubled.map_overlap(lambda b: b - np.roll(b, 1, axis=-1), depth={0: 0, 1: 2, 2: 2}, boundary="none",
                                 dtype=np.float32)
    product = xr.Dataset({"edge": (("time", "y", "x"), smooth)}, coords=cube.drop_vars("band").coords)
    product = product.rio.write_crs(cube.rio.crs)
    labels: list[str] = []
    submitted: list[int] = []
    real_get = Client.get

    def spy(self: Any, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        if any(str(name).startswith("icemap-wave") for name in getattr(dsk, "layers", ())):
            submitted.append(len(keys))
        return real_get(self, dsk, keys, **kwargs)

    monkeypatch.setattr(Client, "get", spy)
    with icemap.set_options(write_wave=1):
        icemap.write_timesteps(product, tmp_path / "threads.zarr")
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
                Client(cluster):
            CALLS.clear()
            report = icemap.write_timesteps(product, tmp_path / "cluster.zarr",
                                            progress=lambda done, total, label: labels.append(label))
    blocks = int(np.prod(doubled.numblocks))
    steps, rows, cols = doubled.numblocks
    assert len(submitted) == steps * rows  # waves of one chunk are at least one row: one per row
    assert len(CALLS) == blocks and set(CALLS.values()) == {1}, CALLS
    assert labels == report.written == [str(t)[:19] + "Z" for t in product["time"].values]
    a = icemap.open_cube(tmp_path / "threads.zarr")["edge"].values
    np.testing.assert_array_equal(icemap.open_cube(tmp_path / "cluster.zarr")["edge"].values, a)
    assert np.isfinite(a).any()


def _product_source(region: Any, tmp_path: Path) -> Path:
    path = tmp_path / "cube.zarr"
    icemap.ingest(_items(region), path, chunksize=32, bands=["green"])
    return path


def _info(caplog: pytest.LogCaptureFixture) -> list[Any]:
    return [r for r in caplog.records if r.name == "icemap.store" and r.levelname == "INFO"]


def test_half_written_step_is_redone(small_region: Any, tmp_path: Path, reference: Any) -> None:
    """A crash in the middle of a step: some chunks written, some garbage, flag not set."""
    path = tmp_path / "c.zarr"
    icemap.ingest(_items(small_region), path, chunksize=64)
    group = zarr.open_group(str(path), mode="r+")
    group["complete"][1] = 0
    refl = group["reflectance"]
    refl[1, 0, :64, :64] = np.full((64, 64), 42.0, np.float32)  # a wrong, partly written step
    with pytest.warns(StoreWarning):
        shown = icemap.open_cube(path)
    assert 42.0 not in shown["reflectance"].values
    icemap.ingest(_items(small_region), path, chunksize=64)
    _assert_same_cube(icemap.open_cube(path).compute(), reference)


def test_unfinished_store_of_icemap_is_started_again(small_region: Any, tmp_path: Path, reference: Any) -> None:
    path = tmp_path / "c.zarr"
    icemap.ingest(_items(small_region), path, chunksize=64)
    group = zarr.open_group(str(path), mode="r+")
    del group.attrs["icemap:layout"]  # as if killed while writing the template
    assert "icemap:store" in group.attrs  # the marker, written first
    with pytest.raises(StoreError, match="not a finished"):
        icemap.open_cube(path)
    with pytest.warns(StoreWarning, match="starting it again"):
        icemap.ingest(_items(small_region), path, chunksize=64)
    _assert_same_cube(icemap.open_cube(path).compute(), reference)


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_unfinished_store_with_a_user_file_is_left_alone(small_region: Any, tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    icemap.ingest(_items(small_region), path, chunksize=64)
    group = zarr.open_group(str(path), mode="r+")
    del group.attrs["icemap:layout"]
    (path / "notes.txt").write_text("mine")
    before = _tree(path)
    with pytest.raises(StoreError, match="notes.txt"):
        icemap.ingest(_items(small_region), path, chunksize=64)
    assert _tree(path) == before


def test_foreign_zarr_store_is_never_touched(small_region: Any, tmp_path: Path) -> None:
    """A Zarr store icemap did not write (no marker) is refused, byte for byte unchanged."""
    import xarray as xr

    path = tmp_path / "theirs.zarr"
    xr.Dataset({"a": (("t", "y"), np.arange(6.0).reshape(2, 3))}).to_zarr(path, consolidated=False)
    before = _tree(path)
    with pytest.raises(StoreError, match="did not create"):
        icemap.ingest(_items(small_region), path, chunksize=64)
    assert _tree(path) == before


def test_append_new_dates(small_region: Any, tmp_path: Path, reference: Any) -> None:
    items = _items(small_region)
    path = tmp_path / "c.zarr"
    last_day = small_region.datetimes[-1][:10]
    early = [i for i in items if not i["properties"]["datetime"].startswith(last_day)]
    icemap.ingest(early, path, chunksize=64)
    assert icemap.open_cube(path).sizes["time"] == reference.sizes["time"] - 1
    report = icemap.ingest(items, path, chunksize=64)
    assert len(report.appended) == 1 and len(report.written) == 1
    _assert_same_cube(icemap.open_cube(path).compute(), reference)


def test_other_grid_is_refused(small_region: Any, tmp_path: Path) -> None:
    items = _items(small_region)
    path = tmp_path / "c.zarr"
    icemap.ingest(items, path, chunksize=64)
    with pytest.raises(StoreError, match="bands"):
        icemap.ingest(items, path, chunksize=64, bands=["green", "swir16"])
    with pytest.raises(StoreError, match="grid"):
        icemap.ingest(items, path, chunksize=64, resolution=60)


def test_open_missing_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="icemap ingest"):
        icemap.open_cube(tmp_path / "nothing.zarr")


@pytest.mark.cluster
def test_local_cluster_ingest_equals_threaded(small_region: Any, tmp_path: Path, reference: Any) -> None:
    from distributed import Client

    from icemap.cluster import local_cluster

    # In-process workers: distributed's scheduling of the ingest is what is compared here; worker
    # processes writing the same store (one of them killed) are tests/test_faults.py's.
    with local_cluster(n_workers=2, threads_per_worker=1, processes=False) as cluster, Client(cluster):
        icemap.ingest(_items(small_region), tmp_path / "c.zarr", chunksize=64)
    _assert_same_cube(icemap.open_cube(tmp_path / "c.zarr").compute(), reference)


_icemap = icemap_cli


def test_cli_ingest_from_api_resumes(stac_api: StacServer, small_region: Any, tmp_path: Path, reference: Any) -> None:
    out = tmp_path / "api.zarr"
    w, s, e, n = small_region.bbox
    args = ["ingest", "--catalog", stac_api.url, "--collection", "landsat-c2-l2",
            "--bbox", str(w), str(s), str(e), str(n), "--datetime", "2020-01-01/..",
            "--out", str(out), "--chunksize", "64", "--quiet"]
    first = _icemap(*args)
    assert first.returncode == 0, first.stderr
    assert "wrote 3 time step(s)" in first.stderr
    second = _icemap(*args)
    assert second.returncode == 0 and "skipped 3" in second.stderr
    cube = icemap.open_cube(out)
    # The bbox grid is snapped onto the scenes' pixels, so the region's pixels are the same.
    inner = cube.sel(x=reference["x"], y=reference["y"]).compute()
    _assert_same_cube(inner.drop_vars("complete"), reference.drop_vars("complete"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--bands", "green,swir1"], "unknown band 'swir1'"),
        (["--datetime", "1990-01-01/1990-12-31"], "matched no items"),
    ],
)
def test_cli_ingest_bad_input(small_region: Any, tmp_path: Path, extra: list[str], message: str) -> None:
    res = _icemap("ingest", "--catalog", str(small_region.catalog), "--out", str(tmp_path / "x.zarr"), "--quiet", *extra)
    assert res.returncode == 1
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "x.zarr").exists()


def test_cli_unreadable_asset_exit_code(small_region: Any, tmp_path: Path) -> None:
    region = tmp_path / "region"
    shutil.copytree(small_region.root, region)
    victim = next(region.rglob("*_SR_B3.TIF"))
    victim.write_bytes(b"not a tiff at all")
    res = _icemap("ingest", "--catalog", str(region / "catalog.json"), "--out", str(tmp_path / "x.zarr"), "--quiet")
    assert res.returncode == 1
    assert victim.name in res.stderr and "on_error" in res.stderr.replace("-", "_")
    ok = _icemap("ingest", "--catalog", str(region / "catalog.json"), "--out", str(tmp_path / "y.zarr"), "--quiet",
                 "--on-error", "nodata")
    assert ok.returncode == 0, ok.stderr


def test_interrupted_append_is_repaired(small_region: Any, tmp_path: Path, reference: Any) -> None:
    """A crash between the resizes of an append leaves arrays of different lengths."""
    items = _items(small_region)
    path = tmp_path / "c.zarr"
    last_day = small_region.datetimes[-1][:10]
    icemap.ingest([i for i in items if not i["properties"]["datetime"].startswith(last_day)], path, chunksize=64)
    group = zarr.open_group(str(path), mode="r+")
    refl = group["reflectance"]
    refl.resize((refl.shape[0] + 1, *refl.shape[1:]))  # resized, the other arrays not yet
    with pytest.raises(StoreError, match="append of new dates was interrupted"):
        icemap.open_cube(path)
    with pytest.warns(StoreWarning, match="repaired an interrupted append"):
        icemap.ingest(items, path, chunksize=64)
    _assert_same_cube(icemap.open_cube(path).compute(), reference)


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_layout_from_placeholders_is_the_layout_of_the_data(small_region: Any, tmp_path: Path,
                                                           zarr_format: int) -> None:
    """The store's layout is written from empty stand-ins of the lazy variables (no graph of
    reads and kernels built and thrown away); every metadata and coordinate file is byte for
    byte what xarray writes from the real cube and product."""
    from icemap.store import _encoding, _layout_template, _prepare
    from icemap.workflow import map_ndsi

    cube = icemap.load(_items(small_region), chunksize=64)
    product = map_ndsi(cube)
    for name, ds in (("cube", cube), ("product", product)):
        prepared, (cy, cx) = _prepare(ds, None)
        enc = _encoding(prepared, cy, cx, zarr_format)
        trees = []
        for kind, template in (("real", prepared), ("placeholders", _layout_template(prepared))):
            out = tmp_path / f"{name}-{kind}.zarr"
            template.to_zarr(out, compute=False, encoding=enc, zarr_format=zarr_format, consolidated=False)
            trees.append(_tree(out))
        assert trees[0] == trees[1], name
        assert any("reflectance" in k or "ice" in k for k in trees[0])


def test_a_job_opens_each_store_once(small_region: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ingest opens the cube it wrote once (plausibility check and STAC Item); map opens the
    cube once and its product once (extras and STAC Item): opens are a job's fixed cost."""
    import icemap.store

    opened: list[str] = []
    real = icemap.store._open_raw

    def counting(path: str, storage_options: Any) -> Any:
        opened.append(Path(path).name)
        return real(path, storage_options)

    monkeypatch.setattr(icemap.store, "_open_raw", counting)
    icemap.ingest(_items(small_region), tmp_path / "cube.zarr", chunksize=64)
    assert opened == ["cube.zarr"]
    opened.clear()
    icemap.map_cube(tmp_path / "cube.zarr", tmp_path / "ice.zarr", outlines_path=tmp_path / "ice.gpkg")
    assert sorted(opened) == ["cube.zarr", "ice.zarr"]
