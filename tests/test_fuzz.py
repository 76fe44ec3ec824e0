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
# How an item states its acquisition time: the cube's time must be the UTC instant in every form.
DATETIMES = ("Z", "Z", "offset", "negative_offset", "date", "naive")
# Folder names of the scene files: plain, with spaces, URL and glob characters, not UTF-8.
NAMES = ("plain", "plain", "plain", "space", "question", "bracket", "non_utf8")
# A scale stated by the user (item_from_files scale=, CLI --scale): None is the sensor table's.
SCALES = (None, None, None, None, 1e-4, 2.75e-5, -1e-4, 0.0, float("nan"), float("inf"), 1e9)

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
    dt_form: str = "Z"
    name_form: str = "plain"
    user_scale: float | None = None


@st.composite
def cases(draw: Any) -> Case:
    a, b = draw(st.floats(-0.8, 1.6)), draw(st.floats(-0.8, 1.6))
    c, d = draw(st.floats(-0.8, 1.6)), draw(st.floats(-0.8, 1.6))
    return Case(
        epsg=draw(st.sampled_from(sorted(LOCATIONS))), res=draw(st.sampled_from([10.0, 20.0, 30.0])),
        # One-pixel grids too: their pixel size must come from the transform, not the coordinates.
        width=draw(st.one_of(st.integers(16, 48), st.just(1))), height=draw(st.one_of(st.integers(16, 48), st.just(1))),
        shift=(draw(st.integers(-40, 40)), draw(st.integers(-40, 40))), n_items=draw(st.integers(1, 2)),
        qa_files=draw(st.integers(0, 3)) > 0, use_qa=draw(st.integers(0, 2)) > 0, default_bands=draw(st.booleans()),
        bbox_mode=draw(st.sampled_from(BBOXES)),
        frac=(min(a, b), min(c, d), max(a, b) + 0.05, max(c, d) + 0.05),
        mutation=draw(st.sampled_from(MUTATIONS)), on_error=draw(st.sampled_from(["raise", "nodata"])),
        seed=draw(st.integers(0, 2**16)), dt_form=draw(st.sampled_from(DATETIMES)),
        name_form=draw(st.sampled_from(NAMES)), user_scale=draw(st.sampled_from(SCALES)),
    )


@dataclass
class ItemTruth:
    """What an item's pixels must be, from its files and metadata (not from icemap)."""

    files: dict[str, Path]
    scale: dict[str, float] = field(default_factory=dict)
    offset: dict[str, float] = field(default_factory=dict)
    present: set[str] = field(default_factory=set)
    time: np.datetime64 | None = None


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
        files = _rename(files, folder / f"i{k}", case.name_form)
        iid = f"scene{k}"
        day = 5 + 3 * k
        text, utc = {
            "Z": (f"2022-01-{day:02d}T10:00:00Z", f"2022-01-{day:02d}T10:00:00"),
            "offset": (f"2022-01-{day:02d}T10:00:00+05:30", f"2022-01-{day:02d}T04:30:00"),
            "negative_offset": (f"2022-01-{day:02d}T22:00:00-03:00", f"2022-01-{day + 1:02d}T01:00:00"),
            "date": (f"2022-01-{day:02d}", f"2022-01-{day:02d}T00:00:00"),
            "naive": (f"2022-01-{day:02d}T10:00:00", f"2022-01-{day:02d}T10:00:00"),  # no zone: UTC
        }[case.dt_form if k == 0 else "Z"]  # the second item in Z: mixed forms in one load
        scale = case.user_scale if k == 0 else None
        item = item_from_files(files, id=iid, datetime=text, platform="landsat-9", scale=scale)
        t = ItemTruth(files=files, present=set(BANDS), time=np.datetime64(utc, "ns"))
        # A scale without an offset means offset 0 (never the sensor table's -0.2).
        t.scale = {b: float(SCALE if scale is None else scale) for b in BANDS}
        t.offset = {b: float(OFFSET if scale is None else 0.0) for b in BANDS}
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


def _rename(files: dict[str, Path], folder: Path, form: str) -> dict[str, Path]:
    """Move a scene's folder to a name with spaces, ``?``, ``[`` or bytes that are not UTF-8."""
    if form == "plain":
        return files
    new = folder.with_name({"space": f"{folder.name} with spaces", "question": f"{folder.name}?x=1",
                            "bracket": f"{folder.name}[0]*",
                            "non_utf8": os.fsdecode(folder.name.encode() + b"-\xe9t\xe9")}[form])
    folder.rename(new)
    return {k: new / p.name for k, p in files.items()}


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
        assert ds["time"].values[ti] == t.time, (iid, ds["time"].values[ti], t.time)  # UTC, never wall time
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
    try:
        built = _build(case, folder)  # item_from_files refuses bad scales and names: an IcemapError
    except IcemapError as exc:
        return type(exc).__name__
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
        try:
            built = _build(case, folder)
        except IcemapError as exc:
            report[f"cli:{type(exc).__name__}"] += 1
            return
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


@pytest.mark.process
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


# -- tampered model folders: read as a model, or one ModelError ---------------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
MODEL_FIELDS = ("architecture", "channels", "bands", "normalisation", "threshold", "training", "validation",
                "weights_sha256", "format_version", "icemap_version")


@settings(max_examples=max(20, settings().max_examples // 3))
@given(edits=st.lists(st.tuples(st.sampled_from(MODEL_FIELDS + ("architecture.depth", "architecture.kind",
                                                                "architecture.halo", "architecture.bogus")),
                                st.one_of(JSON_VALUES, st.just("__delete__"))), min_size=1, max_size=3),
       truncate=st.integers(0, 6))
def test_fuzz_tampered_model_folder(edits: list[tuple[str, Any]], truncate: int, workdir: Path,
                                    report: Counter[str]) -> None:
    """Edited fields, wrong types, deletions and truncated JSON: the metadata reads, or a ModelError.

    Only the metadata path is fuzzed (read_metadata, the tiling context, the weights checksum);
    no inference runs, so each example takes milliseconds.
    """
    from icemap.errors import ModelError
    from icemap.infer import model_context
    from icemap.model.checkpoint import read_metadata

    folder = _fresh(workdir) / "model"
    folder.mkdir()
    meta = json.loads((REPO / "src" / "icemap" / "models" / "default" / "model.json").read_text())
    for key, value in edits:
        target, name = (meta["architecture"], key.split(".", 1)[1]) if key.startswith("architecture.") else (meta, key)
        if not isinstance(target, dict):
            continue
        if value == "__delete__":
            target.pop(name, None)
        else:
            target[name] = value
    text = json.dumps(meta)
    if truncate == 1:  # a copy cut short
        text = text[: len(text) // 2]
    (folder / "model.json").write_text(text)
    try:
        m = read_metadata(folder)
        model_context(m)
        outcome = "read"
    except ModelError:
        outcome = "ModelError"
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)
    report[f"model:{outcome}"] += 1
