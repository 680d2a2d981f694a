"""One study job: train a grid cell's run (or resume it, or skip it when finished), then evaluate the
sampling settings it still lacks. Every launcher runs jobs through :func:`run_job`, in-process or in
a worker process (``python -m flopmatch.study.worker JOBFILE``); :func:`job_finished` tells a launcher
from the run directory alone whether a job has anything left to do.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from flopmatch import dist
from flopmatch.config import RunConfig, SampleConfig, from_dict
from flopmatch.device import resolve_device
from flopmatch.evaluation.run import EvalConfig, entry_key, evaluate
from flopmatch.files import read_json
from flopmatch.growth import branch_run, branch_source
from flopmatch.objectives import make_objective
from flopmatch.plan import net_spec_for, plan_steps
from flopmatch.rundir import CONFIG, read_eval_entries, read_state, snapshots
from flopmatch.study.operating import chosen_settings
from flopmatch.study.plan import RunPlan
from flopmatch.study.presets import StudyConfig
from flopmatch.study.timing_phase import ensure_timing
from flopmatch.study.tokenizer_phase import prepare
from flopmatch.train import train

TIMING_JOB = "timing-phase"  # the name of the timing phase's job, when a launcher runs it as a job


def _trained(run: Path) -> bool:
    """Whether ``run`` holds a finished training run."""
    state = read_state(run) if (run / CONFIG).exists() else None  # None: killed before its first checkpoint
    return bool(state and state.get("done"))


def _eval_todo(job: dict, cfg: RunConfig, run: Path, say: bool = False) -> list[tuple[EvalConfig, list[SampleConfig]]]:
    """The evaluation passes ``job`` still needs: (eval config, settings not yet in ``eval.json``), non-empty only.

    With ``job["raw"]`` the main (first) setting is also evaluated with the raw weights; with ``job["ema"]`` (the
    post-hoc EMA sweep, :func:`flopmatch.study.plan.ema_sweep`) with the raw weights and each post-hoc EMA too; with
    ``job["sweep"]`` (a selection run, :mod:`flopmatch.study.operating`) the sweep's settings on its small set, then,
    once they are all in ``eval.json``, its chosen points on the full set.
    """
    ecfg = from_dict(EvalConfig, job["eval"])
    settings = [from_dict(SampleConfig, s) for s in job["settings"]]
    done = _final_entries(run)
    objective, spec = make_objective(cfg.objective), net_spec_for(cfg)
    passes = [(ecfg, settings)]
    sweep = job.get("ema") or []
    if sweep and not snapshots(run):  # trained before post-hoc EMA existed: nothing to rebuild averages from
        if say:
            print(f"[study] {run.name}: no post-hoc EMA snapshots (trained by an earlier flopmatch); its --eval-ema "
                  f"evaluations are skipped", flush=True)
        sweep = []
    # Other weights are compared with the EMA run by run (report.findings.ema_analysis), never through FID's
    # bootstrap: it is left out there (~1 s of 5-6 per evaluation in the cpu preset).
    if job.get("raw") or sweep:
        passes.append((replace(ecfg, weights="model", timing=False, fid_boot=0), settings[:1]))
    for sigma in sweep:
        passes.append((replace(ecfg, weights=f"ema@{sigma:g}", timing=False, fid_boot=0), settings[:1]))
    if job.get("sweep"):  # the operating-point sweep (small set), then its chosen points on the full set
        sweep_ecfg = from_dict(EvalConfig, job["sweep_eval"])
        sweep = [from_dict(SampleConfig, s) for s in job["sweep"]]
        passes.append((sweep_ecfg, sweep))
        chosen = chosen_settings(run, cfg, sweep, sweep_ecfg)
        if chosen is None and say:
            print(f"[study] {run.name}: operating-point sweep of {len(sweep)} settings on {sweep_ecfg.num_samples} images",
                  flush=True)
        passes.append((replace(ecfg, timing=False), chosen or []))
    todo = []
    for ec, wanted in passes:
        missing = [s for s in wanted if entry_key(s, objective.resolve_steps(s, spec), ec) not in done]
        if missing:
            todo.append((ec, missing))
    return todo


def _final_entries(run: Path) -> dict:
    """The run's eval.json entries of its latest checkpoint: an entry of an earlier one (a `flopmatch eval` while the
    run trained) is to be redone, not reported as the trained run's result."""
    state = read_state(run)
    step = state["step"] if state else None
    return {k: e for k, e in read_eval_entries(run).items()
            if (e.get("manifest") or {}).get("checkpoint_step", step) == step}


def job_finished(job: dict) -> bool:
    """Whether ``job``'s run is trained and every setting it asks for is evaluated (read from the run directory)."""
    if "chain" in job:
        return all(job_finished(sub) for sub in job["chain"])
    cfg = from_dict(RunConfig, job["config"]).validate()
    run = Path(job["run_dir"])
    return _trained(run) and not _eval_todo(job, cfg, run)


def timing_job(study: Path, retime: bool) -> dict:
    """The job that runs a study's timing phase (``kind`` "timing"): every paradigm timed together, see timing_phase."""
    return {"name": TIMING_JOB, "kind": "timing", "study": str(study), "retime": retime}


def run_timing_job(job: dict, progress: bool = True) -> None:
    """Run the timing phase of the study ``job["study"]``, reading its settings from study.json and plan.json."""
    out = Path(job["study"])
    scfg = from_dict(StudyConfig, read_json(out / "study.json"))
    plans = [from_dict(RunPlan, p) for p in read_json(out / "plan.json")]
    ensure_timing(out, scfg, plans, retime=job.get("retime", False), progress=progress)


def chain_name(cfg: dict) -> str | None:
    """The job name of the chain a run of run config ``cfg`` (JSON) trains in, or None (a cosine run is its own job)."""
    if cfg["train"]["schedule"] == "cosine":
        return None
    return f"{cfg['objective']['name']}-d{cfg['model']['depth']}-s{cfg['train']['seed']}-{cfg['train']['schedule']}"


def chain_jobs(jobs: list[dict]) -> list[dict]:
    """Group the run jobs of a study whose runs can grow (train.schedule wsd or constant) into chains.

    One chain per (paradigm, depth, seed), its runs in increasing budget: each run then starts from the
    stable-phase state of the run before it (:func:`flopmatch.growth.branch_run`), so the chain trains the
    shared stable phase once. Cosine runs stay one job each. A chain is one job (a worker, a SLURM job).
    """
    out, chains = [], {}
    for job in jobs:
        name = chain_name(job["config"])
        if name is None:
            out.append(job)
            continue
        if name not in chains:
            chains[name] = {"name": name, "chain": []}
            out.append(chains[name])
        chains[name]["chain"].append(job)
    for chain in chains.values():
        chain["chain"].sort(key=lambda j: j["config"]["train"]["budget"])
    return [j["chain"][0] if "chain" in j and len(j["chain"]) == 1 else j for j in out]


def run_chain(job: dict, progress: bool = True) -> None:
    """Run a chain's jobs in increasing budget, each new run branched from the largest earlier run that can serve."""
    done: list[Path] = []
    for sub in job["chain"]:
        run = Path(sub["run_dir"])
        cfg = from_dict(RunConfig, sub["config"]).validate()
        dist.init(resolve_device(cfg.train.device))  # under torchrun: the main rank alone decides and assembles a branch
        if dist.is_main() and not (run / CONFIG).exists():
            objective, spec = make_objective(cfg.objective), net_spec_for(cfg)
            total = plan_steps(cfg.train.budget, objective.train_flops(spec), cfg.train.batch_size).steps
            for src in reversed(done):
                source = branch_source(src, cfg, total)
                if source is not None:
                    print(branch_run(src, run, cfg, source), flush=True)
                    break
        # Every rank waits for that decision: a rank deciding on its own could find the run directory before or
        # after the main rank created it, and the ranks would then train different things.
        dist.barrier()
        run_job(sub, progress)
        done.append(run)


def run_job(job: dict, progress: bool = True) -> None:
    """Train (or resume, or skip) one run, then evaluate every setting it still lacks.

    A study's jobs do not time (``eval.timing`` False): its timing phase times every paradigm together at the
    end (a job of ``kind`` "timing", :func:`run_timing_job`).
    """
    if job.get("kind") == "timing":
        return run_timing_job(job, progress)
    if job.get("kind") == "prepare":
        out = Path(job["study"])
        return prepare(out, from_dict(StudyConfig, read_json(out / "study.json")), progress)
    if "chain" in job:
        return run_chain(job, progress)
    cfg = from_dict(RunConfig, job["config"]).validate()
    run = Path(job["run_dir"])
    if not _trained(run):
        train(cfg, run, progress=progress)
    # One pass at a time, re-reading eval.json in between: the sweep's chosen points are known only once it is done.
    # Each pass adds its entries, so this ends; the bound is a guard against a pass that could not record its entries.
    for i in range(len(_eval_todo(job, cfg, run)) + 2):
        todo = _eval_todo(job, cfg, run, say=i == 0)
        if not todo:
            return
        evaluate(run, todo[0][1], todo[0][0], progress=progress)
        dist.barrier()  # every rank re-reads eval.json after the main rank wrote it
    raise RuntimeError(f"{run}: evaluations still missing after every pass ran: {_eval_todo(job, cfg, run)}")
