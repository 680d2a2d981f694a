"""Bad input, tried as a new user would: every case exits 2 with one line on stderr, no traceback,
and writes nothing (no new files, an existing run byte-for-byte unchanged)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from flopmatch import cli
from flopmatch.train import train
from tiny import tiny_run_config

# {run}: a finished tiny run; {tmp}: an empty scratch directory; {file}: an existing plain file there;
# {garbage}: a file of non-JSON text; {badrun}: a run directory whose config.json is corrupt.
TRAIN = ["train", "--objective", "masked", "--depth", "1"]
CASES = {
    # training budgets and --set values
    "budget nan": TRAIN + ["--budget", "nan", "--out", "{tmp}/r"],
    "budget inf": TRAIN + ["--budget", "inf", "--out", "{tmp}/r"],
    "budget negative": TRAIN + ["--budget", "-1", "--out", "{tmp}/r"],
    "budget text": TRAIN + ["--budget", "lots", "--out", "{tmp}/r"],
    "budget absurd": TRAIN + ["--budget", "1e40", "--out", "{tmp}/r", "--set", "text.kind=hash"],
    "budget below one step": TRAIN + ["--budget", "10", "--out", "{tmp}/r", "--set", "text.kind=hash"],
    "lr nan": TRAIN + ["--budget", "1e10", "--out", "{tmp}/r", "--set", "train.lr=nan"],
    "lr negative": TRAIN + ["--budget", "1e10", "--out", "{tmp}/r", "--set", "train.lr=-1"],
    "checkpoint_every 0": TRAIN + ["--budget", "1e10", "--out", "{tmp}/r", "--set", "train.checkpoint_every=0"],
    "log_every 0": TRAIN + ["--budget", "1e10", "--out", "{tmp}/r", "--set", "train.log_every=0"],
    "patch 0": TRAIN + ["--budget", "1e10", "--out", "{tmp}/r", "--set", "tokenizer.patch=0"],
    "patch not dividing": TRAIN + ["--budget", "1e10", "--out", "{tmp}/r", "--set", "tokenizer.patch=5"],
    "head_dim 0": TRAIN + ["--budget", "1e10", "--out", "{tmp}/r", "--set", "model.head_dim=0"],
    "ema_decay 2": TRAIN + ["--budget", "1e10", "--out", "{tmp}/r", "--set", "train.ema_decay=2"],
    "caption_dropout 1": TRAIN + ["--budget", "1e10", "--out", "{tmp}/r", "--set", "data.caption_dropout=1"],
    "unknown key": TRAIN + ["--budget", "1e10", "--out", "{tmp}/r", "--set", "train.speed=9"],
    "set without =": TRAIN + ["--budget", "1e10", "--out", "{tmp}/r", "--set", "train.lr"],
    "wrong type": TRAIN + ["--budget", "1e10", "--out", "{tmp}/r", "--set", "train.batch_size=big"],
    "old guidance key nan": TRAIN + ["--budget", "1e10", "--out", "{tmp}/r", "--set", "sample.cfg=nan"],
    "precision": TRAIN + ["--budget", "1e10", "--out", "{tmp}/r", "--set", "train.precision=fp8"],
    "depth 0": ["train", "--objective", "masked", "--depth", "0", "--budget", "1e10", "--out", "{tmp}/r"],
    "depth 1000": ["train", "--objective", "masked", "--depth", "1000", "--budget", "1e20", "--out", "{tmp}/r"],
    "depth too big for memory": ["train", "--objective", "masked", "--depth", "256", "--budget", "1e22", "--out", "{tmp}/r",
                                 "--set", "text.kind=hash"],
    "depth fractional": ["train", "--objective", "masked", "--depth", "1.5", "--budget", "1e10", "--out", "{tmp}/r"],
    "objective unknown": ["train", "--objective", "gan", "--budget", "1e10", "--out", "{tmp}/r"],
    "out is a file": TRAIN + ["--budget", "1e10", "--out", "{file}"],
    "config not JSON": TRAIN + ["--budget", "1e10", "--out", "{tmp}/r", "--config", "{garbage}"],
    "resume a corrupt config.json": TRAIN + ["--budget", "1e10", "--out", "{badrun}", "--set", "text.kind=hash"],
    # sampling
    "sample num -1": ["sample", "{run}", "--prompt", "a red circle", "--num", "-1"],
    "sample num 0": ["sample", "{run}", "--prompt", "a red circle", "--num", "0"],
    "sample guidance nan": ["sample", "{run}", "--prompt", "a red circle", "--guidance", "nan"],
    "sample cfg inf": ["sample", "{run}", "--prompt", "a red circle", "--cfg", "inf"],
    "sample temperature nan": ["sample", "{run}", "--prompt", "a red circle", "--temperature", "nan"],
    "sample temperature 0": ["sample", "{run}", "--prompt", "a red circle", "--temperature", "0"],
    "sample top-k -1": ["sample", "{run}", "--prompt", "a red circle", "--top-k", "-1"],
    "sample steps -1": ["sample", "{run}", "--prompt", "a red circle", "--steps", "-1"],
    "sample too many masked steps": ["sample", "{run}", "--prompt", "a red circle", "--steps", "999"],
    "sample scale 0": ["sample", "{run}", "--prompt", "a red circle", "--scale", "0"],
    "sample out is a directory": ["sample", "{run}", "--prompt", "a red circle", "--out", "{tmp}"],
    "sample no prompt": ["sample", "{run}"],
    "sample empty prompt": ["sample", "{run}", "--prompt", "  "],
    "sample missing run": ["sample", "{tmp}/nope", "--prompt", "a red circle"],
    "sample not a run": ["sample", "{tmp}", "--prompt", "a red circle"],
    # flops and eval
    "flops guidance nan": ["flops", "--objective", "masked", "--guidance", "nan"],
    "eval num-samples 1": ["eval", "{run}", "--num-samples", "1"],
    "eval batch-size 0": ["eval", "{run}", "--batch-size", "0"],
    "eval sweep unknown": ["eval", "{run}", "--sweep", "speed=1,2"],
    "eval sweep not numbers": ["eval", "{run}", "--sweep", "cfg=a,b"],
    "eval sweep nan": ["eval", "{run}", "--sweep", "guidance=1,nan"],
    "eval fid-boot -1": ["eval", "{run}", "--fid-boot", "-1"],
    "eval sweep steps inf": ["eval", "{run}", "--sweep", "steps=4,inf"],
    "eval sweep steps fractional": ["eval", "{run}", "--sweep", "steps=2.5"],
    "eval missing run": ["eval", "{tmp}/nope"],
    "eval weights unknown": ["eval", "{run}", "--weights", "ema@0.5"],
    "eval raw and post-hoc": ["eval", "{run}", "--raw", "--weights", "ema@0.1"],
    "sample weights unknown": ["sample", "{run}", "--prompt", "a red circle", "--weights", "raw"],
    # studies
    "study budgets nan": ["study", "--out", "{tmp}/s", "--budgets", "1e12,nan"],
    "study budgets inf": ["study", "--out", "{tmp}/s", "--budgets", "inf"],
    "study budgets empty": ["study", "--out", "{tmp}/s", "--budgets", ""],
    "study depths empty": ["study", "--out", "{tmp}/s", "--depths", ""],
    "study depths 0": ["study", "--out", "{tmp}/s", "--depths", "0,1"],
    "study depths fractional": ["study", "--out", "{tmp}/s", "--depths", "1.5"],
    "study seeds 0": ["study", "--out", "{tmp}/s", "--seeds", "0"],
    "study workers 0": ["study", "--out", "{tmp}/s", "--workers", "0"],
    "study objectives unknown": ["study", "--out", "{tmp}/s", "--objectives", "masked,gan"],
    "study preset unknown": ["study", "--out", "{tmp}/s", "--preset", "huge"],
    "study launcher unknown": ["study", "--out", "{tmp}/s", "--launcher", "kubernetes"],
    "study slurm unreachable": ["study", "--out", "{tmp}/s", "--preset", "tiny", "--launcher", "slurm"],  # no SLURM_CONF
    "study slurm time": ["study", "--out", "{tmp}/s", "--preset", "tiny", "--launcher", "slurm", "--slurm-time", "1:2:3:4"],
    "study out is a file": ["study", "--out", "{file}", "--preset", "tiny"],
    "study eval-samples 5": ["study", "--out", "{tmp}/s", "--eval-samples", "5"],
    "study unknown dataset": ["study", "--out", "{tmp}/s", "--preset", "tiny", "--set", "data.name=imagenet"],
    "study unknown device": ["study", "--out", "{tmp}/s", "--preset", "tiny", "--set", "train.device=tpu"],
    "study budget absurd": ["study", "--out", "{tmp}/s", "--preset", "tiny", "--budgets", "1e40", "--plan-only"],
    "study eval-ema too long": ["study", "--out", "{tmp}/s", "--preset", "tiny", "--eval-ema", "0.05,0.4"],
    "study sweep-guidance below 1": ["study", "--out", "{tmp}/s", "--preset", "tiny", "--sweep-guidance", "0.5,2"],
    "study sweep-guidance not a number": ["study", "--out", "{tmp}/s", "--preset", "tiny", "--sweep-guidance", "low"],
    "study sweep-samples too few": ["study", "--out", "{tmp}/s", "--preset", "tiny", "--sweep-samples", "3"],
    "study eval-ema without snapshots": ["study", "--out", "{tmp}/s", "--preset", "tiny", "--set", "train.ema_snapshots=0",
                                         "--plan-only"],
    # tokenizers and report
    "tokenizer steps 0": ["tokenizer", "train", "--kind", "kl", "--out", "{tmp}/t", "--steps", "0"],
    "tokenizer out is a file": ["tokenizer", "train", "--kind", "kl", "--out", "{file}"],
    "tokenizer preset unknown": ["tokenizer", "train", "--kind", "lfq", "--out", "{tmp}/t", "--preset", "huge"],
    "tokenizer lr nan": ["tokenizer", "train", "--kind", "kl", "--out", "{tmp}/t", "--set", "lr=nan"],
    "tokenizer beta2 5": ["tokenizer", "train", "--kind", "lfq", "--out", "{tmp}/t", "--set", "beta2=5"],
    "tokenizer unknown key": ["tokenizer", "train", "--kind", "lfq", "--out", "{tmp}/t", "--set", "bits_per_code=3"],
    "tokenizer eval missing": ["tokenizer", "eval", "{tmp}/nope"],
    "report missing": ["report", "{tmp}/nope"],
    "report not a study": ["report", "{tmp}"],
    "report negative seed": ["report", "{tmp}", "--seed=-1"],
    "config preset unknown": ["config", "--preset", "huge"],
    # found by an audit as a new user (session 16)
    "study sets a grid key": ["study", "--out", "{tmp}/s", "--preset", "tiny", "--set", "model.depth=3", "--plan-only"],
    "study sets the paradigm": ["study", "--out", "{tmp}/s", "--preset", "tiny", "--set", "objective.name=diffusion"],
    "study eval-guidance list": ["study", "--out", "{tmp}/s", "--preset", "tiny", "--eval-guidance", "1,2"],
    "study device missing": ["study", "--out", "{tmp}/s", "--preset", "tiny", "--set", "train.device=cuda:99"],
    "train out under /proc": TRAIN + ["--budget", "1e10", "--out", "/proc/flopmatch-test/r"],
    "sample device unsupported": ["sample", "{run}", "--prompt", "a red circle", "--device", "xla"],
    "sample device missing": ["sample", "{run}", "--prompt", "a red circle", "--device", "cuda:99"],
    "sample run is a file": ["sample", "{file}", "--prompt", "a red circle"],
    "flops config is a directory": ["flops", "--objective", "masked", "--config", "{tmp}"],
    "bench depth above the maximum": ["bench", "--quick", "--depths", "300"],
    "compare out is a file": ["compare", "{run}", "{tmp}", "--out", "{file}"],
    "eval a setting the paradigm ignores": ["eval", "{run}", "--solver", "heun"],
    "eval sweep of a setting the paradigm ignores": ["eval", "{run}", "--sweep", "shift=1,3"],
    "eval sweep without values": ["eval", "{run}", "--sweep", "steps=,"],
    "eval features empty": ["eval", "{run}", "--features", ""],
    "sample kv cache off for masked": ["sample", "{run}", "--prompt", "a red circle", "--no-kv-cache"],
    "study tokenizer-set without learned tokenizers": ["study", "--out", "{tmp}/s", "--preset", "tiny", "--tokenizer",
                                                       "weight-free", "--tokenizer-set", "steps=5"],
    "tokenizer without subcommand": ["tokenizer"],
    "tokenizer device missing": ["tokenizer", "train", "--kind", "lfq", "--out", "{tmp}/t", "--steps", "2", "--set",
                                 "device=cuda:99"],
    "unknown command": ["fly"],
    # found by an audit as a new user (session 18)
    "tokenizer out is a run": ["tokenizer", "train", "--kind", "kl", "--out", "{run}", "--steps", "2"],
    "train bad data under missing folders": TRAIN + ["--budget", "1e10", "--data", "folder:/nonexistent",
                                                    "--out", "{tmp}/new/deeper/r"],
    "sample out not a png": ["sample", "{run}", "--prompt", "a red circle", "--out", "{tmp}/grid.jpg"],
    "sample missing run without prompt": ["sample", "{tmp}/nope"],
    "eval steps fixed and swept": ["eval", "{run}", "--steps", "4", "--sweep", "steps=2,8"],
    "flops steps for next-token": ["flops", "--objective", "autoregressive", "--steps", "5"],
    "flops solver for masked": ["flops", "--objective", "masked", "--solver", "heun"],
    "flops config not json": ["flops", "--objective", "masked", "--config", "{garbage}"],
    "eval ref-stats not an npz": ["eval", "{run}", "--ref-stats", "{garbage}"],
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny masked run (3 steps)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_run_config("masked", 3), out, progress=False)
    return out


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` with the sha256 of its bytes, and every folder (an empty one left behind is debris)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for root in roots for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, finished, tmp_path, capsys, monkeypatch):
    """Exit 2, exactly one stderr line starting 'flopmatch', no traceback, no file created or changed."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (tmp_path / "a_file").write_text("not a directory\n")
    (tmp_path / "garbage.json").write_text("{this is not json")
    badrun = tmp_path / "badrun"
    badrun.mkdir()
    (badrun / "config.json").write_text('{"objective": "masked", "train": ')
    values = {"run": str(finished), "tmp": str(scratch), "file": str(tmp_path / "a_file"),
              "garbage": str(tmp_path / "garbage.json"), "badrun": str(badrun)}
    argv = [a.format(**values) for a in CASES[name]]
    before = _snapshot(tmp_path, finished)
    if "slurm" in name:
        monkeypatch.delenv("SLURM_CONF", raising=False)  # no cluster configured: sinfo fails at once
    rc = cli.main(argv)
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert rc == 2, (rc, out.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("flopmatch") and "error" in lines[0], out.err[-2000:]
    assert "Traceback" not in out.err + out.out
    assert _snapshot(tmp_path, finished) == before, "bad input wrote or changed files"


def test_study_depths_given_empty_is_not_silently_the_preset(tmp_path, capsys):
    """`--depths ""` is refused rather than quietly running the preset's depths (regression of a silent accept)."""
    rc = cli.main(["study", "--out", str(tmp_path / "s"), "--preset", "tiny", "--depths", "", "--plan-only"])
    assert rc == 2 and "--depths" in capsys.readouterr().err


def test_a_study_that_produced_nothing_takes_the_corrected_command(tmp_path, capsys):
    """A study stopped by bad input before its first result holds only its settings: the corrected command replaces
    them (it used to be refused as incomparable with the mistaken settings, until the user deleted the directory)."""
    out = tmp_path / "s"
    assert cli.main(["study", "--out", str(out), "--preset", "tiny", "--objectives", "masked", "--no-calibrate",
                     "--data", f"folder:{tmp_path / 'missing'}"]) == 2
    assert (out / "study.json").exists()  # the settings were written before the data was read
    capsys.readouterr()
    # another data source and paradigm: a grown or repeated study would refuse both; this one takes them, then stops
    # at the next bad input (a missing GPU), before writing anything
    assert cli.main(["study", "--out", str(out), "--preset", "tiny", "--objectives", "diffusion", "--no-calibrate",
                     "--set", "train.device=cuda:99"]) == 2
    got = capsys.readouterr()
    assert "produced nothing yet" in got.out and "incomparable" not in got.err and "cuda:99" in got.err
    assert json.loads((out / "study.json").read_text())["objectives"] == ["masked"]  # not rewritten by the failed command


def test_a_value_read_as_a_flag_names_the_equals_form(tmp_path, capsys):
    """`--budgets -1e9`: argparse takes the value for a flag ("expected one argument"); the line says how to write it."""
    assert cli.main(["study", "--out", str(tmp_path / "s"), "--budgets", "-1e9", "--plan-only"]) == 2
    err = capsys.readouterr().err
    assert "expected one argument" in err and "write --budgets=VALUE" in err and not (tmp_path / "s").exists()
    assert cli.main(["study", "--out", str(tmp_path / "s"), "--budgets=-1e9", "--plan-only"]) == 2  # then checked
    assert "finite numbers > 0" in capsys.readouterr().err


def test_cases_cover_every_subcommand():
    """The table exercises every subcommand the parser has."""
    commands = {argv[0] for argv in CASES.values()}
    assert {"train", "sample", "flops", "eval", "study", "tokenizer", "report", "config", "bench", "compare"} <= commands
    assert json.dumps(CASES)  # plain data: the table can be shown and extended
