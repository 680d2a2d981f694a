"""FID at equal, stated counts: an evaluation's FID uses as many real images as generated ones (the prompt-matched
first rows of the eval split) and records both counts; the tokenizer ceiling's real-image floor and rFID use eval
images disjoint from that reference; and on Gaussians with known truth the counts move FID, which is why they are
recorded."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

import flopmatch.evaluation.ceilings as ceilings
from flopmatch.config import DataConfig
from flopmatch.data.datasets import make_dataset
from flopmatch.evaluation.features import extract_features, make_feature_extractor, reference_features
from flopmatch.evaluation.quality import fid_from_features, fid_jackknife
from flopmatch.evaluation.run import EvalConfig, evaluate, metrics_from_features
from flopmatch.evaluation.tokenizer import to_uint8
from flopmatch.files import load_tensors
from flopmatch.report.ceilings import ceiling_banner, ceilings_table, counts_cell
from flopmatch.rundir import read_config, sample_dir
from flopmatch.train import train
from tiny import tiny_run_config

NUM_EVAL = 12  # the tiny run's evaluation split (R)
# effnet only, no prompt scorer, no timing or inference cost: FID and its counts are what is tested
ECFG = EvalConfig(batch_size=32, kid_subset=8, kid_subsets=2, fid_boot=4, prompt_following=False, inference=False,
                  timing=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny diffusion run (weight-free patch tokenizer, 16 px, 12 evaluation images)."""
    out = tmp_path_factory.mktemp("fidcounts") / "run"
    train(tiny_run_config("diffusion", budget_steps=2, sets=[f"data.num_eval={NUM_EVAL}"]), out, progress=False)
    return out


def _evaluate(run, num_samples: int) -> tuple[dict, dict, str]:
    """(the entry's effnet metrics, the entry, stdout) of one evaluation of the run's default setting."""
    from dataclasses import replace

    from flopmatch.sample import load_sampler

    setting = load_sampler(run).cfg.sample
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        doc = evaluate(run, [setting], replace(ECFG, num_samples=num_samples), progress=False)
    (key,) = [k for k in doc["entries"] if f",n={num_samples}," in k]
    entry = doc["entries"][key]
    return entry["metrics"]["effnet"], {**entry, "key": key}, out.getvalue()


def _features(run, entry: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference features (R, F) of the run's eval split, features of the entry's saved generated images (M, F)),
    extracted here, not read from the evaluation."""
    data = make_dataset(read_config(run).data, "eval", progress=False)
    extractor = make_feature_extractor("effnet")
    fake = load_tensors(sample_dir(run, entry["key"]) / "images.safetensors")["images"]
    return extract_features(extractor, data.images_uint8(), progress=False), extract_features(extractor, fake, progress=False)


def test_fid_uses_the_first_m_reference_images_at_equal_counts(run):
    """M <= R: FID (and its bootstrap) equals fid_from_features(ref[:M], fake) computed here, fid_num_real ==
    fid_num_fake == M, and KID still uses the whole split."""
    m, entry, _ = _evaluate(run, 8)
    real, fake = _features(run, entry)
    assert (m["fid_num_real"], m["fid_num_fake"], m["num_real"]) == (8, 8, NUM_EVAL) and "fid_note" not in m
    assert m["fid"] == pytest.approx(fid_from_features(real[:8], fake), rel=1e-6)
    assert m["fid"] != pytest.approx(fid_from_features(real, fake), rel=1e-3)  # not the whole-split FID
    want = fid_jackknife(real[:8], fake, ECFG.fid_boot, generator=torch.Generator().manual_seed(ECFG.seed))
    assert m["fid_boot"]["replicates"] == pytest.approx(want, rel=1e-6)


def test_more_samples_than_eval_images_use_the_whole_split_and_say_so(run):
    """M > R: FID against all R real images, fid_num_real == R != fid_num_fake == M recorded with a note, and one
    warning line; metrics_from_features records the same counts on plain tensors."""
    m, entry, out = _evaluate(run, 16)
    real, fake = _features(run, entry)
    assert (m["fid_num_real"], m["fid_num_fake"]) == (NUM_EVAL, 16) and f"--num-samples {NUM_EVAL}" in m["fid_note"]
    assert m["fid"] == pytest.approx(fid_from_features(real, fake), rel=1e-6)
    assert sum("FID's counts differ" in line and f"--num-samples {NUM_EVAL} gives equal counts" in line
               for line in out.splitlines()) == 1, out
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, generator=g), torch.randn(25, 3, generator=g)
    got = metrics_from_features(x, y, EvalConfig(kid_subset=5, kid_subsets=2, fid_boot=0))
    assert (got["fid_num_real"], got["fid_num_fake"]) == (10, 25) and got["fid"] == fid_from_features(x, y)
    got = metrics_from_features(y, x, EvalConfig(kid_subset=5, kid_subsets=2, fid_boot=0))
    assert (got["fid_num_real"], got["fid_num_fake"]) == (10, 10) and got["fid"] == fid_from_features(y[:10], x)


class Blur(torch.nn.Module):
    """A lossy stand-in tokenizer: 2x2 average pooling, nearest-neighbour upsampling back."""

    def __init__(self):
        super().__init__()
        self.register_buffer("unused", torch.zeros(1))  # reconstruct() reads the device off a parameter or buffer

    def encode(self, x):
        return torch.nn.functional.avg_pool2d(x, 2)

    def decode(self, z):
        return torch.nn.functional.interpolate(z, scale_factor=2, mode="nearest")


def _ceiling(monkeypatch, num_eval: int, n: int) -> tuple[dict, DataConfig]:
    """The Blur tokenizer's ceiling at n on a 16 px shapes split of num_eval images; the prompt scorer and the
    attribute classifier are stubbed out (they do not touch FID)."""

    class Scorer:
        def score(self, images, prompts):
            return {"scorer": "stub", "full_match": 1.0}

        def describe(self):
            return {"name": "stub"}

    monkeypatch.setattr(ceilings, "prompt_scorer", lambda data, progress=False: Scorer())
    monkeypatch.setattr(ceilings, "reconstruction_attributes", lambda *a, **k: None)
    data = DataConfig(image_size=16, num_train=16, num_eval=num_eval)
    return ceilings.tokenizer_ceiling(Blur(), data, n, ["effnet"]), data


def test_ceiling_floor_and_rfid_use_images_disjoint_from_the_reference(monkeypatch):
    """R >= 2n: the real floor is FID of eval images n..2n-1 against 0..n-1, rFID that of their reconstructions,
    both equal to the FIDs computed here from the features; the overlapping floor (0..n-1 against itself) would be 0."""
    n = 6
    m, data = _ceiling(monkeypatch, 2 * n, n)
    images = make_dataset(data, "eval", progress=False).images_uint8()
    extractor = make_feature_extractor("effnet")
    feats = extract_features(extractor, images, progress=False)
    recon = to_uint8(Blur().decode(Blur().encode(images[n : 2 * n].float() / 127.5 - 1.0)))
    floor = fid_from_features(feats[:n], feats[n : 2 * n])
    assert m["fid"]["effnet"]["real"] == pytest.approx(floor, rel=1e-6) and floor > 0
    assert m["fid"]["effnet"]["recon"] == pytest.approx(fid_from_features(feats[:n], extract_features(extractor, recon,
                                                                                                       progress=False)), rel=1e-6)
    assert fid_from_features(feats[:n], feats[:n]) == pytest.approx(0.0, abs=1e-6)  # what the overlapping floor gave
    assert (m["fid_num_reference"], m["fid_num_compared"], m["fid_note"], m["num_eval"]) == (n, n, None, 2 * n)
    # the generators' reference, from the same cache the evaluation reads: its first n rows are what was compared
    cached = reference_features(extractor, data.name, images, key=f"{make_dataset(data, 'eval').fingerprint()}-{2 * n}",
                                progress=False)
    assert torch.allclose(cached, feats, rtol=1e-6, atol=1e-6)
    assert counts_cell(m) == f"{n} / {n}"


def test_ceiling_without_2n_eval_images_is_none_with_the_note(monkeypatch):
    """R < 2n: no floor and no rFID (None), a note naming the data.num_eval needed; the table shows "–" and the note,
    the banner repeats it, and PSNR is still measured on the first n images."""
    m, _ = _ceiling(monkeypatch, 9, 6)
    assert m["fid"]["effnet"] == m["kid"]["effnet"] == {"recon": None, "real": None} and m["fid_num_compared"] is None
    assert m["fid_note"] == ("the evaluation split holds 9 < 2n = 12 images; for a disjoint real-image floor, set "
                             "data.num_eval >= 12")
    assert m["psnr"] > 0 and m["num_images"] == 6
    doc = {"version": ceilings.CEILINGS_VERSION, "tokenizers": {"continuous": {"kind": "blur", "paradigms": ["diffusion"],
                                                                              "metrics": m}}}
    header, rows = ceilings_table(doc)
    cells = dict(zip(header, rows[0]))
    assert cells["rFID (effnet) at n"] == cells["real images' FID (effnet) at n"] == cells["rKID (effnet)"] == "–"
    assert cells["FID and KID images: reference / compared"] == f"6 / – ({m['fid_note']})"
    assert ceiling_banner(doc) == [f"Tokenizer ceilings: no rFID or real-image FID floor ({m['fid_note']})."]


def _fids(n: int, m: int, reps: int = 20, f: int = 4) -> torch.Tensor:
    """FID of ``reps`` seeded pairs of independent standard-normal samples (n and m rows, f dimensions): the same
    distribution, so the true FID is 0 and every value is sampling bias. Pair r uses the same real rows at every m."""
    out = []
    for r in range(reps):
        g = torch.Generator().manual_seed(r)
        real = torch.randn(n, f, generator=g, dtype=torch.float64)
        fake = torch.randn(4 * n, f, generator=g, dtype=torch.float64)[:m]
        out.append(fid_from_features(real, fake))
    return torch.tensor(out)


def test_fid_bias_depends_on_both_counts():
    """Same distribution (true FID 0): FID of equal-size samples is positive and falls ~4x per 4x images, and at
    n real vs 4n generated it is lower than at n vs n (paired, > 3 standard errors): the counts matter."""
    equal = {n: _fids(n, n) for n in (20, 80, 320)}
    assert all(bool((v > 0).all()) for v in equal.values())
    means = [float(equal[n].mean()) for n in (20, 80, 320)]
    assert means[0] > 2 * means[1] > 4 * means[2], means  # ~1/n: the bias is F-dependent, not a property of the model
    for n in (20, 80, 320):
        diff = equal[n] - _fids(n, 4 * n)  # same real rows, the first n generated rows of the larger set
        assert float(diff.mean()) > 3 * float(diff.std()) / len(diff) ** 0.5, (n, diff)


def test_report_rows_state_fid_counts_and_flag_mixed_ones():
    """A row's fid_num_real (a results.csv column) is the recorded count, or for an entry from before equal counts
    its whole split (marked not recorded); rows of one generated count at different real counts give one problem
    line naming the older evaluations, and equal counts give none."""
    from flopmatch.report.data import COLUMNS, _entry_fields, fid_count_problems

    assert "fid_num_real" in COLUMNS
    new = {"metrics": {"effnet": {"fid": 5.0, "fid_num_real": 250, "fid_num_fake": 250, "num_real": 1000}},
           "manifest": {"num_samples": 250, "reference": {"size": 1000}}}
    old = {"metrics": {"effnet": {"fid": 4.0, "num_real": 1000, "num_fake": 250}}, "manifest": {"num_samples": 250}}
    older = {"metrics": {"effnet": {"fid": 4.0}}, "manifest": {"num_samples": 250, "reference": {"size": 1000}}}
    rows = []
    for run, entry in (("a", new), ("b", new), ("c", old), ("d", older)):
        f = _entry_fields("steps=4,cfg=3,temp=1,topk=0,weights=ema,n=250,seed=0", entry)
        rows.append({**f, "run": run})
    assert [(r["fid_num_real"], r["fid_counts_recorded"]) for r in rows] == [(250, True), (250, True), (1000, False),
                                                                           (1000, False)]
    (line,) = fid_count_problems(rows)
    assert line.startswith("FIDs of 250 generated images rest on different real-image counts")
    assert "250 real in 2 entries (a, b)" in line and "1000 real in 2 entries (c, d; 2 evaluated before equal counts" in line
    assert fid_count_problems(rows[:2]) == [] and fid_count_problems(rows[2:]) == []
