"""The tests that decide the paper's claims and the recommendation table: noise that includes
retraining, family-wise control, ties reported as ties, and the power of every comparison.

*Scale.* Everything is compared as a log error, lower is better: log KID, log prompt-following error
(1 - full match, floored at ``FLOOR`` so a perfect score stays finite), log latency, -log throughput.

*Image quality is KID* (Binkowski et al. 2018), on the effnet proxy's features: its estimator is unbiased
at any sample count, while FID's small-sample bias depends on the model (a Gaussian simulation: true
A < B, yet at 250 samples A's FID is worse) and can reorder models at the few hundred images a CPU study
generates. KID at or below ``KID_FLOOR`` (the generated set indistinguishable from the real one at this
n; the unbiased estimate can even be negative) counts as the floor, so two such models tie. FID's cells
and seed noise are computed too (the tokenizer-ceiling banner uses them), but no claim or table cell
compares FIDs.

*Cost at matched quality.* Where the study swept operating points (:mod:`flopmatch.report.operating`),
latency, throughput and sampling FLOPs at the largest budget are compared at each paradigm's cheapest
point at a quality every paradigm reaches; elsewhere (other budgets, a study without a sweep, paradigms
compared at different depths) at the main settings. Every comparison says which.

*Quality at each paradigm's best point.* The main setting is one sampler configuration for every paradigm
(one guidance scale, its default steps), and the scales do not mean the same across paradigms (guidance on a
velocity vs on logits), so at the operating points' budget, where the sweep found each paradigm's best point
for image quality and for prompt following, the table and claim 4 compare those (the point chosen on the
sweep's images, its value from the full set: one value of the selection run, a one-seed cell with the pooled
seed variance); a claim about trends over budgets (claims 1, 2) stays at the main settings, the one
configuration measured at every budget. The comparison's ``where`` says "best points".
Seed-to-seed variation of these is roughly multiplicative, so one variance per metric serves every
budget and paradigm, and a difference reads as a ratio (``exp(estimate)``).

*Cells.* A cell is one (paradigm, budget) at one depth. With one depth, that depth and all its seeds.
With several, the depth with the lowest error on the lowest seed (the selection seed), judged on the
other seeds, so the choice is not scored on the numbers it was made from; a cell without another seed
is chosen and judged on the same seed, which flatters the winner, and its comparisons are at most
"suggestive". With fewer than ``FRONTIER_SIZES`` depths this is the better of the sizes tried, not a
compute-optimal frontier, and the report says so.

*Noise*, per metric: "seeds" when some cell has >= 2 seeds: the within-cell variance of log error,
pooled over every (paradigm, depth, budget) cell with >= 2 seeds, with its degrees of freedom;
comparisons are t-tests with it (:func:`flopmatch.report.stats.pooled_test`); it holds retraining and
evaluation noise. Where every value's evaluation variance is known, a value's variance is the retraining part of the
pooled variance (less the pooled values' mean evaluation variance) plus its own evaluation variance
(:func:`cell_var`): evaluation noise is far from one size (binomial noise of a full-match rate grows with the rate),
so a variance pooled at rates near 0 would call noise a difference at higher ones. Otherwise "evaluation": each record's own evaluation noise (KID bootstrap / FID jackknife over
generated images; binomial for a full-match rate) on the log scale, normal reference. That misses
retraining noise, so nothing resting on it is stronger than "suggestive". Timing comparisons use the
timing phase's interleaved rounds; timing does not depend on training, so no seed is needed: a paired t-test of log timings over rounds (rounds interleave the
paradigms, so a load change within a round hits all of them and cancels in the pair). Timings from
separate evaluations (studies without a timing phase) get Welch's test and at most "suggestive". Sampling FLOPs are analytic: compared exactly, no test.

*Decisions.* Each comparison is two-sided (p = 2 min(p_lower, p_higher)); Holm's step-down procedure
(:func:`flopmatch.report.stats.holm_adjusted`) controls the family-wise error at ``ALPHA`` within each
family: "claims" (every test that decides a paper claim) and "table" (the recommendation table).
Labels: **confident** (Holm-significant, with seed noise or timing rounds, depth chosen on another
seed), **suggestive** (significant before the correction, or resting on evaluation noise only, or on
a depth chosen on the judged seed), **no difference detected** (otherwise; with the smallest relative
difference the comparison could have detected: 80 % power at the Bonferroni level ALPHA / m, a
bound on Holm's first step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as sps

from flopmatch import PARADIGMS
from flopmatch.evaluation.timing import BUSY_CORES
from flopmatch.report.analysis import KID_FLOOR, inference_summary
from flopmatch.report.data import Study
from flopmatch.report.operating import Operating, matched_timing, operating
from flopmatch.report.stats import TestResult, holm_adjusted, paired_test, pooled_test, pooled_variance, slope_test, welch_test

ALPHA = 0.05  # family-wise level of each family
POWER = 0.8  # for the minimum detectable difference
FLOOR = 1e-3  # smallest error on the log scale (a full-match rate of 1 would be log 0)
NEAR_NO_MATCH = 0.05  # tied full-match rates all below this are said to be near zero (floor_note)
# Prompt following's retraining noise, measured at full-match rates up to r, is trusted up to RATE_REACH * r (and
# always below NEAR_NO_MATCH): the seed-to-seed spread of log(1 - rate) grows with the rate (about as rate / (1 - rate)
# for a proportional spread of the rate), so noise from near 0 understates it at rates several times higher.
RATE_REACH = 2.0
FRONTIER_SIZES = 4  # depths per budget before "best size" may be called a compute-optimal frontier
NORMAL_DF = 1e6  # degrees of freedom standing in for a normal reference (evaluation noise)
QUALITY = {"kid": ("kid_effnet", "KID (effnet proxy)", "kid_boot_effnet"),
           "fid": ("fid_effnet", "FID (effnet proxy)", "fid_boot_effnet"),
           "prompt": ("prompt_full_match", "prompt-following error (1 - full match)", None)}  # fmt: skip
CONFIDENT, SUGGESTIVE, NO_DIFF, UNTESTABLE = "confident", "suggestive", "no difference detected", "not testable"


@dataclass
class Cell:
    """One (paradigm, budget) at its compared depth: judged log errors and their evaluation variances."""

    paradigm: str
    budget: float
    depth: int
    values: np.ndarray  # log error of each judged seed
    eval_var: np.ndarray  # evaluation-noise variance of each judged value (log scale; NaN unknown)
    biased: bool  # depth chosen on the seed it is judged on
    depths: int  # depths the choice was among

    @property
    def mean(self) -> float:
        return float(self.values.mean())


@dataclass
class Noise:
    """The noise a metric's comparisons rest on (see the module docstring)."""

    source: str  # "seeds" | "evaluation" | "none"
    var: float | None = None
    df: float | None = None
    cells: int = 0  # cells with >= 2 seeds behind a "seeds" variance
    # "seeds": the pooled variance less the mean evaluation variance of the values it was pooled from (>= 0), i.e.
    # the retraining part; None where some of those values' evaluation variance is unknown (see cell_var)
    retrain_var: float | None = None
    # prompt following: the highest mean full-match rate of the cells it was pooled from. Near a rate of 0, log(1 - rate)
    # hardly moves whatever the seed, so noise measured there says little of the retraining noise at much higher rates
    # (see _Builder.cap); None for the other metrics
    measured_rate: float | None = None

    @property
    def reach(self) -> float:
        """The highest full-match rate this noise speaks for: twice the highest measured, at least NEAR_NO_MATCH (1 for
        the other metrics)."""
        return 1.0 if self.measured_rate is None else max(RATE_REACH * self.measured_rate, NEAR_NO_MATCH)

    def reaches(self, rate: float) -> bool:
        """Whether this noise was measured at rates near ``rate`` (always for the metrics other than prompt following)."""
        return rate <= self.reach

    def describe(self) -> str:
        reach = (f"; measured at full-match rates up to {self.measured_rate:.1%}, so comparisons where a rate is above "
                 f"{self.reach:.0%} are at most suggestive" if not self.reaches(1.0) else "")
        if self.source == "seeds" and self.retrain_var is not None:
            return (f"seed variance pooled over {self.cells} cells with >= 2 seeds ({self.df:g} df; sd "
                    f"{100 * (math.exp(math.sqrt(self.var)) - 1):.1f}% of the value, of which retraining "
                    f"{100 * (math.exp(math.sqrt(self.retrain_var)) - 1):.1f}%), plus each value's own evaluation noise"
                    + reach)
        if self.source == "seeds":
            return (f"seed variance pooled over {self.cells} cells with >= 2 seeds ({self.df:g} df; sd "
                    f"{100 * (math.exp(math.sqrt(self.var)) - 1):.1f}% of the value)" + reach)
        if self.source == "evaluation":
            return "evaluation noise only (one seed per cell): retraining variance not measured"
        return "no noise estimate"


@dataclass
class Comparison:
    """a vs b on one metric (log scale, lower better): the test, its family and the decision."""

    family: str
    metric: str
    a: str
    b: str
    where: str  # "at 1e12 FLOPs", "over 3 budgets", "depth 2", ...
    test: TestResult
    noise: str  # "seeds" | "evaluation" | "timing rounds" | "exact"
    capped: str = ""  # why the label can be at most "suggestive"
    note: str = ""  # said after the summary (sampling FLOPs: the ratio with the tokenizer's decode)
    p_adj: float | None = None
    m: int = 1  # tests in the family

    @property
    def p2(self) -> float | None:
        """Two-sided p-value."""
        p = self.test.p
        return None if p is None else min(1.0, 2 * min(p, 1 - p))

    @property
    def better(self) -> str | None:
        """The paradigm with the lower error (None for an exact tie or no estimate)."""
        e = self.test.estimate
        return None if not math.isfinite(e) or e == 0 else self.a if e < 0 else self.b

    @property
    def label(self) -> str:
        if self.test.method == "none":
            return UNTESTABLE
        if self.noise == "exact":
            return CONFIDENT if self.better else NO_DIFF
        if self.p2 is None or self.p2 > ALPHA or self.better is None:
            return NO_DIFF
        strong = self.noise in ("seeds", "timing rounds") and not self.capped  # "per-run timings": sessions differ
        return CONFIDENT if strong and self.p_adj is not None and self.p_adj <= ALPHA else SUGGESTIVE

    def ratio(self) -> float:
        """exp(estimate): a's error (or latency, or 1/throughput) as a multiple of b's."""
        return math.exp(self.test.estimate)

    def value_ratio(self) -> float:
        """a's value over b's as the metric is read: errors, latencies, FLOPs, and throughput in images/s."""
        return 1 / self.ratio() if self.metric == "throughput" else self.ratio()

    def value_interval(self, level: float = 0.95) -> tuple[float, float] | None:
        """The ``level`` confidence interval of :meth:`value_ratio` (unadjusted: it shows the margin, the verdict is
        the Holm-corrected test), or None where the test has no t reference (permutation, exact, untestable)."""
        ci = self.test.interval(level)
        if ci is None:
            return None
        lo, hi = math.exp(ci[0]), math.exp(ci[1])
        return (1 / hi, 1 / lo) if self.metric == "throughput" else (lo, hi)

    def mdd_percent(self) -> float | None:
        """Smallest relative difference (%) detectable with POWER at the Bonferroni level ALPHA / m."""
        if not self.test.se:  # no noise estimate, or a zero one: nothing to say about power
            return None
        d = self.test.mdd(ALPHA / max(self.m, 1) / 2, POWER)  # two-sided: alpha/2 per tail
        return None if d is None else 100 * (math.exp(d) - 1)

    def mdd_text(self) -> str:
        """The detectable difference as the report prints it: "27%", beyond MDD_CAP_PERCENT "over 10x" (a percentage
        in the millions says only that the noise hides any plausible difference), "–" without a noise estimate."""
        return mdd_text(self.mdd_percent())

    def summary(self) -> str:
        """One line: who is lower, by how much, p, adjusted p, label, detectable difference."""
        if self.test.method == "none":
            return f"{self.a} vs {self.b} {self.where}: not testable ({self.noise} noise, too few values)"
        r = self.ratio()
        if self.metric.endswith("_trend"):
            txt = f"{self.a} vs {self.b}, {self.where}: the gap changes by x{r:.3g} per decade"
        elif self.metric == "throughput":
            txt = f"{self.a} vs {self.b} {self.where}: throughput ratio {self.a} / {self.b} = {1 / r:.3g}"
        else:
            what = {"kid": "KID", "fid": "FID", "prompt": "prompt-following error", "latency": "latency", "flops": "sampling FLOPs"}
            txt = f"{self.a} vs {self.b} {self.where}: {what.get(self.metric, self.metric)} ratio {self.a} / {self.b} = {r:.3g}"
        if self.noise == "exact":
            return txt + " (analytic, exact)" + (f"; {self.note}" if self.note else "")
        ci = self.value_interval()
        if ci is not None:
            txt += f" (95% CI {ci[0]:.3g} to {ci[1]:.3g}, unadjusted)"
        txt += f", p{_p(self.p2)}" + ("" if self.p_adj is None else f" (Holm-adjusted p{_p(self.p_adj)}, {self.m} tests)")
        txt += f" -> {self.label}"
        if self.label == NO_DIFF and self.mdd_percent() is not None:
            mdd = self.mdd_text()
            txt += f"; could detect only a difference of {mdd}" if mdd.startswith("over") else f"; could detect a difference of {mdd} or more"
        if self.noise == "evaluation":
            txt += "; evaluation noise only"
        if self.capped:
            txt += f"; {self.capped}"
        return txt


MDD_CAP_PERCENT = 900.0  # detectable differences beyond 10x are printed as "over 10x"


def mdd_text(percent: float | None) -> str:
    """A detectable difference (%) as words: "27%", "over 10x" beyond MDD_CAP_PERCENT, "–" when None."""
    if percent is None:
        return "–"
    return f"over {1 + MDD_CAP_PERCENT / 100:.0f}x" if percent > MDD_CAP_PERCENT else f"{percent:.0f}%"


def _p(p: float) -> str:
    return "<1e-6" if p < 1e-6 else f"={p:.2g}"


@dataclass
class Verdicts:
    """Every comparison by family, the recommendation table, the claims and the noise per metric."""

    noise: dict[str, Noise]
    cells: dict[str, dict[tuple[str, float], Cell]]
    families: dict[str, list[Comparison]] = field(default_factory=dict)
    table: list[dict] = field(default_factory=list)
    claims: list[dict] = field(default_factory=list)
    depths: int = 1
    operating: Operating | None = field(default=None, repr=False)  # operating points at the largest budget (report.operating)


# ---------------------------------------------------------------------------------- cells and noise


def _log_error(metric: str, row: dict) -> float | None:
    v = row.get(QUALITY[metric][0])
    if v is None:
        return None
    err = 1.0 - v if metric == "prompt" else v
    return math.log(max(float(err), KID_FLOOR if metric == "kid" else FLOOR))


def _rate(log_error: float) -> float:
    """The full-match rate behind a prompt-following log error (log(1 - rate), :func:`_log_error`)."""
    return 1 - math.exp(log_error)


def _eval_var(metric: str, row: dict) -> float:
    """Evaluation-noise variance of a row's log error (delta method for a binomial rate); NaN if unknown."""
    if metric == "fid":  # delta method, var / FID^2: jackknife pseudo-replicates may be <= 0, their log undefined
        reps, point = np.asarray(row.get(QUALITY[metric][2]) or [], float), row.get(QUALITY[metric][0])
        return float(reps.var(ddof=1)) / max(point, FLOOR) ** 2 if reps.size >= 2 and point is not None else math.nan
    if metric == "kid":
        reps = np.asarray(row.get(QUALITY[metric][2]) or [], float)
        reps = np.maximum(reps, KID_FLOOR)  # on the scale the value is compared on: floored as _log_error floors it
        return float(np.log(reps).var(ddof=1)) if reps.size >= 2 else math.nan
    n = row.get("num_samples")
    if not n or row["prompt_full_match"] is None:
        return math.nan
    k = float(row["prompt_full_match"]) * n
    m = (k + 0.5) / (n + 1)  # shrunk so a rate of 0 or 1 still has a variance
    err = max(1 - m, FLOOR)
    return m * (1 - m) / n / err**2


def _records(study: Study, metric: str) -> dict[tuple[str, int, float], dict[int, tuple[float, float]]]:
    """(paradigm, depth, budget) -> {seed: (log error, evaluation variance)} of finished runs' main EMA settings."""
    out: dict = {}
    for r in study.rows:
        if not (r["main"] and r["done"] and r["weights"] == "ema"):
            continue
        y = _log_error(metric, r)
        if y is not None:
            out.setdefault((r["objective"], r["depth"], r["budget"]), {})[r["seed"]] = (y, _eval_var(metric, r))
    return out


def _cells(records: dict) -> dict[tuple[str, float], Cell]:
    """Pick each (paradigm, budget)'s depth on its selection seed and judge it on the rest (module docstring)."""
    by_pb: dict[tuple[str, float], dict[int, dict]] = {}
    for (p, d, b), seeds in records.items():
        by_pb.setdefault((p, b), {})[d] = seeds
    cells = {}
    for (p, b), depths in by_pb.items():
        if len(depths) == 1:
            d, seeds = next(iter(depths.items()))
            judged, biased = seeds, False
        else:
            sel = min(s for seeds in depths.values() for s in seeds)
            cand = {d: seeds[sel][0] for d, seeds in depths.items() if sel in seeds}
            d = min(cand, key=lambda k: (cand[k], k)) if cand else min(depths)
            rest = {s: v for s, v in depths[d].items() if s != sel}
            judged, biased = (rest, False) if rest else (depths[d], True)
        ys = np.array([v[0] for _, v in sorted(judged.items())])
        vs = np.array([v[1] for _, v in sorted(judged.items())])
        cells[(p, b)] = Cell(p, b, d, ys, vs, biased, len(depths))
    return cells


def _noise(records: dict, metric: str = "kid") -> Noise:
    groups = [np.array([v[0] for v in seeds.values()]) for seeds in records.values()]
    var, df = pooled_variance(groups)
    if var is not None:
        pooled_eval = [v[1] for seeds in records.values() if len(seeds) >= 2 for v in seeds.values()]
        known = bool(pooled_eval) and all(math.isfinite(e) for e in pooled_eval)
        retrain = max(var - float(np.mean(pooled_eval)), 0.0) if known else None
        # the highest cell mean among the cells pooled (as comparisons read cells: one noisy seed would widen the reach)
        means = [float(np.mean([v[0] for v in seeds.values()])) for seeds in records.values() if len(seeds) >= 2]
        top = max(_rate(y) for y in means) if metric == "prompt" and means else None
        return Noise("seeds", var, float(df), sum(len(g) >= 2 for g in groups), retrain, top)
    if any(math.isfinite(v[1]) for seeds in records.values() for v in seeds.values()):
        return Noise("evaluation")
    return Noise("none")


# ---------------------------------------------------------------------------------- tests


def normal_test(estimate: float, var: float, n_a: int, n_b: int) -> TestResult:
    """A normal-reference test of ``estimate`` with variance ``var`` (evaluation noise)."""
    if not math.isfinite(var):
        return TestResult(estimate, None, None, None, n_a, n_b, "none")
    se = math.sqrt(var)
    p = float(sps.norm.cdf(estimate / se)) if se > 0 else 0.0 if estimate < 0 else 1.0 if estimate > 0 else 0.5
    return TestResult(estimate, se, NORMAL_DF, p, n_a, n_b, "evaluation")


def cell_var(c: Cell, noise: Noise) -> float:
    """Variance of a cell's mean log error under "seeds" noise.

    Where every value's evaluation variance is known: the retraining part of the pooled variance plus each value's
    own evaluation variance, summed over the cell's n values / n^2. Why: evaluation noise differs between cells by
    more than 10x (a full-match rate of 0.01 at 250 images has a binomial sd of ~0.6 % of its log error, one of 0.2
    ~3 %), so a variance pooled where the rates are near 0 would understate the noise where they are not and call
    noise a difference. Otherwise the pooled variance / n (one variance for every cell)."""
    if noise.retrain_var is not None and np.isfinite(c.eval_var).all():
        return float((noise.retrain_var + c.eval_var).sum()) / c.values.size**2
    return noise.var / c.values.size


def _contrast(pairs: list[tuple[Cell, Cell]], noise: Noise, weights: list[float] | None = None) -> TestResult:
    """Test of sum_i w_i (mean a_i - mean b_i) < 0 over cell pairs (default: the mean over pairs)."""
    w = np.full(len(pairs), 1.0 / len(pairs)) if weights is None else np.asarray(weights, float)
    terms = [t for wi, (a, b) in zip(w, pairs) for t in ((float(wi), a), (-float(wi), b))]
    return _combination(terms, noise, sum(a.values.size for a, _ in pairs), sum(b.values.size for _, b in pairs))


def _combination(terms: list[tuple[float, Cell]], noise: Noise, n_a: int, n_b: int) -> TestResult:
    """Test of sum_i w_i mean(cell_i) < 0 over (w_i, cell_i) ``terms``, the cells independent; ``n_a``/``n_b`` are
    the values counted on each side, for the record."""
    est = float(sum(w * c.mean for w, c in terms))
    if noise.source == "seeds":
        var = float(sum(w**2 * cell_var(c, noise) for w, c in terms))
        se = math.sqrt(var)
        # Degrees of freedom (Satterthwaite): only the part resting on the pooled variance is uncertain with its df;
        # known evaluation variances (bootstrap, binomial) have a normal reference. Bounded above by taking the whole
        # pooled variance as that part, and never below the pooled df.
        uncertain = noise.var * float(sum(w**2 / c.values.size for w, c in terms))
        df = noise.df
        if noise.retrain_var is not None and uncertain > 0:
            df = min(NORMAL_DF, max(noise.df, noise.df * (var / uncertain) ** 2))
        p = float(sps.t.cdf(est / se, df)) if se > 0 else 0.0 if est < 0 else 1.0 if est > 0 else 0.5
        return TestResult(est, se, df, p, n_a, n_b, "pooled")
    if noise.source == "evaluation":
        return normal_test(est, float(sum(w**2 * c.eval_var.mean() / c.values.size for w, c in terms)), n_a, n_b)
    return TestResult(est, None, None, None, n_a, n_b, "none")


def _slope_weights(x: np.ndarray) -> np.ndarray:
    """w with sum_i w_i y_i = the OLS slope of y on x (a linear combination, so a contrast of cells can test it)."""
    return (x - x.mean()) / ((x - x.mean()) ** 2).sum()


def mean_sd(c: Cell, noise: Noise) -> float | None:
    """Standard deviation of a cell's mean log error under ``noise``; None where it is unknown ("none", or an
    evaluation variance not recorded)."""
    if noise.source == "seeds":
        return math.sqrt(cell_var(c, noise))
    if noise.source == "evaluation" and np.isfinite(c.eval_var).all():
        return math.sqrt(float(c.eval_var.mean()) / c.values.size)
    return None


def own_trend(v: Verdicts, metric: str, paradigm: str) -> TestResult | None:
    """Slope of one paradigm's log error against log10 training budget (OLS over its cells' means, at the compared
    depth), H1: negative, it improves with compute; None below 3 budgets. The noise is the comparisons' (the
    cells' variances; the scatter about the line where there is none)."""
    mine = sorted((budget, c) for (p, budget), c in v.cells.get(metric, {}).items() if p == paradigm)
    if len(mine) < 3:
        return None
    x = np.log10([budget for budget, _ in mine])
    if v.noise[metric].source == "none":
        return slope_test(x, [c.mean for _, c in mine])
    return _combination([(float(wi), c) for wi, (_, c) in zip(_slope_weights(x), mine)], v.noise[metric],
                        sum(c.values.size for _, c in mine), 0)


def _pair(a: Cell, b: Cell, noise: Noise) -> TestResult:
    if noise.source == "seeds" and noise.retrain_var is None:
        return pooled_test(a.values, b.values, noise.var, noise.df)
    return _contrast([(a, b)], noise)


def _cap(*cells: Cell) -> str:
    return "model size chosen on the seed it is judged on (optimistic)" if any(c.biased for c in cells) else ""


def _best_cells(op: Operating, cells: dict[tuple[str, float], Cell], metric: str) -> dict[tuple[str, float], Cell]:
    """(paradigm, budget) -> a one-value cell of its best swept point for ``metric`` at the operating points' budget,
    at the depth its main cell is judged at (module docstring). Only where the sweep evaluated the chosen setting on its
    own images: a best point picked on its full-set value would flatter itself."""
    out = {}
    for (p, budget), c in cells.items():
        pts = op.points.get((p, c.depth)) if budget == op.budget else None
        row = None if pts is None else pts.best_prompt if metric == "prompt" else pts.best_quality
        if row is None or not pts.swept(row, QUALITY[metric][0]):  # chosen on its own full-set value: it flatters itself
            continue
        y = _log_error(metric, row)
        if y is not None:  # the selection run's: with several depths, the seed the depth was chosen on (biased)
            out[(p, budget)] = Cell(p, budget, c.depth, np.array([y]), np.array([_eval_var(metric, row)]), c.depths > 1,
                                    c.depths)
    return out


class _Builder:
    def __init__(self, study: Study, best_points: bool = True):
        self.study = study
        recs = {m: _records(study, m) for m in QUALITY}
        self.noise = {m: _noise(recs[m], m) for m in QUALITY}
        self.cells = {m: _cells(recs[m]) for m in QUALITY}
        self.families: dict[str, list[Comparison]] = {"claims": [], "table": []}
        self.mirrors: list[tuple[Comparison, Comparison]] = []  # (b vs a, the a vs b test in the family)
        self.timing = inference_summary(study)  # main settings
        # each paradigm's cheapest point at a quality every paradigm reaches, where the study swept operating points
        self.operating = operating(study)
        matched = matched_timing(self.operating)
        self.best = {m: _best_cells(self.operating, self.cells[m], m) for m in ("kid", "prompt")} if best_points else {}
        # only where every timed paradigm of a depth has its point: a comparison mixes no bases
        self.matched = {k: v for k, v in matched.items()
                        if all((p, d) in matched for (p, d) in self.timing if d == k[1])}
        load = (study.timing or {}).get("other_busy_cores_during")
        # rounds pair away a load they share, not one that comes and goes within them: a busy machine's timings
        # point a way but decide nothing (study.timing_phase warns at the same level)
        self.timing_capped = (f"other processes kept {load:.1f} cores busy during the timing rounds (re-time on a quiet "
                              "machine: flopmatch study --retime)") if load is not None and load > BUSY_CORES else ""
        present = {p for m in QUALITY for (p, _) in self.cells[m]} | {p for p, _ in self.timing}
        self.paradigms = [p for p in PARADIGMS if p in present] + sorted(present - set(PARADIGMS))

    def add(self, family: str, c: Comparison) -> Comparison:
        """Put ``c`` in its family, or return the test already there (one test counted once, however many
        parts use it; a vs b and b vs a are the same test, returned as a mirror that shares its correction)."""
        for old in self.families[family]:
            if (old.metric, old.where) != (c.metric, c.where):
                continue
            if (old.a, old.b) == (c.a, c.b):
                return old
            if (old.a, old.b) == (c.b, c.a):
                t = old.test
                flipped = TestResult(-t.estimate, t.se, t.df, None if t.p is None else 1 - t.p, t.n_b, t.n_a, t.method)
                mirror = Comparison(family, c.metric, c.a, c.b, c.where, flipped, old.noise, old.capped)
                self.mirrors.append((mirror, old))
                return mirror
        self.families[family].append(c)
        return c

    def cap(self, metric: str, *cells: Cell) -> str:
        """Why a comparison of ``cells`` on ``metric`` is at most suggestive ("" if nothing caps it): a depth chosen on the
        judged seed; or prompt following whose retraining noise was measured only near a zero full-match rate, compared
        where a rate is above it (there, seed-to-seed spread of log(1 - rate) is larger than anything measured)."""
        why = [_cap(*cells)]
        noise = self.noise[metric]
        if not all(noise.reaches(_rate(c.mean)) for c in cells):
            why.append(f"retraining noise measured only at full-match rates up to {noise.measured_rate:.1%}, not at "
                       "these rates (seeds at a larger budget would measure it)")
        return "; ".join(w for w in why if w)

    def mean_rate(self, budget: float) -> float:
        """The mean full-match rate at ``budget`` over every paradigm's cell there (prompt following's main cells)."""
        cells = [c for (p, b), c in self.cells["prompt"].items() if b == budget]
        return float(np.mean([_rate(c.mean) for c in cells])) if cells else 0.0

    def budgets(self, metric: str, paradigms) -> list[float]:
        sets = [{b for (p, b) in self.cells[metric] if p == q} for q in paradigms]
        return sorted(set.intersection(*sets)) if sets else []

    def use_best(self, metric: str, budget: float, paradigms) -> bool:
        """Whether ``paradigms`` are compared on ``metric`` at ``budget`` at their best swept points: each has one."""
        return bool(paradigms) and all((p, budget) in self.best.get(metric, {}) for p in paradigms)

    def quality(self, family: str, metric: str, a: str, b: str, budget: float, best: bool = False) -> Comparison:
        """a vs b on ``metric`` at ``budget``: at the main settings, or (``best``) at each one's best swept point."""
        src = self.best[metric] if best else self.cells[metric]
        ca, cb = src[(a, budget)], src[(b, budget)]
        noise = self.noise[metric]
        where = f"at {budget:.3g} FLOPs" + (", each paradigm's best point" if best else "")
        return self.add(family, Comparison(family, metric, a, b, where, _pair(ca, cb, noise), noise.source,
                                           self.cap(metric, ca, cb)))

    def quality_over_budgets(self, metric: str, a: str, b: str) -> Comparison | None:
        """a vs b on ``metric``, the mean log-error gap over the budgets both have. Prompt following: over the budgets
        where the paradigms have begun to follow prompts (their mean full-match rate, over every paradigm there, of
        NEAR_NO_MATCH or more), where there are any: where all are near 0, log(1 - rate) is ~0 for each, and averaging
        those in dilutes a gap. The choice is made once per budget for every pair, from all paradigms alike, so it
        does not look at the pair's gap."""
        budgets = self.budgets(metric, [a, b])
        if not budgets:
            return None
        begun = [c for c in budgets if metric == "prompt" and self.mean_rate(c) >= NEAR_NO_MATCH]
        note = ""
        if begun and len(begun) < len(budgets):
            budgets = begun
            note = (f" where the paradigms' mean full-match rate reaches {NEAR_NO_MATCH:.0%} ("
                    + ", ".join(f"{c:.3g}" for c in begun) + " FLOPs)")
        pairs = [(self.cells[metric][(a, c)], self.cells[metric][(b, c)]) for c in budgets]
        noise = self.noise[metric]
        where = (f"at {budgets[0]:.3g} FLOPs" if len(budgets) == 1 else f"averaged over {len(budgets)} budgets") + note
        return self.add("claims", Comparison("claims", metric, a, b, where, _contrast(pairs, noise), noise.source,
                                             self.cap(metric, *[c for pr in pairs for c in pr])))

    def gap_trend(self, metric: str, a: str, b: str) -> Comparison | None:
        """Slope of the log-error gap (a - b) against log10 budget, H1: negative (a catches up)."""
        budgets = self.budgets(metric, [a, b])
        if len(budgets) < 3:
            return None
        x = np.log10(budgets)
        w = _slope_weights(x)
        pairs = [(self.cells[metric][(a, c)], self.cells[metric][(b, c)]) for c in budgets]
        noise = self.noise[metric]
        source = noise.source
        if source == "none":  # no seeds, no evaluation noise: the gaps' scatter about a line (df = n - 2)
            test, source = slope_test(x, [ca.mean - cb.mean for ca, cb in pairs]), "scatter about a line"
        else:
            test = _contrast(pairs, noise, list(w))
        where = f"trend of the gap per decade over {len(budgets)} budgets ({budgets[0]:.3g}-{budgets[-1]:.3g})"
        return self.add("claims", Comparison("claims", metric + "_trend", a, b, where, test, source,
                                             self.cap(metric, *[c for pr in pairs for c in pr])))

    def use_matched(self, keys, metric: str, budget: float | None = None) -> bool:
        """Whether the (paradigm, depth) ``keys`` are compared on ``metric`` at their matched-quality points: each has
        one, all at one level (one depth), and ``budget`` (None: the claims) is the operating points' budget."""
        ms = [self.matched.get(k, {}) for k in keys]
        return (all(m.get(metric) for m in ms) and len({m["basis"] for m in ms}) == 1
                and (budget is None or budget == self.operating.budget))

    def cost_source(self, a: tuple[str, int], matched: bool) -> tuple[dict, str]:
        """Where the compared cost figures come from (a's basis stands for both), and the words that say which."""
        if matched:
            return self.matched, f", {self.matched[a]['basis']} at {self.operating.budget:.3g} FLOPs"
        return self.timing, ", main settings"

    def timed(self, family: str, metric: str, a: tuple[str, int], b: tuple[str, int],
              matched: bool | None = None) -> Comparison | None:
        """Latency or throughput of a vs b; ``matched`` None: at matched quality where both have such a point."""
        source, basis = self.cost_source(a, self.use_matched([a, b], metric) if matched is None else matched)
        va, vb = source.get(a, {}).get(metric), source.get(b, {}).get(metric)
        if not va or not vb:
            return None
        sign = -1.0 if metric == "throughput" else 1.0  # throughput: higher is better
        la, lb = sign * np.log(va), sign * np.log(vb)
        where = (f"depth {a[1]}" if a[1] == b[1] else f"depths {a[1]} and {b[1]}") + basis
        if source[a]["phase"] and source[b]["phase"] and la.size == lb.size:
            # rounds interleave the paradigms: round r of a and of b share the machine's state, so pair them
            return self.add(family, Comparison(family, metric, a[0], b[0], where, paired_test(la, lb), "timing rounds",
                                               self.timing_capped))
        return self.add(family, Comparison(family, metric, a[0], b[0], where, welch_test(la, lb), "per-run timings",
                                           "timings from separate evaluations, possibly under different loads"))

    def flops(self, a: tuple[str, int], b: tuple[str, int]) -> Comparison | None:
        source, basis = self.cost_source(a, self.use_matched([a, b], "flops"))
        fa, fb = source.get(a, {}).get("flops"), source.get(b, {}).get("flops")
        if not fa or not fb:
            return None
        est = math.log(fa[0]) - math.log(fb[0])
        test = TestResult(est, 0.0, None, 0.0 if est < 0 else 1.0 if est > 0 else 0.5, 1, 1, "exact")
        where = (f"depth {a[1]}" if a[1] == b[1] else f"depths {a[1]} and {b[1]}") + basis
        # The generator's FLOPs decide (the paper's count); the tokenizer's decode, which the paradigms do not share
        # (a KL vs an LFQ decoder) and which can outweigh a small generator, is said beside it.
        da, db = source.get(a, {}).get("decode_flops"), source.get(b, {}).get("decode_flops")
        note = (f"with the tokenizer's decode: {(fa[0] + da[0]) / (fb[0] + db[0]):.3g} ({a[0]} decode {da[0]:.3g}, {b[0]} "
                f"{db[0]:.3g} FLOPs/image)" if da and db else "")
        return Comparison("exact", "flops", a[0], b[0], where, test, "exact", note=note)


def _finalize(families: dict[str, list[Comparison]]) -> None:
    for comps in families.values():
        adj = holm_adjusted([c.p2 for c in comps])
        m = sum(c.p2 is not None for c in comps)
        for c, q in zip(comps, adj):
            c.p_adj, c.m = q, m


# ---------------------------------------------------------------------------------- claims and table

AR, DIFF, MASKED = "autoregressive", "diffusion", "masked"
# The paper's claims as its abstract words them (Kilian, Jampani, Zettlemoyer 2024)
CLAIMS = {
    1: "Token methods, led by next-token, beat diffusion on prompt following.",
    2: "On image quality, next-token leads at small compute and diffusion catches up as compute grows.",
    3: "Next-token is by far the most inference-efficient.",
    4: "Recommendation: diffusion for image quality and low latency, next-token for prompt following and throughput.",
}
# What a claim's parts do not test, said beside it
CLAIM_NOTES = {
    3: "\"By far\" is the paper's word, not a test here: the parts test \"most\", and the ratios with their 95% "
       "intervals below show the margin. Batch-1 latency, the other side of inference cost, is claim 4's part.",
}
NEEDS = (("image quality", "kid"), ("prompt following", "prompt"), ("latency", "latency"), ("throughput", "throughput"))


def _state(c: Comparison, want: str) -> str:
    if c.test.method == "none":
        return "untestable"
    label = c.label
    if label == NO_DIFF or c.better is None:
        return "tie"
    side = "for" if c.better == want else "against"
    return side + ("+" if label == CONFIDENT else "")


def against_claim(c: Comparison, want: str) -> bool:
    """Whether ``c`` points against the winner its claim expects, without a verdict ("suggestive" the other way):
    read as a lean against the claim, not as support (the report says so beside its summary)."""
    return _state(c, want) == "against"


def part_status(comps: list[tuple[Comparison, str]]) -> str:
    """held / did not hold / suggestive / inconclusive / not measured from (comparison, expected winner) pairs."""
    states = [_state(c, want) for c, want in comps]
    if not states:
        return "not measured"
    if "against+" in states:
        return "did not hold"
    if all(s == "for+" for s in states):
        return "held"
    if all(s in ("for+", "for") for s in states):
        return "suggestive"
    return "inconclusive"


def claim_status(parts: list[dict]) -> str:
    """A claim from its parts: any part reversed with confidence -> did not hold; all held -> held; all
    at least suggestive -> suggestive; nothing measured -> not measured; otherwise (a part inconclusive, or not
    measured while others are) inconclusive."""
    st = [p["status"] for p in parts if p["status"] != "not measured"]
    if not st:
        return "not measured"
    if "did not hold" in st:
        return "did not hold"
    if all(s == "held" for s in st) and len(st) == len(parts):
        return "held"
    if all(s in ("held", "suggestive") for s in st) and len(st) == len(parts):  # an unmeasured part points nowhere
        return "suggestive"
    return "inconclusive"


def _reason(status: str, parts: list[dict], noise: dict[str, Noise]) -> str:
    """Why a claim has its status, in plain words."""
    if status == "not measured":
        return "the study has no runs that measure it"
    weak = [p for p in parts if p["status"] not in ("held", "not measured")]
    if status == "held":
        return "every part separated with confidence (Holm-corrected, noise including retraining or timing rounds)"
    if status == "did not hold":
        bad = [f"\"{p['text']}\"" for p in parts if p["status"] == "did not hold"]
        return "reversed with confidence (the opposite was found) for " + "; ".join(bad)
    evaluation = [m for m, n in noise.items() if n.source == "evaluation"]
    why = []
    if evaluation:
        why.append("one seed per cell, so the noise is evaluation noise only (train >= 2 seeds in some cells, "
                   "e.g. --seeds 3, for a verdict)")
    inconclusive = [p for p in weak if p["status"] == "inconclusive"]
    leaning = [p["text"] for p in inconclusive if any(against_claim(c, w) for c, w in p["comparisons"])]
    ties = [p["text"] for p in inconclusive if p["text"] not in leaning]
    if ties:
        why.append("not separated: " + "; ".join(ties))
    if leaning:
        why.append("leaning the other way without a verdict: " + "; ".join(leaning))
    # a cap that lowered a label (Holm-significant, held to suggestive by it), not one beside a tie it did not change
    capped = {c.capped for p in parts for c, _ in p["comparisons"]
              if c.capped and c.p_adj is not None and c.p_adj <= ALPHA and c.label == SUGGESTIVE}
    why += sorted(capped)
    missing = [p["text"] for p in parts if p["status"] == "not measured"]
    if missing:
        why.append("not measured: " + "; ".join(missing))
    return "; ".join(why) or "some parts are only significant before the multiplicity correction"


def _claims(b: _Builder) -> list[tuple[int, list[dict]]]:
    """The parts of each claim, with their comparisons (statuses are set after the families are corrected)."""
    def part(text, comps):
        return {"text": text, "comparisons": [(c, w) for c, w in comps if c is not None]}

    out = []
    p1 = [part("next-token beats diffusion on prompt following", [(b.quality_over_budgets("prompt", AR, DIFF), AR)]),
          part("masked beats diffusion on prompt following", [(b.quality_over_budgets("prompt", MASKED, DIFF), MASKED)]),
          part("next-token leads masked on prompt following", [(b.quality_over_budgets("prompt", AR, MASKED), AR)])]
    out.append((1, p1))
    common = b.budgets("kid", [AR, DIFF])
    small = b.quality("claims", "kid", AR, DIFF, common[0]) if common else None
    p2 = [part(f"next-token has the better image quality (KID) at the smallest budget{f' ({common[0]:.3g} FLOPs)' if common else ''}",
               [(small, AR)]),
          part("diffusion's KID gap to next-token shrinks as compute grows (slope < 0)",
               [(b.gap_trend("kid", DIFF, AR), DIFF)])]
    out.append((2, p2))
    shared = sorted({d for (p, d) in b.timing if p == AR} & {d for (p, d) in b.timing if p != AR})
    others = [p for p in PARADIGMS if p != AR]  # every paradigm the claim is about: one a study lacks is "not measured"
    flops = {q: [(b.flops((AR, d), (q, d)), AR) for d in shared if (q, d) in b.timing] for q in others}
    thr = {q: [(b.timed("claims", "throughput", (AR, d), (q, d)), AR) for d in shared if (q, d) in b.timing] for q in others}
    out.append((3, [*[part(f"next-token needs fewer sampling FLOPs per image than {q} (the generator's: decoding the "
                           "tokens to pixels, a cost of the tokenizer, is not counted)", flops[q]) for q in others],
                    *[part(f"next-token has a higher throughput than {q}", thr[q]) for q in others]]))
    def largest(metric, who):  # the largest budget every paradigm was measured at, if ``who`` and another were
        have = [p for p in b.paradigms if any(q == p for q, _ in b.cells[metric])]
        return b.budgets(metric, have) if who in have and len(have) >= 2 else []

    def at_top(metric, budgets):  # the paradigms compared at the largest budget, and whether at their best points
        if not budgets:
            return [], False
        who = [q for q in b.paradigms if (q, budgets[-1]) in b.cells[metric]]
        return who, b.use_best(metric, budgets[-1], who)

    top, topp = largest("kid", DIFF), largest("prompt", AR)
    (kwho, kbest), (pwho, pbest) = at_top("kid", top), at_top("prompt", topp)
    dshared = sorted({d for (p, d) in b.timing if p == DIFF} & {d for (p, d) in b.timing if p != DIFF})
    p4 = [part(f"diffusion has the best image quality at the largest budget{f' ({top[-1]:.3g}' if top else ''}"
               f"{', each paradigm at its best point)' if kbest else ')' if top else ''}",
               [(b.quality("claims", "kid", DIFF, q, top[-1], kbest), DIFF) for q in kwho if q != DIFF]),
          part("diffusion has the lowest latency (batch 1" + (", at matched quality)" if all(
                   b.use_matched([(DIFF, d), (q, d)], "latency") for d in dshared for q in b.paradigms
                   if q != DIFF and (q, d) in b.timing) and dshared else ", main settings)"),
               [(b.timed("claims", "latency", (DIFF, d), (q, d)), DIFF) for d in dshared for q in b.paradigms
                if q != DIFF and (q, d) in b.timing]),
          part(f"next-token follows prompts best at the largest budget{f' ({topp[-1]:.3g}' if topp else ''}"
               f"{', each paradigm at its best point)' if pbest else ')' if topp else ''}",
               [(b.quality("claims", "prompt", AR, q, topp[-1], pbest), AR) for q in pwho if q != AR]),
          part("next-token has the highest throughput", [c for q in others for c in thr[q]])]
    out.append((4, p4))
    return out


def _table_cell(b: _Builder, budget: float, need: str, metric: str) -> dict:
    """One cell of the recommendation table: which paradigm for ``need`` at ``budget``, and how sure."""
    cell = {"budget": budget, "need": need, "choice": None, "label": "not measured", "tied": [], "comparisons": []}
    if metric in QUALITY:
        have = {p: b.cells[metric][(p, budget)] for p in b.paradigms if (p, budget) in b.cells[metric]}
        if len(have) < 2:
            return cell
        best = b.use_best(metric, budget, have)
        if best:
            have = {p: b.best[metric][(p, budget)] for p in have}
        ranked = sorted(have, key=lambda p: (have[p].mean, p))
        comps = [b.quality("table", metric, ranked[0], q, budget, best) for q in ranked[1:]]
        cell["log_errors"] = {p: c.mean for p, c in have.items()}
        cell["matched"] = best  # marked as the cost cells at the operating points are
    else:
        depth = {}
        for p in b.paradigms:
            c = b.cells["kid"].get((p, budget)) or b.cells["prompt"].get((p, budget))
            ds = [d for (q, d) in b.timing if q == p and b.timing[(q, d)][metric]]
            d = c.depth if c is not None and c.depth in ds else (ds[0] if len(ds) == 1 else None)
            if d is not None:
                depth[p] = d
        if len(depth) < 2:
            return cell
        # ranked by the mean log timing, the quantity the tests compare, from the same figures (matched or main)
        matched = b.use_matched(list(depth.items()), metric, budget)
        src = b.matched if matched else b.timing
        mlog = {p: float(np.mean(np.log(src[(p, d)][metric]))) for p, d in depth.items()}
        ranked = sorted(mlog, key=lambda p: (mlog[p] if metric == "latency" else -mlog[p], p))
        comps = [b.timed("table", metric, (ranked[0], depth[ranked[0]]), (q, depth[q]), matched) for q in ranked[1:]]
        cell["matched"] = matched
    cell["comparisons"] = [c for c in comps if c is not None]
    cell["ranked"] = ranked
    return cell


def _label_cell(cell: dict) -> None:
    """Set a table cell's choice and label once its family is corrected: ties are never a pick."""
    comps = cell["comparisons"]
    if not comps:
        return
    best = cell["ranked"][0]
    separated = [c.better == best and c.label in (CONFIDENT, SUGGESTIVE) for c in comps]
    tied = [best] + [c.b for c, s in zip(comps, separated) if not s]
    cell["tied"] = tied if len(tied) > 1 else []
    if len(tied) > 1:
        untestable = all(c.label == UNTESTABLE for c, s in zip(comps, separated) if not s)
        cell["choice"], cell["label"] = None, UNTESTABLE if untestable else NO_DIFF
        cell["floor"] = floor_note(comps[0].metric, [cell["log_errors"][p] for p in tied]) if "log_errors" in cell else ""
    else:
        cell["choice"] = best
        cell["label"] = CONFIDENT if all(c.label == CONFIDENT for c in comps) else SUGGESTIVE


def floor_note(metric: str, log_errors: list[float]) -> str:
    """Why a tie may say little: every tied paradigm at a score's end (mean log errors, as the tests compare them).

    KID: every mean at ``KID_FLOOR``, indistinguishable from real images at this sample size. Prompt following:
    every paradigm's mean rate (over its seeds, as the tests compare them) below ``NEAR_NO_MATCH``, where no generator has started to follow prompts (or every
    rate at 1, the error floor). Empty when the tie is between scores that mean something.
    """
    if metric == "kid" and all(y <= math.log(KID_FLOOR) + 1e-9 for y in log_errors):
        return "all at KID's floor: indistinguishable from real images at this sample size"
    if metric == "prompt":
        rates = [_rate(y) for y in log_errors]
        if all(r < NEAR_NO_MATCH for r in rates):
            return f"all near zero: each one's mean full-match rate below {NEAR_NO_MATCH:.0%}"
        if all(y <= math.log(FLOOR) + 1e-9 for y in log_errors):
            return "all at the ceiling: every prompt fully matched"
    return ""


MATCHED_MARK = "†"  # a cell compared at the operating points: best point (quality) or matched quality (cost)


def cell_text(cell: dict) -> str:
    """A recommendation-table cell as the report prints it: "masked (confident)", "no difference detected
    (a ≈ b)", or "–" where the need was not measured; a cell compared at the operating points (quality at each
    paradigm's best point, cost at matched quality) ends in MATCHED_MARK, since its verdict holds for operating points
    the sweep chose within its own noise."""
    if cell["label"] == "not measured":
        return "–"
    mark = f" {MATCHED_MARK}" if cell.get("matched") else ""
    if cell["choice"] is None:
        floor = f"; {cell['floor']}" if cell.get("floor") else ""
        return f"{cell['label']} ({' ≈ '.join(cell['tied'])}{floor}){mark}"
    return f"{cell['choice']} ({cell['label']}){mark}"


def decide(study: Study, best_points: bool = True) -> Verdicts:
    """Claims and recommendation table of a study, every test in a Holm-corrected family (deterministic).
    ``best_points`` False: quality at the main settings at every budget (the FLOP-convention check's basis)."""
    b = _Builder(study, best_points)
    claims = _claims(b)
    budgets = sorted({bb for m in QUALITY for (_, bb) in b.cells[m]})
    table = [_table_cell(b, c, need, metric) for c in budgets for need, metric in NEEDS]
    _finalize(b.families)
    for mirror, original in b.mirrors:
        mirror.p_adj, mirror.m = original.p_adj, original.m
    for cell in table:
        _label_cell(cell)
    out = []
    for i, parts in claims:
        for p in parts:
            p["status"] = part_status(p["comparisons"])
        status = claim_status(parts)
        out.append({"id": i, "paper": CLAIMS[i], "status": status, "parts": parts, "reason": _reason(status, parts, b.noise),
                    "note": CLAIM_NOTES.get(i, "")})
    depths = max((c.depths for m in QUALITY for c in b.cells[m].values()), default=1)
    return Verdicts(b.noise, b.cells, b.families, table, out, depths, b.operating)
