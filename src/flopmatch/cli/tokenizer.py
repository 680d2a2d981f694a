"""``flopmatch tokenizer train|eval``: parsing only; the work is in flopmatch.tokenizers.train_ae and
flopmatch.evaluation.tokenizer.

    flopmatch tokenizer train --kind kl  --data shapes --out tok/kl
    flopmatch tokenizer train --kind lfq --data shapes --out tok/lfq --set bits=9
    flopmatch tokenizer eval tok/lfq          # writes tok/lfq/eval.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flopmatch.cli.args import DATA_HELP, count, data_source, described, output_dir
from flopmatch.errors import UserError

# AutoencoderConfig's fields (the keys of `tokenizer train --set` and `study --tokenizer-set`), as plain strings: the
# parser must not import flopmatch.tokenizers, which loads torch. tests/test_config.py checks they match the dataclass.
AUTOENCODER_KEYS = {
    "architecture": ("kind", "image_size", "patch", "channels", "num_res_blocks"),
    "bottleneck": ("latent_channels", "kl_weight", "bits", "commitment_weight", "entropy_weight", "diversity_weight",
                   "entropy_temperature"),
    "losses": ("recon_loss", "adv_weight", "adv_start"),
    "optimisation": ("steps", "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta2", "grad_clip",
                     "seed", "precision", "device", "log_every"),
    "data": ("data", "data_seed", "image_column", "text_column", "holdout", "holdout_relations", "num_train",
             "stats_images"),
}
# `flopmatch train`'s data.KEY spellings that `tokenizer train --set` takes too, so one --set data.image_size=64 works
# for both: the flat field each one names
DATA_ALIASES = {"data.image_size": "image_size", "data.image_column": "image_column", "data.text_column": "text_column",
                "data.num_train": "num_train", "data.seed": "data_seed", "data.holdout": "holdout",
                "data.holdout_relations": "holdout_relations"}


def flat_overrides(items: list[str]) -> list[str]:
    """``--set`` items with the data.KEY aliases of :data:`DATA_ALIASES` renamed to their flat keys."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        out.append(f"{DATA_ALIASES[key.strip()]}{sep}{value}" if key.strip() in DATA_ALIASES else item)
    return out


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
    config = apply_overrides(config, flat_overrides(args.set))
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
    p = subparsers.add_parser("tokenizer", help="train or evaluate a learned autoencoder (KL or LFQ)", **described(
        """Train or evaluate a learned autoencoder: KL (continuous latents, for diffusion) or LFQ (discrete codes, for
        masked and autoregressive). A study trains its own matched pair; these commands make one for
        `flopmatch train --tokenizer DIR`. See `flopmatch tokenizer train --help` and `flopmatch tokenizer eval
        --help`.""",
        """
        flopmatch tokenizer train --kind lfq --data shapes --out tok/lfq
        flopmatch tokenizer eval tok/lfq
        """))
    sub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="SUBCOMMAND")

    keys = "\n\n".join(f"{group}: {', '.join(names)}" for group, names in AUTOENCODER_KEYS.items())
    t = sub.add_parser("train", help="train a KL (continuous) or LFQ (discrete) autoencoder (resumes if interrupted)",
                       **described(
        f"""Train a KL or LFQ autoencoder into --out: tokenizer.json (its config and spec), tensors.safetensors and
        train_log.jsonl. Interrupted (Ctrl-C, or killed: its state is saved every 10 min), the same command continues
        it bit for bit; a finished one is not overwritten.

        --set takes the autoencoder config's keys, flat (no section; also what `flopmatch study --tokenizer-set`
        takes), each a field of AutoencoderConfig (src/flopmatch/tokenizers/autoencoder.py, where each is described):

        {keys}

        As in `flopmatch train`, --set data.image_size, data.image_column, data.text_column, data.num_train, data.seed,
        data.holdout and data.holdout_relations are accepted too (for image_size, image_column, text_column,
        num_train, data_seed, holdout, holdout_relations).""",
        """
        flopmatch tokenizer train --kind kl --data shapes --out tok/kl
        flopmatch tokenizer train --kind lfq --data shapes --out tok/lfq --set bits=9 --steps 1200
        flopmatch tokenizer train --kind kl --data folder:my_images --set data.image_size=64 --out tok/kl64
        """))
    t.add_argument("--kind", choices=("kl", "lfq"), required=True,
                   help="kl: latents for diffusion; lfq: codes for masked/autoregressive")
    t.add_argument("--data", default="shapes", type=data_source, help=DATA_HELP + " (default: shapes)")
    t.add_argument("--out", required=True, type=output_dir, help="output directory (tokenizer.json, tensors.safetensors, train_log.jsonl)")
    t.add_argument("--preset", default="cpu", help="cpu: ~5 min on 2 cores (default); gpu: larger")
    t.add_argument("--seed", type=int, help="training seed (init and batch order; default: the preset's, 0)")
    t.add_argument("--steps", type=count(1), help="optimizer steps (default: the preset's)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an AutoencoderConfig field, e.g. --set bits=9 (repeatable; the keys are listed above)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_tokenizer_train)

    e = sub.add_parser("eval", help="reconstruction metrics on the eval split -> DIR/eval.json", **described(
        """Reconstruct an evaluation split of --num images of the tokenizer's own data and measure PSNR, SSIM,
        reconstruction FID, codebook usage and perplexity (LFQ) or latent statistics (KL), attribute accuracy on
        reconstructions (shapes data) and encode/decode FLOPs per image. Writes DIR/eval.json and prints a summary
        line.""",
        """
        flopmatch tokenizer eval tok/lfq
        flopmatch tokenizer eval tok/kl --num 500 --rfid none --no-attributes
        """))
    e.add_argument("dir", help="a tokenizer directory")
    e.add_argument("--num", type=count(2), default=2000, help="eval images (default 2000)")
    e.add_argument("--rfid", default="effnet",
                   help="features for reconstruction FID: effnet (fast proxy, default), inception (standard, slow), none")
    e.add_argument("--attributes", action=argparse.BooleanOptionalAction, default=True,
                   help="attribute-classifier accuracy on reconstructions (trains the classifier once if not cached; default on)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_tokenizer_eval)
