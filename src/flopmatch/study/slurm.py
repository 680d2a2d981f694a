"""The SLURM launcher: each job of a study (one grid cell's run, and the timing phase) is one SLURM job.

Jobs are submitted through ``submitit`` (it writes the sbatch script, runs the job under srun, and on
preemption or time-out calls :meth:`WorkerJob.checkpoint` and requeues the job). Inside a job the run
itself is an ordinary study worker (``python -m flopmatch.study.worker JOBFILE``; under torchrun, one
process per GPU, when a run has several), so it trains, checkpoints and resumes exactly as it does
locally, and its output goes to ``<study>/logs/<run>.log`` as with ``--workers``.

*State lives in files, not in this process.* The study records every submitted job in
``<study>/slurm/jobs.json`` (run -> job id, job name and submitit folder) and reads a job's outcome
from its run directory (trained and every setting evaluated: :func:`~flopmatch.study.job.job_finished`),
never from SLURM's accounting. So re-running ``flopmatch study`` after the study process died (or after
Ctrl-C) finds jobs still queued or running and waits for them instead of submitting them twice, skips
finished runs, and resubmits runs whose job ended without finishing them (failed, cancelled, timed
out); a resubmitted run resumes from its checkpoint. A job preempted and not requeued (``PreemptMode=CANCEL``, or
a job SLURM may not requeue: state PREEMPTED) is no failure of its run: the running study resubmits it at once
(:func:`job_outcome`).

*Bounded client calls.* Every SLURM command this process runs has a time limit (sinfo, ``sbatch --test-only``:
:data:`CHECK_TIMEOUT_S`; squeue: :data:`SQUEUE_TIMEOUT_S`; scancel): an unresponsive controller is an error
naming the command, never a study hanging for ever. submitit runs sbatch with none, so :class:`BoundedExecutor`
runs it under coreutils' ``timeout`` (:data:`SBATCH_TIMEOUT_S`).

*squeue, not sacct.* Which jobs are still alive is asked of ``squeue`` (submitit asks ``sacct``,
which needs the accounting daemon that small clusters, and ``scripts/slurm-local.sh``, do not run).
A job that ``squeue`` no longer lists, or lists in a final state, has ended. A job is this study's only
under the name it was submitted with (``flopmatch-<run>-<hash of the study's path>``): ids are reused.

Security note: submitit pickles the submitted callable (a :class:`WorkerJob`: paths and counts only)
and the job unpickles it at every start, requeues included: ``<folder>/<id>/<id>_submitted.pkl``,
written by this process at submission and rewritten by the job itself when it is requeued
(:meth:`WorkerJob.checkpoint`). Each study process submits into a folder of its own,
``<study>/slurm/<token>/``, so no job can load a pickle left by another process or copied in with the
study directory (submitit moves the pickle into place only after sbatch returned, and a job id seen
before could otherwise start on the old file). ``slurm/`` and those folders are private (mode 0700);
whoever can write the study directory itself could still replace them, as with any code a job runs.
Nothing else from the study directory is executed; job files are JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from flopmatch.errors import UserError

# Not here: flopmatch.files and flopmatch.study.job (they import torch, ~2 s). Every SLURM job imports this module
# first, to unpickle its WorkerJob, before the worker it starts imports torch itself: imported where they are used.

NO_ANSWER = "NO ANSWER"  # squeue_jobs' state of a job while squeue fails: counted alive, shown as such
# squeue states of a job that has not ended. Not PREEMPTED: that state is final (a job SLURM requeues on preemption
# reads COMPLETING, then PENDING or REQUEUED, never PREEMPTED; checked against slurm 22.05's PreemptMode=REQUEUE)
ALIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
         "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", NO_ANSWER}
# final states of a job stopped for others' sake or by its node, not through its run's fault, and what the study
# says of them: the run is submitted again (resuming from its checkpoint), as SLURM itself would have requeued it
# (PreemptMode=REQUEUE; JobRequeue=1 with --requeue for a failed node, where the site allows it)
RESUBMIT = {"PREEMPTED": "was preempted (not requeued by SLURM)", "NODE_FAIL": "ended when its node failed",
            "BOOT_FAIL": "never started: its node failed to boot"}
JOBS_FILE = "jobs.json"  # in <study>/slurm/: run name -> {"id", "job_name", "folder"} of its latest submission
SQUEUE_RETRIES = 5  # consecutive failed (or timed-out) squeue calls before the study gives up waiting (jobs keep running)
SQUEUE_TIMEOUT_S = 60
# sbatch answers in well under a second; longer only from a controller too busy to queue a study on (each try waits up
# to its MessageTimeout, 10 s by default, and sbatch retries while told "try again"). A job the controller registers
# after the limit (seen on scripts/slurm-local.sh's cluster) finds no pickle, which submitit moves into place only
# after sbatch returned: it waits a minute for one, then exits, no work done.
SBATCH_TIMEOUT_S = 120
CHECK_TIMEOUT_S = 30  # sinfo and sbatch --test-only before the study begins
TIMED_OUT = {124, 137}  # coreutils timeout's exit status when it stopped the command (137: it had to SIGKILL it)
_failures: list[int] = []  # consecutive squeue failures so far
CHECKPOINT_WAIT_S = 60  # how long a job given SLURM's time-out/preemption signal waits for the run's checkpoint
MAX_REQUEUES = 100  # time-outs a job is requeued after (submitit's max_num_timeout); also the most times one study
# process resubmits a run whose job was preempted or lost its node (RESUBMIT): a run stopped more often is a failure
# what the launcher needs on PATH: sinfo/squeue/sbatch here, srun (submitit runs the job under it) and scontrol
# (submitit requeues through it, inside the job; a login node without it has a broken client install)
SLURM_COMMANDS = ("sinfo", "sbatch", "squeue", "srun", "scontrol")
HEARTBEAT_S = 300  # with no change of state, a line with the running runs' steps at most this often
# sbatch options --slurm-extra may not set: flopmatch sets them (a flag of its own says which) or relies on them
MANAGED = {"time": "--slurm-time", "partition": "--partition", "account": "--slurm-account", "mem": "--slurm-mem-gb",
           "qos": "--slurm-qos", "constraint": "--slurm-constraint", "cpus-per-task": "--cpus-per-run",
           "gpus-per-node": "--gpus-per-run", "gpus": "--gpus-per-run", "job-name": None, "output": None, "error": None,
           "open-mode": None, "signal": None, "array": None, "nodes": None, "ntasks": None, "ntasks-per-node": None,
           # other spellings of the GPUs, memory and requeueing flopmatch sets: two would contradict each other
           "gres": "--gpus-per-run", "gpus-per-task": "--gpus-per-run", "mem-per-cpu": "--slurm-mem-gb",
           "mem-per-gpu": "--slurm-mem-gb",
           "no-requeue": None,  # a preempted or timed-out job is requeued (submitit's checkpoint), never dropped
           "exclusive": "--slurm-timing-exclusive (the timing job; runs share nodes)"}
# the last line of a Python traceback: "RuntimeError: ...", "torch.OutOfMemoryError: ...", "KeyError: 'x'"
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b(:.*)?$")


@dataclass
class SlurmConfig:
    """Where and how a study's jobs run on SLURM (``flopmatch study --launcher slurm``)."""

    partition: str | None = None  # None: the cluster's default; "a,b": the first listed that can run a job
    gpus_per_run: int = 1  # GPUs per job; > 1 runs the worker under torchrun, one process per GPU; 0 = CPU only
    cpus_per_run: int = 8  # CPU cores per job (the worker's torch threads, split over its processes)
    time_min: int = 240  # job time limit in minutes; on reaching it the run checkpoints and the job is requeued
    account: str | None = None
    mem_gb: int | None = None  # None: the partition's default
    poll_s: float = 10.0  # seconds between squeue polls
    qos: str | None = None  # sbatch --qos
    constraint: str | None = None  # sbatch --constraint (node features, e.g. a GPU type)
    setup: list[str] = field(default_factory=list)  # shell lines the job script runs first (module load, conda activate)
    extra: dict[str, str | bool] = field(default_factory=dict)  # other sbatch options; True: a flag without a value
    timing_exclusive: bool = True  # the timing phase's job alone on its node (sbatch --exclusive): quiet timings


def _minutes(text: str) -> int:
    """Minutes in a SLURM time string (seconds round up); ValueError when it is not one."""
    days, dash, rest = text.strip().rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    d = int(days) if dash else 0
    if any(p < 0 for p in parts) or d < 0 or not 1 <= len(parts) <= 3:
        raise ValueError(text)
    if dash:  # D-HH[:MM[:SS]]
        h, m, s = (parts + [0, 0])[:3]
    else:  # MM, MM:SS, HH:MM:SS
        h, m, s = ([0] * (3 - len(parts)) + parts) if len(parts) == 3 else (0, parts[0], parts[1] if len(parts) > 1 else 0)
    return d * 1440 + h * 60 + m + (1 if s else 0)


def parse_slurm_time(text: str) -> int:
    """Minutes in a SLURM time string: ``MM``, ``HH:MM:SS``, ``MM:SS``, ``D-HH``, ``D-HH:MM`` or ``D-HH:MM:SS``."""
    try:
        minutes = _minutes(text)
    except ValueError:
        raise UserError(f"--slurm-time {text!r} is not a SLURM time: use minutes, HH:MM:SS or D-HH:MM:SS") from None
    if minutes < 1:
        raise UserError(f"--slurm-time {text!r} is shorter than a minute")
    return minutes


def format_slurm_time(minutes: int) -> str:
    """``minutes`` as SLURM writes a time limit: ``H:MM:00`` or ``D-HH:MM:00``."""
    d, rest = divmod(minutes, 1440)
    return f"{d}-{rest // 60:02d}:{rest % 60:02d}:00" if d else f"{rest // 60}:{rest % 60:02d}:00"


def parse_extra(items: list[str]) -> dict[str, str | bool]:
    """``--slurm-extra`` values, ``KEY=VALUE`` or a bare ``KEY`` (a flag such as ``requeue``), as sbatch options for
    submitit's ``additional_parameters``; an option flopmatch sets or relies on is refused, naming its own flag."""
    extra: dict[str, str | bool] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().lstrip("-").replace("_", "-")
        if not re.fullmatch(r"[a-z][a-z0-9-]*", key) or (eq and not value.strip()):
            raise UserError(f"--slurm-extra {item!r}: expected an sbatch option as KEY=VALUE (e.g. reservation=r1) or "
                            f"a bare KEY for a flag")
        if key in MANAGED:
            how = f"use {MANAGED[key]}" if MANAGED[key] else "flopmatch sets it for every job"
            raise UserError(f"--slurm-extra {item!r}: {how}")
        extra[key] = value.strip() if eq else True
    return extra


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


def squeue_jobs(job_ids: list[str], names: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """SLURM state and squeue's reason (``%r``: ``Resources``, ``Priority``, ``PartitionTimeLimit``, ... or
    ``None``) of each of ``job_ids`` that squeue still lists (ended jobs drop out after MinJobAge).

    ``names`` (job id -> the job name it was submitted under): a listed job of another name is left out, as ended. A
    recorded id can name someone else's job once the cluster's ids were reset or wrapped, or the study was moved to
    another cluster; the study must not wait on that job as its own. While squeue fails or times out (a busy
    controller) every job reads :data:`NO_ANSWER`; after :data:`SQUEUE_RETRIES` such calls in a row, a UserError.
    """
    if not job_ids:
        return {}
    try:
        out = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i|%T|%j|%r", "--user", str(os.getuid())],
                             capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S)
    except FileNotFoundError:
        raise UserError("squeue not found: the slurm launcher needs the SLURM client commands on this machine "
                        "(or use --launcher local)") from None
    except subprocess.TimeoutExpired:
        why = f"no answer within {SQUEUE_TIMEOUT_S} s"
    else:
        text = (out.stderr or out.stdout).strip()
        why = None if out.returncode == 0 else (text.splitlines()[-1] if text else f"exit {out.returncode}")
    if why is not None:
        _failures.append(1)
        if len(_failures) < SQUEUE_RETRIES:  # a busy controller ("Socket timed out"): assume alive, ask again
            return {j: (NO_ANSWER, "None") for j in job_ids}
        _failures.clear()
        raise UserError(f"squeue failed {SQUEUE_RETRIES} times in a row ({why})")
    _failures.clear()
    wanted, jobs = set(job_ids), {}
    for line in out.stdout.splitlines():
        jid, _, rest = line.strip().partition("|")
        state, _, rest = rest.partition("|")
        name, _, reason = rest.rpartition("|")
        if jid in wanted and (names is None or jid not in names or name == names[jid]):
            jobs[jid] = (state.split()[0] if state else "UNKNOWN", reason.strip() or "None")
    return jobs


def squeue_states(job_ids: list[str], names: dict[str, str] | None = None) -> dict[str, str]:
    """SLURM state of each of ``job_ids`` that squeue still lists: :func:`squeue_jobs` without the reasons."""
    return {jid: state for jid, (state, _) in squeue_jobs(job_ids, names).items()}


def job_outcome(state: str | None, finished: Callable[[], bool], attached: bool = False) -> str:
    """What the study does about a job it watches, squeue's ``state`` of it (None: no longer listed, so ended):
    ``"wait"`` while it has not ended; ``"done"`` when its run is finished (``finished()``, asked of the run directory
    only then: the exit status is not trusted, a requeued job's first start exits non-zero); ``"resubmit"`` when it
    ended with work left through no fault of its run (preempted and not requeued, or its node failed: :data:`RESUBMIT`), or was submitted
    by an earlier study process (``attached``) and not cancelled (it ran an older description: settings added since);
    else ``"failed"``."""
    if state in ALIVE:
        return "wait"
    if finished():
        return "done"
    if state in RESUBMIT or (attached and state != "CANCELLED"):
        # (one the user cancelled is a failure, as for this process's jobs, while squeue still lists it: MinJobAge,
        # 300 s by default; without sacct, one that left the queue reads as ended)
        return "resubmit"
    return "failed"


def node_resources(sinfo: str, partition: str | None) -> dict | None:
    """The most CPUs, GPUs and memory (MB) one node of ``partition`` (None: the default one, starred) offers, and the
    partition's time limit in minutes (None: none, or not known), from ``sinfo --format=%P|%c|%G|%m|%l`` lines (one
    per group of alike nodes; without ``%l``, four fields); None when the partition is not listed."""
    cpus = gpus = mem = 0
    limit: int | None = None
    found = False
    for line in sinfo.splitlines():
        fields = line.strip().split("|")
        if len(fields) not in (4, 5):
            continue
        name, c, gres, m = fields[:4]
        if (name.rstrip("*") != partition) if partition else not name.endswith("*"):
            continue
        found = True
        cpus = max(cpus, int(c) if c.isdigit() else 0)  # "64+" (a minimum, without --exact): unknown, not checked
        mem = max(mem, int(m) if m.isdigit() else 0)
        # GRES like "gpu:4", "gpu:a100:8(S:0-1)", "gpu:2,mps:200" or "(null)"
        gpus = max(gpus, sum(int(n) for n in re.findall(r"\bgpu(?::[^:,(]+)?:(\d+)", gres)))
        if len(fields) == 5:  # "infinite", "UNLIMITED", "n/a": no limit to check
            try:
                limit = _minutes(fields[4])
            except ValueError:
                pass
    return {"cpus": cpus, "gpus": gpus, "mem_mb": mem, "time_min": limit} if found else None


def partition_names(partition: str | None) -> list[str]:
    """The partitions of ``--partition``: one name, or a comma-separated list (sbatch starts the job in the first
    listed that can run it); [] for the cluster's default partition."""
    if not partition:
        return []
    names = [name.strip() for name in partition.split(",")]
    if not all(names):
        raise UserError(f"--partition {partition!r}: an empty name in the list; give partitions as a,b")
    return list(dict.fromkeys(names))


def _problems(cfg: SlurmConfig, nodes: dict, where: str) -> list[tuple[str, str]]:
    """Why no node of a partition (``nodes``: :func:`node_resources`; ``where``: its name for the message) could run
    the jobs: (reason, fix) pairs; [] when one could."""
    problems = []
    if cfg.gpus_per_run > nodes["gpus"]:
        have = f"at most {nodes['gpus']} GPUs" if nodes["gpus"] else "no GPUs"
        fix = f"--gpus-per-run {nodes['gpus']}" + ("" if nodes["gpus"] else " to train on CPUs")
        problems.append((f"--gpus-per-run {cfg.gpus_per_run}: the nodes of {where} have {have} (sinfo)",
                         f"use {fix}, or another --partition"))
    if nodes["cpus"] and cfg.cpus_per_run > nodes["cpus"]:
        problems.append((f"--cpus-per-run {cfg.cpus_per_run}: the nodes of {where} have at most {nodes['cpus']} CPUs "
                         f"(sinfo)", f"use --cpus-per-run {nodes['cpus']} or fewer, or another --partition"))
    if cfg.mem_gb and nodes["mem_mb"] and cfg.mem_gb * 1024 > nodes["mem_mb"]:
        problems.append((f"--slurm-mem-gb {cfg.mem_gb}: the nodes of {where} have at most {nodes['mem_mb'] // 1024} "
                         f"GB (sinfo)", "ask for less, or another --partition"))
    # SLURM queues such a job anyway (EnforcePartLimits=NO, its default) and it pends for ever (PartitionTimeLimit)
    if nodes["time_min"] is not None and cfg.time_min > nodes["time_min"]:
        limit = format_slurm_time(nodes["time_min"])
        problems.append((f"--slurm-time {format_slurm_time(cfg.time_min)} exceeds the time limit of {where}, {limit} "
                         f"(sinfo)", f"use --slurm-time {limit} or less (a run that reaches it checkpoints and is "
                                     f"requeued)"))
    return problems


def check_resources(cfg: SlurmConfig, sinfo: str) -> list[str]:
    """Refuse a job no node of the partition could run (it would wait in the queue for ever, or sbatch refuses it
    after the study has begun): more GPUs, CPUs or memory per run than one node has, or a ``--slurm-time`` above the
    partition's time limit; refuse a partition ``sinfo`` (``--format=%P|%c|%G|%m|%l``) does not list. Every problem
    in one message, so that one corrected command suffices.

    A list of partitions (``--partition a,b``) is refused only when none of them could run the jobs, naming each and
    why; the ``[study] warning:`` lines returned say which listed partitions could not (their jobs start in another).
    """
    names = partition_names(cfg.partition)
    unknown = [name for name in names if node_resources(sinfo, name) is None]
    if unknown:
        raise UserError(f"SLURM has no partition {', '.join(map(repr, unknown))}; `sinfo` lists them")
    found: dict[str, list[tuple[str, str]]] = {}
    for name in names or [None]:
        nodes = node_resources(sinfo, name)
        if nodes is None:
            return []  # no default partition marked: SLURM decides
        found[name] = _problems(cfg, nodes, f"partition {name!r}" if name else "the default partition")
    usable = [name for name, problems in found.items() if not problems]
    if len(found) == 1 and not usable:  # one partition: each problem with its fix
        raise UserError("; ".join(f"{why}; {fix}" for why, fix in next(iter(found.values()))))
    if not usable:
        raise UserError(f"no partition of --partition {','.join(names)} can run these jobs: "
                        + "; ".join(why for problems in found.values() for why, _ in problems)
                        + ". Ask for less, or list a partition that can run them")
    return [f"[study] warning: partition {name!r} cannot run these jobs ({'; '.join(why for why, _ in problems)}); "
            f"they start in {', '.join(map(repr, usable))}" for name, problems in found.items() if problems]


def read_jobs(folder: Path) -> dict[str, dict]:
    """``folder``/jobs.json: run name -> {"id", "job_name", "folder"} (submitit's folder of the job, relative to
    ``folder``). A file of an earlier flopmatch (run name -> job id) reads as jobs named ``flopmatch-<run>`` with
    their files in ``<id>/``, so a study re-run after an upgrade still finds its queued and running jobs."""
    from flopmatch.files import read_json

    ids = read_json(folder / JOBS_FILE) if (folder / JOBS_FILE).exists() else {}
    return {name: rec if isinstance(rec, dict) else {"id": str(rec), "job_name": f"flopmatch-{name}", "folder": str(rec)}
            for name, rec in ids.items()}


def job_lines(log_text: str, jid: str, first: bool = False) -> list[str] | None:
    """The lines job ``jid`` wrote into a run's log, which holds every job of the run (a resubmitted run's, one
    after another): from its last ``[slurm] job <jid>`` line (``first``: its first, so that a requeued job's every
    start is included) to the next job's. None: the job never started."""
    marker = f"[slurm] job {jid} "
    at = [i for i, line in enumerate(log_text.splitlines()) if line.startswith(marker)]
    if not at:
        return None
    lines = log_text.splitlines()[at[0] if first else at[-1]:]
    for i, line in enumerate(lines):  # up to the next job of the run (a later resubmission)
        other = re.match(r"\[slurm\] job (\S+?)[ :]", line)
        if other and other.group(1) != jid:
            return lines[:i]
    return lines


def worker_error(log_text: str, jid: str) -> str | None:
    """Why job ``jid`` failed, from the log its runs append to (:func:`job_lines`): its worker's last
    ``flopmatch: error:`` line, else the last exception line of a traceback. None: the job wrote no such line, or
    never started."""
    lines = job_lines(log_text, jid) or []
    for line in reversed(lines):
        if "flopmatch: error: " in line:
            return line.split("flopmatch: error: ", 1)[1].strip()
    for line in reversed(lines):
        if EXCEPTION_LINE.match(line.strip()):
            return line.strip()
    return None


def worker_warnings(log_text: str, jid: str, most: int = 5) -> list[str]:
    """The distinct ``warning:`` lines job ``jid`` wrote into its log (at most ``most``): under SLURM a worker's
    warnings (a busy node during the timing phase, skipped evaluations) would otherwise stay in the log."""
    seen = dict.fromkeys(line.strip() for line in job_lines(log_text, jid, first=True) or [] if "warning:" in line)
    return list(seen)[:most]


def _tail(path: Path, size: int = 64 * 1024) -> str:
    """The last ``size`` bytes of a text file ('' when missing): a long run's log is read only where it ended."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _short(text: str, n: int = 300) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def bounded(cmd: list[str], seconds: float) -> list[str]:
    """``cmd`` under coreutils' ``timeout`` (TERM after ``seconds``, KILL 5 s later; exit status 124 or 137), in the
    foreground so that Ctrl-C reaches it too; ``cmd`` as it is where ``timeout`` is missing."""
    if shutil.which("timeout") is None:
        return cmd
    return ["timeout", "--foreground", "--kill-after=5", f"{seconds:g}", *cmd]


class BoundedExecutor(submitit.SlurmExecutor):
    """submitit's SLURM executor with its sbatch call bounded by :data:`SBATCH_TIMEOUT_S`.

    submitit (1.5) runs ``sbatch SCRIPT`` through ``utils.CommandFunction`` with no timeout, from the command list
    ``_make_submission_command`` returns: the one hook that sees the command and nothing else of the submission.
    """

    def _make_submission_command(self, submission_file_path: Path) -> list[str]:
        return bounded(super()._make_submission_command(submission_file_path), SBATCH_TIMEOUT_S)


class SlurmLauncher:
    """Runs each job as a SLURM job through submitit; survives the study process's restart (see the module doc)."""

    name = "slurm"
    attaches = True  # a re-run study waits for the jobs an earlier study process left queued or running
    concurrent = 1  # the cluster's share is unknown here: the estimate is the runs' total time, one after another

    def __init__(self, study: Path, cfg: SlurmConfig):
        self.study, self.cfg = study, cfg
        self.folder = study / "slurm"
        # this process's submitit folder (slurm/<token>/<job id>/), made at its first submission: see the module doc
        self.token = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        # the job names' suffix: a job is this study directory's, not a copy's or another study's with the same grid
        self.tag = hashlib.sha256(str(study.resolve()).encode()).hexdigest()[:6]

    def check(self) -> None:
        """Refuse at once, before any work, when SLURM cannot take jobs from here: no client commands, no
        cluster configuration, no controller, an unknown partition, or jobs no node of it could run (``sinfo``,
        at most 30 s)."""
        missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
        if missing:
            raise UserError(f"{', '.join(missing)} not found: --launcher slurm needs the SLURM client commands "
                            f"({', '.join(SLURM_COMMANDS)}) on this machine (a cluster's login node), or use --launcher local")
        conf = os.environ.get("SLURM_CONF")
        if conf and not Path(conf).is_file():
            raise UserError(f"SLURM_CONF={conf} does not exist; point it at the cluster's slurm.conf or unset it")
        # --exact: a line per distinct node configuration, each figure exact (without it sinfo prints "64+" for a
        # group's minimum)
        names = partition_names(self.cfg.partition)
        cmd = ["sinfo", "--noheader", "--exact", "--format=%P|%c|%G|%m|%l"]
        if names:
            cmd += ["--partition", ",".join(names)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
        except FileNotFoundError:
            raise UserError("sinfo not found: --launcher slurm needs the SLURM client commands on this machine "
                            "(a cluster's login node), or use --launcher local") from None
        except subprocess.TimeoutExpired:
            raise UserError(f"the SLURM controller did not answer sinfo within {CHECK_TIMEOUT_S} s; try again or check "
                            f"the cluster") from None
        if out.returncode != 0:
            why = (out.stderr or out.stdout).strip().splitlines()
            raise UserError(f"SLURM is not reachable from here ({why[-1] if why else 'sinfo exit ' + str(out.returncode)}); "
                            "run on the cluster's login node, set SLURM_CONF, or use --launcher local")
        for warning in check_resources(self.cfg, out.stdout):
            print(warning, flush=True)
        ex = self._executor(self.folder / self.token, {"name": "check"})  # submitit's own checks, as a user error here
        self._test_only(ex)

    def _test_only(self, ex: submitit.SlurmExecutor) -> None:
        """``sbatch --test-only`` of a run's job script, as submitit writes it (nothing is queued, in milliseconds):
        refuse now what sbatch would refuse at the first submission, an unknown account, QOS, constraint, reservation
        or GRES (its answers that say "invalid", or that the request "violates" a policy). Its other answers (no node
        free now, drained nodes, a partition down) are left to the queue: jobs wait there for them."""
        try:
            script = ex._make_submission_file_text("true", "test-only")
        except AttributeError:  # another submitit: the first sbatch says it instead
            return
        try:
            out = subprocess.run(bounded(["sbatch", "--test-only"], CHECK_TIMEOUT_S), input=script, capture_output=True,
                                 text=True, timeout=CHECK_TIMEOUT_S + 10)
        except subprocess.TimeoutExpired:
            out = None
        if out is None or out.returncode in TIMED_OUT:
            raise UserError(f"the SLURM controller did not answer sbatch --test-only within {CHECK_TIMEOUT_S} s; try "
                            f"again or check the cluster (does `squeue` answer?)")
        lines = [re.sub(r"^(sbatch: error: |allocation failure: )", "", line.strip())
                 for line in (out.stderr + out.stdout).splitlines()]
        why = next((line for line in reversed(lines) if re.search(r"invalid|violates", line, re.I)), None)
        if out.returncode != 0 and why:
            raise UserError(f"sbatch refuses these jobs ({why}; sbatch --test-only): check --slurm-account, "
                            f"--slurm-qos, --slurm-constraint, --partition and --slurm-extra")

    def sbatch_params(self, job: dict) -> dict:
        """submitit's SLURM parameters for ``job``. A phase (tokenizers, timing) is one process: it asks for at most
        one GPU; the timing phase's job has its node to itself unless ``--no-slurm-timing-exclusive``."""
        phase = job.get("kind") in ("prepare", "timing")
        gpus = min(1, self.cfg.gpus_per_run) if phase else self.cfg.gpus_per_run
        # wckey None: submitit would send --wckey=submitit, which sites enforcing wckeys refuse or mis-charge
        params: dict = {"time": self.cfg.time_min, "nodes": 1, "ntasks_per_node": 1,
                        "cpus_per_task": self.cfg.cpus_per_run, "wckey": None, "job_name": self._job_name(job)}
        partition = ",".join(partition_names(self.cfg.partition))
        for key, value in (("gpus_per_node", gpus), ("partition", partition), ("account", self.cfg.account),
                           ("mem", f"{self.cfg.mem_gb}GB" if self.cfg.mem_gb else None), ("qos", self.cfg.qos),
                           ("constraint", self.cfg.constraint), ("setup", list(self.cfg.setup) or None),
                           ("additional_parameters", dict(self.cfg.extra) or None)):
            if value:
                params[key] = value
        if job.get("kind") == "timing" and self.cfg.timing_exclusive:
            params["exclusive"] = True  # other users' jobs on the node would skew latency and throughput
        return params

    def _executor(self, folder: Path, job: dict) -> submitit.SlurmExecutor:
        try:
            ex = BoundedExecutor(folder=folder / "%j", max_num_timeout=MAX_REQUEUES)
            ex.update_parameters(**self.sbatch_params(job))
        except (RuntimeError, ValueError) as e:  # e.g. 'Could not detect "srun"'
            raise UserError(f"submitit cannot submit from here: {str(e).strip().splitlines()[0]}") from None
        return ex

    def _job_file(self, job: dict) -> Path:
        """Where a job's description lies for the worker to read (``study/jobs/<name>.json``)."""
        return self.study / "jobs" / f"{job['name']}.json"

    def _job_name(self, job: dict) -> str:
        """The SLURM job name of a study job (squeue's %j): how a recorded job id is known to be this job's."""
        return f"flopmatch-{job['name']}-{self.tag}"

    def _submissions(self) -> Path:
        """This process's submitit folder, private (0700), made on first use."""
        folder = self.folder / self.token
        if not folder.is_dir():
            folder.mkdir(mode=0o700, parents=True)
        return folder

    def _submit(self, job: dict) -> dict:
        """sbatch ``job`` (through submitit); its record for jobs.json."""
        from flopmatch.files import atomic_write_json

        path = self._job_file(job)
        atomic_write_json(path, job)
        log = self.study / "logs" / f"{job['name']}.log"
        folder = self._submissions()
        ex = self._executor(folder, job)
        before = set(os.listdir(folder))
        try:
            procs = 1 if job.get("kind") in ("prepare", "timing") else max(1, self.cfg.gpus_per_run)  # phases: one process
            # submitit echoes a failed sbatch's stderr there; the UserError below says its last line, once
            with contextlib.redirect_stderr(io.StringIO()):
                sub = ex.submit(WorkerJob(str(path), str(log), procs, self.cfg.cpus_per_run))
        except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError,
                subprocess.CalledProcessError, OSError) as e:
            for name in set(os.listdir(folder)) - before:  # submitit's pickle and sbatch script of the refused job
                if not (folder / name).is_dir():
                    (folder / name).unlink()
            if not os.listdir(folder):  # nothing submitted from here: a corrected command may start afresh
                folder.rmdir()
            cause = e.__cause__ if isinstance(e.__cause__, subprocess.CalledProcessError) else e
            if getattr(cause, "returncode", None) in TIMED_OUT:
                raise UserError(f"sbatch did not answer within {SBATCH_TIMEOUT_S} s submitting {job['name']}: the SLURM "
                                f"controller is down or overloaded; check that `squeue` answers, then re-run the same "
                                f"command (a job {self._job_name(job)} that SLURM registers late finds no work and "
                                f"exits)") from None
            lines = str(e).strip().splitlines() or [f"exit status {getattr(cause, 'returncode', '?')}"]
            raise UserError(f"sbatch did not take the job for {job['name']}: {lines[-1]}") from None
        jid = str(sub.job_id)
        # submitit's link to the sbatch script it wrote: the script itself is in the job's folder
        for name in set(os.listdir(folder)) - before:
            if name.startswith(".submission_file_") and (folder / name).is_symlink():
                (folder / name).unlink()
        if jid in before:  # the controller reused an id within this process: the job may have read the old pickle
            try:
                subprocess.run(["scancel", jid], capture_output=True, timeout=60)
                done = f"job {jid} is cancelled"
            except subprocess.TimeoutExpired:
                done = f"scancel {jid} did not answer within 60 s: cancel it"
            raise UserError(f"SLURM gave job id {jid} twice (was its controller's state reset?); {done}, then re-run "
                            f"the same command to submit it again")
        return {"id": jid, "job_name": self._job_name(job), "folder": f"{self.token}/{jid}"}

    def run(self, jobs: list[dict], on_done: Callable[[dict], None], finished: Callable[[dict], bool] | None = None,
            fresh: bool = False, what: str = "runs") -> list[str]:
        """Submit (or find) every job, wait until each has ended, and return the failed ones.

        ``finished`` (default :func:`~flopmatch.study.job.job_finished`) tells from the run directory whether a job is
        done (a job's exit status is not trusted: a requeued job's first run exits non-zero and the requeued one
        finishes it). ``fresh``: the caller knows the jobs have work to do; do not ask ``finished`` before submitting.
        ``what``: the study phase the jobs are, for the progress lines. Ctrl-C stops waiting but not the jobs: they keep
        running, and re-running the study collects them. Each failure is printed on its own line as it happens (the
        job, its state, the worker's error, its log); the returned entries are those lines when one job failed, else
        their ``run (job N, STATE)`` heads. A preempted job is no failure: its run is submitted again (job_outcome).
        """
        if finished is None:
            from flopmatch.study.job import job_finished as finished
        failed = self._guarded(jobs, on_done, finished, fresh, what)
        return failed if len(failed) <= 1 else [line.split(":", 1)[0] for line in failed]

    def _guarded(self, jobs: list[dict], on_done: Callable[[dict], None], finished: Callable[[dict], bool],
                 fresh: bool, what: str) -> list[str]:
        try:
            return self._run(jobs, on_done, finished, fresh, what)
        except UserError as e:  # squeue gave up, or sbatch refused a job: what was submitted keeps running
            if (self.folder / JOBS_FILE).exists():
                raise UserError(f"{e}; jobs already submitted keep running (ids in {self.folder / JOBS_FILE}): re-run "
                                f"the same command to collect them, or scancel them") from None
            raise
        except KeyboardInterrupt:
            print(f"\n[study] stopped waiting; the SLURM jobs keep running (ids in {self.folder / JOBS_FILE}); "
                  "re-run the same command to collect them, or scancel them", flush=True)
            raise

    def _failure(self, name: str, rec: dict, state: str | None) -> str:
        """One line on a job that ended without finishing: the run, job id and state, the worker's error, its log."""
        jid = rec["id"]
        log = self.study / "logs" / f"{name}.log"
        sub = self.folder / rec["folder"]
        text = _tail(log, 1 << 20)
        why = worker_error(text, jid)
        if why is None and f"[slurm] job {jid} " in text:
            why = "no error in its log (stopped from outside: scancel, a node failure, a time limit?)"
        if why is None:  # it never reached the worker: submitit's own output says why (the venv not on the node?)
            err = [line.strip() for line in _tail(sub / f"{jid}_0_log.err").splitlines()]
            why = (next((line for line in reversed(err) if EXCEPTION_LINE.match(line)), None)
                   or next((line for line in reversed(err) if "error" in line.lower() and "Exited with exit code" not in line), None)
                   or "it never started (cancelled while queued?)")
        where = [str(p) + ("/" if p.is_dir() else "") for p in (log, sub) if p.exists()]
        return (f"{name} (job {jid}, {state or 'left the queue'}): {_short(why)}"
                + (f"; log: {' and '.join(where)}" if where else ""))

    def run_phase(self, job: dict, done: Callable[[], bool], what: str) -> None:
        """Run a study phase (tokenizers, timing) as one SLURM job on a compute node, the kind of machine the
        runs train on, and wait; ``done`` says from the study directory whether it finished."""
        failed = self._guarded([job], lambda j: None, lambda j: done(), True, what)
        if failed:
            raise UserError(f"{what} failed: {failed[0]}; fix and re-run to continue")

    def _steps(self, job: dict, total: dict[str, int]) -> str:
        """Where a running job's run is: ``step 240/397`` from its metrics.jsonl ('' before its first row, or for a
        phase); for a chain, of its latest run."""
        for sub in reversed(job.get("chain", [job])):
            if "run_dir" not in sub:
                return ""
            rows = _tail(Path(sub["run_dir"]) / "metrics.jsonl", 4096).splitlines()
            m = re.search(r'"step": (\d+)', rows[-1]) if rows else None
            if m:
                of = f"/{total[sub['name']]}" if sub["name"] in total else ""
                return f"step {m.group(1)}{of}" + (f" of {sub['name']}" if "chain" in job else "")
        return ""

    def _run(self, jobs: list[dict], on_done: Callable[[dict], None], finished: Callable[[dict], bool],
             fresh: bool, what: str) -> list[str]:
        from flopmatch.files import atomic_write_json, read_json

        (self.study / "logs").mkdir(parents=True, exist_ok=True)
        if not self.folder.is_dir():
            self.folder.mkdir(mode=0o700, parents=True)  # the jobs' pickles are below: see the module doc
        elif self.folder.stat().st_mode & 0o022 and self.folder.stat().st_uid == os.getuid():
            self.folder.chmod(self.folder.stat().st_mode & ~0o022)  # an older study's: others may not replace pickles
        records = read_jobs(self.folder)
        by_name = {j["name"]: j for j in jobs}
        todo = []
        for job in jobs:
            if not fresh and finished(job):
                on_done(job)
            else:
                todo.append(job)
        recorded = {records[j["name"]]["id"]: records[j["name"]]["job_name"] for j in todo if j["name"] in records}
        alive = squeue_jobs(list(recorded), recorded)
        watching: dict[str, dict] = {}
        attached: set[str] = set()  # jobs an earlier study process submitted, with its own job description
        for job in todo:
            rec = records.get(job["name"])
            if rec is not None and alive.get(rec["id"], ("",))[0] in ALIVE:
                attached.add(job["name"])  # queued or running from an earlier study process: wait, do not resubmit
                # today's description, read by the job when it starts (if still queued) or is requeued
                atomic_write_json(self._job_file(job), job)
            else:
                rec = records[job["name"]] = self._submit(job)
                atomic_write_json(self.folder / JOBS_FILE, records)  # after every submission: a crash loses no job id
            watching[job["name"]] = rec
        if todo:
            ids = ", ".join(f"{n} {r['id']}" for n, r in list(watching.items())[:3]) + (", ..." if len(watching) > 3 else "")
            print(f"[study] slurm, {what}: {len(watching) - len(attached)} job(s) submitted, {len(attached)} found queued "
                  f"or running from an earlier study process, {len(jobs) - len(todo)} already finished (job ids: {ids}; "
                  f"all in {self.folder / JOBS_FILE})", flush=True)
        total = {p["name"]: p["steps"] for p in read_json(self.study / "plan.json")} if (self.study / "plan.json").exists() else {}
        failed: list[str] = []
        shown: dict[str, tuple[str, str]] = {}  # run -> (state, reason) last printed
        preempted: dict[str, int] = {}  # run -> times this process resubmitted it after a preemption
        said = time.monotonic()
        while watching:
            states = squeue_jobs([r["id"] for r in watching.values()], {r["id"]: r["job_name"] for r in watching.values()})
            for name, rec in list(watching.items()):
                state = states.get(rec["id"], (None, ""))[0]
                job = by_name[name]
                outcome = job_outcome(state, lambda: finished(job), name in attached)
                if outcome == "wait":
                    continue
                del watching[name]
                shown.pop(name, None)
                (self.folder / rec["folder"] / f"{rec['id']}_0_result.pkl").unlink(missing_ok=True)  # never read
                if outcome == "resubmit" and state in RESUBMIT:
                    preempted[name] = preempted.get(name, 0) + 1
                    if preempted[name] > MAX_REQUEUES:
                        outcome = "failed"
                if outcome == "done":
                    for warning in worker_warnings(_tail(self.study / "logs" / f"{name}.log", 1 << 20), rec["id"]):
                        print(f"[study] slurm: {name} (job {rec['id']}) said: {_short(warning)}", flush=True)
                    on_done(job)
                elif outcome == "resubmit":
                    # preempted and not requeued (PreemptMode=CANCEL): the run resumes from its checkpoint in a new
                    # job. An earlier study process's job ran the description it was given: a study grown since (more
                    # evaluation settings, say) still needs work on this run. Either way, today's description.
                    attached.discard(name)
                    watching[name] = records[name] = self._submit(job)
                    atomic_write_json(self.folder / JOBS_FILE, records)
                    why = (RESUBMIT[state] if state in RESUBMIT else
                           f"submitted by an earlier study process, ended {(state or 'and left the queue').lower()} "
                           f"with work left (settings added since, or it failed)")
                    print(f"[study] slurm: {name}: job {rec['id']} {why}; submitted again as job {watching[name]['id']}"
                          f", resuming from the run's checkpoint", flush=True)
                else:
                    failed.append(self._failure(name, rec, state))
                    if len(todo) > 1:  # (a phase's one job: said by the caller's error)
                        print(f"[study] slurm: failed: {failed[-1]}", flush=True)
            # one line per (state, reason) whose runs changed since the last poll
            changed: dict[tuple[str, str], list[str]] = {}
            for name, rec in watching.items():
                if rec["id"] not in states:
                    continue  # submitted again in this pass: not in states yet
                state, reason = states[rec["id"]]
                if shown.get(name) != (state, reason):
                    shown[name] = (state, reason)
                    step = self._steps(by_name[name], total) if state == "RUNNING" else ""
                    changed.setdefault((state, reason), []).append(f"{name} (job {rec['id']}{', ' + step if step else ''})")
            for (state, reason), runs in changed.items():
                why = f" ({reason})" if reason not in ("None", "") else ""
                print(f"[study] slurm: {state.lower()}{why}: {', '.join(runs)}", flush=True)
                said = time.monotonic()
            if watching and time.monotonic() - said >= HEARTBEAT_S:
                running = [f"{n} ({self._steps(by_name[n], total) or 'job ' + r['id']})" for n, r in watching.items()
                           if shown.get(n, ("",))[0] == "RUNNING"]
                print(f"[study] slurm: {len(running)} running{': ' + ', '.join(running) if running else ''}; "
                      f"{len(watching) - len(running)} waiting", flush=True)
                said = time.monotonic()
            if watching:
                time.sleep(self.cfg.poll_s)
        return failed
