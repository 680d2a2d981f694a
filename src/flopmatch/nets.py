"""The thin paradigm-specific stems and heads around the shared backbone.

A :class:`Network` holds every trainable parameter of a generator: input stem (a linear map of
continuous latents, or an embedding of discrete tokens plus one special id), fixed 2D sin-cos
positions, text projections (token states for cross-attention, pooled state into the adaLN
vector ``c``), an optional time embedding (diffusion), the :class:`~flopmatch.backbone.Backbone`
and an adaLN-modulated output head. Which stem/head it has is decided by a :class:`NetSpec` that
an objective provides; the network knows nothing about losses or samplers.

Shapes: B batch, L = g*g image tokens, l <= L tokens in one call, g grid side, C latent channels,
V vocab, D width, Lt text tokens, Dt text width.

References: Peebles & Xie 2023 (DiT: time embedding, adaLN-Zero output layer, init); He et al. 2022
(MAE: fixed 2D sin-cos positions, also used by DiT); Dhariwal & Nichol 2021 (ADM: t in 0..999).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flopmatch.backbone import Backbone, KVCache, modulate
from flopmatch.config import ModelConfig, renamed_keys
from flopmatch.tokenizers.base import TokenizerSpec

TIME_FREQS = 256  # sinusoidal features of t fed to the time MLP (DiT)


@dataclass(frozen=True)
class NetSpec:
    """Everything that shapes a network: the backbone size and the paradigm's stem/head.

    tokens: "continuous" (in/out ``channels`` per position) or "discrete" (``vocab_size`` codes plus one
    special id ``vocab_size`` used as [MASK] or [BOS]; out ``vocab_size`` logits).
    """

    depth: int
    width: int
    heads: int
    mlp_ratio: int
    tokens: str
    grid: int
    channels: int
    vocab_size: int
    text_dim: int
    text_len: int
    causal: bool
    time: bool

    @property
    def seq_len(self) -> int:
        return self.grid * self.grid  # L: one token per latent position (patch size 1)

    @property
    def out_dim(self) -> int:
        return self.channels if self.tokens == "continuous" else self.vocab_size

    def to_dict(self) -> dict:
        """Plain JSON-able fields (stored in checkpoints as ``net_spec``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> NetSpec:
        """Inverse of :meth:`to_dict`; also reads specs of v0.1 checkpoints (``vocab`` for ``vocab_size``)."""
        return cls(**renamed_keys("NetSpec", data))


def make_net_spec(model: ModelConfig, tok: TokenizerSpec, text_dim: int, text_len: int, *, causal: bool, time: bool) -> NetSpec:
    """Combine backbone size, tokenizer and text encoder into a NetSpec."""
    return NetSpec(
        depth=model.depth, width=model.width, heads=model.heads, mlp_ratio=model.mlp_ratio,
        tokens=tok.tokens, grid=tok.grid, channels=tok.channels, vocab_size=tok.vocab_size,
        text_dim=text_dim, text_len=text_len, causal=causal, time=time,
    )


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos position table (grid*grid, dim): half the channels for rows, half for columns.

    Why fixed and 2D (MAE, DiT): no parameters to train or to count, identical for all three
    paradigms, and the row/column split tells the network which tokens are vertical neighbours,
    which a 1D raster index does not. Channels: [sin(y f), cos(y f), sin(x f), cos(x f)] with
    frequencies f = 10000^(-k/(dim/4)), zero-padded when dim is not a multiple of 4.
    """
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))  # (dim/4,)
    # ys, xs (g, g): row and column index of every grid cell
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):  # row, then column index of each raster position: (L,)
        ang = coord[:, None] * freqs[None]  # (L, dim/4)
        parts += [ang.sin(), ang.cos()]
    table = torch.cat(parts, dim=1)  # (L, 4 * quarter)
    return F.pad(table, (0, dim - table.shape[1])).float()  # (L, dim)


def time_features(t: torch.Tensor, dim: int = TIME_FREQS) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (scaled by 1000 as in DiT): (B,) -> (B, dim).

    Why x1000: DiT (after ADM) embeds integer timesteps 0..999 with these frequencies; scaling
    continuous t the same way keeps the features in that regime (with t in [0, 1] the low
    frequencies would barely change across the whole range of t).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)  # (half,)
    ang = 1000 * t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([ang.cos(), ang.sin()], dim=1)  # (B, dim); [cos, sin] order as in DiT


class Network(nn.Module):
    """Stem -> backbone -> head. Continuous: (B, C, g, g) -> (B, C, g, g); discrete: (B, L) -> (B, L, V)."""

    def __init__(self, spec: NetSpec):
        super().__init__()
        self.spec = spec
        D = spec.width
        if spec.tokens == "continuous":
            self.stem = nn.Linear(spec.channels, D)  # per-position linear patch embedding (patch size 1)
        else:
            self.stem = nn.Embedding(spec.vocab_size + 1, D)  # id ``vocab_size`` = [MASK] (masked) or [BOS] (autoregressive)
        # Not persistent: recomputed from the spec, so checkpoints do not store it.
        self.register_buffer("pos", sincos_2d(spec.grid, D), persistent=False)  # (L, D)
        self.text_proj = nn.Linear(spec.text_dim, D)  # text token states Dt -> D, for cross-attention
        self.pooled_proj = nn.Linear(spec.text_dim, D)  # pooled caption -> c (like DiT's class embedding)
        if spec.time:  # DiT's TimestepEmbedder: sinusoidal features -> MLP, added to c
            self.time_mlp = nn.Sequential(nn.Linear(TIME_FREQS, D), nn.SiLU(), nn.Linear(D, D))
        self.backbone = Backbone(spec.depth, D, spec.heads, spec.mlp_ratio, causal=spec.causal)
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(D, 2 * D)  # c -> shift, scale of the final norm (DiT's final layer, no gate)
        self.head = nn.Linear(D, spec.out_dim)
        self._init_stems()

    def _init_stems(self) -> None:
        for m in (self.text_proj, self.pooled_proj, self.stem):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.stem, nn.Embedding):
            nn.init.normal_(self.stem.weight, std=0.02)  # GPT-2 / DiT embedding init
        if self.spec.time:  # N(0, 0.02) as DiT initialises its timestep MLP
            for m in self.time_mlp:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
        # DiT zero-initialises the final modulation and output layer as well, so with the zero-init blocks
        # the untrained network outputs exactly 0 (velocity) or uniform logits (tokens).
        nn.init.zeros_(self.ada_out.weight)
        nn.init.zeros_(self.ada_out.bias)
        nn.init.zeros_(self.head.weight)  # adaLN-Zero: the network starts by predicting 0 / uniform logits
        nn.init.zeros_(self.head.bias)

    def num_params(self) -> int:
        """Trainable parameter count (positions are a fixed buffer)."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch: int, device, dtype: torch.dtype | None = None, static: bool = False) -> KVCache:
        """An empty KV cache for one full sequence per row (autoregressive decoding; ``static``: see KVCache)."""
        return self.backbone.new_cache(batch, self.spec.seq_len, device, dtype, static)

    def forward(self, x, text, text_pad, pooled, t=None, cache: KVCache | None = None) -> torch.Tensor:
        """Run the network.

        x: latents (B, C, g, g) float, or tokens (B, l) long (l <= L; with a cache, the l new tokens
           at positions cache.length..); text: (B, Lt, Dt); text_pad: (B, Lt) bool; pooled: (B, Dt);
           t: (B,) in [0, 1] when the spec has a time input.
        Returns (B, C, g, g) for continuous specs, logits (B, l, V) for discrete ones.
        """
        spec = self.spec
        if cache is not None and spec.time:  # the cache keeps c for every step, but a time input changes it per call
            raise ValueError("a KV cache is for decoding a network without a time input")
        if spec.tokens == "continuous":
            B, C, g, _ = x.shape
            h = self.stem(x.flatten(2).transpose(1, 2))  # (B, C, g, g) -> (B, L, C) -> (B, L, D), raster order
            start = 0
        else:
            B, length = x.shape  # length = l
            h = self.stem(x)  # (B, l, D)
            start = cache.length if cache is not None else 0  # new tokens continue where the cache ends
        if cache is not None and cache.static:  # one token at the position tensor: (B, 1, D) + (1, D)
            h = h + self.pos.index_select(0, cache.position).to(h.dtype)
        else:
            h = h + self.pos[start : start + h.shape[1]].to(h.dtype)  # (B, l, D) + (l, D) broadcast over B

        # c: the adaLN conditioning vector, pooled caption (+ time embedding for diffusion). A decode step after the
        # first finds every modulation derived from c in the cache (the caption does not change), so c is not needed.
        c = None
        if cache is None or cache.out_mod is None:
            c = self.pooled_proj(pooled)  # (B, D)
            if spec.time:
                c = c + self.time_mlp(time_features(t))  # (B, D)
        if cache is not None and cache.text_states is not None:
            text_h = cache.text_states  # text projected once per sequence
        else:
            text_h = self.text_proj(text)  # (B, Lt, D)
            if cache is not None:
                cache.text_states = text_h
        h = self.backbone(h, c, text_h, text_pad, cache)  # (B, l, D)
        if c is None:
            shift, scale = cache.out_mod
        else:
            shift, scale = self.ada_out(F.silu(c)).chunk(2, dim=-1)  # 2 x (B, D)
            if cache is not None:
                cache.out_mod = (shift, scale)
        out = self.head(modulate(self.norm_out(h), shift, scale))  # (B, l, out_dim)
        if spec.tokens == "continuous":
            return out.transpose(1, 2).reshape(B, C, g, g)  # (B, L, C) -> (B, C, g, g)
        return out
