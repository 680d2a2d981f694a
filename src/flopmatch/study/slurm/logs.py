"""Reading a run's log (and submitit's own output) for what its SLURM job said: the lines of one job among a run's
jobs, the worker's error or warnings, and the one line a failed job is reported by.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# the last line of a Python traceback: "RuntimeError: ...", "torch.OutOfMemoryError: ...", "KeyError: 'x'"
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b(:.*)?$")


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


def failure_line(name: str, jid: str, state: str | None, log: Path, sub: Path) -> str:
    """One line on a job that ended without finishing: the run, job id and state, the worker's error, its log
    (``log``: the run's; ``sub``: submitit's folder of the job)."""
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
