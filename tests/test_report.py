"""The HTML report: self-contained, escaped, and rendered by a real headless Chromium.

The browser test starts Debian's ``chromium`` through ``chromedriver`` (selenium's WebDriver
client) and stops both by PID in teardown, also when the test fails. Without them the test
skips locally with the reason and fails under ``CI=true`` (.ci/run installs them).
"""

from __future__ import annotations

import base64
import html
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import psutil
import pytest

import icemap
from icemap.errors import IcemapError

from .conftest import IN_CI, require_module, icemap_cli

require_module("matplotlib", "report")


@pytest.fixture(scope="module")
def inputs(sample_region: Any, sample_cube: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A cube, its NDSI product, and outlines whose ids need escaping: what a report reads."""
    from icemap.workflow import map_cube

    folder = tmp_path_factory.mktemp("report")
    map_cube(sample_cube, folder / "ice.zarr")
    outlines = gpd.read_file(sample_region.outlines, layer="glaciers")
    # RGI-style ids, one with characters that must be escaped in HTML.
    outlines["RGIId"] = [f"RGI60-17.{i:05d}" for i in range(1, len(outlines) + 1)]
    outlines.loc[0, "RGIId"] = "RGI60-17.<b>&1</b>"
    ref = folder / "rgi.gpkg"
    outlines.drop(columns=["glacier_id"]).to_file(ref, layer="glaciers")
    return {"cube": sample_cube, "pred": folder / "ice.zarr", "reference": ref, "ids": list(outlines["RGIId"]),
            "folder": folder}


@pytest.fixture(scope="module")
def run(inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` reported through the CLI (the report page and its series)."""
    folder = inputs["folder"]
    out = folder / "report.html"
    res = icemap_cli("report", "--cube", str(inputs["cube"]), "--pred", str(inputs["pred"]), "--reference",
                     str(inputs["reference"]), "--out", str(out), "--series-out", str(folder / "series.parquet"))
    assert res.returncode == 0, res.stderr
    return {**inputs, "html": out, "series": folder / "series.parquet"}


def test_report_is_self_contained_and_escaped(run: dict[str, Any]) -> None:
    text = run["html"].read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    # No resource from outside the file: every src is a data: URL, no stylesheet or script links.
    assert "<script" not in text and "<link" not in text
    srcs = re.findall(r'src="([^"]*)"', text)
    # A map per season-year, then the area plot.
    n_years = pd.DatetimeIndex(icemap.open_cube(run["pred"])["time"].values).year.nunique()
    assert n_years >= 2 and len(srcs) == n_years + 1
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "url(" not in text
    # Ids are escaped: the markup in the id shows as text, never as a <b> element.
    assert html.escape("RGI60-17.<b>&1</b>") in text and "<b>&1</b>" not in text
    # Provenance: method, threshold, the input items and versions.
    product = icemap.open_cube(run["pred"])
    for item in str(product["item_ids"].values[0]).split(","):
        assert item in text
    plain = html.unescape(text)
    assert "<dt>method</dt><dd>ndsi</dd>" in text and "<dt>threshold</dt><dd>0.4</dd>" in text
    assert f'"icemap": "{icemap.__version__}"' in plain and '"matplotlib": "' in plain
    series = pd.read_parquet(run["series"])
    assert set(series["glacier_id"]) == set(run["ids"])
    # Trends, not step-to-step rates: the trend table is there, the per-step tables have no rate.
    assert 'id="trend-table"' in text and "rate_stderr_km2_per_yr" in text and "change_km2_per_yr" not in text
    assert "area_uncertainty_sum_km2" in text and "area_uncertainty_rss_km2" in text


def test_report_refuses_bad_output_before_computing(inputs: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(IcemapError, match="HTML page"):
        icemap.report(inputs["cube"], inputs["pred"], inputs["reference"], tmp_path / "report.pdf")
    res = icemap_cli("report", "--cube", str(inputs["cube"]), "--pred", str(tmp_path / "none.zarr"),
                     "--reference", str(inputs["reference"]), "--out", str(tmp_path / "r.html"))
    assert res.returncode == 1 and "does not exist" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_figures_from_the_cli_and_api(run: dict[str, Any], tmp_path: Path) -> None:
    from PIL import Image

    png = tmp_path / "map.png"
    res = icemap_cli("figure", "--cube", str(run["cube"]), "--pred", str(run["pred"]), "--out", str(png), "--time", "0",
                     "--dpi", "120")
    assert res.returncode == 0, res.stderr
    with Image.open(png) as im:
        assert im.format == "PNG" and min(im.size) > 400
        assert tuple(round(v) for v in im.info["dpi"]) == (120, 120)  # pHYs: the size a layout program uses
    for fmt, magic in (("pdf", b"%PDF-"), ("svg", b"<?xml")):
        out = tmp_path / f"map.{fmt}"
        res = icemap_cli("figure", "--cube", str(run["cube"]), "--pred", str(run["pred"]), "--out", str(out),
                         "--format", fmt)
        assert res.returncode == 0, res.stderr
        head = out.read_bytes()[:400]
        assert head.startswith(magic) and (fmt != "svg" or b"<svg" in out.read_bytes()[:2000])
    res = icemap_cli("figure", "--cube", str(run["cube"]), "--pred", str(run["pred"]), "--out", str(tmp_path / "m.png"),
                     "--format", "pdf")
    assert res.returncode == 1 and "--format" in res.stderr and not (tmp_path / "m.png").exists()

    table = icemap.glacier_series(run["pred"], run["reference"])
    fig = icemap.area_plot(icemap.region_series(table), table, top=3)
    axes = fig.get_axes()
    assert len(axes[1].get_legend().get_texts()) == 3
    # The region line carries the summed areas, one point per time step.
    line = axes[0].get_lines()[0]
    np.testing.assert_allclose(np.asarray(line.get_ydata(), dtype=float), table.groupby("time")["area_km2"].sum().to_numpy())
    # Colour-blind safe: Okabe-Ito colours, a different marker per glacier, its id at the line's end.
    from matplotlib.colors import to_hex

    from icemap.figures import OKABE_ITO

    glacier_lines = [c.lines[0] for c in axes[1].containers]  # each errorbar's data line
    assert len(glacier_lines) == 3
    assert len({ln.get_marker() for ln in glacier_lines}) == 3
    assert {to_hex(ln.get_color()).upper() for ln in glacier_lines} <= set(OKABE_ITO)
    labels = [t.get_text() for t in axes[1].texts if t.get_gid() == "direct-label"]
    assert sorted(labels) == sorted(str(le.get_text()) for le in axes[1].get_legend().get_texts())

    product = icemap.open_cube(run["pred"])
    cube = icemap.open_cube(run["cube"])
    fig = icemap.map_figure(cube, product, time=-1, outlines=run["reference"], change=table)
    title = fig.get_axes()[0].get_title()
    when = str(product["time"].values[-1])[:10]
    assert "EPSG:32719" in title and f"acquired {when}" in title and "NDSI, threshold 0.4" in title
    credit = [t.get_text() for t in fig.findobj(lambda a: a.get_gid() == "credit")]
    assert credit == ["Landsat Collection 2 Level-2 courtesy of the U.S. Geological Survey"]
    assert any(ln.get_gid() == "graticule" for ln in fig.get_axes()[0].get_lines())
    assert any(t.get_text().endswith(("°S", "°N")) for t in fig.get_axes()[0].texts)
    assert any("%/yr" in ax.get_ylabel() for ax in fig.get_axes())  # the trend colour bar


def test_composite_title_gives_the_range_of_source_dates() -> None:
    """A composite's title spans its pixels' dates; method, model and credit come from attributes."""
    import rioxarray  # noqa: F401  (the .rio accessor of the hand-made cube)
    import xarray as xr

    rng = np.random.default_rng(0)
    h = w = 40
    y = 6_650_000.0 - 30.0 * (np.arange(h) + 0.5)
    x = 406_000.0 + 30.0 * (np.arange(w) + 0.5)
    days = np.full((1, h, w), float((pd.Timestamp("2022-02-07") - pd.Timestamp("1970-01-01")).days))
    days[0, :, 25:] += 8.0  # the east from the second date
    days[0, :3, :3] = np.nan  # no clear observation
    label = pd.DatetimeIndex(["2022-03-31"])
    cube = xr.Dataset(
        {"reflectance": (("time", "band", "y", "x"), rng.uniform(0, 0.5, (1, 3, h, w)).astype(np.float32)),
         "source_date": (("time", "y", "x"), days)},
        coords={"time": label, "band": ["green", "nir08", "swir16"], "y": y, "x": x},
        attrs={"icemap:composite": {"source_attrs": {"sensor": "sentinel-2-l2a"}}}).rio.write_crs("EPSG:32719")
    ice = xr.DataArray(rng.integers(0, 2, (1, h, w)).astype(np.uint8), dims=("time", "y", "x"),
                       coords={"time": label, "y": y, "x": x}, name="ice").rio.write_crs("EPSG:32719")
    pred = xr.Dataset({"ice": ice}, attrs={"method": "unet", "threshold": 0.5, "model_sha256": "0123456789ab" + "f" * 52})
    fig = icemap.map_figure(cube, pred, dpi=60)
    title = fig.get_axes()[0].get_title()
    assert "acquired 2022-02-07 to 2022-02-15 (composite)" in title
    assert "U-Net, model sha256 0123456789ab, probability threshold 0.5" in title
    assert "product step 2022-03-31" in title  # the season's label is not an acquisition date
    credit = [t.get_text() for t in fig.findobj(lambda a: a.get_gid() == "credit")]
    assert credit == ["Contains modified Copernicus Sentinel data 2022"]


# -- the browser --------------------------------------------------------------------------------


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"browser unavailable under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium driven by chromedriver; both stopped by PID in teardown."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        _unavailable("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,2000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver_path)
    driver = None
    started: list[Any] = []
    try:
        driver = webdriver.Chrome(service=service, options=options)
        # chromedriver and the browser processes it started, by PID, for the teardown below.
        started = [psutil.Process(service.process.pid)]
        started += started[0].children(recursive=True)
        yield driver
    finally:
        try:
            if driver is not None:
                driver.quit()
        finally:
            for proc in started:  # whatever quit() left running (also after a failed test)
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(started, timeout=30)


def test_report_renders_in_chromium(run: dict[str, Any], browser: Any) -> None:
    browser.get(run["html"].resolve().as_uri())
    assert browser.title.startswith("icemap report")
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);")
    n_years = pd.DatetimeIndex(icemap.open_cube(run["pred"])["time"].values).year.nunique()
    assert len(images) == n_years + 1 and all(done and w > 0 and h > 0 for done, w, h in images), images
    cells = browser.execute_script(
        "return Array.from(document.querySelectorAll('#glacier-table tbody td.id')).map(td => td.textContent);")
    assert set(cells) == set(run["ids"])  # every glacier, the escaped one as its literal id
    assert browser.execute_script("return document.querySelectorAll('#glacier-table b').length;") == 0
    n_steps = icemap.open_cube(run["pred"]).sizes["time"]
    assert len(cells) == len(run["ids"]) * n_steps
    errors = [e for e in browser.get_log("browser") if e.get("level") in ("SEVERE", "ERROR")]
    assert not errors, errors


@pytest.mark.process
def test_missing_report_extra_is_named_first(tmp_path: Path) -> None:
    """Without matplotlib, `icemap report` says which extra to install, before any other check."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['matplotlib'] = None\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    res = subprocess.run([sys.executable, "-m", "icemap.cli", "report", "--cube", "none.zarr", "--pred", "none.zarr",
                          "--reference", "none.gpkg", "--out", str(tmp_path / "r.html")],
                         capture_output=True, text=True, timeout=120, env=env, check=False)
    assert res.returncode == 1 and 'pip install "icemap[report]"' in res.stderr and "matplotlib" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
