"""Training: losses, a short run that learns, exact resume, checkpoints, ablation, experiment, CLI.

Everything runs on the shared 160 px sample region with a tiny U-Net (base 4, depth 2) and
32 px chips, so the whole module takes well under a minute on two CPU cores.
"""

from __future__ import annotations

import json
import subprocess
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from icemap.errors import IcemapError, ModelError, ModelNoBetterWarning
from icemap.model.checkpoint import load_checkpoint, read_metadata
from icemap.lab.data import ChipDataset
from icemap.model.inputs import Normalisation
from icemap.lab.train import (
    STATE_DIR,
    EpochRecord,
    TrainConfig,
    bce_loss,
    dice_loss,
    make_loss,
    predict_dataset,
    predict_window,
    prepare_data,
    score_dataset,
    train,
)
from icemap.model.unet import UNet

from .conftest import icemap_cli

TINY = dict(inputs="b3_b6", chip_size=32, depth=2, base=4, batch_size=4, split_iterations=40, patience=None,
            n_hard_negative=2, n_random=1, seed=1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    """One torch thread: tiny convolutions gain nothing from two, and on a busy machine two
    OpenMP threads spin against other processes (measured 10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cube_path(sample_cube: Path) -> Path:
    return sample_cube


@pytest.fixture(scope="module")
def data(cube_path: Path, sample_region: Any) -> Any:
    return prepare_data(cube_path, sample_region.outlines, chip_size=32, n_hard_negative=2, n_random=1,
                        split_seed=1, split_iterations=40, dem=sample_region.dem)


@pytest.fixture(scope="module")
def trained(data: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("model") / "m"
    return train(None, None, out, TrainConfig(**TINY, epochs=6), data=data, quiet=True)


def test_losses() -> None:
    t = torch.zeros(1, 1, 4, 4)
    t[..., :2, :] = 1
    v = torch.ones_like(t, dtype=torch.bool)
    perfect = (t * 2 - 1) * 50
    assert float(dice_loss(perfect, t, v)) < 1e-3
    assert float(dice_loss(-perfect, t, v)) > 0.9
    assert float(bce_loss(perfect, t, v)) < 1e-6
    logits = torch.randn(2, 1, 4, 4)
    tt = (torch.rand(2, 1, 4, 4) > 0.5).float()
    vv = torch.rand(2, 1, 4, 4) > 0.3
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[vv], tt[vv])
    assert float(bce_loss(logits, tt, vv)) == pytest.approx(float(ref), rel=1e-6)
    # Invalid pixels do not count, whatever they hold.
    wild = logits.clone()
    wild[~vv] = 1e4
    assert float(bce_loss(wild, tt, vv)) == pytest.approx(float(ref), rel=1e-6)
    assert float(dice_loss(wild, tt, vv)) == pytest.approx(float(dice_loss(logits, tt, vv)), rel=1e-6)
    combo = make_loss("dice+bce")(logits, tt, vv)
    assert float(combo) == pytest.approx(float(dice_loss(logits, tt, vv) + bce_loss(logits, tt, vv)))
    with pytest.raises(ModelError, match="loss must be"):
        make_loss("focal")


@pytest.mark.parametrize("bad, match", [
    (dict(inputs="b3_b7"), "unknown input channel"), (dict(mask="buffered"), "mask must be"),
    (dict(loss="l2"), "loss must be"), (dict(optimizer="sgd"), "optimizer must be"),
    (dict(threshold=1.5), "threshold"), (dict(threshold="best"), "threshold"), (dict(epochs=0), "epochs"),
    (dict(depth=9), "U-Net"), (dict(lr=-1.0), "learning rate"), (dict(overlap="merge"), "overlap"),
])
def test_config_validation(bad: dict[str, Any], match: str) -> None:
    with pytest.raises(ModelError, match=match):
        TrainConfig(**bad)


def test_training_learns_and_beats_an_untrained_model(trained: Any, data: Any) -> None:
    h = trained.history
    assert len(h) == 6 and all(isinstance(r, EpochRecord) for r in h)
    assert h[-1].train_loss < h[0].train_loss
    torch.manual_seed(123)
    untrained = UNet(trained.model.config).eval()
    norm = Normalisation.from_dict(trained.meta.normalisation)
    val = ChipDataset(data.source, data.samples("val"), ("green", "swir16"), normalisation=norm, multiple=4)
    f1_untrained = score_dataset(untrained, val, 0.5)["f1"]
    f1_trained = score_dataset(trained.model, val, trained.threshold)["f1"]
    assert f1_trained > f1_untrained + 0.1
    assert trained.meta.validation["f1"] == pytest.approx(f1_trained)
    assert trained.best_epoch == max(range(len(h)), key=lambda i: (h[i].val_f1, -i)) + 1


def test_checkpoint_records_everything_and_round_trips(trained: Any, data: Any, cube_path: Path) -> None:
    model, meta = load_checkpoint(trained.checkpoint)
    assert meta.channels == ["green", "swir16"] and meta.bands == ["green", "swir16"]
    assert meta.threshold == trained.threshold
    assert meta.normalisation["method"] == "minmax" and len(meta.normalisation["lo"]) == 2
    tr = meta.training
    assert tr["cube"] == str(cube_path) and tr["outlines"].endswith("glaciers.gpkg")
    assert tr["split_seed"] == 1 and tr["loss"] == "dice" and tr["optimizer"] == "adam" and tr["lr"] == 0.01
    assert tr["epochs"] == 6 and len(tr["history"]) == 6
    assert {"ks_area", "ks_shape", "p_area", "p_shape"} <= set(tr["split"]["sets"]["test"])
    assert {"f1", "precision", "recall", "best_epoch"} <= set(meta.validation)
    norm = Normalisation.from_dict(meta.normalisation)
    ds = ChipDataset(data.source, data.samples("test"), tuple(meta.channels), normalisation=norm, multiple=4)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        np.testing.assert_array_equal(model(x).numpy(), trained.model(x).numpy())


def test_training_state_is_safetensors_and_json(trained: Any) -> None:
    from safetensors import safe_open

    folder = trained.checkpoint / STATE_DIR
    info = json.loads((folder / "state.json").read_text())
    assert info["epoch"] == 6 and info["finished"] and info["optimizer"]["param_groups"][0]["lr"] == 0.01
    with safe_open(str(folder / "state.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("model/") for k in keys) and any(k.startswith("optim/") for k in keys)
    assert any(k.startswith("best/") for k in keys)
    for p in folder.iterdir():
        assert not p.read_bytes().startswith(b"\x80"), f"{p} looks like a pickle"


def test_resume_continues_identically(data: Any, tmp_path: Path) -> None:
    # With dropout: its masks come from torch's global RNG, re-seeded per epoch.
    cfg = TrainConfig(**TINY, epochs=4, dropout=0.2)
    full = train(None, None, tmp_path / "full", cfg, data=data, quiet=True)

    class Stop(Exception):
        pass

    def interrupt(rec: EpochRecord) -> None:
        if rec.epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        train(None, None, tmp_path / "cut", cfg, data=data, quiet=True, callback=interrupt)
    seen: list[int] = []
    resumed = train(None, None, tmp_path / "cut", cfg, data=data, quiet=True, resume=True,
                    callback=lambda r: seen.append(r.epoch))
    assert resumed.resumed_from == 2 and seen == [3, 4]
    a = [(r.train_loss, r.val_loss, r.val_f1) for r in full.history]
    b = [(r.train_loss, r.val_loss, r.val_f1) for r in resumed.history]
    assert a == b
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    # Other settings cannot resume this state.
    with pytest.raises(ModelError, match="other settings"):
        train(None, None, tmp_path / "cut", replace(cfg, lr=0.001), data=data, quiet=True, resume=True)


@pytest.mark.parametrize("overrides", [dict(loss="bce", optimizer="adadelta", lr=None),
                                       dict(loss="dice+bce", threshold="tune", augment=False)])
def test_other_losses_and_optimizers_run(data: Any, tmp_path: Path, overrides: dict[str, Any]) -> None:
    res = train(None, None, tmp_path / "m", TrainConfig(**{**TINY, **overrides}, epochs=2), data=data, quiet=True)
    assert all(np.isfinite(r.train_loss) for r in res.history)
    meta = read_metadata(res.checkpoint)
    if overrides.get("threshold") == "tune":
        assert meta.training["threshold_rule"] == "tuned on validation F1"
        assert meta.threshold in [c["threshold"] for c in meta.training["threshold_curve"]]
    else:
        assert meta.training["optimizer"] == "adadelta" and meta.training["lr"] == 1.0


def test_channel_hiding_changes_scores(trained: Any, data: Any) -> None:
    norm = Normalisation.from_dict(trained.meta.normalisation)
    ids = data.samples("val") + data.samples("test")
    ch = ("green", "swir16")
    base = score_dataset(trained.model, ChipDataset(data.source, ids, ch, normalisation=norm, multiple=4),
                         trained.threshold)
    for i in range(2):
        hidden = ChipDataset(data.source, ids, ch, normalisation=norm, multiple=4, hide_channel=i)
        s = score_dataset(trained.model, hidden, trained.threshold)
        assert (s["tp"], s["fp"]) != (base["tp"], base["fp"])


def test_predict_window_equals_chip_prediction(trained: Any, data: Any) -> None:
    norm = Normalisation.from_dict(trained.meta.normalisation)
    ids = data.samples("test")
    ds = ChipDataset(data.source, ids, ("green", "swir16"), normalisation=norm, multiple=4)
    chips = predict_dataset(trained.model, ds)
    for k, s in enumerate(ids):
        p = predict_window(trained.model, trained.meta, data.source.window(s))[0]
        ok = ~np.isnan(p)
        np.testing.assert_allclose(p[ok], chips[k][ok], atol=1e-5)


def test_chip_prediction_is_the_training_forward_pass(trained: Any, data: Any) -> None:
    """predict_dataset runs chips through infer.predict_array (the product's one forward pass) and
    gets the probabilities the training batches see: padding around the chip, hidden channels."""
    norm = Normalisation.from_dict(trained.meta.normalisation)
    ids = data.samples("test")
    for hide in (None, 1):
        # multiple=12 pads 32 px chips to 36, 2 px on each side: predict_array must pad the same way.
        ds = ChipDataset(data.source, ids, ("green", "swir16"), normalisation=norm, multiple=12, hide_channel=hide)
        assert ds.padded == 36 and ds.offset == 2
        probs = predict_dataset(trained.model, ds)
        trained.model.eval()
        with torch.no_grad():
            x = torch.stack([ds[i][0] for i in range(len(ds))])
            seen = ds.crop(torch.sigmoid(trained.model(x))[:, 0].numpy())
        valid = np.stack([ds.arrays(i)[2] for i in range(len(ds))])
        assert probs.shape == seen.shape == valid.shape
        assert not np.isnan(probs[valid]).any()  # NaN only where an input is nodata
        np.testing.assert_allclose(probs[valid], seen[valid], atol=1e-5)


def test_experiment_writes_tables(data: Any, sample_region: Any, tmp_path: Path) -> None:
    from icemap.lab.experiment import RunSpec, run_experiment

    runs = [RunSpec("b3_b6", "original"), RunSpec("ndsi_dem", "extended")]
    res = run_experiment(None, None, tmp_path, runs=runs, config=TrainConfig(**TINY, epochs=2), data=data,
                         dem=sample_region.dem, truth=sample_region, quiet=True)
    t3 = res.table3
    assert list(t3["model"]) == ["NDSI (calibrated)", "NDSI 0.4", "b3_b6_original", "ndsi_dem_extended"]
    assert {"f1", "balanced_accuracy", "precision", "recall", "ice_area_km2", "area_diff_pct"} <= set(t3.columns)
    assert -1 <= res.ndsi_threshold <= 1
    assert set(res.table5["model"]) == {"b3_b6_original", "ndsi_dem_extended"} and len(res.table5) == 4
    fp = res.false_positives
    assert {"water_fp", "cloud_shadow_fp", "snow_fp"} <= set(fp.columns) and len(fp) == 4
    for name in ("table3", "table5", "false_positives"):
        assert (tmp_path / f"{name}.csv").exists() and (tmp_path / f"{name}.md").read_text().startswith("# ")
    summary = json.loads((tmp_path / "experiment.json").read_text())
    assert summary["split"]["iterations"] == 40
    with pytest.raises(ModelError, match="needs band"):
        run_experiment(None, None, tmp_path / "x", runs=[RunSpec("all_bands")], data=data, quiet=True)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return icemap_cli(*args, env={"OMP_NUM_THREADS": "1"})


def test_cli_train_end_to_end(cube_path: Path, sample_region: Any, tmp_path: Path) -> None:
    out = tmp_path / "model"
    common = ["--cube", str(cube_path), "--reference", str(sample_region.outlines)]
    r = _cli("train", *common, "--out", str(out), "--inputs", "b3_b6", "--mask", "extended", "--epochs", "2",
             "--chip-size", "32", "--depth", "2", "--base", "4", "--batch-size", "4", "--split-iterations", "20",
             "--seed", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "validation F1" in r.stdout
    meta = read_metadata(out)
    assert meta.training["config"]["mask"] == "extended" and meta.training["epochs_run"] == 2
    r = _cli("train", *common, "--out", str(tmp_path / "x"), "--inputs", "b3_b7")
    assert r.returncode == 1 and "unknown input channel" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, match", [
    (["--inputs", "all_bands"], "lacks band"),
    (["--inputs", "ndsi_dem"], "DEM"),
    (["--loss", "focal"], "loss must be"),
    (["--mask", "buffered"], "mask must be"),
    (["--threshold", "best"], "threshold"),
])
def test_cli_errors_are_one_line(cube_path: Path, sample_region: Any, tmp_path: Path, args: list[str], match: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from icemap.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--cube", str(cube_path), "--reference", str(sample_region.outlines), "--out",
              str(tmp_path / "m"), "--quiet", *args])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


def test_cli_bad_paths_and_outlines_elsewhere(cube_path: Path, sample_region: Any, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import geopandas as gpd
    from shapely.affinity import translate

    from icemap.cli import main

    far = gpd.read_file(sample_region.outlines, layer="glaciers")
    far = far.set_geometry(far.geometry.apply(lambda g: translate(g, 0, 2e6)))
    far_path = tmp_path / "far.gpkg"
    far.to_file(far_path, layer="glaciers")
    cases = [
        (["--cube", str(tmp_path / "none.zarr"), "--reference", str(sample_region.outlines)], "no cube"),
        (["--cube", str(cube_path), "--reference", str(tmp_path / "none.gpkg")], "does not exist"),
        (["--cube", str(cube_path), "--reference", str(far_path)], "overlaps the cube"),
    ]
    for args, match in cases:
        with pytest.raises(SystemExit) as exc:
            main(["train", *args, "--out", str(tmp_path / "m"), "--quiet", "--chip-size", "32"])
        assert exc.value.code == 1
        assert match in capsys.readouterr().err
    with pytest.raises(IcemapError):
        # The API raises the same error the CLI prints.
        prepare_data(cube_path, far_path, chip_size=32)


def test_cli_experiment(cube_path: Path, sample_region: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from icemap.cli import main

    common = ["experiment", "--cube", str(cube_path), "--reference", str(sample_region.outlines), "--quiet",
              "--chip-size", "32", "--depth", "2", "--base", "4", "--epochs", "1", "--split-iterations", "20",
              "--seed", "1"]
    main([*common, "--out", str(tmp_path / "e"), "--inputs", "b3_b6", "--masks", "original",
          "--truth", str(sample_region.root)])
    out = capsys.readouterr().out
    assert "NDSI (calibrated)" in out and "b3_b6_original" in out
    assert (tmp_path / "e" / "table3.md").exists() and (tmp_path / "e" / "false_positives.csv").exists()
    with pytest.raises(SystemExit) as exc:
        main([*common, "--out", str(tmp_path / "f"), "--inputs", "all_bands,ndsi_dem"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "all_bands_original needs band(s) ['lwir11']" in err and "needs a DEM" in err


# -- fine-tuning, baselines, early stopping, spectral augmentation --------------------------------
INIT = dict(chip_size=32, batch_size=4, split_iterations=40, patience=None, n_hard_negative=2, n_random=1, seed=1,
            init="default")


def test_init_default_fine_tunes_with_the_models_inputs_and_normalisation(data: Any, tmp_path: Path) -> None:
    from icemap.model.packaged import default_model_dir

    start = read_metadata(default_model_dir())
    res = train(None, None, tmp_path / "ft", TrainConfig(**INIT, epochs=1), data=data, quiet=True)
    meta = read_metadata(res.checkpoint)
    # The starting model's channels, architecture and normalisation (not refitted on these chips).
    assert meta.channels == start.channels and meta.architecture == start.architecture
    assert meta.normalisation == start.normalisation
    init = meta.training["init"]
    assert init["model"] == "default" and init["weights_sha256"] == start.weights_sha256
    assert meta.training["lr"] == pytest.approx(0.001)  # a tenth of Adam's 0.01 when fine-tuning
    assert meta.threshold == 0.5 != start.threshold  # --threshold, not the starting model's (see _start_model)
    # The starting model competes as epoch 0: the result is never worse on validation.
    assert meta.validation["f1_at_0_5"] >= init["start_val_f1"]
    default_model, _ = load_checkpoint(default_model_dir())
    same = all(torch.equal(v, default_model.state_dict()[k]) for k, v in res.model.state_dict().items())
    assert same == (res.best_epoch == 0)
    # Rerun: the same weights, byte for byte (CPU training is deterministic).
    again = train(None, None, tmp_path / "ft2", TrainConfig(**INIT, epochs=1, threshold=0.3), data=data, quiet=True)
    assert again.meta.weights_sha256 == res.meta.weights_sha256
    assert again.meta.threshold == 0.3


@pytest.mark.parametrize("bad, match", [
    (dict(inputs="ndsi"), "reads the inputs"), (dict(depth=2), "has depth 4"),
    (dict(init="/nonexistent/model"), "no checkpoint"),
])
def test_init_conflicts_are_clear_errors(data: Any, tmp_path: Path, bad: dict[str, Any], match: str) -> None:
    with pytest.raises(ModelError, match=match):
        train(None, None, tmp_path / "m", TrainConfig(**{**INIT, **bad}, epochs=1), data=data, quiet=True)


def test_validation_baselines_count_the_models_pixels(trained: Any, data: Any) -> None:
    import icemap
    from icemap.lab.train import validation_baselines

    norm = Normalisation.from_dict(trained.meta.normalisation)
    val = ChipDataset(data.source, data.samples("val"), ("green", "swir16"), normalisation=norm, multiple=4)
    base = validation_baselines(val)
    # Same pixels as the model's validation scores.
    assert base["all_ice"]["n_pixels"] == trained.meta.validation["n_pixels"] == base["ndsi"]["n_pixels"]
    assert base["all_ice"]["recall"] == 1.0 and base["all_ice"]["tn"] == 0
    # NDSI against a plain numpy reference on the same chips.
    for t in (0.4, 0.2):
        want = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
        for i, s in enumerate(val.samples):
            refl = data.source.window(s)
            g, sw = (refl.sel(band=b).values[0].astype(np.float32) for b in ("green", "swir16"))
            with np.errstate(invalid="ignore", divide="ignore"):
                ice = (g - sw) / (g + sw) >= np.float32(t)
            _, y, valid = val.arrays(i)
            for k, (p, r) in {"tp": (1, 1), "fp": (1, 0), "fn": (0, 1), "tn": (0, 0)}.items():
                want[k] += int(((ice == p) & ((y == 1) == r) & valid).sum())
        with icemap.set_options(ndsi_threshold=t):
            got = validation_baselines(val)["ndsi"]
        assert got["threshold"] == t and {k: got[k] for k in want} == want
    rec = trained.meta.training["baselines"]
    assert rec["all_ice"]["f1"] == trained.meta.validation["all_ice_f1"]
    assert set(rec["no_better_than"]) <= {"all_ice", "ndsi"}


def _collapsed_eval(model: Any, ds: Any, loss_fn: Any, device: Any, amp: bool, batch_size: int,
                    threshold: float = 0.5) -> Any:
    """A validation pass of a model that calls everything ice (what a collapsed run does)."""
    total = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    probs = []
    for i in range(len(ds)):
        _, y, valid = ds.arrays(i)
        total["tp"] += int((y[valid] == 1).sum())
        total["fp"] += int((y[valid] == 0).sum())
        probs.append(np.ones(y.shape, dtype=np.float32))
    return 0.5, total, np.stack(probs)


def test_early_stopping_never_keeps_a_collapsed_model(data: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from icemap.errors import ModelNoBetterWarning
    from icemap.lab import train as train_mod

    monkeypatch.setattr(train_mod, "_eval", _collapsed_eval)
    cfg = TrainConfig(**{**TINY, "patience": 1}, epochs=3)
    # No epoch beats "everything is ice", so patience does not stop the run...
    with pytest.warns(ModelNoBetterWarning, match=r"no better than calling everything ice \(F1 0\.\d+\)"):
        res = train(None, None, tmp_path / "m", cfg, data=data, quiet=True)
    assert len(res.history) == 3 and not res.stopped_early
    assert "all_ice" in res.no_better_than
    assert read_metadata(res.checkpoint).training["baselines"]["no_better_than"] == res.no_better_than
    # ... and --strict makes it an error (the checkpoint stays for inspection).
    with pytest.raises(ModelError, match="not learnt to map ice"):
        train(None, None, tmp_path / "s", cfg, data=data, quiet=True, strict=True)
    assert (tmp_path / "s" / "model.json").exists()


def test_early_stopping_still_stops_a_learning_model(data: Any, tmp_path: Path) -> None:
    res = train(None, None, tmp_path / "m", TrainConfig(**{**TINY, "patience": 1}, epochs=8), data=data, quiet=True)
    best = max(r.val_f1 for r in res.history)
    if res.stopped_early:
        assert best > res.meta.validation["all_ice_f1"]
    else:
        assert len(res.history) == 8


def test_spectral_augment_on_any_band_channels() -> None:
    from icemap.lab.augment import SpectralAugment, check_augment_channels

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(0.05, 0.9, size=(3, 3, 16, 16)).astype(np.float32))
    g, s = x[:, 0], x[:, 1]
    x[:, 2] = (g - s) / (g + s)
    valid = torch.from_numpy(rng.random((3, 1, 16, 16)) > 0.2)
    norm = Normalisation(lo=[0, 0, -1], hi=[1, 1, 1], method="minmax")
    z = x.clone()
    z[:, 2] = (x[:, 2] + 1) / 2
    out = SpectralAugment(channels=("green", "swir16", "ndsi"))(z, valid, norm, np.random.default_rng(1))
    v = valid.expand_as(z)
    assert torch.equal(out[~v], z[~v]) and not torch.equal(out[v], z[v])
    # NDSI is recomputed from the changed bands.
    g2, s2 = out[:, 0].clamp_min(0), out[:, 1].clamp_min(0)
    nd = (out[:, 2] * 2 - 1)[valid[:, 0]]
    np.testing.assert_allclose(nd.numpy(), ((g2 - s2) / (g2 + s2))[valid[:, 0]].numpy(), atol=1e-5)
    for bad in (("elevation",), ("green", "ndsi"), ("green", "swir16", "slope")):
        with pytest.raises(ModelError, match="spectral augmentation"):
            check_augment_channels(bad)


def test_spectral_augment_option_is_recorded(data: Any, tmp_path: Path) -> None:
    res = train(None, None, tmp_path / "m", TrainConfig(**TINY, epochs=1, spectral_augment=True), data=data,
                quiet=True)
    aug = read_metadata(res.checkpoint).training["augmentation"]
    assert aug["flips"] and aug["batch"]["class"] == "SpectralAugment"
    assert aug["batch"]["channels"] == ["green", "swir16"]
    with pytest.raises(ModelError, match="spectral augmentation"):
        train(None, None, tmp_path / "x", TrainConfig(**{**TINY, "inputs": "ndsi_dem"}, epochs=1,
                                                      spectral_augment=True), data=data, quiet=True)


def test_cli_train_init_default_prints_baselines(cube_path: Path, sample_region: Any, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    r = _cli("train", "--cube", str(cube_path), "--reference", str(sample_region.outlines), "--out", str(out),
             "--init", "default", "--augment", "spectral", "--epochs", "1", "--chip-size", "32",
             "--split-iterations", "20", "--seed", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "started from default" in r.stdout
    meta = read_metadata(out)
    b = meta.training["baselines"]
    assert (f"NDSI 0.4 F1 {b['ndsi']['f1']:.3f}, everything-is-ice F1 {b['all_ice']['f1']:.3f}" in r.stdout)
    assert ("ModelNoBetterWarning" in r.stderr) == bool(b["no_better_than"])
    r = _cli("train", "--cube", str(cube_path), "--reference", str(sample_region.outlines), "--out",
             str(tmp_path / "x"), "--init", "default", "--inputs", "green,swir16,ndsi", "--quiet")
    assert r.returncode == 1 and "reads the inputs" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli("train", "--cube", str(cube_path), "--reference", str(sample_region.outlines), "--out",
             str(tmp_path / "y"), "--augment", "colour", "--quiet")
    assert r.returncode == 1 and "--augment must be one of" in r.stderr


def test_restarts_keep_the_best_validation_seed(data: Any, tmp_path: Path) -> None:
    res = train(None, None, tmp_path / "m", TrainConfig(**TINY, epochs=1, restarts=2), data=data, quiet=True)
    runs = res.meta.training["restarts"]
    assert [r["seed"] for r in runs] == [1, 2]
    best = max(runs, key=lambda r: (r["val_f1"], -r["seed"]))
    assert res.meta.training["chosen_seed"] == best["seed"] == res.meta.training["config"]["seed"]
    assert res.meta.validation["f1"] == pytest.approx(best["val_f1"])
    # The kept model is the chosen run's, byte for byte; every run stays for inspection.
    chosen = read_metadata(tmp_path / "m" / "restarts" / f"seed-{best['seed']}")
    assert read_metadata(tmp_path / "m").weights_sha256 == chosen.weights_sha256
    assert all((tmp_path / "m" / "restarts" / f"seed-{r['seed']}" / "model.json").exists() for r in runs)
    # Same chips and split for every run.
    other = read_metadata(tmp_path / "m" / "restarts" / f"seed-{3 - best['seed']}")
    assert other.training["split"] == chosen.training["split"]


def test_labels_per_year_pick_each_dates_outlines(cube_path: Path, sample_region: Any, tmp_path: Path) -> None:
    import geopandas as gpd
    import pandas as pd
    from shapely.affinity import translate

    from icemap.labels import rasterize_outlines
    from icemap.store import open_cube

    gdf = gpd.read_file(sample_region.outlines, layer="glaciers")
    moved = gdf.set_geometry(gdf.geometry.apply(lambda g: translate(g, 300, 0)))
    yearly = pd.concat([gdf.assign(year=2021), moved.assign(year=2022)], ignore_index=True)
    path = tmp_path / "yearly.gpkg"
    yearly.to_file(path, layer="glaciers")
    d = prepare_data(cube_path, path, chip_size=32, split_seed=1, split_iterations=20, label_time="year",
                     layout="grid", split="location")
    refl = open_cube(cube_path)["reflectance"]
    dates = [str(t)[:10] for t in refl["time"].values]
    assert d.index.params["label_match"] == "year"
    assert d.index.params["dates_without_labels"] == [t for t in dates if t[:4] not in ("2021", "2022")]
    assert {dates[s.time][:4] for s in d.index.samples} <= {"2021", "2022"}
    truth = {y: np.asarray(rasterize_outlines(yearly[yearly.year == int(y)], refl).values) for y in ("2021", "2022")}
    for i, s in enumerate(d.index.samples):
        w = d.index.windows[s.window]
        want = truth[dates[s.time][:4]][w.y0:w.y0 + w.size, w.x0:w.x0 + w.size] > 0
        np.testing.assert_array_equal(d.source.sample_labels(i) > 0, want)
    with pytest.raises(ModelError, match="no column 'date'"):
        prepare_data(cube_path, path, chip_size=32, split_iterations=20, label_time="date", layout="grid",
                     split="location")
    path2 = tmp_path / "old.gpkg"
    gdf.assign(year=1999).to_file(path2, layer="glaciers")
    with pytest.raises(ModelError, match="no cube date .* has outlines of its year"):
        prepare_data(cube_path, path2, chip_size=32, split_iterations=20, label_time="year")


def test_labels_apart_from_the_outlines_that_place_the_chips(cube_path: Path, sample_region: Any,
                                                             tmp_path: Path) -> None:
    """``labels=``: chips and split come from the outlines, the labels of each date from the label file."""
    import geopandas as gpd
    import pandas as pd
    from shapely.geometry import box

    from icemap.labels import rasterize_outlines
    from icemap.store import open_cube

    refl = open_cube(cube_path)["reflectance"]
    dates = [str(t)[:10] for t in refl["time"].values]
    gdf = gpd.read_file(sample_region.outlines, layer="glaciers")
    x0, y0, x1, y1 = gdf.total_bounds
    # Each date: the glaciers plus a square of "snow" of its own, in a different place per date.
    squares = [box(x0 + 300 * k, y0, x0 + 300 * k + 600, y0 + 600) for k in range(len(dates))]
    labels = pd.concat([gdf.assign(date=d) for d in dates]
                       + [gpd.GeoDataFrame({"date": [d], "glacier_id": [f"SNOW-{k}"]}, geometry=[sq], crs=gdf.crs)
                          for k, (d, sq) in enumerate(zip(dates, squares))], ignore_index=True)
    path = tmp_path / "labels.gpkg"
    labels.to_file(path, layer="labels")
    d = prepare_data(cube_path, sample_region.outlines, chip_size=32, split_seed=1, split_iterations=20,
                     label_time="date", labels=path)
    plain = prepare_data(cube_path, sample_region.outlines, chip_size=32, split_seed=1, split_iterations=20)
    assert d.index.windows == plain.index.windows and d.split.report == plain.split.report
    assert d.labels_path == str(path) and d.outlines_path == str(sample_region.outlines)
    truth = {t: np.asarray(rasterize_outlines(labels[labels.date == t], refl).values) > 0 for t in dates}
    for i, s in enumerate(d.index.samples):
        w = d.index.windows[s.window]
        want = truth[dates[s.time]][w.y0:w.y0 + w.size, w.x0:w.x0 + w.size]
        np.testing.assert_array_equal(d.source.sample_labels(i) > 0, want)
    with warnings.catch_warnings():  # one epoch learns nothing; the rule is what is checked here
        warnings.simplefilter("ignore", ModelNoBetterWarning)
        res = train(None, None, tmp_path / "m", TrainConfig(**TINY, epochs=1, threshold="tune",
                                                             threshold_tolerance=0.01), data=d, quiet=True)
    assert res.meta.training["labels"] == str(path)
    assert res.meta.training["threshold_rule"] == "highest threshold within 0.01 of the best validation F1"
    curve = res.meta.training["threshold_curve"]
    best = max(r["f1"] for r in curve)
    assert res.threshold == max(r["threshold"] for r in curve if r["f1"] >= best - 0.01)


def test_split_by_year_holds_out_the_latest_years(cube_path: Path, sample_region: Any, tmp_path: Path) -> None:
    from icemap.store import open_cube

    d = prepare_data(cube_path, sample_region.outlines, chip_size=32, split="year")
    dates = [str(t)[:10] for t in open_cube(cube_path)["reflectance"]["time"].values]
    years = sorted({t[:4] for t in dates})
    assert len(years) == 3  # the sample region: one date per year
    got = {name: {dates[d.index.samples[i].time][:4] for i in d.samples(name)} for name in ("train", "val", "test")}
    assert got == {"train": {years[0]}, "val": {years[1]}, "test": {years[2]}}
    assert sum(len(d.samples(n)) for n in ("train", "val", "test")) == len(d.index.samples)
    res = train(None, None, tmp_path / "m", TrainConfig(**{**TINY, "split": "year"}, epochs=1), data=d, quiet=True)
    assert res.meta.training["split"]["method"].startswith("year")
    with pytest.raises(ModelError, match="split must be one of"):
        prepare_data(cube_path, sample_region.outlines, chip_size=32, split="area")
