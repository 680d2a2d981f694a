"""Continuing a run to another budget, where its learning-rate schedule allows ("studies that grow").

Under ``train.schedule=wsd`` the learning rate before the cooldown does not depend on the budget
(:mod:`flopmatch.schedule`; Hägele et al. 2024), and neither does anything else a step does: the
data order, the training randomness and the EMA decay are functions of the step and the seed. So the
state saved where a wsd run's cooldown starts (``checkpoint-stable/``) is the state, at that step, of
a run with the same config and any budget whose cooldown starts no earlier, and continuing from it
gives bit for bit the weights that run would have. Under ``constant`` every step is budget-independent
and the latest checkpoint serves. The cosine fits every step to the budget: its runs are refused (once
they have a checkpoint: one stopped before its first has trained nothing and starts again at the new budget).

The post-hoc EMA's averages (:mod:`flopmatch.ema`) are functions of the step too, so they continue exactly; its
snapshots are taken at evenly spaced steps of each budget's plan, so a continued run keeps the old plan's
snapshots up to the step it continues from and takes the new plan's after it. Post-hoc averages rebuilt from
that set are as valid (any snapshot steps serve) but not bit-identical to a fresh run's.

``flopmatch train --budget B2 --out RUN`` on a run trained for B1 (nothing else in the config may
differ) does, in this order, each step atomic and the whole idempotent (a continuation killed half-way
is completed by the same command):

1. keeps the run's B1 result (finished or not): ``checkpoint/`` (hard-linked), ``config.json``, ``metrics.jsonl``,
   ``eval.json``, ``data.json``, ``samples/``, ``samples.png``, ``ema-snapshots/`` and ``tokenizer/`` (linked) go to
   ``budgets/<B1>/`` (:func:`flopmatch.rundir.budget_dir`), assembled under a temporary name and renamed into place,
   a run directory of its own that ``flopmatch sample`` and ``eval`` take;
2. removes ``eval.json``, ``samples/`` and ``samples.png`` from the run, which describes the B2 model only from now on;
3. installs the state to continue from as ``checkpoint/``, ``done`` false, its ``budget_history``
   extended by B1 (budget, steps, FLOPs, whether it finished, where it was kept, the step continued from);
4. cuts ``metrics.jsonl`` back to that step;
5. writes ``config.json`` with B2: the commit point (until then the run directory still says B1).

Training then resumes from the installed checkpoint as after any interruption.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from flopmatch.config import RunConfig
from flopmatch.errors import UserError
from flopmatch.files import atomic_write_text
from flopmatch.rundir import (
    CHECKPOINT,
    CONFIG,
    DATA,
    EMA_SNAPSHOTS,
    EVAL,
    METRICS,
    SAMPLES,
    STABLE_CHECKPOINT,
    STATE,
    TOKENIZER,
    budget_dir,
    config_diffs,
    copy_checkpoint,
    has_averages,
    read_config,
    read_state,
    snapshots,
    truncate_metrics,
    write_config,
)
from flopmatch.schedule import stable_steps

SAMPLE_PNG = "samples.png"  # `flopmatch sample RUN`'s default output: it shows the old model too
KEPT = (EVAL, SAMPLES, SAMPLE_PNG)  # what describes the old budget's model and leaves the run directory


@dataclass(frozen=True)
class Continuation:
    """A checked plan to continue a run: its stored config, its latest state and the state to continue from.

    ``source`` is the checkpoint file (inside the run) to continue from, None when the run has no
    checkpoint yet (it then restarts from step 0); ``state`` and ``source_state`` are their scalar states.
    """

    old: RunConfig
    state: dict | None
    source: str | None
    source_state: dict | None


def plan_continuation(run: Path, cfg: RunConfig, total_steps: int) -> Continuation:
    """Check that ``run`` can continue to ``cfg.train.budget`` (``total_steps`` steps); reads only.

    ``cfg`` differs from the run's config in ``train.budget`` only. Raises a one-line UserError for a
    cosine run that has trained and for a budget whose run would have left the stable phase before the run's state.
    A run with no checkpoint yet (stopped before its first) has trained nothing: any schedule takes any budget.
    """
    old = read_config(run)
    b1, b2 = old.train.budget, cfg.train.budget
    state = read_state(run)
    if state is None:
        return Continuation(old, None, None, None)
    if cfg.train.schedule == "cosine":
        raise UserError(f"{run} was trained for budget {b1:.3g} with the cosine schedule, whose every step is fitted to "
                        f"that budget, so it cannot continue to {b2:.3g}; train runs that can grow with "
                        f"--set train.schedule=wsd, or use another --out")
    source, source_state = CHECKPOINT, state
    if cfg.train.schedule == "wsd" and state["step"] > stable_steps(state["total_steps"], old.train):
        source, source_state = STABLE_CHECKPOINT, read_state(run, STABLE_CHECKPOINT)  # in (or past) the cooldown
        if source_state is None:
            raise UserError(f"{run} has no {STABLE_CHECKPOINT}, the state a wsd run continues from; "
                            f"train budget {b2:.3g} in another --out")
    if not has_averages(run / source, cfg):  # refused here, before anything is moved (restore would refuse later)
        raise UserError(f"{run} was trained by an earlier flopmatch, without the post-hoc EMA's averages, so it cannot "
                        f"continue; train budget {b2:.3g} in another --out")
    limit = stable_steps(total_steps, cfg.train)
    kept = [h for h in state.get("budget_history") or [] if h["budget"] == b2]
    if kept and source_state["step"] > limit:  # a budget this run passed through: its result is kept
        raise UserError(f"{run} has been continued past budget {b2:.3g}; its {b2:.3g} result "
                        f"({'finished' if kept[-1]['done'] else 'unfinished'}) is kept in {run / kept[-1]['kept_in']}")
    if source_state["step"] > limit:  # a smaller budget whose cooldown (or end) comes before the state
        where = "starts its cooldown" if cfg.train.schedule == "wsd" else "ends"
        raise UserError(f"cannot continue {run} from budget {b1:.3g} to {b2:.3g}: the state to continue from is at step "
                        f"{source_state['step']}, after step {limit} where budget {b2:.3g} {where}; "
                        f"train budget {b2:.3g} in another --out")
    return Continuation(old, state, source, source_state)


def continue_run(run: Path, cfg: RunConfig, plan: Continuation) -> str:
    """Carry out ``plan`` (from :func:`plan_continuation`) on the run directory, steps 1-5 of the module docstring.

    Call on the main rank only, holding the run's lock. Afterwards the run's config is ``cfg`` and its
    checkpoint (if any) the state to continue from, not done. Returns a line saying what was done.
    """
    run = Path(run)
    b1, b2 = plan.old.train.budget, cfg.train.budget
    # "continuing" marks a checkpoint installed by a continuation that was killed before its commit: the
    # old result is kept already (training drops the mark with its first checkpoint).
    if plan.state is not None and not plan.state.get("continuing"):
        kept = _keep(run, plan.state, b1)
        history = [*(plan.state.get("budget_history") or []), {
            "budget": b1, "total_steps": plan.state["total_steps"], "step": plan.state["step"], "flops": plan.state["flops"],
            "done": plan.state["done"], "kept_in": kept.relative_to(run).as_posix(),
            "continued_from_step": plan.source_state["step"]}]
        for name in KEPT:  # kept under budgets/ now: the run directory describes the new budget's model only
            path = run / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        copy_checkpoint(run / plan.source, run / CHECKPOINT,
                        plan.source_state | {"done": False, "budget_history": history, "continuing": True})
    truncate_metrics(run, plan.source_state["step"] if plan.source_state else 0)
    write_config(run, cfg)  # the commit point
    if plan.state is None:
        return f"{run}: budget {b1:.3g} -> {b2:.3g} (no checkpoint yet)"
    entry = read_state(run)["budget_history"][-1]
    where = "where the cooldown started" if plan.source == STABLE_CHECKPOINT else "its latest checkpoint"
    return (f"{run}: continuing from budget {b1:.3g} to {b2:.3g} at step {plan.source_state['step']} ({where}); "
            f"the {b1:.3g} result ({'finished' if entry['done'] else 'unfinished'}) is kept in {run / entry['kept_in']}")


def branch_source(src: Path, cfg: RunConfig, total_steps: int) -> tuple[str, dict] | None:
    """The checkpoint of run ``src`` that a new run with ``cfg`` (``total_steps`` steps) can start from, or None.

    ``src`` must hold a run whose config differs from ``cfg`` in ``train.budget`` only, under wsd (its
    stable checkpoint) or constant (its latest checkpoint), at a step no later than where ``cfg``'s
    cooldown (or end) starts. Returns (checkpoint name inside ``src``, its state). Reads only.
    """
    if cfg.train.schedule == "cosine" or not (src / CONFIG).exists() or config_diffs(src, cfg) != ["train.budget"]:
        return None
    name = STABLE_CHECKPOINT if cfg.train.schedule == "wsd" else CHECKPOINT
    state = read_state(src, name)
    if state is None or state["step"] > stable_steps(total_steps, cfg.train) or not has_averages(src / name, cfg):
        return None  # (no post-hoc EMA averages: a source trained by an earlier flopmatch; the run starts from step 0)
    return name, state


def branch_run(src: Path, dst: Path, cfg: RunConfig, source: tuple[str, dict]) -> str:
    """Create run ``dst`` (config ``cfg``) from the state of run ``src`` found by :func:`branch_source`.

    The new run is, bit for bit, the run ``cfg`` would train from step 0, already at the source's step
    (the same argument as continuing a run: nothing before that step depends on the budget). The
    directory is assembled under a temporary name and renamed into place, so it exists complete (config,
    data.json, tokenizer, metrics up to that step, the checkpoint, ``done`` false) or not at all;
    ``train`` then resumes it like an interrupted run. Its state records ``branched_from``.
    Returns a line saying what was done.
    """
    name, state = source
    tmp = dst.parent / f".{dst.name}.branch.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # the assembly of a killed attempt
    (tmp / CHECKPOINT).parent.mkdir(parents=True)
    for item in (DATA,):
        atomic_write_text(tmp / item, (src / item).read_text())
    shutil.copytree(src / TOKENIZER, tmp / TOKENIZER)
    rows = (src / METRICS).read_text().splitlines() if (src / METRICS).exists() else []
    atomic_write_text(tmp / METRICS, "".join(r + "\n" for r in rows))
    truncate_metrics(tmp, state["step"])
    # the source's post-hoc EMA snapshots up to the branch step: the new run's averages are theirs until then
    for step, path in snapshots(src):
        if step <= state["step"]:
            (tmp / EMA_SNAPSHOTS).mkdir(exist_ok=True)
            _link_or_copy(path, tmp / EMA_SNAPSHOTS / path.name)
    copy_checkpoint(src / name, tmp / CHECKPOINT, state | {
        "done": False, "budget": cfg.train.budget, "budget_history": [],
        "branched_from": {"run": src.name, "checkpoint": name, "step": state["step"], "flops": state["flops"]}})
    write_config(tmp, cfg)
    os.replace(tmp, dst)
    return (f"{dst}: starting from {src.name}'s {'stable-phase' if name == STABLE_CHECKPOINT else 'latest'} state at step "
            f"{state['step']} ({state['flops']:.3g} FLOPs not spent again)")


def _keep(run: Path, state: dict, budget: float) -> Path:
    """Hard-link (or copy) the run's current result into ``budgets/<budget>/``; returns that directory.

    Assembled in a temporary directory and renamed into place, so it exists complete or not at all.
    If it exists already and holds this very state (a continuation killed after keeping it), it is
    reused; if it holds another result, the next free name ``<budget>-2``, ``-3``, ... is used.
    """
    base = budget_dir(run, budget)
    base.parent.mkdir(exist_ok=True)
    for stale in base.parent.glob(".*.tmp"):  # assemblies a killed continuation never renamed into place
        shutil.rmtree(stale, ignore_errors=True)
    same = ("step", "flops", "budget", "done")
    for i in range(1, 1000):
        dest = base if i == 1 else base.with_name(f"{base.name}-{i}")
        if not dest.exists():
            break
        kept = read_state(dest)
        if kept is not None and all(kept.get(k) == state.get(k) for k in same):
            return dest
    tmp = base.parent / f".{dest.name}.tmp"  # we hold the run's lock: no other process assembles here
    (tmp / CHECKPOINT).parent.mkdir(parents=True)
    for name in (CHECKPOINT, STATE, SAMPLE_PNG):
        if (run / name).exists():
            _link_or_copy(run / name, tmp / name)
    # EMA_SNAPSHOTS: the kept result can still be given post-hoc EMAs; TOKENIZER: it samples and decodes as the run does
    for folder in (SAMPLES, EMA_SNAPSHOTS, TOKENIZER):
        if (run / folder).is_dir():
            shutil.copytree(run / folder, tmp / folder, copy_function=_link_or_copy)
    for name in (CONFIG, METRICS, EVAL, DATA):  # small, and rewritten or appended in place: copies, not links
        if (run / name).exists():
            atomic_write_text(tmp / name, (run / name).read_text())
    os.replace(tmp, dest)
    return dest


def _link_or_copy(src, dst) -> None:
    """Hard-link ``src`` at ``dst`` (no bytes copied; the run replaces its files, never rewrites them in
    place), or copy it where the file system has no hard links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
