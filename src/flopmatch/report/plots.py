"""Figures of the study report, each returned as PNG bytes (matplotlib, Agg canvas, no pyplot state).

Bytes are reproducible: no software/date metadata is written (``metadata={"Software": None}``),
figures are built on a private ``Figure`` + ``FigureCanvasAgg`` inside an rc context, and every
input is already deterministic. A figure with nothing to show returns None (the report says so).

Training losses of different paradigms are never drawn on one axis (their objectives differ):
loss figures get one panel per paradigm.
"""

from __future__ import annotations

import io
import math

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogFormatter, NullFormatter

from flopmatch import PARADIGMS
from flopmatch.report.analysis import EXTRAPOLATE, METRIC, Analysis, setting_medians
from flopmatch.report.data import Study
from flopmatch.report.operating import QUALITY_COL, Operating, latency_of, paradigm_order, throughput_of
from flopmatch.report.records import iso_flop, pareto_front

DPI = 100
COLORS = {"diffusion": "#1f77b4", "masked": "#2ca02c", "autoregressive": "#d62728"}

RC = {"font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8, "axes.grid": True, "grid.alpha": 0.3,
      "svg.hashsalt": "flopmatch", "path.simplify": False}  # fmt: skip


def _color(p: str) -> str:
    return COLORS.get(p, "#7f7f7f")


def _figure(ncols: int = 1, nrows: int = 1, w: float = 5.2, h: float = 3.8):
    """An Agg-backed figure (no global pyplot state, so figures are reproducible bytes) and its axes grid."""
    fig = Figure(figsize=(w * ncols, h * nrows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _render(fn, *args) -> bytes | None:
    with matplotlib.rc_context(RC):
        fig = fn(*args)
        return None if fig is None else _png(fig)


def _legend(ax, **kwargs) -> None:
    """The axes' legend, when something on them has a label (matplotlib warns on an empty legend: a study whose
    runs left a panel empty would print that warning among the report's lines)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _plain_log(axis) -> None:
    """Log axis labelled with plain numbers (20, 30, 0.2), minor labels only where matplotlib would put them."""
    class PlainLog(LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(PlainLog(labelOnlyBase=False, minor_thresholds=(1, 0.5)))


def _logy_if_positive(ax, values) -> None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if v and min(v) > 0:
        ax.set_yscale("log")
        _plain_log(ax.yaxis)


def _noise_sd(records: list[dict], point) -> float:
    """Sd of the evaluation-noise draws of a one-seed frontier point's record (0 when it has none)."""
    noise = next((r.get("noise") for r in records if r["budget"] == point.budget and r["depth"] == point.depth), None)
    return float(np.std(noise)) if noise else 0.0


def _draw_trend(ax, fit, color: str, label: str) -> list[float]:
    """Faint points of every run, frontier means with seed std (one seed: evaluation-noise sd), fitted trend
    and its bootstrap band."""
    ys = []
    xs = [r["budget"] for r in fit.records]
    ys += [r["value"] for r in fit.records]
    ax.scatter(xs, [r["value"] for r in fit.records], s=10, color=color, alpha=0.25, linewidths=0)
    fb = [p.budget for p in fit.frontier]
    fm = [p.mean for p in fit.frontier]
    err = [p.std if math.isfinite(p.std) else _noise_sd(fit.records, p) for p in fit.frontier]
    if fit.boot is not None:
        pt, iv = fit.boot.point, fit.boot.intervals["alpha"]
        ivtxt = "" if not all(map(math.isfinite, iv)) else f" [{iv[0]:.2f}, {iv[1]:.2f}]"
        label += f": α={pt.alpha:.2f}{ivtxt}" + (f", E={pt.E:.3g}" if pt.kind == "saturating" else " (plain power law)")
    ax.errorbar(fb, fm, yerr=err, fmt="o", ms=5, color=color, capsize=2, label=label)
    if fit.boot is not None:
        lo, hi = min(fb), max(fb)
        inside = np.geomspace(lo, hi, 64)
        # extrapolation: bounded, dashed and shaded; none where the alpha interval includes 0 (no established decline)
        a_lo = fit.boot.intervals["alpha"][0]
        beyond = np.geomspace(hi, hi * EXTRAPOLATE, 64) if not (math.isfinite(a_lo) and a_lo <= 0) else np.array([hi])
        ax.plot(inside, fit.boot.point.predict(inside), color=color, lw=1.5)
        if len(beyond) > 1:
            ax.plot(beyond, fit.boot.point.predict(beyond), color=color, lw=1.2, ls="--")
        grid = np.concatenate([inside, beyond[1:]])
        if fit.boot.fits:
            blo, bhi = fit.boot.predict_interval(grid)
            ax.fill_between(grid, blo, bhi, color=color, alpha=0.15, linewidth=0)
            ys += list(blo) + list(bhi)
        ax.axvspan(hi, hi * EXTRAPOLATE, color="0.9", zorder=0)
        ax.text(hi * math.sqrt(EXTRAPOLATE), 0.98, f"extrapolated\n(<= {EXTRAPOLATE:g}x)", transform=ax.get_xaxis_transform(),
                ha="center", va="top", fontsize=7, color="0.4")
    return ys


def metric_vs_flops(an: Analysis, metric: str):
    """One axis, every paradigm: a cross-paradigm metric against training FLOPs with fits and bands."""
    fits = [(p, an.fits[(metric, p)]) for p in an.paradigms if (metric, p) in an.fits]
    if not fits:
        return None
    fig, axes = _figure(w=6.4, h=4.4)
    ax = axes[0, 0]
    ys = []
    for p, fit in fits:
        ys += _draw_trend(ax, fit, _color(p), p)
    ax.set_xscale("log")
    _logy_if_positive(ax, ys)
    ax.set_xlabel("training FLOPs (budget)")
    ax.set_ylabel(METRIC[metric].label)
    ax.set_title(f"{METRIC[metric].label} vs training FLOPs")
    _legend(ax, loc="best")
    return fig


def loss_vs_flops(an: Analysis):
    """Final training loss frontier and fit, one panel per paradigm (never across paradigms)."""
    fits = [(p, an.fits[("loss", p)]) for p in an.paradigms if ("loss", p) in an.fits]
    if not fits:
        return None
    fig, axes = _figure(ncols=len(fits), w=4.2)
    for ax, (p, fit) in zip(axes[0], fits):
        ys = _draw_trend(ax, fit, _color(p), p)
        ax.set_xscale("log")
        _logy_if_positive(ax, ys)
        ax.set_title(f"{p}: final loss")
        ax.set_xlabel("training FLOPs (budget)")
        _legend(ax, loc="best")
    axes[0, 0].set_ylabel("final training loss (own objective)")
    return fig


def loss_curves(study: Study, paradigms: list[str]):
    """Training loss against cumulative FLOPs, one panel per paradigm, colour = depth."""
    runs = [r for r in study.runs if r.curve]
    ps = [p for p in paradigms if any(r.objective == p for r in runs)]
    if not ps:
        return None
    cmap = matplotlib.colormaps["viridis"]
    depths = sorted({r.depth for r in runs})
    fig, axes = _figure(ncols=len(ps), w=4.2)
    for ax, p in zip(axes[0], ps):
        shown = set()
        for r in runs:
            if r.objective != p:
                continue
            x, y = zip(*r.curve)
            c = cmap(depths.index(r.depth) / max(1, len(depths) - 1) * 0.85)
            lab = None if r.depth in shown else f"depth {r.depth}"
            shown.add(r.depth)
            ax.plot(x, y, color=c, lw=1, alpha=0.8, label=lab)
        ax.set_xscale("log")
        ax.set_title(f"{p}: training loss")
        ax.set_xlabel("training FLOPs so far")
        _legend(ax, loc="best")
    axes[0, 0].set_ylabel("loss (own objective; not comparable across panels)")
    return fig


def iso_flops(an: Analysis, study: Study, metric: str):
    """Metric vs parameters at each fixed budget, one panel per paradigm; None with one depth (one point per budget:
    no curve, and the report says so instead of showing the figure)."""
    fits = [(p, an.fits[(metric, p)]) for p in an.paradigms if (metric, p) in an.fits]
    if not fits or len({r["depth"] for r in study.rows}) < 2:
        return None
    cmap = matplotlib.colormaps["plasma"]
    params = {(r["objective"], r["depth"]): r["params"] for r in study.rows if r["params"]}
    fig, axes = _figure(ncols=len(fits), w=4.2)
    for ax, (p, fit) in zip(axes[0], fits):
        budgets = [fp.budget for fp in fit.frontier]
        ys = []
        for i, b in enumerate(budgets):
            pts = iso_flop(fit.records, b, nan_policy="omit")
            x = [params.get((p, d), d) for d, _, _ in pts]
            y = [m for _, m, _ in pts]
            e = [0.0 if not math.isfinite(s) else s for _, _, s in pts]
            ys += y
            ax.errorbar(x, y, yerr=e, marker="o", ms=4, capsize=2, color=cmap(i / max(1, len(budgets) - 1) * 0.85),
                        label=f"{b:.3g} FLOPs")  # fmt: skip
        ax.set_xscale("log")
        _logy_if_positive(ax, ys)
        ax.set_title(f"{p}: iso-FLOP")
        ax.set_xlabel("parameters" if params else "depth")
        _legend(ax, loc="best")
    axes[0, 0].set_ylabel(METRIC[metric].label)
    return fig


def _pareto_rows(study: Study) -> tuple[list[dict], str]:
    """Evaluated EMA entries (on their run's full image set) of finished runs at the largest budget every paradigm reached."""
    rows = [r for r in study.rows if r["done"] and r["setting"] and r["weights"] == "ema" and r["sample_flops_per_image"]
            and r["full_set"]]  # an operating-point sweep's small set: another sample count, FIDs not comparable
    if not rows:
        return [], ""
    per = {}
    for r in rows:
        per.setdefault(r["objective"], set()).add(r["budget"])
    common = set.intersection(*per.values())
    if common:
        top = max(common)
        return [r for r in rows if r["budget"] == top], f"at {top:.3g} training FLOPs"
    tops = {p: max(b) for p, b in per.items()}
    return [r for r in rows if r["budget"] == tops[r["objective"]]], "at each paradigm's largest budget"


def _quality(row: dict, col: str) -> float:
    """A row's quality as an error: KID (or FID) as is, prompt following as 1 - full match."""
    return 1 - row[col] if col == "prompt_full_match" else row[col]


def pareto(study: Study, paradigms: list[str], cost: str, nokv_cost: str, xlabel: str):
    """Quality (KID, prompt error) against an inference cost, every full-set setting, with each paradigm's Pareto front."""
    rows, where = _pareto_rows(study)
    rows = [r for r in rows if r[cost] is not None]
    if not rows:
        return None
    fig, axes = _figure(ncols=2, w=4.6)
    for ax, (col, label) in zip(axes[0], (("kid_effnet", "KID (effnet)"), ("prompt_full_match", "prompt-following error"))):
        ys = []
        for p in paradigms:
            sel = [r for r in rows if r["objective"] == p and r[col] is not None]
            if not sel:
                continue
            pts = [(r[cost], _quality(r, col)) for r in sel]
            ys += [v for _, v in pts]
            ax.scatter(*zip(*pts), s=14, color=_color(p), alpha=0.35, linewidths=0)
            front = pareto_front(setting_medians(sel, cost, lambda r, col=col: _quality(r, col)))
            ax.plot([f[0] for f in front], [f[1] for f in front], marker="o", ms=4, color=_color(p), label=p)
            nk = [(r[nokv_cost], _quality(r, col)) for r in sel if r[nokv_cost] is not None]
            if nk:
                ax.scatter(*zip(*nk), s=18, facecolors="none", edgecolors=_color(p), label=f"{p} without KV cache")
        if not ys:
            continue
        ax.set_xscale("log")
        _plain_log(ax.xaxis)
        _logy_if_positive(ax, ys)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.set_title(label)
        _legend(ax, loc="best")
    fig.suptitle(f"Quality vs {xlabel.split(' (')[0]}, every evaluated setting, {where}")
    return fig


def throughput_bars(an: Analysis):
    """Median throughput at the main setting per depth and paradigm (range over rounds or runs as error bars), as points
    on a log axis."""
    keys = sorted({d for (_, d), v in an.inference.items() if v["throughput"]})
    if not keys:
        return None
    series = [(p, "throughput", p) for p in an.paradigms]
    if any(v["nokv_throughput"] for v in an.inference.values()):
        series.append(("autoregressive", "nokv_throughput", "autoregressive (no KV cache)"))
    fig, axes = _figure(w=6.0)
    ax = axes[0, 0]
    width = 0.8 / len(series)
    for i, (p, key, label) in enumerate(series):
        xs, hs, lo, hi = [], [], [], []
        for j, d in enumerate(keys):
            v = an.inference.get((p, d), {}).get(key) or []
            if v:
                m = float(np.median(v))
                xs.append(j + (i - (len(series) - 1) / 2) * width)
                hs.append(m)
                lo.append(m - min(v))
                hi.append(max(v) - m)
        if xs:  # points, not bars: a bar's height on a log axis depends on where the axis starts
            nokv = key.startswith("nokv")
            ax.errorbar(xs, hs, yerr=[lo, hi], fmt="s" if nokv else "o", color=_color(p), mfc="none" if nokv else _color(p),
                        ms=7, capsize=3, label=label)  # fmt: skip
    ax.set_xticks(range(len(keys)), [f"depth {d}" for d in keys])
    ax.set_ylabel("images / s (best batch size)")
    ax.set_yscale("log")
    ax.set_title("Throughput at the main sampling settings")
    _legend(ax, loc="best")
    return fig


def step_sweep(study: Study, paradigms: list[str]):
    """Latency, throughput and KID against sampling steps, per paradigm and depth, at the Pareto budget."""
    rows, where = _pareto_rows(study)
    # at each run's main guidance scale (and solver): an operating-point sweep's chosen points vary those too
    main = {r["run"]: (r["cfg"], r.get("solver")) for r in rows if r["main"]}
    rows = [r for r in rows if r["sample_steps"] and (r["cfg"], r.get("solver")) == main.get(r["run"])]
    if not rows:
        return None
    fig, axes = _figure(ncols=3, w=3.8)
    for ax, (col, label) in zip(axes[0], (("latency_s", "latency, batch 1 (s)"),
                                          ("throughput_images_per_s", "throughput (images/s)"),
                                          ("kid_effnet", "KID (effnet)"))):  # fmt: skip
        ys = []
        for p in paradigms:
            for d in sorted({r["depth"] for r in rows if r["objective"] == p}):
                by_steps: dict[int, list] = {}
                for r in rows:
                    if r["objective"] == p and r["depth"] == d and r[col] is not None:
                        by_steps.setdefault(r["sample_steps"], []).append(r[col])
                if by_steps:
                    xs = sorted(by_steps)
                    y = [float(np.median(by_steps[s])) for s in xs]
                    ys += y
                    ax.plot(xs, y, marker="o", ms=4, color=_color(p), alpha=0.5 + 0.5 * (d == max(r["depth"] for r in rows)),
                            label=f"{p} d{d}")  # fmt: skip
        ax.set_xscale("log")
        _plain_log(ax.xaxis)
        _logy_if_positive(ax, ys)
        ax.set_xlabel("sampling steps")
        ax.set_title(f"{label.split(' (')[0].split(',')[0]} {where}")
        ax.set_ylabel(label)
    _legend(axes[0, 0], loc="best")
    return fig


def operating_fronts(op: Operating):
    """KID against sampling FLOPs, latency, throughput and prompt-following error at the largest budget: the sweep's
    small-set points faint, the full-set points solid with each paradigm's front, the matched-quality level dashed."""
    if not op.swept:
        return None
    panels = (("sample_flops_per_image", "sampling FLOPs per image", "lower"), ("latency", "latency (s, batch 1)", "lower"),
              ("throughput", "throughput (images/s)", "higher"), ("prompt", "prompt-following error (1 - full match)", "lower"))
    fig, axes = _figure(ncols=4, w=3.9)

    def x_of(r: dict, col: str):
        if col == "latency":
            return latency_of(r)
        if col == "throughput":
            return throughput_of(r)
        if col == "prompt":
            return None if r["prompt_full_match"] is None else 1 - r["prompt_full_match"]
        return r[col]

    for ax, (col, label, better) in zip(axes[0], panels):
        ys = []
        for key in paradigm_order(op):
            pts = op.points[key]
            name = key[0] if len({d for _, d in op.points}) == 1 else f"{key[0]} d{key[1]}"
            faint = [(x, r[QUALITY_COL]) for r in pts.sweep if (x := x_of(r, col)) is not None and r[QUALITY_COL] is not None]
            if faint and col in ("sample_flops_per_image", "prompt"):  # the sweep was not timed
                ax.scatter(*zip(*faint), s=10, color=_color(key[0]), alpha=0.25, linewidths=0)
            full = [(x, r[QUALITY_COL]) for r in pts.full if (x := x_of(r, col)) is not None and r[QUALITY_COL] is not None]
            if not full:
                continue
            ys += [v for _, v in full + faint]
            ax.scatter(*zip(*full), s=16, color=_color(key[0]))
            sign = -1.0 if better == "higher" else 1.0
            front = pareto_front([(sign * x, v) for x, v in full])
            ax.plot([sign * f[0] for f in front], [f[1] for f in front], color=_color(key[0]), label=name)
        if not ys:
            ax.set_visible(False)
            continue
        for depth, level in op.levels.items():
            ax.axhline(level, color="#555555", ls="--", lw=0.8, label="matched quality" if depth == min(op.levels) else None)
        if col != "prompt":
            ax.set_xscale("log")
            if col != "sample_flops_per_image":
                _plain_log(ax.xaxis)
            else:  # FLOPs span decades: label the powers of ten only (minor labels overlap)
                ax.xaxis.set_minor_formatter(NullFormatter())
        _logy_if_positive(ax, ys)
        ax.set_xlabel(label + (" (higher is better)" if better == "higher" else ""))
        ax.set_ylabel("KID (effnet)")
        _legend(ax, loc="best")
    fig.suptitle(f"Operating points at {op.budget:.3g} training FLOPs: faint = sweep (small set), solid = full set")
    return fig


def guidance_sweep(op: Operating):
    """KID and prompt full match against the guidance scale, one line per paradigm and step/solver setting (sweep set)."""
    if not op.swept:
        return None
    fig, axes = _figure(ncols=2, w=4.6)
    styles = ("-", "--", ":", "-.")
    for ax, (col, label) in zip(axes[0], ((QUALITY_COL, "KID (effnet)"), ("prompt_full_match", "prompt full match"))):
        ys = []
        for key in paradigm_order(op):
            lines: dict[str, list] = {}
            for r in op.points[key].sweep:
                if r[col] is not None and r["cfg"] is not None:
                    rest = ",".join(x for x in r["setting"].split(",weights=")[0].split(",") if not x.startswith("cfg="))
                    lines.setdefault(rest, []).append((r["cfg"], r[col]))
            for i, (rest, pts) in enumerate(sorted(lines.items())):
                pts.sort()
                ys += [v for _, v in pts]
                steps = rest.split(",")[0]
                extra = [x for x in rest.split(",")[1:] if x.split("=")[0] in ("solver", "topk", "shift") and x != "topk=0"]
                ax.plot(*zip(*pts), marker="o", ms=3, ls=styles[i % len(styles)], color=_color(key[0]),
                        label=f"{key[0]} {steps}{' ' + ' '.join(extra) if extra else ''}")
        if not ys:
            continue
        if col == QUALITY_COL:
            _logy_if_positive(ax, ys)
        ax.set_xlabel("guidance scale (1 = none)")
        ax.set_ylabel(label)
        _legend(ax, loc="best", fontsize=7)
    fig.suptitle(f"The operating-point sweep at {op.budget:.3g} training FLOPs (small image set)")
    return fig


def ema_sweep(an: Analysis):
    """KID change from raw weights against post-hoc EMA length, per paradigm: each run, the mean, training's EMA."""
    sweep = [e for e in an.ema if e["sigma_rel"] is not None]
    if not sweep:
        return None
    fig, axes = _figure()
    ax = axes[0, 0]
    for p in sorted({e["paradigm"] for e in sweep}):
        mine = sorted((e for e in sweep if e["paradigm"] == p), key=lambda e: e["sigma_rel"])
        runs: dict[str, list[tuple[float, float]]] = {}
        for e in mine:
            for run, _, _, change in e["per_run"]:
                runs.setdefault(run, []).append((e["sigma_rel"], 100 * change))
        for points in runs.values():
            ax.plot(*zip(*sorted(points)), color=_color(p), alpha=0.3, lw=0.8)
        ax.plot([e["sigma_rel"] for e in mine], [100 * e["mean_change"] for e in mine], color=_color(p), lw=2.2,
                marker="o", ms=4, label=p)
        fixed = next((e for e in an.ema if e["paradigm"] == p and e["weights"] == "ema" and e["scope"] == "sweep"), None)
        if fixed and fixed["equivalent_sigma_rel"]:
            ax.plot([fixed["equivalent_sigma_rel"]], [100 * fixed["mean_change"]], color=_color(p), marker="x", ms=9,
                    mew=2, ls="none")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log")
    _plain_log(ax.xaxis)
    ax.set_xlabel("post-hoc EMA length sigma_rel (fraction of the run)")
    ax.set_ylabel("KID change from raw weights (%)")
    _legend(ax, loc="best")
    return fig


def _compare(changes: dict[str, list[dict]], labels: dict[str, str], names: tuple[str, str]):
    metrics = [m for m in labels if changes.get(m)]
    if not metrics:
        return None
    fig, axes = _figure(ncols=len(metrics))
    for ax, m in zip(axes[0], metrics):
        rows = changes[m]
        for p in sorted({r["paradigm"] for r in rows}, key=lambda q: (PARADIGMS.index(q) if q in PARADIGMS else len(PARADIGMS), q)):
            mine = sorted((r for r in rows if r["paradigm"] == p), key=lambda r: r["budget"])
            x = [r["budget"] for r in mine]
            ax.plot(x, [r["base"] for r in mine], "o-", color=_color(p), label=f"{p}, {names[0]}")
            ax.plot(x, [r["other"] for r in mine], "s--", color=_color(p), label=f"{p}, {names[1]}", alpha=0.8)
        ax.set_xscale("log")
        _logy_if_positive(ax, [v for r in rows for v in (r["base"], r["other"])])
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(labels[m])
        ax.set_title(f"{labels[m]}: {names[0]} (solid) vs {names[1]} (dashed)")
    _legend(axes[0][0])
    return fig


def compare_figure(changes: dict[str, list[dict]], labels: dict[str, str], names: tuple[str, str]) -> bytes | None:
    """Two studies' cell values against training FLOPs, one panel per metric in ``labels`` (metric -> axis label):
    ``changes`` rows as :func:`flopmatch.report.compare.cell_changes` gives them (paradigm, budget, base, other)."""
    return _render(_compare, changes, labels, names)


def all_figures(an: Analysis, study: Study) -> dict[str, bytes | None]:
    """Every report figure by name -> PNG bytes (None if it has no data). Order is the report's order."""
    figs = {}
    for m in ("kid", "fid", "fid_inception", "prompt"):
        figs[f"{m}_vs_flops"] = _render(metric_vs_flops, an, m)
    figs["loss_vs_flops"] = _render(loss_vs_flops, an)
    for m in ("kid", "prompt", "loss"):
        figs[f"iso_flop_{m}"] = _render(iso_flops, an, study, m)
    figs["pareto_flops"] = _render(pareto, study, an.paradigms, "sample_flops_per_image", "nokv_sample_flops_per_image",
                                   "sampling FLOPs per image")  # fmt: skip
    figs["pareto_latency"] = _render(pareto, study, an.paradigms, "latency_s", "nokv_latency_s", "latency (s, batch 1)")
    figs["throughput"] = _render(throughput_bars, an)
    figs["step_sweep"] = _render(step_sweep, study, an.paradigms)
    figs["loss_curves"] = _render(loss_curves, study, an.paradigms)
    figs["ema_sweep"] = _render(ema_sweep, an)
    figs["operating_fronts"] = _render(operating_fronts, an.verdicts.operating or Operating(None, {}, {}))
    figs["guidance_sweep"] = _render(guidance_sweep, an.verdicts.operating or Operating(None, {}, {}))
    return figs
