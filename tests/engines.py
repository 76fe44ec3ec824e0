"""Real Dask engines for the deploy/ tests: SLURM, dask-gateway-server and Open MPI, on loopback.

Each starter is a context manager that starts the engine's daemons as child processes of the
test, with all their state in a folder the test owns, waits (bounded) until the engine answers,
and on exit stops every process it started by PID, also when the test failed or timed out:

* :func:`slurm_cluster`: munged, slurmctld and slurmd (Debian's packages) for a single node
  ``localhost`` at 127.0.0.1, with a fake GPU (``--gres=gpu:1`` jobs are scheduled);
* :func:`gateway_server`: ``dask-gateway-server`` with the local backend, a password and its
  proxy on 127.0.0.1, configured by a values file's ``extraConfig`` code (executed, not copied);
* :func:`mpi_env`: the environment under which ``mpirun`` runs as root on loopback.

Why stop by PID and process group: the daemons fork (slurmstepd, job processes, the gateway's
scheduler and worker processes in their own sessions), and a test machine is shared, so
"kill everything called slurmd" could hit somebody else's. Every process is started in a new
session; at stop its whole group gets SIGTERM, then SIGKILL, and so do the descendants recorded
before the stop (children that started sessions of their own).

When an engine cannot be started (Debian packages or Python extras absent), :func:`unavailable`
skips the test locally with the reason and fails it under ``CI=true``: CI installs everything
(``.ci/run``), so there a missing engine is a broken machine, never a silent pass. The measured
facts behind the settings (root without systemd, loopback, timings) are in ../shared/ENGINES.md.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TypeVar

import pytest

from .conftest import IN_CI

T = TypeVar("T")

# Bounds of every wait (seconds). Measured on a 2-core machine (ENGINES.md): daemons ready in
# about 1.5 s, worker jobs joined 2-4 s later, a gateway in about 1.3 s; the bounds leave
# room for a loaded machine without letting a broken engine hang the suite.
DAEMON_START_S = 30.0
STOP_S = 10.0

# `sbatch --wait` polls the controller after 2 s, then 8 s, then every 32 s, unless the poll
# interval has reached half of MinJobAge (SLURM's sbatch.c, _job_wait): with SLURM's default
# of 300 s a 15 s job is seen to end after 42 s. 4 s keeps the poll at 2 s and a finished job's
# record for at least two polls; it is the test node's setting, not a site's.
MIN_JOB_AGE_S = 4
# slurmctld and slurmd use fixed ports (one SLURM cluster per machine at a time).
SLURMCTLD_PORT = 6817
SLURMD_PORT = 6818


def unavailable(reason: str) -> NoReturn:
    """Skip (locally) or fail (under ``CI=true``) a test whose engine cannot start."""
    if IN_CI:
        pytest.fail(f"engine unavailable under CI: {reason}")
    pytest.skip(reason)


def require_executables(*names: str, package: str) -> dict[str, str]:
    """Paths of the given programs; :func:`unavailable` naming ``package`` when one is missing."""
    found = {}
    for name in names:
        path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
        if path is None:
            unavailable(f"{name} not found; apt-get install {package}")
        found[name] = path
    return found


def require_modules(*modules: str, extra: str) -> None:
    """:func:`unavailable` when a Python module of an optional extra is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        unavailable(f"{', '.join(missing)} not installed; pip install -e '.[{extra}]'")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], T], timeout: float, what: str, *, interval: float = 0.1,
             alive: Callable[[], None] | None = None) -> T:
    """Poll ``check`` until it returns something truthy; raise after ``timeout`` seconds.

    ``alive`` is called before each poll and raises when a daemon died, so a broken engine
    fails at once with its log instead of after the whole timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            alive()
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def loopback_env(**extra: str) -> dict[str, str]:
    """This process's environment for child processes, with ``extra`` added.

    ``PYTHONPATH`` travels on (so a worktree's sources win in every job, rank and worker), and
    no proxy variables: everything the engines do stays on 127.0.0.1.
    """
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    # The venv's programs (icemap, dask, dask-gateway-server) first, as after `activate`.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "/usr/bin:/bin")])
    env.update(extra)
    return env


# -- processes -------------------------------------------------------------------------------------
@dataclass
class Processes:
    """Processes a test started; :meth:`stop_all` ends them, their groups and descendants."""

    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, name: str, cmd: Sequence[str], *, log: Path, env: Mapping[str, str],
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in a new session (its own process group), output to ``log``."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=dict(env), cwd=cwd, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def check_alive(self, logs: Mapping[str, Path] | None = None) -> None:
        """Raise (with the end of its log) when a process started here has exited."""
        for name, proc in self.procs:
            if proc.poll() is not None:
                tail = ""
                if logs and name in logs and logs[name].exists():
                    tail = logs[name].read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")

    def stop_all(self, extra_pids: Sequence[int] = ()) -> list[str]:
        """SIGTERM every process (group), then SIGKILL what is left; return what needed SIGKILL.

        Descendants are recorded first: some (slurmstepd, the gateway's schedulers and workers)
        run in sessions of their own and would survive a signal to their parent's group.
        """
        import psutil

        targets: dict[int, str] = {}
        for name, proc in self.procs:
            targets[proc.pid] = name
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    targets.setdefault(child.pid, f"{name} child")
        for pid in extra_pids:
            targets.setdefault(pid, "related process")
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        killed = []
        deadline = time.monotonic() + STOP_S
        for pid, name in targets.items():
            try:
                p = psutil.Process(pid)
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except psutil.TimeoutExpired:
                killed.append(f"{name} ({pid})")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(psutil.Error):
                    p.kill()
            except psutil.Error:
                pass  # already gone (or not our child any more and reaped)
        for _, proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_S)
        return killed


def processes_mentioning(text: str) -> list[int]:
    """PIDs of processes whose command line or environment mentions ``text`` (a unique folder).

    How leftovers of an engine are found without matching names: jobs, slurmstepd and gateway
    workers all carry the test's private state folder in their arguments or environment.
    """
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid == os.getpid():
            continue
        try:
            if any(text in a for a in (p.info["cmdline"] or [])) or any(text in v for v in p.environ().values()):
                pids.append(p.pid)
        except psutil.Error:
            continue
    return pids


# -- SLURM -----------------------------------------------------------------------------------------
@dataclass
class Slurm:
    """A running single-node SLURM cluster."""

    folder: Path
    conf: Path
    partition: str
    env: dict[str, str]
    start_s: float

    def run(self, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A SLURM client command (sinfo, squeue, sbatch...) against this cluster."""
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def jobs(self) -> list[str]:
        """Ids of jobs still pending or running."""
        out = self.run("squeue", "--noheader", "--format=%i", check=False).stdout
        return out.split()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.folder.glob("*.log")))


def _slurm_conf(folder: Path, partition: str, cpus: int, memory_mb: int) -> str:
    # Root without systemd or cgroups (ENGINES.md): no cgroup-based plugins, no accounting
    # daemon, no mail. config_overrides: the node may declare more CPUs than the machine has,
    # so a driver job and two worker jobs fit on a 2-core machine (they mostly wait on each other).
    return f"""\
ClusterName=icemap-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={SLURMCTLD_PORT}
SlurmdPort={SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder / 'munge.socket'}
StateSaveLocation={folder / 'state'}
SlurmdSpoolDir={folder / 'spool'}
SlurmctldPidFile={folder / 'slurmctld.pid'}
SlurmdPidFile={folder / 'slurmd.pid'}
SlurmctldLogFile={folder / 'slurmctld.log'}
SlurmdLogFile={folder / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge={MIN_JOB_AGE_S}
KillWait=5
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs={cpus} RealMemory={memory_mb} Gres=gpu:1 State=UNKNOWN
PartitionName={partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@contextlib.contextmanager
def slurm_cluster(folder: Path, *, partition: str, cpus: int = 4, memory_mb: int = 16384) -> Iterator[Slurm]:
    """Start munged, slurmctld and slurmd on 127.0.0.1 with all state in ``folder``.

    Yields once the node is idle (at most :data:`DAEMON_START_S`). On exit every job is
    cancelled, then the daemons and anything left that mentions ``folder`` are stopped.

    Parameters
    ----------
    folder
        An empty folder for configuration, keys, spool, state and logs.
    partition
        The partition's name: the one the recipe under test submits to.
    cpus, memory_mb
        What the node declares (``--cpus-per-task`` and ``--mem`` of jobs must fit).
    """
    exe = require_executables("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scancel",
                              package="slurmctld slurmd slurm-client munge")
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)  # munged refuses keys in folders others can write to
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))  # a private key: no /etc/munge, no clash with a site's
    key.chmod(0o400)
    conf = folder / "slurm.conf"
    conf.write_text(_slurm_conf(folder, partition, cpus, memory_mb))
    (folder / "gres.conf").write_text("NodeName=localhost Name=gpu File=/dev/null\n")  # a fake GPU
    env = loopback_env(SLURM_CONF=str(conf))
    procs = Processes()
    logs = {"munged": folder / "munged.log", "slurmctld": folder / "slurmctld.out",
            "slurmd": folder / "slurmd.out"}
    started = time.monotonic()
    try:
        # --origin: munged would otherwise resolve the host name to stamp credentials.
        procs.start("munged", [exe["munged"], "-F", "--force", f"--socket={folder / 'munge.socket'}",
                               f"--key-file={key}", f"--pid-file={folder / 'munged.pid'}",
                               f"--seed-file={folder / 'munged.seed'}", f"--log-file={folder / 'munged.log'}",
                               "--origin=127.0.0.1"], log=folder / "munged.out", env=env)
        wait_for(lambda: (folder / "munge.socket").exists(), DAEMON_START_S, "munged",
                 alive=lambda: procs.check_alive(logs))
        procs.start("slurmctld", [exe["slurmctld"], "-D", "-i", "-f", str(conf)], log=logs["slurmctld"], env=env)
        procs.start("slurmd", [exe["slurmd"], "-D", "-N", "localhost", "-f", str(conf)], log=logs["slurmd"], env=env)

        def idle() -> bool:
            res = subprocess.run([exe["sinfo"], "--noheader", "--format=%t", "--nodes=localhost"], env=env,
                                 capture_output=True, text=True, timeout=10, check=False)
            return res.stdout.strip() == "idle"

        wait_for(idle, DAEMON_START_S, "the SLURM node to become idle", interval=0.2,
                 alive=lambda: procs.check_alive(logs))
        slurm = Slurm(folder, conf, partition, env, time.monotonic() - started)
        yield slurm
    finally:
        with contextlib.suppress(Exception):
            subprocess.run([exe["scancel"], "--full", "--user=" + _user()], env=env,
                           capture_output=True, timeout=15, check=False)
            wait_for(lambda: not subprocess.run([exe["squeue"], "--noheader"], env=env, capture_output=True,
                                                text=True, timeout=10, check=False).stdout.strip(),
                     STOP_S, "cancelled jobs to end", interval=0.2)
        procs.stop_all(extra_pids=processes_mentioning(str(folder)))
        leftovers = processes_mentioning(str(folder))
        Processes().stop_all(extra_pids=leftovers)


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


# -- dask-gateway ----------------------------------------------------------------------------------
@dataclass
class Gateway:
    """A running dask-gateway-server."""

    url: str
    password: str
    folder: Path
    start_s: float

    def client_env(self) -> dict[str, str]:
        """What a user of this gateway sets: basic auth with the server's password."""
        return loopback_env(DASK_GATEWAY__AUTH__TYPE="basic", DASK_GATEWAY__AUTH__KWARGS__PASSWORD=self.password)

    def log(self) -> str:
        text = (self.folder / "gateway.log").read_text(errors="replace")
        return text[-6000:]


# The part of the server configuration that makes it a loopback test server; everything about
# the clusters (options, commands, GPU profile) comes from the values file's extraConfig, which
# the chart appends to its generated config the same way (keys in sorted order).
_GATEWAY_CONFIG = """\
import yaml

c.DaskGateway.address = "127.0.0.1:0"
c.Proxy.address = "127.0.0.1:{port}"
c.Proxy.tcp_address = "127.0.0.1:{port}"
c.DaskGateway.backend_class = "dask_gateway_server.backends.local.UnsafeLocalBackend"
c.DaskGateway.authenticator_class = "dask_gateway_server.auth.SimpleAuthenticator"
c.SimpleAuthenticator.password = {password!r}
c.LocalClusterConfig.clusters_directory = {clusters!r}
c.DaskGateway.log_level = "INFO"

with open({values!r}) as f:
    _extra = yaml.safe_load(f)["gateway"]["extraConfig"]
for _key in sorted(_extra):
    exec(compile(_extra[_key], "extraConfig." + _key, "exec"))

# Loopback only: the local backend passes workers no --host, so `dask worker` would listen on
# every interface (on Kubernetes each pod has its own). Appended to the commands the values
# file chose, which stay what is tested.
from dask_gateway_server.options import Options as _Options

_LOOPBACK = ["--host", "127.0.0.1"]
c.ClusterConfig.worker_cmd = [*c.ClusterConfig.worker_cmd, *_LOOPBACK]
_options = c.Backend.cluster_options


def _on_loopback(options, user):
    config = dict(_options.get_configuration(dict(options), user))
    if "worker_cmd" in config:
        config["worker_cmd"] = [*config["worker_cmd"], *_LOOPBACK]
    return config


c.Backend.cluster_options = _Options(*_options.fields, handler=_on_loopback)
"""


@contextlib.contextmanager
def gateway_server(folder: Path, values: Path) -> Iterator[Gateway]:
    """Start ``dask-gateway-server`` (local backend) on 127.0.0.1, configured by ``values``.

    ``values`` is a Helm values file whose ``gateway.extraConfig`` snippets are executed by the
    server's own config at start, so what runs is the file itself. Yields once
    ``/api/health`` answers; on exit the server (which stops its clusters) and every process
    mentioning ``folder`` are stopped.
    """
    require_modules("dask_gateway", "dask_gateway_server", "sqlalchemy", extra="test")
    exe = shutil.which("dask-gateway-server", path=str(Path(sys.executable).parent)) or shutil.which(
        "dask-gateway-server")
    if exe is None:
        unavailable("dask-gateway-server not installed; pip install -e '.[test]'")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    password = os.urandom(12).hex()
    config = folder / "dask_gateway_config.py"
    config.write_text(_GATEWAY_CONFIG.format(port=port, password=password, clusters=str(folder / "clusters"),
                                             values=str(values)))
    procs = Processes()
    log = folder / "gateway.log"
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        procs.start("dask-gateway-server", [exe, "-f", str(config)], log=log, env=loopback_env(), cwd=folder)

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(url + "/api/health", timeout=2) as r:
                    return json.loads(r.read()).get("status") == "pass"
            except OSError:
                return False

        wait_for(healthy, DAEMON_START_S, "dask-gateway-server's /api/health", interval=0.2,
                 alive=lambda: procs.check_alive({"dask-gateway-server": log}))
        yield Gateway(url, password, folder, time.monotonic() - started)
    finally:
        procs.stop_all(extra_pids=processes_mentioning(str(folder)))
        Processes().stop_all(extra_pids=processes_mentioning(str(folder)))


# -- Open MPI --------------------------------------------------------------------------------------
def mpi_env(**extra: str) -> dict[str, str]:
    """The environment for ``mpirun`` as root on loopback (shared memory between local ranks).

    Checks first that ``mpirun`` (Debian ``openmpi-bin``) and mpi4py/dask-mpi are there.
    """
    require_executables("mpirun", package="openmpi-bin")
    require_modules("mpi4py", "dask_mpi", extra="test")
    return loopback_env(
        OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_btl="self,vader", OMPI_MCA_btl_tcp_if_include="lo", OMPI_MCA_oob_tcp_if_include="lo",
        OMPI_MCA_rmaps_base_oversubscribe="1",
        **extra,
    )


def run_in_session(cmd: Sequence[str], *, env: Mapping[str, str], cwd: Path, timeout: float,
                   log: Path) -> tuple[int, str]:
    """Run ``cmd`` in its own session; on timeout or error kill its whole group. Returns (rc, output)."""
    procs = Processes()
    proc = procs.start(cmd[0], cmd, log=log, env=env, cwd=cwd)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = -1
    finally:
        # Its process group and descendants only: cwd may hold a running engine's state too.
        procs.stop_all()
    return rc, log.read_text(errors="replace")
