"""Where a study's SLURM jobs stand: its record of the jobs it submitted (``<study>/slurm/jobs.json``), squeue's
states of them, and what the study does about each (wait, done, resubmit, failed).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from flopmatch.errors import UserError

# Not here: flopmatch.files (it imports torch, ~2 s; see the package's __init__): imported where it is used.

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
_failures: list[int] = []  # consecutive squeue failures so far


def read_jobs(folder: Path) -> dict[str, dict]:
    """``folder``/jobs.json: run name -> {"id", "job_name", "folder"} (submitit's folder of the job, relative to
    ``folder``). A file of an earlier flopmatch (run name -> job id) reads as jobs named ``flopmatch-<run>`` with
    their files in ``<id>/``, so a study re-run after an upgrade still finds its queued and running jobs."""
    from flopmatch.files import read_json

    ids = read_json(folder / JOBS_FILE) if (folder / JOBS_FILE).exists() else {}
    return {name: rec if isinstance(rec, dict) else {"id": str(rec), "job_name": f"flopmatch-{name}", "folder": str(rec)}
            for name, rec in ids.items()}


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
