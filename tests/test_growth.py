"""Runs that grow: a wsd (or constant) run continued to a larger budget equals a run trained for it from the start."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from flopmatch import cli
from flopmatch.config import to_dict
from flopmatch.errors import UserError
from flopmatch.files import load_tensors
from flopmatch.rundir import CHECKPOINT, STABLE_CHECKPOINT, budget_dir, read_config, read_eval_entries, read_state
from flopmatch.train import train
from tiny import tiny_run_config

WSD = ["train.schedule=wsd", "train.warmup_steps=2"]  # 8 steps: cooldown from step 6; 14 steps: from step 11
CONSTANT = ["train.schedule=constant", "train.warmup_steps=2"]
VOLATILE = {"elapsed_s", "flops_per_s", "mfu"}  # wall-clock fields of a metrics row


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def _assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_tensors(a / CHECKPOINT), load_tensors(b / CHECKPOINT)
    assert set(ta) == set(tb) and any(k.startswith("ema.") for k in ta) and any(k.startswith("optim.") for k in ta)
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"tensors differ: {differ[:5]}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Factory (sets, steps) -> a fresh copy of a finished tiny masked run (each trained once per module)."""
    done: dict[tuple, Path] = {}

    def get(sets: list[str], steps: float) -> Path:
        key = (tuple(sets), steps)
        if key not in done:
            done[key] = tmp_path_factory.mktemp("trained") / "run"
            train(tiny_run_config("masked", steps, sets), done[key], progress=False)
        copy = tmp_path_factory.mktemp("copy") / "run"
        shutil.copytree(done[key], copy)
        return copy

    return get


def test_wsd_run_continued_to_a_larger_budget_equals_a_direct_run(trained, tmp_path, capsys):
    """wsd to B1, then continued to B2: bit-identical weights, EMA, optimizer and metrics to wsd trained to B2; B1 kept."""
    run, direct = trained(WSD, 8), trained(WSD, 14)
    b1, b2 = read_config(run).train.budget, read_config(direct).train.budget
    assert read_state(run, STABLE_CHECKPOINT)["step"] == 6 and read_state(direct, STABLE_CHECKPOINT)["step"] == 11
    final_b1 = load_tensors(run / CHECKPOINT)
    (run / "eval.json").write_text(json.dumps({"version": 1, "entries": {"steps=3": {"settings": {}}}}))
    (run / "samples" / "steps-3").mkdir(parents=True)
    (run / "samples" / "steps-3" / "prompts.json").write_text("[]")

    capsys.readouterr()
    # the user's command: the run's own settings (its config.json) with a new budget, no flags repeated
    assert cli.main(["train", "--out", str(run), "--budget", repr(b2), "--quiet"]) == 0
    assert "resuming at step 6/14" in capsys.readouterr().out  # continued from the stable state, not retrained
    state = read_state(run)
    assert state["done"] and state["step"] == 14 and state["flops"] == read_state(direct)["flops"]
    _assert_same_tensors(run, direct)
    assert _rows(run) == _rows(direct)
    assert read_config(run) == read_config(direct) and state["schedule"] == "wsd"
    assert read_state(run, STABLE_CHECKPOINT)["step"] == 11  # the next continuation starts from B2's stable phase
    (entry,) = state["budget_history"]
    kept = budget_dir(run, b1)
    assert entry | {"kept_in": None} == {"budget": b1, "total_steps": 8, "step": 8, "flops": entry["flops"], "done": True,
                                         "kept_in": None, "continued_from_step": 6}
    assert run / entry["kept_in"] == kept
    # the B1 result, whole, under budgets/<B1>/; the run directory describes the B2 model only
    assert all(torch.equal(v, load_tensors(kept / CHECKPOINT)[k]) for k, v in final_b1.items())
    assert read_config(kept).train.budget == b1 and read_state(kept)["done"] and len(_rows(kept)) == 8
    assert read_eval_entries(kept) and (kept / "samples" / "steps-3" / "prompts.json").exists()
    assert read_eval_entries(run) == {} and not (run / "samples").exists()
    # a run directory of its own: it samples with its own tokenizer and data record, as the run did
    assert cli.main(["sample", str(kept), "--prompt", "a red circle", "--num", "1", "--steps", "2",
                     "--out", str(tmp_path / "kept.png")]) == 0 and (tmp_path / "kept.png").exists()
    assert train(tiny_run_config("masked", 14, WSD), run, progress=False)["done"]  # finished: nothing to do
    assert cli.main(["train", "--out", str(run), "--quiet"]) == 0 and read_state(run)["step"] == 14  # resumes: done
    with pytest.raises(UserError, match=re.escape(f"continued past budget {b1:.3g}; its {b1:.3g} result (finished) is kept in {kept}")):
        train(tiny_run_config("masked", 8, WSD), run, progress=False)  # asked for B1 again: where its result is

    from flopmatch.report.data import load_study  # the report tells which schedule made each point

    (tmp_path / "study" / "runs").mkdir(parents=True)
    shutil.copytree(run, tmp_path / "study" / "runs" / "m")
    earlier, row = load_study(tmp_path / "study").rows  # the kept B1 result is a point of the run's trend too
    assert row["schedule"] == "wsd" and row["budget"] == b2 and row["steps"] == 14 and row["run"] == "m"
    assert row["origin"] == f"continued from budget {b1:.3g} at step 6"
    kept_dir = f"runs/m/budgets/{kept.name}"
    assert (earlier["run"], earlier["run_dir"], earlier["budget"], earlier["steps"], earlier["origin"], earlier["evaluated"]) \
        == (f"m@{kept.name}", kept_dir, b1, 8, "scratch", True)


def test_constant_run_continues_from_its_end(trained):
    """constant to B1, then continued to B2: bit-identical to constant trained to B2 from the start."""
    run, direct = trained(CONSTANT, 6), trained(CONSTANT, 10)
    state = train(tiny_run_config("masked", 10, CONSTANT), run, progress=False)
    assert state["done"] and state["budget_history"][0]["continued_from_step"] == 6
    _assert_same_tensors(run, direct)
    assert _rows(run) == _rows(direct)


def test_interrupted_continuation_resumes_exactly(trained, monkeypatch):
    """A continuation killed before its commit, then one stopped mid-training, each finished by re-running: same weights."""
    import flopmatch.growth as growth

    run, direct = trained(WSD, 8), trained(WSD, 14)
    b1 = read_config(run).train.budget
    cfg = tiny_run_config("masked", 14, WSD)

    def killed(*args, **kwargs):  # dies at the commit point: B1 kept, stable state installed, config still B1
        raise KeyboardInterrupt

    monkeypatch.setattr(growth, "write_config", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, progress=False)
    monkeypatch.undo()
    assert read_config(run).train.budget == b1 and read_state(run)["step"] == 6 and budget_dir(run, b1).is_dir()
    assert train(cfg, run, progress=False, stop_after=3)["step"] == 9
    assert train(cfg, run, progress=False)["done"]
    _assert_same_tensors(run, direct)
    assert _rows(run) == _rows(direct)
    assert [p.name for p in (run / "budgets").iterdir()] == [budget_dir(run, b1).name]
    assert len(read_state(run)["budget_history"]) == 1


def test_cosine_run_refuses_a_new_budget(trained, tmp_path, capsys):
    """`train --budget B2` on a cosine run exits 2 with one line naming the cosine and the fix; the run is untouched."""
    run = trained([], 6)
    before = (run / CHECKPOINT).read_bytes()
    config = tmp_path / "config.json"
    config.write_text(json.dumps(to_dict(read_config(run))))
    b2 = tiny_run_config("masked", 10).train.budget
    capsys.readouterr()
    assert cli.main(["train", "--objective", "masked", "--config", str(config), "--budget", repr(b2), "--out", str(run),
                     "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flopmatch: error: "), lines
    assert "cosine" in lines[0] and "train.schedule=wsd" in lines[0] and "another --out" in lines[0]
    assert (run / CHECKPOINT).read_bytes() == before and not (run / "budgets").exists()


def test_other_changes_and_smaller_budgets_are_refused(trained):
    """A wsd run refuses a budget change together with another key, and a budget whose cooldown starts before its state."""
    run = trained(WSD, 14)
    with pytest.raises(UserError, match=r"another budget only with its other settings unchanged, and train\.lr differs; keep"):
        train(tiny_run_config("masked", 20, WSD + ["train.lr=0.5"]), run, progress=False)
    with pytest.raises(UserError, match="cannot continue .* at step 11, after step 6 where budget .* starts its cooldown"):
        train(tiny_run_config("masked", 8, WSD), run, progress=False)
    assert read_state(run)["step"] == 14 and read_config(run).train.budget == tiny_run_config("masked", 14, WSD).train.budget
    assert not (run / "budgets").exists()


def test_a_new_run_needs_its_paradigm(tmp_path, capsys):
    """`train --out NEW` without --objective: one line naming the flag (an existing run would resume), nothing made."""
    assert cli.main(["train", "--out", str(tmp_path / "new"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flopmatch: error: --objective is required"), err
    assert not (tmp_path / "new").exists()


def test_cosine_run_without_a_checkpoint_takes_a_new_budget(trained):
    """A cosine run stopped before its first checkpoint has trained nothing: `train --budget B2` starts it again at
    B2 (a run with a checkpoint is refused, test_cosine_run_refuses_a_new_budget)."""
    run = trained([], 6)
    shutil.rmtree(run / "checkpoint")
    shutil.rmtree(run / "ema-snapshots", ignore_errors=True)
    b2 = tiny_run_config("masked", 10).train.budget
    assert cli.main(["train", "--out", str(run), "--budget", repr(b2), "--quiet"]) == 0
    state = read_state(run)
    assert state["done"] and state["step"] == 10 and read_config(run).train.budget == b2
    assert not state.get("budget_history") and not (run / "budgets").exists()
