"""The study runner end to end on the `tiny` preset: plan, train, evaluate, report, resume."""

from __future__ import annotations

import csv
import json

import pytest

import flopmatch.study.job
from flopmatch.rundir import CHECKPOINT, read_state
from flopmatch.study.plan import make_plan, run_name
from flopmatch.study.presets import study_preset
from flopmatch.study.runner import study
from flopmatch.study.timing_phase import ensure_timing


def tiny_study(objectives=("masked",), budgets=(2e9, 4e9, 8e9)):
    scfg = study_preset("tiny")
    scfg.objectives = list(objectives)
    scfg.budgets = list(budgets)
    scfg.features = ["effnet"]
    return scfg


def test_plan_is_analytic_and_spends_each_budget(tmp_path):
    """Planning builds no model and gives every run steps whose FLOPs reach its budget within one step."""
    scfg = study_preset("cpu")
    plans = make_plan(scfg, tmp_path / "s")
    from flopmatch.study.plan import cell_seeds

    assert len(plans) == len(scfg.objectives) * len(scfg.depths) * sum(len(cell_seeds(scfg, b)) for b in scfg.budgets)
    assert scfg.floor_seeds and len(plans) > len(scfg.objectives) * len(scfg.depths) * len(scfg.budgets)
    for p in plans:
        per_step = p.train_flops_per_example * json.loads(json.dumps(p.config))["train"]["batch_size"]
        assert p.budget <= p.train_flops < p.budget + per_step
    assert not (tmp_path / "s").exists()  # planning writes nothing


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
    """A tiny 3-paradigm study writes plan, runs, eval.json per run, the report files and its stage timings."""
    out = tmp_path / "study"
    scfg = tiny_study(objectives=("diffusion", "masked", "autoregressive"))
    scfg.eval_raw = True
    study(out, scfg, progress=False)
    for name in ("plan.json", "study.json", "report.html", "report.md", "results.csv", "timings.json"):
        assert (out / name).is_file(), name
    timings = json.loads((out / "timings.json").read_text())  # the plan's estimate beside what each stage took
    assert set(timings["estimated_s"]) == {"set-up", "training", "evaluation", "timing", "report", "total"}
    assert set(timings["measured_s"]) == {"tokenizers", "runs", "timing", "report", "total"}
    assert timings["measured_s"]["total"] >= timings["measured_s"]["runs"] > 0 and timings["estimated_s"]["total"] > 0
    plans = json.loads((out / "plan.json").read_text())
    assert len(plans) == 9
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    # one row per (run, evaluated setting): every run its default setting, with EMA and raw weights (eval_raw);
    # diffusion and masked runs at the largest budget also one extra step setting
    expected = sum(2 + (len(scfg.eval_steps[p["objective"]]) if p["budget"] == max(scfg.budgets) else 0) for p in plans)
    assert len(rows) == expected
    raw = [r for r in rows if r["weights"] == "model"]
    assert len(raw) == len(plans) and all(r["main"] == "false" and r["latency_s"] == "" for r in raw)
    md = (out / "report.md").read_text()
    assert "## Which paradigm, for what" in md and "Smoke preset (tiny)" in md  # the decision first, with its caveats
    ema = md[md.index("## EMA"):]
    assert all(f"| {p} | 3 |" in ema for p in ("diffusion", "masked", "autoregressive"))  # raw vs EMA, paired per run
    for p in plans:
        doc = json.loads((out / "runs" / p["name"] / "eval.json").read_text())
        for entry in doc["entries"].values():
            m = entry["manifest"]
            assert m["num_samples"] == scfg.eval_samples and m["feature_extractors"]["effnet"]["weights_sha256"]
            assert entry["inference"]["sample_flops_per_image"] > 0
            assert "latency_s" not in entry["inference"]  # a study's evaluations do not time: its timing phase does
    # the timing phase: every evaluated EMA setting of each (paradigm, depth), timed in the same rounds
    timing = json.loads((out / "inference_timing.json").read_text())
    timed = {(i["objective"], i["setting"]) for i in timing["items"]}
    ema = {(r["objective"], r["setting"].split(",weights=")[0]) for r in rows if r["weights"] == "ema"}
    assert timed == ema and all(len(i["latency_rounds"]) == scfg.timing_rounds for i in timing["items"])
    ar = [i for i in timing["items"] if i["objective"] == "autoregressive"]
    assert ar and all(i["without_kv_cache"]["latency_s"] > 0 for i in ar)
    for r in rows:  # every run of a setting shows the phase's figures
        if r["weights"] == "ema":
            item = next(i for i in timing["items"] if (i["objective"], i["setting"]) == (r["objective"], r["setting"].split(",weights=")[0]))
            assert float(r["latency_s"]) == item["latency_s"] and r["timing_source"] == "study"
    html = (out / "report.html").read_text()
    assert "<img" in html and "src=\"http" not in html  # self-contained


@pytest.mark.slow
def test_interrupted_study_resumes_without_redoing_finished_runs(tmp_path, monkeypatch):
    """After an interruption, re-running trains only unfinished runs and evaluates only missing settings."""
    out = tmp_path / "study"
    scfg = tiny_study(objectives=("masked",))
    names = [run_name("masked", 1, b, 0) for b in scfg.budgets]
    # Interrupt the first attempt while the second run trains (after 3 of its steps).
    real_train = flopmatch.study.job.train
    calls = []

    def interrupted_train(cfg, run, progress=True, stop_after=None):
        calls.append(run.name)
        if run.name == names[1] and len(calls) == 2:
            real_train(cfg, run, progress=False, stop_after=3)
            raise KeyboardInterrupt
        return real_train(cfg, run, progress=False, stop_after=stop_after)

    monkeypatch.setattr(flopmatch.study.job, "train", interrupted_train)
    with pytest.raises(KeyboardInterrupt):
        study(out, scfg, progress=False)
    first_eval = (out / "runs" / names[0] / "eval.json").read_bytes()
    state = read_state(out / "runs" / names[1])
    assert state["step"] == 3 and not state["done"]

    assert not (out / "inference_timing.json").exists()  # the interrupted study never reached its timing phase

    calls.clear()
    study(out, scfg, progress=False)
    assert calls == names[1:]  # the finished run is not trained again
    assert (out / "runs" / names[0] / "eval.json").read_bytes() == first_eval  # nor re-evaluated
    assert read_state(out / "runs" / names[1])["done"]

    # Timings are never a mix of two phases: a study that needs one setting re-timed re-times them all
    # (the study's timing stage, called as study() calls it after its runs).
    path = out / "inference_timing.json"
    first = json.loads(path.read_text())
    plans = make_plan(scfg, out)
    ensure_timing(out, scfg, plans, progress=False)
    assert json.loads(path.read_text()) == first  # nothing changed: the measurements are reused
    partial = dict(first, items=first["items"][1:], signature=first["signature"][1:])  # as if a setting were new
    path.write_text(json.dumps(partial))
    ensure_timing(out, scfg, plans, progress=False)
    again = json.loads(path.read_text())
    assert again["signature"] == first["signature"] and len(again["items"]) == len(first["items"])
    old = {(i["objective"], i["depth"], i["setting"]): i["latency_rounds"] for i in first["items"]}
    assert all(i["latency_rounds"] != old[(i["objective"], i["depth"], i["setting"])] for i in again["items"])  # all anew
    ensure_timing(out, scfg, plans, retime=True, progress=False)  # --retime: all of them again
    assert all(a["latency_rounds"] != b["latency_rounds"] for a, b in zip(json.loads(path.read_text())["items"], again["items"]))


def _outcome(out, names):
    """What a study computed, without timings: checkpoint tensors (the file's metadata holds wall times),
    generated-image hashes and metrics per setting."""
    from flopmatch.files import load_tensors

    res = {}
    for n in names:
        doc = json.loads((out / "runs" / n / "eval.json").read_text())
        tensors = {k: v.numpy().tobytes() for k, v in load_tensors(out / "runs" / n / CHECKPOINT).items()}
        res[n] = (tensors, {k: (e["manifest"]["generated_images_sha256"], e["metrics"]) for k, e in doc["entries"].items()})
    return res


@pytest.mark.slow
def test_local_worker_processes_give_the_same_runs_as_in_process(tmp_path, monkeypatch):
    """--workers 2 (two worker processes) trains and evaluates exactly what the in-process launcher does."""
    monkeypatch.setenv("FLOPMATCH_THREADS", "1")  # same thread count as this process (conftest), so same float sums
    scfg = tiny_study(objectives=("masked",), budgets=(2e9, 4e9))
    names = [run_name("masked", 1, b, 0) for b in scfg.budgets]
    study(tmp_path / "one", scfg, workers=1, progress=False)
    study(tmp_path / "two", scfg, workers=2, progress=False)
    assert sorted(p.name for p in (tmp_path / "two" / "logs").iterdir()) == sorted(f"{n}.log" for n in names)
    assert _outcome(tmp_path / "two", names) == _outcome(tmp_path / "one", names)


def test_saved_study_settings_compare_by_what_defines_the_runs():
    """A study.json written before floor_seeds/base_seed/timing_rounds existed still matches its settings; a
    different grid does not; timing and report settings never make another study."""
    from dataclasses import asdict, replace

    from flopmatch.study.runner import same_study

    scfg = tiny_study()
    saved = {k: v for k, v in asdict(scfg).items() if k not in ("floor_seeds", "base_seed", "timing_rounds")}
    assert same_study(saved, scfg)
    assert same_study(saved, replace(scfg, timing_rounds=9, n_boot=7))
    assert not same_study(saved, replace(scfg, floor_seeds=2)) and not same_study(saved, replace(scfg, budgets=[1e9]))


def test_base_seeds_share_no_run():
    """Studies with base seeds 0 and 1 train disjoint seeds, the floor seeds at the middle budget included."""
    from dataclasses import replace

    from flopmatch.study.plan import cell_seeds

    scfg = replace(tiny_study(), seeds=1, floor_seeds=2)
    mid = sorted(scfg.budgets)[1]
    assert cell_seeds(scfg, mid) == [0, 1, 2] and cell_seeds(scfg, scfg.budgets[0]) == [0]
    other = replace(scfg, base_seed=1)
    assert not set(cell_seeds(other, mid)) & set(cell_seeds(scfg, mid))


def test_study_refuses_changed_settings(tmp_path):
    """A study directory belongs to one StudyConfig; different settings are a clear error."""
    from flopmatch.errors import UserError
    from flopmatch.files import atomic_write_json

    out = tmp_path / "s"
    atomic_write_json(out / "study.json", {"preset": "other"})
    with pytest.raises(UserError, match="different settings"):
        study(out, tiny_study(), progress=False)
