"""Classifier-free guidance, written once for all three paradigms.

The conditional and unconditional passes run as one doubled batch; the guided output is
``u + scale * (c - u)`` on whatever the network predicts (velocity for diffusion, logits for the
token paradigms), over ALL channels. With ``scale == 1`` the unconditional pass is skipped.
"""

from __future__ import annotations

import torch


def double_batch(cond, uncond):
    """Stack conditional and unconditional text batches: rows [cond; uncond]."""
    return type(cond)(
        states=torch.cat([cond.states, uncond.states]),
        pad=torch.cat([cond.pad, uncond.pad]),
        pooled=torch.cat([cond.pooled, uncond.pooled]),
    )


def guided(net, x: torch.Tensor, cond, uncond, scale: float, t: torch.Tensor | None = None, cache=None) -> torch.Tensor:
    """Guided network output for inputs x (B, ...), conditioning text batches of B rows each.

    With a KV cache, the cache must have been created for 2B rows when ``scale != 1``.
    """
    if scale == 1.0:
        return net(x, cond.states, cond.pad, cond.pooled, t=t, cache=cache)
    both = double_batch(cond, uncond)
    t2 = None if t is None else torch.cat([t, t])
    out = net(torch.cat([x, x]), both.states, both.pad, both.pooled, t=t2, cache=cache)
    c, u = out.float().chunk(2)
    return u + scale * (c - u)


def guidance_rows(batch: int, scale: float) -> int:
    """Rows the network sees per step: 2B with guidance, B without."""
    return batch if scale == 1.0 else 2 * batch
