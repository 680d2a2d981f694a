"""``flopmatch data inspect SOURCE``: parsing only; the work is in flopmatch.data.inspect.

    flopmatch data inspect folder:my_images                 # counts, caption stats, skipped files
    flopmatch data inspect folder:my_images --image-size 64 --out grid.png --num 48
"""

from __future__ import annotations

import argparse
import io
import json

from flopmatch.cli.args import DATA_HELP, config_value, count, data_source, output_file
from flopmatch.config import DataConfig, TextConfig


def cmd_inspect(args: argparse.Namespace) -> int:
    """Prepare (or load the cached) source, print its summary, write a captioned grid of examples."""
    # Imported when the command runs, not at the top: the CLI modules load no torch.
    from flopmatch.data.datasets import make_dataset
    from flopmatch.data.inspect import caption_grid, format_summary, summarize
    from flopmatch.files import atomic_write_bytes
    from flopmatch.text import make_text_encoder

    cfg = DataConfig(name=args.data, image_size=args.image_size, image_column=args.image_column,
                     text_column=args.text_column)
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
    p = sub.add_parser("data", help="look at a data source before training on it")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND", parser_class=type(p))
    i = dsub.add_parser("inspect", help="counts, caption statistics, skipped files and a captioned PNG grid")
    i.add_argument("data", type=data_source, metavar="SOURCE", help=DATA_HELP)
    i.add_argument("--image-size", type=config_value(DataConfig, "image_size"), default=DataConfig.image_size,
                   help=f"side the images are prepared at (default {DataConfig.image_size})")
    i.add_argument("--image-column", default=DataConfig.image_column,
                   help=f"hf:PATH sources: the image column (default {DataConfig.image_column})")
    i.add_argument("--text-column", default=DataConfig.text_column,
                   help=f"hf:PATH sources: the caption column (default {DataConfig.text_column})")
    i.add_argument("--split", choices=("train", "eval"), default="train", help="split shown in the grid (default train)")
    i.add_argument("--num", type=count(1), default=32, help="images in the grid (default 32)")
    i.add_argument("--out", type=output_file, default="data-inspect.png", help="grid PNG (default data-inspect.png)")
    i.add_argument("--text", choices=("minilm", "none"), default="minilm",
                   help="count caption tokens with this text encoder (default minilm; none skips it)")
    i.add_argument("--max-len", type=config_value(TextConfig, "max_len"), default=TextConfig.max_len,
                   help=f"text.max_len the runs will use: longer captions are reported as truncated (default {TextConfig.max_len})")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.set_defaults(func=cmd_inspect)
