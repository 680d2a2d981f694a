"""``flopmatch study``: parsing only (the work is in flopmatch.study)."""

from __future__ import annotations

import argparse
from pathlib import Path

from flopmatch import PARADIGMS
from flopmatch.cli.args import DATA_HELP, count, data_source, number_list, output_dir
from flopmatch.study.presets import STUDY_PRESETS


def _objectives(text: str) -> list[str]:
    """A non-empty comma-separated subset of the paradigms."""
    names = [o.strip() for o in text.split(",") if o.strip()]
    bad = [o for o in names if o not in PARADIGMS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(PARADIGMS)}, got {text!r}")
    return names


def cmd_study(args) -> int:
    """Plan (or, with --plan-only, just print) and run a study."""
    # Imported when the command runs, not at the top: the CLI modules load no torch, so that
    # `flopmatch --help` and argument errors answer at once.
    from flopmatch.study.estimate import estimate, format_estimate
    from flopmatch.study.plan import format_plan, make_plan
    from flopmatch.study.presets import study_preset
    from flopmatch.study.runner import study

    scfg = study_preset(args.preset)
    for name in ("objectives", "depths", "budgets", "seeds", "floor_seeds", "base_seed", "eval_samples", "eval_raw"):  # given flags replace the preset's
        if getattr(args, name) is not None:
            setattr(scfg, name, getattr(args, name))
    scfg.overrides = scfg.overrides + ([f"data.name={args.data}"] if args.data else []) + list(args.set)
    if args.plan_only:
        plans = make_plan(scfg.validate(), Path(args.out))
        print(format_plan(plans))
        est = estimate(scfg, plans, Path(args.out))
        print(format_estimate(est))
        return 0
    study(args.out, scfg, workers=args.workers, launcher=args.launcher, retime=args.retime)
    return 0


def register(sub) -> None:
    """Add ``study`` to the top-level subparsers."""
    p = sub.add_parser("study", help="run the compute-matched comparison end to end and write the report")
    p.add_argument("--preset", default="cpu", choices=STUDY_PRESETS,
                   help="cpu (default, 13-20 min on 2 idle cores), cpu-long (~1 h), gpu, tiny (seconds of training; for smoke tests)")
    p.add_argument("--out", default="study", type=output_dir, help="study directory (default: study/)")
    p.add_argument("--objectives", type=_objectives, help="comma-separated subset of diffusion,masked,autoregressive (default: all)")
    p.add_argument("--depths", type=number_list(int, 1), help="comma-separated depths, e.g. 1,2,3 (default: the preset's)")
    p.add_argument("--budgets", type=number_list(float, 0, exclusive=True),
                   help="comma-separated training FLOP budgets, e.g. 1e12,3e12,1e13 (default: the preset's)")
    p.add_argument("--seeds", type=count(1), help="seeds per grid cell (default: the preset's)")
    p.add_argument("--floor-seeds", type=count(0), help="extra seeds at the middle budget that measure seed variance "
                   "for the whole study (default: the preset's)")
    p.add_argument("--base-seed", type=count(0), help="first training seed (default 0); another base repeats the study "
                   "with new seeds")
    p.add_argument("--eval-samples", type=count(10), help="generated images per evaluated setting (default: the preset's)")
    p.add_argument("--eval-raw", action=argparse.BooleanOptionalAction, default=None,
                   help="also evaluate each run's main setting with raw (non-EMA) weights, for the EMA finding "
                        "(default: on for cpu-long and gpu)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key for every run (repeatable; see `flopmatch config --preset P`)")
    p.add_argument("--data", type=data_source, help=DATA_HELP + " (default: the preset's, shapes)")
    p.add_argument("--workers", type=count(1), default=1, help="local worker processes (default 1: in-process)")
    p.add_argument("--launcher", default="local", choices=("local",), help="where runs execute (default: local)")
    p.add_argument("--retime", action="store_true",
                   help="measure inference latency/throughput again, every paradigm together (default: reuse the study's)")
    p.add_argument("--plan-only", action="store_true", help="print the plan and exit")
    p.set_defaults(func=cmd_study)
