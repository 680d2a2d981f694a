"""Classifier-free guidance, written once for all three paradigms.

The conditional and unconditional passes run as one doubled batch; the guided output is
``u + guidance * (c - u)`` on whatever the network predicts (velocity for diffusion, logits for the
token paradigms), over ALL channels. With ``guidance == 1`` the unconditional pass is skipped.

Why it works: caption dropout in training (flopmatch.train) makes the one network both a
conditional and an unconditional model; extrapolating from the unconditional toward the conditional
prediction (guidance > 1) trades diversity for caption fidelity without a separate classifier.
The token paradigms apply the same rule to logits, as MUSE and LlamaGen do.

References: Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"; Chang et al. 2023 (MUSE);
Sun et al. 2024 (LlamaGen).
"""

from __future__ import annotations

import torch

from flopmatch.text import TextBatch


class Guided:
    """Classifier-free guidance of ``net`` for a fixed pair of text batches (B rows each), called once per sampling step.

    The doubled text batch [cond; uncond] is built once here rather than at every step (a sampler calls the network
    tens of times with the same captions). With a KV cache, the cache must have been created for 2B rows when
    ``guidance != 1``.
    """

    def __init__(self, net, cond: TextBatch, uncond: TextBatch, guidance: float):
        self.net, self.guidance = net, guidance
        # rows [cond; uncond]: states (2B, Lt, Dt), pad (2B, Lt), pooled (2B, Dt)
        self.text = cond if guidance == 1.0 else TextBatch.cat([cond, uncond])

    def __call__(self, x: torch.Tensor, t: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """Guided network output for inputs x (B, ...); t (B,) for diffusion."""
        text = self.text
        if self.guidance == 1.0:
            return self.net(x, text.states, text.pad, text.pooled, t=t, cache=cache)
        # One doubled batch instead of two passes: one launch per layer, and with a KV cache both halves
        # share one cache of 2B rows.
        t2 = None if t is None else torch.cat([t, t])  # (2B,)
        out = self.net(torch.cat([x, x]), text.states, text.pad, text.pooled, t=t2, cache=cache)  # (2B, ...)
        c, u = out.float().chunk(2)  # 2 x (B, ...); fp32 so the (c - u) extrapolation is not done in bf16
        return u + self.guidance * (c - u)  # (B, ...); guidance 0 = unconditional, 1 = conditional


def guidance_rows(batch: int, guidance: float) -> int:
    """Rows the network sees per step: 2B with guidance, B without."""
    return batch if guidance == 1.0 else 2 * batch
