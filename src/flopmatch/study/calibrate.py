"""Host calibration: time this machine on the study's own networks before estimating the study's wall time.

A preset's ``assumed_flops_per_s`` is one number for a whole class of machines, and the fixed costs in
:class:`flopmatch.study.estimate.Rates` were measured on one 2-core AMX CPU. On an H200 the gpu preset's estimate
assumed 5e13 FLOP/s and scaled the evaluation's network costs by the same 833x, while the measured training loop ran
at 3e12 and an evaluation of 1000 images took 15-25 s. (On a 2-core AVX2 CPU the cpu preset's assumed rates landed
near by luck: 19.6 min estimated, 21.5 measured with warm caches; calibrated: 24.8.) So before the estimate the
study measures, on the device its runs will use:

* per (paradigm, depth) of the plan: the FLOP/s of :func:`flopmatch.train.train_step` on the run's network,
  batch size and precision (:class:`flopmatch.probe.TrainingProbe`), and of the run's sampler at its main setting
  (:class:`flopmatch.probe.SamplingProbe`, guidance included);
* per feature extractor of the study: images/s at the dataset's resolution, which also scales the fixed costs
  that are network-bound (:func:`flopmatch.study.estimate.host_speed`);
* the metrics of one evaluated setting (FID and its bootstrap, KID, precision/recall on every extractor's features)
  at the study's image counts, on random features of the extractors' widths (:func:`metrics_seconds`): their cost
  is not proportional to anything above (FID's eigensolves grow with min(images, width), the bootstrap repeats them)
  and was 6 s per setting in the fixed-cost table where a 2-core AVX-512 CPU took 0.5;
* a report trend refit on synthetic data (:func:`refit_seconds`): the report's time is its bootstrap refits, scalar
  scipy work whose speed follows neither the accelerator nor the matmul units.

Cost: a few seconds on the cpu presets (one warm-up and up to two timed calls per item; on a CPU a slow first call
is its own measurement; plus ~3 s importing torchmetrics, which the study pays anyway), bounded elsewhere: each
network is timed at :data:`PROBE_BATCH` first and at its full batch only if that is predicted to take
<= :data:`FULL_BATCH_S` (the gpu preset planned on a 2-core CPU: 43 s), and the metrics' bootstrap with a few
replicates (:func:`metrics_seconds`; the gpu preset's 5000 images planned on that CPU: 58 s more, one setting's
metrics being ~140 s there).
Timings are of random-input steps, not the run's data pipeline, and of one sampling batch of the evaluation's size,
so they err slightly fast for training. A failed calibration is reported and the estimate falls back to the assumed
rate (:func:`calibrate_or_none`). Not done under ``--launcher slurm`` (the runs execute on other machines) or with
``--no-calibrate``: the preset's assumed rate is used there, as before.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import torch

from flopmatch.config import RunConfig, from_dict
from flopmatch.device import resolve_device, use_bf16
from flopmatch.evaluation.features import make_feature_extractor
from flopmatch.evaluation.run import EvalConfig, metrics_from_features
from flopmatch.evaluation.timing import BUSY_CORES, Clock, busy_probe, other_busy_cores
from flopmatch.objectives import make_objective
from flopmatch.probe import SamplingProbe, TrainingProbe
from flopmatch.report.bootstrap import bootstrap_fit
from flopmatch.study.operating import SWEEP_BOOT
from flopmatch.study.plan import RunPlan, planned_spec
from flopmatch.study.presets import StudyConfig

CPU_FEATURE_BATCH = 16  # images per timed feature-extraction call on a CPU (per-image cost barely depends on it)
FEATURE_BATCH = 64  # images per feature-extraction call on a GPU: extract_features' batch
PROBE_BATCH = 4  # every item is first timed at this batch; the full batch only if that predicts <= FULL_BATCH_S
FULL_BATCH_S = 2.0  # a preset sized for a GPU, planned on a laptop, keeps its small-batch rate (errs long)
MAX_TIMED = 2  # timed calls per item after the warm-up
BOOT_RESOLUTION_S = 0.1  # metrics_seconds times bootstraps of 2, 4, 8, ... replicates until they differ by this
ENOUGH_S = 0.25  # stop timing an item once its timed calls add up to this; on a CPU a first call this slow is the figure
# ... unless it took less than this: then its one-off costs (allocation, oneDNN primitives, a busy core) may be most
# of it, and one more call decides. Seen: a 64 px tiny-preset diffusion probe on a loaded 2-core CPU calibrated at
# 6.4e7 FLOP/s, ~60x below the ~4e9 its training then ran at. One more call costs at most this long; a model whose
# every call takes longer is timed by its first.
SECOND_CALL_S = 5.0


@dataclass
class HostRates:
    """What this host measured: FLOP/s per architecture ("diffusion-d1"), feature images/s per extractor, seconds of
    one setting's metrics per kind of evaluation (:func:`metrics_seconds`) and of the synthetic refit benchmark
    (:func:`refit_seconds`). Empty or None where not measured: the estimate then uses the reference constants."""

    device: str
    train_flops_per_s: dict[str, float] = field(default_factory=dict)
    sample_flops_per_s: dict[str, float] = field(default_factory=dict)
    feature_images_per_s: dict[str, float] = field(default_factory=dict)
    metrics_s: dict[str, float] = field(default_factory=dict)  # "main", "no_boot", "sweep": see metrics_seconds
    refit_bench_s: float | None = None  # refit_seconds()
    seconds: float = 0.0  # how long the calibration took

    def train_rate(self, p: RunPlan) -> float:
        """Training FLOP/s of a planned run's architecture."""
        return self.train_flops_per_s[arch(p.objective, p.depth)]

    def sample_rate(self, p: RunPlan) -> float:
        """Sampling FLOP/s of a planned run's architecture at its main setting."""
        return self.sample_flops_per_s[arch(p.objective, p.depth)]

    def to_dict(self) -> dict:
        return asdict(self)


def arch(objective: str, depth: int) -> str:
    """Key of an architecture in :class:`HostRates`, e.g. "masked-d2"."""
    return f"{objective}-d{depth}"


def seconds_per_call(fn, device: torch.device) -> float:
    """Seconds of one call of ``fn``: a warm-up (on CUDA never timed: it pays for kernel selection and allocation;
    on a CPU timed, and the figure when it took >= :data:`ENOUGH_S`, after one more call when it took less than
    :data:`SECOND_CALL_S`), then up to :data:`MAX_TIMED` timed calls until they add up to :data:`ENOUGH_S`; the
    fastest call."""
    clock = Clock(device)
    first = clock(fn)
    if device.type != "cuda" and first >= ENOUGH_S:
        return first if first >= SECOND_CALL_S else min(first, clock(fn))
    times: list[float] = []
    while len(times) < MAX_TIMED and sum(times) < ENOUGH_S:
        times.append(clock(fn))
    return min(times)


def calibrate_or_none(scfg: StudyConfig, plans: list[RunPlan], log=print) -> HostRates | None:
    """:func:`calibrate`, or None (the estimate then uses the preset's assumed rate) if it fails: the estimate is advice,
    and a missing evaluator package or an out-of-memory probe should be reported where it matters, not here."""
    try:
        return calibrate(scfg, plans, log)
    except Exception as e:  # any failure: the study or plan goes on with the uncalibrated estimate
        lines = str(e).strip().splitlines()
        log(f"[study] calibration failed ({type(e).__name__}: {lines[0] if lines else ''}); estimating with the "
            f"preset's assumed {scfg.assumed_flops_per_s:.3g} FLOP/s")
        return None


def calibrate(scfg: StudyConfig, plans: list[RunPlan], log=print) -> HostRates:
    """Time each (paradigm, depth) of ``plans`` and each of the study's feature extractors on the device the runs use."""
    t0 = time.perf_counter()
    first: dict[str, RunConfig] = {}
    for p in plans:
        first.setdefault(arch(p.objective, p.depth), from_dict(RunConfig, p.config))
    any_cfg = next(iter(first.values()), RunConfig())
    device = resolve_device(any_cfg.train.device)
    # The probes seed torch's global generators (as train does); the study process's own streams are left as they were.
    probe = busy_probe()
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        host = _measure(scfg, first, any_cfg, device)
    host.seconds = time.perf_counter() - t0
    load = other_busy_cores(probe)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log(f"[study] calibrated on {device} in {host.seconds:.1f}s: training "
        + ", ".join(f"{k} {v:.3g}" for k, v in host.train_flops_per_s.items()) + " FLOP/s; features "
        + ", ".join(f"{k} {v:.0f}" for k, v in host.feature_images_per_s.items()) + " images/s; metrics "
        + f"{host.metrics_s['main']:.2f}s per setting")
    if device.type == "cpu" and load is not None and load > BUSY_CORES:
        # Threads that share their cores with another busy process wait on each other at every op (seen: 10-70x
        # slower steps on a 2-core machine running two studies): this estimate, and the study, measure that state.
        log(f"[study] warning: other processes kept {load:.1f} of {os.cpu_count()} cores busy while calibrating; the "
            "estimate (and the study, while they run) can be many times slower than on a quiet machine")
    return host


def _measure(scfg: StudyConfig, first: dict[str, RunConfig], any_cfg: RunConfig, device: torch.device) -> HostRates:
    """The timings of :func:`calibrate`: ``first`` maps each architecture to the config of its first planned run."""
    host = HostRates(device=str(device))
    for key, cfg in first.items():
        spec = planned_spec(cfg, scfg)
        bf16 = use_bf16(cfg.train.precision, device)

        def train_rate(batch: int, cfg=cfg, spec=spec, bf16=bf16) -> float:
            probe = TrainingProbe(cfg.objective, spec, batch, cfg.train, device, bf16, cfg.text)
            return batch * probe.flops_per_example / seconds_per_call(probe.step, device)

        def sample_rate(batch: int, cfg=cfg, spec=spec, bf16=bf16) -> float:
            sampler = SamplingProbe(cfg.objective, spec, batch, device, bf16, cfg.text)
            return batch * sampler.flops_per_image(cfg.sample) / seconds_per_call(lambda: sampler.run(cfg.sample), device)

        host.train_flops_per_s[key] = at_full_batch(train_rate, cfg.train.batch_size, spec_flops(cfg, spec, "train"))
        # the evaluation's batch: decoding at small batches is overhead-bound (next-token at batch 16 ran 2.5x slower
        # per image than at 100 on a 2-core CPU), so a smaller probe would overstate evaluation time
        host.sample_flops_per_s[key] = at_full_batch(sample_rate, EvalConfig().batch_size, spec_flops(cfg, spec, "sample"))
    size = any_cfg.data.image_size
    batch = FEATURE_BATCH if device.type == "cuda" else CPU_FEATURE_BATCH
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    widths = []
    for name in scfg.features:
        extractor = make_feature_extractor(name, device)
        host.feature_images_per_s[name] = batch / seconds_per_call(lambda e=extractor: e(images), device)
        widths.append(extractor(images[:1]).shape[1])
        del extractor
    host.metrics_s = metrics_seconds(scfg, any_cfg.data.num_eval, widths, device)
    host.refit_bench_s = refit_seconds()
    return host


def metrics_seconds(scfg: StudyConfig, num_real: int, widths: list[int], device: torch.device) -> dict[str, float]:
    """Seconds of one evaluated setting's metrics (:func:`flopmatch.evaluation.run.metrics_from_features` on each
    extractor's features, ``widths`` their dimensions, against ``num_real`` reference rows), by kind of evaluation:
    "main" (``eval_samples`` images, the evaluation's FID/KID bootstrap), "no_boot" (the same without it: the raw and
    post-hoc EMA evaluations) and "sweep" (``sweep_samples`` images, the operating-point sweep's short bootstrap).

    Random features: the cost depends on the shapes only. The bootstrap is timed with a few replicates and extended
    linearly to the real count (each replicate costs the same): at thousands of images and width 2048 one replicate
    takes seconds on a CPU, 200 of them minutes, which the calibration must not spend. A tiny warm-up call first pays
    the one-off import of torchmetrics (KID), which the study pays once as well."""
    gen = torch.Generator().manual_seed(0)
    metrics_from_features(torch.randn(8, 4, generator=gen), torch.randn(8, 4, generator=gen), EvalConfig(num_samples=8, fid_boot=2))
    real = [torch.randn(num_real, w, generator=gen) for w in widths]

    clock = Clock(device)

    def timed(n: int, boot: int) -> float:  # one call: the warm-up above paid the one-off costs
        fake = [torch.randn(n, w, generator=gen) for w in widths]
        ecfg = EvalConfig(num_samples=n, fid_boot=boot)
        return clock(lambda: [metrics_from_features(r, f, ecfg, device) for r, f in zip(real, fake)])

    def with_boot(n: int, boot: int, plain: float) -> float:
        # A bootstrap has a fixed part (KID's kernel matrices, computed once) and a cost per replicate: timed at 2
        # replicates and at 4, 8, ... until the difference is BOOT_RESOLUTION_S or more, then extended linearly.
        if boot <= 2:
            return timed(n, boot) if boot else plain
        low, k = timed(n, 2), 4
        while True:
            high = timed(n, min(k, boot))
            if k >= boot:
                return high
            if high - low >= BOOT_RESOLUTION_S or 2 * k > boot:
                return high + max(high - low, 0.0) / (k - 2) * (boot - k)
            k *= 2

    main_plain = timed(scfg.eval_samples, 0)
    sweep_plain = timed(scfg.sweep_samples, 0)
    return {"main": with_boot(scfg.eval_samples, EvalConfig().fid_boot, main_plain), "no_boot": main_plain,
            "sweep": with_boot(scfg.sweep_samples, SWEEP_BOOT, sweep_plain)}


def refit_seconds(n_boot: int = 50) -> float:
    """Seconds of :func:`flopmatch.report.bootstrap.bootstrap_fit` with ``n_boot`` resamples of a synthetic saturating
    trend (5 budgets over 1.5 decades, 3 seeds, 3 % noise; seeded): a speed gauge of the report's scalar scipy work.
    Real studies' refits cost more each (noisier data falls back to more starts), so the estimate uses the ratio of
    this figure to the reference machine's, not the figure itself."""
    gen = torch.Generator().manual_seed(0)
    budgets = torch.logspace(11, 12.5, 5, dtype=torch.float64)
    noise = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    records = [{"budget": float(c), "depth": 1, "seed": s, "value": float((0.3 + 2.0 * (c / 1e11) ** -0.4) * torch.exp(0.03 * noise[i, s]))}
               for i, c in enumerate(budgets) for s in range(3)]
    return seconds_per_call(lambda: bootstrap_fit(records, n_boot=n_boot, seed=0), torch.device("cpu"))


def spec_flops(cfg: RunConfig, spec, what: str) -> int:
    """Analytic FLOPs of one training example or one sampled image (main setting) of a planned run."""
    objective = make_objective(cfg.objective)
    return objective.train_flops(spec) if what == "train" else objective.sample_flops(spec, cfg.sample)


def at_full_batch(rate_at, batch: int, flops_per_item: int) -> float:
    """FLOP/s at ``batch`` items, measured there only when a :data:`PROBE_BATCH` call predicts the full-batch call takes
    <= :data:`FULL_BATCH_S` (FLOPs scale with the batch); else the small batch's rate, which errs slow. ``rate_at``:
    batch -> measured FLOP/s."""
    if batch <= PROBE_BATCH:
        return rate_at(batch)
    small = rate_at(PROBE_BATCH)
    return rate_at(batch) if batch * flops_per_item / small <= FULL_BATCH_S else small
