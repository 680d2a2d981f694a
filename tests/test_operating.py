"""Operating points: the sweep's choice is its front, matched quality is reached by every paradigm, and the report's
latency verdicts move from default step counts to each paradigm's cheapest point at matched quality."""

from __future__ import annotations

import itertools
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from flopmatch.config import SampleConfig
from flopmatch.evaluation.operating import SWEEP_SEED, Point, choose, matched_level, pareto_front
from flopmatch.evaluation.timing import busy_probe, other_busy_cores
from flopmatch.report import convention
from flopmatch.report.data import Study
from flopmatch.report.operating import operating
from flopmatch.report.verdicts import cell_text, decide
from flopmatch.study.presets import SAMPLE_FIELDS
from flopmatch.study.timing_phase import _cost_key


def _dominated(p: Point, points: list[Point]) -> bool:
    return any(q.flops <= p.flops and q.kid <= p.kid and (q.flops < p.flops or q.kid < p.kid) for q in points)


@pytest.mark.parametrize("seed", range(20))
def test_the_chosen_points_are_the_sweeps_front_and_its_best_prompt_point(seed):
    """On random sweeps: every non-dominated (FLOPs, KID) point is chosen, no dominated one is except the best
    prompt-following point, the best-quality point is always among them, and nothing is chosen twice."""
    rng = np.random.default_rng(seed)
    costs = rng.choice([1e8, 2e8, 5e8, 1e9], size=12)  # a few cost classes, as guidance on/off x steps give
    points = [Point(f"s{i}", float(rng.uniform(0.1, 1)), float(rng.uniform(0, 1)), float(c)) for i, c in enumerate(costs)]
    chosen = choose(points)
    keys = [p.key for p in chosen]
    assert len(keys) == len(set(keys))
    front = {p.key for p in points if not _dominated(p, points)}
    best_prompt = max(points, key=lambda p: (p.prompt, -p.kid))
    assert set(keys) == front | {best_prompt.key}
    assert min(points, key=lambda p: p.kid).key in keys  # the best quality at any cost is on the front
    assert min(points, key=lambda p: (p.flops, p.kid)).key in keys  # so is the cheapest setting's best
    # the front comes first, cheapest first, quality strictly improving with cost
    fr = [p for p in chosen if p.key in front]
    assert [p.flops for p in fr] == sorted(p.flops for p in fr) and all(a.kid > b.kid for a, b in itertools.pairwise(fr))


def test_unscored_points_are_never_chosen_for_the_front():
    pts = [Point("a", None, 0.9, 1e8), Point("b", 0.5, None, 1e8), Point("c", 0.4, 0.1, float("nan")), Point("d", 0.3, 0.2, 2e8)]
    chosen = [p.key for p in choose(pts)]
    assert chosen == ["b", "d", "a"]  # a: the best prompt following, though it has no KID
    assert choose([]) == []


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(3)
    pts = [(float(c), float(v), i) for i, (c, v) in enumerate(rng.integers(0, 6, size=(40, 2)))]
    got = pareto_front(pts)
    want = [p for p in pts if not any(q[0] <= p[0] and q[1] <= p[1] and q[:2] != p[:2] for q in pts)]
    first = {}
    for p in want:  # exact duplicates: the first is kept
        first.setdefault(p[:2], p)
    assert sorted(got) == sorted(first.values())


def test_matched_level_is_the_quality_every_paradigm_reaches():
    assert matched_level({"a": 0.2, "b": 0.5, "c": 0.3}) == 0.5
    assert matched_level({"a": 0.2}) is None  # nothing to match against
    assert matched_level({"a": 0.2, "b": None}) is None  # a paradigm without a KID: no common level
    assert matched_level({"a": 0.2, "b": math.inf}) is None


def _row(paradigm: str, setting: str, kid: float, latency: float, rng, full: bool = True, main: bool = False,
         flops: float = 1e9) -> dict:
    lat = latency * np.exp(0.03 * rng.standard_normal(7))  # 7 interleaved timing rounds
    return {"run": f"{paradigm}-b1e12-s0", "objective": paradigm, "depth": 1, "budget": 1e12, "seed": 0, "done": True,
            "weights": "ema", "main": main, "full_set": full, "eval_seed": 0 if full else 1,
            "setting": f"{setting},weights=ema,n={250 if full else 100}",
            "kid_effnet": kid, "fid_effnet": 100 * kid, "fid_boot_effnet": [], "prompt_full_match": 0.5,
            "num_samples": 250 if full else 100, "cfg": 3.0, "sample_flops_per_image": flops,
            "latency_s": float(np.median(lat)) if full else None, "latency_s_all": list(lat) if full else [],
            "throughput_images_per_s": float(1 / np.median(lat)) if full else None,
            "throughput_all": list(1 / lat) if full else [], "timing_source": "study" if full else None}  # fmt: skip


def test_latency_is_judged_at_matched_quality_not_at_default_steps():
    """Known truth: masked's default (12 steps) is slower than diffusion's, but masked reaches diffusion's best quality
    with 4 steps at a fifth of the latency. At default steps diffusion would win latency; at matched quality masked
    must, and the comparison must say which points it used."""
    rng = np.random.default_rng(0)
    rows = [
        _row("diffusion", "steps=25,cfg=3", 0.60, 0.050, rng, main=True, flops=5e9),
        _row("diffusion", "steps=10,cfg=3", 0.70, 0.020, rng, flops=2e9),  # cheaper, but worse than the level
        _row("diffusion", "steps=10,cfg=3", 0.71, 0.0, rng, full=False, flops=2e9),  # the sweep's small set
        _row("masked", "steps=12,cfg=3", 0.40, 0.080, rng, main=True, flops=4e9),
        _row("masked", "steps=4,cfg=3", 0.55, 0.016, rng, flops=1.3e9),
        _row("masked", "steps=2,cfg=3", 0.90, 0.008, rng, flops=0.7e9),  # too poor: not at matched quality
        _row("masked", "steps=4,cfg=3", 0.56, 0.0, rng, full=False, flops=1.3e9),
    ]
    study = Study(Path("."), rows, [], [])
    op = operating(study)
    assert op.swept and op.levels == {1: 0.60}  # diffusion's best KID: the quality both reach
    assert op.points[("masked", 1)].matched["latency"]["setting"].startswith("steps=4,")
    assert op.points[("diffusion", 1)].matched["latency"]["setting"].startswith("steps=25,")
    assert op.points[("masked", 1)].best_quality["setting"].startswith("steps=12,")
    v = decide(study)
    cell = next(c for c in v.table if c["need"] == "latency")
    assert cell["choice"] == "masked" and cell["label"] == "confident"
    assert all("matched quality (KID <= 0.6)" in c.where for c in cell["comparisons"])
    assert cell_text(cell) == "masked (confident) †"  # the label says its verdict is at the chosen points
    # without the sweep, the same main settings give the opposite answer
    plain = [dict(r, full_set=True) for r in rows if r["main"]]
    cell = next(c for c in decide(Study(Path("."), plain, [], [])).table if c["need"] == "latency")
    assert cell["choice"] == "diffusion" and all("main settings" in c.where for c in cell["comparisons"])
    assert cell_text(cell) == "diffusion (confident)"


def test_the_presets_know_every_sampler_setting():
    """presets.SAMPLE_FIELDS (plain strings: the CLI must not import torch) names exactly SampleConfig's fields."""
    assert set(SAMPLE_FIELDS) == {f.name for f in fields(SampleConfig)}


def _item(setting: str, **sample) -> dict:
    base = {"guidance": 3.0, "temperature": 1.0, "top_k": 0, "choice_temperature": 4.5, "kv_cache": True,
            "solver": "euler", "shift": 1.0}
    return {"run": "r", "setting": setting, "sample": {**base, **sample}}


def test_the_timing_phase_times_once_only_what_computes_the_same():
    """Guidance 2 vs 5, temperatures and the time shift compute the same (one timing); guidance 1 (no unconditional
    pass), another step count, solver, top-k, KV cache or masked's Gumbel noise on or off do not."""
    key = _cost_key(_item("steps=10,cfg=3"))
    assert _cost_key(_item("steps=10,cfg=5", guidance=5.0)) == key
    assert _cost_key(_item("steps=10,cfg=3,temp=0.8", temperature=0.8, shift=3.0)) == key
    for other in (_item("steps=10,cfg=1", guidance=1.0), _item("steps=12,cfg=3"), _item("steps=10,cfg=3", solver="heun"),
                  _item("steps=10,cfg=3", top_k=100), _item("steps=10,cfg=3", kv_cache=False),
                  _item("steps=10,cfg=3", choice_temperature=0.0)):
        assert _cost_key(other) != key, other


def _machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine from /proc/stat's "cpu" line (all but idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """This process's CPU seconds from getrusage (the probe reads time.process_time)."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="the load figure reads Linux /proc/stat")
def test_the_busy_probe_sees_another_process_and_not_this_one():
    """The timing rounds' load figure counts the CPU time of other processes, not this one's: a spinning child is
    seen, and while this process spins the figure is the machine's busy cores less this process's, whatever else
    loads the machine (a shared CI host: an absolute bound on the figure would fail under others' load)."""
    probe = busy_probe()
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 1.0: pass"])
    child.wait(timeout=60)
    assert other_busy_cores(probe) >= 0.6  # the child spun one core for 1 s (interpreter start-up included)
    machine, own, t = _machine_busy_s(), _own_cpu_s(), time.monotonic()
    probe = busy_probe()
    while _own_cpu_s() - own < 0.8:  # this process's CPU time, however busy the machine: not counted
        pass
    other = other_busy_cores(probe)
    wall = time.monotonic() - t
    own_s, machine_s = _own_cpu_s() - own, _machine_busy_s() - machine
    # in CPU seconds over the interval, so the check is as sharp under any load: this process's >= 0.8 s would show
    # in full if it were counted; 0.3 s covers /proc/stat's ticks (10 ms per CPU at each end) and the skew between the
    # probe's reads and these (up to ~150 ms descheduled between them while 2 other cores run)
    assert other * wall == pytest.approx(max(machine_s - own_s, 0.0), abs=0.3)
    assert other_busy_cores(None) is None


def _q(paradigm: str, seed: int, setting: str, kid: float, main: bool = False, full: bool = True) -> dict:
    """An evaluation row at 1e12 FLOPs, depth 1: the full set (main or a chosen point) or the sweep's small set."""
    return {"run": f"{paradigm}-b1e12-s{seed}", "objective": paradigm, "depth": 1, "budget": 1e12, "seed": seed,
            "done": True, "weights": "ema", "main": main, "full_set": full, "eval_seed": 0 if full else SWEEP_SEED,
            "setting": f"{setting},weights=ema,n={250 if full else 100}", "kid_effnet": kid, "fid_effnet": 100 * kid,
            "fid_boot_effnet": [], "prompt_full_match": 0.5, "num_samples": 250 if full else 100, "cfg": 3.0,
            "sample_flops_per_image": 1e9, "latency_s": None, "latency_s_all": [], "throughput_images_per_s": None,
            "throughput_all": [], "timing_source": None}  # fmt: skip


def test_quality_at_the_operating_budget_is_judged_at_each_paradigms_best_point(monkeypatch):
    """Known truth: at the shared main setting (guidance 3) masked beats diffusion clearly, but diffusion's best
    guidance (5, found by the sweep) beats masked's best. The table at the sweep's budget must compare the best points
    (each chosen on the sweep's images, valued on the full set: masked's guidance-5 point looks best on the full set
    but not on the sweep, so it must not be used), say so, and mark the cell; without masked's sweep it falls back to
    the main settings for every paradigm."""
    rng = np.random.default_rng(0)
    rows = [_q(p, s, "steps=25,cfg=3" if p == "diffusion" else "steps=12,cfg=3", kid * math.exp(0.02 * rng.standard_normal()),
               main=True) for p, kid in (("diffusion", 0.60), ("masked", 0.40)) for s in range(3)]  # fmt: skip
    sweep = [_q("diffusion", 0, "steps=25,cfg=3", 0.61, full=False), _q("diffusion", 0, "steps=25,cfg=5", 0.30, full=False),
             _q("diffusion", 0, "steps=25,cfg=5", 0.32),  # diffusion's best: chosen on the sweep, valued here
             _q("masked", 0, "steps=12,cfg=3", 0.41, full=False), _q("masked", 0, "steps=12,cfg=5", 0.45, full=False),
             _q("masked", 0, "steps=12,cfg=5", 0.20)]  # looks best on the full set only: not masked's best point
    masked_main = next(r for r in rows if r["objective"] == "masked" and r["seed"] == 0)["kid_effnet"]

    v = decide(Study(Path("."), rows + sweep, [], []))
    cell = next(c for c in v.table if c["need"] == "image quality")
    assert cell["ranked"][0] == "diffusion" and cell["choice"] == "diffusion"
    assert cell["log_errors"] == pytest.approx({"diffusion": math.log(0.32), "masked": math.log(masked_main)})
    assert all("best point" in c.where for c in cell["comparisons"]) and cell_text(cell).endswith("†")
    claim4 = next(c for c in v.claims if c["id"] == 4)["parts"][0]
    assert "best point" in claim4["text"] and all("best point" in c.where for c, _ in claim4["comparisons"])

    # the FLOP-convention check compares like with like: both sides at the main settings (the moved study has only
    # main rows), so equal backbone shares change nothing
    study = Study(Path("."), rows + sweep, [], [])
    main_only = decide(study, best_points=False)
    assert next(c for c in main_only.table if c["need"] == "image quality")["choice"] == "masked"
    monkeypatch.setattr(convention, "backbone_shares", lambda s: {("diffusion", 1): 0.5, ("masked", 1): 0.5})
    check = convention.convention_check(study)
    assert check["compared"] > 0 and check["changes"] == []

    # masked not swept, or its best point one the sweep did not evaluate (chosen on its own full-set value): no best
    # point for it, so the cell compares every paradigm at its main setting
    unswept_best = [r for r in sweep if r["objective"] == "diffusion"] + [sweep[4]]  # masked swept cfg=5 only (0.45)
    for extra in ([r for r in sweep if r["objective"] == "diffusion"], unswept_best):
        v = decide(Study(Path("."), rows + extra, [], []))
        cell = next(c for c in v.table if c["need"] == "image quality")
        assert cell["choice"] == "masked" and cell["label"] == "confident"
        assert not any("best point" in c.where for c in cell["comparisons"]) and not cell_text(cell).endswith("†")
