"""The training loop: budget accounting, run directory contents, exact resume, and sampling a trained run."""

from __future__ import annotations

import json
import math
import shutil
import signal
from pathlib import Path

import pytest
import torch

from flopmatch import PARADIGMS, cli
from flopmatch.config import SampleConfig
from flopmatch.data.datasets import make_dataset
from flopmatch.errors import UserError
from flopmatch.files import load_tensors
from flopmatch.plan import flops_summary
from flopmatch.rundir import CHECKPOINT, read_config, snapshots
from flopmatch.tokenizers.registry import fit_weight_free
from flopmatch.train import train
from tiny import tiny_run_config

BUDGET_STEPS = 5.5  # not a whole number of steps: training must take ceil() = 6 steps
VOLATILE = {"elapsed_s", "flops_per_s", "mfu"}  # wall-clock fields of a metrics row


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """Factory: objective -> directory of a finished tiny run (trained once per module)."""
    runs: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in runs:
            out = tmp_path_factory.mktemp(f"run-{name}") / "run"
            train(tiny_run_config(name, BUDGET_STEPS), out, progress=False)
            runs[name] = out
        return runs[name]

    return get


@pytest.mark.parametrize("name", PARADIGMS)
def test_budget_is_spent_within_one_step(name, finished_run):
    """Training stops at the first step reaching the budget; metrics.jsonl and config.json record it."""
    run = finished_run(name)
    cfg = tiny_run_config(name, BUDGET_STEPS)
    per_step = flops_summary(cfg)["train_flops_per_example"] * cfg.train.batch_size
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["done"] and state["flops_per_step"] == per_step
    assert cfg.train.budget <= state["flops"] < cfg.train.budget + per_step
    assert state["step"] == state["total_steps"] == math.ceil(BUDGET_STEPS)

    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, state["step"] + 1))  # log_every=1
    for r in rows:
        assert {"step", "loss", "lr", "flops", "elapsed_s"} <= set(r)
        assert r["flops"] == r["step"] * per_step and math.isfinite(r["loss"]) and r["lr"] > 0
        assert math.isfinite(r["mfu"]) and r["mfu"] > 0  # against the measured matmul peak (flopmatch.device)
    assert rows[-1]["flops"] == state["flops"]
    assert all(b["elapsed_s"] >= a["elapsed_s"] for a, b in zip(rows, rows[1:]))
    assert read_config(run) == cfg


def test_budget_below_one_step_is_user_error(tmp_path):
    """A budget smaller than one training step raises UserError before anything is written."""
    out = tmp_path / "run"
    with pytest.raises(UserError, match="smaller than one training step"):
        train(tiny_run_config("masked", budget_steps=0.5), out, progress=False)
    assert not out.exists()


def _checkpoint(run: Path) -> dict[str, torch.Tensor]:
    return load_tensors(run / CHECKPOINT)


@pytest.mark.parametrize("precision", ["fp32", "auto"])
@pytest.mark.parametrize("name", PARADIGMS)
def test_resume_after_interruption_is_exact(name, precision, tmp_path):
    """Interrupted twice and resumed (the last time with another train.checkpoint_every), a run ends with
    bit-identical model, EMA, optimizer and metrics rows."""
    cfg = tiny_run_config(name, 7, sets=[f"train.precision={precision}", "train.log_every=2", "train.checkpoint_every=3"])
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    final = train(cfg, whole, progress=False)
    assert train(cfg, parts, progress=False, stop_after=4)["step"] == 4  # stops mid log interval
    assert train(cfg, parts, progress=False, stop_after=2)["step"] == 6
    # resumed with another checkpoint interval (when state is saved, not what is trained): accepted, still exact
    other = tiny_run_config(name, 7, sets=[f"train.precision={precision}", "train.log_every=2", "train.checkpoint_every=5"])
    resumed = train(other, parts, progress=False)
    assert resumed["done"] and resumed["step"] == final["step"] == 7 and resumed["flops"] == final["flops"]

    a, b = _checkpoint(whole), _checkpoint(parts)
    assert set(a) == set(b)
    assert any(k.startswith("ema.") for k in a) and any(k.startswith("optim.") for k in a)
    assert not any(k.startswith("rng.") for k in a)  # training randomness is a function of (seed, step): no RNG state
    assert any(k.startswith("phema1.") for k in a)  # the post-hoc EMA's averages resume too
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"tensors differ after resume: {differ[:5]}"
    strip = lambda rows: [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]  # noqa: E731
    assert strip(_rows(parts)) == strip(_rows(whole))
    assert [r["step"] for r in _rows(parts)] == [2, 4, 6, 7]
    # and so do its snapshots (one per step here: 16 snapshots over 7 steps)
    snaps = [(s, load_tensors(p)) for s, p in snapshots(whole)], [(s, load_tensors(p)) for s, p in snapshots(parts)]
    assert [s for s, _ in snaps[0]] == [s for s, _ in snaps[1]] == list(range(1, 8))
    assert all(torch.equal(x[k], y[k]) for (_, x), (_, y) in zip(*snaps) for k in x)


def test_a_resume_trains_on_the_tokenizer_the_run_started_with(tmp_path, monkeypatch):
    """The tokenizer at --tokenizer's path replaced by another of the same shape (or the path gone, or relative to
    another working directory) after a run started: the resumed run still trains on its own copy's codes, bit-identical
    to an uninterrupted run."""
    cfg = tiny_run_config("masked", 6, sets=["train.checkpoint_every=3"])
    images = make_dataset(cfg.data, "train").images_uint8()
    tok = tmp_path / "tok"
    fit_weight_free("kmeans", images, patch=cfg.tokenizer.patch, codebook_size=cfg.tokenizer.codebook_size).save(tok)
    cfg.tokenizer.path = "tok"  # relative, as a user types it
    monkeypatch.chdir(tmp_path)
    train(cfg, "whole", progress=False)
    assert train(cfg, "parts", progress=False, stop_after=3)["step"] == 3
    fit_weight_free("kmeans", images, patch=cfg.tokenizer.patch, codebook_size=cfg.tokenizer.codebook_size,
                    seed=1).save(tok)  # another tokenizer where the first one was
    resumed = train(cfg, "parts", progress=False, stop_after=1)
    assert resumed["step"] == 4
    shutil.rmtree(tok)  # and then no tokenizer there at all, from another directory
    monkeypatch.chdir(tmp_path.parent)
    assert train(cfg, tmp_path / "parts", progress=False)["done"]
    a, b = _checkpoint(tmp_path / "whole"), _checkpoint(tmp_path / "parts")
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    assert read_config(tmp_path / "parts").tokenizer.path == "tok"  # config.json keeps the path as given

    # Killed before its first checkpoint (config and tokenizer copy written, or only the config): the run starts over
    # from the configured tokenizer, and its config.json is the one given, so later calls are not refused as different.
    monkeypatch.chdir(tmp_path)
    fit_weight_free("kmeans", images, patch=cfg.tokenizer.patch, codebook_size=cfg.tokenizer.codebook_size).save(tok)
    for lost in (["checkpoint"], ["checkpoint", "tokenizer"]):
        early = tmp_path / f"early-{len(lost)}"
        train(cfg, early, progress=False, stop_after=2)
        for name in lost:
            shutil.rmtree(early / name)
        assert train(cfg, early, progress=False)["done"]
        assert read_config(early) == read_config(tmp_path / "whole")
        assert train(cfg, early, progress=False)["done"]  # finished: nothing to do, not a "different config"
        c = _checkpoint(early)
        assert not [k for k in a if not torch.equal(a[k], c[k])]


def test_resume_after_ctrl_c_is_exact(tmp_path, monkeypatch):
    """A run stopped by Ctrl-C in the middle of a step resumes to the same weights and metrics as an uninterrupted one."""
    import flopmatch.train as train_module

    cfg = tiny_run_config("masked", 7, sets=["train.log_every=2"])
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(cfg, whole, progress=False)
    make_objective, calls = train_module.make_objective, []

    def interrupting(*args, **kwargs):  # an objective whose 4th loss() call receives SIGINT, as from Ctrl-C
        obj = make_objective(*args, **kwargs)
        loss = obj.loss

        def interrupted_loss(*a, **k):
            calls.append(1)
            if len(calls) == 4:
                signal.raise_signal(signal.SIGINT)
            return loss(*a, **k)

        obj.loss = interrupted_loss
        return obj

    monkeypatch.setattr(train_module, "make_objective", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, parts, progress=False)
    monkeypatch.undo()
    assert train(cfg, parts, progress=False)["done"]
    a, b = _checkpoint(whole), _checkpoint(parts)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"tensors differ after Ctrl-C and resume: {differ[:5]}"
    strip = lambda rows: [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]  # noqa: E731
    assert strip(_rows(parts)) == strip(_rows(whole))


def test_precision_auto_is_a_property_of_the_machine(monkeypatch):
    """precision "auto" follows the CPU's bf16 instructions, never a timing: identical commands (and a study's runs)
    get one precision however loaded the machine is; it draws nothing from torch's global RNG."""
    import flopmatch.device as device

    before = torch.get_rng_state()
    for native in (True, False, True):
        monkeypatch.setattr(device, "cpu_has_native_bf16", lambda native=native: native)
        assert device.use_bf16("auto", torch.device("cpu")) is native
    assert torch.equal(torch.get_rng_state(), before)


def test_quiet_training_prints_a_progress_line_at_checkpoints(tmp_path, monkeypatch, capsys):
    """Without a progress bar (a study's worker, whose output is logs/<run>.log) training says where it is at a
    checkpoint once QUIET_PROGRESS_S have passed since its last line; with the bar, no such line."""
    import flopmatch.train as train_mod

    monkeypatch.setattr(train_mod, "QUIET_PROGRESS_S", 0.0)
    train(tiny_run_config("masked", 4, ["train.checkpoint_every=2"]), tmp_path / "run", progress=False)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[train] run: step ")]
    assert [ln.split(",")[0] for ln in lines] == ["[train] run: step 2/4", "[train] run: step 4/4"]
    assert "min left" in lines[0] and "FLOPs" in lines[0]


def test_finished_run_is_not_retrained(finished_run, capsys):
    """Re-running a finished run changes nothing and says so."""
    run = finished_run("masked")
    before = ((run / CHECKPOINT).read_bytes(), (run / "metrics.jsonl").read_bytes())
    capsys.readouterr()
    state = train(tiny_run_config("masked", BUDGET_STEPS), run, progress=False)
    assert state["done"] and "nothing to do" in capsys.readouterr().out
    assert ((run / CHECKPOINT).read_bytes(), (run / "metrics.jsonl").read_bytes()) == before


def test_resume_with_different_config_is_user_error(finished_run):
    """A run directory refuses a different config, naming the key that differs."""
    run = finished_run("masked")
    cfg = tiny_run_config("masked", BUDGET_STEPS, sets=["train.lr=0.5"])
    with pytest.raises(UserError, match=r"train\.lr"):
        train(cfg, run, progress=False)


@pytest.mark.parametrize("name", PARADIGMS)
def test_generate_from_trained_run(name, finished_run):
    """load_sampler/generate give uint8 (N, 3, H, W) images; the same seed gives identical images."""
    from flopmatch.sample import generate, load_sampler

    sampler = load_sampler(finished_run(name), device="cpu")
    prompts = ["a red circle", "a small blue square to the left of a green triangle", "a cross"]
    sc = SampleConfig(steps=2, guidance=3.0)
    a = generate(sampler, prompts, sc, seed=0)
    assert a.dtype == torch.uint8 and a.shape == (3, 3, 16, 16)
    assert torch.equal(a, generate(sampler, prompts, sc, seed=0))
    assert not torch.equal(a, generate(sampler, prompts, sc, seed=1))


def test_cli_sample_writes_png(finished_run, tmp_path):
    """`flopmatch sample RUN --prompt ... --out x.png` writes a PNG grid of the requested size."""
    from PIL import Image

    out = tmp_path / "grid.png"
    argv = ["sample", str(finished_run("autoregressive")), "--prompt", "a red circle", "--prompt", "a blue square",
            "--device", "cpu", "--scale", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (2 * (2 * (16 + 2) + 2), 2 * (16 + 2 + 2))  # 2 images in a row, 2 px borders
