"""Categorical sampling from logits with temperature and top-k (shared by the token paradigms)."""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """logits (..., V) -> tempered logits with everything outside the top k set to -inf (k=0: keep all)."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def sample_logits(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row. logits (..., V) -> (tokens (...) long, log-probability of each draw (...))."""
    logp = torch.log_softmax(filter_logits(logits, temperature, top_k), dim=-1)
    flat = logp.reshape(-1, logp.shape[-1])  # (N, V)
    tokens = torch.multinomial(flat.exp(), 1, generator=generator).squeeze(1)  # (N,)
    chosen = flat.gather(1, tokens[:, None]).squeeze(1)
    return tokens.view(logp.shape[:-1]), chosen.view(logp.shape[:-1])
