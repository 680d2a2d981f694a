"""Benchmark: CPU attention in bf16 vs in fp32 (the choice of flopmatch.backbone.attention).

    .venv/bin/python benchmarks/attention.py [--threads 2] [--rounds 3]

For shapes of flopmatch's networks (8x8, 16x16 and 32x32 token grids; self-attention and cross-attention to 24 text
tokens; head dim 64), prints the best time over interleaved rounds of torch SDPA's forward + backward and forward
alone on bf16 inputs, computed in bf16 (what CPU autocast runs) and in fp32 (inputs cast up, the output cast back),
and their ratio. ``flopmatch.backbone.CPU_FP32_ATTENTION_MAX_KEYS`` is where fp32 stops being faster on the CPUs
measured. Not a test: nothing is asserted; run it on the machine in question.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from flopmatch.allocator import tune_allocator

# (batch, heads, queries, keys, causal): ~2,048 query tokens per call, as the cpu preset's training batch
SHAPES = [(32, 2, 64, 64, False), (32, 2, 64, 64, True), (32, 6, 64, 64, False), (32, 2, 64, 24, False),
          (8, 4, 256, 256, False), (8, 4, 256, 24, False), (4, 4, 512, 512, True), (2, 4, 1024, 1024, True),
          (16, 6, 1, 64, False)]


def timed(fn, rounds: int, calls: int = 8) -> float:
    """Best milliseconds per call over ``rounds`` rounds of ``calls`` calls, after two warm-up calls."""
    fn()
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls * 1e3)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tune_allocator()  # as every flopmatch command runs
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; milliseconds, best of {args.rounds} rounds")
    print(f"{'B':>3} {'H':>2} {'L':>5} {'keys':>5} {'causal':>6} | {'fwd+bwd bf16':>12} {'fp32':>6} {'ratio':>6} | "
          f"{'fwd bf16':>8} {'fp32':>6} {'ratio':>6}")
    for B, H, L, Lk, causal in SHAPES:
        q = torch.randn(B, H, L, 64, generator=g).bfloat16().requires_grad_()
        k = torch.randn(B, H, Lk, 64, generator=g).bfloat16().requires_grad_()
        v = torch.randn(B, H, Lk, 64, generator=g).bfloat16().requires_grad_()
        grad = torch.randn(B, H, L, 64, generator=g).bfloat16()

        def call(dtype, backward: bool):
            def fn():
                with torch.set_grad_enabled(backward):
                    out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=causal).bfloat16()
                    if backward:
                        out.backward(grad)
            return fn

        both = [timed(call(dt, True), args.rounds) if L > 1 else float("nan") for dt in (torch.bfloat16, torch.float32)]
        fwd = [timed(call(dt, False), args.rounds, calls=30) for dt in (torch.bfloat16, torch.float32)]
        print(f"{B:>3} {H:>2} {L:>5} {Lk:>5} {causal!s:>6} | {both[0]:>12.2f} {both[1]:>6.2f} {both[0] / both[1]:>5.2f}x | "
              f"{fwd[0]:>8.3f} {fwd[1]:>6.3f} {fwd[0] / fwd[1]:>5.2f}x")


if __name__ == "__main__":
    main()
