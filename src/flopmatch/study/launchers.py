"""Launchers: how a study's jobs run. Each takes the job list and calls ``on_done(job)`` per finished job.

- :class:`InProcessLauncher`: one after another in this process (the default);
- :class:`LocalWorkersLauncher`: N worker processes on this machine;
- :class:`~flopmatch.study.slurm.SlurmLauncher`: one SLURM job per run, through submitit.

Each also runs the study's phases (``run_phase``: the tokenizer phase, and the timing phase after every
run): in this process for the local launchers (for timing: after every worker has stopped, so the
machine is quiet), as one more job each on SLURM.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from flopmatch.errors import UserError
from flopmatch.files import atomic_write_json
from flopmatch.study.job import run_job
from flopmatch.study.slurm import SlurmConfig, SlurmLauncher


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries (empty without CUDA).

    Read from CUDA_VISIBLE_DEVICES when it is set (a SLURM allocation or the user narrowed it), else counted
    by torch, so a worker pinned to one of them sees it as cuda:0.
    """
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g.strip() for g in given.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def concurrent_runs(workers: int) -> int:
    """How many runs ``workers`` local worker processes advance at full speed at once: one per GPU when each worker
    has its own (several GPUs); on a CPU the workers split the cores (cpu_count // N threads each), so together
    they go about as fast as one run with all of them."""
    gpus = visible_gpus()
    return min(workers, len(gpus)) if len(gpus) > 1 else 1


def nothing_to_check() -> None:
    """The local launchers' preflight: this machine is always there."""


def run_phase_here(job: dict, done: Callable[[], bool], what: str) -> None:
    """The local launchers' phases: run the phase's job in this process."""
    run_job(job)


class InProcessLauncher:
    """Runs jobs one after another in this process (the default; Ctrl-C checkpoints the current run)."""

    name = "in-process"
    attaches = False  # jobs of an earlier study process are not found again (they died with it)
    concurrent = 1  # runs progressing at full speed at once (the time estimate divides the runs stage by it)
    run_phase = staticmethod(run_phase_here)
    check = staticmethod(nothing_to_check)

    def run(self, jobs: list[dict], on_done: Callable[[dict], None]) -> list[str]:
        failed = []
        for job in jobs:
            run_job(job)
            on_done(job)
        return failed


class LocalWorkersLauncher:
    """Runs jobs in N local worker processes (``python -m flopmatch.study.worker JOBFILE``), threads split evenly,
    each worker on its own GPU when the machine has several (CUDA_VISIBLE_DEVICES set per worker slot).

    Each worker gets ``cpu_count // N`` torch threads (at least 1), or ``FLOPMATCH_THREADS`` if that is
    set: oversubscribing cores (N workers x all threads) made training many times slower here.
    A failed job is reported with its log file and does not stop the others.
    """

    name = "local-workers"
    attaches = False
    run_phase = staticmethod(run_phase_here)
    check = staticmethod(nothing_to_check)

    def __init__(self, workers: int, study: Path):
        self.workers, self.study = workers, study
        self.concurrent = concurrent_runs(workers)

    def run(self, jobs: list[dict], on_done: Callable[[dict], None]) -> list[str]:
        threads = int(os.environ.get("FLOPMATCH_THREADS") or max(1, (os.cpu_count() or 1) // self.workers))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), FLOPMATCH_THREADS=str(threads),
                   FLOPMATCH_PARENT_PID=str(os.getpid()))  # workers stop when this process dies
        gpus = visible_gpus()
        pending, running, failed = list(jobs), [], []
        (self.study / "logs").mkdir(parents=True, exist_ok=True)
        try:
            while pending or running:
                while pending and len(running) < self.workers:
                    job = pending.pop(0)
                    path = self.study / "jobs" / f"{job['name']}.json"
                    atomic_write_json(path, job)
                    log = open(self.study / "logs" / f"{job['name']}.log", "a")
                    slot = min(set(range(self.workers)) - {r[3] for r in running})  # a free worker slot
                    worker_env = env
                    if len(gpus) > 1:  # one GPU per worker (round-robin when there are more workers than GPUs)
                        worker_env = dict(env, CUDA_VISIBLE_DEVICES=gpus[slot % len(gpus)])
                    proc = subprocess.Popen([sys.executable, "-m", "flopmatch.study.worker", str(path)], stdout=log,
                                            stderr=subprocess.STDOUT, env=worker_env)
                    running.append((proc, job, log, slot))
                time.sleep(0.5)
                for item in list(running):
                    proc, job, log, _ = item
                    if proc.poll() is not None:
                        running.remove(item)
                        log.close()
                        if proc.returncode == 0:
                            on_done(job)
                        else:
                            failed.append(f"{job['name']} (exit {proc.returncode}; see {self.study / 'logs' / (job['name'] + '.log')})")
        except KeyboardInterrupt:
            for proc, *_ in running:  # workers got the same SIGINT and checkpoint; wait for them
                proc.wait()
            raise
        return failed


def make_launcher(name: str, workers: int, study: Path, slurm: SlurmConfig | None = None):
    """Launcher by name: "local" (in-process when workers == 1, worker processes otherwise) or "slurm"."""
    if name == "local":
        return InProcessLauncher() if workers <= 1 else LocalWorkersLauncher(workers, study)
    if name == "slurm":
        return SlurmLauncher(study, slurm or SlurmConfig())
    raise UserError(f"unknown launcher {name!r}; available: local, slurm")
