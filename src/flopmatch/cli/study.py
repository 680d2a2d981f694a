"""``flopmatch study``: parsing only (the work is in flopmatch.study)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from flopmatch import PARADIGMS
from flopmatch.cli.args import DATA_HELP, count, data_source, described, number_list, output_dir, positive_seconds
from flopmatch.config import RunConfig, apply_overrides, check_holdout
from flopmatch.errors import UserError
from flopmatch.study.presets import STUDY_PRESETS

SLURM_FLAGS = ("partition", "gpus_per_run", "cpus_per_run", "slurm_time", "slurm_account", "slurm_mem_gb", "slurm_poll",
               "slurm_qos", "slurm_constraint", "slurm_setup", "slurm_extra", "slurm_timing_exclusive")
DEFAULT_PRESET = "cpu"  # of a new study directory (an existing one defaults to its own settings)


def _objectives(text: str) -> list[str]:
    """A non-empty comma-separated subset of the paradigms."""
    names = [o.strip() for o in text.split(",") if o.strip()]
    bad = [o for o in names if o not in PARADIGMS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(PARADIGMS)}, got {text!r}")
    return names


def ema_lengths(text: str) -> list[float]:
    """``--eval-ema``: comma-separated sigma_rel values in (0, 0.3], or ``none``."""
    if text.strip().lower() == "none":
        return []
    values = number_list(float, 0, exclusive=True)(text)
    if any(v > 0.3 for v in values):
        raise argparse.ArgumentTypeError(f"post-hoc EMA lengths are relative (sigma_rel <= 0.3), got {text!r}")
    return values


def guidance_list(text: str) -> list[float]:
    """``--sweep-guidance``: comma-separated guidance scales >= 1 (1 = no guidance), or ``none``."""
    if text.strip().lower() == "none":
        return []
    values = number_list(float, 1)(text)
    return sorted(set(values))


def guidance_scale(text: str) -> float:
    """``--eval-guidance``: one finite guidance scale >= 0 (1 = no guidance, 0 = unconditional)."""
    values = number_list(float, 0)(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one guidance scale, got {text!r} (--sweep-guidance takes a list)")
    return values[0]


def decibels(text: str) -> float:
    """``--tokenizer-match``: a finite PSNR tolerance in dB, >= 0 (0 = off)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a PSNR tolerance in dB >= 0 (0 = off), got {text!r}")
    return value


def preset_defaults(name: str, show=str) -> str:
    """The presets' values of the StudyConfig field ``name``, for a flag's help: 'cpu and tiny 0; cpu-long and gpu 0.5'."""
    values: dict[str, list[str]] = {}
    for preset, make in STUDY_PRESETS.items():
        values.setdefault(show(getattr(make(), name)), []).append(preset)
    names = {value: ", ".join(presets[:-1]) + " and " * (len(presets) > 1) + presets[-1] for value, presets in values.items()}
    return "; ".join(f"{presets} {value}" for value, presets in names.items())


def _last_of_each(items: list[str]) -> list[str]:
    """``items`` with each repeated string kept at its last place only (overrides apply in order: the last wins)."""
    return list(reversed(dict.fromkeys(reversed(items))))


def cmd_study(args) -> int:
    """Plan (or, with --plan-only, just print) and run a study."""
    given = [f"--{k.replace('_', '-')}" for k in SLURM_FLAGS if getattr(args, k) is not None]
    if given and args.launcher != "slurm":
        raise UserError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only with --launcher slurm")
    if args.launcher == "slurm" and args.workers > 1:
        raise UserError("--workers applies only with --launcher local (on SLURM every run is its own job)")
    # Imported when the command runs, not at the top: the CLI modules load no torch, so that
    # `flopmatch --help` and argument errors answer at once.
    from flopmatch.study.launchers import concurrent_runs
    from flopmatch.study.presets import check_grid_overrides, study_preset
    from flopmatch.study.runner import preview, saved_study, study
    from flopmatch.study.slurm import SlurmConfig, parse_extra, parse_slurm_time

    # Without --preset, a study directory's own settings are the defaults (growing it names only what it adds);
    # with it, or in a new directory, the preset's.
    saved = saved_study(Path(args.out)) if args.preset is None else None
    scfg = saved or study_preset(args.preset or DEFAULT_PRESET)
    if saved is not None:
        print(f"[study] {args.out} holds a study: settings this command does not give are its own ({args.out}/study.json)",
              flush=True)
    for name in ("objectives", "depths", "budgets", "seeds", "floor_seeds", "base_seed", "eval_samples", "eval_raw",
                 "eval_ema", "sweep_guidance", "sweep_samples", "tokenizer", "tokenizer_match", "eval_guidance"):  # given flags replace the preset's
        if getattr(args, name) is not None:
            setattr(scfg, name, getattr(args, name))
    if args.eval_samples is not None and args.sweep_samples is None:  # the sweep is a small set: no larger than the full
        scfg.sweep_samples = max(10, min(scfg.sweep_samples, scfg.eval_samples))
    check_grid_overrides(args.set)
    # (a setting repeated from the saved study's command line is kept once, at its last place: later ones win)
    scfg.overrides = _last_of_each(scfg.overrides + ([f"data.name={args.data}"] if args.data else []) + list(args.set))
    # the preset's shapes holdout is dropped on another source (study.plan.shared_config); one the user sets is refused
    data_name = apply_overrides(RunConfig(), scfg.overrides).data.name
    check_holdout(apply_overrides(RunConfig(), [f"data.name={data_name}", *args.set]).data)
    if args.tokenizer_set and scfg.tokenizer != "learned":
        raise UserError(f"--tokenizer-set configures the study's learned tokenizers; this study's are {scfg.tokenizer} "
                        f"(--tokenizer learned to train them)")
    scfg.tokenizer_overrides = _last_of_each(scfg.tokenizer_overrides + list(args.tokenizer_set))
    slurm = None
    if args.launcher == "slurm":
        given = {"partition": args.partition, "gpus_per_run": args.gpus_per_run, "cpus_per_run": args.cpus_per_run,
                 "time_min": parse_slurm_time(args.slurm_time) if args.slurm_time else None,
                 "account": args.slurm_account, "mem_gb": args.slurm_mem_gb, "poll_s": args.slurm_poll,
                 "qos": args.slurm_qos, "constraint": args.slurm_constraint, "setup": args.slurm_setup,
                 "extra": parse_extra(args.slurm_extra) if args.slurm_extra else None,
                 "timing_exclusive": args.slurm_timing_exclusive}
        slurm = SlurmConfig(**{k: v for k, v in given.items() if v is not None})  # unset: SlurmConfig's defaults
    if args.plan_only:  # checked as the study would be, SLURM's settings too
        preview(Path(args.out), scfg, calibrate=args.calibrate and args.launcher != "slurm",
                concurrent=concurrent_runs(args.workers) if args.launcher == "local" else 1,
                report_workers=None if args.launcher == "local" else 1, slurm=slurm)
        return 0
    study(args.out, scfg, workers=args.workers, launcher=args.launcher, retime=args.retime, slurm=slurm,
          # the report's trend fits on this machine's cores (this is a guarded main); under SLURM the study process
          # runs on a login node, which is shared: one process there
          calibrate_host=args.calibrate, report_workers=None if args.launcher == "local" else 1)
    return 0


def register(sub) -> None:
    """Add ``study`` to the top-level subparsers."""
    p = sub.add_parser(
        "study", help="run the compute-matched comparison end to end and write the report",
        **described(
            "Plan, train, evaluate and time every run of the study in --out, then write its report (report.html, "
            "report.md, results.csv, report_figures/). Re-running "
                    "the command continues where it stopped. Studies grow: on an existing --out, the study's own "
                    "settings are the defaults, and --objectives, --depths, --budgets, --seeds, --floor-seeds, "
                    "--eval-raw, --eval-ema or --sweep-guidance with more values train and evaluate only the new cells "
                    "(the variance seeds and the post-hoc EMA sweep stay at the budget where they began). A change "
                    "that would make old and new cells incomparable (another --set, tokenizer, sample count, or a "
                    "machine where train.device or train.precision auto resolves otherwise) is refused, naming it; "
                    "so is dropping a cell that has begun. Planned cells that never began (a mistyped budget) may be "
                    "dropped again.", """
            flopmatch study                                   # the cpu preset on the built-in shapes, into study/
            flopmatch study --plan-only                       # the plan and its time estimate for this machine
            flopmatch study --out study --budgets 7e10,1.7e11,4.2e11,1e12,2.5e12,6e12   # grow: only the new cells
            flopmatch study --data folder:my_images --preset cpu-long --out mine
            flopmatch study --launcher slurm --partition gpu --gpus-per-run 1 --preset gpu --out big
            """))
    p.add_argument("--preset", choices=STUDY_PRESETS,
                   help="cpu (default for a new --out; an existing study's own settings are the default there, so "
                        "growing it names only what it adds; ~7 min on 2 idle cores with bf16 matmuls, several times that "
                        "without; --plan-only estimates it for this machine), "
                        "cpu-long (~1 h), gpu, tiny (seconds of training; for smoke tests; on your own data the domain CLIP "
                        "that scores prompts trains once first, minutes on a CPU)")
    p.add_argument("--out", default="study", type=output_dir, help="study directory (default: study/)")
    p.add_argument("--objectives", type=_objectives, help="comma-separated subset of diffusion,masked,autoregressive (default: all)")
    p.add_argument("--depths", type=number_list(int, 1), help="comma-separated depths, e.g. 1,2,3 (default: the preset's)")
    p.add_argument("--budgets", type=number_list(float, 0, exclusive=True),
                   help="comma-separated training FLOP budgets, e.g. 1e12,3e12,1e13 (default: the preset's)")
    p.add_argument("--seeds", type=count(1), help="seeds per grid cell (default: the preset's)")
    p.add_argument("--floor-seeds", type=count(0), help="extra seeds at the middle budget that measure seed variance "
                   "for the whole study (default: the preset's)")
    p.add_argument("--base-seed", type=count(0), help="base seed (default 0): base b trains seeds 1000 b, 1000 b + 1, ...; "
                   "another base repeats the study with new seeds, and its seeds can still grow")
    p.add_argument("--eval-samples", type=count(10), help="generated images per evaluated setting (default: the preset's)")
    p.add_argument("--eval-guidance", type=guidance_scale, metavar="G",
                   help="classifier-free guidance scale of every run's main setting, the one the verdicts compare "
                        "(1 = none; default: the preset's, 3)")
    p.add_argument("--eval-raw", action=argparse.BooleanOptionalAction, default=None,
                   help="also evaluate each run's main setting with raw (non-EMA) weights, for the EMA finding "
                        "(default: on for cpu-long and gpu)")
    p.add_argument("--eval-ema", type=ema_lengths, metavar="SIGMA_REL,...",
                   help="post-hoc EMA lengths (sigma_rel in (0, 0.3]) at which the runs at the middle budget are also "
                        "evaluated, with their raw weights, for the report's EMA section; none to skip "
                        "(default: the preset's: cpu 0.05,0.2; cpu-long 0.05,0.1,0.2; gpu 0.03,0.05,0.1,0.2)")
    p.add_argument("--sweep-guidance", type=guidance_list, metavar="G,...",
                   help="guidance scales (>= 1; 1 = none) of the operating-point sweep: at the largest budget each "
                        "paradigm's lowest seed is evaluated at each scale x its step counts on --sweep-samples images, "
                        "and the front it finds is evaluated in full and timed, so latency and throughput are compared "
                        "at matched quality; none to skip (default: the preset's: cpu 1,2,3,5; cpu-long and gpu "
                        "1,1.5,2,3,5)")
    p.add_argument("--sweep-samples", type=count(10), help="images per setting of the operating-point sweep (default: "
                   "the preset's: cpu 100, cpu-long 200, gpu 1000)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key for every run (repeatable; see `flopmatch config --preset P`)")
    p.add_argument("--tokenizer-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the study's learned tokenizers' config (repeatable), e.g. steps=1200 to "
                        "train them longer (see `flopmatch tokenizer train --help` for the keys)")
    p.add_argument("--tokenizer", choices=("learned", "weight-free"),
                   help="learned: matched KL + LFQ autoencoders trained by the study (KL latents for diffusion, LFQ codes "
                        "for the token paradigms); weight-free: pixel patches for diffusion and a k-means codebook for the "
                        f"token paradigms, the ablation without learned tokenizers (default: the preset's: "
                        f"{preset_defaults('tokenizer')})")
    p.add_argument("--tokenizer-match", type=decibels, metavar="DB",
                   help="match the learned tokenizers' reconstruction quality: retrain the one with the lower validation "
                        "PSNR from scratch with 2x, then 4x its steps (at most 4x: StudyConfig.tokenizer_match_max) until the "
                        "two are within DB dB; the report states the gap either way; minutes of tokenizer training on a "
                        "CPU; 0 = off, both train the configured steps "
                        f"(default: the preset's: {preset_defaults('tokenizer_match', lambda v: f'{v:g}')})")
    p.add_argument("--data", type=data_source, help=DATA_HELP + " (default: the preset's, shapes)")
    p.add_argument("--workers", type=count(1), default=1, help="local worker processes (default 1: in-process)")
    p.add_argument("--launcher", default="local", choices=("local", "slurm"),
                   help="where runs execute: local (this machine, --workers processes) or slurm (one SLURM job per run "
                        "through submitit; re-running the study finds queued and running jobs) (default: local)")
    g = p.add_argument_group(
        "SLURM (with --launcher slurm)",
        "One job per run, through this machine's SLURM client (SLURM_CONF, if set, names the cluster's slurm.conf); "
        "the study checks with sinfo and sbatch --test-only, before writing anything, that a node of the partition "
        "(of one of a list) can run the jobs and the request is valid. Jobs "
        "outlive Ctrl-C and the study process: re-running the same command finds them, skips finished runs and "
        "resubmits failed ones, which resume from their checkpoints. Worker logs: OUT/logs/<run>.log; job ids and "
        "submitit's folders: OUT/slurm/jobs.json; job names flopmatch-<run>-<hash of OUT>. A job reaching "
        "--slurm-time checkpoints and is requeued (at most 100 times); a job preempted and not requeued "
        "(PreemptMode=CANCEL) or lost with its node is submitted again. Every SLURM command is bounded in time (sbatch 120 s): an "
        "unresponsive controller is an error, not a hang.")
    g.add_argument("--partition", help="SLURM partition, or a comma-separated list: each job starts in the first listed "
                   "that can run it (default: the cluster's default)")
    g.add_argument("--gpus-per-run", type=count(0), help="GPUs per run; > 1 starts torchrun inside the job, 0 = CPU "
                   "only (default 1)")
    g.add_argument("--cpus-per-run", type=count(1), help="CPU cores per run (default 8)")
    g.add_argument("--slurm-time", help="time limit per job: minutes, HH:MM:SS or D-HH:MM:SS; a run that reaches it "
                   "checkpoints and is requeued (default 4:00:00)")
    g.add_argument("--slurm-account", help="SLURM account to charge (default: yours)")
    g.add_argument("--slurm-mem-gb", type=count(1), help="memory per job in GB (default: the partition's)")
    g.add_argument("--slurm-poll", type=positive_seconds, help="seconds between squeue polls (default 10)")
    g.add_argument("--slurm-qos", metavar="QOS", help="sbatch --qos of every job (default: the account's)")
    g.add_argument("--slurm-constraint", metavar="FEATURES",
                   help="sbatch --constraint of every job, e.g. a GPU type such as a100 (default: none)")
    g.add_argument("--slurm-setup", action="append", metavar="SHELL_LINE",
                   help="a shell line each job runs before the worker, e.g. 'module load cuda' or 'export "
                        "NCCL_IB_DISABLE=1' (repeatable, in order; the worker runs this study's Python, so activating "
                        "another environment here changes nothing)")
    g.add_argument("--slurm-extra", action="append", metavar="KEY=VALUE",
                   help="another sbatch option for every job, e.g. reservation=r1 or mail-type=FAIL; a bare KEY for a "
                        "flag (repeatable; options with a flag of their own are refused)")
    g.add_argument("--slurm-timing-exclusive", action=argparse.BooleanOptionalAction, default=None,
                   help="run the timing phase's job alone on its node (sbatch --exclusive), so that latency and "
                        "throughput are measured on a quiet machine; --no-slurm-timing-exclusive where a site "
                        "forbids it (default: on)")
    p.add_argument("--retime", action="store_true",
                   help="measure inference latency/throughput again, every paradigm together (default: reuse the study's)")
    p.add_argument("--plan-only", action="store_true", help="print the plan and its time estimate, and exit")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="estimate the wall time from the preset's assumed FLOP/s instead of first timing a few training "
                        "steps, a sampling batch and the feature extractors of each planned network on this machine "
                        "(seconds on the cpu presets; always off with --launcher slurm, whose runs execute elsewhere)")
    p.set_defaults(func=cmd_study)
