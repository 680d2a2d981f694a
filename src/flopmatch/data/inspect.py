"""What a data source will train on: counts, caption statistics, skipped files, and a captioned PNG grid.

Used by ``flopmatch data inspect SOURCE``, so a user sees the prepared images (after conversion,
centre crop and resize, exactly what the tokenizer and the generator get) and their captions before
spending compute on them.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def _stats(values: list[int]) -> dict:
    if not values:
        return {"min": None, "median": None, "p95": None, "max": None, "mean": None}
    a = np.asarray(values)
    return {"min": int(a.min()), "median": float(np.median(a)), "p95": float(np.percentile(a, 95)),
            "max": int(a.max()), "mean": float(a.mean())}


def summarize(splits: dict, count_tokens: Callable[[str], int] | None = None, max_tokens: int | None = None) -> dict:
    """Counts and caption-length statistics of {"train": dataset, "eval": dataset}.

    ``count_tokens``: the text encoder's token count of a caption; with ``max_tokens`` (the encoder's
    ``text.max_len``) the summary says how many captions the encoder will truncate.
    """
    out = {"splits": {}}
    for name, ds in splits.items():
        caps = ds.captions()
        distinct = sorted(set(caps))
        entry = {"images": len(ds), "distinct_captions": len(distinct),
                 "caption_words": _stats([len(c.split()) for c in caps])}
        names = getattr(ds, "names", None)  # real sources: each example's file or key
        if names is not None:
            entry["repeated_images"] = len(names) - len(set(names))
        if count_tokens is not None:
            tokens = {c: count_tokens(c) for c in distinct}
            entry["caption_tokens"] = _stats([tokens[c] for c in caps])
            if max_tokens is not None:
                entry["truncated_captions"] = sum(tokens[c] > max_tokens for c in caps)
        out["splits"][name] = entry
    info = getattr(next(iter(splits.values())), "info", {}) or {}
    out["source"] = info.get("source")
    out["image_size"] = info.get("image_size")
    out["split_rule"] = info.get("split_rule")
    for key in ("usable", "skipped", "converted", "skipped_examples", "upscaled"):
        if key in info:
            out[key] = info[key]
    return out


def format_summary(s: dict, max_tokens: int | None = None) -> list[str]:
    """The summary as lines for the terminal."""
    lines = [f"source {s['source']} at {s['image_size']}px; split: {s['split_rule']}"]
    for name, e in s["splits"].items():
        w = e["caption_words"]
        line = (f"  {name}: {e['images']} images, {e['distinct_captions']} distinct captions; words per caption "
                f"median {w['median']:g}, p95 {w['p95']:g}, max {w['max']}") if e["images"] else f"  {name}: empty"
        if "caption_tokens" in e and e["images"]:
            t = e["caption_tokens"]
            line += f"; tokens median {t['median']:g}, max {t['max']}"
            if e.get("truncated_captions"):
                line += (f"; {e['truncated_captions']} captions longer than text.max_len={max_tokens} tokens "
                         f"are truncated")
        if e.get("repeated_images"):
            line += (f"; {e['repeated_images']} rows repeat an image listed before (one example per row, so such "
                     f"an image counts once per caption)")
        lines.append(line)
    if s.get("skipped"):
        lines.append("  skipped: " + ", ".join(f"{n} {c}" for c, n in s["skipped"].items()))
        for cause, names in (s.get("skipped_examples") or {}).items():
            lines.append(f"    {cause}: {', '.join(names)}{' ...' if s['skipped'].get(cause, 0) > len(names) else ''}")
    if s.get("converted"):
        lines.append("  converted to RGB: " + ", ".join(f"{n} {c}" for c, n in s["converted"].items()))
    if s.get("upscaled"):
        lines.append(f"  upscaled: {s['upscaled']} images smaller than {s['image_size']}px were enlarged (blurred); "
                     f"a smaller data.image_size keeps them sharp")
    return lines


def caption_grid(images_uint8: torch.Tensor, captions: list[str], cols: int = 8, cell: int = 128,
                 text_lines: int = 3) -> Image.Image:
    """A PNG-ready grid: each image (N, 3, S, S) uint8 upscaled to ``cell`` px (nearest: the training pixels
    as they are) above its caption, wrapped to ``text_lines`` lines."""
    n = images_uint8.shape[0]
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    font = ImageFont.load_default(size=11)
    line_h, pad = 13, 4
    cell_h = cell + pad + text_lines * line_h + pad
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, rows * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    chars = max(8, int(cell / 6.2))  # characters per line at this font size
    for i in range(n):
        x, y = pad + (i % cols) * (cell + pad), pad + (i // cols) * cell_h
        img = Image.fromarray(images_uint8[i].permute(1, 2, 0).numpy()).resize((cell, cell), Image.Resampling.NEAREST)
        sheet.paste(img, (x, y))
        wrapped = textwrap.wrap(captions[i], chars) or [""]
        if len(wrapped) > text_lines:
            wrapped = wrapped[:text_lines]
            wrapped[-1] = wrapped[-1][: chars - 1] + "…"
        for j, line in enumerate(wrapped):
            draw.text((x, y + cell + pad + j * line_h), line, fill=(20, 20, 20), font=font)
    return sheet
