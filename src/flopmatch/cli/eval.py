"""``flopmatch eval``: parsing only (the work is in flopmatch.evaluation.run)."""

from __future__ import annotations

import argparse
import itertools
from dataclasses import replace
from pathlib import Path

from flopmatch.cli.args import (
    WEIGHTS_HELP,
    add_solver_args,
    config_value,
    count,
    described,
    output_dir,
    output_file,
    raw_or_weights,
    weights_name,
)
from flopmatch.config import SampleConfig, check_sample_fields
from flopmatch.errors import UserError

SWEEPABLE = ("steps", "guidance", "temperature", "top_k", "solver", "shift")  # SampleConfig fields
ALIASES = {"cfg": "guidance"}  # sweep names accepted for compatibility


def parse_sweeps(items: list[str]) -> dict[str, list]:
    """['steps=4,8', 'guidance=1,2'] -> {'steps': [4, 8], 'guidance': [1.0, 2.0]} (typed; unknown names are errors; 'cfg' = 'guidance')."""
    out = {}
    for item in items or []:
        name, _, values = item.partition("=")
        name = name.strip().replace("-", "_")
        name = ALIASES.get(name, name)
        if name not in SWEEPABLE or not values.strip():
            raise UserError(f"--sweep expects NAME=v1,v2,... with NAME in {', '.join(SWEEPABLE)}; got {item!r}")
        parse = config_value(SampleConfig, name)  # the same parsing and range check as --set sample.NAME
        try:
            out[name] = [parse(v.strip()) for v in values.split(",") if v.strip()]
        except argparse.ArgumentTypeError as e:
            raise UserError(f"--sweep {item!r}: {e}") from None
        if not out[name]:
            raise UserError(f"--sweep {item!r}: no values; give NAME=v1,v2,...")
    return out


def feature_list(text: str) -> list[str]:
    """``--features``: comma-separated feature extractor names (checked when built), or none (no image-quality
    metrics: prompt following and cost only)."""
    if text.strip().lower() == "none":
        return []
    names = [f.strip() for f in text.split(",") if f.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected extractor names (effnet, inception) or none, got {text!r}")
    return list(dict.fromkeys(names))


def npz_file(text: str) -> str:
    """An argparse type for an existing ``.npz`` file to read (``--ref-stats``); made absolute."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{path} is not a file (write one with flopmatch eval RUN --export-ref FILE.npz)")
    return str(path.resolve())


def new_npz_file(text: str) -> str:
    """An argparse type for an ``.npz`` file to write (``--export-ref``): ends in .npz, creatable; made absolute."""
    if Path(text).suffix != ".npz":
        raise argparse.ArgumentTypeError(f"expected a file name ending in .npz, got {text!r}")
    return str(Path(output_file(text)).resolve())


def cmd_eval(args) -> int:
    """Evaluate a run under one or more sampling settings and print a summary per setting."""
    # Imported when the command runs, not at the top: the CLI modules load no torch, so that
    # `flopmatch --help` and argument errors answer at once.
    from flopmatch import dist
    from flopmatch.config import validate_sample
    from flopmatch.evaluation.report_lines import summary_lines
    from flopmatch.evaluation.run import EvalConfig, evaluate
    from flopmatch.rundir import read_config

    run = Path(args.run)
    cfg = read_config(run)
    fixed = {k: getattr(args, k) for k in SWEEPABLE if getattr(args, k, None) is not None}
    base = replace(cfg.sample, **fixed, **({"compile": True} if args.compile else {}))
    sweeps = parse_sweeps(args.sweep)
    both = [k for k in sweeps if k in fixed]  # a swept setting replaces the fixed value: say so instead of dropping it
    if both:
        flag = "--" + both[0].replace("_", "-")
        raise UserError(f"{flag} {fixed[both[0]]} and --sweep {both[0]}=... both set {both[0]}; add {fixed[both[0]]} to "
                        f"the sweep's values, or drop {flag}")
    check_sample_fields(cfg.objective.name, [*fixed, *(["compile"] if args.compile else [])])
    check_sample_fields(cfg.objective.name, sweeps, lambda name: f"--sweep {name}")
    names = list(sweeps)
    settings = [replace(base, **dict(zip(names, combo))) for combo in itertools.product(*sweeps.values())] if names else [base]
    for s in settings:
        validate_sample(s)
    features = args.features
    ecfg = EvalConfig(num_samples=args.num_samples, seed=args.seed, weights=raw_or_weights(args),
                      features=features, timing=not args.no_timing, batch_size=args.batch_size,
                      export=str(Path(args.export).resolve()) if args.export else "",
                      export_ref=args.export_ref or "", ref_stats=args.ref_stats or "",
                      **({} if args.fid_boot is None else {"fid_boot": args.fid_boot}))
    doc = evaluate(run, settings, ecfg)
    if not dist.is_main():  # under torchrun the other ranks only sampled their batches; the main rank reports
        return 0
    for line in summary_lines(doc, only=None):
        print(line)
    print(f"wrote {run / 'eval.json'}")
    return 0


def register(sub) -> None:
    """Add ``eval`` to the top-level subparsers."""
    p = sub.add_parser("eval", help="measure image quality, prompt following and inference cost of a run", **described(
        """Measure a run's image quality (FID, KID, precision/recall against its evaluation split), prompt following
        and inference cost (analytic sampling FLOPs; latency and throughput, all settings timed together) at one
        sampling setting, or every combination of the --sweep values. Writes RUN/eval.json (one entry per setting,
        with a manifest of how each number was made) and each setting's images to RUN/samples/<entry>/. Under
        torchrun, each process samples every other batch: the same images and numbers as one process.""",
        """
        flopmatch eval runs/m --num-samples 1000 --sweep steps=4,8,16 --sweep guidance=1,2,4
        flopmatch eval runs/d --sweep solver=euler,heun --sweep shift=1,3
        flopmatch eval runs/m --features effnet,inception --num-samples 5000   # Inception FID: the FID to cite
        flopmatch eval runs/m --export out/ --export-ref ref.npz               # images and statistics for other tools
        flopmatch eval runs/a --compile                                        # autoregressive: compiled decoding
        """))
    p.add_argument("run", help="run directory")
    p.add_argument("--num-samples", type=count(4), default=1000, help="generated images per setting (default 1000)")
    p.add_argument("--steps", type=config_value(SampleConfig, "steps"), help="sampling steps (0 = paradigm default; default: the run's)")
    p.add_argument("--guidance", "--cfg", dest="guidance", type=config_value(SampleConfig, "guidance"),
                   help="classifier-free guidance scale (1 = off); default: the run's")
    p.add_argument("--temperature", type=config_value(SampleConfig, "temperature"), help="sampling temperature (token paradigms); default: the run's")
    p.add_argument("--top-k", dest="top_k", type=config_value(SampleConfig, "top_k"), help="top-k filtering (token paradigms); 0 = off; default: the run's")
    add_solver_args(p, "the run's")
    p.add_argument("--sweep", action="append", default=[], metavar="NAME=v1,v2",
                   help=f"evaluate every combination, e.g. --sweep steps=4,8,16 --sweep guidance=1,2,4 (NAME: {', '.join(SWEEPABLE)})")
    p.add_argument("--features", default="effnet", type=feature_list,
                   help="comma-separated feature extractors: effnet (fast proxy; the default), inception (standard FID "
                        "Inception with clean-fid's PIL bicubic resize; slow on a CPU); none: no FID, KID or "
                        "precision/recall")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=count(1), default=100, help="images per sampling batch (default 100)")
    p.add_argument("--weights", type=weights_name, default="ema", help=WEIGHTS_HELP)
    p.add_argument("--raw", action="store_true", help="the raw weights: the same as --weights model")
    p.add_argument("--fid-boot", type=count(0), metavar="N",
                   help="evaluation-noise replicates over the generated images: KID bootstrap, FID delete-1 jackknife "
                        "(at most one per image) (default 200; 0 = off)")
    p.add_argument("--export", type=output_dir, metavar="DIR",
                   help="also write each setting's images to DIR/<setting>/ as PNGs and samples.npz (arr_0: N,H,W,3 "
                        "uint8), for clean-fid, torch-fidelity or the ADM evaluator")
    p.add_argument("--export-ref", type=new_npz_file, metavar="FILE.npz",
                   help="also write the whole evaluation split's reference features' mean and covariance (float64; a fixed "
                        "reference set, so FIDs against it differ from eval.json's equal-count FIDs) per extractor to FILE.npz, with "
                        "a JSON manifest: keys mu_<extractor>, sigma_<extractor>, and mu, sigma when there is one extractor "
                        "(what clean-fid and the ADM evaluator read); default: not written")
    p.add_argument("--ref-stats", type=npz_file, metavar="FILE.npz",
                   help="compute FID against the statistics in FILE.npz (written by --export-ref, for the same extractors) "
                        "instead of the run's own reference; KID and precision/recall are then not computed (they need "
                        "features); default: the run's evaluation split")
    p.add_argument("--no-timing", action="store_true", help="skip latency/throughput measurement")
    p.add_argument("--compile", action="store_true",
                   help="autoregressive (next-token) runs only: torch.compile the cached one-token network step (CUDA graphs on a GPU; the "
                        "first call and the second batch size compile, ~10 s each here; in fp32 the same tokens as without)")
    p.set_defaults(func=cmd_eval)
