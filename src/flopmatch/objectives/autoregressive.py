"""``autoregressive``: next-token prediction in raster order with causal attention.

The input is [BOS, x_0, ..., x_{L-2}] (BOS = vocab id), output i predicts x_i; position i carries
the 2D position of the token it predicts. Sampling decodes one token per step, with a KV cache
(default) or by recomputing the whole prefix (for checking and for the FLOP comparison).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flopmatch.dist import unwrap
from flopmatch.objectives import Objective, spec_of
from flopmatch.objectives.guidance import guidance_rows, guided
from flopmatch.objectives.logits import sample_logits


def shift_right(x: torch.Tensor, bos: int) -> torch.Tensor:
    """tokens (B, L) -> inputs (B, L): [BOS, x_0, ..., x_{L-2}]."""
    return torch.cat([torch.full_like(x[:, :1], bos), x[:, :-1]], dim=1)


class Autoregressive(Objective):
    name = "autoregressive"
    tokens = "discrete"
    causal = True

    def resolve_steps(self, sample, spec):
        """One network step per token: the sequence length (``steps`` does not apply)."""
        return spec.seq_len

    def sample_flops(self, spec, sample):
        from flopmatch.flops import autoregressive_sample_flops

        return autoregressive_sample_flops(spec, sample.cfg, sample.kv_cache)

    def loss(self, net, x, text, generator=None):
        """Next-token cross-entropy over all L positions of tokens x (B, L)."""
        logits = net(shift_right(x, spec_of(net).vocab), text.states, text.pad, text.pooled)  # (B, L, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), x.flatten())

    @torch.no_grad()
    def sample(self, net, cond, uncond, sample, generator=None):
        """Tokens (B, L), one per step; with ``sample.kv_cache`` each step feeds only the new token."""
        spec = spec_of(net)
        B, L = cond.pooled.shape[0], spec.seq_len
        device = cond.pooled.device
        out = torch.full((B, L), spec.vocab, dtype=torch.long, device=device)
        cache = unwrap(net).new_cache(guidance_rows(B, sample.cfg), device) if sample.kv_cache else None
        for i in range(L):
            if cache is not None:
                inp = out[:, i - 1 : i] if i > 0 else out[:, :1]  # (B, 1): BOS first, then the last token
                logits = guided(net, inp, cond, uncond, sample.cfg, cache=cache)[:, -1]
            else:
                prefix = shift_right(out, spec.vocab)[:, : i + 1]  # (B, i+1)
                logits = guided(net, prefix, cond, uncond, sample.cfg)[:, -1]
            out[:, i], _ = sample_logits(logits, sample.temperature, sample.top_k, generator)
        return out
