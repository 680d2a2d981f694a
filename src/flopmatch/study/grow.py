"""Studies that grow: re-running ``flopmatch study`` on an existing study directory with more budgets,
seeds, depths, paradigms or evaluated step counts trains and evaluates only the new cells.

A change is accepted when every run the study already planned is still in the new plan with the same
run config (so old and new cells are comparable), and every setting that is not a grid axis is
unchanged. Anything else is refused, naming the setting, since it would mix incomparable cells in one
report (the report reads every run under ``runs/``):

- grid axes (``objectives``, ``depths``, ``budgets``, ``seeds``, ``floor_seeds``, ``base_seed``): may
  add cells, never drop one that has begun (its run directory exists, or a SLURM job was submitted for it); a
  planned cell that never began (a growth stopped before it, or a mistyped budget) may be dropped again;
- evaluation axes (``eval_raw``, ``eval_ema``, ``sweep_guidance``; ``eval_steps`` and ``eval_variants`` too, which
  have no flag: only a study.json edited by hand changes them): may add settings, never drop one;
- everything else that defines runs or their evaluation (the ``--set`` overrides, tokenizer, number of
  evaluation samples, guidance, feature extractors): must be equal;
- ``StudyConfig.NOT_IDENTITY`` (timing and report settings) and run-config keys in
  ``rundir.NOT_IDENTITY`` (trackers): free to change.

The extra seeds that measure seed variance and the post-hoc EMA sweep sit at the middle budget; adding budgets
would move the middle, so a grown study keeps them where they are (``floor_budget``) once a run there has begun
(until then the floor is chosen again, like a new study's, so a mistyped middle budget can still be dropped).

The run configs say ``train.device`` and ``train.precision``, but ``auto`` resolves per machine: a study grown on
another kind of machine would train its new cells on another device or in another precision. :func:`check_same_machine`
compares what the study's runs recorded (their checkpoints' ``device_type`` and ``bf16``) with what its runs that have
not begun would get here, and refuses a difference; :func:`mixed_evaluators` says when the runs' eval.json manifests
name more than one evaluator (the cached prompt evaluators are trained per machine, in bf16 or fp32).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from flopmatch.config import from_dict
from flopmatch.device import resolve_device, use_bf16
from flopmatch.errors import UserError
from flopmatch.files import read_json
from flopmatch.rundir import dict_diffs, read_eval_entries, read_state
from flopmatch.study.job import chain_name
from flopmatch.study.plan import RunPlan, make_plan
from flopmatch.study.presets import SEED_STRIDE, StudyConfig
from flopmatch.study.slurm import JOBS_FILE

GRID = ("objectives", "depths", "budgets", "seeds", "floor_seeds", "base_seed")
ADDITIVE = ("eval_steps", "eval_raw", "eval_ema", "sweep_guidance", "eval_variants")
# the axes a command line grows (eval_steps and eval_variants have no flag), for the refusals
GROW_FLAGS = "--objectives, --depths, --budgets, --seeds, --floor-seeds, --eval-raw, --eval-ema or --sweep-guidance"
LABEL = ("preset",)  # a name only: the settings it stood for are compared one by one


def _get(cfg: dict, path: str):
    for part in path.split("."):
        cfg = cfg.get(part, {}) if isinstance(cfg, dict) else None
    return cfg


def _fewer_evaluations(old: StudyConfig, new: StudyConfig) -> str | None:
    """The evaluation axis that ``new`` shrinks compared with ``old``, if any."""
    if old.eval_raw and not new.eval_raw:
        return "eval_raw"
    if not set(old.eval_ema) <= set(new.eval_ema):
        return "eval_ema"
    if not set(old.sweep_guidance) <= set(new.sweep_guidance):
        return "sweep_guidance"
    for objective, variants in old.eval_variants.items():
        if objective in new.objectives and any(v not in new.eval_variants.get(objective, []) for v in variants):
            return "eval_variants"
    for objective, steps in old.eval_steps.items():
        if objective in new.objectives and not set(steps) <= set(new.eval_steps.get(objective, [])):
            return "eval_steps"
    return None


def _begun(out: Path, p: RunPlan) -> bool:
    """Whether a planned run has begun: its run directory exists, or a SLURM job was submitted for it or for the
    chain it trains in (a queued job would create it later)."""
    jobs = out / "slurm" / JOBS_FILE
    if (out / "runs" / p.name).exists():
        return True
    ids = read_json(jobs) if jobs.exists() else {}
    chain = chain_name(p.config)
    if p.name in ids:
        return True
    if chain not in ids:
        return False
    # the chain's job was submitted: with this run in it? (its description in jobs/, rewritten when a study grows)
    described = out / "jobs" / f"{chain}.json"
    return not described.exists() or p.name in {j.get("name") for j in read_json(described).get("chain", [])}


def _dropping_axis(p: RunPlan, scfg: StudyConfig, old: StudyConfig) -> str:
    """The grid axis of ``scfg`` that leaves the planned run ``p`` of the saved study ``old`` out."""
    for axis, value in (("objectives", p.objective), ("depths", p.depth), ("budgets", p.budget)):
        if value not in getattr(scfg, axis):
            return axis
    # its seed is not among the new plan's for its cell: one of the floor budget's extra seeds, or a seed of every cell
    first = scfg.first_seed if scfg.first_seed >= 0 else scfg.base_seed * SEED_STRIDE
    return "floor_seeds" if p.seed - first >= old.seeds else "seeds"


def _progress(out: Path, name: str) -> str:
    """', step s of N' for a begun run of the study ``out`` that has not finished training, else ''."""
    state = read_state(out / "runs" / name)  # None: no directory, or no checkpoint yet
    return f", step {state['step']} of {state['total_steps']}" if state and not state.get("done") else ""


def _drop_hint(out: Path, dropped: list[str]) -> str:
    """How to drop runs begun by mistake, when every one of ``dropped`` is an unfinished run directory with no SLURM
    job: deleting the directory makes the run one that never began (:func:`_begun`). Finished runs get no hint: their
    results are what the study is for."""
    jobs = out / "slurm" / JOBS_FILE
    queued = read_json(jobs) if jobs.exists() else {}
    for name in dropped:
        state = read_state(out / "runs" / name)
        if name in queued or not (out / "runs" / name).is_dir() or (state and state.get("done")):
            return ""
    if len(dropped) == 1:
        return f"; or, to drop this unfinished run begun by mistake, delete {out / 'runs' / dropped[0]}"
    return f"; or, to drop these {len(dropped)} unfinished runs begun by mistake, delete their directories in {out / 'runs'}"


def reconcile(saved: dict, scfg: StudyConfig, out: Path) -> tuple[StudyConfig, list[RunPlan], list[RunPlan]]:
    """Check that ``scfg`` grows (or repeats) the study saved as ``saved`` in ``out``; return the study config
    to run (with the variance seeds pinned where they were), the new plan, and the runs it adds.

    Raises UserError naming the first setting that would make the old cells incomparable with new ones.
    """
    old = from_dict(StudyConfig, saved)  # migrates the keys of earlier versions; later keys take their defaults
    if "first_seed" not in saved and old.base_seed:  # made when the first seed was base_seed * (seeds + floor_seeds)
        old = replace(old, first_seed=old.base_seed * (old.seeds + old.floor_seeds))
    if old.first_seed >= 0 and scfg.first_seed < 0 and scfg.base_seed == old.base_seed:  # keep its runs' seeds
        scfg = replace(scfg, first_seed=old.first_seed)
    if old.first_seed >= 0 and scfg.seeds + scfg.floor_seeds > old.seeds + old.floor_seeds:
        # base seed b of such a study owns seeds b * n .. b * n + n - 1 (n its seeds + floor_seeds): more would be
        # base seed b + 1's, so two studies meant to be independent would share runs
        raise UserError(f"the study in {out} was made when base seed {old.base_seed} owned {old.seeds + old.floor_seeds} "
                        f"training seeds (from seed {old.first_seed}); more seeds would reuse base seed "
                        f"{old.base_seed + 1}'s. Add seeds in a new study directory (its base seeds own 1000 seeds each)")
    pinned = old.floor_budget or sorted(old.budgets)[len(old.budgets) // 2]
    old_plan = {p.name: p for p in make_plan(replace(old, floor_budget=pinned), out)}
    if scfg.floor_budget == old.floor_budget:  # the saved value itself (a caller passing study.json): chosen below
        scfg = replace(scfg, floor_budget=0.0)
    # keep the variance seeds and the post-hoc EMA sweep (both at the floor budget) where they began; a floor where
    # nothing began (a mistyped middle budget) is chosen again, like a new study's
    floor_begun = any(_begun(out, p) for p in old_plan.values() if p.budget == pinned)
    if (old.floor_seeds or old.eval_ema) and not scfg.floor_budget and pinned in scfg.budgets and floor_begun:
        scfg = replace(scfg, floor_budget=pinned)
    skip = set(GRID) | set(ADDITIVE) | set(LABEL) | set(StudyConfig.NOT_IDENTITY) | {"overrides", "floor_budget", "first_seed"}
    if not old.sweep_guidance:  # the old study never swept (or predates the sweep): its sample count set nothing
        skip.add("sweep_samples")
    if old.tokenizer != "learned" and scfg.tokenizer != "learned":  # no learned tokenizers: their settings set nothing
        skip.add("tokenizer_overrides")
    for key, value in asdict(scfg).items():
        if key not in skip and asdict(old)[key] != value:
            raise UserError(f"{out} holds a study with {key}={asdict(old)[key]!r}; this command has {value!r}, which "
                            f"would make its finished runs incomparable with new ones. Grow a study only with "
                            f"{GROW_FLAGS}; use the saved settings ({out / 'study.json'}) or another --out")
    fewer = _fewer_evaluations(old, scfg)
    if fewer:
        raise UserError(f"this command evaluates fewer settings than the study in {out} ({fewer}); a grown study may "
                        f"add {fewer} settings, never drop them; use the saved settings or another --out")
    new_plan = make_plan(scfg, out)
    new_names = {p.name for p in new_plan}
    dropped = [n for n, p in old_plan.items() if n not in new_names and _begun(out, p)]
    if dropped:
        axis = "base_seed" if scfg.base_seed != old.base_seed else _dropping_axis(old_plan[dropped[0]], scfg, old)
        if axis == "base_seed":  # not an axis to add to: another base seed owns other training seeds
            raise UserError(f"the study in {out} was made with base seed {old.base_seed}; base seed {scfg.base_seed} "
                            f"trains other seeds, which is another study (with its own --out; `flopmatch compare` "
                            f"then sets the two side by side)")
        floor = ""
        if axis == "budgets" and pinned not in scfg.budgets and (old.floor_seeds or old.eval_ema):
            what = " and ".join(w for w, on in (("variance seeds", old.floor_seeds), ("post-hoc EMA sweep", old.eval_ema)) if on)
            floor = (f"; budget {pinned:g} holds the study's {what}, which {'stay where they' if old.floor_seeds else 'stays where it'} "
                     f"began (no flag moves {'them' if old.floor_seeds else 'it'}): keep {pinned:g} in --budgets")
        raise UserError(f"with this command's {axis}, {len(dropped)} run(s) the study in {out} already has are left out "
                        f"(e.g. {dropped[0]}{_progress(out, dropped[0])}); a grown study may add cells, never drop them "
                        f"(the report reads every run){floor}. Keep the saved values and add to them, or use another "
                        f"--out{_drop_hint(out, dropped)}")
    for p in new_plan:
        if p.name in old_plan:
            diff = dict_diffs(old_plan[p.name].config, p.config)
            if diff:
                key = diff[0]
                flag = f"--data {_get(p.config, key)}" if key == "data.name" else f"--set {key}={_get(p.config, key)!r}"
                raise UserError(f"this command changes {key} of the study's runs ({flag}; the study in {out} has "
                                f"{_get(old_plan[p.name].config, key)!r}), which would make them incomparable; use the "
                                f"saved value or another --out")
    return scfg, new_plan, [p for p in new_plan if p.name not in old_plan]


def _kind(device_type: str, bf16: bool) -> str:
    return f"{device_type} {'bf16' if bf16 else 'fp32'}"


def check_same_machine(out: Path, plans: list[RunPlan]) -> None:
    """Refuse, in one line, to train the runs of ``plans`` that have not begun on another kind of device or in another
    precision than the study's runs in ``out`` recorded (their checkpoints' ``device_type`` and ``bf16``), as
    ``train.device`` and ``train.precision`` resolve here. Only ``auto`` can resolve differently (cuda on a GPU
    machine; bf16 where it is fast), and the saved study fixes those keys, so the way out is another machine or
    another --out. For runs trained on this machine (the local launcher); reads only checkpoint metadata."""
    recorded: dict[tuple[str, bool], list[str]] = {}  # (device type, bf16) -> runs that trained so
    todo = []
    for p in plans:
        run = out / "runs" / p.name
        if not run.exists():
            todo.append(p)
            continue
        state = read_state(run)  # None: stopped before its first checkpoint (it starts again, like a new run)
        if state is not None and "device_type" in state:
            recorded.setdefault((state["device_type"], bool(state.get("bf16"))), []).append(p.name)
    if not recorded:
        return
    for p in todo:
        train = p.config["train"]
        device = resolve_device(train["device"])
        here = (device.type, use_bf16(train["precision"], device))
        if here in recorded:
            continue
        (kind, names), *_ = sorted(recorded.items(), key=lambda kv: -len(kv[1]))
        key = "train.device" if here[0] != kind[0] else "train.precision"
        value = train["device"] if key == "train.device" else train["precision"]
        pin = f"--set train.device={kind[0]}" if key == "train.device" else f"--set train.precision={_kind(*kind).split()[1]}"
        raise UserError(f"the study in {out} trained {len(names)} run(s) in {_kind(*kind)} (e.g. {names[0]}), and here "
                        f"its run {p.name} would train in {_kind(*here)} ({key} {value} resolves per machine), which "
                        f"would make old and new cells incomparable; continue the study on a machine of the first kind, "
                        f"or use another --out (a study made with {pin} trains so on any machine)")


def mixed_evaluators(out: Path, plans: list[RunPlan]) -> str | None:
    """A warning line when the runs of ``plans`` in ``out`` were scored by more than one prompt evaluator or feature
    extractor (their eval.json manifests' sha256s), else None. The cached evaluators are trained once per machine,
    in bf16 or fp32 after its CPU (flopmatch.device.evaluator_precision), so a study grown or resumed on another
    machine can score its new cells with another one; the runs themselves are still comparable, their prompt-following
    (or feature) scores slightly less so. Reads only eval.json files."""
    scorers: dict[str, set[str]] = {}  # evaluator name and sha256 prefix -> runs scored by it
    for p in plans:
        for entry in read_eval_entries(out / "runs" / p.name).values():
            manifest = entry.get("manifest") or {}
            used = [manifest.get("prompt_evaluator") or {}, *(manifest.get("feature_extractors") or {}).values()]
            for e in used:
                sha = e.get("sha256") or e.get("weights_sha256")
                if sha:
                    scorers.setdefault(f"{e.get('name')} {sha[:8]}", set()).add(p.name)
    names = sorted({s.split()[0] for s in scorers})
    mixed = [n for n in names if sum(s.split()[0] == n for s in scorers) > 1]
    if not mixed:
        return None
    counts = ", ".join(f"{s}: {len(runs)} run(s)" for s, runs in sorted(scorers.items()) if s.split()[0] in mixed)
    return (f"[study] warning: the study's runs were scored by more than one {', '.join(mixed)} ({counts}), as when "
            f"it grew on another machine (evaluators are trained per machine, in bf16 or fp32 after its CPU); their "
            f"scores by these evaluators are not strictly comparable: grow a study on one kind of machine")
