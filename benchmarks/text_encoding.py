"""Benchmark: captions/s of the MiniLM text encoder, fp32 vs bf16 autocast, in the same run.

    .venv/bin/python benchmarks/text_encoding.py [--threads 2] [--captions 3000] [--rounds 3]

Prints, for distinct shapes captions (the real workload: the study encodes each unique caption once),
the best of ``--rounds`` interleaved rounds per precision and their ratio, and which precision the
encoder uses on this machine (bf16 where the CPU has AVX512-BF16 or AMX, see
``flopmatch.device.cpu_has_native_bf16``). The machine is shared and noisy: read the ratio. Not a
test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import time

import torch

from flopmatch.config import DataConfig
from flopmatch.data.datasets import make_dataset
from flopmatch.text import make_text_encoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--captions", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    captions = sorted(set(make_dataset(DataConfig(), "train", progress=False).captions()))[: args.captions]
    enc = make_text_encoder("minilm")
    native = enc.bf16
    enc.encode(captions[:256])  # warm-up
    best = {False: 0.0, True: 0.0}
    for _ in range(args.rounds):
        for bf16 in (False, True):
            enc.bf16 = bf16
            t0 = time.perf_counter()
            enc.encode(captions)
            best[bf16] = max(best[bf16], len(captions) / (time.perf_counter() - t0))
    print(f"{len(captions)} distinct captions, {args.threads} threads, best of {args.rounds} rounds")
    print(f"  fp32: {best[False]:8.0f} captions/s")
    print(f"  bf16: {best[True]:8.0f} captions/s  ({best[True] / best[False]:.2f}x fp32)")
    print(f"  this machine's encoder uses {'bf16' if native else 'fp32'}")


if __name__ == "__main__":
    main()
