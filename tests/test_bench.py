"""`flopmatch bench`: every figure is a finite positive number, the FLOPs it divides by are the ones training
budgets with (and, for the plain baseline, the counted ones), and the step it times is training's step.
No timing is asserted: the machine is shared and noisy."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from flop_counting import count_flops
from flopmatch import PARADIGMS, cli
from flopmatch.bench import (
    COMPILED_KV,
    PLAIN,
    BenchOptions,
    TrainingBench,
    format_bench,
    net_spec,
    plain_stack,
    plain_train_flops,
    run_bench,
    sizes,
    train_config,
)
from flopmatch.config import RunConfig, apply_overrides
from flopmatch.device import autocast, matmul_times
from flopmatch.objectives import make_objective
from flopmatch.objectives.autoregressive import compiled_network_step
from flopmatch.plan import net_spec_for
from flopmatch.schedule import ema_decay_at
from flopmatch.study.plan import autoencoder_config
from flopmatch.study.presets import cpu
from flopmatch.train import make_optimizer, train_step

QUICK = sizes(True)


@pytest.fixture(scope="module")
def result():
    """One quick bench of every paradigm at depths 1 and 2 (one round)."""
    return run_bench(BenchOptions(quick=True, rounds=1, progress=False))


def _numbers(tree, path=""):
    """(path, value) of every number in a JSON tree (booleans are not numbers)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def test_quick_bench_gives_finite_positive_figures(result):
    """Every figure is finite and > 0; every paradigm and depth is there, with the plain baseline and the KV-cache pair."""
    json.dumps(result)  # one JSON object
    figures = {k: v for k, v in result.items() if k != "machine"}  # the machine's load average may be 0
    bad = [(p, v) for p, v in _numbers(figures) if not (math.isfinite(v) and v > 0)]
    assert not bad and "errors" not in result, bad
    m = result["machine"]
    assert m["device_name"] and m["threads"] >= 1 and m["torch"] == torch.__version__ and isinstance(m["bf16"], bool)
    assert isinstance(m["malloc_tuned"], bool)
    assert ("glibc malloc thresholds set" in format_bench(result)) == m["malloc_tuned"]
    assert set(result["matmul"]) == {"fp32", "bf16"}
    assert {(r["model"], r["depth"]) for r in result["training"]} == {(n, d) for n in (PLAIN, *PARADIGMS) for d in (1, 2)}
    assert all("flops_per_s_vs_plain" in r for r in result["training"] if r["model"] != PLAIN)
    assert len(result["sampling"]) == 2 * (len(PARADIGMS) + 1) and [k["depth"] for k in result["kv_cache"]] == [1, 2]
    assert result["text_encoder"]["captions_per_s"] > 0 and result["memory"]["bytes"] > 0
    assert "MFU" in format_bench(result)


def test_training_flops_are_the_ones_train_budgets_with(result):
    """FLOPs per example are objective.train_flops of the network the bench builds; full sizes are the cpu study's cells."""
    for r in result["training"]:
        if r["model"] != PLAIN:
            assert r["flops_per_example"] == make_objective(r["model"]).train_flops(net_spec(r["model"], r["depth"], QUICK))
    assert train_config().batch_size == 32
    for name in PARADIGMS:  # full sizes: the NetSpec a cpu-preset study run plans with its learned tokenizers
        cfg = apply_overrides(RunConfig(objective=name), cpu().overrides)
        cfg.model.depth = 2
        tok = autoencoder_config(cpu(), make_objective(name).tokens).spec()
        assert net_spec(name, 2, sizes(False)) == net_spec_for(cfg, tok)


@pytest.mark.parametrize("depth", [1, 2])
def test_plain_flops_match_the_counter(depth):
    """The plain stack's analytic training FLOPs equal FlopCounterMode's count of one forward + backward."""
    spec = net_spec("masked", depth, QUICK)
    torch.manual_seed(0)
    net = plain_stack(spec)
    x = torch.randn(3, spec.seq_len, spec.width)  # (B, L, D)
    assert count_flops(lambda: net(x).float().square().mean().backward()) == 3 * plain_train_flops(spec)


@pytest.mark.parametrize("name", PARADIGMS)
@pytest.mark.parametrize("bf16", [False, True])
def test_bench_step_is_the_training_step(name, bf16):
    """The timed step gives objective.loss on its batch, and the same weights, EMA and RNG as train's step on copies."""
    b = TrainingBench(name, net_spec(name, 1, QUICK), 4, train_config(), torch.device("cpu"), bf16, QUICK.text)
    net, ema, rng = copy.deepcopy(b.net), copy.deepcopy(b.ema), torch.Generator().set_state(b.rng.get_state())
    with autocast(torch.device("cpu"), bf16):
        expected = b.objective.loss(copy.deepcopy(net), b.x, b.text, torch.Generator().set_state(b.rng.get_state()))
    cfg = train_config()
    train_step(net, net, ema, make_optimizer(net, cfg, torch.device("cpu")), make_objective(name), b.x, b.text, rng,
               bf16=bf16, grad_clip=cfg.grad_clip, ema_decay=ema_decay_at(0, cfg.ema_decay))
    loss = b.step()
    assert torch.equal(loss.detach(), expected.detach())
    for mine, ref in ((b.net, net), (b.ema, ema)):
        for (k, p), q in zip(mine.named_parameters(), ref.parameters()):
            assert torch.equal(p, q), k
    assert torch.equal(b.rng.get_state(), rng.get_state())


def test_matmul_timing_leaves_global_rng_alone():
    """The peak matmul that training measures for MFU draws no number from torch's global RNG (training may not: resume restores no RNG state)."""
    before = torch.get_rng_state()
    assert min(matmul_times(torch.device("cpu"), torch.float32, 64)) > 0
    assert torch.equal(torch.get_rng_state(), before)


class _BrokenCompile(torch.nn.Module):
    """What a torch.compile'd module that fails at its first call looks like."""

    def __init__(self, net, **options):
        super().__init__()
        self._orig_mod = net

    def forward(self, *args, **kwargs):
        raise RuntimeError("no C++ compiler here\nlong traceback")


def test_compile_failure_is_reported_not_raised(monkeypatch):
    """With --compile, a compile error becomes one line under "errors"; the eager figures are still measured."""
    monkeypatch.setattr(torch, "compile", _BrokenCompile)
    compiled_network_step.cache_clear()  # built on first use per process: not from an earlier test's real compile
    try:
        out = run_bench(BenchOptions(quick=True, rounds=1, depths=[1], objectives=["masked", "autoregressive"], compile=True,
                                     progress=False))
    finally:
        compiled_network_step.cache_clear()  # nor a later test from this broken one
    failed = [f"{m} compiled d1" for m in (PLAIN, "masked", "autoregressive")] + [f"autoregressive{COMPILED_KV} d1"]
    assert out["errors"] == {k: "RuntimeError: no C++ compiler here" for k in failed}
    assert [(r["model"], r["compiled"]) for r in out["training"]] == [(PLAIN, False), ("masked", False), ("autoregressive", False)]
    assert [r.get("compiled") for r in out["sampling"]] == [None, False, False]  # masked; autoregressive cached, recompute
    assert "speedup" in out["kv_cache"][0] and "speedup_compiled" not in out["kv_cache"][0]


def test_cli_bench_json(capsys):
    """`flopmatch bench --quick --json` exits 0 and prints one JSON object naming the machine."""
    code = cli.main(["bench", "--quick", "--json", "--depths", "1", "--objectives", "autoregressive", "--rounds", "1"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["machine"]["torch"] == torch.__version__ and out["kv_cache"][0]["speedup"] > 0
