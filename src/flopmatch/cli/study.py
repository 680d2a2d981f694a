"""``flopmatch study``: parsing only (the work is in flopmatch.study)."""

from __future__ import annotations

import argparse
from pathlib import Path

from flopmatch.errors import UserError


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    vals = _floats(text)
    if any(not v.is_integer() for v in vals):
        raise UserError(f"expected comma-separated integers, got {text!r}")
    return [int(v) for v in vals]


def cmd_study(args) -> int:
    """Plan (or, with --plan-only, just print) and run a study."""
    # Imported when the command runs, not at the top: the CLI modules load no torch, so that
    # `flopmatch --help` and argument errors answer at once.
    from flopmatch.study.plan import format_plan, make_plan
    from flopmatch.study.presets import study_preset
    from flopmatch.study.runner import study

    scfg = study_preset(args.preset)
    if args.objectives:
        scfg.objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    if args.depths:
        scfg.depths = _ints(args.depths)
    if args.budgets:
        scfg.budgets = _floats(args.budgets)
    if args.seeds is not None:
        scfg.seeds = args.seeds
    if args.eval_samples is not None:
        scfg.eval_samples = args.eval_samples
    if args.eval_raw is not None:
        scfg.eval_raw = args.eval_raw
    scfg.overrides = scfg.overrides + list(args.set)
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.plan_only:
        print(format_plan(make_plan(scfg.validate(), Path(args.out))))
        return 0
    study(args.out, scfg, workers=args.workers, launcher=args.launcher)
    return 0


def register(sub) -> None:
    """Add ``study`` to the top-level subparsers."""
    p = sub.add_parser("study", help="run the compute-matched comparison end to end and write the report")
    p.add_argument("--preset", default="cpu", help="cpu (default, ~13 min on 2 idle cores), cpu-long (~1 h), gpu, tiny")
    p.add_argument("--out", default="study", help="study directory (default: study/)")
    p.add_argument("--objectives", help="comma-separated subset of diffusion,masked,autoregressive")
    p.add_argument("--depths", help="comma-separated depths, e.g. 1,2,3")
    p.add_argument("--budgets", help="comma-separated training FLOP budgets, e.g. 1e12,3e12,1e13")
    p.add_argument("--seeds", type=int, help="seeds per grid cell")
    p.add_argument("--eval-samples", type=int, help="generated images per evaluated setting")
    p.add_argument("--eval-raw", action=argparse.BooleanOptionalAction, default=None,
                   help="also evaluate each run's main setting with raw (non-EMA) weights, for the EMA finding "
                        "(default: on for cpu-long and gpu)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override for every run")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (default 1: in-process)")
    p.add_argument("--launcher", default="local", help="local (default)")
    p.add_argument("--plan-only", action="store_true", help="print the plan and exit")
    p.set_defaults(func=cmd_study)
