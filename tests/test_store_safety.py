"""Nothing lost, nothing mixed: what icemap may remove, settings records, locks, verified writes,
interrupts.

A tiny sample region (64 px, two seasons of two dates) keeps every write to a second or two.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr

import icemap
from icemap.errors import StoreError
from icemap.interop import decode_attrs
from icemap.sample import make_sample_region
from icemap.stac import search

SEASON = "02-01/03-31"


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_sample_region(tmp_path_factory.mktemp("safety") / "r", size=64, n_dates=2, per_season=2, seed=3)


@pytest.fixture(scope="module")
def items(region: Any) -> list[dict[str, Any]]:
    return search(region.catalog).item_dicts()


@pytest.fixture(scope="module")
def cube(items: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted ingest: what every interrupted and resumed run must equal."""
    path = tmp_path_factory.mktemp("cube") / "cube.zarr"
    icemap.ingest(items, path, chunksize=32)
    return path


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (a file: itself)."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _main(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str]:
    """``icemap ARGS`` in-process (imports once): exit code and stderr."""
    from icemap.cli import main

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() installs its own
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def _same_store(a: Path, b: Path) -> None:
    x, y = icemap.open_cube(a), icemap.open_cube(b)
    assert list(x["time"].values) == list(y["time"].values)
    for name in x.data_vars:
        np.testing.assert_array_equal(x[name].values, y[name].values)


# -- 1. only what icemap created is removed; outputs are not inputs ------------------------------


@pytest.fixture
def foreign(tmp_path: Path) -> dict[str, Path]:
    """A Zarr store icemap did not write, a folder with a user file, and a plain file."""
    store = tmp_path / "theirs.zarr"
    xr.Dataset({"a": (("t", "y"), np.arange(6.0).reshape(2, 3))}).to_zarr(store, consolidated=False)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    plain = tmp_path / "notes.txt"
    plain.write_text("notes")
    return {"store": store, "folder": folder, "file": plain}


@pytest.mark.parametrize("command", ["ingest", "map", "composite"])
def test_foreign_outputs_are_refused_and_untouched(command: str, foreign: dict[str, Path], region: Any, cube: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = (["--catalog", str(region.catalog)] if command == "ingest" else ["--cube", str(cube)])
    extra = ["--season", SEASON] if command == "composite" else []
    for kind, target in foreign.items():
        before = _tree(target)
        code, err = _main(capsys, monkeypatch, command, *inputs, "--out", str(target), "--quiet", *extra)
        assert code == 1, (kind, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert "icemap: error:" in err and str(target.name) in err
        assert _tree(target) == before, kind


@pytest.mark.parametrize("command", ["map", "composite"])
def test_output_that_is_the_input_cube_is_refused(command: str, cube: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    before = _tree(cube)
    for out in (cube, cube / "inner.zarr"):
        code, err = _main(capsys, monkeypatch, command, "--cube", str(cube), "--out", str(out), "--quiet")
        assert code == 1 and "--cube input" in err and len(err.strip().splitlines()) == 1, err
    assert _tree(cube) == before


def test_table_outputs_that_are_the_reference_are_refused(cube: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    reference = tmp_path / "outlines.csv"
    reference.write_text("glacier_id,wkt\n")
    before = _tree(reference)
    runs = [("areas", "--pred", str(cube), "--reference", str(reference), "--out", str(reference)),
            ("areas", "--pred", str(cube), "--reference", str(reference), "--out", str(tmp_path / "a.csv"),
             "--region-out", str(reference))]
    try:
        import matplotlib  # noqa: F401  (the report command needs the report extra)

        runs.append(("report", "--cube", str(cube), "--pred", str(cube), "--reference", str(reference),
                     "--out", str(tmp_path / "r.html"), "--series-out", str(reference)))
    except ImportError:
        pass
    for args in runs:
        code, err = _main(capsys, monkeypatch, *args)
        assert code == 1 and "--reference input" in err and len(err.strip().splitlines()) == 1, (args, err)
    assert _tree(reference) == before


# -- 3. one settings record per store ------------------------------------------------------------


def test_rerun_with_other_settings_is_refused_naming_them(cube: Path, tmp_path: Path, items: list[dict[str, Any]],
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    product, comp = tmp_path / "p.zarr", tmp_path / "k.zarr"
    assert _main(capsys, monkeypatch, "map", "--cube", str(cube), "--out", str(product), "--quiet")[0] == 0
    assert _main(capsys, monkeypatch, "composite", "--cube", str(cube), "--out", str(comp), "--season", SEASON,
                 "--quiet")[0] == 0
    settings = decode_attrs(zarr.open_group(str(product), mode="r").attrs)["icemap:settings"]
    assert settings["method"] == "ndsi" and settings["threshold"] == 0.4
    before = {p: _tree(p) for p in (product, comp)}
    for args, words in (
        (["map", "--cube", str(cube), "--out", str(product), "--threshold", "0.1"], "threshold 0.1 (stored: 0.4)"),
        (["map", "--cube", str(cube), "--out", str(product), "--guards", "water"], "guard"),
        (["composite", "--cube", str(cube), "--out", str(comp), "--season", SEASON, "--rule", "latest"],
         'rule "latest" (stored: "min-ndsi")'),
        (["composite", "--cube", str(cube), "--out", str(comp), "--season", "02-01/03-15"], "season"),
    ):
        code, err = _main(capsys, monkeypatch, *args, "--quiet")
        assert code == 1 and words in err and "another --out" in err and "delete the store" in err, err
        assert len(err.strip().splitlines()) == 1
    assert {p: _tree(p) for p in (product, comp)} == before
    # Same settings: resumes (nothing to do).
    code, err = _main(capsys, monkeypatch, "map", "--cube", str(cube), "--out", str(product), "--threshold", "0.4",
                      "--quiet")
    assert code == 0 and "wrote 0 time step(s), skipped 4" in err, err
    # A cube appended with other bands or QA use is refused the same way.
    with pytest.raises(StoreError, match=r"qa null \(stored: \"qa_pixel\"\)"):
        icemap.ingest(items, cube, chunksize=32, qa=None)


def test_composite_year_whose_dates_changed_is_computed_again(items: list[dict[str, Any]], cube: Path,
                                                              tmp_path: Path) -> None:
    path, comp = tmp_path / "c.zarr", tmp_path / "k.zarr"
    first_three = [i for i in items if not i["properties"]["datetime"].startswith("2022-02-15")]
    icemap.ingest(first_three, path, chunksize=32)
    report = icemap.composite(path, comp, season=SEASON)
    assert len(report.written) == 2  # 2021 (two dates) and 2022 (one date so far)
    icemap.ingest(items, path, chunksize=32)  # 2022 gains 2022-02-15
    report = icemap.composite(path, comp, season=SEASON)
    assert report.written == ["2022-03-31T00:00:00Z"] and report.skipped == ["2021-03-31T00:00:00Z"]
    stored = icemap.open_cube(comp)
    fresh = icemap.composite(icemap.open_cube(cube), season=SEASON).compute()
    for name in ("reflectance", "clear_count", "source_date"):
        np.testing.assert_array_equal(stored[name].values, fresh[name].values)
    assert list(stored["item_ids"].values) == list(fresh["item_ids"].values)
    years = stored.attrs["icemap:composite"]["season_years"]
    assert years["2022"] == ["2022-02-07T14:30:00Z", "2022-02-15T14:30:00Z"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # still consolidated after the record changed: plain xarray opens it quietly
        assert xr.open_zarr(comp).sizes["time"] == 2


# -- 3. two writers cannot interleave ------------------------------------------------------------


def test_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(items: list[dict[str, Any]],
                                                                        tmp_path: Path) -> None:
    from icemap.store import _store_lock

    path = tmp_path / "c.zarr"
    lock = Path(str(path) + ".icemap-lock")
    with _store_lock(str(path), None):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(StoreError, match=rf"another icemap process \(PID {os.getpid()} .*delete .*icemap-lock"):
            icemap.ingest(items, path, chunksize=32)
    assert not lock.exists() and not path.exists()
    # A run killed with its lock file in place: its PID is dead, the lock is taken over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": "here", "started": "then"}))
    report = icemap.ingest(items, path, chunksize=32)
    assert len(report.written) == 4 and not lock.exists()


# -- 2. writes verified --------------------------------------------------------------------------


def test_step_written_but_not_flagged_is_an_error(items: list[dict[str, Any]], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """As when workers resolve the store elsewhere: the tasks run, the client's store has no flag."""
    import icemap.store as store

    real = store._mark_complete

    def flag_elsewhere(written: Any, *previous: Any, flags: Any, index: int, run: str) -> Any:
        return real(written, *previous, flags=np.zeros(8, np.uint8), index=index, run=run)

    monkeypatch.setattr(store, "_mark_complete", flag_elsewhere)
    with pytest.raises(StoreError, match=r"4 time step\(s\) were computed but are not flagged complete.*every worker"):
        icemap.ingest(items, tmp_path / "c.zarr", chunksize=32)


def test_relative_paths_are_made_absolute(items: list[dict[str, Any]], tmp_path: Path, cube: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    report = icemap.ingest(items, "rel.zarr", chunksize=32)
    assert report.path == str(tmp_path / "rel.zarr")
    opened = icemap.open_cube("rel.zarr")
    # The lazy reads name the absolute store: a worker in another folder reads the same one.
    monkeypatch.chdir(cube.parent)
    _same_store(tmp_path / "rel.zarr", cube)
    assert np.array_equal(opened["reflectance"].values, icemap.open_cube(cube)["reflectance"].values,
                          equal_nan=True)


@pytest.mark.cluster
def test_relative_out_lands_where_the_command_ran_not_in_the_workers_folder(
        items: list[dict[str, Any]], tmp_path: Path, cube: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dask
    from distributed import Client

    from icemap.cluster import local_cluster

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(here)
    with local_cluster(n_workers=1, threads_per_worker=2, processes=True) as cluster, Client(cluster) as client:
        client.run(os.chdir, str(elsewhere))  # workers started in another folder
        with dask.config.set(scheduler=client):
            report = icemap.ingest(items, "rel.zarr", chunksize=32)
    assert len(report.written) == 4 and list(elsewhere.iterdir()) == []
    _same_store(here / "rel.zarr", cube)


# -- 4. interrupts -------------------------------------------------------------------------------

SIGNER = '''
import os, time


def slow(href):
    """Reads of every date but the first take a second: room to interrupt after step one."""
    if os.environ.get("ICEMAP_TEST_FIRST_DATE", "-") not in href:
        time.sleep(1.0)
    return href
'''


def _default_signals() -> None:
    """In the child before exec: SIGINT and SIGTERM as an interactive shell gives them (default,
    unblocked), whatever the test process inherited: a suite run as a background job ignores
    SIGINT, and an ignored signal survives exec."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM])


@pytest.mark.process
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_cli_interrupt_says_what_is_complete_and_a_rerun_finishes(sig: signal.Signals, code: int, region: Any,
                                                                  cube: Path, tmp_path: Path) -> None:
    (tmp_path / "slowsigner.py").write_text(SIGNER)
    out = tmp_path / "c.zarr"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "ICEMAP_TEST_FIRST_DATE": "20210212"}
    cmd = [sys.executable, "-m", "icemap.cli", "ingest", "--catalog", str(region.catalog), "--out", str(out),
           "--chunksize", "32", "--signer", "slowsigner:slow", "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals)
    # How this process would hand SIGINT down, for the failure message. A suite started as a
    # background job (`pytest &` in a non-interactive shell) runs with SIGINT ignored, which
    # survives exec: the child then ran to the end as if never interrupted. _default_signals
    # gives it what a user's shell gives.
    inherited = (signal.getsignal(signal.SIGINT), sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if zarr.open_group(str(out), mode="r")["complete"][:].sum() >= 1:
                    break
            except Exception:  # noqa: BLE001 - not created yet
                pass
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, (err, inherited, {k: v for k, v in env.items() if k.startswith(("DASK", "ICEMAP"))})
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"interrupted ({sig.name}) during ingest" in lines[0] and "rerun the same command to resume" in lines[0]
    complete = int(zarr.open_group(str(out), mode="r")["complete"][:].sum())
    assert 1 <= complete < 4 and f"has {complete} of 4 step(s) complete (2021-02-12T14:30:00Z" in lines[0]
    env.pop("ICEMAP_TEST_FIRST_DATE")
    again = subprocess.run(cmd, env={**env, "ICEMAP_TEST_FIRST_DATE": "2"}, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and f"skipped {complete} already complete" in again.stderr, again.stderr
    _same_store(out, cube)


@pytest.mark.parametrize("command", ["map", "composite"])
def test_sigterm_during_map_and_composite(command: str, cube: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM right after the first step is flagged (sent by the progress callback itself)."""
    from icemap import cli_common

    out = tmp_path / "out.zarr"
    args = [command, "--cube", str(cube), "--out", str(out), "--quiet"] + (
        ["--season", SEASON] if command == "composite" else [])
    real = cli_common._StepProgress.__call__

    def kill_after_first(self: Any, done: int, total: int, label: str) -> None:
        real(self, done, total, label)
        if done == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cli_common._StepProgress, "__call__", kill_after_first)
    code, err = _main(capsys, monkeypatch, *args)
    total = 4 if command == "map" else 2
    assert code == 143 and len(err.strip().splitlines()) == 1, err
    assert f"interrupted (SIGTERM) during {command}: {out} has 1 of {total} step(s) complete" in err
    monkeypatch.setattr(cli_common._StepProgress, "__call__", real)
    code, err = _main(capsys, monkeypatch, *args)
    assert code == 0 and "skipped 1" in err, err
    reference = tmp_path / "ref.zarr"
    if command == "map":
        icemap.map_cube(cube, reference)
    else:
        icemap.composite(cube, reference, season=SEASON)
    _same_store(out, reference)
