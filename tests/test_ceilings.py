"""Tokenizer ceilings: the study stage scores reconstructions as evaluation/tokenizer.py does, once, and
refuses a tokenizer the attribute classifier cannot read; the report shows the ceilings."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

import flopmatch.study.ceilings as ceilings_stage
from flopmatch.data.datasets import make_dataset
from flopmatch.errors import UserError
from flopmatch.evaluation.attributes import load_or_train_attribute_classifier, score_prompt_following
from flopmatch.evaluation.ceilings import CEILINGS_FILE, CEILINGS_VERSION
from flopmatch.evaluation.features import extract_features, make_feature_extractor
from flopmatch.evaluation.quality import kid_from_features
from flopmatch.evaluation.run import EvalConfig
from flopmatch.evaluation.tokenizer import evaluate_tokenizer, reconstruct, reconstruction_fid, to_uint8
from flopmatch.files import atomic_write_json, read_json
from flopmatch.report.ceilings import add_column, ceiling_banner, ceilings_table, fit_cell, runs_cell
from flopmatch.study.ceilings import check_floor, ensure_ceilings, tokenizer_runs
from flopmatch.study.plan import tokenizer_dirs
from flopmatch.study.presets import study_preset
from flopmatch.study.runner import study
from flopmatch.tokenizers.autoencoder import AutoencoderConfig
from flopmatch.tokenizers.registry import load_learned, make_autoencoder

NUM_EVAL = 48  # the tiny studies' eval split here: n = 24 samples, the first 24 the reference, the other 24 compared
N = NUM_EVAL // 2


def tiny_learned_study() -> object:
    """The tiny preset on the study's learned-tokenizer path (KL only), n = half the eval split (R = 2n: the real-image
    floor and rFID on the second half, disjoint from the generators' reference, the first)."""
    scfg = study_preset("tiny")
    scfg.objectives, scfg.tokenizer, scfg.features = ["diffusion"], "learned", ["effnet"]
    scfg.overrides = [*scfg.overrides, f"data.num_eval={NUM_EVAL}"]
    scfg.eval_samples = N
    return scfg


@pytest.fixture(scope="module")
def learned_study(tmp_path_factory):
    """A study directory holding an untrained few-thousand-parameter KL autoencoder and its ceilings, measured
    with the floor switched off (an untrained autoencoder is below it). Returns (dir, StudyConfig, document)."""
    out = tmp_path_factory.mktemp("ceilings") / "study"
    scfg = tiny_learned_study()
    cfg = AutoencoderConfig(kind="kl", channels=[8, 16], patch=2, num_res_blocks=1, latent_channels=4,
                            precision="fp32", device="cpu").validate()
    make_autoencoder(cfg).eval().save(tokenizer_dirs(out)["continuous"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ceilings_stage, "CLASSIFIER_FLOOR", 0.0)
        doc = ensure_ceilings(out, scfg, progress=False)
    return out, scfg, doc


def test_ceiling_equals_the_tokenizer_evaluation_on_the_same_images(learned_study):
    """The stage's PSNR, SSIM and attribute accuracy equal evaluate_tokenizer's on the first n eval images, its prompt
    score equals the attribute classifier's on their reconstructions, and its rFID and real-image floor are the FIDs
    (rKID and its real-image value the KIDs) of the reconstructions of eval images n..2n-1, and of those images,
    against the first n."""
    out, scfg, doc = learned_study
    entry = doc["tokenizers"]["continuous"]
    assert entry["kind"] == "kl" and entry["paradigms"] == ["diffusion"]
    m = entry["metrics"]
    data = tokenizer_runs(scfg, out)["continuous"][0].data
    ref = make_dataset(data, "eval")
    images = ref.images_uint8()
    first = images[:N]
    attrs = [ref.scene(i).attrs() for i in range(N)]
    tok = load_learned(tokenizer_dirs(out)["continuous"])
    direct = evaluate_tokenizer(tok, first, "none", attrs=attrs, shapes_cfg=ref.cfg)
    assert m["num_images"] == direct["num_images"] == N
    for key in ("psnr", "ssim", "mse"):
        assert m[key] == pytest.approx(direct[key], rel=1e-12), key
    other = images[N:]  # disjoint from the generators' reference, the first N
    assert m["fid"]["effnet"]["recon"] == pytest.approx(reconstruction_fid(first, to_uint8(reconstruct(tok, other)[0])),
                                                        rel=1e-6)
    assert m["fid"]["effnet"]["real"] == pytest.approx(reconstruction_fid(first, other), rel=1e-6)
    assert m["fid"]["effnet"]["real"] > 1.0  # not ~0, as the reference against itself was before ceilings v2
    # rKID: the same two sets by KID, with the generators' kernel, subsets and seed (EvalConfig's)
    extractor, ecfg = make_feature_extractor("effnet", torch.device("cpu")), EvalConfig()
    feats = {k: extract_features(extractor, x) for k, x in (("first", first), ("other", other),
                                                             ("recon", to_uint8(reconstruct(tok, other)[0])))}
    for which in ("recon", "other"):
        want = kid_from_features(feats["first"], feats[which], subset_size=N, subsets=ecfg.kid_subsets,
                                 generator=torch.Generator().manual_seed(ecfg.seed))[0]
        assert m["kid"]["effnet"]["recon" if which == "recon" else "real"] == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert abs(m["kid"]["effnet"]["real"]) < m["kid"]["effnet"]["recon"]  # real vs real: ~0 beside an untrained tokenizer
    assert (m["fid_num_reference"], m["fid_num_compared"], m["num_eval"], m["fid_note"]) == (N, N, NUM_EVAL, None)
    assert m["attribute_accuracy"]["recon"] == direct["attribute_accuracy"]["recon"]
    assert m["attribute_accuracy"]["real"] == direct["attribute_accuracy"]["real"]
    classifier = load_or_train_attribute_classifier(ref.cfg, progress=False)
    recon = to_uint8(reconstruct(tok, first)[0])
    expected = score_prompt_following(classifier, recon, ref.captions()[:N])["full_match"]
    assert m["prompt_following"]["recon"]["full_match"] == expected
    assert m["prompt_following"]["real"]["full_match"] == score_prompt_following(classifier, first, ref.captions()[:N])["full_match"]


def test_ceilings_are_measured_once_and_again_when_a_setting_changes(learned_study, monkeypatch):
    """A second call reuses the file (nothing measured, nothing written); another sample count re-measures."""
    out, scfg, doc = learned_study
    monkeypatch.setattr(ceilings_stage, "CLASSIFIER_FLOOR", 0.0)
    path = out / CEILINGS_FILE
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    calls = []
    measure = ceilings_stage.tokenizer_ceiling

    def counting(*args, **kw):
        calls.append(args[2])
        return measure(*args, **kw)

    monkeypatch.setattr(ceilings_stage, "tokenizer_ceiling", counting)
    assert ensure_ceilings(out, scfg, progress=False) == doc
    assert calls == [] and (path.read_bytes(), path.stat().st_mtime_ns) == before
    again = ensure_ceilings(out, replace(scfg, eval_samples=16), progress=False)
    assert calls == [16] and again["tokenizers"]["continuous"]["metrics"]["num_images"] == 16


def test_floor_names_the_learned_tokenizer_and_the_fix(learned_study, tmp_path):
    """An untrained autoencoder's reconstructions fail the classifier: a one-line error with the longer training."""
    out, scfg, doc = learned_study
    got = doc["tokenizers"]["continuous"]["metrics"]["prompt_following"]["recon"]["full_match"]
    assert got < ceilings_stage.CLASSIFIER_FLOOR
    with pytest.raises(UserError, match=r"kl tokenizer of diffusion .* below the floor of 50%.*--tokenizer-set steps=") as e:
        check_floor(doc, scfg, out)
    assert "\n" not in str(e.value)
    # the steps the installed tokenizer trained (matching may have retrained it longer), not the configured ones
    longer = tmp_path / "longer"
    doc_json = read_json(out / "tokenizers" / "kl" / "tokenizer.json")
    configured = doc_json["config"]["steps"]
    atomic_write_json(longer / "tokenizers" / "kl" / "tokenizer.json",
                      {**doc_json, "config": {**doc_json["config"], "steps": 4 * configured}})
    with pytest.raises(UserError) as e:
        check_floor(doc, scfg, longer)
    assert f"steps={8 * configured} (it trained {4 * configured})" in str(e.value)


def test_study_refuses_a_tokenizer_below_the_floor_before_training(tmp_path):
    """A 2-code k-means tokenizer stops the study at its ceiling, with a one-line error, before any run trains."""
    out = tmp_path / "study"
    scfg = study_preset("tiny")
    scfg.objectives, scfg.budgets, scfg.features = ["masked"], [2e9], ["effnet"]
    scfg.overrides = [*scfg.overrides, "tokenizer.codebook_size=2"]
    with pytest.raises(UserError) as e:
        study(out, scfg, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "kmeans tokenizer of masked" in msg and "floor of 50%" in msg and "more than 2 codes" in msg
    assert not (out / "runs").exists() or not any((out / "runs").iterdir())  # nothing trained
    assert (out / CEILINGS_FILE).is_file()  # the measurement behind the refusal is kept


def _entry(kind: str, paradigms: list[str], rfid: float, match: float) -> dict:
    pf = {"scorer": "attribute-classifier", "recon": {"full_match": match, "shape": match, "color": 1.0},
          "real": {"full_match": 1.0, "shape": 1.0, "color": 1.0}}
    return {"kind": kind, "paradigms": paradigms, "metrics": {
        "num_images": 250, "psnr": 30.0, "ssim": 0.9, "fid": {"effnet": {"recon": rfid, "real": 20.0}},
        "kid": {"effnet": {"recon": rfid / 1000, "real": 1e-4}},
        "fid_num_reference": 250, "fid_num_compared": 250, "fid_note": None, "prompt_following": pf}}


def test_report_ceilings_table_columns_and_banner():
    """The table has a row per tokenizer; cells beside generator numbers; the caveat only past the stated gap; a
    version-1 document (overlapping real-image floor) is named in the banner."""
    doc = {"version": CEILINGS_VERSION, "floor": {"value": 0.5}, "tokenizers": {
        "continuous": _entry("kl", ["diffusion"], 243.0, 0.79),
        "discrete": _entry("lfq", ["masked", "autoregressive"], 303.0, 0.68)}}
    header, rows = ceilings_table(doc)
    assert header[:6] == ["tokenizer", "tokens", "paradigms", "images (n)", "rFID (effnet) at n", "real images' FID (effnet) at n"]
    assert rows[1][:6] == ["lfq", "discrete", "masked, autoregressive", 250, "303", "20"]
    assert rows[1][-1] == "shape 0.680 (real 1.000)" and rows[1][header.index("FID and KID images: reference / compared")] == "250 / 250"
    kl = doc["tokenizers"]["continuous"]["metrics"]
    assert runs_cell(kl) == "243 / 0.790" and fit_cell(kl, "prompt") == "0.21" and fit_cell(kl, "loss") == "–"
    assert fit_cell(kl, "kid") == "0.243" and rows[1][header.index("rKID (effnet)")] == "0.303"
    before_v3 = {k: v for k, v in kl.items() if k != "kid"}  # ceilings measured before rKID: not measured, not 0
    assert fit_cell(before_v3, "kid") == "–"
    assert add_column(["a", "b"], [[1, 2]], "a", "c", ["x"]) == (["a", "c", "b"], [[1, "x", 2]])
    banner = ceiling_banner(doc)
    assert len(banner) == 1 and banner[0].startswith("The diffusion tokenizer's ceiling is better than the token paradigms'")
    assert "rFID 243 vs 303" in banner[0] and "0.790 vs 0.680" in banner[0]
    old = {**doc, "version": 1, "tokenizers": {t: {**e, "metrics": {k: v for k, v in e["metrics"].items() if not
                                                                    k.startswith("fid_")} | {"num_reference": 1000}}
                                                for t, e in doc["tokenizers"].items()}}
    assert ceiling_banner(old)[0].startswith("Tokenizer ceilings were measured by an earlier flopmatch")
    assert ceiling_banner(old)[1:] == banner
    v2 = {**doc, "version": 2, "tokenizers": {t: {**e, "metrics": {k: v for k, v in e["metrics"].items() if k != "kid"}}
                                               for t, e in doc["tokenizers"].items()}}
    assert ceiling_banner(v2)[0].startswith("Tokenizer ceilings were measured before rKID was")
    assert ceilings_table(old)[1][0][header.index("FID and KID images: reference / compared")] == (
        "1000 / 250 (overlapping: measured before v2)")
    close = {"tokenizers": {"continuous": _entry("kl", ["diffusion"], 250.0, 0.80),
                            "discrete": _entry("lfq", ["masked"], 260.0, 0.78)}}
    assert ceiling_banner(close) == []  # within 10 % rFID and 5 points of full match
    assert ceiling_banner(doc, fid_log_sd=0.2) != ceiling_banner(doc)  # seed noise above the gap: FID drops out
    assert "rFID" not in ceiling_banner(doc, fid_log_sd=0.2)[0]


def test_each_token_type_uses_the_tokenizer_of_its_first_paradigm(tmp_path: Path):
    """Each token type's tokenizer comes from the run config of the first paradigm consuming it."""
    scfg = study_preset("tiny")
    runs = tokenizer_runs(scfg, tmp_path)
    assert {t: ps for t, (_, ps) in runs.items()} == {"continuous": ["diffusion"], "discrete": ["masked", "autoregressive"]}
    assert all(cfg.tokenizer.path == "" for cfg, _ in runs.values())  # tiny: weight-free tokenizers
