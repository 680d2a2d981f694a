"""The run-directory contract: run directories written by v0.1 (old key names) still load, sample and resume."""

from __future__ import annotations

import json

import pytest
import torch

from flopmatch.config import RunConfig, apply_overrides, from_dict, to_dict
from flopmatch.files import load_tensors, read_json, save_tensors
from flopmatch.nets import NetSpec
from flopmatch.report.data import main_setting
from flopmatch.rundir import CHECKPOINT, read_checkpoint_meta, read_config, read_state, tokenizer_dir
from flopmatch.sample import generate, load_sampler
from flopmatch.tokenizers.base import TokenizerSpec
from flopmatch.train import train
from tiny import tiny_run_config


def _to_v01(cfg_dict: dict) -> dict:
    """A config dict as v0.1 wrote it: paradigm name at the top, hyper-parameters in "method", guidance as "cfg"."""
    old = {k: v for k, v in cfg_dict.items() if k != "objective"}
    method = dict(cfg_dict["objective"])
    old["objective"] = method.pop("name")
    old["method"] = method
    sample = dict(old["sample"])
    sample["cfg"] = sample.pop("guidance")
    old["sample"] = sample
    return old


def _rewrite_as_v01(run) -> None:
    """Rewrite a run directory's config.json, checkpoint state and tokenizer.json with v0.1's key names."""
    (run / "config.json").write_text(json.dumps(_to_v01(read_json(run / "config.json")), indent=2))
    meta = read_checkpoint_meta(run / CHECKPOINT)
    state = json.loads(meta["state"])
    state["net_spec"]["vocab"] = state["net_spec"].pop("vocab_size")
    state["tokenizer"]["kind"] = state["tokenizer"].pop("tokens")
    save_tensors(run / CHECKPOINT, load_tensors(run / CHECKPOINT), metadata={**meta, "state": json.dumps(state)})
    tok = read_json(tokenizer_dir(run) / "tokenizer.json")
    tok["spec"]["kind"] = tok["spec"].pop("tokens")
    (tokenizer_dir(run) / "tokenizer.json").write_text(json.dumps(tok, indent=2))


@pytest.mark.parametrize("objective", ["masked", "diffusion"])
def test_v01_run_directory_resumes_and_samples_like_a_new_one(objective, tmp_path):
    """An interrupted run rewritten in v0.1's format resumes to the same weights and samples the same images."""
    cfg = tiny_run_config(objective, 4, sets=["sample.guidance=2.5", "objective.min_mask=2"])
    new, old = tmp_path / "new", tmp_path / "old"
    for run in (new, old):
        train(cfg, run, progress=False, stop_after=2)
    _rewrite_as_v01(old)
    assert "method" in read_json(old / "config.json") and read_config(old) == cfg  # migrated on read
    for run in (new, old):
        assert train(cfg, run, progress=False)["done"]  # resumes: the old config counts as the same config
    a, b = load_tensors(new / CHECKPOINT), load_tensors(old / CHECKPOINT)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k.startswith(("model.", "ema.")))
    prompts = ["a red circle", "a small blue square on the left"]
    images = [generate(load_sampler(r, device="cpu"), prompts, cfg.sample, seed=1) for r in (new, old)]
    assert torch.equal(images[0], images[1])
    assert read_state(old)["done"]


def test_v01_keys_migrate_in_files_and_set_paths():
    """Old config keys load into today's fields; old --set paths set the renamed fields; new files use new names."""
    cfg = RunConfig(objective="diffusion")
    cfg.sample.guidance, cfg.objective.t_mean = 4.0, 0.5
    assert from_dict(RunConfig, _to_v01(to_dict(cfg))) == cfg
    assert "cfg" not in to_dict(cfg)["sample"] and "method" not in to_dict(cfg)
    via_old = apply_overrides(RunConfig(), ["objective=diffusion", "method.t_mean=0.5", "sample.cfg=4"])
    assert via_old == cfg
    spec = NetSpec(1, 64, 1, 4, "discrete", 8, 0, 1024, 64, 24, False, False)
    assert NetSpec.from_dict({**{k: v for k, v in spec.to_dict().items() if k != "vocab_size"}, "vocab": 1024}) == spec
    tok = TokenizerSpec("discrete", 8, vocab_size=1024)
    assert TokenizerSpec.from_dict({"kind": "discrete", "grid": 8, "vocab_size": 1024, "channels": 0}) == tok


def test_v01_config_with_only_a_method_section_loads():
    """A v0.1 config.json that set method hyper-parameters but left the objective at its default still loads."""
    cfg = from_dict(RunConfig, {"method": {"t_mean": 0.5}, "sample": {"cfg": 2.0}})
    assert cfg.objective.name == "masked" and cfg.objective.t_mean == 0.5 and cfg.sample.guidance == 2.0


def test_torn_last_metrics_line_does_not_block_resume(tmp_path):
    """A kill in the middle of appending metrics leaves a partial line; resuming drops it and logs the same rows."""
    cfg = tiny_run_config("masked", 6, sets=["train.log_every=1", "train.checkpoint_every=2"])
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(cfg, ref, progress=False)
    train(cfg, run, progress=False, stop_after=3)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.2')  # torn: no closing brace, no newline
    assert train(cfg, run, progress=False)["done"]
    strip = lambda p: [{k: v for k, v in json.loads(ln).items() if k not in ("elapsed_s", "flops_per_s", "mfu")}  # noqa: E731
                       for ln in (p / "metrics.jsonl").read_text().splitlines()]
    assert strip(run) == strip(ref)


def test_report_matches_v01_eval_settings_to_the_run_default():
    """An eval.json entry that names the guidance scale "cfg" (v0.1) is still recognised as the run's main setting."""
    sample = RunConfig().sample
    old = {"steps": 12, "cfg": sample.guidance, "temperature": 1.0, "top_k": 0}
    other = {**old, "cfg": sample.guidance + 1}
    entries = {"a": {"settings": other}, "b": {"settings": old}}
    assert main_setting(entries, sample, 12) == ("b", "matches the run's default sample settings")
