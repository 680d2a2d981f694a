"""The study's operating-point sweep: which runs sweep, what they sweep, and which points they then
evaluate in full (the selection rule itself is :mod:`flopmatch.evaluation.operating`).

At the largest budget, each (paradigm, depth)'s lowest seed (its *selection run*) is evaluated at every
guidance in ``StudyConfig.sweep_guidance`` x every step count (the main one and ``eval_steps``) x every
sampler variant in ``eval_variants``, on ``sweep_samples`` images sampled with their own seed. The chosen
points are then evaluated on the full set (``eval_samples`` images, the main setting's seed) and the timing
phase times them. Everything is read back from the run's ``eval.json``, so a killed study resumes where
it stopped and a finished one re-chooses the same points.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from flopmatch.config import RunConfig, SampleConfig
from flopmatch.evaluation.operating import SWEEP_SEED, choose, point_from_entry
from flopmatch.evaluation.run import EvalConfig, entry_key, setting_key
from flopmatch.objectives import make_objective
from flopmatch.plan import net_spec_for
from flopmatch.rundir import read_eval_entries
from flopmatch.study.plan import RunPlan, cell_seeds, planned_spec
from flopmatch.study.presets import StudyConfig


def selection_run(scfg: StudyConfig, plan: RunPlan) -> bool:
    """Whether ``plan`` sweeps: the study has a sweep and the run is its cell's lowest seed at the largest budget."""
    top = max(scfg.budgets)
    return bool(scfg.sweep_guidance) and plan.budget == top and plan.seed == cell_seeds(scfg, top)[0]


def sweep_settings(scfg: StudyConfig, cfg: RunConfig) -> list[SampleConfig]:
    """guidance x (main steps, ``eval_steps``, ``eval_variants``) for the run's paradigm, one per distinct setting."""
    main = cfg.sample
    bases = [main] + [replace(main, steps=s) for s in scfg.eval_steps.get(cfg.objective.name, [])]
    bases += [replace(main, **v) for v in scfg.eval_variants.get(cfg.objective.name, [])]
    objective, spec = make_objective(cfg.objective), planned_spec(cfg, scfg)
    out, keys = [], set()
    for g in scfg.sweep_guidance:
        for base in bases:
            s = replace(base, guidance=float(g))
            replace(cfg, sample=s).validate()  # a bad eval_variants value fails here, at plan time, not after training
            key = setting_key(s, objective.resolve_steps(s, spec))
            if key not in keys:  # e.g. eval_steps listing the default step count
                keys.add(key)
                out.append(s)
    return out


SWEEP_BOOT = 50  # bootstrap replicates of the sweep's KID (and FID): how finely the small set separates settings


def sweep_eval(ecfg: EvalConfig, scfg: StudyConfig) -> EvalConfig:
    """The sweep's evaluation: ``sweep_samples`` images of their own seed, a short bootstrap, no timing, no image files."""
    return replace(ecfg, num_samples=scfg.sweep_samples, seed=SWEEP_SEED, fid_boot=SWEEP_BOOT, timing=False,
                   save_images=False, export="")


def chosen_settings(run: Path, cfg: RunConfig, sweep: list[SampleConfig], sweep_ecfg: EvalConfig) -> list[SampleConfig] | None:
    """The sweep's chosen points (:func:`flopmatch.evaluation.operating.choose`) as settings, or None while some
    swept setting is not yet evaluated. KID is the effnet features' (the report's, StudyConfig.validate requires them)."""
    entries = read_eval_entries(run)
    objective, spec = make_objective(cfg.objective), net_spec_for(cfg)
    by_key = {}
    for s in sweep:
        steps = objective.resolve_steps(s, spec)
        entry = entries.get(entry_key(s, steps, sweep_ecfg))
        if entry is None:
            return None
        by_key[setting_key(s, steps)] = (s, entry)
    points = [point_from_entry(k, e, "effnet") for k, (_, e) in by_key.items()]
    return [by_key[p.key][0] for p in choose(points)]
