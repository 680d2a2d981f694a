"""Optional trackers (flopmatch.tracking): TensorBoard and offline W&B mirror metrics.jsonl, across resumes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import SCALARS, TENSORS, EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from flopmatch import cli, dist, tracking
from flopmatch.config import apply_overrides
from flopmatch.errors import UserError
from flopmatch.rundir import config_diffs
from flopmatch.train import train
from tiny import tiny_run_config

FIELDS = ("loss", "lr", "flops", "grad_norm", "elapsed_s", "mfu")  # numeric fields of a metrics row


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _scalars(run: Path) -> EventAccumulator:
    return EventAccumulator(str(run / "tensorboard"), size_guidance={SCALARS: 0, TENSORS: 0}).Reload()


def _assert_mirrors_metrics(run: Path) -> None:
    """Every train/<field> series holds exactly the metrics.jsonl rows: same steps, once each, same values."""
    acc, rows = _scalars(run), _rows(run)
    for field in FIELDS:
        events = acc.Scalars(f"train/{field}")
        assert [e.step for e in events] == [r["step"] for r in rows], field  # in order, no step twice
        # TensorBoard scalars are float32: equal to the row's value rounded to float32, bit for bit
        assert [e.value for e in events] == [float(np.float32(r[field])) for r in rows], field


def test_tensorboard_mirrors_metrics_across_a_resume(tmp_path):
    """An interrupted and resumed run's TensorBoard scalars are exactly metrics.jsonl's rows, each step once."""
    cfg = tiny_run_config("masked", 7, sets=["train.trackers=tensorboard", "train.checkpoint_every=3"])
    run = tmp_path / "run"
    assert train(cfg, run, progress=False, stop_after=4)["step"] == 4
    assert train(cfg, run, progress=False)["done"]
    assert [r["step"] for r in _rows(run)] == list(range(1, 8))
    _assert_mirrors_metrics(run)
    acc = _scalars(run)
    assert "config/text_summary" in acc.Tags()[TENSORS]  # the run config, as text
    assert {e.step for e in acc.Tensors("config/text_summary")} == {0, 4}  # one per training call, at its start


def test_tensorboard_resume_hides_steps_logged_past_the_checkpoint(tmp_path):
    """Events an earlier writer left past the checkpoint a run resumes from are purged (purge_step)."""
    cfg = tiny_run_config("masked", 6, sets=["train.trackers=tensorboard", "train.checkpoint_every=3"])
    run = tmp_path / "run"
    train(cfg, run, progress=False, stop_after=3)
    tracking._wait_for_next_second(run / "tensorboard")  # this stray file must sort after the first call's
    stray = SummaryWriter(str(run / "tensorboard"))  # as if a killed process had logged steps 4-5 beyond its checkpoint
    for step in (4, 5):
        stray.add_scalar("train/loss", 999.0, global_step=step)
    stray.close()
    train(cfg, run, progress=False)
    _assert_mirrors_metrics(run)
    assert 999.0 not in [e.value for e in _scalars(run).Scalars("train/loss")]


def test_trackers_are_not_part_of_a_runs_identity(tmp_path):
    """A run may resume with trackers added: no 'different config' error, and TensorBoard gets the rows from then on."""
    plain = tiny_run_config("masked", 5, sets=["train.checkpoint_every=2"])
    tracked = tiny_run_config("masked", 5, sets=["train.checkpoint_every=2", "train.trackers=tensorboard"])
    run = tmp_path / "run"
    train(plain, run, progress=False, stop_after=2)
    assert config_diffs(run, tracked) == []
    assert train(tracked, run, progress=False)["done"]
    assert [e.step for e in _scalars(run).Scalars("train/loss")] == [3, 4, 5]
    assert not (run / "wandb").exists()


def test_only_the_main_rank_opens_trackers(tmp_path, monkeypatch):
    """On a rank other than 0 the trackers are no-ops and write nothing."""
    monkeypatch.setattr(dist, "is_main", lambda: False)
    cfg = tiny_run_config("masked", 2, sets=["train.trackers=tensorboard,wandb"])
    with tracking.Trackers(tmp_path, cfg, 0) as trackers:
        trackers.log({"step": 1, "loss": 0.5})
    assert trackers.sinks == [] and list(tmp_path.iterdir()) == []


def test_scalars_are_the_numeric_fields_of_a_row():
    """A metrics row becomes train/<field> scalars; the step, booleans and text are left out."""
    row = {"step": 3, "loss": 0.25, "flops": 12, "done": True, "note": "x"}
    assert tracking.scalars(row) == {"train/loss": 0.25, "train/flops": 12.0}


def test_unknown_tracker_is_a_config_error(capsys):
    """A tracker name outside tensorboard, wandb is refused by --set and by --track, naming it."""
    cfg = tiny_run_config("masked", 2)
    apply_overrides(cfg, ["train.trackers=tensorboard,tensorbord"])
    with pytest.raises(UserError, match=r"train\.trackers: unknown item 'tensorbord'; each must be one of tensorboard, wandb"):
        cfg.validate()
    assert cli.main(["train", "--objective", "masked", "--out", "unused", "--track", "mlflow"]) == 2  # a usage error
    assert "argument --track: train.trackers: unknown item 'mlflow'" in capsys.readouterr().err


def test_missing_wandb_is_a_one_line_error_naming_the_install(tmp_path, monkeypatch):
    """train.trackers=wandb without the wandb package fails before any work, naming the pip command."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec and import now both see no wandb
    cfg = tiny_run_config("masked", 2, sets=["train.trackers=wandb"])
    with pytest.raises(UserError, match=r"pip install 'flopmatch\[wandb\]'") as e:
        train(cfg, tmp_path / "run", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason="wandb is not installed (the optional extra: pip install -r requirements-wandb.lock)")


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B as a user without settings has it: WANDB_MODE unset (so flopmatch's offline default applies), and W&B's
    own cache, config and data folders in tmp_path rather than $HOME."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))


def _wandb_id(run: Path) -> str:
    return json.loads((run / "wandb" / "flopmatch.json").read_text())["id"]


def _wandb_logged(run: Path, run_id: str) -> bytes:
    """The bytes of every offline segment's records of W&B run ``run_id`` (history values are stored as JSON text)."""
    return b"".join(f.read_bytes() for f in (run / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb"))


@pytest.mark.slow
@needs_wandb
def test_wandb_offline_run_resumes_under_the_same_id(tmp_path, offline_wandb):
    """W&B logs offline into RUN/wandb/ with no network; the resumed call writes under the same id, every row logged."""
    cfg = tiny_run_config("masked", 6, sets=["train.trackers=wandb", "train.checkpoint_every=3"])
    run = tmp_path / "run"
    train(cfg, run, progress=False, stop_after=3)
    run_id = _wandb_id(run)
    assert run_id and len(list((run / "wandb").glob(f"offline-run-*-{run_id}*"))) == 1
    train(cfg, run, progress=False)
    assert _wandb_id(run) == run_id  # the same W&B run
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}*"))) == 2  # one offline segment per training call
    logged = _wandb_logged(run, run_id)
    for row in _rows(run):
        assert json.dumps(row["loss"]).encode() in logged, row


@pytest.mark.slow
@needs_wandb
def test_a_run_continued_to_a_larger_budget_stays_mirrored(tmp_path, offline_wandb):
    """A wsd run continued from where its cooldown started: TensorBoard still mirrors metrics.jsonl (the old cooldown
    purged), and W&B, whose steps cannot go back, gets a new run for the steps from there."""
    sets = ["train.schedule=wsd", "train.warmup_steps=2", "train.trackers=tensorboard,wandb"]  # 8 steps: cooldown from 6
    run = tmp_path / "run"
    train(tiny_run_config("masked", 8, sets=sets), run, progress=False)
    first = _wandb_id(run)
    train(tiny_run_config("masked", 14, sets=sets), run, progress=False)  # continues from step 6
    assert [r["step"] for r in _rows(run)] == list(range(1, 15))
    _assert_mirrors_metrics(run)
    second = _wandb_id(run)
    assert second != first
    logged = _wandb_logged(run, second)
    for row in _rows(run)[6:]:
        assert json.dumps(row["loss"]).encode() in logged, row
