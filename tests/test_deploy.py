"""deploy/: the recipes parse, lint, validate against the schemas they will meet, and agree with
the package (version, pins, extras, GPU resources).

Everything runs offline (the network guard is on): kubernetes-validate ships the Kubernetes
schemas; the Dask operator's resources are checked against a schema written from its CRDs
plus the Kubernetes PodSpec/ServiceSpec schemas for what they embed. Images are not built
(no Docker engine here); their Dockerfiles are parsed instead.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml

from icemap._version import __version__

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S_VERSION = "1.30.0"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# The version has one home (pyproject.toml reads it from there too).
VERSION = __version__
YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") or p.name == ".yamllint")


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s_objects() -> dict[str, dict[str, Any]]:
    objs = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in _docs(path):
            objs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return objs


# -- YAML ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses_and_lints(path: Path) -> None:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    assert _docs(path) or path.name == ".yamllint"
    config = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    problems = [f"{p.line}:{p.column} {p.rule} {p.message}" for p in linter.run(path.read_text(), config, str(path))]
    assert problems == []


def test_yamllint_config_is_the_one_used() -> None:
    """The lint config is strict enough to matter (a broken file fails it)."""
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    bad = "a: 1\na: 2\nb:   [1,2]\n" + "c: " + "x" * 130 + "\n"
    rules = {p.rule for p in linter.run(bad, config)}
    assert {"key-duplicates", "line-length"} <= rules


# -- Kubernetes ---------------------------------------------------------------------------------------
def test_kubernetes_validate_works_offline() -> None:
    import kubernetes_validate

    bad = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "x"}, "automountToken": True}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def _core_objects_to_validate() -> list[tuple[str, dict[str, Any]]]:
    """Core objects, plus the pod/service specs embedded in the Dask operator's resources."""
    out = []
    for name, obj in _k8s_objects().items():
        if obj["apiVersion"].startswith("kubernetes.dask.org/"):
            spec = obj["spec"]
            groups = {"worker": spec["worker"]}
            if obj["kind"] == "DaskCluster":
                groups["scheduler"] = spec["scheduler"]
                out.append((f"{name}/scheduler.service", {"apiVersion": "v1", "kind": "Service",
                                                          "metadata": {"name": "s"}, "spec": spec["scheduler"]["service"]}))
            for part, group in groups.items():
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", **group.get("metadata", {})},
                       "spec": group["spec"]}
                out.append((f"{name}/{part}.spec", pod))
        else:
            out.append((name, obj))
    return out


@pytest.mark.parametrize("name, obj", _core_objects_to_validate(), ids=lambda v: v if isinstance(v, str) else "")
def test_kubernetes_objects_validate_strictly(name: str, obj: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_dask_operator_resources_match_the_crd_schema() -> None:
    import jsonschema

    schema = json.loads((DEPLOY / "kubernetes" / "schemas" / "dask-operator.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    dask_objs = {n: o for n, o in _k8s_objects().items() if o["apiVersion"].startswith("kubernetes.dask.org/")}
    assert set(dask_objs) == {"DaskCluster/icemap", "DaskWorkerGroup/icemap-gpu"}
    for name, obj in dask_objs.items():
        errors = [e.message for e in validator.iter_errors(obj)]
        assert errors == [], name
    # The schema has teeth: the mistakes it exists to catch are caught.
    cluster = dask_objs["DaskCluster/icemap"]
    for broken in (
        {**cluster, "spec": {**cluster["spec"], "workers": cluster["spec"]["worker"]}},  # misspelt key
        {**cluster, "spec": {"worker": cluster["spec"]["worker"]}},  # no scheduler
        {**cluster, "spec": {**cluster["spec"], "scheduler": {"spec": cluster["spec"]["scheduler"]["spec"]}}},  # no service
    ):
        assert list(validator.iter_errors(broken))


def _container(group: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in group["spec"]["containers"] if c["name"] == "worker"]
    return container


def test_gpu_and_cpu_worker_groups() -> None:
    objs = _k8s_objects()
    cluster, gpu = objs["DaskCluster/icemap"], objs["DaskWorkerGroup/icemap-gpu"]
    assert gpu["spec"]["cluster"] == cluster["metadata"]["name"]
    g = _container(gpu["spec"]["worker"])
    args = [str(a) for a in g["args"]]
    assert args[:2] == ["dask", "worker"]
    assert args[args.index("--resources") + 1] == "GPU=1" and args[args.index("--nthreads") + 1] == "1"
    assert g["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert g["image"].endswith(f":{VERSION}-cuda")
    c = _container(cluster["spec"]["worker"])
    assert "--resources" not in c["args"] and "nvidia.com/gpu" not in json.dumps(c["resources"])
    assert c["image"].endswith(f":{VERSION}")


def test_every_image_reference_is_this_version() -> None:
    images = re.findall(r"ghcr\.io/icemap-dev/icemap[:\w.\-]*", "\n".join(p.read_text() for p in YAML_FILES))
    images += re.findall(r"ghcr\.io/icemap-dev/icemap[:\w.\-]*", (DEPLOY / "README.md").read_text())
    assert images
    gateway = _docs(DEPLOY / "gateway" / "values.yaml")[0]
    assert gateway["gateway"]["backend"]["image"]["tag"] == VERSION
    for ref in images:
        if ":" in ref:
            assert ref.split(":", 1)[1] in (VERSION, f"{VERSION}-cuda"), ref


def test_no_credentials_in_deploy_files() -> None:
    text = "\n".join(p.read_text() for p in DEPLOY.rglob("*") if p.is_file())
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # AWS access key ids
    assert not re.search(r"(?i)(aws_secret_access_key|client_secret|password|apitoken)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{12,}", text)
    assert "BEGIN PRIVATE KEY" not in text and "sig=" not in text
    # Secrets reach pods only by reference.
    for obj in _k8s_objects().values():
        for env in re.findall(r"'name': '([A-Z_]*(?:KEY|TOKEN|SECRET|PASSWORD)[A-Z_]*)', 'value'", str(obj)):
            pytest.fail(f"{env} is set to a literal value; use valueFrom.secretKeyRef")


def test_job_resumes_and_targets_the_operator_service() -> None:
    job = _k8s_objects()["Job/icemap-andes-2021"]
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SCHEDULER"] == "tcp://icemap-scheduler.icemap:8786"  # <cluster>-scheduler.<namespace>
    assert spec["restartPolicy"] == "OnFailure" and job["spec"]["backoffLimit"] >= 1
    script = container["args"][0]
    assert "icemap ingest" in script and "icemap map" in script and script.count('--scheduler "$SCHEDULER"') == 2


# -- images -------------------------------------------------------------------------------------------
def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    buf = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        lines.append(buf + line)
        buf = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


DOCKERFILES = [DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_and_installs_like_ci(dockerfile: Path) -> None:
    ins = _instructions(dockerfile)
    froms = [args.split()[0] for kind, args in ins if kind == "FROM"]
    assert froms
    for image in froms:
        # An exact patch-release tag, or a digest.
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?|[\w./-]+@sha256:[0-9a-f]{64}", image), image
    runs = " ".join(args for kind, args in ins if kind == "RUN")
    # The same constraints file and extras as CI; the extras exist in pyproject.toml.
    m = re.search(r"pip install -c constraints\.txt \"\.\[([\w,]+)\]\"", runs)
    assert m, "icemap must be installed with -c constraints.txt"
    extras = set(m.group(1).split(","))
    assert "ml" in extras and extras <= set(PYPROJECT["project"]["optional-dependencies"]), extras
    # torch: the version pinned in constraints.txt, from the PyTorch index (CPU or CUDA build).
    assert re.search(r"^torch==\d", (REPO / "constraints.txt").read_text(), re.MULTILINE)
    assert "torch==$(sed -n 's/^torch==//p' constraints.txt)" in runs
    index = next(args for kind, args in ins if kind == "ARG" and args.startswith("TORCH_INDEX="))
    want = "whl/cpu" if dockerfile.name == "Dockerfile" else "whl/cu"
    assert index.startswith("TORCH_INDEX=https://download.pytorch.org/") and want in index
    copies = " ".join(args for kind, args in ins if kind == "COPY")
    assert "pyproject.toml" in copies and "constraints.txt" in copies and "deploy/docker/dask.yaml /etc/dask/" in copies
    labels = " ".join(args for kind, args in ins if kind == "LABEL")
    assert f'org.opencontainers.image.version="{VERSION}"' in labels
    users = [args for kind, args in ins if kind == "USER"]
    assert users and not users[-1].startswith(("root", "0"))
    for kind, args in ins:
        if kind in ("ENV", "ARG"):
            assert not re.search(r"(?i)(key|token|secret|password)\w*=", args), args


def test_cpu_and_cuda_images_differ_only_in_torch_build() -> None:
    def normalised(p: Path) -> list[tuple[str, str]]:
        return [(k, a) for k, a in _instructions(p)
                if not (k == "ARG" and a.startswith("TORCH_INDEX=")) and k not in ("LABEL", "ENV")]

    assert normalised(DOCKERFILES[0]) == normalised(DOCKERFILES[1])


def test_image_dask_config_removes_malloc_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    import dask
    from distributed.nanny import _get_env_variables

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    for cfg_file in (DEPLOY / "docker" / "dask.yaml", DEPLOY / "hpc" / "jobqueue.yaml"):
        cfg = yaml.safe_load(cfg_file.read_text())
        with dask.config.set(dask.config.merge(dask.config.config, cfg)):
            env = _get_env_variables("distributed.nanny.pre-spawn-environ")
        assert "MALLOC_TRIM_THRESHOLD_" not in env and env.get("OMP_NUM_THREADS") == "1", cfg_file


# -- dask-gateway ---------------------------------------------------------------------------------------
def _gateway_config(values: dict[str, Any]) -> Any:
    """The traitlets config the chart builds from ``extraConfig`` (its snippets in key order)."""
    from traitlets.config import Config

    c = Config()
    extra = values["gateway"]["extraConfig"]
    for key in sorted(extra):
        exec(compile(extra[key], f"gateway-extraConfig.{key}", "exec"), {"c": c})  # noqa: S102 - our own file
    return c


def test_gateway_values_and_gpu_option() -> None:
    """The values' option handler, run by dask-gateway-server's own Options as the gateway runs it.

    tests/test_engines.py runs a real server with this code; this is the quick static half.
    """
    from dask_gateway_server.backends.local import LocalClusterConfig

    values = _docs(DEPLOY / "gateway" / "values.yaml")[0]
    gw = values["gateway"]
    assert gw["auth"]["type"] == "jupyterhub" and "apiToken" not in gw["auth"]["jupyterhub"]
    assert values["traefik"]["service"]["type"] == "ClusterIP"
    c = _gateway_config(values)
    options = c.Backend.cluster_options
    defaults = {f.field: f.default for f in options.fields}
    assert set(defaults) == {"worker_cores", "worker_memory", "gpu"} and defaults["gpu"] is False
    user = types.SimpleNamespace(name="alice", groups=[], admin=False)
    cpu = options.get_configuration({}, user)
    gpu = options.get_configuration({"gpu": True}, user)
    assert cpu["image"] == f"ghcr.io/icemap-dev/icemap:{VERSION}" and "worker_cmd" not in cpu
    assert gpu["image"] == f"ghcr.io/icemap-dev/icemap:{VERSION}-cuda"
    assert gpu["worker_cmd"] == ["dask", "worker", "--resources", "GPU=1"] and gpu["worker_threads"] == 1
    assert gpu["worker_extra_container_config"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert cpu["worker_extra_pod_config"]["serviceAccountName"] == "icemap"
    assert "tolerations" not in cpu["worker_extra_pod_config"]  # the handler must not share state
    # The commands that distributed still installs; set on ClusterConfig, they reach the
    # backends' subclasses (KubeClusterConfig on Kubernetes, LocalClusterConfig in the tests).
    assert c.ClusterConfig.scheduler_cmd == ["dask", "scheduler"] and c.ClusterConfig.worker_cmd == ["dask", "worker"]
    local = LocalClusterConfig(config=c)
    assert local.scheduler_cmd == ["dask", "scheduler"] and local.worker_cmd == ["dask", "worker"]


def test_gateway_commands_exist() -> None:
    """Every command the gateway would start exists in an environment with icemap's pins.

    dask-gateway-server's defaults (``dask-scheduler``, ``dask-worker``) do not since
    distributed 2026.6, and a cluster then dies at start; the images install the same pins.
    """
    values = _docs(DEPLOY / "gateway" / "values.yaml")[0]
    c = _gateway_config(values)
    user = types.SimpleNamespace(name="alice", groups=[], admin=False)
    gpu_cmd = c.Backend.cluster_options.get_configuration({"gpu": True}, user)["worker_cmd"]
    bindir = str(Path(sys.executable).parent)
    for cmd in (c.ClusterConfig.scheduler_cmd, c.ClusterConfig.worker_cmd, gpu_cmd):
        exe = shutil.which(cmd[0], path=bindir) or shutil.which(cmd[0])
        assert exe, f"{cmd[0]} is not installed"
        res = subprocess.run([exe, *cmd[1:], "--help"], capture_output=True, text=True, timeout=120, check=False)
        assert res.returncode == 0, (cmd, res.stderr[-2000:])


# -- HPC -------------------------------------------------------------------------------------------------
def test_slurm_job_scripts_cpu_and_gpu(tmp_path: Path) -> None:
    import dask_jobqueue  # noqa: F401  (a test dependency: fail loudly if missing)
    env_cfg = tmp_path / "dask"
    env_cfg.mkdir()
    (env_cfg / "jobqueue.yaml").write_text((DEPLOY / "hpc" / "jobqueue.yaml").read_text())
    res = subprocess.run([sys.executable, str(DEPLOY / "hpc" / "slurm_cluster.py"), "--dry-run", "--gpu-jobs", "1"],
                         check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path,  # logs/ lands here
                         env={"PATH": "/usr/bin:/bin", "DASK_CONFIG": str(env_cfg), "HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    cpu, gpu = res.stdout.split("# --- GPU worker job ---")
    assert "#SBATCH --cpus-per-task=8" in cpu and "--gres" not in cpu and "GPU=1" not in cpu
    assert "#SBATCH --gres=gpu:1" in gpu and "--resources GPU=1" in gpu
    assert re.search(r"--nthreads 1\s*$", gpu.strip().splitlines()[-1])
    for script in (cpu, gpu):
        assert "--nanny" in script and "distributed.cli.dask_worker" in script
        # jobqueue.yaml's worker-extra-args reach GPU jobs too (they extend, not replace, them).
        assert "--dashboard-address 127.0.0.1:0" in script


def test_sbatch_example_is_a_driver_job() -> None:
    text = (DEPLOY / "hpc" / "icemap-region.sbatch").read_text()
    assert text.startswith("#!/usr/bin/env bash") and "#SBATCH --requeue" in text
    assert "slurm_cluster.py" in text and "icemap ingest" in text and "icemap map" in text
    assert subprocess.run(["bash", "-n", str(DEPLOY / "hpc" / "icemap-region.sbatch")], check=False).returncode == 0


def test_mpi_recipe_ranks() -> None:
    """mpi_run.py: the last --gpu-ranks worker ranks are GPU=1 workers with one thread.

    tests/test_engines.py runs the recipe under mpirun; this is the quick static half.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location("mpi_run", DEPLOY / "hpc" / "mpi_run.py")
    assert spec and spec.loader
    mpi_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mpi_run)
    # 6 ranks: 0 scheduler, 1 client, 2-5 workers; 2 GPU ranks -> ranks 4 and 5.
    roles = [mpi_run.worker_options(rank, 6, 2, 4) for rank in range(2, 6)]
    assert roles == [(4, {}), (4, {}), (1, {"resources": {"GPU": 1}}), (1, {"resources": {"GPU": 1}})]
    assert mpi_run.worker_options(3, 4, 0, 2) == (2, {})
    text = (DEPLOY / "hpc" / "icemap-region-mpi.sbatch").read_text()
    assert "mpirun" in text and "mpi_run.py" in text and "icemap ingest" in text and "#SBATCH --requeue" in text
    assert subprocess.run(["bash", "-n", str(DEPLOY / "hpc" / "icemap-region-mpi.sbatch")], check=False).returncode == 0
