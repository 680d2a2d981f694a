"""The SLURM launcher, :class:`SlurmLauncher`: submits each job of a study as a SLURM job (through submitit), records
it in ``<study>/slurm/jobs.json``, and waits for the jobs, resubmitting those preempted; how and why is the package's
doc (:mod:`flopmatch.study.slurm`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import secrets
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import submitit

from flopmatch.errors import UserError
from flopmatch.study.slurm.checks import check_cluster, sbatch_test_only
from flopmatch.study.slurm.commands import SBATCH_TIMEOUT_S, TIMED_OUT, BoundedExecutor
from flopmatch.study.slurm.config import SlurmConfig, partition_names
from flopmatch.study.slurm.logs import _short, _tail, failure_line, worker_warnings
from flopmatch.study.slurm.queue import ALIVE, JOBS_FILE, RESUBMIT, job_outcome, read_jobs, squeue_jobs
from flopmatch.study.slurm.worker_job import WorkerJob

# Not here: flopmatch.files and flopmatch.study.job (they import torch, ~2 s; see the package's __init__): imported
# where they are used.

MAX_REQUEUES = 100  # time-outs a job is requeued after (submitit's max_num_timeout); also the most times one study
# process resubmits a run whose job was preempted (RESUBMIT): a run stopped more often is a failure
# ... and whose job lost its node (NODE_FAIL, BOOT_FAIL): a node failing again and again is the site's to repair, not
# the queue's to retry 100 times
MAX_NODE_FAILURES = 3
HEARTBEAT_S = 300  # with no change of state, a line with the running runs' steps at most this often


class SlurmLauncher:
    """Runs each job as a SLURM job through submitit; survives the study process's restart (see the package doc)."""

    name = "slurm"
    attaches = True  # a re-run study waits for the jobs an earlier study process left queued or running
    concurrent = 1  # the cluster's share is unknown here: the estimate is the runs' total time, one after another

    def __init__(self, study: Path, cfg: SlurmConfig):
        self.study, self.cfg = study, cfg
        self.folder = study / "slurm"
        # this process's submitit folder (slurm/<token>/<job id>/), made at its first submission: see the package doc
        self.token = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        # the job names' suffix: a job is this study directory's, not a copy's or another study's with the same grid
        self.tag = hashlib.sha256(str(study.resolve()).encode()).hexdigest()[:6]


    def check(self) -> None:
        """Refuse at once, before any work, when SLURM cannot take jobs from here: no client commands, no
        cluster configuration, no controller, an unknown partition, or jobs no node of it could run (``sinfo``,
        at most 30 s)."""
        check_cluster(self.cfg)
        ex = self._executor(self.folder / self.token, {"name": "check"})  # submitit's own checks, as a user error here
        sbatch_test_only(ex)

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
            self.folder.mkdir(mode=0o700, parents=True)  # the jobs' pickles are below: see the package doc
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
        preempted: dict[tuple[str, str], int] = {}  # (run, RESUBMIT state) -> times this process resubmitted it so
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
                    preempted[name, state] = preempted.get((name, state), 0) + 1
                    if preempted[name, state] > (MAX_REQUEUES if state == "PREEMPTED" else MAX_NODE_FAILURES):
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
                    failed.append(failure_line(name, rec["id"], state, self.study / "logs" / f"{name}.log",
                                               self.folder / rec["folder"]))
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
