"""The paper's four findings checked against a study, recommendations from its data, and :func:`analyse`.

Each finding is split into parts, each a claim with a status ("held", "did not hold",
"inconclusive", "not measured") computed by :mod:`flopmatch.report.analysis` from bootstrap
probabilities; the finding's verdict combines them (any part reversed -> did not hold; all held ->
held; otherwise inconclusive). Timing claims use the repeats that exist: latency repeats of every
run of a depth (same architecture), one throughput figure per run. FLOPs per image are analytic,
so their comparison has no noise.
"""

from __future__ import annotations

import math

import numpy as np

from flopmatch.errors import UserError
from flopmatch.report.analysis import (
    EXTRAPOLATE,
    METRIC,
    Analyser,
    Analysis,
    combine,
    confidence,
    median,
    p_lower,
    setting_medians,
    status_from,
)
from flopmatch.report.data import Study
from flopmatch.report.records import pareto_front

PAPER = {
    1: "Token methods, next-token first, follow prompts better than diffusion at equal training FLOPs.",
    2: "Next-token starts with better image quality; the fitted trends suggest diffusion catches up at scale.",
    3: "Next-token is by far the most inference-efficient (FLOPs per image, throughput with a KV cache); "
       "diffusion is the pick for low latency.",
    4: "EMA helps diffusion more than the token methods; autoencoder quality drives diffusion FID.",
}  # fmt: skip
AR, DIFF, MASKED = "autoregressive", "diffusion", "masked"


def _finding(i: int, parts: list[dict], extra: str = "") -> dict:
    return {"id": i, "paper": PAPER[i], "verdict": combine(parts), "parts": parts, "note": extra}


def finding_prompt(an: Analyser) -> dict:
    """(1) token methods beat diffusion on prompt following; next-token ahead of masked."""
    parts = [an.claim("prompt", AR, DIFF), an.claim("prompt", MASKED, DIFF), an.claim("prompt", AR, MASKED)]
    return _finding(1, parts)


def finding_quality(an: Analyser) -> dict:
    """(2) AR has the better FID at the smallest budget; diffusion's trend gets below AR's within EXTRAPOLATE x."""
    common = an.budgets("fid", [AR, DIFF])
    start = an.claim("fid", AR, DIFF, budgets=common[:1])
    start["claim"] += " at the smallest common budget"
    budgets = [p.budget for p in an.fits[("fid", AR)].frontier + an.fits[("fid", DIFF)].frontier] if (
        ("fid", AR) in an.fits and ("fid", DIFF) in an.fits) else []
    parts = [start]
    if budgets:
        far = max(budgets) * EXTRAPOLATE
        parts.append(an.trend_claim("fid", DIFF, AR, far))
    else:
        parts.append({"claim": "diffusion's fitted FID trend gets below next-token's", "status": "not measured",
                      "text": "needs FID of both paradigms"})
    cross = [c for c in an.crossover_list if c["metric"] == "fid" and {c["a"], c["b"]} == {AR, DIFF}]
    return _finding(2, parts, cross[0]["summary"] if cross else "")


def _per_depth(an: Analyser, key: str, who: str, better_low: bool, n_boot: int, rng) -> tuple[list, list[str], list[int]]:
    """Per depth shared by ``who`` and another paradigm: P(who beats every other on ``key``) and text."""
    depths = sorted({d for (p, d), v in an.inference.items() if p == who and v[key]})
    ps, texts, used = [], [], []
    for d in depths:
        others = {p: v[key] for (p, dd), v in an.inference.items() if dd == d and p != who and v[key]}
        if not others:
            continue
        mine = an.inference[(who, d)][key]
        sign = 1.0 if better_low else -1.0
        pp = [p_lower([sign * x for x in mine], [sign * x for x in v], n_boot, rng) for v in others.values()]
        p = None if any(x is None for x in pp) else min(pp)
        ps.append(p)
        used.append(d)
        meds = ", ".join(f"{q} {median(v):.3g}" for q, v in sorted({who: mine, **others}.items()))
        texts.append(f"depth {d}: {meds}" + ("" if p is None else f" (P={p:.2f})"))
    return ps, texts, used


def finding_inference(an: Analyser) -> dict:
    """(3) AR lowest FLOPs/image and highest throughput; diffusion lowest latency (per shared depth)."""
    rng = np.random.default_rng(an.seed + 12345)
    parts = []
    for key, who, low, label in (
        ("flops", AR, True, "next-token needs the fewest sampling FLOPs per image (analytic, no noise)"),
        ("throughput", AR, False, "next-token (KV cache) has the highest throughput"),
        ("latency", DIFF, True, "diffusion has the lowest latency (batch 1)"),
    ):
        if not any(p == who for p, _ in an.inference):
            parts.append({"claim": label, "status": "not measured", "text": f"no inference numbers for {who}"})
            continue
        if key == "flops":  # analytic: an exact comparison, so P is 1 or 0
            ps, texts, _ = [], [], []
            for d in sorted({d for p, d in an.inference if p == who}):
                others = {p: median(v["flops"]) for (p, dd), v in an.inference.items() if dd == d and p != who}
                if not others:
                    continue
                mine = median(an.inference[(who, d)]["flops"])
                ps.append(1.0 if mine < min(others.values()) else 0.0 if mine > min(others.values()) else 0.5)
                texts.append(f"depth {d}: " + ", ".join(f"{q} {v:.3g}" for q, v in sorted({who: mine, **others}.items())))
        else:
            ps, texts, _ = _per_depth(an, key, who, low, an.n_boot, rng)
        status = status_from(ps) if ps else "not measured"
        text = "; ".join(texts) if texts else "no depth measured for it and another paradigm"
        parts.append({"claim": label, "status": status, "text": text, "ps": ps})
    note = "Timings are measurements on the machine that ran the evaluation and vary with its load."
    return _finding(3, parts, note)


def finding_ema(an: Analyser) -> dict:
    """(4) relative FID reduction from EMA (raw vs EMA, same run and settings), diffusion vs token methods."""
    gains: dict[str, list[float]] = {}
    by_key = {(r["run"], r["setting"]): r for r in an.study.rows if r["setting"]}
    for (run, key), r in by_key.items():
        if r["weights"] != "model" or r["fid_effnet"] is None:
            continue
        twin = by_key.get((run, key.replace("weights=model", "weights=ema")))
        if twin and twin["fid_effnet"] is not None and r["fid_effnet"] > 0:
            gains.setdefault(r["objective"], []).append((r["fid_effnet"] - twin["fid_effnet"]) / r["fid_effnet"])
    ae = {"claim": "autoencoder quality drives diffusion FID", "status": "not measured",
          "text": "needs runs that differ only in their autoencoder; this report does not vary it"}
    if not gains:
        return _finding(4, [{"claim": "EMA helps diffusion more than the token methods", "status": "not measured",
                             "text": "no eval entries with raw weights (run `flopmatch eval --raw`)"}, ae])
    rng = np.random.default_rng(an.seed + 54321)
    parts = []
    for tok in (MASKED, AR):
        label = f"EMA lowers diffusion's FID more than {tok}'s (relative)"
        if DIFF not in gains or tok not in gains:
            parts.append({"claim": label, "status": "not measured", "text": "needs raw-weight entries of both"})
            continue
        p = p_lower([-g for g in gains[DIFF]], [-g for g in gains[tok]], an.n_boot, rng)
        text = (f"mean relative FID reduction: diffusion {np.mean(gains[DIFF]):+.3f} ({len(gains[DIFF])} pairs), "
                f"{tok} {np.mean(gains[tok]):+.3f} ({len(gains[tok])} pairs)" + ("" if p is None else f"; P={p:.2f}"))
        parts.append({"claim": label, "status": status_from([p]), "text": text, "ps": [p]})
    return _finding(4, parts + [ae])


def findings(an: Analyser) -> list[dict]:
    """The four findings, each with parts and a verdict."""
    return [finding_prompt(an), finding_quality(an), finding_inference(an), finding_ema(an)]


# ---------------------------------------------------------------------------------- recommendations


def _show(metric: str, err: float) -> str:
    return f"full match {1 - err:.3f}" if METRIC[metric].score else f"{metric.replace('_', ' ').upper()} {err:.3g}"


def _show_iv(metric: str, iv) -> str:
    """A 90 % interval of an error, shown in the metric's own units (a score interval flips)."""
    lo, hi = float(iv[0]), float(iv[1])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return " (no interval)"
    return f" [{1 - hi:.3g}, {1 - lo:.3g}]" if METRIC[metric].score else f" [{lo:.3g}, {hi:.3g}]"


def _quality_rec(an: Analyser, metric: str, topic: str) -> dict:
    per_budget: dict[float, list] = {}
    for p in an.paradigms:
        fit = an.fits.get((metric, p))
        for fp in fit.frontier if fit else []:
            per_budget.setdefault(fp.budget, []).append((fp.mean, p, fp.depth))
    lines, choice, conf = [], None, None
    for c in sorted(per_budget):
        ranked = sorted(per_budget[c])
        if len(ranked) < 2:
            continue
        (v1, p1, d1), (v2, p2, _) = ranked[0], ranked[1]
        prob = an.compare(metric, p1, p2, c)["p_a_better"]
        choice, conf = p1, confidence(prob)
        ptxt = "" if prob is None else f", P(better)={prob:.2f}"
        lines.append(f"at {c:.3g} FLOPs use {p1} (depth {d1}, {_show(metric, v1)}) over {p2} ({_show(metric, v2)}{ptxt}: {conf})")
    if not lines:
        return {"topic": topic, "choice": None, "confidence": None,
                "text": f"{topic}: not measured (needs {METRIC[metric].label} of two paradigms at a shared budget)"}
    text = f"{topic}: " + "; ".join(lines) + "."
    fitted = [(p, an.fits[(metric, p)]) for p in an.paradigms if (metric, p) in an.fits and an.fits[(metric, p)].boot]
    if len(fitted) >= 2:
        far = max(fp.budget for _, f in fitted for fp in f.frontier) * EXTRAPOLATE
        preds = sorted((f.boot.point.predict(far), p, f.boot.predict_interval(far)) for p, f in fitted)
        shown = ", ".join(f"{p} {_show(metric, v)}{_show_iv(metric, iv)}" for v, p, iv in preds)
        tc = an.trend_claim(metric, preds[0][1], preds[1][1], far)
        text += (f" Where the trends point: at {far:.3g} FLOPs ({EXTRAPOLATE:.0e}x the largest budget, an extrapolation) "
                 f"the fits predict {shown}; lowest {preds[0][1]} ({tc['text']}).")
        cross = [c for c in an.crossover_list if c["metric"] == metric and c["point"] is not None]
        for c in cross:
            text += f" {c['a']} vs {c['b']}: {c['summary']}."
    elif an.paradigms:
        text += " No trend to extrapolate (fits need >= 3 budgets per paradigm)."
    return {"topic": topic, "choice": choice, "confidence": conf, "text": text}


def _inference_rec(an: Analyser, key: str, topic: str, low: bool, unit: str) -> dict:
    rng = np.random.default_rng(an.seed + (777 if low else 888))
    depths = sorted({d for (p, d), v in an.inference.items() if v[key]})
    shared = [d for d in depths if sum(1 for (p, dd), v in an.inference.items() if dd == d and v[key]) >= 2]
    if not shared:
        return {"topic": topic, "choice": None, "confidence": None,
                "text": f"{topic}: not measured (needs timings of two paradigms at a shared depth)"}
    lines, choice, conf = [], None, None
    for d in shared:
        vals = {p: v[key] for (p, dd), v in an.inference.items() if dd == d and v[key]}
        ranked = sorted(vals, key=lambda p: (median(vals[p]) if low else -median(vals[p]), p))
        b1, b2 = ranked[0], ranked[1]
        sign = 1.0 if low else -1.0
        prob = p_lower([sign * x for x in vals[b1]], [sign * x for x in vals[b2]], an.n_boot, rng)
        choice, conf = b1, confidence(prob)
        ptxt = "" if prob is None else f", P={prob:.2f}"
        lines.append(f"depth {d}: {b1} ({median(vals[b1]):.3g} {unit}) over {b2} ({median(vals[b2]):.3g} {unit}{ptxt}: {conf})")
    text = f"{topic} at the main settings: " + "; ".join(lines) + "."
    if key == "throughput":
        nokv = [(d, median(v["nokv_throughput"])) for (p, d), v in an.inference.items() if p == "autoregressive" and v["nokv_throughput"]]
        if nokv:
            text += " Next-token without its KV cache: " + ", ".join(f"depth {d} {t:.3g} {unit}" for d, t in sorted(nokv)) + "."
    if key == "latency":
        text += _latency_pareto(an)
    return {"topic": topic, "choice": choice, "confidence": conf, "text": text}


def _latency_pareto(an: Analyser) -> str:
    """Which paradigms (and steps) lie on the FID-vs-latency Pareto front at the largest budget (all settings)."""
    rows = [r for r in an.study.rows if r["done"] and r["latency_s"] is not None and r["fid_effnet"] is not None
            and r["weights"] != "model"]
    if not rows:
        return ""
    top = max(r["budget"] for r in rows)
    front = pareto_front(setting_medians([r for r in rows if r["budget"] == top], "latency_s", lambda r: r["fid_effnet"]))
    desc = ", ".join(f"{p} d{d} {s} steps ({lat * 1e3:.3g} ms, FID {f:.3g})" for lat, f, p, d, s in front)
    return f" FID-vs-latency Pareto front (seed medians of every evaluated setting) at {top:.3g} FLOPs: {desc}."


def recommendations(an: Analyser) -> list[dict]:
    """Which paradigm for image quality, prompt following, latency and throughput, with how sure."""
    return [
        _quality_rec(an, "fid", "Image quality"),
        _quality_rec(an, "prompt", "Prompt following"),
        _inference_rec(an, "latency", "Low latency", True, "s"),
        _inference_rec(an, "throughput", "Throughput", False, "images/s"),
    ]


def analyse(study: Study, n_boot: int = 1000, seed: int = 0) -> Analysis:
    """Fits, comparisons, crossovers, the paper's findings and recommendations of a study (deterministic)."""
    if n_boot < 1:
        raise UserError(f"--n-boot must be >= 1, got {n_boot}")
    an = Analyser(study, n_boot, seed)
    an.crossover_list = an.crossovers()
    found = findings(an)
    recs = recommendations(an)
    return Analysis(an.paradigms, an.fits, an.comparisons, an.crossover_list, an.inference, found, recs,
                    sorted(an.excluded))
