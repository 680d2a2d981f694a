"""Method properties of the objectives and the training loop, each checked against a hand computation:
what the networks are fed and the losses they are charged (masked, autoregressive), the EMA update and its
warm-up, the masked sampler's confidence order, caption dropout, diffusion's logit-normal times, and top-k /
temperature filtering of logits."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from scipy import stats

import flopmatch.train as train_mod
from flopmatch.config import ObjectiveConfig, SampleConfig, TrainConfig
from flopmatch.objectives import make_objective
from flopmatch.objectives.logits import filter_logits, sample_logits
from flopmatch.objectives.masked import masked_counts
from flopmatch.schedule import ema_decay_at
from flopmatch.train import ema_update, make_optimizer, train, train_step
from tiny import Recorder, empty_text, fake_data, fake_text, make_tiny, tiny_run_config

B = 4


def _target_ce(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[x] per position, in float64: logits (B, L, V), x (B, L) -> (B, L)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -logp.gather(-1, x[..., None]).squeeze(-1)


# ----------------------------------------------------------------------------- masked and autoregressive losses


def test_masked_loss_feeds_mask_ids_and_charges_masked_positions_only(gen):
    """Masked.loss feeds the network the [MASK] id (= V) exactly where draws["mask"] is True and the original
    tokens elsewhere, and returns sum_b weight_b * (CE over b's masked positions) / B, i.e. with the drawn weights
    (B / masked count) the token mean of the cross-entropy over the masked positions only."""
    t = make_tiny("masked", perturb=0.3)
    V = t.spec.vocab_size
    x, text = fake_data(t.spec, B, gen), fake_text(B, gen)
    draws = t.objective.draw(B, t.spec, "cpu", torch.Generator().manual_seed(3))
    mask = draws["mask"]
    assert mask.any() and not mask.all(), "the check needs both masked and visible positions"

    rec = Recorder(t.net)
    loss = t.objective.loss(rec, x, text, draws=draws)
    assert len(rec.inputs) == 1
    fed = rec.inputs[0]
    assert (fed[mask] == V).all()
    assert torch.equal(fed[~mask], x[~mask])

    with torch.no_grad():
        expected_input = x.clone()
        expected_input[mask] = V
        ce = _target_ce(t.net(expected_input, text.states, text.pad, text.pooled), x)  # (B, L)
    assert ce[~mask].sum() > 1.0, "visible positions must carry CE, or charging them would go unnoticed"
    token_mean = ce[mask].sum() / mask.sum()
    assert math.isclose(loss.item(), token_mean.item(), rel_tol=1e-5)

    # Arbitrary per-row weights on a hand-made mask: the formula sum_b w_b * CE_b(masked) / B itself.
    mask2 = torch.zeros_like(mask)
    mask2[0, :3] = True
    mask2[1, 5:] = True
    mask2[2, ::2] = True
    mask2[3, 7] = True
    w = torch.tensor([0.5, 2.0, 1.0, 3.0])
    rec2 = Recorder(t.net)
    loss2 = t.objective.loss(rec2, x, text, draws={"mask": mask2, "weight": w})
    assert torch.equal(rec2.inputs[0], torch.where(mask2, torch.full_like(x, V), x))
    with torch.no_grad():
        ce2 = _target_ce(t.net(torch.where(mask2, torch.full_like(x, V), x), text.states, text.pad, text.pooled), x)
    expected2 = sum(w[b] * ce2[b][mask2[b]].sum() for b in range(B)) / B
    assert math.isclose(loss2.item(), float(expected2), rel_tol=1e-5)


def test_autoregressive_loss_feeds_bos_shifted_tokens_and_is_next_token_ce(gen):
    """Autoregressive.loss feeds exactly [BOS, x_0, ..., x_{L-2}] (BOS = V) and returns the mean over all B*L positions
    of CE(net(shifted)_i, x_i): output i predicts token i."""
    t = make_tiny("autoregressive", perturb=0.3)
    V, L = t.spec.vocab_size, t.spec.seq_len
    x, text = fake_data(t.spec, B, gen), fake_text(B, gen)
    rec = Recorder(t.net)
    loss = t.objective.loss(rec, x, text)
    assert len(rec.inputs) == 1
    fed = rec.inputs[0]
    assert fed.shape == (B, L)
    assert (fed[:, 0] == V).all()
    for i in range(1, L):
        assert torch.equal(fed[:, i], x[:, i - 1]), i

    shifted = torch.full_like(x, V)
    shifted[:, 1:] = x[:, :-1]
    with torch.no_grad():
        expected = _target_ce(t.net(shifted, text.states, text.pad, text.pooled), x).mean()
        unshifted = _target_ce(t.net(x, text.states, text.pad, text.pooled), x).mean()
    assert abs(expected - unshifted) > 1e-3, "the check needs the shift to change the loss"
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)


# ----------------------------------------------------------------------------- EMA


def test_ema_update_is_the_decay_weighted_average():
    """ema_update(ema, net, d) sets every EMA parameter to d * ema + (1 - d) * net, for several d."""
    for d in (0.0, 0.25, 0.9, 0.999):
        g = torch.Generator().manual_seed(1)
        ema, net = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
        with torch.no_grad():
            for p in (*ema.parameters(), *net.parameters()):
                p.copy_(torch.randn(p.shape, generator=g))
        before = [p.detach().clone() for p in ema.parameters()]
        ema_update(ema, net, d)
        for e0, e1, p in zip(before, ema.parameters(), net.parameters()):
            assert torch.allclose(e1, d * e0 + (1 - d) * p, rtol=0, atol=1e-6), d


def test_train_step_moves_the_ema_toward_the_updated_weights(gen):
    """After one real train_step with ema_decay d: EMA == d * EMA_before + (1 - d) * net_after_the_step, parameter by
    parameter (the update uses the optimised weights, not the ones before the step)."""
    t = make_tiny("masked", perturb=0.2)
    net = t.net
    ema = copy.deepcopy(net).requires_grad_(False)
    with torch.no_grad():  # an EMA that differs from the weights, so the average is not trivially either
        for p in ema.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ema0 = [p.detach().clone() for p in ema.parameters()]
    net0 = [p.detach().clone() for p in net.parameters()]
    opt = make_optimizer(net, TrainConfig(lr=1e-2), torch.device("cpu"))
    x, text = fake_data(t.spec, B, gen), fake_text(B, gen)
    d = 0.8
    train_step(net, net, ema, opt, t.objective, x, text, torch.Generator().manual_seed(0), bf16=False, grad_clip=1.0,
               ema_decay=d)
    moved = max((p.detach() - q).abs().max().item() for p, q in zip(net.parameters(), net0))
    assert moved > 1e-3, "the step must change the weights for the check to mean anything"
    for e0, e1, p in zip(ema0, ema.parameters(), net.parameters()):
        assert torch.allclose(e1, d * e0 + (1 - d) * p.detach(), rtol=0, atol=1e-6)


def test_ema_decay_warm_up():
    """ema_decay_at(s, d) = min(d, (1 + s) / (10 + s)): 0.1 at step 0, rising, capped at d."""
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(5, 0.999) == pytest.approx(6 / 15)
    assert ema_decay_at(10_000, 0.999) == pytest.approx(0.999)
    assert ema_decay_at(100, 0.5) == pytest.approx(0.5)
    vals = [ema_decay_at(s, 0.999) for s in range(50)]
    assert all(a < b for a, b in zip(vals, vals[1:]))


# ----------------------------------------------------------------------------- the training loop (caption dropout, EMA)


@pytest.fixture(scope="module")
def recorded_runs(tmp_path_factory):
    """Two tiny real masked training runs (64 rows x 8 steps, caption dropout 0.5 and 0), every train_step call
    recorded: the text batch fed to the loss, the EMA decay, and the EMA and weights before and after the step."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        calls: list[dict] = []

        def spy(model, net, ema, *args, **kw):
            ema_before = [p.detach().clone() for p in ema.parameters()]
            result = train_step(model, net, ema, *args, **kw)
            calls.append({"text": args[3], "ema_decay": kw["ema_decay"], "ema_before": ema_before,
                          "ema_after": [p.detach().clone() for p in ema.parameters()],
                          "net_after": [p.detach().clone() for p in net.parameters()]})
            return result

        mp.setattr(train_mod, "train_step", spy)
        for p in (0.5, 0.0):
            cfg = tiny_run_config("masked", budget_steps=8, sets=[f"data.caption_dropout={p}", "train.batch_size=64"])
            state = train(cfg, tmp_path_factory.mktemp("run") / "run", progress=False)
            out[p] = (cfg, state, list(calls))
            calls.clear()
    return out


def _empty_rows(text) -> torch.Tensor:
    """Rows (N,) bool of a TextBatch that are the empty caption: all padding, zero states and pool."""
    return text.pad.all(1) & (text.states == 0).flatten(1).all(1) & (text.pooled == 0).all(1)


@pytest.mark.parametrize("p", [0.5, 0.0])
def test_caption_dropout_fraction_in_training(recorded_runs, p):
    """In a real training run, the fraction of captions fed to the loss that are the empty caption is within 5 binomial
    sigma of data.caption_dropout (0.5), and exactly 0 at dropout 0; the other captions are real (not all padding)."""
    cfg, state, calls = recorded_runs[p]
    assert state["done"] and len(calls) == state["total_steps"] >= 8
    texts = [c["text"] for c in calls]
    assert all(len(tb) == cfg.train.batch_size for tb in texts)
    empty = torch.cat([_empty_rows(tb) for tb in texts])  # (steps * batch,)
    allpad = torch.cat([tb.pad.all(1) for tb in texts])
    assert torch.equal(empty, allpad), "a caption is either the empty one or has real tokens"
    n = empty.numel()
    frac = empty.float().mean().item()
    if p == 0.0:
        assert frac == 0.0
    else:
        assert abs(frac - p) <= 5 * math.sqrt(p * (1 - p) / n), (frac, n)
        per_step = [_empty_rows(tb) for tb in texts]
        assert any(not torch.equal(a, b) for a, b in zip(per_step, per_step[1:])), "dropout must be redrawn per step"


def test_training_loop_ema_follows_the_warmed_up_decay(recorded_runs):
    """In a real training run, step s updates the EMA with decay ema_decay_at(s, train.ema_decay), and after each step
    EMA == d * EMA_before + (1 - d) * weights_after_the_step."""
    cfg, state, calls = recorded_runs[0.5]
    assert [c["ema_decay"] for c in calls] == [ema_decay_at(s, cfg.train.ema_decay) for s in range(len(calls))]
    for s, c in enumerate(calls):
        d = c["ema_decay"]
        for e0, e1, w in zip(c["ema_before"], c["ema_after"], c["net_after"]):
            assert torch.allclose(e1, d * e0 + (1 - d) * w, rtol=0, atol=1e-6), s
    # the EMA is not just the weights (decay > 0) and does move (decay < 1)
    last = calls[-1]
    assert any(not torch.allclose(e, w) for e, w in zip(last["ema_after"], last["net_after"]))
    assert any(not torch.equal(e0, e1) for e0, e1 in zip(last["ema_before"], last["ema_after"]))


# ----------------------------------------------------------------------------- the masked sampler's confidence order


class PeakedNet(torch.nn.Module):
    """A stub with the backbone's call signature whose logits ignore the input: in row b, positions ``sure[b]`` put a
    logit of 30 on token ``peak[b, i]`` (near-certain), every other position is uniform over V. Records its inputs."""

    def __init__(self, spec, sure: torch.Tensor, peak: torch.Tensor):
        super().__init__()
        self.spec = spec
        self.sure, self.peak = sure, peak  # (B, L) bool, (B, L) long
        self.inputs: list[torch.Tensor] = []

    def forward(self, x, text, text_pad, pooled, t=None, cache=None):
        self.inputs.append(x.clone())
        logits = torch.zeros(x.shape[0], self.spec.seq_len, self.spec.vocab_size)
        logits.scatter_(2, self.peak[..., None], 30.0 * self.sure[..., None].float())
        return logits


def test_masked_sampler_commits_the_most_confident_tokens_first(gen):
    """With the Gumbel choice noise off (choice_temperature=0), the first decoding step keeps exactly the positions the
    network is near-certain about (their peak tokens) and re-masks all others."""
    t = make_tiny("masked")
    spec, L, V = t.spec, t.spec.seq_len, t.spec.vocab_size
    steps = 2
    n_commit = L - masked_counts(L, steps)[0]  # decided after the first step
    assert 0 < n_commit < L
    g = torch.Generator().manual_seed(11)
    sure = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        sure[b, torch.randperm(L, generator=g)[:n_commit]] = True
    peak = torch.randint(0, V, (B, L), generator=g)
    stub = PeakedNet(spec, sure, peak)
    sc = SampleConfig(steps=steps, guidance=1.0, choice_temperature=0.0)
    out = t.objective.sample(stub, fake_text(B, gen), empty_text(B), sc, torch.Generator().manual_seed(0))
    assert len(stub.inputs) == steps
    assert (stub.inputs[0] == V).all()
    after_first = stub.inputs[1]
    assert torch.equal(after_first != V, sure)  # exactly the near-certain positions were committed
    assert torch.equal(after_first[sure], peak[sure])
    assert torch.equal(out[sure], peak[sure]) and out.max() < V


# ----------------------------------------------------------------------------- diffusion's training times


@pytest.mark.parametrize("t_mean,t_std", [(0.0, 1.0), (-0.8, 0.5)])
def test_diffusion_times_are_logit_normal(t_mean, t_std):
    """Training times t from Diffusion.draw: logit(t) over 10k draws is normal(t_mean, t_std) (mean within 5 standard
    errors, sd within 5 of its standard errors, KS test p > 1e-4), and t lies in (0, 1)."""
    obj = make_objective(ObjectiveConfig(name="diffusion", t_mean=t_mean, t_std=t_std))
    spec = make_tiny("diffusion").spec
    n = 10_000
    t = obj.draw(n, spec, "cpu", torch.Generator().manual_seed(0))["t"].double()
    assert t.shape == (n,) and (t > 0).all() and (t < 1).all()
    z = torch.log(t / (1 - t)).numpy()
    assert abs(z.mean() - t_mean) <= 5 * t_std / math.sqrt(n), z.mean()
    assert abs(z.std() - t_std) <= 5 * t_std / math.sqrt(2 * n), z.std()
    assert stats.kstest(z, "norm", args=(t_mean, t_std)).pvalue > 1e-4


# ----------------------------------------------------------------------------- top-k and temperature


def test_filter_logits_keeps_exactly_the_k_largest_tempered():
    """filter_logits(l, T, k) is l / T on the k largest logits and -inf elsewhere; k=0 or k >= V keeps every logit."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 10, generator=g)  # distinct values
    for T in (0.5, 1.0, 2.0):
        for k in (1, 3, 7):
            out = filter_logits(logits, T, k)
            top = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.topk(k, dim=1).indices, True)
            assert torch.equal(torch.isfinite(out), top), (T, k)
            assert (out[~top] == float("-inf")).all()
            assert torch.allclose(out[top], logits[top] / T, rtol=1e-6, atol=0)
        for k in (0, 10, 12):
            assert torch.allclose(filter_logits(logits, T, k), logits / T, rtol=1e-6, atol=0)


@pytest.mark.parametrize("T,k", [(0.5, 0), (2.0, 0), (0.7, 3), (2.0, 4)])
def test_sample_logits_frequencies_follow_tempered_top_k_softmax(T, k):
    """sample_logits draws token i with probability softmax(logits / T) renormalised over the top k (all when k=0):
    frequencies within 5 sigma over 100k draws, never a token outside the top k, and the returned log-probability is
    log p_i of the drawn token."""
    logits = torch.tensor([1.0, -0.5, 2.0, 0.3, -1.2, 0.9, 1.6, -0.1])
    V, n = logits.numel(), 100_000
    keep = torch.ones(V, dtype=torch.bool) if k == 0 else torch.zeros(V, dtype=torch.bool).scatter_(0, logits.topk(k).indices, True)
    w = torch.exp(logits.double() / T) * keep
    p = w / w.sum()
    tokens, logp = sample_logits(logits.expand(n, V), T, k, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=V).double() / n
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), (freq, p)
    assert (freq[~keep] == 0).all()
    assert torch.allclose(logp.double(), p.log()[tokens], atol=1e-5)
