"""``flopmatch train``, ``sample`` and ``flops``: parsing only; each command calls one library function."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from flopmatch import PARADIGMS
from flopmatch.cli.args import (
    DATA_HELP,
    WEIGHTS_HELP,
    add_solver_args,
    config_value,
    count,
    data_source,
    described,
    output_dir,
    output_file,
    raw_or_weights,
    weights_name,
)
from flopmatch.config import ModelConfig, SampleConfig, TrainConfig, check_sample_fields
from flopmatch.errors import UserError


def _run_config(args):
    """RunConfig from --config JSON (optional), the common flags, then --set overrides."""
    from flopmatch.config import RunConfig, apply_overrides, from_dict
    from flopmatch.files import read_json  # JSON reading lives with the tensor I/O (torch): load it only now

    cfg = RunConfig()
    if getattr(args, "config", None):
        try:
            doc = read_json(args.config)
        except UserError:  # read_json's advice (delete or restore the file) is wrong for an input the user named
            if not Path(args.config).is_file():
                raise
            raise UserError(f"--config {args.config} is not JSON; give a run's config.json (or `flopmatch config "
                            f"--json`'s output)") from None
        cfg = from_dict(RunConfig, doc)
    if getattr(args, "objective", None):
        cfg.objective.name = args.objective
    if getattr(args, "depth", None) is not None:
        cfg.model.depth = args.depth
    if getattr(args, "budget", None) is not None:
        cfg.train.budget = args.budget
    if getattr(args, "data", None):
        cfg.data.name = args.data
    if getattr(args, "tokenizer", None):
        cfg.tokenizer.path = args.tokenizer
    if getattr(args, "seed", None) is not None:
        cfg.train.seed = args.seed
    if getattr(args, "track", None) is not None:
        cfg.train.trackers = args.track
    for name in ("steps", "guidance", "solver", "shift"):
        if getattr(args, name, None) is not None:
            setattr(cfg.sample, name, getattr(args, name))
    apply_overrides(cfg, args.set)
    return cfg.validate()


def _add_common(p, *, budget: bool, objective_required: bool = True) -> None:
    p.add_argument("--objective", choices=PARADIGMS, required=objective_required,
                   help="paradigm" if objective_required else "paradigm (required for a new run; an existing --out run keeps its own)")
    p.add_argument("--depth", type=config_value(ModelConfig, "depth"), help="backbone depth (width = 64 * depth); default 4")
    if budget:
        p.add_argument("--budget", type=config_value(TrainConfig, "budget"), help="training FLOPs, e.g. 3e12 (default 3e12); steps = ceil(budget / FLOPs per step). "
                       "A new budget for an existing train.schedule=wsd run continues it")
    if budget:
        p.add_argument("--data", type=data_source, help=DATA_HELP + " (default: shapes)")
    p.add_argument("--tokenizer", help="a tokenizer directory from `flopmatch tokenizer train` (default: weight-free)")
    p.add_argument("--config", help="a config.json to start from")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config field, e.g. --set train.batch_size=32 (repeatable)")


def cmd_train(args) -> int:
    """Train (or resume) one run."""
    # Imported when the command runs, not at the top: the CLI modules load no torch, so that
    # `flopmatch --help` and argument errors answer at once.
    from flopmatch.rundir import CONFIG
    from flopmatch.train import train

    saved = Path(args.out) / CONFIG
    if not args.config and saved.is_file():
        # An existing run starts from its own settings (like nanoGPT's init_from="resume"): `train --out RUN` resumes
        # it and `train --out RUN --budget B2` continues it, without repeating its flags; flags given still override
        # (and train() refuses any change but the budget, naming the setting).
        args.config = str(saved)
    elif not args.config and not args.objective:
        out = Path(args.out)
        if not out.exists() or (out.is_dir() and not any(out.iterdir())):
            raise UserError(f"--objective is required to start a new run in {args.out} (an existing run directory resumes "
                            "from its own config.json)")
        # else --out is a file or a directory that is not a run: train() says so, before anything is written
    cfg = _run_config(args)
    train(cfg, args.out, progress=not args.quiet)
    return 0


def cmd_sample(args) -> int:
    """Sample a PNG grid from a trained run."""
    # Imported when the command runs, not at the top: the CLI modules load no torch, so that
    # `flopmatch --help` and argument errors answer at once.
    from flopmatch.rundir import read_config, read_state
    from flopmatch.sample import check_prompts, generate, grid_image, load_sampler, save_png

    cfg = read_config(args.run)  # a missing or wrong run directory is named first
    if args.out and Path(args.out).suffix.lower() != ".png" and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out}: the grid is written as a PNG; give a file name ending in .png")
    prompts = check_prompts(args.prompt or [])  # before loading anything
    prompts = [prompts[i % len(prompts)] for i in range(args.num)] if args.num else prompts
    overrides = {k: getattr(args, k) for k in ("steps", "guidance", "temperature", "top_k", "solver", "shift") if getattr(args, k) is not None}
    if args.no_kv_cache:
        overrides["kv_cache"] = False
    check_sample_fields(cfg.objective.name, overrides,
                        lambda name: "--no-kv-cache" if name == "kv_cache" else "--" + name.replace("_", "-"))
    sampler = load_sampler(args.run, weights=raw_or_weights(args), device=args.device)
    state = read_state(args.run)
    if state and not state.get("done"):
        print(f"flopmatch: warning: {args.run} is not finished ({state['step']}/{state['total_steps']} steps); sampling "
              f"its latest checkpoint", file=sys.stderr)
    sample = replace(sampler.cfg.sample, **overrides)
    for i, p in enumerate(dict.fromkeys(prompts)):
        n, limit = sampler.encoder.num_tokens(p), sampler.encoder.max_len
        if n > limit:
            print(f"flopmatch: warning: prompt {i + 1} has {n} tokens; the text encoder reads only the first {limit} "
                  f"(the run's text.max_len)", file=sys.stderr)
    images = generate(sampler, prompts, sample, seed=args.seed, progress=True)
    out = args.out or str(Path(args.run) / "samples.png")
    nrow = args.nrow or (len(images) if len(set(prompts)) == len(prompts) and len(prompts) <= 8 else None)
    save_png(grid_image(images, nrow=nrow, scale=args.scale), out)
    solver = f", solver={sample.solver}, shift={sample.shift:g}" if sampler.cfg.objective.name == "diffusion" else ""
    print(f"wrote {len(images)} image{'s' if len(images) != 1 else ''} to {out} (steps={sampler.objective.resolve_steps(sample, sampler.spec)}, "
          f"guidance={sample.guidance}{solver}, seed={args.seed}, {sampler.weights} weights)")
    return 0


def cmd_flops(args) -> int:
    """Print the analytic parameters and FLOPs of a configuration."""
    # Imported when the command runs, not at the top: the CLI modules load no torch, so that
    # `flopmatch --help` and argument errors answer at once.
    from flopmatch.plan import flops_summary

    cfg = _run_config(args)
    given = [k for k in ("steps", "solver", "shift") if getattr(args, k, None) is not None]
    check_sample_fields(cfg.objective.name, given)  # as sample and eval do: a setting the paradigm ignores is refused
    info = flops_summary(cfg)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v:.4g}" if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) >= 1e5 else f"{k:<{width}}  {v}")
    return 0


def register(sub) -> None:
    """Add ``train``, ``sample`` and ``flops`` to the top-level subparsers."""
    p = sub.add_parser("train", help="train a generator for a FLOP budget (resumes if interrupted)", **described(
        """Train a generator of one paradigm for a FLOP budget: steps = ceil(budget / training FLOPs per step). Writes
        the run directory --out: config.json (before step 0), data.json (the training split), metrics.jsonl,
        checkpoint/, ema-snapshots/ (the post-hoc EMA's) and tokenizer/ (the run's own); Ctrl-C saves a checkpoint.

        An existing --out run starts from its own settings (its config.json): flags not given keep the run's values,
        whatever the defaults below say; the same command resumes it exactly, or says it is finished. A new --budget
        continues a train.schedule=wsd (or constant) run, keeping the old budget's result in OUT/budgets/<budget>/.
        Every --set key: flopmatch config.""",
        """
        flopmatch train --objective masked --depth 4 --budget 3e12 --out runs/m
        flopmatch train --out runs/m                     # resume runs/m (or say it is finished)
        flopmatch train --objective diffusion --budget 1e12 --data folder:my_images --set data.image_size=64 --out runs/d
        flopmatch train --objective masked --budget 3e12 --set train.schedule=wsd --out runs/w
        flopmatch train --out runs/w --budget 1e13       # continue it; the 3e12 result stays in runs/w/budgets/3e12/
        """))
    _add_common(p, budget=True, objective_required=False)
    p.add_argument("--seed", type=int, help="training seed (default 0)")
    p.add_argument("--out", required=True, type=output_dir, help="run directory (created; an existing run is resumed from its own config.json: "
                   "`train --out RUN` resumes it, `train --out RUN --budget B2` continues a wsd run to B2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--track", type=config_value(TrainConfig, "trackers"), metavar="tensorboard,wandb",
                   help="also log metrics.jsonl's rows to TensorBoard (RUN/tensorboard/) and/or W&B (RUN/wandb/, offline "
                        "unless WANDB_MODE is set); = --set train.trackers=...; may change when a run resumes (default: none for a "
                        "new run, a resumed run's own)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample a PNG grid from a trained run", **described(
        """Sample images from a trained run (its EMA weights unless --weights or --raw says otherwise; an unfinished
        run's latest checkpoint, with a warning) and write them as one PNG grid: RUN/samples.png unless --out says
        otherwise. The same seed gives the same images.""",
        """
        flopmatch sample runs/m --prompt "a small green triangle to the left of a red circle" --num 16 --out grid.png
        flopmatch sample runs/m --prompt "a red circle" --prompt "a blue square" --steps 12 --guidance 3 --weights ema@0.2
        """))
    p.add_argument("run", help="run directory")
    p.add_argument("--prompt", action="append", help="text prompt (repeatable)")
    p.add_argument("--num", type=count(1), help="number of images (prompts are cycled); default one per prompt")
    p.add_argument("--steps", type=config_value(SampleConfig, "steps"), help="sampling steps (diffusion, masked); 0 = paradigm default (default: the run's)")
    p.add_argument("--guidance", "--cfg", dest="guidance", type=config_value(SampleConfig, "guidance"),
                   help="classifier-free guidance scale (1 = off); default: the run's")
    p.add_argument("--temperature", type=config_value(SampleConfig, "temperature"),
                   help="sampling temperature (token paradigms); default: the run's (1)")
    p.add_argument("--top-k", dest="top_k", type=config_value(SampleConfig, "top_k"),
                   help="top-k filtering (token paradigms); 0 = off; default: the run's (0)")
    add_solver_args(p, "the run's")
    p.add_argument("--no-kv-cache", action="store_true", help="autoregressive: recompute the prefix each step")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0): same seed, same images")
    p.add_argument("--weights", type=weights_name, default="ema", help=WEIGHTS_HELP)
    p.add_argument("--raw", action="store_true", help="the raw weights: the same as --weights model")
    p.add_argument("--device", default="auto", help="auto (default: CUDA if available, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--nrow", type=count(1), help="images per grid row (default: one row for up to 8 distinct prompts, else square)")
    p.add_argument("--scale", type=count(1), default=4, help="upscale factor of the PNG, nearest neighbour (default 4)")
    p.add_argument("--out", type=output_file, help="PNG path (default: RUN/samples.png)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("flops", help="analytic parameters and FLOPs of a configuration", **described(
        """Print the analytic parameter count, training FLOPs per example and sampling FLOPs per image of a
        configuration (autoregressive: also without the KV cache; guidance's extra pass included). Builds no network
        and writes nothing. The FLOP conventions are in src/flopmatch/flops.py's docstring.""",
        """
        flopmatch flops --objective autoregressive --depth 4
        flopmatch flops --objective diffusion --depth 2 --steps 25 --solver heun --json
        flopmatch flops --objective masked --config runs/m/config.json
        """))
    _add_common(p, budget=False)
    p.add_argument("--steps", type=config_value(SampleConfig, "steps"), help="sampling steps; 0 = paradigm default (default: the --config run's, else 0)")
    p.add_argument("--guidance", "--cfg", dest="guidance", type=config_value(SampleConfig, "guidance"),
                   help="guidance scale (1 = no extra pass; default 3)")
    add_solver_args(p, "the config's: euler, shift 1")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_flops)
