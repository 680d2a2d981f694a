"""Configs: JSON round trip, typed --set overrides, validation, and how the CLI reports bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flopmatch import cli
from flopmatch.config import RunConfig, apply_overrides, from_dict, to_dict
from flopmatch.errors import UserError
from flopmatch.rundir import read_config, write_config
from flopmatch.train import train
from tiny import tiny_run_config


def _custom() -> RunConfig:
    cfg = RunConfig(objective="autoregressive")
    cfg.data.holdout = ["red triangle", "blue square"]
    cfg.model.depth, cfg.train.budget, cfg.train.compile = 3, 3e12, True
    cfg.sample.guidance, cfg.text.kind = 1.5, "hash"
    return cfg


def test_json_round_trip(tmp_path):
    """to_dict -> JSON -> from_dict and write_config -> read_config give back an equal config."""
    cfg = _custom()
    assert from_dict(RunConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    write_config(tmp_path, cfg)
    assert read_config(tmp_path) == cfg
    assert from_dict(RunConfig, {}) == RunConfig()  # missing keys take their defaults


def test_set_overrides_are_typed():
    """--set parses values to the field's type: int (also 1e1), float (also 3e12), bool, list[str], str."""
    cfg = apply_overrides(RunConfig(), [
        "train.batch_size=32", "model.depth=1e1", "train.budget=3e12", "train.lr=5e-4", "train.compile=true",
        "train.seed=7", "data.holdout=red triangle, blue square", "text.kind=hash", "objective=diffusion",
    ])
    assert cfg.train.batch_size == 32 and type(cfg.train.batch_size) is int
    assert cfg.model.depth == 10 and type(cfg.model.depth) is int
    assert cfg.train.budget == 3e12 and type(cfg.train.budget) is float
    assert cfg.train.lr == 5e-4 and cfg.train.compile is True and cfg.train.seed == 7
    assert cfg.data.holdout == ["red triangle", "blue square"]
    assert cfg.text.kind == "hash" and cfg.objective.name == "diffusion"
    for text, value in [("false", False), ("0", False), ("no", False), ("off", False), ("yes", True), ("1", True)]:
        assert apply_overrides(RunConfig(), [f"train.compile={text}"]).train.compile is value
    assert apply_overrides(_custom(), ["data.holdout="]).data.holdout == []


@pytest.mark.parametrize("item,key", [("train.nope=1", "train.nope"), ("nope.x=1", "nope"), ("model.depth.x=1", "model.depth.x")])
def test_unknown_set_key_is_user_error_naming_it(item, key):
    """An unknown --set key raises UserError that names the key."""
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        apply_overrides(RunConfig(), [item])


def test_unknown_json_key_is_user_error_naming_it():
    """An unknown key in config JSON raises UserError that names it."""
    with pytest.raises(UserError, match=r"train\.nope"):
        from_dict(RunConfig, {"train": {"nope": 1}})


@pytest.mark.parametrize("item", ["train.batch_size=2.5", "train.batch_size=abc", "train.compile=maybe", "train.lr=fast",
                                  "train.budget=", "train.lr"])
def test_badly_typed_set_is_user_error(item):
    """A --set value that does not parse as the field's type (or has no '=') raises UserError."""
    with pytest.raises(UserError):
        apply_overrides(RunConfig(), [item])


@pytest.mark.parametrize("data", [{"train": {"batch_size": "32"}}, {"train": {"batch_size": True}}, {"train": {"compile": 1}},
                                  {"data": {"holdout": "red triangle"}}, {"train": 5}, {"objective": 3}])
def test_badly_typed_json_is_user_error(data):
    """A JSON value of the wrong type raises UserError."""
    with pytest.raises(UserError):
        from_dict(RunConfig, data)


def test_setting_a_section_is_user_error():
    """--set train=... (a whole section) raises UserError saying it is a section."""
    with pytest.raises(UserError, match="section"):
        apply_overrides(RunConfig(), ["train=1"])


@pytest.mark.parametrize("item", ["objective=gan", "train.budget=0", "train.budget=-5", "train.precision=fp16",
                                  "train.batch_size=0", "model.depth=0", "data.caption_dropout=1", "sample.temperature=0",
                                  "train.parallel=zero3"])
def test_validate_rejects_impossible_values(item):
    """validate() raises UserError for an unknown objective, non-positive budget, unknown precision and the like."""
    cfg = apply_overrides(RunConfig(), [item])
    with pytest.raises(UserError):
        cfg.validate()
    assert RunConfig().validate() == RunConfig()


# ------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished tiny masked run directory."""
    out = tmp_path_factory.mktemp("cli") / "run"
    train(tiny_run_config("masked", 2), out, progress=False)
    return out


def _one_line_user_error(capsys, argv) -> str:
    """Run cli.main(argv); assert exit 2 and exactly one stderr line `flopmatch: error: ...`; return it."""
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flopmatch: error: "), err
    return lines[0]


def test_cli_budget_below_one_step(capsys, tmp_path):
    """`train` with a budget below one step exits 2 with one line, and creates no run directory."""
    out = tmp_path / "run"
    line = _one_line_user_error(capsys, ["train", "--objective", "masked", "--budget", "1e3", "--out", str(out),
                                         "--quiet", "--set", "text.kind=hash"])
    assert "budget" in line and not out.exists()


def test_cli_missing_run_directory(capsys, tmp_path):
    """`sample` on a missing run directory exits 2 with one line naming it."""
    line = _one_line_user_error(capsys, ["sample", str(tmp_path / "nope"), "--prompt", "a red circle"])
    assert "nope" in line and "does not exist" in line


@pytest.mark.parametrize("prompts", [["--prompt", ""], ["--prompt", "a red circle", "--prompt", "   "], []])
def test_cli_empty_prompt(capsys, tiny_run, prompts, tmp_path):
    """`sample` with an empty, blank or missing prompt exits 2 with one line and writes no image."""
    out = tmp_path / "x.png"
    line = _one_line_user_error(capsys, ["sample", str(tiny_run), "--device", "cpu", "--out", str(out), *prompts])
    assert "prompt" in line and not out.exists()


@pytest.mark.parametrize("sets,needle", [(["train.nope=1"], "train.nope"), (["objective=gan"], "gan"),
                                         (["train.batch_size=abc"], "train.batch_size")])
def test_cli_bad_set(capsys, sets, needle):
    """`flops --set` with an unknown key, unknown objective or badly typed value exits 2 with one line naming it."""
    line = _one_line_user_error(capsys, ["flops", "--objective", "masked", *sum((["--set", s] for s in sets), [])])
    assert needle in line


@pytest.mark.parametrize("argv", [["train", "--objective", "gan", "--out", "x"],
                                  ["train", "--objective", "masked", "--budget", "-1", "--out", "x"]])
def test_cli_argparse_errors(capsys, argv):
    """Argument errors (unknown --objective choice, negative budget) exit 2 with a one-line error after the usage."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0]


@pytest.mark.slow
def test_cli_subprocess_user_error_has_no_traceback(tmp_path, flopmatch_cache):
    """`python -m flopmatch.cli` with a bad --set key exits 2, one stderr line, no traceback."""
    env = {**os.environ, "FLOPMATCH_CACHE": str(flopmatch_cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "flopmatch.cli", "flops", "--objective", "masked", "--set", "train.nope=1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "train.nope" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("preset", [None, "cpu", "tiny"])
def test_config_command_lists_every_settable_key(preset, capsys):
    """`flopmatch config --json` lists every leaf field with a meaning, and each key set to its shown value round-trips."""
    assert cli.main(["config", "--json"] + (["--preset", preset] if preset else [])) == 0
    rows = json.loads(capsys.readouterr().out)
    leaves = [k for k in _leaf_keys(to_dict(RunConfig()))]
    assert [r["key"] for r in rows] == leaves
    assert all(r["help"] for r in rows), [r["key"] for r in rows if not r["help"]]
    for r in rows:
        text = ",".join(map(str, r["value"])) if isinstance(r["value"], list) else str(r["value"])
        cfg = apply_overrides(RunConfig(), [f"{r['key']}={text}"])
        section, name = r["key"].split(".")
        assert getattr(getattr(cfg, section), name) == r["value"]


def _leaf_keys(d: dict, where: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{where}.{k}" if where else k
        out += _leaf_keys(v, key) if isinstance(v, dict) else [key]
    return out


def test_tokenizer_train_help_lists_every_autoencoder_key():
    """`tokenizer train --help`'s key list (plain strings: no torch in the parser) is AutoencoderConfig's fields, and
    each data.KEY alias names one of them."""
    import dataclasses

    from flopmatch.cli.tokenizer import AUTOENCODER_KEYS, DATA_ALIASES, flat_overrides
    from flopmatch.tokenizers.autoencoder import AutoencoderConfig, apply_overrides, preset

    listed = [k for keys in AUTOENCODER_KEYS.values() for k in keys]
    assert sorted(listed) == sorted(f.name for f in dataclasses.fields(AutoencoderConfig)) and len(set(listed)) == len(listed)
    assert set(DATA_ALIASES.values()) <= set(listed)
    cfg = apply_overrides(preset("cpu", "kl"), flat_overrides(["data.image_size=64", "data.seed=3", "bits=9"]))
    assert (cfg.image_size, cfg.data_seed, cfg.bits) == (64, 3, 9)


@pytest.mark.parametrize("argv,command", [(["train", "--objetive", "masked", "--out", "x"], "train"),
                                          (["tokenizer", "train", "--kind", "kl", "--out", "x", "--stpes", "2"],
                                           "tokenizer train"),
                                          (["report", "x", "--n-bot", "5"], "report")])
def test_unknown_option_points_at_the_subcommands_help(capsys, argv, command):
    """An option no parser takes is one line naming the subcommand's own --help, not the top-level one."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and f"flopmatch {command}: error: unrecognized arguments" in err
    assert err.endswith(f"(see flopmatch {command} --help)")


def test_every_subcommand_help_says_what_it_does_with_an_example():
    """Each subcommand's help page (study's aside: its parser is registered in cli/study.py) has a description and
    an example line."""
    import argparse

    def pages(parser, name=()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield " ".join((*name, sub_name)), sub
                    yield from pages(sub, (*name, sub_name))

    for name, page in pages(cli.build_parser()):
        if name == "study":
            continue
        assert page.description, name
        assert page.epilog and f"flopmatch {name.split()[0]}" in page.epilog, name
