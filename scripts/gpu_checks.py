"""The Python checks of scripts/gpu-check.sh: host synchronisation and the compiled sampler's tokens on a GPU.

    python scripts/gpu_checks.py probe-sync DEVICE DEPTH QUICK   # train_step and every sampler, after a warm-up
    python scripts/gpu_checks.py loop-sync DEVICE OUT [KEY=VALUE ...] # the real training loop (train.train)
    python scripts/gpu_checks.py compiled-equal DEVICE QUICK         # compiled next-token sampler == eager one

On CUDA, ``torch.cuda.set_sync_debug_mode`` makes every synchronising call (``.item()``, a data-dependent shape, a
blocking copy) raise ("error") or warn ("warn"). On a CPU the checks just run (they test this script), and
tests/test_host_sync.py checks the same steps there with a dispatch mode.
"""

from __future__ import annotations

import collections
import sys
import traceback
import warnings

import torch

import flopmatch.train as train_module
from flopmatch import PARADIGMS
from flopmatch.bench import net_spec, sizes, train_config
from flopmatch.config import RunConfig, SampleConfig, apply_overrides
from flopmatch.probe import SamplingProbe, TrainingProbe

# Synchronising calls a whole training run may make outside its steady state: the last step's logged loss
# (.item()) and gradient norm (float()).
LOOP_SYNCS_ALLOWED = 2


def without_sync(device: torch.device, what: str, fn) -> None:
    """Run ``fn`` once to warm up, then again with CUDA's sync debug mode raising on any host synchronisation."""
    fn()  # warm-up: allocation, kernel selection, lazy initialisation
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
    print(what, "no host sync", flush=True)


def probe_sync(device: torch.device, depth: int, quick: bool) -> int:
    """train_step of every paradigm and its samplers (every kv_cache setting for next-token)."""
    bf16 = device.type == "cuda"
    sz = sizes(quick)
    for name in PARADIGMS:
        p = TrainingProbe(name, net_spec(name, depth, sz), 64, train_config(), device, bf16, sz.text)
        without_sync(device, f"{name}: 3 training steps", lambda: [p.step() for _ in range(3)])
        s = SamplingProbe(name, net_spec(name, depth, sz), 8, device, bf16, sz.text)
        for sample in [SampleConfig()] + ([SampleConfig(kv_cache=False)] if name == "autoregressive" else []):
            without_sync(device, f"{name}: sampling (kv_cache={sample.kv_cache})", lambda: s.run(sample))
    return 0


def loop_sync(device: torch.device, out: str, sets: list[str]) -> int:
    """A whole ``train.train`` run (data feeding, train_step, EMA), sync debug mode "warn" from its second step to its
    last checkpoint; prints each synchronising call site with its count. Fails above LOOP_SYNCS_ALLOWED."""
    cfg = apply_overrides(RunConfig(), [f"train.device={device}", "train.log_every=1000000",
                                        "train.checkpoint_every=1000000", "train.ema_snapshots=0", *sets])
    sites: collections.Counter = collections.Counter()
    steps = [0]

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            ours = [f for f in traceback.extract_stack()[:-1] if "/flopmatch/" in f.filename and "/torch/" not in f.filename]
            sites[f"{ours[-1].filename}:{ours[-1].lineno} {ours[-1].line}" if ours else f"{filename}:{lineno}"] += 1

    real_step, real_save = train_module.train_step, train_module.save_checkpoint

    def step(*args, **kwargs):
        steps[0] += 1
        if device.type == "cuda" and steps[0] == 2:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        return real_step(*args, **kwargs)

    def save(*args, **kwargs):  # a checkpoint copies every tensor to the host: syncs by design
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        return real_save(*args, **kwargs)

    train_module.train_step, train_module.save_checkpoint = step, save
    warnings.showwarning = record
    warnings.simplefilter("always")
    try:
        train_module.train(cfg, out, progress=False)
    finally:
        train_module.train_step, train_module.save_checkpoint = real_step, real_save
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    total = sum(sites.values())
    print(f"{cfg.objective.name}: {steps[0]} steps; {total} synchronising call(s) from step 2 to the last checkpoint"
          + ("" if device.type == "cuda" else " (not measured: no CUDA)"))
    for site, count in sites.most_common():
        print(f"  {count:6d}  {site}")
    return 0 if total <= LOOP_SYNCS_ALLOWED else 1


# Token agreement a working compiled sampler keeps with the eager one. Fused kernels may round a logit differently and
# flip one sampled token, after which the rest of that row differs; a broken graph (a stale cache position or input)
# agrees on ~1/V of the tokens.
AGREEMENT_MIN = 0.75


def compiled_equal(device: torch.device, quick: bool) -> int:
    """The compiled next-token sampler (static KV cache; CUDA graphs on a GPU) against the eager one, in fp32 so both
    take the same arithmetic: three calls (warm-up, recording, replay) at two batch sizes, each agreeing on at least
    AGREEMENT_MIN of the tokens (exactly equal on a CPU so far)."""
    sz = sizes(quick)
    bad = 0
    for batch in (8, 4):
        p = SamplingProbe("autoregressive", net_spec("autoregressive", 2, sz), batch, device, False, sz.text)
        ref = p.run(SampleConfig())
        for call in range(3):
            got = p.run(SampleConfig(compile=True))
            agree = (ref == got).float().mean().item()
            print(f"batch {batch}, call {call}: compiled tokens {'==' if agree == 1 else '!='} eager ({agree:.4f} agree)",
                  flush=True)
            bad += agree < AGREEMENT_MIN
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    check, device = argv[0], torch.device(argv[1])
    if check == "probe-sync":
        return probe_sync(device, int(argv[2]), argv[3] == "1")
    if check == "loop-sync":
        return loop_sync(device, argv[2], argv[3:])
    if check == "compiled-equal":
        return compiled_equal(device, argv[2] == "1")
    raise SystemExit(f"unknown check {check!r}; see the docstring")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
