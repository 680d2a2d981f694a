"""Categorical sampling from logits with temperature and top-k (shared by the token paradigms)."""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """logits (..., V) -> tempered logits with everything outside the top k set to -inf (k=0: keep all)."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (..., V); ties with the k-th are kept
    return logits


def sample_logits(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row. logits (..., V) -> (tokens (...) long, log-probability of each draw (...))."""
    logp = torch.log_softmax(filter_logits(logits, temperature, top_k), dim=-1)  # (..., V)
    flat = logp.reshape(-1, logp.shape[-1])  # (N, V)
    tokens = categorical(flat.exp(), generator)  # (N,)
    chosen = flat.gather(1, tokens[:, None]).squeeze(1)  # (N,)
    return tokens.view(logp.shape[:-1]), chosen.view(logp.shape[:-1])  # 2 x (...)


def categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of ``probs`` (N, V) (rows need not be normalised) -> indices (N,) long.

    Inverse-CDF sampling: the first index whose cumulative mass exceeds ``u * total``, u ~ U[0, 1).
    A zero-probability entry (e.g. outside top-k) is never drawn: its cumulative mass equals its
    predecessor's. Why not torch.multinomial: with num_samples=1 it took ~140 ms for a (6400, 1024)
    batch on the 2-core CPU here against ~4 ms for this, and was over half of masked sampling time
    (cProfile of one evaluation; `benchmarks/sampling.py` measures both); the distribution is the same.
    """
    cdf = probs.float().cumsum(dim=-1)  # (N, V)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]  # (N, 1)
    idx = torch.searchsorted(cdf, u, right=True).squeeze(1)  # (N,)
    over = idx == probs.shape[-1]  # u rounded up to the total (float32, ~1e-7 per draw): take the last entry with mass
    if over.any():
        # (N,): index of the last entry with positive mass in each row
        last = torch.arange(probs.shape[-1], device=probs.device).expand_as(probs).masked_fill(probs <= 0, -1).amax(-1)
        idx = torch.where(over, last, idx)
    return idx
