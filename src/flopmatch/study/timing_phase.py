"""The study's timing phase: every paradigm's latency and throughput measured together, once, at the end.

Timings taken while other workers train, or in another session under another load, cannot be
compared (a resumed study once flipped its latency verdict with full confidence that way). So study
evaluations record analytic FLOPs only, and this phase, which runs after every run is trained and
evaluated (no worker is running then), times every evaluated setting of every paradigm in interleaved
rounds (:mod:`flopmatch.evaluation.timing`) and writes ``<study>/inference_timing.json``.

*What is timed.* Sampling cost depends on the architecture and the setting, not on the weights, so one
run stands for each (paradigm, depth): its finished run with the largest budget, lowest seed. Every
EMA setting the study evaluates on its full set (the main one, the step counts of a study without an
operating-point sweep, the sweep's chosen points) is an item; next-token also with its KV cache
flipped. Items whose computation is the same (they differ only in the guidance scale above 1, a
temperature or the time shift) are timed once and share the figures (``timed_as``).

*Never a mix.* The file lists the items it timed. A re-run study reuses it only if it needs exactly
those items and ``--retime`` was not given; otherwise every item is timed again, together, and the
file is replaced whole (atomically), so it never holds timings from two phases.

*Quiet.* The cores other processes kept busy during the timed rounds are measured (Linux ``/proc/stat``,
:func:`flopmatch.evaluation.timing.other_busy_cores`); the figure is recorded, and a busy machine is warned
about, since it inflates the spread.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from flopmatch.config import RunConfig, SampleConfig, from_dict
from flopmatch.evaluation.inference import inference_cost
from flopmatch.evaluation.run import EvalConfig, setting_key, timing_fields, timing_items
from flopmatch.evaluation.timing import BURN_IN, BUSY_CORES, TIMING, TIMING_VERSION, machine, read_timing, time_items
from flopmatch.files import atomic_write_json
from flopmatch.objectives import make_objective
from flopmatch.plan import net_spec_for
from flopmatch.rundir import read_state
from flopmatch.sample import load_sampler
from flopmatch.study.operating import chosen_settings, selection_run, sweep_eval, sweep_settings
from flopmatch.study.plan import RunPlan, eval_settings, fmt_duration
from flopmatch.study.presets import StudyConfig


def timing_plan(out: Path, scfg: StudyConfig, plans: list[RunPlan]) -> list[dict]:
    """The items the study needs timed: per (paradigm, depth), its representative run and every EMA setting."""
    reps: dict[tuple[str, int], RunPlan] = {}
    for p in plans:
        run = out / "runs" / p.name
        if not (run / "config.json").exists() or not read_state(run).get("done"):
            continue
        cur = reps.get((p.objective, p.depth))
        if cur is None or (p.budget, -p.seed) > (cur.budget, -cur.seed):
            reps[(p.objective, p.depth)] = p
    items = []
    for (objective, depth), p in sorted(reps.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        cfg = from_dict(RunConfig, p.config)
        obj, spec = make_objective(cfg.objective), net_spec_for(cfg)
        keys = set()
        settings = eval_settings(scfg, cfg)
        if selection_run(scfg, p):  # the operating-point sweep's chosen points (none until the sweep is evaluated)
            ecfg = EvalConfig(num_samples=scfg.eval_samples, features=list(scfg.features))
            settings += chosen_settings(out / "runs" / p.name, cfg, sweep_settings(scfg, cfg), sweep_eval(ecfg, scfg)) or []
        for s in settings:
            key = setting_key(s, obj.resolve_steps(s, spec))
            if key not in keys:  # e.g. eval_steps listing the default step count: one setting, timed once
                keys.add(key)
                items.append({"objective": objective, "depth": depth, "run": p.name, "setting": key, "sample": asdict(s)})
    return items


def _cost_key(item: dict) -> tuple:
    """What an item's sampling computes: architecture, steps, solver, guidance on or off, top-k, KV cache, and masked's
    Gumbel noise on confidences (on when its choice temperature is above 0)."""
    s = item["sample"]
    steps = item["setting"].split(",", 1)[0]  # "steps=N", resolved
    return (item["run"], steps, s.get("solver"), s.get("guidance") != 1.0, s.get("top_k"), s.get("kv_cache"),
            (s.get("choice_temperature") or 0) > 0)


def _signature(items: list[dict]) -> list[str]:
    return sorted(f"{it['objective']}|{it['depth']}|{it['setting']}|{it['sample'].get('kv_cache')}" for it in items)


def _reusable(old: dict | None, wanted: list[dict], scfg: StudyConfig) -> bool:
    """Whether the saved timing ``old`` holds exactly the ``wanted`` items, timed with the study's rounds after a burn-in
    round (a timing from before the burn-in is taken again: its first round could flip a ratio)."""
    return (old is not None and old.get("signature") == _signature(wanted) and old.get("rounds") == scfg.timing_rounds
            and old.get("burn_in") == BURN_IN)


def timing_needed(out: Path, scfg: StudyConfig, plans: list[RunPlan], retime: bool = False) -> bool:
    """Whether :func:`ensure_timing` would time anything (a launcher that runs it elsewhere asks first)."""
    wanted = timing_plan(out, scfg, plans)
    return bool(wanted) and (retime or not _reusable(read_timing(out), wanted, scfg))


def timing_stamp(out: Path) -> int | None:
    """When the study's timing file was last written (ns), None if there is none: tells a new timing from an old one."""
    path = out / TIMING
    return path.stat().st_mtime_ns if path.exists() else None


def ensure_timing(out: Path, scfg: StudyConfig, plans: list[RunPlan], retime: bool = False, progress: bool = True) -> dict | None:
    """Time every item of :func:`timing_plan` together unless ``inference_timing.json`` already holds exactly them."""
    wanted = timing_plan(out, scfg, plans)
    if not wanted:
        return None
    old = read_timing(out)
    if not retime and _reusable(old, wanted, scfg):
        print(f"[study] inference timing: reusing {out / TIMING} ({len(wanted)} settings timed together; "
              "--retime to measure again)")
        return old
    why = "--retime" if old is not None and retime else "the study's settings changed" if old is not None else "first time"
    print(f"[study] inference timing: {len(wanted)} settings of {len({(i['objective'], i['depth']) for i in wanted})} "
          f"architectures, {scfg.timing_rounds} interleaved rounds ({why})", flush=True)
    samplers = {name: load_sampler(out / "runs" / name, weights="ema") for name in sorted({i["run"] for i in wanted})}
    pairs = [(f"{i['objective']} d{i['depth']} {i['setting']}", i) for i in wanted]
    # Settings that differ only in what costs nothing (the guidance scale above 1, temperatures, the time shift) run the
    # same computation: time one of them and give the others its figures ("timed_as"), which keeps the phase short.
    first_of: dict[tuple, str] = {}
    timed_as = {key: first_of.setdefault(_cost_key(i), key) for key, i in pairs}
    tim = []
    for key, i in pairs:
        if timed_as[key] == key:
            tim += timing_items(samplers[i["run"]], [(key, from_dict(SampleConfig, i["sample"]))])
    t0, during = time.perf_counter(), {}
    results = time_items(tim, rounds=scfg.timing_rounds, search_budget_s=scfg.timing_budget_s, progress=progress,
                         load=during)
    seconds, load = time.perf_counter() - t0, during.get("other_busy_cores")
    items = []
    for key, i in pairs:
        sampler, sample = samplers[i["run"]], from_dict(SampleConfig, i["sample"])
        cost = inference_cost(sampler, sample)
        fields = timing_fields(results, timed_as[key], sample.kv_cache)
        for name in ("with_kv_cache", "without_kv_cache"):
            if name in fields:
                fields[name] = {**cost.get(name, {}), **fields[name]}
        same = {"timed_as": timed_as[key].split(" ", 2)[2]} if timed_as[key] != key else {}
        items.append({**i, **{k: v for k, v in cost.items() if not isinstance(v, dict)}, **fields, **same})
    first = next(iter(samplers.values()))
    doc = {
        "version": TIMING_VERSION, "signature": _signature(wanted), "rounds": scfg.timing_rounds, "burn_in": BURN_IN,
        "machine": {**machine(), "device": str(first.device), "bf16": first.bf16},
        "other_busy_cores_during": load, "seconds": seconds, "items": items,
        "note": "every item timed in the same phase, interleaved, after one untimed burn-in round; medians over rounds, "
                "every round kept",
    }  # fmt: skip
    if load is not None and load > BUSY_CORES:
        print(f"[study] warning: other processes kept {load:.1f} cores busy while the rounds ran; the spread between "
              "rounds will show it (re-run with --retime on a quiet machine)")
    atomic_write_json(out / TIMING, doc)
    print(f"[study] inference timing took {fmt_duration(seconds)}; wrote {out / TIMING}")
    return doc
