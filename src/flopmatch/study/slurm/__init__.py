"""The SLURM launcher: each job of a study (one grid cell's run, and the timing phase) is one SLURM job.

Jobs are submitted through ``submitit`` (it writes the sbatch script, runs the job under srun, and on
preemption or time-out calls :meth:`~flopmatch.study.slurm.worker_job.WorkerJob.checkpoint` and requeues the
job). Inside a job the run itself is an ordinary study worker (``python -m flopmatch.study.worker JOBFILE``;
under torchrun, one process per GPU, when a run has several), so it trains, checkpoints and resumes exactly as it does
locally, and its output goes to ``<study>/logs/<run>.log`` as with ``--workers``.

*State lives in files, not in this process.* The study records every submitted job in
``<study>/slurm/jobs.json`` (run -> job id, job name and submitit folder) and reads a job's outcome
from its run directory (trained and every setting evaluated: :func:`~flopmatch.study.job.job_finished`),
never from SLURM's accounting. So re-running ``flopmatch study`` after the study process died (or after
Ctrl-C) finds jobs still queued or running and waits for them instead of submitting them twice, skips
finished runs, and resubmits runs whose job ended without finishing them (failed, cancelled, timed
out); a resubmitted run resumes from its checkpoint. A job preempted and not requeued (``PreemptMode=CANCEL``, or
a job SLURM may not requeue: state PREEMPTED) is no failure of its run: the running study resubmits it at once
(:func:`~flopmatch.study.slurm.queue.job_outcome`).

*Bounded client calls.* Every SLURM command this process runs has a time limit (sinfo, ``sbatch --test-only``:
:data:`~flopmatch.study.slurm.checks.CHECK_TIMEOUT_S`; squeue: :data:`~flopmatch.study.slurm.queue.SQUEUE_TIMEOUT_S`;
scancel): an unresponsive controller is an error naming the command, never a study hanging for ever. submitit runs
sbatch with none, so :class:`~flopmatch.study.slurm.commands.BoundedExecutor` runs it under coreutils' ``timeout``
(:data:`~flopmatch.study.slurm.commands.SBATCH_TIMEOUT_S`).

*squeue, not sacct.* Which jobs are still alive is asked of ``squeue`` (submitit asks ``sacct``,
which needs the accounting daemon that small clusters, and ``scripts/slurm-local.sh``, do not run).
A job that ``squeue`` no longer lists, or lists in a final state, has ended. A job is this study's only
under the name it was submitted with (``flopmatch-<run>-<hash of the study's path>``): ids are reused.

Security note: submitit pickles the submitted callable (a :class:`~flopmatch.study.slurm.worker_job.WorkerJob`:
paths and counts only) and the job unpickles it at every start, requeues included: ``<folder>/<id>/<id>_submitted.pkl``,
written by this process at submission and rewritten by the job itself when it is requeued
(:meth:`~flopmatch.study.slurm.worker_job.WorkerJob.checkpoint`). Each study process submits into a folder of its own,
``<study>/slurm/<token>/``, so no job can load a pickle left by another process or copied in with the
study directory (submitit moves the pickle into place only after sbatch returned, and a job id seen
before could otherwise start on the old file). ``slurm/`` and those folders are private (mode 0700);
whoever can write the study directory itself could still replace them, as with any code a job runs.
Nothing else from the study directory is executed; job files are JSON.

The modules: ``config`` (:class:`~flopmatch.study.slurm.config.SlurmConfig` and the parsing of its flags),
``worker_job`` (what a job runs), ``queue`` (jobs.json, squeue's states, a job's outcome), ``checks`` (before the
study begins: sinfo, ``sbatch --test-only``), ``logs`` (a job's lines in its run's log: errors, warnings),
``commands`` (bounded sbatch and client calls) and ``launcher``
(:class:`~flopmatch.study.slurm.launcher.SlurmLauncher`). This module re-exports their public names:
``flopmatch.study.slurm.WorkerJob``, say, is how jobs pickled by an older flopmatch name their callable.
"""

from __future__ import annotations

# No module of this package imports torch at import time: flopmatch.files and flopmatch.study.job (they import torch,
# ~2 s) are imported where they are used. Every SLURM job imports this package first, to unpickle its WorkerJob,
# before the worker it starts imports torch itself.
from flopmatch.study.slurm.checks import (
    CHECK_TIMEOUT_S,
    SLURM_COMMANDS,
    check_cluster,
    check_resources,
    node_resources,
    sbatch_test_only,
)
from flopmatch.study.slurm.commands import SBATCH_TIMEOUT_S, TIMED_OUT, BoundedExecutor, bounded
from flopmatch.study.slurm.config import (
    MANAGED,
    SlurmConfig,
    format_slurm_time,
    parse_extra,
    parse_slurm_time,
    partition_names,
)
from flopmatch.study.slurm.launcher import HEARTBEAT_S, MAX_REQUEUES, SlurmLauncher
from flopmatch.study.slurm.logs import EXCEPTION_LINE, failure_line, job_lines, worker_error, worker_warnings
from flopmatch.study.slurm.queue import (
    ALIVE,
    JOBS_FILE,
    NO_ANSWER,
    RESUBMIT,
    SQUEUE_RETRIES,
    SQUEUE_TIMEOUT_S,
    job_outcome,
    read_jobs,
    squeue_jobs,
    squeue_states,
)
from flopmatch.study.slurm.worker_job import CHECKPOINT_WAIT_S, WorkerJob

__all__ = [
    "ALIVE", "BoundedExecutor", "CHECKPOINT_WAIT_S", "CHECK_TIMEOUT_S", "EXCEPTION_LINE", "HEARTBEAT_S", "JOBS_FILE",
    "MANAGED", "MAX_REQUEUES", "NO_ANSWER", "RESUBMIT", "SBATCH_TIMEOUT_S", "SLURM_COMMANDS", "SQUEUE_RETRIES",
    "SQUEUE_TIMEOUT_S", "SlurmConfig", "SlurmLauncher", "TIMED_OUT", "WorkerJob", "bounded", "check_cluster",
    "check_resources", "failure_line", "format_slurm_time", "job_lines", "job_outcome", "node_resources",
    "parse_extra", "parse_slurm_time", "partition_names", "read_jobs", "sbatch_test_only", "squeue_jobs",
    "squeue_states", "worker_error", "worker_warnings",
]
