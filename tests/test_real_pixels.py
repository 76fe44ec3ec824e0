"""Every per-pixel decision of icemap, checked on real hand-labelled pixels.

``../shared/data/rgi_benchmark_glacier_spectra`` holds Landsat 8/9 C2 L2 and Sentinel-2 L2A
surface reflectance at hand-labelled points on and around six benchmark glaciers: snow, shadowed
snow, ice, rock/debris and water at four (training files), snow / not snow at two others
(validation files). Points have no spatial context, so they test what a detector says about a
pixel: the NDSI threshold, the guards, the U-Net's input normalisation, and the U-Net itself on a
uniform field of each spectrum. The sample simulator's "seasonal" spectra are checked against the
same pixels here too. The shares these tests bound are the ones docs/default-model.md reports.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from icemap import sample as S
from icemap.guards import DarkGuard, WaterGuard
from icemap.kernels import ice_mask, normalized_difference
from icemap.lab.default import CHANNELS, POINT_FIELD, POINT_FILES, _point_channels, point_scores, point_spectra, \
    point_unet_probability
from icemap.model.packaged import default_model_dir

from .conftest import SHARED_DATA, shared_path

GLACIER = ("snow", "ice")  # glacier surface at these benchmark glaciers (data README)


@pytest.fixture(scope="module")
def spectra() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    shared_path("rgi_benchmark_glacier_spectra", "README.md")
    return point_spectra(SHARED_DATA)


@pytest.fixture(scope="module")
def shares() -> dict[str, Any]:
    shared_path("rgi_benchmark_glacier_spectra", "README.md")
    return point_scores(SHARED_DATA, unet=False)


def _class(spectra: dict[str, Any], name: str, cls: str) -> np.ndarray:
    refl, codes = spectra[name]
    code = {v: k for k, v in POINT_FILES[name][3].items()}[cls]
    return refl[codes == code]


def test_point_spectra_are_surface_reflectance(spectra: dict[str, Any]) -> None:
    """The Landsat files lack Collection 2's -0.2 offset; the reader adds it (data README)."""
    for name in ("landsat", "sentinel2"):
        snow, ice, rock = (_class(spectra, name, c) for c in ("snow", "ice", "rock/debris"))
        # Snow and ice: bright in green, nearly black in swir16; rock: brighter in swir16.
        assert 0.4 < np.median(snow[:, 1]) < 0.95 and np.median(snow[:, 4]) < 0.05
        assert 0.2 < np.median(ice[:, 1]) < 0.5 and np.median(ice[:, 4]) < 0.03
        assert np.median(rock[:, 4]) > np.median(rock[:, 1])
    # Without the correction, Landsat snow's NDSI would be about 0.55 (the file's own column).
    snow = _class(spectra, "landsat", "snow")
    corrected = np.median(normalized_difference(snow[:, 1], snow[:, 4]))
    raw = np.median(normalized_difference(snow[:, 1] + 0.2, snow[:, 4] + 0.2))
    assert corrected > 0.9 > 0.7 > raw
    # The Sentinel-2 validation file has no B12: swir22 is missing, nothing else.
    s2v = spectra["sentinel2 validation"][0]
    assert np.isnan(s2v[:, 5]).all() and np.isfinite(s2v[:, :5]).all()


def test_ndsi_on_real_pixels(shares: dict[str, Any]) -> None:
    """NDSI 0.4 separates glacier snow and ice from rock, and calls real water ice."""
    for name in ("landsat", "sentinel2"):
        r = shares[name]["NDSI 0.4"]
        assert r["snow"] >= 0.95 and r["ice"] >= 0.97
        assert r["shadowed snow"] >= 0.8
        assert r["rock/debris"] <= 0.02
        assert r["water"] >= 0.85  # the classic false positive the guards exist for
    for name in ("landsat validation", "sentinel2 validation"):
        assert shares[name]["NDSI 0.4"]["snow"] >= 0.99


def test_guards_on_real_pixels(shares: dict[str, Any], spectra: dict[str, Any]) -> None:
    """The water and dark guards remove all real water and keep glacier snow; their price is dark
    bare ice (NIR below the water guard's 0.11), measured and bounded here."""
    for name in ("landsat", "sentinel2"):
        plain, guarded = shares[name]["NDSI 0.4"], shares[name]["NDSI 0.4 + guards"]
        assert guarded["water"] == 0.0
        assert guarded["snow"] >= plain["snow"] - 0.01
        assert guarded["rock/debris"] <= plain["rock/debris"]
        assert guarded["shadowed snow"] >= 0.7
    assert shares["sentinel2"]["NDSI 0.4 + guards"]["ice"] >= 0.95
    # Landsat bare ice loses more: about one point in seven is darker than 0.11 in the NIR.
    assert shares["landsat"]["NDSI 0.4 + guards"]["ice"] >= 0.85
    for name in ("landsat validation", "sentinel2 validation"):
        assert shares[name]["NDSI 0.4 + guards"]["snow"] >= 0.98
    # Every ice point the guards remove fails one of their two tests, and nothing else.
    ice = _class(spectra, "landsat", "ice")
    g, n, s = ice[:, 1], ice[:, 3], ice[:, 4]
    params = {**WaterGuard().kernel_params(), **DarkGuard().kernel_params()}
    removed = (ice_mask(g, s, 0.4) == 1) & (ice_mask(g, s, 0.4, nir08=n, **params) == 0)
    assert removed.any()
    assert ((n[removed] < params["nir_min"]) | (g[removed] < params["green_min"])).all()


def test_unet_normalisation_keeps_real_pixels_in_range(spectra: dict[str, Any]) -> None:
    """The shipped model's normalisation maps real snow, ice and rock into the range it was
    trained on (within half a span beyond it; 1-99 % percentiles of the training chips), and leaves no real pixel NaN unless an input is
    undefined (a band missing or NDSI/NDWI of two non-positive bands)."""
    from icemap.model.checkpoint import read_metadata
    from icemap.model.inputs import Normalisation, normalise

    norm = Normalisation.from_dict(read_metadata(default_model_dir()).normalisation)
    for name in ("landsat", "sentinel2"):
        refl, codes = spectra[name]
        ch = _point_channels(refl)
        z, nodata = normalise(ch[:, :, None, None], norm, channel_axis=1)
        z, nodata = z[:, :, 0, 0], nodata[:, 0, 0]
        assert np.array_equal(nodata, ~np.isfinite(ch).all(axis=1))
        assert nodata.mean() < 0.005
        for cls in ("snow", "ice", "rock/debris"):
            code = {v: k for k, v in POINT_FILES[name][3].items()}[cls]
            pts = (codes == code) & ~nodata
            zz = z[pts]
            inside = ((zz >= -0.5) & (zz <= 1.5)).mean(axis=0)
            # The six bands; NDSI and NDWI are looser, each for a named reason.
            assert (inside[:6] >= 0.99).all(), (name, cls, inside)
            # NDSI: a point whose green is at or below 0 after the offset sits at the index's
            # limit, -1, beyond the training range (whose 1st percentile is -0.31). That is dark
            # rock, 1.3 % of the Landsat rock/debris points; no other point is out of range.
            ndsi = CHANNELS.index("ndsi")
            out = (zz[:, ndsi] < -0.5) | (zz[:, ndsi] > 1.5)
            assert out.mean() < 0.02, (name, cls, out.mean())
            assert (np.abs(ch[pts, ndsi][out]) == 1.0).all(), (name, cls)
            # NDWI: dark real bare ice (NIR ~0.1, NDWI up to 0.6) and dark rock lie beyond the
            # generator's NDWI range for a few percent of the points.
            assert inside[-1] >= 0.97, (name, cls, inside)


@pytest.fixture(scope="module")
def unet_sample(spectra: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The shipped U-Net on every 12th point of each training class (a few hundred fields)."""
    from icemap.model.checkpoint import read_metadata

    t = read_metadata(default_model_dir()).threshold
    out: dict[str, dict[str, float]] = {}
    for name in ("landsat", "sentinel2"):
        refl, codes = spectra[name]
        out[name] = {}
        for code, cls in POINT_FILES[name][3].items():
            pts = refl[codes == code][::12]
            pts = pts[np.isfinite(_point_channels(pts)).all(axis=1)]
            out[name][cls] = float((point_unet_probability(pts) >= t).mean())
    return out


def test_unet_on_real_pixels(unet_sample: dict[str, dict[str, float]]) -> None:
    """The default U-Net calls real bare ice ice and real rock and water not, on both sensors.
    (Its share on real glacier snow is reported in docs/default-model.md.)"""
    for name, r in unet_sample.items():
        assert r["ice"] >= 0.8, (name, r)
        assert r["rock/debris"] <= 0.02 and r["water"] <= 0.02, (name, r)


def test_point_field_is_the_whole_array_inference_path(spectra: dict[str, Any]) -> None:
    """A point's U-Net probability is what predict_array gives for a uniform cube of it."""
    from icemap.infer import ModelRef, predict_array
    from icemap.model.checkpoint import read_metadata
    from icemap.model.inputs import Normalisation

    meta = read_metadata(default_model_dir())
    pts = _class(spectra, "sentinel2", "snow")[:3]
    p = point_unet_probability(pts)
    for i, pt in enumerate(pts):
        x = np.broadcast_to(_point_channels(pt[None])[0][:, None, None], (8, POINT_FIELD, POINT_FIELD)).copy()
        whole = predict_array(x, ModelRef.from_path(default_model_dir()), Normalisation.from_dict(meta.normalisation),
                              depth=meta.architecture["depth"], halo=0, tile=POINT_FIELD, device="cpu")
        assert whole[0, POINT_FIELD // 2, POINT_FIELD // 2] == pytest.approx(p[i], abs=1e-6)


# -- the simulator's spectra against the real ones ---------------------------------------------


def test_seasonal_spectra_are_the_real_medians(spectra: dict[str, Any]) -> None:
    """sample._REAL_SPECTRA are the pooled per-class medians of the two training files (coastal
    included: OLI B1, MSI B1), read here from the files themselves."""
    import csv

    classes = {"snow": 1, "ice": 3, "rock": 4, "water": 5}
    cols = {"landsat": (["SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7"], -0.2),
            "sentinel2": (["B1", "B2", "B3", "B4", "B8A", "B11", "B12"], 0.0)}
    pooled: dict[str, list[np.ndarray]] = {k: [] for k in classes}
    for name, (bands, offset) in cols.items():
        path = shared_path("rgi_benchmark_glacier_spectra", POINT_FILES[name][0])
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        for cls, code in classes.items():
            v = np.array([[float(r[b]) if r[b] else np.nan for b in bands] for r in rows
                          if int(r["class"]) == code]) + offset
            pooled[cls].append(v)
    for cls in classes:
        med = np.nanmedian(np.concatenate(pooled[cls]), axis=0)
        np.testing.assert_allclose(S._REAL_SPECTRA[cls], med, atol=0.0015, err_msg=cls)


def test_seasonal_simulator_renders_the_real_spectra() -> None:
    """Rendered pure, clear pixels of the "seasonal" surface (six dates) have the real classes'
    medians: within 10 % for rock and turbid lakes, 15 % for bare ice (a per-date factor of
    0.75-1.3 for clean to dusty ice), 20 % for snow (firn at the snowline and a per-date
    brightness), and the same NDSI within 0.03."""
    transform, _ = S._grid(128)
    land = S._build_landscape(1, 128, transform)  # seed 1: a region with a turbid proglacial lake
    got: dict[str, list[np.ndarray]] = {k: [] for k in ("ice", "snow", "rock", "water")}
    for year in range(6):
        rng = S._rng(1, S._STREAM_DATE + year)
        scene = S._render_scene(land, rng, 57.0, 70.0, np.ones(land.shape, bool), surface="seasonal")
        # Divided by the light: the spectra before terrain shading (the real medians mix
        # sunlit and shaded slopes of their own sites; the simulated glaciers sit on shaded
        # south-facing slopes).
        rho = np.stack([S._reflectance(land, scene, b, rng) for b in range(7)]) / scene.illumination
        clear = (scene.cloud == 0) & (scene.shadow == 0)
        pure = {"ice": scene.visible["ice"], "snow": scene.visible["snow"],
                "rock": scene.visible["rock"] * (1 - land.alteration), "water": land.turbid}
        for k, frac in pure.items():
            got[k].append(rho[:, clear & (frac > 0.95)])
    tolerance = {"ice": 0.15, "rock": 0.10, "water": 0.10, "snow": 0.20}
    for k, parts in got.items():
        px = np.concatenate(parts, axis=1)
        assert px.shape[1] >= 20, k  # clear pixels of the class
        med, real = np.median(px, axis=1), np.asarray(S._REAL_SPECTRA[k])
        # Visible and NIR relative; SWIR (a few hundredths for snow, ice and water) also within 0.01.
        np.testing.assert_allclose(med[:5], real[:5], rtol=tolerance[k], err_msg=k)
        np.testing.assert_allclose(med[5:], real[5:], atol=0.01, rtol=tolerance[k], err_msg=k)
        nd = float(np.median(normalized_difference(px[2], px[5])))
        assert nd == pytest.approx(float(normalized_difference(np.float32(real[2]), np.float32(real[5]))), abs=0.03)


# -- the page's real-pixel table ----------------------------------------------------------------


def _doc_table(marker: str, n_keys: int) -> dict[tuple[str, ...], list[str]]:
    """A table of docs/default-model.md between ``<!-- marker -->`` comments: its first
    ``n_keys`` cells -> the other cells."""
    import re

    from .conftest import REPO

    text = (REPO / "docs" / "default-model.md").read_text()
    body = re.search(rf"<!-- {marker} -->(.*?)<!-- /{marker} -->", text, re.DOTALL)
    assert body, f"docs/default-model.md lacks the {marker} table markers"
    rows = {}
    for line in body.group(1).strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[tuple(cells[:n_keys])] = cells[n_keys:]
    return rows


def _doc_points() -> dict[tuple[str, ...], list[str]]:
    """docs/default-model.md's points table: (point set, method) -> cells."""
    return _doc_table("points", 2)


def test_docs_point_table_is_what_icemap_computes(shares: dict[str, Any],
                                                  unet_sample: dict[str, dict[str, float]]) -> None:
    """The NDSI and guard rows are recomputed exactly; the U-Net rows (a full run takes minutes)
    against every 12th point, within 0.08."""
    rows = _doc_points()
    for name in POINT_FILES:
        for method, row in shares[name].items():
            cells = rows[(name, method)]
            for cls, share in row.items():
                cell = next(c for c in cells if c.startswith("not snow: ")) if cls == "not snow" else \
                    cells[list(POINT_FILES["landsat"][3].values()).index(cls)]
                assert float(cell.replace("not snow: ", "").split(" (")[0]) == pytest.approx(100 * share, abs=0.051)
    for name, row in unet_sample.items():
        cells = rows[(name, "default U-Net")]
        for i, cls in enumerate(POINT_FILES[name][3].values()):
            assert float(cells[i].split(" (")[0]) == pytest.approx(100 * row[cls], abs=8.0), (name, cls)


def test_docs_per_site_table_is_what_icemap_computes(shares: dict[str, Any]) -> None:
    """The per-glacier table: NDSI and guard rows recomputed exactly; every site of every set is
    there; and each method's per-site counts and shares add up to the per-set table's row."""
    rows = _doc_table("points-by-site", 3)
    columns = [*POINT_FILES["landsat"][3].values(), "not snow"]

    def parse(cell: str) -> tuple[float, int] | None:
        return (float(cell.split(" (")[0]), int(cell.split("(")[1].rstrip(")"))) if cell else None

    for name in POINT_FILES:
        assert {(n, s) for n, s, _ in rows if n == name} == {(name, s) for s in shares["by_site"][name]}
        for site, methods in shares["by_site"][name].items():
            for method, row in methods.items():
                cells = rows[(name, site, method)]
                for cls, share in row.items():
                    got = parse(cells[columns.index(cls)])
                    n = shares["site_pixels"][name][site][method][cls]
                    assert (got is None) == (n == 0), (name, site, method, cls)
                    if got is not None:
                        assert got[1] == n and got[0] == pytest.approx(100 * share, abs=0.051), (name, site, cls)
    points = _doc_points()
    for (name, site, method), cells in rows.items():
        if method != "default U-Net":
            continue
        per_set = points[(name, method)]
        for cls in columns:
            parts = [parse(c[columns.index(cls)]) for (n, _, m), c in rows.items() if n == name and m == method]
            parts = [p for p in parts if p]
            if not parts:
                continue
            total = sum(k for _, k in parts)
            called = sum(v * k for v, k in parts) / total
            cell = next(c for c in per_set if c.startswith("not snow: ")) if cls == "not snow" else \
                per_set[columns.index(cls)]
            want = parse(cell.replace("not snow: ", ""))
            assert want is not None and total == want[1], (name, cls)
            assert called == pytest.approx(want[0], abs=0.06), (name, cls)


def test_point_spectra_without_the_data_says_where(tmp_path: Any) -> None:
    from icemap.errors import IcemapError

    with pytest.raises(IcemapError, match="rgi_benchmark_glacier_spectra.*--data"):
        point_spectra(tmp_path)
