"""Analytic FLOPs (flopmatch.flops) against torch's FlopCounterMode, and the stated conventions."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from flop_counting import count_flops, rel_err
from flopmatch import PARADIGMS, cli, flops
from flopmatch.config import RunConfig, SampleConfig, apply_overrides
from flopmatch.nets import Network
from flopmatch.plan import flops_summary
from tiny import empty_text, fake_data, fake_text, make_tiny

B = 2
TOL = 0.02  # relative; today the counts agree exactly


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("name", PARADIGMS)
def test_train_flops_match_counter(name, depth, gen):
    """Training FLOPs per example (forward + backward) equal the counted FLOPs of loss().backward()."""
    t = make_tiny(name, depth=depth)
    x, text = fake_data(t.spec, B, gen), fake_text(B, gen)
    counted = count_flops(lambda: t.objective.loss(t.net, x, text, gen).backward()) / B
    analytic = t.objective.train_flops(t.spec)
    assert rel_err(counted, analytic) < TOL, (counted, analytic)


SAMPLE_CASES = [(n, cfg, kv) for n in PARADIGMS for cfg in (1.0, 3.0) for kv in ((True, False) if n == "autoregressive" else (True,))]


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("name,cfg,kv", SAMPLE_CASES)
def test_sample_flops_match_counter(name, cfg, kv, depth, gen):
    """Sampling FLOPs per image equal the counted FLOPs of sample(), with and without guidance (and KV cache)."""
    t = make_tiny(name, depth=depth)
    sc = SampleConfig(steps=3, guidance=cfg, kv_cache=kv)
    cond, uncond = fake_text(B, gen), empty_text(B)
    counted = count_flops(lambda: t.objective.sample(t.net, cond, uncond, sc, gen)) / B
    analytic = t.objective.sample_flops(t.spec, sc)
    assert rel_err(counted, analytic) < TOL, (counted, analytic)


def test_masked_counts_the_whole_sequence(gen):
    """Masked training/sampling is charged for all L positions, however few are masked."""
    t = make_tiny("masked")
    L = t.spec.seq_len
    full_fwd = flops.forward_flops(t.spec, L)
    assert t.objective.train_flops(t.spec) == 3 * full_fwd["total"] - full_fwd["data_fed"]
    assert t.objective.sample_flops(t.spec, SampleConfig(steps=5, guidance=1.0)) == 5 * full_fwd["total"]
    # the counter agrees for an input with a single [MASK]: hidden positions are not skipped
    x, text = fake_data(t.spec, B, gen), fake_text(B, gen)
    counted = count_flops(lambda: t.net(x.masked_fill(torch.arange(L) == 0, t.spec.vocab_size), text.states, text.pad, text.pooled)) / B
    assert counted == full_fwd["total"]


@pytest.mark.parametrize("name,kv", [("diffusion", True), ("masked", True), ("autoregressive", True), ("autoregressive", False)])
def test_guidance_doubles_sampling_flops(name, kv):
    """Any guidance scale other than 1 costs exactly twice the FLOPs of cfg=1."""
    t = make_tiny(name, depth=2)
    one = t.objective.sample_flops(t.spec, SampleConfig(steps=4, guidance=1.0, kv_cache=kv))
    for s in (0.0, 1.5, 3.0):
        assert t.objective.sample_flops(t.spec, SampleConfig(steps=4, guidance=s, kv_cache=kv)) == 2 * one


def test_kv_cache_is_cheaper_than_recompute():
    """Autoregressive sampling with a KV cache costs less than recomputing every prefix, and less than L full passes."""
    t = make_tiny("autoregressive", depth=2)
    L = t.spec.seq_len
    with_cache = t.objective.sample_flops(t.spec, SampleConfig(guidance=1.0, kv_cache=True))
    without = t.objective.sample_flops(t.spec, SampleConfig(guidance=1.0, kv_cache=False))
    assert with_cache < without < L * flops.forward_flops(t.spec, L)["total"]


@pytest.mark.parametrize("depth,mlp_ratio", [(1, 4), (2, 4), (3, 2)])
@pytest.mark.parametrize("name", PARADIGMS)
def test_num_params_matches_network(name, depth, mlp_ratio):
    """flops.num_params(spec) equals the parameter count of the built Network."""
    spec = replace(make_tiny(name, depth=depth).spec, mlp_ratio=mlp_ratio)
    assert flops.num_params(spec) == Network(spec).num_params()


@pytest.mark.parametrize("name", PARADIGMS)
def test_cli_flops_json_matches_plan(name, capsys):
    """`flopmatch flops --json` prints params, train and sample FLOPs equal to plan.flops_summary."""
    sets = ["text.kind=hash", "text.dim=32", "sample.steps=7"]
    assert cli.main(["flops", "--objective", name, "--depth", "2", "--cfg", "2.5", "--json", *sum((["--set", s] for s in sets), [])]) == 0
    printed = json.loads(capsys.readouterr().out)
    cfg = apply_overrides(RunConfig(objective=name), sets)
    cfg.model.depth, cfg.sample.guidance = 2, 2.5
    expected = flops_summary(cfg)
    for key in ("params", "train_flops_per_example", "sample_flops_per_image"):
        assert printed[key] == expected[key], key
    assert printed == expected


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("name", PARADIGMS)
def test_backbone_only_flops_match_the_counted_backbone(name, depth, gen):
    """The backbone-only convention (Kaplan's non-embedding compute) equals the counted FLOPs of forward +
    backward through the Transformer blocks alone, and is below the all-FLOPs count (stems, heads excluded)."""
    t = make_tiny(name, depth=depth, perturb=0.1)
    D, L = t.spec.width, t.spec.seq_len
    h = torch.randn(B, L, D, generator=gen, requires_grad=True)  # every block input comes from trainable layers
    c = torch.randn(B, D, generator=gen, requires_grad=True)
    text = torch.randn(B, t.spec.text_len, D, generator=gen, requires_grad=True)
    pad = torch.zeros(B, t.spec.text_len, dtype=torch.bool)
    counted = count_flops(lambda: t.net.backbone(h, c, text, pad).square().sum().backward()) / B
    analytic = flops.backbone_train_flops(t.spec)
    assert rel_err(counted, analytic) < TOL, (counted, analytic)
    assert analytic < t.objective.train_flops(t.spec)
