"""The whole analysis of a study (:func:`analyse`) and its separate EMA analysis.

The paper's claims and the recommendation table are decided in :mod:`flopmatch.report.verdicts`;
fits and crossovers for the figures come from :mod:`flopmatch.report.analysis`. EMA's effect per
paradigm is reported here on its own, outside the claims' family of tests: a paired comparison of
each run's raw weights with its averaged ones (the EMA training kept, and the post-hoc EMAs of the
study's sweep, EDM2) at the same sampling setting. It is measured in KID, the verdicts' image-quality metric:
FID at a few hundred images is biased upward by an amount that depends on the model, and an averaged network
is another model, so a FID change would mix the averaging's effect with a change of bias.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from flopmatch.errors import UserError
from flopmatch.report.analysis import KID_FLOOR, Analyser, Analysis
from flopmatch.report.data import Study
from flopmatch.report.stats import welch_test
from flopmatch.report.verdicts import DIFF, decide
from flopmatch.rundir import parse_weights

EMA_LEVEL = 0.9


def _interval(v: np.ndarray) -> tuple[float, float] | None:
    """EMA_LEVEL t interval of the mean of log ratios ``v``, as relative changes; None below 2 values."""
    if v.size < 2:
        return None
    half = float(sps.t.ppf((1 + EMA_LEVEL) / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return math.expm1(v.mean() - half), math.expm1(v.mean() + half)


def ema_analysis(study: Study) -> list[dict]:
    """Per paradigm and averaged weights: log(KID_avg / KID_raw) over runs evaluated both ways (negative: the
    average helps; KIDs floored at KID_FLOOR as the verdicts floor them), for training's EMA (``weights`` "ema") and
    every post-hoc EMA evaluated ("ema@SIGMA_REL"). ``fid_change`` is the mean FID change of the same pairs (those
    with FIDs at equal real counts), for the record: FID's small-sample bias differs between models.

    Paired by run and setting (same network, same samples' seeds and prompts), so retraining noise cancels in
    each difference; the interval is a t interval over the runs' differences, ``per_run`` the differences
    themselves, (run, depth, seed, change). Where a paradigm has post-hoc EMAs (the sweep's runs, one budget),
    training's EMA is compared on those same runs (``scope`` "sweep"), and, when raw weights were evaluated on more
    runs (``--eval-raw``), once more on all of them (``scope`` "all"; not in the figure nor in the choice of the
    lowest). ``best`` marks, per paradigm, the lowest mean among the "sweep"-scope averages: chosen on the same
    runs, so its gain is optimistic. Training EMA's effect in diffusion is also compared with each token
    paradigm's, over all its runs (Welch, two-sided p; not in the claims' family). ``prompt_change``: mean change
    in prompt full match (absolute), same pairs.
    """
    # run, depth, seed, log KID ratio, prompt full match change, log FID ratio
    Pair = tuple[str, int, int, float, float | None, float | None]
    found: dict[tuple[str, str], list[Pair]] = {}
    residual: dict[tuple[str, str], list[float]] = {}
    fixed_sigma: dict[str, dict[str, float]] = {}  # training's EMA as a relative length, per paradigm and run
    by_run: dict[str, list[dict]] = {}
    for r in study.rows:
        if r["setting"] and r["done"] and r["kid_effnet"] is not None:
            by_run.setdefault(r["run"], []).append(r)
    for run, rows in sorted(by_run.items()):
        for raw in rows:
            if raw["weights"] != "model":
                continue
            for r in rows:  # the same setting, sample count and seed with other weights
                if r["weights"] == "model" or r["setting"] != raw["setting"].replace("weights=model", f"weights={r['weights']}"):
                    continue
                pm = (None if r["prompt_full_match"] is None or raw["prompt_full_match"] is None
                      else r["prompt_full_match"] - raw["prompt_full_match"])
                # FIDs at other real counts (an entry evaluated before FID used equal counts) differ by their bias,
                # not by the weights: no FID pair (KID is unbiased at any count)
                fid = (math.log(r["fid_effnet"] / raw["fid_effnet"]) if r["fid_effnet"] and raw["fid_effnet"]
                       and r.get("fid_num_real") == raw.get("fid_num_real") else None)
                kid = math.log(max(r["kid_effnet"], KID_FLOOR) / max(raw["kid_effnet"], KID_FLOOR))
                found.setdefault((r["objective"], r["weights"]), []).append((run, r["depth"], r["seed"], kid, pm, fid))
                if r.get("posthoc_residual") is not None:
                    residual.setdefault((r["objective"], r["weights"]), []).append(r["posthoc_residual"])
                if r["weights"] == "ema" and r.get("ema_sigma_rel") is not None:
                    fixed_sigma.setdefault(r["objective"], {})[run] = r["ema_sigma_rel"]
    sweep_runs: dict[str, set[str]] = {}
    for (p, w), pairs in found.items():
        if parse_weights(w) is not None:
            sweep_runs.setdefault(p, set()).update(x[0] for x in pairs)

    def entry(p: str, w: str, pairs: list[Pair], scope: str) -> dict:
        v = np.asarray([x[3] for x in pairs])
        pms = [x[4] for x in pairs if x[4] is not None]
        fids = [x[5] for x in pairs if x[5] is not None]
        sig = [fixed_sigma.get(p, {}).get(x[0]) for x in pairs]
        sig = [x for x in sig if x is not None]
        return {"paradigm": p, "weights": w, "sigma_rel": parse_weights(w), "scope": scope, "n": int(v.size),
                "mean_change": float(math.expm1(v.mean())), "interval": _interval(v),
                "per_run": [(run, depth, seed, float(math.expm1(d))) for run, depth, seed, d, *_ in pairs],
                "fid_change": float(math.expm1(np.mean(fids))) if fids else None,
                "prompt_change": float(np.mean(pms)) if pms else None,
                "residual": max(residual[(p, w)]) if residual.get((p, w)) and scope != "all" else None,
                "vs_diffusion_p": None, "best": False,
                # training's EMA: its relative length, averaged over these runs (flopmatch.ema.fixed_ema_sigma_rel)
                "equivalent_sigma_rel": float(np.mean(sig)) if w == "ema" and sig else None}

    out = []
    for (p, w), pairs in sorted(found.items(), key=lambda kv: (kv[0][0], parse_weights(kv[0][1]) or 0.0)):
        if w == "ema" and sweep_runs.get(p):
            out.append(entry(p, w, [x for x in pairs if x[0] in sweep_runs[p]], "sweep"))
            if len(pairs) > out[-1]["n"]:
                out.append(entry(p, w, pairs, "all"))
        else:
            out.append(entry(p, w, pairs, "sweep" if sweep_runs.get(p) else "all"))
    fixed = {p: [x[3] for x in pairs] for (p, w), pairs in found.items() if w == "ema"}  # every run
    for p in fixed:
        if p != DIFF and DIFF in fixed:  # shown on the row that holds every run (the last "ema" row)
            t = welch_test(fixed[DIFF], fixed[p])
            row = [e for e in out if e["paradigm"] == p and e["weights"] == "ema"][-1]
            row["vs_diffusion_p"] = None if t.p is None else min(1.0, 2 * min(t.p, 1 - t.p))
    for p in {e["paradigm"] for e in out}:
        mine = [e for e in out if e["paradigm"] == p and (e["scope"] == "sweep" or not sweep_runs.get(p))]
        min(mine, key=lambda e: e["mean_change"])["best"] = True
    return out


def analyse(study: Study, n_boot: int = 1000, seed: int = 0, workers: int | None = 1) -> Analysis:
    """Fits, crossovers, inference summaries, the verdicts and the EMA analysis of a study (deterministic; the same
    whatever ``workers``, the processes of the trend fits: :func:`~flopmatch.report.bootstrap.bootstrap_all`)."""
    if n_boot < 1:
        raise UserError(f"--n-boot must be >= 1, got {n_boot}")
    an = Analyser(study, n_boot, seed, workers)
    return Analysis(an.paradigms, an.fits, an.crossovers(), an.inference, decide(study), ema_analysis(study),
                    sorted(an.excluded))
