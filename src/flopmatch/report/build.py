"""``flopmatch report STUDY``: run directories -> report.html, report.md and results.csv.

A pure function of the run directories: rows are read by :mod:`flopmatch.report.data`, analysed by
:mod:`flopmatch.report.analysis` and :mod:`flopmatch.report.findings` (seeded bootstrap), drawn by
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

from flopmatch.files import atomic_write_bytes, atomic_write_text
from flopmatch.report.analysis import EXTRAPOLATE, LEVEL, METRIC, P_SURE, Analysis
from flopmatch.report.data import COLUMNS, Study, first_images, load_study
from flopmatch.report.findings import analyse
from flopmatch.report.plots import all_figures
from flopmatch.report.render import fmt, render_html, render_md
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

    Per (paradigm, budget) the run is the FID frontier depth at that budget (else the largest depth
    with saved samples), lowest seed. All runs are sampled on the same prompt list (the first eval
    captions), so the prompts are given once; a mismatch is reported.
    """
    mains = [r for r in study.rows if r["main"] and r["samples_dir"]]
    if not mains:
        return None
    budgets = sorted({r["budget"] for r in mains})
    cells, prompts, mismatch = {}, None, []
    for p in an.paradigms:
        fit = an.fits.get(("fid", p))
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
    header = ["run", "paradigm", "depth", "params", "budget", "FLOPs spent", "steps", "status", "final loss",
              "main setting", "FID (effnet) ± bootstrap sd", "prompt full match", "FLOPs/img", "latency (ms)", "img/s"]  # fmt: skip
    rows = []
    for info in study.runs:
        main = next((r for r in study.rows if r["run"] == info.name and (r["main"] or r["setting"] is None)), None)
        main = main or next(r for r in study.rows if r["run"] == info.name)
        status = "done" if info.done else ("not started" if info.state is None else "NOT FINISHED")
        status += "" if info.evaluated else ", not evaluated"
        lat = None if main["latency_s"] is None else 1e3 * main["latency_s"]
        rows.append([info.name, info.objective, info.depth, main["params"], fmt(info.budget, ".3g"),
                     fmt(main["train_flops"] and float(main["train_flops"]), ".4g"), fmt(main["steps"]), status,
                     fmt(main["final_loss"]), main["setting"] or "–", _with_se(main["fid_effnet"], main["fid_se_effnet"]),
                     fmt(main["prompt_full_match"], ".3f"), fmt(main["sample_flops_per_image"] and float(main["sample_flops_per_image"]), ".3g"),
                     fmt(lat, ".3g"), fmt(main["throughput_images_per_s"], ".3g")])  # fmt: skip
    return header, rows


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
        rows.append([METRIC[m].label, p, len(f.frontier), front, fmt(pt.E, ".4g"), fmt(pt.A, ".4g"), fmt(pt.alpha, ".3f"),
                     _iv(b.interval("alpha")), pt.kind, boot, f.note or "–"])  # fmt: skip
    return header, rows


def _comparisons_table(an: Analysis) -> tuple[list, list]:
    header = ["metric", "budget", "a", "b", "a (depth: error)", "b (depth: error)", f"a - b, {LEVEL:.0%} CI", "P(a better)", "from"]
    rows = []
    for (m, a, b, c), r in sorted(an.comparisons.items(), key=lambda kv: (kv[0][0], kv[0][3], kv[0][1], kv[0][2])):
        ci = "–" if r["interval"] is None else _iv(r["interval"])
        rows.append([METRIC[m].label, f"{c:.3g}", a, b, f"d{r['a']['depth']}: {r['a']['value']:.4g}",
                     f"d{r['b']['depth']}: {r['b']['value']:.4g}", f"{r['diff']:+.3g} {ci}", fmt(r["p_a_better"], ".2f"),
                     r["source"] or "no noise estimate"])  # fmt: skip
    return header, rows


def _crossover_table(an: Analysis) -> tuple[list, list]:
    header = ["metric", "a vs b", "searched up to", "crossover (FLOPs)", f"{LEVEL:.0%} interval (given crossing)",
              "bootstrap pairs crossing", "lower at low C", "lower at high C"]  # fmt: skip
    rows = []
    for c in an.crossovers:
        rows.append([METRIC[c["metric"]].label, f"{c['a']} vs {c['b']}", f"{c['C_range'][1]:.3g}", fmt(c["point"], ".3g"),
                     "–" if c["interval"] is None else _iv(c["interval"]),
                     "–" if not c["n_pairs"] else f"{c['fraction_crossing']:.0%} of {c['n_pairs']}",
                     c["lower_at_low_C"], c["lower_at_high_C"]])  # fmt: skip
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
    "fid_vs_flops": "FID (effnet proxy) against training FLOPs: faint dots are every run, big dots the best depth per budget "
                    "(error bars: seed std; with one seed, the evaluation-noise sd), lines the saturating power-law fit (dashed: extrapolation), band its 90% bootstrap interval.",
    "fid_inception_vs_flops": "FID (Inception) against training FLOPs, as above (measured on fewer runs if only some were evaluated with it).",
    "prompt_vs_flops": "Prompt-following error (1 - full match) against training FLOPs, as above.",
    "loss_vs_flops": "Final training loss against FLOPs, one panel per paradigm: losses of different objectives are not comparable.",
    "iso_flop_fid": "Iso-FLOP curves: FID against parameters at each fixed training budget.",
    "iso_flop_prompt": "Iso-FLOP curves: prompt-following error against parameters at each fixed training budget.",
    "iso_flop_loss": "Iso-FLOP curves: final training loss against parameters (per paradigm).",
    "pareto_flops": "Quality against sampling FLOPs per image over every evaluated setting; lines are each paradigm's Pareto front.",
    "pareto_latency": "Quality against latency (one image, batch 1) over every evaluated setting; lines are Pareto fronts.",
    "throughput": "Throughput at the main settings (median over runs; bars span min-max).",
    "step_sweep": "Latency, throughput and FID over the sampling-step sweep.",
    "loss_curves": "Training loss curves, one panel per paradigm (never across paradigms).",
}  # fmt: skip


def _blocks(study: Study, an: Analysis, samples: dict | None) -> list[tuple]:
    B: list[tuple] = []
    n_eval = sum(r.evaluated for r in study.runs)
    budgets = sorted({r.budget for r in study.runs})
    depths = sorted({r.depth for r in study.runs})
    B.append(("h", 1, "flopmatch study report"))
    B.append(("p", f"{len(study.runs)} runs ({n_eval} evaluated) of {', '.join(an.paradigms)}; depths "
                   f"{', '.join(map(str, depths))}; budgets {', '.join(f'{b:.3g}' for b in budgets)} FLOPs; "
                   f"{len(study.rows)} rows in results.csv. Rebuilt from the run directories alone by `flopmatch report`."))
    B.append(("h", 2, "Recommendations"))
    B.append(("ul", [r["text"] for r in an.recommendations]))
    B.append(("h", 2, "The paper's findings, checked here"))
    B.append(("table", ["#", "paper (Kilian et al. 2024)", "here"],
              [[f["id"], f["paper"], f["verdict"].upper()] for f in an.findings]))
    by = {v: [str(f["id"]) for f in an.findings if f["verdict"] == v] for v in ("held", "did not hold", "inconclusive", "not measured")}
    B.append(("p", "In this study: " + "; ".join(f"**{v}**: {', '.join(ids)}" for v, ids in by.items() if ids) + "."))
    for f in an.findings:
        items = [f"{p['claim']}: **{p['status']}** — {p['text']}" for p in f["parts"]]
        B.append(("p", f"Finding {f['id']}: {f['verdict']}." + (f" {f['note']}" if f["note"] else "")))
        B.append(("ul", items))
    B.append(("p", f"A part holds at a budget when the bootstrap gives P >= {P_SURE} that it is true, is reversed when "
                   f"P <= {1 - P_SURE:.2f}; with few seeds and budgets most parts are inconclusive, and this report says so."))
    problems = [f"{r.name}: not finished ({(r.state or {}).get('step', 0)}/{(r.state or {}).get('total_steps', '?')} steps)"
                for r in study.runs if not r.done]
    problems += [f"{r.name}: not evaluated (no eval.json entries)" for r in study.runs if not r.evaluated]
    problems += [f"{r.name}: {p}" for r in study.runs for p in r.problems] + study.problems
    problems += [f"left out of fits: {x}" for x in an.excluded if "duplicate" in x]
    B.append(("h", 2, "Runs"))
    if problems:
        B.append(("ul", problems))
    B.append(("table", *_runs_table(study)))
    B.append(("h", 2, "Scaling with training FLOPs"))
    for name in ("fid_vs_flops", "fid_inception_vs_flops", "prompt_vs_flops", "loss_vs_flops"):
        B.append(("fig", name, FIG_CAPTIONS[name]))
    B.append(("table", *_fits_table(an)))
    B.append(("h", 3, "Crossovers of fitted trends"))
    hdr, rows = _crossover_table(an)
    B.append(("table", hdr, rows) if rows else ("p", "No crossover computed: needs fitted trends (>= 3 budgets) of two paradigms."))
    B.append(("h", 3, "Head-to-head at equal training FLOPs"))
    hdr, rows = _comparisons_table(an)
    B.append(("table", hdr, rows) if rows else ("p", "No budget was measured for two paradigms."))
    B.append(("h", 2, "Iso-FLOP curves"))
    for name in ("iso_flop_fid", "iso_flop_prompt", "iso_flop_loss"):
        B.append(("fig", name, FIG_CAPTIONS[name]))
    B.append(("h", 2, "Inference"))
    for name in ("pareto_flops", "pareto_latency", "throughput", "step_sweep"):
        B.append(("fig", name, FIG_CAPTIONS[name]))
    hdr, rows = _inference_table(an)
    B.append(("table", hdr, rows) if rows else ("p", "No inference measurements."))
    B.append(("h", 2, "Samples: the same prompts, every paradigm, every budget"))
    B.append(("samples", samples))
    B.append(("h", 2, "Training loss"))
    B.append(("fig", "loss_curves", FIG_CAPTIONS["loss_curves"]))
    B.append(("h", 2, "How the numbers were made"))
    B.append(("ul", [
        "Main setting of a run: the EMA eval entry whose sampler settings equal the run's default sample config (steps "
        "resolved by the paradigm); if several or none match, the one with the lowest FID (effnet). Inference figures use every setting.",
        "Fits: per paradigm, the best depth at each budget (seed mean), then E + A (C/C0)^-alpha fitted in log space; "
        f"{LEVEL:.0%} percentile bootstrap intervals (resampling seeds, or residuals with one seed); a fit needs >= 3 budgets.",
        "Points are finished runs at their nominal budget; unfinished runs are listed above and left out.",
        "Prompt following is fitted as the error 1 - full match. FID is the EfficientNet-Lite0 proxy; FID (Inception) is shown separately when measured.",
        f"Crossovers are searched up to {EXTRAPOLATE:.0e}x the largest budget: extrapolations, to be read as where the trends point.",
        "Training losses of different paradigms are never compared or drawn on one axis.",
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


def build_report(study_dir: str | Path, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Write ``report.html``, ``report.md``, ``results.csv`` and ``report_figures/`` into ``study_dir``.

    Returns {"paths": {name: Path}, "recommendations": [dict], "findings": [dict], "fits": [dict]}.
    Deterministic: the same run directories, ``n_boot`` and ``seed`` give the same bytes.
    """
    root = Path(study_dir)
    study = load_study(root)
    an = analyse(study, n_boot=n_boot, seed=seed)
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
    return {"paths": paths, "recommendations": an.recommendations, "findings": an.findings, "fits": _fits_summary(an)}
