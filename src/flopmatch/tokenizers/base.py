"""The tokenizer interface every paradigm sees: images <-> a grid of latents or codes.

Objectives never look inside a tokenizer; they only read its :class:`TokenizerSpec`. A learned
autoencoder slots in by implementing :class:`Tokenizer` and adding a loader to
``flopmatch.tokenizers.registry.LOADERS``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flopmatch.config import renamed_keys

# Which tokenizer kind makes each token type an objective asks for (Objective.tokens), written once.
WEIGHT_FREE_KIND = {"continuous": "patch", "discrete": "kmeans"}
LEARNED_KIND = {"continuous": "kl", "discrete": "lfq"}


@dataclass(frozen=True)
class TokenizerSpec:
    """What a generator needs to know about a tokenizer.

    tokens: "continuous" (latents, float, shape (B, channels, grid, grid)) or
          "discrete" (tokens, long in [0, vocab_size), shape (B, grid*grid), raster order).
    grid: side of the token grid (8 for 32x32 images with 4x downsampling).
    channels: latent channels (continuous only; 0 for discrete).
    vocab_size: codebook size (discrete only; 0 for continuous).
    image_size: side of the images it encodes, in pixels.
    """

    tokens: str
    grid: int
    channels: int = 0
    vocab_size: int = 0
    image_size: int = 32

    @property
    def seq_len(self) -> int:
        """Number of tokens per image, L = grid * grid."""
        return self.grid * self.grid

    def to_dict(self) -> dict:
        """Plain JSON-able fields (tokenizer.json's "spec", a checkpoint's "tokenizer")."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TokenizerSpec:
        """Inverse of :meth:`to_dict`; also reads specs written by v0.1 (``kind`` for ``tokens``)."""
        return cls(**renamed_keys("TokenizerSpec", data))


class Tokenizer(torch.nn.Module):
    """Base class. Subclasses implement encode/decode/flops and save/load.

    Images are float tensors in [-1, 1], shape (B, 3, H, W). Continuous latents are normalised
    so that each channel has roughly zero mean and unit variance over the training set (the
    diffusion objective assumes this scale).
    """

    spec: TokenizerSpec
    name: str = "base"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> latents (B, C, g, g) float or tokens (B, g*g) long."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """latents (B, C, g, g) or tokens (B, g*g) -> images (B, 3, H, W) clamped to [-1, 1]."""
        raise NotImplementedError

    def encode_flops(self) -> int:
        """Analytic FLOPs to encode one image (2 per multiply-accumulate; 0 if weight-free)."""
        raise NotImplementedError

    def decode_flops(self) -> int:
        """Analytic FLOPs to decode one image."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A short hex digest that changes whenever encode() could give different outputs.

        Used to key on-disk caches of encoded datasets so a stale cache is never used.
        """
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        """Write the tokenizer to ``directory`` atomically (tokenizer.json + tensors.safetensors)."""
        raise NotImplementedError
