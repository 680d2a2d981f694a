"""Prompt following per prompt group in the report: seen vs held-out, one vs two objects. Descriptive only.

The groups come from each eval entry's ``prompt_following.by_group`` (:mod:`flopmatch.evaluation.prompt_groups`):
a prompt is held-out when it names a colour+shape combo or shows a shape arrangement that the run's data
held out of training. Per (paradigm, budget) the table pools the images of every finished seed at the depth
the verdicts compare there (``Verdicts.cells["prompt"]``), and gives each group's full-match rate with a
Wilson interval over those images, and the held-out minus seen difference. Held-out prompts are more often
two-object ones (a held-out combo has two chances to appear in a pair), which score lower anyway, so the
difference is taken within each object count and averaged with the held-out prompts' object-count mix
(direct standardisation; a normal interval from the per-stratum binomial variances); evaluations without the
crossed groups get the raw difference with Newcombe's interval built from the two Wilson intervals. These intervals hold evaluation noise only (which prompts and images were
drawn), not retraining noise; no test and no verdict rests on them. The decision table and the claims
keep using the overall full match, over seen and held-out prompts together.
"""

from __future__ import annotations

import math

from scipy import stats as sps

from flopmatch.report.data import Study
from flopmatch.report.render import fmt
from flopmatch.report.verdicts import Verdicts

LEVEL = 0.95  # coverage of the per-group intervals
NOISY_N = 100  # prompts per evaluation below which the report calls a group's figure of one run noisy
COLUMNS = {"seen": "seen", "held_out": "held-out", "held_out_combo": "held-out colour+shape",
           "held_out_relation": "held-out arrangement", "one_object": "1 object", "two_object": "2 objects"}


def wilson_interval(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval (fractions) for a rate of ``k`` successes in ``n`` trials; (nan, nan) for n = 0."""
    if n <= 0:
        return math.nan, math.nan
    z = float(sps.norm.ppf(0.5 + level / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(a: tuple[int, int], b: tuple[int, int], level: float = LEVEL) -> tuple[float, float, float]:
    """(rate_a - rate_b, low, high) for counts ``a`` = (k, n) and ``b``: Newcombe's hybrid score interval
    (method 10) from the two Wilson intervals, for independent samples; NaNs when either n is 0."""
    (ka, na), (kb, nb) = a, b
    if na <= 0 or nb <= 0:
        return math.nan, math.nan, math.nan
    pa, pb = ka / na, kb / nb
    (la, ua), (lb, ub) = wilson_interval(ka, na, level), wilson_interval(kb, nb, level)
    d = pa - pb
    return d, d - math.sqrt((pa - la) ** 2 + (ub - pb) ** 2), d + math.sqrt((ua - pa) ** 2 + (pb - lb) ** 2)


def adjusted_difference(groups: dict[str, tuple[int, int]], level: float = LEVEL) -> tuple[float, float, float]:
    """(held-out - seen rate at the same object count, low, high) from crossed-group counts (k, n).

    The per-count differences are weighted by the held-out prompts' object-count mix; the interval is
    normal, with each rate's binomial variance from (k + 0.5) / (n + 1) so that 0 or n matches still
    count as noisy. NaNs when no object count has both held-out and seen prompts.
    """
    strata = []
    for count in ("one_object", "two_object"):
        (kh, nh), (ks, ns) = groups.get(f"held_out_{count}", (0, 0)), groups.get(f"seen_{count}", (0, 0))
        if nh > 0 and ns > 0:
            strata.append(((kh, nh), (ks, ns)))
    if not strata:
        return math.nan, math.nan, math.nan
    total = sum(nh for (_, nh), _ in strata)

    def var(k: int, n: int) -> float:
        m = (k + 0.5) / (n + 1)
        return m * (1 - m) / n

    d = sum(nh / total * (kh / nh - ks / ns) for (kh, nh), (ks, ns) in strata)
    v = sum((nh / total) ** 2 * (var(kh, nh) + var(ks, ns)) for (kh, nh), (ks, ns) in strata)
    half = float(sps.norm.ppf(0.5 + level / 2)) * math.sqrt(v)
    return d, d - half, d + half


def group_counts(study: Study, cells: dict) -> list[dict]:
    """Per (paradigm, budget) cell of ``cells`` (the verdicts' prompt cells), the pooled counts of each group.

    Returns, in the cells' paradigm and budget order, {"paradigm", "budget", "depth", "runs": evaluations
    pooled, "per_run": {group: images per evaluation (the largest)}, "groups": {group: (full matches, images)}},
    from the finished runs' main EMA rows at the cell's depth that have per-group scores.
    """
    out = []
    for (p, b), cell in cells.items():
        rows = [r for r in study.rows if r["main"] and r["done"] and r["weights"] == "ema" and r["objective"] == p
                and r["budget"] == b and r["depth"] == cell.depth and r.get("prompt_by_group")]
        if not rows:
            continue
        groups: dict[str, tuple[int, int]] = {}
        per_run: dict[str, int] = {}
        for r in rows:
            for g, m in r["prompt_by_group"].items():
                k, n = groups.get(g, (0, 0))
                groups[g] = (k + int(m.get("num_full_match") or 0), n + int(m.get("num_images") or 0))
                per_run[g] = max(per_run.get(g, 0), int(m.get("num_images") or 0))
        out.append({"paradigm": p, "budget": b, "depth": cell.depth, "runs": len(rows), "per_run": per_run,
                    "groups": groups})
    return out


def _rate(counts: tuple[int, int] | None) -> str:
    if not counts or counts[1] == 0:
        return "–"
    k, n = counts
    lo, hi = wilson_interval(k, n)
    return f"{k / n:.2f} [{lo:.2f}, {hi:.2f}] n={n}"


def prompt_group_blocks(study: Study, verdicts: Verdicts) -> list[tuple]:
    """Report blocks (see :mod:`flopmatch.report.render`) of the per-group prompt-following table; [] when no
    evaluation scored groups (other datasets, or entries scored before groups existed)."""
    counts = group_counts(study, verdicts.cells.get("prompt") or {})
    if not counts:
        return []
    holdout = next((r["prompt_holdout"] for r in study.rows if r.get("prompt_holdout")), None) or {}
    combos, relations = list(holdout.get("combos") or []), list(holdout.get("relations") or [])
    held = bool(combos or relations)
    names = ["seen", "held_out"] if held else []
    names += [g for g in ("held_out_combo", "held_out_relation") if held and any(g in c["groups"] for c in counts)]
    names += ["one_object", "two_object"]
    crossed = all("held_out_two_object" in c["groups"] for c in counts)
    header = ["paradigm", "budget", "depth", "evaluations", *[COLUMNS[g] for g in names]]
    header += [f"held-out − seen{' (same object count)' if crossed else ''}"] if held else []
    rows = []
    for c in counts:
        row = [c["paradigm"], fmt(c["budget"], ".3g"), c["depth"], c["runs"], *[_rate(c["groups"].get(g)) for g in names]]
        if held:
            d, lo, hi = adjusted_difference(c["groups"]) if crossed else difference_interval(
                c["groups"].get("held_out", (0, 0)), c["groups"].get("seen", (0, 0)))
            row.append("–" if math.isnan(d) else f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]")
        rows.append(row)
    per_run = {g: max(c["per_run"].get(g, 0) for c in counts) for g in names}
    blocks: list[tuple] = [("h", 3, "Prompt following: seen vs held-out prompts, one vs two objects")]
    if held:
        what = "; ".join(x for x in (f"colour+shape combos {', '.join(combos)}" if combos else "",
                                     f"arrangements (any colours) {', '.join(relations)}" if relations else "") if x)
        text = (f"Held out of training: {what}. A prompt naming one of them is held-out ({per_run['held_out']} of "
                f"{per_run['seen'] + per_run['held_out']} prompts per evaluation); the model never saw it, so its score "
                "there measures compositional generalisation rather than recall.")
    else:
        text = ("This study holds nothing out of training (`data.holdout`, `data.holdout_relations` are empty): every "
                "prompt was seen, so prompt following here is recall of trained combinations.")
    gap = ("Held-out − seen is the difference at the same object count, weighted by the held-out prompts' mix of one- "
           "and two-object prompts, with a normal interval: held-out prompts are more often two-object ones, which "
           "score lower anyway." if crossed else "Held-out − seen has Newcombe's interval from the two Wilson intervals.")
    gap = gap if held else ""
    blocks.append(("p", text + " Full-match rate per group, pooled over the seeds of each (paradigm, budget) at the "
                   f"depth the verdicts compare, with {LEVEL:.0%} Wilson intervals over the pooled images.{' ' + gap if gap else ''} Descriptive: no verdict rests on this table; the decision table and the "
                   "claims use the overall full match over all prompts, seen and held-out together. The intervals "
                   "leave out retraining noise between seeds. A two-object prompt has more checks (two objects and a "
                   "relation) than a one-object prompt, so its rate is lower for that reason too."))
    blocks.append(("table", header, rows))
    noisy = [g for g in names if 0 < per_run[g] < NOISY_N]
    if noisy:
        smallest = min(per_run[g] for g in noisy)
        listed = ", ".join(f"{COLUMNS[g]} ({per_run[g]} prompt{'s' if per_run[g] > 1 else ''} per evaluation)" for g in noisy)
        blocks.append(("p", f"Small groups, noisy figures: {listed}. With n prompts one evaluation's rate has a "
                       f"binomial sd of up to 0.5 / sqrt(n) ({0.5 / math.sqrt(smallest):.2f} at n = {smallest}); pooling "
                       "seeds narrows the intervals above, but only differences well beyond them mean anything."))
    return blocks
