"""Planning a study: the grid of runs (paradigm x depth x budget x seed) with analytic FLOPs and steps.

Nothing here builds a model or touches data, so ``flopmatch study --plan-only`` is instant and the plan
(``plan.json``) is written before any training starts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from flopmatch.config import RunConfig, SampleConfig, apply_overrides, from_dict, parse_source, to_dict
from flopmatch.errors import UserError
from flopmatch.nets import NetSpec
from flopmatch.objectives import make_objective
from flopmatch.plan import flops_summary, net_spec_for, plan_steps
from flopmatch.schedule import stable_steps
from flopmatch.study.presets import SEED_STRIDE, StudyConfig
from flopmatch.tokenizers.autoencoder import AutoencoderConfig
from flopmatch.tokenizers.autoencoder import apply_overrides as ae_overrides
from flopmatch.tokenizers.autoencoder import preset as ae_preset
from flopmatch.tokenizers.base import LEARNED_KIND


@dataclass
class RunPlan:
    """One cell of the grid."""

    name: str
    objective: str
    depth: int
    budget: float
    seed: int
    params: int
    train_flops_per_example: int
    steps: int
    train_flops: int
    sample_flops_per_image: int
    est_seconds: float
    config: dict  # the RunConfig as JSON


def run_name(objective: str, depth: int, budget: float, seed: int) -> str:
    """Directory name of a grid cell, e.g. masked-d2-b2.5e12-s0 (budget to 3 significant digits)."""
    return f"{objective}-d{depth}-b{budget:.3g}-s{seed}".replace("+", "")


def tokenizer_dirs(study: Path) -> dict[str, Path]:
    """Where a study keeps its matched learned tokenizers, by token type: tokenizers/kl and tokenizers/lfq."""
    return {tokens: study / "tokenizers" / kind for tokens, kind in LEARNED_KIND.items()}


def token_types(scfg: StudyConfig) -> set[str]:
    """The token types ("continuous", "discrete") the study's paradigms consume."""
    return {make_objective(o).tokens for o in scfg.objectives}


def autoencoder_config(scfg: StudyConfig, tokens: str) -> AutoencoderConfig:
    """The config of the study's learned tokenizer for a token type: the preset, then the study's overrides;
    its data (source, image side, seed, size) is always the study's own, so the tokenizer fits the runs."""
    cfg = ae_overrides(ae_preset(scfg.tokenizer_preset, LEARNED_KIND[tokens]), list(scfg.tokenizer_overrides))
    # Not shared_config: a learned tokenizer's recorded config must stay what it was trained with (tokenizer matching
    # compares it), and its data loading reads a holdout only on the shapes source anyway.
    data = apply_overrides(RunConfig(), scfg.overrides).data
    cfg.data, cfg.image_size, cfg.data_seed, cfg.num_train = data.name, data.image_size, data.seed, data.num_train
    cfg.image_column, cfg.text_column = data.image_column, data.text_column
    cfg.holdout, cfg.holdout_relations = list(data.holdout), list(data.holdout_relations)
    return cfg


def shared_config(scfg: StudyConfig, objective: str = RunConfig().objective.name) -> RunConfig:
    """The study's overrides applied to a RunConfig. Every preset holds scenes of the shapes data out of training
    (presets.HOLDOUT_OVERRIDES); on another source there are none to hold out, and the holdout is dropped."""
    cfg = apply_overrides(RunConfig(objective=objective), scfg.overrides)
    if parse_source(cfg.data.name, "data.name")[0] != "shapes":
        cfg.data.holdout, cfg.data.holdout_relations = [], []
    return cfg


def base_config(scfg: StudyConfig, objective: str, depth: int, budget: float, seed: int, study: Path) -> RunConfig:
    """The RunConfig of one grid cell: shared overrides, then the cell's own axes."""
    cfg = shared_config(scfg, objective)
    cfg.model.depth, cfg.train.budget, cfg.train.seed = depth, budget, seed
    cfg.sample.guidance = scfg.eval_guidance
    if scfg.tokenizer == "learned":
        tokens = make_objective(objective).tokens
        cfg.tokenizer.path = str(tokenizer_dirs(study)[tokens].resolve())
    return cfg.validate()


def floor_budget(scfg: StudyConfig) -> float:
    """The budget whose cells get the ``floor_seeds`` extra seeds: ``scfg.floor_budget``, or the middle budget."""
    return scfg.floor_budget or sorted(scfg.budgets)[len(scfg.budgets) // 2]


def ema_sweep(scfg: StudyConfig, plan: RunPlan) -> list[float]:
    """The post-hoc EMA lengths run ``plan`` is also evaluated at: ``scfg.eval_ema`` for the runs at the floor budget
    (every seed there, so each length is paired with the raw weights run by run), none elsewhere."""
    return list(scfg.eval_ema) if plan.budget == floor_budget(scfg) else []


def cell_seeds(scfg: StudyConfig, budget: float) -> list[int]:
    """Training seeds of a cell: ``seeds`` of them (the floor budget, by default the middle one, also the
    ``floor_seeds``), starting at ``base_seed * SEED_STRIDE`` (or the study's pinned ``first_seed``), so studies with
    different base seeds share no run and growing the seeds keeps every existing one."""
    n = scfg.seeds + (scfg.floor_seeds if budget == floor_budget(scfg) else 0)
    first = scfg.first_seed if scfg.first_seed >= 0 else scfg.base_seed * SEED_STRIDE
    return list(range(first, first + n))


def make_plan(scfg: StudyConfig, study: Path) -> list[RunPlan]:
    """Every run of the grid with analytic FLOPs (no model built, no data touched)."""
    scfg.validate()
    plans = []
    for objective in scfg.objectives:
        for depth in scfg.depths:
            for budget in scfg.budgets:
                for seed in cell_seeds(scfg, budget):
                    cfg = base_config(scfg, objective, depth, budget, seed, study)
                    if scfg.eval_ema and not (cfg.train.ema_snapshots and cfg.train.ema_profiles):
                        raise UserError("--eval-ema needs the post-hoc EMA's snapshots, which train.ema_snapshots=0 (or an "
                                        "empty train.ema_profiles) turns off; pass --eval-ema none, or drop that --set")
                    info = _analytic(cfg, scfg)
                    step_plan = plan_steps(budget, info["train_flops_per_example"], cfg.train.batch_size)
                    plans.append(RunPlan(
                        name=run_name(objective, depth, budget, seed), objective=objective, depth=depth, budget=budget,
                        seed=seed, params=info["params"], train_flops_per_example=info["train_flops_per_example"],
                        steps=step_plan.steps, train_flops=step_plan.total_flops,
                        sample_flops_per_image=info["sample_flops_per_image"],
                        est_seconds=step_plan.total_flops / scfg.assumed_flops_per_s, config=to_dict(cfg),
                    ))
    return plans


def _planned_tokenizer(cfg: RunConfig, scfg: StudyConfig):
    """The tokenizer spec a run will have: None (read it from the run config) once the study's learned tokenizer
    exists, before that the spec of its autoencoder config."""
    if cfg.tokenizer.path and not Path(cfg.tokenizer.path, "tokenizer.json").exists():
        return autoencoder_config(scfg, make_objective(cfg.objective).tokens).spec()
    return None


def planned_spec(cfg: RunConfig, scfg: StudyConfig) -> NetSpec:
    """The network a run of the study trains, also before the study's tokenizers exist."""
    return net_spec_for(cfg, _planned_tokenizer(cfg, scfg))


def _analytic(cfg: RunConfig, scfg: StudyConfig) -> dict:
    """Params and FLOPs of a config; before the learned tokenizers exist, from their autoencoder configs."""
    info = flops_summary(cfg, _planned_tokenizer(cfg, scfg))
    return {k: info[k] for k in ("params", "train_flops_per_example", "sample_flops_per_image")}


def eval_settings(scfg: StudyConfig, cfg: RunConfig) -> list[SampleConfig]:
    """The run's default sampling setting first, then (runs at the largest budget of a study without an operating-point
    sweep) the preset's extra step counts; with a sweep, those are swept instead (flopmatch.study.operating)."""
    main = cfg.sample
    if cfg.train.budget != max(scfg.budgets) or scfg.sweep_guidance:
        return [main]
    extra = [replace(main, steps=s) for s in scfg.eval_steps.get(cfg.objective.name, []) if s != main.steps]
    return [main] + extra


def chained_flops(plans: list[RunPlan]) -> float:
    """Training FLOPs the plan costs when wsd / constant runs share their stable phase (study.job.chain_jobs).

    In a chain (one paradigm, depth and seed, increasing budgets) each run starts from the state of the
    run before it at that run's cooldown start (wsd) or end (constant), so only the steps after it are
    trained. Cosine runs cost their full budget.
    """
    total, chains = 0.0, {}
    for p in plans:
        cfg = from_dict(RunConfig, p.config)
        if cfg.train.schedule == "cosine":
            total += p.train_flops
        else:
            chains.setdefault((p.objective, p.depth, p.seed), []).append((p, cfg))
    for chain in chains.values():
        chain.sort(key=lambda pc: pc[0].budget)
        start = 0  # the step the next run can start from
        for p, cfg in chain:
            per_step = p.train_flops / p.steps
            total += (p.steps - (start if start <= stable_steps(p.steps, cfg.train) else 0)) * per_step
            start = stable_steps(p.steps, cfg.train)
    return total


def format_plan(plans: list[RunPlan], status: dict[str, str] | None = None) -> str:
    """A fixed-width table of the plan; with ``status`` (run name -> what it still needs, e.g. "done", "new"; an
    existing study's, study.runner.plan_status) a last column says which runs a resumed or grown study still trains;
    not for a new study (every run "new")."""
    status = status if status and set(status.values()) != {"new"} else None
    head = f"{'run':<34} {'params':>9} {'steps':>6} {'train FLOPs':>11} {'FLOPs/img':>10} {'est. time':>9}"
    lines = [head + ("  status" if status else "")]
    for p in plans:
        lines.append(f"{p.name:<34} {p.params:>9,} {p.steps:>6} {p.train_flops:>11.3g} {p.sample_flops_per_image:>10.3g} "
                     f"{fmt_duration(p.est_seconds):>9}" + (f"  {status.get(p.name, '')}" if status else ""))
    total = sum(p.est_seconds for p in plans)
    # est. time is at the preset's assumed_flops_per_s; the study's estimate line (calibrated on the host) follows the table
    lines.append(f"{len(plans)} runs, {sum(p.train_flops for p in plans):.3g} training FLOPs, about {fmt_duration(total)} of "
                 f"training at the preset's assumed FLOP/s")
    chained = chained_flops(plans)
    if chained < sum(p.train_flops for p in plans):
        lines.append(f"  runs that can grow (wsd/constant) share their stable phase: {chained:.3g} training FLOPs to spend "
                     f"({chained / sum(p.train_flops for p in plans):.0%} of the runs' budgets)")
    return "\n".join(lines)


def fmt_duration(s: float) -> str:
    """Seconds as a short human duration: 45s, 3.5min, 2.1h."""
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f}min" if s < 7200 else f"{s / 3600:.1f}h"
