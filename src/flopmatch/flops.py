"""Analytic FLOPs of the generator networks, from a :class:`~flopmatch.nets.NetSpec` alone.

Conventions (tested against ``torch.utils.flop_counter.FlopCounterMode`` in tests/test_flops.py):

* 2 FLOPs per multiply-accumulate. Only matmuls are counted: every linear layer (block linears,
  adaLN modulation, stems, text projections, time MLP, head) and attention scores and values
  (``2*n_q*n_kv*D`` each, at full length: causal attention is NOT halved, because SDPA kernels
  compute the full rectangle and the convention in the literature counts it). Norms, softmax,
  activations, embedding lookups (an index, not a matmul) and other elementwise ops are ignored.
* Training = forward + backward. Backward costs 2x forward for a matmul whose input needs a
  gradient (grad of input + grad of weight) and 1x forward for one whose input is data that needs
  none: the continuous stem (fed noised latents), the text projections (fed frozen text states),
  the pooled projection and the first time-MLP layer (fed fixed features). So training is
  ``3*F - F_data_fed``, slightly under the usual ``3*F`` rule; we count what autograd runs.
  Attention backward is counted as 2x its forward (grads of q, k, v from the 4 required
  matmuls); a flash kernel's recomputation of the scores is an implementation detail, not counted.
* ``masked`` runs the network on every position, masked or not: the whole sequence is counted.
* Guidance (guidance != 1) doubles the network passes it applies to (conditional + unconditional).
* Diffusion is charged per velocity evaluation, not per solver step: Heun's method evaluates the
  network twice per step except on the last (heun-N: 2N - 1 calls; flopmatch.objectives.ode).
* Autoregressive sampling with a KV cache runs one token per step attending to the prefix
  (step i attends to i+1 keys) and projects the text and computes the conditioning (pooled projection,
  every adaLN modulation) once; without a cache, step i recomputes all of it for the full prefix of i+1
  tokens. Both are available.
* The frozen text encoder and the tokenizer (encoder at data-prep time, decoder at sampling time)
  are separate line items, reported next to these numbers and never folded into them.

Why count FLOPs at all: the study compares paradigms at equal training compute, so each run's step
count is derived from a FLOP budget (see flopmatch.plan / flopmatch.train), and these numbers are
that budget's currency. They follow the scaling-law convention C ~ 6N per token (2 FLOPs per
multiply-accumulate in the forward pass, x3 for forward + backward), with attention included as in
Chinchilla's appendix rather than dropped.

References: Kaplan et al. 2020, "Scaling Laws for Neural Language Models" (C ~ 6N, Sec. 2.1);
Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (Chinchilla, App. F).
"""

from __future__ import annotations

from flopmatch.nets import TIME_FREQS, NetSpec


def _linear(n: int, fan_in: int, fan_out: int) -> int:
    """FLOPs of n rows through a fan_in -> fan_out linear layer: 2 per multiply-accumulate (bias ignored)."""
    return 2 * n * fan_in * fan_out


def block_flops(spec: NetSpec, n_new: int, n_ctx: int, *, text_fresh: bool = True) -> int:
    """Forward FLOPs of one backbone block for one example (``n_new`` queries, ``n_ctx`` keys); ``text_fresh``
    False: the text keys/values and the adaLN modulation come from a KV cache."""
    D, Lt = spec.width, spec.text_len
    # Attention: scores q k^T and the weighted sum of values are each 2 * n_q * n_kv * D (all heads together).
    return (
        (_linear(1, D, 6 * D) if text_fresh else 0)  # adaLN modulation
        + _linear(n_new, D, 3 * D) + 2 * (2 * n_new * n_ctx * D) + _linear(n_new, D, D)  # self-attention
        + _linear(n_new, D, D) + 2 * (2 * n_new * Lt * D) + _linear(n_new, D, D)  # cross-attention q, scores/values, out
        + (_linear(Lt, D, 2 * D) if text_fresh else 0)  # cross-attention text keys/values
        + 2 * _linear(n_new, D, spec.mlp_ratio * D)  # MLP
    )


def forward_flops(spec: NetSpec, n_new: int, n_ctx: int | None = None, *, text_fresh: bool = True) -> dict[str, int]:
    """Forward FLOPs for one example: ``n_new`` query tokens attending to ``n_ctx`` keys.

    Returns a breakdown: ``total``, and ``data_fed`` (matmuls whose input needs no gradient).
    ``text_fresh`` False means the text projections/keys/values and everything computed from the conditioning
    vector c (c itself, the adaLN modulations) come from a KV cache (decode steps after the first).
    """
    n_ctx = n_new if n_ctx is None else n_ctx  # default: full self-attention over the n_new tokens
    D, Lt, Dt = spec.width, spec.text_len, spec.text_dim
    data_fed, rest = 0, 0
    if text_fresh:
        # c (pooled text, time) is one vector per example: its matmuls count once, not per token.
        data_fed += _linear(1, Dt, D)  # pooled -> c
        if spec.time:
            data_fed += _linear(1, TIME_FREQS, D)  # first time-MLP layer (fed fixed sinusoidal features)
            rest += _linear(1, D, D)  # second time-MLP layer
        data_fed += _linear(Lt, Dt, D)  # text states -> width
        rest += _linear(1, D, 2 * D)  # final adaLN
    if spec.tokens == "continuous":
        data_fed += _linear(n_new, spec.channels, D)  # stem
    per_block = block_flops(spec, n_new, n_ctx, text_fresh=text_fresh)
    rest += spec.depth * per_block + _linear(n_new, D, spec.out_dim)  # + blocks, head
    return {"total": data_fed + rest, "data_fed": data_fed}


def train_flops(spec: NetSpec) -> int:
    """Training FLOPs per example (forward + backward over the full sequence)."""
    f = forward_flops(spec, spec.seq_len)
    # forward (1x) + backward (2x: grads of input and weight), minus the input-grad matmul of data-fed layers
    return 3 * f["total"] - f["data_fed"]


def backbone_train_flops(spec: NetSpec) -> int:
    """Training FLOPs per example of the Transformer blocks alone: the "backbone only" convention.

    Kaplan et al. (2020, Sec. 2.1) count non-embedding compute; Chinchilla (Hoffmann et al. 2022) counts
    everything. Without stems, text projections, time MLP, final modulation and the output head, a token
    model's 1,024-way head (a large share of a narrow net's FLOPs) no longer counts, while diffusion's
    head is tiny, so the convention can move the budget each paradigm is said to have. Every block input
    (tokens, c, projected text) comes from trainable layers, so backward is 2x forward throughout.
    """
    return 3 * spec.depth * block_flops(spec, spec.seq_len, spec.seq_len)


def guidance_factor(guidance: float) -> int:
    """Network passes per sampling step: 2 with classifier-free guidance, 1 without (guidance == 1)."""
    return 1 if guidance == 1.0 else 2


def parallel_sample_flops(spec: NetSpec, calls: int, guidance: float) -> int:
    """Sampling FLOPs per image for samplers that run the full sequence on each of ``calls`` network calls:
    masked (one per decoding step) and diffusion (one per velocity evaluation: N for euler-N, 2N - 1 for heun-N)."""
    return calls * guidance_factor(guidance) * forward_flops(spec, spec.seq_len)["total"]


def autoregressive_sample_flops(spec: NetSpec, guidance: float, kv_cache: bool = True) -> int:
    """Sampling FLOPs per image for raster-order decoding of all L tokens, with or without a KV cache."""
    L = spec.seq_len
    if kv_cache:
        # step 0 feeds [BOS] and projects the text; step i feeds one token that attends to i+1 cached keys
        total = forward_flops(spec, 1, 1, text_fresh=True)["total"]
        total += sum(forward_flops(spec, 1, i + 1, text_fresh=False)["total"] for i in range(1, L))
    else:  # step i reruns the whole prefix of i+1 tokens, text included
        total = sum(forward_flops(spec, i + 1, i + 1)["total"] for i in range(L))
    return guidance_factor(guidance) * total


def num_params(spec: NetSpec) -> int:
    """Analytic trainable parameter count of :class:`~flopmatch.nets.Network` (weights + biases)."""
    D, Dt, r = spec.width, spec.text_dim, spec.mlp_ratio

    def lin(i, o):  # weight + bias of an i -> o linear layer
        return i * o + o

    stem = lin(spec.channels, D) if spec.tokens == "continuous" else (spec.vocab_size + 1) * D
    time = lin(TIME_FREQS, D) + lin(D, D) if spec.time else 0
    # self-attn qkv, proj; norm2's affine (2D); cross q, kv, proj; MLP; adaLN
    block = lin(D, 3 * D) + lin(D, D) + 2 * D + lin(D, D) + lin(D, 2 * D) + lin(D, D) + lin(D, r * D) + lin(r * D, D) + lin(D, 6 * D)
    # + text and pooled projections, blocks, final adaLN, head
    return stem + time + 2 * lin(Dt, D) + spec.depth * block + lin(D, 2 * D) + lin(D, spec.out_dim)
