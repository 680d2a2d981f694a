"""Named study configurations, as plain functions of nothing (``STUDY_PRESETS[name]()``).

A study is a grid of paradigm x depth x training budget x seed on shared settings. The presets
are sized for the machine they name; see each function's docstring for what it costs here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flopmatch import PARADIGMS
from flopmatch.errors import UserError


@dataclass
class StudyConfig:
    """Everything a study needs; written to ``<study>/study.json``."""

    preset: str = "cpu"
    objectives: list[str] = field(default_factory=lambda: list(PARADIGMS))
    depths: list[int] = field(default_factory=lambda: [1, 2])
    budgets: list[float] = field(default_factory=lambda: [1e12, 2e12, 4e12])
    seeds: int = 1
    overrides: list[str] = field(default_factory=list)  # --set section.key=value applied to every run
    tokenizer: str = "learned"  # learned (matched KL + LFQ autoencoders) | weight-free (patch + k-means)
    tokenizer_preset: str = "cpu"
    tokenizer_overrides: list[str] = field(default_factory=list)  # key=value for the autoencoder config
    eval_samples: int = 500
    eval_guidance: float = 3.0  # classifier-free guidance scale of every run's main setting
    # extra sampling-step settings per paradigm for the inference sweep (the run's default is always evaluated)
    eval_steps: dict[str, list[int]] = field(default_factory=lambda: {"diffusion": [10], "masked": [6], "autoregressive": []})
    features: list[str] = field(default_factory=lambda: ["effnet"])
    eval_raw: bool = False  # also evaluate each run's main setting with raw (non-EMA) weights: the paper's EMA finding
    timing_budget_s: float = 10.0  # per setting, the best-batch search of the timing phase
    timing_rounds: int = 5  # interleaved rounds of the timing phase (every paradigm timed together)
    n_boot: int = 1000
    assumed_flops_per_s: float = 6e10  # for time estimates before any run has been measured

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
        if self.tokenizer not in ("learned", "weight-free"):
            raise UserError(f"tokenizer must be learned or weight-free, got {self.tokenizer!r}")
        if self.timing_rounds < 3:
            raise UserError(f"timing_rounds must be >= 3 (the report compares timings across rounds), got {self.timing_rounds}")
        if self.eval_samples < 10:
            raise UserError(f"eval_samples must be >= 10, got {self.eval_samples}")
        return self


def cpu() -> StudyConfig:
    """Default: a 2-core CPU in 13 to 20 minutes from an empty cache (3 paradigms x 2 depths x 3 budgets).

    Measured on a slower 2-core machine (2026-12-03, idle, empty cache): 19.2 min, of which 2.2 min the
    two tokenizers, 14.4 min runs (6.9 min training at ~40-80 GFLOP/s) and 2.6 min report; the same
    code trains at the same speed as v0.1 there (A/B, same command). Measured earlier on a faster one
    (idle machine, empty FLOPMATCH_CACHE): 12.8 min wall, of which ~2.6 min set-up
    (caption encoding, the two tokenizers, the attribute classifier once per machine, reference
    features), 4.6 min training 2.35e13 FLOPs (~60 GFLOP/s at depth 1, ~125 at depth 2), ~4.5 min
    evaluating 30 settings of 250 samples (with FID bootstrap and timing), ~1 min report. Small
    batches buy more updates per FLOP at these budgets. One seed: the report's noise estimates are
    evaluation noise only (labelled so).
    """
    return StudyConfig(
        preset="cpu",
        depths=[1, 2],
        budgets=[4e11, 1e12, 2.5e12],
        overrides=["data.num_train=10000", "data.num_eval=1000", "train.batch_size=32", "train.lr=2e-3"],
        tokenizer_overrides=["steps=600"],
        eval_samples=250,
        timing_budget_s=2.0,
        n_boot=300,  # the report's bootstrap: 1000 resamples took 2.3 of 14.5 minutes here
    )


def cpu_long() -> StudyConfig:
    """About an hour on a 2-core CPU: 2 seeds per cell (seed-resampled intervals), budgets up to 8e12.

    1.45e14 training FLOPs (~30 min here), 36 runs evaluated on 500 samples (~18 min), longer-trained
    tokenizers. Depth 3 is left out: at these budgets it gets under 100 steps and never wins.
    """
    return StudyConfig(
        preset="cpu-long",
        depths=[1, 2],
        budgets=[1e12, 3e12, 8e12],
        seeds=2,
        overrides=["data.num_train=20000", "data.num_eval=1000", "train.batch_size=32", "train.lr=2e-3"],
        tokenizer_overrides=["steps=1200"],
        eval_samples=500,
        eval_raw=True,
        timing_budget_s=3.0,
    )


def gpu() -> StudyConfig:
    """One GPU, several hours: depths 2-8 (width 128-512), budgets 1e15-1e17, 3 seeds, Inception FID too."""
    return StudyConfig(
        preset="gpu",
        depths=[2, 4, 6, 8],
        budgets=[1e15, 3e15, 1e16, 3e16, 1e17],
        seeds=3,
        overrides=["data.num_train=100000", "data.num_eval=5000", "train.batch_size=256", "train.lr=1e-3"],
        tokenizer_preset="gpu",
        eval_samples=5000,
        eval_steps={"diffusion": [10, 50], "masked": [6, 24], "autoregressive": []},
        features=["effnet", "inception"],
        eval_raw=True,
        assumed_flops_per_s=5e13,
    )


def tiny() -> StudyConfig:
    """For tests and smoke checks: seconds on a CPU; results are not meaningful."""
    return StudyConfig(
        preset="tiny",
        depths=[1],
        budgets=[2e9, 4e9, 8e9],
        overrides=["data.num_train=256", "data.num_eval=64", "train.batch_size=16", "text.kind=hash",
                   "model.head_dim=16", "train.precision=fp32", "train.log_every=5"],
        tokenizer="weight-free",
        eval_samples=32,
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
