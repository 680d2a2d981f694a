"""Inference cost of a sampling setting: analytic FLOPs per image, measured latency and throughput.

Latency is the wall time to generate ONE image (batch 1), median of a few repeats after a warm-up.
Throughput is images per second at the best batch size among a doubling ladder (1, 2, 4, ...),
stopping when it no longer improves. Device, thread count and precision are recorded with the
numbers because they mean nothing without them. Tokenizer decoding is timed separately.
"""

from __future__ import annotations

import statistics
import time

import torch

from flopmatch.device import autocast


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_sample(sampler, cond, uncond, sample, seed: int, decode: bool) -> float:
    """Seconds for one sampler call (+ tokenizer decode) on prepared text batches."""
    bf16 = sampler.bf16
    g = torch.Generator(device=sampler.device).manual_seed(seed)
    _sync(sampler.device)
    t0 = time.perf_counter()
    with torch.no_grad(), autocast(sampler.device, bf16):
        z = sampler.objective.sample(sampler.net, cond, uncond, sample, g)
        if decode:
            sampler.tokenizer.decode(z.float() if z.is_floating_point() else z)
    _sync(sampler.device)
    return time.perf_counter() - t0


def measure_inference(sampler, sample, prompt: str = "a red circle", repeats: int = 3, max_batch: int = 64,
                      time_budget_s: float = 20.0) -> dict:
    """Latency (batch 1) and best throughput for one sampling setting of a loaded generator.

    Returns seconds and images/s, with the analytic network FLOPs per image and the tokenizer's
    decode FLOPs as a separate line item.
    """
    spec = sampler.spec
    enc = sampler.encoder

    def text(n):
        return enc.encode([prompt] * n).to(sampler.device), enc.encode([""] * n).to(sampler.device)

    cond, uncond = text(1)
    _time_sample(sampler, cond, uncond, sample, 0, True)  # warm-up (allocations, autotuning)
    lat = [_time_sample(sampler, cond, uncond, sample, i, True) for i in range(repeats)]
    best = {"batch": 1, "images_per_s": 1.0 / statistics.median(lat)}
    start = time.perf_counter()
    b = 2
    while b <= max_batch and time.perf_counter() - start < time_budget_s:
        cond, uncond = text(b)
        t = min(_time_sample(sampler, cond, uncond, sample, i, True) for i in range(2))
        ips = b / t
        if ips <= best["images_per_s"] * 1.02:
            break  # no longer improving
        best = {"batch": b, "images_per_s": ips}
        b *= 2
    return {
        "sample_flops_per_image": sampler.objective.sample_flops(spec, sample),
        "decode_flops_per_image": sampler.tokenizer.decode_flops(),
        "latency_s": statistics.median(lat),
        "latency_s_all": lat,
        "throughput_images_per_s": best["images_per_s"],
        "throughput_batch": best["batch"],
        "device": str(sampler.device),
        "threads": torch.get_num_threads(),
        "bf16": sampler.bf16,
    }
