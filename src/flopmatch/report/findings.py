"""The whole analysis of a study (:func:`analyse`) and its separate EMA analysis.

The paper's claims and the recommendation table are decided in :mod:`flopmatch.report.verdicts`;
fits and crossovers for the figures come from :mod:`flopmatch.report.analysis`. EMA's effect per
paradigm is reported here on its own, outside the claims' family of tests: a paired comparison of
each run's raw and EMA weights at the same sampling setting.
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


def ema_analysis(study: Study) -> list[dict]:
    """Per paradigm: log(FID_EMA / FID_raw) over runs evaluated both ways (negative: EMA helps).

    Paired by run and setting (same network, same samples' seeds), so retraining noise cancels in
    each difference; the interval is a t interval over the runs' differences. Diffusion's effect is
    also compared with each token paradigm's (Welch, two-sided p; not in the claims' family).
    """
    diffs: dict[str, list[float]] = {}
    by_key = {(r["run"], r["setting"]): r for r in study.rows if r["setting"]}
    for (run, key), r in sorted(by_key.items()):
        if r["weights"] != "model" or not r["done"] or not r["fid_effnet"]:
            continue
        twin = by_key.get((run, key.replace("weights=model", "weights=ema")))
        if twin and twin["fid_effnet"]:
            diffs.setdefault(r["objective"], []).append(math.log(twin["fid_effnet"] / r["fid_effnet"]))
    out = []
    for p, d in diffs.items():
        v = np.asarray(d)
        row = {"paradigm": p, "n": int(v.size), "mean_change": float(math.expm1(v.mean())), "interval": None, "vs_diffusion_p": None}
        if v.size >= 2:
            half = float(sps.t.ppf((1 + EMA_LEVEL) / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
            row["interval"] = (math.expm1(v.mean() - half), math.expm1(v.mean() + half))
        if p != DIFF and DIFF in diffs:
            t = welch_test(diffs[DIFF], d)
            row["vs_diffusion_p"] = None if t.p is None else min(1.0, 2 * min(t.p, 1 - t.p))
        out.append(row)
    return out


def analyse(study: Study, n_boot: int = 1000, seed: int = 0) -> Analysis:
    """Fits, crossovers, inference summaries, the verdicts and the EMA analysis of a study (deterministic)."""
    if n_boot < 1:
        raise UserError(f"--n-boot must be >= 1, got {n_boot}")
    an = Analyser(study, n_boot, seed)
    return Analysis(an.paradigms, an.fits, an.crossovers(), an.inference, decide(study), ema_analysis(study),
                    sorted(an.excluded))
