"""Analytic planning: a run config -> NetSpec, parameter count and FLOPs, without building anything.

Used by ``flopmatch flops`` and by study planning, so plans are instant. The numbers agree with
what training and sampling report (tests check both against counted FLOPs).
"""

from __future__ import annotations

from pathlib import Path

from flopmatch.config import RunConfig
from flopmatch.errors import UserError
from flopmatch.flops import num_params
from flopmatch.nets import NetSpec
from flopmatch.objectives import make_objective
from flopmatch.tokenizers.base import TokenizerSpec

MINILM_DIM = 384  # all-MiniLM-L6-v2 hidden size


def tokenizer_spec_for(cfg: RunConfig, objective) -> TokenizerSpec:
    """The tokenizer spec a run will use: read from ``tokenizer.path`` or derived from the settings."""
    if cfg.tokenizer.path:
        from flopmatch.checkpoint import read_json

        meta = read_json(Path(cfg.tokenizer.path) / "tokenizer.json")
        try:
            return TokenizerSpec(**meta["spec"])
        except (KeyError, TypeError):
            raise UserError(f"{cfg.tokenizer.path}/tokenizer.json has no valid spec; re-train the tokenizer") from None
    from flopmatch.data.prepare import tokenizer_kind

    kind = tokenizer_kind(cfg, objective)
    p, size = cfg.tokenizer.patch, cfg.data.image_size
    if kind == "patch":
        return TokenizerSpec("continuous", size // p, channels=3 * p * p, image_size=size)
    return TokenizerSpec("discrete", size // p, vocab_size=cfg.tokenizer.codebook_size, image_size=size)


def text_dim_for(cfg: RunConfig) -> int:
    """Width of the text encoder's token states."""
    if cfg.text.kind == "minilm":
        return MINILM_DIM
    if cfg.text.kind == "hash":
        return cfg.text.dim
    raise UserError(f"unknown text encoder {cfg.text.kind!r}; choose minilm or hash")


def net_spec_for(cfg: RunConfig) -> NetSpec:
    """The NetSpec a run config trains (validated; no data, tokenizer fit or model needed)."""
    cfg.validate()
    objective = make_objective(cfg.objective, cfg.method)
    return objective.net_spec(cfg.model, tokenizer_spec_for(cfg, objective), text_dim_for(cfg), cfg.text.max_len)


def flops_summary(cfg: RunConfig) -> dict:
    """Parameter count, training FLOPs per example and sampling FLOPs per image for a config."""
    objective = make_objective(cfg.objective, cfg.method)
    spec = net_spec_for(cfg)
    out = {
        "objective": cfg.objective,
        "depth": spec.depth,
        "width": spec.width,
        "params": num_params(spec),
        "train_flops_per_example": objective.train_flops(spec),
        "sample_flops_per_image": objective.sample_flops(spec, cfg.sample),
        "sample_steps": objective.resolve_steps(cfg.sample, spec),
        "cfg": cfg.sample.cfg,
        "seq_len": spec.seq_len,
    }
    if cfg.objective == "autoregressive":
        from dataclasses import replace

        other = replace(cfg.sample, kv_cache=not cfg.sample.kv_cache)
        out["kv_cache"] = cfg.sample.kv_cache
        out["sample_flops_per_image_" + ("without" if cfg.sample.kv_cache else "with") + "_kv_cache"] = objective.sample_flops(spec, other)
    return out
