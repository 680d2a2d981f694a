"""Rows of a study -> fitted scaling trends, crossovers and inference summaries (for figures and tables).

Everything statistical comes from :mod:`flopmatch.report.records`, :mod:`flopmatch.report.powerlaw`
and :mod:`flopmatch.report.bootstrap`. The tests that decide claims and recommendations are in
:mod:`flopmatch.report.verdicts`; nothing here decides anything. Deterministic given ``seed``.

Conventions
-----------
* Metrics are errors (lower is better): FID (effnet proxy; Inception if measured), prompt-following
  error ``1 - full_match`` (``records.to_error``), final training loss. Loss is fitted per paradigm
  and never compared across paradigms (the objectives' losses are not commensurable).
* Points are finished runs at their main setting (see :mod:`flopmatch.report.data`), grouped by
  their nominal budget. Unfinished runs are flagged and left out.
* **A law is fitted only where the points can support it**: >= ``MIN_FIT_BUDGETS`` budgets spanning
  >= ``MIN_FIT_DECADES`` decades, at least 2 more budgets than the law has parameters. Otherwise the
  points are shown without a law (an exact 3-point fit of a 3-parameter law has no residual and
  extrapolates anywhere). The trend is ``E + A (C/C0)^-alpha`` with 90 % bootstrap intervals over
  seeds (or evaluation noise with one seed, labelled).
* Extrapolation reaches at most ``EXTRAPOLATE`` x the largest measured budget, drawn dashed and
  labelled; crossovers are searched only up to there.
"""

from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import dataclass

import numpy as np

from flopmatch import PARADIGMS
from flopmatch.report.bootstrap import BootstrapFit, bootstrap_all, bootstrap_crossover
from flopmatch.report.data import Study
from flopmatch.report.records import frontier, to_error

EXTRAPOLATE = 10.0  # trends are drawn and crossovers searched up to 10x the largest budget measured
MIN_FIT_BUDGETS = 5  # a law needs >= 5 budgets (2 more than the saturating law's 3 parameters) ...
MIN_FIT_DECADES = 1.5  # ... spanning >= 1.5 decades of compute
LEVEL = 0.9
NOISE_DRAWS = 400  # binomial draws per prompt-following record


# KID at or below this is the floor: indistinguishable from real images at a CPU study's n. Measured: real vs real shapes
# images (effnet features, 250 vs 500 disjoint, 8 random splits) gave -0.0023 to 0.0051 (sd 0.0028); the cpu preset's
# models score ~0.3-0.6. KID's null spread shrinks about as 1/n, so at the gpu preset's 5,000 images this floor is
# conservative (it may tie models a larger n could separate). On a log scale, values below it would be noise amplified.
KID_FLOOR = 5e-3


@dataclass(frozen=True)
class Metric:
    """A fitted metric: its row column, label, whether it is a [0,1] score, and if paradigms may be compared.

    ``boot``: the row key holding the value's evaluation-noise replicates (KID bootstrap, FID jackknife), if any.
    """

    name: str
    column: str
    label: str
    score: bool = False
    cross: bool = True
    boot: str | None = None
    floor: float | None = None  # values below it are raised to it (KID's unbiased estimate can be <= 0)


METRICS = (
    Metric("kid", "kid_effnet", "KID (EfficientNet-Lite0 proxy)", boot="kid_boot_effnet", floor=KID_FLOOR),  # verdicts' quality
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
    crossovers: list[dict]
    inference: dict[tuple[str, int], dict]
    verdicts: object  # flopmatch.report.verdicts.Verdicts: claims, recommendation table, every test
    ema: list[dict]  # the EMA analysis per paradigm (flopmatch.report.findings.ema_analysis)
    excluded: list[str]  # runs left out of fits, with why


def evaluation_noise(metric: Metric, row: dict, seed: int) -> tuple[float, ...]:
    """Centred draws of a row's evaluation-sample error in ``metric`` (error units; () if unknown).

    FID: its evaluation-noise replicates minus their mean (the spread is the estimate: the jackknife's pseudo-
    replicates, quality.fid_jackknife; older entries hold bootstrap replicates, biased upward in level). Prompt following: the full-match rate is a mean over n images, so
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
        v = r.get(metric.column)
        if v is None:
            continue
        if metric.floor is not None:  # as the verdicts read it: a KID within noise of 0 is the floor, not dropped
            v = max(v, metric.floor)
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


def fit_allowed(budgets: list[float]) -> str:
    """Why a law may not be fitted through these budgets ("" if it may): see the module docstring."""
    n = len(budgets)
    decades = math.log10(max(budgets) / min(budgets)) if n else 0.0
    if n < MIN_FIT_BUDGETS or decades < MIN_FIT_DECADES:
        return (f"no law fitted: needs >= {MIN_FIT_BUDGETS} budgets over >= {MIN_FIT_DECADES:g} decades, "
                f"has {n} over {decades:.2g}")
    return ""


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


def inference_summary(study: Study) -> dict[tuple[str, int], dict]:
    """Per (paradigm, depth), main-setting inference numbers of finished runs pooled over runs (the
    architecture is the same): lists of FLOPs per image, latency (s) and throughput (images/s), and
    ``phase``: whether every timing came from the study's timing phase.

    Timings of the timing phase are shared by every run of a (paradigm, depth) and setting, so they
    enter once (its rounds); per-run eval timings (older studies) are pooled over runs.
    """
    out: dict[tuple[str, int], dict] = {}
    seen: set[tuple] = set()
    for r in study.rows:
        if not (r["main"] and r["done"] and r["weights"] == "ema") or r["sample_flops_per_image"] is None:
            continue
        d = out.setdefault((r["objective"], r["depth"]), {"flops": [], "latency": [], "throughput": [], "phase": True,
                                                          "nokv_latency": [], "nokv_throughput": [], "nokv_flops": [],
                                                          "decode_flops": []})
        d["flops"].append(r["sample_flops_per_image"])
        if r.get("decode_flops_per_image") is not None:
            d["decode_flops"].append(r["decode_flops_per_image"])
        if r.get("nokv_sample_flops_per_image") is not None:
            d["nokv_flops"].append(r["nokv_sample_flops_per_image"])
        source = ("study", r["setting"].split(",weights=")[0]) if r.get("timing_source") == "study" else ("run", r["run"])
        if (r["objective"], r["depth"], source) in seen or r["latency_s"] is None:
            continue
        seen.add((r["objective"], r["depth"], source))
        d["phase"] = d["phase"] and source[0] == "study"
        d["latency"] += [x for x in r.get("latency_s_all") or [r["latency_s"]] if x > 0]
        if r["throughput_images_per_s"] is not None:
            d["throughput"] += [x for x in r.get("throughput_all") or [r["throughput_images_per_s"]] if x > 0]
        for k, col in (("nokv_latency", "nokv_latency_s"), ("nokv_throughput", "nokv_throughput_images_per_s")):
            if r.get(col) is not None:
                d[k].append(r[col])
    return out


class Analyser:
    """Fits every (metric, paradigm) once (laws only where ``fit_allowed``), and crossovers of fitted laws."""

    def __init__(self, study: Study, n_boot: int, seed: int, workers: int | None = 1):
        """``workers``: processes for the trend fits (:func:`~flopmatch.report.bootstrap.bootstrap_all`)."""
        self.study, self.n_boot, self.seed = study, n_boot, seed
        present = {r["objective"] for r in study.rows}
        self.paradigms = [p for p in PARADIGMS if p in present] + sorted(present - set(PARADIGMS))
        self.fits: dict[tuple[str, str], MetricFit] = {}
        self.excluded: set[str] = set()
        found = []  # (metric, paradigm, records, frontier, why no law may be fitted or "", seed)
        for mi, m in enumerate(METRICS):
            for pi, p in enumerate(self.paradigms):
                recs, dropped = _records(study, m, p, seed)
                self.excluded.update(dropped)
                if not recs:
                    continue
                front = frontier(recs, nan_policy="omit")
                # distinct streams: the (metric, paradigm) pairs are independent
                found.append((m, p, recs, front, fit_allowed([f.budget for f in front]), seed * 7919 + 97 * mi + pi))
        tasks = [(recs, n_boot, s) for _, _, recs, _, why, s in found if not why]
        fitted = iter(bootstrap_all(tasks, LEVEL, workers))
        for m, p, recs, front, why, _ in found:
            boot, note = None, why
            if not why:
                boot = next(fitted)
                if isinstance(boot, str):  # the fit failed: why
                    boot, note = None, boot
                else:
                    notes = [n for n in (boot.point.note, boot.note) if n] + (["no bootstrap intervals"] if boot.method == "none" else [])
                    note = "; ".join(notes)
            self.fits[(m.name, p)] = MetricFit(m.name, p, recs, front, boot, note)
        self.inference = inference_summary(study)

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
