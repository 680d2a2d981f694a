"""What a SLURM job runs: :class:`WorkerJob`, the study worker for one job file, which submitit pickles at
submission and the job unpickles at every start (requeues included).

Jobs pickled by an older flopmatch name it ``flopmatch.study.slurm.WorkerJob``: the package re-exports it. This
module imports no torch (the worker it starts does): a job imports it first, to unpickle its WorkerJob.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import submitit

CHECKPOINT_WAIT_S = 60  # how long a job given SLURM's time-out/preemption signal waits for the run's checkpoint


class WorkerJob:
    """What a SLURM job runs: the study worker for one job file, as a subprocess (under torchrun for > 1 GPU).

    A subprocess, not a call in the job's own process, so that :meth:`checkpoint` (which submitit calls
    in this process on SLURM's time-out/preemption signal) can ask the run to checkpoint (SIGINT, like
    Ctrl-C) and wait for it before the job is requeued.
    """

    def __init__(self, job_file: str, log_file: str, procs: int, threads: int):
        self.job_file, self.log_file, self.procs, self.threads = job_file, log_file, procs, threads
        self._proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        """The worker's command line: plain Python for one process, torchrun for several."""
        worker = ["-m", "flopmatch.study.worker", self.job_file]
        if self.procs <= 1:
            return [sys.executable, *worker]
        # --log-dir /dev/null: torchrun's own per-attempt log folders would otherwise be left in the node's /tmp
        # (torchelastic_*, one per job, never removed); the workers' output goes to the job's log file either way.
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.procs}",
                f"--log-dir={os.devnull}", *worker]

    def __call__(self) -> None:
        threads = os.environ.get("FLOPMATCH_THREADS") or str(max(1, self.threads // max(1, self.procs)))
        env = dict(os.environ, OMP_NUM_THREADS=threads, FLOPMATCH_THREADS=threads)
        with open(self.log_file, "a") as log:
            log.write(f"[slurm] job {os.environ.get('SLURM_JOB_ID', '?')} on {os.uname().nodename}: {' '.join(self.command())}\n")
            log.flush()
            # SLURM signals time-out/preemption (USR2) to every process of the job; the worker must not die of it:
            # only this process acts on it (checkpoint() below). An ignored signal stays ignored across exec.
            self._proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                          preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))
            # poll, not wait(): checkpoint() runs as a signal handler inside this loop and must be able to wait
            # itself (Popen.wait holds a non-reentrant lock)
            while (rc := self._proc.poll()) is None:
                time.sleep(1.0)
        self._proc = None
        if rc != 0:
            raise RuntimeError(f"the worker exited with status {rc}; see {self.log_file}")

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """On time-out or preemption: let the run checkpoint (SIGINT), then requeue this same job (it resumes)."""
        proc, self._proc = self._proc, None  # a Popen cannot be pickled into the requeued submission
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=CHECKPOINT_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()  # the run resumes from its previous checkpoint instead
        # The worker's own interruption line says "re-run the same command to resume", which is true of Ctrl-C but
        # not here: say so in the log, next to it
        with open(self.log_file, "a") as log:
            log.write(f"[slurm] job {os.environ.get('SLURM_JOB_ID', '?')}: stopped for SLURM's time-out or preemption "
                      f"signal; the job is requeued and resumes the run by itself (nothing to re-run)\n")
        return submitit.helpers.DelayedSubmission(self)
