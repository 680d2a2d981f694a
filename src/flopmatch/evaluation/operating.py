"""Operating points: which sampling settings of a trained model are worth evaluating in full.

A paradigm is only as good as the setting it is judged at: classifier-free guidance trades image quality
against prompt following differently for flow matching, MaskGIT and next-token prediction, and steps
(and diffusion's solver) trade quality against inference cost. So a study sweeps guidance x steps x
sampler variants on a *small* sample set and evaluates only the chosen points on the full set (cheap by
design), and the report compares paradigms at their best point for a need and at matched quality.

*The sweep's images are not the full set's.* The sweep samples with its own seed (:data:`SWEEP_SEED`),
so the choice is made on images independent of those the chosen point is then judged on: picking the
best of ~10 settings on the same noisy numbers would flatter the winner (the minimum of noisy estimates
is biased low).

*Quality at small n is KID*, not FID: KID's estimator is unbiased at any sample size (Binkowski et al.
2018, "Demystifying MMD GANs"), while FID's small-sample bias depends on the model and can reorder
settings.

*What is chosen* (:func:`choose`): the Pareto front of KID against sampling FLOPs per image (for every
cost, the best quality reachable at that cost or less: the points a user trading quality for speed would
run), plus the setting with the best prompt following. Sampling FLOPs stand in for latency here because
they are exact and free; the timing phase then times the chosen points.

Plain Python in and out (no torch), so the study and the report share one definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from flopmatch.errors import UserError

SWEEP_SEED = 1  # sampling seed of the sweep's images (the full evaluation uses seed 0): independent samples


@dataclass(frozen=True)
class Point:
    """One swept setting: its key, KID (lower better), full-match prompt following (higher better) and cost."""

    key: str  # setting key (flopmatch.evaluation.run.setting_key): sampler settings only
    kid: float | None
    prompt: float | None  # full-match rate in [0, 1]; None where prompts are not scored
    flops: float | None  # sampling FLOPs per image (network only)


def pareto_front(points: Sequence[Sequence[Any]]) -> list:
    """Non-dominated points of ``[(cost, value, *extra), ...]``, lower cost and lower value both better.

    A point is dropped if another has cost <= and value <= with one strict; of exact duplicates the
    first is kept. Returned as the original tuples, by ascending cost (so value strictly decreases).
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


def choose(points: list[Point]) -> list[Point]:
    """The points to evaluate in full: the KID-vs-FLOPs front, then the best prompt-following point.

    Front: :func:`pareto_front` over (sampling FLOPs, KID), cheapest first; points missing either are left
    out. Best prompt following: the highest full-match rate, ties to the lower KID, then the lower cost,
    then the key (deterministic). A point on both lists is listed once. Empty when nothing was measured.
    """
    scored = [p for p in points if p.kid is not None and p.flops is not None
              and math.isfinite(p.kid) and math.isfinite(p.flops)]  # fmt: skip
    chosen = [q for _, _, q in pareto_front([(p.flops, p.kid, p) for p in sorted(scored, key=lambda p: p.key)])]
    prompted = [p for p in points if p.prompt is not None and math.isfinite(p.prompt)]
    if prompted:
        def rank(p: Point) -> tuple:
            return (-p.prompt, p.kid if p.kid is not None and math.isfinite(p.kid) else math.inf,
                    p.flops if p.flops is not None else math.inf, p.key)

        best = min(prompted, key=rank)
        if best not in chosen:
            chosen.append(best)
    return chosen


def point_from_entry(key: str, entry: dict, features: str) -> Point:
    """A :class:`Point` from an eval.json entry (``key`` without weights/n/seed); ``features`` names the KID's."""
    metrics = entry.get("metrics") or {}
    kid = (metrics.get(features) or {}).get("kid")
    prompt = (metrics.get("prompt_following") or {}).get("full_match")
    flops = (entry.get("inference") or {}).get("sample_flops_per_image")
    return Point(key, kid, prompt, flops)


def matched_level(best_kid: dict[str, float]) -> float | None:
    """The quality every paradigm reaches: the largest of the paradigms' best KIDs (None with < 2 paradigms).

    Cost "at matched quality" is then each paradigm's cheapest setting with KID at or below this level:
    the comparison a user needing that quality would make. A lower level would exclude a paradigm.
    """
    finite = [v for v in best_kid.values() if v is not None and math.isfinite(v)]
    return max(finite) if len(finite) >= 2 and len(finite) == len(best_kid) else None
