"""Tokenizer matching (flopmatch.study.tokenizer_match): the weaker learned tokenizer is retrained with doubled steps
until the two are within a PSNR tolerance or the longest schedule; every candidate is kept and recorded, a re-run
trains nothing again, and the report says how it ended."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import flopmatch.study.ceilings as ceilings_stage
import flopmatch.study.runner
import flopmatch.study.tokenizer_match as tm
from flopmatch import cli
from flopmatch.data.datasets import make_dataset
from flopmatch.errors import UserError
from flopmatch.evaluation.ceilings import CEILINGS_FILE, CEILINGS_VERSION
from flopmatch.files import atomic_write_json
from flopmatch.report import ceilings as report_ceilings
from flopmatch.report.ceilings import ceiling_banner, ceilings_table, match_line, read_ceilings
from flopmatch.study.ceilings import ensure_ceilings
from flopmatch.study.estimate import Rates, estimate
from flopmatch.study.grow import reconcile
from flopmatch.study.plan import autoencoder_config, base_config, make_plan, tokenizer_dirs
from flopmatch.study.presets import StudyConfig, study_preset
from flopmatch.study.tokenizer_phase import ensure_tokenizers, prepared
from flopmatch.tokenizers.registry import load_learned
from flopmatch.tokenizers.train_ae import train_autoencoder

# a few-thousand-parameter autoencoder (widths 8-16, 8x8 grid at 32 px) trained for 3 steps: milliseconds
TINY_AE = ["channels=8,16", "patch=2", "num_res_blocks=1", "latent_channels=4", "bits=6", "steps=3", "batch_size=4",
           "warmup_steps=1", "precision=fp32", "device=cpu", "log_every=1", "stats_images=32"]
KINDS = {"continuous": "kl", "discrete": "lfq"}


def learned_study(tol: float = 0.0, most: int = 4, objectives=("diffusion", "masked")) -> StudyConfig:
    """The tiny preset (256 training and 64 eval images of 32 px) on learned tokenizers of 3 steps."""
    scfg = study_preset("tiny")
    scfg.objectives, scfg.tokenizer, scfg.features = list(objectives), "learned", ["effnet"]
    scfg.tokenizer_overrides = list(TINY_AE)
    scfg.tokenizer_match, scfg.tokenizer_match_max = tol, most
    return scfg.validate()


def files(study: Path) -> dict[str, bytes]:
    """Every file under ``study`` (relative path -> bytes)."""
    return {p.relative_to(study).as_posix(): p.read_bytes() for p in sorted(study.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def unmatched(tmp_path_factory) -> Path:
    """A study directory whose KL and LFQ tokenizers trained as without matching (tolerance 0)."""
    study = tmp_path_factory.mktemp("unmatched") / "study"
    ensure_tokenizers(study, learned_study(), progress=False)
    return study


@pytest.fixture
def copy_of(tmp_path):
    """Factory: a fresh copy of a study directory."""
    def copy(study: Path) -> Path:
        out = tmp_path / "study"
        shutil.copytree(study, out)
        return out
    return copy


@pytest.fixture
def fake_psnr(monkeypatch):
    """Set the validation PSNR of each (kind, steps) (dB), so the gap is whatever a test needs."""
    def install(table: dict[str, dict[int, float]]) -> None:
        monkeypatch.setattr(tm, "val_psnr", lambda tok, images: table[tok.kind][tok.config.steps])
    return install


@pytest.fixture
def trainings(monkeypatch) -> list[tuple[str, int]]:
    """Every autoencoder training the procedure starts, as (kind, steps)."""
    calls = []

    def spy(cfg, *args, **kw):
        calls.append((cfg.kind, cfg.steps))
        return train_autoencoder(cfg, *args, **kw)

    monkeypatch.setattr(tm, "train_autoencoder", spy)
    return calls


def test_tolerance_zero_trains_exactly_what_it_did_before(unmatched, tmp_path):
    """Tolerance 0: no match.json, no candidates, and each tokenizer equals one trained directly from its config."""
    assert sorted(files(unmatched)) == [f"tokenizers/{k}/{f}" for k in ("kl", "lfq")
                                        for f in ("tensors.safetensors", "tokenizer.json", "train_log.jsonl")]
    scfg = learned_study()
    images = make_dataset(base_config(scfg, "diffusion", 1, scfg.budgets[0], 0, unmatched).data, "train").images_uint8()
    for tokens, directory in tokenizer_dirs(unmatched).items():
        direct, _ = train_autoencoder(autoencoder_config(scfg, tokens), images, progress=False)
        assert load_learned(directory).fingerprint() == direct.fingerprint()
    for scfg in (learned_study(0.0), learned_study(0.5, objectives=("diffusion",)), replace(learned_study(0.5), tokenizer="weight-free")):
        assert not tm.matching(scfg)  # off, one token type, or no learned tokenizers: a no-op
    assert tm.matching(learned_study(0.5))
    one = tmp_path / "one"
    ensure_tokenizers(one, learned_study(0.5, objectives=("diffusion",)), progress=False)
    assert sorted(files(one)) == [f"tokenizers/kl/{f}" for f in ("tensors.safetensors", "tokenizer.json", "train_log.jsonl")]


def test_weaker_tokenizer_is_retrained_with_doubled_steps_until_within_tolerance(unmatched, copy_of, fake_psnr, trainings):
    """LFQ 3 dB short: retrained from scratch at 6 then 12 steps; every candidate recorded; the last one (0.2 dB short)
    is installed at tokenizers/lfq, the 3-step one kept under candidates/; the KL is untouched."""
    study = copy_of(unmatched)
    before = files(study)
    fake_psnr({"kl": {3: 30.0}, "lfq": {3: 27.0, 6: 28.5, 12: 29.8}})
    ensure_tokenizers(study, learned_study(0.5), progress=False)
    assert trainings == [("lfq", 6), ("lfq", 12)]  # the 3-step ones were reused, the KL never retrained
    doc = json.loads((study / tm.MATCH_FILE).read_text())
    assert [(r["steps"], r["val_psnr"], r["dir"]) for r in doc["candidates"]["lfq"]] == [
        (3, 27.0, "tokenizers/candidates/lfq-s3"), (6, 28.5, "tokenizers/candidates/lfq-s6"), (12, 29.8, "tokenizers/lfq")]
    assert [(r["steps"], r["val_psnr"], r["dir"]) for r in doc["candidates"]["kl"]] == [(3, 30.0, "tokenizers/kl")]
    assert doc["chosen_steps"] == {"kl": 3, "lfq": 12} and doc["stronger"] == "kl" and doc["weaker"] == "lfq"
    assert doc["gap_db"] == pytest.approx(0.2) and doc["within_tolerance"] is True and doc["finished"] is True
    assert doc["tolerance_db"] == 0.5 and doc["max_multiple"] == 4 and doc["validation"]["num_images"] == 64
    after = files(study)
    for name in ("tensors.safetensors", "tokenizer.json", "train_log.jsonl"):
        assert after[f"tokenizers/kl/{name}"] == before[f"tokenizers/kl/{name}"]  # the stronger: byte for byte
        assert after[f"tokenizers/candidates/lfq-s3/{name}"] == before[f"tokenizers/lfq/{name}"]  # moved, not retrained
    installed = load_learned(tokenizer_dirs(study)["discrete"])
    assert installed.config.steps == 12 and installed.fingerprint() == doc["candidates"]["lfq"][2]["fingerprint"]
    assert installed.config == replace(autoencoder_config(learned_study(0.5), "discrete"), steps=12)


def test_matching_never_replaces_a_tokenizer_that_runs_trained_on(unmatched, copy_of, fake_psnr, trainings):
    """A study whose runs exist (e.g. masked-only, grown by diffusion, which turns matching on) is refused before
    anything is trained or moved: matching would swap the LFQ under the old runs' checkpoints."""
    study = copy_of(unmatched)
    atomic_write_json(study / "runs" / "masked-d1-b2e09-s0" / "config.json", {})
    before = files(study)
    fake_psnr({"kl": {3: 30.0}, "lfq": {3: 27.0, 6: 29.8}})
    with pytest.raises(UserError, match=r"would retrain a tokenizer that the 1 run\(s\) already in .* trained on"):
        ensure_tokenizers(study, learned_study(0.5), progress=False)
    assert trainings == [] and files(study) == before


def test_matching_stops_at_the_longest_schedule_and_says_so(unmatched, copy_of, fake_psnr, trainings):
    """max 2: one retraining (6 steps), still 2.5 dB short, recorded as not within tolerance and said so in the
    report; a candidate that overtakes the stronger one by more than the tolerance ends the search too."""
    study = copy_of(unmatched)
    fake_psnr({"kl": {3: 30.0}, "lfq": {3: 27.0, 6: 27.5, 12: 29.9}})
    ensure_tokenizers(study, learned_study(0.5, most=2), progress=False)
    doc = json.loads((study / tm.MATCH_FILE).read_text())
    assert trainings == [("lfq", 6)] and [r["steps"] for r in doc["candidates"]["lfq"]] == [3, 6]
    assert doc["chosen_steps"]["lfq"] == 6 and doc["within_tolerance"] is False and doc["gap_db"] == pytest.approx(2.5)
    assert match_line(doc) == [
        "Tokenizers not matched on validation PSNR on 64 eval images within 0.5 dB: LFQ reached 27.5 dB at the longest "
        "allowed schedule (6 steps; 3 -> 6 steps (27.0 -> 27.5 dB)), 2.5 dB below KL's 30.0 dB at 3 steps. The other "
        "ceilings (see Tokenizer ceilings) show whether matched PSNR meant matched rFID and prompt following."]

    shutil.rmtree(study)  # again from the unmatched tokenizers
    shutil.copytree(unmatched, study)
    trainings.clear()
    fake_psnr({"kl": {3: 30.0}, "lfq": {3: 27.0, 6: 31.5, 12: 30.0}})  # 6 steps overshoots: 12 would be perfect
    ensure_tokenizers(study, learned_study(0.5), progress=False)
    doc = json.loads((study / tm.MATCH_FILE).read_text())
    assert trainings == [("lfq", 6)] and doc["chosen_steps"]["lfq"] == 6  # closest of 3 dB below and 1.5 dB above
    assert doc["within_tolerance"] is False and doc["gap_db"] == pytest.approx(-1.5)
    assert "the closest, 6 steps (31.5 dB), is 1.5 dB above KL's 30.0 dB" in match_line(doc)[0]


def test_rerun_trains_nothing_and_a_killed_study_resumes(unmatched, copy_of, fake_psnr, trainings):
    """A finished matching is reused (no training, match.json unchanged); killed between the two renames or during a
    candidate's training, a re-run recovers the same end state, retraining only the unfinished candidate."""
    study = copy_of(unmatched)
    fake_psnr({"kl": {3: 30.0}, "lfq": {3: 27.0, 6: 28.5, 12: 29.8}})
    scfg = learned_study(0.5)
    ensure_tokenizers(study, scfg, progress=False)
    done = files(study)
    trainings.clear()
    ensure_tokenizers(study, scfg, progress=False)
    assert trainings == [] and files(study) == done

    # killed between the renames: tokenizers/lfq already moved aside, the 12-step one not yet in place
    (study / "tokenizers" / "lfq").rename(study / "tokenizers" / "candidates" / "lfq-s12")
    atomic_write_json(study / tm.MATCH_FILE, {**json.loads(done["tokenizers/match.json"]), "finished": False})
    ensure_tokenizers(study, scfg, progress=False)
    assert trainings == [] and files(study) == done

    # killed while training the 6-step candidate: its directory has a log but no tokenizer.json
    (study / "tokenizers" / "candidates" / "lfq-s6" / "tokenizer.json").unlink()
    (study / tm.MATCH_FILE).unlink()
    ensure_tokenizers(study, scfg, progress=False)
    assert trainings == [("lfq", 6)]
    kept = ("match.json", "tensors.safetensors")  # (the retrained one's log and tokenizer.json have new timings)
    assert {k: v for k, v in files(study).items() if k.endswith(kept)} == {k: v for k, v in done.items() if k.endswith(kept)}


def test_validation_psnr_is_the_pooled_pixel_mse_of_the_first_eval_images(unmatched, tmp_path):
    """val_psnr equals 10 log10(4 / MSE) computed directly on the same eval images; the validation set is the first
    500 images of the eval split (all of a smaller one); a real matching records those numbers."""
    scfg = learned_study()
    images, desc = tm.validation_set(scfg, unmatched)
    data = base_config(scfg, "diffusion", 1, scfg.budgets[0], 0, unmatched).data
    assert torch.equal(images, make_dataset(data, "eval").images_uint8()) and desc["num_images"] == 64
    for directory in tokenizer_dirs(unmatched).values():
        tok = load_learned(directory)
        x = images.float() / 127.5 - 1.0
        with torch.no_grad():
            mse = float((tok.decode(tok.encode(x)) - x).pow(2).mean())
        assert tm.val_psnr(tok, images) == pytest.approx(10 * math.log10(4 / mse), abs=1e-4)
    big = replace(scfg, overrides=[*scfg.overrides, "data.num_eval=600"])
    images, desc = tm.validation_set(big, unmatched)
    assert images.shape[0] == desc["num_images"] == tm.VAL_IMAGES == 500
    assert torch.equal(images, make_dataset(base_config(big, "diffusion", 1, 2e9, 0, unmatched).data, "eval").images_uint8()[:500])

    study = tmp_path / "real"  # 0.001 dB: two 3-step autoencoders do not match; max 2 allows one retraining
    shutil.copytree(unmatched, study)
    ensure_tokenizers(study, learned_study(0.001, most=2), progress=False)
    doc = json.loads((study / tm.MATCH_FILE).read_text())
    val, _ = tm.validation_set(scfg, study)
    for kind, rows in doc["candidates"].items():
        for r in rows:
            assert r["val_psnr"] == pytest.approx(tm.val_psnr(load_learned(study / r["dir"]), val), abs=1e-4), (kind, r)
    assert len(doc["candidates"][doc["weaker"]]) == 2 and len(doc["candidates"][doc["stronger"]]) == 1


def test_changing_tokenizer_matching_of_a_study_is_refused(tmp_path):
    """grow.reconcile refuses another tolerance or maximum for an existing study; a study.json from before the fields
    existed reads as matching off."""
    scfg = study_preset("tiny")
    scfg.objectives, scfg.budgets, scfg.features = ["masked"], [2e9], ["effnet"]
    saved = asdict(scfg)
    for key, value in (("tokenizer_match", 0.5), ("tokenizer_match_max", 8)):
        with pytest.raises(UserError) as e:
            reconcile(saved, replace(scfg, **{key: value}), tmp_path)
        assert key in str(e.value) and "another --out" in str(e.value) and "\n" not in str(e.value)
    old = {k: v for k, v in saved.items() if k not in ("tokenizer_match", "tokenizer_match_max")}
    assert reconcile(old, scfg, tmp_path)[2] == []
    with pytest.raises(UserError, match="tokenizer_match"):
        reconcile(old, replace(scfg, tokenizer_match=0.5), tmp_path)


def test_bad_matching_settings_are_one_line_errors(tmp_path, capsys):
    """A negative or non-finite tolerance and a maximum below 1 are UserErrors; the CLI flags exit 2 with one line."""
    for bad in ({"tokenizer_match": -0.1}, {"tokenizer_match": math.nan}, {"tokenizer_match": math.inf},
                {"tokenizer_match_max": 0}):
        with pytest.raises(UserError) as e:
            StudyConfig(**bad).validate()
        assert "\n" not in str(e.value)
    for argv in (["--tokenizer-match", "-1"], ["--tokenizer-match", "nan"], ["--tokenizer", "vq"]):
        capsys.readouterr()
        assert cli.main(["study", "--out", str(tmp_path / "s"), "--plan-only", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("tokenizer" in err), err
    assert not (tmp_path / "s").exists()


def test_cli_flags_set_the_study_config(tmp_path, monkeypatch):
    """--tokenizer and --tokenizer-match replace the preset's values; without them the preset's stand (cpu off,
    cpu-long and gpu 0.5 dB)."""
    got = []
    monkeypatch.setattr(flopmatch.study.runner, "study", lambda out, scfg, **kw: got.append(scfg))
    assert cli.main(["study", "--preset", "tiny", "--out", str(tmp_path / "a"), "--tokenizer", "learned",
                     "--tokenizer-match", "0.25"]) == 0
    assert got[-1].tokenizer == "learned" and got[-1].tokenizer_match == 0.25
    assert cli.main(["study", "--preset", "cpu-long", "--out", str(tmp_path / "b")]) == 0
    assert got[-1].tokenizer == "learned" and got[-1].tokenizer_match == 0.5
    assert [study_preset(p).tokenizer_match for p in ("cpu", "cpu-long", "gpu", "tiny")] == [0.0, 0.5, 0.5, 0.0]


def test_prepared_and_estimate_count_an_unfinished_matching(unmatched, copy_of, fake_psnr):
    """The launcher's file check needs a finished match.json when matching; the estimate counts one retraining at
    2x steps and the PSNR passes until it is finished, nothing after."""
    study = copy_of(unmatched)
    off, on = learned_study(), learned_study(0.5)
    ceilings = {"version": CEILINGS_VERSION - 1, "tokenizers": {t: {"key": {"num_images": on.eval_samples,
                                                                        "features": ["effnet"]}} for t in KINDS}}
    atomic_write_json(study / CEILINGS_FILE, ceilings)
    assert not prepared(study, off)  # ceilings measured by an older version of the stage are measured again
    atomic_write_json(study / CEILINGS_FILE, {**ceilings, "version": CEILINGS_VERSION})
    assert prepared(study, off) and not prepared(study, on)
    rates = Rates()
    cost = estimate(on, make_plan(on, study), study, rates)["set-up"] - estimate(off, make_plan(off, study), study, rates)["set-up"]
    assert cost == pytest.approx(2 * 3 * rates.autoencoder_step_s + 3 * 64 / rates.psnr_images_per_s)
    fake_psnr({"kl": {3: 30.0}, "lfq": {3: 27.0, 6: 29.8}})
    ensure_tokenizers(study, on, progress=False)
    assert prepared(study, on)
    assert estimate(on, make_plan(on, study), study, rates)["set-up"] == estimate(off, make_plan(off, study), study, rates)["set-up"]
    assert not prepared(study, replace(on, tokenizer_match=0.25))  # another tolerance's record does not count


def test_ceilings_are_remeasured_for_the_replaced_tokenizer_only(unmatched, copy_of, fake_psnr, monkeypatch):
    """The ceiling stage keys by tokenizer fingerprint: after matching replaced the LFQ, only its ceiling is measured again."""
    study = copy_of(unmatched)
    measured = []

    def stub(tok, data, n, features, progress, real_fids):
        measured.append(tok.name)
        return {"num_images": n, "prompt_following": {"scorer": "none", "recon": {}, "real": {}}}

    monkeypatch.setattr(ceilings_stage, "tokenizer_ceiling", stub)
    off, on = learned_study(objectives=("diffusion", "masked")), learned_study(0.5)
    ensure_ceilings(study, off, progress=False)
    assert sorted(measured) == ["kl", "lfq"]
    fake_psnr({"kl": {3: 30.0}, "lfq": {3: 27.0, 6: 29.8}})
    ensure_tokenizers(study, on, progress=False)
    measured.clear()
    ensure_ceilings(study, on, progress=False)
    assert measured == ["lfq"]


def _entry(kind: str, paradigms: list[str], rfid: float) -> dict:
    return {"kind": kind, "paradigms": paradigms, "metrics": {
        "num_images": 250, "psnr": 30.0, "ssim": 0.9, "fid": {"effnet": {"recon": rfid, "real": 20.0}},
        "prompt_following": {"scorer": "attribute-classifier", "recon": {"full_match": 0.8}, "real": {"full_match": 1.0}}}}


def _match(tried: list[tuple[int, float]], within: bool, tol: float = 0.5) -> dict:
    chosen = tried[-1]
    return {"finished": True, "tolerance_db": tol, "max_multiple": 4, "validation": {"num_images": 500},
            "candidates": {"kl": [{"steps": 600, "val_psnr": 31.0, "dir": "tokenizers/kl"}],
                           "lfq": [{"steps": s, "val_psnr": p, "dir": "x"} for s, p in tried]},
            "chosen_steps": {"kl": 600, "lfq": chosen[0]}, "stronger": "kl", "weaker": "lfq",
            "gap_db": 31.0 - chosen[1], "within_tolerance": within}


def test_report_states_the_matching_or_that_it_exists(tmp_path):
    """Matched: a trained-steps column and a banner line with the schedule and PSNRs; off: the gap caveat names the
    --tokenizer-match flag; the report reads the file the study writes, and only once it is finished."""
    doc = {"version": CEILINGS_VERSION,
           "tokenizers": {"continuous": _entry("kl", ["diffusion"], 240.0), "discrete": _entry("lfq", ["masked"], 300.0)}}
    banner = ceiling_banner(doc)
    assert len(banner) == 1 and "`flopmatch study --tokenizer-match DB`" in banner[0]
    assert "trained steps" not in ceilings_table(doc)[0]

    matched = {**doc, "match": _match([(600, 28.4), (1200, 30.2), (2400, 31.1)], True)}
    banner = ceiling_banner(matched)
    assert banner[0].startswith("Tokenizers matched on validation PSNR on 500 eval images within 0.5 dB: LFQ trained "
                                "600 -> 1200 -> 2400 steps (28.4 -> 30.2 -> 31.1 dB) against KL's 31.0 dB at 600 steps.")
    assert len(banner) == 2 and "--tokenizer-match" not in banner[1]  # the rFID caveat stays, without the hint
    header, rows = ceilings_table(matched)
    i = header.index("trained steps")
    assert header[i - 1] == "paradigms" and [r[i] for r in rows] == ["600", "2400 (tried 600, 1200, 2400)"]
    short = {**doc, "match": _match([(600, 28.4), (1200, 29.5), (2400, 30.2)], False)}
    assert "not matched" in ceiling_banner(short)[0] and "30.2 dB at the longest allowed schedule (2400 steps" in \
        ceiling_banner(short)[0] and "0.8 dB below KL's 31.0 dB at 600 steps" in ceiling_banner(short)[0]
    close = {"version": CEILINGS_VERSION, "tokenizers": {"continuous": _entry("kl", ["diffusion"], 250.0), "discrete": _entry("lfq", ["masked"], 255.0)}}
    assert ceiling_banner(close) == []
    assert ceiling_banner({**close, "match": _match([(600, 30.8)], True)})[0].startswith(
        "Tokenizers matched on validation PSNR on 500 eval images within 0.5 dB without retraining: LFQ 30.8 dB")

    assert report_ceilings.MATCH_FILE == tm.MATCH_FILE
    atomic_write_json(tmp_path / CEILINGS_FILE, doc)
    atomic_write_json(tmp_path / tm.MATCH_FILE, {**matched["match"], "finished": False})
    assert "match" not in read_ceilings(tmp_path)
    atomic_write_json(tmp_path / tm.MATCH_FILE, matched["match"])
    assert read_ceilings(tmp_path)["match"] == matched["match"]
