"""Small-sample tests of flopmatch.report.stats: calibration under the null, power, Holm, edge cases.

Simulations are seeded, so every assertion is deterministic; tolerances are still set at >= 3 binomial
standard deviations so that a change of seed would not flip them.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sst

from flopmatch.errors import UserError
from flopmatch.report.stats import (
    TestResult,
    holm,
    holm_adjusted,
    permutation_test,
    pooled_test,
    pooled_variance,
    slope_test,
    welch_test,
)

ALPHA = 0.05


def _rate(pvalues, alpha=ALPHA) -> float:
    return float(np.mean(np.asarray(pvalues) <= alpha))


def test_welch_calibrated_under_null():
    """Welch, n=3 per side, equal means, variances 1 and 9: rejection rate at 0.05 is 0.05 +- 0.02."""
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 1.0, (4000, 3))
    b = rng.normal(0.0, 3.0, (4000, 3))
    assert 0.03 <= _rate([welch_test(x, y).p for x, y in zip(a, b)]) <= 0.07


def test_welch_matches_scipy():
    """welch_test's p and df equal scipy's ttest_ind(equal_var=False, alternative='less')."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 1, 4), rng.normal(0.5, 2, 6)
    r, ref = welch_test(a, b), sst.ttest_ind(a, b, equal_var=False, alternative="less")
    assert r.method == "welch" and (r.n_a, r.n_b) == (4, 6)
    assert r.p == pytest.approx(ref.pvalue, rel=1e-10) and r.df == pytest.approx(ref.df, rel=1e-10)
    assert r.estimate == pytest.approx(a.mean() - b.mean())


def test_pooled_calibrated_with_its_df_and_not_with_a_normal_reference():
    """Pooled test, n=1 per side, var from 2 independent pairs (df=2): 0.05 +- 0.02 with df=2, inflated with df=inf."""
    rng = np.random.default_rng(3)
    x = rng.normal(0.0, 2.0, (3000, 6))  # a, b, then two groups of 2 for the variance
    right, wrong = [], []
    for row in x:
        var, df = pooled_variance([row[2:4], row[4:6]])
        assert df == 2
        right.append(pooled_test(row[:1], row[1:2], var, df).p)
        wrong.append(pooled_test(row[:1], row[1:2], var, 1e9).p)
    assert 0.03 <= _rate(right) <= 0.07
    assert _rate(wrong) > 0.09  # t_2 tail beyond z_0.95 is 0.12: the df matters at these sizes


def test_permutation_exact_grid_and_level():
    """Permutation, n=4 per side: p is exactly k/70 (C(8,4) splits) and the null rejection rate <= 0.05 + 0.03."""
    rng = np.random.default_rng(4)
    ps = []
    for _ in range(400):
        r = permutation_test(rng.normal(0, 1, 4), rng.normal(0, 1, 4))
        assert r.method == "permutation" and r.se is None and r.df is None
        k = r.p * 70
        assert abs(k - round(k)) < 1e-9 and 1 <= round(k) <= 70
        ps.append(r.p)
    assert _rate(ps) <= ALPHA + 0.03


def test_permutation_monte_carlo_is_seeded_and_corrected():
    """Permutation with more splits than n_resamples: p = (k+1)/(n+1), the same for the same seed."""
    a, b = np.arange(10.0), np.arange(10.0) + 3
    r1, r2 = permutation_test(a, b, n_resamples=999, seed=5), permutation_test(a, b, n_resamples=999, seed=5)
    assert r1.p == r2.p and 1 / 1000 <= r1.p < 0.1
    k = r1.p * 1000
    assert abs(k - round(k)) < 1e-9
    assert permutation_test([1.0], [2.0]).method == "none"
    assert permutation_test([1.0], [2.0, 3.0]).p == pytest.approx(1 / 3)  # the only split with a lower a
    assert permutation_test([2.0, 3.0], [1.0]).p == pytest.approx(1.0)


def test_permutation_one_value_side_matches_enumeration():
    """With one value on a side, p equals brute-force enumeration of all splits (scipy needs >= 2 per side)."""
    rng = np.random.default_rng(13)
    for n_a, n_b in ((1, 5), (4, 1)):
        a, b = rng.normal(0, 1, n_a), rng.normal(0.5, 1, n_b)
        pooled, obs = np.concatenate([a, b]), a.mean() - b.mean()
        split = [np.isin(np.arange(n_a + n_b), c) for c in itertools.combinations(range(n_a + n_b), n_a)]
        null = [pooled[s].mean() - pooled[~s].mean() for s in split]
        assert permutation_test(a, b).p == pytest.approx(np.mean([d <= obs + 1e-12 for d in null]))


def test_welch_power_at_three_sd():
    """Welch, n=5 per side, true difference 3 sd: rejects at 0.05 in > 90 % of simulations."""
    rng = np.random.default_rng(6)
    a, b = rng.normal(0.0, 1.0, (1000, 5)), rng.normal(3.0, 1.0, (1000, 5))
    assert _rate([welch_test(x, y).p for x, y in zip(a, b)]) > 0.9


def test_mdd_is_calibrated():
    """At true difference = mdd(0.05, 0.8), the pooled test (var on df=20) rejects in 80 % +- 5 of simulations."""
    rng = np.random.default_rng(7)
    n, df, sims = 2, 20, 3000
    mdd = TestResult(0.0, math.sqrt(2 / n), df, 0.5, n, n, "pooled").mdd(ALPHA, 0.8)  # se with the true sd 1
    a = rng.normal(0.0, 1.0, (sims, n))
    b = rng.normal(mdd, 1.0, (sims, n))
    var = rng.chisquare(df, sims) / df  # the pooled variance of independent groups: sigma^2 chi2_df / df
    assert abs(_rate([pooled_test(x, y, v, df).p for x, y, v in zip(a, b, var)]) - 0.8) < 0.05


def test_mdd_needs_a_noise_estimate():
    """mdd() is None without se/df, grows as alpha shrinks, and rejects alpha outside (0, 1)."""
    r = welch_test([1.0, 2.0, 3.0], [2.0, 4.0, 3.5])
    assert r.mdd(0.01) > r.mdd(0.05) > 0
    assert welch_test([1.0], [2.0]).mdd(0.05) is None
    with pytest.raises(UserError):
        r.mdd(1.0)


def test_welch_interval_covers_the_true_difference_and_inverts_the_test():
    """Welch, n=3 and 4, variances 1 and 9, true difference 1.5: the 95 % interval covers 1.5 in 95 % +- 2 of
    simulations, and it excludes 0 exactly when the two-sided p (2 min(p, 1 - p)) is below 0.05."""
    rng = np.random.default_rng(11)
    a, b = rng.normal(1.5, 1.0, (4000, 3)), rng.normal(0.0, 3.0, (4000, 4))
    covered, agree = [], []
    for x, y in zip(a, b):
        r = welch_test(x, y)
        lo, hi = r.interval(0.95)
        covered.append(lo <= 1.5 <= hi)
        agree.append((lo > 0 or hi < 0) == (2 * min(r.p, 1 - r.p) < 0.05))
    assert 0.93 <= np.mean(covered) <= 0.97
    assert all(agree)
    assert welch_test([1.0], [2.0]).interval() is None  # no noise estimate, no interval
    with pytest.raises(UserError):
        welch_test(a[0], b[0]).interval(1.5)


def test_holm_controls_familywise_error():
    """Holm on m=20 independent null tests: fraction of families with any rejection <= 0.05 + 0.015."""
    rng = np.random.default_rng(8)
    p = sst.norm.cdf(rng.normal(size=(4000, 20)))  # one-sided z-test p-values under H0: uniform
    assert np.mean([any(holm(list(row), ALPHA)) for row in p]) <= ALPHA + 0.015


def test_holm_supersets_bonferroni_and_agrees_with_adjusted():
    """Holm rejects all Bonferroni rejects; adjusted p is monotone in p order, <= alpha iff rejected, None kept."""
    rng = np.random.default_rng(9)
    for _ in range(300):
        p = list(rng.uniform(0, 0.1, 8) ** rng.uniform(1, 3))
        p[int(rng.integers(8))] = None
        m = sum(q is not None for q in p)
        rej, adj = holm(p, ALPHA), holm_adjusted(p)
        assert all(r for q, r in zip(p, rej) if q is not None and q <= ALPHA / m)
        assert [q is None for q in adj] == [q is None for q in p] and not any(r for q, r in zip(p, rej) if q is None)
        order = sorted((i for i, q in enumerate(p) if q is not None), key=lambda i: p[i])
        assert all(adj[i] <= adj[j] <= 1 for i, j in zip(order, order[1:]))
        assert all((adj[i] <= ALPHA) == rej[i] for i in order)
    assert holm([], ALPHA) == [] and holm([None], ALPHA) == [False]
    assert holm_adjusted([0.01, None, 0.04, 0.03]) == pytest.approx([0.03, None, 0.06, 0.06])
    with pytest.raises(UserError):
        holm([0.01], 0.0)


def test_pooled_variance_recovers_known_variance():
    """pooled_variance of 500 groups of 2-5 normal values (sd 0.3) is 0.09 +- 5 %, df = sum(k-1)."""
    rng = np.random.default_rng(10)
    sizes = rng.integers(2, 6, 500)
    groups = [rng.normal(rng.normal(0, 5), 0.3, k) for k in sizes] + [[1.0], []]  # singletons/empties skipped
    var, df = pooled_variance(groups)
    assert df == int((sizes - 1).sum()) and var == pytest.approx(0.09, rel=0.05)
    assert pooled_variance([[1.0], [2.0], []]) == (None, 0)


def test_slope_recovers_negative_slope():
    """slope_test on y = 1 - 0.5 x + noise(sd 0.1), 4 x values x 3 seeds: slope ~ -0.5, p tiny, matches linregress."""
    rng = np.random.default_rng(11)
    x = np.repeat([0.0, 0.5, 1.0, 1.5], 3)
    y = 1 - 0.5 * x + rng.normal(0, 0.1, x.size)
    r, ref = slope_test(x, y), sst.linregress(x, y, alternative="less")
    assert (r.method, r.n_a, r.n_b, r.df) == ("slope", 12, 4, 10)
    assert r.estimate == pytest.approx(-0.5, abs=0.1) and r.p < 1e-4 and r.p == pytest.approx(ref.pvalue, rel=1e-8)


def test_slope_calibrated_under_zero_slope():
    """slope_test with zero true slope (4 x values x 2 seeds): rejection rate at 0.05 is 0.05 +- 0.025."""
    rng = np.random.default_rng(12)
    x = np.repeat([0.0, 0.5, 1.0, 1.5], 2)
    assert 0.025 <= _rate([slope_test(x, y).p for y in rng.normal(0, 1, (2000, x.size))]) <= 0.075


def test_untestable_inputs_give_method_none():
    """Too few values give method 'none' and p None, not an error: welch 1+1, slope on 2 points or one x."""
    for r in (welch_test([1.0], [2.0]), welch_test([1.0, 2.0], [3.0]), slope_test([0.0, 1.0], [1.0, 0.0])):
        assert r.method == "none" and r.p is None and r.se is None and r.df is None
    assert welch_test([1.0], [2.0]).estimate == -1.0 and slope_test([0.0, 1.0], [1.0, 0.0]).estimate == pytest.approx(-1.0)
    assert slope_test([1.0, 1.0, 1.0], [0.0, 1.0, 2.0]).method == "none"
    for var, df in ((None, 5), (1.0, 0), (1.0, None)):
        assert pooled_test([1.0], [2.0], var, df).method == "none"


def test_zero_variance_gives_no_nan():
    """Zero-variance samples: identical constants give p 0.5 and se 0; distinct constants p 0 or 1; never NaN."""
    same = welch_test([2.0, 2.0, 2.0], [2.0, 2.0])
    assert (same.p, same.se, same.estimate) == (0.5, 0.0, 0.0) and math.isfinite(same.df)
    assert welch_test([1.0, 1.0], [2.0, 2.0]).p == 0.0 and welch_test([3.0, 3.0], [2.0, 2.0]).p == 1.0
    assert pooled_test([1.0], [1.0], 0.0, 4).p == 0.5
    assert slope_test([0.0, 1.0, 2.0], [1.0, 1.0, 1.0]).p == 0.5


def test_bad_arguments_raise_user_error():
    """NaN values, 2-D samples, negative var and mismatched x/y raise UserError."""
    for call in (
        lambda: welch_test([1.0, float("nan")], [1.0, 2.0]),
        lambda: welch_test([[1.0, 2.0]], [1.0, 2.0]),
        lambda: pooled_test([1.0], [2.0], -1.0, 3),
        lambda: slope_test([0.0, 1.0, 2.0], [1.0, 2.0]),
        lambda: permutation_test([1.0, 2.0], [3.0], n_resamples=0),
    ):
        with pytest.raises(UserError):
            call()


def test_paired_test_is_calibrated_and_removes_the_shared_part():
    """Paired t: size ~alpha under the null with a large shared per-pair effect, and it detects a 2 % shift that
    Welch cannot see under that shared effect (what interleaved timing rounds rely on)."""
    from flopmatch.report.stats import paired_test

    rng = np.random.default_rng(11)
    rejections = 0
    for _ in range(3000):
        shared = rng.normal(0, 1.0, 5)  # e.g. the machine's load in each timing round
        rejections += paired_test(shared + rng.normal(0, 0.05, 5), shared + rng.normal(0, 0.05, 5)).p <= 0.05
    assert 0.035 <= rejections / 3000 <= 0.065
    shared = rng.normal(0, 1.0, 7)
    a, b = shared + rng.normal(0, 0.005, 7) - 0.02, shared + rng.normal(0, 0.005, 7)
    assert paired_test(a, b).p < 0.001 and welch_test(a, b).p > 0.1
    assert paired_test([1.0, 2.0], [1.0]).method == "none"
