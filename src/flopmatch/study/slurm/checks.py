"""The checks before a study begins on SLURM: the client commands and the controller answer (``sinfo``), a node of
the partition can run the jobs as configured (its CPUs, GPUs, memory and time limit), and sbatch would take their
job script (``sbatch --test-only``), so that what SLURM would refuse, or queue for ever, is refused before any work.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import submitit

from flopmatch.errors import UserError
from flopmatch.study.slurm.commands import TIMED_OUT, bounded
from flopmatch.study.slurm.config import SlurmConfig, _minutes, format_slurm_time, partition_names

CHECK_TIMEOUT_S = 30  # sinfo and sbatch --test-only before the study begins
# what the launcher needs on PATH: sinfo/squeue/sbatch here, srun (submitit runs the job under it) and scontrol
# (submitit requeues through it, inside the job; a login node without it has a broken client install)
SLURM_COMMANDS = ("sinfo", "sbatch", "squeue", "srun", "scontrol")


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


def check_cluster(cfg: SlurmConfig) -> None:
    """Refuse when SLURM cannot take jobs from here: no client commands, no cluster configuration, no controller
    (``sinfo``, at most :data:`CHECK_TIMEOUT_S`), an unknown partition, or jobs no node of it could run
    (:func:`check_resources`, whose warnings are printed)."""
    missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
    if missing:
        raise UserError(f"{', '.join(missing)} not found: --launcher slurm needs the SLURM client commands "
                        f"({', '.join(SLURM_COMMANDS)}) on this machine (a cluster's login node), or use --launcher local")
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():
        raise UserError(f"SLURM_CONF={conf} does not exist; point it at the cluster's slurm.conf or unset it")
    # --exact: a line per distinct node configuration, each figure exact (without it sinfo prints "64+" for a
    # group's minimum)
    names = partition_names(cfg.partition)
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
    for warning in check_resources(cfg, out.stdout):
        print(warning, flush=True)


def sbatch_test_only(ex: submitit.SlurmExecutor) -> None:
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
