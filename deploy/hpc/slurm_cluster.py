#!/usr/bin/env python3
"""Run icemap commands on a SLURM cluster: CPU worker jobs plus optional GPU worker jobs.

dask-jobqueue submits one SLURM job per Dask worker and runs the scheduler in this process, so
start this on a login node (or inside a small, long-running "driver" job, see
``icemap-region.sbatch``). CPU jobs take their settings from the ``jobqueue.slurm`` section of
the Dask config (``deploy/hpc/jobqueue.yaml``); GPU jobs are the same plus
``--gres=gpu:1`` and ``dask worker --resources GPU=1``, which icemap's inference tasks request.
Both kinds join one scheduler, so reading and NDSI run on CPU jobs and the U-Net on GPU jobs.

Usage::

    python deploy/hpc/slurm_cluster.py --cpu-jobs 8 --gpu-jobs 2 -- \\
        icemap ingest --catalog https://... --bbox ... --out /scratch/$USER/andes.zarr
    python deploy/hpc/slurm_cluster.py --dry-run --gpu-jobs 1      # print the job scripts

Site settings (partition, cores, memory, network interface) live in ``jobqueue.yaml`` or, per
run, in ``DASK_JOBQUEUE__SLURM__*`` environment variables (``DASK_JOBQUEUE__SLURM__INTERFACE=ib0``).

Each command after ``--`` is run once the first workers have joined, with
``--scheduler <address>`` appended; several commands are separated by ``--`` too. The jobs are
cancelled when this script ends (also on Ctrl-C): a rerun resumes where the stores stopped.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

# What turns a CPU worker job into a GPU one. One process and one thread per GPU: a GPU is
# driven by one thread; more only queue kernels and multiply device memory use.
GPU_JOB_OPTIONS: dict[str, Any] = {
    "processes": 1,
    "job_extra_directives": ["--gres=gpu:1"],
    "worker_extra_args": ["--resources", "GPU=1", "--nthreads", "1"],
}


def gpu_options(base: dict[str, Any], gpu_partition: str | None = None) -> dict[str, Any]:
    """The job options of a GPU worker job: the CPU template plus :data:`GPU_JOB_OPTIONS`.

    The lists are extended, not replaced: a site's ``job-extra-directives`` and
    ``worker-extra-args`` (from ``jobqueue.yaml`` when the template does not carry them) apply to
    GPU jobs too.
    """
    import dask

    opts = {**base, **GPU_JOB_OPTIONS}
    for key in ("job_extra_directives", "worker_extra_args"):
        configured = base.get(key)
        if configured is None:
            configured = dask.config.get(f"jobqueue.slurm.{key}", None)
        opts[key] = [*(configured or []), *GPU_JOB_OPTIONS[key]]
    if gpu_partition:
        opts["queue"] = gpu_partition
    return opts


def start_cluster(cpu_jobs: int, gpu_jobs: int, gpu_partition: str | None = None, **kwargs: Any) -> Any:
    """A SLURMCluster with ``cpu_jobs`` CPU worker jobs and ``gpu_jobs`` GPU worker jobs.

    GPU jobs are added to the cluster's worker specification under their own names, so the
    SpecCluster machinery submits, tracks and cancels them like the CPU ones (``scale`` and
    ``adapt`` only manage the CPU template; do not call them after this).
    """
    from dask_jobqueue import SLURMCluster

    cluster = SLURMCluster(**kwargs)
    cluster.scale(jobs=cpu_jobs)
    base = dict(cluster.new_spec["options"])
    for i in range(gpu_jobs):
        cluster.worker_spec[f"gpu-{i}"] = {"cls": cluster.job_cls, "options": gpu_options(base, gpu_partition)}
    if gpu_jobs:
        cluster.sync(cluster._correct_state)
    return cluster


def job_scripts(gpu_partition: str | None = None, **kwargs: Any) -> tuple[str, str]:
    """The CPU and GPU job scripts this would submit (nothing is submitted)."""
    from dask_jobqueue import SLURMCluster

    with SLURMCluster(**kwargs) as cluster:
        cpu = cluster.job_script()
        job = cluster.job_cls(scheduler=cluster.scheduler_address, name="gpu-0",
                              **gpu_options(dict(cluster.new_spec["options"]), gpu_partition))
        return cpu, job.job_script()


def split_commands(argv: Sequence[str]) -> list[list[str]]:
    """The commands in ``argv``, separated by ``--`` (empty ones dropped)."""
    commands: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--":
            commands.append([])
        else:
            commands[-1].append(arg)
    return [c for c in commands if c]


def run_commands(commands: Sequence[Sequence[str]], scheduler_address: str) -> int:
    """Run each command with ``--scheduler <address>`` appended; stop at the first failure.

    Shared with ``mpi_run.py``: whatever started the workers, the icemap commands are run the
    same way, as separate processes that connect to the scheduler.
    """
    for cmd in commands:
        full = [*cmd, "--scheduler", scheduler_address]
        print("+", shlex.join(full), flush=True)
        rc = subprocess.call(full)
        if rc != 0:
            return rc
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-jobs", type=int, default=4, help="CPU worker jobs (default 4)")
    parser.add_argument("--gpu-jobs", type=int, default=0, help="GPU worker jobs (default 0)")
    parser.add_argument("--gpu-partition", help="SLURM partition of GPU jobs (default: the CPU one)")
    parser.add_argument("--wait-workers", type=int, default=1, help="workers to wait for before running")
    parser.add_argument("--worker-timeout", type=float, default=None,
                        help="give up (exit 3) when --wait-workers have not joined after this many seconds "
                             "(default: wait as long as the queue takes)")
    parser.add_argument("--dry-run", action="store_true", help="print the job scripts and exit")
    args, rest = parser.parse_known_args(argv)
    if args.dry_run:
        cpu, gpu = job_scripts(args.gpu_partition)
        print("# --- CPU worker job ---\n" + cpu + "\n# --- GPU worker job ---\n" + gpu)
        return 0
    commands = split_commands(rest)
    if not commands:
        parser.error("give the icemap command(s) to run after --")
    from distributed import Client

    # SLURM ends a job (scancel, time limit, requeue) with SIGTERM; leave through the context
    # managers so the worker jobs are cancelled too instead of idling until their walltime.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with start_cluster(args.cpu_jobs, args.gpu_jobs, args.gpu_partition) as cluster, Client(cluster) as client:
        try:
            client.wait_for_workers(args.wait_workers, timeout=args.worker_timeout)
        except TimeoutError:
            # Pending jobs are cancelled on the way out (the cluster's context manager).
            print(f"slurm_cluster.py: {args.wait_workers} worker(s) did not join within {args.worker_timeout:g} s; "
                  "check `squeue` and the job logs (log-directory in jobqueue.yaml)", file=sys.stderr, flush=True)
            return 3
        print(f"scheduler {cluster.scheduler_address}; {args.cpu_jobs} CPU + {args.gpu_jobs} GPU jobs", flush=True)
        return run_commands(commands, cluster.scheduler_address)


if __name__ == "__main__":
    sys.exit(main())
