"""`flopmatch eval`: reproducible numbers, sharding across ranks, eval.json contents and CLI errors."""

from __future__ import annotations

import json

import pytest
import torch

import flopmatch.dist as dist
from flopmatch.evaluation.run import EvalConfig, evaluate, generate_sharded
from tiny import trained_masked_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished tiny masked run (hash text, 32 px so the attribute evaluator applies)."""
    return trained_masked_run(tmp_path_factory.mktemp("evalrun") / "run", budget_steps=4)


def _strip_timing(doc: dict) -> dict:
    doc = json.loads(json.dumps(doc))
    for e in doc["entries"].values():
        e.pop("inference", None)
        e["manifest"].pop("packages", None)
    return doc


@pytest.mark.slow
def test_eval_twice_with_same_seed_gives_identical_numbers(tiny_run, tmp_path):
    """Every non-timing number in eval.json is reproduced exactly by a second evaluation."""
    from flopmatch.sample import load_sampler

    settings = [load_sampler(tiny_run).cfg.sample]
    ecfg = EvalConfig(num_samples=12, batch_size=5, timing_budget_s=0.1, kid_subset=6, kid_subsets=5)
    first = _strip_timing(evaluate(tiny_run, settings, ecfg, progress=False))
    (tiny_run / "eval.json").unlink()
    second = _strip_timing(evaluate(tiny_run, settings, ecfg, progress=False))
    assert first == second
    (entry,) = second["entries"].values()
    m = entry["manifest"]
    for key in ("num_samples", "seed", "sampler", "weights", "feature_extractors", "reference", "prompts",
                "checkpoint_sha256", "tokenizer", "generated_images_sha256"):
        assert m.get(key) is not None, key
    assert m["feature_extractors"]["effnet"]["resize"]
    assert 0.0 <= entry["metrics"]["prompt_following"]["full_match"] <= 1.0
    assert entry["metrics"]["effnet"]["fid"] >= 0
    boot = entry["metrics"]["effnet"]["fid_boot"]  # evaluation-noise replicates, also reproduced exactly above
    assert boot["n"] == len(boot["replicates"]) == min(ecfg.fid_boot, 12) and boot["std"] > 0  # jackknife: <= 1 per image
    kid_boot = entry["metrics"]["effnet"]["kid_boot"]
    assert kid_boot["n"] == len(kid_boot["replicates"]) == ecfg.fid_boot and kid_boot["std"] > 0
    m = entry["metrics"]["effnet"]  # precision/recall on the 12 caption-matched pairs; FID flagged at n < 2000
    assert (m["num_real"], m["num_fake"], m["pr_num_real"], m["pr_num_fake"], m["fid_small_n"]) == (24, 12, 12, 12, True)
    assert (m["fid_num_real"], m["fid_num_fake"]) == (12, 12)  # FID: the 12 prompt-matched reference images


@pytest.mark.slow
def test_eval_times_its_settings_together(tiny_run):
    """`flopmatch eval` of two settings times both in the same interleaved rounds, after sampling and scoring."""
    from dataclasses import replace

    from flopmatch.sample import load_sampler

    base = load_sampler(tiny_run).cfg.sample
    settings = [replace(base, steps=2), replace(base, steps=4)]
    ecfg = EvalConfig(num_samples=6, batch_size=6, timing_budget_s=0.05, timing_rounds=3, kid_subset=4, kid_subsets=2,
                      fid_boot=0, seed=7)  # fmt: skip
    doc = evaluate(tiny_run, settings, ecfg, progress=False)
    entries = [e for k, e in doc["entries"].items() if k.endswith("seed=7")]
    assert len(entries) == 2
    keys = sorted(k for k in doc["entries"] if k.endswith("seed=7"))
    for e in entries:
        inf = e["inference"]
        assert len(inf["latency_rounds"]) == len(inf["throughput_rounds"]) == 3 and inf["latency_s"] > 0
        assert sorted(inf["timing"]["timed_together"]) == keys and inf["sample_flops_per_image"] > 0
    assert entries[0]["inference"]["sample_flops_per_image"] < entries[1]["inference"]["sample_flops_per_image"]


def test_sharded_generation_equals_single_process(tiny_run, tmp_path, monkeypatch):
    """Generating with 2 ranks (each taking every other batch) gives the same images as 1 rank."""
    from flopmatch.sample import load_sampler

    sampler = load_sampler(tiny_run)
    prompts = [f"a {c} circle" for c in ("red", "blue", "green", "yellow", "white", "cyan", "purple")]
    single = generate_sharded(sampler, prompts, sampler.cfg.sample, seed=3, batch_size=3, out_dir=tmp_path, progress=False)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "barrier", lambda: None)
    results = {}
    for r in (1, 0):  # rank 1 writes its shard first; rank 0 then assembles both
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        monkeypatch.setattr(dist, "is_main", lambda r=r: r == 0)
        results[r] = generate_sharded(sampler, prompts, sampler.cfg.sample, seed=3, batch_size=3, out_dir=tmp_path, progress=False)
    assert results[1] is None
    assert torch.equal(results[0], single)
    assert not list(tmp_path.glob("shard-*"))  # shards cleaned up


def test_eval_cli_bad_input_is_one_line_error(tiny_run, capsys):
    """Bad sweeps and missing run directories exit 2 with one line on stderr."""
    from flopmatch.cli import main

    assert main(["eval", str(tiny_run), "--sweep", "bogus=1,2"]) == 2
    assert main(["eval", str(tiny_run.parent / "nope")]) == 2
    assert main(["eval", str(tiny_run), "--fid-boot", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("flopmatch") and "error:" in line for line in err)


def test_export_round_trips_to_the_generated_images(tiny_run, tmp_path):
    """--export: the PNGs and samples.npz (arr_0, N x H x W x 3 uint8) hold exactly the evaluated images, in prompt
    order; the stored tensors, the PNGs and the npz agree bit for bit, and nothing temporary is left."""
    from flopmatch.evaluation.export import read_export
    from flopmatch.files import load_tensors
    from flopmatch.rundir import sample_dir
    from flopmatch.sample import load_sampler

    settings = [load_sampler(tiny_run).cfg.sample]
    ecfg = EvalConfig(num_samples=6, batch_size=6, kid_subset=4, kid_subsets=2, fid_boot=0, prompt_following=False,
                      timing=False, export=str(tmp_path / "export"))
    doc = evaluate(tiny_run, settings, ecfg, progress=False)
    (key,) = [p.name for p in (tmp_path / "export").iterdir()]  # eval.json also holds other tests' entries
    assert key in doc["entries"] and doc["entries"][key]["manifest"]["num_samples"] == 6
    from_png, from_npz, prompts = read_export(tmp_path / "export" / key)
    stored = load_tensors(sample_dir(tiny_run, key) / "images.safetensors")["images"]
    assert from_png.dtype == from_npz.dtype == torch.uint8 and from_png.shape == (6, 3, 32, 32)
    assert torch.equal(from_png, from_npz) and torch.equal(from_png, stored)
    assert prompts == json.loads((sample_dir(tiny_run, key) / "prompts.json").read_text())


def test_eval_cli_passes_reference_stats_paths_absolute(tiny_run, tmp_path, monkeypatch):
    """--export-ref and --ref-stats reach EvalConfig as absolute paths (the manifest must not depend on the cwd)."""
    from flopmatch.cli import main
    from flopmatch.evaluation import run as run_module

    seen = []
    monkeypatch.setattr(run_module, "evaluate", lambda run, settings, ecfg: seen.append(ecfg) or {"entries": {}})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ref.npz").write_bytes(b"")
    assert main(["eval", str(tiny_run), "--export-ref", "out/ref.npz"]) == 0
    assert main(["eval", str(tiny_run), "--ref-stats", "ref.npz"]) == 0
    assert seen[0].export_ref == str(tmp_path / "out" / "ref.npz") and seen[0].ref_stats == ""
    assert seen[1].ref_stats == str(tmp_path / "ref.npz") and seen[1].export_ref == ""


def test_eval_builds_its_extractors_on_the_samplers_device(tiny_run, tmp_path, monkeypatch):
    """evaluate() asks for every feature extractor on the device it samples on (so on a GPU, features and the
    FID/KID bootstraps run there; here the sampler's device is the CPU)."""
    import shutil

    import flopmatch.evaluation.run as run_mod
    from flopmatch.sample import load_sampler

    asked = []
    real = run_mod.make_feature_extractor

    def recording(name, device="cpu"):
        asked.append((name, torch.device(device)))
        return real(name, device)

    monkeypatch.setattr(run_mod, "make_feature_extractor", recording)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "eval.json").unlink(missing_ok=True)
    sampler_device = load_sampler(run).device
    ecfg = EvalConfig(num_samples=6, batch_size=6, kid_subset=4, kid_subsets=2, fid_boot=0, prompt_following=False,
                      timing=False, save_images=False)
    evaluate(run, [load_sampler(run).cfg.sample], ecfg, progress=False)
    assert asked == [(name, sampler_device) for name in ecfg.features]


def test_two_evaluations_at_once_keep_each_others_entries(tmp_path):
    """eval.json is re-read and rewritten under a lock for every entry: two evaluations of one run writing at the same
    time (threads here; processes lock alike) keep all of both's entries. Each rewrote the document it read at its
    start before, and the last writer dropped the other's."""
    import threading

    from flopmatch.evaluation.run import merge_entries

    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"version": 3, "entries": {"old": {"x": 0}}}))

    def writer(name: str) -> None:
        for i in range(40):
            merge_entries(path, {f"{name}-{i}": {"x": i}})

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = json.loads(path.read_text())["entries"]
    assert sorted(entries) == sorted(["old", *(f"{n}-{i}" for n in "ab" for i in range(40))])


@pytest.mark.parametrize("text", ['{"version": 3}', "[]"])
def test_an_eval_json_of_another_shape_is_refused_before_sampling(tiny_run, tmp_path, monkeypatch, text):
    """A run's eval.json without an entries object is one line naming the file, before any image is sampled (it was a
    KeyError traceback after sampling); the file is left as it was."""
    import shutil

    import flopmatch.evaluation.run as run_mod
    from flopmatch.errors import UserError
    from flopmatch.sample import load_sampler

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "eval.json").write_text(text)
    monkeypatch.setattr(run_mod, "generate_sharded", lambda *a, **k: pytest.fail("sampled before the check"))
    with pytest.raises(UserError, match=r"eval.json is not a flopmatch eval.json \(no \"entries\" object\); move it away"):
        evaluate(run, [load_sampler(run).cfg.sample], EvalConfig(num_samples=4, timing=False), progress=False)
    assert (run / "eval.json").read_text() == text


def test_a_study_redoes_an_entry_of_an_earlier_checkpoint(tiny_run, tmp_path):
    """An eval.json entry made while the run trained (its manifest's checkpoint_step before the run's last step) is not
    the trained run's result: the study's to-do check leaves it out, so the setting is evaluated again."""
    import shutil

    from flopmatch.rundir import read_state
    from flopmatch.study.job import _final_entries

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    step = read_state(run)["step"]
    entries = {"final": {"manifest": {"checkpoint_step": step}}, "earlier": {"manifest": {"checkpoint_step": step - 1}},
               "no manifest": {"metrics": {}}}
    (run / "eval.json").write_text(json.dumps({"version": 3, "entries": entries}))
    assert sorted(_final_entries(run)) == ["final", "no manifest"]
