"""The shared backbone: causal masking, KV-cache decoding, full attention, adaLN-Zero identity at init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from flopmatch.backbone import CPU_FP32_ATTENTION_MAX_KEYS, Backbone, attention
from flopmatch.config import SampleConfig
from flopmatch.objectives.autoregressive import static_cache
from tiny import empty_text, fake_data, fake_text, make_tiny

B = 3


def _logits(t, x, text, **kw) -> torch.Tensor:
    with torch.no_grad():
        return t.net(x, text.states, text.pad, text.pooled, **kw)


@pytest.mark.parametrize("j", [0, 5, 15])
def test_causal_attention_hides_the_future(gen, j):
    """Causal net: changing token j changes no output at i < j, and changes some output at every i >= j."""
    t = make_tiny("autoregressive", depth=2, perturb=0.2)
    text = fake_text(B, gen)
    x = fake_data(t.spec, B, gen)
    y = x.clone()
    y[:, j] = (x[:, j] + 1) % t.spec.vocab_size
    a, b = _logits(t, x, text), _logits(t, y, text)  # (B, L, V)
    diff = (a - b).abs().amax(dim=(0, 2))  # (L,)
    assert torch.allclose(a[:, :j], b[:, :j], atol=1e-6, rtol=0)
    assert (diff[j:] > 1e-4).all(), diff


def test_full_attention_sees_the_future(gen):
    """Non-causal (masked) net: changing the last token changes the outputs at earlier positions."""
    t = make_tiny("masked", depth=2, perturb=0.2)
    text = fake_text(B, gen)
    x = fake_data(t.spec, B, gen)
    y = x.clone()
    y[:, -1] = (x[:, -1] + 1) % t.spec.vocab_size
    diff = (_logits(t, x, text) - _logits(t, y, text)).abs().amax(dim=(0, 2))
    assert (diff[:-1] > 1e-4).all(), diff


@pytest.mark.parametrize("chunks", [[1] * 16, [5, 4, 1, 1, 5]], ids=["token-by-token", "prefill-then-chunks"])
def test_kv_cache_decoding_equals_full_recompute(gen, chunks):
    """Feeding the sequence through a KV cache (one token or a chunk at a time) gives the full pass's logits within 1e-5."""
    t = make_tiny("autoregressive", depth=2, perturb=0.2)
    text = fake_text(B, gen)
    x = fake_data(t.spec, B, gen)
    full = _logits(t, x, text)  # (B, L, V)
    cache = t.net.new_cache(B, "cpu")
    parts, start = [], 0
    for n in chunks:
        parts.append(_logits(t, x[:, start : start + n], text, cache=cache))
        start += n
    assert start == t.spec.seq_len and cache.length == t.spec.seq_len
    inc = torch.cat(parts, dim=1)
    assert (inc - full).abs().max().item() < 1e-5


def test_static_kv_cache_decoding_equals_full_recompute(gen):
    """The static cache (fixed shapes, for torch.compile / CUDA graphs: a position tensor, all slots attended with the
    unfilled ones masked) gives the full pass's logits token by token, advances its position, and takes one token."""
    t = make_tiny("autoregressive", depth=2, perturb=0.2)
    text = fake_text(B, gen)
    x = fake_data(t.spec, B, gen)
    full = _logits(t, x, text)  # (B, L, V)
    cache = t.net.new_cache(B, "cpu", static=True)
    inc = torch.cat([_logits(t, x[:, i : i + 1], text, cache=cache) for i in range(t.spec.seq_len)], dim=1)
    assert (inc - full).abs().max().item() < 1e-5
    assert cache.position.tolist() == [t.spec.seq_len] and cache.length == 0
    with pytest.raises(ValueError, match="one token per call"):
        _logits(t, x[:, :2], text, cache=t.net.new_cache(B, "cpu", static=True))


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float32], ids=["bf16-kv", "fp32-kv (a cache)"])
@pytest.mark.parametrize("keys", [24, CPU_FP32_ATTENTION_MAX_KEYS + 1])
def test_cpu_bf16_attention_over_few_keys_runs_in_fp32(gen, keys, kv_dtype):
    """Under CPU bf16 autocast, attention over at most CPU_FP32_ATTENTION_MAX_KEYS keys is fp32 SDPA of the bf16 inputs
    (bit for bit: autocast, which would cast SDPA's inputs back to bf16, is off inside), returned in bf16 with its
    gradients; over more keys it is bf16 SDPA as is. Keys/values kept in fp32 (a KV cache's dtype) are rounded to
    q's bf16 in the second case, as before this choice existed."""
    q = torch.randn(2, 2, 16, 64, generator=gen).bfloat16().requires_grad_()
    k, v = (torch.randn(2, 2, keys, 64, generator=gen).bfloat16().to(kv_dtype) for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v)
    fp32 = F.scaled_dot_product_attention(q.detach().float(), k.float(), v.float()).bfloat16()
    bf16 = F.scaled_dot_product_attention(q.detach(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, fp32 if keys <= CPU_FP32_ATTENTION_MAX_KEYS else bf16)
    assert not torch.equal(fp32, bf16)  # the two paths differ, so the check above tells them apart
    out.float().square().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0


def test_kv_cache_decoding_equals_full_recompute_under_bf16_autocast(gen):
    """Under CPU bf16 autocast (the precision of a study on a bf16 CPU), cached decoding gives the full pass's logits
    within bf16 rounding (the cache holds fp32 keys/values; each path rounds its activations to bf16 differently)."""
    t = make_tiny("autoregressive", depth=2, perturb=0.2)
    text = fake_text(B, gen)
    x = fake_data(t.spec, B, gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = _logits(t, x, text).float()  # (B, L, V)
        cache = t.net.new_cache(B, "cpu")
        inc = torch.cat([_logits(t, x[:, i : i + 1], text, cache=cache) for i in range(t.spec.seq_len)], dim=1).float()
    scale = full.abs().max().item()
    assert (inc - full).abs().max().item() < 0.05 * scale
    assert (inc.argmax(-1) == full.argmax(-1)).float().mean() > 0.9


@pytest.mark.slow
def test_compiled_decoding_draws_the_eager_tokens(gen):
    """torch.compile'd cached decoding (SampleConfig.compile) draws the same tokens as eager decoding under one seed
    (fp32 on a CPU), with guidance, for two networks of one shape at two guidance scales: after the first, nothing is
    compiled again (the step is shared; the guidance mix is not compiled) and the static cache is reused."""
    cond, uncond = fake_text(B, gen), empty_text(B)
    graphs = None
    for seed, guidance in ((0, 3.0), (1, 2.0)):
        t = make_tiny("autoregressive", depth=1, perturb=0.2, seed=seed)
        out = {c: t.objective.sample(t.net, cond, uncond, SampleConfig(guidance=guidance, compile=c),
                                     torch.Generator().manual_seed(11)) for c in (False, True)}
        assert torch.equal(out[True], out[False]) and len(out[True].unique()) > 1
        cache = static_cache(t.net, 2 * B, torch.device("cpu"))
        again = t.objective.sample(t.net, cond, uncond, SampleConfig(guidance=guidance, compile=True),
                                   torch.Generator().manual_seed(11))
        assert torch.equal(again, out[False]) and static_cache(t.net, 2 * B, torch.device("cpu")) is cache
        if graphs is None:
            graphs = counters["stats"]["unique_graphs"]
        assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_autoregressive_sampler_kv_cache_matches_recompute(gen, cfg):
    """The autoregressive sampler draws identical tokens with and without the KV cache under one seed."""
    t = make_tiny("autoregressive", depth=2, perturb=0.2)
    cond, uncond = fake_text(B, gen), empty_text(B)
    out = {}
    for kv in (True, False):
        sc = SampleConfig(guidance=cfg, kv_cache=kv)
        out[kv] = t.objective.sample(t.net, cond, uncond, sc, torch.Generator().manual_seed(11))
    assert torch.equal(out[True], out[False])
    assert len(out[True].unique()) > 1  # a non-degenerate draw


def test_adaln_zero_blocks_are_identity_at_init(gen):
    """At initialisation every block (self-attention, cross-attention and MLP branches) returns its input exactly."""
    torch.manual_seed(0)
    D, H = 32, 2
    bb = Backbone(depth=3, width=D, heads=H)
    x = torch.randn(B, 10, D, generator=gen)
    c = torch.randn(B, D, generator=gen)
    text = torch.randn(B, 6, D, generator=gen)
    pad = torch.zeros(B, 6, dtype=torch.bool)
    pad[0, 3:] = True
    with torch.no_grad():
        for causal in (False, True):
            for block in bb.blocks:
                assert torch.equal(block(x, c, text, pad, causal), x)
        assert torch.equal(bb(x, c, text, pad), x)
