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
import sys
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

from .conftest import StacServer
from .faultproxy import SAS_BASE_ENV, SAS_LOG_ENV, SAS_TOKEN_ENV, FaultProxy, SignedFileServer, sas_signer

REPO = Path(__file__).resolve().parents[1]
SECRET = "S3CR3T-sig-7f3a9c"
PUBLIC = "https://landsat.blob.example.invalid/c2l2"


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "icemap.cli", *args], check=False, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


def _store_metadata(path: Path) -> str:
    """Every attribute and metadata document of a store, as one text."""
    group = zarr.open_group(str(path), mode="r")
    parts = [json.dumps(dict(group.attrs), default=str)]
    parts += [json.dumps(dict(arr.attrs), default=str) for _, arr in group.arrays()]
    parts += [p.read_text(errors="replace") for p in path.rglob("*") if p.name in ("zarr.json", ".zattrs", ".zarray", ".zgroup")]
    return "\n".join(parts)


@pytest.fixture(scope="module")
def blob_items(sample_region: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """The sample COGs in one 'container' folder, and items pointing at their public URLs."""
    folder = tmp_path_factory.mktemp("blobs")
    items = search(sample_region.catalog).item_dicts()
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
            res = _cli("ingest", "--catalog", str(items_file), "--out", str(out), "--chunksize", "64",
                       "--signer", "tests.faultproxy:sas_signer", "--scheduler", cluster_client.scheduler.address,
                       env={**env, "DASK_LOGGING__DISTRIBUTED": "debug"})
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


def test_api_key_header_is_sent_but_never_stored(stac_api: StacServer, sample_region: Any, tmp_path: Path) -> None:
    key = "KEY-0123456789abcdef"
    with FaultProxy(stac_api.url, ["ok"], max_seconds=120) as proxy:
        s = search(proxy.url, collections="landsat-c2-l2", bbox=sample_region.bbox, datetime="2020-01-01/..",
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
def items(sample_region: Any) -> list[dict[str, Any]]:
    return search(sample_region.catalog).item_dicts()


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


def test_cli_refuses_bad_out_and_catalog_scheme(sample_region: Any, tmp_path: Path) -> None:
    precious = tmp_path / "my-data"
    precious.mkdir()
    (precious / "keep.txt").write_text("keep")
    res = _cli("ingest", "--catalog", str(sample_region.catalog), "--out", str(precious), "--quiet")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "not a Zarr store" in res.stderr and (precious / "keep.txt").exists()

    res = _cli("search", "--catalog", "ftp://landsat.example.org/stac")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "unsupported URL scheme" in res.stderr


@pytest.mark.parametrize("catalog", ["ftp://example.org/stac", "s3://bucket/catalog.json", "gopher://x/1"])
def test_unsupported_catalog_schemes(catalog: str) -> None:
    with pytest.raises(SearchError, match="unsupported URL scheme"):
        search(catalog)


def test_file_url_catalog_is_a_local_path(sample_region: Any) -> None:
    assert search(Path(sample_region.catalog).as_uri()).item_dicts() == search(sample_region.catalog).item_dicts()


def test_scheduler_strings_are_validated() -> None:
    from icemap.cluster import parse_scheduler

    for bad in ("http://10.0.0.1:8787/status", "file:///tmp/scheduler.json", "javascript:alert(1)"):
        with pytest.raises(IcemapError):
            parse_scheduler(bad)
