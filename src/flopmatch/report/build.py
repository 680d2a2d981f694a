"""``flopmatch report STUDY``: run directories -> report.html, report.md and results.csv.

A pure function of the study directory's files (run directories, ``inference_timing.json``,
``study.json``, ``tokenizer_ceilings.json``): rows are read by :mod:`flopmatch.report.data`, fitted by :mod:`flopmatch.report.analysis`
(seeded bootstrap), decided by :mod:`flopmatch.report.verdicts`, drawn by
:mod:`flopmatch.report.plots` (reproducible PNG bytes) and written here, atomically. No dates,
host names or timings of the report itself go into the files, so the same study gives the same bytes.

``report.html`` is one self-contained file (figures and sample strips embedded as base64 PNG);
``report.md`` carries the same text and tables and links the figures written to
``report_figures/``; ``results.csv`` has one row per (run, eval setting).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from flopmatch import PARADIGMS
from flopmatch.errors import UserError
from flopmatch.evaluation.timing import BUSY_CORES
from flopmatch.files import atomic_write_bytes, atomic_write_text, read_json
from flopmatch.report.analysis import EXTRAPOLATE, KID_FLOOR, LEVEL, METRIC, MIN_FIT_BUDGETS, MIN_FIT_DECADES, Analysis
from flopmatch.report.ceilings import (
    add_column,
    by_paradigm,
    ceiling_banner,
    ceilings_table,
    fit_cell,
    read_ceilings,
    rkid,
    runs_cell,
)
from flopmatch.report.convention import convention_check
from flopmatch.report.data import COLUMNS, Study, first_images, load_study
from flopmatch.report.findings import EMA_LEVEL, analyse
from flopmatch.report.operating import operating_rows, operating_text
from flopmatch.report.plots import all_figures
from flopmatch.report.prompt_groups import prompt_group_blocks
from flopmatch.report.render import fmt, render_html, render_md
from flopmatch.report.verdicts import (
    ALPHA,
    CONFIDENT,
    FRONTIER_SIZES,
    MATCHED_MARK,
    NEEDS,
    NO_DIFF,
    SUGGESTIVE,
    against_claim,
    cell_text,
    mean_sd,
    own_trend,
)
from flopmatch.rundir import read_config
from flopmatch.sample import grid_image

N_SAMPLES = 8  # images per paradigm x budget cell of the sample table
SAMPLE_SCALE = 2


def _csv_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)


def results_csv(rows: list[dict]) -> str:
    """results.csv text: a header of COLUMNS and one line per row (empty cells for missing values)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([_csv_value(r.get(c)) for c in COLUMNS])
    return buf.getvalue()


# ------------------------------------------------------------------------ samples


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def sample_table(study: Study, an: Analysis) -> dict | None:
    """Rows = budgets, columns = paradigms, cells = PNG strips of the first N images of one run's main setting.

    Per (paradigm, budget) the run is the KID frontier depth at that budget (else the largest depth
    with saved samples), lowest seed. All runs are sampled on the same prompt list (the first eval
    captions), so the prompts are given once; a mismatch is reported.
    """
    mains = [r for r in study.rows if r["main"] and r["samples_dir"]]
    if not mains:
        return None
    budgets = sorted({r["budget"] for r in mains})
    cells, prompts, mismatch = {}, None, []
    for p in an.paradigms:
        fit = an.fits.get(("kid", p))
        best = {fp.budget: fp.depth for fp in fit.frontier} if fit else {}
        for b in budgets:
            cand = [r for r in mains if r["objective"] == p and r["budget"] == b]
            cand.sort(key=lambda r: (r["depth"] != best.get(b), -r["depth"], r["seed"], r["run"]))
            for r in cand:
                images, ps = first_images(study.root, r, N_SAMPLES)
                if images is None:
                    continue
                if prompts is None:
                    prompts = ps
                elif ps and ps != prompts[: len(ps)]:
                    mismatch.append(r["run"])
                strip = grid_image(images, nrow=len(images), pad=2, scale=SAMPLE_SCALE)
                cells[(p, b)] = {"png": _png_bytes(strip), "run": r["run"], "depth": r["depth"], "fid": r["fid_effnet"],
                                 "full_match": r["prompt_full_match"]}  # fmt: skip
                break
    if not cells:
        return None
    return {"budgets": budgets, "paradigms": an.paradigms, "cells": cells, "prompts": prompts or [], "mismatch": mismatch}


# ------------------------------------------------------------------------ content (blocks: see report_render)


def _runs_table(study: Study) -> tuple[list, list]:
    header = ["run", "paradigm", "depth", "params", "budget", "LR schedule", "FLOPs spent", "steps", "status", "final loss",
              "main setting", "KID (effnet) ± bootstrap sd", "FID (effnet) ± evaluation-noise sd, n", "prompt full match",
              "FLOPs/img", "latency (ms)", "img/s"]  # fmt: skip
    rows = []
    for info in study.runs:
        main = next((r for r in study.rows if r["run"] == info.name and (r["main"] or r["setting"] is None)), None)
        main = main or next(r for r in study.rows if r["run"] == info.name)
        status = "done" if info.done else ("not started" if info.state is None else "NOT FINISHED")
        status += "" if info.evaluated else ", not evaluated"
        lat = None if main["latency_s"] is None else 1e3 * main["latency_s"]
        schedule = main["schedule"] + ("" if main["origin"] in (None, "scratch") else f" ({main['origin']})")
        rows.append([info.name, info.objective, info.depth, main["params"], fmt(info.budget, ".3g"), schedule,
                     fmt(main["train_flops"] and float(main["train_flops"]), ".4g"), fmt(main["steps"]), status,
                     fmt(main["final_loss"]), main["setting"] or "–", _with_se(main.get("kid_effnet"), main.get("kid_se_effnet")),
                     _with_se(main["fid_effnet"], main["fid_se_effnet"]) + _fid_counts(main),
                     fmt(main["prompt_full_match"], ".3f"), fmt(main["sample_flops_per_image"] and float(main["sample_flops_per_image"]), ".3g"),
                     fmt(lat, ".3g"), fmt(main["throughput_images_per_s"], ".3g")])  # fmt: skip
    return header, rows


def _fid_counts(row: dict) -> str:
    """", 250" (generated images, equal to the real ones), or ", 250 vs 1000 real" when FID's counts differ."""
    n, real = row.get("num_samples"), row.get("fid_num_real")
    if not n:
        return ""
    return f", {n}" if real in (None, n) else f", {n} vs {real} real"


def _with_se(v, se) -> str:
    """``v ± se`` (se: the evaluation bootstrap's sd), or just ``v`` when no bootstrap was recorded."""
    return fmt(v) if se is None or v is None else f"{fmt(v)} ± {se:.2g}"


def _iv(iv) -> str:
    lo, hi = iv
    return "–" if not (math.isfinite(lo) and math.isfinite(hi)) else f"[{lo:.3g}, {hi:.3g}]"


def _fits_table(an: Analysis) -> tuple[list, list]:
    header = ["metric", "paradigm", "budgets", "frontier (budget: depth)", "E", "A", "alpha", f"alpha {LEVEL:.0%} CI",
              "fit", "bootstrap", "note"]  # fmt: skip
    rows = []
    for (m, p), f in an.fits.items():
        front = ", ".join(f"{fp.budget:.3g}: d{fp.depth}" for fp in f.frontier)
        if f.boot is None:
            rows.append([METRIC[m].label, p, len(f.frontier), front, "–", "–", "–", "–", "–", "–", f.note])
            continue
        pt, b = f.boot.point, f.boot
        boot = f"{b.method}, {len(b.fits)}/{b.n_boot} refits" + (f", {b.fallback_fraction:.0%} fell back" if b.fits else "")
        lo, hi = b.interval("alpha")
        note = [f.note] if f.note else []
        if math.isfinite(lo) and lo <= 0:  # the data do not show the metric falling with compute
            note.append("the alpha interval includes 0: no decline with compute is established")
        rows.append([METRIC[m].label, p, len(f.frontier), front, fmt(pt.E, ".4g"), fmt(pt.A, ".4g"), fmt(pt.alpha, ".3f"),
                     _iv((lo, hi)), _fit_kind(pt), boot, "; ".join(note) or "–"])  # fmt: skip
    return header, rows


def _fit_kind(pt) -> str:
    """The fit column: the law's kind, saying when a saturating law's floor E sits at its bound 0 (a power law then)."""
    if pt.kind == "saturating" and math.isfinite(pt.E) and math.isfinite(pt.A) and pt.E <= 1e-6 * abs(pt.A):
        return "saturating, E at its bound 0 (a power law)"
    return pt.kind


def _tests_table(an: Analysis) -> tuple[list, list]:
    header = ["family", "metric", "a vs b", "where", "a / b", "p (two-sided)", "Holm-adjusted p", "label",
              "detectable difference", "noise"]  # fmt: skip
    rows = []
    for fam, comps in an.verdicts.families.items():
        for c in comps:
            rows.append([fam, c.metric, f"{c.a} vs {c.b}", c.where, fmt(c.value_ratio(), ".3g") if c.test.method != "none" else "–",
                         fmt(c.p2, ".2g"), fmt(c.p_adj, ".2g"), c.label if c.test.method != "none" else "not testable",
                         c.mdd_text(), c.noise + (f"; {c.capped}" if c.capped else "")])  # fmt: skip
    return header, rows


def _ema_table(an: Analysis) -> tuple[list, list]:
    header = ["paradigm", "weights", "runs", "KID change (averaged / raw - 1)", f"{EMA_LEVEL:.0%} interval",
              "per seed", "prompt full match change", "FID change (for the record)", "profile residual",
              "vs diffusion (p, Welch)"]  # fmt: skip
    rows = []
    for e in an.ema:
        label = ("EMA kept in training" + (f" (~sigma_rel {e['equivalent_sigma_rel']:.2g})" if e["equivalent_sigma_rel"] else "")
                 if e["sigma_rel"] is None else f"post-hoc EMA, sigma_rel {e['sigma_rel']:g}")
        if e["scope"] == "all" and any(x["paradigm"] == e["paradigm"] and x["scope"] == "sweep" for x in an.ema):
            label += ", every run evaluated raw"
        rows.append([e["paradigm"], label + (" (lowest)" if e["best"] else ""), e["n"], f"{100 * e['mean_change']:+.1f}%",
                     "–" if e["interval"] is None else f"[{100 * e['interval'][0]:+.1f}%, {100 * e['interval'][1]:+.1f}%]",
                     _per_seed(e["per_run"]),
                     "–" if e["prompt_change"] is None else f"{100 * e['prompt_change']:+.1f} pts",
                     "–" if e["fid_change"] is None else f"{100 * e['fid_change']:+.1f}%",
                     "exact" if e["residual"] is not None and e["residual"] < 1e-9 else fmt(e["residual"], ".2g"),
                     fmt(e["vs_diffusion_p"], ".2g")])  # fmt: skip
    return header, rows


def _per_seed(per_run: list[tuple]) -> str:
    """Paired changes run by run, "s0 -3%, s1 +1%", with the depth when the runs have several ("d2 s0 -3%")."""
    depths = {d for _, d, _, _ in per_run}
    if len(per_run) > 6:  # many runs (every budget evaluated raw): the range, not a list
        changes = [100 * c for *_, c in per_run]
        return f"{len(per_run)} runs, {min(changes):+.0f}% to {max(changes):+.0f}%"
    return ", ".join(f"{f'd{d} ' if len(depths) > 1 else ''}s{seed} {round(100 * c):+d}%"  # int: no "-0%"
                     for _, d, seed, c in sorted(per_run, key=lambda x: (x[1], x[2])))


def _ema_summary(an: Analysis) -> list[str]:
    """One line per paradigm: which averaged weights change KID detectably (interval excluding 0), or none."""
    lines = []
    for p in sorted({e["paradigm"] for e in an.ema}):
        # the averages compared on the same runs (the sweep's); a study without a sweep has only "all"
        mine = [e for e in an.ema if e["paradigm"] == p and e["scope"] == "sweep"] or [e for e in an.ema if e["paradigm"] == p]
        if all(e["interval"] is None for e in mine):
            lines.append(f"{p}: one run per average, so no interval: the changes above are single differences")
            continue
        clear = [e for e in mine if e["interval"] and (e["interval"][0] > 0 or e["interval"][1] < 0)]
        if not clear:
            lines.append(f"{p}: no average differs detectably from the raw weights (every {EMA_LEVEL:.0%} interval "
                         f"contains 0; changes {min(100 * e['mean_change'] for e in mine):+.1f}% to "
                         f"{max(100 * e['mean_change'] for e in mine):+.1f}%)")
        for e in clear:
            what = "EMA kept in training" if e["sigma_rel"] is None else f"post-hoc EMA sigma_rel {e['sigma_rel']:g}"
            lines.append(f"{p}: {what} {'lowers' if e['mean_change'] < 0 else 'raises'} KID by "
                         f"{abs(100 * e['mean_change']):.1f}% ({EMA_LEVEL:.0%} interval {100 * e['interval'][0]:+.1f}% "
                         f"to {100 * e['interval'][1]:+.1f}%, {e['n']} runs; intervals not corrected for the "
                         f"{len(mine)} averages compared)")
    return lines


def _crossover_table(an: Analysis) -> tuple[list, list]:
    header = ["metric", "a vs b", "searched up to", "crossover (FLOPs)", f"{LEVEL:.0%} interval (given crossing)",
              "bootstrap pairs crossing", "lower at low C", "lower at high C"]  # fmt: skip
    rows = []
    for c in an.crossovers:
        def lower(side):  # "a" / "b" / "tie" as the paradigm's name
            return {"a": c["a"], "b": c["b"]}.get(side, side)

        # an interval "given crossing" says little where most bootstrap pairs do not cross at all
        rare = not c["n_pairs"] or c["fraction_crossing"] < 0.5
        rows.append([METRIC[c["metric"]].label, f"{c['a']} vs {c['b']}", f"{c['C_range'][1]:.3g}", fmt(c["point"], ".3g"),
                     "–" if c["interval"] is None else "– (most pairs do not cross)" if rare else _iv(c["interval"]),
                     "–" if not c["n_pairs"] else f"{c['fraction_crossing']:.0%} of {c['n_pairs']}",
                     lower(c["lower_at_low_C"]), lower(c["lower_at_high_C"])])  # fmt: skip
    return header, rows


def _inference_table(an: Analysis) -> tuple[list, list]:
    def med(v, scale=1.0):
        return fmt(float(np.median(v)) * scale, ".3g") if v else "–"

    header = ["paradigm", "depth", "runs", "FLOPs/img", "latency (ms)", "img/s", "no-KV FLOPs/img", "no-KV latency (ms)", "no-KV img/s"]
    rows = [[p, d, len(v["flops"]), med(v["flops"]), med(v["latency"], 1e3), med(v["throughput"]), med(v["nokv_flops"]),
             med(v["nokv_latency"], 1e3), med(v["nokv_throughput"])] for (p, d), v in sorted(
                 an.inference.items(), key=lambda kv: (an.paradigms.index(kv[0][0]) if kv[0][0] in an.paradigms else 99, kv[0][1]))]
    return header, rows


FIG_CAPTIONS = {
    "kid_vs_flops": "KID (effnet proxy; the verdicts' image-quality metric, unbiased at any sample count) against training "
                    "FLOPs: faint dots are every run, big dots the best depth per budget (error bars: seed std; with one "
                    "seed, the evaluation-noise sd), lines the saturating power-law fit (dashed: extrapolation), band its "
                    "90% bootstrap interval.",
    "fid_vs_flops": "FID (effnet proxy) against training FLOPs, as above, for the record: FID at a few hundred images is "
                    "biased upward by an amount that depends on the model, so no verdict rests on it.",
    "fid_inception_vs_flops": "FID (Inception) against training FLOPs, as above (measured on fewer runs if only some were evaluated with it).",
    "prompt_vs_flops": "Prompt-following error (1 - full match) against training FLOPs, as above.",
    "loss_vs_flops": "Final training loss against FLOPs, one panel per paradigm: losses of different objectives are not comparable.",
    "iso_flop_kid": "Iso-FLOP curves: KID against parameters at each fixed training budget.",
    "iso_flop_prompt": "Iso-FLOP curves: prompt-following error against parameters at each fixed training budget.",
    "iso_flop_loss": "Iso-FLOP curves: final training loss against parameters (per paradigm).",
    "pareto_flops": "Quality (KID, prompt error) against sampling FLOPs per image over every setting evaluated on the full image set; lines are each paradigm's Pareto front.",
    "pareto_latency": "Quality (KID, prompt error) against latency (one image, batch 1) over every full-set setting; lines are Pareto fronts.",
    "throughput": "Throughput at the main settings: median over the timing phase's interleaved rounds of one "
                  "checkpoint per paradigm and depth (timing does not depend on training); bars span min-max.",
    "step_sweep": "Latency, throughput and KID against the sampling steps evaluated on the full image set, at the largest "
                  "budget every paradigm reached (panel titles) and each run's main guidance: medians over that budget's "
                  "runs, one line per paradigm and depth, not a fit. Next-token sampling takes one step per token, so "
                  "it is one point.",
    "operating_fronts": "KID against sampling FLOPs, latency, throughput and prompt-following error: faint dots are the "
                        "sweep (small image set, not timed), solid dots the points evaluated on the full set, lines each "
                        "paradigm's front; dashed: the matched-quality level (decided on the sweep's KIDs, so a full-set point "
                        "can sit slightly above it).",
    "guidance_sweep": "The sweep: KID and prompt full match against the guidance scale, one line per step/solver setting.",
    "loss_curves": "Training loss curves, one panel per paradigm (never across paradigms).",
    "ema_sweep": "KID change from each run's raw weights against the post-hoc EMA length sigma_rel (thin: each run; "
                 "thick: mean over runs); crosses: the EMA kept in training, at its own relative length.",
}  # fmt: skip


def _scorer_banner(study: Study) -> list[str]:
    """Which prompt-following scorer the runs used and how well it was validated (one line per scorer)."""
    seen, out = set(), []
    for r in study.rows:
        ev = r.get("prompt_evaluator") or {}
        if not ev or ev.get("sha256") in seen:
            continue
        seen.add(ev.get("sha256"))
        if ev.get("name") == "domain-clip":
            ret, chance = ev.get("retrieval") or {}, r.get("prompt_chance")
            r_text = f" among R = {round(1 / chance)} captions (chance {100 * chance:.1f}%)" if chance else ""
            out.append(f"Prompt following is scored without labels, by a domain CLIP trained on this dataset's training "
                       f"split: R-precision{r_text} is the prompt-following score. Its validation, image-to-text "
                       f"retrieval on {ret.get('num_pairs')} held-out real pairs: top-1 {100 * ret.get('top1', 0):.0f}% "
                       f"(chance {100 * ret.get('chance_top1', 0):.1f}%). A weak scorer makes differences between "
                       f"paradigms harder to detect.")
        elif ev.get("name") == "shapes-attribute-classifier":
            held = (ev.get("heldout") or {}).get("prompt_following") or {}
            full = held.get("full_match")
            out.append("Prompt following is scored by an attribute classifier that checks every colour, shape, size, "
                       "position and relation a prompt names: a proxy, whose errors on generated images are not measured"
                       + (f"; on real held-out images it gives {100 * full:.1f}% full match, the ceiling of this score."
                          if full else "."))
        elif ev.get("name") == "fashion-mnist-class-classifier":
            acc = ev.get("test_accuracy")
            out.append("Prompt following is scored by a classifier trained on the Fashion-MNIST training split (a proxy): "
                       "the fraction of images classified as the class their prompt names" +
                       (f"; on the {ev.get('num_test')} real test images it is right {100 * acc:.1f}% of the time, the "
                        f"ceiling of this score." if acc is not None else "."))
        else:
            out.append(f"Prompt following is scored by {ev.get('name')}.")
    return out


def _convention_banner(study: Study, an: Analysis) -> list[str]:
    """What the FLOP convention decides: each paradigm's backbone share of its budget, and whether the verdicts
    change at equal backbone-only compute (flopmatch.report.convention)."""
    check = convention_check(study)
    if not check:
        return []
    share = check["shares"]
    depths = sorted({d for _, d in share})
    parts = "; ".join(f"depth {d}: " + ", ".join(f"{p} {100 * share[(p, d)]:.0f}%" for p in PARADIGMS if (p, d) in share)
                      for d in depths)
    spread = max(share.values()) / min(share.values())
    if spread <= 1.05:
        return []
    head = (f"FLOP convention: budgets count every matmul (Chinchilla's convention). The Transformer blocks alone "
            f"(Kaplan's non-embedding convention) are this share of each paradigm's budget: {parts}; counted that way, "
            f"the budgets differ by up to {spread:.2f}x. ")
    if not check["compared"]:
        return [head + "Too few budgets overlap at equal backbone compute to re-check the verdicts."]
    if check["changes"]:
        return [head + "Re-judged at equal backbone compute (each seed interpolated between measured budgets, never "
                "extrapolated; both sides at the main sampling settings), the answer changes: " + "; ".join(check["changes"]) +
                ". Part of a change can come "
                "from having less data there: budgets outside a paradigm's range and seeds not measured at both ends "
                "drop out."]
    return [head + f"Re-judged at equal backbone compute (each seed interpolated between measured budgets, never "
            f"extrapolated; {check['compared']} quality cells and the claims), the answer is the same."]


def _banners(study: Study, an: Analysis) -> list[str]:
    """Caveats that apply to the whole page, shown above the decision."""
    out = []
    preset = None
    if (study.root / "study.json").exists():
        try:
            preset = read_json(study.root / "study.json").get("preset")
        except (OSError, ValueError, AttributeError):
            preset = None
    if preset == "tiny":
        out.append("Smoke preset (tiny): these runs are seconds long and the results are not meaningful.")
    if study.runs:
        data = read_config(study.root / study.runs[0].rel).data
        budgets = sorted({r.budget for r in study.runs})
        span = (f"training budgets {budgets[0]:.3g} to {budgets[-1]:.3g} FLOPs" if len(budgets) > 1 else
                f"one training budget, {budgets[0]:.3g} FLOPs (no trend over compute)")
        out.append(f"The answer is about this data and these budgets: dataset {data.name}, {data.image_size}x{data.image_size} "
                   f"px, {span}." + _scale_note(study))
        paradigms = sorted({r.objective for r in study.runs})
        if len(paradigms) == 1:
            out.append(f"One paradigm ({paradigms[0]}): there is nothing to compare it with, so the table and the claims "
                       "are not measured; its trends, runs and operating points are below. Add paradigms with "
                       "`flopmatch study --out <this study> --objectives ...`.")
    out += _scorer_banner(study)
    out += _convention_banner(study, an)
    v = an.verdicts
    fid_noise = v.noise.get("fid")
    ceilings = read_ceilings(study.root)
    out += ceiling_banner(ceilings, math.sqrt(fid_noise.var) if fid_noise and fid_noise.source == "seeds"
                          and fid_noise.var else None)
    out += _kid_banner(v, ceilings)
    if any(n.source == "evaluation" for n in v.noise.values()):
        out.append("One seed per cell: image quality and prompt following rest on evaluation noise only (how much "
                   "retraining with another seed would move them is not measured), so no verdict on them is stronger "
                   "than **suggestive**. Train >= 2 seeds in some cells (e.g. `--seeds 3`) for verdicts.")
    single = len({key for m, cells in v.cells.items() if v.noise[m].source == "seeds"
                  for key, c in cells.items() if c.values.size == 1})  # (paradigm, budget) cells, over both metrics
    if single:
        own = all(v.noise[m].retrain_var is not None for m in v.cells if v.noise[m].source == "seeds")
        out.append(f"{single} (paradigm, budget) cells have one seed: their comparisons use the seed variance measured "
                   "where there are several seeds, " + ("its retraining part assumed the same at every budget on a log "
                   "scale, plus each value's own evaluation noise." if own else "assumed the same at every budget on a "
                   "log scale."))
    if v.depths >= 2 and v.depths < FRONTIER_SIZES:
        out.append(f"Model size: the better of {v.depths} depths at each budget (chosen on one seed, judged on the others "
                   f"where there are others), not a compute-optimal frontier (that needs >= {FRONTIER_SIZES} sizes).")
    if any(f.boot for f in an.fits.values()):
        out.append(f"Dashed trend lines are extrapolations, drawn at most {EXTRAPOLATE:g}x beyond the largest budget.")
    else:
        out.append(f"No scaling law is fitted: that needs >= {MIN_FIT_BUDGETS} budgets over >= {MIN_FIT_DECADES:g} "
                   "decades; the figures show the measured points only.")
    if study.timing:
        spread = [i.get("latency_spread") for i in study.timing.get("items", []) if i.get("latency_spread") is not None]
        m = study.timing.get("machine", {})
        shared = sum(1 for i in study.timing.get("items", []) if i.get("timed_as"))
        thr = [i.get("throughput_spread") for i in study.timing.get("items", []) if i.get("throughput_spread") is not None]
        out.append(f"Timings: every paradigm timed together in one phase of {study.timing.get('rounds')} interleaved rounds "
                   f"on {m.get('device')} ({m.get('threads')} threads), one checkpoint per paradigm and depth (timing does "
                   f"not depend on training); spread between rounds up to {100 * max(spread, default=0):.0f}% for latency"
                   + (f", {100 * max(thr):.0f}% for throughput" if thr else "") + ". They hold for this machine."
                   + (f" {shared} setting(s) share the timing of one that runs the same computation (they differ only in "
                      "a guidance scale above 1, a temperature or the time shift)." if shared else "")
                   + (f" Other processes kept {load:.1f} cores busy during the rounds, so no timing verdict is more than "
                      "suggestive: re-time on a quiet machine with `flopmatch study --retime`."
                      if (load := study.timing.get("other_busy_cores_during")) is not None and load > BUSY_CORES else ""))
    elif any(r["latency_s"] is not None for r in study.rows):
        out.append("Timings come from each run's own evaluation (no study timing phase), possibly under different loads.")
    return out


def _kid_banner(v, ceilings: dict | None) -> list[str]:
    """What KID, the image-quality verdicts' metric, could not show here: an improvement with training compute in
    any paradigm (each one's slope over budgets, :func:`~flopmatch.report.verdicts.own_trend`), or a bound by the
    tokenizer (samples scoring clearly better than their own tokenizer's reconstructions). Either says the verdicts
    are about this proxy more than about what compute buys; neither changes a verdict."""
    if not v.cells.get("kid"):
        return []
    lines = []
    trends = {p: own_trend(v, "kid", p) for p in sorted({p for p, _ in v.cells["kid"]})}
    trends = {p: t for p, t in trends.items() if t is not None and t.p is not None}
    if len(trends) >= 2 and all(t.p >= ALPHA for t in trends.values()):
        slopes = ", ".join(f"{p} {100 * math.expm1(t.estimate):+.0f}%" + (f" (sd {100 * t.se:.0f}%)" if t.se else "")
                           for p, t in trends.items())
        lines.append(f"KID improves detectably with training compute in no paradigm over these budgets (change per decade "
                     f"of FLOPs: {slopes}; none below 0 at level {ALPHA}, one-sided, on the verdicts' noise): the "
                     "image-quality verdicts compare levels that training was not seen to move here, so they may "
                     "reflect the tokenizers, the sampler and the proxy's features more than what compute buys.")
    noise, found = v.noise["kid"], {}
    for p, metrics in sorted(by_paradigm(ceilings).items()):
        r = rkid(metrics)
        for (q, budget), c in sorted(v.cells["kid"].items()):
            sd = mean_sd(c, noise)
            if q != p or not r or r <= KID_FLOOR or sd is None:
                continue
            # The rKID is one evaluation at the generators' image count: its noise is taken as one of this cell's
            # evaluations' (the mean evaluation variance); "clearly below" is 2 sd of the difference.
            ev = float(c.eval_var.mean()) if np.isfinite(c.eval_var).all() else 0.0
            if math.log(r) - c.mean > 2 * math.sqrt(sd**2 + ev):
                found.setdefault((p, r), []).append(f"{math.exp(c.mean):.3g} at {budget:.3g}")
    if found:
        which = "; ".join(f"{p}'s KID {', '.join(at)} FLOPs against its tokenizer's rKID {r:.3g}" for (p, r), at in found.items())
        lines.append(f"Samples score a clearly better KID than their own tokenizer's reconstructions ({which}). A "
                     "generator's images are its tokenizer's decoded outputs, so a score of fidelity to the data "
                     "should not favour them over the reconstructions: KID (effnet proxy) here also rewards something "
                     "they lack (e.g. guided samples more typical of the evaluator's features than blurred "
                     "reconstructions). Read the image-quality verdicts as about this proxy.")
    return lines


def _scale_note(study: Study) -> str:
    """The model sizes and evaluation the answer rests on: " Models: depth 1 (diffusion 170k parameters, ...); quality
    from 250 generated images per setting." ("" without finished, evaluated runs)."""
    main = [r for r in study.rows if r["main"] and r["done"]]
    if not main:
        return ""
    depths = sorted({r["depth"] for r in main})
    seen = ""
    try:  # the training set every run shares (a study's runs train on one split), and how often the longest run saw it
        size = int(read_json(study.root / study.runs[0].rel / "data.json")["size"])
        batch = read_config(study.root / study.runs[0].rel).train.batch_size
        passes = max((r["total_steps"] or 0) * batch / max(size, 1) for r in main)
        seen = f"; {size} training images, {passes:.3g} passes over them in the longest run"
    except (OSError, KeyError, TypeError, ValueError, UserError):
        pass
    params = {}
    for r in main:
        params.setdefault(r["objective"], set()).add(r["params"])
    sizes = ", ".join(f"{p} {'/'.join(f'{n / 1e3:.0f}k' if n < 1e6 else f'{n / 1e6:.3g}M' for n in sorted(ns))}"
                      for p, ns in params.items() if None not in ns)
    counts = sorted({r["num_samples"] for r in main if r["num_samples"]})
    return (f" Models: depth{'s' if len(depths) > 1 else ''} {', '.join(map(str, depths))}"
            + (f" ({sizes} parameters)" if sizes else "") + seen + "; "
            + (f"image quality and prompt following from {'/'.join(map(str, counts))} generated images per setting "
               if counts else "") + "(conclusions about larger models or other data need runs there).")


def _timed_scope(study: Study, claim: dict) -> str:
    """For a claim that rests on measured latency or throughput: where they were measured, since a ranking of
    inference cost holds for that machine and these model sizes (overheads per step weigh more in small models)."""
    timed = any(c.metric in ("latency", "throughput") and c.test.method != "none"
                for part in claim["parts"] for c, _ in part["comparisons"])
    if not timed:
        return ""
    m = (study.timing or {}).get("machine") or {}
    where = f"on {m['device']} ({m.get('threads')} threads)" if m.get("device") else "on the evaluating machine"
    return f" Its timings were measured {where} at these model sizes: other hardware or larger models may rank otherwise."


def _table_basis(v) -> str:
    """Which settings the table's cells compare: the main ones, or the operating points (marked) at their budget."""
    cells = [c for c in v.table if c.get("matched") and c["label"] != "not measured"]
    size = "Each paradigm at the size chosen per budget" if v.depths > 1 else "Each paradigm at the one depth trained per budget"
    if not cells:
        return (f"{size} and at its main sampling settings (one guidance scale for every paradigm; see Operating points "
                "for each one's best).")
    what = []
    if any(c["need"] in ("image quality", "prompt following") for c in cells):
        what.append("image quality and prompt following at each paradigm's best point for that need")
    if any(c["need"] in ("latency", "throughput") for c in cells):
        what.append("latency and throughput at its cheapest point at matched quality")
    return (f"{size}; at {v.operating.budget:.3g} FLOPs {' and '.join(what)} "
            f"(marked {MATCHED_MARK}; see Operating points), elsewhere at its main sampling settings (one guidance "
            f"scale for every paradigm). A {MATCHED_MARK} verdict holds for the operating points the sweep chose: "
            "points the sweep could not separate may have been chosen otherwise.")


def _decision_rows(an: Analysis) -> list[list]:
    rows = []
    for budget in sorted({c["budget"] for c in an.verdicts.table}):
        row = [f"{budget:.3g}"]
        for need, _ in NEEDS:
            row.append(cell_text(next(c for c in an.verdicts.table if c["budget"] == budget and c["need"] == need)))
        rows.append(row)
    return rows


def run_problems(study: Study, an: Analysis) -> list[str]:
    """What is wrong with the study's runs, one line each (unfinished, unevaluated, unreadable, left out of fits)."""
    problems = [f"{r.name}: not finished ({(r.state or {}).get('step', 0)}/{(r.state or {}).get('total_steps', '?')} steps)"
                for r in study.runs if not r.done]
    problems += [f"{r.name}: not evaluated (no eval.json entries)" for r in study.runs if not r.evaluated]
    problems += [f"{r.name}: {p}" for r in study.runs for p in r.problems] + study.problems
    return problems + [f"left out of fits: {x}" for x in an.excluded if "duplicate" in x or "<= 0" in x]


def _blocks(study: Study, an: Analysis, samples: dict | None) -> list[tuple]:
    B: list[tuple] = []
    v = an.verdicts
    B.append(("h", 1, "flopmatch study report"))
    B += [("banner", t) for t in _banners(study, an)]
    B.append(("h", 2, "Which paradigm, for what"))
    B.append(("table", ["budget (FLOPs)", *[n for n, _ in NEEDS]], _decision_rows(an)))
    n_table = sum(c.p2 is not None for c in v.families["table"])
    B.append(("p", f"**{CONFIDENT}**: better than every other paradigm after Holm's correction over the table's "
                   f"{n_table} tests (family-wise level {ALPHA}), with noise that includes retraining (or timing rounds); "
                   f"**{SUGGESTIVE}**: better before the correction, or on evaluation noise only; **{NO_DIFF}**: the best "
                   "could not be separated from the paradigms named. Retraining means the generators' training seeds: each "
                   "token type (continuous latents, discrete codes) has one fixed tokenizer, shared by every run of that "
                   "type, so the verdicts hold for these tokenizers; another one (e.g. retrained) would move all its runs "
                   "together, a variation no verdict here includes (see Tokenizer ceilings). " + _table_basis(v)))
    B.append(("h", 2, "The paper's claims, checked here"))
    B.append(("ul", [f"**{c['status'].upper()}**: ({c['id']}) {c['paper']} Why: {c['reason']}.{_timed_scope(study, c)}"
                     for c in v.claims]))
    n_claims = sum(c.p2 is not None for c in v.families["claims"])
    noise = "; ".join(f"{m}: {n.describe()}" for m, n in v.noise.items() if m != "fid")  # FID decides nothing
    B.append(("p", f"{n_claims} tests decide these claims; Holm's procedure keeps the chance of any false verdict among "
                   f"them at or below {ALPHA}. Noise: {noise}. A claim **held** when every part was separated with "
                   "confidence, **did not hold** when a part was reversed with confidence, is **suggestive** when every "
                   "part points its way without a verdict, and **inconclusive** otherwise."))
    for name in ("kid_vs_flops", "prompt_vs_flops"):
        B.append(("fig", name, FIG_CAPTIONS[name]))
    B += prompt_group_blocks(study, v)  # seen vs held-out, 1 vs 2 objects: beside the prompt figure, no verdict
    B.append(("h", 2, "Each claim, part by part"))
    for c in v.claims:
        B.append(("p", f"Claim {c['id']}: **{c['status']}**. {c['paper']}" + (f" {c['note']}" if c["note"] else "")))
        items = []
        for part in c["parts"]:
            comps = "; ".join(comp.summary() + (", against the claim" if against_claim(comp, want) else "")
                              for comp, want in part["comparisons"]) or "not measured"
            items.append(f"{part['text']}: **{part['status']}** ({comps})")
        B.append(("ul", items))
    problems = run_problems(study, an)
    B.append(("h", 2, "Runs"))
    if problems:
        B.append(("ul", problems))
    ceilings = read_ceilings(study.root)
    per = by_paradigm(ceilings)  # each paradigm's tokenizer ceiling, beside its generators' numbers
    hdr, rows = _runs_table(study)
    if per:
        hdr, rows = add_column(hdr, rows, "prompt full match", "tokenizer ceiling: rFID / full match",
                               [runs_cell(per.get(r[1])) for r in rows])
    B.append(("table", hdr, rows))
    B.append(("h", 2, "Tokenizer ceilings"))
    if ceilings:
        B.append(("p", "A generator's images are its tokenizer's decoded outputs, so its FID and prompt score can be read "
                       "only against what the tokenizer allows: each tokenizer's reconstructions scored as the generators are. "
                       "FID at the generators' counts: the reference is the first n evaluation images (the generators' own "
                       "FID reference), compared with the reconstructions of the next n (eval images n..2n-1, so no image "
                       "is compared with itself); the floor is those n real images' FID against the same reference, what a "
                       "generator that reproduced real images would score. rKID compares the same two sets by KID, with the "
                       "generators' kernel and subsets (unbiased, so a real-image floor would be about 0 and is not shown). "
                       "PSNR, SSIM and prompt scores are on the first n "
                       "images, with their own captions as prompts." + (
                           f" Prompt scores by the attribute classifier need at least {ceilings['floor']['value']:.0%} full "
                           "match on each tokenizer's reconstructions, or the study stops before training."
                           if (ceilings.get("floor") or {}).get("value") is not None else "")))
        B.append(("table", *ceilings_table(ceilings)))
    else:
        B.append(("p", "Not measured: this study has no tokenizer_ceilings.json (re-run `flopmatch study` on it to add one)."))
    B.append(("h", 2, "Scaling with training FLOPs"))
    inception = any(r.get("fid_inception") is not None for r in study.rows)  # an opt-in extractor: no empty figure
    for name in ("fid_vs_flops", *(["fid_inception_vs_flops"] if inception else []), "loss_vs_flops"):
        B.append(("fig", name, FIG_CAPTIONS[name]))
    hdr, rows = _fits_table(an)
    if per:  # the fitted asymptote E against the floor the tokenizer sets on it
        hdr, rows = add_column(hdr, rows, "E", "tokenizer ceiling", [fit_cell(per.get(p), m) for m, p in an.fits])
    B.append(("table", hdr, rows))
    B.append(("h", 3, "Crossovers of fitted trends"))
    hdr, rows = _crossover_table(an)
    B.append(("table", hdr, rows) if rows else ("p", "No crossover computed: needs fitted laws of two paradigms."))
    B.append(("h", 3, "Every test behind the verdicts"))
    B.append(("table", *_tests_table(an)))
    B.append(("h", 2, "Iso-FLOP curves"))
    if len({r["depth"] for r in study.rows}) >= 2:
        for name in ("iso_flop_kid", "iso_flop_prompt", "iso_flop_loss"):
            B.append(("fig", name, FIG_CAPTIONS[name]))
    else:  # one point per budget: no curve to read a best model size from
        B.append(("p", "Not drawn: every run has the same depth, so each budget has one model size. Add depths "
                       "(`--depths 1,2,3`) for curves that show the best size per budget."))
    op = v.operating
    B.append(("h", 2, "Operating points" + (f" at {op.budget:.3g} FLOPs" if op and op.budget else "")))
    if op is not None:
        B.append(("p", operating_text(op)))
        hdr, rows = operating_rows(op)
        if op.swept and rows:
            B.append(("table", hdr, rows))
            for name in ("operating_fronts", "guidance_sweep"):
                B.append(("fig", name, FIG_CAPTIONS[name]))
    B.append(("h", 2, "Inference"))
    for name in ("pareto_flops", "pareto_latency", "throughput", "step_sweep"):
        B.append(("fig", name, FIG_CAPTIONS[name]))
    hdr, rows = _inference_table(an)
    B.append(("table", hdr, rows) if rows else ("p", "No inference measurements."))
    B.append(("h", 2, "EMA (a separate analysis, not part of the claims)"))
    hdr, rows = _ema_table(an)
    if rows:
        B.append(("p", "Each run's averaged weights against its own raw weights, at its main setting with the same samples' "
                       "seeds and prompts, so retraining noise cancels, in KID (FID's small-sample bias differs "
                       "between models, and an average is another model; its change is shown for the record): the EMA training kept (decay 0.999, warmed up "
                       "as (1+s)/(10+s)) and post-hoc EMAs (Karras et al. 2024, EDM2) of relative length sigma_rel, a "
                       "fixed fraction of every run, rebuilt after training from snapshots of two averages. The noise "
                       "source is the runs (seeds) paired: the interval is a t interval over their differences; with "
                       "one run there is none. \"lowest\" is the lowest mean on these same runs, so its gain is "
                       "optimistic. Profile residual: how far the rebuilt averaging profile is from the wanted one "
                       "(0 = exact). Under a cosine schedule the LR has decayed to ~10 % at the end, so averaging "
                       "repeats part of what the decay does; `--set train.schedule=constant` trains without decay."))
        B.append(("table", hdr, rows))
        B.append(("ul", _ema_summary(an)))
        B.append(("fig", "ema_sweep", FIG_CAPTIONS["ema_sweep"]))
    else:
        B.append(("p", "Not measured: no run was evaluated with raw weights too (`--eval-raw`, or `--eval-ema`)."))
    B.append(("h", 2, "Samples: the same prompts, every paradigm, every budget"))
    B.append(("samples", samples))
    B.append(("h", 2, "Training loss"))
    B.append(("fig", "loss_curves", FIG_CAPTIONS["loss_curves"]))
    B.append(("h", 2, "How the numbers were made"))
    B.append(("ul", [
        "Main setting of a run: the EMA eval entry whose sampler settings equal the run's default sample config (steps "
        "resolved by the paradigm), on the full image set; if several or none match, the one with the lowest FID (effnet). "
        "Inference figures use every full-set setting.",
        "Fits: per paradigm, the best depth at each budget (seed mean), then E + A (C/C0)^-alpha fitted in log space; "
        f"{LEVEL:.0%} percentile bootstrap intervals (resampling seeds, or evaluation noise with one seed); a law needs "
        f">= {MIN_FIT_BUDGETS} budgets over >= {MIN_FIT_DECADES:g} decades.",
        "Verdicts: log errors compared with t-tests on the seed variance pooled over cells (or evaluation noise with one "
        "seed; each value's own bootstrap or binomial evaluation noise added where known), timings with a paired t-test "
        "over the timing phase's interleaved rounds (Welch's test for timings from separate evaluations), sampling FLOPs "
        "exactly; two-sided, Holm-corrected "
        f"within each family at {ALPHA}. See flopmatch.report.verdicts. The tokenizers are not part of that noise: "
        "each token type uses one fixed tokenizer, shared by every run of that type.",
        "Points are finished runs at their nominal budget; unfinished runs are listed above and left out.",
        "Prompt following is fitted as the error 1 - full match. Image quality is KID on EfficientNet-Lite0 features "
        "(unbiased at any n; KID <= 0 cannot be drawn on a log scale and is left out of fits); FID on the same "
        "features, and the standard Inception FID where measured, are shown for the record with their n.",
        f"Crossovers are searched up to {EXTRAPOLATE:g}x the largest budget: extrapolations, to be read as where the trends point.",
        "Training losses of different paradigms are never compared or drawn on one axis.",
        "Tokenizer ceiling beside a run or a fit: what the paradigm's tokenizer allows (rFID, rKID, or prompt error 1 - full "
        "match, of its reconstructions at the generators' n); a fitted asymptote E well below it is a trend the tokenizer "
        "is unlikely to let the generator follow. It is a reference point, not a strict bound: a generator's decoded "
        "samples need not be reconstructions of real images, and at this n both scores carry sampling noise.",
        "Latency and throughput are measurements on the evaluating machine (device and threads in results.csv).",
    ]))  # fmt: skip
    return B


# ------------------------------------------------------------------------ entry points


def _fits_summary(an: Analysis) -> list[dict]:
    out = []
    for (m, p), f in an.fits.items():
        d = {"metric": m, "paradigm": p, "budgets": len(f.frontier), "note": f.note}
        if f.boot is not None:
            d |= {**f.boot.point.params, "kind": f.boot.point.kind, "alpha_interval": f.boot.interval("alpha")}
        out.append(d)
    return out


DEFAULT_N_BOOT = 1000  # fit-band resamples of a directory without a study.json (runs put together by hand)


def study_n_boot(root: Path) -> int:
    """The bootstrap resamples the study at ``root`` was reported with (its study.json's ``n_boot``), else
    :data:`DEFAULT_N_BOOT`: so rebuilding a study's report gives the report the study wrote, in its time (the cpu
    preset's 100 resamples take about a minute here; 1000 would take ten)."""
    try:
        n = read_json(root / "study.json").get("n_boot")
    except (UserError, AttributeError):  # no (readable) study.json, or not an object
        return DEFAULT_N_BOOT
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else DEFAULT_N_BOOT


def build_report(study_dir: str | Path, *, n_boot: int | None = None, seed: int = 0, workers: int | None = 1) -> dict:
    """Write ``report.html``, ``report.md``, ``results.csv`` and ``report_figures/`` into ``study_dir``.

    Returns {"paths": {name: Path}, "table": [dict], "claims": [dict], "fits": [dict], "problems": [str]}.
    Deterministic: the same run directories, ``n_boot`` and ``seed`` give the same bytes, whatever ``workers`` (the
    processes of the trend fits, :func:`~flopmatch.report.bootstrap.bootstrap_all`). ``n_boot`` None: the study's own
    (:func:`study_n_boot`).
    """
    root = Path(study_dir)
    study = load_study(root)
    n_boot = study_n_boot(root) if n_boot is None else n_boot
    an = analyse(study, n_boot=n_boot, seed=seed, workers=workers)
    figs = all_figures(an, study)
    samples = sample_table(study, an)
    blocks = _blocks(study, an, samples)

    fig_dir = root / "report_figures"
    fig_files, sample_files, written = {}, {}, set()
    for name, png in figs.items():
        if png:
            atomic_write_bytes(fig_dir / f"{name}.png", png)
            fig_files[name] = f"report_figures/{name}.png"
            written.add(f"{name}.png")
    for (p, c), cell in (samples or {}).get("cells", {}).items():
        fname = f"samples_{p}_{c:.3g}.png"
        atomic_write_bytes(fig_dir / fname, cell["png"])
        sample_files[(p, c)] = f"report_figures/{fname}"
        written.add(fname)
    if fig_dir.is_dir():
        for stale in fig_dir.glob("*.png"):  # figures of an earlier build that this one no longer has
            if stale.name not in written:
                stale.unlink()

    paths = {"html": root / "report.html", "md": root / "report.md", "csv": root / "results.csv", "figures": fig_dir}
    atomic_write_text(paths["csv"], results_csv(study.rows))
    atomic_write_text(paths["md"], render_md(blocks, fig_files, sample_files))
    atomic_write_text(paths["html"], render_html(blocks, figs))
    return {"paths": paths, "table": an.verdicts.table, "claims": an.verdicts.claims, "fits": _fits_summary(an),
            "problems": run_problems(study, an)}
