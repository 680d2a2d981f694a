"""Measurements of a scaling study as records, and the shapes read off them: frontiers, iso-FLOP
curves and Pareto fronts. Plain Python / numpy in and out: no torch, no files, no plotting.

The study's grid is paradigm x depth x budget ``C`` (training FLOPs) x seed; one measurement is a
:class:`Record` ``(budget, depth, seed, value)``. Every ``value`` is an *error*: lower is better (FID,
final loss); a higher-is-better score in [0, 1] (prompt following) is converted with :func:`to_error`.
The compute-optimal **frontier** at a budget is the depth whose mean over seeds is lowest (ties go to
the smaller depth: cheaper to sample). The minimum of noisy means is biased low (winner's curse); the
bootstrap (:mod:`flopmatch.report.bootstrap`) re-selects the depth in every resample, so that selection
noise is inside its intervals, but the bias itself is not removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from flopmatch.errors import UserError
from flopmatch.evaluation.operating import pareto_front  # noqa: F401  (re-exported: the report's fronts)


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
    return cells_with_noise(points, nan_policy)[0]


def cells_with_noise(points: Iterable[Any], nan_policy: str = "raise") -> tuple[dict[float, dict[int, np.ndarray]], Noise]:
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


def has_noise(noise: Noise) -> bool:
    return any(n.size for bd in noise.values() for ns in bd.values() for n in ns)


def seed_std(v: np.ndarray) -> float:
    return float(np.std(v, ddof=1)) if v.size > 1 else float("nan")


def best_depth(by_depth: Mapping[int, np.ndarray]) -> tuple[int, float]:
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
        d, m = best_depth(by_depth)
        v = by_depth[d]
        out.append(FrontierPoint(b, d, m, seed_std(v), int(v.size), tuple(float(x) for x in v)))
    return out


def select_budget(cells: Mapping[float, Any], budget: float) -> float:
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
    by_depth = cells[select_budget(cells, budget)]
    return [(d, float(np.mean(v)), seed_std(v)) for d, v in by_depth.items()]
