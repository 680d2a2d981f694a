"""``autoregressive``: next-token prediction in raster order with causal attention.

The input is [BOS, x_0, ..., x_{L-2}] (BOS = vocab id), output i predicts x_i; position i carries
the 2D position of the token it predicts. Sampling decodes one token per step, with a KV cache
(default) or by recomputing the whole prefix (for checking and for the FLOP comparison).

Why: this is the language-model recipe applied to image codes (VQGAN's transformer, Parti,
LlamaGen): one causal pass trains all L next-token predictions at once (teacher forcing), and
[BOS] gives the first token something to be predicted from, the caption entering by cross-attention
and through c. Sampling needs L sequential steps, which the KV cache makes cheap per step.

References: Esser et al. 2021, "Taming Transformers for High-Resolution Image Synthesis" (VQGAN);
Yu et al. 2022, "Scaling Autoregressive Models for Content-Rich Text-to-Image Generation" (Parti);
Sun et al. 2024, "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation"
(LlamaGen: raster order, classifier-free guidance on logits); Ho & Salimans 2022 (guidance).
"""

from __future__ import annotations

import copy
import functools
import weakref

import torch
import torch.nn.functional as F

from flopmatch.backbone import cache_dtype
from flopmatch.dist import unwrap
from flopmatch.flops import autoregressive_sample_flops
from flopmatch.objectives.base import Objective, spec_of
from flopmatch.objectives.guidance import Guided, guidance_rows
from flopmatch.objectives.logits import sample_logits


def network_step(net, x: torch.Tensor, states, pad, pooled, cache) -> torch.Tensor:
    """``net``'s logits (R, l, V) for the new tokens x (R, l) through ``cache``; R rows (2B with guidance)."""
    return net(x, states, pad, pooled, cache=cache)


@functools.cache
def compiled_network_step(device_type: str):
    """:func:`network_step` under ``torch.compile``, one per device type, compiled on first use and then shared by every
    sampler in the process (another network or cache of the same shapes reuses it; the batch becomes a dynamic size at
    the second one seen). Only the network is compiled: the guidance mix stays eager, so a new scale compiles nothing.

    On CUDA with CUDA graphs ("reduce-overhead"): a one-token step of these networks is bound by kernel launches, which
    a replayed graph removes. On a CPU, inductor's default mode (fused elementwise ops, less per-op overhead)."""
    return torch.compile(network_step, mode="reduce-overhead" if device_type == "cuda" else None)


class CompiledNetwork:
    """``net`` called as :class:`Guided` calls a network, through :func:`compiled_network_step` (one token per call)."""

    def __init__(self, net):
        self.net = net

    def __call__(self, x, states, pad, pooled, t=None, cache=None) -> torch.Tensor:
        return compiled_network_step(x.device.type)(self.net, x, states, pad, pooled, cache)


# Static caches by network, then (rows, device): made once, reset per sampling call (see static_cache).
_STATIC_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def static_cache(net, rows: int, device: torch.device):
    """``net``'s static KV cache (backbone.KVCache) for ``rows`` rows on ``device``, emptied for a new sequence.

    Kept across sampling calls: a CUDA graph replays fixed addresses, so the graph recorded for one call serves the
    next only if the cache's buffers stay where they were (they are marked static for that); a new cache per call would
    record a new graph each time. Stale keys/values from the last call are never read: attention masks every slot past
    the current position, and each slot up to it is rewritten first."""
    per_net = _STATIC_CACHES.setdefault(net, {})
    key = (rows, str(device), cache_dtype(device, net.spec.seq_len))  # the dtype follows the caller's autocast
    if key not in per_net:
        cache = net.new_cache(rows, device, static=True)
        if device.type == "cuda":
            for t in (*cache.k, *cache.v, cache.position):
                torch._dynamo.mark_static_address(t, guard=False)
        per_net[key] = cache
    per_net[key].reset()
    return per_net[key]


def shift_right(x: torch.Tensor, bos: int) -> torch.Tensor:
    """tokens (B, L) -> inputs (B, L): [BOS, x_0, ..., x_{L-2}]."""
    return torch.cat([torch.full_like(x[:, :1], bos), x[:, :-1]], dim=1)  # (B, 1) + (B, L-1) -> (B, L)


class Autoregressive(Objective):
    name = "autoregressive"
    tokens = "discrete"
    causal = True

    def resolve_steps(self, sample, spec):
        """One network step per token: the sequence length (``steps`` does not apply)."""
        return spec.seq_len

    def sample_flops(self, spec, sample):
        return autoregressive_sample_flops(spec, sample.guidance, sample.kv_cache)

    def loss(self, net, x, text, generator=None, draws=None):
        """Next-token cross-entropy over all L positions of tokens x (B, L); no randomness (``draws`` is unused).

        The mean over all B*L positions is a mean over examples of equal-sized terms, so equal slices of a
        batch average to the whole batch's loss (what DDP's gradient averaging needs; see objectives.base).
        """
        logits = net(shift_right(x, spec_of(net).vocab_size), text.states, text.pad, text.pooled)  # (B, L, V)
        # fp32: a bf16 log-softmax over V codes loses precision (~3 significant digits).
        return F.cross_entropy(logits.flatten(0, 1).float(), x.flatten())  # (B*L, V) vs (B*L,)

    @torch.no_grad()
    def sample(self, net, cond, uncond, sample, generator=None):
        """Tokens (B, L), one per step; with ``sample.kv_cache`` each step feeds only the new token."""
        spec = spec_of(net)
        B, L = cond.pooled.shape[0], spec.seq_len
        device = cond.pooled.device
        # (B, L), prefilled with the [BOS] id: out[:, :1] doubles as the [BOS] input of step 0.
        out = torch.full((B, L), spec.vocab_size, dtype=torch.long, device=device)
        # One cache row per network row: 2B with guidance (conditional and unconditional halves). A compiled step
        # needs fixed shapes: the static cache (see backbone.KVCache).
        rows, static = guidance_rows(B, sample.guidance), sample.kv_cache and sample.compile
        cache = static_cache(unwrap(net), rows, device) if static else unwrap(net).new_cache(rows, device) if sample.kv_cache else None
        model = compiled = Guided(net, cond, uncond, sample.guidance)
        if static:
            compiled = copy.copy(model)  # the same doubled captions, the network called compiled
            compiled.net = CompiledNetwork(net)
        for i in range(L):
            if cache is not None:
                inp = out[:, i - 1 : i] if i > 0 else out[:, :1]  # (B, 1): BOS first, then the last token
                # The first step runs eagerly: it fills the cache's conditioning (text keys/values, adaLN), which later
                # steps only read, so every compiled step is the same graph.
                logits = (compiled if i > 0 else model)(inp, cache=cache)[:, -1]  # (B, V)
            else:
                prefix = shift_right(out, spec.vocab_size)[:, : i + 1]  # (B, i+1)
                logits = model(prefix)[:, -1]  # (B, V): last position only
            out[:, i], _ = sample_logits(logits, sample.temperature, sample.top_k, generator)  # (B,)
        return out
