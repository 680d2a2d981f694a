"""Rows of a study -> fits, head-to-head comparisons, crossovers, the paper's findings and recommendations.

Everything statistical comes from :mod:`flopmatch.report.records`, :mod:`flopmatch.report.powerlaw`
and :mod:`flopmatch.report.bootstrap` (frontier, bootstrap fits, crossovers, ``compare_at_budget``);
this module only decides *what* to compare and turns probabilities into words. Deterministic given ``seed``.

Conventions
-----------
* Metrics are errors (lower is better): FID (effnet proxy; Inception if measured), prompt-following
  error ``1 - full_match`` (``scaling.to_error``), final training loss. Loss is fitted per paradigm
  and never compared across paradigms (the objectives' losses are not commensurable).
* Points of a fit are finished runs at their main setting (see :mod:`flopmatch.report.data`),
  grouped by their nominal budget (``train.budget``; the FLOPs actually spent are at most one
  step over, listed in the tables). Unfinished runs are flagged and left out.
* A fit needs >= 3 budgets; the trend is ``E + A (C/C0)^-alpha`` with 90 % bootstrap intervals.
* Every record carries its **evaluation noise** (``scaling.Record.noise``): for FID, the deviations
  of the evaluation's FID bootstrap replicates (generated images resampled, reference fixed) from
  their mean; for prompt following, a fraction of n generated images, ``Binomial(n, score)/n - score``
  draws. Cells with >= 2 seeds are resampled over seeds (which contains evaluation noise); one-seed
  cells are perturbed by their evaluation noise. So with one seed per cell, fits, crossovers and
  "P(a better)" still have a noise estimate, labelled "evaluation noise only" because retraining
  with another seed would add variance this does not see. Final loss has no noise draws.
* "P(a better)" at a budget is ``compare_at_budget``'s bootstrap (seeds and/or evaluation noise).
  If nothing can be resampled and both paradigms have bootstrapped fits, the fraction of paired
  fits whose trend is lower at that budget is used instead (source "fitted trends", weaker).
* A claim "a beats b" is **held** at a budget if P >= 0.95, **reversed** if P <= 0.05, unclear
  otherwise. Over budgets: held if at least half are held and none reversed; did not hold if at
  least half are reversed and none held; inconclusive otherwise (including mixed orders).
* Crossovers are searched from the smallest measured budget up to ``EXTRAPOLATE`` x the largest.
"""

from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import dataclass

import numpy as np

from flopmatch import PARADIGMS
from flopmatch.errors import UserError
from flopmatch.report.bootstrap import BootstrapFit, bootstrap_crossover, bootstrap_fit, compare_at_budget
from flopmatch.report.data import Study
from flopmatch.report.records import frontier, to_error

P_SURE = 0.95  # one-sided: matches a 90 % two-sided interval that excludes zero
P_LIKELY = 0.8
EXTRAPOLATE = 1e3  # crossovers and "where the trends point" look up to 1000x the largest budget measured
LEVEL = 0.9
NOISE_DRAWS = 400  # binomial draws per prompt-following record


@dataclass(frozen=True)
class Metric:
    """A fitted metric: its row column, label, whether it is a [0,1] score, and if paradigms may be compared.

    ``boot``: the row key holding the value's bootstrap replicates (FID), if any.
    """

    name: str
    column: str
    label: str
    score: bool = False
    cross: bool = True
    boot: str | None = None


METRICS = (
    Metric("fid", "fid_effnet", "FID (EfficientNet-Lite0 proxy)", boot="fid_boot_effnet"),
    Metric("fid_inception", "fid_inception", "FID (Inception)", boot="fid_boot_inception"),
    Metric("prompt", "prompt_full_match", "prompt-following error (1 - full match)", score=True),
    Metric("loss", "final_loss", "final training loss", cross=False),
)
METRIC = {m.name: m for m in METRICS}


@dataclass
class MetricFit:
    """One paradigm's records of one metric, its frontier and (with >= 3 budgets) bootstrapped trend."""

    metric: str
    paradigm: str
    records: list[dict]
    frontier: list
    boot: BootstrapFit | None
    note: str


@dataclass
class Analysis:
    """All computed results of a study."""

    paradigms: list[str]
    fits: dict[tuple[str, str], MetricFit]
    comparisons: dict[tuple, dict]
    crossovers: list[dict]
    inference: dict[tuple[str, int], dict]
    findings: list[dict]
    recommendations: list[dict]
    excluded: list[str]  # runs left out of fits, with why


def confidence(p: float | None) -> str:
    """Words for a probability that the named option is better."""
    if p is None or not math.isfinite(p):
        return "no noise estimate (one seed, no fit): a point comparison only"
    return "confident" if p >= P_SURE else "likely" if p >= P_LIKELY else "uncertain"


def evaluation_noise(metric: Metric, row: dict, seed: int) -> tuple[float, ...]:
    """Centred draws of a row's evaluation-sample error in ``metric`` (error units; () if unknown).

    FID: its bootstrap replicates minus their mean (the replicates' level is biased upward, their
    spread is the estimate). Prompt following: the full-match rate is a mean over n images, so
    ``-(Binomial(n, score)/n - score)`` (the error is 1 - score), drawn with a stream seeded by the
    run name so rebuilding the report gives the same draws.
    """
    if metric.boot:
        reps = np.asarray(row.get(metric.boot) or [], float)
        return tuple(reps - reps.mean()) if reps.size >= 2 else ()
    if metric.score and row.get("num_samples"):
        n, p = int(row["num_samples"]), float(row[metric.column])
        rng = np.random.default_rng([seed, zlib.crc32(f"{row['run']}|{metric.name}".encode())])
        return tuple(-(rng.binomial(n, p, NOISE_DRAWS) / n - p))
    return ()


def _records(study: Study, metric: Metric, paradigm: str, seed: int = 0) -> tuple[list[dict], list[str]]:
    """Fit records of finished runs (main setting; loss: one per run) and why others were left out."""
    recs, seen, dropped = [], set(), []
    for r in study.rows:
        # one row per run: its main setting, or (loss only) the single row of a run never evaluated
        if r["objective"] != paradigm or not (r["main"] or (metric.name == "loss" and r["setting"] is None)):
            continue
        v = r[metric.column]
        if v is None:
            continue
        if not r["done"]:
            dropped.append(f"{r['run']}: not finished ({r['steps']}/{r['total_steps']} steps)")
            continue
        key = (r["budget"], r["depth"], r["seed"])
        if key in seen:
            dropped.append(f"{r['run']}: duplicate of another run's (budget, depth, seed); left out of fits")
            continue
        seen.add(key)
        recs.append({"budget": r["budget"], "depth": r["depth"], "seed": r["seed"], "run": r["run"],
                     "value": float(to_error(v)) if metric.score else float(v),
                     "noise": evaluation_noise(metric, r, seed)})  # fmt: skip
    return recs, dropped


def _fit(records: list[dict], n_boot: int, seed: int) -> tuple[list, BootstrapFit | None, str]:
    front = frontier(records, nan_policy="omit")
    if len(front) < 3:
        return front, None, f"needs >= 3 budgets for a fit (has {len(front)})"
    try:
        boot = bootstrap_fit(records, n_boot=n_boot, seed=seed, level=LEVEL, nan_policy="omit")
    except UserError as e:
        return front, None, f"fit failed: {e}"
    notes = [n for n in (boot.point.note, boot.note) if n]
    if boot.method == "none":
        notes.append("no bootstrap intervals")
    return front, boot, "; ".join(notes)


def p_lower(a: list[float], b: list[float], n_boot: int, rng: np.random.Generator) -> float | None:
    """Bootstrap P(mean of a < mean of b) over the given repeats (ties half); None if neither side repeats."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size == 0 or b.size == 0 or (a.size < 2 and b.size < 2):
        return None
    ma = a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(1) if a.size > 1 else np.full(n_boot, a[0])
    mb = b[rng.integers(0, b.size, size=(n_boot, b.size))].mean(1) if b.size > 1 else np.full(n_boot, b[0])
    return float(np.mean(ma < mb) + 0.5 * np.mean(ma == mb))


def median(v) -> float | None:
    """Median of a list, None if empty."""
    return float(np.median(v)) if len(v) else None


def setting_medians(rows: list[dict], cost: str, value) -> list[tuple]:
    """Median (cost, value) per (paradigm, depth, setting) over seeds: ``[(cost, value, paradigm, depth, steps)]``.

    ``value(row)`` gives the quality error of a row; rows missing either number are skipped. Seeds of
    one configuration are repeats, so a Pareto front is taken over these medians, not over repeats.
    """
    groups: dict[tuple, list] = {}
    for r in rows:
        v = value(r)
        if r[cost] is None or v is None:
            continue
        groups.setdefault((r["objective"], r["depth"], r["setting"], r["sample_steps"]), []).append((r[cost], v))
    out = [(float(np.median([c for c, _ in cv])), float(np.median([v for _, v in cv])), p, d, steps)
           for (p, d, _, steps), cv in groups.items()]
    return sorted(out, key=lambda t: (t[0], t[1], t[2], t[3]))


def _inference(study: Study) -> dict[tuple[str, int], dict]:
    """Per (paradigm, depth), main-setting inference numbers pooled over runs (architecture is the same).

    Timings of the study's timing phase are shared by every run of a (paradigm, depth) and setting, so
    they enter once (the rounds); per-run eval timings (older studies) are pooled over runs.
    """
    out: dict[tuple[str, int], dict] = {}
    seen: set[tuple] = set()
    for r in study.rows:
        if not r["main"] or r["sample_flops_per_image"] is None:
            continue
        d = out.setdefault((r["objective"], r["depth"]), {"flops": [], "latency": [], "throughput": [],
                                                          "nokv_latency": [], "nokv_throughput": [], "nokv_flops": []})
        d["flops"].append(r["sample_flops_per_image"])
        if r["nokv_sample_flops_per_image"] is not None:
            d["nokv_flops"].append(r["nokv_sample_flops_per_image"])
        source = ("study", r["setting"].split(",weights=")[0]) if r.get("timing_source") == "study" else ("run", r["run"])
        if (r["objective"], r["depth"], source) in seen or r["latency_s"] is None:
            continue
        seen.add((r["objective"], r["depth"], source))
        d["latency"] += r.get("latency_s_all") or [r["latency_s"]]
        if r["throughput_images_per_s"] is not None:
            d["throughput"] += r.get("throughput_all") or [r["throughput_images_per_s"]]
        for k, col in (("nokv_latency", "nokv_latency_s"), ("nokv_throughput", "nokv_throughput_images_per_s")):
            if r[col] is not None:
                d[k].append(r[col])
    return out


class Analyser:
    """Fits every (metric, paradigm) once, then answers comparisons and claims on demand (cached)."""

    def __init__(self, study: Study, n_boot: int, seed: int):
        self.study, self.n_boot, self.seed = study, n_boot, seed
        present = {r["objective"] for r in study.rows}
        self.paradigms = [p for p in PARADIGMS if p in present] + sorted(present - set(PARADIGMS))
        self.fits: dict[tuple[str, str], MetricFit] = {}
        self.excluded: set[str] = set()
        for mi, m in enumerate(METRICS):
            for pi, p in enumerate(self.paradigms):
                recs, dropped = _records(study, m, p, seed)
                self.excluded.update(dropped)
                if not recs:
                    continue
                front, boot, note = _fit(recs, n_boot, seed * 7919 + 97 * mi + pi)  # distinct streams: pairs are independent
                self.fits[(m.name, p)] = MetricFit(m.name, p, recs, front, boot, note)
        self.comparisons: dict[tuple, dict] = {}
        self.inference = _inference(study)
        self.crossover_list: list[dict] = []

    # ------------------------------------------------------------------ comparisons
    def budgets(self, metric: str, paradigms) -> list[float]:
        """Budgets at which every paradigm in ``paradigms`` has records of ``metric``, ascending."""
        sets = [{fp.budget for fp in self.fits[(metric, p)].frontier} for p in paradigms if (metric, p) in self.fits]
        return sorted(set.intersection(*sets)) if len(sets) == len(paradigms) and sets else []

    def compare(self, metric: str, a: str, b: str, budget: float) -> dict:
        """compare_at_budget of a vs b (lower is better) with a fitted-trend fallback for one seed."""
        key = (metric, a, b, budget)
        if key in self.comparisons:
            return self.comparisons[key]
        fa, fb = self.fits[(metric, a)], self.fits[(metric, b)]
        seed = self.seed * 7919 + zlib.crc32(repr(key).encode())  # a comparison's stream depends on what it compares
        res = compare_at_budget(fa.records, fb.records, budget, n_boot=self.n_boot, seed=seed, level=LEVEL,
                                nan_policy="omit")  # fmt: skip
        res["source"] = {None: None, "seeds": "seeds", "evaluation": "evaluation noise only",
                         "seeds+evaluation": "seeds, and evaluation noise for one-seed cells"}[res["noise"]]
        if res["p_a_better"] is None and fa.boot and fb.boot and fa.boot.fits and fb.boot.fits:
            n = min(len(fa.boot.fits), len(fb.boot.fits))
            pa = np.array([f.predict(budget) for f in fa.boot.fits[:n]])
            pb = np.array([f.predict(budget) for f in fb.boot.fits[:n]])
            res["p_a_better"] = float(np.mean(pa < pb) + 0.5 * np.mean(pa == pb))
            res["source"] = "fitted trends"
        self.comparisons[key] = res
        return res

    def crossovers(self) -> list[dict]:
        out = []
        for m in METRICS:
            if not m.cross:
                continue
            for a, b in itertools.combinations(self.paradigms, 2):
                fa, fb = self.fits.get((m.name, a)), self.fits.get((m.name, b))
                if not (fa and fb and fa.boot and fb.boot):
                    continue
                budgets = [p.budget for p in fa.frontier + fb.frontier]
                cr = (min(budgets), max(budgets) * EXTRAPOLATE)
                res = bootstrap_crossover(fa.boot, fb.boot, cr, level=LEVEL)
                out.append({"metric": m.name, "a": a, "b": b, "measured_max": max(budgets), **res})
        return out

    # ------------------------------------------------------------------ claims
    def claim(self, metric: str, a: str, b: str, budgets: list[float] | None = None) -> dict:
        """Does a beat b on ``metric`` at equal training FLOPs? Status over the common budgets."""
        label = f"{a} beats {b} ({METRIC[metric].label})"
        if (metric, a) not in self.fits or (metric, b) not in self.fits:
            missing = [p for p in (a, b) if (metric, p) not in self.fits]
            return {"claim": label, "status": "not measured", "text": f"no finished, evaluated runs of {', '.join(missing)}"}
        budgets = self.budgets(metric, [a, b]) if budgets is None else budgets
        if not budgets:
            return {"claim": label, "status": "not measured", "text": "no budget measured for both"}
        ps, parts = [], []
        for c in budgets:
            r = self.compare(metric, a, b, c)
            p = r["p_a_better"]
            ps.append(p)
            src = f", from {r['source']}" if r["source"] else ""
            ptxt = "P n/a" if p is None else f"P={p:.2f}"
            parts.append(f"{c:.3g} FLOPs: {r['a']['value']:.4g} vs {r['b']['value']:.4g} ({ptxt}{src})")
        return {"claim": label, "status": status_from(ps), "text": "; ".join(parts), "ps": ps}

    def trend_claim(self, metric: str, a: str, b: str, C: float) -> dict:
        """Is a's fitted trend below b's at budget C? Fraction of paired bootstrap fits."""
        label = f"{a}'s fitted {METRIC[metric].label} trend is below {b}'s at {C:.3g} FLOPs"
        fa, fb = self.fits.get((metric, a)), self.fits.get((metric, b))
        if not (fa and fb):
            return {"claim": label, "status": "not measured", "text": "a paradigm has no runs"}
        if not (fa.boot and fb.boot):
            why = (fa.note if not fa.boot else fb.note) or "no fit"
            return {"claim": label, "status": "inconclusive", "text": f"no fitted trend ({why})"}
        n = min(len(fa.boot.fits), len(fb.boot.fits))
        pa0, pb0 = fa.boot.point.predict(C), fb.boot.point.predict(C)
        if n == 0:
            return {"claim": label, "status": "inconclusive",
                    "text": f"point fits {pa0:.4g} vs {pb0:.4g}; no bootstrap refits, no interval"}
        pa = np.array([f.predict(C) for f in fa.boot.fits[:n]])
        pb = np.array([f.predict(C) for f in fb.boot.fits[:n]])
        p = float(np.mean(pa < pb) + 0.5 * np.mean(pa == pb))
        return {"claim": label, "status": status_from([p]), "ps": [p],
                "text": f"point fits {pa0:.4g} vs {pb0:.4g}; P={p:.2f} over {n} bootstrap pairs"}


def status_from(ps: list[float | None]) -> str:
    """held / did not hold / inconclusive from per-budget probabilities (see the module docstring)."""
    if not ps:
        return "not measured"
    yes = sum(p is not None and p >= P_SURE for p in ps)
    no = sum(p is not None and p <= 1 - P_SURE for p in ps)
    if yes and no:
        return "inconclusive"
    if 2 * yes >= len(ps) and yes:
        return "held"
    if 2 * no >= len(ps) and no:
        return "did not hold"
    return "inconclusive"


def combine(parts: list[dict]) -> str:
    """A finding's verdict from its parts: any reversed -> did not hold; all held -> held; parts not measured are skipped."""
    st = [p["status"] for p in parts if p["status"] != "not measured"]
    if not st:
        return "not measured"
    if "did not hold" in st:
        return "did not hold"
    return "held" if all(s == "held" for s in st) else "inconclusive"
