"""Properties of the verdicts' cells and their noise (flopmatch.report.verdicts), checked against known truth.

Two pieces of the statistics that the calibration tests in test_report.py leave loose:

* depth selection with a hold-out (``_cells``): with several depths per (paradigm, budget), the depth is chosen on
  the lowest seed and judged on the other seeds only; a cell without another seed is judged on the selection seed
  and marked ``biased`` (its comparisons capped at "suggestive");
* the variance of a cell's mean (``cell_var``): (retraining variance + each value's evaluation variance) summed over
  the n values / n^2, so a null comparison is rejected at the nominal rate, not only at most at it.

Simulated studies reuse test_report's in-memory ``_sim_study`` (lognormal seed noise around known means, no files).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from flopmatch import PARADIGMS
from flopmatch.report.data import Study
from flopmatch.report.verdicts import ALPHA, CONFIDENT, SUGGESTIVE, Cell, Noise, _cells, _noise, cell_var, decide
from test_report import _sim_study

CAPPED = "model size chosen on the seed it is judged on"


def _band(rate: float, n: int, k: float = 3.0) -> float:
    """k binomial standard deviations of a rate estimated from n trials."""
    return k * math.sqrt(rate * (1 - rate) / n)


def _two_depth_study(rng, worse: dict[str, float], seeds=(0, 1, 2), budgets=(1e12, 1e13, 1e14), sd=0.1) -> Study:
    """Every paradigm equal at its best depth (prompt error 0.3, KID 50) with lognormal seed noise ``sd`` (log scale):
    depth 2 from one ``_sim_study``, depth 4 from another whose errors are ``worse[p]`` times larger (1: as good)."""
    a = _sim_study(rng, lambda p, b: 0.3, lambda p, b: 50.0, seeds=seeds, budgets=budgets, sd=sd)
    b = _sim_study(rng, lambda p, b: 0.3 * worse.get(p, 1.0), lambda p, b: 50.0 * worse.get(p, 1.0), seeds=seeds,
                   budgets=budgets, sd=sd)  # fmt: skip
    rows = a.rows + [{**r, "depth": 4, "run": r["run"] + "-d4"} for r in b.rows]
    return Study(a.root, rows, [], [])


# ------------------------------------------------------------------------------- depth selection (_cells)


def test_depth_is_chosen_on_the_selection_seed_and_judged_on_the_others():
    """Known values, 2 depths x 3 seeds (no noise model: the values are the data). The depth with the lowest log error
    on the lowest seed is chosen, even where the other depth is better on every other seed; the cell's values and
    evaluation variances are the chosen depth's OTHER seeds, in seed order; ``biased`` is set exactly when the chosen
    depth has no other seed; the lowest seed of the whole (paradigm, budget) is the selection seed, even where a depth
    lacks it; a tie on the selection seed goes to the smaller depth; one depth keeps all its seeds, never biased."""
    records = {
        # depth 2 wins seed 0 (-1.0 < -0.5) though depth 4 is far better on seeds 1 and 2: judged on 1 and 2 only
        ("masked", 2, 1e12): {0: (-1.0, 0.01), 2: (0.7, 0.03), 1: (0.5, 0.02)},
        ("masked", 4, 1e12): {0: (-0.5, 0.04), 1: (-2.0, 0.05), 2: (-2.2, 0.06)},
        # only the selection seed anywhere: chosen and judged on it, biased
        ("diffusion", 2, 1e12): {0: (0.2, 0.01)},
        ("diffusion", 4, 1e12): {0: (0.1, 0.02)},
        # the chosen depth (2) has only the selection seed, the other depth has more: still biased, judged on seed 0
        ("diffusion", 2, 1e13): {0: (-9.0, 0.07)},
        ("diffusion", 4, 1e13): {0: (0.0, 0.08), 1: (0.1, 0.09)},
        # seeds 3, 5, 7: seed 3 selects; depth 2 lacks it, so depth 4 is chosen however bad its seed 3 is
        ("autoregressive", 2, 1e12): {5: (-5.0, 0.01), 7: (-5.0, 0.01)},
        ("autoregressive", 4, 1e12): {3: (5.0, 0.1), 5: (1.0, 0.2), 7: (2.0, 0.3)},
        # a tie on the selection seed: the smaller depth
        ("autoregressive", 2, 1e13): {0: (0.3, 0.0), 1: (0.4, 0.0), 2: (0.6, 0.0)},
        ("autoregressive", 4, 1e13): {0: (0.3, 0.0), 1: (-0.4, 0.0), 2: (-0.6, 0.0)},
        # one depth: all seeds judged, never biased, even with a single seed
        ("masked", 2, 1e13): {1: (0.1, 0.01), 0: (0.2, 0.02), 2: (0.3, 0.03)},
        ("masked", 2, 1e14): {0: (0.4, 0.04)},
    }
    cells = _cells(records)
    want = {  # (paradigm, budget): (depth, values, eval_var, biased, depths)
        ("masked", 1e12): (2, [0.5, 0.7], [0.02, 0.03], False, 2),
        ("diffusion", 1e12): (4, [0.1], [0.02], True, 2),
        ("diffusion", 1e13): (2, [-9.0], [0.07], True, 2),
        ("autoregressive", 1e12): (4, [1.0, 2.0], [0.2, 0.3], False, 2),
        ("autoregressive", 1e13): (2, [0.4, 0.6], [0.0, 0.0], False, 2),
        ("masked", 1e13): (2, [0.2, 0.1, 0.3], [0.02, 0.01, 0.03], False, 1),
        ("masked", 1e14): (2, [0.4], [0.04], False, 1),
    }
    assert set(cells) == set(want)
    for key, (depth, values, eval_var, biased, depths) in want.items():
        c = cells[key]
        got = (c.depth, sorted(c.values.tolist()), sorted(c.eval_var.tolist()), c.biased, c.depths)
        assert got == (depth, sorted(values), sorted(eval_var), biased, depths), key
    # several depths: the judged values are in seed order and their evaluation variances stay with them
    assert cells[("autoregressive", 1e12)].values.tolist() == [1.0, 2.0]
    assert cells[("autoregressive", 1e12)].eval_var.tolist() == [0.2, 0.3]


def test_hold_out_holds_for_random_seed_layouts():
    """Random layouts (2 depths, each with a random non-empty subset of seeds 0-3, standard normal values, fixed
    seed): the chosen depth has the lowest value on the lowest seed among the depths that have it; the judged
    values are exactly that depth's values at its other seeds (the selection seed's value never among them); and
    ``biased`` is True exactly when that depth has no other seed."""
    rng = np.random.default_rng(20)
    n_biased = n_held_out = 0
    for _ in range(400):
        records = {}
        for d in (2, 4):
            seeds = [s for s in range(4) if rng.random() < 0.5] or [int(rng.integers(4))]
            records[("masked", d, 1e12)] = {s: (float(rng.standard_normal()), float(rng.random())) for s in seeds}
        (c,) = _cells(records).values()
        sel = min(s for seeds in records.values() for s in seeds)
        cand = {d: seeds[sel][0] for (_, d, _), seeds in records.items() if sel in seeds}
        chosen = min(cand, key=lambda d: (cand[d], d))
        seeds = records[("masked", chosen, 1e12)]
        rest = [seeds[s] for s in sorted(seeds) if s != sel]
        assert c.depth == chosen and c.depths == 2
        assert c.biased == (not rest)
        if rest:
            n_held_out += 1
            assert c.values.tolist() == [y for y, _ in rest] and c.eval_var.tolist() == [v for _, v in rest]
        else:
            n_biased += 1
            assert c.values.tolist() == [seeds[sel][0]]
    assert n_biased >= 20 and n_held_out >= 200  # both branches exercised


def test_a_depth_chosen_on_the_judged_seed_caps_its_comparisons():
    """Through ``decide``: 2 depths x 3 seeds at 1e12 and 1e13 but only seed 0 at 1e14, with huge true gaps (prompt
    error 0.05 vs 0.2 vs 0.8, lognormal seed noise sd 0.1). The 1e14 cells are chosen and judged on seed 0: every
    comparison resting on them is capped ("model size chosen on the seed it is judged on") and never confident, while
    the 1e12 comparisons, judged on held-out seeds, are confident and uncapped."""
    rng = np.random.default_rng(21)
    prompt = {"autoregressive": 0.05, "masked": 0.2, "diffusion": 0.8}
    a = _sim_study(rng, lambda p, b: prompt[p], lambda p, b: {"autoregressive": 20.0, "masked": 40.0, "diffusion": 80.0}[p])
    b = _sim_study(rng, lambda p, b: min(1.0, 1.2 * prompt[p]), lambda p, b: 1.2 * {"autoregressive": 20.0, "masked": 40.0,
                                                                                        "diffusion": 80.0}[p])  # fmt: skip
    rows = a.rows + [{**r, "depth": 4, "run": r["run"] + "-d4"} for r in b.rows]
    rows = [r for r in rows if r["budget"] != 1e14 or r["seed"] == 0]
    v = decide(Study(a.root, rows, [], []))
    top = [c for f in v.families.values() for c in f if c.metric in ("kid", "prompt") and "1e+14" in c.where]
    low = [c for f in v.families.values() for c in f if c.metric in ("kid", "prompt") and "1e+12" in c.where]
    assert v.noise["prompt"].source == "seeds" and v.cells["prompt"][("masked", 1e14)].biased
    assert not v.cells["prompt"][("masked", 1e12)].biased and v.cells["prompt"][("masked", 1e12)].values.size == 2
    assert top and all(CAPPED in c.capped and c.label != CONFIDENT for c in top)
    assert low and all(not c.capped and c.label == CONFIDENT for c in low)
    averaged = [c for c in v.families["claims"] if c.where.startswith("averaged over")]
    assert averaged and all(CAPPED in c.capped for c in averaged)  # the 1e14 cells are in every average


def test_two_depth_null_is_unbiased_and_keeps_its_level():
    """Null simulation: 300 studies, 3 paradigms x 2 depths x 3 budgets x 3 seeds, every paradigm equal at its best
    depth (prompt error 0.3, KID 50, lognormal seed noise sd 0.1); next-token's two depths are equally good (the
    selection seed picks the luckier one), the others' second depth is 3x worse (never picked). Held out from the
    choice, next-token's judged cell means are unbiased (mean error vs truth within 4 standard errors), its
    comparisons' t statistics average ~0, and confident verdicts (a claim HELD / DID NOT HOLD, a table cell confident)
    occur in at most ALPHA of the studies (+ 3 binomial sd). Judging on the selection seed too biases next-token's
    cells downward by ~0.56 sd / 3."""
    rng = np.random.default_rng(22)
    n = 300
    worse = {"masked": 3.0, "diffusion": 3.0}
    truth = {"prompt": math.log(0.3), "kid": math.log(50.0)}
    bias, z, shapes = [], [], set()
    false_claims = false_picks = 0
    for _ in range(n):
        v = decide(_two_depth_study(rng, worse))
        false_claims += any(c["status"] in ("held", "did not hold") for c in v.claims)
        false_picks += any(c["label"] == CONFIDENT for c in v.table)
        for metric, t in truth.items():
            for (p, _), c in v.cells[metric].items():
                if p == "autoregressive":
                    shapes.add((c.values.size, c.biased, c.depths))
                    bias.append(c.mean - t)
        for c in v.families["claims"]:
            if c.metric in ("kid", "prompt") and "autoregressive" in (c.a, c.b) and c.test.se:
                z.append((c.test.estimate if c.a == "autoregressive" else -c.test.estimate) / c.test.se)
    bias, z = np.array(bias), np.array(z)
    assert abs(bias.mean()) <= 4 * bias.std(ddof=1) / math.sqrt(bias.size), bias.mean()
    # z: a few comparisons per study share next-token's cells, so count studies, not comparisons, as independent
    assert abs(z.mean()) <= 4 * z.std(ddof=1) / math.sqrt(n), z.mean()
    assert false_claims / n <= ALPHA + _band(ALPHA, n) and false_picks / n <= ALPHA + _band(ALPHA, n), (false_claims, false_picks)
    assert shapes == {(2, False, 2)}  # every cell judged on the 2 seeds it was not chosen on


# ------------------------------------------------------------------------------- variance of a cell's mean (cell_var)


def test_cell_var_matches_a_hand_computed_value():
    """Three values with evaluation variances 0.01, 0.02, 0.03 and retraining variance 0.04: the mean's variance is
    (3 * 0.04 + 0.06) / 3^2 = 0.02 (one value: 0.04 + 0.03); without known evaluation variances, the pooled variance / n."""
    c = Cell("masked", 1e12, 2, np.array([0.1, 0.2, 0.3]), np.array([0.01, 0.02, 0.03]), False, 1)
    noise = Noise("seeds", var=0.09, df=10.0, cells=5, retrain_var=0.04)
    assert cell_var(c, noise) == pytest.approx(0.02)
    one = Cell("masked", 1e12, 2, np.array([0.1]), np.array([0.03]), True, 2)
    assert cell_var(one, noise) == pytest.approx(0.07)
    unknown = Cell("masked", 1e12, 2, np.array([0.1, 0.2, 0.3]), np.array([0.01, math.nan, 0.03]), False, 1)
    assert cell_var(unknown, noise) == pytest.approx(0.09 / 3)


def test_cell_var_is_the_monte_carlo_variance_of_a_cell_mean():
    """Noise model (cell_var's): value = cell truth + retraining noise N(0, 0.01) + evaluation noise N(0, e) with e
    known per value, e around 0.0005, 0.01 or 0.04 (x U(0.5, 1.5)) by cell: 3 x 600 simulated 3-seed cells.
    With the noise estimated as the report does (_noise: pooled variance less the mean evaluation variance), the
    standardised cell means (mean - truth) / sqrt(cell_var) have variance ~1 at every evaluation-noise level (an
    n-times-too-large variance gives ~1/3; one pooled variance for every cell, ~0.35 and ~1.7 at the extremes)."""
    rng = np.random.default_rng(23)
    levels, per_level, retrain = (0.0005, 0.01, 0.04), 600, 0.01
    records, truth = {}, {}
    for li, e in enumerate(levels):
        for i in range(per_level):
            key = (f"p{li}-{i}", 1, 1e12)
            mu = float(rng.normal(0, 2))
            ev = e * rng.uniform(0.5, 1.5, 3)
            ys = mu + math.sqrt(retrain) * rng.standard_normal(3) + np.sqrt(ev) * rng.standard_normal(3)
            records[key], truth[key[0]] = {s: (float(ys[s]), float(ev[s])) for s in range(3)}, mu
    noise = _noise(records)
    assert noise.source == "seeds" and noise.retrain_var == pytest.approx(retrain, rel=0.3)
    cells = _cells(records)
    for li, _ in enumerate(levels):
        zs = np.array([(c.mean - truth[p]) / math.sqrt(cell_var(c, noise)) for (p, _), c in cells.items()
                       if p.startswith(f"p{li}-")])  # fmt: skip
        assert zs.size == per_level and 0.75 <= zs.var() <= 1.3, (levels[li], zs.var())


def test_null_prompt_comparisons_are_rejected_at_the_nominal_rate():
    """Null simulation reusing test_report's ``_sim_study``: 400 studies of 3 equal paradigms x 3 budgets x 3 seeds
    (lognormal seed noise sd 0.1 on the prompt error; each value's binomial evaluation variance at 500 images known,
    so the prompt tests rest on cell_var). The unadjusted two-sided rejection rate (p <= ALPHA) of the claims'
    fixed-pair prompt comparisons is close to ALPHA from both sides: within 3 binomial sd counted over studies (the
    comparisons of one study share cells). A variance of the mean n times too large rejects almost never."""
    rng = np.random.default_rng(24)
    n, rejected, total = 400, 0, 0
    for _ in range(n):
        v = decide(_sim_study(rng, lambda p, b: 0.3, lambda p, b: 50.0))
        assert v.noise["prompt"].retrain_var is not None  # the tests go through cell_var
        for c in v.families["claims"]:
            if c.metric == "prompt":
                total += 1
                rejected += c.p2 <= ALPHA
    rate = rejected / total
    assert total >= 4 * n and abs(rate - ALPHA) <= _band(ALPHA, n), (rejected, total)
    assert set(PARADIGMS) == {p for p, _ in v.cells["prompt"]}


def test_prompt_noise_measured_near_zero_caps_verdicts_at_higher_rates():
    """Seeds only at the smallest budget, where every full-match rate is ~4 %: log(1 - rate) barely moves there, so the
    retraining noise measured says nothing about the larger budgets' rates (30-60 %). Their prompt comparisons are at
    most suggestive however large the gap, and the noise says why; with the seeds where rates are high, the same gap is
    confident."""
    from flopmatch.report.data import Study

    rng = np.random.default_rng(0)
    err = {"autoregressive": 0.4, "masked": 0.55, "diffusion": 0.7}  # full match 60 %, 45 %, 30 % above the floor

    def prompt(p, b):
        return 0.96 if b == 1e12 else err[p]

    def study(seeded):
        rows = []
        for b in (1e12, 1e13, 1e14):
            seeds = (0, 1, 2) if b == seeded else (0,)
            rows += _sim_study(rng, prompt, lambda p, b: 50.0, seeds=seeds, budgets=(b,), sd=0.01).rows
        return Study(_sim_study(rng, prompt, lambda p, b: 50.0).root, rows, [], [])

    low = decide(study(1e12))
    reach = 2 * low.noise["prompt"].measured_rate  # the highest seeded cell's mean rate (~4 %), twice
    assert f"so comparisons where a rate is above {max(reach, 0.05):.0%} are at most suggestive" in low.noise["prompt"].describe()
    high = [c for c in low.table if c["need"] == "prompt following" and c["budget"] > 1e12]
    assert high and all(c["label"] != CONFIDENT for c in high), [(c["budget"], c["label"]) for c in high]
    capped = [c for f in low.families.values() for c in f if c.metric == "prompt" and "1e+12" not in c.where]
    assert capped and all("retraining noise measured only at full-match rates up to" in c.capped for c in capped)
    assert any(c.p_adj <= ALPHA and c.label == SUGGESTIVE for c in capped)  # the cap is what held a verdict back

    sure = decide(study(1e14))
    assert sure.noise["prompt"].reaches(1.0) and "at most suggestive" not in sure.noise["prompt"].describe()
    top = next(c for c in sure.table if c["need"] == "prompt following" and c["budget"] == 1e14)
    assert top["label"] == CONFIDENT and top["choice"] == "autoregressive"


def test_sampling_flops_say_the_ratio_with_the_tokenizers_decode():
    """Sampling FLOPs are compared exactly on the generator's count; the ratio with each tokenizer's decode added (which
    can outweigh a small generator) is said beside it, computed from the rows' figures."""
    rng = np.random.default_rng(0)
    study = _sim_study(rng, lambda p, b: 0.3, lambda p, b: 50.0)
    gen = {"autoregressive": 2e7, "masked": 5e7, "diffusion": 1e8}
    dec = {"autoregressive": 1e8, "masked": 1e8, "diffusion": 3e8}
    for r in study.rows:
        r["sample_flops_per_image"], r["decode_flops_per_image"] = gen[r["objective"]], dec[r["objective"]]
    v = decide(study)
    flops = [c for claim in v.claims for part in claim["parts"] for c, _ in part["comparisons"] if c.metric == "flops"]
    assert flops
    for c in flops:
        assert c.ratio() == pytest.approx(gen[c.a] / gen[c.b])
        want = (gen[c.a] + dec[c.a]) / (gen[c.b] + dec[c.b])
        assert f"with the tokenizer's decode: {want:.3g}" in c.summary(), c.summary()


def test_prompt_claims_average_over_the_budgets_where_prompts_are_followed():
    """Claim 1's gaps are averaged over the budgets where a paradigm reaches a 5 % full-match rate (where all are near
    0, log(1 - rate) is ~0 for every paradigm and would only dilute the gap); this look at both rates alike keeps the
    null's false verdicts at the nominal rate."""
    budgets = (1e11, 1e12, 1e13, 1e14)
    rate = {1e11: 0.01, 1e12: 0.01, 1e13: 0.3, 1e14: 0.5}  # the first two budgets: nobody follows prompts yet
    rng = np.random.default_rng(3)
    v = decide(_sim_study(rng, lambda p, b: 1 - rate[b] * (1.4 if p == "autoregressive" and b >= 1e13 else 1.0),
                          lambda p, b: 50.0, budgets=budgets, sd=0.01))
    (part,) = [p for c in v.claims if c["id"] == 1 for p in c["parts"] if p["text"].startswith("next-token beats")]
    (comp, _), = part["comparisons"]
    assert comp.where == "averaged over 2 budgets where the paradigms' mean full-match rate reaches 5% (1e+13, 1e+14 FLOPs)"
    n, rejected = 300, 0
    for _ in range(n):  # unadjusted two-sided rejections of next-token vs diffusion, under no difference
        null = decide(_sim_study(rng, lambda p, b: 1 - rate[b], lambda p, b: 50.0, budgets=budgets, sd=0.05))
        (c, _), = [p for claim in null.claims if claim["id"] == 1 for p in claim["parts"]][0]["comparisons"]
        rejected += c.p2 is not None and c.p2 < ALPHA
    assert rejected / n <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / n), rejected


def test_a_paradigms_own_trend_keeps_its_level_and_finds_a_real_slope():
    """own_trend: a paradigm whose KID does not move with compute is found improving at the nominal rate (one-sided,
    within binomial slack); one that improves 25 % per decade is found so nearly always."""
    from flopmatch.report.verdicts import own_trend

    rng = np.random.default_rng(3)
    n = 300
    flat = sum(own_trend(decide(_sim_study(rng, lambda p, b: 0.3, lambda p, b: 50.0)), "kid", "masked").p < ALPHA
               for _ in range(n)) / n
    assert abs(flat - ALPHA) <= _band(ALPHA, n)
    slope = math.log10(0.75)  # KID x 0.75 per decade
    found = [own_trend(decide(_sim_study(rng, lambda p, b: 0.3, lambda p, b: 50.0 * (b / 1e12) ** slope)), "kid", p)
             for _ in range(40) for p in ("masked",)]
    assert sum(t.p < ALPHA for t in found) >= 36
    assert np.mean([t.estimate for t in found]) == pytest.approx(math.log(0.75), abs=0.03)  # per decade, log scale


def test_the_kid_banner_says_when_kid_shows_no_trend_or_beats_the_tokenizer():
    """The report's KID caveats: no paradigm improving detectably with compute is said (and not when they do);
    samples clearly below their tokenizer's rKID are named, samples within noise of it are not."""
    from flopmatch.report.build import _kid_banner

    rng = np.random.default_rng(5)
    flat = decide(_sim_study(rng, lambda p, b: 0.3, lambda p, b: 50.0, sd=0.02))
    falling = decide(_sim_study(rng, lambda p, b: 0.3, lambda p, b: 50.0 * (b / 1e12) ** -0.3, sd=0.02))

    def ceilings(rkid):
        return {"tokenizers": {"discrete": {"paradigms": ["masked", "autoregressive"],
                                            "metrics": {"kid": {"effnet": {"recon": rkid}}}}}}

    assert any("improves detectably with training compute in no paradigm" in line for line in _kid_banner(flat, None))
    assert _kid_banner(falling, None) == []
    below = [line for line in _kid_banner(flat, ceilings(80.0)) if "better KID than their own tokenizer" in line]
    assert len(below) == 1 and "masked's KID" in below[0] and "autoregressive's KID" in below[0]
    assert "diffusion" not in below[0].split("(")[1]  # diffusion has no ceiling in this document
    assert not [line for line in _kid_banner(flat, ceilings(50.0)) if "better KID than" in line]  # the truth: within noise
