"""Pure fit functions for the scaling study: frontiers, power laws, bootstrap intervals, crossovers.

Everything here takes plain Python / numpy data and returns plain Python / numpy data: no torch,
no files, no plotting. The study's grid is paradigm x depth x budget ``C`` (training FLOPs) x seed;
one measurement is a :class:`Record` ``(budget, depth, seed, value)``.

Conventions
-----------
* Every ``value`` is an *error*: lower is better (FID, final loss). A higher-is-better score in
  [0, 1] (prompt following) is converted with :func:`to_error` (``1 - score``) before fitting.
* The compute-optimal **frontier** at a budget is the depth whose mean over seeds is lowest
  (ties go to the smaller depth: cheaper to sample). The minimum of noisy means is biased low
  (winner's curse); the bootstrap re-selects the depth in every resample, so that selection noise
  is inside the intervals, but the bias itself is not removed.
* The trend fitted through the frontier is ``y = E + A * (C / C0) ** (-alpha)`` with ``E >= 0``,
  ``A > 0``, ``alpha > 0`` and ``C0`` the geometric mean of the fitted budgets (so ``A`` is the
  reducible error at a typical budget, well scaled). Residuals are taken in **log space**
  (``log y - log model``): errors are positive and their noise is roughly multiplicative, and a
  log residual is a relative error, so a point at ``FID 200`` does not outweigh one at ``FID 20``.
* Bootstrap intervals are **percentile** intervals (default 90 %). Resampling is over seeds within
  each (budget, depth) cell when cells have >= 2 seeds ("seeds"). A record may carry ``noise``:
  draws of its own evaluation-sample error (e.g. FID over resampled generated images), centred on
  zero; a one-seed cell with noise is perturbed by a random draw in each resample ("evaluation").
  That measures how much the *evaluation* could move the number, not how much retraining with
  another seed would: a lower bound on the real noise. When every cell has one seed and no noise,
  log residuals of the point fit are resampled ("residuals", rescaled by ``sqrt(n / (n - p))``).
  See :func:`bootstrap_fit`.
* Degenerate inputs raise :class:`~flopmatch.errors.UserError` with the reason, or take a
  documented fallback that the result says it took (``PowerLawFit.kind`` / ``.note``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy.optimize import brentq, least_squares

from flopmatch.errors import UserError

ALPHA_BOUNDS = (1e-3, 5.0)  # exponents outside this range are not identifiable from 2-3 decades of C
_BOUND_TOL = 1e-3  # relative closeness to an alpha bound that counts as "hit the bound"
_FLAT_TOL = 1e-6  # power-term span over the data, relative to min(y), below which it has vanished
_MAX_NFEV = 100  # a healthy 3-parameter fit converges in 5-60 evaluations; more means a runaway start


# --------------------------------------------------------------------------------------------
# records and frontiers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One measurement: a run at ``budget`` FLOPs with ``depth`` and ``seed`` scored ``value`` (an error)."""

    budget: float
    depth: int
    seed: int
    value: float
    noise: tuple[float, ...] = ()  # centred draws of the value's evaluation-sample error (same units); () = none


@dataclass(frozen=True)
class FrontierPoint:
    """The compute-optimal point at one budget: best depth, its seed mean/std and per-seed values."""

    budget: float
    depth: int
    mean: float
    std: float  # sample std over seeds (ddof=1); NaN with one seed (no spread measured)
    n_seeds: int
    values: tuple[float, ...]


def to_error(score: float | np.ndarray) -> float | np.ndarray:
    """Convert a higher-is-better score in [0, 1] (e.g. prompt following) to an error ``1 - score``."""
    s = np.asarray(score, dtype=float)
    finite = s[np.isfinite(s)]
    if finite.size and (finite.min() < 0 or finite.max() > 1):
        raise UserError(f"to_error expects scores in [0, 1], got range [{finite.min():g}, {finite.max():g}]")
    out = 1.0 - s
    return float(out) if out.ndim == 0 else out


def as_records(points: Iterable[Any]) -> list[Record]:
    """Normalise dicts (keys budget, depth, seed, value) or objects with those attributes to Records."""
    out = []
    for i, p in enumerate(points):
        try:
            get = p.__getitem__ if isinstance(p, Mapping) else (lambda k, p=p: getattr(p, k))
            rec = Record(float(get("budget")), int(get("depth")), int(get("seed")), float(get("value")),
                         tuple(float(x) for x in _optional(p, "noise")))
        except (KeyError, AttributeError, TypeError, ValueError) as e:
            raise UserError(f"record {i} needs numeric budget, depth, seed, value: {p!r} ({e})") from None
        if not (math.isfinite(rec.budget) and rec.budget > 0):
            raise UserError(f"record {i} has a non-positive or non-finite budget {rec.budget!r}")
        out.append(rec)
    return out


def _optional(p: Any, key: str) -> Any:
    """An optional field of a record given as a dict or an object (empty tuple when absent or None)."""
    v = p.get(key) if isinstance(p, Mapping) else getattr(p, key, None)
    return () if v is None else v


Noise = dict[float, dict[int, list[np.ndarray]]]  # {budget: {depth: per-seed noise draws (ordered by seed)}}


def _cells(points: Iterable[Any], nan_policy: str = "raise") -> dict[float, dict[int, np.ndarray]]:
    """Group records as ``{budget: {depth: per-seed values (ordered by seed)}}``, validated."""
    return _cells_noise(points, nan_policy)[0]


def _cells_noise(points: Iterable[Any], nan_policy: str = "raise") -> tuple[dict[float, dict[int, np.ndarray]], Noise]:
    """:func:`_cells` plus the records' evaluation-noise draws in the same layout (empty arrays: none)."""
    if nan_policy not in ("raise", "omit"):
        raise UserError(f"nan_policy must be 'raise' or 'omit', got {nan_policy!r}")
    recs = as_records(points)
    if not recs:
        raise UserError("no records to analyse")
    seen: dict[tuple[float, int, int], float] = {}
    draws: dict[tuple[float, int, int], np.ndarray] = {}
    for r in recs:
        key = (r.budget, r.depth, r.seed)
        if key in seen:
            raise UserError(f"duplicate record for budget={r.budget:g} depth={r.depth} seed={r.seed}")
        if not math.isfinite(r.value):
            if nan_policy == "raise":
                raise UserError(
                    f"non-finite value {r.value} at budget={r.budget:g} depth={r.depth} seed={r.seed} "
                    "(a diverged run?); drop it or pass nan_policy='omit'"
                )
            continue
        seen[key] = r.value
        draws[key] = np.asarray(r.noise, dtype=float)
        if draws[key].size and not np.all(np.isfinite(draws[key])):
            raise UserError(f"non-finite noise draw at budget={r.budget:g} depth={r.depth} seed={r.seed}")
    grouped: dict[float, dict[int, list[tuple[int, float]]]] = {}
    for (b, d, s), v in seen.items():
        grouped.setdefault(b, {}).setdefault(d, []).append((s, v))
    if not grouped:
        raise UserError("every record has a non-finite value")
    cells = {
        b: {d: np.array([v for _, v in sorted(sv)]) for d, sv in sorted(by_d.items())}
        for b, by_d in sorted(grouped.items())
    }
    noise = {b: {d: [draws[(b, d, s)] for s, _ in sorted(sv)] for d, sv in by_d.items()} for b, by_d in grouped.items()}
    return cells, noise


def _has_noise(noise: Noise) -> bool:
    return any(n.size for bd in noise.values() for ns in bd.values() for n in ns)


def _std(v: np.ndarray) -> float:
    return float(np.std(v, ddof=1)) if v.size > 1 else float("nan")


def _best_depth(by_depth: Mapping[int, np.ndarray]) -> tuple[int, float]:
    """(depth, mean) with the lowest mean; ties go to the smaller depth (dict is depth-sorted)."""
    best_d, best_m = None, math.inf
    for d, v in by_depth.items():
        m = float(np.mean(v))
        if m < best_m:
            best_d, best_m = d, m
    return best_d, best_m


def frontier(points: Iterable[Any], nan_policy: str = "raise") -> list[FrontierPoint]:
    """The compute-optimal frontier: for each budget (ascending), the depth with the lowest seed mean.

    ``points``: records (dicts or objects) with ``budget`` (FLOPs), ``depth``, ``seed``, ``value``
    (an error, lower is better). ``nan_policy='omit'`` drops non-finite values (diverged runs) instead
    of raising; a budget left with no values is dropped from the frontier.
    """
    out = []
    for b, by_depth in _cells(points, nan_policy).items():
        d, m = _best_depth(by_depth)
        v = by_depth[d]
        out.append(FrontierPoint(b, d, m, _std(v), int(v.size), tuple(float(x) for x in v)))
    return out


def _select_budget(cells: Mapping[float, Any], budget: float) -> float:
    for b in cells:
        if math.isclose(b, budget, rel_tol=1e-6):
            return b
    have = ", ".join(f"{b:g}" for b in cells)
    raise UserError(f"no records at budget {budget:g}; budgets present: {have}")


def iso_flop(points: Iterable[Any], budget: float, nan_policy: str = "raise") -> list[tuple[int, float, float]]:
    """Metric vs model size at one budget: ``[(depth, mean, std), ...]`` by ascending depth.

    ``budget`` matches a record budget to a relative tolerance of 1e-6. ``std`` is over seeds
    (ddof=1), NaN for a single seed.
    """
    cells = _cells(points, nan_policy)
    by_depth = cells[_select_budget(cells, budget)]
    return [(d, float(np.mean(v)), _std(v)) for d, v in by_depth.items()]


def pareto_front(points: Sequence[Sequence[Any]]) -> list:
    """Non-dominated points of ``[(cost, value, *extra), ...]``, lower cost and lower value both better.

    A point is dropped if another has cost <= and value <= with one strict; of exact duplicates the
    first is kept. Returned as the original tuples, by ascending cost (so value strictly decreases).
    Used for quality vs sampling FLOPs / latency.
    """
    items = []
    for i, p in enumerate(points):
        c, v = float(p[0]), float(p[1])
        if not (math.isfinite(c) and math.isfinite(v)):
            raise UserError(f"pareto_front: point {i} has a non-finite cost or value: {p!r}")
        items.append((c, v, i, p))
    items.sort(key=lambda t: (t[0], t[1], t[2]))
    out, best_v = [], math.inf
    for c, v, _, p in items:
        if v < best_v:  # strictly better than every cheaper-or-equal point kept so far
            out.append(p)
            best_v = v
    return out


# --------------------------------------------------------------------------------------------
# power-law fits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PowerLawFit:
    """``y = E + A * (C / C0) ** (-alpha)``; ``kind`` is "saturating" (E fitted) or "power" (E = 0)."""

    E: float
    A: float
    alpha: float
    C0: float
    kind: str
    rms: float  # residual RMS in y units
    rms_log: float  # residual RMS of log y (about the relative error)
    n: int  # points fitted
    note: str = ""  # why a fallback was taken, if one was

    def predict(self, C: float | np.ndarray) -> float | np.ndarray:
        """Predicted error at budget(s) ``C`` (FLOPs); same shape as ``C``."""
        c = np.asarray(C, dtype=float)
        y = self.E + self.A * (c / self.C0) ** (-self.alpha)
        return float(y) if y.ndim == 0 else y

    @property
    def params(self) -> dict[str, float]:
        """The parameters as a dict: E, A, alpha, C0."""
        return {"E": self.E, "A": self.A, "alpha": self.alpha, "C0": self.C0}


def _validate_xy(C: Any, y: Any, weights: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c, yy = np.asarray(C, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if c.size != yy.size:
        raise UserError(f"C and y differ in length: {c.size} vs {yy.size}")
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(yy))):
        raise UserError("C and y must be finite (NaN/inf found); drop diverged runs before fitting")
    if np.any(c <= 0):
        raise UserError("budgets C must be > 0")
    if np.any(yy <= 0):
        raise UserError(f"errors y must be > 0 for a power-law fit, got min {yy.min():g}")
    if np.unique(c).size < 2:
        raise UserError(f"need at least 2 distinct budgets to fit a trend, got {np.unique(c).size}")
    if weights is None:
        w = np.ones_like(yy)
    else:
        w = np.asarray(weights, dtype=float).ravel()
        if w.size != yy.size or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise UserError("weights must be finite, > 0 and one per point")
    return c, yy, w


def _make_fit(c, y, E, A, alpha, C0, kind, note="") -> PowerLawFit:
    pred = E + A * (c / C0) ** (-alpha)
    return PowerLawFit(
        E=float(E), A=float(A), alpha=float(alpha), C0=float(C0), kind=kind,
        rms=float(np.sqrt(np.mean((y - pred) ** 2))),
        rms_log=float(np.sqrt(np.mean((np.log(y) - np.log(pred)) ** 2))),
        n=int(y.size), note=note,
    )  # fmt: skip


def fit_power_law(C: Any, y: Any, weights: Any = None) -> PowerLawFit:
    """Plain power law ``y = A * (C / C0) ** (-alpha)`` by (weighted) linear regression in log-log.

    ``C``: budgets in FLOPs, shape (n,); ``y``: errors > 0, shape (n,); ``weights``: per-point weights
    on the squared log residuals. ``alpha`` is not constrained: a negative value means the error
    grows with compute over the range (reported, not hidden). Needs >= 2 distinct budgets.
    """
    c, yy, w = _validate_xy(C, y, weights)
    C0 = float(np.exp(np.mean(np.log(c))))
    u, ly = np.log(c / C0), np.log(yy)
    # weighted least squares of ly = a - alpha*u
    W = w / w.sum()
    um, lm = float(W @ u), float(W @ ly)
    slope = float(W @ ((u - um) * (ly - lm)) / (W @ (u - um) ** 2))
    return _make_fit(c, yy, 0.0, math.exp(lm - slope * um), -slope, C0, "power")


def _sat_residuals(theta, u, ly, sw):
    logA, logalpha, E = theta
    m = E + np.exp(logA - np.exp(logalpha) * u)
    return sw * (ly - np.log(m))


def _sat_jac(theta, u, ly, sw):
    logA, logalpha, E = theta
    alpha = np.exp(logalpha)
    P = np.exp(logA - alpha * u)  # power term
    m = E + P
    J = np.empty((u.size, 3))
    J[:, 0] = P
    J[:, 1] = -P * u * alpha
    J[:, 2] = 1.0
    return -(sw / m)[:, None] * J


def _starts(u: np.ndarray, ly: np.ndarray, ymin: float) -> list[np.ndarray]:
    """Initial (log A, log alpha, E): for several E, a log-log line through y - E, plus alpha variants."""
    lo, hi = math.log(ALPHA_BOUNDS[0]), math.log(ALPHA_BOUNDS[1])
    out = []
    for frac in (0.0, 0.3, 0.6, 0.9):
        E0 = frac * ymin
        z = np.log(np.maximum(np.exp(ly) - E0, 1e-12 * ymin))
        slope, icpt = np.polyfit(u, z, 1)
        for a0 in dict.fromkeys((float(np.clip(-slope, 0.02, 3.0)), 0.1, 1.0)):  # ordered, deduplicated
            logA0 = float(np.mean(z + a0 * u)) if frac == 0.0 else icpt
            out.append(np.array([logA0, np.clip(math.log(a0), lo + 1e-6, hi - 1e-6), E0]))
    return out


def fit_saturating_power_law(
    C: Any, y: Any, weights: Any = None, *, starts: Sequence[Sequence[float]] | None = None
) -> PowerLawFit:
    """Fit ``y = E + A * (C / C0) ** (-alpha)``, ``E in [0, min y]``, ``A > 0``, ``alpha in ALPHA_BOUNDS``.

    ``C``: budgets in FLOPs, shape (n,); ``y``: errors > 0, shape (n,); ``weights``: per-point weights
    on squared log residuals. ``C0`` = geometric mean of ``C``. Solved with bounded
    ``scipy.optimize.least_squares`` in ``(log A, log alpha, E)`` from several starts (or the given
    ``starts``, same parametrisation), keeping the lowest cost.

    Fallback to :func:`fit_power_law` (``kind="power"``, reason in ``note``) when: fewer than 3
    distinct budgets; no start converges; alpha ends on a bound; or the power term is flat over the
    data (e.g. constant y). Fewer than 2 distinct budgets, non-positive or non-finite y raise UserError.
    """
    c, yy, w = _validate_xy(C, y, weights)
    if np.unique(c).size < 3:
        return _fallback(c, yy, w, f"only {np.unique(c).size} distinct budgets: E not identifiable")
    C0 = float(np.exp(np.mean(np.log(c))))
    u, ly, sw, ymin = np.log(c / C0), np.log(yy), np.sqrt(w), float(yy.min())
    lb = np.array([-np.inf, math.log(ALPHA_BOUNDS[0]), 0.0])
    ub = np.array([np.inf, math.log(ALPHA_BOUNDS[1]), ymin])
    x0s = [np.asarray(s, dtype=float) for s in starts] if starts is not None else _starts(u, ly, ymin)
    best = None
    for x0 in x0s:
        if not np.all(np.isfinite(x0)):
            continue
        res = _solve(x0, lb, ub, (u, ly, sw))
        if res is not None and (best is None or res.cost < best.cost):
            best = res
            if best.cost < 1e-24:  # exact fit: no start can do better
                break
    if best is None:
        return _fallback(c, yy, w, "no start of the saturating fit converged")
    logA, logalpha, E = best.x
    A, alpha = math.exp(logA), math.exp(logalpha)
    if not (math.isfinite(A) and A > 0):
        return _fallback(c, yy, w, "saturating fit gave a non-finite amplitude")
    if alpha <= ALPHA_BOUNDS[0] * (1 + _BOUND_TOL) or alpha >= ALPHA_BOUNDS[1] * (1 - _BOUND_TOL):
        return _fallback(c, yy, w, f"saturating fit put alpha on its bound ({alpha:.3g})")
    span = A * abs((c.min() / C0) ** (-alpha) - (c.max() / C0) ** (-alpha))
    if span < _FLAT_TOL * ymin:
        return _fallback(c, yy, w, "power term is flat over the data (y ~ constant)")
    return _make_fit(c, yy, E, A, alpha, C0, "saturating")


def _solve(x0: np.ndarray, lb: np.ndarray, ub: np.ndarray, args: tuple):
    """Local least squares from ``x0`` inside the box ``[lb, ub]``; None if it does not converge.

    Unbounded Levenberg-Marquardt first (MINPACK, ~5x faster than the bounded solver): an interior
    minimum it finds is also a minimum of the bounded problem. If it leaves the box or fails, the
    bounded trust-region solver takes over.
    """
    with np.errstate(all="ignore"):
        try:
            res = least_squares(_sat_residuals, x0, jac=_sat_jac, args=args, method="lm", xtol=1e-10, ftol=1e-10,
                                max_nfev=_MAX_NFEV)  # fmt: skip
            if res.status > 0 and np.all(np.isfinite(res.fun)) and np.all(res.x >= lb) and np.all(res.x <= ub):
                return res
        except (ValueError, FloatingPointError):
            pass
        eps = 1e-9 * (1 + np.abs(x0))
        x0 = np.minimum(np.maximum(x0, lb + eps), ub - eps)  # strictly feasible start
        try:
            res = least_squares(_sat_residuals, x0, jac=_sat_jac, bounds=(lb, ub), args=args, method="trf",
                                x_scale="jac", xtol=1e-10, ftol=1e-10, gtol=1e-10, max_nfev=_MAX_NFEV)  # fmt: skip
        except (ValueError, FloatingPointError):
            return None
    return res if res.status > 0 and np.isfinite(res.cost) else None


def _fallback(c, y, w, why: str) -> PowerLawFit:
    p = fit_power_law(c, y, w)
    return PowerLawFit(**{**p.__dict__, "note": f"fell back to plain power law: {why}"})


def _fit(kind: str, C, y, weights=None, starts=None) -> PowerLawFit:
    if kind == "saturating":
        return fit_saturating_power_law(C, y, weights, starts=starts)
    if kind == "power":
        return fit_power_law(C, y, weights)
    raise UserError(f"fit kind must be 'saturating' or 'power', got {kind!r}")


# --------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------


def _quantiles(x: np.ndarray, level: float) -> tuple[float, float]:
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(x, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return (float(lo), float(hi)) if np.ndim(lo) == 0 else (lo, hi)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise UserError(f"confidence level must be in (0, 1), got {level}")


@dataclass(frozen=True)
class BootstrapFit:
    """A point fit through the frontier plus bootstrap refits; percentile intervals on demand.

    ``method``: "seeds" (resampled seeds per cell), "residuals" (resampled log residuals, one seed
    per cell) or "none" (no resampling possible, intervals are NaN; ``note`` says why).
    ``failed_fraction``: refits that raised; ``fallback_fraction``: successful refits that fell back
    to a plain power law (they are kept: E = 0 is a boundary of the model, and dropping them would
    narrow the intervals dishonestly).
    """

    point: PowerLawFit
    frontier: list[FrontierPoint]
    fits: list[PowerLawFit]  # successful refits, in bootstrap order
    n_boot: int
    failed_fraction: float
    fallback_fraction: float
    depth_agreement: float  # fraction of resamples whose frontier picked the point frontier's depths
    method: str
    level: float = 0.9
    note: str = ""
    _arrays: dict = field(default_factory=dict, repr=False, compare=False)

    def samples(self, name: str) -> np.ndarray:
        """Bootstrap samples of one parameter ("E", "A", "alpha", "C0"), shape (n_successful,)."""
        if name not in ("E", "A", "alpha", "C0"):
            raise UserError(f"unknown parameter {name!r}")
        if name not in self._arrays:
            self._arrays[name] = np.array([getattr(f, name) for f in self.fits], dtype=float)
        return self._arrays[name]

    def interval(self, name: str, level: float | None = None) -> tuple[float, float]:
        """Percentile interval of one parameter; NaNs when no refit succeeded."""
        level = self.level if level is None else level
        _check_level(level)
        return _quantiles(self.samples(name), level)

    @property
    def intervals(self) -> dict[str, tuple[float, float]]:
        """Percentile intervals at ``level`` for E, A and alpha."""
        return {k: self.interval(k) for k in ("E", "A", "alpha")}

    def predict_interval(self, C: float | np.ndarray, level: float | None = None):
        """Percentile interval of the predicted error at budget(s) ``C``: ``(lo, hi)``, each shaped like ``C``."""
        level = self.level if level is None else level
        _check_level(level)
        c = np.asarray(C, dtype=float)
        if not self.fits:
            nan = np.full(c.shape, np.nan)
            return (float(nan), float(nan)) if c.ndim == 0 else (nan, nan)
        E, A, al, C0 = (self.samples(k)[:, None] for k in ("E", "A", "alpha", "C0"))
        preds = E + A * (c.reshape(1, -1) / C0) ** (-al)  # (n_boot, n_C)
        lo, hi = np.quantile(preds, [(1 - level) / 2, (1 + level) / 2], axis=0)
        return (float(lo[0]), float(hi[0])) if c.ndim == 0 else (lo.reshape(c.shape), hi.reshape(c.shape))


def _resample_cells(cells, rng: np.random.Generator, inflate: bool, noise: Noise | None = None) -> dict[float, dict[int, np.ndarray]]:
    """One bootstrap draw of every cell: seeds resampled where a cell has >= 2, else its evaluation noise.

    A cell with one seed and noise draws gets ``value + draw`` (floored at a tiny positive error, as
    errors are fitted in log space); seed resampling already contains evaluation noise, so a cell
    with >= 2 seeds never gets both.
    """
    out = {}
    for b, by_d in cells.items():
        nb = {}
        for d, v in by_d.items():
            k = v.size
            if k < 2:
                dr = noise[b][d][0] if noise is not None and k == 1 else np.empty(0)
                nb[d] = np.maximum(v + dr[rng.integers(0, dr.size)], 1e-12 * abs(v) + 1e-300) if dr.size else v
                continue
            s = v[rng.integers(0, k, size=k)]
            if inflate:
                # resampling k values understates the variance of their mean by (k-1)/k; widen the
                # deviations from the cell mean to undo it (keeps the 3-seed intervals from being too narrow)
                m = v.mean()
                s = np.maximum(m + math.sqrt(k / (k - 1)) * (s - m), 1e-12 * abs(m) + 1e-300)
            nb[d] = s
        out[b] = nb
    return out


def bootstrap_fit(
    records: Iterable[Any],
    n_boot: int = 1000,
    seed: int = 0,
    *,
    level: float = 0.9,
    kind: str = "saturating",
    method: str = "auto",
    inflate: bool = True,
    nan_policy: str = "raise",
) -> BootstrapFit:
    """Fit the frontier trend of ``records`` and bootstrap it; deterministic given ``seed``.

    ``records``: dicts/objects with budget (FLOPs), depth, seed, value (error). ``kind``:
    "saturating" (with its documented fallback) or "power". ``method``:

    * "seeds": in every resample, each (budget, depth) cell's seed values are drawn with replacement
      (cells with one seed stay fixed, said in ``note``), the frontier is rebuilt (the best depth may
      change) and refitted. With ``inflate`` (default) deviations from the cell mean are scaled by
      ``sqrt(k/(k-1))`` so the resampled mean has the unbiased variance: with 3 seeds the plain
      bootstrap understates it by a third.
    * "evaluation": every cell has one seed and some carry ``noise`` draws: each resample perturbs
      those cells by a random draw (cells without draws stay fixed), re-picks the frontier and refits.
      Intervals then reflect evaluation-sample noise only, not seed variance (said in ``note``).
    * "residuals": the frontier is fixed, ``y* = yhat * exp(r*)`` with ``r*`` drawn from the point
      fit's log residuals scaled by ``sqrt(n/(n-p))`` (p = number of fitted parameters). Needs n > p,
      otherwise ``method`` is "none" with NaN intervals.
    * "auto": "seeds" if any cell has >= 2 seeds, else "evaluation" if any record has noise, else
      "residuals". With "seeds", one-seed cells with noise draws are perturbed by them (as above).

    Refits start from the point estimate (a failed or fallen-back refit is retried from all starts).

    Measured coverage of the 90 % alpha interval (3 seeds, 3 % noise, 4-6 budgets over 2 decades,
    A = 2 at C0, 50-100 repetitions): ~85 % with E = 1, ~76-82 % with E = 0.3, ~60-72 % with E = 0
    (the truth on the E >= 0 bound, where percentile intervals are known to under-cover). Read the
    intervals as somewhat optimistic, more so when the fitted E is near 0.
    """
    if n_boot < 1:
        raise UserError(f"n_boot must be >= 1, got {n_boot}")
    _check_level(level)
    cells, noise = _cells_noise(records, nan_policy)
    front = [
        FrontierPoint(b, d, m, _std(bd[d]), int(bd[d].size), tuple(map(float, bd[d])))
        for b, bd in cells.items()
        for d, m in [_best_depth(bd)]
    ]
    budgets = np.array([p.budget for p in front])
    y0 = np.array([p.mean for p in front])
    point = _fit(kind, budgets, y0)
    multi = any(v.size >= 2 for bd in cells.values() for v in bd.values())
    noisy = _has_noise(noise)
    if method == "auto":
        method = "seeds" if multi else "evaluation" if noisy else "residuals"
    if method not in ("seeds", "evaluation", "residuals"):
        raise UserError(f"bootstrap method must be 'auto', 'seeds', 'evaluation' or 'residuals', got {method!r}")
    note = ""
    if method == "seeds" and not multi:
        raise UserError("bootstrap method 'seeds' needs >= 2 seeds in some (budget, depth) cell")
    if method == "evaluation" and (multi or not noisy):
        raise UserError("bootstrap method 'evaluation' needs one seed per cell and records with noise draws")
    if method == "seeds" and any(v.size < 2 for bd in cells.values() for v in bd.values()):
        note = ("some cells have one seed: their evaluation noise was used where recorded, else they were held "
                "fixed; intervals understate their seed variance")
    if method == "evaluation":
        note = "one seed per cell: evaluation-sample noise only, seed variance not included"
    n_par = 3 if point.kind == "saturating" else 2
    rng = np.random.default_rng(seed)
    if method == "residuals":
        if budgets.size <= n_par:
            return BootstrapFit(point, front, [], n_boot, 0.0, 0.0, 1.0, "none", level,
                                f"one seed per cell and {budgets.size} budgets for {n_par} parameters: "
                                "no residuals to resample, no intervals")  # fmt: skip
        resid = np.log(y0) - np.log(point.predict(budgets))
        resid = (resid - resid.mean()) * math.sqrt(budgets.size / (budgets.size - n_par))
        yhat = point.predict(budgets)

    # refits start from the point estimate (checked to reach the same optimum as the full multi-start
    # on thousands of resamples, at a fraction of the cost); a refit that fails or falls back from
    # there is retried with the full set of starts before it counts as a fallback
    warm = [[math.log(point.A), math.log(point.alpha), point.E]] if point.kind == "saturating" else None
    fits, failed, fallback, same_depth = [], 0, 0, 0
    depths0 = [p.depth for p in front]
    for _ in range(n_boot):
        if method in ("seeds", "evaluation"):
            rc = _resample_cells(cells, rng, inflate, noise)
            picks = [_best_depth(bd) for bd in rc.values()]
            y = np.array([m for _, m in picks])
            same_depth += [d for d, _ in picks] == depths0
        else:
            y = yhat * np.exp(resid[rng.integers(0, resid.size, size=resid.size)])
            same_depth += 1
        try:
            f = _fit(kind, budgets, y, starts=warm)
            if warm is not None and f.kind != "saturating":
                f = _fit(kind, budgets, y)
        except (UserError, ValueError, FloatingPointError, np.linalg.LinAlgError):
            failed += 1
            continue
        fallback += f.kind != point.kind
        fits.append(f)
    return BootstrapFit(
        point=point, frontier=front, fits=fits, n_boot=n_boot,
        failed_fraction=failed / n_boot, fallback_fraction=fallback / max(len(fits), 1),
        depth_agreement=same_depth / n_boot, method=method, level=level, note=note,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# crossovers and head-to-head comparisons
# --------------------------------------------------------------------------------------------


def _check_range(C_range: Sequence[float]) -> tuple[float, float]:
    lo, hi = float(C_range[0]), float(C_range[1])
    if not (0 < lo < hi and math.isfinite(hi)):
        raise UserError(f"C_range must be (lo, hi) with 0 < lo < hi, got {tuple(C_range)}")
    return lo, hi


def crossover(fit_a: PowerLawFit, fit_b: PowerLawFit, C_range: Sequence[float], n_grid: int = 257) -> float | None:
    """The lowest budget in ``C_range`` (FLOPs) where the two trends cross, or None if they do not.

    The difference ``fit_a.predict - fit_b.predict`` is scanned on ``n_grid`` log-spaced budgets to
    bracket a sign change, which ``brentq`` refines in log C. A touch without a sign change is not a
    crossover. If the curves cross more than once in range, the first is returned.
    """
    lo, hi = _check_range(C_range)
    g = np.linspace(math.log(lo), math.log(hi), n_grid)

    def diff(logc):
        return fit_a.predict(np.exp(logc)) - fit_b.predict(np.exp(logc))

    d = diff(g)
    if not np.all(np.isfinite(d)):
        raise UserError("fitted trends are not finite over C_range")
    s = np.sign(d)
    for i in range(n_grid - 1):
        if s[i] == 0:
            # exactly equal on a grid point: a crossing only if the sign differs on both sides
            before = s[i - 1] if i > 0 else 0
            after = next((x for x in s[i + 1 :] if x != 0), 0)
            if before != 0 and after != 0 and before != after:
                return float(np.exp(g[i]))
            continue
        if s[i] * s[i + 1] < 0:
            return float(np.exp(brentq(diff, g[i], g[i + 1], xtol=1e-12, rtol=1e-12)))
    return None


def _lower(fa: PowerLawFit, fb: PowerLawFit, C: float) -> str:
    a, b = fa.predict(C), fb.predict(C)
    return "a" if a < b else "b" if b < a else "tie"


def bootstrap_crossover(
    boot_a: BootstrapFit, boot_b: BootstrapFit, C_range: Sequence[float], level: float | None = None
) -> dict:
    """Crossover of two bootstrapped trends: point estimate, interval, and how often they cross.

    Bootstrap refits are paired by index (the two bootstraps are independent, so any pairing is a
    draw from the joint). Returns a dict: ``point`` (C or None), ``interval`` (percentile interval of
    the crossover over the pairs that cross -- conditional on crossing -- or None), ``fraction_crossing``
    (pairs that cross inside ``C_range``), ``n_pairs``, ``level``, ``lower_at_low_C`` /
    ``lower_at_high_C`` ("a" | "b" | "tie", from the point fits at the range ends) and a ``summary``.
    """
    lo, hi = _check_range(C_range)
    level = boot_a.level if level is None else level
    _check_level(level)
    point = crossover(boot_a.point, boot_b.point, (lo, hi))
    n = min(len(boot_a.fits), len(boot_b.fits))
    xs = [crossover(fa, fb, (lo, hi)) for fa, fb in zip(boot_a.fits[:n], boot_b.fits[:n])]
    crossed = np.array([x for x in xs if x is not None])
    frac = crossed.size / n if n else float("nan")
    interval = None
    if crossed.size:
        qlo, qhi = _quantiles(np.log(crossed), level)
        interval = (math.exp(qlo), math.exp(qhi))
    rng_txt = f"[{lo:.3g}, {hi:.3g}] FLOPs"
    if point is None:
        summary = f"no crossover in range {rng_txt}"
    else:
        summary = f"crossover at {point:.3g} FLOPs"
    if n:
        summary += f"; {100 * frac:.0f}% of {n} bootstrap pairs cross in range"
        if interval is not None:
            summary += f" ({100 * level:.0f}% interval given a crossing: {interval[0]:.3g}-{interval[1]:.3g})"
    else:
        summary += "; no bootstrap pairs (no uncertainty estimate)"
    return {
        "point": point, "interval": interval, "fraction_crossing": frac, "n_pairs": n, "level": level,
        "C_range": (lo, hi), "lower_at_low_C": _lower(boot_a.point, boot_b.point, lo),
        "lower_at_high_C": _lower(boot_a.point, boot_b.point, hi), "summary": summary,
    }  # fmt: skip


def compare_at_budget(
    records_a: Iterable[Any],
    records_b: Iterable[Any],
    budget: float,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    level: float = 0.9,
    inflate: bool = True,
    nan_policy: str = "raise",
) -> dict:
    """Which paradigm has the lower frontier error at one budget, and how sure.

    Frontier value = best-depth seed mean at ``budget`` (matched to 1e-6 relative). Seeds are
    resampled within each cell of both paradigms (as in :func:`bootstrap_fit`, best depth re-picked
    every time). Returns a dict: ``a`` / ``b`` ({"depth", "value"}), ``diff`` (a - b; negative means
    a is better), ``interval`` (percentile interval of the diff), ``p_a_better`` (fraction of
    resamples with a < b, ties count half), ``n_boot``, ``level``, ``note``, ``noise`` (what was
    resampled: "seeds", "evaluation" (one-seed cells perturbed by their records' ``noise`` draws:
    evaluation-sample noise only) or "seeds+evaluation"). With one seed per cell and no noise draws
    on either side nothing can be resampled: ``interval``, ``p_a_better`` and ``noise`` are None.
    """
    if n_boot < 1:
        raise UserError(f"n_boot must be >= 1, got {n_boot}")
    _check_level(level)
    (ca, na), (cb, nb) = _cells_noise(records_a, nan_policy), _cells_noise(records_b, nan_policy)
    ba, bb = _select_budget(ca, budget), _select_budget(cb, budget)
    cells_a, noise_a = {0: ca[ba]}, {0: na[ba]}
    cells_b, noise_b = {0: cb[bb]}, {0: nb[bb]}
    (da, va), (db, vb) = _best_depth(cells_a[0]), _best_depth(cells_b[0])
    out = {
        "budget": float(budget), "a": {"depth": da, "value": va}, "b": {"depth": db, "value": vb},
        "diff": va - vb, "interval": None, "p_a_better": None, "n_boot": n_boot, "level": level, "note": "",
        "noise": None,
    }  # fmt: skip
    # per side: does some cell resample seeds / does some one-seed cell have evaluation noise draws
    n_multi = [any(v.size >= 2 for v in c[0].values()) for c in (cells_a, cells_b)]
    n_eval = [any(v.size == 1 and ns[0].size for v, ns in zip(c[0].values(), n[0].values()))
              for c, n in ((cells_a, noise_a), (cells_b, noise_b))]
    if not any(n_multi) and not any(n_eval):
        out["note"] = "one seed per cell on both sides and no evaluation noise: no bootstrap possible"
        return out
    out["noise"] = "+".join(k for k, on in (("seeds", any(n_multi)), ("evaluation", any(n_eval))) if on)
    fixed = [not (m or e) for m, e in zip(n_multi, n_eval)]
    if any(fixed):
        out["note"] = "one side has one seed per cell and no noise draws and is held fixed: the interval understates its noise"
    elif any(n_eval):
        out["note"] = "one-seed cells vary by evaluation-sample noise only: seed variance is not included there"
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        ma = _best_depth(_resample_cells(cells_a, rng, inflate, noise_a)[0])[1]
        mb = _best_depth(_resample_cells(cells_b, rng, inflate, noise_b)[0])[1]
        diffs[i] = ma - mb
    out["interval"] = _quantiles(diffs, level)
    out["p_a_better"] = float(np.mean(diffs < 0) + 0.5 * np.mean(diffs == 0))
    return out
