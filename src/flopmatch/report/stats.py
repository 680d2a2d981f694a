"""Small-sample hypothesis tests for claims such as "paradigm A has lower FID than B at budget C".

Errors are lower-is-better everywhere, so every test is **one-sided** with H1: mean(a) < mean(b)
(for :func:`slope_test`, H1: slope < 0), and ``estimate`` is ``mean(a) - mean(b)`` (negative: a better).
Samples are 1-D sequences of finite floats, typically one value per training seed. A test that the
data cannot support (too few values) returns ``method="none"`` with ``p=None`` rather than raising:
"untestable" is a result the report prints. Bad arguments (alpha outside (0, 1), NaN values) raise
:class:`~flopmatch.errors.UserError`.

Zero-variance convention (all t-tests): when the standard error is exactly 0 the t statistic is
``estimate / 0``; p is its limit, 0.0 if the estimate is negative and 1.0 if positive, and 0.5 when
the estimate is also 0 (no evidence either way: the two samples are the same constant). That is what
the test says, but it rests on a zero variance measured from a few values (quantised metrics can do
that); prefer :func:`pooled_test` with a study-wide variance floor when it happens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

from flopmatch.errors import UserError

ArrayLike = Sequence[float] | np.ndarray


def _probability(value: float, name: str) -> float:
    if not 0.0 < value < 1.0:
        raise UserError(f"{name} must be in (0, 1), got {value!r}")
    return float(value)


def _sample(values: ArrayLike, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise UserError(f"{name} must be a 1-D sequence of numbers, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise UserError(f"{name} contains NaN or infinite values: {x.tolist()}")
    return x


def _difference(a: np.ndarray, b: np.ndarray) -> float:
    # An empty side has no mean: NaN is the only honest estimate, and such a result is always "none".
    return float(a.mean() - b.mean()) if len(a) and len(b) else math.nan


@dataclass(frozen=True)
class TestResult:
    """Outcome of one one-sided test. ``estimate`` is in the units of the data (``slope_test``: y per x).

    ``p`` is the one-sided p-value for H1: mean(a) < mean(b) (slope < 0), None when untestable;
    ``se``/``df`` describe the t reference and are None when there is no noise estimate
    (``method`` "permutation" or "none"). ``estimate`` is NaN only when a side is empty.
    """

    __test__ = False  # not a pytest test class despite its name

    estimate: float
    se: float | None
    df: float | None
    p: float | None
    n_a: int
    n_b: int
    # "welch", "paired", "pooled", "permutation", "slope", "none"; callers also build "exact" (noise-free
    # analytic numbers) and "evaluation" (a normal reference on evaluation noise)
    method: str

    def mdd(self, alpha: float, power: float = 0.8) -> float | None:
        """Minimum detectable difference (data units, >= 0): the smallest |true difference| that this
        test's design rejects at one-sided level ``alpha`` with probability ``power``.

        ``(t_{1-alpha,df} + t_{power,df}) * se``, the usual central-t approximation to the noncentral-t
        power equation (e.g. Cohen 1988, ch. 2); it is within ~1 point of ``power`` for df >= 2.
        None without ``se``/``df``.
        """
        alpha, power = _probability(alpha, "alpha"), _probability(power, "power")
        if self.se is None or self.df is None:
            return None
        return float((stats.t.ppf(1 - alpha, self.df) + stats.t.ppf(power, self.df)) * self.se)


    def interval(self, level: float = 0.95) -> tuple[float, float] | None:
        """Two-sided ``level`` confidence interval for the true difference (data units): estimate +- t * se on
        ``df`` degrees of freedom, the interval that inverts this test (unadjusted for multiplicity). None
        without ``se``/``df`` (permutation, untestable) or with a zero se (exact numbers need none)."""
        level = _probability(level, "level")
        if not self.se or self.df is None:
            return None
        half = float(stats.t.ppf(0.5 + level / 2, self.df) * self.se)
        return self.estimate - half, self.estimate + half


def _t_result(estimate: float, se: float, df: float, n_a: int, n_b: int, method: str) -> TestResult:
    # One-sided lower-tail p of t = estimate / se on df degrees of freedom; se == 0: see module docstring.
    if se > 0:
        p = float(stats.t.cdf(estimate / se, df))
    else:
        p = 0.0 if estimate < 0 else 1.0 if estimate > 0 else 0.5
    return TestResult(estimate, float(se), float(df), p, n_a, n_b, method)


def _none(estimate: float, n_a: int, n_b: int) -> TestResult:
    return TestResult(estimate, None, None, None, n_a, n_b, "none")


def welch_test(a: ArrayLike, b: ArrayLike) -> TestResult:
    """Welch's unequal-variance t-test (Welch 1947), one-sided H1: mean(a) < mean(b).

    ``se = sqrt(s_a^2/n_a + s_b^2/n_b)`` with Welch-Satterthwaite df (Satterthwaite 1946). Needs >= 2
    values per side, else ``method="none"``. Equal to ``scipy.stats.ttest_ind(equal_var=False,
    alternative="less")``, computed here because scipy does not return the se and gives NaN when both
    variances are 0 (here: the zero-variance convention of the module docstring, df = min(n) - 1,
    the lower bound of the Welch df).
    """
    a, b = _sample(a, "a"), _sample(b, "b")
    n_a, n_b = len(a), len(b)
    if n_a < 2 or n_b < 2:
        return _none(_difference(a, b), n_a, n_b)
    va, vb = a.var(ddof=1) / n_a, b.var(ddof=1) / n_b
    se2 = va + vb
    df = se2**2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1)) if se2 > 0 else min(n_a, n_b) - 1
    return _t_result(_difference(a, b), math.sqrt(se2), df, n_a, n_b, "welch")


def paired_test(a: ArrayLike, b: ArrayLike) -> TestResult:
    """Paired t-test (Student 1908), one-sided H1: mean(a - b) < 0, for values measured in pairs (a[i] with b[i]).

    se = sd(a - b) / sqrt(n), df = n - 1; needs >= 2 pairs of equal-length samples, else ``method="none"``.
    Pairing removes what the two share within a pair (e.g. the machine load during one timing round).
    """
    a, b = _sample(a, "a"), _sample(b, "b")
    if len(a) != len(b) or len(a) < 2:
        return _none(_difference(a, b), len(a), len(b))
    d = a - b
    return _t_result(float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size)), d.size - 1, len(a), len(b), "paired")


def pooled_test(a: ArrayLike, b: ArrayLike, var: float | None, df: float | None) -> TestResult:
    """t-test with an external common variance ``var`` (data units squared) on ``df`` degrees of freedom.

    ``se = sqrt(var/n_a + var/n_b)``; ``var`` must be independent of ``a`` and ``b`` (e.g. the pooled
    seed variance of other cells, :func:`pooled_variance`) for t to follow Student's t with ``df``.
    Works with one value per side. ``method="none"`` if ``var`` is None, ``df`` < 1 or a side is empty.
    """
    a, b = _sample(a, "a"), _sample(b, "b")
    n_a, n_b = len(a), len(b)
    if var is not None and (not math.isfinite(var) or var < 0):
        raise UserError(f"var must be a finite number >= 0, got {var!r}")
    if var is None or df is None or df < 1 or n_a < 1 or n_b < 1:
        return _none(_difference(a, b), n_a, n_b)
    return _t_result(_difference(a, b), math.sqrt(var / n_a + var / n_b), df, n_a, n_b, "pooled")


def two_variance_test(a: ArrayLike, b: ArrayLike, var_a: float | None, df_a: float | None,
                      var_b: float | None, df_b: float | None) -> TestResult:
    """t-test of mean(a) - mean(b) when each side has its own external variance estimate (per value).

    For two studies compared cell by cell: each side's values are seeds of one study, whose seed variance
    ``var_*`` (pooled over that study's other cells, :func:`pooled_variance`, on ``df_*`` degrees of
    freedom) is independent of the values. ``se^2 = var_a/n_a + var_b/n_b`` with the Welch-Satterthwaite
    df ``se^4 / ((var_a/n_a)^2/df_a + (var_b/n_b)^2/df_b)`` (Satterthwaite 1946). With one variance on
    both sides this is :func:`pooled_test`'s se, on a df between min(df_a, df_b) and df_a + df_b.
    ``method="none"`` if either variance is missing, a df is < 1 or a side is empty.
    """
    a, b = _sample(a, "a"), _sample(b, "b")
    n_a, n_b = len(a), len(b)
    for v in (var_a, var_b):
        if v is not None and (not math.isfinite(v) or v < 0):
            raise UserError(f"variances must be finite numbers >= 0, got {v!r}")
    if None in (var_a, var_b, df_a, df_b) or min(df_a, df_b) < 1 or n_a < 1 or n_b < 1:
        return _none(_difference(a, b), n_a, n_b)
    ua, ub = var_a / n_a, var_b / n_b
    se2 = ua + ub
    df = se2**2 / (ua**2 / df_a + ub**2 / df_b) if se2 > 0 else min(df_a, df_b)
    return _t_result(_difference(a, b), math.sqrt(se2), df, n_a, n_b, "two-variance")


def pooled_variance(groups: Sequence[ArrayLike]) -> tuple[float | None, int]:
    """Pooled within-group variance ``sum((k-1) s_k^2) / sum(k-1)`` and its df ``sum(k-1)``.

    ``groups``: 1-D samples (e.g. seeds of each (paradigm, budget) cell); groups with < 2 values carry
    no within-group information and are skipped. Returns ``(None, 0)`` if no group has >= 2 values.
    Units are those of the values squared: pass log errors to pool on a log (relative) scale, which is
    what makes cells with very different FIDs share one noise level.
    """
    num, df = 0.0, 0
    for i, g in enumerate(groups):
        x = _sample(g, f"groups[{i}]")
        if len(x) >= 2:
            num += (len(x) - 1) * float(x.var(ddof=1))
            df += len(x) - 1
    return (num / df, df) if df else (None, 0)


def permutation_test(a: ArrayLike, b: ArrayLike, n_resamples: int = 20000, seed: int = 0) -> TestResult:
    """One-sided permutation test of mean(a) - mean(b) (Fisher 1935; Pitman 1937), H1: a lower.

    Exact over all C(n_a+n_b, n_a) splits when that is <= ``n_resamples`` (p is then a multiple of
    1/C), else ``n_resamples`` seeded random splits with p = (k+1)/(n_resamples+1) (Phipson & Smyth
    2010), both as ``scipy.stats.permutation_test`` does; always exact with one value on a side.
    Needs >= 1 value per side and >= 3 in all, else ``method="none"``.
    """
    a, b = _sample(a, "a"), _sample(b, "b")
    if n_resamples < 1:
        raise UserError(f"n_resamples must be >= 1, got {n_resamples!r}")
    n_a, n_b = len(a), len(b)
    if n_a < 1 or n_b < 1 or n_a + n_b < 3:
        return _none(_difference(a, b), n_a, n_b)
    if min(n_a, n_b) == 1:
        # scipy needs >= 2 values per sample. With one value alone on a side, the n_a+n_b splits are
        # which value sits alone, and the statistic is monotone in it (x - (S-x)/(N-1) for a), so the
        # exact p is a count of values at least as extreme, whatever n_resamples is.
        pooled = np.concatenate([a, b])
        p = np.mean(pooled <= a[0]) if n_a == 1 else np.mean(pooled >= b[0])
        return TestResult(_difference(a, b), None, None, float(p), n_a, n_b, "permutation")
    res = stats.permutation_test(
        (a, b),
        lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis),
        permutation_type="independent",
        vectorized=True,
        n_resamples=n_resamples,
        alternative="less",
        random_state=np.random.default_rng(seed),  # `random_state`, not `rng`: the latter needs scipy >= 1.15
    )
    return TestResult(_difference(a, b), None, None, float(res.pvalue), n_a, n_b, "permutation")


def holm_adjusted(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm (1979) step-down adjusted p-values, in input order; None (untested) entries stay None and
    do not count in m. Sorted ascending, adj_(i) = max_{j<=i} min(1, (m-j) p_(j)) (0-based j), so the
    adjusted values are monotone in p order and ``adj <= alpha`` iff Holm rejects at ``alpha``.
    Written here because scipy has no Holm (``false_discovery_control`` is Benjamini-Hochberg only).
    """
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    for i in idx:
        if not 0.0 <= pvalues[i] <= 1.0:
            raise UserError(f"p-values must be in [0, 1], got {pvalues[i]!r} at position {i}")
    out: list[float | None] = [None] * len(pvalues)
    m, running = len(idx), 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def holm(pvalues: Sequence[float | None], alpha: float) -> list[bool]:
    """Holm (1979) step-down rejections at family-wise level ``alpha``, in input order.

    Controls P(any false rejection) <= alpha under any dependence; rejects everything Bonferroni does.
    None entries are untested: never rejected, not counted in m. Decided from :func:`holm_adjusted`
    so that the two can never disagree through rounding.
    """
    alpha = _probability(alpha, "alpha")
    return [q is not None and q <= alpha for q in holm_adjusted(pvalues)]


def slope_test(x: ArrayLike, y: ArrayLike) -> TestResult:
    """OLS slope of ``y`` on ``x`` with a one-sided t-test, H1: slope < 0 (the gap shrinks with x).

    ``x`` e.g. log10 budget, ``y`` e.g. a per-seed gap; repeated x values are allowed. ``estimate`` is
    the slope (y units per x unit), se its usual OLS standard error, df = n - 2; ``n_a`` = points,
    ``n_b`` = distinct x. Needs >= 3 points and >= 2 distinct x, else ``method="none"`` (estimate: the
    slope through 2 points, NaN with < 2 distinct x).
    Slope and se come from ``scipy.stats.linregress``; a perfect fit (se = 0) follows the module's
    zero-variance convention.
    """
    x, y = _sample(x, "x"), _sample(y, "y")
    if len(x) != len(y):
        raise UserError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    n, distinct = len(x), len(np.unique(x))
    if distinct < 2:  # no slope at all (NaN, as for an empty side of a two-sample test)
        return TestResult(math.nan, None, None, None, n, distinct, "none")
    fit = stats.linregress(x, y)
    if n < 3:  # two points: a slope but no residual to estimate its noise from
        return _none(float(fit.slope), n, distinct)
    return _t_result(float(fit.slope), float(fit.stderr), n - 2, n, distinct, "slope")
