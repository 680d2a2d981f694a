"""The SLURM launcher: each job of a study (one grid cell's run, and the timing phase) is one SLURM job.

Jobs are submitted through ``submitit`` (it writes the sbatch script, runs the job under srun, and on
preemption or time-out calls :meth:`WorkerJob.checkpoint` and requeues the job). Inside a job the run
itself is an ordinary study worker (``python -m flopmatch.study.worker JOBFILE``; under torchrun, one
process per GPU, when a run has several), so it trains, checkpoints and resumes exactly as it does
locally, and its output goes to ``<study>/logs/<run>.log`` as with ``--workers``.

*State lives in files, not in this process.* The study records every submitted job id in
``<study>/slurm/jobs.json`` and reads a job's outcome from its run directory (trained and every setting
evaluated: :func:`~flopmatch.study.job.job_finished`), never from SLURM's accounting. So re-running
``flopmatch study`` after the study process died (or after Ctrl-C) finds jobs still queued or
running and waits for them instead of submitting them twice, skips finished runs, and resubmits runs
whose job ended without finishing them (failed, cancelled, timed out); a resubmitted run resumes
from its checkpoint.

*squeue, not sacct.* Which jobs are still alive is asked of ``squeue`` (submitit asks ``sacct``,
which needs the accounting daemon that small clusters, and ``scripts/slurm-local.sh``, do not run).
A job that ``squeue`` no longer lists, or lists in a final state, has ended.

Security note: submitit pickles the submitted callable (a :class:`WorkerJob`: paths and counts only)
into ``<study>/slurm/`` and the job unpickles it; that is submitit's mechanism and the file is written
by this process. Nothing else from the study directory is executed; job files are JSON.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import submitit

from flopmatch.errors import UserError
from flopmatch.files import atomic_write_json, read_json
from flopmatch.study.job import job_finished

NO_ANSWER = "NO ANSWER"  # squeue_states' state of a job while squeue fails: counted alive, shown as such
# squeue states of a job that has not ended (a preempted job may still be requeued, so it counts as alive)
ALIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
         "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "PREEMPTED", NO_ANSWER}
JOBS_FILE = "jobs.json"  # in <study>/slurm/: run name -> SLURM job id of its latest submission
SQUEUE_RETRIES = 5  # consecutive failed squeue calls before the study gives up waiting (the jobs keep running)
_failures: list[int] = []  # consecutive squeue failures so far
CHECKPOINT_WAIT_S = 60  # how long a job given SLURM's time-out/preemption signal waits for the run's checkpoint


@dataclass
class SlurmConfig:
    """Where and how a study's jobs run on SLURM (``flopmatch study --launcher slurm``)."""

    partition: str | None = None  # None: the cluster's default partition
    gpus_per_run: int = 1  # GPUs per job; > 1 runs the worker under torchrun, one process per GPU; 0 = CPU only
    cpus_per_run: int = 8  # CPU cores per job (the worker's torch threads, split over its processes)
    time_min: int = 240  # job time limit in minutes; on reaching it the run checkpoints and the job is requeued
    account: str | None = None
    mem_gb: int | None = None  # None: the partition's default
    poll_s: float = 10.0  # seconds between squeue polls


def parse_slurm_time(text: str) -> int:
    """Minutes in a SLURM time string: ``MM``, ``HH:MM:SS``, ``MM:SS``, ``D-HH``, ``D-HH:MM`` or ``D-HH:MM:SS``."""
    try:
        days, dash, rest = text.strip().rpartition("-")
        parts = [int(p) for p in rest.split(":")]
        d = int(days) if dash else 0
        if any(p < 0 for p in parts) or d < 0 or not 1 <= len(parts) <= 3:
            raise ValueError
        if dash:  # D-HH[:MM[:SS]]
            h, m, s = (parts + [0, 0])[:3]
        else:  # MM, MM:SS, HH:MM:SS
            h, m, s = ([0] * (3 - len(parts)) + parts) if len(parts) == 3 else (0, parts[0], parts[1] if len(parts) > 1 else 0)
    except ValueError:
        raise UserError(f"--slurm-time {text!r} is not a SLURM time: use minutes, HH:MM:SS or D-HH:MM:SS") from None
    minutes = d * 1440 + h * 60 + m + (1 if s else 0)
    if minutes < 1:
        raise UserError(f"--slurm-time {text!r} is shorter than a minute")
    return minutes


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
        return submitit.helpers.DelayedSubmission(self)


def squeue_states(job_ids: list[str], names: dict[str, str] | None = None) -> dict[str, str]:
    """SLURM state of each of ``job_ids`` that squeue still lists (ended jobs drop out after MinJobAge).

    ``names`` (job id -> the job name it was submitted under): a listed job of another name is left out, as ended. A
    recorded id can name someone else's job once the cluster's ids were reset or wrapped, or the study was moved to
    another cluster; the study must not wait on that job as its own.
    """
    if not job_ids:
        return {}
    try:
        out = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i|%T|%j", "--user", str(os.getuid())],
                             capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise UserError("squeue not found: the slurm launcher needs the SLURM client commands on this machine "
                        "(or use --launcher local)") from None
    except subprocess.TimeoutExpired:
        return {j: NO_ANSWER for j in job_ids}  # the controller is busy: assume nothing ended; ask again later
    if out.returncode != 0:
        _failures.append(1)
        if len(_failures) < SQUEUE_RETRIES:  # a busy controller ("Socket timed out"): assume alive, ask again
            return {j: NO_ANSWER for j in job_ids}
        raise UserError(f"squeue failed: {(out.stderr or out.stdout).strip().splitlines()[-1] if (out.stderr or out.stdout).strip() else 'exit ' + str(out.returncode)}")
    _failures.clear()
    wanted, states = set(job_ids), {}
    for line in out.stdout.splitlines():
        jid, _, rest = line.strip().partition("|")
        state, _, name = rest.partition("|")
        if jid in wanted and (names is None or jid not in names or name == names[jid]):
            states[jid] = state.split()[0] if state else "UNKNOWN"
    return states


def node_resources(sinfo: str, partition: str | None) -> dict | None:
    """The most CPUs, GPUs and memory (MB) one node of ``partition`` (None: the default one, starred) offers, from
    ``sinfo --format=%P|%c|%G|%m`` lines (one per group of alike nodes); None when the partition is not listed."""
    cpus = gpus = mem = 0
    found = False
    for line in sinfo.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 4:
            continue
        name, c, gres, m = fields
        if (name.rstrip("*") != partition) if partition else not name.endswith("*"):
            continue
        found = True
        cpus = max(cpus, int(c) if c.isdigit() else 0)  # "64+" (a minimum, without --exact): unknown, not checked
        mem = max(mem, int(m) if m.isdigit() else 0)
        # GRES like "gpu:4", "gpu:a100:8(S:0-1)", "gpu:2,mps:200" or "(null)"
        gpus = max(gpus, sum(int(n) for n in re.findall(r"\bgpu(?::[^:,(]+)?:(\d+)", gres)))
    return {"cpus": cpus, "gpus": gpus, "mem_mb": mem} if found else None


def check_resources(cfg: SlurmConfig, sinfo: str) -> None:
    """Refuse a job no node of the partition could run (it would wait in the queue for ever, or sbatch refuses it
    after the study has begun): more GPUs, CPUs or memory per run than one node has."""
    nodes = node_resources(sinfo, cfg.partition)
    if nodes is None:
        return  # no default partition marked: SLURM decides
    where = f"partition {cfg.partition!r}" if cfg.partition else "the default partition"
    if cfg.gpus_per_run > nodes["gpus"]:
        have = f"at most {nodes['gpus']} GPUs" if nodes["gpus"] else "no GPUs"
        fix = f"--gpus-per-run {nodes['gpus']}" + ("" if nodes["gpus"] else " to train on CPUs")
        raise UserError(f"--gpus-per-run {cfg.gpus_per_run}: the nodes of {where} have {have} (sinfo); use {fix}, or "
                        f"another --partition")
    if nodes["cpus"] and cfg.cpus_per_run > nodes["cpus"]:
        raise UserError(f"--cpus-per-run {cfg.cpus_per_run}: the nodes of {where} have at most {nodes['cpus']} CPUs "
                        f"(sinfo); use --cpus-per-run {nodes['cpus']} or fewer, or another --partition")
    if cfg.mem_gb and nodes["mem_mb"] and cfg.mem_gb * 1024 > nodes["mem_mb"]:
        raise UserError(f"--slurm-mem-gb {cfg.mem_gb}: the nodes of {where} have at most {nodes['mem_mb'] // 1024} GB "
                        f"(sinfo); ask for less, or another --partition")


class SlurmLauncher:
    """Runs each job as a SLURM job through submitit; survives the study process's restart (see the module doc)."""

    name = "slurm"
    attaches = True  # a re-run study waits for the jobs an earlier study process left queued or running
    concurrent = 1  # the cluster's share is unknown here: the estimate is the runs' total time, one after another

    def __init__(self, study: Path, cfg: SlurmConfig):
        self.study, self.cfg = study, cfg
        self.folder = study / "slurm"

    def check(self) -> None:
        """Refuse at once, before any work, when SLURM cannot take jobs from here: no client commands, no
        cluster configuration, no controller, or an unknown partition (``sinfo``, at most 30 s)."""
        conf = os.environ.get("SLURM_CONF")
        if conf and not Path(conf).is_file():
            raise UserError(f"SLURM_CONF={conf} does not exist; point it at the cluster's slurm.conf or unset it")
        # --exact: a line per distinct node configuration, each figure exact (without it sinfo prints "64+" for a
        # group's minimum)
        cmd = ["sinfo", "--noheader", "--exact", "--format=%P|%c|%G|%m"] + (["--partition", self.cfg.partition] if self.cfg.partition else [])
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            raise UserError("sinfo not found: --launcher slurm needs the SLURM client commands on this machine "
                            "(a cluster's login node), or use --launcher local") from None
        except subprocess.TimeoutExpired:
            raise UserError("the SLURM controller did not answer sinfo within 30 s; try again or check the cluster") from None
        if out.returncode != 0:
            why = (out.stderr or out.stdout).strip().splitlines()
            raise UserError(f"SLURM is not reachable from here ({why[-1] if why else 'sinfo exit ' + str(out.returncode)}); "
                            "run on the cluster's login node, set SLURM_CONF, or use --launcher local")
        if self.cfg.partition and not out.stdout.strip():
            raise UserError(f"SLURM has no partition {self.cfg.partition!r}; `sinfo` lists them")
        check_resources(self.cfg, out.stdout)


    def _executor(self) -> submitit.SlurmExecutor:
        ex = submitit.SlurmExecutor(folder=self.folder / "%j", max_num_timeout=100)
        params = {"time": self.cfg.time_min, "nodes": 1, "ntasks_per_node": 1, "cpus_per_task": self.cfg.cpus_per_run}
        if self.cfg.gpus_per_run:
            params["gpus_per_node"] = self.cfg.gpus_per_run
        if self.cfg.partition:
            params["partition"] = self.cfg.partition
        if self.cfg.account:
            params["account"] = self.cfg.account
        if self.cfg.mem_gb:
            params["mem"] = f"{self.cfg.mem_gb}GB"
        ex.update_parameters(**params)
        return ex

    def _job_file(self, job: dict) -> Path:
        """Where a job's description lies for the worker to read (``study/jobs/<name>.json``)."""
        return self.study / "jobs" / f"{job['name']}.json"

    @staticmethod
    def _job_name(job: dict) -> str:
        """The SLURM job name of a study job (squeue's %j): how a recorded job id is known to be this job's."""
        return f"flopmatch-{job['name']}"

    def _submit(self, ex: submitit.SlurmExecutor, job: dict) -> str:
        path = self._job_file(job)
        atomic_write_json(path, job)
        log = self.study / "logs" / f"{job['name']}.log"
        ex.update_parameters(job_name=self._job_name(job))
        before = set(os.listdir(self.folder)) if self.folder.is_dir() else set()
        try:
            procs = 1 if job.get("kind") in ("prepare", "timing") else max(1, self.cfg.gpus_per_run)  # phases: one process
            sub = ex.submit(WorkerJob(str(path), str(log), procs, self.cfg.cpus_per_run))
        except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError, FileNotFoundError) as e:
            for name in set(os.listdir(self.folder)) - before:  # submitit's pickle and sbatch script of the refused job
                if not (self.folder / name).is_dir():
                    (self.folder / name).unlink()
            raise UserError(f"sbatch refused the job for {job['name']}: {str(e).strip().splitlines()[-1]}") from None
        # submitit's link to the sbatch script it wrote: the script itself is in the job's folder (slurm/<id>/)
        for name in set(os.listdir(self.folder)) - before:
            if name.startswith(".submission_file_") and (self.folder / name).is_symlink():
                (self.folder / name).unlink()
        return str(sub.job_id)

    def run(self, jobs: list[dict], on_done: Callable[[dict], None], finished: Callable[[dict], bool] = job_finished,
            fresh: bool = False) -> list[str]:
        """Submit (or find) every job, wait until each has ended, and return the failed ones with their logs.

        ``finished`` tells from the run directory whether a job is done (a job's exit status is not trusted:
        a requeued job's first run exits non-zero and the requeued one finishes it). ``fresh``: the caller
        knows the jobs have work to do; do not ask ``finished`` before submitting. Ctrl-C stops waiting
        but not the jobs: they keep running, and re-running the study collects them.
        """
        try:
            return self._run(jobs, on_done, finished, fresh)
        except UserError as e:  # squeue gave up, or sbatch refused a job: what was submitted keeps running
            if (self.folder / JOBS_FILE).exists():
                raise UserError(f"{e}; jobs already submitted keep running (ids in {self.folder / JOBS_FILE}): re-run "
                                f"the same command to collect them, or scancel them") from None
            raise
        except KeyboardInterrupt:
            print(f"\n[study] stopped waiting; the SLURM jobs keep running (ids in {self.folder / JOBS_FILE}); "
                  "re-run the same command to collect them, or scancel them", flush=True)
            raise

    def _where_to_look(self, name: str, jid: str) -> str:
        """The logs an ended job left, for its failure line: the worker's log and submitit's job folder, those
        that exist (a job cancelled or refused while still queued never wrote either)."""
        left = [str(p) + ("/" if p.is_dir() else "") for p in (self.study / "logs" / f"{name}.log", self.folder / jid)
                if p.exists()]
        return "see " + " and ".join(left) if left else "it left no log: it ended before it started (cancelled while queued?)"

    def run_phase(self, job: dict, done: Callable[[], bool], what: str) -> None:
        """Run a study phase (tokenizers, timing) as one SLURM job on a compute node, the kind of machine the
        runs train on, and wait; ``done`` says from the study directory whether it finished."""
        failed = self.run([job], lambda j: None, finished=lambda j: done(), fresh=True)
        if failed:
            raise UserError(f"{what} failed: {failed[0]}; fix and re-run to continue")

    def _run(self, jobs: list[dict], on_done: Callable[[dict], None], finished: Callable[[dict], bool],
             fresh: bool) -> list[str]:
        (self.study / "logs").mkdir(parents=True, exist_ok=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        ids: dict[str, str] = read_json(self.folder / JOBS_FILE) if (self.folder / JOBS_FILE).exists() else {}
        by_name = {j["name"]: j for j in jobs}
        todo = []
        for job in jobs:
            if not fresh and finished(job):
                on_done(job)
            else:
                todo.append(job)
        recorded = {ids[j["name"]]: self._job_name(j) for j in todo if j["name"] in ids}
        alive = squeue_states(list(recorded), recorded)
        ex = self._executor()
        watching: dict[str, str] = {}
        attached: set[str] = set()  # jobs an earlier study process submitted, with its own job description
        found = 0
        for job in todo:
            jid = ids.get(job["name"])
            if jid is not None and alive.get(jid) in ALIVE:
                found += 1  # queued or running from an earlier study process: wait for it, do not submit again
                attached.add(job["name"])
                # today's description, read by the job when it starts (if still queued) or is requeued
                atomic_write_json(self._job_file(job), job)
            else:
                jid = ids[job["name"]] = self._submit(ex, job)
                atomic_write_json(self.folder / JOBS_FILE, ids)  # after every submission: a crash loses no job id
            watching[job["name"]] = jid
        if todo:
            print(f"[study] slurm: {len(watching) - found} job(s) submitted, {found} found queued or running "
                  f"from an earlier study process, {len(jobs) - len(todo)} already finished; job ids in "
                  f"{self.folder / JOBS_FILE}", flush=True)
        failed, last = [], None
        while watching:
            states = squeue_states(list(watching.values()), {jid: self._job_name(by_name[n]) for n, jid in watching.items()})
            for name, jid in list(watching.items()):
                if states.get(jid) in ALIVE:
                    continue
                del watching[name]
                job = by_name[name]
                if finished(job):
                    on_done(job)
                elif name in attached and states.get(jid) != "CANCELLED":
                    # An earlier study process's job ran the description it was given: a study grown since (more
                    # evaluation settings, say) still needs work on this run. Submitted once more, with today's.
                    # (One the user cancelled is a failure, as it is for this process's jobs, while squeue still
                    # lists it: MinJobAge, 300 s by default; without sacct, one that left the queue reads as ended.)
                    attached.discard(name)
                    watching[name] = ids[name] = self._submit(ex, job)
                    atomic_write_json(self.folder / JOBS_FILE, ids)
                    print(f"[study] slurm: {name}: job {jid}, submitted by an earlier study process, ended "
                          f"{states.get(jid, 'and left the queue').lower()} with work left (settings added since, or "
                          f"it failed); submitted again as {ids[name]}", flush=True)
                else:
                    failed.append(f"{name} (slurm job {jid} ended {states.get(jid, 'and left the queue').lower()} "
                                  f"without finishing; {self._where_to_look(name, jid)})")
            counts = {}
            for jid in watching.values():  # (a job submitted again in this pass is not in states yet)
                state = states.get(jid, "submitted").lower()
                counts[state] = counts.get(state, 0) + 1
            line = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            if watching and line != last:
                print(f"[study] slurm: {line}", flush=True)
                last = line
            if watching:
                time.sleep(self.cfg.poll_s)
        return failed
