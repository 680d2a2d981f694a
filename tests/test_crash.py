"""Crashes leave nothing behind: a run killed (SIGKILL) at any point resumes to the uninterrupted run's
weights and metrics, with no temporary files left; damaged checkpoints are refused, not used."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flopmatch import cli
from flopmatch.errors import UserError
from flopmatch.files import load_tensors
from flopmatch.rundir import CHECKPOINT, METRICS, read_checkpoint_meta
from flopmatch.sample import load_sampler
from flopmatch.train import train
from tiny import tiny_run_config

TESTS = Path(__file__).resolve().parent
SETS = ["train.log_every=1", "train.checkpoint_every=2"]
STEPS = 7
VOLATILE = {"elapsed_s", "flops_per_s", "mfu"}

# Runs training in a fresh process and SIGKILLs it at a chosen moment: during step N of training
# (before any checkpoint when N < 2), or half-way through writing checkpoint number N (the temporary
# file is complete on disk, the rename has not happened), as `kill -9` would.
KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)  # as in conftest: float results must not depend on the thread count
    import flopmatch.files as files
    import flopmatch.train as train_module
    from tiny import tiny_run_config

    where, n = {where!r}, {n}
    calls = [0]

    def kill_now():
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "save":
        real_save = files.save_file
        def save_file(tensors, path, metadata=None):
            real_save(tensors, path, metadata=metadata)
            if "checkpoint" in str(path):
                calls[0] += 1
                if calls[0] == n:
                    kill_now()
        files.save_file = save_file
    else:
        real_update = train_module.ema_update
        def ema_update(*args):
            calls[0] += 1
            if calls[0] == n:
                kill_now()
            real_update(*args)
        train_module.ema_update = ema_update
    train_module.train(tiny_run_config("masked", {steps}, sets={sets!r}), {out!r}, progress=False)
""")


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / METRICS).read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_tensors(run / CHECKPOINT).items() if not k.startswith("rng.")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of the same config."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(tiny_run_config("masked", STEPS, sets=SETS), out, progress=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("where,n", [("step", 2), ("save", 1), ("step", 5), ("save", 3)],
                         ids=["before-first-checkpoint", "mid-first-save", "between-checkpoints", "mid-third-save"])
def test_kill_then_resume_equals_uninterrupted(where, n, tmp_path, reference):
    """SIGKILL at a step or mid-checkpoint-write, then the same command: same weights, same metrics rows, no .tmp."""
    out = tmp_path / "run"
    code = KILLER.format(tests=str(TESTS), where=where, n=n, steps=STEPS, sets=SETS, out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    if where == "save":
        assert list(out.rglob(".*.tmp")), "the kill should have left a temporary checkpoint file"
    state = train(tiny_run_config("masked", STEPS, sets=SETS), out, progress=False)
    assert state["done"]
    ref, got = _weights(reference), _weights(out)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert _rows(out) == _rows(reference)
    assert not list(out.rglob("*.tmp"))


def _flip_tensor_byte(path: Path) -> None:
    """Flip one byte inside the tensor data of a safetensors file (past its JSON header)."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    i = header + (len(data) - header) // 2
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_checkpoint_is_refused_with_the_fix(reference, tmp_path, capsys):
    """A flipped byte in a checkpoint's tensor data is a one-line error naming the file, for sampling and resume."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    assert "tensors_sha256" in read_checkpoint_meta(run / CHECKPOINT)
    _flip_tensor_byte(run / CHECKPOINT)
    with pytest.raises(UserError, match="corrupt checkpoint .*checkpoint.safetensors.*delete"):
        load_sampler(run, device="cpu")
    rc = cli.main(["sample", str(run), "--prompt", "a red circle", "--device", "cpu", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "corrupt checkpoint" in err
    assert not (tmp_path / "x.png").exists()


def test_garbage_checkpoint_metadata_is_a_user_error(reference, tmp_path):
    """A checkpoint whose state metadata is not JSON, or lacks a key, is refused with the file named."""
    from flopmatch.files import save_tensors

    for bad in ("{not json", json.dumps({"step": 3})):
        run = tmp_path / f"run{len(bad)}"
        shutil.copytree(reference, run)
        meta = read_checkpoint_meta(run / CHECKPOINT)
        save_tensors(run / CHECKPOINT, load_tensors(run / CHECKPOINT), metadata={**meta, "state": bad})
        with pytest.raises(UserError, match="corrupt checkpoint"):
            train(tiny_run_config("masked", STEPS, sets=SETS), run, progress=False)
    assert os.path.exists(reference / CHECKPOINT)
