"""Inference cost of a sampling setting that needs no clock: analytic FLOPs per image.

The network's sampling FLOPs (guidance and the KV cache counted as :mod:`flopmatch.flops` says) and
the tokenizer's decode FLOPs are separate line items. Measured latency and throughput live in
:mod:`flopmatch.evaluation.timing`, because a timing only means something next to timings of the
other settings taken in the same phase.
"""

from __future__ import annotations

from dataclasses import replace


def inference_cost(sampler, sample) -> dict:
    """Analytic FLOPs per image of one setting of a loaded sampler (next-token: also without its KV cache)."""
    obj, spec = sampler.objective, sampler.spec
    out = {"sample_flops_per_image": obj.sample_flops(spec, sample), "decode_flops_per_image": sampler.tokenizer.decode_flops()}
    if sampler.cfg.objective.name == "autoregressive":
        other = replace(sample, kv_cache=not sample.kv_cache)
        out["without_kv_cache" if sample.kv_cache else "with_kv_cache"] = {"sample_flops_per_image": obj.sample_flops(spec, other)}
    return out
