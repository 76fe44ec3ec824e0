"""The U-Net, its input channel sets and its checkpoint format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from icemap.errors import ModelError
from icemap.model.checkpoint import (
    METADATA,
    WEIGHTS,
    CheckpointMeta,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from icemap.model.inputs import CHANNEL_SETS, Normalisation, build_inputs, normalise, resolve_channels
from icemap.model.unet import UNet, UNetConfig


def small_model(in_channels: int = 2, depth: int = 2, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    model = UNet(UNetConfig(in_channels=in_channels, depth=depth, base=4))
    # Non-trivial batch-norm statistics, as after training.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_shapes_and_multiple() -> None:
    model = small_model(3, depth=3)
    out = model(torch.zeros(2, 3, 32, 48))
    assert out.shape == (2, 1, 32, 48)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.zeros(1, 3, 30, 32))
    p = model.probabilities(torch.randn(1, 3, 16, 16))
    assert float(p.min()) >= 0 and float(p.max()) <= 1


def test_receptive_field_bounds_the_influence_of_a_pixel() -> None:
    model = small_model(1, depth=2)
    size = 96
    x = torch.zeros(1, 1, size, size)
    base = model(x)
    x[0, 0, size // 2, size // 2] = 5.0
    changed = (model(x) - base).abs()[0, 0] > 0
    ys, xs = np.nonzero(changed.numpy())
    reach = max(abs(ys - size // 2).max(), abs(xs - size // 2).max())
    assert 0 < reach <= model.config.receptive_field // 2


@pytest.mark.parametrize("bad", [dict(in_channels=0), dict(in_channels=1, depth=0), dict(in_channels=1, dropout=1.0)])
def test_config_validation(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        UNetConfig(**bad)


def test_channel_sets() -> None:
    assert resolve_channels("b3_b6") == ("green", "swir16")
    assert resolve_channels("ndsi,elevation") == CHANNEL_SETS["ndsi_dem"]
    assert len(CHANNEL_SETS["all_bands_dem"]) == 9  # B1-B7, B10, DEM as in study a
    with pytest.raises(ModelError, match="unknown input channel"):
        resolve_channels("green,swir1")


def test_inputs_from_cube(sample_region: Any) -> None:
    import icemap
    from icemap.stac import search

    cube = icemap.load(search(sample_region.catalog).item_dicts(), chunksize=64)
    x = build_inputs(cube, resolve_channels("reflective_ndsi"))
    assert x.dims == ("time", "channel", "y", "x") and x.dtype == np.float32
    np.testing.assert_array_equal(x.sel(channel="ndsi").values, icemap.ndsi(cube).values)
    with pytest.raises(ModelError, match="lwir11"):
        build_inputs(cube, resolve_channels("all_bands"))
    with pytest.raises(ModelError, match="DEM"):
        build_inputs(cube, resolve_channels("ndsi_dem"))
    with_dem = build_inputs(cube, resolve_channels("ndsi_dem"), dem=sample_region.dem)
    elev = with_dem.sel(channel="elevation").isel(time=0).values
    assert 3000 < np.nanmin(elev) < np.nanmax(elev) < 6500


def test_normalisation_fills_nan_per_pixel() -> None:
    rng = np.random.default_rng(0)
    data = rng.uniform(0, 1, size=(4, 2, 8, 8)).astype(np.float32)
    norm = Normalisation.fit(data)
    data[0, 1, 3, 3] = np.nan
    z, nodata = normalise(data, norm, channel_axis=1)
    assert nodata[0, 3, 3] and nodata.sum() == 1 and z[0, 1, 3, 3] == 0
    assert z.min() >= 0 and z.max() <= 1


def _save(tmp_path: Path, model: UNet | None = None) -> tuple[UNet, Path]:
    model = model or small_model()
    meta = CheckpointMeta(architecture={}, channels=["green", "swir16"], bands=["green", "swir16"],
                          normalisation=Normalisation([0, 0], [1, 1]).to_dict(), threshold=0.45)
    return model, save_checkpoint(model, meta, tmp_path / "model")


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model, folder = _save(tmp_path)
    loaded, meta = load_checkpoint(folder)
    x = torch.randn(2, 2, 32, 32)
    assert torch.equal(model(x), loaded(x))
    assert meta.threshold == 0.45 and meta.architecture["base"] == 4 and meta.weights_sha256
    assert read_metadata(folder).channels == ["green", "swir16"]


def test_checkpoint_is_not_a_pickle(tmp_path: Path) -> None:
    _, folder = _save(tmp_path)
    head = (folder / WEIGHTS).read_bytes()[:16]
    assert not head.startswith(b"\x80")  # pickle protocol marker
    json.loads((folder / METADATA).read_text())


def test_corrupt_or_swapped_weights_are_refused(tmp_path: Path) -> None:
    _, folder = _save(tmp_path)
    blob = bytearray((folder / WEIGHTS).read_bytes())
    blob[-5] ^= 0xFF
    (folder / WEIGHTS).write_bytes(bytes(blob))
    with pytest.raises(ModelError, match="corrupt or was replaced"):
        load_checkpoint(folder)
    _, other = _save(tmp_path / "b", small_model(seed=1))
    (folder / WEIGHTS).write_bytes((other / WEIGHTS).read_bytes())
    with pytest.raises(ModelError, match="do not match its metadata"):
        load_checkpoint(folder)


def test_bad_metadata_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no checkpoint"):
        read_metadata(tmp_path)
    (tmp_path / METADATA).write_text("{not json")
    with pytest.raises(ModelError, match="corrupt"):
        read_metadata(tmp_path)
    (tmp_path / METADATA).write_text(json.dumps({"channels": []}))
    with pytest.raises(ModelError, match="not written by icemap"):
        read_metadata(tmp_path)
    _, folder = _save(tmp_path / "c")
    (folder / WEIGHTS).unlink()
    with pytest.raises(ModelError, match="no model.safetensors"):
        load_checkpoint(folder)


def test_model_bands_checked_against_cube(tmp_path: Path, sample_region: Any) -> None:
    import icemap
    from icemap.stac import search

    _, folder = _save(tmp_path)
    meta = read_metadata(folder)
    cube = icemap.load(search(sample_region.catalog).item_dicts(), bands=["green", "nir08"])
    with pytest.raises(ModelError, match=r"needs band\(s\) \['swir16'\]"):
        meta.check_cube(cube)


def _model_json_reads(path: Path) -> list[int]:
    """Lines of ``path`` that open, read or parse a model folder's model.json.

    A read is a call of ``open``, ``read_text``, ``read_bytes``, ``json.load(s)`` or ``cat_file``
    whose arguments or receiver name the file: the ``METADATA`` constant, a ``"model.json"``
    literal, or a variable assigned from either (``path = folder / METADATA``). A bare literal
    outside a docstring counts too, since a path spelt out by hand is how a second reader starts.
    """
    import ast

    readers = {"open", "read_text", "read_bytes", "load", "loads", "cat_file"}
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}

    def is_file_literal(n: ast.AST) -> bool:
        return isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.rsplit("/", 1)[-1] == METADATA

    tainted = {"METADATA"}

    def names_file(node: ast.AST) -> bool:
        return any((isinstance(n, ast.Name) and n.id in tainted) or (isinstance(n, ast.Attribute) and n.attr == "METADATA")
                   or is_file_literal(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and names_file(node.value):
            tainted.update(t.id for t in node.targets if isinstance(t, ast.Name))
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            if name in readers and names_file(node):
                lines.add(node.lineno)
        elif is_file_literal(node) and id(node) not in docstrings:
            lines.add(node.lineno)
    return sorted(lines)


def test_model_json_has_one_reader() -> None:
    """Only :func:`icemap.model.checkpoint.read_metadata` reads model.json; every other module
    (inference, ``model info``, the STAC Item, ONNX import, training) goes through it, so the
    validation and its ModelError messages hold everywhere."""
    from .conftest import REPO

    import icemap.model.checkpoint as checkpoint

    src = REPO / "src" / "icemap"
    found = {p: lines for p in sorted(src.rglob("*.py")) if (lines := _model_json_reads(p))}
    reader = Path(checkpoint.__file__).resolve()
    assert [p.resolve() for p in found] == [reader], found
    # The detector sees the one reader's read (not only the name's definition), so it can fail.
    text = reader.read_text().splitlines()
    assert any("read_text" in text[n - 1] for n in next(iter(found.values()))), found
