"""Schedules: the flow-matching path, the masked cosine schedule and its sampler, the learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from flopmatch.config import SampleConfig, TrainConfig
from flopmatch.objectives.diffusion import flow_path
from flopmatch.objectives.masked import mask_ratio, masked_counts, random_mask
from flopmatch.schedule import decay_steps, stable_steps, warmup_cosine
from flopmatch.train import lr_at
from tiny import Recorder, empty_text, fake_text, make_tiny

B = 3


def test_flow_path_endpoints_and_velocity(gen):
    """x_t = (1-t) x0 + t eps: t=0 gives x0, t=1 gives eps, the target is v = eps - x0 for every t."""
    x0 = torch.randn(B, 4, 2, 2, generator=gen)
    eps = torch.randn(B, 4, 2, 2, generator=gen)
    xt, v = flow_path(x0, eps, torch.zeros(B))
    assert torch.equal(xt, x0) and torch.equal(v, eps - x0)
    xt, v = flow_path(x0, eps, torch.ones(B))
    assert torch.equal(xt, eps) and torch.equal(v, eps - x0)
    t = torch.tensor([0.0, 0.25, 1.0])  # one time per row
    xt, _ = flow_path(x0, eps, t)
    assert torch.allclose(xt[1], 0.75 * x0[1] + 0.25 * eps[1]) and torch.equal(xt[0], x0[0]) and torch.equal(xt[2], eps[2])


class _OracleVelocity(torch.nn.Module):
    """Predicts the exact straight-path velocity towards fixed data x0: v = (x_t - x0) / t."""

    def __init__(self, net, x0):
        super().__init__()
        self.module, self.x0 = net, x0

    def forward(self, x, text, text_pad, pooled, t=None, cache=None):
        return (x - self.x0) / t.view(-1, 1, 1, 1)


@pytest.mark.parametrize("steps", [1, 4])
def test_euler_sampler_integrates_from_noise_to_data(gen, steps):
    """With the exact velocity field of the path, the Euler sampler (t: 1 -> 0) lands on the data x0."""
    t = make_tiny("diffusion")
    x0 = torch.randn(B, t.spec.channels, t.spec.grid, t.spec.grid, generator=gen)
    oracle = _OracleVelocity(t.net, x0)
    out = t.objective.sample(oracle, fake_text(B, gen), empty_text(B), SampleConfig(steps=steps, guidance=1.0), gen)
    assert torch.allclose(out, x0, atol=1e-5)


def test_mask_ratio_endpoints_and_monotone():
    """mask_ratio(0) = 1 (all hidden), mask_ratio(1) = 0, decreasing in between."""
    u = torch.linspace(0, 1, 101)
    r = mask_ratio(u)
    assert r[0].item() == 1.0 and abs(r[-1].item()) < 1e-6
    assert (r[1:] < r[:-1]).all()


@pytest.mark.parametrize("seq_len", [1, 4, 16, 64, 256])
def test_masked_counts_strictly_decrease_to_zero(seq_len):
    """masked_counts: one entry per step, never above L, strictly decreasing, 0 after the last step."""
    for steps in sorted({1, 2, 3, 8, 12, seq_len // 2, seq_len}):
        if not 1 <= steps <= seq_len:
            continue
        counts = masked_counts(seq_len, steps)
        assert len(counts) == steps and counts[-1] == 0
        assert all(0 <= c < seq_len for c in counts), counts
        assert all(a > b for a, b in zip(counts, counts[1:])), counts


def test_training_mask_counts_in_range(gen):
    """random_mask hides between min_mask and L positions per row."""
    m = random_mask(512, 16, 2, "cpu", gen)
    n = m.sum(1)
    assert m.shape == (512, 16) and n.min() >= 2 and n.max() <= 16
    assert n.float().std() > 1  # the count varies with the cosine-scheduled ratio


@pytest.mark.parametrize("steps", [1, 4, 16])
def test_masked_sampler_follows_the_counts(gen, steps):
    """After decoding step s exactly masked_counts[s] positions are [MASK]; decided tokens never change."""
    t = make_tiny("masked", perturb=0.2)
    rec = Recorder(t.net)
    out = t.objective.sample(rec, fake_text(B, gen), empty_text(B), SampleConfig(steps=steps, guidance=3.0), gen)
    V = t.spec.vocab_size
    inputs = [x[:B] for x in rec.inputs] + [out]  # the conditional half of each step's input, then the result
    assert len(inputs) == steps + 1
    assert (inputs[0] == V).all()
    for s, n in enumerate(masked_counts(t.spec.seq_len, steps), start=1):
        assert ((inputs[s] == V).sum(1) == n).all(), (s, n)
        decided = inputs[s - 1] != V
        assert torch.equal(inputs[s][decided], inputs[s - 1][decided])
    assert out.max() < V


@pytest.mark.parametrize("total,warmup_frac", [(10, 0.05), (20, 0.1), (100, 0.05), (1000, 0.3)])
def test_lr_warmup_then_cosine_to_min(total, warmup_frac):
    """lr rises linearly to lr over the warmup, then decays monotonically to lr*min_lr_ratio at the last step."""
    cfg = TrainConfig(lr=2e-3, min_lr_ratio=0.1, warmup_frac=warmup_frac)
    lrs = [lr_at(s, total, cfg) for s in range(total)]
    warmup = max(1, round(warmup_frac * total))
    assert lrs[0] == pytest.approx(cfg.lr / warmup)
    assert all(b > a for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert lrs[warmup - 1] == pytest.approx(cfg.lr)
    assert all(b <= a + 1e-15 for a, b in zip(lrs[warmup - 1 :], lrs[warmup:]))
    assert lrs[-1] == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    assert max(lrs) == pytest.approx(cfg.lr)
    mid = warmup + (total - 1 - warmup) // 2  # half way through the cosine: about the mean of lr and min
    assert lrs[mid] == pytest.approx(cfg.lr * (1 + cfg.min_lr_ratio) / 2, rel=0.1)
    assert not math.isnan(sum(lrs))


@pytest.mark.parametrize("schedule", ["wsd", "constant"])
def test_lr_before_the_cooldown_does_not_depend_on_the_budget(schedule):
    """wsd/constant: every step before the cooldown gets the same LR whatever the total; the stable steps never shrink."""
    cfg = TrainConfig(lr=2e-3, min_lr_ratio=0.1, schedule=schedule, warmup_steps=7, decay_frac=0.2)
    longest = [lr_at(s, 500, cfg) for s in range(500)]
    previous = 0
    for total in range(1, 500):
        stable = stable_steps(total, cfg)
        assert previous <= stable <= total
        assert [lr_at(s, total, cfg) for s in range(stable)] == longest[:stable]
        previous = stable
    assert longest[6] == cfg.lr and longest[0] == cfg.lr / 7  # linear warmup over warmup_steps
    if schedule == "constant":
        assert longest[7:] == [cfg.lr] * 493


@pytest.mark.parametrize("total,decay_frac", [(10, 0.2), (100, 0.2), (1000, 0.1), (37, 0.5), (5, 1.0)])
def test_wsd_cools_down_with_1_sqrt_to_min(total, decay_frac):
    """wsd: peak LR until the last decay_frac of the steps, then lr * (m + (1 - m)(1 - sqrt(p))) down to lr*min_lr_ratio."""
    cfg = TrainConfig(lr=2e-3, min_lr_ratio=0.1, schedule="wsd", warmup_steps=0, decay_frac=decay_frac)
    decay = decay_steps(total, decay_frac)
    assert decay == max(1, round(decay_frac * total))
    lrs = [lr_at(s, total, cfg) for s in range(total)]
    start = total - decay
    assert stable_steps(total, cfg) == start and lrs[:start] == [cfg.lr] * start
    for s in range(start, total):
        p = (s - start + 1) / decay
        assert lrs[s] == pytest.approx(cfg.lr * (0.1 + 0.9 * (1 - math.sqrt(p))))
    assert all(b < a for a, b in zip(lrs[start - 1 :], lrs[start:])) if start else True
    assert lrs[-1] == pytest.approx(cfg.lr * cfg.min_lr_ratio)


def test_cosine_has_no_budget_independent_steps():
    """The cosine (the default) fits every step to the total: stable_steps is None and its LR is unchanged."""
    cfg = TrainConfig(lr=1e-3, warmup_frac=0.05, min_lr_ratio=0.1)
    assert cfg.schedule == "cosine" and stable_steps(100, cfg) is None
    assert [lr_at(s, 100, cfg) for s in range(100)] == [warmup_cosine(s, 100, 1e-3, 5, 0.1) for s in range(100)]
