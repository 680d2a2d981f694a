"""Would the answer change under the other FLOP convention? The verdicts at equal backbone-only compute.

Runs are trained to budgets counted with every matmul (Chinchilla's convention). Counting only the
Transformer blocks (Kaplan's non-embedding convention, :func:`flopmatch.flops.backbone_train_flops`), a
paradigm whose output head is large (a 1,024-way token head) had less compute than its nominal budget
says, relative to one whose head is small (diffusion). To compare at equal backbone compute we move each
run along its own scaling curve:

- a run of paradigm p, depth d at nominal budget B had backbone compute ``B * share(p, d)``;
- the target at nominal budget B is ``B * max share`` (the backbone compute of the paradigm with the largest
  share, which stays at its measured points);
- for each (paradigm, depth, seed), log error is interpolated linearly in log compute between the two
  budgets that bracket the target (the same seed at both; KID's and FID's evaluation-noise replicates are interpolated
  pairwise, so the evaluation noise follows); a target outside a paradigm's measured range is dropped,
  never extrapolated.

The re-placed rows go through the same :func:`flopmatch.report.verdicts.decide` (same tests, same Holm
families), and :func:`convention_changes` lists every claim and table cell whose answer differs.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from flopmatch.flops import backbone_train_flops
from flopmatch.nets import NetSpec
from flopmatch.objectives import make_objective
from flopmatch.report.data import Study
from flopmatch.report.verdicts import FLOOR, KID_FLOOR, Verdicts, decide


def backbone_shares(study: Study) -> dict[tuple[str, int], float]:
    """(paradigm, depth) -> backbone-only training FLOPs / all training FLOPs, from the runs' recorded specs."""
    share = {}
    for r in study.runs:
        spec = (r.state or {}).get("net_spec")
        if spec and (r.objective, r.depth) not in share:
            spec = NetSpec.from_dict(spec)
            share[(r.objective, r.depth)] = backbone_train_flops(spec) / make_objective(r.objective).train_flops(spec)
    return share


def _interp(x: float, x0: float, x1: float, y0: float, y1: float) -> float:
    w = (x - x0) / (x1 - x0) if x1 != x0 else 0.0
    return (1 - w) * y0 + w * y1


def _log_err(v: float | None, prompt: bool, floor: float = FLOOR) -> float | None:
    if v is None:
        return None
    return math.log(max(1.0 - v if prompt else v, floor))


def _moved_row(lo: dict, hi: dict, x: float, x0: float, x1: float, budget: float) -> dict:
    """A row at nominal ``budget`` whose quality is interpolated between runs ``lo`` and ``hi`` (log-log)."""
    row = dict(lo, budget=budget, run=f"{lo.get('run')}~{hi.get('run')}")
    for key, prompt, floor in (("kid_effnet", False, KID_FLOOR), ("fid_effnet", False, FLOOR), ("prompt_full_match", True, FLOOR)):
        a, b = _log_err(lo.get(key), prompt, floor), _log_err(hi.get(key), prompt, floor)
        if a is None or b is None:
            row[key] = None
            continue
        y = math.exp(_interp(x, x0, x1, a, b))
        row[key] = 1.0 - y if prompt else y
    for boot in ("kid_boot_effnet", "fid_boot_effnet"):
        ra, rb = np.asarray(lo.get(boot) or [], float), np.asarray(hi.get(boot) or [], float)
        if boot.startswith("kid"):  # floored as the verdicts floor them (verdicts._eval_var): KID replicates may be <= 0
            ra, rb = np.maximum(ra, KID_FLOOR), np.maximum(rb, KID_FLOOR)
        n = min(ra.size, rb.size)
        if n >= 2 and (ra[:n] > 0).all() and (rb[:n] > 0).all():  # each run's own replicates: pairwise interpolation
            row[boot] = list(np.exp(_interp(x, x0, x1, np.log(ra[:n]), np.log(rb[:n]))))
        else:
            row[boot] = []
    return row


def backbone_study(study: Study, shares: dict[tuple[str, int], float]) -> Study:
    """The study's main finished EMA rows moved to equal backbone compute (module docstring); other rows dropped."""
    rows = [r for r in study.rows if r["main"] and r["done"] and r["weights"] == "ema"]
    by_run: dict[tuple[str, int, int], dict[float, dict]] = {}
    for r in rows:
        by_run.setdefault((r["objective"], r["depth"], r["seed"]), {})[r["budget"]] = r
    top = max(shares.values())
    budgets = sorted({r["budget"] for r in rows})
    moved = []
    for (p, d, seed), at in by_run.items():
        share = shares.get((p, d))
        if share is None:
            continue
        measured = sorted(at)
        for target in budgets:
            x = math.log(target * top / share)  # the nominal budget at which this paradigm has the target's compute
            for b0, b1 in zip(measured, measured[1:] or measured):
                x0, x1 = math.log(b0), math.log(b1)
                if x0 - 1e-9 <= x <= x1 + 1e-9:
                    moved.append(_moved_row(at[b0], at[b1], x, x0, x1, target))
                    break
    return replace(study, rows=moved)


def _claim_states(v: Verdicts) -> dict[int, str]:
    return {c["id"]: c["status"] for c in v.claims}


def _cell_answer(cell: dict) -> str:
    if cell["choice"]:
        return f"{cell['choice']} ({cell['label']})"
    return cell["label"]


def convention_changes(all_flops: Verdicts, backbone: Verdicts) -> list[str]:
    """Every claim and quality cell of the table whose answer differs between the two conventions."""
    out = []
    other = _claim_states(backbone)
    for cid, status in _claim_states(all_flops).items():
        if cid in other and other[cid] != status:
            out.append(f"claim {cid}: {status} -> {other[cid]}")
    cells = {(c["budget"], c["need"]): c for c in backbone.table}
    for c in all_flops.table:
        if c["need"] not in ("image quality", "prompt following"):
            continue
        b = cells.get((c["budget"], c["need"]))
        if b is None or b["label"] == "not measured":
            continue
        if _cell_answer(b) != _cell_answer(c):
            out.append(f"{c['need']} at {c['budget']:.3g}: {_cell_answer(c)} -> {_cell_answer(b)}")
    return out


def convention_check(study: Study) -> dict | None:
    """{"shares", "changes", "compared"} for the report, or None when the study has no recorded specs.

    Both sides at the main settings: the moved study holds only main rows (a best swept point exists at one budget,
    with nothing to interpolate it with), so the all-FLOPs side is decided without best points too; a change is
    then the convention's, not a change of sampler settings."""
    shares = backbone_shares(study)
    if not shares:
        return None
    alt = decide(backbone_study(study, shares))
    compared = sum(1 for c in alt.table if c["need"] in ("image quality", "prompt following") and c["label"] != "not measured")
    return {"shares": shares, "changes": convention_changes(decide(study, best_points=False), alt), "compared": compared}
