"""Benchmark: token sampling with inverse-CDF draws (objectives/logits.categorical) vs torch.multinomial.

    .venv/bin/python benchmarks/sampling.py [--threads 2] [--repeats 5]

Prints, measured in the same run (this machine is shared and noisy, so read the ratios):
  1. one categorical draw per row of a (rows, V) probability batch: torch.multinomial vs categorical;
  2. a whole masked-token sampler call (depth 1, 8x8 grid, vocab 1024, batch 100, 12 steps, cfg 3)
     with the sampler's draws routed through torch.multinomial vs through categorical.
The network is freshly initialised (a perturbed adaLN-Zero init): sampling cost does not depend on
training. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from flopmatch.config import ModelConfig, SampleConfig
from flopmatch.nets import Network
from flopmatch.objectives import logits as logits_mod
from flopmatch.objectives import make_objective
from flopmatch.text import TextBatch
from flopmatch.tokenizers.base import TokenizerSpec


def _multinomial(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The previous implementation: torch.multinomial, one draw per row."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_draws(repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    for rows, vocab in ((6400, 1024), (100, 1024), (6400, 16384)):
        probs = torch.randn(rows, vocab, generator=g).softmax(-1)
        old = _median_s(lambda: _multinomial(probs, g), repeats)
        new = _median_s(lambda: logits_mod.categorical(probs, g), repeats)
        print(f"draws ({rows}x{vocab}): multinomial {old * 1e3:8.2f} ms, inverse-CDF {new * 1e3:7.2f} ms, "
              f"ratio {old / new:6.1f}x")


def bench_masked_sampler(repeats: int) -> None:
    obj = make_objective("masked")
    tok = TokenizerSpec("discrete", 8, vocab_size=1024, image_size=32)
    spec = obj.net_spec(ModelConfig(depth=1), tok, 384, 24)
    torch.manual_seed(0)
    net = Network(spec).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))  # leave the adaLN-Zero init so the blocks do work
    batch = 100
    states = torch.randn(batch, 24, 384)
    no_pad = torch.zeros(batch, 24, dtype=torch.bool)
    cond = TextBatch(states, no_pad, states.mean(1))
    uncond = TextBatch(torch.zeros_like(states), no_pad, torch.zeros(batch, 384))
    sample = SampleConfig(steps=12, guidance=3.0)

    def run():
        with torch.no_grad():
            obj.sample(net, cond, uncond, sample, torch.Generator().manual_seed(0))

    new = _median_s(run, repeats)
    fast = logits_mod.categorical
    logits_mod.categorical = _multinomial
    try:
        old = _median_s(run, repeats)
    finally:
        logits_mod.categorical = fast
    print(f"masked sampler (d1, batch {batch}, 12 steps, cfg 3): multinomial {old:.3f} s, inverse-CDF {new:.3f} s, "
          f"ratio {old / new:.2f}x (inverse-CDF {batch / new:.0f} images/s, multinomial {batch / old:.0f}; fp32, no decode)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} repeats")
    bench_draws(args.repeats)
    bench_masked_sampler(args.repeats)


if __name__ == "__main__":
    main()
