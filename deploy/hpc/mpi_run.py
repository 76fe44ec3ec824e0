#!/usr/bin/env python3
"""Run icemap commands on a Dask cluster made of the ranks of one MPI job (dask-mpi).

For sites that schedule MPI jobs (a fixed allocation, launched by ``mpirun`` or ``srun``)
rather than letting a driver submit worker jobs (``slurm_cluster.py``). Every rank runs this
script: rank 0 becomes the Dask scheduler, rank 1 runs the icemap commands, the other ranks
are workers. The last ``--gpu-ranks`` workers advertise the Dask resource ``GPU=1`` (one thread
each), so U-Net inference runs on them and reading/NDSI on the others. When the commands end,
rank 1 stops the scheduler and every rank exits; the job's exit status is the commands'.

Usage (see ``icemap-region-mpi.sbatch``)::

    mpirun -np 8 python deploy/hpc/mpi_run.py --interface ib0 --nthreads 4 --gpu-ranks 2 -- \\
        icemap ingest --catalog https://... --out /scratch/$USER/andes.zarr -- \\
        icemap map --cube /scratch/$USER/andes.zarr --method unet --model unet-b3b6 --out ...

Each command after ``--`` gets ``--scheduler <address>`` appended, as with
``slurm_cluster.py``. ``-np`` must be at least 3 (scheduler, client, one worker).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

# The commands are run exactly as slurm_cluster.py runs them (one module, one behaviour).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import run_commands, split_commands


def worker_options(rank: int, size: int, gpu_ranks: int, nthreads: int) -> tuple[int, dict[str, object]]:
    """Threads and extra ``Worker`` options of ``rank``: the last ``gpu_ranks`` ranks are GPU workers.

    One thread per GPU worker: a GPU is driven by one thread; more only queue kernels and
    multiply device memory use (the same choice as the GPU jobs of ``slurm_cluster.py``).
    """
    if gpu_ranks and rank >= size - gpu_ranks:
        return 1, {"resources": {"GPU": 1}}
    return nthreads, {}


def apply_nanny_environment() -> None:
    """Set the variables dask's nanny sets in the worker processes it starts.

    MPI ranks have no nanny (MPI owns the processes), so without this a worker rank would let
    torch and BLAS use every core in each of its threads (``OMP_NUM_THREADS`` unset), unlike
    the workers of every other recipe: slower from oversubscription, and U-Net probabilities
    that differ in the last bits (float sums in another order). ``MALLOC_TRIM_THRESHOLD_`` is
    left out as in icemap's own clusters (it costs torch about 1.7x in speed).
    """
    import os

    import dask
    import distributed  # noqa: F401  (loads distributed's config defaults)

    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), "MALLOC_TRIM_THRESHOLD_": None}
    for key, value in environ.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = str(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interface", help="network interface of scheduler and workers (e.g. ib0; default: dask's)")
    parser.add_argument("--nthreads", type=int, default=1, help="threads per CPU worker rank (default 1)")
    parser.add_argument("--gpu-ranks", type=int, default=0, help="worker ranks advertising GPU=1 (default 0)")
    parser.add_argument("--memory-limit", default="auto", help="memory limit per worker (default: auto)")
    parser.add_argument("--local-directory", default=None, help="worker scratch folder (default: dask's)")
    parser.add_argument("--dashboard-address", default="127.0.0.1:8787",
                        help="scheduler dashboard (default 127.0.0.1:8787: loopback of rank 0's node)")
    parser.add_argument("--worker-timeout", type=float, default=120.0,
                        help="seconds to wait for every worker rank to join (default 120)")
    args, rest = parser.parse_known_args(argv)
    commands = split_commands(rest)
    if not commands:
        parser.error("give the icemap command(s) to run after --")

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size < 3:
        parser.error(f"needs at least 3 MPI ranks (scheduler, client, a worker); got {size}")
    if args.gpu_ranks > size - 2:
        parser.error(f"--gpu-ranks {args.gpu_ranks} > the {size - 2} worker ranks")

    import dask_mpi

    nthreads, options = worker_options(rank, size, args.gpu_ranks, args.nthreads)
    if rank >= 2:
        apply_nanny_environment()
    # Returns only on rank 1; the scheduler and worker ranks run until rank 1 finishes, then
    # exit (exit=True). nanny=False: MPI owns the processes, a nanny could not restart a rank.
    dask_mpi.initialize(interface=args.interface, nthreads=nthreads, memory_limit=args.memory_limit,
                        local_directory=args.local_directory, nanny=False,
                        dashboard_address=args.dashboard_address, worker_options=options, comm=comm)

    from distributed import Client

    with Client() as client:  # initialize() put the scheduler's address in the dask config
        client.wait_for_workers(size - 2, timeout=args.worker_timeout)
        print(f"scheduler {client.scheduler.address}; {size - 2} worker ranks ({args.gpu_ranks} GPU)", flush=True)
        return run_commands(commands, client.scheduler.address)


if __name__ == "__main__":
    sys.exit(main())
