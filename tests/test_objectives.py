"""The contract every objective keeps, tested once, parametrized over the three paradigms."""

from __future__ import annotations

import pytest
import torch

from flopmatch import PARADIGMS
from flopmatch.config import SampleConfig
from flopmatch.objectives.guidance import Guided
from tiny import Recorder, empty_text, fake_data, fake_text, make_tiny

B = 4
STEPS = {"diffusion": 3, "masked": 4, "autoregressive": 0}  # sampler steps used here (AR: one per token)

pytestmark = pytest.mark.parametrize("name", PARADIGMS)


def _sample(t, cond, uncond, seed: int, cfg: float = 3.0, **kw) -> torch.Tensor:
    sc = SampleConfig(steps=STEPS[t.objective.name], guidance=cfg, **kw)
    return t.objective.sample(t.net, cond, uncond, sc, torch.Generator().manual_seed(seed))


def test_loss_is_finite_scalar(name, gen):
    """loss() is a finite scalar with a graph back to the parameters."""
    t = make_tiny(name)
    loss = t.objective.loss(t.net, fake_data(t.spec, B, gen), fake_text(B, gen), gen)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad


def test_gradients_reach_every_parameter(name, gen):
    """After a few optimizer steps (to leave adaLN-Zero's zero init), every parameter gets a nonzero gradient."""
    t = make_tiny(name)
    x, text = fake_data(t.spec, B, gen), fake_text(B, gen)
    opt = torch.optim.AdamW(t.net.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        opt.zero_grad()
        t.objective.loss(t.net, x, text, gen).backward()
        opt.step()
    opt.zero_grad()
    t.objective.loss(t.net, x, text, gen).backward()
    dead = [n for n, p in t.net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not dead, f"parameters without gradient: {dead}"


def test_sample_shape_dtype_range(name, gen):
    """Samples are latents (B, C, g, g) finite float, or tokens (B, L) long in [0, V)."""
    t = make_tiny(name, perturb=0.2)
    out = _sample(t, fake_text(B, gen), empty_text(B), seed=1)
    if t.spec.tokens == "continuous":
        assert out.shape == (B, t.spec.channels, t.spec.grid, t.spec.grid)
        assert out.is_floating_point() and torch.isfinite(out).all()
    else:
        assert out.shape == (B, t.spec.seq_len) and out.dtype == torch.long
        assert out.min() >= 0 and out.max() < t.spec.vocab_size


def test_same_seed_same_samples_different_seed_different(name, gen):
    """The sampler is a function of its generator: same seed -> identical samples, another seed -> different."""
    t = make_tiny(name, perturb=0.2)
    cond, uncond = fake_text(B, gen), empty_text(B)
    a, b, c = (_sample(t, cond, uncond, seed=s) for s in (7, 7, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_overfits_one_batch(name):
    """Training on one fixed batch (same data, text and noise/mask draws) drives the loss below 0.3x its start in 60 steps."""
    t = make_tiny(name)
    g = torch.Generator().manual_seed(0)
    x, text = fake_data(t.spec, B, g), fake_text(B, g)

    def loss():
        return t.objective.loss(t.net, x, text, torch.Generator().manual_seed(123))

    opt = torch.optim.AdamW(t.net.parameters(), lr=1e-2, weight_decay=0.0)
    start = loss().item()
    for _ in range(60):  # measured: the three end at 0.00-0.06x of their start after 50 steps
        opt.zero_grad()
        loss().backward()
        opt.step()
    end = loss().item()
    assert end < 0.3 * start, f"{name}: loss {start:.3f} -> {end:.3f}"


def test_guidance_is_u_plus_s_times_c_minus_u(name, gen):
    """Guided with scale s equals u + s*(c - u) from separate conditional and unconditional passes."""
    t = make_tiny(name, perturb=0.2)
    cond, uncond = fake_text(B, gen), empty_text(B)
    x = fake_data(t.spec, B, gen)
    tt = torch.rand(B, generator=gen) if t.spec.time else None
    with torch.no_grad():
        c = t.net(x, cond.states, cond.pad, cond.pooled, t=tt).float()
        u = t.net(x, uncond.states, uncond.pad, uncond.pooled, t=tt).float()
        for s in (0.0, 2.5, 4.0):
            assert torch.allclose(Guided(t.net, cond, uncond, s)(x, t=tt), u + s * (c - u), atol=1e-5)
        assert torch.equal(Guided(t.net, cond, uncond, 1.0)(x, t=tt), c)
    assert not torch.allclose(c, u, atol=1e-3)  # otherwise the comparison above is vacuous


def test_sampler_guidance_passes(name, gen):
    """cfg=1 runs one B-row pass per step and never reads the unconditional batch; cfg!=1 runs one 2B-row pass."""
    t = make_tiny(name, perturb=0.2)
    cond = fake_text(B, gen)
    per_image = STEPS[name] or t.spec.seq_len
    rec = Recorder(t.net)
    sc1 = SampleConfig(steps=STEPS[name], guidance=1.0)
    out = t.objective.sample(rec, cond, empty_text(B), sc1, torch.Generator().manual_seed(3))
    assert rec.rows == [B] * per_image
    poisoned = empty_text(B)
    poisoned.states.fill_(float("nan"))
    poisoned.pooled.fill_(float("nan"))
    assert torch.equal(t.objective.sample(t.net, cond, poisoned, sc1, torch.Generator().manual_seed(3)), out)

    rec = Recorder(t.net)
    t.objective.sample(rec, cond, empty_text(B), SampleConfig(steps=STEPS[name], guidance=3.0), torch.Generator().manual_seed(3))
    assert rec.rows == [2 * B] * per_image



def test_loss_of_equal_slices_averages_to_the_batch_loss(name, gen):
    """With the batch's draws sliced, the mean of two halves' losses and gradients is the whole batch's (what DDP and
    FSDP average), also for masked's data-dependent count of masked tokens; and draws are per example."""
    t = make_tiny(name, perturb=0.2)
    x, text = fake_data(t.spec, B, gen), fake_text(B, gen)
    draws = t.objective.draw(B, t.spec, "cpu", torch.Generator().manual_seed(5))
    assert all(v.shape[0] == B for v in draws.values())

    def loss_and_grads(rows: slice):
        t.net.zero_grad()
        loss = t.objective.loss(t.net, x[rows], text.index(torch.arange(B)[rows]), draws={k: v[rows] for k, v in draws.items()})
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in t.net.parameters()]

    whole, g_whole = loss_and_grads(slice(0, B))
    (a, g_a), (b, g_b) = loss_and_grads(slice(0, B // 2)), loss_and_grads(slice(B // 2, B))
    assert torch.allclose((a + b) / 2, whole, rtol=1e-6)
    # float32 sums in another order: measured |diff| <= 2.4e-7 on gradients up to 0.75
    assert all(torch.allclose((p + q) / 2, w, rtol=1e-5, atol=1e-6) for p, q, w in zip(g_a, g_b, g_whole))
    if name == "masked":  # the halves' own token means would not average to the batch's (different masked counts)
        m = draws["mask"]
        assert m[: B // 2].sum() != m[B // 2 :].sum(), "pick draws with unequal halves, or the check below is vacuous"
        own = [t.objective.loss(t.net, x[r], text.index(torch.arange(B)[r]), torch.Generator().manual_seed(0),
                                draws={"mask": m[r], "weight": (B // 2 / m[r].sum()).expand(B // 2)}).detach()
               for r in (slice(0, B // 2), slice(B // 2, B))]
        assert not torch.allclose((own[0] + own[1]) / 2, whole, rtol=1e-4)
