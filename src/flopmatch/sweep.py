"""Plan and run a study grid (paradigm x depth x budget x seed): locally in-process, in local worker
processes, or (later) on a cluster, all through one launcher interface.

Layout of a study directory::

    study/
      study.json          the StudyConfig
      plan.json           every run with its analytic FLOPs and estimated time (written first)
      tokenizers/kl, lfq  the matched learned tokenizers (trained once)
      jobs/<run>.json     what a worker process runs
      logs/<run>.log      a worker's output
      runs/<run>/         ordinary run directories (config.json, metrics.jsonl, checkpoint/, eval.json, samples/)

Every stage skips finished work (a finished run, an evaluated setting, a trained tokenizer) and
resumes interrupted work, so re-running ``flopmatch study`` after a crash or Ctrl-C continues.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from flopmatch.checkpoint import atomic_write_json, read_json
from flopmatch.config import RunConfig, SampleConfig, apply_overrides, from_dict, to_dict
from flopmatch.errors import UserError
from flopmatch.presets import StudyConfig


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
    return {"continuous": study / "tokenizers" / "kl", "discrete": study / "tokenizers" / "lfq"}


def base_config(scfg: StudyConfig, objective: str, depth: int, budget: float, seed: int, study: Path) -> RunConfig:
    """The RunConfig of one grid cell: shared overrides, then the cell's own axes."""
    cfg = RunConfig(objective=objective)
    apply_overrides(cfg, scfg.overrides)
    cfg.model.depth, cfg.train.budget, cfg.train.seed = depth, budget, seed
    cfg.sample.cfg = scfg.eval_cfg
    if scfg.tokenizer == "learned":
        from flopmatch.objectives import make_objective

        kind = make_objective(objective).tokens
        cfg.tokenizer.path = str(tokenizer_dirs(study)[kind].resolve())
    return cfg.validate()


def make_plan(scfg: StudyConfig, study: Path) -> list[RunPlan]:
    """Every run of the grid with analytic FLOPs (no model built, no data touched)."""
    from flopmatch.train import plan_steps

    scfg.validate()
    plans = []
    for objective in scfg.objectives:
        for depth in scfg.depths:
            for budget in scfg.budgets:
                for seed in range(scfg.seeds):
                    cfg = base_config(scfg, objective, depth, budget, seed, study)
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


def _analytic(cfg: RunConfig, scfg: StudyConfig):
    """Params and FLOPs of a config; before the learned tokenizers exist, from their autoencoder configs."""
    from flopmatch.flops import num_params
    from flopmatch.objectives import make_objective
    from flopmatch.plan import net_spec_for, text_dim_for
    from flopmatch.tokenizers.base import TokenizerSpec

    objective = make_objective(cfg.objective, cfg.method)
    if cfg.tokenizer.path and not Path(cfg.tokenizer.path, "tokenizer.json").exists():
        from flopmatch.tokenizers.train_ae import apply_overrides as ae_overrides
        from flopmatch.tokenizers.train_ae import preset as ae_preset

        ae = ae_overrides(ae_preset(scfg.tokenizer_preset, "kl" if objective.tokens == "continuous" else "lfq"),
                          list(scfg.tokenizer_overrides))
        grid = ae.image_size // (ae.patch * 2 ** (len(ae.channels) - 1))
        tok = (TokenizerSpec("continuous", grid, channels=ae.latent_channels, image_size=ae.image_size)
               if objective.tokens == "continuous" else
               TokenizerSpec("discrete", grid, vocab_size=2 ** ae.bits, image_size=ae.image_size))
        spec = objective.net_spec(cfg.model, tok, text_dim_for(cfg), cfg.text.max_len)
    else:
        spec = net_spec_for(cfg)
    return {"params": num_params(spec), "train_flops_per_example": objective.train_flops(spec),
                  "sample_flops_per_image": objective.sample_flops(spec, cfg.sample)}


def eval_settings(scfg: StudyConfig, cfg: RunConfig) -> list[SampleConfig]:
    """The run's default sampling setting first, then the preset's extra step counts for the sweep."""
    main = cfg.sample
    extra = [replace(main, steps=s) for s in scfg.eval_steps.get(cfg.objective, []) if s != main.steps]
    return [main] + extra


def format_plan(plans: list[RunPlan]) -> str:
    """A fixed-width table of the plan."""
    lines = [f"{'run':<34} {'params':>9} {'steps':>6} {'train FLOPs':>11} {'FLOPs/img':>10} {'est. time':>9}"]
    for p in plans:
        lines.append(f"{p.name:<34} {p.params:>9,} {p.steps:>6} {p.train_flops:>11.3g} {p.sample_flops_per_image:>10.3g} "
                     f"{_fmt_s(p.est_seconds):>9}")
    total = sum(p.est_seconds for p in plans)
    lines.append(f"{len(plans)} runs, {sum(p.train_flops for p in plans):.3g} training FLOPs, about {_fmt_s(total)} of training")
    return "\n".join(lines)


def _fmt_s(s: float) -> str:
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f}min" if s < 7200 else f"{s / 3600:.1f}h"


# ----------------------------------------------------------------------------- jobs and launchers


def run_job(job: dict, progress: bool = True) -> None:
    """Train (or resume, or skip) one run, then evaluate every setting it still lacks.

    With ``job["raw"]`` the main (first) setting is also evaluated with the raw weights, without
    timing (same architecture, same cost as the EMA entry).
    """
    from flopmatch.evaluation.run import EvalConfig, entry_key, evaluate
    from flopmatch.objectives import make_objective
    from flopmatch.plan import net_spec_for
    from flopmatch.train import read_state, train

    cfg = from_dict(RunConfig, job["config"]).validate()
    run = Path(job["run_dir"])
    state = read_state(run) if (run / "config.json").exists() else None
    if not (state and state.get("done")):
        train(cfg, run, progress=progress)
    ecfg = from_dict(EvalConfig, job["eval"])
    settings = [from_dict(SampleConfig, s) for s in job["settings"]]
    done = read_json(run / "eval.json")["entries"] if (run / "eval.json").exists() else {}
    objective, spec = make_objective(cfg.objective, cfg.method), net_spec_for(cfg)
    passes = [(ecfg, settings)]
    if job.get("raw"):
        passes.append((replace(ecfg, weights="model", inference=False), settings[:1]))
    for ec, wanted in passes:
        todo = [s for s in wanted if entry_key(s, objective.resolve_steps(s, spec), ec) not in done]
        if todo:
            evaluate(run, todo, ec, progress=progress)


class InProcessLauncher:
    """Runs jobs one after another in this process (the default; Ctrl-C checkpoints the current run)."""

    name = "in-process"

    def run(self, jobs: list[dict], on_done) -> list[str]:
        failed = []
        for job in jobs:
            run_job(job)
            on_done(job)
        return failed


class LocalWorkersLauncher:
    """Runs jobs in N local worker processes (``python -m flopmatch.sweep JOBFILE``), threads split evenly.

    Each worker gets ``cpu_count // N`` torch threads (at least 1), or ``FLOPMATCH_THREADS`` if that is
    set: oversubscribing cores (N workers x all threads) made training many times slower here.
    A failed job is reported with its log file and does not stop the others.
    """

    name = "local-workers"

    def __init__(self, workers: int, study: Path):
        self.workers, self.study = workers, study

    def run(self, jobs: list[dict], on_done) -> list[str]:
        threads = int(os.environ.get("FLOPMATCH_THREADS") or max(1, (os.cpu_count() or 1) // self.workers))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), FLOPMATCH_THREADS=str(threads))
        pending, running, failed = list(jobs), [], []
        (self.study / "logs").mkdir(parents=True, exist_ok=True)
        try:
            while pending or running:
                while pending and len(running) < self.workers:
                    job = pending.pop(0)
                    path = self.study / "jobs" / f"{job['name']}.json"
                    atomic_write_json(path, job)
                    log = open(self.study / "logs" / f"{job['name']}.log", "a")
                    proc = subprocess.Popen([sys.executable, "-m", "flopmatch.sweep", str(path)], stdout=log,
                                            stderr=subprocess.STDOUT, env=env)
                    running.append((proc, job, log))
                time.sleep(0.5)
                for item in list(running):
                    proc, job, log = item
                    if proc.poll() is not None:
                        running.remove(item)
                        log.close()
                        if proc.returncode == 0:
                            on_done(job)
                        else:
                            failed.append(f"{job['name']} (exit {proc.returncode}; see {self.study / 'logs' / (job['name'] + '.log')})")
        except KeyboardInterrupt:
            for proc, _, _ in running:  # workers got the same SIGINT and checkpoint; wait for them
                proc.wait()
            raise
        return failed


def make_launcher(name: str, workers: int, study: Path):
    """Launcher by name: "local" (in-process when workers == 1, worker processes otherwise)."""
    if name == "local":
        return InProcessLauncher() if workers <= 1 else LocalWorkersLauncher(workers, study)
    raise UserError(f"unknown launcher {name!r}; available: local (SLURM comes with a later release)")


# ----------------------------------------------------------------------------- the study


def ensure_tokenizers(study: Path, scfg: StudyConfig, progress: bool = True) -> None:
    """Train the matched KL and LFQ tokenizers once (a complete, loadable directory is reused)."""
    if scfg.tokenizer != "learned":
        return
    from flopmatch.data.prepare import make_dataset
    from flopmatch.tokenizers import load_tokenizer
    from flopmatch.tokenizers.train_ae import apply_overrides as ae_overrides
    from flopmatch.tokenizers.train_ae import preset as ae_preset
    from flopmatch.tokenizers.train_ae import train_autoencoder

    probe = base_config(scfg, scfg.objectives[0], scfg.depths[0], scfg.budgets[0], 0, study)
    dataset = make_dataset(probe.data, "train")
    needed = {("continuous" if o == "diffusion" else "discrete") for o in scfg.objectives}
    for kind, directory in tokenizer_dirs(study).items():
        if kind not in needed:
            continue
        if (directory / "tokenizer.json").exists():
            try:
                load_tokenizer(directory)
                continue
            except UserError:
                pass  # damaged: retrain
        ae_kind = "kl" if kind == "continuous" else "lfq"
        cfg = ae_overrides(ae_preset(scfg.tokenizer_preset, ae_kind), list(scfg.tokenizer_overrides))
        cfg.num_train, cfg.data_seed = probe.data.num_train, probe.data.seed
        print(f"[study] training the {ae_kind} tokenizer ({cfg.steps} steps) -> {directory}")
        train_autoencoder(cfg, dataset.images_uint8(), out_dir=directory,
                          data_info={"dataset": "shapes", "fingerprint": dataset.fingerprint()}, progress=progress)


def study(out: str | Path, scfg: StudyConfig, workers: int = 1, launcher: str = "local", progress: bool = True) -> dict:
    """Plan, train, evaluate and report a whole study in ``out``; re-running continues where it stopped."""
    out = Path(out)
    scfg.validate()
    if (out / "study.json").exists():
        old = read_json(out / "study.json")
        if old != asdict(scfg):
            raise UserError(f"{out} holds a study with different settings; use another --out or the same options "
                            f"(saved in {out / 'study.json'})")
    elif out.exists() and any(p for p in out.iterdir() if p.name not in ("study.json", "plan.json")):
        raise UserError(f"{out} exists and is not a flopmatch study directory; choose another --out")
    plans = make_plan(scfg, out)
    atomic_write_json(out / "study.json", asdict(scfg))
    atomic_write_json(out / "plan.json", [asdict(p) for p in plans])
    print(format_plan(plans))
    t0 = time.perf_counter()
    ensure_tokenizers(out, scfg, progress)
    from flopmatch.evaluation.run import EvalConfig

    ecfg = EvalConfig(num_samples=scfg.eval_samples, features=list(scfg.features), timing_budget_s=scfg.timing_budget_s)
    jobs = []
    for p in plans:
        cfg = from_dict(RunConfig, p.config)
        jobs.append({"name": p.name, "run_dir": str(out / "runs" / p.name), "config": p.config, "eval": asdict(ecfg),
                     "settings": [asdict(s) for s in eval_settings(scfg, cfg)], "raw": scfg.eval_raw})
    finished = [0]

    def on_done(job):
        finished[0] += 1
        print(f"[study] {finished[0]}/{len(jobs)} done: {job['name']} ({_fmt_s(time.perf_counter() - t0)} elapsed)")

    failed = make_launcher(launcher, workers, out).run(jobs, on_done)
    if failed:
        raise UserError(f"{len(failed)} run(s) failed: {'; '.join(failed)}; fix and re-run to continue")
    from flopmatch.report import build_report

    result = build_report(out, n_boot=scfg.n_boot)
    print(f"[study] report: {out / 'report.html'} ({_fmt_s(time.perf_counter() - t0)})")
    return result


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: ``python -m flopmatch.sweep JOBFILE``."""
    import torch

    argv = sys.argv[1:] if argv is None else argv
    threads = os.environ.get("FLOPMATCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    try:
        run_job(json.loads(Path(argv[0]).read_text()), progress=False)
    except UserError as e:
        print(f"flopmatch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
