"""Fuzz: every STAC item or local file icemap is given ends in a correct cube or an IcemapError.

Hypothesis draws tiny scenes (16-48 px) on polar stereographic (EPSG:3031, 3413), southern UTM,
USGS negative-northing and antimeridian grids; bboxes inside, on the edge of, outside the items
and across the antimeridian; missing, renamed and table-keyed assets; wrong ``raster:bands``;
truncated, corrupt and missing files; with and without QA. Each case either

* gives a cube whose every pixel equals an independent rasterio read of the files
  (``read(window) * scale + offset``, NaN at nodata and where QA_PIXEL flags clouds), or
* raises an :class:`~icemap.errors.IcemapError` (CLI: exit 1, one line, no traceback).

Any other exception fails the case. The number of cases tried is reported at the end of the
run; under ``CI=true`` the fixed-seed "ci" profile (tests/conftest.py) runs a few hundred.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
import rasterio
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.warp import transform_bounds

import icemap
from icemap.errors import IcemapError
from icemap.stac import item_from_files

from .conftest import FUZZ_TRIED, REPO
from .rasters import OFFSET, SCALE, make_scene, read_expected

#: A Landsat-like pixel grid origin per CRS (USGS's 15 m offsets where it has them).
LOCATIONS: dict[int, tuple[float, float]] = {
    3031: (2_346_015.0, 855_045.0),       # East Antarctica
    3413: (-200_010.0, -2_100_000.0),     # Greenland
    32719: (399_975.0, 6_650_025.0),      # Andes, southern UTM
    32619: (399_975.0, -3_349_975.0),     # USGS southern scene: northern zone, negative northing
    32760: (797_925.0, 7_050_015.0),      # UTM 60S, straddling the antimeridian
    32633: (600_000.0, 5_300_040.0),      # Alps
}
BANDS = ("green", "swir16")
# Repeats weight the draw: most cases should end in a cube to compare, not in an error.
MUTATIONS = ("none", "none", "none", "none", "missing_band_one", "missing_band_all", "renamed_table", "renamed_eo",
             "renamed_unknown", "rb_scale", "rb_string", "rb_empty", "truncated", "corrupt", "missing_file")
BBOXES = ("none", "none", "none", "inside", "inside", "edge", "edge", "outside", "antimeridian", "bounds_outside")

@dataclass
class Case:
    epsg: int
    res: float
    width: int
    height: int
    shift: tuple[int, int]
    n_items: int
    qa_files: bool
    use_qa: bool
    default_bands: bool
    bbox_mode: str
    frac: tuple[float, float, float, float]
    mutation: str
    on_error: str
    seed: int


@st.composite
def cases(draw: Any) -> Case:
    a, b = draw(st.floats(-0.8, 1.6)), draw(st.floats(-0.8, 1.6))
    c, d = draw(st.floats(-0.8, 1.6)), draw(st.floats(-0.8, 1.6))
    return Case(
        epsg=draw(st.sampled_from(sorted(LOCATIONS))), res=draw(st.sampled_from([10.0, 20.0, 30.0])),
        width=draw(st.integers(16, 48)), height=draw(st.integers(16, 48)),
        shift=(draw(st.integers(-40, 40)), draw(st.integers(-40, 40))), n_items=draw(st.integers(1, 2)),
        qa_files=draw(st.integers(0, 3)) > 0, use_qa=draw(st.integers(0, 2)) > 0, default_bands=draw(st.booleans()),
        bbox_mode=draw(st.sampled_from(BBOXES)),
        frac=(min(a, b), min(c, d), max(a, b) + 0.05, max(c, d) + 0.05),
        mutation=draw(st.sampled_from(MUTATIONS)), on_error=draw(st.sampled_from(["raise", "nodata"])),
        seed=draw(st.integers(0, 2**16)),
    )


@dataclass
class ItemTruth:
    """What an item's pixels must be, from its files and metadata (not from icemap)."""

    files: dict[str, Path]
    scale: dict[str, float] = field(default_factory=dict)
    offset: dict[str, float] = field(default_factory=dict)
    present: set[str] = field(default_factory=set)


@dataclass
class Built:
    items: list[dict[str, Any]]
    truth: dict[str, ItemTruth]
    load_kwargs: dict[str, Any]


def _build(case: Case, folder: Path) -> Built:
    left0, top0 = LOCATIONS[case.epsg]
    items, truth = [], {}
    for k in range(case.n_items):
        left = left0 + (case.shift[0] + k * case.width // 2) * case.res
        top = top0 - (case.shift[1] + k * case.height // 3) * case.res
        files = make_scene(folder / f"i{k}", epsg=case.epsg, left=left, top=top, width=case.width,
                           height=case.height, res=case.res, seed=case.seed + k, qa=case.qa_files)
        iid = f"scene{k}"
        item = item_from_files(files, id=iid, datetime=f"2022-01-{5 + 3 * k:02d}T10:00:00Z", platform="landsat-9")
        t = ItemTruth(files=files, present=set(BANDS))
        t.scale = {b: float(SCALE) for b in BANDS}
        t.offset = {b: float(OFFSET) for b in BANDS}
        items.append(item)
        truth[iid] = t
    _mutate(case, items, truth)
    kwargs: dict[str, Any] = {"on_error": case.on_error, "qa": "qa_pixel" if case.use_qa else None,
                              "resolution": case.res}
    if not case.default_bands:
        kwargs["bands"] = list(BANDS)
    left, top = left0 + case.shift[0] * case.res, top0 - case.shift[1] * case.res
    w_m, h_m = case.width * case.res, case.height * case.res
    f = case.frac
    if case.bbox_mode in ("inside", "edge", "outside"):
        if case.bbox_mode == "inside":
            f = tuple(min(max(v, 0.0), 1.0) for v in f)  # type: ignore[assignment]
            if f[2] - f[0] < 0.05 or f[3] - f[1] < 0.05:
                f = (0.2, 0.2, 0.8, 0.8)
        elif case.bbox_mode == "outside":
            f = (f[0] + 2.5, f[1] + 2.5, f[2] + 2.5, f[3] + 2.5)
        kwargs["bbox"] = transform_bounds(f"EPSG:{case.epsg}", "EPSG:4326", left + f[0] * w_m, top - f[3] * h_m,
                                          left + f[2] * w_m, top - f[1] * h_m, densify_pts=21)
    elif case.bbox_mode == "antimeridian":
        s, n = items[0]["bbox"][1], items[0]["bbox"][3]
        kwargs["bbox"] = (179.0 + case.frac[0] * 0.5, s, -179.5 + case.frac[2] * 0.4, n)
    elif case.bbox_mode == "bounds_outside":
        kwargs["bounds"] = (left - 3 * w_m, top - h_m, left - 2 * w_m, top)
    return Built(items, truth, kwargs)


def _mutate(case: Case, items: list[dict[str, Any]], truth: dict[str, ItemTruth]) -> None:
    item, t = items[0], truth[items[0]["id"]]
    assets = item["assets"]
    m = case.mutation
    if m == "missing_band_one":
        del assets["swir16"]
        t.present.discard("swir16")
    elif m == "missing_band_all":
        for it in items:
            it["assets"].pop("swir16", None)
            truth[it["id"]].present.discard("swir16")
    elif m == "renamed_table":
        assets["SR_B6.TIF"] = assets.pop("swir16")  # a USGS file-name key the table knows
    elif m == "renamed_eo":
        assets["band_b"] = {**assets.pop("swir16"), "eo:bands": [{"name": "B6", "common_name": "swir16"}]}
    elif m == "renamed_unknown":
        assets["b6_custom"] = assets.pop("swir16")
        t.present.discard("swir16")
    elif m == "rb_scale":
        assets["green"]["raster:bands"] = [{"scale": 1e-4, "offset": 0.05, "nodata": 0}]
        t.scale["green"], t.offset["green"] = 1e-4, 0.05
    elif m == "rb_string":
        assets["green"]["raster:bands"] = [{"scale": "0.0000275", "offset": -0.2}]
    elif m == "rb_empty":
        assets["green"]["raster:bands"] = []
    elif m == "truncated":
        p = t.files["swir16"]
        data = p.read_bytes()
        p.write_bytes(data[: max(200, len(data) * 6 // 10)])
    elif m == "corrupt":
        p = t.files["swir16"]
        rng = np.random.default_rng(case.seed)
        data = bytearray(p.read_bytes())
        data[8:] = rng.integers(0, 256, size=len(data) - 8, dtype=np.uint8).tobytes()
        p.write_bytes(bytes(data))
    elif m == "missing_file":
        t.files["swir16"].unlink()


def _readable(path: Path) -> bool:
    try:
        with rasterio.open(path) as src:
            src.read(1)
        return True
    except Exception:
        return False


def check_cube(ds: Any, built: Built, use_qa: bool) -> None:
    """Every pixel equals the independent read of the files behind its time step."""
    bands = [str(b) for b in ds["band"].values]
    refl = ds["reflectance"].values
    for ti, iid in enumerate(ds["item_ids"].values):
        t = built.truth[str(iid)]
        qa_path = t.files.get("qa_pixel") if use_qa else None
        for bi, band in enumerate(bands):
            got = refl[ti, bi]
            path = t.files.get(band)
            if band not in t.present or path is None or not path.exists() or not _readable(path):
                assert np.isnan(got).all(), (iid, band)
                continue
            exp = read_expected(ds, path, scale=t.scale[band], offset=t.offset[band], nodata=0, qa_path=qa_path)
            np.testing.assert_allclose(got, exp, rtol=0, atol=1e-6, err_msg=f"{iid} {band}")


def run_api(case: Case, folder: Path) -> str:
    built = _build(case, folder)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with dask.config.set(scheduler="synchronous"):
                ds = icemap.load(built.items, chunksize=64, **built.load_kwargs).compute()
    except IcemapError as exc:
        return type(exc).__name__
    check_cube(ds, built, case.use_qa)
    return "cube"


@pytest.fixture(scope="module")
def report() -> Counter[str]:
    """The session's tally, printed by tests/conftest.py's terminal summary."""
    return FUZZ_TRIED


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="icemap-fuzz-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _fresh(workdir: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=workdir))


@given(case=cases())
def test_fuzz_load(case: Case, report: Counter[str], workdir: Path) -> None:
    folder = _fresh(workdir)
    try:
        outcome = run_api(case, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report[f"api:{outcome}"] += 1


def _cli_args(built: Built, folder: Path, case: Case) -> list[str]:
    catalog = folder / "items.ndjson"
    catalog.write_text("\n".join(json.dumps(it) for it in built.items) + "\n")
    args = ["ingest", "--catalog", str(catalog), "--out", str(folder / "cube.zarr"), "--quiet",
            "--on-error", case.on_error, "--chunksize", "64", "--resolution", str(case.res)]
    if "bands" in built.load_kwargs:
        args += ["--bands", ",".join(built.load_kwargs["bands"])]
    if built.load_kwargs["qa"] is None:
        args.append("--no-qa")
    if "bbox" in built.load_kwargs:
        args += ["--bbox", *(repr(float(v)) for v in built.load_kwargs["bbox"])]
    return args


@settings(max_examples=max(12, settings().max_examples // 8))
@given(case=cases())
def test_fuzz_cli(case: Case, report: Counter[str], workdir: Path) -> None:
    """Through the CLI in-process (typer's CliRunner): exit 0 with a correct store, or an IcemapError."""
    from typer.testing import CliRunner

    from icemap.cli import app

    if case.bbox_mode == "bounds_outside":  # no --bounds on the CLI: the outside bbox covers it
        case.bbox_mode = "outside"
    folder = _fresh(workdir)
    try:
        built = _build(case, folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with dask.config.set(scheduler="synchronous"):
                result = CliRunner().invoke(app, _cli_args(built, folder, case))
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            if not isinstance(result.exception, IcemapError):
                raise result.exception
            report[f"cli:{type(result.exception).__name__}"] += 1
            return
        assert result.exit_code == 0, result.output
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = icemap.open_cube(folder / "cube.zarr").compute()
        check_cube(ds, built, case.use_qa)
        report["cli:cube"] += 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# A few real processes: the user-facing contract (exit 1, one line on stderr, no traceback).
FIXED = {
    "corrupt": Case(3031, 30.0, 24, 20, (0, 0), 1, True, True, False, "none", (0, 0, 1, 1), "corrupt", "raise", 1),
    "outside": Case(3413, 30.0, 24, 20, (0, 0), 2, True, True, False, "outside", (0, 0, 1, 1), "none", "raise", 2),
    "rb_string": Case(32619, 30.0, 24, 20, (3, 1), 1, False, False, True, "edge", (-0.4, 0.1, 0.5, 0.6),
                      "rb_string", "raise", 3),
    "ok_antimeridian": Case(32760, 30.0, 32, 20, (0, 0), 1, True, True, False, "antimeridian", (0.9, 0, 0.9, 1),
                            "none", "raise", 4),
}


@pytest.mark.parametrize("name", sorted(FIXED))
def test_fuzz_cli_process(name: str, tmp_path: Path, report: Counter[str]) -> None:
    case = FIXED[name]
    built = _build(case, tmp_path)
    env = {**os.environ}
    out = subprocess.run([sys.executable, "-m", "icemap.cli", *_cli_args(built, tmp_path, case)],
                         capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    report[f"cli-process:{'exit0' if out.returncode == 0 else 'exit1'}"] += 1
    assert "Traceback" not in out.stderr
    if name.startswith("ok"):
        assert out.returncode == 0, out.stderr
        check_cube(icemap.open_cube(tmp_path / "cube.zarr").compute(), built, case.use_qa)
    else:
        assert out.returncode == 1, out.stderr
        errors = [line for line in out.stderr.splitlines() if line.startswith("icemap: error:")]
        assert len(errors) == 1, out.stderr
