"""How long a study will take, by stage, before it runs, and how that compares with what it took.

The plan knows every run's FLOPs exactly; wall time needs rates. Training and sampling are converted with the
rates :func:`flopmatch.study.calibrate.calibrate` measured on this host for each (paradigm, depth), feature
extraction with its measured images/s, which also scales the network-bound fixed costs (:func:`host_speed`), an
evaluated setting's metrics with their measured seconds at the study's image counts, and the report's bootstrap
refits with a refit benchmark (:func:`report_seconds`). Without a calibration (``--no-calibrate``, SLURM) the
preset's ``StudyConfig.assumed_flops_per_s`` and the fixed costs of :class:`Rates` stand in. Two machines measured
those constants (each says which): the 2-core bf16 AMX CPU the project started on (the cpu preset of v0.2 from an
empty cache took 14.3 min against 11.7 estimated before ``eval_setting_s`` was added) and a 2-core AVX-512 bf16
EPYC (the default study from an empty cache, v0.2 as of December 2026: 6.7 min, which the fixed per-setting 6 s had
estimated at 13.7). Stages whose results are already cached (the study's trained tokenizers, a finished tokenizer
matching, the attribute classifier) cost nothing; caption encoding and reference features are always counted (an
upper bound). ``runner.study`` prints the estimate after the plan and writes ``timings.json`` with estimate and
measurement side by side, so the rates can be checked on any machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from flopmatch.config import RunConfig, from_dict, parse_source
from flopmatch.data.datasets import shapes_config
from flopmatch.dist import available_cores
from flopmatch.evaluation.attributes import attribute_classifier_cached
from flopmatch.objectives import make_objective
from flopmatch.report.analysis import METRICS, fit_allowed
from flopmatch.report.bootstrap import PARALLEL_MIN_RESAMPLES
from flopmatch.study.calibrate import HostRates
from flopmatch.study.operating import selection_run, sweep_settings
from flopmatch.study.plan import (
    RunPlan,
    autoencoder_config,
    chained_flops,
    ema_sweep,
    eval_settings,
    fmt_duration,
    planned_spec,
    token_types,
    tokenizer_dirs,
)
from flopmatch.study.presets import StudyConfig
from flopmatch.study.tokenizer_match import VAL_IMAGES, match_finished, matching

REFERENCE_FLOPS_PER_S = 6e10  # the cpu presets' assumed training rate: the machine the Rates were measured on


@dataclass(frozen=True)
class Rates:
    """Fixed rates of the set-up, evaluation and report stages (seconds or items/s). Measured on the 2-core AMX CPU
    unless marked "EPYC" (the 2-core AVX-512 bf16 EPYC); the calibrated estimate replaces ``eval_setting_s``,
    ``fid_boot_s`` and ``sweep_setting_s`` by the measured metrics plus the EPYC's small per-setting costs."""

    render_images_per_s: float = 2500.0  # drawing shapes images
    captions_per_s: float = 400.0  # MiniLM caption encoding
    autoencoder_step_s: float = 0.105  # one learned-tokenizer step, cpu preset (batch 32, bf16)
    # the tokenizer matching's validation PSNR (encode + decode, cpu preset, fp32): measured 145 (KL) and 195 (LFQ)
    # images/s with the 2 cores shared with a running study; an idle machine is faster, so this errs long
    psnr_images_per_s: float = 170.0
    kmeans_s: float = 15.0  # fitting a weight-free k-means tokenizer
    attribute_classifier_s: float = 60.0  # training the prompt-following classifier, once per machine
    feature_images_per_s: float = 300.0  # EfficientNet-Lite0 features
    inception_images_per_s: float = 12.0  # the standard FID Inception features
    sampling_efficiency: float = 0.6  # sampling FLOP rate / training FLOP rate (small batches, per-step overhead)
    eval_setting_s: float = 6.0  # per evaluated setting: FID bootstrap, KID, precision/recall, prompt scoring, saving
    fid_boot_s: float = 1.0  # of which the FID bootstrap (200 replicates), which raw and post-hoc EMA evaluations skip
    sweep_setting_s: float = 2.5  # per setting of the operating-point sweep (KID, precision/recall, prompt scoring; no files)
    chosen_points: int = 2  # points a sweep typically sends to the full set besides the main setting (a guess)
    run_overhead_s: float = 3.0  # per run: loading data, building the network, checkpoints (CPU work: / host speed)
    batch1_efficiency: float = 0.1  # sampling FLOP rate at batch 1 / at large batches (timing phase latency calls)
    timing_batch: int = 64  # typical best batch of the timing phase's throughput calls
    # EPYC, used with a calibration (small and not scaled by host speed):
    setting_overhead_s: float = 0.1  # per evaluated setting besides its metrics: prompt scoring, image files, eval.json
    eval_call_s: float = 0.25  # per evaluation pass of a run in a warm process: loading the sampler, data and scorer
    eval_process_s: float = 3.0  # the first evaluation of a process: loading extractors and scorer (calibration imported torchmetrics)
    # EPYC, the report (scaled by refit_bench_s over the host's calibrate.refit_seconds()):
    report_fixed_s: float = 4.0  # loading runs, comparisons, figures, rendering
    refit_s: float = 0.02  # per bootstrap refit of a trend, one process: the default study's 1200 took 11.9 s on 2
    refit_bench_s: float = 0.0185  # calibrate.refit_seconds() there


def host_speed(scfg: StudyConfig, host: HostRates | None, rates: Rates) -> float:
    """How much faster than the reference CPU this host runs the network-bound fixed costs on the study's device
    (autoencoder steps; on a CPU host also the CPU-only evaluator training and k-means): the measured EfficientNet
    images/s over the reference's; uncalibrated, a preset for faster hardware (a larger assumed_flops_per_s) is taken
    to be that much faster, never slower."""
    if host is not None and host.feature_images_per_s.get("effnet"):
        return host.feature_images_per_s["effnet"] / rates.feature_images_per_s
    return max(1.0, scfg.assumed_flops_per_s / REFERENCE_FLOPS_PER_S)


def report_trends(scfg: StudyConfig) -> int:
    """How many trends the report fits (each refitted ``n_boot`` times): every metric the study measures, per paradigm,
    when its budgets allow a law (:func:`flopmatch.report.analysis.fit_allowed`); the inception FID only with those
    features. An upper bound: a paradigm whose runs failed has fewer."""
    if fit_allowed(sorted(set(scfg.budgets))):
        return 0
    metrics = [m for m in METRICS if m.name != "fid_inception" or "inception" in scfg.features]
    return len(metrics) * len(scfg.objectives)


def report_seconds(scfg: StudyConfig, host: HostRates | None, rates: Rates, workers: int | None = None) -> float:
    """Seconds of the report: a fixed part and the bootstrap refits (``n_boot`` per trend) over ``workers`` processes
    (None: the cores, when :func:`~flopmatch.report.bootstrap.bootstrap_all` would use them); scaled by the host's
    refit benchmark."""
    refits = report_trends(scfg) * scfg.n_boot
    if workers is None:
        workers = available_cores() if refits >= PARALLEL_MIN_RESAMPLES else 1
    workers = max(1, min(workers, refits))
    speed = rates.refit_bench_s / host.refit_bench_s if host is not None and host.refit_bench_s else 1.0
    return (rates.report_fixed_s + refits * rates.refit_s / workers) / speed


def estimate(scfg: StudyConfig, plans: list[RunPlan], study: Path, rates: Rates = Rates(),
             host: HostRates | None = None, concurrent: int = 1, report_workers: int | None = None,
             finished: frozenset[str] = frozenset(), timing_done: bool = False,
             trained: frozenset[str] = frozenset(), steps_done: Mapping[str, int] | None = None) -> dict[str, float]:
    """Seconds per stage: "set-up", "training", "evaluation", "timing", "report" (and their "total").

    ``finished``: names of runs already trained and evaluated (a resumed or grown study), which cost nothing.
    ``trained``: names of runs whose training is done (``finished`` ones and those a study grown along an evaluation
    axis evaluates again), whose training costs nothing. ``steps_done``: steps already trained of runs stopped
    mid-training, whose training is counted from there; a partly evaluated run's evaluation is counted whole (the
    estimate errs long). ``timing_done``: the timing phase has nothing to time.

    ``host``: this machine's calibration (:func:`flopmatch.study.calibrate.calibrate`); None: the preset's
    assumed FLOP/s and the reference CPU's fixed rates. ``concurrent``: runs advancing at full speed at once
    (``--workers`` on several GPUs: :func:`flopmatch.study.launchers.concurrent_runs`); training and evaluation
    are divided by it. ``report_workers``: the report's processes (:func:`report_seconds`)."""
    cfg = from_dict(RunConfig, plans[0].config) if plans else RunConfig()
    speed = host_speed(scfg, host, rates)
    # The attribute classifier, the domain CLIP and k-means always run on the CPU: on a GPU host their speed-up is
    # the CPU's, unknown here, so the reference CPU's times stand (the effnet ratio applies only to a CPU host).
    cpu_speed = speed if host is not None and host.device == "cpu" else 1.0
    setup = 0.0
    data_cached = bool(finished or trained)  # finished runs built the data, captions, scorer and reference features (and a k-means tokenizer) on this machine
    if scfg.tokenizer == "learned":
        for tokens, directory in tokenizer_dirs(study).items():
            if tokens in token_types(scfg) and not (directory / "tokenizer.json").exists():
                setup += autoencoder_config(scfg, tokens).steps * rates.autoencoder_step_s / speed
        if matching(scfg) and not match_finished(study, scfg):
            # How many retrainings matching needs is known only after the first measurements: count one of the
            # (normally weaker) LFQ at 2x its steps, the typical case; the worst case retrains it at 2x, 4x, ...,
            # tokenizer_match_max x its steps, (2 + 4 + ... + max) x steps in all. Plus a validation PSNR pass per
            # candidate (three here; seconds). The PSNR is measured on the CPU, so no speed-up for faster hardware.
            steps = autoencoder_config(scfg, "discrete").steps
            if scfg.tokenizer_match_max >= 2:
                setup += 2 * steps * rates.autoencoder_step_s / speed
            setup += 3 * min(VAL_IMAGES, cfg.data.num_eval) / rates.psnr_images_per_s
    elif "discrete" in token_types(scfg) and not data_cached:
        setup += rates.kmeans_s / cpu_speed  # the continuous patch tokenizer is a mean and a std: free
    if not data_cached:
        setup += cfg.data.num_train / rates.render_images_per_s
        if cfg.text.kind == "minilm":
            setup += cfg.data.num_train / rates.captions_per_s / speed  # an upper bound: unique captions are fewer
        if parse_source(cfg.data.name)[0] != "shapes":  # the domain CLIP: a small CNN trained like the classifier
            setup += rates.attribute_classifier_s / cpu_speed
        elif not attribute_classifier_cached(shapes_config(cfg.data)):
            setup += rates.attribute_classifier_s / cpu_speed
    if host is not None and all(f in host.feature_images_per_s for f in scfg.features):
        per_image = sum(1 / host.feature_images_per_s[f] for f in scfg.features)  # seconds of extraction per image
    else:
        per_image = sum(1 / (rates.inception_images_per_s if f == "inception" else rates.feature_images_per_s)
                        for f in scfg.features) / speed
    if not data_cached:
        setup += cfg.data.num_eval * per_image  # reference features
    # wsd/constant chains train only the steps after the previous budget's stable state (plan.chained_flops); a
    # resumed run at most the steps it has left
    share = chained_flops(plans) / max(1.0, sum(p.train_flops for p in plans))
    steps_done = steps_done or {}
    train_s = [(p.train_flops / host.train_rate(p) if host else p.est_seconds)
               * min(share, 1.0 - steps_done.get(p.name, 0) / max(1, p.steps)) + rates.run_overhead_s / cpu_speed
               for p in plans if p.name not in finished and p.name not in trained]
    if host is not None and host.metrics_s:  # the measured metrics plus the small per-setting and per-pass costs
        fixed = {k: v + rates.setting_overhead_s for k, v in host.metrics_s.items()}
        pass_s, process_s = rates.eval_call_s, rates.eval_process_s
    else:  # the reference machine's per-setting figures, which include those costs
        fixed = {"main": rates.eval_setting_s, "no_boot": rates.eval_setting_s - rates.fid_boot_s, "sweep": rates.sweep_setting_s}
        pass_s = process_s = 0.0
    eval_s = []  # per run
    timing = 0.0
    timed = set()
    for p in plans:
        sample_rate = host.sample_rate(p) if host else scfg.assumed_flops_per_s * rates.sampling_efficiency
        sweep = len(ema_sweep(scfg, p))  # the post-hoc EMA sweep: raw weights and each length, main setting only
        extra = sweep + 1 if sweep else (1 if scfg.eval_raw else 0)  # evaluations without the FID bootstrap, a pass each
        main = len(eval_settings(scfg, from_dict(RunConfig, p.config)))
        sampling = scfg.eval_samples * (p.sample_flops_per_image / sample_rate + per_image)  # images and their features
        per_setting = sampling + fixed["main"]
        evaluation = main * per_setting + extra * (sampling + fixed["no_boot"]) + (1 + extra) * pass_s
        chosen = 0
        if selection_run(scfg, p):  # the operating-point sweep on its small set, then its chosen points in full
            cfg = from_dict(RunConfig, p.config)
            swept = sweep_settings(scfg, cfg)
            spec = planned_spec(cfg, scfg)
            flops = sum(make_objective(cfg.objective).sample_flops(spec, s) for s in swept)
            evaluation += (scfg.sweep_samples * (flops / sample_rate + len(swept) * per_image)
                           + len(swept) * fixed["sweep"])
            chosen = min(len(swept), rates.chosen_points)
            evaluation += chosen * per_setting + 2 * pass_s
        if p.name not in finished:
            eval_s.append(evaluation + (process_s if not eval_s else 0.0))  # the first evaluation starts the process
        if timing_done or (p.objective, p.depth) in timed or p.budget != max(scfg.budgets):
            continue  # the timing phase times one run per architecture, at the largest budget (study.timing_phase)
        timed.add((p.objective, p.depth))
        items = (main + chosen) * (2 if p.objective == "autoregressive" else 1)
        per_round = p.sample_flops_per_image / sample_rate * (5 / rates.batch1_efficiency + rates.timing_batch)
        timing += items * (scfg.timing_budget_s + (scfg.timing_rounds + 1) * per_round)  # + the burn-in round
    if host is not None and host.device == "cpu":
        concurrent = 1  # CPU workers split the cores (launchers.concurrent_runs counts GPUs)

    def together(seconds: list[float]) -> float:  # runs shared over `concurrent` devices, never below the longest one
        return max(sum(seconds) / concurrent, max(seconds, default=0.0)) if concurrent > 1 else sum(seconds)

    out = {"set-up": setup, "training": together(train_s), "evaluation": together(eval_s), "timing": timing,
           "report": report_seconds(scfg, host, rates, report_workers)}
    out["total"] = sum(out.values())
    return out


def format_estimate(est: dict[str, float], calibrated: bool = True) -> str:
    """One line: 'estimated wall time: set-up 2.6min, training 7.4min, ...', saying so when not calibrated on this host."""
    note = "" if calibrated else " (from the preset's assumed FLOP/s: not calibrated on this host)"
    return "estimated wall time: " + ", ".join(f"{k} {fmt_duration(v)}" for k, v in est.items()) + note
