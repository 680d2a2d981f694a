"""The study report: a pure function of run directories (rows, fits, verdicts on the claims, the decision table, files).

The synthetic studies below contain exactly the files the report reads (config.json, a checkpoint
whose metadata is the training state ``read_state`` returns, metrics.jsonl, eval.json in the schema
of ``flopmatch.evaluation.run``, saved sample images), with metrics that follow known laws
``E + A (C / C0)^-alpha`` (C0 = geometric mean of the budgets, as in flopmatch.report.powerlaw), times a
15 % penalty off the best depth, times multiplicative seed noise. No training happens.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import re
import shutil
import zlib
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from flopmatch.cli.report import register
from flopmatch.config import ModelConfig, RunConfig, SampleConfig, TextConfig, TrainConfig
from flopmatch.evaluation.run import setting_key
from flopmatch.files import atomic_write_json, atomic_write_text, save_tensors
from flopmatch.report import convention
from flopmatch.report.analysis import EXTRAPOLATE, Analyser
from flopmatch.report.build import DEFAULT_N_BOOT, build_report, results_csv, study_n_boot
from flopmatch.report.data import COLUMNS, RunInfo, Study, load_study, main_setting
from flopmatch.report.findings import analyse
from flopmatch.report.plots import iso_flops
from flopmatch.report.prompt_groups import (
    adjusted_difference,
    difference_interval,
    group_counts,
    prompt_group_blocks,
    wilson_interval,
)
from flopmatch.report.render import render_md
from flopmatch.report.stats import TestResult
from flopmatch.report.verdicts import Comparison, _reason, against_claim, cell_text, claim_status, decide, mdd_text, part_status
from flopmatch.rundir import CHECKPOINT, write_config

PARADIGMS = ("diffusion", "masked", "autoregressive")
# (E, A, alpha) per paradigm: next-token starts best on FID, diffusion has the steepest trend and is best at 1e14
FID_LAW = {"diffusion": (3.0, 60.0, 0.6), "masked": (8.0, 30.0, 0.3), "autoregressive": (10.0, 20.0, 0.25)}
PROMPT_ERR_LAW = {"diffusion": (0.10, 0.40, 0.3), "masked": (0.08, 0.20, 0.3), "autoregressive": (0.05, 0.10, 0.3)}
LOSS_LAW = {"diffusion": (0.3, 0.5, 0.2), "masked": (2.0, 1.5, 0.15), "autoregressive": (3.0, 2.0, 0.1)}
DEFAULT_STEPS = {"diffusion": 25, "masked": 12, "autoregressive": 64}  # AR: one step per token of an 8x8 grid
SWEEP = {"diffusion": (10, 25, 50), "masked": (6, 12, 24), "autoregressive": (64,)}
# inference (x depth^2): next-token fewest FLOPs and best throughput, diffusion lowest latency
FLOPS_PER_STEP = {"diffusion": 4e6, "masked": 4e6, "autoregressive": 0.3e6}
LATENCY_PER_STEP = {"diffusion": 1e-3, "masked": 3e-3, "autoregressive": 1.5e-3}
THROUGHPUT = {"diffusion": 50.0, "masked": 80.0, "autoregressive": 400.0}
EMA_GAIN = {"diffusion": 0.3, "masked": 0.05, "autoregressive": 0.05}  # relative FID reduction by EMA
# relative FID reduction from raw weights by post-hoc EMAs of each sigma_rel (the "ema@SIGMA" entries of raw runs)
POSTHOC_GAIN = {"diffusion": {0.05: 0.2, 0.1: 0.35, 0.2: 0.25}, "masked": {0.05: 0.08, 0.1: 0.03, 0.2: 0.0},
                "autoregressive": {0.05: 0.02, 0.1: 0.04, 0.2: 0.01}}
PROMPTS = [f"a {c} {s}" for c, s in zip(["red", "green", "blue", "yellow"] * 2, ["circle", "square", "triangle"] * 3)]
BUDGETS = (1e12, 10**12.5, 1e13, 10**13.5, 1e14)  # 5 budgets over 2 decades: enough for a fitted law
N_BOOT = 100
# images behind each fake evaluation: the fake full-match rates carry ~1 % noise, as precise as a binomial rate over
# this many images (the verdicts add each rate's binomial noise at its image count, verdicts.cell_var)
FAKE_IMAGES = 100_000


def _law(C: float, params: tuple, C0: float) -> float:
    E, A, alpha = params
    return E + A * (C / C0) ** (-alpha)


def _net_spec(p: str, depth: int) -> dict:
    return {"depth": depth, "width": 64 * depth, "heads": depth, "mlp_ratio": 4,
            "tokens": "continuous" if p == "diffusion" else "discrete", "grid": 8,
            "channels": 48 if p == "diffusion" else 0, "vocab": 0 if p == "diffusion" else 512,
            "text_dim": 64, "text_len": 24, "causal": p == "autoregressive", "time": p == "diffusion"}  # fmt: skip


def make_run(root: Path, p: str, depth: int, budget: float, seed: int, *, fid: float, prompt_err: float, loss: float,
             rng: np.random.Generator, evaluate: bool = True, done: bool = True, raw: bool = False,
             fid_sd: float = 0.0, posthoc: bool | None = None) -> Path:
    """One fake run directory whose main (default-steps, EMA) setting has the given metrics.

    ``fid_sd`` > 0 adds FID bootstrap replicates (100, normal with that relative sd, shifted up as real ones are);
    ``raw`` adds raw-weight entries, and post-hoc EMA ones too unless ``posthoc`` is False."""
    posthoc = raw if posthoc is None else posthoc
    run = root / "runs" / f"{p}-d{depth}-{budget:.2e}-s{seed}"
    cfg = RunConfig(objective=p, text=TextConfig(kind="hash"), model=ModelConfig(depth=depth),
                    train=TrainConfig(budget=budget, seed=seed))  # fmt: skip
    write_config(run, cfg)
    per_step, total = budget / 40, 41
    step = total if done else 20
    state = {"step": step, "total_steps": total, "flops": step * per_step, "budget": budget, "flops_per_step": per_step,
             "params": 12 * (64 * depth) ** 2 * depth, "done": done, "objective": p, "net_spec": _net_spec(p, depth)}
    save_tensors(run / CHECKPOINT, {"model.w": torch.zeros(1)}, metadata={"state": json.dumps(state), "param_groups": "[]"})
    logged = [{"step": 2 * (i + 1), "loss": loss * (1 + 2.0 / (i + 1)) if i < 15 else loss, "lr": 1e-3,
               "flops": 2 * (i + 1) * per_step, "elapsed_s": float(i)} for i in range(step // 2)]  # fmt: skip
    atomic_write_text(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in logged))
    if not evaluate:
        return run
    entries, default = {}, DEFAULT_STEPS[p]
    for steps in SWEEP[p]:
        for weights in ("ema", "model", *(f"ema@{x:g}" for x in POSTHOC_GAIN[p] if posthoc)) if raw else ("ema",):
            if weights != "ema" and steps != default:
                continue
            sample = replace(SampleConfig(), steps=0 if p == "autoregressive" else steps)
            key = setting_key(sample, steps) + f",weights={weights},n={FAKE_IMAGES},seed=0"
            # more steps -> better FID, so "lowest FID" would NOT pick the default setting: tests the main rule
            f = fid * (default / steps) ** 0.15 / (1 - EMA_GAIN[p] if weights != "ema" else 1.0)
            if "@" in weights:
                f *= 1 - POSTHOC_GAIN[p][float(weights.split("@")[1])]
            lat = LATENCY_PER_STEP[p] * steps * depth**2
            lats = [lat * (1 + 0.03 * rng.standard_normal()) for _ in range(3)]
            inf = {"sample_flops_per_image": int(FLOPS_PER_STEP[p] * steps * depth**2), "decode_flops_per_image": 1000,
                   "latency_s": float(np.median(lats)), "latency_s_all": lats,
                   "throughput_images_per_s": THROUGHPUT[p] / depth**2 * (1 + 0.03 * rng.standard_normal()),
                   "throughput_batch": 16, "device": "cpu", "threads": 2, "bf16": False}  # fmt: skip
            if p == "autoregressive":
                inf["without_kv_cache"] = {**inf, "sample_flops_per_image": inf["sample_flops_per_image"] * 20,
                                           "latency_s": lat * 5, "throughput_images_per_s": inf["throughput_images_per_s"] / 8}
            pf = {a: 1 - prompt_err / 2 for a in ("color", "shape", "size", "position", "relation", "count")}
            entries[key] = {"settings": {**asdict(sample), "steps": steps},
                            "metrics": {"effnet": {"fid": f, "kid": f / 1e3, "kid_std": 1e-4, "precision": 0.5, "recall": 0.5},
                                        "prompt_following": {**pf, "full_match": 1 - prompt_err}},
                            "inference": inf, "manifest": {"weights": weights, "num_samples": FAKE_IMAGES}}  # fmt: skip
            if "@" in weights:
                entries[key]["manifest"]["posthoc_ema"] = {"profile_residual": 0.02}
            if fid_sd:
                reps = (f * (1.1 + fid_sd * rng.standard_normal(100))).tolist()
                entries[key]["metrics"]["effnet"]["fid_boot"] = {"n": 100, "std": float(np.std(reps, ddof=1)), "replicates": reps}
                kreps = (f / 1e3 * (1.0 + fid_sd * rng.standard_normal(100))).tolist()
                entries[key]["metrics"]["effnet"]["kid_boot"] = {"n": 100, "std": float(np.std(kreps, ddof=1)), "replicates": kreps}
            if weights == "ema" and steps == default:
                sd = run / "samples" / key.replace(",", "_").replace("=", "-")
                g = torch.Generator().manual_seed(zlib.crc32(run.name.encode()))
                imgs = torch.randint(0, 256, (8, 3, 8, 8), generator=g, dtype=torch.uint8)
                save_tensors(sd / "images.safetensors", {"images": imgs.repeat_interleave(2, 2).repeat_interleave(2, 3)})
                atomic_write_json(sd / "prompts.json", PROMPTS)
    atomic_write_json(run / "eval.json", {"version": 1, "entries": entries})
    return run


def write_timing_phase(root: Path, paradigms, depths, rng: np.random.Generator, rounds: int = 5) -> None:
    """An inference_timing.json as the study's timing phase writes it: every setting of SWEEP per (paradigm, depth),
    rounds with 3 % noise around the same laws as make_run's per-run timings."""
    items = []
    for p in paradigms:
        for d in depths:
            for steps in SWEEP[p]:
                sample = replace(SampleConfig(), steps=0 if p == "autoregressive" else steps)
                lat = LATENCY_PER_STEP[p] * steps * d**2 * (1 + 0.03 * rng.standard_normal(rounds))
                thr = THROUGHPUT[p] / d**2 * (1 + 0.03 * rng.standard_normal(rounds))
                item = {"objective": p, "depth": d, "run": f"{p}-d{d}", "setting": setting_key(sample, steps),
                        "sample": asdict(sample), "latency_s": float(np.median(lat)), "latency_rounds": lat.tolist(),
                        "latency_spread": float(lat.max() / lat.min() - 1), "throughput_images_per_s": float(np.median(thr)),
                        "throughput_rounds": thr.tolist(), "throughput_batch": 16}  # fmt: skip
                if p == "autoregressive":
                    item["without_kv_cache"] = {"latency_s": float(np.median(lat)) * 5, "latency_rounds": (lat * 5).tolist(),
                                                "throughput_images_per_s": float(np.median(thr)) / 8}
                items.append(item)
    atomic_write_json(root / "inference_timing.json", {"version": 1, "signature": [], "rounds": rounds, "items": items,
                                                        "machine": {"device": "cpu", "threads": 2, "bf16": False}})


def make_study(root: Path, paradigms=PARADIGMS, depths=(2, 4), budgets=BUDGETS, seeds=(0, 1), noise: float = 0.01,
               raw: bool = False, skip_eval=(), unfinished=(), laws: dict | None = None, rng_seed: int = 0,
               fid_sd: float = 0.0, timing_phase: bool = True, posthoc_budgets=None) -> Path:
    """A study directory of fake runs following the laws (``skip_eval`` / ``unfinished``: run names), with the
    timing phase's file unless ``timing_phase`` is False (then only the runs' own eval timings exist)."""
    rng = np.random.default_rng(rng_seed)
    laws = laws or {"fid": FID_LAW, "prompt": PROMPT_ERR_LAW, "loss": LOSS_LAW}
    C0 = math.exp(np.mean(np.log(budgets)))
    for p in paradigms:
        for d in depths:
            for b in budgets:
                best = min(depths) if b == min(budgets) else max(depths)  # small model wins the smallest budget
                for s in seeds:
                    y = {k: _law(b, laws[k][p], C0) * (1.0 if d == best else 1.15) * math.exp(noise * rng.standard_normal())
                         for k in laws}  # fmt: skip
                    name = f"{p}-d{d}-{b:.2e}-s{s}"
                    make_run(root, p, d, b, s, fid=y["fid"], prompt_err=min(y["prompt"], 1.0), loss=y["loss"], rng=rng,
                             evaluate=name not in skip_eval, done=name not in unfinished, raw=raw, fid_sd=fid_sd,
                             posthoc=None if posthoc_budgets is None else b in posthoc_budgets)  # fmt: skip
    if timing_phase:
        write_timing_phase(root, paradigms, depths, rng)
    return root


def _read(paths: dict) -> dict[str, bytes]:
    return {k: Path(paths[k]).read_bytes() for k in ("html", "md", "csv")}


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """3 paradigms x 2 depths x 5 budgets x 3 seeds, with raw-weight entries (files only, ~2 s)."""
    return make_study(tmp_path_factory.mktemp("study"), raw=True, seeds=(0, 1, 2))


@pytest.fixture(scope="module")
def study(study_dir):
    """The synthetic study and the result of building its report (~5 s of plotting)."""
    return study_dir, build_report(study_dir, n_boot=N_BOOT, seed=0)


# ------------------------------------------------------------------------------------------ rows


def test_one_row_per_run_and_setting(study_dir):
    """Study rows: one row per (run, eval entry), every column present, one main row per run at the default steps."""
    root = study_dir
    rows = load_study(root).rows
    runs = sorted((root / "runs").iterdir())
    n_entries = sum(len(json.loads((r / "eval.json").read_text())["entries"]) for r in runs)
    assert len(rows) == n_entries and all(set(COLUMNS) <= set(r) for r in rows)
    mains = [r for r in rows if r["main"]]
    assert len(mains) == len(runs) and len({r["run"] for r in mains}) == len(runs)
    assert all(r["sample_steps"] == DEFAULT_STEPS[r["objective"]] and r["weights"] == "ema" for r in mains)
    assert all(r["train_flops"] == pytest.approx(r["budget"] * 41 / 40) and r["steps"] == 41 for r in rows)
    assert rows == load_study(root).rows  # deterministic order


def test_final_loss_is_mean_of_last_tenth(study_dir):
    """final_loss is the mean of the last 10 % of the logged losses (at least one row)."""
    root = study_dir
    row = load_study(root).rows[0]
    losses = [json.loads(ln)["loss"] for ln in (root / row["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    k = math.ceil(0.1 * len(losses))
    assert row["final_loss"] == pytest.approx(sum(losses[-k:]) / k)


def test_main_setting_falls_back_to_lowest_fid():
    """With no entry matching the default settings the main setting is the lowest-FID one, and says so."""
    entries = {k: {"settings": {**asdict(SampleConfig()), "steps": s}, "metrics": {"effnet": {"fid": fid}},
                   "manifest": {"weights": "ema"}} for k, s, fid in (("a", 5, 30.0), ("b", 50, 20.0))}  # fmt: skip
    assert main_setting(entries, SampleConfig(), 25) == ("b", "no entry matches the default settings: lowest FID (effnet) chosen")
    key, why = main_setting(entries, SampleConfig(), 5)
    assert key == "a" and why.startswith("matches")
    # FID is biased by the number of images: the fallback compares entries of the full set only, never a sweep's
    # small-set entry against a full-set one
    entries["a"]["manifest"]["num_samples"], entries["b"]["manifest"]["num_samples"] = 500, 100
    assert main_setting(entries, SampleConfig(), 25)[0] == "a"
    entries["b"]["manifest"]["num_samples"] = 500
    assert main_setting(entries, SampleConfig(), 25)[0] == "b"


# ------------------------------------------------------------------------------------------ purity


@pytest.mark.slow
def test_report_is_a_pure_function_of_the_run_directories(study, tmp_path, capsys):
    """`flopmatch report` on a copy of the runs and the timing file elsewhere writes byte-identical html, md and csv;
    without --n-boot it resamples as many times as the study's settings (study.json) say, as the study did."""
    root, first = study
    shutil.copytree(root / "runs", tmp_path / "runs")  # the report's inputs: run directories and the timing phase
    shutil.copy(root / "inference_timing.json", tmp_path / "inference_timing.json")
    (tmp_path / "study.json").write_text(json.dumps({"preset": "cpu", "n_boot": N_BOOT}))
    assert N_BOOT != DEFAULT_N_BOOT
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["report", str(tmp_path), "--seed", "0"])
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert "claim 1: HELD" in out.out and "warning:" not in out.err
    # the terminal's table lines say what the report's cells say (the operating points' mark included)
    for cell in first["table"]:
        if cell["label"] != "not measured":
            assert f"- {cell['need']} at {cell['budget']:.3g} FLOPs: {cell_text(cell)}\n" in out.out
    paths = {k: tmp_path / Path(v).name for k, v in first["paths"].items() if k != "figures"}
    assert _read(paths) == _read(first["paths"])
    figs = sorted(p.name for p in (root / "report_figures").iterdir())
    assert figs == sorted(p.name for p in (tmp_path / "report_figures").iterdir())
    assert all((root / "report_figures" / f).read_bytes() == (tmp_path / "report_figures" / f).read_bytes() for f in figs)
    # a run the report could not read is a warning on the terminal too, not only a line under "Runs"
    broken = sorted((tmp_path / "runs").iterdir())[0]
    (broken / "eval.json").write_text("{not json")
    assert args.func(args) == 0
    assert f"warning: {broken.name}: " in capsys.readouterr().err


@pytest.mark.slow
def test_results_csv_round_trips_rows(study):
    """results.csv has the COLUMNS header and one line per (run, setting), values as in load_study().rows."""
    root, out = study
    rows = load_study(root).rows
    table = list(csv.DictReader(io.StringIO(Path(out["paths"]["csv"]).read_text())))
    assert list(table[0]) == COLUMNS and len(table) == len(rows)
    for r, t in zip(rows, table):
        assert (t["run"], t["setting"]) == (r["run"], r["setting"])
        assert float(t["fid_effnet"]) == r["fid_effnet"]  # repr floats: exact
    assert results_csv(rows) == Path(out["paths"]["csv"]).read_text()


# ------------------------------------------------------------------------------------------ content


@pytest.mark.slow
def test_fits_recover_synthetic_exponents(study):
    """The FID and prompt-error trends fitted in the report recover the synthetic alphas within 25 %."""
    _, out = study
    fits = {(f["metric"], f["paradigm"]): f for f in out["fits"]}
    for metric, laws in (("kid", FID_LAW), ("fid", FID_LAW), ("prompt", PROMPT_ERR_LAW)):  # KID: FID / 1000 here
        for p in PARADIGMS:
            f = fits[(metric, p)]
            assert f["budgets"] == 5 and f["alpha"] == pytest.approx(laws[p][2], rel=0.25), (metric, p, f)
    assert all(f["kind"] in ("saturating", "power") for f in fits.values())


@pytest.mark.slow
def test_claims_follow_the_synthetic_truth(study):
    """The synthetic data were made to agree with the paper and have 3 seeds: every claim is 'held'."""
    _, out = study
    assert [c["id"] for c in out["claims"]] == [1, 2, 3, 4]
    assert [c["status"] for c in out["claims"]] == ["held"] * 4, [(c["id"], c["reason"]) for c in out["claims"]]


@pytest.mark.slow
def test_report_leads_with_the_decision_and_shows_figures(study):
    """report.md opens with banners, the budget x need table and one line per claim; every figure is there;
    report.html embeds all images."""
    root, out = study
    md = Path(out["paths"]["md"]).read_text()
    html = Path(out["paths"]["html"]).read_text()
    head = md[: md.index("## The paper's claims")]
    assert "## Which paradigm, for what" in head and "dataset shapes" in head and "Dashed trend lines are extrapolations" in head
    assert "One seed per cell" not in head  # three seeds: verdicts rest on seed noise
    assert "the verdicts hold for these tokenizers" in head  # the one noise source they leave out, said where they are
    table = {(c["budget"], c["need"]): c for c in out["table"]}
    top = max(BUDGETS)
    assert table[(top, "prompt following")]["choice"] == "autoregressive"
    assert table[(top, "latency")]["choice"] == "diffusion" and table[(top, "throughput")]["choice"] == "autoregressive"
    assert table[(min(BUDGETS), "image quality")]["choice"] == "autoregressive"
    assert md.index("**HELD**: (1)") < md.index("**HELD**: (4)") < md.index("report_figures/kid_vs_flops.png")
    for name in ("kid_vs_flops", "fid_vs_flops", "prompt_vs_flops", "loss_vs_flops", "iso_flop_kid", "pareto_flops", "pareto_latency",
                 "throughput", "step_sweep", "loss_curves", "ema_sweep"):  # fmt: skip
        assert f"report_figures/{name}.png" in md and (root / "report_figures" / f"{name}.png").exists()
    # self-contained: no external resources, every image a data URI (13 figures + 3 paradigms x 5 budgets strips)
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs) and len(srcs) == 13 + 15
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]*", "", html)  # base64 may contain any letters
    assert "href=" not in text and "http" not in text and "url(" not in text
    assert all(p in html for p in PROMPTS[:8])
    assert "EMA (a separate analysis" in md and "| diffusion |" in md[md.index("## EMA"):]
    assert "post-hoc EMA, sigma_rel 0.1 (lowest)" in md[md.index("## EMA"):]


def test_ema_analysis_compares_training_ema_on_the_sweep_runs(tmp_path):
    """Raw weights at every budget, post-hoc EMAs at the middle one only (as --eval-raw with --eval-ema): training's
    EMA is compared on the sweep's runs for the lowest and the figure, and once more on every run, apart."""
    from flopmatch.report.findings import ema_analysis

    root = make_study(tmp_path, paradigms=("diffusion", "masked"), depths=(2,), raw=True, seeds=(0, 1),
                      posthoc_budgets={BUDGETS[2]}, timing_phase=False)
    out = ema_analysis(load_study(root))
    for p in ("diffusion", "masked"):
        fixed = {e["scope"]: e for e in out if e["paradigm"] == p and e["weights"] == "ema"}
        assert fixed["sweep"]["n"] == 2 and fixed["all"]["n"] == 2 * len(BUDGETS)
        assert {r for r, *_ in fixed["sweep"]["per_run"]} == {r for e in out if e["paradigm"] == p and e["sigma_rel"]
                                                             for r, *_ in e["per_run"]}
        assert not fixed["all"]["best"] and fixed["sweep"]["vs_diffusion_p"] is None
        best = [e for e in out if e["paradigm"] == p and e["best"]]
        truth = {"ema": EMA_GAIN[p], **{f"ema@{x:g}": g for x, g in POSTHOC_GAIN[p].items()}}
        assert len(best) == 1 and best[0]["weights"] == max(truth, key=truth.get) and best[0]["scope"] == "sweep"
    masked_all = next(e for e in out if e["paradigm"] == "masked" and e["scope"] == "all")
    assert masked_all["vs_diffusion_p"] is not None  # Welch against diffusion, over every run


def test_ema_analysis_recovers_known_gains(study):
    """Raw, training-EMA and post-hoc EMA entries with known KID (and FID) ratios: every change is recovered run by
    run, the lowest average per paradigm is the one with the largest gain, and the residual is carried."""
    from flopmatch.report.findings import ema_analysis

    root, _ = study
    out = {(e["paradigm"], e["weights"]): e for e in ema_analysis(load_study(root))}
    for p in PARADIGMS:
        truth = {"ema": EMA_GAIN[p], **{f"ema@{x:g}": g for x, g in POSTHOC_GAIN[p].items()}}
        for w, gain in truth.items():
            e = out[(p, w)]
            assert e["n"] == 2 * len(BUDGETS) * 3 and e["mean_change"] == pytest.approx(-gain, abs=1e-9)
            assert all(c == pytest.approx(-gain, abs=1e-9) for _, _, _, c in e["per_run"])
            assert e["interval"][0] <= e["mean_change"] <= e["interval"][1]
            assert e["fid_change"] == pytest.approx(-gain, abs=1e-9)  # the fake FIDs move as the KIDs do
            assert (e["residual"] == 0.02) == (w != "ema")
        best = max(truth, key=truth.get)
        assert [w for (q, w), e in out.items() if q == p and e["best"]] == [best]


def test_ema_analysis_reads_kid_not_fids_bias(tmp_path):
    """FID's small-sample bias differs between models: raw weights' FIDs inflated 2x (their KIDs untouched) change
    the FID column only; the EMA verdict rests on KID."""
    from flopmatch.report.findings import ema_analysis

    root = make_study(tmp_path, paradigms=("diffusion", "masked"), depths=(2,), raw=True, seeds=(0, 1),
                      posthoc_budgets={BUDGETS[2]}, timing_phase=False)
    before = {(e["paradigm"], e["weights"], e["scope"]): e for e in ema_analysis(load_study(root))}
    for path in (root / "runs").glob("*/eval.json"):
        doc = json.loads(path.read_text())
        for entry in doc["entries"].values():
            if entry["manifest"]["weights"] == "model":
                entry["metrics"]["effnet"]["fid"] *= 2
        atomic_write_json(path, doc)
    after = {(e["paradigm"], e["weights"], e["scope"]): e for e in ema_analysis(load_study(root))}
    assert after.keys() == before.keys() and after
    for key, e in after.items():
        assert e["mean_change"] == pytest.approx(before[key]["mean_change"], abs=1e-12) and e["best"] == before[key]["best"]
        assert 1 + e["fid_change"] == pytest.approx((1 + before[key]["fid_change"]) / 2, rel=1e-9)


def test_loss_never_compared_across_paradigms(tmp_path):
    """Swapping training losses between paradigms changes their loss fits but no comparison, crossover, finding or advice."""
    swapped = {"diffusion": LOSS_LAW["autoregressive"], "masked": LOSS_LAW["masked"],
               "autoregressive": LOSS_LAW["diffusion"]}  # fmt: skip
    # same rng_seed: every file is identical except the losses (the noise draws do not depend on the laws)
    an, sw = (analyse(load_study(make_study(tmp_path / name, depths=(2,), laws={"fid": FID_LAW, "prompt": PROMPT_ERR_LAW,
                                                                                  "loss": loss})), n_boot=20, seed=0)
              for name, loss in (("as_made", LOSS_LAW), ("swapped", swapped)))  # fmt: skip
    for p in PARADIGMS:  # loss is fitted per paradigm, and the swap did reach it
        assert an.fits[("loss", p)].boot and sw.fits[("loss", p)].boot
    assert an.fits[("loss", "diffusion")].boot.point.predict(1e14) < 1 < 2 < sw.fits[("loss", "diffusion")].boot.point.predict(1e14)
    # cross-paradigm results exist (not vacuous) and none involves loss ...
    assert {(c["metric"], frozenset((c["a"], c["b"]))) for c in an.crossovers} == {
        (m, frozenset(pair)) for m in ("kid", "fid", "prompt") for pair in itertools.combinations(PARADIGMS, 2)}
    tests = [c for fam in an.verdicts.families.values() for c in fam]
    assert tests and {c.metric for c in tests} <= {"kid", "kid_trend", "prompt", "latency", "throughput"}
    # ... and none moves when the losses are swapped
    assert repr(sw.verdicts) == repr(an.verdicts) and repr(sw.crossovers) == repr(an.crossovers)


# ------------------------------------------------------------------------------------------ verdict logic


def test_status_rules():
    """A part holds only when every comparison is confident its way; one confident reversal makes it fail."""
    from flopmatch.report.stats import TestResult
    from flopmatch.report.verdicts import Comparison

    def comp(estimate, p_two, noise="seeds", capped=""):
        c = Comparison("claims", "fid", "a", "b", "at 1 FLOPs", TestResult(estimate, 0.1, 10.0, p_two / 2 if estimate < 0
                       else 1 - p_two / 2, 3, 3, "pooled"), noise, capped)  # fmt: skip
        c.p_adj, c.m = min(1.0, 5 * p_two), 5
        return c

    sure, weak, tie, back = comp(-1, 1e-4), comp(-1, 0.03), comp(-0.1, 0.5), comp(1, 1e-4)
    assert part_status([(sure, "a"), (sure, "a")]) == "held"
    assert part_status([(sure, "a"), (weak, "a")]) == "suggestive"  # 0.03 survives alone, not after Holm (0.15)
    assert part_status([(sure, "a"), (tie, "a")]) == "inconclusive" and part_status([]) == "not measured"
    assert part_status([(sure, "a"), (back, "a")]) == "did not hold"
    assert part_status([(comp(-1, 1e-4, "evaluation"), "a")]) == "suggestive"  # evaluation noise never decides
    assert part_status([(comp(-1, 1e-4, capped="chosen on the judged seed"), "a")]) == "suggestive"
    parts = [{"status": s} for s in ("held", "not measured")]
    # an unmeasured part keeps a claim from holding, and from being suggestive: it points no way (a one-budget study
    # measures claim 2's first part, never its trend)
    assert claim_status(parts) == "inconclusive"
    assert claim_status([{"status": "suggestive"}, {"status": "held"}]) == "suggestive"
    assert claim_status([{"status": "held"}] * 2) == "held"
    assert claim_status(parts + [{"status": "did not hold"}]) == "did not hold"
    # a lean the other way (significant before Holm, against the expected winner) is no support: the part is
    # inconclusive, its comparison is marked against the claim, and the claim's reason says it leans the other way
    lean = comp(1, 0.03)
    assert part_status([(lean, "a")]) == "inconclusive" and against_claim(lean, "a") and not against_claim(weak, "a")
    assert not against_claim(back, "a") and not against_claim(tie, "a")  # a reversal with confidence, a tie: said so
    why = _reason("inconclusive", [{"text": "a beats b", "status": "inconclusive", "comparisons": [(lean, "a")]},
                                   {"text": "a beats c", "status": "inconclusive", "comparisons": [(tie, "a")]}], {})
    assert "leaning the other way without a verdict: a beats b" in why and "not separated: a beats c" in why, why


def test_verdict_reverses_when_the_data_do(tmp_path):
    """If diffusion follows prompts best, claim 1 'did not hold' (the verdict is computed, not fixed)."""
    flipped = {"diffusion": PROMPT_ERR_LAW["autoregressive"], "masked": PROMPT_ERR_LAW["masked"],
               "autoregressive": PROMPT_ERR_LAW["diffusion"]}  # fmt: skip
    root = make_study(tmp_path, depths=(2,), seeds=(0, 1, 2), laws={"fid": FID_LAW, "prompt": flipped, "loss": LOSS_LAW})
    v = decide(load_study(root))
    assert v.claims[0]["status"] == "did not hold" and "reversed with confidence" in v.claims[0]["reason"]


# ------------------------------------------------------------------------------------------ degenerate studies


@pytest.mark.slow
def test_one_budget_one_seed_reports_without_fits(tmp_path):
    """One budget, one seed: no law is fitted, the banner says evaluation noise only, and no quality claim
    gets a verdict (FID has no noise estimate at all here, prompt following only its binomial noise)."""
    root = make_study(tmp_path, depths=(2,), budgets=(1e12,), seeds=(0,))
    out = build_report(root, n_boot=20)
    md = Path(out["paths"]["md"]).read_text()
    assert "no law fitted: needs >= 5 budgets over >= 1.5 decades, has 1 over 0" in md
    assert "One seed per cell" in md[: md.index("## Which paradigm")]
    status = {c["id"]: c["status"] for c in out["claims"]}
    assert status[1] in ("suggestive", "inconclusive") and status[2] == "inconclusive"
    assert all("evaluation noise only" in comp.summary() for part in out["claims"][0]["parts"] for comp, _ in part["comparisons"])


def test_three_budgets_show_points_without_a_law(tmp_path):
    """A 3-budget study (two decades, 2 seeds) fits no law: an exact 3-point fit would extrapolate anywhere."""
    root = make_study(tmp_path, depths=(2,), budgets=(1e12, 1e13, 1e14), paradigms=("diffusion", "masked"))
    an = Analyser(load_study(root), n_boot=10, seed=0)
    assert an.fits[("fid", "diffusion")].boot is None and an.fits[("fid", "diffusion")].note.startswith("no law fitted")
    assert an.crossovers() == []
    # one depth: no iso-FLOP figure is drawn (the report says why), not one left unreferenced in report_figures/
    assert ("loss", "diffusion") in an.fits and iso_flops(an, load_study(root), "loss") is None


@pytest.mark.slow
def test_extrapolation_stops_at_ten_times_the_largest_budget(study_dir):
    """Crossovers of fitted laws are searched at most EXTRAPOLATE (10) x past the largest measured budget."""
    an = analyse(load_study(study_dir), n_boot=10, seed=0)
    assert EXTRAPOLATE == 10 and an.crossovers
    assert all(c["C_range"][1] == pytest.approx(EXTRAPOLATE * max(BUDGETS)) for c in an.crossovers)


def test_one_seed_quality_noise_comes_from_its_bootstrap_replicates(tmp_path):
    """One seed with KID bootstrap replicates: KID comparisons rest on evaluation noise only, so a large gap is at
    most 'suggestive' (never a verdict) and gaps drowned by the noise are 'no difference detected'."""
    def labels(sd):
        root = make_study(tmp_path / f"sd{sd}", depths=(2,), seeds=(0,), noise=0.0, fid_sd=sd)
        v = decide(load_study(root))
        assert v.noise["kid"].source == "evaluation"
        return {c.label for c in v.families["table"] if c.metric == "kid"}

    assert labels(0.001) == {"suggestive"}  # the laws differ by >= 4 % at every budget: clear at 0.1 % noise
    assert labels(3.0) == {"no difference detected"}  # 300 % noise drowns every gap


# ------------------------------------------------------------------------------------------ calibration (no files)


def _sim_study(rng, prompt_err, fid, seeds=(0, 1, 2), budgets=(1e12, 1e13, 1e14), sd=0.1, timing=None):
    """An in-memory Study: lognormal seed noise around the given per-(paradigm, budget) means; shared timing rounds."""
    from flopmatch.report.data import Study

    rows = []
    for p in PARADIGMS:
        lat = (timing or {}).get(p, 0.05) * np.exp(0.05 * rng.standard_normal(5))
        for b in budgets:
            for s in seeds:
                rows.append({"run": f"{p}-{b:.0e}-s{s}", "objective": p, "depth": 2, "budget": b, "seed": s, "main": True,
                             "done": True, "weights": "ema", "setting": "steps=8,cfg=3,temp=1,topk=0,weights=ema,n=500,seed=0",
                             "kid_effnet": (k := fid(p, b) * math.exp(sd * rng.standard_normal())), "kid_boot_effnet": [],
                             "fid_effnet": k, "fid_boot_effnet": [],
                             "prompt_full_match": 1 - prompt_err(p, b) * math.exp(sd * rng.standard_normal()),
                             "num_samples": 500, "sample_flops_per_image": 1e9, "latency_s": float(np.median(lat)),
                             "latency_s_all": list(lat), "throughput_images_per_s": float(1 / np.median(lat)),
                             "throughput_all": list(1 / lat), "timing_source": "study"})  # fmt: skip
    return Study(Path("."), rows, [], [])


def test_no_difference_gives_no_verdict_at_the_nominal_rate():
    """Paradigms that do not differ: across 300 simulated 3-seed studies, a claim is HELD or DID NOT HOLD (any
    confident test in the Holm-corrected family) in at most 5 % (+ binomial slack), and table cells pick at that rate."""
    rng = np.random.default_rng(0)
    false_claims = false_picks = 0
    n = 300
    for _ in range(n):
        v = decide(_sim_study(rng, lambda p, b: 0.3, lambda p, b: 50.0))
        false_claims += any(c["status"] in ("held", "did not hold") for c in v.claims)
        false_picks += any(c["label"] == "confident" for c in v.table)
    slack = 3 * math.sqrt(0.05 * 0.95 / n)
    assert false_claims / n <= 0.05 + slack and false_picks / n <= 0.05 + slack, (false_claims, false_picks)


def test_true_differences_are_held_with_three_seeds():
    """The paper's pattern with 10 % seed noise and 3 seeds: claims 1 and 2 are HELD in nearly every simulated study."""
    rng = np.random.default_rng(1)
    prompt = {"autoregressive": 0.1, "masked": 0.2, "diffusion": 0.4}
    held = 0
    for _ in range(50):
        v = decide(_sim_study(rng, lambda p, b: prompt[p],
                              lambda p, b: {"autoregressive": 30.0, "masked": 40.0, "diffusion": 60.0 * (1e12 / b) ** 0.3}[p]))
        held += [c["status"] for c in v.claims[:2]] == ["held", "held"]
    assert held >= 45
    # the last study's margins: every interval brackets its ratio, read as the summary prints it (throughput in images/s)
    comps = [c for family in v.families.values() for c in family if c.value_interval() is not None]
    assert {c.metric for c in comps} >= {"prompt", "kid", "latency", "throughput"}
    for c in comps:
        lo, hi = c.value_interval()
        assert lo < c.value_ratio() < hi and f"(95% CI {lo:.3g} to {hi:.3g}, unadjusted)" in c.summary()
    assert "by far" in v.claims[2]["paper"] and "not a test here" in v.claims[2]["note"]


def _binomial_study(rng, rate, budgets=(1e11, 1e12, 1e13), seeds_at=1e12, n=250, retrain_sd=0.1):
    """An in-memory Study shaped like the default one (3 seeds at the middle budget, 1 elsewhere) whose prompt
    full-match rates are binomial draws at ``n`` images around ``rate(paradigm, budget)``, the rate itself varying
    10 % from seed to seed; KID equal everywhere, with bootstrap replicates."""
    from flopmatch.report.data import Study

    rows = []
    for p in PARADIGMS:
        lat = 0.05 * np.exp(0.05 * rng.standard_normal(5))
        for b in budgets:
            for s in range(3 if b == seeds_at else 1):
                trained = min(rate(p, b) * math.exp(retrain_sd * rng.standard_normal()), 1.0)  # this seed's true rate
                kid = 0.5 * math.exp(0.03 * rng.standard_normal())
                rows.append({"run": f"{p}-{b:.0e}-s{s}", "objective": p, "depth": 1, "budget": b, "seed": s, "main": True,
                             "done": True, "weights": "ema", "setting": "steps=8,cfg=3,temp=1,topk=0,weights=ema,n=250,seed=0",
                             "kid_effnet": kid, "kid_boot_effnet": list(kid * np.exp(0.03 * rng.standard_normal(50))),
                             "fid_effnet": 100.0, "fid_boot_effnet": [],
                             "prompt_full_match": rng.binomial(n, trained) / n, "num_samples": n,
                             "sample_flops_per_image": 1e9, "latency_s": float(np.median(lat)), "latency_s_all": list(lat),
                             "throughput_images_per_s": float(1 / np.median(lat)), "throughput_all": list(1 / lat),
                             "timing_source": "study"})  # fmt: skip
    return Study(Path("."), rows, [], [])


def test_prompt_tests_hold_their_level_where_evaluation_noise_grows():
    """Equal paradigms whose full-match rate is ~0.01 where the seeds are (so the pooled seed variance of the log error
    is tiny) and 0.2 at the largest budget (binomial noise of the log error ~3 % at 250 images): with each value's own
    evaluation noise counted, confident prompt comparisons stay at the nominal rate (the pooled variance alone called
    148 of these 200 null studies). A real gap at the largest budget (0.35 vs 0.15) is still found in nearly all, as
    suggestive: the retraining noise was measured only at rates near 0.01, so it is not known at 0.15-0.35."""
    rng = np.random.default_rng(5)
    rate = {1e11: 0.005, 1e12: 0.01, 1e13: 0.2}
    n, confident = 200, 0
    for _ in range(n):
        v = decide(_binomial_study(rng, lambda p, b: rate[b]))
        confident += any(c.metric == "prompt" and c.label == "confident" for f in v.families.values() for c in f)
    assert confident / n <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / n), confident
    found = 0
    for _ in range(50):
        v = decide(_binomial_study(rng, lambda p, b: 0.35 if (p, b) == ("autoregressive", 1e13) else 0.15 if b == 1e13 else rate[b]))
        at = [c for c in v.families["table"] if c.metric == "prompt" and "1e+13" in c.where]
        found += any(c.label in ("confident", "suggestive") and c.better == "autoregressive" for c in at)
        assert all(c.label != "confident" and "measured only at full-match rates up to" in c.capped for c in at)
    assert found >= 45, found


def test_one_seed_never_gives_a_verdict_on_quality():
    """With one seed per cell, however large the gaps, claims 1 and 2 are never HELD or DID NOT HOLD."""
    rng = np.random.default_rng(2)
    prompt = {"autoregressive": 0.05, "masked": 0.2, "diffusion": 0.8}
    for _ in range(20):
        v = decide(_sim_study(rng, lambda p, b: prompt[p], lambda p, b: {"autoregressive": 20.0, "masked": 40.0,
                                                                         "diffusion": 200.0 * (1e12 / b) ** 0.5}[p], seeds=(0,)))
        assert v.noise["prompt"].source == "evaluation"
        assert all(c["status"] not in ("held", "did not hold") for c in v.claims[:2])


@pytest.mark.parametrize("error", [1.0, 0.0])
def test_scores_at_the_floor_are_a_tie(error):
    """Every paradigm with prompt full match 0 (or 1, error at the log floor): 'no difference detected', no pick; a
    detectable difference, if stated, rests on the rates' binomial noise at 500 images, never on the zero seed spread."""
    rng = np.random.default_rng(3)
    v = decide(_sim_study(rng, lambda p, b: error, lambda p, b: 50.0, sd=0.0))
    cells = [c for c in v.table if c["need"] == "prompt following"]
    assert cells and all(c["choice"] is None and c["label"] == "no difference detected" for c in cells)
    said = "all near zero: each one's mean full-match rate below 5%" if error == 1.0 else "all at the ceiling: every prompt fully matched"
    assert all(cell_text(c).endswith(f"; {said})") for c in cells)
    assert all("all" not in cell_text(c) for c in v.table if c["need"] == "image quality")  # KID of 50 is not a floor
    at_floor = decide(_sim_study(rng, lambda p, b: 0.5, lambda p, b: 1e-3))  # KID below KID_FLOOR (5e-3) everywhere
    kid = [cell_text(c) for c in at_floor.table if c["need"] == "image quality"]
    assert kid and all(t.endswith("; all at KID's floor: indistinguishable from real images at this sample size)") for t in kid)
    assert v.noise["prompt"].var == 0 and v.noise["prompt"].retrain_var == 0  # identical seeds
    for c in (c for cell in cells for c in cell["comparisons"]):
        assert c.test.se > 0 and c.mdd_percent() > 0, c.summary()  # binomial noise of 0/500 (shrunk) or 500/500


def test_detectable_differences_beyond_tenfold_are_not_printed_as_huge_percentages():
    """A detectable difference of 8,628,853,455 % (timings of a smoke study) reads "over 10x"; ordinary ones stay %."""
    assert [mdd_text(p) for p in (8628853455.0, 900.5, 899.6, 27.4, None)] == ["over 10x", "over 10x", "900%", "27%", "–"]
    noisy = Comparison("table", "latency", "masked", "diffusion", "depth 1",
                       TestResult(0.1, 5.0, 2.0, 0.4, 3, 3, "paired"), "timing rounds")
    noisy.p_adj, noisy.m = 0.8, 1
    assert noisy.label == "no difference detected" and "could detect only a difference of over 10x" in noisy.summary()


def test_untestable_comparisons_are_not_called_ties():
    """One seed and no KID bootstrap: KID cannot be tested, and the table says 'not testable', not 'no difference'."""
    rng = np.random.default_rng(4)
    v = decide(_sim_study(rng, lambda p, b: 0.3, lambda p, b: {"diffusion": 90.0}.get(p, 30.0), seeds=(0,)))
    cells = [c for c in v.table if c["need"] == "image quality"]
    assert v.noise["kid"].source == "none" and cells and all(c["label"] == "not testable" for c in cells)


def test_a_test_shared_by_two_claims_is_counted_once():
    """Claim 2 (next-token vs diffusion at the smallest budget) and claim 4 (diffusion vs next-token at the largest)
    are one test when there is one budget: counted once in Holm's family, mirrored with the same correction."""
    rng = np.random.default_rng(5)
    v = decide(_sim_study(rng, lambda p, b: 0.3, lambda p, b: 50.0, budgets=(1e12,)))
    kid = [c for c in v.families["claims"] if c.metric == "kid" and {c.a, c.b} == {"autoregressive", "diffusion"}]
    assert len(kid) == 1
    (c2,) = v.claims[1]["parts"][0]["comparisons"]
    c4 = next(c for c, _ in v.claims[3]["parts"][0]["comparisons"] if c.b == "autoregressive")
    assert (c2[0].a, c4.a) == ("autoregressive", "diffusion") and c4.p_adj == c2[0].p_adj and c4.p2 == pytest.approx(c2[0].p2)
    assert c4.test.estimate == -c2[0].test.estimate


def test_a_claim_with_an_unmeasured_part_says_so():
    """Without masked runs, claim 1 cannot hold nor be suggestive (two of its parts are not measured, pointing no
    way) and its reason names them."""
    from flopmatch.report.data import Study

    rng = np.random.default_rng(6)
    full = _sim_study(rng, lambda p, b: {"autoregressive": 0.1, "diffusion": 0.5}.get(p, 0.3), lambda p, b: 50.0)
    v = decide(Study(full.root, [r for r in full.rows if r["objective"] != "masked"], [], []))
    c1 = v.claims[0]
    assert c1["status"] == "inconclusive" and "not measured: masked beats diffusion" in c1["reason"]
    # claim 3 ("next-token is the most inference-efficient") without diffusion: never "held" on masked alone
    no_diffusion = decide(Study(full.root, [r for r in full.rows if r["objective"] != "diffusion"], [], []))
    c3 = no_diffusion.claims[2]
    assert c3["status"] != "held" and "not measured: next-token needs fewer sampling FLOPs per image than diffusion" in c3["reason"]
    assert all(p["status"] != "not measured" for p in c3["parts"] if "than masked" in p["text"])


def test_eval_summary_reads_entries_of_earlier_versions():
    """`flopmatch eval`'s summary lines work for v0.2 entries (timing without rounds) and untimed ones."""
    from flopmatch.evaluation.report_lines import summary_lines

    old = {"metrics": {}, "inference": {"sample_flops_per_image": 1e9, "latency_s": 0.01, "throughput_images_per_s": 50.0,
                                        "latency_s_all": [0.01, 0.011]}}  # fmt: skip
    untimed = {"metrics": {}, "inference": {"sample_flops_per_image": 1e9}}
    lines = summary_lines({"entries": {"a": old, "b": untimed}})
    assert "10 ms" in lines[0] and "rounds" not in lines[0] and lines[1].endswith("1e+09 FLOPs/img")
    scored = {"metrics": {"effnet": {"kid": 0.0123, "fid": 45.6}, "inception": {"kid": None, "fid": 7.0}}}
    assert summary_lines({"entries": {"c": scored}}) == ["c | KID[effnet] 0.0123 | FID[effnet] 45.60 | FID[inception] 7.00"]


@pytest.mark.slow
def test_missing_eval_and_unfinished_runs_are_listed(tmp_path):
    """Runs without eval.json and unfinished runs are listed; the unfinished one is left out of fits; one paradigm works."""
    skip, unfinished = "masked-d2-1.00e+12-s0", "masked-d2-1.00e+13-s0"
    root = make_study(tmp_path, paradigms=("masked",), depths=(2,), seeds=(0,), skip_eval={skip}, unfinished={unfinished})
    out = build_report(root, n_boot=20)
    md = Path(out["paths"]["md"]).read_text()
    assert f"{skip}: not evaluated" in md and f"{unfinished}: not finished (20/41 steps)" in md
    rows = load_study(root).rows
    assert [r["setting"] for r in rows if r["run"] == skip] == [None]  # still one csv row
    fit = next(f for f in out["fits"] if (f["metric"], f["paradigm"]) == ("fid", "masked"))
    assert fit["budgets"] == len(BUDGETS) - 2  # 1e12 not evaluated, 1e13 unfinished
    assert {c["status"] for c in out["claims"]} == {"not measured"}
    assert {c["label"] for c in out["table"]} == {"not measured"}


def test_not_a_study_is_a_user_error(tmp_path):
    """A directory without runs/ is a one-line UserError, not a traceback."""
    from flopmatch.errors import UserError

    with pytest.raises(UserError, match="no runs/"):
        load_study(tmp_path).rows


def test_per_run_timings_are_at_most_suggestive(tmp_path):
    """Without a timing phase, timings come from separate evaluations (other loads, other sessions): a timing
    order may be 'suggestive' but never decides a claim."""
    root = make_study(tmp_path, depths=(2,), seeds=(0, 1, 2), timing_phase=False)
    v = decide(load_study(root))
    timed = [c for c in v.families["claims"] if c.metric in ("latency", "throughput")]
    assert timed and all(c.noise == "per-run timings" and c.label != "confident" for c in timed)
    assert v.claims[2]["status"] == "suggestive"  # FLOPs exact (held), throughput only suggestive


def test_timings_measured_on_a_busy_machine_are_at_most_suggestive():
    """A 5x latency gap over 5 paired rounds is confident on a quiet machine; recorded with other processes keeping
    1.2 cores busy during the rounds, the same timings are at most 'suggestive', with the reason and the fix."""
    from flopmatch.report.data import Study

    quiet = _sim_study(np.random.default_rng(8), lambda p, b: 0.3, lambda p, b: 50.0,
                       timing={"autoregressive": 0.01, "masked": 0.05, "diffusion": 0.05})
    timed = [c for c in decide(quiet).families["claims"] if c.metric == "latency"]
    assert timed and any(c.label == "confident" for c in timed)
    busy = decide(Study(quiet.root, quiet.rows, [], [], timing={"other_busy_cores_during": 1.2}))
    timed = [c for c in busy.families["claims"] if c.metric in ("latency", "throughput")]
    assert timed and all(c.label != "confident" for c in timed)
    assert all("other processes kept 1.2 cores busy during the timing rounds" in c.summary() and "--retime" in c.summary()
               for c in timed)


# ------------------------------------------------------------------------------- FLOP convention


def _convention_study(root: Path, rng: np.random.Generator, seed_sd: float) -> None:
    """3 paradigms x 5 budgets x 3 seeds whose FID follows ONE power law in backbone-only compute:
    FID = 40 * (backbone compute / 1e11)^-0.3, times lognormal seed noise."""
    shares = {p: convention.backbone_shares(_spec_only_study(p))[(p, 1)] for p in ("diffusion", "masked", "autoregressive")}
    for p, share in shares.items():
        for budget in (1e11, 2e11, 4e11, 8e11, 1.6e12):
            for seed in range(3):
                fid = 40 * (budget * share / 1e11) ** -0.3 * math.exp(seed_sd * rng.standard_normal())
                make_run(root, p, 1, budget, seed, fid=fid, prompt_err=0.3, loss=1.0, rng=rng)


def _spec_only_study(p: str):
    run = RunInfo(name=p, rel=p, objective=p, depth=1, seed=0, budget=1.0, state={"net_spec": _net_spec(p, 1)},
                  curve=[], evaluated=False)
    return Study(root=Path("."), rows=[], runs=[run], problems=[])


def test_moved_rows_follow_a_power_law_exactly(tmp_path):
    """Log-log interpolation is exact for a power law: every moved row has the FID the law gives at the target's
    backbone compute; targets outside a paradigm's measured range are dropped, never extrapolated."""
    _convention_study(tmp_path, np.random.default_rng(0), seed_sd=0.0)
    study = load_study(tmp_path)
    shares = convention.backbone_shares(study)
    top = max(shares.values())
    moved = convention.backbone_study(study, shares)
    assert moved.rows
    for r in moved.rows:
        assert r["fid_effnet"] == pytest.approx(40 * (r["budget"] * top / 1e11) ** -0.3, rel=1e-9)
        assert r["budget"] * top / shares[(r["objective"], 1)] <= 1.6e12 * (1 + 1e-9)  # inside the measured range
    assert {r["budget"] for r in moved.rows if r["objective"] == "diffusion"} == {1e11, 2e11, 4e11, 8e11, 1.6e12}


def test_a_difference_made_by_the_convention_is_reported(tmp_path):
    """Known truth: every paradigm has the same law in backbone compute. Counted with all FLOPs, diffusion (the
    largest backbone share) wins image quality; at equal backbone compute no cell is confident, and the
    check lists the cells whose answer changed."""
    _convention_study(tmp_path, np.random.default_rng(1), seed_sd=0.02)
    study = load_study(tmp_path)
    v = decide(study)
    fid_cells = [c for c in v.table if c["need"] == "image quality"]
    assert any(c["choice"] == "diffusion" for c in fid_cells)
    check = convention.convention_check(study)
    alt = decide(convention.backbone_study(study, check["shares"]))
    assert all(c["label"] != "confident" for c in alt.table if c["need"] == "image quality")
    assert check["compared"] >= 2 and any(ch.startswith("image quality") for ch in check["changes"])


# ------------------------------------------------------------------------------------------ prompt groups


def _add_prompt_groups(root: Path, counts) -> None:
    """Give every eval entry of the study's runs per-group prompt scores: ``counts(run name)`` -> {group: (k, n)}."""
    for run in sorted((root / "runs").iterdir()):
        doc = json.loads((run / "eval.json").read_text())
        for entry in doc["entries"].values():
            pf = entry["metrics"]["prompt_following"]
            pf["by_group"] = {g: {"full_match": k / n if n else None, "num_full_match": k, "num_images": n}
                              for g, (k, n) in counts(run.name).items()}
            pf["holdout"] = {"combos": ["red square"], "relations": ["circle above square"]}
        atomic_write_json(run / "eval.json", doc)


def test_wilson_and_newcombe_intervals_match_known_values():
    """Wilson 95 % intervals and Newcombe's difference interval reproduce published values (Newcombe 1998)."""
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    # Newcombe (1998), Statistics in Medicine 17:873, table II example (a): 56/70 vs 48/80 -> 0.2 [0.0524, 0.3339]
    assert difference_interval((56, 70), (48, 80)) == pytest.approx((0.2, 0.0524, 0.3339), abs=1e-4)


def test_held_out_gap_is_compared_at_the_same_object_count():
    """The held-out - seen gap averages the per-object-count gaps with the held-out prompts' mix (hand-computed),
    so held-out prompts being mostly two-object ones (harder anyway) does not widen it: here raw -0.325, fair -0.225."""
    groups = {"held_out_one_object": (5, 10), "held_out_two_object": (6, 30), "seen_one_object": (80, 100),
              "seen_two_object": (40, 100)}
    d, lo, hi = adjusted_difference(groups)
    assert d == pytest.approx(0.25 * (0.5 - 0.8) + 0.75 * (0.2 - 0.4))
    assert difference_interval((11, 40), (120, 200))[0] == pytest.approx(-0.325)
    assert (lo, hi) == pytest.approx((-0.3784, -0.0716), abs=1e-3)  # normal, shrunk binomial variances
    assert all(math.isnan(x) for x in adjusted_difference({"held_out_one_object": (1, 2), "seen_two_object": (3, 4)}))


def test_report_shows_prompt_following_per_group(tmp_path):
    """The report's group table pools each (paradigm, budget) cell's seeds (hand-computed counts and Wilson
    intervals), sits with the prompt-following results, keeps the decision on the overall score, and says small
    groups are noisy; the CSV has each group's rate and n."""
    root = make_study(tmp_path, depths=(2,), budgets=(1e12,), seeds=(0, 1), timing_phase=False)
    rate = {"diffusion": 0.3, "masked": 0.5, "autoregressive": 0.7}

    def counts(name: str) -> dict:
        p, seed = name.split("-")[0], int(name[-1])
        held = round(rate[p] * 40) - 4 * seed  # 40 held-out prompts per evaluation, seed 1 four fewer matches
        return {"seen": (round(rate[p] * 160) + 10, 160), "held_out": (held, 40), "held_out_combo": (held, 40),
                "one_object": (round(rate[p] * 110), 110), "two_object": (round(rate[p] * 90), 90)}

    _add_prompt_groups(root, counts)
    study = load_study(root)
    pooled = {c["paradigm"]: c for c in group_counts(study, decide(study).cells["prompt"])}
    assert set(pooled) == set(PARADIGMS) and all(c["runs"] == 2 for c in pooled.values())
    ar = pooled["autoregressive"]["groups"]
    assert ar["held_out"] == (28 + 24, 80) and ar["seen"] == (2 * 122, 320) and ar["one_object"] == (154, 220)
    assert "held_out_relation" not in ar  # not scored by these entries: no column
    row = next(r for r in study.rows if r["main"] and r["objective"] == "masked" and r["seed"] == 0)
    assert (row["prompt_full_match_held_out"], row["prompt_n_held_out"], row["prompt_n_seen"]) == (0.5, 40, 160)
    md = Path(build_report(root, n_boot=20)["paths"]["md"]).read_text()
    section = md[md.index("### Prompt following: seen vs held-out"):md.index("## Each claim")]
    assert md.index("prompt_vs_flops.png") < md.index("### Prompt following: seen vs held-out")
    lo, hi = wilson_interval(52, 80)
    assert "| autoregressive | 1e+12 | 2 | 2 | 0.76 " in section and f"| 0.65 [{lo:.2f}, {hi:.2f}] n=80 |" in section
    assert "red square" in section and "circle above square" in section and "40 of 200 prompts per evaluation" in section
    assert "overall full match" in section and "held-out (40 prompts per evaluation)" in section  # noisy: named, with n
    assert "| held-out colour+shape |" in section and "| held-out arrangement |" not in section
    csv_rows = list(csv.DictReader(io.StringIO((root / "results.csv").read_text())))
    assert {r["prompt_n_held_out"] for r in csv_rows} == {"40"}


def test_report_without_holdout_says_prompts_are_all_seen(tmp_path):
    """A study whose data held nothing out shows 1- vs 2-object rates only and says every prompt was seen;
    entries without group scores (other datasets, older evaluations) give no group section."""
    root = make_study(tmp_path, paradigms=("masked",), depths=(2,), budgets=(1e12,), seeds=(0,), timing_phase=False)
    study = load_study(root)
    assert group_counts(study, decide(study).cells["prompt"]) == [] and prompt_group_blocks(study, decide(study)) == []
    _add_prompt_groups(root, lambda name: {"seen": (30, 50), "held_out": (0, 0), "one_object": (20, 25),
                                           "two_object": (10, 25)})
    for run in (root / "runs").iterdir():  # nothing held out
        doc = json.loads((run / "eval.json").read_text())
        for entry in doc["entries"].values():
            entry["metrics"]["prompt_following"]["holdout"] = {"combos": [], "relations": []}
        atomic_write_json(run / "eval.json", doc)
    study = load_study(root)
    section = render_md(prompt_group_blocks(study, decide(study)), {}, {})
    assert section.startswith("### Prompt following: seen vs held-out") and "holds nothing out of training" in section and "| held-out |" not in section
    assert "| masked | 1e+12 | 2 | 1 | 0.80 " in section


def test_report_resamples_as_the_study_did(tmp_path):
    """The default fit-band resamples: the study's (study.json), else 1000 (none, corrupt, or not a count)."""
    assert study_n_boot(tmp_path) == DEFAULT_N_BOOT
    for text, want in (('{"n_boot": 7}', 7), ("{not json", DEFAULT_N_BOOT), ('{"n_boot": true}', DEFAULT_N_BOOT),
                       ('{"n_boot": 0}', DEFAULT_N_BOOT), ("[1]", DEFAULT_N_BOOT)):
        (tmp_path / "study.json").write_text(text)
        assert study_n_boot(tmp_path) == want, text
