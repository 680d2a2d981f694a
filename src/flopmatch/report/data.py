"""Study directory -> plain rows: one per (run, eval setting), read from run directories alone.

A study directory holds ``runs/<name>/`` run directories (the contract in docs/architecture.md and flopmatch.rundir). For every
run we read ``config.json``, the checkpoint's scalar state (``flopmatch.rundir.read_state``),
``metrics.jsonl`` and ``eval.json``; nothing is recomputed and no log is scraped.

The **main setting** of a run (the one its metric-vs-FLOPs points come from) is chosen as follows:
among the EMA-weight eval entries, the one whose sampler settings equal the run config's default
``sample`` section with steps resolved by the paradigm (``objective.resolve_steps``); if several
entries match (e.g. evaluated twice with different sample counts or seeds) or none does, the one
with the lowest FID (effnet) among the matching ones, or among all EMA entries if none matches, comparing only
entries evaluated on the most images (FID is biased by the number of images); an operating-point sweep's small
set (its own sampling seed, SWEEP_SEED) never wins over the full set.
The reason is recorded per run (``main_reason``). ``full_set`` marks the rows on the main setting's
image set, whose FIDs compare with it. Inference plots use every full-set setting.

FID's counts: an entry evaluated since FID compares equal counts records ``fid_num_real`` (the first
min(M, R) eval images; see :mod:`flopmatch.evaluation.run`); an older entry's FID was against the whole
evaluation split, so its ``fid_num_real`` is that split's size (its recorded ``num_real``, else the
manifest's reference size) and ``fid_counts_recorded`` is False. FIDs compare only at equal counts: when
rows of one generated count (``num_samples``) rest on different real counts, :func:`fid_count_problems`
says so in the study's ``problems``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from flopmatch import PARADIGMS
from flopmatch import ema as phema
from flopmatch.config import RENAMED
from flopmatch.errors import UserError
from flopmatch.evaluation.features import CLEAN_RESIZE as INCEPTION_RESIZE
from flopmatch.evaluation.operating import SWEEP_SEED
from flopmatch.evaluation.timing import read_timing
from flopmatch.files import load_tensors, read_json
from flopmatch.nets import NetSpec
from flopmatch.objectives import make_objective
from flopmatch.plan import net_spec_for
from flopmatch.rundir import BUDGETS, CONFIG, METRICS, read_config, read_eval_entries, read_state, run_label, sample_dir

PROMPT_ATTRIBUTES = ("color", "shape", "size", "position", "relation", "count")
# prompt groups with a full-match column and an n column each (flopmatch.evaluation.prompt_groups)
PROMPT_GROUPS = ("seen", "held_out", "one_object", "two_object")
LOSS_TAIL = 0.1  # final loss = mean of the last 10 % of logged losses (at least one row)

# results.csv columns, in order; every row has every key (None when not measured)
COLUMNS = [
    "run", "run_dir", "objective", "depth", "width", "params", "budget", "schedule", "origin", "seed", "train_flops", "steps",
    "total_steps", "done", "final_loss", "evaluated", "setting", "main", "main_reason", "weights", "posthoc_residual",
    "sample_steps", "cfg", "temperature", "top_k", "solver", "num_samples", "eval_seed", "full_set",  # "cfg": the guidance scale (v0.1 name)
    "fid_num_real",  # real images FID used (the generated ones: num_samples); FIDs compare only at equal counts
    "fid_effnet", "fid_se_effnet", "kid_effnet", "kid_se_effnet", "kid_std_effnet", "precision", "recall", "fid_inception",
    "fid_se_inception", "kid_inception", "kid_se_inception",
    "prompt_full_match", *[f"prompt_{a}" for a in PROMPT_ATTRIBUTES],
    *[f"prompt_full_match_{g}" for g in PROMPT_GROUPS], *[f"prompt_n_{g}" for g in PROMPT_GROUPS],
    "sample_flops_per_image", "decode_flops_per_image", "latency_s", "throughput_images_per_s", "throughput_batch",
    "device", "threads", "bf16", "timing_source",
    "nokv_sample_flops_per_image", "nokv_latency_s", "nokv_throughput_images_per_s", "samples_dir",
]  # fmt: skip


@dataclass
class RunInfo:
    """One run directory: its identity, training status and loss curve."""

    name: str
    rel: str  # run dir relative to the study dir
    objective: str
    depth: int
    seed: int
    budget: float
    state: dict | None  # checkpoint state, None before the first checkpoint
    curve: list[tuple[float, float]]  # (cumulative FLOPs, loss) per logged step
    evaluated: bool
    problems: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return bool(self.state and self.state.get("done"))


@dataclass
class Study:
    """Everything the report needs, read from a study directory."""

    root: Path
    # One row per (run, eval setting), sorted by (paradigm, depth, budget, seed, run, setting). Keys are
    # COLUMNS (plus ``latency_s_all`` and ``throughput_all``, the latency (s) and throughput (images/s)
    # of every timing round, and ``fid_boot_<extractor>``, FID's evaluation-noise replicates over generated
    # images (jackknife pseudo-replicates; bootstrap replicates in older entries), and on shapes ``prompt_by_group`` / ``prompt_holdout``, the scores per prompt group and what the
    # data held out: see flopmatch.evaluation.prompt_groups). Timings come from the study's timing phase (``inference_timing.json``, the same figures
    # for every run of a (paradigm, depth) and setting; ``timing_source`` "study") where it has them,
    # else from the run's own eval entry ("eval"). Units: budget and train_flops in FLOPs, latency
    # in seconds, throughput in images/s. A run without eval entries gets one row with ``evaluated`` False.
    rows: list[dict]
    runs: list[RunInfo]
    problems: list[str]  # run directories that could not be read at all, with the reason; FIDs at mixed counts
    timing: dict | None = None  # inference_timing.json of the study's timing phase, if any


def _paradigm_order(name: str) -> int:
    return PARADIGMS.index(name) if name in PARADIGMS else len(PARADIGMS)


def _read_curve(path: Path) -> list[tuple[float, float]]:
    """(flops, loss) of each logged step; unparsable lines (an interrupted append) are skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
            out.append((float(r["flops"]), float(r["loss"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return out


def final_loss(curve: list[tuple[float, float]]) -> float | None:
    """Mean of the last ``LOSS_TAIL`` fraction of logged losses (at least one); None if nothing logged."""
    if not curve:
        return None
    k = max(1, math.ceil(LOSS_TAIL * len(curve)))
    tail = [loss for _, loss in curve[-k:]]
    return sum(tail) / len(tail)


def _resolved_steps(cfg, state: dict | None) -> int | None:
    """Sampling steps of the run's default settings, resolved by its paradigm (None if unknown)."""
    try:
        if state and "net_spec" in state:
            spec = NetSpec.from_dict(state["net_spec"])
        else:
            spec = net_spec_for(cfg)
        return int(make_objective(cfg.objective).resolve_steps(cfg.sample, spec))
    except (UserError, TypeError, KeyError, OSError):
        return None


def _weights(key: str, entry: dict) -> str:
    w = (entry.get("manifest") or {}).get("weights")
    if w:
        return w
    return "model" if "weights=model" in key else "ema"


def _fid(entry: dict) -> float:
    v = ((entry.get("metrics") or {}).get("effnet") or {}).get("fid")
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.inf


def _matches(settings: dict, sample, steps: int | None) -> bool:
    def close(a, b):
        return isinstance(a, (int, float)) and math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)

    if steps is not None and settings.get("steps") != steps:
        return False
    if steps is None and sample.steps and settings.get("steps") != sample.steps:
        return False
    for name in ("guidance", "temperature", "top_k", "choice_temperature", "kv_cache", "solver", "shift"):
        if name in settings and not (settings[name] == getattr(sample, name) or close(settings[name], getattr(sample, name))):
            return False
    return True


def _settings(entry: dict) -> dict:
    """An entry's sampler settings with today's key names (v0.1 entries say "cfg" for the guidance scale)."""
    s = dict(entry.get("settings") or {})
    for (section, old), new in RENAMED.items():
        if section == "SampleConfig" and old in s and new not in s:
            s[new] = s.pop(old)
    return s


def main_setting(entries: dict, sample, steps: int | None) -> tuple[str | None, str]:
    """(key, reason) of the run's main eval setting among ``entries`` (see the module docstring)."""
    if not entries:
        return None, "no eval entries"
    ema = {k: e for k, e in entries.items() if _weights(k, e) == "ema"} or entries

    def full_set(keys: list[str], by_seed: bool) -> list[str]:
        """The keys evaluated on the full set: not the operating-point sweep's small set, the most images (then, with
        ``by_seed``, the lowest sampling seed). FID is biased by the number of images, so only these compare."""
        rank = {k: (_manifest(ema[k]).get("seed") == SWEEP_SEED, -(_manifest(ema[k]).get("num_samples") or 0),
                    (_manifest(ema[k]).get("seed") or 0) if by_seed else 0) for k in keys}
        return [k for k in keys if rank[k] == min(rank.values())]

    match = sorted(k for k, e in ema.items() if _matches(_settings(e), sample, steps))
    if len(match) > 1:  # an operating-point sweep's small set evaluates the default setting too, on other images
        match = full_set(match, by_seed=True)  # (flopmatch.evaluation.operating)
    if len(match) == 1:
        return match[0], "matches the run's default sample settings"
    pool = full_set(match or sorted(ema), by_seed=False)
    best = min(pool, key=lambda k: (_fid(ema[k]), k))
    why = "several entries match the default settings" if match else "no entry matches the default settings"
    return best, f"{why}: lowest FID (effnet) chosen"


def _manifest(entry: dict) -> dict:
    return entry.get("manifest") or {}


def _inception_resize(entry: dict) -> str | None:
    return ((_manifest(entry).get("feature_extractors") or {}).get("inception") or {}).get("resize")


def _num(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _fid_num_real(entry: dict, feats: dict) -> tuple[int | None, bool]:
    """(real images behind an entry's FID, whether the entry recorded it) from one extractor's metrics.

    Entries from before equal-count FID have no ``fid_num_real``: their FID used the whole evaluation split,
    whose size is their ``num_real`` (or the manifest's reference size)."""
    if feats.get("fid") is None:
        return None, False
    if isinstance(feats.get("fid_num_real"), int):
        return feats["fid_num_real"], True
    size = feats.get("num_real", ((_manifest(entry).get("reference") or {}).get("size")))
    return (size if isinstance(size, int) and not isinstance(size, bool) else None), False


def _entry_fields(key: str, entry: dict) -> dict:
    s, m, inf = _settings(entry), entry.get("metrics") or {}, entry.get("inference") or {}
    eff, inc, pf = m.get("effnet") or {}, m.get("inception") or {}, m.get("prompt_following") or {}
    nokv = inf.get("without_kv_cache") or {}
    fid_num_real, recorded = _fid_num_real(entry, eff)
    out = {
        "setting": key, "weights": _weights(key, entry),
        # not a CSV column: False for an entry from before equal-count FID (its count inferred: the whole split)
        "fid_num_real": fid_num_real, "fid_counts_recorded": recorded,
        # a post-hoc EMA entry (weights "ema@SIGMA_REL"): how far its rebuilt averaging profile is from the wanted one
        "posthoc_residual": _num(((entry.get("manifest") or {}).get("posthoc_ema") or {}).get("profile_residual")),
        "sample_steps": s.get("steps"), "cfg": _num(s.get("guidance")),
        "temperature": _num(s.get("temperature")), "top_k": s.get("top_k"), "solver": s.get("solver"),
        "num_samples": (entry.get("manifest") or {}).get("num_samples"), "eval_seed": (entry.get("manifest") or {}).get("seed"),
        "fid_effnet": _num(eff.get("fid")), "kid_effnet": _num(eff.get("kid")), "kid_std_effnet": _num(eff.get("kid_std")),
        "precision": _num(eff.get("precision")), "recall": _num(eff.get("recall")),
        # Inception FID only through today's resize (clean-fid's): an older entry's bilinear FID is another number
        "fid_inception": _num(inc.get("fid")) if _inception_resize(entry) == INCEPTION_RESIZE else None,
        "kid_inception": _num(inc.get("kid")) if _inception_resize(entry) == INCEPTION_RESIZE else None,
        "prompt_full_match": _num(pf.get("full_match")),
        "sample_flops_per_image": _num(inf.get("sample_flops_per_image")),
        "decode_flops_per_image": _num(inf.get("decode_flops_per_image")), "latency_s": _num(inf.get("latency_s")),
        "throughput_images_per_s": _num(inf.get("throughput_images_per_s")), "throughput_batch": inf.get("throughput_batch"),
        "device": inf.get("device"), "threads": inf.get("threads"), "bf16": inf.get("bf16"),
        "nokv_sample_flops_per_image": _num(nokv.get("sample_flops_per_image")), "nokv_latency_s": _num(nokv.get("latency_s")),
        "nokv_throughput_images_per_s": _num(nokv.get("throughput_images_per_s")),
        # not a CSV column: the latency of every timing round (v0.2 entries: of every repeat)
        "latency_s_all": [x for x in inf.get("latency_rounds") or inf.get("latency_s_all") or [] if _num(x) is not None],
        "throughput_all": [x for x in inf.get("throughput_rounds") or [] if _num(x) is not None],
        "timing_source": "eval" if _num(inf.get("latency_s")) is not None else None,
        # not CSV columns: who scored prompt following, and its chance level (R-precision: 1 / R)
        "prompt_evaluator": (entry.get("manifest") or {}).get("prompt_evaluator"), "prompt_chance": _num(pf.get("chance")),
    }  # fmt: skip
    for name, feats in (("effnet", eff), ("inception", inc)):
        # FID jackknife and KID bootstrap over generated images (evaluation noise): the std is a column, the replicates are not
        for metric in ("fid", "kid"):
            boot = feats.get(f"{metric}_boot") or {}
            out[f"{metric}_se_{name}"] = _num(boot.get("std"))
            out[f"{metric}_boot_{name}"] = [x for x in boot.get("replicates") or [] if _num(x) is not None]
    for a in PROMPT_ATTRIBUTES:
        out[f"prompt_{a}"] = _num(pf.get(a))
    # per prompt group (entries scored before groups existed have none): full match and n; not a CSV column:
    # every group's scores and what the data held out
    groups = pf.get("by_group") or {}
    for g in PROMPT_GROUPS:
        out[f"prompt_full_match_{g}"] = _num((groups.get(g) or {}).get("full_match"))
        out[f"prompt_n_{g}"] = (groups.get(g) or {}).get("num_images")
    out["prompt_by_group"], out["prompt_holdout"] = groups, pf.get("holdout")
    return out


def _timing_fields(item: dict) -> dict:
    """Row fields from one item of the study's timing phase (see :mod:`flopmatch.evaluation.timing`)."""
    nokv = item.get("without_kv_cache") or {}
    return {
        "latency_s": _num(item.get("latency_s")), "throughput_images_per_s": _num(item.get("throughput_images_per_s")),
        "throughput_batch": item.get("throughput_batch"), "timing_source": "study",
        "latency_s_all": [x for x in item.get("latency_rounds") or [] if _num(x) is not None],
        "throughput_all": [x for x in item.get("throughput_rounds") or [] if _num(x) is not None],
        "nokv_latency_s": _num(nokv.get("latency_s")), "nokv_throughput_images_per_s": _num(nokv.get("throughput_images_per_s")),
    }  # fmt: skip


def _timed(timing: dict | None) -> dict[tuple[str, int, str], dict]:
    """The timing phase's items by (paradigm, depth, setting key without weights/n/seed)."""
    items = (timing or {}).get("items") or []
    machine = (timing or {}).get("machine") or {}
    extra = {"device": machine.get("device"), "threads": machine.get("threads"), "bf16": machine.get("bf16")}
    return {(i["objective"], int(i["depth"]), i["setting"]): _timing_fields(i) | extra for i in items
            if isinstance(i, dict) and {"objective", "depth", "setting"} <= set(i)}


def _read_run(root: Path, run: Path, timed: dict | None = None) -> tuple[RunInfo, list[dict]]:
    cfg = read_config(run)  # a UserError here makes the run unreadable (caller lists it)
    problems = []
    try:
        state = read_state(run)
    except UserError as e:
        state, problems = None, [str(e)]
    entries = {}
    try:
        # FID against an imported reference (`flopmatch eval --ref-stats`) compares with no other entry: left out
        entries = {k: e for k, e in read_eval_entries(run).items()
                   if not ((e.get("manifest") or {}).get("reference") or {}).get("imported")}
    except (UserError, AttributeError) as e:
        problems.append(f"unreadable eval.json ({e})")
    curve = _read_curve(run / METRICS)
    rel = run.relative_to(root).as_posix()
    name = run_label(run)  # a kept budget's result: R@2e12
    info = RunInfo(name, rel, cfg.objective.name, cfg.model.depth, cfg.train.seed, float(cfg.train.budget), state,
                   curve, bool(entries), problems)  # fmt: skip
    spec = (state or {}).get("net_spec") or {}
    base = {
        "run": name, "run_dir": rel, "objective": cfg.objective.name, "depth": cfg.model.depth,
        "width": spec.get("width", cfg.model.width), "params": (state or {}).get("params"),
        "budget": float(cfg.train.budget), "schedule": cfg.train.schedule,  # cosine | wsd | constant (flopmatch.schedule)
        "origin": run_origin(state),
        "seed": cfg.train.seed, "train_flops": (state or {}).get("flops"),
        "steps": (state or {}).get("step"), "total_steps": (state or {}).get("total_steps"), "done": info.done,
        "final_loss": final_loss(curve), "evaluated": bool(entries),
        # not a CSV column: the relative length of the EMA training kept, comparable with post-hoc EMAs' sigma_rel
        "ema_sigma_rel": (phema.fixed_ema_sigma_rel(state["total_steps"], cfg.train.ema_decay)
                          if (state or {}).get("total_steps") else None),
    }  # fmt: skip
    main_key, reason = main_setting(entries, cfg.sample, _resolved_steps(cfg, state))
    rows = []
    for key in sorted(entries, key=lambda k: (_setting_order(entries[k]), k)):
        row = {c: None for c in COLUMNS} | base | _entry_fields(key, entries[key])
        if row["weights"] == "ema":  # the timing phase timed the EMA settings (raw weights: same architecture, not timed)
            row |= (timed or {}).get((row["objective"], row["depth"], key.split(",weights=")[0]), {})
        row["main"] = key == main_key
        row["main_reason"] = reason if key == main_key else None
        # on the main setting's image set (its sample count and sampling seed), so its FID compares with the main one's;
        # False for an operating-point sweep's small set (flopmatch.evaluation.operating)
        main_entry = entries.get(main_key) or {}
        row["full_set"] = ((row["num_samples"], row["eval_seed"])
                           == (_manifest(main_entry).get("num_samples"), _manifest(main_entry).get("seed")))
        sd = sample_dir(run, key)
        row["samples_dir"] = sd.relative_to(root).as_posix() if sd.is_dir() else None
        rows.append(row)
    if not rows:  # one row per run even when it was never evaluated, so the table lists every run
        rows.append({c: None for c in COLUMNS} | base | {"main": False, "latency_s_all": [], "throughput_all": [],
                                                          "fid_boot_effnet": [], "fid_boot_inception": [],
                                                          "kid_boot_effnet": [], "kid_boot_inception": []})  # fmt: skip
    return info, rows


def run_origin(state: dict | None) -> str:
    """Where a run's training started: "scratch", "branched from RUN at step N" (a study's wsd/constant chain started
    it from an earlier run's stable-phase state, :func:`flopmatch.growth.branch_run`), or "continued from budget B at
    step N" (``train --budget`` grew it, :func:`flopmatch.growth.continue_run`; the latest continuation)."""
    state = state or {}
    src, history = state.get("branched_from"), state.get("budget_history") or []
    if history:
        last = history[-1]
        return f"continued from budget {last['budget']:.3g} at step {last['continued_from_step']}"
    if src:
        return f"branched from {src['run']} at step {src['step']}"
    return "scratch"


def _setting_order(entry: dict) -> tuple:
    s = _settings(entry)
    return tuple(float(s[k]) if isinstance(s.get(k), (int, float)) else math.inf for k in ("steps", "guidance", "temperature", "top_k"))


def _run_order(info: RunInfo) -> tuple:
    return (_paradigm_order(info.objective), info.objective, info.depth, info.budget, info.seed, info.name)


def load_study(study_dir: str | Path) -> Study:
    """Read every run under ``study_dir/runs/*/`` (those with a config.json), and the earlier budgets' results kept
    in them (``runs/R/budgets/<budget>/``, named ``R@<budget>``), in a deterministic order."""
    root = Path(study_dir)
    runs_dir = root / "runs"
    if not root.exists():
        raise UserError(f"{root} does not exist; give the study root, the directory `flopmatch study --out` wrote")
    if not runs_dir.is_dir():
        raise UserError(f"{root} is not a study directory (no runs/ inside); give the study root, the directory "
                        f"`flopmatch study --out` wrote")
    found = sorted(p for p in runs_dir.iterdir() if p.is_dir() and (p / CONFIG).exists())
    if not found:
        raise UserError(f"no run directories with a config.json under {runs_dir}")
    # A run continued to a larger budget (`flopmatch train --budget`, flopmatch.growth) keeps each earlier budget's
    # result, a run directory of its own, under budgets/<budget>/: a point of that run's trend (a study's chains
    # branch a run per budget instead, so its runs keep none)
    found += sorted(kept for run in found for kept in (run / BUDGETS).glob("*")  # not a half-kept .<budget>.tmp
                    if not kept.name.startswith(".") and (kept / CONFIG).exists())
    read, problems = [], []
    try:
        timing = read_timing(root)
    except UserError as e:
        timing = None
        problems.append(str(e))
    timed = _timed(timing)
    for run in found:
        try:
            read.append(_read_run(root, run, timed))
        except UserError as e:
            problems.append(f"{run.relative_to(root).as_posix()}: {e}")
    read.sort(key=lambda ir: _run_order(ir[0]))
    rows = [r for _, rows in read for r in rows]
    return Study(root, rows, [i for i, _ in read], problems + fid_count_problems(rows), timing)


def fid_count_problems(rows: list[dict]) -> list[str]:
    """One line per generated-image count whose rows' FIDs rest on different real-image counts (else nothing).

    FID's small-sample bias depends on both counts, so such FIDs differ for that reason alone; the usual cause
    is a study holding evaluations from before FID compared equal counts (their FID: against the whole split)."""
    by_n: dict[int, dict[int, list[dict]]] = {}
    for r in rows:
        if r.get("fid_effnet") is not None and r.get("num_samples") and r.get("fid_num_real"):
            by_n.setdefault(r["num_samples"], {}).setdefault(r["fid_num_real"], []).append(r)
    out = []
    for n, groups in sorted(by_n.items()):
        if len(groups) < 2:
            continue
        parts = []
        for real, group in sorted(groups.items()):
            runs = sorted({r["run"] for r in group})
            names = ", ".join(runs[:3]) + (f" and {len(runs) - 3} more" if len(runs) > 3 else "")
            old = sum(not r.get("fid_counts_recorded") for r in group)
            why = f"; {old} evaluated before equal counts, against the whole evaluation split" if old else ""
            parts.append(f"{real} real in {len(group)} entries ({names}{why})")
        out.append(f"FIDs of {n} generated images rest on different real-image counts, so they are not comparable: "
                   f"{'; '.join(parts)}. To compare them, re-evaluate the older runs (move their eval.json aside and re-run the study)")
    return out


def first_images(root: Path, row: dict, n: int = 8):
    """(uint8 images (n', 3, H, W), prompts) of a row's saved samples, or (None, []) if not saved."""
    if not row.get("samples_dir"):
        return None, []
    d = root / row["samples_dir"]
    try:
        images = load_tensors(d / "images.safetensors")["images"][:n]
        prompts = read_json(d / "prompts.json")[:n] if (d / "prompts.json").exists() else []
    except (UserError, KeyError, TypeError):
        return None, []
    return images, [str(p) for p in prompts]
