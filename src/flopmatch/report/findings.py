"""The whole analysis of a study (:func:`analyse`) and its separate EMA analysis.

The paper's claims and the recommendation table are decided in :mod:`flopmatch.report.verdicts`;
fits and crossovers for the figures come from :mod:`flopmatch.report.analysis`. EMA's effect per
paradigm is reported here on its own, outside the claims' family of tests: a paired comparison of
each run's raw weights with its averaged ones (the EMA training kept, and the post-hoc EMAs of the
study's sweep, EDM2) at the same sampling setting.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from flopmatch.errors import UserError
from flopmatch.report.analysis import Analyser, Analysis
from flopmatch.report.data import Study
from flopmatch.report.stats import welch_test
from flopmatch.report.verdicts import DIFF, decide

EMA_LEVEL = 0.9


def sigma_of(weights: str) -> float | None:
    """The post-hoc EMA length of a weights name ("ema@0.1" -> 0.1); None for "ema" (training's EMA) and "model"."""
    head, sep, tail = weights.partition("@")
    return float(tail) if head == "ema" and sep else None


def _interval(v: np.ndarray) -> tuple[float, float] | None:
    """EMA_LEVEL t interval of the mean of log ratios ``v``, as relative changes; None below 2 values."""
    if v.size < 2:
        return None
    half = float(sps.t.ppf((1 + EMA_LEVEL) / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return math.expm1(v.mean() - half), math.expm1(v.mean() + half)


def ema_analysis(study: Study) -> list[dict]:
    """Per paradigm and averaged weights: log(FID_avg / FID_raw) over runs evaluated both ways (negative: the
    average helps), for training's EMA (``weights`` "ema") and every post-hoc EMA evaluated ("ema@SIGMA_REL").

    Paired by run and setting (same network, same samples' seeds and prompts), so retraining noise cancels in
    each difference; the interval is a t interval over the runs' differences, ``per_run`` the differences
    themselves (seed by seed). ``best`` marks, per paradigm, the averaged weights with the lowest mean FID among
    those measured on the most runs: chosen on the same runs, so its gain is optimistic. Training EMA's
    effect in diffusion is also compared with each token paradigm's (Welch, two-sided p; not in the claims' family).
    ``prompt_change``: mean change in prompt full match (absolute), same pairs.
    """
    found: dict[tuple[str, str], list[tuple[str, int, float, float | None]]] = {}
    residual: dict[tuple[str, str], list[float]] = {}
    fixed_sigma: dict[str, list[float]] = {}  # training's EMA as a relative length, per paradigm
    by_run: dict[str, list[dict]] = {}
    for r in study.rows:
        if r["setting"] and r["done"] and r["fid_effnet"]:
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
                found.setdefault((r["objective"], r["weights"]), []).append(
                    (run, r["seed"], math.log(r["fid_effnet"] / raw["fid_effnet"]), pm))
                if r.get("posthoc_residual") is not None:
                    residual.setdefault((r["objective"], r["weights"]), []).append(r["posthoc_residual"])
                if r["weights"] == "ema" and r.get("ema_sigma_rel") is not None:
                    fixed_sigma.setdefault(r["objective"], []).append(r["ema_sigma_rel"])
    out = []
    for (p, w), rows in sorted(found.items(), key=lambda kv: (kv[0][0], sigma_of(kv[0][1]) or 0.0)):
        v = np.asarray([x[2] for x in rows])
        pms = [x[3] for x in rows if x[3] is not None]
        out.append({"paradigm": p, "weights": w, "sigma_rel": sigma_of(w), "n": int(v.size),
                    "mean_change": float(math.expm1(v.mean())), "interval": _interval(v),
                    "per_run": [(run, seed, float(math.expm1(d))) for run, seed, d, _ in rows],
                    "prompt_change": float(np.mean(pms)) if pms else None,
                    "residual": max(residual[(p, w)]) if residual.get((p, w)) else None,
                    "vs_diffusion_p": None, "best": False,
                    # training's EMA: its relative length, averaged over the runs (flopmatch.ema.fixed_ema_sigma_rel)
                    "equivalent_sigma_rel": float(np.mean(fixed_sigma[p])) if w == "ema" and fixed_sigma.get(p) else None})
    fixed = {e["paradigm"]: [math.log1p(c) for _, _, c in e["per_run"]] for e in out if e["weights"] == "ema"}
    for e in out:
        if e["weights"] == "ema" and e["paradigm"] != DIFF and DIFF in fixed:
            t = welch_test(fixed[DIFF], fixed[e["paradigm"]])
            e["vs_diffusion_p"] = None if t.p is None else min(1.0, 2 * min(t.p, 1 - t.p))
    for p in {e["paradigm"] for e in out}:
        mine = [e for e in out if e["paradigm"] == p]
        most = max(e["n"] for e in mine)
        min((e for e in mine if e["n"] == most), key=lambda e: e["mean_change"])["best"] = True
    return out


def analyse(study: Study, n_boot: int = 1000, seed: int = 0) -> Analysis:
    """Fits, crossovers, inference summaries, the verdicts and the EMA analysis of a study (deterministic)."""
    if n_boot < 1:
        raise UserError(f"--n-boot must be >= 1, got {n_boot}")
    an = Analyser(study, n_boot, seed)
    return Analysis(an.paradigms, an.fits, an.crossovers(), an.inference, decide(study), ema_analysis(study),
                    sorted(an.excluded))
