"""Security basics: secrets stay out of graphs, logs and stores; checkpoints are never unpickled;
paths and URLs are checked before anything is written.

The signed-URL test is end to end and real: COGs are served over HTTP by a server that only
answers URLs carrying ``?sig=TOKEN`` (as an Azure SAS or S3 presigned URL), the items carry
the public, unsigned hrefs, and the CLI ingests them on a distributed cluster with a signer
whose token lives in the workers' environment. The token must then appear nowhere but in the
HTTP requests themselves.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

import icemap
from icemap.errors import IcemapError, LoadError, ModelError, SearchError, StoreError
from icemap.load import load  # the function; `icemap.load` may be the submodule, by import order
from icemap.stac import search

from .conftest import StacServer, icemap_cli, run_icemap
from .faultproxy import SAS_BASE_ENV, SAS_LOG_ENV, SAS_TOKEN_ENV, FaultProxy, SignedFileServer, sas_signer

REPO = Path(__file__).resolve().parents[1]
SECRET = "S3CR3T-sig-7f3a9c"
PUBLIC = "https://landsat.blob.example.invalid/c2l2"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # cwd=REPO: `tests.faultproxy` (the signers) is importable there, as for a user's own module.
    return icemap_cli(*args, env=env, cwd=REPO)


def _store_metadata(path: Path) -> str:
    """Every attribute and metadata document of a store, as one text."""
    group = zarr.open_group(str(path), mode="r")
    parts = [json.dumps(dict(group.attrs), default=str)]
    parts += [json.dumps(dict(arr.attrs), default=str) for _, arr in group.arrays()]
    parts += [p.read_text(errors="replace") for p in path.rglob("*") if p.name in ("zarr.json", ".zattrs", ".zarray", ".zgroup")]
    return "\n".join(parts)


@pytest.fixture(scope="module")
def blob_items(small_region: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """The sample COGs in one 'container' folder, and items pointing at their public URLs."""
    folder = tmp_path_factory.mktemp("blobs")
    items = search(small_region.catalog).item_dicts()
    for it in items:
        for asset in it["assets"].values():
            src = Path(asset["href"])
            if src.suffix.upper() == ".TIF":
                shutil.copy(src, folder / src.name)
                asset["href"] = f"{PUBLIC}/{src.name}"
    return folder, items


@pytest.fixture(scope="module")
def cluster_client() -> Iterator[Any]:
    from distributed import Client

    from icemap.cluster import local_cluster

    with local_cluster(n_workers=2, threads_per_worker=1, processes=True) as cluster, \
            Client(cluster, set_as_default=False) as client:
        yield client


def _set_env(env: dict[str, str]) -> None:
    os.environ.update(env)


def _unset_env(keys: list[str]) -> None:
    for k in keys:
        os.environ.pop(k, None)


# -- secrets ---------------------------------------------------------------------------------------
@pytest.mark.cluster
@pytest.mark.process
def test_signed_urls_stay_out_of_graphs_logs_and_stores(blob_items: tuple[Path, list[dict[str, Any]]],
                                                         cluster_client: Any, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import cloudpickle

    folder, items = blob_items
    with SignedFileServer(folder, SECRET) as server:
        sign_log = tmp_path / "signed-by.log"
        env = {SAS_BASE_ENV: server.url, SAS_TOKEN_ENV: SECRET, SAS_LOG_ENV: str(sign_log)}
        for k, v in env.items():
            monkeypatch.setenv(k, v)

        # 1. The graph holds the public hrefs and a reference to the signer, never a signed URL.
        ds = load(items, signer=sas_signer, chunksize=64)
        graph = cloudpickle.dumps(dict(ds["reflectance"].data.__dask_graph__()))
        assert SECRET.encode() not in graph and server.url.encode() not in graph
        assert PUBLIC.encode() in graph and b"sas_signer" in graph

        # 2. A whole CLI ingest on a cluster whose workers hold the token (as pods would, from a
        #    secret), with distributed logging at DEBUG on the client side.
        cluster_client.run(_set_env, env)
        try:
            items_file = tmp_path / "items.ndjson"
            items_file.write_text("".join(json.dumps(it) + "\n" for it in items))
            out = tmp_path / "cube.zarr"
            # A real process: dask reads DASK_LOGGING__DISTRIBUTED at import, and its log handlers
            # write to the process's stderr.
            res = run_icemap("ingest", "--catalog", str(items_file), "--out", str(out), "--chunksize", "64",
                             "--signer", "tests.faultproxy:sas_signer", "--scheduler", cluster_client.scheduler.address,
                             env={**os.environ, **env, "DASK_LOGGING__DISTRIBUTED": "debug"}, cwd=REPO)
            worker_pids = set(cluster_client.run(os.getpid).values())
            worker_logs = json.dumps(cluster_client.get_worker_logs(), default=str)
            scheduler_logs = json.dumps(cluster_client.get_scheduler_logs(), default=str)
        finally:
            cluster_client.run(_unset_env, list(env))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "wrote 3 time step(s)" in res.stderr
    for where, text in (("CLI stdout", res.stdout), ("CLI stderr", res.stderr), ("worker logs", worker_logs),
                        ("scheduler logs", scheduler_logs), ("store metadata", _store_metadata(out))):
        assert SECRET not in text, f"the token leaked into the {where}"
        assert "sig=" not in text, f"a signed URL leaked into the {where}"
    # Signing really happened, on the workers, when they opened files; every read was signed.
    signers = {int(line.split()[0]) for line in sign_log.read_text().splitlines()}
    assert signers and signers <= worker_pids
    assert server.requests and server.refused == 0
    assert all(f"sig={SECRET}" in r for r in server.requests)
    cube = icemap.open_cube(out)
    assert all(np.isfinite(cube["reflectance"].isel(time=t).values).any() for t in range(cube.sizes["time"]))


def test_refused_signature_error_names_the_asset_not_the_token(blob_items: tuple[Path, list[dict[str, Any]]],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    folder, items = blob_items
    with SignedFileServer(folder, SECRET) as server:
        monkeypatch.setenv(SAS_BASE_ENV, server.url)
        monkeypatch.setenv(SAS_TOKEN_ENV, "EXPIRED-token-0x5eed")  # the server answers 403
        ds = load(items[-1:], bands=["green"], signer=sas_signer)
        with pytest.raises(LoadError) as err:
            ds["reflectance"].compute()
    message = str(err.value)
    assert "EXPIRED-token" not in message and "sig=" not in message
    assert f"{PUBLIC}/{items[-1]['id']}_" in message  # names the asset, by its public URL
    assert server.refused >= 1


def test_api_key_header_is_sent_but_never_stored(stac_api: StacServer, small_region: Any, tmp_path: Path) -> None:
    key = "KEY-0123456789abcdef"
    with FaultProxy(stac_api.url, ["ok"], max_seconds=120) as proxy:
        s = search(proxy.url, collections="landsat-c2-l2", bbox=small_region.bbox, datetime="2020-01-01/..",
                   headers={"X-API-Key": key})
        assert key not in repr(s) and key not in json.dumps(s.parameters())
        icemap.ingest(s, tmp_path / "c.zarr", chunksize=64)
    assert proxy.count() > 0 and all(r.headers.get("X-API-Key") == key for r in proxy.records)
    assert key not in _store_metadata(tmp_path / "c.zarr")


# -- checkpoints are data, not code ------------------------------------------------------------------
class _Payload:
    """What an attacker would ship: unpickling it writes a file (it could as well run a shell)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.target, "code ran while loading a checkpoint"))


@pytest.mark.parametrize("container", ["pickle", "torch.save"])
def test_pickle_disguised_as_safetensors_is_refused_unexecuted(container: str, tmp_path: Path) -> None:
    import torch
    from icemap.model.checkpoint import METADATA, WEIGHTS, CheckpointMeta, load_checkpoint, save_checkpoint, sha256_of
    from icemap.model.inputs import Normalisation
    from icemap.model.unet import UNet, UNetConfig

    folder = save_checkpoint(UNet(UNetConfig(in_channels=2, depth=2, base=4)),
                             CheckpointMeta(architecture={}, channels=["green", "swir16"], bands=["green", "swir16"],
                                            normalisation=Normalisation([0, 0], [1, 1]).to_dict()),
                             tmp_path / "model")
    pwned = tmp_path / "pwned"
    weights = folder / WEIGHTS
    if container == "pickle":
        weights.write_bytes(pickle.dumps(_Payload(pwned)))
    else:
        torch.save({"state_dict": _Payload(pwned)}, weights)
    # The attacker also fixes the checksum, so only the file format stands in the way.
    meta = json.loads((folder / METADATA).read_text())
    meta["weights_sha256"] = sha256_of(weights)
    (folder / METADATA).write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="not a valid safetensors file"):
        load_checkpoint(folder)
    assert not pwned.exists()


# -- paths and URLs ----------------------------------------------------------------------------------
@pytest.fixture()
def items(small_region: Any) -> list[dict[str, Any]]:
    return search(small_region.catalog).item_dicts()


def test_out_on_a_folder_of_other_files_is_refused(items: list[dict[str, Any]], tmp_path: Path) -> None:
    precious = tmp_path / "my-data"
    (precious / "sub").mkdir(parents=True)
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(StoreError, match="not a Zarr store"):
        icemap.ingest(items, precious, chunksize=64)
    assert (precious / "thesis.tex").read_text() == "years of work" and (precious / "sub").is_dir()
    # An empty folder is fine (people create the target first).
    (tmp_path / "empty").mkdir()
    icemap.ingest(items[-1:], tmp_path / "empty", chunksize=64)


@pytest.mark.parametrize("where", ["file", "inside-file"])
def test_out_on_or_inside_a_file_is_refused(where: str, items: list[dict[str, Any]], tmp_path: Path) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    target = a_file if where == "file" else a_file / "cube.zarr"
    with pytest.raises(StoreError, match="is a file"):
        icemap.ingest(items, target, chunksize=64)
    assert a_file.read_text() == "keep me"


def test_cli_refuses_bad_out_and_catalog_scheme(small_region: Any, tmp_path: Path) -> None:
    precious = tmp_path / "my-data"
    precious.mkdir()
    (precious / "keep.txt").write_text("keep")
    res = _cli("ingest", "--catalog", str(small_region.catalog), "--out", str(precious), "--quiet")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "not a Zarr store" in res.stderr and (precious / "keep.txt").exists()

    res = _cli("search", "--catalog", "ftp://landsat.example.org/stac")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "unsupported URL scheme" in res.stderr


@pytest.mark.parametrize("catalog", ["ftp://example.org/stac", "s3://bucket/catalog.json", "gopher://x/1"])
def test_unsupported_catalog_schemes(catalog: str) -> None:
    with pytest.raises(SearchError, match="unsupported URL scheme"):
        search(catalog)


def test_file_url_catalog_is_a_local_path(small_region: Any) -> None:
    assert search(Path(small_region.catalog).as_uri()).item_dicts() == search(small_region.catalog).item_dicts()


def test_scheduler_strings_are_validated() -> None:
    from icemap.cluster import parse_scheduler

    for bad in ("http://10.0.0.1:8787/status", "file:///tmp/scheduler.json", "javascript:alert(1)"):
        with pytest.raises(IcemapError):
            parse_scheduler(bad)


# -- no secret leaves the process; data never read as markup -----------------------------------------
PASSWORD = "PASSW0RD-userinfo-4e1"
QUERY_TOKEN = "QUERY-token-2b7d"


def test_secrets_planted_in_every_command_never_come_out(stac_api: StacServer, small_region: Any,
                                                         tmp_path: Path) -> None:
    """Keys in the catalog URL, signer output and signer errors: grep stdout, stderr, stores, report, COGs."""
    import rasterio

    from .faultproxy import LEAKY_TOKEN

    secrets = (PASSWORD, QUERY_TOKEN, LEAKY_TOKEN)
    keyed = stac_api.url.replace("http://", f"http://alice:{PASSWORD}@") + f"/?token={QUERY_TOKEN}"
    dead = f"http://alice:{PASSWORD}@127.0.0.1:9/stac?token={QUERY_TOKEN}&api_key={QUERY_TOKEN}"
    file_items = tmp_path / "items.ndjson"
    with open(file_items, "w") as f:
        for it in search(small_region.catalog).item_dicts():
            for asset in it["assets"].values():
                asset["href"] = Path(asset["href"]).resolve().as_uri()  # file:// links
            f.write(json.dumps(it) + "\n")
    cube, prod = tmp_path / "cube.zarr", tmp_path / "ice.zarr"
    runs = [
        _cli("search", "-c", keyed, "--bbox", *map(str, small_region.bbox), "--collection", "landsat-c2-l2"),
        _cli("search", "-c", dead, "--retries", "0"),
        _cli("ingest", "-c", keyed, "--bbox", *map(str, small_region.bbox), "--collection", "landsat-c2-l2",
             "--datetime", "2020-01-01/..", "-o", str(cube), "--chunksize", "64", "--quiet"),
        _cli("ingest", "-c", str(file_items), "-o", str(tmp_path / "s1.zarr"), "--signer",
             "tests.faultproxy:leaky_signer", "--quiet"),
        _cli("ingest", "-c", str(file_items), "-o", str(tmp_path / "s2.zarr"), "--signer",
             "tests.faultproxy:appending_signer", "--quiet"),
        _cli("map", "--cube", str(cube), "-o", str(prod), "--geotiff", str(tmp_path / "tif"), "--quiet"),
        _cli("report", "--cube", str(cube), "--pred", str(prod), "--reference", str(small_region.outlines),
             "-o", str(tmp_path / "report.html")),
        _cli("status", str(cube)),
    ]
    assert runs[2].returncode == 0 and runs[5].returncode == 0, (runs[2].stderr, runs[5].stderr)
    for res in runs[1], runs[3], runs[4]:  # the failures: one line each, no traceback
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    outputs = [r.stdout + r.stderr for r in runs]
    outputs += [_store_metadata(cube), _store_metadata(prod)]
    report = tmp_path / "report.html"
    if report.exists():  # the report extra may be missing; the other outputs are checked regardless
        outputs.append(report.read_text())
    for tif in (tmp_path / "tif").rglob("*.tif"):
        with rasterio.open(tif) as src:
            outputs.append(json.dumps([src.tags(), *(src.tags(i) for i in range(1, src.count + 1))]))
    text = "\n".join(outputs)
    for secret in secrets:
        assert secret not in text
    assert "127.0.0.1" in text and "<redacted>" in text  # the URLs are still named, without their keys


def test_redact_removes_every_kind_of_secret() -> None:
    from icemap.redact import redact

    cases = {
        "https://user:pa55@host/stac?token=T0K&x=1": ["pa55", "T0K"],
        "/vsicurl/https://acct.blob.core.windows.net/c/B3.TIF?sv=1&se=2&sig=AbC%2Bd": ["AbC"],
        "403 for /data/x.tif?sig=SIGG token=TOKK key=KEYY api_key: APIK": ["SIGG", "TOKK", "KEYY", "APIK"],
        "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.x": ["eyJhbGci"],
        "gateway+https://u:gwpass@gw.example.org": ["gwpass"],
    }
    for text, secrets in cases.items():
        out = redact(text)
        assert not any(s in out for s in secrets), out
        assert redact(out) == out  # idempotent
    assert redact("s3://bucket/cube.zarr") == "s3://bucket/cube.zarr"  # nothing secret, nothing changed


@pytest.fixture(scope="module")
def crafted_catalog(tmp_path_factory: pytest.TempPathFactory, small_region: Any) -> Path:
    """Items whose ids and properties carry rich markup and terminal escapes (OSC 8 hyperlinks)."""
    folder = tmp_path_factory.mktemp("crafted")
    items = search(small_region.catalog).item_dicts()
    items[0]["id"] = "[link=https://evil.example]click[/link]\x1b]8;;https://evil.example\x1b\\x\x1b]8;;\x1b\\"
    items[0]["properties"]["platform"] = "[bold red]landsat-8[/] [/unbalanced]"
    items[1]["properties"]["eo:cloud_cover"] = "[red]"
    items[-1]["id"] = "\x1b[2J\x1b[31mwiped\x07\r"
    path = folder / "items.ndjson"
    path.write_text("\n".join(json.dumps(it) for it in items) + "\n")
    return path


def test_crafted_catalog_is_printed_not_interpreted(crafted_catalog: Path) -> None:
    res = _cli("search", "-c", str(crafted_catalog), env={"COLUMNS": "400"})  # no cell wraps
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "\x1b" not in res.stdout and "\x07" not in res.stdout and "\r" not in res.stdout
    assert "[link=https://evil.example]click[/link]" in res.stdout.replace("\n", "")
    assert "[bold red]landsat-8[/]" in res.stdout


def test_crafted_model_json_is_printed_not_interpreted(tmp_path: Path) -> None:
    src = REPO / "src" / "icemap" / "models" / "default"
    folder = tmp_path / "m"
    shutil.copytree(src, folder)
    meta = json.loads((folder / "model.json").read_text())
    meta["training"] = {"cube": "[link=https://evil.example]x[/link]\x1b]8;;https://evil.example\x1b\\"}
    meta["channels"] = ["[bold]" + meta["channels"][0]] + meta["channels"][1:]
    (folder / "model.json").write_text(json.dumps(meta))
    res = _cli("model", "info", str(folder), env={"COLUMNS": "400"})
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "\x1b" not in res.stdout and "[bold]" + meta["channels"][0][6:] in res.stdout


@pytest.mark.parametrize("field,value", [("architecture", "x"), ("threshold", "high"), ("channels", 5),
                                         ("architecture", {"in_channels": 8, "bogus": 1}), ("normalisation", [1])])
def test_tampered_model_json_is_one_line(field: str, value: Any, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(REPO / "src" / "icemap" / "models" / "default", folder)
    meta = json.loads((folder / "model.json").read_text())
    meta[field] = value
    (folder / "model.json").write_text(json.dumps(meta))
    res = _cli("model", "info", str(folder))
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("icemap: error:") == 1 and "model.json" in res.stderr


def test_onnx_naming_external_data_is_refused_even_beside_the_working_directory(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime resolves external data against the cwd: a model folder must never make it read there."""
    from .conftest import require_module

    onnx = require_module("onnx", "onnx")
    from onnx import TensorProto, helper, numpy_helper

    from icemap.model.onnx_runner import OnnxRunner

    w = numpy_helper.from_array(np.full((1, 1, 1, 1), 2.0, np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, None, None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1, None, None])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, tmp_path / "net.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    monkeypatch.chdir(tmp_path)  # weights.bin is right there for onnxruntime to pick up
    arch = {"input": "x", "output": "y", "output_kind": "logit"}
    with pytest.raises(ModelError, match="weights.bin"):
        OnnxRunner((tmp_path / "net.onnx").read_bytes(), arch)
    inline = onnx.load_model(tmp_path / "net.onnx")  # external data loaded back in: runs
    out = OnnxRunner(inline.SerializeToString(), arch).run(np.ones((1, 1, 4, 4), np.float32))
    np.testing.assert_allclose(out, 2.0)
