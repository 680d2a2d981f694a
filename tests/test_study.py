"""The study runner end to end on the `tiny` preset: plan, train, evaluate, report, resume."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict, replace

import pytest

import flopmatch.study.job
import flopmatch.study.launchers
from flopmatch import PARADIGMS, cli
from flopmatch.config import RunConfig, apply_overrides, from_dict, to_dict
from flopmatch.data.datasets import make_dataset
from flopmatch.errors import UserError
from flopmatch.evaluation.ceilings import CEILINGS_FILE
from flopmatch.evaluation.operating import SWEEP_SEED, choose, point_from_entry
from flopmatch.evaluation.prompt_groups import prompt_groups
from flopmatch.evaluation.run import EvalConfig, eval_prompts, setting_key
from flopmatch.files import atomic_write_json, load_tensors
from flopmatch.objectives import make_objective
from flopmatch.plan import net_spec_for
from flopmatch.report.analysis import KID_FLOOR
from flopmatch.rundir import CHECKPOINT, STABLE_CHECKPOINT, read_state
from flopmatch.study.grow import reconcile
from flopmatch.study.launchers import LocalWorkersLauncher
from flopmatch.study.operating import chosen_settings, sweep_eval, sweep_settings
from flopmatch.study.plan import cell_seeds, chained_flops, make_plan, run_name
from flopmatch.study.presets import HOLDOUT_COMBOS, HOLDOUT_RELATIONS, study_preset
from flopmatch.study.runner import preview, study
from flopmatch.study.timing_phase import ensure_timing
from flopmatch.train import train


def tiny_study(objectives=("masked",), budgets=(2e9, 4e9, 8e9)):
    scfg = study_preset("tiny")
    scfg.objectives = list(objectives)
    scfg.budgets = list(budgets)
    scfg.features = ["effnet"]
    return scfg


# Tests about where runs train and what a study does with them pass calibrate_host=False: the host calibration only
# informs the printed estimate (tested in test_calibrate.py and test_tiny_study_end_to_end) and costs seconds per study.


def main_setting_only(scfg):
    """No operating-point or post-hoc EMA sweep and no extra step counts: each run evaluates its main setting only
    (for tests about where and when runs train and evaluate; the sweeps have their own tests)."""
    scfg.sweep_guidance, scfg.eval_ema, scfg.eval_steps = [], [], {}
    return scfg


def test_plan_is_analytic_and_spends_each_budget(tmp_path):
    """Planning builds no model and gives every run steps whose FLOPs reach its budget within one step."""
    scfg = study_preset("cpu")
    plans = make_plan(scfg, tmp_path / "s")
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
    host = timings["host"]  # the estimate came from this machine's calibration of every planned architecture
    assert host["device"] == "cpu" and set(host["train_flops_per_s"]) == {f"{o}-d1" for o in scfg.objectives}
    plans = json.loads((out / "plan.json").read_text())
    assert len(plans) == 9
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    # one row per (run, evaluated setting): every run its default setting, with EMA and raw weights (eval_raw); the
    # runs at the largest budget also the operating-point sweep (small set) and its chosen points (full set); the runs
    # at the middle budget also each post-hoc EMA of the sweep (eval_ema)
    middle, top = sorted(scfg.budgets)[1], max(scfg.budgets)
    ecfg = EvalConfig(num_samples=scfg.eval_samples, features=list(scfg.features))
    chosen = {}
    for p in plans:
        if p["budget"] == top:
            cfg = from_dict(RunConfig, p["config"])
            swept = sweep_settings(scfg, cfg)
            assert len(swept) == len(scfg.sweep_guidance) * (1 + len(scfg.eval_steps[p["objective"]]))
            chosen[p["name"]] = chosen_settings(out / "runs" / p["name"], cfg, swept, sweep_eval(ecfg, scfg))
            # the chosen points are the front of the sweep's own numbers (plus its best prompt following)
            entries = json.loads((out / "runs" / p["name"] / "eval.json").read_text())["entries"]
            small = {k.split(",weights=")[0]: e for k, e in entries.items() if e["manifest"]["seed"] == SWEEP_SEED}
            assert len(small) == len(swept) and all(e["manifest"]["num_samples"] == scfg.sweep_samples for e in small.values())
            points = [point_from_entry(k, e, "effnet") for k, e in small.items()]
            front = {q.key for q in choose(points)}
            spec = net_spec_for(cfg)
            picked = {setting_key(s, make_objective(cfg.objective).resolve_steps(s, spec)) for s in chosen[p["name"]]}
            assert front and picked == front  # the study evaluated exactly the sweep's choice, on the full set
            for key in front:
                assert entries[f"{key},weights=ema,n={scfg.eval_samples},seed=0"]["manifest"]["num_samples"] == scfg.eval_samples
            best = min(points, key=lambda q: (q.kid, q.key))
            assert best.key in front  # the sweep's best-quality point is always on its front
    assert chosen and all(c for c in chosen.values())  # every sweep finished and chose at least one point
    expected = sum(2 + (len(sweep_settings(scfg, from_dict(RunConfig, p["config"]))) + sum(
        1 for s in chosen[p["name"]] if s.guidance != scfg.eval_guidance or s.steps) if p["budget"] == top else 0)
                   + (len(scfg.eval_ema) if p["budget"] == middle else 0) for p in plans)
    assert scfg.eval_ema and len(rows) == expected
    posthoc = [r for r in rows if r["weights"].startswith("ema@")]
    assert {r["budget"] for r in posthoc} == {str(middle)} and all(float(r["posthoc_residual"]) < 0.1 for r in posthoc)
    raw = [r for r in rows if r["weights"] == "model"]
    assert len(raw) == len(plans) and all(r["main"] == "false" and r["latency_s"] == "" for r in raw)
    md = (out / "report.md").read_text()
    assert "## Which paradigm, for what" in md and "Smoke preset (tiny)" in md  # the decision first, with its caveats
    ema = md[md.index("## EMA"):]
    for p in ("diffusion", "masked", "autoregressive"):  # raw vs EMA paired per run; post-hoc EMA on the middle budget's run
        assert f"| {p} | EMA kept in training" in ema and "| 3 |" in ema
        assert re.search(rf"\| {p} \| post-hoc EMA, sigma_rel 0.1( \(lowest\))? \| 1 \|", ema)
    for p in plans:
        doc = json.loads((out / "runs" / p["name"] / "eval.json").read_text())
        for entry in doc["entries"].values():
            m = entry["manifest"]
            n = scfg.sweep_samples if m["seed"] == SWEEP_SEED else scfg.eval_samples
            assert m["num_samples"] == n and m["feature_extractors"]["effnet"]["weights_sha256"]
            assert entry["inference"]["sample_flops_per_image"] > 0
            assert "latency_s" not in entry["inference"]  # a study's evaluations do not time: its timing phase does
    # the timing phase: every evaluated EMA setting of each (paradigm, depth), timed in the same rounds
    timing = json.loads((out / "inference_timing.json").read_text())
    timed = {(i["objective"], i["setting"]) for i in timing["items"]}
    ema = {(r["objective"], r["setting"].split(",weights=")[0]) for r in rows if r["weights"] == "ema" and r["full_set"] == "true"}
    assert timed == ema and all(len(i["latency_rounds"]) == scfg.timing_rounds for i in timing["items"])
    # the report's latency and throughput verdicts are at matched quality: each paradigm's cheapest full-set point
    # with KID at or below the worst paradigm's best KID
    assert "## Operating points at" in md and "at matched quality (KID <=" in md
    # (decided on the sweep's KID of each full-set point where the sweep has its setting, else on its own KID)
    def decided(q):
        mine = [r for r in rows if r["objective"] == q and r["budget"] == str(top) and r["weights"] == "ema"]
        small = {r["setting"].split(",weights=")[0]: float(r["kid_effnet"]) for r in mine if r["eval_seed"] == str(SWEEP_SEED)}
        return min(small.get(r["setting"].split(",weights=")[0], float(r["kid_effnet"])) for r in mine if r["full_set"] == "true")

    level = max(max(decided(q) for q in ("diffusion", "masked", "autoregressive")), KID_FLOOR)
    assert f"KID <= {level:.3g}" in md
    ar = [i for i in timing["items"] if i["objective"] == "autoregressive"]
    assert ar and all(i["without_kv_cache"]["latency_s"] > 0 for i in ar)
    for r in rows:  # every run of a setting shows the phase's figures
        if r["weights"] == "ema" and r["full_set"] == "true":
            item = next(i for i in timing["items"] if (i["objective"], i["setting"]) == (r["objective"], r["setting"].split(",weights=")[0]))
            assert float(r["latency_s"]) == item["latency_s"] and r["timing_source"] == "study"
    html = (out / "report.html").read_text()
    assert "<img" in html and "src=\"http" not in html  # self-contained
    # the tokenizers' ceilings, measured once per study, shown beside the generators' numbers
    ceilings = json.loads((out / CEILINGS_FILE).read_text())
    assert "## Tokenizer ceilings" in md and "tokenizer ceiling: rFID / full match" in md and ceilings
    # the preset's held-out prompts, reported apart from the seen ones and by object count
    assert "Prompt following: seen vs held-out prompts, one vs two objects" in md
    entry = next(iter(json.loads((out / "runs" / plans[0]["name"] / "eval.json").read_text())["entries"].values()))
    groups = entry["metrics"]["prompt_following"]["by_group"]
    assert groups["seen"]["num_images"] + groups["held_out"]["num_images"] == scfg.eval_samples
    assert groups["one_object"]["num_images"] + groups["two_object"]["num_images"] == scfg.eval_samples


@pytest.mark.slow
def test_interrupted_study_resumes_without_redoing_finished_runs(tmp_path, monkeypatch):
    """After an interruption, re-running trains only unfinished runs and evaluates only missing settings."""
    out = tmp_path / "study"
    scfg = main_setting_only(tiny_study(objectives=("masked",)))
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
        study(out, scfg, progress=False, calibrate_host=False)
    first_eval = (out / "runs" / names[0] / "eval.json").read_bytes()
    state = read_state(out / "runs" / names[1])
    assert state["step"] == 3 and not state["done"]

    assert not (out / "inference_timing.json").exists()  # the interrupted study never reached its timing phase

    calls.clear()
    study(out, scfg, progress=False, calibrate_host=False)
    assert calls == names[1:]  # the finished run is not trained again
    assert (out / "runs" / names[0] / "eval.json").read_bytes() == first_eval  # nor re-evaluated
    assert read_state(out / "runs" / names[1])["done"]

    # Growing: one more budget trains and evaluates only its own run; the report covers all four.
    calls.clear()
    study(out, main_setting_only(tiny_study(objectives=("masked",), budgets=(*scfg.budgets, 1.6e10))), progress=False)
    assert calls == [run_name("masked", 1, 1.6e10, 0)]
    assert (out / "runs" / names[0] / "eval.json").read_bytes() == first_eval
    with open(out / "results.csv") as f:
        assert {float(r["budget"]) for r in csv.DictReader(f)} == {*scfg.budgets, 1.6e10}
    scfg = main_setting_only(tiny_study(objectives=("masked",), budgets=(*scfg.budgets, 1.6e10)))

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

    # Grown by a paradigm, the estimate calibrated: the finished masked runs are timed again beside the new ones, so
    # their architecture is measured too (calibrating only the unfinished runs' raised KeyError 'masked-d1'); the
    # plan preview says what is left.
    calls.clear()
    grown = replace(scfg, objectives=["masked", "autoregressive"])
    lines = []
    preview(out, grown, log=lines.append)
    assert f"4 of 8 runs already trained and evaluated in {out}" in lines and "[study] calibrated on cpu" in "".join(lines)
    study(out, grown, progress=False)
    assert sorted(calls) == sorted(run_name("autoregressive", 1, b, 0) for b in scfg.budgets)


def _tensors(run):
    """Every tensor of a run's checkpoint, as bytes (the file's metadata holds wall times)."""
    return {k: v.numpy().tobytes() for k, v in load_tensors(run / CHECKPOINT).items()}


def _outcome(out, names):
    """What a study computed, without timings: checkpoint tensors (the file's metadata holds wall times),
    generated-image hashes and metrics per setting."""
    res = {}
    for n in names:
        doc = json.loads((out / "runs" / n / "eval.json").read_text())
        tensors = _tensors(out / "runs" / n)
        res[n] = (tensors, {k: (e["manifest"]["generated_images_sha256"], e["metrics"]) for k, e in doc["entries"].items()})
    return res


@pytest.mark.slow
def test_local_worker_processes_give_the_same_runs_as_in_process(tmp_path, monkeypatch):
    """--workers 2 (two worker processes) trains and evaluates exactly what the in-process launcher does."""
    monkeypatch.setenv("FLOPMATCH_THREADS", "1")  # same thread count as this process (conftest), so same float sums
    scfg = tiny_study(objectives=("masked",), budgets=(2e9, 4e9))
    main_setting_only(scfg)  # what differs between launchers is where a run trains and evaluates, not which settings
    names = [run_name("masked", 1, b, 0) for b in scfg.budgets]
    study(tmp_path / "one", scfg, workers=1, progress=False, calibrate_host=False)
    study(tmp_path / "two", scfg, workers=2, progress=False, calibrate_host=False)
    assert sorted(p.name for p in (tmp_path / "two" / "logs").iterdir()) == sorted(f"{n}.log" for n in names)
    assert _outcome(tmp_path / "two", names) == _outcome(tmp_path / "one", names)


def test_growing_a_study_adds_cells_and_keeps_the_variance_seeds_in_place(tmp_path):
    """More budgets, seeds, paradigms, depths or step settings grow a study; settings outside the grid may not change;
    timing/report settings and trackers are free; a study.json from before floor_seeds/base_seed still reads."""
    scfg = replace(tiny_study(budgets=(2e9, 4e9, 8e9)), floor_seeds=2)
    saved = asdict(scfg)
    same, plan, added = reconcile(saved, replace(scfg, timing_rounds=9, n_boot=7), tmp_path)
    assert added == [] and len(plan) == 5
    old_keys = {k: v for k, v in asdict(tiny_study()).items() if k not in ("floor_seeds", "base_seed", "floor_budget")}
    assert reconcile(old_keys, tiny_study(), tmp_path)[2] == []

    begun = tmp_path / "begun"  # a study whose floor budget's first run has begun
    (begun / "runs" / run_name("masked", 1, 4e9, 0)).mkdir(parents=True)
    grown, plan, added = reconcile(saved, replace(scfg, budgets=[2e9, 4e9, 8e9, 1.6e10]), begun)
    assert grown.floor_budget == 4e9  # the middle would now be 8e9: the variance seeds stay where they are
    ema_only = asdict(replace(scfg, floor_seeds=0, eval_ema=[0.1]))  # and so does the post-hoc EMA sweep alone
    assert reconcile(ema_only, replace(scfg, floor_seeds=0, eval_ema=[0.1], budgets=[2e9, 4e9, 8e9, 1.6e10]),
                     begun)[0].floor_budget == 4e9
    assert [p.name for p in added] == [run_name("masked", 1, 1.6e10, 0)]
    # where nothing began at the floor budget, the floor is the new middle, as in a new study
    assert reconcile(saved, replace(scfg, budgets=[2e9, 4e9, 8e9, 1.6e10]), tmp_path)[0].floor_budget == 0
    more = replace(scfg, objectives=["masked", "diffusion"], seeds=2,
                   eval_steps={**scfg.eval_steps, "masked": [2, 4]}, overrides=scfg.overrides + ["train.trackers=tensorboard"])
    _, plan, added = reconcile(saved, more, tmp_path)
    assert {p.name for p in plan} - {p.name for p in added} == {p.name for p in make_plan(scfg, tmp_path)}
    assert len(added) == len(plan) - 5 and all(p.objective == "diffusion" or p.seed == 1 or p.seed == 3 for p in added)
    _, plan, added = reconcile(saved, replace(scfg, depths=[1, 2]), tmp_path)  # a deeper model: its own 5 runs
    assert {p.depth for p in added} == {2} and len(added) == 5 and len(plan) == 10
    assert {(p.budget, p.seed) for p in added} == {(p.budget, p.seed) for p in plan if p.depth == 1}

    # planned cells that never began (no run directory, no SLURM job): a growth stopped before them, or a mistyped
    # budget, may be dropped again
    fixed, plan, _ = reconcile(saved, replace(scfg, budgets=[2e9, 8e9], floor_seeds=1), tmp_path)
    assert fixed.budgets == [2e9, 8e9] and len(plan) == 3
    (tmp_path / "slurm").mkdir()
    atomic_write_json(tmp_path / "slurm" / "jobs.json", {run_name("masked", 1, 4e9, 0): "17"})  # queued: begun
    with pytest.raises(UserError, match=r"with this command's budgets, 1 run\(s\) .*\(e\.g\. masked-d1-b4e09-s0\)"):
        reconcile(saved, replace(scfg, budgets=[2e9, 8e9], floor_seeds=0), tmp_path)
    atomic_write_json(tmp_path / "slurm" / "jobs.json", {run_name("masked", 1, 4e9, 1): "19"})  # an extra seed's run
    with pytest.raises(UserError, match=r"with this command's floor_seeds, 1 run\(s\)"):  # named by its axis
        reconcile(saved, replace(scfg, floor_seeds=0), tmp_path)
    wsd = replace(scfg, overrides=[*scfg.overrides, "train.schedule=wsd"])  # runs of one seed train as one chain job
    atomic_write_json(tmp_path / "slurm" / "jobs.json", {"masked-d1-s0-wsd": "18"})  # the chain is queued: all begun
    with pytest.raises(UserError, match=r"with this command's budgets, 1 run\(s\) .*\(e\.g\. masked-d1-b4e09-s0\)"):
        reconcile(asdict(wsd), replace(wsd, budgets=[2e9, 8e9], floor_seeds=0), tmp_path)
    # ... but only the runs its description lists: a budget added after the chain was submitted has not begun
    chain = [{"name": run_name("masked", 1, b, 0)} for b in (2e9, 8e9)]
    atomic_write_json(tmp_path / "jobs" / "masked-d1-s0-wsd.json", {"name": "masked-d1-s0-wsd", "chain": chain})
    assert reconcile(asdict(wsd), replace(wsd, budgets=[2e9, 8e9], floor_seeds=0), tmp_path)[0].budgets == [2e9, 8e9]
    (tmp_path / "slurm" / "jobs.json").unlink()
    atomic_write_json(tmp_path / "slurm" / "jobs.json", {run_name("masked", 1, 2e9, 1): "20"})
    with pytest.raises(UserError, match=r"with this command's seeds, 1 run"):  # fewer seeds: named as such
        reconcile(asdict(replace(scfg, seeds=2, floor_seeds=0)), replace(scfg, seeds=1, floor_seeds=0), tmp_path)
    (tmp_path / "slurm" / "jobs.json").unlink()
    for p in make_plan(replace(scfg, depths=[1, 2]), tmp_path):  # every planned run has begun from here on
        (tmp_path / "runs" / p.name).mkdir(parents=True)
    with pytest.raises(UserError, match="with this command's depths, 5 run"):  # the axis that drops the example run
        reconcile({**saved, "depths": [1, 2]}, replace(scfg, objectives=["masked", "diffusion"]), tmp_path)
    refusals = {
        "budgets": replace(scfg, budgets=[2e9, 8e9]),
        "seeds": replace(scfg, floor_seeds=1),
        "train.lr": replace(scfg, overrides=scfg.overrides + ["train.lr=5e-3"]),
        "eval_samples": replace(scfg, eval_samples=64),
        "eval_steps": replace(scfg, eval_steps={**scfg.eval_steps, "masked": []}),
        "tokenizer": replace(scfg, tokenizer="learned"),
    }
    for name, bad in refusals.items():
        with pytest.raises(UserError) as e:
            reconcile(saved, bad, tmp_path)
        assert name in str(e.value) and "another --out" in str(e.value), (name, str(e.value))


def test_presets_hold_prompts_out_of_training():
    """Every preset holds the same colour+shape combos and arrangements out of training; the cpu preset's
    250 evaluation prompts include 57 held-out ones (enough to report the held-out rate apart)."""
    for name in ("cpu", "cpu-long", "gpu", "tiny"):
        cfg = apply_overrides(RunConfig(), study_preset(name).overrides)
        assert tuple(cfg.data.holdout) == HOLDOUT_COMBOS and tuple(cfg.data.holdout_relations) == HOLDOUT_RELATIONS
    cfg = apply_overrides(RunConfig(), study_preset("cpu").overrides)
    prompts = eval_prompts(make_dataset(cfg.data, "eval"), study_preset("cpu").eval_samples)
    groups = prompt_groups(prompts, cfg.data.holdout, cfg.data.holdout_relations)
    assert sum("held_out" in g for g in groups) == 57 and len(groups) == 250


def test_the_shapes_holdout_is_dropped_on_other_data_and_refused_when_asked_for(tmp_path, capsys):
    """On folder data the presets' holdout (scenes of the shapes data) would be recorded and never applied: the
    study's runs get none, a run config written before keeps reading equal to today's, and a
    holdout the user asks for on such data is refused in one line (train and study)."""
    scfg = replace(study_preset("tiny"), overrides=[*study_preset("tiny").overrides, f"data.name=folder:{tmp_path}"])
    plan = make_plan(scfg, tmp_path / "s")
    assert plan and all(not p.config["data"]["holdout"] and not p.config["data"]["holdout_relations"] for p in plan)
    old = from_dict(RunConfig, {**plan[0].config, "data": {**plan[0].config["data"], "holdout": list(HOLDOUT_COMBOS)}})
    assert to_dict(old) == plan[0].config  # read as trained: without the holdout that was never applied
    for argv in (["train", "--objective", "masked", "--budget", "1e10", "--out", str(tmp_path / "r")],
                 ["study", "--preset", "tiny", "--plan-only", "--no-calibrate", "--out", str(tmp_path / "st")]):
        assert cli.main([*argv, "--data", f"folder:{tmp_path}", "--set", "data.holdout=red circle"]) == 2
        assert "data.holdout holds out scenes of the built-in shapes data" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "st").exists()


def test_base_seeds_share_no_run():
    """Studies with base seeds 0 and 1 train disjoint seeds, the floor seeds at the middle budget included."""
    scfg = replace(tiny_study(), seeds=1, floor_seeds=2)
    mid = sorted(scfg.budgets)[1]
    assert cell_seeds(scfg, mid) == [0, 1, 2] and cell_seeds(scfg, scfg.budgets[0]) == [0]
    other = replace(scfg, base_seed=1)
    assert not set(cell_seeds(other, mid)) & set(cell_seeds(scfg, mid))
    assert cell_seeds(other, mid) == [1000, 1001, 1002]


def test_a_study_with_another_base_seed_grows_its_seeds(tmp_path):
    """Base seed 1: growing seeds keeps every run (the first seed does not move) and adds only the new seeds; a study
    made when base 1 started at base * (seeds + floor_seeds) keeps its seeds pinned, grows along other axes, and
    refuses more seeds (they would be base 2's)."""
    scfg = replace(tiny_study(), seeds=1, floor_seeds=2, base_seed=1)
    grown = replace(scfg, seeds=2)
    _, plan, added = reconcile(asdict(scfg), grown, tmp_path)
    assert sorted({p.seed for p in added}) == [1001, 1003] and len(plan) == len(make_plan(scfg, tmp_path)) + 3
    legacy = {k: v for k, v in asdict(scfg).items() if k != "first_seed"}  # a study.json from before first_seed
    more = replace(scfg, budgets=[*scfg.budgets, 1.6e10])
    begun = tmp_path / "begun"  # its floor budget's runs have begun: the floor stays there
    (begun / "runs" / run_name("masked", 1, 4e9, 3)).mkdir(parents=True)
    pinned, plan, added = reconcile(legacy, more, begun)
    assert pinned.first_seed == 3 and {p.seed for p in plan} == {3, 4, 5} and [(p.budget, p.seed) for p in added] == [(1.6e10, 3)]
    for saved in (legacy, asdict(pinned)):  # the pin is kept in study.json, and so is the refusal
        with pytest.raises(UserError, match="more seeds would reuse base seed 2's"):
            reconcile(saved, replace(more, seeds=2), begun)
    assert reconcile(asdict(scfg), replace(scfg, base_seed=2), tmp_path)[0].base_seed == 2  # no run began: free
    for p in make_plan(scfg, tmp_path):
        (tmp_path / "runs" / p.name).mkdir(parents=True)
    with pytest.raises(UserError, match=r"made with base seed 1; base seed 2 trains other seeds, which is another study"):
        reconcile(asdict(scfg), replace(scfg, base_seed=2), tmp_path)  # not an axis to add to


def test_study_refuses_changed_settings(tmp_path):
    """A study directory refuses settings that would make its cells incomparable, naming the setting (once it holds
    results: one that produced nothing takes new settings, test_bad_input.py)."""
    out = tmp_path / "s"
    atomic_write_json(out / "study.json", asdict(replace(tiny_study(), eval_samples=99)))
    (out / "runs" / "masked-d1-b1e9-s0").mkdir(parents=True)  # a run started under the saved settings
    with pytest.raises(UserError, match="eval_samples=99"):
        study(out, tiny_study(), progress=False)


def test_local_workers_get_one_gpu_each(tmp_path, monkeypatch):
    """With several GPUs visible, each worker slot sees one of them (as cuda:0); slots are reused as jobs finish.

    No GPU here: the devices come from CUDA_VISIBLE_DEVICES and the worker processes are stand-ins that
    record their environment (the launcher's bookkeeping is what is tested, not CUDA)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    seen = []

    class Done:
        returncode = 0

        def __init__(self, cmd, stdout, stderr, env):
            seen.append(env["CUDA_VISIBLE_DEVICES"])

        def poll(self):
            return 0

    monkeypatch.setattr(flopmatch.study.launchers.subprocess, "Popen", Done)
    jobs = [{"name": f"j{i}"} for i in range(5)]
    done = []
    LocalWorkersLauncher(2, tmp_path).run(jobs, done.append)
    assert len(done) == 5 and seen[:2] == ["3", "5"] and set(seen) == {"3", "5"}


@pytest.mark.slow
def test_wsd_study_chains_runs_through_their_stable_phase(tmp_path):
    """Under train.schedule=wsd a study trains each (paradigm, depth, seed) as one chain: a larger budget's run
    starts from the smaller one's stable-phase state and ends with exactly the weights of a run trained alone."""
    scfg = main_setting_only(tiny_study(objectives=("masked",), budgets=(2e9, 4e9)))
    scfg.overrides += ["train.schedule=wsd", "train.warmup_steps=5"]
    out = tmp_path / "study"
    plans = make_plan(scfg, out)
    assert chained_flops(plans) < sum(p.train_flops for p in plans)
    study(out, scfg, progress=False, calibrate_host=False)
    small, large = (out / "runs" / p.name for p in plans)
    branched = read_state(large)["branched_from"]
    assert branched["run"] == small.name and branched["step"] == read_state(small, STABLE_CHECKPOINT)["step"] > 0
    alone = tmp_path / "alone"
    train(from_dict(RunConfig, plans[1].config), alone, progress=False)
    assert _tensors(large) == _tensors(alone)
    with open(out / "results.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert {r["schedule"] for r in rows.values()} == {"wsd"}
    origin = f"branched from {small.name} at step {branched['step']}"  # the report says which schedule made each point
    assert rows[small.name]["origin"] == "scratch" and rows[large.name]["origin"] == origin
    assert f"| wsd ({origin}) |" in (out / "report.md").read_text()


def test_growing_a_study_names_only_what_it_adds(tmp_path, capsys):
    """Without --preset, an existing study's own settings are the defaults: `--budgets` alone adds budgets to its one
    paradigm and keeps its tiny preset's settings and its --set values (repeated ones kept once), where the cpu
    preset's defaults would add paradigms or be refused as incomparable."""
    out = tmp_path / "s"
    scfg = replace(tiny_study(), overrides=[*tiny_study().overrides, "train.lr=2e-3"])
    atomic_write_json(out / "study.json", asdict(scfg))
    (out / "runs" / run_name("masked", 1, 2e9, 0)).mkdir(parents=True)  # the study has begun
    capsys.readouterr()
    argv = ["study", "--out", str(out), "--budgets", "2e9,4e9,8e9,1.6e10", "--set", "train.lr=2e-3", "--plan-only",
            "--no-calibrate"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "settings this command does not give are its own" in text
    planned = [n for n in (run_name(p, 1, b, 0) for p in PARADIGMS for b in (2e9, 4e9, 8e9, 1.6e10)) if n in text]
    assert planned == [run_name("masked", 1, b, 0) for b in (2e9, 4e9, 8e9, 1.6e10)]
    # --preset given: the preset's settings, compared with the saved ones (the tiny preset without train.lr: refused)
    assert cli.main(["study", "--out", str(out), "--preset", "tiny", "--plan-only", "--no-calibrate"]) == 2
    assert "train.lr" in capsys.readouterr().err


def test_repeated_study_settings_keep_their_last_place():
    """Overrides apply in order, so of a repeated one the last must stay last (the saved study's command line and this
    one's together): dropping the later copy would let an earlier, different value win."""
    from flopmatch.cli.study import _last_of_each

    assert _last_of_each(["a=1", "b=", "b=x", "a=1", "b="]) == ["b=x", "a=1", "b="]


def _checkpoint(run, device_type="cpu", bf16=False, step=4, done=True):
    """A stand-in run directory: config.json and a checkpoint whose state records where it trained (no tensors that
    matter: growth reads only the state)."""
    import torch

    from flopmatch.files import save_tensors

    state = {"step": step, "total_steps": 4, "flops": 0, "done": done, "net_spec": {}, "device_type": device_type,
             "bf16": bf16}
    save_tensors(run / CHECKPOINT, {"x": torch.zeros(1)}, metadata={"state": json.dumps(state)})
    atomic_write_json(run / "config.json", {})


def test_a_mistyped_floor_budget_can_be_dropped_until_it_begins(tmp_path, capsys):
    """A study re-run once pins its floor budget (variance seeds, post-hoc EMA sweep) in study.json; a later command
    that drops that budget is accepted while nothing began there (the floor is the new middle), and refused in one
    line that says to keep it once a run there began, naming how to drop an unfinished run begun by mistake."""
    out = tmp_path / "s"
    scfg = replace(tiny_study(budgets=(2e9, 3e9, 4e9)), floor_budget=3e9)  # 3e9 mistyped; pinned by a re-run
    assert scfg.eval_ema  # the tiny preset's post-hoc EMA sweep sits at the floor budget
    atomic_write_json(out / "study.json", asdict(scfg))
    for b in (2e9, 4e9):
        (out / "runs" / run_name("masked", 1, b, 0)).mkdir(parents=True)
    argv = ["study", "--out", str(out), "--budgets", "2e9,4e9", "--plan-only", "--no-calibrate"]
    capsys.readouterr()
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert run_name("masked", 1, 3e9, 0) not in text and run_name("masked", 1, 4e9, 0) in text
    (out / "runs" / run_name("masked", 1, 3e9, 0)).mkdir()  # it began (killed before its first checkpoint)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "with this command's budgets, 1 run(s)" in err[0], err
    assert "keep 3e+09 in --budgets" in err[0] and f"delete {out / 'runs' / run_name('masked', 1, 3e9, 0)}" in err[0]
    assert "floor_budget" not in err[0].replace(str(tmp_path), "")  # no internal key


def test_new_cells_train_as_the_old_ones_did(tmp_path, capsys):
    """A study whose runs trained on another kind of device, or in another precision, than its new runs would here
    (train.device / train.precision auto) is refused in one line naming the key, before anything is written; the
    same kind is accepted."""
    import torch

    from flopmatch.device import use_bf16
    from flopmatch.study.grow import check_same_machine

    out = tmp_path / "s"
    scfg = main_setting_only(tiny_study(budgets=(2e9, 4e9)))
    scfg.overrides += ["train.precision=auto"]  # (the tiny preset pins fp32)
    atomic_write_json(out / "study.json", asdict(scfg))
    old = out / "runs" / run_name("masked", 1, 2e9, 0)
    plans = make_plan(scfg, out)
    _checkpoint(old, "cuda", True)
    with pytest.raises(UserError, match=r"trained 1 run\(s\) in cuda bf16 .*train\.device auto resolves per machine.*"
                                        r"--set train\.device=cuda"):
        check_same_machine(out, plans)
    here = use_bf16("auto", torch.device("cpu"))
    _checkpoint(old, "cpu", not here)
    with pytest.raises(UserError, match=r"train\.precision auto resolves per machine.*--set train\.precision="):
        check_same_machine(out, plans)
    before = (out / "study.json").read_bytes()
    capsys.readouterr()
    for argv in (["--plan-only"], []):  # the preview and the study refuse alike, writing nothing
        assert cli.main(["study", "--out", str(out), "--no-calibrate", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "train.precision" in err[0], err
    assert (out / "study.json").read_bytes() == before and not (out / "plan.json").exists()
    _checkpoint(old, "cpu", here)
    check_same_machine(out, plans)


def test_mixed_evaluators_are_named(tmp_path):
    """Runs scored by two prompt evaluators (a study grown on a machine that trained its own) get a warning that
    counts them; one evaluator, none."""
    from flopmatch.study.grow import mixed_evaluators

    plans = make_plan(tiny_study(budgets=(2e9, 4e9)), tmp_path)
    for p, sha in zip(plans, ("aa" * 32, "bb" * 32)):
        manifest = {"prompt_evaluator": {"name": "shapes-attribute-classifier", "sha256": sha},
                    "feature_extractors": {"effnet": {"name": "effnet", "weights_sha256": "cc" * 32}}}
        atomic_write_json(tmp_path / "runs" / p.name / "eval.json", {"version": 1, "entries": {"k": {"manifest": manifest}}})
    warning = mixed_evaluators(tmp_path, plans)
    assert "shapes-attribute-classifier aaaaaaaa: 1 run(s), shapes-attribute-classifier bbbbbbbb: 1 run(s)" in warning
    assert "effnet" not in warning and mixed_evaluators(tmp_path, plans[:1]) is None


def test_plan_marks_what_each_run_needs_and_trained_runs_cost_no_training(tmp_path):
    """The plan table of an existing study says which runs are done, trained but to evaluate, to resume or new, and
    the estimate counts no training for trained runs (a study grown along an evaluation axis)."""
    from flopmatch.study.estimate import estimate
    from flopmatch.study.plan import format_plan
    from flopmatch.study.runner import plan_status

    scfg = main_setting_only(tiny_study(budgets=(2e9, 4e9, 8e9, 1.6e10)))
    plans = make_plan(scfg, tmp_path)
    for p, (step, done) in zip(plans, ((4, True), (4, True), (2, False))):
        (tmp_path / "runs" / p.name).mkdir(parents=True)
        _checkpoint(tmp_path / "runs" / p.name, step=step, done=done)
    status = plan_status(tmp_path, plans, frozenset({plans[0].name}))
    assert list(status.values()) == ["done", "evaluate", "resume at step 2", "new"]
    table = format_plan(plans, status).splitlines()
    assert table[0].endswith("status") and table[2].endswith("evaluate") and table[4].endswith("new")
    trained = frozenset(p.name for p in plans)
    assert estimate(scfg, plans, tmp_path, trained=trained)["training"] == 0
    whole = estimate(scfg, plans, tmp_path)["training"]
    assert whole > 0
    # a run stopped halfway is counted for the steps it has left; one stopped at its last step for none
    run = plans[2]
    left = [estimate(scfg, plans, tmp_path, steps_done={run.name: s})["training"] for s in (0, run.steps // 2, run.steps)]
    assert left[0] == whole > left[1] > left[2]
    assert left[1] - left[2] == pytest.approx((left[0] - left[2]) * (1 - (run.steps // 2) / run.steps))
