"""Power-law trends through a frontier: ``y = E + A * (C / C0) ** (-alpha)`` (saturating) or ``A * (C/C0)^-alpha``.

``E >= 0``, ``A > 0``, ``alpha > 0`` and ``C0`` the geometric mean of the fitted budgets (so ``A`` is the
reducible error at a typical budget, well scaled). Residuals are taken in **log space** (``log y - log
model``): errors are positive and their noise is roughly multiplicative, and a log residual is a
relative error, so a point at FID 200 does not outweigh one at FID 20. Degenerate inputs raise
:class:`~flopmatch.errors.UserError` with the reason, or take a documented fallback that the result says
it took (``PowerLawFit.kind`` / ``.note``). Plain numpy / scipy: no torch, no files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy.optimize import least_squares

from flopmatch.errors import UserError

ALPHA_BOUNDS = (1e-3, 5.0)  # exponents outside this range are not identifiable from 2-3 decades of C
_BOUND_TOL = 1e-3  # relative closeness to an alpha bound that counts as "hit the bound"
_FLAT_TOL = 1e-6  # power-term span over the data, relative to min(y), below which it has vanished
_MAX_NFEV = 100  # a healthy 3-parameter fit converges in 5-60 evaluations; more means a runaway start


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
    # E on its upper bound: the floor is the best value seen, so the data have not shown where the error levels off
    at_min = E >= ymin * (1 - _BOUND_TOL)
    return _make_fit(c, yy, E, A, alpha, C0, "saturating",
                     "E at its upper bound min(y): the floor is not identified" if at_min else "")


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


def fit_trend(kind: str, C, y, weights=None, starts=None) -> PowerLawFit:
    if kind == "saturating":
        return fit_saturating_power_law(C, y, weights, starts=starts)
    if kind == "power":
        return fit_power_law(C, y, weights)
    raise UserError(f"fit kind must be 'saturating' or 'power', got {kind!r}")
