"""``flopmatch data inspect SOURCE``: parsing only; the work is in flopmatch.data.inspect.

    flopmatch data inspect folder:my_images                 # counts, caption stats, skipped files
    flopmatch data inspect folder:my_images --preset cpu    # the split a `study --preset cpu` run trains on
    flopmatch data inspect folder:my_images --image-size 64 --out grid.png --num 48
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json

from flopmatch.cli.args import DATA_HELP, config_value, count, data_source, described, output_file
from flopmatch.config import DataConfig, TextConfig
from flopmatch.errors import UserError
from flopmatch.study.presets import STUDY_PRESETS


def data_config(args: argparse.Namespace) -> DataConfig:
    """The data settings a run would have: ``flopmatch train``'s defaults, or a study preset's runs' (its data
    overrides; its shapes holdout dropped on another source, as the study drops it), then the flags and ``--set``."""
    from flopmatch.config import RunConfig, apply_overrides, check_holdout
    from flopmatch.study.plan import shared_config

    if args.preset:  # the study's own rule (its holdout only on shapes)
        scfg = STUDY_PRESETS[args.preset]()
        cfg = shared_config(dataclasses.replace(scfg, overrides=[*scfg.overrides, f"data.name={args.data}"]))
    else:
        cfg = RunConfig()
        cfg.data.name = args.data
    for name in ("image_size", "image_column", "text_column"):
        if getattr(args, name) is not None:
            setattr(cfg.data, name, getattr(args, name))
    for item in args.set:
        if not item.partition("=")[0].strip().startswith("data.") or item.partition("=")[0].strip() == "data.name":
            raise UserError(f"--set {item}: data inspect takes data.KEY=VALUE (the source is SOURCE; every key: "
                            f"flopmatch config)")
    apply_overrides(cfg, args.set)
    check_holdout(cfg.data)  # a holdout set by hand on a source without scenes: refused, as train and study do
    return cfg.data


def cmd_inspect(args: argparse.Namespace) -> int:
    """Prepare (or load the cached) source, print its summary, write a captioned grid of examples."""
    # Imported when the command runs, not at the top: the CLI modules load no torch.
    from flopmatch.data.datasets import make_dataset
    from flopmatch.data.inspect import caption_grid, format_summary, summarize
    from flopmatch.files import atomic_write_bytes
    from flopmatch.text import make_text_encoder

    cfg = data_config(args)
    splits = {name: make_dataset(cfg, name, progress=not args.json) for name in ("train", "eval")}
    count_tokens = None
    if args.text == "minilm":
        count_tokens = make_text_encoder("minilm", max_len=args.max_len).num_tokens
    summary = summarize(splits, count_tokens, args.max_len)
    ds = splits[args.split]
    if len(ds):
        n = min(args.num, len(ds))
        step = max(1, len(ds) // n)  # spread over the split rather than its first items
        idx = list(range(0, len(ds), step))[:n]
        grid = caption_grid(ds.images_uint8()[idx], [ds.captions()[i] for i in idx])
        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        atomic_write_bytes(args.out, buf.getvalue())
        summary["grid"] = {"path": str(args.out), "split": args.split, "images": n}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print("\n".join(format_summary(summary, args.max_len)))
        if "grid" in summary:
            print(f"wrote {args.out} ({summary['grid']['images']} {args.split} images with their captions)")
    return 0


def register(sub) -> None:
    """Add ``data`` (with ``inspect``) to the top-level subparsers."""
    p = sub.add_parser("data", help="look at a data source before training on it", **described(
        """Look at a data source before training on it: `flopmatch data inspect SOURCE` (see its --help).""",
        """
        flopmatch data inspect folder:my_images
        """))
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND", parser_class=type(p))
    i = dsub.add_parser("inspect", help="counts, caption statistics, skipped files and a captioned PNG grid", **described(
        f"""Prepare a data source (decoded once into the cache, as training would) and print what a run will train
        and be evaluated on: image counts of the training and evaluation splits, distinct captions, caption lengths
        in words and in text-encoder tokens (how many --max-len truncates), and the files skipped, by cause. Writes
        a PNG grid of --num images of --split with their captions (--out).

        The split is a run's: by default `flopmatch train`'s (data.num_train {DataConfig.num_train}, data.num_eval
        {DataConfig.num_eval}, no holdout); with --preset P a `flopmatch study --preset P` run's (its data.num_train,
        data.num_eval and, on shapes, its held-out scenes, which are then not among the training images); --set
        data.KEY=VALUE sets any other data key as train and study do.""",
        """
        flopmatch data inspect folder:my_images                     # what `flopmatch train --data folder:my_images` uses
        flopmatch data inspect folder:my_images --preset cpu        # what a default study's runs use
        flopmatch data inspect hf:my_set --image-column img --text-column caption --image-size 64 --out grid.png
        """))
    i.add_argument("data", type=data_source, metavar="SOURCE", help=DATA_HELP)
    i.add_argument("--preset", choices=STUDY_PRESETS,
                   help="the data settings of this study preset's runs (default: none, `flopmatch train`'s defaults)")
    i.add_argument("--set", action="append", default=[], metavar="data.KEY=VALUE",
                   help="override a data key, e.g. --set data.num_eval=500 (repeatable; see `flopmatch config`)")
    i.add_argument("--image-size", type=config_value(DataConfig, "image_size"),
                   help=f"side the images are prepared at; = --set data.image_size (default: the preset's, else "
                        f"{DataConfig.image_size})")
    i.add_argument("--image-column",
                   help=f"hf:PATH sources: the image column; = --set data.image_column (default {DataConfig.image_column})")
    i.add_argument("--text-column",
                   help=f"hf:PATH sources: the caption column; = --set data.text_column (default {DataConfig.text_column})")
    i.add_argument("--split", choices=("train", "eval"), default="train", help="split shown in the grid (default train)")
    i.add_argument("--num", type=count(1), default=32, help="images in the grid (default 32)")
    i.add_argument("--out", type=output_file, default="data-inspect.png", help="grid PNG (default data-inspect.png)")
    i.add_argument("--text", choices=("minilm", "none"), default="minilm",
                   help="count caption tokens with this text encoder (default minilm; none skips it)")
    i.add_argument("--max-len", type=config_value(TextConfig, "max_len"), default=TextConfig.max_len,
                   help=f"text.max_len the runs will use: longer captions are reported as truncated (default {TextConfig.max_len})")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.set_defaults(func=cmd_inspect)
