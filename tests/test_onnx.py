"""Networks trained elsewhere: ONNX import, and inference through icemap's one predictor.

icemap's own U-Net is exported with torch's ONNX exporter (as docs/models.md tells PyTorch
users to) and imported; the imported model must give the native model's probabilities, tile
seam-free on a real LocalCluster, run through ``icemap map --method unet --model``, and refuse
networks it cannot tile with one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import icemap
from icemap.errors import IcemapError, ModelError
from icemap.infer import ModelRef, default_halo, predict, predict_array
from icemap.model.checkpoint import load_checkpoint, read_metadata
from icemap.model.inputs import Normalisation, build_inputs
from icemap.lab.onnx_import import TILING_TOLERANCE, import_onnx, probe_reach, tiling_error
from icemap.model.onnx_runner import OnnxRunner
from icemap.model.unet import UNetConfig
from icemap.stac import search

from .conftest import icemap_cli
from .stacschemas import validate as validate_stac
from .test_infer import make_model

BANDS = ["green", "swir16"]


def export(model: torch.nn.Module, path: Path, *, dynamic: bool = True, dynamo: bool = False) -> Path:
    """A torch model to ONNX with dynamic batch, height and width, as docs/models.md shows.

    ``dynamo=True`` is torch's default exporter since 2.9 (the one the docs lead with; about
    15-40 s a network here, so one test uses it); the TorchScript exporter (``dynamo=False``)
    takes about 2 s and writes the same operators for this network.
    """
    import warnings

    x = torch.rand(2, 2, 64, 64)
    if dynamo:
        from torch.export import Dim

        shapes = {"x": {0: Dim("batch"), 2: Dim("h"), 3: Dim("w")}} if dynamic else None
        torch.onnx.export(model.eval(), (x,), str(path), input_names=["x"], output_names=["y"], dynamo=True,
                          dynamic_shapes=shapes, verbose=False)
        return path
    axes = {"x": {0: "batch", 2: "h", 3: "w"}, "y": {0: "batch", 2: "h", 3: "w"}} if dynamic else None
    with warnings.catch_warnings():
        # The TorchScript exporter's deprecation notice, and its tracer noting the U-Net's size check.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(model.eval(), (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False,
                          dynamic_axes=axes)
    return path


class WithSigmoid(torch.nn.Module):
    """A network whose last op is a Sigmoid (a probability output, as many published ones)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


class GlobalContext(torch.nn.Module):
    """Adds the image mean to every pixel: no finite halo tiles it exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + x.mean(dim=(1, 2, 3), keepdim=True)


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("native") / "m")  # depth 3, base 4, seeded, non-trivial BN


@pytest.fixture(scope="module")
def onnx_files(native: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    net, _ = load_checkpoint(native)
    folder = tmp_path_factory.mktemp("onnx")
    return {"logit": export(net, folder / "unet.onnx"), "probability": export(WithSigmoid(net), folder / "unet_sigmoid.onnx")}


@pytest.fixture(scope="module")
def imported(native: Path, onnx_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    meta = read_metadata(native)
    out = tmp_path_factory.mktemp("imported")
    return {kind: import_onnx(f, out / kind, ",".join(meta.channels), normalisation=meta.normalisation)
            for kind, f in onnx_files.items()}


@pytest.fixture(scope="module")
def items(sample_region: Any) -> list[dict[str, Any]]:
    return search(sample_region.catalog).item_dicts()


def test_imported_folder_holds_no_pickle_and_records_the_network(imported: dict[str, Path], native: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    for kind, folder in imported.items():
        assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.onnx", "model.stac.json"]
        # The folder's STAC Item (MLM) names the imported network and validates offline.
        item = json.loads((folder / "model.stac.json").read_text())
        validate_stac(item)
        assert item["properties"]["mlm:framework"] == "ONNX"
        assert item["assets"]["weights"]["mlm:artifact_type"] == "onnx"
        meta = read_metadata(folder)
        assert meta.kind == "onnx" and meta.weights_file == "model.onnx"
        assert meta.architecture["output_kind"] == kind  # detected from the graph's last op
        assert meta.channels == BANDS and meta.bands == BANDS
        assert meta.normalisation["lo"] == read_metadata(native).normalisation["lo"]
        assert meta.weights_sha256 == ModelRef.from_path(folder).sha256
        raw = (folder / "model.onnx").read_bytes()
        assert not raw.startswith(b"\x80")  # a protobuf message, not a pickle stream
    from icemap.cli import main

    main(["model", "info", str(imported["logit"])])
    out = capsys.readouterr().out
    assert "ONNX" in out and "halo 56 px" in out and read_metadata(imported["logit"]).weights_sha256 in out


def test_probed_halo_covers_the_receptive_field(imported: dict[str, Path], native: Path) -> None:
    cfg = UNetConfig(**read_metadata(native).architecture)
    exact = default_halo(cfg.depth, cfg.receptive_field)
    for kind, folder in imported.items():
        arch = read_metadata(folder).architecture
        assert arch["multiple"] == 2**cfg.depth and arch["depth"] == cfg.depth
        assert arch["halo"] % arch["multiple"] == 0 and arch["halo_source"] == "probe"
        assert arch["tiling_max_diff"] <= TILING_TOLERANCE
        if kind == "logit":
            assert arch["halo"] >= exact and arch["receptive_field"] >= cfg.receptive_field
        else:
            # Behind a float32 sigmoid, the 1e-8 logit changes at the far end of this untrained
            # U-Net's reach do not move the probability at all: the probe sees a shorter reach,
            # and that shorter halo still tiles exactly (test_onnx_equals_native, cluster test).
            assert exact - arch["multiple"] <= arch["halo"] <= exact


def test_tiling_check_catches_a_short_halo(imported: dict[str, Path], onnx_files: dict[str, Path],
                                           tmp_path: Path) -> None:
    """The check import relies on can fail: a halo below the reach makes tiles differ."""
    folder = imported["logit"]
    meta = read_metadata(folder)
    runner = OnnxRunner((folder / "model.onnx").read_bytes(), meta.architecture)
    assert tiling_error(runner, 2, 3, meta.architecture["halo"]) <= 1e-6
    assert tiling_error(runner, 2, 3, 8) > 0  # the context this untrained U-Net misses is faint, but seen
    assert tiling_error(runner, 2, 3, 0) > TILING_TOLERANCE
    with pytest.raises(ModelError, match="larger --halo"):
        import_onnx(onnx_files["logit"], tmp_path / "short", BANDS, halo=0)
    with pytest.raises(ModelError, match="multiple 4"):  # tiles on a 4-px grid: sizes the network rejects
        import_onnx(onnx_files["logit"], tmp_path / "short", BANDS, multiple=4)
    # A given halo that is large enough is kept (rounded to the multiple).
    given = import_onnx(onnx_files["logit"], tmp_path / "given", BANDS, halo=60)
    assert read_metadata(given).architecture["halo"] == 64 and read_metadata(given).architecture["halo_source"] == "given"


def test_onnx_equals_native(items: list[dict[str, Any]], native: Path, imported: dict[str, Path]) -> None:
    cube = icemap.load(items, bands=BANDS, chunksize=64)
    want = predict(cube, native, tile=32)["ice_probability"].values
    for folder in imported.values():
        got = predict(cube, folder, tile=32)
        prob = got["ice_probability"].values
        assert np.array_equal(np.isnan(prob), np.isnan(want))
        np.testing.assert_allclose(prob, want, atol=1e-5, rtol=0)
        assert got.rio.crs == cube.rio.crs and got.attrs["model_sha256"] == read_metadata(folder).weights_sha256
    # TTA goes through the same batch loop.
    one = icemap.load(items[-1:], bands=BANDS, chunksize=64)
    tta_native = predict(one, native, tta=True)
    tta_onnx = predict(one, imported["probability"], tta=True)
    for var in ("ice_probability", "ice_probability_std"):
        np.testing.assert_allclose(tta_onnx[var].values, tta_native[var].values, atol=1e-5, rtol=0)
    with pytest.raises(ModelError, match="dropout"):
        predict(one, imported["logit"], mc_samples=2)


@pytest.mark.cluster
def test_chunked_equals_whole_on_a_cluster(items: list[dict[str, Any]], imported: dict[str, Path]) -> None:
    from distributed import Client

    from icemap.cluster import local_cluster

    folder = imported["logit"]
    meta = read_metadata(folder)
    one = items[-1:]  # one date: the seams are spatial
    cube = icemap.load(one, bands=BANDS, chunksize=64)
    x = build_inputs(cube, meta.channels).values
    ref = ModelRef.from_path(folder)
    norm = Normalisation.from_dict(meta.normalisation)
    whole = np.stack([predict_array(x[t], ref, norm, depth=meta.architecture["depth"], halo=10**6, tile=10**6)[0]
                      for t in range(x.shape[0])])
    with local_cluster(n_workers=2, threads_per_worker=1, processes=True) as cluster, Client(cluster):
        # Ragged chunks (160 = 3 x 48 + 16) and tiles smaller than the halo.
        got = predict(icemap.load(one, bands=BANDS, chunksize=48), folder, tile=24,
                      batch_size=3)["ice_probability"].values
        assert np.array_equal(np.isnan(got), np.isnan(whole))
        np.testing.assert_allclose(got, whole, atol=2e-6, rtol=0)
    # Without the halo, seams appear: the measured halo is what makes chunks exact.
    seams = predict(cube, folder, halo=0, tile=32)["ice_probability"].values
    assert np.nanmax(np.abs(seams - whole)) > 1e-3


_cli = icemap_cli


def _one_line_error(capsys: pytest.CaptureFixture[str], args: list[str], text: str) -> None:
    """The CLI's entry point in this process (a subprocess per case would cost seconds of imports)."""
    from icemap.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 1, err
    assert "Traceback" not in err and err.count("icemap: error:") == 1 and len(err.strip().splitlines()) == 1, err
    assert text in err, err


def test_cli_import_then_map(items: list[dict[str, Any]], native: Path, onnx_files: dict[str, Path],
                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    norm = read_metadata(native).normalisation
    (tmp_path / "norm.json").write_text(json.dumps({"lo": norm["lo"], "hi": norm["hi"]}))
    model = tmp_path / "model"
    from icemap.cli import main

    main(["model", "import", str(onnx_files["logit"]), "--out", str(model), "--bands", "green,swir16",
          "--normalisation", str(tmp_path / "norm.json"), "--threshold", "0.4"])
    assert "halo 56 px (measured)" in capsys.readouterr().out
    cube_path = tmp_path / "cube.zarr"
    icemap.ingest(items[-1:], cube_path, bands=["green", "swir16"], chunksize=64)
    out = tmp_path / "onnx.zarr"
    res = _cli("map", "--cube", str(cube_path), "--method", "unet", "--model", str(model), "--out", str(out),
               "--tile", "32", "--quiet")
    assert res.returncode == 0, res.stderr
    prod = icemap.open_cube(out)
    want = predict(icemap.open_cube(cube_path), native)["ice_probability"].values
    np.testing.assert_allclose(prod["ice_probability"].values, want, atol=1e-5, rtol=0)
    assert prod["ice"].attrs["threshold"] == pytest.approx(0.4)
    assert prod.attrs["model_sha256"] == read_metadata(model).weights_sha256


def _onnx_model(tmp_path: Path, name: str, in_shape: list[Any], out_shape: list[Any]) -> Path:
    """A one-node ONNX graph (Relu) with the given input/output shapes, written with the onnx package."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], name,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def test_networks_icemap_cannot_tile_are_refused(tmp_path: Path, onnx_files: dict[str, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        "rank 3": _onnx_model(tmp_path, "rank3", ["n", 2, "h"], ["n", 2, "h"]),
        "2 channels": _onnx_model(tmp_path, "twoout", ["n", 2, "h", "w"], ["n", 2, "h", "w"]),
        "fixed height/width": export(torch.nn.Conv2d(2, 1, 3, padding=1), tmp_path / "fixed.onnx", dynamic=False),
    }
    (tmp_path / "corrupt.onnx").write_bytes(onnx_files["logit"].read_bytes()[:200])
    cases["not a readable ONNX file"] = tmp_path / "corrupt.onnx"
    for message, path in cases.items():
        with pytest.raises(ModelError, match=message):
            import_onnx(path, tmp_path / "out", BANDS)
        _one_line_error(capsys, ["model", "import", str(path), "--out", str(tmp_path / "out"), "--bands",
                                 "green,swir16"], message)
    args = ["model", "import", str(onnx_files["logit"]), "--out", str(tmp_path / "out"), "--bands"]
    _one_line_error(capsys, [*args, "green"], "takes 2 input channel(s) but --bands names 1")
    _one_line_error(capsys, [*args, "green,swir16", "--normalisation", '{"mean": [0.1]}'], "lacks 'std'")
    _one_line_error(capsys, [*args, "green,swir16", "--multiple", "3"], "power of two")
    with pytest.raises(ModelError, match="global pooling"):
        import_onnx(export(GlobalContext(), tmp_path / "global.onnx"), tmp_path / "out", BANDS, max_probe=256)
    scaled = torch.nn.Conv2d(2, 1, 1)
    with torch.no_grad():
        scaled.weight.fill_(10.0)
    with pytest.raises(ModelError, match="not a probability"):
        import_onnx(export(scaled, tmp_path / "scaled.onnx"), tmp_path / "out", BANDS, output="probability")
    assert not (tmp_path / "out").exists()  # nothing written for a refused network
    _one_line_error(capsys, ["model", "info", str(tmp_path / "out")], "no checkpoint")


def test_changed_onnx_file_is_refused(items: list[dict[str, Any]], imported: dict[str, Path],
                                      onnx_files: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(imported["logit"], folder)
    cube = icemap.load(items[-1:], bands=BANDS, chunksize=64)
    lazy = predict(cube, folder)  # the graph pins the sha256 of model.onnx
    # Swap in another valid network (the sigmoid export) behind the metadata's back.
    (folder / "model.onnx").write_bytes((imported["probability"] / "model.onnx").read_bytes())
    with pytest.raises(ModelError, match="do not match"):
        load_checkpoint(folder)
    with pytest.raises(IcemapError, match="do not match"):
        lazy["ice_probability"].compute()
    (folder / "model.onnx").unlink()
    with pytest.raises(ModelError, match="no model.onnx"):
        load_checkpoint(folder)


def test_fixed_batch_network(native: Path, tmp_path: Path) -> None:
    """A network exported with a fixed batch size: icemap pads its last batch."""
    import warnings

    net, meta = load_checkpoint(native)
    path = tmp_path / "batch2.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(net, (torch.rand(2, 2, 64, 64),), str(path), input_names=["x"], output_names=["y"],
                          dynamo=False, dynamic_axes={"x": {2: "h", 3: "w"}, "y": {2: "h", 3: "w"}})
    folder = import_onnx(path, tmp_path / "m", BANDS, normalisation=meta.normalisation)
    assert read_metadata(folder).architecture["batch"] == 2
    x = np.random.default_rng(3).random((2, 100, 70), dtype=np.float32)
    norm = Normalisation.from_dict(meta.normalisation)
    got = predict_array(x, ModelRef.from_path(folder), norm, depth=3, halo=56, tile=32, batch_size=3)[0]
    want = predict_array(x, net, norm, depth=3, halo=56, tile=32, batch_size=3)[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_probe_needs_no_tolerance(imported: dict[str, Path], native: Path) -> None:
    """The measured reach is the native U-Net's theoretical one, up to the probe block's width."""
    folder = imported["logit"]
    meta = read_metadata(folder)
    runner = OnnxRunner((folder / "model.onnx").read_bytes(), meta.architecture)
    rf = UNetConfig(**read_metadata(native).architecture).receptive_field
    reach = probe_reach(runner, 2, 8, max_size=512)
    assert (rf - 1) // 2 <= reach <= (rf - 1) // 2 + 7


@pytest.mark.slow
def test_dynamo_export_as_the_docs_show(native: Path, tmp_path: Path) -> None:
    """torch's default exporter writes the weights beside the graph (model.onnx.data); import embeds them."""
    net, meta = load_checkpoint(native)
    path = export(net, tmp_path / "unet.onnx", dynamo=True)
    assert (tmp_path / "unet.onnx.data").exists()
    folder = import_onnx(path, tmp_path / "model", BANDS, normalisation=meta.normalisation)
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.onnx", "model.stac.json"]
    (tmp_path / "unet.onnx.data").unlink()  # the folder needs nothing beside it
    x = np.random.default_rng(0).random((2, 75, 90), dtype=np.float32)
    norm = Normalisation.from_dict(meta.normalisation)
    got = predict_array(x, ModelRef.from_path(folder), norm, depth=3, halo=56, tile=32)[0]
    want = predict_array(x, net, norm, depth=3, halo=56, tile=32)[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
