"""Lookup-free quantisation (LFQ, MAGVIT-v2): discrete codes (B, 64) for ``masked`` and ``autoregressive``.

The encoder outputs ``bits`` channels per grid position; each channel is quantised to its sign
(+1 / -1), so a position's code vector is a corner of the {-1, +1}^bits hypercube and its token is
the integer sum_i [q_i > 0] 2^i in [0, 2^bits). There is no codebook to look up or collapse.

Training losses (all fields of AutoencoderConfig):
- straight-through estimator: the decoder sees ``z + (q - z).detach()``, so gradients pass to z;
- commitment ``commitment_weight * mean((z - sg(q))^2)`` keeps z near the corners;
- entropy ``entropy_weight * (H[p(c|z)] - diversity_weight * H[E_z p(c|z)])`` with
  p(c|z) = softmax_c(2 <z, c> / entropy_temperature): confident per position, diverse overall.
  p(c|z) factorises over bits exactly (the logit is a sum over bits), so the per-position
  entropy is a sum of binary entropies. The codebook entropy H[E p] does not factorise; it is
  computed exactly over all 2^bits codes when bits <= 12, and otherwise by the sum of per-bit
  marginal entropies (an upper bound).

Loss weights. MAGVIT-v2's commitment 0.25 and entropy 0.1 overwhelm a per-pixel-mean reconstruction
loss on this data: measured (2000 steps, 2000 eval images, PSNR / shape accuracy of the attribute
classifier on reconstructions), L1 with 0.25/0.1: 25.9 dB / 46%; L1 with 0.05/0.02: 28.3 dB / 72%;
L1 with 0.005/0.001: 29.7 dB / 81%; L2 with 0.005/0.001 (the default): 33.1 dB / 95%, all 1024 codes
used, perplexity 844. L2 with 0.001/0.0002 gave the same PSNR with lower perplexity (636).

Bits default to 10 (vocabulary 1024, 640 bits per image): enough to use the whole codebook on shapes
(see eval.json's codebook_usage) while the generators' output head stays small (1024 x width); 12+
bits would spend most of a small transformer's parameters on the head and its softmax.
"""

from __future__ import annotations

import torch
from torch import nn

from flopmatch.tokenizers.autoencoder import AutoencoderConfig
from flopmatch.tokenizers.learned import LearnedAutoencoder

EXACT_ENTROPY_MAX_BITS = 12


def _entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats along ``dim`` (0 log 0 = 0)."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=dim)


class LFQuantizer(nn.Module):
    """Parameter-free sign quantiser over the channel axis of (B, bits, g, g) maps."""

    def __init__(self, bits: int, entropy_temperature: float = 0.01, diversity_weight: float = 1.0):
        super().__init__()
        self.bits = bits
        self.entropy_temperature = entropy_temperature
        self.diversity_weight = diversity_weight
        # Not persistent: derived from `bits`, so they stay out of tensors.safetensors.
        self.register_buffer("powers", 2 ** torch.arange(bits), persistent=False)  # (bits,) long
        if bits <= EXACT_ENTROPY_MAX_BITS:
            codes = (torch.arange(2**bits).unsqueeze(1) // 2 ** torch.arange(bits)) % 2  # (V, bits) in {0,1}
            self.register_buffer("codebook", codes.float() * 2 - 1, persistent=False)  # (V, bits) +/-1
        else:
            self.codebook = None

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Sign with sign(0) = +1: (..., bits, ...) float -> same shape, values in {-1, +1}."""
        return torch.where(z > 0, 1.0, -1.0).to(z.dtype)

    def codes_to_tokens(self, q: torch.Tensor) -> torch.Tensor:
        """(B, bits, g, g) +/-1 -> tokens (B, g*g) long, raster order (row-major over the grid)."""
        b, _, g, _ = q.shape
        on = (q > 0).long().flatten(2)  # (B, bits, L)
        return (on * self.powers.view(1, -1, 1)).sum(dim=1).view(b, g * g)  # (B, L)

    def tokens_to_codes(self, tokens: torch.Tensor, grid: int) -> torch.Tensor:
        """tokens (B, g*g) long -> code vectors (B, bits, g, g) float in {-1, +1}."""
        b = tokens.shape[0]
        on = (tokens.long().unsqueeze(1) // self.powers.view(1, -1, 1)) % 2  # (B, bits, L)
        return (on.float() * 2 - 1).view(b, self.bits, grid, grid)

    def entropy_terms(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-position entropy averaged, codebook entropy) in nats for z (B, bits, g, g), float32."""
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, self.bits)  # (N, bits), N = B*g*g
        # p(bit_i = +1 | z_i) = softmax over {+1,-1} of 2 z_i c / T = sigmoid(4 z_i / T)
        p_on = torch.sigmoid(4.0 * flat / self.entropy_temperature)  # (N, bits)
        per_bit = torch.stack([p_on, 1 - p_on], dim=-1)  # (N, bits, 2)
        per_sample = _entropy(per_bit).sum(dim=1).mean()
        if self.codebook is not None:
            logits = 2.0 * flat @ self.codebook.t() / self.entropy_temperature  # (N, V)
            avg = torch.softmax(logits, dim=-1).mean(dim=0)  # (V,)
            codebook = _entropy(avg)
        else:
            codebook = _entropy(per_bit.mean(dim=0)).sum()
        return per_sample, codebook

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """z (B, bits, g, g) -> (straight-through codes (B, bits, g, g), tokens (B, g*g), loss terms).

        loss terms: "commitment" mean((z - sg(q))^2), "per_sample_entropy", "codebook_entropy" (nats).
        """
        z = z.float()
        q = self.quantize(z)
        q_st = z + (q - z).detach()  # forward value q, gradient of identity wrt z
        with torch.autocast(z.device.type, enabled=False):  # logits / T with T = 0.01 need fp32, not bf16
            per_sample, codebook = self.entropy_terms(z)
        terms = {
            "commitment": (z - q.detach()).pow(2).mean(),
            "per_sample_entropy": per_sample,
            "codebook_entropy": codebook,
        }
        return q_st, self.codes_to_tokens(q), terms


class LFQAutoencoder(LearnedAutoencoder):
    """Discrete tokenizer: images (B, 3, S, S) <-> tokens (B, g*g) in [0, 2^bits), g = S/4 at defaults."""

    kind = "lfq"
    name = "lfq"

    def __init__(self, config: AutoencoderConfig):
        super().__init__(config, encoder_out=config.bits, z_channels=config.bits)
        self.quantizer = LFQuantizer(config.bits, config.entropy_temperature, config.diversity_weight)
        self.spec = config.spec()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> tokens (B, g*g) long in [0, 2^bits), raster order. No gradients."""
        z = self.encoder(images).float()
        return self.quantizer.codes_to_tokens(self.quantizer.quantize(z))

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """tokens (B, g*g) long -> images (B, 3, S, S) clamped to [-1, 1]. No gradients."""
        if z.dim() != 2 or z.shape[1] != self.grid * self.grid:
            raise ValueError(f"LFQ decode expects tokens (B, {self.grid * self.grid}), got {tuple(z.shape)}")
        codes = self.quantizer.tokens_to_codes(z, self.grid)
        return self.decoder(codes).float().clamp(-1.0, 1.0)

    def training_forward(self, images: torch.Tensor, generator: torch.Generator | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """One training pass through the straight-through quantiser.

        Returns (reconstruction (B, 3, S, S) unclamped, weighted commitment + entropy loss, logs).
        ``generator`` is unused (LFQ is deterministic); it is accepted to match the KL signature.
        """
        cfg = self.config
        q_st, tokens, terms = self.quantizer(self.encoder(images))
        recon = self.decoder(q_st)
        entropy = terms["per_sample_entropy"] - cfg.diversity_weight * terms["codebook_entropy"]
        loss = cfg.commitment_weight * terms["commitment"] + cfg.entropy_weight * entropy
        # Device tensors (read on the host at log steps only: a float() here would sync a GPU every step).
        logs = {k: v.detach() for k, v in terms.items()}
        # The fraction of the 2^bits codes used in this batch: a fixed-size scatter, not unique() (whose output size
        # depends on the data, a sync)
        used = torch.zeros(2**cfg.bits, device=tokens.device).index_fill_(0, tokens.flatten(), 1.0)  # (2^bits,)
        logs["batch_usage"] = used.sum() / 2**cfg.bits
        return recon, loss, logs
