"""Two studies that differ in one choice: does the answer change? (``flopmatch compare BASE OTHER``)

An ablation here is a second study that differs from a first in one setting, e.g.

- ``--tokenizer weight-free``: pixel patches (diffusion) and a k-means codebook (token paradigms) instead of
  the learned KL / LFQ autoencoders, so no learned tokenizer's quality decides the comparison;
- ``--set train.schedule=constant``: no learning-rate decay, so the EMA section shows what averaging adds
  where the decay does not already average (under cosine, EMA's window sits where the LR is 10-13 % of peak);
- ``--tokenizer-match DB``, another data set, another guidance scale...

Both directories are read as the report reads one (run directories only, :func:`flopmatch.report.data.load_study`)
and each study's verdicts are decided with its own noise (:func:`flopmatch.report.verdicts.decide`). Then:

1. *What differs*: the two ``study.json`` files, field by field, and the ``--set`` overrides added or dropped.
2. *Does the recommendation change*: every (budget, need) cell of the two recommendation tables side by side:
   "same", "changed" (both decided, different paradigms), "decided in one only" (the other sees no
   difference or cannot test), "not comparable" (the two cells rank different sets of paradigms: one study lacks
   one), or "–" (not in both).
3. *How far each paradigm moves*: per (paradigm, budget) cell in both studies, the ratio other / base of KID and
   of the prompt-following error (geometric means over the cell's judged seeds), with a t-test whose variance is
   each study's own pooled seed variance, as its verdicts use it (the retraining part plus each value's own
   evaluation noise where known, :func:`flopmatch.report.verdicts.cell_var`;
   :func:`flopmatch.report.stats.two_variance_test`, Welch-Satterthwaite df). That variance holds retraining noise, so the test is honest without pairing seeds across studies (a
   seed number fixes the data order and the backbone's initialisation in both, so pairs would be positively
   correlated and the unpaired test is conservative). Where a study has one seed per cell, its evaluation noise
   stands in (normal reference, at most "suggestive"). Holm's correction runs over the cells of one metric;
   labels are the verdict engine's (:class:`flopmatch.report.verdicts.Comparison`).
4. *EMA in each study* (:func:`flopmatch.report.findings.ema_analysis`), with each study's LR schedule.
5. *Tokenizer ceilings in each study* (:mod:`flopmatch.report.ceilings`).

Writes ``compare.html``, ``compare.md``, ``compare.json`` and ``compare_figures/changes.png`` (atomically)
into the output directory. Deterministic: the same run directories give the same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from flopmatch.errors import UserError
from flopmatch.files import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from flopmatch.report.ceilings import ceilings_table, read_ceilings
from flopmatch.report.data import Study, load_study
from flopmatch.report.findings import EMA_LEVEL, ema_analysis
from flopmatch.report.plots import compare_figure
from flopmatch.report.render import fmt, render_html, render_md
from flopmatch.report.stats import holm_adjusted, two_variance_test
from flopmatch.report.verdicts import (
    ALPHA,
    MATCHED_MARK,
    NEEDS,
    NO_DIFF,
    NORMAL_DF,
    Cell,
    Comparison,
    Noise,
    Verdicts,
    cell_text,
    cell_var,
    decide,
    mdd_text,
)

STUDY_FILE = "study.json"  # written by flopmatch.study.runner (a layer above: not imported here)
METRICS = {"kid": "KID", "prompt": "prompt-following error"}  # the verdicts' quality metrics (verdicts.QUALITY)
IGNORED = ("timing_rounds", "timing_budget_s", "n_boot")  # StudyConfig.NOT_IDENTITY: timing and report only


def study_differences(base: Path, other: Path) -> list[list[str]]:
    """[setting, base value, other value] for every study.json field that differs (``--set`` overrides one by
    one: added, dropped or changed), or one row saying a study has no study.json."""
    docs = []
    for root in (base, other):
        try:
            docs.append(read_json(root / STUDY_FILE))
        except (UserError, FileNotFoundError, OSError):
            docs.append(None)
    if None in docs:
        return [["study.json", "present" if docs[0] else "missing", "present" if docs[1] else "missing"]]
    rows = []
    for key in sorted(set(docs[0]) | set(docs[1])):
        if key in IGNORED or key not in docs[0] or key not in docs[1]:
            continue  # a key only one study.json has: another flopmatch version wrote it (see _unrecorded)
        a, b = docs[0][key], docs[1][key]
        if a == b:
            continue
        if key in ("overrides", "tokenizer_overrides") and isinstance(a, list) and isinstance(b, list):
            rows += _override_rows(key, a, b)
        else:
            rows.append([key, *_shorts(a, b)])
    return rows


def unrecorded(base: Path, other: Path) -> list[str]:
    """study.json keys only one of the two studies records (written by different flopmatch versions): not compared,
    since the missing side's value is the default of the version that wrote it."""
    try:
        a, b = read_json(base / STUDY_FILE), read_json(other / STUDY_FILE)
    except (UserError, FileNotFoundError, OSError):
        return []
    return sorted((set(a) ^ set(b)) - set(IGNORED))


def _override_rows(key: str, a: list[str], b: list[str]) -> list[list[str]]:
    flag = "--set" if key == "overrides" else "--tokenizer-set"
    before = dict(x.split("=", 1) for x in a if "=" in x)
    after = dict(x.split("=", 1) for x in b if "=" in x)
    return [[f"{flag} {k}", *_shorts(before.get(k, "(not set)"), after.get(k, "(not set)"))]
            for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]


def _shorts(a, b) -> tuple[str, str]:
    """Two different values of a setting, each short (:func:`_short`) and still telling them apart: more digits where
    %.3g reads the same (3e-4 vs 3.0001e-4), and lists shown from their first difference where both cuts agree."""
    starts = [0]
    if isinstance(a, list) and isinstance(b, list):  # where both cuts agree: from the first item that differs
        starts.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
    for start in starts:
        for digits in (3, 6, 17):
            pair = _short(a, digits, start), _short(b, digits, start)
            if pair[0] != pair[1]:
                return pair
    # texts (or a list's one long item) that differ past the cut: each from a little before where they part
    sa, sb = (str(v[starts[-1]]) if isinstance(v, list) and starts[-1] < len(v) else str(v) for v in (a, b))
    first = next((i for i, (x, y) in enumerate(zip(sa, sb)) if x != y), min(len(sa), len(sb)))
    return tuple(_window(t, first) for t in (sa, sb))


def _window(text: str, at: int) -> str:
    """``text`` around position ``at`` in at most ~80 characters, "..." where it is cut."""
    lo = max(0, at - 30)
    cut = text[lo : lo + 74]
    return ("..." if lo else "") + cut + ("..." if lo + 74 < len(text) else "")


def _short(v, digits: int = 3, start: int = 0) -> str:
    """A setting's value in at most ~80 characters: numbers as %.{digits}g (2.5e+12, not 2500000000000.0), a long
    list cut between its items, never inside a number; a list from item ``start`` on, the ones before as "..."."""
    def fmt(x):
        return f"{x:.{digits}g}" if isinstance(x, float) else str(x)

    if not isinstance(v, list):
        text = fmt(v)
        return text if len(text) <= 80 else text[:77] + "..."
    if start >= len(v):
        return f"[... {len(v)} items]"
    text = "[" + ("..., " if start else "") + ", ".join(fmt(x) for x in v[start:]) + "]"
    return text if len(text) <= 80 else text[:77].rsplit(", ", 1)[0] + ", ...]"


def _side(cell: Cell, noise: Noise) -> tuple[float | None, float | None]:
    """(variance of one value, its df) for one study's side of a cell: its seed variance (where the values'
    evaluation variances are known, the retraining part plus their own, as the study's verdicts use it:
    :func:`flopmatch.report.verdicts.cell_var`), or else the mean evaluation-noise variance of the cell's values on a
    normal reference (None if neither is known)."""
    if noise.source == "seeds":
        return cell_var(cell, noise) * cell.values.size, noise.df  # cell_var is the variance of the cell's mean
    finite = cell.eval_var[np.isfinite(cell.eval_var)]
    return (float(finite.mean()), NORMAL_DF) if finite.size else (None, None)


def _change_test(base: Cell, other: Cell, nb: Noise, no: Noise) -> tuple:
    """(TestResult of log other - log base, noise label) for one cell present in both studies: each side with its
    own study's noise (seed variance where it has one, else evaluation noise: then the label is "evaluation", which
    caps the verdict at suggestive since that side's retraining noise is not measured)."""
    (vo, do), (vb, db) = _side(other, no), _side(base, nb)
    noise = "seeds" if nb.source == no.source == "seeds" else "evaluation"
    return two_variance_test(other.values, base.values, vo, do, vb, db), noise


def cell_changes(vb: Verdicts, vo: Verdicts, names: tuple[str, str]) -> dict[str, list[dict]]:
    """metric -> one dict per (paradigm, budget) in both studies: geometric means, ratio, its test (Holm over
    the metric's cells) and label; ``names`` labels the two studies (base, other) in the comparisons."""
    out = {}
    for metric in METRICS:
        common = sorted(set(vb.cells[metric]) & set(vo.cells[metric]), key=lambda k: (k[0], k[1]))
        comps = []
        for key in common:
            b, o = vb.cells[metric][key], vo.cells[metric][key]
            test, noise = _change_test(b, o, vb.noise[metric], vo.noise[metric])
            capped = "depth chosen on the judged seed" if (b.biased or o.biased) else ""
            comps.append(Comparison("compare", metric, names[1], names[0], f"{key[0]} at {key[1]:.3g} FLOPs", test, noise,
                                    capped))
        adj = holm_adjusted([c.p2 for c in comps])
        m = sum(c.p2 is not None for c in comps)
        rows = []
        for key, c, q in zip(common, comps, adj):
            c.p_adj, c.m = q, m
            b, o = vb.cells[metric][key], vo.cells[metric][key]
            rows.append({"paradigm": key[0], "budget": key[1], "base": _value(b), "other": _value(o),
                         "base_seeds": int(b.values.size), "other_seeds": int(o.values.size), "ratio": c.ratio(),
                         "p": c.p2, "p_adj": c.p_adj, "label": c.label, "direction": _direction(c, names[1]),
                         "mdd_percent": c.mdd_percent(), "noise": c.noise, "comparison": c})
        out[metric] = rows
    return out


def _value(cell: Cell) -> float:
    """The cell's value on the metric's own scale: KID, or the prompt-following error (1 - full match)."""
    return float(math.exp(cell.mean))


def _direction(c: Comparison, other: str) -> str:
    if c.label == NO_DIFF or c.better is None or c.test.method == "none":
        return ""
    return "lower" if c.better == other else "higher"


def table_changes(vb: Verdicts, vo: Verdicts) -> list[dict]:
    """Each (budget, need) cell of either recommendation table: both texts and whether the answer changed."""
    cells = {}
    for which, v in (("base", vb), ("other", vo)):
        for cell in v.table:
            cells.setdefault((cell["budget"], cell["need"]), {})[which] = cell
    out = []
    order = [n for n, _ in NEEDS]
    for (budget, need), both in sorted(cells.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1]))):
        b, o = both.get("base"), both.get("other")
        out.append({"budget": budget, "need": need, "base": cell_text(b) if b else "–",
                    "other": cell_text(o) if o else "–", "status": _status(b, o)})
    return out


def _status(b: dict | None, o: dict | None) -> str:
    if not b or not o or "not measured" in (b["label"], o["label"]):
        return "–"
    if set(b.get("ranked", [])) != set(o.get("ranked", [])):  # a missing paradigm is not a change of answer
        return (f"not comparable: paradigms differ ({', '.join(sorted(b.get('ranked', [])))} vs "
                f"{', '.join(sorted(o.get('ranked', [])))})")
    if b["choice"] and o["choice"]:
        return "same" if b["choice"] == o["choice"] else "changed"
    if b["choice"] or o["choice"]:
        return f"decided in {'base' if b['choice'] else 'other'} only"
    if b["label"] == o["label"] and sorted(b["tied"]) == sorted(o["tied"]):
        return "same (no pick in either)"
    return "no pick in either, with other ties"


def ema_rows(sb: Study, so: Study) -> tuple[list, list]:
    """The EMA analysis of both studies side by side, matched by (paradigm, averaged weights, runs compared)."""
    found: dict[tuple, dict] = {}
    for which, study in (("base", sb), ("other", so)):
        for e in ema_analysis(study):
            found.setdefault((e["paradigm"], e["weights"], e["scope"]), {})[which] = e

    def cell(e):
        if e is None:
            return "–"
        iv = "" if e["interval"] is None else f" [{100 * e['interval'][0]:+.1f}%, {100 * e['interval'][1]:+.1f}%]"
        return f"{100 * e['mean_change']:+.1f}%{iv} ({e['n']} runs)"

    header = ["paradigm", "weights", "runs compared", f"KID change, base ({EMA_LEVEL:.0%} interval)",
              f"KID change, other ({EMA_LEVEL:.0%} interval)"]  # fmt: skip
    rows = []
    for (p, w, scope), both in sorted(found.items()):
        label = "EMA kept in training" if w == "ema" else "post-hoc " + w.replace("ema@", "EMA sigma_rel ")
        rows.append([p, label, "the sweep's runs" if scope == "sweep" else "every run evaluated raw",
                     cell(both.get("base")), cell(both.get("other"))])
    return header, rows


def _schedules(study: Study) -> str:
    found = sorted({r["schedule"] for r in study.rows if r.get("schedule")})
    return ", ".join(found) or "unknown"


def _summary_lines(changes: dict[str, list[dict]], names: tuple[str, str]) -> list[str]:
    """Per metric and paradigm: the geometric-mean ratio over shared budgets and which cells are detectable."""
    lines = []
    for metric, rows in changes.items():
        for p in sorted({r["paradigm"] for r in rows}):
            mine = [r for r in rows if r["paradigm"] == p]
            gm = math.exp(float(np.mean([math.log(r["ratio"]) for r in mine])))
            clear = [r for r in mine if r["direction"]]
            what = (", ".join(f"{r['direction']} at {r['budget']:.3g} ({r['label']})" for r in clear)
                    if clear else "no cell differs detectably")
            lines.append(f"{METRICS[metric]}, {p}: {names[1]} / {names[0]} = x{gm:.3g} on average over {len(mine)} "
                         f"budget(s) (geometric mean); {what}")
    return lines


def _blocks(names, paths, diffs, table, changes, vb, vo, ema, schedules, ceilings, extra) -> list[tuple]:
    B: list[tuple] = [("h", 1, f"flopmatch comparison: {names[1]} against {names[0]}")]
    B.append(("p", f"Base study: `{paths[0]}`. Other study: `{paths[1]}`. Each study's verdicts are decided with its "
                   "own noise, as its report decides them; the ratios below are other / base."))
    B.append(("h", 2, "What differs"))
    if diffs:
        B.append(("table", ["setting", names[0], names[1]], diffs))
    else:
        B.append(("p", "The two studies' settings are the same (study.json): the comparison measures retraining "
                       "noise only, and every difference below should be 'no difference detected'."))
    if extra["unrecorded"]:
        B.append(("p", "Not compared, recorded by one study.json only (another flopmatch version wrote the other): "
                       + ", ".join(f"`{k}`" for k in extra["unrecorded"]) + "."))
    for name, problems in zip(names, extra["problems"]):
        if problems:
            B.append(("banner", f"{name}: " + "; ".join(problems)))
    B.append(("h", 2, "Does the recommendation change?"))
    changed = [t for t in table if t["status"] == "changed"]
    partial = [t for t in table if t["status"].startswith("decided in")]
    apart = [t for t in table if t["status"].startswith("not comparable")]
    B.append(("p", f"{len(changed)} of {sum(t['status'] != '–' and t not in apart for t in table)} cells measured in both "
                   f"studies over the same paradigms pick another paradigm; {len(partial)} are decided in one study only (a "
                   "pick against a tie is a change of strength, not of direction)" + (
                   f"; {len(apart)} compare different sets of paradigms (one study lacks one), so their answers are not "
                   "compared." if apart else ".")))
    B.append(("table", ["budget (FLOPs)", "need", names[0], names[1], "answer"],
              [[f"{t['budget']:.3g}", t["need"], t["base"], t["other"], t["status"]] for t in table]))
    timed = [t for t in table if t["need"] in ("latency", "throughput") and t not in apart
             and not t["status"].startswith("same") and t["status"] != "–"]
    if timed:
        B.append(("p", f"{len(timed)} latency or throughput cell(s) differ. Timings do not depend on training (seeds, "
                       "budgets): each study timed one checkpoint per paradigm and depth on its own occasion, so unless "
                       "the sampling settings or the machine differ, such a change is the machines' noise between the two "
                       "timing phases (see each study's timing banner for its spread and load)."))
    if any(MATCHED_MARK in t["base"] + t["other"] for t in table):
        B.append(("p", f"{MATCHED_MARK}: compared at the operating points (quality at each paradigm's best point, cost at "
                       "its cheapest point at matched quality), as that study's report says; the verdict holds for the "
                       "operating points its sweep chose."))
    B.append(("h", 2, "How far each paradigm moves"))
    B.append(("ul", _summary_lines(changes, names)))
    for metric, rows in changes.items():
        B.append(("h", 3, METRICS[metric]))
        B.append(("p", f"Noise: {names[0]}: {vb.noise[metric].describe()}; {names[1]}: {vo.noise[metric].describe()}. "
                       f"Two-sided tests, Holm-corrected over the {len(rows)} cells at family-wise {ALPHA:g}."))
        B.append(("table", ["paradigm", "budget (FLOPs)", f"{names[0]} (seeds)", f"{names[1]} (seeds)",
                            "ratio other / base", "p", "Holm p", "verdict", "detectable difference"],
                  [[r["paradigm"], f"{r['budget']:.3g}", f"{fmt(r['base'], '.3g')} ({r['base_seeds']})",
                    f"{fmt(r['other'], '.3g')} ({r['other_seeds']})", f"x{r['ratio']:.3g}", fmt(r["p"], ".2g"),
                    fmt(r["p_adj"], ".2g"), (r["direction"] + " " if r["direction"] else "") + f"({r['label']})",
                    mdd_text(r["mdd_percent"])] for r in rows]))
    B.append(("fig", "changes", "KID and prompt-following error per paradigm against training FLOPs: base solid, "
                                "other dashed (geometric means over each cell's judged seeds)."))
    B.append(("h", 2, "EMA in each study"))
    B.append(("p", f"LR schedules: {names[0]}: {schedules[0]}; {names[1]}: {schedules[1]}. Averaged weights against "
                   "the same runs' raw weights (negative: averaging helps). Under a cosine decay the EMA window sits where "
                   "the LR is already small; with a constant LR it does not, so the two columns separate what EMA adds "
                   "from what the decay does."))
    if ema[1]:
        B.append(("table", *ema))
    else:
        B.append(("p", "Neither study evaluated raw weights (--eval-raw or --eval-ema): EMA not measured."))
    B.append(("h", 2, "Tokenizer ceilings in each study"))
    for name, doc in zip(names, ceilings):
        B.append(("h", 3, name))
        if doc:
            B.append(("table", *ceilings_table(doc)))
        else:
            B.append(("p", "No tokenizer ceilings measured (no tokenizer_ceilings.json)."))
    return B


def compare_studies(base: str | Path, other: str | Path, out: str | Path | None = None) -> dict:
    """Compare study ``other`` against study ``base`` and write the comparison into ``out``
    (default ``<other>/compare_vs_<base name>``).

    Returns {"paths", "differences", "table" (the recommendation cells, both texts and a status),
    "changes" (metric -> per-cell ratios and verdicts)}. Raises UserError when the two share no
    (paradigm, budget) cell.
    """
    base, other = Path(base), Path(other)
    if base.resolve() == other.resolve():
        raise UserError(f"{base} is compared with itself; pass two study directories")
    sb, so = load_study(base), load_study(other)
    vb, vo = decide(sb), decide(so)
    names = (base.resolve().name, other.resolve().name)
    if names[0] == names[1]:
        names = ("base", "other")
    changes = cell_changes(vb, vo, names)
    if not any(changes.values()):
        raise UserError(f"{base} and {other} share no (paradigm, budget) cell with a finished, evaluated run; compare "
                        "studies of the same grid (same objectives and budgets)")
    diffs = study_differences(base, other)
    table = table_changes(vb, vo)
    ema = ema_rows(sb, so)
    out = Path(out) if out else other / f"compare_vs_{names[0]}"
    plain = {m: [{k: v for k, v in r.items() if k != "comparison"} for r in rows] for m, rows in changes.items()}
    fig = compare_figure(plain, METRICS, names)
    blocks = _blocks(names, (str(base), str(other)), diffs, table, changes, vb, vo, ema,
                     (_schedules(sb), _schedules(so)), (read_ceilings(base), read_ceilings(other)),
                     {"unrecorded": unrecorded(base, other), "problems": (sb.problems, so.problems)})
    paths = {"html": out / "compare.html", "md": out / "compare.md", "json": out / "compare.json",
             "figure": out / "compare_figures" / "changes.png"}
    if fig:
        atomic_write_bytes(paths["figure"], fig)
    atomic_write_json(paths["json"], {"base": str(base), "other": str(other), "differences": diffs, "table": table,
                                      "changes": plain})
    atomic_write_text(paths["md"], render_md(blocks, {"changes": "compare_figures/changes.png"} if fig else {}, {}))
    atomic_write_text(paths["html"], render_html(blocks, {"changes": fig}))
    return {"paths": paths, "differences": diffs, "table": table, "changes": plain,
            "problems": {names[0]: sb.problems, names[1]: so.problems}}
