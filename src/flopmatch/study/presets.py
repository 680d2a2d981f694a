"""Named study configurations, as plain functions of nothing (``STUDY_PRESETS[name]()``).

A study is a grid of paradigm x depth x training budget x seed on shared settings. The presets
are sized for the machine they name; see each function's docstring for what it costs here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from flopmatch import PARADIGMS
from flopmatch.config import current_path
from flopmatch.errors import UserError

# Every preset holds these out of its runs' training data (data.holdout, data.holdout_relations; see
# flopmatch.data.shapes), so prompt following is measured on prompts the models never trained on as well
# as on seen ones, and the report gives both: about 23 % of the evaluation prompts are held-out (57 of the
# cpu preset's 250). The study's tokenizers and the attribute classifier still see such images: the
# question is whether a generator composes what a caption asks for, which a tokenizer that could not
# reconstruct the held-out images would confound with its own ceiling. (Plain strings here: the CLI parser
# reads this module and must not import the data code, which pulls in torch.)
#
# 5 of the 40 colour+shape combos (12.5 %), a Latin square: each shape once, each with another colour, so
# every held-out colour is still seen with 4 shapes and every held-out shape with 7 colours. A model that
# learned colour and shape as separate attributes can compose the pair; one that memorised combos cannot.
# None is in the README's example prompt ("green triangle", "red circle").
# The post-hoc EMA lengths (sigma_rel) the presets sweep: 0.05 and 0.10 are the averages training keeps (rebuilt
# exactly), 0.2 a long one (rebuilt from the default 16 snapshots with a 2 % profile residual). Shorter ones need
# denser snapshots (residual 4 % at 0.03, 12 % at 0.02, 36 % at 0.01): the gpu preset adds 0.03 only.
EMA_SWEEP: tuple[float, ...] = (0.05, 0.1, 0.2)
HOLDOUT_COMBOS: tuple[str, ...] = ("red square", "green diamond", "blue triangle", "yellow cross", "purple circle")
# 5 of the 50 canonical shape arrangements (10 %; left-to-right or top-to-bottom order, any colours): 3
# vertical, 2 horizontal, each shape once first and once second, so every shape is still seen in both
# slots and on both axes, and each held-out pair is still seen in the mirrored order and on the other
# axis. Generalising to them needs the relation bound to the right objects, not a memorised layout.
HOLDOUT_RELATIONS: tuple[str, ...] = ("circle above square", "triangle above diamond", "cross above circle",
                                      "square to the left of triangle", "diamond to the left of cross")
# SampleConfig's fields, as plain strings (see above: no torch here); tests/test_operating.py checks they match
SAMPLE_FIELDS = ("steps", "guidance", "temperature", "top_k", "choice_temperature", "solver", "shift", "kv_cache", "compile")
# Training seeds each base seed owns: base seed b trains seeds b * SEED_STRIDE, b * SEED_STRIDE + 1, ..., so studies
# with different base seeds share no run, and a study can grow its seeds without moving its first one (it used to
# start at base_seed * (seeds + floor_seeds), which moved when seeds grew, so growing seeds was refused).
SEED_STRIDE = 1000
HOLDOUT_OVERRIDES = [f"data.holdout={', '.join(HOLDOUT_COMBOS)}",
                     f"data.holdout_relations={', '.join(HOLDOUT_RELATIONS)}"]


@dataclass
class StudyConfig:
    """Everything a study needs; written to ``<study>/study.json``."""

    preset: str = "cpu"
    objectives: list[str] = field(default_factory=lambda: list(PARADIGMS))
    depths: list[int] = field(default_factory=lambda: [1, 2])
    budgets: list[float] = field(default_factory=lambda: [1e12, 2e12, 4e12])
    seeds: int = 1  # training seeds of every grid cell
    base_seed: int = 0  # another base repeats the study with new seeds (first seed base_seed * SEED_STRIDE)
    # the first training seed when it is not base_seed * SEED_STRIDE: pinned (by grow.reconcile) for studies made when
    # the first seed was base_seed * (seeds + floor_seeds), so they still grow; -1 = base_seed * SEED_STRIDE
    first_seed: int = -1
    # extra seeds at the middle budget (every paradigm and depth): they measure the seed variance that the
    # report's tests use for every cell (pooled on a log scale), so one-seed cells elsewhere still get verdicts
    floor_seeds: int = 0
    floor_budget: float = 0.0  # the budget that has the floor seeds; 0 = the middle one (a grown study keeps its own)
    overrides: list[str] = field(default_factory=list)  # --set section.key=value applied to every run
    tokenizer: str = "learned"  # learned (matched KL + LFQ autoencoders) | weight-free (patch + k-means)
    tokenizer_preset: str = "cpu"
    tokenizer_overrides: list[str] = field(default_factory=list)  # key=value for the autoencoder config
    # Tokenizer matching (flopmatch.study.tokenizer_match): after both learned tokenizers trained at the configured
    # steps, the one with the lower validation PSNR is retrained from scratch with 2x, 4x, ... the steps until the
    # two are within tokenizer_match dB, or its schedule would exceed tokenizer_match_max x the configured steps;
    # 0 = off (the two match in architecture and steps only). Matched on PSNR because per-pixel reconstruction is
    # what both autoencoders optimise and it is cheap to measure; the report still shows every ceiling (rFID,
    # prompt following on reconstructions), so a reader sees whether matched PSNR meant matched everything else.
    # A no-op with weight-free tokenizers or when the paradigms use one token type only.
    tokenizer_match: float = 0.0  # PSNR tolerance, dB
    tokenizer_match_max: int = 4  # the weaker tokenizer's longest schedule, as a multiple of its configured steps
    eval_samples: int = 500
    eval_guidance: float = 3.0  # classifier-free guidance scale of every run's main setting
    # extra sampling-step settings per paradigm for the inference sweep, evaluated on the runs at the largest
    # budget (where the report's quality-vs-cost fronts are drawn); every run's default setting is always evaluated
    eval_steps: dict[str, list[int]] = field(default_factory=lambda: {"diffusion": [10], "masked": [6], "autoregressive": []})
    # The operating-point sweep (flopmatch.evaluation.operating): at the largest budget, each (paradigm, depth)'s lowest
    # seed is also evaluated at every guidance in sweep_guidance x every step count (the main one and eval_steps) x every
    # sampler variant in eval_variants, on sweep_samples images of their own seed; the chosen points (the KID-vs-sampling-
    # FLOPs front and the best prompt-following point) are then evaluated on the full eval_samples set and timed. With a
    # sweep, eval_steps are swept, not evaluated in full by themselves. Empty: no sweep (the main setting and eval_steps).
    sweep_guidance: list[float] = field(default_factory=list)
    sweep_samples: int = 100
    # extra sampler settings swept per paradigm (SampleConfig fields), e.g. {"diffusion": [{"solver": "heun", "steps": 10}]}
    eval_variants: dict[str, list[dict]] = field(default_factory=dict)
    features: list[str] = field(default_factory=lambda: ["effnet"])
    eval_raw: bool = False  # also evaluate each run's main setting with raw (non-EMA) weights: the paper's EMA finding
    # post-hoc EMA sweep (EDM2, flopmatch.ema): the runs at the floor budget (every seed of every paradigm and depth)
    # also evaluate their main setting with raw weights and with the power-function EMA of each of these relative
    # lengths, rebuilt from their snapshots; the report's EMA section pairs them by run
    eval_ema: list[float] = field(default_factory=list)
    timing_budget_s: float = 10.0  # per setting, the best-batch search of the timing phase
    timing_rounds: int = 5  # interleaved rounds of the timing phase (every paradigm timed together)
    n_boot: int = 1000
    assumed_flops_per_s: float = 6e10  # the plan's per-run est. time; the wall-time estimate when not calibrated

    # settings of the timing phase and the report only: changing them does not make another study
    NOT_IDENTITY = ("timing_rounds", "timing_budget_s", "n_boot")

    def validate(self) -> "StudyConfig":
        bad = [o for o in self.objectives if o not in PARADIGMS]
        if bad or not self.objectives:
            raise UserError(f"unknown objective(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(PARADIGMS)}")
        if not self.depths or min(self.depths) < 1:
            raise UserError(f"depths must be positive integers, got {self.depths}")
        if not self.budgets or min(self.budgets) <= 0:
            raise UserError(f"budgets must be positive FLOP counts, got {self.budgets}")
        if self.seeds < 1:
            raise UserError(f"seeds must be >= 1, got {self.seeds}")
        if self.floor_seeds < 0 or self.base_seed < 0:
            raise UserError(f"floor_seeds and base_seed must be >= 0, got {self.floor_seeds} and {self.base_seed}")
        if self.seeds + self.floor_seeds > SEED_STRIDE:
            raise UserError(f"seeds + floor_seeds must be <= {SEED_STRIDE} (each base seed owns {SEED_STRIDE} training "
                            f"seeds), got {self.seeds + self.floor_seeds}")
        if self.floor_budget and self.floor_budget not in self.budgets:
            raise UserError(f"floor_budget {self.floor_budget:g} is not one of the budgets {self.budgets}")
        if self.tokenizer not in ("learned", "weight-free"):
            raise UserError(f"tokenizer must be learned or weight-free, got {self.tokenizer!r}")
        if not (math.isfinite(self.tokenizer_match) and self.tokenizer_match >= 0):
            raise UserError(f"tokenizer_match is a PSNR tolerance in dB (>= 0; 0 = off), got {self.tokenizer_match}")
        if self.tokenizer_match_max < 1:
            raise UserError(f"tokenizer_match_max is a multiple of the tokenizers' configured steps (>= 1), "
                            f"got {self.tokenizer_match_max}")
        if self.timing_rounds < 3:
            raise UserError(f"timing_rounds must be >= 3 (the report compares timings across rounds), got {self.timing_rounds}")
        if any(not 0 < x <= 0.3 for x in self.eval_ema):
            raise UserError(f"eval_ema: each sigma_rel must be in (0, 0.3], got {self.eval_ema}")
        if self.eval_samples < 10:
            raise UserError(f"eval_samples must be >= 10, got {self.eval_samples}")
        if any(not g >= 1 for g in self.sweep_guidance):
            raise UserError(f"sweep_guidance: each guidance scale must be >= 1 (1 = no guidance), got {self.sweep_guidance}")
        if self.sweep_samples < 10:
            raise UserError(f"sweep_samples must be >= 10, got {self.sweep_samples}")
        if "effnet" not in self.features:
            raise UserError(f"features must include effnet (the verdicts' KID is on its features), got {self.features}")
        unknown = [k for k in self.eval_variants if k not in PARADIGMS]
        if unknown:
            raise UserError(f"eval_variants: unknown paradigm(s) {', '.join(unknown)}; choose from {', '.join(PARADIGMS)}")
        bad = [k for vs in self.eval_variants.values() for v in vs for k in v if k not in SAMPLE_FIELDS]
        if bad:
            raise UserError(f"eval_variants: unknown sampler setting(s) {', '.join(sorted(set(bad)))}; "
                            f"choose from {', '.join(SAMPLE_FIELDS)}")
        return self


# run-config keys each grid cell sets itself (study.plan.base_config), and the study option that sets them
GRID_KEYS = {"objective.name": "--objectives", "model.depth": "--depths", "train.budget": "--budgets",
             "train.seed": "--seeds and --base-seed", "sample.guidance": "--eval-guidance"}


def check_grid_overrides(overrides: list[str]) -> None:
    """A UserError for a ``--set`` of a key the grid sets per run: it would be overwritten silently. Checked on the
    command's own --set only: a study saved by an earlier version with such a key (then ignored) still resumes."""
    for override in overrides:
        key = current_path(override.partition("=")[0].strip())
        if key in GRID_KEYS:
            raise UserError(f"--set {key} is set per run by the study; use {GRID_KEYS[key]} instead")


def cpu() -> StudyConfig:
    """Default: a 2-core CPU in about 7 minutes from an empty cache where matmuls run in bf16 (a 2-core EPYC with
    AVX-512 bf16), about 21-27 minutes on a 2-core AVX2-only one (README, "Two commands", has the measurements;
    `flopmatch study --plan-only` estimates it for this machine).

    Sized for what it can decide: one model size (depth 1, so no size is picked on the numbers it is
    judged by), 5 budgets over 1.55 decades (7e10 to 2.5e12 FLOPs: enough for a fitted law), one seed
    per budget plus 2 extra seeds at the middle budget for every paradigm, which measure the seed
    variance (6 degrees of freedom) the report's tests apply to every cell; 7 timing rounds. 21 runs,
    1.5e13 training FLOPs. Small batches buy more updates per FLOP at these budgets.

    How the time divides, measured with an earlier version on a 2-core AMX host (empty cache; with held-out
    prompts, the tokenizer-ceiling stage, the post-hoc EMA sweep at 0.05 and 0.2 on the 9 middle-budget runs and
    the operating-point sweep at 2.5e12): 14.1 and 15.0 min in two runs (the second with light other work on the
    machine), of which tokenizer phase 2.5-2.6 min, runs 10.0-10.7 min (the operating-point sweep ~0.6 min of
    it, the EMA sweep ~1.1 min), timing phase 64-73 s (10 settings), report 30 s. A slower machine can save
    time with --sweep-samples 64 or --eval-ema 0.2. What it can decide, measured on an earlier cpu-preset
    study: seed sd 3.9 % of FID and 0.8 % of the prompt error (6 df); an FID comparison at one budget detects
    ~40 % differences, a prompt-error average over budgets ~3 %; timing orders with >= ~1.4x gaps (7
    rounds). So it separates inference costs and large quality gaps, but gives "no difference detected"
    for the FID orders of these tiny, short-trained models; `cpu-long` (3 seeds per cell) has more power.

    Tokenizer matching is off (tokenizer_match 0): the two tokenizers match in architecture and steps, not quality
    (measured: KL about 31.0 dB PSNR, LFQ about 28.1 dB at 600 steps, as in the README; the report states the gap).
    `--tokenizer-match 0.5` matches them; measured on a 2-core AVX2 CPU: the LFQ retrained once, at 1200 steps, reached 30.07 dB validation PSNR
    against the KL's 30.14 dB (its ceilings then 31.05 vs 30.98 dB PSNR, rFID 261 vs 273, prompt full match on
    reconstructions 0.87 vs 0.82), 3.5 min more there.
    """
    return StudyConfig(
        preset="cpu",
        depths=[1],
        budgets=[7e10, 1.7e11, 4.2e11, 1e12, 2.5e12],
        floor_seeds=2,
        overrides=["data.num_train=10000", "data.num_eval=1000", "train.batch_size=32", "train.lr=2e-3",
                   *HOLDOUT_OVERRIDES],
        tokenizer_overrides=["steps=600"],
        eval_samples=250,
        sweep_guidance=[1.0, 2.0, 3.0, 5.0],
        sweep_samples=100,
        eval_ema=[0.05, 0.2],  # the ends of EMA_SWEEP (training's EMA sits near 0.09 at these lengths): ~1.5 min
        timing_budget_s=2.0,
        timing_rounds=7,  # CPU batch-1 latencies vary 20-70 % between rounds here: more rounds, not longer ones
        n_boot=100,  # fit bands only (verdicts are t-tests); 1000 resamples cost minutes here
    )


def cpu_long() -> StudyConfig:
    """About an hour on a 2-core CPU (measured with an earlier version, empty cache, `flopmatch study --preset cpu-long`: 67.5 min,
    of which tokenizer phase 8.7 min, runs 57.8 min, timing 44 s, report 17 s; the plan estimated 60.6 min): depth 1,
    5 budgets over 1.8 decades (1e11 to 6.3e12), 3 seeds in every cell (seed variance per cell, 30
    degrees of freedom pooled), 500 samples per evaluation, raw weights too for the EMA analysis, and
    longer-trained tokenizers. One model size: a compute-optimal frontier needs >= 4 sizes per budget,
    which does not fit in an hour here.

    Tokenizers matched on PSNR within 0.5 dB (tokenizer_match): the weaker one (the LFQ, ~4 dB below the KL at these
    lengths) is retrained for 2400 and, if still short, 4800 steps: ~4-13 min more than the measurement above (not
    measured with it yet; the plan's estimate counts one retraining).
    """
    return StudyConfig(
        preset="cpu-long",
        depths=[1],
        budgets=[1e11, 2.8e11, 7.9e11, 2.2e12, 6.3e12],
        seeds=3,
        overrides=["data.num_train=20000", "data.num_eval=1000", "train.batch_size=32", "train.lr=2e-3",
                   *HOLDOUT_OVERRIDES],
        tokenizer_overrides=["steps=1200"],
        tokenizer_match=0.5,
        eval_samples=500,
        sweep_guidance=[1.0, 1.5, 2.0, 3.0, 5.0],
        sweep_samples=200,
        eval_variants={"diffusion": [{"solver": "heun", "steps": 10}]},
        eval_raw=True,
        eval_ema=list(EMA_SWEEP),
        timing_budget_s=3.0,
        n_boot=300,
    )


def gpu() -> StudyConfig:
    """One GPU: 4 depths 2-8 (width 128-512) so the best size per budget is a compute-optimal frontier (chosen on
    seed 0, judged on seeds 1-2), 5 budgets over 2 decades (1e15-1e17) for fitted laws, 3 seeds, Inception FID too;
    tokenizers matched on PSNR within 0.5 dB.

    Not run end to end. The plan estimates ~31 h at assumed_flops_per_s = 5e13, which is optimistic: measured on an
    H200 with an earlier version and torch 2.11 (`flopmatch bench --device cuda --batch 256`), the training step reached 4.3-4.7e13 FLOP/s at
    depth 6 but ~3e12 FLOP/s at depth 2 inside a study (launch-bound small networks), and a reduced study's
    evaluations took ~15-20 s per 1000 images (feature extraction then ran on the CPU; fixed since). A study now
    times each planned network, sampler and feature extractor on its GPU before estimating (study/calibrate.py),
    so `flopmatch study --preset gpu --plan-only` on the target machine gives that machine's figure; it has not
    been run on a GPU yet. assumed_flops_per_s makes the wall-time estimate only with --no-calibrate or under SLURM;
    the plan table's per-run "est. time" and plan.json's est_seconds are always at it (study/plan.py)."""
    return StudyConfig(
        preset="gpu",
        depths=[2, 4, 6, 8],
        budgets=[1e15, 3e15, 1e16, 3e16, 1e17],
        seeds=3,
        # data.num_eval = 2 x eval_samples: FID compares the n samples with the first n eval images, and the tokenizer
        # ceilings' real-image floor needs n more, disjoint from them (flopmatch.evaluation.ceilings); rendering and
        # extracting features of 5000 more real images once is cheap beside sampling 5000 images per setting
        overrides=["data.num_train=100000", "data.num_eval=10000", "train.batch_size=256", "train.lr=1e-3",
                   *HOLDOUT_OVERRIDES],
        tokenizer_preset="gpu",
        tokenizer_match=0.5,
        eval_samples=5000,
        eval_steps={"diffusion": [10, 50], "masked": [6, 24], "autoregressive": []},
        sweep_guidance=[1.0, 1.5, 2.0, 3.0, 5.0],
        sweep_samples=1000,
        eval_variants={"diffusion": [{"solver": "heun", "steps": 10}, {"solver": "heun", "steps": 25}],
                       "autoregressive": [{"top_k": 100}]},
        features=["effnet", "inception"],
        eval_raw=True,
        eval_ema=[0.03, *EMA_SWEEP],
        assumed_flops_per_s=5e13,
    )


def tiny() -> StudyConfig:
    """For tests and smoke checks: seconds on a CPU; results are not meaningful. Weight-free tokenizers (so
    tokenizer matching, which applies to learned ones, is a no-op)."""
    return StudyConfig(
        preset="tiny",
        depths=[1],
        budgets=[2e9, 4e9, 8e9],
        overrides=["data.num_train=256", "data.num_eval=64", "train.batch_size=16", "text.kind=hash",
                   "model.head_dim=16", "train.precision=fp32", "train.log_every=5",
                   *HOLDOUT_OVERRIDES],  # the same holdout, so the smoke study exercises the held-out report (4 of 32 prompts)
        tokenizer="weight-free",
        eval_samples=32,
        sweep_guidance=[1.0, 3.0],
        sweep_samples=16,
        eval_ema=[0.1],
        eval_steps={"diffusion": [2], "masked": [2], "autoregressive": []},
        timing_budget_s=0.3,
        timing_rounds=3,
        n_boot=50,
    )


STUDY_PRESETS = {"cpu": cpu, "cpu-long": cpu_long, "gpu": gpu, "tiny": tiny}


def study_preset(name: str) -> StudyConfig:
    """The named study preset."""
    if name not in STUDY_PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(STUDY_PRESETS)}")
    return STUDY_PRESETS[name]()
