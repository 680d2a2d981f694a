"""Operating points at the largest budget: each paradigm's sweep, the points evaluated in full, its best
point for each need, and its cost at matched quality.

The study sweeps guidance x steps x sampler variants on a small set of images and evaluates the chosen
points on the full set (:mod:`flopmatch.evaluation.operating`, :mod:`flopmatch.study.operating`). Here:

- *best point for a need*: among a paradigm's full-set points, the lowest KID (image quality) and the
  highest full-match rate (prompt following); KID, not FID, because points are compared at one sample
  count where KID is unbiased and FID's bias depends on the model;
- *matched quality*: the level is the largest of the paradigms' best KIDs (at least ``KID_FLOOR``), the
  quality every paradigm reaches (:func:`flopmatch.evaluation.operating.matched_level`); each paradigm's
  cheapest full-set point at or below it is its operating point for latency (median over timing
  rounds), throughput and sampling FLOPs. The verdicts compare latency and throughput there
  (:mod:`flopmatch.report.verdicts`), so a paradigm is not judged at a default step count that over- or
  under-shoots the others' quality.

*Chosen on the sweep's images, reported on the full set's.* The best points, the level and which points
reach it are decided on each point's KID and prompt score from the sweep's small set (its own sampling
seed), and the table reports the full set's numbers: the minimum of several noisy values is biased low,
and deciding on independent images keeps that bias out of the reported numbers. A point the sweep did
not evaluate (e.g. the main setting when its guidance is not swept) is decided on its full-set numbers.
Which point is cheapest in latency or throughput is read off the same timing rounds the verdicts then
compare: within a paradigm that picks the lowest of a few medians, a small optimistic bias every
paradigm gets alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flopmatch import PARADIGMS
from flopmatch.evaluation.operating import SWEEP_SEED, matched_level
from flopmatch.report.analysis import KID_FLOOR
from flopmatch.report.data import Study

QUALITY_COL = "kid_effnet"  # the operating points' quality metric (lower better): KID, unbiased at any n
NEED_COST = ("latency", "throughput", "flops")  # what a matched-quality point is chosen for


@dataclass
class Points:
    """One (paradigm, depth) at the budget: its selection run's sweep rows and full-set rows."""

    paradigm: str
    depth: int
    run: str
    sweep: list[dict]  # rows on the sweep's small image set
    full: list[dict]  # rows on the full set (the main setting and the chosen points)
    best_quality: dict | None = None  # full row with the lowest KID (decided on the sweep's images where it has them)
    best_prompt: dict | None = None  # full row with the highest full-match rate (likewise)
    matched: dict[str, dict] = field(default_factory=dict)  # need (latency, throughput, flops) -> full row at matched quality

    def swept(self, row: dict, col: str) -> bool:
        """Whether the sweep scored ``row``'s setting on ``col`` on its own images (so the row was chosen on those,
        not on its own full-set value)."""
        return any(_setting(r) == _setting(row) and r.get(col) is not None for r in self.sweep)


@dataclass
class Operating:
    """The operating points of a study at its largest common budget (empty when nothing was swept)."""

    budget: float | None
    points: dict[tuple[str, int], Points]
    levels: dict[int, float]  # depth -> matched KID level; empty without a sweep or with < 2 paradigms

    @property
    def swept(self) -> bool:
        return any(p.sweep for p in self.points.values())


def _is_sweep(row: dict) -> bool:
    """A row on an operating-point sweep's small set: its own sampling seed, not the main setting's image set."""
    return not row.get("full_set", True) and row.get("eval_seed") == SWEEP_SEED


def _decider(p: Points, col: str):
    """``row -> value`` a full-set row is chosen on: its sweep counterpart's ``col`` (the same setting on the
    sweep's images), or its own where the sweep has no such setting."""
    small = {_setting(r): r.get(col) for r in p.sweep}
    return lambda row: small[_setting(row)] if small.get(_setting(row)) is not None else row.get(col)


def latency_of(row: dict) -> float | None:
    """Median batch-1 latency (s) over timing rounds, or the row's single figure."""
    v = row.get("latency_s_all") or ([row["latency_s"]] if row.get("latency_s") is not None else [])
    return float(np.median(v)) if v else None


def throughput_of(row: dict) -> float | None:
    """Median best-batch throughput (images/s) over timing rounds, or the row's single figure."""
    v = row.get("throughput_all") or ([row["throughput_images_per_s"]] if row.get("throughput_images_per_s") is not None else [])
    return float(np.median(v)) if v else None


def _cost(row: dict, need: str) -> float | None:
    """A row's cost for a need, lower better (throughput negated)."""
    if need == "latency":
        return latency_of(row)
    if need == "throughput":
        t = throughput_of(row)
        return None if t is None else -t
    return row.get("sample_flops_per_image")


def operating(study: Study) -> Operating:
    """Operating points of every (paradigm, depth) at the largest budget every paradigm reached (EMA weights)."""
    rows = [r for r in study.rows if r["done"] and r.get("setting") and r["weights"] == "ema"]
    per: dict[str, set] = {}
    for r in rows:
        per.setdefault(r["objective"], set()).add(r["budget"])
    common = set.intersection(*per.values()) if per else set()
    if not common:
        return Operating(None, {}, {})
    budget = max(common)
    rows = [r for r in rows if r["budget"] == budget]
    points: dict[tuple[str, int], Points] = {}
    for key in sorted({(r["objective"], r["depth"]) for r in rows}):
        mine = [r for r in rows if (r["objective"], r["depth"]) == key]
        swept = sorted({r["run"] for r in mine if _is_sweep(r)})
        # the selection run (the one that swept), else the lowest seed: one run, so its points share images and weights
        run = swept[0] if swept else min(mine, key=lambda r: (r["seed"], r["run"]))["run"]
        mine = [r for r in mine if r["run"] == run]
        p = Points(key[0], key[1], run, [r for r in mine if _is_sweep(r)], [r for r in mine if r.get("full_set", True)])
        kid, prompt = _decider(p, QUALITY_COL), _decider(p, "prompt_full_match")
        scored = [r for r in p.full if kid(r) is not None]
        p.best_quality = min(scored, key=lambda r: (kid(r), r["setting"]), default=None)
        prompted = [r for r in p.full if prompt(r) is not None]
        p.best_prompt = min(prompted, key=lambda r: (-prompt(r), kid(r) if kid(r) is not None else np.inf, r["setting"]),
                            default=None)
        points[key] = p
    levels = {}
    if any(p.sweep for p in points.values()):
        for depth in sorted({d for _, d in points}):  # paradigms are compared at one depth: one level per depth
            at = {p: v for (p, d), v in points.items() if d == depth}
            lv = matched_level({p: _decider(v, QUALITY_COL)(v.best_quality) if v.best_quality else None
                                for p, v in at.items()})
            if lv is None:
                continue
            levels[depth] = lv = max(lv, KID_FLOOR)  # below the floor KIDs are noise: every such point reaches it
            for p in at.values():
                kid = _decider(p, QUALITY_COL)
                ok = [r for r in p.full if kid(r) is not None and kid(r) <= lv]
                for need in NEED_COST:
                    costed = [(c, r.get(QUALITY_COL), r["setting"], r) for r in ok if (c := _cost(r, need)) is not None]
                    if costed:
                        p.matched[need] = min(costed, key=lambda t: t[:3])[3]
    return Operating(budget, points, levels)


def matched_timing(op: Operating) -> dict[tuple[str, int], dict]:
    """Per (paradigm, depth), the timing rounds and FLOPs of its matched-quality points, shaped like
    :func:`flopmatch.report.analysis.inference_summary`'s entries, plus ``basis`` and the chosen ``settings``."""
    out = {}
    for key, p in op.points.items():
        if key[1] not in op.levels:
            continue
        lat, thr, fl = p.matched.get("latency"), p.matched.get("throughput"), p.matched.get("flops")
        if not (lat or thr or fl):
            continue
        out[key] = {
            "latency": [x for x in (lat or {}).get("latency_s_all") or [] if x > 0],
            "throughput": [x for x in (thr or {}).get("throughput_all") or [] if x > 0],
            "flops": [fl["sample_flops_per_image"]] if fl else [],
            "decode_flops": [fl["decode_flops_per_image"]] if fl and fl.get("decode_flops_per_image") is not None else [],
            "phase": all(r.get("timing_source") == "study" for r in (lat, thr) if r),
            "nokv_latency": [], "nokv_throughput": [], "nokv_flops": [],
            "basis": f"at matched quality (KID <= {op.levels[key[1]]:.3g})",
            "settings": {need: r["setting"] for need, r in p.matched.items()},
        }
    return out


def paradigm_order(op: Operating) -> list[tuple[str, int]]:
    """The (paradigm, depth) keys in the usual paradigm order."""
    rank = {p: i for i, p in enumerate(PARADIGMS)}
    return sorted(op.points, key=lambda k: (rank.get(k[0], len(rank)), k[0], k[1]))


def _fmt(x, spec: str = ".3g") -> str:
    return "–" if x is None else format(x, spec)


def _setting(row: dict) -> str:
    return row["setting"].split(",weights=")[0]


def operating_rows(op: Operating) -> tuple[list[str], list[list]]:
    """The operating-points table: every full-set point of each paradigm, with what it is used for."""
    header = ["paradigm", "depth", "setting", "used as", "KID (effnet)", "KID on the sweep's images ± sd (chosen on)",
              "FID (effnet), n", "prompt full match", "FLOPs/img", "latency (ms)", "img/s"]  # fmt: skip
    rows = []
    for key in paradigm_order(op):
        p = op.points[key]
        for r in sorted(p.full, key=lambda r: (r["sample_flops_per_image"] or 0, r["setting"])):
            roles = ["main setting"] if r["main"] else []
            roles += [what for what, x in (("best image quality", p.best_quality), ("best prompt following", p.best_prompt))
                      if x is r]
            cheapest = [need for need in NEED_COST if p.matched.get(need) is r]
            if cheapest:
                roles.append(f"cheapest at matched quality ({', '.join(cheapest)})")
            lat = latency_of(r)
            small = next((x for x in p.sweep if _setting(x) == _setting(r)), None)
            swept = "–" if small is None or small.get(QUALITY_COL) is None else _fmt(small.get(QUALITY_COL), ".4g") + (
                f" ± {small['kid_se_effnet']:.2g}" if small.get("kid_se_effnet") is not None else "")
            rows.append([key[0], key[1], _setting(r), "; ".join(roles) or "chosen by the sweep", _fmt(r.get(QUALITY_COL), ".4g"),
                         swept,
                         f"{_fmt(r['fid_effnet'], '.4g')}, {r['num_samples']}", _fmt(r.get("prompt_full_match"), ".3f"),
                         _fmt(r["sample_flops_per_image"]), _fmt(None if lat is None else 1e3 * lat), _fmt(throughput_of(r))])
    return header, rows


def operating_text(op: Operating) -> str:
    """How the operating points were found, in one paragraph (or why there are none)."""
    if not op.swept:
        where = f" at {op.budget:.3g} FLOPs, the largest budget every paradigm finished" if op.budget else ""
        return (f"No operating-point sweep{where} (a study sweeps there with --sweep-guidance; the presets do): every "
                "paradigm is judged at its main sampling setting.")
    sweep = [r for p in op.points.values() for r in p.sweep]
    full = [r for p in op.points.values() for r in p.full]
    guid = sorted({r["cfg"] for r in sweep if r["cfg"] is not None})
    n_sweep = sorted({r["num_samples"] for r in sweep if r["num_samples"]})
    n_full = sorted({r["num_samples"] for r in full if r["num_samples"]})
    text = (f"At {op.budget:.3g} training FLOPs each paradigm's lowest-seed run swept guidance "
            f"{', '.join(f'{g:g}' for g in guid)} x its step counts and sampler variants on {'/'.join(map(str, n_sweep))} "
            f"images with their own sampling seed, chose its front of KID against sampling FLOPs and its best prompt-"
            f"following setting, and evaluated those on the full {'/'.join(map(str, n_full))} images, where every number "
            "below is measured. Which point is best for a need, the matched level and which points reach it are decided "
            "on the sweep's images and reported on the full set's, so the choice does not flatter the numbers shown. "
            "Quality here is KID, unbiased at any sample count; FID's bias at small n depends on the model.")
    sds = [r["kid_se_effnet"] for r in sweep if r.get("kid_se_effnet") is not None]
    if sds:
        text += (f" The sweep's KIDs have a bootstrap sd of about {float(np.median(sds)):.2g} (median over its settings): "
                 "settings closer than about twice that are not separated by the sweep, and which of them is chosen is "
                 "chance; a larger --sweep-samples resolves finer.")
    if op.levels:
        lv = "; ".join(f"KID <= {v:.3g}" + (f" at depth {d}" if len(op.levels) > 1 else "") for d, v in op.levels.items())
        text += (f" Matched quality: {lv} on the sweep's images, the worst paradigm's best KID there, which every "
                 "paradigm reaches. The latency, throughput and sampling-FLOPs verdicts compare each paradigm's cheapest "
                 "point at that level, not its default step count.")
    return text
