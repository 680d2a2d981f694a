"""One study job: train a grid cell's run (or resume it, or skip it when finished), then evaluate the
sampling settings it still lacks. Every launcher runs jobs through :func:`run_job`, in-process or in
a worker process (``python -m flopmatch.study.worker JOBFILE``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from flopmatch.config import RunConfig, SampleConfig, from_dict
from flopmatch.evaluation.run import EvalConfig, entry_key, evaluate
from flopmatch.objectives import make_objective
from flopmatch.plan import net_spec_for
from flopmatch.rundir import CONFIG, read_eval_entries, read_state
from flopmatch.train import train


def run_job(job: dict, progress: bool = True) -> None:
    """Train (or resume, or skip) one run, then evaluate every setting it still lacks.

    With ``job["raw"]`` the main (first) setting is also evaluated with the raw weights. A study's
    jobs do not time (``eval.timing`` False): its timing phase times every paradigm together at the end.
    """
    cfg = from_dict(RunConfig, job["config"]).validate()
    run = Path(job["run_dir"])
    state = read_state(run) if (run / CONFIG).exists() else None
    if not (state and state.get("done")):
        train(cfg, run, progress=progress)
    ecfg = from_dict(EvalConfig, job["eval"])
    settings = [from_dict(SampleConfig, s) for s in job["settings"]]
    done = read_eval_entries(run)
    objective, spec = make_objective(cfg.objective), net_spec_for(cfg)
    passes = [(ecfg, settings)]
    if job.get("raw"):
        passes.append((replace(ecfg, weights="model", timing=False), settings[:1]))
    for ec, wanted in passes:
        todo = [s for s in wanted if entry_key(s, objective.resolve_steps(s, spec), ec) not in done]
        if todo:
            evaluate(run, todo, ec, progress=progress)
