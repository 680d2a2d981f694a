"""THE shared Transformer backbone of all three paradigms.

Pre-norm blocks of: self-attention (full or causal, SDPA), cross-attention to text token states,
and an MLP. Self-attention and MLP are modulated by adaLN-Zero from the conditioning vector ``c``
(DiT); the cross-attention output projection is zero-initialised too, so every block starts as the
identity. Autoregressive decoding uses :class:`KVCache` (self-attention keys/values per layer; the
text keys/values and the adaLN modulations, which do not change between steps, computed once).

Shapes: B batch, L image tokens, Lt text tokens, D width, H heads, hd head dim (64).

References: Vaswani et al. 2017 (attention); Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers" (DiT: adaLN-Zero, init); Xiong et al. 2020, "On Layer Normalization in the
Transformer Architecture" (pre-norm); Radford et al. 2019 (GPT-2) and nanoGPT (causal blocks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, L, D) * (1 + scale) + shift, with shift/scale (B, D)."""
    # "1 + scale" so that a zero-initialised modulation (adaLN-Zero) leaves x unchanged.
    return x * (1 + scale[:, None]) + shift[:, None]  # (B, L, D); (B, 1, D) broadcasts over L


# PyTorch's CPU flash attention is slow in bf16 over few keys: measured with torch 2.13 on a 2-core AVX512-BF16 EPYC,
# forward + backward of B 32, H 2, 64 queries takes 5.0 ms in bf16 and 2.8 ms in fp32 over 64 keys, 4.3 vs 1.2 ms over
# 24 text keys, 17 vs 8 ms with 6 heads; equal over 256 keys, and bf16 is faster from 512 (benchmarks/attention.py).
# So on a CPU, bf16 attention over at most this many keys runs in fp32 (more accurate as well); on a GPU, as is.
CPU_FP32_ATTENTION_MAX_KEYS = 128


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              is_causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention (torch SDPA) of q (B, H, L, hd) over k, v (B, H, Lk, hd) -> (B, H, L, hd) in q's
    dtype; k, v may be kept in another dtype (a cache). On a CPU, bf16 over at most :data:`CPU_FP32_ATTENTION_MAX_KEYS`
    keys is computed in fp32 (the comment above says why)."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.shape[-2] <= CPU_FP32_ATTENTION_MAX_KEYS:
        with torch.autocast("cpu", enabled=False):  # CPU autocast would cast SDPA's inputs back to bf16
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask, is_causal=is_causal)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=attn_mask, is_causal=is_causal)


def cache_dtype(device: torch.device | str, max_len: int) -> torch.dtype:
    """The dtype a KV cache of ``max_len`` positions keeps keys and values in: the one :func:`attention` computes in,
    so no decode step re-casts the whole cache in every layer. Under autocast that is the autocast dtype (bf16), which
    the projected keys/values already have, so storing them in it rounds nothing; except on a CPU over at most
    CPU_FP32_ATTENTION_MAX_KEYS keys, where attention runs in fp32. fp32 without autocast."""
    kind = torch.device(device).type
    if torch.is_autocast_enabled(kind) and (kind != "cpu" or max_len > CPU_FP32_ATTENTION_MAX_KEYS):
        return torch.get_autocast_dtype(kind)
    return torch.float32


class KVCache:
    """Per-layer self-attention keys/values for incremental decoding, plus the text keys/values.

    ``k[i]``/``v[i]``: (B, H, max_len, hd) preallocated; ``length`` tokens are filled (static: ``position``).
    ``text_kv[i]``: (k, v) of the cross-attention of layer i, each (B, H, Lt, hd), set on first use.
    ``mods[i]``: layer i's six adaLN vectors (shift, scale, gate for attention and MLP), each (B, D), set on first
    use; ``out_mod``: the final layer's (shift, scale), set by the network.

    Why: with causal attention, the keys/values of past tokens never change, so a decode step only
    projects the new token(s) and attends to the stored prefix (O(L) per step instead of O(L^2)).
    Every layer has its own keys/values, hence one buffer per layer. The caption is the same at every
    step, so its cross-attention keys/values (and the projected text states) are computed once; so is the
    conditioning vector c (pooled caption), hence every adaLN modulation derived from it: at one token per step
    those matmuls (6D^2 per layer against ~14D^2 for the token itself) would otherwise be a third of the work.
    Buffers are preallocated to ``max_len`` so each step writes in place instead of concatenating.

    ``static``: every decode step has the same shapes, for ``torch.compile`` (and CUDA graphs on a GPU, where a
    one-token step of a small network is bound by kernel launches): the next position is a device tensor
    ``position`` (1,) instead of the Python int ``length``, new keys/values are written at it with ``index_copy_``,
    and attention runs over all ``max_len`` slots with the unfilled ones masked out (as gpt-fast does; the masked
    slots are work the FLOP count does not include, as it counts only the prefix a step needs). One token per call;
    the caller keeps to ``max_len`` tokens (a check would read the position back to the host at every step).
    """

    def __init__(self, depth: int, batch: int, heads: int, max_len: int, head_dim: int, device, dtype,
                 static: bool = False):
        shape = (batch, heads, max_len, head_dim)  # (B, H, max_len, hd)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.text_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * depth
        self.text_states: torch.Tensor | None = None  # projected text states, (B, Lt, D)
        self.mods: list[tuple[torch.Tensor, ...] | None] = [None] * depth  # per layer 6 x (B, D)
        self.out_mod: tuple[torch.Tensor, torch.Tensor] | None = None  # final (shift, scale), 2 x (B, D)
        self.length = 0  # tokens already written; the next call's tokens start at this position (not static)
        self.max_len = max_len
        self.static = static
        # static: the next token's position (1,) on the device, advanced in place by each call
        self.position = torch.zeros(1, dtype=torch.long, device=device) if static else None

    def reset(self) -> None:
        """Empty the cache for a new sequence of new captions, keeping its buffers (a static cache is reused)."""
        depth = len(self.k)
        self.text_kv, self.mods, self.text_states, self.out_mod = [None] * depth, [None] * depth, None, None
        self.length = 0
        if self.static:
            self.position.zero_()

    def advance(self, n: int) -> None:
        """Record ``n`` more tokens written (by every layer)."""
        if self.static:
            self.position.add_(n)
        else:
            self.length += n


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # fused q, k, v projection: one matmul (D -> 3D)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, causal: bool, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D). With a cache, x holds the L new tokens after cache.length old ones."""
        B, L, D = x.shape
        # (B, L, 3D) -> (B, L, 3, H, hd) -> (3, B, H, L, hd), unpacked into q, k, v
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, hd)
        mask = None
        if cache is not None and cache.static:
            if L != 1:
                raise ValueError(f"a static KV cache decodes one token per call, got {L}")
            cache.k[layer].index_copy_(2, cache.position, k.to(cache.k[layer].dtype))  # slot (B, H, 1, hd)
            cache.v[layer].index_copy_(2, cache.position, v.to(cache.v[layer].dtype))  # slot (B, H, 1, hd)
            k, v = cache.k[layer], cache.v[layer]  # (B, H, max_len, hd), in the cache's dtype (attention() casts)
            # (1, max_len), True = a filled slot (this token's included); broadcast over batch and heads
            mask = (torch.arange(cache.max_len, device=x.device) <= cache.position)[None, :]
            causal_flag = False
        elif cache is not None:
            start = cache.length
            if start + L > cache.max_len:
                raise RuntimeError(f"KV cache overflow: {start + L} > {cache.max_len}")
            # The cache may be kept in another dtype than the (possibly bf16 autocast) activations.
            cache.k[layer][:, :, start : start + L] = k.to(cache.k[layer].dtype)  # slot (B, H, L, hd)
            cache.v[layer][:, :, start : start + L] = v.to(cache.v[layer].dtype)  # slot (B, H, L, hd)
            k = cache.k[layer][:, :, : start + L]  # (B, H, start+L, hd), in the cache's dtype (attention() casts)
            v = cache.v[layer][:, :, : start + L]  # (B, H, start+L, hd)
            if causal and L > 1:
                if start == 0:
                    causal_flag = True
                else:  # new block attends to the whole prefix and causally within itself
                    # SDPA's is_causal aligns the triangle top-left (query i sees keys 0..i), which is
                    # wrong for L queries at positions start..start+L-1; build the mask explicitly.
                    pos_q = torch.arange(start, start + L, device=x.device)[:, None]  # (L, 1) query positions
                    mask = torch.arange(start + L, device=x.device)[None, :] <= pos_q  # (L, start+L), True = attend
                    causal_flag = False
            else:
                causal_flag = False  # a single new token may see every cached one
        else:
            causal_flag = causal
        out = attention(q, k, v, attn_mask=mask, is_causal=causal_flag)  # (B, H, L, hd)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))  # (B, L, H, hd) -> (B, L, D)


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to the text token states (keys/values), as in Imagen / PixArt-alpha."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)  # fused k, v projection of the text states (D -> 2D)
        self.proj = nn.Linear(dim, dim)  # zero-initialised in Backbone.reset_parameters

    def text_kv(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text (B, Lt, D) -> keys, values each (B, H, Lt, hd)."""
        B, Lt, D = text.shape
        # (B, Lt, 2D) -> (B, Lt, 2, H, hd) -> (2, B, H, Lt, hd)
        k, v = self.kv(text).view(B, Lt, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 2 x (B, H, Lt, hd)
        return k, v

    def forward(self, x, text, text_pad, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x (B, L, D) attends to text (B, Lt, D); text_pad (B, Lt) True = padding."""
        B, L, D = x.shape
        if cache is not None and cache.text_kv[layer] is not None:
            k, v = cache.text_kv[layer]  # computed on the first decode step; the caption does not change
        else:
            k, v = self.text_kv(text)  # 2 x (B, H, Lt, hd)
            if cache is not None:
                cache.text_kv[layer] = (k, v)
        q = self.q(x).view(B, L, self.heads, D // self.heads).transpose(1, 2)  # (B, H, L, hd)
        # An all-padding row (the empty caption) would give NaN softmax; let it attend to slot 0
        # (a padding state: zeros for the hash encoder, the [CLS]/[SEP] state for MiniLM).
        keep = ~text_pad  # (B, Lt), True = attend
        keep[:, 0] = True
        # keep[:, None, None, :] is (B, 1, 1, Lt): broadcast over heads and queries.
        out = attention(q, k, v, attn_mask=keep[:, None, None, :])  # (B, H, L, hd)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))  # (B, L, H, hd) -> (B, L, D)


def mlp_activation(x: torch.Tensor) -> torch.Tensor:
    """The MLP's nonlinearity: tanh-approximated GELU (GPT-2; DiT's MLP). Elementwise, any shape.

    Also the activation of ``flopmatch bench``'s plain baseline block, so that the two do not differ in activation.
    """
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    """Position-wise feed-forward D -> ratio*D -> D with tanh-approximated GELU (:func:`mlp_activation`)."""

    def __init__(self, dim: int, ratio: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.fc2 = nn.Linear(ratio * dim, dim)

    def forward(self, x):
        return self.fc2(mlp_activation(self.fc1(x)))  # (B, L, D) -> (B, L, ratio*D) -> (B, L, D)


class Block(nn.Module):
    """adaLN-Zero block: x += g1*attn(mod(norm(x))); x += cross(norm(x), text); x += g2*mlp(mod(norm(x))).

    Pre-norm (normalise each branch's input, not the residual stream) keeps an unnormalised identity
    path through the whole stack, which trains stably without post-norm's warm-up sensitivity (Xiong
    et al. 2020; GPT-2). The conditioning ``c`` (pooled text + time) enters through adaptive LayerNorm
    shift/scale and per-branch gates (DiT's adaLN-Zero, its best-FID conditioning variant).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        # Norms in front of adaLN have no affine parameters: the modulation supplies shift and scale.
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)  # cross-attention is not modulated: ordinary affine LayerNorm
        self.cross = CrossAttention(dim, heads)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, mlp_ratio)
        self.ada = nn.Linear(dim, 6 * dim)  # c -> shift/scale/gate for attention and MLP

    def forward(self, x, c, text, text_pad, causal: bool, cache: KVCache | None = None, layer: int = 0):
        """x (B, L, D), c (B, D) (None when the cache holds this layer's modulation), text (B, Lt, D) -> (B, L, D)."""
        if cache is not None and cache.mods[layer] is not None:
            s1, sc1, g1, s2, sc2, g2 = cache.mods[layer]  # c is the same at every decode step
        else:
            s1, sc1, g1, s2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=-1)  # 6 x (B, D)
            if cache is not None:
                cache.mods[layer] = (s1, sc1, g1, s2, sc2, g2)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), s1, sc1), causal, cache, layer)  # (B, L, D)
        x = x + self.cross(self.norm2(x), text, text_pad, cache, layer)  # (B, L, D)
        x = x + g2[:, None] * self.mlp(modulate(self.norm3(x), s2, sc2))  # (B, L, D)
        return x


class Backbone(nn.Module):
    """A stack of ``depth`` blocks of width ``64 * depth`` (one scaling knob)."""

    def __init__(self, depth: int, width: int, heads: int, mlp_ratio: int = 4, causal: bool = False):
        super().__init__()
        self.depth, self.width, self.heads, self.causal = depth, width, heads, causal
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio) for _ in range(depth)])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):  # Xavier-uniform weights, zero biases (DiT's basic init)
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init (DiT's adaLN-Zero): with gates g1 = g2 = 0 and a zero cross-attention output projection,
        # every residual branch adds 0, so the untrained stack is the identity (like zero-initialising the
        # last BatchNorm gamma of each ResNet block, Goyal et al. 2017); DiT found this trains best.
        # The cross-attention has no gate, so its output projection is zeroed instead (bias is already 0).
        for b in self.blocks:  # adaLN-Zero: gates start at 0, cross-attention adds 0: every block is the identity
            nn.init.zeros_(b.ada.weight)
            nn.init.zeros_(b.ada.bias)
            nn.init.zeros_(b.cross.proj.weight)

    def new_cache(self, batch: int, max_len: int, device, dtype: torch.dtype | None = None, static: bool = False) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` tokens (``static``: see :class:`KVCache`) in
        ``dtype`` (None: :func:`cache_dtype`, from the autocast state at this call)."""
        dtype = cache_dtype(device, max_len) if dtype is None else dtype
        return KVCache(self.depth, batch, self.heads, max_len, self.width // self.heads, device, dtype, static)

    def forward(self, x, c, text, text_pad, cache: KVCache | None = None) -> torch.Tensor:
        """x (B, L, D), c (B, D), text (B, Lt, D), text_pad (B, Lt) -> (B, L, D).

        With ``cache``, x holds new tokens at positions cache.length.. and the cache advances by L.
        """
        for i, block in enumerate(self.blocks):
            x = block(x, c, text, text_pad, self.causal, cache, i)  # (B, L, D)
        if cache is not None:  # advanced once, after every layer has written the same positions
            cache.advance(x.shape[1])
        return x
