"""Getting a Dask cluster: connect to one, or start a well-configured local one.

Every CLI command that computes takes ``--scheduler``; the Python API simply uses whatever dask
scheduler is active (a ``distributed.Client`` made default, or the threaded scheduler).
:func:`connect` turns one string into a running client, so the same job runs on a laptop, a
GPU workstation, Kubernetes, a dask-gateway or an HPC allocation without code changes:

=====================================  ===========================================================
``--scheduler``                        what happens
=====================================  ===========================================================
*(not given)* or ``threads``           dask's threaded scheduler in this process
``local``                              start a :func:`local_cluster` (processes, loopback only)
``local?workers=4&threads=2``          the same with explicit sizes (also ``memory=8GiB``,
                                       ``dashboard=1`` for a loopback dashboard)
``local-cuda``                         start a :func:`local_cuda_cluster`: one worker per GPU,
                                       each advertising the Dask resource ``GPU=1``
``auto``                               ``local-cuda`` when GPUs and dask-cuda are present,
                                       else ``local``
``tcp://host:8786`` (``tls://``,       connect to a running scheduler (Kubernetes operator,
``ucx://``, ``ws(s)://``, host:port)   dask-jobqueue, ``dask scheduler``)
``gateway``                            new cluster on the dask-gateway named by the dask config
                                       (``gateway.address``, env ``DASK_GATEWAY__ADDRESS``)
``gateway+https://host/prefix``        new cluster on the dask-gateway at that URL
                                       (``?workers=N`` or ``?adapt=MIN:MAX``; any other query
                                       key is a cluster option, e.g. ``worker_cores=2``)
``gateway://proxy:port/NAME``          the running gateway cluster ``NAME`` (the address its
                                       ``cluster.scheduler_address`` shows); left running
=====================================  ===========================================================

Why here and not in each command: cluster set-up carries the few settings that decide whether
a job is fast and safe on a shared machine (dashboard bound to loopback or off, workers
started without ``MALLOC_TRIM_THRESHOLD_`` so torch keeps its speed, GPU workers advertising
the ``GPU`` resource that inference annotates its tasks with), and those must not depend on
which command started the cluster.

The optional back-ends (``dask_gateway``, ``dask_cuda``) are imported only when asked for, with
an error telling what to install when they are missing.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import ipaddress
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

import dask
import dask.config
from dask.utils import parse_bytes
from distributed import Client, LocalCluster

from icemap.errors import IcemapError

__all__ = [
    "GPU_RESOURCE",
    "SchedulerSpec",
    "connect",
    "cuda_device_count",
    "gpu_worker_addresses",
    "gpu_workers",
    "local_cluster",
    "local_cuda_cluster",
    "parse_scheduler",
]

#: The Dask resource name GPU workers advertise and GPU tasks request (``resources={"GPU": 1}``).
GPU_RESOURCE = "GPU"

# distributed's comm back-ends a plain address may use.
_COMM_SCHEMES = ("tcp", "tls", "ucx", "inproc", "ws", "wss")

_USAGE = (
    "use 'local', 'local-cuda', 'auto', a scheduler address (tcp://host:8786, tls://..., "
    "host:port), 'gateway', 'gateway+https://GATEWAY-URL' or 'gateway://PROXY:PORT/CLUSTER-NAME'"
)

# The nanny sets these in worker processes before they start. MALLOC_TRIM_THRESHOLD_ is
# removed: distributed's default (65536) makes glibc return memory eagerly, which costs
# torch's CPU allocator about 1.7x in speed on this project's U-Net (measured).
_MALLOC_TRIM = "MALLOC_TRIM_THRESHOLD_"
_MALLOC_TRIM_KEY = f"distributed.nanny.pre-spawn-environ.{_MALLOC_TRIM}"


@contextlib.contextmanager
def _torch_friendly_spawn() -> Iterator[None]:
    """Start worker processes without distributed's ``MALLOC_TRIM_THRESHOLD_``.

    It reaches a worker two ways, and both are closed here: the nanny's pre-spawn settings (set
    to None, which distributed reads as "do not set"), and this process's own environment. A
    nanny writes its pre-spawn settings into ``os.environ`` of the process that starts it before
    it spawns, so a plain ``LocalCluster`` started earlier in a notebook or a test session
    leaves ``MALLOC_TRIM_THRESHOLD_=65536`` behind, and every later child would inherit it,
    including a worker that one of icemap's nannies restarts later. That leaked value is removed
    from this process for good (a plain cluster sets it again before each of its own spawns); a
    value that is not distributed's, one a user exported on purpose, is left alone.
    """
    if os.environ.get(_MALLOC_TRIM) == str(dask.config.get(_MALLOC_TRIM_KEY, None)):
        del os.environ[_MALLOC_TRIM]
    with dask.config.set({_MALLOC_TRIM_KEY: None}):
        yield


Kind = Literal["threads", "local", "local-cuda", "auto", "address", "gateway"]


@dataclass(frozen=True)
class SchedulerSpec:
    """What a ``--scheduler`` string asks for, parsed and validated (no I/O).

    Attributes
    ----------
    kind
        ``threads``, ``local``, ``local-cuda``, ``auto``, ``address`` or ``gateway``.
    address
        The scheduler address (``address``), the gateway API URL (``gateway``, None for the
        dask-config default) or None.
    cluster_name
        For ``gateway``: the running cluster to attach to (None starts a new one).
    proxy_address
        For ``gateway`` with a cluster name: the gateway's scheduler proxy (``gateway://...``).
    options
        Query parameters (``workers``, ``threads``, ``memory``, ``dashboard``, ``adapt``, or
        gateway cluster options), as strings.
    """

    kind: Kind
    address: str | None = None
    cluster_name: str | None = None
    proxy_address: str | None = None
    options: Mapping[str, str] = field(default_factory=dict)


def _split_query(text: str) -> tuple[str, dict[str, str]]:
    base, _, query = text.partition("?")
    try:
        opts = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError:
        raise IcemapError(f"cannot parse the options in --scheduler {text!r}; write them as ?key=value&key=value") from None
    return base, opts


def parse_scheduler(scheduler: str | None) -> SchedulerSpec:
    """Parse and validate a ``--scheduler`` string without connecting to anything.

    Validation happens here, before any process starts, so a typo (or a dashboard URL pasted
    where the scheduler address belongs) gives a one-line error instead of a stack trace from
    deep inside distributed.

    Raises
    ------
    IcemapError
        For an unknown form or unsupported URL scheme.
    """
    if scheduler is None:
        return SchedulerSpec("threads")
    text = str(scheduler).strip()
    if text in ("", "threads"):
        return SchedulerSpec("threads")
    base, opts = _split_query(text)
    if base in ("local", "local-cuda", "auto"):
        known = {"workers", "threads", "memory", "dashboard"} | ({"devices"} if base == "local-cuda" else set())
        unknown = sorted(set(opts) - known)
        if unknown:
            raise IcemapError(f"--scheduler {base}: unknown option(s) {unknown}; known: {sorted(known)}")
        if "memory" in opts:
            _check_memory(base, opts["memory"])
        return SchedulerSpec(base, options=opts)  # type: ignore[arg-type]
    if base == "gateway":
        return SchedulerSpec("gateway", options=opts)
    if "://" not in base and _looks_like_host_port(base):
        if opts:
            raise IcemapError(f"--scheduler {text!r}: a scheduler address takes no ?options")
        return SchedulerSpec("address", address=f"tcp://{base}")
    parts = urlsplit(base)
    scheme = parts.scheme.lower()
    if scheme in ("gateway+http", "gateway+https"):
        if not parts.netloc:
            raise IcemapError(f"--scheduler {text!r} names no gateway host; e.g. gateway+https://gateway.example.org")
        url = base.split("+", 1)[1].rstrip("/")
        return SchedulerSpec("gateway", address=url, options=opts)
    if scheme == "gateway":
        name = parts.path.strip("/")
        if not parts.netloc or not name:
            raise IcemapError(
                f"--scheduler {text!r}: a gateway:// address names a running cluster as "
                "gateway://PROXY-HOST:PORT/CLUSTER-NAME (what cluster.scheduler_address shows); "
                "to start a new cluster use 'gateway' or 'gateway+https://GATEWAY-URL'"
            )
        return SchedulerSpec("gateway", cluster_name=name, proxy_address=f"gateway://{parts.netloc}", options=opts)
    if scheme in ("http", "https"):
        raise IcemapError(
            f"--scheduler {text!r} is a web address; that is probably the dashboard. The scheduler "
            "listens on tcp://HOST:8786 (see the 'Scheduler at' line of `dask scheduler`), or "
            "use gateway+https://... for a dask-gateway"
        )
    if scheme in _COMM_SCHEMES:
        if opts:
            raise IcemapError(f"--scheduler {text!r}: a scheduler address takes no ?options")
        if scheme != "inproc" and not parts.hostname:
            raise IcemapError(f"--scheduler {text!r} names no host; e.g. tcp://scheduler:8786")
        return SchedulerSpec("address", address=base)
    raise IcemapError(f"unsupported --scheduler {text!r}; {_USAGE}")


def _check_memory(base: str, value: str) -> None:
    """A worker memory limit dask understands ('4GiB', '2e9', 'auto'), checked before any worker starts."""
    if str(value).strip().lower() == "auto":
        return
    try:
        ok = parse_bytes(value) > 0
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise IcemapError(f"--scheduler {base}?memory={value}: not an amount of memory; write e.g. memory=4GiB, "
                          "memory=2e9 or memory=auto")


def _looks_like_host_port(text: str) -> bool:
    """``host:8786`` or ``[::1]:8786`` (dask accepts these as tcp addresses)."""
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and "/" not in text)


# -- local clusters ------------------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _dashboard_address(dashboard: bool | int | str | None) -> str | None:
    """Normalise a dashboard setting to a loopback address, or None (no bokeh dashboard).

    The dashboard shows task names, worker logs and tracebacks and lets anyone on the network
    run profiling: on a shared machine it must not listen on every interface. Reach a loopback
    dashboard through an SSH tunnel (``ssh -L 8787:127.0.0.1:8787 host``).
    """
    if dashboard is None or dashboard is False:
        return None
    if dashboard is True:
        return "127.0.0.1:0"
    if isinstance(dashboard, int):
        return f"127.0.0.1:{dashboard}"
    text = str(dashboard).strip()
    if text.isdigit():
        return f"127.0.0.1:{text}"
    host, _, port = text.rpartition(":")
    if host == "":
        # ":8787" means every interface to distributed; icemap binds it to loopback instead.
        return f"127.0.0.1:{port or 0}"
    if not _is_loopback(host):
        raise IcemapError(
            f"dashboard address {text!r} is not on loopback; icemap serves the dashboard on "
            "127.0.0.1 only (reach it with `ssh -L 8787:127.0.0.1:8787 HOST`), or turn it off"
        )
    return text


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _int_option(opts: Mapping[str, str], key: str, what: str) -> int | None:
    if key not in opts:
        return None
    try:
        value = int(opts[key])
    except ValueError:
        raise IcemapError(f"--scheduler option {key}={opts[key]!r} must be a whole number ({what})") from None
    if value < 1:
        raise IcemapError(f"--scheduler option {key}={value} must be at least 1 ({what})")
    return value


def local_cluster(
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    *,
    dashboard: bool | int | str | None = None,
    **kwargs: Any,
) -> Any:
    """Start a ``LocalCluster`` fit for icemap: loopback only, torch-friendly worker env.

    Parameters
    ----------
    n_workers, threads_per_worker
        As ``distributed.LocalCluster`` (default: one worker process per few cores).
    dashboard
        None/False (default): no bokeh dashboard; True: one on a free loopback port; a port or
        ``127.0.0.1:PORT``: there. Addresses off loopback are refused (see
        :func:`_dashboard_address` for why). ``dashboard_address=`` is accepted as an alias.
    **kwargs
        Passed to ``LocalCluster`` (``processes``, ``memory_limit``, ``resources``...).
        ``host`` defaults to ``127.0.0.1`` so scheduler and workers listen on loopback only
        (threads-only clusters, ``processes=False``, talk in-process and open no port).

    Returns
    -------
    distributed.LocalCluster

    Notes
    -----
    Worker processes start without ``MALLOC_TRIM_THRESHOLD_`` (see :func:`_torch_friendly_spawn`):
    distributed sets it to return memory eagerly, which costs torch's allocator about 1.7x in
    speed. The setting is read when each nanny is created, and a nanny reuses it when it
    restarts a killed worker.
    """
    if "dashboard_address" in kwargs:
        dashboard = kwargs.pop("dashboard_address")
    # Threads-only clusters talk in-process (inproc://), which takes no host.
    host = kwargs.pop("host", None if kwargs.get("processes") is False else "127.0.0.1")
    if host is not None and not _is_loopback(str(host)):
        raise IcemapError(
            f"local_cluster host {host!r} is not loopback; a local cluster listens on 127.0.0.1 "
            "only. To serve workers on other machines, run `dask scheduler` there instead"
        )
    address = _dashboard_address(dashboard)
    with _torch_friendly_spawn():
        return LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            dashboard_address=address,
            host=host,
            scheduler_kwargs=_scheduler_http(address, kwargs.pop("scheduler_kwargs", None)),
            **kwargs,
        )


def _scheduler_http(address: str | None, scheduler_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Scheduler options that keep its HTTP server (health, metrics) on loopback, on a free port.

    The scheduler serves ``/health`` and ``/metrics`` even without a dashboard; left alone it
    takes port 8787 (or warns and picks another when a neighbour already has it).
    """
    return {**dict(scheduler_kwargs or {}), "dashboard_address": address or "127.0.0.1:0"}


def cuda_device_count() -> int:
    """How many CUDA GPUs this process may use, without importing torch or initialising CUDA.

    ``CUDA_VISIBLE_DEVICES`` wins when set (empty or ``-1`` hides every GPU); otherwise NVML
    (``pynvml``, which dask-cuda depends on) or ``nvidia-smi -L`` is asked. Returns 0 when
    none of them finds a GPU.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v for v in visible.replace(" ", "").split(",") if v]
        return 0 if not ids or ids[0] == "-1" else len(ids)
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001, S110 - not installed, no driver, no device: ask nvidia-smi
        pass
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def _import_optional(module: str, package: str, purpose: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise IcemapError(
            f"{purpose} needs the {package!r} package, which is not installed ({exc}); "
            f"install it with `pip install {package}`"
        ) from None


def local_cuda_cluster(
    *,
    devices: str | list[int] | None = None,
    threads_per_worker: int = 1,
    dashboard: bool | int | str | None = None,
    **kwargs: Any,
) -> Any:
    """Start a ``dask_cuda.LocalCUDACluster``: one worker per GPU, each with resource ``GPU=1``.

    Parameters
    ----------
    devices
        GPUs to use (``"0,1"`` or ``[0, 1]``); default every visible GPU.
    threads_per_worker
        1 by default: one thread drives one GPU; more threads only queue kernels.
    dashboard
        As :func:`local_cluster` (loopback or off).
    **kwargs
        Passed to ``LocalCUDACluster`` (``rmm_pool_size``, ``memory_limit``...).

    Raises
    ------
    IcemapError
        When ``dask_cuda`` is not installed or no GPU is visible.

    Notes
    -----
    dask-cuda pins each worker to one device (``CUDA_VISIBLE_DEVICES``), so each worker
    advertises exactly one ``GPU``; inference tasks annotated ``resources={"GPU": 1}`` then run
    one at a time per device instead of oversubscribing its memory.
    """
    dask_cuda = _import_optional("dask_cuda", "dask-cuda", "--scheduler local-cuda")
    if devices is None and cuda_device_count() == 0:
        raise IcemapError(
            "--scheduler local-cuda: no CUDA GPU is visible (CUDA_VISIBLE_DEVICES, NVML and "
            "nvidia-smi found none); use --scheduler local, or check the driver"
        )
    resources = {**dict(kwargs.pop("resources", {}) or {}), GPU_RESOURCE: 1}
    host = kwargs.pop("host", "127.0.0.1")
    if "dashboard_address" in kwargs:
        dashboard = kwargs.pop("dashboard_address")
    extra = {"CUDA_VISIBLE_DEVICES": devices} if devices is not None else {}
    with _torch_friendly_spawn():
        address = _dashboard_address(dashboard)
        return dask_cuda.LocalCUDACluster(
            threads_per_worker=threads_per_worker,
            dashboard_address=address,
            scheduler_kwargs=_scheduler_http(address, kwargs.pop("scheduler_kwargs", None)),
            host=host,
            resources=resources,
            **extra,
            **kwargs,
        )


# -- GPU resources ---------------------------------------------------------------------------------
def gpu_worker_addresses(client: Any = None) -> list[str]:
    """Addresses of the workers that advertise the ``GPU`` resource (sorted; empty if none).

    ``client`` defaults to the current default ``distributed`` client; with none (threaded
    scheduler) there are no GPU workers.
    """
    if client is None:
        try:
            from distributed import default_client

            client = default_client()
        except (ImportError, ValueError):
            return []
    try:
        info = client.scheduler_info(n_workers=-1)  # newer distributed lists 5 workers by default
    except TypeError:  # pragma: no cover - older distributed without n_workers
        info = client.scheduler_info()
    return sorted(
        addr
        for addr, w in info.get("workers", {}).items()
        if (w.get("resources") or {}).get(GPU_RESOURCE, 0) > 0
    )


def gpu_workers(client: Any = None) -> bool:
    """Whether any worker of ``client``'s cluster advertises the Dask resource ``GPU``.

    GPU tasks are annotated ``resources={"GPU": 1}``; on a cluster without such workers that
    annotation would leave them waiting forever, so callers ask this first and run on CPU
    workers otherwise.
    """
    return bool(gpu_worker_addresses(client))


# -- connect ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def connect(scheduler: str | None, *, timeout: str | float = "20s") -> Iterator[Any]:
    """Use ``scheduler`` for the duration of the block; yield the ``Client`` (None for threads).

    See the module docstring for the accepted strings. Clusters started here (``local``,
    ``local-cuda``, new gateway clusters) are shut down when the block ends; clusters this
    only connects to (addresses, a named gateway cluster) are left running.

    Parameters
    ----------
    scheduler
        A ``--scheduler`` string (see :func:`parse_scheduler`), or None.
    timeout
        How long to wait for a remote scheduler before giving up with a clear error.

    Raises
    ------
    IcemapError
        For an invalid string, a missing optional package or an unreachable scheduler.
    """
    spec = parse_scheduler(scheduler)
    if spec.kind == "threads":
        yield None
        return

    if spec.kind == "auto":
        use_cuda = cuda_device_count() > 0 and importlib.util.find_spec("dask_cuda") is not None
        spec = SchedulerSpec("local-cuda" if use_cuda else "local", options=spec.options)
    if spec.kind in ("local", "local-cuda"):
        opts = spec.options
        dashboard = _truthy(opts["dashboard"]) if "dashboard" in opts else None
        if spec.kind == "local":
            cluster = local_cluster(
                n_workers=_int_option(opts, "workers", "worker processes"),
                threads_per_worker=_int_option(opts, "threads", "threads per worker"),
                dashboard=dashboard,
                **({"memory_limit": opts["memory"]} if "memory" in opts else {}),
            )
        else:
            cluster = local_cuda_cluster(
                devices=opts.get("devices"),
                threads_per_worker=_int_option(opts, "threads", "threads per worker") or 1,
                dashboard=dashboard,
                **({"memory_limit": opts["memory"]} if "memory" in opts else {}),
            )
        with cluster, Client(cluster) as client:
            yield client
        return
    if spec.kind == "gateway":
        with _gateway_client(spec) as client:
            yield client
        return
    address = spec.address or ""
    if address.startswith("inproc://"):
        # An in-process scheduler lives in one Python process: a new process (the CLI) never finds it.
        raise IcemapError(f"--scheduler {address!r}: an inproc:// scheduler exists only inside the Python process "
                          "that started it; from another process connect with tcp://HOST:8786")
    if address.startswith("tls://"):
        if not dask.config.get("distributed.comm.tls.ca-file", None):
            raise IcemapError(
                f"--scheduler {address!r}: TLS needs certificates; set distributed.comm.tls.ca-file, "
                "distributed.comm.tls.client.cert and .key in the Dask configuration (or the environment "
                "variables DASK_DISTRIBUTED__COMM__TLS__CA_FILE, ...__CLIENT__CERT, ...__CLIENT__KEY)"
            )
    try:
        client = Client(spec.address, timeout=timeout)
    except (ValueError, TypeError) as exc:
        # distributed's own checks of an address or its security settings (not our code's bugs:
        # nothing of icemap runs inside Client()).
        raise IcemapError(f"cannot connect to the Dask scheduler at {spec.address!r}: {exc}") from None
    except (OSError, TimeoutError) as exc:
        raise IcemapError(
            f"cannot reach the Dask scheduler at {spec.address!r} ({exc}); check the address, "
            "or use --scheduler local to start a local cluster"
        ) from None
    with client:
        yield client


def _option_value(text: str) -> Any:
    """Gateway cluster options arrive as strings; their fields want ints, floats or bools."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@contextlib.contextmanager
def _gateway_errors(where: str) -> Iterator[None]:
    """Turn the gateway client's failures while setting up a cluster into one-line errors.

    Only the set-up calls go through this: an ``OSError`` raised later by the job itself
    (writing a store, say) must not be reported as an unreachable gateway.
    """
    cluster_error = getattr(importlib.import_module("dask_gateway"), "GatewayClusterError", ())
    try:
        yield
    except cluster_error as exc:
        raise IcemapError(
            f"the dask-gateway at {where} could not start the cluster ({exc}); its server log says why "
            "(often a scheduler_cmd/worker_cmd that does not exist in the image)"
        ) from None
    except OSError as exc:  # aiohttp's connection errors and distributed's connect timeouts
        raise IcemapError(f"cannot reach the dask-gateway at {where} ({exc}); check the address and that it runs") from None
    except Exception as exc:
        status = getattr(exc, "status", None)
        if status in (401, 403):
            raise IcemapError(
                f"the dask-gateway at {where} refused the credentials (HTTP {status}); set the "
                "authentication it expects in the dask config, e.g. DASK_GATEWAY__AUTH__TYPE=basic and "
                "DASK_GATEWAY__AUTH__KWARGS__PASSWORD, or jupyterhub with JUPYTERHUB_API_TOKEN"
            ) from None
        raise


def _close_gateway(gateway: Any) -> None:
    """Close a ``dask_gateway.Gateway`` so that its finaliser does not close it a second time.

    dask-gateway 2026.3's ``Gateway.__del__`` closes again, which raises once the event loop
    is gone (distributed 2026.x): every command printed an "Exception ignored in
    Gateway.__del__" traceback, and in a long-lived process the exception surfaced during
    garbage collection inside unrelated code. The finaliser skips objects without a loop runner.
    """
    try:
        gateway.close()
    finally:
        _forget_loop(gateway)


def _forget_loop(gateway: Any) -> None:
    """Keep a closed ``Gateway``'s finaliser from closing it again (see :func:`_close_gateway`)."""
    if gateway is not None and hasattr(gateway, "__dict__"):
        vars(gateway).pop("_loop_runner", None)


@contextlib.contextmanager
def _gateway_client(spec: SchedulerSpec) -> Iterator[Any]:
    """A client on a dask-gateway cluster: attach to a named one, or start (and stop) one."""
    dask_gateway = _import_optional("dask_gateway", "dask-gateway", "--scheduler gateway")
    opts = dict(spec.options)
    workers = _int_option(opts, "workers", "gateway workers")
    adapt = opts.pop("adapt", None)
    opts.pop("workers", None)
    try:
        if spec.cluster_name is not None:
            gateway = dask_gateway.Gateway(proxy_address=spec.proxy_address)
        else:
            gateway = dask_gateway.Gateway(address=spec.address)
    except ValueError as exc:  # no address given and none in the dask config
        raise IcemapError(
            f"--scheduler gateway: {exc}; set DASK_GATEWAY__ADDRESS or use gateway+https://GATEWAY-URL"
        ) from None
    where = spec.address or spec.proxy_address or "the configured address"
    try:
        if spec.cluster_name is not None:
            # Attach only: the cluster belongs to whoever started it, so it is left running.
            with _gateway_errors(where):
                cluster = gateway.connect(spec.cluster_name, shutdown_on_close=False)
            started = False
        else:
            with _gateway_errors(where):
                options = gateway.cluster_options()
            for key, value in opts.items():
                try:
                    options[key] = _option_value(value)
                except (KeyError, AttributeError, TypeError, ValueError) as exc:
                    raise IcemapError(f"--scheduler gateway: cluster option {key}={value!r} refused ({exc})") from None
            with _gateway_errors(where):
                cluster = gateway.new_cluster(options, shutdown_on_close=True)
            started = True
        try:
            with _gateway_errors(where):
                if started and adapt:
                    lo, _, hi = adapt.partition(":")
                    try:
                        cluster.adapt(minimum=int(lo or 0), maximum=int(hi or lo))
                    except ValueError:
                        raise IcemapError(f"--scheduler gateway: adapt={adapt!r} must be MIN:MAX worker counts") from None
                elif started:
                    cluster.scale(workers or 2)
                elif workers:
                    cluster.scale(workers)
                client = cluster.get_client(set_as_default=True)
            with client:
                yield client
        finally:
            if started:
                cluster.shutdown()
            else:
                cluster.close()
            _forget_loop(getattr(cluster, "gateway", None))  # the cluster closed its own gateway
    finally:
        _close_gateway(gateway)
