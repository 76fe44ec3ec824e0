"""Clusters: every ``--scheduler`` form, local clusters' safety settings, GPU resources, and the
CLI's progress display through a real distributed scheduler.

The optional back-ends (dask-gateway, dask-cuda) are not installed in CI and there is no GPU:
their code paths are driven through small fakes that record how icemap calls them and hand back
a client on a real LocalCluster, so what is checked is icemap's side of the contract (options,
resources, who shuts what down). A real LocalCUDACluster test runs where a GPU and dask-cuda
are present.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import dask
import pytest

from icemap.cluster import (
    GPU_RESOURCE,
    SchedulerSpec,
    connect,
    cuda_device_count,
    gpu_worker_addresses,
    gpu_workers,
    local_cluster,
    local_cuda_cluster,
    parse_scheduler,
)
from icemap.errors import IcemapError

from .conftest import icemap_cli

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """A real cluster started the way the CLI starts one: ``connect("local?...")``.

    It starts after a plain ``LocalCluster`` would have run in this process: distributed's
    nannies leave ``MALLOC_TRIM_THRESHOLD_=65536`` in the parent's environment, which the
    torch-friendly check below must not see in icemap's workers.
    """
    mp = pytest.MonkeyPatch()
    mp.setenv("MALLOC_TRIM_THRESHOLD_", str(dask.config.get("distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_")))
    try:
        with connect("local?workers=2&threads=1") as c:
            assert "MALLOC_TRIM_THRESHOLD_" not in os.environ  # gone, so restarted workers do not get it
            yield c
    finally:
        mp.undo()


# -- parsing (no I/O) ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        (None, SchedulerSpec("threads")),
        ("threads", SchedulerSpec("threads")),
        ("local", SchedulerSpec("local")),
        ("local?workers=4&threads=2&dashboard=1", SchedulerSpec("local", options={"workers": "4", "threads": "2", "dashboard": "1"})),
        ("local-cuda?devices=0,1", SchedulerSpec("local-cuda", options={"devices": "0,1"})),
        ("auto", SchedulerSpec("auto")),
        ("tcp://10.0.0.5:8786", SchedulerSpec("address", address="tcp://10.0.0.5:8786")),
        ("tls://sched.example.org:8786", SchedulerSpec("address", address="tls://sched.example.org:8786")),
        ("icemap-scheduler:8786", SchedulerSpec("address", address="tcp://icemap-scheduler:8786")),
        ("gateway", SchedulerSpec("gateway")),
        ("gateway+https://hub.example.org/services/dask-gateway/?workers=8&worker_cores=2",
         SchedulerSpec("gateway", address="https://hub.example.org/services/dask-gateway",
                       options={"workers": "8", "worker_cores": "2"})),
        ("gateway://traefik-dask-gateway:80/icemap.4f2c",
         SchedulerSpec("gateway", cluster_name="icemap.4f2c", proxy_address="gateway://traefik-dask-gateway:80")),
    ],
)
def test_scheduler_forms(text: str | None, expected: SchedulerSpec) -> None:
    assert parse_scheduler(text) == expected


@pytest.mark.parametrize(
    "text, match",
    [
        ("http://127.0.0.1:8787/status", "dashboard"),
        ("ftp://example.org/x", "unsupported --scheduler"),
        ("gateway://traefik:80", "CLUSTER-NAME"),
        ("local?workerz=2", "unknown option"),
        ("local?devices=0", "unknown option"),
        ("tcp://", "no host"),
        ("tcp://h:8786?x=1", "no \\?options"),
        ("kubernetes", "unsupported --scheduler"),
    ],
)
def test_bad_scheduler_strings_are_refused_before_anything_starts(text: str, match: str) -> None:
    with pytest.raises(IcemapError, match=match):
        parse_scheduler(text)


def test_cli_bad_scheduler_is_one_line_error(small_region: Any, tmp_path: Path) -> None:
    res = icemap_cli("ingest", "--catalog", str(small_region.catalog), "--out", str(tmp_path / "c.zarr"),
                     "--quiet", "--scheduler", "http://127.0.0.1:8787")
    assert res.returncode == 1
    assert "dashboard" in res.stderr and "tcp://" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "c.zarr").exists()


def test_unreachable_scheduler_is_a_clear_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(IcemapError, match="cannot reach the Dask scheduler"), \
            connect(f"tcp://127.0.0.1:{port}", timeout="1s"):
        pass


# -- local clusters ------------------------------------------------------------------------------
def test_local_cluster_is_loopback_only_and_torch_friendly(client: Any) -> None:
    info = client.scheduler_info(n_workers=-1)
    assert info["address"].startswith("tcp://127.0.0.1:")
    assert len(info["workers"]) == 2 and all(a.startswith("tcp://127.0.0.1:") for a in info["workers"])
    # No bokeh dashboard, and the scheduler's HTTP endpoints listen on loopback only.
    hosts = client.run_on_scheduler(
        lambda dask_scheduler: sorted({s.getsockname()[0] for s in dask_scheduler.http_server._sockets.values()}))
    assert hosts == ["127.0.0.1"]
    # Worker processes run without MALLOC_TRIM_THRESHOLD_ (torch ~1.7x slower with it), but keep
    # distributed's other per-process settings.
    env = client.run(lambda: (os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS")))
    assert set(env.values()) == {(None, "1")}


@pytest.mark.parametrize("dashboard", ["0.0.0.0:8787", "10.1.2.3:8787"])
def test_dashboard_off_loopback_is_refused(dashboard: str) -> None:
    with pytest.raises(IcemapError, match="loopback"):
        local_cluster(n_workers=1, processes=False, dashboard=dashboard)
    with pytest.raises(IcemapError, match="loopback"):
        local_cluster(n_workers=1, processes=False, host="0.0.0.0")


@pytest.mark.filterwarnings("ignore:Couldn't detect a suitable IP address")  # in-process cluster, network guard
def test_dashboard_on_loopback_when_asked() -> None:
    from distributed import Client

    with local_cluster(n_workers=1, threads_per_worker=1, processes=False, dashboard=True) as cluster, Client(cluster):
        assert cluster.dashboard_link.startswith("http://127.0.0.1:")


# -- GPU resources -------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Couldn't detect a suitable IP address")
def test_gpu_workers_are_found_by_resource(client: Any) -> None:
    import dask
    import dask.array as da
    from distributed import Client

    assert gpu_workers(client) is False and gpu_worker_addresses(client) == []
    # A cluster whose workers advertise GPU=1, as LocalCUDACluster / `dask worker --resources GPU=1` do.
    with local_cluster(n_workers=1, threads_per_worker=1, processes=False, resources={GPU_RESOURCE: 1}) as cl, \
            Client(cl) as gpu_client:
        assert gpu_workers(gpu_client) is True
        assert gpu_worker_addresses() == list(gpu_client.scheduler_info()["workers"])  # default client
        with dask.annotate(resources={GPU_RESOURCE: 1}):
            x = da.ones((64, 64), chunks=32) + 1
        assert int(x.sum().compute()) == 2 * 64 * 64


def test_cuda_device_count_respects_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert cuda_device_count() == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert cuda_device_count() == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,3")
    assert cuda_device_count() == 2


def _fake_dask_cuda(calls: list[dict[str, Any]]) -> types.ModuleType:
    """A stand-in for dask_cuda: records LocalCUDACluster's arguments and the worker env config."""
    import dask
    from distributed.nanny import _get_env_variables

    mod = types.ModuleType("dask_cuda")

    def LocalCUDACluster(**kwargs: Any) -> Any:
        kwargs["_worker_env"] = _get_env_variables("distributed.nanny.pre-spawn-environ")
        calls.append(kwargs)
        kw = {k: v for k, v in kwargs.items() if k in ("threads_per_worker", "resources", "scheduler_kwargs")}
        from distributed import LocalCluster

        return LocalCluster(n_workers=1, processes=False, dashboard_address=None, **kw)

    mod.LocalCUDACluster = LocalCUDACluster  # type: ignore[attr-defined]
    assert dask  # imported for the config the fake reads
    return mod


def test_local_cuda_cluster_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setitem(sys.modules, "dask_cuda", _fake_dask_cuda(calls))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with connect("local-cuda") as c:
        assert gpu_workers(c) is True
    (kw,) = calls
    assert kw["resources"] == {GPU_RESOURCE: 1}
    assert kw["host"] == "127.0.0.1" and kw["dashboard_address"] is None
    assert kw["scheduler_kwargs"]["dashboard_address"].startswith("127.0.0.1:")
    assert kw["threads_per_worker"] == 1
    assert "MALLOC_TRIM_THRESHOLD_" not in kw["_worker_env"]
    # "auto" picks CUDA when a GPU is visible and dask_cuda importable.
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "dask_cuda" else None)
    with connect("auto") as c:
        assert gpu_workers(c)
    assert len(calls) == 2


def test_local_cuda_cluster_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # import fails like a missing package
    with pytest.raises(IcemapError, match="pip install dask-cuda"):
        local_cuda_cluster()
    monkeypatch.setitem(sys.modules, "dask_cuda", _fake_dask_cuda([]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    with pytest.raises(IcemapError, match="no CUDA GPU is visible"):
        local_cuda_cluster()


@pytest.mark.skipif(cuda_device_count() == 0, reason="no CUDA GPU on this machine")
def test_real_local_cuda_cluster() -> None:  # pragma: no cover - needs a GPU
    pytest.importorskip("dask_cuda")
    with connect("local-cuda") as c:
        assert len(gpu_worker_addresses(c)) == cuda_device_count()


# -- dask-gateway --------------------------------------------------------------------------------
class _FakeOptions(dict):  # type: ignore[type-arg]
    """dask_gateway.options.Options refuses unknown keys with KeyError/ValueError."""

    fields: ClassVar[dict[str, Any]] = {"worker_cores": 1, "worker_memory": 2.0, "gpu": False, "image": "x"}

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self.fields:
            raise KeyError(key)
        super().__setitem__(key, value)


def _fake_dask_gateway(events: list[tuple[str, Any]], scheduler_address: str) -> types.ModuleType:
    mod = types.ModuleType("dask_gateway")

    class FakeCluster:
        def __init__(self, name: str) -> None:
            self.name = name

        def scale(self, n: int) -> None:
            events.append(("scale", n))

        def adapt(self, minimum: int, maximum: int) -> None:
            events.append(("adapt", (minimum, maximum)))

        def get_client(self, set_as_default: bool = True) -> Any:
            from distributed import Client

            events.append(("get_client", set_as_default))
            return Client(scheduler_address, set_as_default=set_as_default)

        def shutdown(self) -> None:
            events.append(("shutdown", self.name))

        def close(self) -> None:
            events.append(("close", self.name))

    class Gateway:
        def __init__(self, address: str | None = None, proxy_address: str | None = None) -> None:
            if address is None and proxy_address is None and not os.environ.get("DASK_GATEWAY__ADDRESS"):
                raise ValueError("No dask-gateway address provided or found in configuration")
            events.append(("gateway", (address, proxy_address)))

        def cluster_options(self) -> _FakeOptions:
            return _FakeOptions()

        def new_cluster(self, options: Any, shutdown_on_close: bool = True) -> FakeCluster:
            events.append(("new_cluster", dict(options)))
            return FakeCluster("new")

        def connect(self, name: str, shutdown_on_close: bool = False) -> FakeCluster:
            events.append(("connect", (name, shutdown_on_close)))
            return FakeCluster(name)

        def close(self) -> None:
            events.append(("gateway_close", None))

    mod.Gateway = Gateway  # type: ignore[attr-defined]
    return mod


def test_gateway_new_cluster_is_configured_and_shut_down(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, Any]] = []
    monkeypatch.setitem(sys.modules, "dask_gateway", _fake_dask_gateway(events, client.scheduler.address))
    with connect("gateway+https://hub.example.org/services/dask-gateway?workers=3&worker_cores=2&gpu=true") as c:
        assert c.submit(sum, [1, 2]).result() == 3  # a working client on the "gateway" cluster
    kinds = [e[0] for e in events]
    assert events[0] == ("gateway", ("https://hub.example.org/services/dask-gateway", None))
    assert ("new_cluster", {"worker_cores": 2, "gpu": True}) in events
    assert ("scale", 3) in events and ("shutdown", "new") in events and kinds[-1] == "gateway_close"

    events.clear()
    with connect("gateway+http://gw.internal:8000?adapt=1:20"):
        pass
    assert ("adapt", (1, 20)) in events

    events.clear()
    with pytest.raises(IcemapError, match="cluster option bogus"), connect("gateway+https://gw.example.org?bogus=1"):
        pass


def test_gateway_named_cluster_is_attached_not_stopped(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, Any]] = []
    monkeypatch.setitem(sys.modules, "dask_gateway", _fake_dask_gateway(events, client.scheduler.address))
    with connect("gateway://traefik-dask-gateway:80/icemap.4f2c"):
        pass
    assert events[0] == ("gateway", (None, "gateway://traefik-dask-gateway:80"))
    assert ("connect", ("icemap.4f2c", False)) in events
    assert ("close", "icemap.4f2c") in events and not any(e[0] == "shutdown" for e in events)


def test_gateway_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DASK_GATEWAY__ADDRESS", raising=False)
    monkeypatch.setitem(sys.modules, "dask_gateway", None)
    with pytest.raises(IcemapError, match="pip install dask-gateway"), connect("gateway"):
        pass
    monkeypatch.setitem(sys.modules, "dask_gateway", _fake_dask_gateway([], "tcp://127.0.0.1:1"))
    with pytest.raises(IcemapError, match="DASK_GATEWAY__ADDRESS"), connect("gateway"):
        pass


# -- the CLI on a cluster started elsewhere --------------------------------------------------------
def test_cli_progress_through_a_running_scheduler(client: Any, small_region: Any, tmp_path: Path) -> None:
    """``--scheduler tcp://...``: the work runs on that cluster and progress shows per time step."""

    def transitions(dask_scheduler: Any) -> int:
        return int(dask_scheduler.transition_counter)

    before = client.run_on_scheduler(transitions)
    out = tmp_path / "c.zarr"
    res = icemap_cli("ingest", "--catalog", str(small_region.catalog), "--out", str(out), "--chunksize", "64",
                     "--scheduler", client.scheduler.address, env={"COLUMNS": "120"})
    assert res.returncode == 0, res.stderr
    # The rich bar, fed once per time step, ends at 3/3 with the last step's label.
    assert "ingest" in res.stderr and "3/3" in res.stderr
    assert small_region.datetimes[-1][:10] in res.stderr
    assert "wrote 3 time step(s)" in res.stderr
    # The tasks really ran on this cluster, not on a threaded scheduler in the CLI process.
    assert client.run_on_scheduler(transitions) - before > 100

    # `icemap map` through a cluster, with a worker killed half-way: tests/test_faults.py.
