"""Analytic planning: a run config -> NetSpec, parameter count, FLOPs and steps, without building anything.

Used by ``flopmatch flops``, by training (the step count of a budget) and by study planning, so plans
are instant. The numbers agree with what training and sampling report (tests check both against
counted FLOPs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from flopmatch.config import RunConfig
from flopmatch.errors import UserError
from flopmatch.files import read_json
from flopmatch.flops import num_params
from flopmatch.nets import NetSpec
from flopmatch.objectives import Objective, make_objective
from flopmatch.text import text_dim
from flopmatch.tokenizers.base import WEIGHT_FREE_KIND, TokenizerSpec

MAX_STEPS = 10**8  # more steps than any study here needs: a budget asking for more is a typo (1e40 for 1e14)
FAST_FLOPS_PER_S = 1e14  # a fast accelerator's sustained rate, for saying how absurd a budget is


@dataclass
class Plan:
    """What a budget buys: steps and FLOPs, from the analytic count (no model built)."""

    flops_per_example: int
    flops_per_step: int
    steps: int

    @property
    def total_flops(self) -> int:
        """FLOPs of all planned steps: at least the budget, less than one step over it."""
        return self.steps * self.flops_per_step


def plan_steps(budget: float, flops_per_example: int, batch_size: int) -> Plan:
    """Steps = ceil(budget / FLOPs per step), FLOPs per step = FLOPs per example x global batch.

    Training stops at the first step where the cumulative FLOPs reach the budget (at most one step
    over). A budget below one step is a UserError.
    """
    per_step = flops_per_example * batch_size
    if budget < per_step:
        raise UserError(
            f"budget {budget:.3g} FLOPs is smaller than one training step ({per_step:.3g} FLOPs at batch "
            f"{batch_size}); raise --budget or lower train.batch_size"
        )
    # The 1e-9 keeps a budget that is an exact multiple of a step (up to float rounding) from buying one more.
    steps = math.ceil(budget / per_step - 1e-9)
    if steps > MAX_STEPS:
        days = budget / FAST_FLOPS_PER_S / 86400
        raise UserError(f"budget {budget:.3g} FLOPs means {steps:.3g} training steps of {per_step:.3g} FLOPs, about "
                        f"{days:.3g} days even at {FAST_FLOPS_PER_S:.0e} FLOP/s; at most {MAX_STEPS:.0e} steps are allowed: "
                        f"lower --budget or raise train.batch_size")
    return Plan(flops_per_example, per_step, steps)


def training_memory_bytes(spec: NetSpec, batch_size: int, shards: int = 1, averages: int = 0) -> int:
    """A lower bound on the memory training needs per process: fp32 weights, EMA, gradients and two AdamW
    moments (20 bytes per parameter), the post-hoc EMA's ``averages`` (4 bytes each), all split over ``shards``
    processes under FSDP2, plus the activations of
    ``batch_size`` examples kept for backward (~34 values of width D per token per block, fp32; Korthikanti
    et al. 2022 count 34 bytes per token and width in half precision for a GPT block without recomputation).
    """
    activations = 34 * 4 * batch_size * spec.seq_len * spec.width * spec.depth
    return (20 + 4 * averages) * num_params(spec) // shards + activations


def weight_free_kind(cfg: RunConfig, objective: Objective) -> str:
    """The weight-free tokenizer kind a run uses: ``tokenizer.kind``, or for "auto" the one its tokens need."""
    return WEIGHT_FREE_KIND[objective.tokens] if cfg.tokenizer.kind == "auto" else cfg.tokenizer.kind


def tokenizer_spec_for(cfg: RunConfig, objective: Objective) -> TokenizerSpec:
    """The tokenizer spec a run will use: read from ``tokenizer.path`` or derived from the settings."""
    if cfg.tokenizer.path:
        meta = read_json(Path(cfg.tokenizer.path) / "tokenizer.json")
        try:
            return TokenizerSpec.from_dict(meta["spec"])
        except (KeyError, TypeError):
            raise UserError(f"{cfg.tokenizer.path}/tokenizer.json has no valid spec; re-train the tokenizer") from None
    p, size = cfg.tokenizer.patch, cfg.data.image_size
    if weight_free_kind(cfg, objective) == "patch":
        return TokenizerSpec("continuous", size // p, channels=3 * p * p, image_size=size)
    return TokenizerSpec("discrete", size // p, vocab_size=cfg.tokenizer.codebook_size, image_size=size)


def net_spec_for(cfg: RunConfig, tokenizer: TokenizerSpec | None = None) -> NetSpec:
    """The NetSpec a run config trains (validated; no data, tokenizer fit or model needed).

    ``tokenizer`` replaces the spec derived from the config (a study plans runs before their
    learned tokenizers exist, from the autoencoder configs).
    """
    cfg.validate()
    objective = make_objective(cfg.objective)
    tok = tokenizer or tokenizer_spec_for(cfg, objective)
    return objective.net_spec(cfg.model, tok, text_dim(cfg.text), cfg.text.max_len)


def flops_summary(cfg: RunConfig, tokenizer: TokenizerSpec | None = None) -> dict:
    """Parameter count, training FLOPs per example and sampling FLOPs per image for a config."""
    objective = make_objective(cfg.objective)
    spec = net_spec_for(cfg, tokenizer)
    out = {
        "objective": cfg.objective.name,
        "depth": spec.depth,
        "width": spec.width,
        "params": num_params(spec),
        "train_flops_per_example": objective.train_flops(spec),
        "sample_flops_per_image": objective.sample_flops(spec, cfg.sample),
        "sample_steps": objective.resolve_steps(cfg.sample, spec),
        "cfg": cfg.sample.guidance,  # the guidance scale; output key kept from v0.1 (scripts read it)
        "seq_len": spec.seq_len,
    }
    if cfg.objective.name == "diffusion":  # the sampling FLOPs above follow the solver (heun-N: 2N - 1 network calls)
        out["solver"], out["shift"] = cfg.sample.solver, cfg.sample.shift
    if cfg.objective.name == "autoregressive":
        other = replace(cfg.sample, kv_cache=not cfg.sample.kv_cache)
        out["kv_cache"] = cfg.sample.kv_cache
        out["sample_flops_per_image_" + ("without" if cfg.sample.kv_cache else "with") + "_kv_cache"] = objective.sample_flops(spec, other)
    return out
