"""What a study's SLURM jobs ask for: :class:`SlurmConfig`, and the parsing of its command-line values (SLURM
times, ``--slurm-extra`` options, ``--partition`` lists).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from flopmatch.errors import UserError

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


def partition_names(partition: str | None) -> list[str]:
    """The partitions of ``--partition``: one name, or a comma-separated list (sbatch starts the job in the first
    listed that can run it); [] for the cluster's default partition."""
    if not partition:
        return []
    names = [name.strip() for name in partition.split(",")]
    if not all(names):
        raise UserError(f"--partition {partition!r}: an empty name in the list; give partitions as a,b")
    return list(dict.fromkeys(names))
