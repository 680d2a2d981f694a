"""``flopmatch tokenizer train|eval``: parsing only; the work is in flopmatch.tokenizers.train_ae and
flopmatch.evaluation.tokenizer.

    flopmatch tokenizer train --kind kl  --data shapes --out tok/kl
    flopmatch tokenizer train --kind lfq --data shapes --out tok/lfq --set bits=9
    flopmatch tokenizer eval tok/lfq          # writes tok/lfq/eval.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flopmatch.cli.args import DATA_HELP, count, data_source, output_dir
from flopmatch.errors import UserError


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    """Train a KL or LFQ autoencoder into args.out (refuses to overwrite an existing tokenizer)."""
    # Imported when the command runs, not at the top: the CLI modules load no torch, so that
    # `flopmatch --help` and argument errors answer at once.
    from flopmatch.device import resolve_device
    from flopmatch.files import remove_stale_temps
    from flopmatch.lock import LOCK_NAME, DirectoryLock
    from flopmatch.tokenizers.autoencoder import apply_overrides, preset
    from flopmatch.tokenizers.train_ae import STATE_FILE, load_images, train_autoencoder

    out = Path(args.out)
    if (out / "tokenizer.json").exists():
        raise UserError(f"{out} already holds a tokenizer; choose another --out or delete it")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    # an empty directory, or an unfinished training's (which this command continues); never a run's or other files
    ours = (STATE_FILE, "train_log.jsonl", LOCK_NAME, "tensors.safetensors", "tokenizer.json")  # (the last two: killed while saving)
    others = sorted(p.name for p in out.iterdir() if p.name not in ours and not _temp_of(p.name, ours)) \
        if out.is_dir() else []
    if others:
        raise UserError(f"--out {out} holds other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}) "
                        f"than a tokenizer training's; give an empty or new directory")
    config = preset(args.preset, args.kind)
    config.data = args.data
    if args.seed is not None:
        config.seed = args.seed
    if args.steps is not None:
        config.steps = args.steps
    config = apply_overrides(config, args.set)
    if config.kind != args.kind:
        raise UserError(f"--set kind={config.kind} contradicts --kind {args.kind}; use --kind")
    resolve_device(config.device)  # before anything is written: a missing GPU leaves no empty --out behind
    images, info = load_images(config, "train")
    with DirectoryLock(out, "tokenizer"):  # one training per directory: a second one is refused, naming the first
        if (out / "tokenizer.json").exists():  # finished by another command while this one loaded its images
            raise UserError(f"{out} already holds a tokenizer; choose another --out or delete it")
        remove_stale_temps(out, names=ours)  # a killed training's half-written files
        _, summary = train_autoencoder(config, images, out, info, progress=not args.quiet)
    print(f"trained {config.kind} tokenizer -> {out} in {summary['train_seconds']:.0f} s "
          f"({summary['steps']} steps, train PSNR {summary['final_train_psnr']:.2f} dB); "
          f"evaluate with: flopmatch tokenizer eval {out}")
    return 0


def _temp_of(name: str, names: tuple[str, ...]) -> bool:
    """Whether ``name`` is an atomic write's temporary file of one of ``names`` (flopmatch.files: ``.NAME.*.tmp``)."""
    return name.endswith(".tmp") and any(name.startswith(f".{n}.") for n in names)


def cmd_tokenizer_eval(args: argparse.Namespace) -> int:
    """Evaluate a tokenizer directory on the eval split; writes DIR/eval.json and prints a summary."""
    # Imported when the command runs, not at the top: the CLI modules load no torch, so that
    # `flopmatch --help` and argument errors answer at once.
    from flopmatch.evaluation.tokenizer import run_eval

    m = run_eval(args.dir, num=args.num, rfid_features=args.rfid, attributes=args.attributes, progress=not args.quiet)
    parts = [f"PSNR {m['psnr']:.2f} dB", f"SSIM {m['ssim']:.4f}"]
    if m["kind"] == "lfq":
        parts += [f"usage {m['codebook_usage']:.3f}", f"perplexity {m['perplexity']:.1f}"]
    else:
        parts += [f"latent mean {m['latent_mean']:+.3f} std {m['latent_std']:.3f}"]
    parts.append(f"rFID({m['rfid_features']}) {m['rfid']:.3f}" if m["rfid"] is not None else "rFID n/a")
    if m["attribute_accuracy"]:
        real, recon = m["attribute_accuracy"]["real"], m["attribute_accuracy"]["recon"]
        parts.append("attribute accuracy real/recon " + " ".join(
            f"{k} {real[k]:.3f}/{recon[k]:.3f}" for k in ("color0", "shape0", "size0", "shape1") if real.get(k) is not None))
    parts.append(f"enc {m['encode_flops'] / 1e6:.1f} MFLOP, dec {m['decode_flops'] / 1e6:.1f} MFLOP per image")
    print(f"{args.dir}: " + ", ".join(parts) + f" -> {Path(args.dir) / 'eval.json'}")
    return 0


def register(subparsers) -> None:
    """Add ``tokenizer train`` and ``tokenizer eval`` to the top-level subparsers.

    Names like presets and feature extractors are checked where they are used (one line, exit 2),
    not with argparse choices, so that building the parser imports nothing heavy.
    """
    p = subparsers.add_parser("tokenizer", help="train or evaluate a learned autoencoder (KL or LFQ)")
    sub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="SUBCOMMAND")

    t = sub.add_parser("train", help="train a KL (continuous) or LFQ (discrete) autoencoder (resumes if interrupted)",
                       description="Train a KL or LFQ autoencoder into --out. Interrupted (Ctrl-C, or killed: its state is "
                                   "saved every 10 min), the same command continues it bit for bit.")
    t.add_argument("--kind", choices=("kl", "lfq"), required=True,
                   help="kl: latents for diffusion; lfq: codes for masked/autoregressive")
    t.add_argument("--data", default="shapes", type=data_source, help=DATA_HELP + " (default: shapes)")
    t.add_argument("--out", required=True, type=output_dir, help="output directory (tokenizer.json, tensors.safetensors, train_log.jsonl)")
    t.add_argument("--preset", default="cpu", help="cpu: ~5 min on 2 cores (default); gpu: larger")
    t.add_argument("--seed", type=int, help="training seed (init and batch order; default: the preset's, 0)")
    t.add_argument("--steps", type=count(1), help="optimizer steps (default: the preset's)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an AutoencoderConfig field, e.g. --set bits=9 (repeatable)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_tokenizer_train)

    e = sub.add_parser("eval", help="reconstruction metrics on the eval split -> DIR/eval.json")
    e.add_argument("dir", help="a tokenizer directory")
    e.add_argument("--num", type=count(2), default=2000, help="eval images (default 2000)")
    e.add_argument("--rfid", default="effnet",
                   help="features for reconstruction FID: effnet (fast proxy, default), inception (standard, slow), none")
    e.add_argument("--attributes", action=argparse.BooleanOptionalAction, default=True,
                   help="attribute-classifier accuracy on reconstructions (trains the classifier once if not cached; default on)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_tokenizer_eval)
