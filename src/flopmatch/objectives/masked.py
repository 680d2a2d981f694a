"""``masked``: MaskGIT/MUSE masked-token prediction with confidence-ordered parallel decoding.

Training masks a fraction r = cos(pi/2 * u), u ~ U(0, 1), of the L positions (at least
``min_mask``), replaces them by the [MASK] id (= vocab size) and takes cross-entropy on masked
positions only. The network sees, and is charged FLOPs for, every position.

Sampling starts fully masked; at step s = 1..N it samples every masked position, keeps the most
confident ones and re-masks the rest so that n_s = floor(L * cos(pi/2 * s/N)) stay masked (strictly
decreasing, 0 after the last step). Confidence is the log-probability of the drawn token plus
Gumbel noise scaled by ``choice_temperature * (1 - s/N)`` (MaskGIT's annealed randomness).

Why: decoding many tokens per step takes N << L network passes (vs. L for raster order); the
cosine schedule decides few tokens early, when the image is still mostly unknown, and more later,
and training draws the mask ratio from the same schedule so the network sees the ratios decoding
visits (MaskGIT found cosine best). Text conditioning by cross-attention and classifier-free
guidance on logits follow MUSE.

References: Chang et al. 2022, "MaskGIT: Masked Generative Image Transformer"; Chang et al. 2023,
"Muse: Text-To-Image Generation via Masked Generative Transformers"; Devlin et al. 2019 (BERT,
masked-token loss); Ho & Salimans 2022 (guidance).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flopmatch.errors import UserError
from flopmatch.objectives.base import Objective, spec_of
from flopmatch.objectives.guidance import Guided
from flopmatch.objectives.logits import sample_logits


def mask_ratio(u: torch.Tensor) -> torch.Tensor:
    """Cosine schedule: fraction masked for u in [0, 1] (u=0 -> 1, u=1 -> 0)."""
    return torch.cos(0.5 * math.pi * u)  # same shape as u


def masked_counts(seq_len: int, steps: int) -> list[int]:
    """Positions still masked after each of the ``steps`` decoding steps (strictly decreasing to 0)."""
    counts, prev = [], seq_len
    for s in range(1, steps + 1):
        # prev - 1: at least one token is decided per step, so decoding always ends after ``steps`` steps
        n = min(prev - 1, math.floor(seq_len * math.cos(0.5 * math.pi * s / steps)))
        counts.append(max(n, 0))
        prev = counts[-1]
    counts[-1] = 0  # the last step decides everything left
    return counts


def random_mask(batch: int, seq_len: int, min_mask: int, device, generator) -> torch.Tensor:
    """Bool mask (B, L), True = hidden, with a cosine-scheduled count per row (drawn row by row, in one call)."""
    u = torch.rand(batch, device=device, generator=generator)  # (B,)
    # clamp: at least ``min_mask`` hidden per row (ceil alone already gives >= 1, as u < 1)
    n = torch.ceil(mask_ratio(u) * seq_len).long().clamp(min_mask, seq_len)  # (B,)
    scores = torch.rand(batch, seq_len, device=device, generator=generator)  # (B, L)
    rank = scores.argsort(dim=1).argsort(dim=1)  # (B, L): rank of each position in a random order
    return rank < n[:, None]  # (B, L): exactly n[b] random positions of row b are True


class Masked(Objective):
    name = "masked"
    tokens = "discrete"
    default_steps = 12  # N decoding passes (at most L, see resolve_steps)
    # train_flops is the base class's: all L positions. The network processes every position (the
    # unmasked ones are the context it predicts from), so they all cost compute even though the loss
    # reads only the masked ones; charging only masked positions would undercount the method.

    def resolve_steps(self, sample, spec):
        steps = super().resolve_steps(sample, spec)
        if steps > spec.seq_len:
            raise UserError(f"masked decoding takes at most {spec.seq_len} steps (one token per step), got {steps}")
        return steps

    def draw(self, batch, spec, device, generator):
        """The masks (B, L) bool of ``batch`` training examples and each example's loss ``weight`` (B,).

        ``weight`` is batch / (masked positions in the whole batch), the same for every row: with it, the
        loss of any slice of these rows is its share of the whole batch's token mean (see :meth:`loss`).
        """
        mask = random_mask(batch, spec.seq_len, self.cfg.min_mask, device, generator)  # (B, L)
        weight = (batch / mask.sum()).expand(batch)  # (B,); a device tensor, no host sync
        return {"mask": mask, "weight": weight}

    def loss(self, net, x, text, generator=None, draws=None):
        """Cross-entropy on the masked positions of tokens x (B, L), averaged over the masked positions of the
        batch the draws were made for (by default this one): sum_b weight_b * (CE summed over b's masked
        positions) / B.

        Why weights rather than ``cross_entropy(logits[mask], x[mask])``: MaskGIT averages over all masked
        tokens of the batch, and the number masked differs between examples, so the mean of two half batches'
        token means is not the batch's token mean; DDP and FSDP average the ranks' gradients, so a rank-local
        token mean would make the trajectory depend on the number of processes. With weight_b = B_global /
        M_global (drawn for the global batch) every rank's loss is its share, and their mean is the global
        token mean: for the whole batch, sum_b (B / M) * CE_b / B = sum CE / M, the loss as MaskGIT writes it.
        """
        B, L = x.shape
        draws = self._draws(net, x, generator, draws)
        mask, weight = draws["mask"], draws["weight"]  # (B, L) bool, (B,)
        inp = x.masked_fill(mask, spec_of(net).vocab_size)  # (B, L) with [MASK] id at hidden positions
        logits = net(inp, text.states, text.pad, text.pooled)  # (B, L, V)
        # Loss on masked positions only (BERT, MaskGIT): visible ones are given and would be a trivial copy.
        # fp32: a bf16 log-softmax over V codes loses precision (~3 significant digits).
        # Every position's CE, then zeroed where visible: selecting the masked ones (logits[mask]) has a
        # data-dependent shape, which costs a device-to-host sync every step on a GPU.
        ce = F.cross_entropy(logits.float().flatten(0, 1), x.flatten(), reduction="none").view(B, L)  # (B*L, V) -> (B, L)
        return (ce * (mask * weight[:, None])).sum() / B  # each masked position weighted by its example's weight

    @torch.no_grad()
    def sample(self, net, cond, uncond, sample, generator=None):
        """Tokens (B, L) by confidence-ordered parallel decoding."""
        spec = spec_of(net)
        B, L, V = cond.pooled.shape[0], spec.seq_len, spec.vocab_size
        device = cond.pooled.device
        steps = self.resolve_steps(sample, spec)
        tokens = torch.full((B, L), V, dtype=torch.long, device=device)  # (B, L), all [MASK]
        mask = torch.ones(B, L, dtype=torch.bool, device=device)  # (B, L), True = still masked
        model = Guided(net, cond, uncond, sample.guidance)
        for s, n_keep_masked in enumerate(masked_counts(L, steps), start=1):
            logits = model(tokens)  # (B, L, V)
            drawn, logp = sample_logits(logits, sample.temperature, sample.top_k, generator)  # 2 x (B, L)
            tokens = torch.where(mask, drawn, tokens)  # (B, L): fill masked slots, keep decided tokens
            # Gumbel noise on the confidences randomises which tokens are kept, so early steps do not
            # always commit to the same "easy" tokens (more diverse samples); annealed to 0 at the end.
            noise_scale = sample.choice_temperature * (1 - s / steps)
            if noise_scale > 0:
                u = torch.rand(B, L, device=device, generator=generator).clamp_(1e-20, 1 - 1e-7)  # (B, L)
                logp = logp + noise_scale * -torch.log(-torch.log(u))  # Gumbel
            conf = logp.masked_fill(~mask, float("inf"))  # decided tokens are never re-masked
            remask = torch.zeros_like(mask)  # (B, L)
            if n_keep_masked > 0:
                lowest = conf.topk(n_keep_masked, dim=1, largest=False).indices  # (B, n)
                remask.scatter_(1, lowest, True)
            tokens = tokens.masked_fill(remask, V)  # least confident new tokens go back to [MASK]
            mask = remask
        return tokens
