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
    No host synchronisation (a sampler calls this at every step): ``u * total`` can round up to the total in
    float32 (~1e-7 per draw), so it is capped just below it; the draw is then the entry where the running sum first
    reaches the total, which has mass. A row without mass (all zero or NaN: not a distribution) gives the last index,
    never one out of range.
    """
    cdf = probs.float().cumsum(dim=-1)  # (N, V)
    total = cdf[:, -1:]  # (N, 1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * total  # (N, 1)
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # < total: some entry's cdf exceeds it
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)  # (N,)
