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
  that are network-bound (:func:`flopmatch.study.estimate.host_speed`).

Cost: a few seconds on the cpu presets (one warm-up and up to two timed calls per item; on a CPU a slow first call
is its own measurement), bounded elsewhere: each item is timed at :data:`PROBE_BATCH` first and at its full batch
only if that is predicted to take <= :data:`FULL_BATCH_S` (the gpu preset planned on a 2-core CPU: 43 s).
Timings are of random-input steps, not the run's data pipeline, and of one sampling batch of the evaluation's size,
so they err slightly fast for training. A failed calibration is reported and the estimate falls back to the assumed
rate (:func:`calibrate_or_none`). Not done under ``--launcher slurm`` (the runs execute on other machines) or with
``--no-calibrate``: the preset's assumed rate is used there, as before.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from flopmatch.config import RunConfig, from_dict
from flopmatch.device import resolve_device, use_bf16
from flopmatch.evaluation.features import make_feature_extractor
from flopmatch.evaluation.run import EvalConfig
from flopmatch.evaluation.timing import Clock
from flopmatch.objectives import make_objective
from flopmatch.probe import SamplingProbe, TrainingProbe
from flopmatch.study.plan import RunPlan, planned_spec
from flopmatch.study.presets import StudyConfig

CPU_FEATURE_BATCH = 16  # images per timed feature-extraction call on a CPU (per-image cost barely depends on it)
FEATURE_BATCH = 64  # images per feature-extraction call on a GPU: extract_features' batch
PROBE_BATCH = 4  # every item is first timed at this batch; the full batch only if that predicts <= FULL_BATCH_S
FULL_BATCH_S = 2.0  # a preset sized for a GPU, planned on a laptop, keeps its small-batch rate (errs long)
MAX_TIMED = 2  # timed calls per item after the warm-up
ENOUGH_S = 0.25  # stop timing an item once its timed calls add up to this; on a CPU a first call this slow is the figure


@dataclass
class HostRates:
    """What this host measured: FLOP/s per architecture ("diffusion-d1") and feature images/s per extractor."""

    device: str
    train_flops_per_s: dict[str, float] = field(default_factory=dict)
    sample_flops_per_s: dict[str, float] = field(default_factory=dict)
    feature_images_per_s: dict[str, float] = field(default_factory=dict)
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
    on a CPU timed, and the figure when it took >= :data:`ENOUGH_S`), then up to :data:`MAX_TIMED` timed calls
    until they add up to :data:`ENOUGH_S`; the fastest call."""
    clock = Clock(device)
    first = clock(fn)
    if device.type != "cuda" and first >= ENOUGH_S:
        return first
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
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        host = _measure(scfg, first, any_cfg, device)
    host.seconds = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log(f"[study] calibrated on {device} in {host.seconds:.1f}s: training "
        + ", ".join(f"{k} {v:.3g}" for k, v in host.train_flops_per_s.items()) + " FLOP/s; features "
        + ", ".join(f"{k} {v:.0f}" for k, v in host.feature_images_per_s.items()) + " images/s")
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
    for name in scfg.features:
        extractor = make_feature_extractor(name, device)
        host.feature_images_per_s[name] = batch / seconds_per_call(lambda e=extractor: e(images), device)
        del extractor
    return host


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
