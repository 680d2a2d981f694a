"""Launchers: how a study's jobs run. Each takes the job list and calls ``on_done(job)`` per finished job.

- :class:`InProcessLauncher`: one after another in this process (the default);
- :class:`LocalWorkersLauncher`: N worker processes on this machine;
- :class:`~flopmatch.study.slurm.SlurmLauncher`: one SLURM job per run, through submitit.

Each also runs the study's timing phase (``run_timing``): in this process for the local launchers
(after every worker has stopped, so the machine is quiet), as one more job on SLURM.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from flopmatch.errors import UserError
from flopmatch.files import atomic_write_json
from flopmatch.study.job import run_job
from flopmatch.study.slurm import SlurmConfig, SlurmLauncher


def run_timing_here(job: dict, done: Callable[[], bool]) -> None:
    """The local launchers' timing phase: run the timing job in this process (no worker runs now)."""
    run_job(job)


class InProcessLauncher:
    """Runs jobs one after another in this process (the default; Ctrl-C checkpoints the current run)."""

    name = "in-process"
    run_timing = staticmethod(run_timing_here)

    def run(self, jobs: list[dict], on_done: Callable[[dict], None]) -> list[str]:
        failed = []
        for job in jobs:
            run_job(job)
            on_done(job)
        return failed


class LocalWorkersLauncher:
    """Runs jobs in N local worker processes (``python -m flopmatch.study.worker JOBFILE``), threads split evenly.

    Each worker gets ``cpu_count // N`` torch threads (at least 1), or ``FLOPMATCH_THREADS`` if that is
    set: oversubscribing cores (N workers x all threads) made training many times slower here.
    A failed job is reported with its log file and does not stop the others.
    """

    name = "local-workers"
    run_timing = staticmethod(run_timing_here)

    def __init__(self, workers: int, study: Path):
        self.workers, self.study = workers, study

    def run(self, jobs: list[dict], on_done: Callable[[dict], None]) -> list[str]:
        threads = int(os.environ.get("FLOPMATCH_THREADS") or max(1, (os.cpu_count() or 1) // self.workers))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), FLOPMATCH_THREADS=str(threads),
                   FLOPMATCH_PARENT_PID=str(os.getpid()))  # workers stop when this process dies
        pending, running, failed = list(jobs), [], []
        (self.study / "logs").mkdir(parents=True, exist_ok=True)
        try:
            while pending or running:
                while pending and len(running) < self.workers:
                    job = pending.pop(0)
                    path = self.study / "jobs" / f"{job['name']}.json"
                    atomic_write_json(path, job)
                    log = open(self.study / "logs" / f"{job['name']}.log", "a")
                    proc = subprocess.Popen([sys.executable, "-m", "flopmatch.study.worker", str(path)], stdout=log,
                                            stderr=subprocess.STDOUT, env=env)
                    running.append((proc, job, log))
                time.sleep(0.5)
                for item in list(running):
                    proc, job, log = item
                    if proc.poll() is not None:
                        running.remove(item)
                        log.close()
                        if proc.returncode == 0:
                            on_done(job)
                        else:
                            failed.append(f"{job['name']} (exit {proc.returncode}; see {self.study / 'logs' / (job['name'] + '.log')})")
        except KeyboardInterrupt:
            for proc, _, _ in running:  # workers got the same SIGINT and checkpoint; wait for them
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
