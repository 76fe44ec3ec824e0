"""deploy/ on real engines: SLURM, dask-gateway and MPI, each started on loopback by the test.

tests/test_deploy.py checks the recipes statically; here they run. Each engine runs the
recipe's own files (deploy/hpc/jobqueue.yaml and slurm_cluster.py, the sbatch region job,
deploy/gateway/values.yaml's extraConfig, deploy/hpc/mpi_run.py), and the Zarr stores it
writes through ``icemap ingest`` / ``icemap map`` must equal, value for value, those of a run
in this process on the threaded scheduler. U-Net maps run with one GPU-resource worker
(SLURM: a job with ``--gres=gpu:1`` on a fake GRES; gateway: the ``gpu`` option; MPI: a rank
with ``GPU=1``): the product records that its inference tasks were annotated for GPU workers,
which only such a worker can run (CPU torch here).

The engines and the rules for starting and stopping them are in tests/engines.py. Locally a
test skips when its engine's Debian packages or Python extras are absent; under ``CI=true`` it
fails instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import icemap
from icemap.cluster import connect
from icemap.errors import IcemapError
from icemap.stac import search

from .engines import Slurm, free_port, gateway_server, loopback_env, mpi_env, run_in_session, slurm_cluster
from .test_faults import assert_stores_identical
from .test_infer import make_model

REPO = Path(__file__).resolve().parents[1]
HPC = REPO / "deploy" / "hpc"
VALUES = REPO / "deploy" / "gateway" / "values.yaml"
pytestmark = [pytest.mark.engines, pytest.mark.slow]

# The store attributes allowed to differ from the local run's: when it was created, the path of
# the cube a product was mapped from (each run maps its own cube), and whether U-Net tasks were
# annotated for GPU workers (asserted separately: 1 where a GPU worker was there, 0 locally).
# The settings record names the source cube by its absolute path (another folder on each engine).
VARYING_ATTRS = ("created", "icemap:last_run", "source_cube", "gpu_resources", "icemap:settings.source_cube")
# CLI defaults of `icemap map --method unet`, so the local run is the CLI's computation.
UNET_OPTIONS = {"batch_size": 8, "tta": False, "halo": None, "tile": 256, "device": "auto"}
CHUNK = "64"
# The bands NDSI and the test U-Net read; fewer bands keep the engine suite fast.
BANDS = "green,swir16"


# -- the local run ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("engines-model") / "unet")


@pytest.fixture(scope="module")
def local(small_region: Any, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Cube, NDSI and U-Net products made in this process on dask's threaded scheduler."""
    folder = tmp_path_factory.mktemp("engines-local")
    paths = {"cube": folder / "cube.zarr", "ndsi": folder / "ndsi.zarr", "unet": folder / "unet.zarr"}
    icemap.ingest(search(str(small_region.catalog)), paths["cube"], chunksize=int(CHUNK), bands=BANDS.split(","))
    icemap.map_cube(paths["cube"], paths["ndsi"])
    icemap.map_cube(paths["cube"], paths["unet"], method="unet", model=model_dir, predict_options=UNET_OPTIONS)
    return paths


def icemap_commands(region: Any, model: Path, out: Path) -> list[str]:
    """``icemap ingest``, ``map --method ndsi`` and ``map --method unet``, separated by ``--``."""
    exe = str(Path(sys.executable).with_name("icemap"))  # the environment's console script
    cube = str(out / "cube.zarr")
    return [exe, "ingest", "--catalog", str(region.catalog), "--out", cube, "--chunksize", CHUNK, "--bands", BANDS, "--quiet",
            "--",
            exe, "map", "--cube", cube, "--method", "ndsi", "--out", str(out / "ndsi.zarr"), "--quiet", "--",
            exe, "map", "--cube", cube, "--method", "unet", "--model", str(model), "--out", str(out / "unet.zarr"),
            "--quiet"]


def assert_products_equal(out: Path, local: dict[str, Path], names: tuple[str, ...], *, gpu: bool) -> None:
    """The engine's stores equal the local ones; U-Net tasks were routed to GPU workers iff ``gpu``."""
    for name in names:
        assert_stores_identical(out / f"{name}.zarr", local[name], ignore_attrs=VARYING_ATTRS)
    if "unet" in names:
        assert icemap.open_cube(out / "unet.zarr").attrs["gpu_resources"] == int(gpu)
        assert icemap.open_cube(local["unet"]).attrs["gpu_resources"] == 0


# -- SLURM --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slurm]:
    """A single-node SLURM cluster whose partition is the one deploy/hpc/jobqueue.yaml submits to."""
    queue = yaml.safe_load((HPC / "jobqueue.yaml").read_text())["jobqueue"]["slurm"]["queue"]
    with slurm_cluster(tmp_path_factory.mktemp("slurm"), partition=queue) as cluster:
        yield cluster


def recipe_env(slurm: Slurm, **extra: str) -> dict[str, str]:
    """What a site sets to run deploy/hpc as it is: its config file, environment and loopback.

    ``DASK_CONFIG`` names deploy/hpc/jobqueue.yaml itself; the ``DASK_JOBQUEUE__SLURM__*``
    variables override what a 2-core test node cannot give (8 cores, 32 GiB per job; 2 threads each here) and put
    scheduler and workers on ``lo``, as a site would pick ``ib0``.
    """
    return {**slurm.env, **loopback_env(
        SLURM_CONF=str(slurm.conf), DASK_CONFIG=str(HPC / "jobqueue.yaml"), ICEMAP_VENV=sys.prefix,
        DASK_JOBQUEUE__SLURM__CORES="2", DASK_JOBQUEUE__SLURM__MEMORY="2GiB", DASK_JOBQUEUE__SLURM__INTERFACE="lo",
        **extra)}


@pytest.fixture(scope="module")
def region_job(slurm: Slurm, small_region: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """icemap-region.sbatch submitted as a user would, on the sample region; its folder and log.

    The job is the driver: it runs slurm_cluster.py, which submits one CPU worker job and runs
    ``icemap ingest`` and ``icemap map`` (NDSI) on it.
    """
    folder = tmp_path_factory.mktemp("region-job")
    (folder / "logs").mkdir()  # the job's --output folder, made by the user before sbatch
    out = folder / "andes"
    env = recipe_env(slurm, ICEMAP_REPO=str(REPO), OUT=str(out), CATALOG=str(small_region.catalog),
                     INGEST_OPTIONS=f"--chunksize {CHUNK} --bands {BANDS}", CPU_JOBS="1", GPU_JOBS="0",
                     CLUSTER_OPTIONS="--worker-timeout 90")
    start = time.monotonic()
    # --wait: sbatch returns when the job has ended, with its exit code. The job's #SBATCH
    # directives (2 CPUs, 8G) stay as they are: the test node declares room for them.
    rc, output = run_in_session(["sbatch", "--wait", "--parsable", f"--chdir={folder}", str(HPC / "icemap-region.sbatch")],
                                env=env, cwd=folder, timeout=240, log=folder / "sbatch.log")
    job_log = "\n".join(p.read_text(errors="replace") for p in sorted((folder / "logs").glob("icemap-region-*.out")))
    return {"rc": rc, "output": output, "log": job_log, "out": out, "folder": folder,
            "seconds": time.monotonic() - start}


@pytest.mark.timeout(300)
def test_slurm_region_sbatch_job(region_job: dict[str, Any], slurm: Slurm, local: dict[str, Path]) -> None:
    """icemap-region.sbatch end to end: ingest and NDSI map on a worker job it submitted."""
    assert region_job["rc"] == 0, f"{region_job['output']}\n{region_job['log'][-4000:]}\n{slurm.logs()}"
    log = region_job["log"]
    assert "1 CPU + 0 GPU jobs" in log and "+ icemap ingest" in log and "+ icemap map" in log
    out = region_job["out"]
    assert_stores_identical(out / "cube.zarr", local["cube"], ignore_attrs=VARYING_ATTRS)
    assert_stores_identical(out / "ice.zarr", local["ndsi"], ignore_attrs=VARYING_ATTRS)  # the job's NDSI map
    # The worker was a SLURM job, started where jobqueue.yaml puts its logs, and the recipe
    # cancelled it on the way out.
    assert len(list((region_job["folder"] / "logs" / "dask").glob("icemap-worker-*.err"))) == 1
    assert slurm.jobs() == []
    print(f"slurm start {slurm.start_s:.1f} s; sbatch region job (driver + 1 worker job) {region_job['seconds']:.1f} s")


@pytest.mark.timeout(300)
def test_slurm_cluster_recipe_gpu_job(region_job: dict[str, Any], slurm: Slurm, model_dir: Path,
                                      local: dict[str, Path], tmp_path: Path) -> None:
    """slurm_cluster.py with a CPU and a GPU worker job (``--gres=gpu:1``): U-Net on the job's cube.

    Its inference tasks ask for ``GPU=1``, which only the GPU job's worker offers.
    """
    assert region_job["rc"] == 0, "the region job failed (see test_slurm_region_sbatch_job)"
    exe = str(Path(sys.executable).with_name("icemap"))
    cmd = [sys.executable, str(HPC / "slurm_cluster.py"), "--cpu-jobs", "1", "--gpu-jobs", "1",
           "--wait-workers", "2", "--worker-timeout", "90", "--",
           exe, "map", "--cube", str(region_job["out"] / "cube.zarr"), "--method", "unet", "--model", str(model_dir),
           "--out", str(tmp_path / "unet.zarr"), "--quiet"]
    start = time.monotonic()
    rc, output = run_in_session(cmd, env=recipe_env(slurm), cwd=tmp_path, timeout=240, log=tmp_path / "driver.log")
    elapsed = time.monotonic() - start
    assert rc == 0, f"{output[-4000:]}\n{slurm.logs()}"
    assert "1 CPU + 1 GPU jobs" in output
    assert_products_equal(tmp_path, local, ("unet",), gpu=True)
    job_logs = {p: p.read_text(errors="replace") for p in (tmp_path / "logs" / "dask").glob("icemap-worker-*.err")}
    assert len(job_logs) == 2 and sum("gpu-0" in text for text in job_logs.values()) == 1, list(job_logs)
    assert slurm.jobs() == []
    print(f"slurm_cluster.py (CPU + GPU job, U-Net) {elapsed:.1f} s")


# -- dask-gateway ---------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_gateway_values_run_icemap(local: dict[str, Path], model_dir: Path, tmp_path: Path) -> None:
    """A dask-gateway-server configured by values.yaml's extraConfig: NDSI on the default
    cluster, U-Net on a ``gpu=true`` cluster whose workers carry ``GPU=1``."""
    exe = str(Path(sys.executable).with_name("icemap"))
    with gateway_server(tmp_path / "gateway", VALUES) as gateway:
        env = gateway.client_env()
        runs = {
            "ndsi": [exe, "map", "--cube", str(local["cube"]), "--out", str(tmp_path / "ndsi.zarr"), "--quiet",
                     "--scheduler", f"gateway+{gateway.url}?workers=1"],
            "unet": [exe, "map", "--cube", str(local["cube"]), "--method", "unet", "--model", str(model_dir),
                     "--out", str(tmp_path / "unet.zarr"), "--quiet",
                     "--scheduler", f"gateway+{gateway.url}?gpu=true&workers=1"],
        }
        times = {}
        for name, cmd in runs.items():
            start = time.monotonic()
            rc, output = run_in_session(cmd, env=env, cwd=tmp_path, timeout=150, log=tmp_path / f"{name}.log")
            times[name] = time.monotonic() - start
            assert rc == 0, f"{output[-3000:]}\n--- gateway log\n{gateway.log()}"
            assert "Traceback" not in output, output[-3000:]  # also none from the client's finalisers
        # A wrong password and a gateway that is not there are one-line errors, not tracebacks.
        import dask
        import dask_gateway  # noqa: F401  (loads the gateway section of the dask config)

        with dask.config.set({"gateway.auth.type": "basic", "gateway.auth.kwargs": {"password": "wrong"}}), \
                pytest.raises(IcemapError, match="refused the credentials"), connect(f"gateway+{gateway.url}"):
            pass
        log = gateway.log()
    with pytest.raises(IcemapError, match="cannot reach the dask-gateway"), connect(f"gateway+http://127.0.0.1:{free_port()}"):
        pass
    assert "Cluster" in log and "FileNotFoundError" not in log
    assert_products_equal(tmp_path, local, ("ndsi", "unet"), gpu=True)
    print(f"gateway start {gateway.start_s:.1f} s; ndsi {times['ndsi']:.1f} s; unet (gpu=true) {times['unet']:.1f} s")


# -- MPI ------------------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_mpi_region_sbatch_job(slurm: Slurm, small_region: Any, model_dir: Path, local: dict[str, Path],
                               tmp_path: Path) -> None:
    """icemap-region-mpi.sbatch: ``mpirun -np 4`` inside a SLURM job runs mpi_run.py (dask-mpi):
    scheduler, client, a CPU worker rank and a ``GPU=1`` rank; ingest, then the U-Net map."""
    (tmp_path / "logs").mkdir()
    out = tmp_path / "andes"
    env = {**recipe_env(slurm), **mpi_env(
        SLURM_CONF=str(slurm.conf), ICEMAP_REPO=str(REPO), ICEMAP_VENV=sys.prefix, OUT=str(out),
        CATALOG=str(small_region.catalog), INGEST_OPTIONS=f"--chunksize {CHUNK} --bands {BANDS}",
        MAP_OPTIONS=f"--method unet --model {model_dir}",
        MPI_OPTIONS="--interface lo --gpu-ranks 1 --dashboard-address 127.0.0.1:0 --worker-timeout 60")}
    start = time.monotonic()
    # The script asks for a site's size (10 ranks x 8 CPUs); a user sizes a run on the command
    # line, which wins over #SBATCH lines: 4 ranks of 1 CPU and the (fake) GPU here.
    rc, output = run_in_session(["sbatch", "--wait", "--ntasks=4", "--cpus-per-task=1", "--mem-per-cpu=1G",
                                 "--gres=gpu:1", f"--chdir={tmp_path}", str(HPC / "icemap-region-mpi.sbatch")],
                                env=env, cwd=tmp_path, timeout=240, log=tmp_path / "sbatch.log")
    elapsed = time.monotonic() - start
    job_log = "\n".join(p.read_text(errors="replace") for p in sorted((tmp_path / "logs").glob("*.out")))
    assert rc == 0, f"{output}\n{job_log[-5000:]}\n{slurm.logs()}"
    assert "2 worker ranks (1 GPU)" in job_log and "+ icemap ingest" in job_log and "+ icemap map" in job_log
    assert_stores_identical(out / "cube.zarr", local["cube"], ignore_attrs=VARYING_ATTRS)
    assert_stores_identical(out / "ice.zarr", local["unet"], ignore_attrs=VARYING_ATTRS)  # the job's U-Net map
    assert icemap.open_cube(out / "ice.zarr").attrs["gpu_resources"] == 1  # inference asked for GPU=1
    assert slurm.jobs() == []
    print(f"MPI sbatch job (mpirun -np 4; ingest + U-Net) {elapsed:.1f} s")


# -- the skip/fail policy -------------------------------------------------------------------------------
@pytest.mark.parametrize("in_ci", [False, True])
def test_missing_engine_skips_locally_and_fails_under_ci(in_ci: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CI=true an engine that cannot start is a failure: CI must never pass by skipping."""
    from . import engines

    monkeypatch.setattr(engines, "IN_CI", in_ci)
    expected = pytest.fail.Exception if in_ci else pytest.skip.Exception
    with pytest.raises(expected, match="no-such-daemon"):
        engines.require_executables("no-such-daemon", package="no-such-package")
    with pytest.raises(expected, match="no_such_module"):
        engines.require_modules("no_such_module", extra="test")
