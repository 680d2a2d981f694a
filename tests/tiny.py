"""Tiny building blocks shared by the core tests: configs, networks, fake text and data, no dataset.

Sizes: depth 1, head dim 16 (width 16), a 4x4 token grid (L = 16), vocabulary 32, 12 latent
channels, text of 8 tokens of width 16. Everything runs in milliseconds on one CPU thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from flopmatch.config import ModelConfig, RunConfig, apply_overrides
from flopmatch.nets import NetSpec, Network
from flopmatch.objectives import Objective, make_objective
from flopmatch.text import TextBatch
from flopmatch.tokenizers.base import TokenizerSpec
from flopmatch.train import train

TEXT_LEN, TEXT_DIM = 8, 16
GRID, VOCAB, CHANNELS = 4, 32, 12


@dataclass
class Tiny:
    """An objective with its network and the network's spec."""

    objective: Objective
    net: Network
    spec: NetSpec


def tokenizer_spec(objective: str, grid: int = GRID) -> TokenizerSpec:
    """A tokenizer spec of the kind ``objective`` consumes (no tokenizer is built)."""
    if objective == "diffusion":
        return TokenizerSpec("continuous", grid, channels=CHANNELS, image_size=4 * grid)
    return TokenizerSpec("discrete", grid, vocab_size=VOCAB, image_size=4 * grid)


@torch.no_grad()
def perturb_(net: torch.nn.Module, scale: float, seed: int = 0) -> torch.nn.Module:
    """Add N(0, scale^2) noise to every parameter in place, so adaLN-Zero's zero-initialised gates,
    cross-attention outputs and head stop hiding the blocks (otherwise many properties hold trivially)."""
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))
    return net


def make_tiny(objective: str, depth: int = 1, head_dim: int = 16, grid: int = GRID, seed: int = 0,
              perturb: float = 0.0) -> Tiny:
    """Objective + freshly initialised Network (seeded), optionally perturbed away from adaLN-Zero init."""
    obj = make_objective(objective)
    spec = obj.net_spec(ModelConfig(depth=depth, head_dim=head_dim), tokenizer_spec(objective, grid), TEXT_DIM, TEXT_LEN)
    torch.manual_seed(seed)
    net = Network(spec)
    if perturb:
        perturb_(net, perturb, seed)
    return Tiny(obj, net, spec)


def fake_text(batch: int, generator: torch.Generator, text_len: int = TEXT_LEN, text_dim: int = TEXT_DIM) -> TextBatch:
    """Random caption states: row i has max(1, Lt - i) real tokens, padding states zero, pooled = mean of real."""
    states = torch.randn(batch, text_len, text_dim, generator=generator)  # (B, Lt, Dt)
    real = torch.tensor([max(1, text_len - i) for i in range(batch)])
    pad = torch.arange(text_len)[None, :] >= real[:, None]  # (B, Lt), True = padding
    states = states.masked_fill(pad[..., None], 0.0)
    pooled = states.sum(1) / real[:, None].float()  # (B, Dt)
    return TextBatch(states, pad, pooled)


def empty_text(batch: int, text_len: int = TEXT_LEN, text_dim: int = TEXT_DIM) -> TextBatch:
    """The unconditional caption as the hash encoder gives it: all padding, zero states and pool."""
    return TextBatch(torch.zeros(batch, text_len, text_dim), torch.ones(batch, text_len, dtype=torch.bool),
                     torch.zeros(batch, text_dim))


def fake_data(spec: NetSpec, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Training inputs for ``spec``: latents (B, C, g, g) float or tokens (B, L) long in [0, V)."""
    if spec.tokens == "continuous":
        return torch.randn(batch, spec.channels, spec.grid, spec.grid, generator=generator)
    return torch.randint(0, spec.vocab_size, (batch, spec.seq_len), generator=generator)


def tiny_run_config(objective: str = "masked", budget_steps: float = 6.0, sets: list[str] | None = None) -> RunConfig:
    """A RunConfig that trains in well under a second: hash text, 256 16px images, depth 1, width 16.

    ``sets`` are ``section.key=value`` overrides applied before the budget is set to
    ``budget_steps`` training steps' worth of FLOPs (fractions allowed).
    """
    from flopmatch.plan import flops_summary

    cfg = RunConfig(objective=objective)
    apply_overrides(cfg, [
        "text.kind=hash", f"text.dim={TEXT_DIM}", f"text.max_len={TEXT_LEN}",
        "data.num_train=256", "data.num_eval=16", "data.image_size=16",
        "tokenizer.patch=4", f"tokenizer.codebook_size={VOCAB}",
        "model.depth=1", "model.head_dim=16",
        "train.batch_size=8", "train.log_every=1", "train.checkpoint_every=1000", "train.precision=fp32",
        "train.device=cpu", "train.warmup_frac=0.1",
        "sample.steps=3",
        *(sets or []),
    ])
    per_step = flops_summary(cfg)["train_flops_per_example"] * cfg.train.batch_size
    cfg.train.budget = float(budget_steps * per_step)
    return cfg.validate()


class Recorder(torch.nn.Module):
    """Wraps a Network like DDP does (``.module``) and records every call's input ``x`` and rows."""

    def __init__(self, net: Network):
        super().__init__()
        self.module = net
        self.inputs: list[torch.Tensor] = []

    @property
    def rows(self) -> list[int]:
        """Batch rows of each recorded call."""
        return [x.shape[0] for x in self.inputs]

    def forward(self, x, text, text_pad, pooled, t=None, cache=None):
        self.inputs.append(x.detach().clone())
        return self.module(x, text, text_pad, pooled, t=t, cache=cache)


def color(i: int) -> tuple[int, int, int]:
    """A distinct solid colour per index (image fixtures of the data-source tests)."""
    return ((37 * i) % 256, (91 * i + 60) % 256, (151 * i + 120) % 256)


def trained_masked_run(run: Path, budget_steps: int) -> Path:
    """A finished tiny masked run in ``run`` (hash text, 32 px so the attribute evaluator applies, 24 eval images)."""
    train(tiny_run_config("masked", budget_steps=budget_steps, sets=["data.image_size=32", "data.num_eval=24"]), run,
          progress=False)
    return run
