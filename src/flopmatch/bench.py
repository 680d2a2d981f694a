"""``flopmatch bench``: what this machine does with flopmatch, measured in one run.

Figures, all measured in the same process so they can be compared:

1. matmul peak: FLOP/s of a square (n, n) @ (n, n) matmul (2 n^3 FLOPs) in fp32 and bf16, the fastest n of
   those tried doubling from 128 until a call lasts >= 10 ms, and on while that still raises the rate
   (:func:`flopmatch.device.matmul_peak`);
2. training: examples/s of flopmatch's own training step (:func:`flopmatch.train.train_step`: loss under
   the same autocast decision as ``train``, backward, clipping, AdamW from :func:`flopmatch.train.make_optimizer`,
   EMA update) per paradigm and depth, its FLOP/s from the analytic training FLOPs per example that
   ``train`` budgets with (``objective.train_flops``), MFU against the measured peak of the precision the
   step runs in, and the same for a plain PyTorch pre-norm Transformer (``nn.TransformerEncoderLayer``,
   norm_first, of the same width, depth, heads, MLP ratio, MLP activation and sequence length, same step function,
   optimizer and autocast; FLOPs by :func:`plain_train_flops`, the same conventions), with the ratio
   paradigm FLOP/s / plain FLOP/s. The plain block runs stock SDPA; flopmatch's attention runs in fp32 where that
   is faster (a CPU under bf16, at most 128 keys: :func:`flopmatch.backbone.attention`), so there a ratio above 1
   is flopmatch's own gain, not noise. ``compile``: also torch.compile'd (both), or the error it raised;
3. sampling: images/s per paradigm at batch 16, default steps and guidance 3 (network and sampler, no
   tokenizer decode), and the KV cache's speed-up of autoregressive sampling (on vs off, same seed); with
   ``compile`` also with the cached decode step torch.compile'd (static cache), against the same eager recompute;
4. captions/s of the MiniLM text encoder on the device, where training runs it (captions are encoded once
   into a cache), in the precision flopmatch uses there; skipped with a note if its package is missing;
5. peak memory: ``torch.cuda.max_memory_allocated`` on CUDA after the matmul figure (every network of the
   training and sampling figures, one depth at a time), the process's max RSS elsewhere (MiniLM included).

Inputs are synthetic, with the shapes of the cpu study preset: an 8x8 grid (64 tokens) of 4-channel KL
latents (diffusion) or codes of a 1024-entry LFQ codebook (masked, autoregressive), as the preset's learned
tokenizers give; random caption states of MiniLM's shape (24 tokens of width 384, some padding); no
dataset, tokenizer or text encoder is loaded for them. Inputs sit on the device before timing (``train``
moves each batch there; that copy is not timed). ``quick``: tiny sizes (head dim 16, 4x4 grid, text 8x16,
batch 4, the weight-free hash text encoder) for tests.

Timing as ``benchmarks/*.py`` and the study's timing phase: a warm-up per item, then ``rounds`` rounds in
which every item runs once (order rotated each round, reversed every other one), each item's figure the
best of its rounds; ratios are between items of the same rounds. A round of an item repeats its call
enough times to last ~0.5 s. CUDA: CUDA events around the timed calls; elsewhere ``time.perf_counter``.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from flopmatch import PARADIGMS
from flopmatch.allocator import tune_allocator
from flopmatch.backbone import mlp_activation
from flopmatch.config import DataConfig, ModelConfig, RunConfig, SampleConfig, TextConfig, TrainConfig, apply_overrides
from flopmatch.data.datasets import make_dataset
from flopmatch.device import matmul_peak, matmul_times, resolve_device, use_bf16
from flopmatch.errors import UserError
from flopmatch.evaluation.timing import Clock
from flopmatch.nets import NetSpec
from flopmatch.objectives import make_objective
from flopmatch.probe import SamplingProbe, TrainingProbe
from flopmatch.study.presets import cpu as cpu_preset
from flopmatch.text import make_text_encoder, text_dim
from flopmatch.tokenizers.autoencoder import preset as autoencoder_preset
from flopmatch.tokenizers.base import TokenizerSpec

COMPILED_KV = " (kv cache, compiled)"  # the autoregressive sampler with its cached decode step torch.compile'd
PLAIN = "plain"  # the plain nn.TransformerEncoderLayer stack, the baseline of the training figures


@dataclass
class BenchOptions:
    """What ``flopmatch bench`` measures. ``batch`` None: the cpu study preset's training batch (32)."""

    device: str = "auto"
    threads: int | None = None  # torch intra-op threads (None: leave torch's default)
    rounds: int = 3
    depths: list[int] = field(default_factory=lambda: [1, 2])
    objectives: list[str] = field(default_factory=lambda: list(PARADIGMS))
    batch: int | None = None
    quick: bool = False
    compile: bool = False
    progress: bool = True


@dataclass(frozen=True)
class Sizes:
    """The shapes measured: full (the cpu study preset's) or quick (tiny, for tests)."""

    head_dim: int
    continuous: TokenizerSpec
    discrete: TokenizerSpec
    text: TextConfig
    sample_batch: int
    round_s: float  # a timed round of one item lasts about this long (0: one call)
    captions: int  # distinct captions for the text-encoder figure
    matmul_min_s: float
    matmul_max_n: int


def sizes(quick: bool) -> Sizes:
    """Full sizes follow the cpu study preset (learned KL/LFQ tokenizers' 8x8 grid, MiniLM text 24x384)."""
    if quick:
        return Sizes(16, TokenizerSpec("continuous", 4, channels=4, image_size=16),
                     TokenizerSpec("discrete", 4, vocab_size=32, image_size=16), TextConfig(kind="hash", max_len=8, dim=16),
                     sample_batch=4, round_s=0.0, captions=32, matmul_min_s=0.0, matmul_max_n=128)
    return Sizes(ModelConfig().head_dim, autoencoder_preset("cpu", "kl").spec(), autoencoder_preset("cpu", "lfq").spec(),
                 TextConfig(), sample_batch=16, round_s=0.5, captions=1000, matmul_min_s=0.01, matmul_max_n=16384)


def train_config() -> TrainConfig:
    """The training settings of the cpu study preset's runs (batch 32, its learning rate, clipping, EMA)."""
    return apply_overrides(RunConfig(), cpu_preset().overrides).train


def net_spec(objective: str, depth: int, sz: Sizes) -> NetSpec:
    """The network a paradigm trains at ``depth`` with the benchmark's tokenizer and text shapes."""
    obj = make_objective(objective)
    tok = sz.continuous if obj.tokens == "continuous" else sz.discrete
    return obj.net_spec(ModelConfig(depth=depth, head_dim=sz.head_dim), tok, text_dim(sz.text), sz.text.max_len)


# ----------------------------------------------------------------------------- the plain baseline


def plain_stack(spec: NetSpec) -> nn.Sequential:
    """``depth`` stock pre-norm encoder layers of the spec's width, heads and MLP ratio (no dropout), with the
    backbone's MLP activation (tanh GELU; PyTorch's default "gelu" is the erf one, ~3x cheaper on some CPUs, which
    would make the comparison one of activations rather than of implementations)."""
    D = spec.width
    return nn.Sequential(*[nn.TransformerEncoderLayer(D, spec.heads, spec.mlp_ratio * D, dropout=0.0, activation=mlp_activation,
                                                      batch_first=True, norm_first=True) for _ in range(spec.depth)])


def plain_train_flops(spec: NetSpec) -> int:
    """Training FLOPs per example of :func:`plain_stack` on ``spec.seq_len`` tokens, flopmatch's conventions:
    2 per multiply-accumulate, matmuls only (qkv, scores, values, out, MLP), x3 for forward + backward
    (every matmul's input needs a gradient: the first LayerNorm's affine parameters make it so)."""
    L, D, r = spec.seq_len, spec.width, spec.mlp_ratio
    per_layer = 2 * L * D * 3 * D + 2 * (2 * L * L * D) + 2 * L * D * D + 2 * (2 * L * D * r * D)
    return 3 * spec.depth * per_layer


class PlainLoss:
    """The objective protocol's ``loss`` for the plain stack: mean squared output (fp32), no randomness."""

    def loss(self, net, x, text, generator=None, draws=None):
        return net(x).float().square().mean()


# ----------------------------------------------------------------------------- training


class TrainingBench(TrainingProbe):
    """:class:`flopmatch.probe.TrainingProbe` that also builds the plain baseline (``name`` = :data:`PLAIN`)."""

    def build(self, name: str, spec: NetSpec, batch: int, g: torch.Generator):
        if name != PLAIN:
            return super().build(name, spec, batch, g)
        x = torch.randn(batch, spec.seq_len, spec.width, generator=g)  # (B, L, D)
        return PlainLoss(), plain_stack(spec), x, plain_train_flops(spec)


# ----------------------------------------------------------------------------- timing


def error_text(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:500]


def interleaved(items: dict[str, Callable[[], object]], device: torch.device, rounds: int, round_s: float,
                log: Callable[[str], None]) -> tuple[dict[str, float], dict[str, str]]:
    """Best seconds per call of each item over ``rounds`` interleaved rounds (module docstring), and the errors
    of items whose warm-up raised (they are dropped: a failed torch.compile is reported, not fatal)."""
    calls, errors = {}, {}
    for key, fn in items.items():  # warm-up (compilation, allocation), then calls per round from a timed call
        try:
            fn()
            t = Clock(device)(fn)
        except Exception as e:  # any failure of one item (compile, out of memory) is reported, not raised
            errors[key] = error_text(e)
            log(f"{key}: failed ({errors[key]})")
            continue
        calls[key] = max(1, math.ceil(round_s / max(t, 1e-9))) if round_s else 1
    best = {key: math.inf for key in calls}
    keys = list(calls)
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[: r % len(keys)] if keys else []
        for key in order[::-1] if r % 2 else order:
            fn, n = items[key], calls[key]
            best[key] = min(best[key], Clock(device)(lambda: [fn() for _ in range(n)]) / n)
    return best, errors


# ----------------------------------------------------------------------------- the figures


def machine(device: torch.device, bf16: bool, malloc_tuned: bool) -> dict:
    """What the figures were measured on (``malloc_tuned``: :func:`flopmatch.allocator.tune_allocator` took effect)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
        except OSError:
            pass
    return {"device": str(device), "device_name": name, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "bf16": bf16, "python": platform.python_version(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "malloc_tuned": malloc_tuned}


def matmul_figures(device: torch.device, rounds: int, sz: Sizes, log) -> dict:
    """{"fp32"|"bf16": {n, flops_per_s}}: :func:`flopmatch.device.matmul_peak`'s size and rate, then the best of
    that and ``rounds`` interleaved rounds of 3 calls at that size."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    found = {k: matmul_peak(device, dt, sz.matmul_min_s, sz.matmul_max_n) for k, dt in dtypes.items()}
    best = {k: rate for k, (_, rate) in found.items()}
    for r in range(rounds):
        for k in list(dtypes)[:: -1 if r % 2 else 1]:
            n = found[k][0]
            best[k] = max(best[k], 2 * n**3 / min(matmul_times(device, dtypes[k], n)))
    log("matmul peak: " + ", ".join(f"{k} {best[k]:.3g} FLOP/s (n={found[k][0]})" for k in dtypes))
    if device.type == "cuda":  # the operands (up to 3 GiB) are not what the peak-memory figure is about
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return {k: {"n": found[k][0], "flops_per_s": best[k]} for k in dtypes}


def training(opts: BenchOptions, device: torch.device, bf16: bool, batch: int, peak: float, sz: Sizes, log) -> tuple[list, dict]:
    """Rows per depth and model (plain first), and compile errors by item key."""
    cfg, rows, errors = train_config(), [], {}
    for depth in opts.depths:
        benches = {}
        for compiled in (False, True) if opts.compile else (False,):
            for name in (PLAIN, *opts.objectives):
                spec = net_spec(opts.objectives[0] if name == PLAIN else name, depth, sz)  # plain: the same sizes
                key = f"{name}{' compiled' if compiled else ''} d{depth}"
                try:
                    benches[key] = TrainingBench(name, spec, batch, cfg, device, bf16, sz.text, compiled=compiled)
                except Exception as e:  # torch.compile may refuse at once rather than at the first call
                    if not compiled:
                        raise
                    errors[key] = error_text(e)
        log(f"training step, depth {depth}: {', '.join(benches)} (batch {batch}, {'bf16' if bf16 else 'fp32'})")
        best, errs = interleaved({k: b.step for k, b in benches.items()}, device, opts.rounds, sz.round_s, log)
        errors.update(errs)
        for key, b in benches.items():
            if key not in best:
                continue
            rate = b.batch * b.flops_per_example / best[key]
            row = {"model": b.name, "depth": depth, "compiled": b.compiled, "batch": b.batch,
                   "params": sum(p.numel() for p in b.net.parameters()), "flops_per_example": b.flops_per_example,
                   "examples_per_s": b.batch / best[key], "flops_per_s": rate, "mfu": rate / peak,
                   "loss": float(b.step().detach())}
            rows.append(row)
            log(f"  {key}: {row['examples_per_s']:.1f} examples/s, {rate:.3g} FLOP/s, MFU {row['mfu']:.1%}")
        del benches  # free this depth's networks and optimizer states before the next
    plain = {(r["depth"], r["compiled"]): r["flops_per_s"] for r in rows if r["model"] == PLAIN}
    eager = {(r["model"], r["depth"]): r["flops_per_s"] for r in rows if not r["compiled"]}
    for r in rows:  # ratios to rows of the same rounds: the plain stack (same depth and compilation), eager mode
        if r["model"] != PLAIN and (r["depth"], r["compiled"]) in plain:
            r["flops_per_s_vs_plain"] = r["flops_per_s"] / plain[r["depth"], r["compiled"]]
        if r["compiled"] and (r["model"], r["depth"]) in eager:
            r["speedup_vs_eager"] = r["flops_per_s"] / eager[r["model"], r["depth"]]
    return rows, errors


def sampling(opts: BenchOptions, device: torch.device, bf16: bool, sz: Sizes, log) -> tuple[list, list, dict]:
    """Images/s per depth and paradigm at default settings; autoregressive KV cache on vs off (and compiled with
    ``opts.compile``). Rows, KV-cache figures, and the compiled items that failed (by key; others raise)."""
    rows, kv, failed = [], [], {}
    B, default = sz.sample_batch, SampleConfig()
    for depth in opts.depths:
        items, meta = {}, {}
        for name in opts.objectives:
            probe = SamplingProbe(name, net_spec(name, depth, sz), B, device, bf16, sz.text)
            variants = [("", SampleConfig())]
            if name == "autoregressive":  # recompute, and with --compile the compiled cached decode step
                variants += [(" (no kv cache)", SampleConfig(kv_cache=False))] + ([(COMPILED_KV, SampleConfig(compile=True))] if opts.compile else [])
            for suffix, sample in variants:
                key = f"{name}{suffix} d{depth}"
                items[key] = lambda probe=probe, sample=sample: probe.run(sample)
                meta[key] = {"objective": name, "depth": depth, "batch": B, "steps": probe.objective.resolve_steps(sample, probe.spec),
                             "guidance": default.guidance, "flops_per_image": probe.flops_per_image(sample),
                             **({"kv_cache": sample.kv_cache, "compiled": sample.compile} if name == "autoregressive" else {})}
        log(f"sampling, depth {depth}: {', '.join(items)} (batch {B})")
        best, errors = interleaved(items, device, opts.rounds, sz.round_s, log)
        if any(COMPILED_KV not in key for key in errors):
            raise RuntimeError(f"sampling failed: {errors}")
        failed |= errors  # a failed torch.compile is reported, not fatal
        for key, m in meta.items():
            if key in errors:
                continue
            ips = B / best[key]
            rows.append({**m, "images_per_s": ips, "flops_per_s": ips * m["flops_per_image"]})
            log(f"  {key}: {ips:.1f} images/s")
        on, off, comp = (f"autoregressive{s} d{depth}" for s in ("", " (no kv cache)", COMPILED_KV))
        if on in best:
            kv.append({"depth": depth, "batch": B, "tokens": meta[on]["steps"], "images_per_s_with": B / best[on],
                       "images_per_s_without": B / best[off], "speedup": best[off] / best[on],
                       "flops_ratio": meta[off]["flops_per_image"] / meta[on]["flops_per_image"],
                       # against the same eager recompute: what compiling the cached step adds
                       **({"speedup_compiled": best[off] / best[comp]} if comp in best else {})})
    return rows, kv, failed


def text_encoding(rounds: int, sz: Sizes, device: torch.device, log) -> dict:
    """Captions/s of the text encoder on distinct ``shapes`` captions, on ``device`` (where training encodes its
    captions) in flopmatch's precision there."""
    try:
        enc = make_text_encoder(sz.text.kind, sz.text.max_len, sz.text.dim, device=device)
    except UserError as e:
        log(f"text encoder skipped: {e}")
        return {"skipped": str(e)}
    num_train = 20000 if sz.captions > 100 else 256
    captions = sorted(set(make_dataset(DataConfig(num_train=num_train), "train", progress=False).captions()))[: sz.captions]
    log(f"text encoder {enc.name}: {len(captions)} captions")
    best, _ = interleaved({"encode": lambda: enc.encode(captions)}, device, rounds, 0.0, log)
    out = {"name": enc.name, "device": str(device), "bf16": bool(getattr(enc, "bf16", False)), "captions": len(captions),
           "captions_per_s": len(captions) / best["encode"]}
    if enc.flops_per_caption():
        out["flops_per_caption"] = enc.flops_per_caption()
    log(f"  {out['captions_per_s']:.0f} captions/s")
    return out


def peak_memory(device: torch.device) -> dict:
    """The process's peak memory: CUDA allocations on a GPU, else the max resident set size."""
    if device.type == "cuda":
        return {"bytes": torch.cuda.max_memory_allocated(device), "kind": "torch.cuda.max_memory_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"bytes": rss if sys.platform == "darwin" else rss * 1024, "kind": "ru_maxrss (process, CPU)"}


def run_bench(opts: BenchOptions) -> dict:
    """Every figure of the module docstring, as one JSON-able dict."""
    if opts.rounds < 1 or not opts.depths or not opts.objectives or (opts.batch is not None and opts.batch < 1):
        raise UserError("bench needs rounds >= 1, at least one depth and objective, and batch >= 1")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    start = time.perf_counter()

    def log(msg: str) -> None:
        if opts.progress:
            print(f"bench [{time.perf_counter() - start:5.0f}s] {msg}", file=sys.stderr, flush=True)

    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {opts.device}: CUDA is not available here; use --device cpu (or auto)")
    device = resolve_device(opts.device)
    sz = sizes(opts.quick)
    batch = opts.batch or (4 if opts.quick else train_config().batch_size)
    bf16 = use_bf16("auto", device)  # train's decision for precision "auto" (the default)
    # As every flopmatch command sets it (idempotent); here too for a caller of this function.
    out = {"machine": machine(device, bf16, tune_allocator()),
           "settings": {"depths": opts.depths, "objectives": opts.objectives, "batch": batch, "rounds": opts.rounds,
                        "quick": opts.quick, "compile": opts.compile, "sample_batch": sz.sample_batch,
                        "text_len": sz.text.max_len, "text_dim": text_dim(sz.text), "grid": sz.discrete.grid,
                        "seq_len": sz.discrete.grid ** 2, "latent_channels": sz.continuous.channels,
                        "vocab_size": sz.discrete.vocab_size, "precision": "bf16" if bf16 else "fp32"}}
    if opts.quick:
        log("quick: tiny sizes check that every part runs; the rates, the matmul peak (at most n=128) and MFU are not "
            "measurements of this machine")
    out["matmul"] = matmul_figures(device, opts.rounds, sz, log)
    peak = out["matmul"]["bf16" if bf16 else "fp32"]["flops_per_s"]
    out["training"], errors = training(opts, device, bf16, batch, peak, sz, log)
    out["sampling"], out["kv_cache"], sample_errors = sampling(opts, device, bf16, sz, log)
    if errors or sample_errors:
        out["errors"] = errors | sample_errors  # items that failed (a torch.compile error, out of memory), by key
    out["text_encoder"] = text_encoding(opts.rounds, sz, device, log)
    out["memory"] = peak_memory(device)
    out["elapsed_s"] = time.perf_counter() - start
    return out


# ----------------------------------------------------------------------------- text output


def format_bench(r: dict) -> str:
    """The figures as a few aligned tables."""
    m, s = r["machine"], r["settings"]
    load = f", load average {m['load_average'][0]:.2f}" if m.get("load_average") else ""
    lines = [f"machine: {m['device']} ({m['device_name']}), {m['threads']} threads, torch {m['torch']}, "
             f"bf16 autocast {'on' if m['bf16'] else 'off'}{load}"
             + (", glibc malloc thresholds set (flopmatch.allocator)" if m.get("malloc_tuned") else ""),
             "matmul peak: " + ", ".join(f"{k} {v['flops_per_s']:.3g} FLOP/s (n={v['n']})" for k, v in r["matmul"].items()),
             *(["quick: tiny sizes that check every part runs; the rates, peak and MFU below are not measurements"]
               if s.get("quick") else []),
             "",
             f"training step (batch {s['batch']}, {s['precision']}, {s['seq_len']} tokens, text {s['text_len']}x{s['text_dim']}; "
             f"best of {s['rounds']} round{'s' if s['rounds'] != 1 else ''}; MFU vs the {s['precision']} matmul peak):",
             f"  {'depth':>5}  {'model':<34} {'examples/s':>10} {'FLOP/s':>9} {'MFU':>6} {'vs plain':>8}"]
    for t in r["training"]:
        name = t["model"] + (f" (compiled, {t['speedup_vs_eager']:.2f}x)" if "speedup_vs_eager" in t else " (compiled)" if t["compiled"] else "")
        vs = f"{t['flops_per_s_vs_plain']:.2f}x" if "flops_per_s_vs_plain" in t else ""
        lines.append(f"  {t['depth']:>5}  {name:<34} {t['examples_per_s']:>10.1f} {t['flops_per_s']:>9.3g} {t['mfu']:>6.1%} {vs:>8}")
    for key, err in r.get("errors", {}).items():
        lines.append(f"  {key}: {err}")
    lines += ["", f"sampling (batch {s['sample_batch']}, default steps, guidance {SampleConfig().guidance:g}; network and "
              f"sampler, no decode):", f"  {'depth':>5}  {'paradigm':<36} {'steps':>5} {'images/s':>9} {'FLOP/s':>9}"]
    for t in r["sampling"]:
        name = t["objective"] + ("" if t.get("kv_cache", True) else " (no kv cache)") + (COMPILED_KV if t.get("compiled") else "")
        lines.append(f"  {t['depth']:>5}  {name:<36} {t['steps']:>5} {t['images_per_s']:>9.1f} {t['flops_per_s']:>9.3g}")
    for k in r["kv_cache"]:
        comp = f"; compiled decode step {k['speedup_compiled']:.1f}x" if "speedup_compiled" in k else ""
        lines.append(f"  KV cache speed-up over recompute, depth {k['depth']} ({k['tokens']} tokens, batch {k['batch']}): "
                     f"{k['speedup']:.1f}x{comp} ({k['flops_ratio']:.1f}x fewer FLOPs)")
    te = r["text_encoder"]
    lines.append("")
    if "skipped" in te:
        lines.append(f"text encoder: skipped ({te['skipped']})")
    else:
        lines.append(f"text encoder {te['name']} ({te['device']}, {'bf16' if te['bf16'] else 'fp32'}): "
                     f"{te['captions_per_s']:.0f} captions/s ({te['captions']} distinct captions)")
    lines.append(f"peak memory: {r['memory']['bytes'] / 2**30:.2f} GiB ({r['memory']['kind']}); {r['elapsed_s']:.0f} s in all")
    return "\n".join(lines)
