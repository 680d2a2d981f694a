"""Generation: a run directory + prompts -> images (uint8) and PNG grids.

Loads the EMA weights (or raw ones), encodes prompts with the run's frozen text encoder, runs the
objective's sampler with classifier-free guidance and decodes through the run's own tokenizer.
The same seed, prompts and settings give the same images.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from flopmatch.config import RunConfig, SampleConfig, validate_sample
from flopmatch.device import autocast, resolve_device, run_bf16
from flopmatch.errors import UserError
from flopmatch.files import atomic_write_bytes
from flopmatch.objectives import Objective, make_objective
from flopmatch.rundir import load_weights, parse_weights, read_state, tokenizer_dir
from flopmatch.text import TextEncoder, text_encoder_for
from flopmatch.tokenizers.base import Tokenizer
from flopmatch.tokenizers.registry import load_tokenizer


@dataclass
class Sampler:
    """Everything needed to sample from a trained run."""

    cfg: RunConfig
    net: torch.nn.Module
    objective: Objective
    tokenizer: Tokenizer
    encoder: TextEncoder
    device: torch.device
    weights: str  # "ema" | "model" | "ema@SIGMA_REL" (post-hoc EMA)
    bf16: bool  # autocast precision, decided once per run (see load_sampler)

    @property
    def spec(self):
        return self.net.spec


def load_sampler(run: str | Path, weights: str = "ema", device: str = "auto") -> Sampler:
    """Load a trained run for sampling (EMA weights by default; ``weights``: see :func:`flopmatch.rundir.load_weights`)."""
    parse_weights(weights)  # a bad name is a UserError before anything loads
    dev = resolve_device(device)
    cfg, net = load_weights(run, weights, dev)
    tok = load_tokenizer(tokenizer_dir(run)).to(dev).eval()
    # With precision "auto", sample at the precision training recorded (decided once, by timing, on its
    # first start) when on the same kind of device, so repeated evaluations never flip precision.
    bf16 = run_bf16(cfg.train.precision, dev, read_state(run))
    return Sampler(cfg, net, make_objective(cfg.objective), tok, text_encoder_for(cfg.text, dev), dev, weights, bf16)


def check_prompts(prompts: list[str]) -> list[str]:
    """Strip prompts; none at all, or an empty or whitespace-only one, is a UserError (guidance=0 is unconditional)."""
    if not prompts:
        raise UserError("give at least one --prompt, e.g. --prompt \"a red circle above a blue square\"")
    out = []
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise UserError("empty prompt; give a text prompt such as --prompt \"a red circle above a blue square\"")
        out.append(" ".join(p.split()))
    return out


@torch.no_grad()
def generate(sampler: Sampler, prompts: list[str], sample: SampleConfig, seed: int = 0, batch_size: int = 64,
             progress: bool = False, return_tokens: bool = False):
    """Images uint8 (N, 3, H, W) for N prompts; batch b is drawn from a generator seeded (seed, b).

    With ``return_tokens`` also returns the raw sampler outputs (latents or codes) before decoding.
    """
    validate_sample(sample)
    sampler.objective.resolve_steps(sample, sampler.spec)  # an impossible step count fails before any work
    prompts = check_prompts(prompts)
    bf16 = sampler.bf16
    images, raw = [], []
    batches = range(0, len(prompts), batch_size)
    for b, start in enumerate(tqdm(batches, desc="sampling", unit="batch", disable=not progress)):
        chunk = prompts[start : start + batch_size]
        cond = sampler.encoder.encode(chunk).to(sampler.device)
        uncond = sampler.encoder.encode([""] * len(chunk)).to(sampler.device)
        g = torch.Generator(device=sampler.device).manual_seed(seed * 1_000_003 + b)
        with autocast(sampler.device, bf16):
            z = sampler.objective.sample(sampler.net, cond, uncond, sample, g)
        x = sampler.tokenizer.decode(z.float() if z.is_floating_point() else z)
        images.append(((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
        raw.append(z.cpu())
    out = torch.cat(images)
    return (out, torch.cat(raw)) if return_tokens else out


def grid_image(images: torch.Tensor, nrow: int | None = None, pad: int = 2, scale: int = 1):
    """uint8 (N, 3, H, W) -> PIL image of a grid (nrow per row, ``pad`` px white border, upscaled x``scale``)."""
    n, _, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = torch.full((3, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[:, y : y + h, x : x + w] = images[i]
    img = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_png(img, path: str | Path) -> None:
    """Write a PIL image as PNG atomically."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
