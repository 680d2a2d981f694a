"""Reference statistics out and in (`flopmatch eval --export-ref / --ref-stats`), and the small-n FID warning."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace

import numpy as np
import pytest

from flopmatch.errors import UserError
from flopmatch.evaluation.export import read_reference_stats
from flopmatch.evaluation.features import extract_features, make_feature_extractor
from flopmatch.evaluation.quality import FID_SMALL_N
from flopmatch.evaluation.run import EvalConfig, evaluate
from flopmatch.files import file_sha256
from tiny import trained_masked_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished tiny masked run (hash text, 32 px images, 24 evaluation images)."""
    return trained_masked_run(tmp_path_factory.mktemp("refstats") / "run", budget_steps=3)


# Small and fast: effnet only, no prompt scorer, no timing.
ECFG = EvalConfig(num_samples=8, batch_size=8, kid_subset=8, kid_subsets=2, fid_boot=16, prompt_following=False,
                  timing=False, save_images=False)


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """(path of the exported .npz, eval.json after one own-reference evaluation of two settings, its stdout)."""
    from flopmatch.sample import load_sampler

    path = tmp_path_factory.mktemp("ref") / "reference.npz"
    base = load_sampler(tiny_run).cfg.sample
    settings = [replace(base, steps=2), replace(base, steps=3)]
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        doc = evaluate(tiny_run, settings, replace(ECFG, export_ref=str(path)), progress=False)
    return path, json.loads(json.dumps(doc)), capture.getvalue()


def test_export_writes_the_reference_mean_and_covariance_with_a_manifest(exported, tiny_run):
    """The .npz holds mu/sigma (float64; mu the features' mean, sigma their unbiased covariance; also as plain mu and
    sigma, clean-fid's and ADM's key names) and a JSON manifest naming extractor, dataset, n and image hash; it loads
    without pickle and no temporary file is left beside it."""
    path, doc, _ = exported
    entry = next(iter(doc["entries"].values()))
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    assert set(arrays) == {"mu_effnet", "sigma_effnet", "mu", "sigma", "manifest"}
    manifest = json.loads(str(arrays["manifest"].item()))
    assert manifest["feature_extractors"]["effnet"] == entry["manifest"]["feature_extractors"]["effnet"]
    ref = entry["manifest"]["reference"]
    assert manifest["dataset"] == ref and manifest["num_images"] == ref["size"] == 24 and ref["images_sha256"]
    mu, sigma = arrays["mu_effnet"], arrays["sigma_effnet"]
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (1280,) and sigma.shape == (1280, 1280)
    assert np.array_equal(arrays["mu"], mu) and np.array_equal(arrays["sigma"], sigma)
    np.testing.assert_allclose(sigma, sigma.T, rtol=0, atol=1e-15)  # symmetric up to summation order
    # the statistics of the cached reference features themselves
    from flopmatch.data.datasets import make_dataset
    from flopmatch.evaluation.features import reference_features
    from flopmatch.rundir import read_config

    data = make_dataset(read_config(tiny_run).data, "eval", progress=False)
    feats = reference_features(make_feature_extractor("effnet"), "shapes", data.images_uint8(),
                               key=f"{data.fingerprint()}-{len(data)}", progress=False).numpy()
    np.testing.assert_allclose(mu, feats.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-12)
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_small_n_fid_warns_once_per_call_and_flags_every_entry(exported):
    """min(N, M) < 2000: one warning line for an evaluation of two settings, and fid_small_n in both entries, which
    record FID's n and the equal sizes precision/recall used, plus kid_boot beside fid_boot."""
    _, doc, out = exported
    warnings = [line for line in out.splitlines() if line.startswith("warning: FID")]
    assert len(warnings) == 1 and f"< {FID_SMALL_N}" in warnings[0] and "KID" in warnings[0], out
    entries = list(doc["entries"].values())
    assert len(entries) == 2
    for e in entries:
        m = e["metrics"]["effnet"]
        assert m["fid_small_n"] is True and (m["num_real"], m["num_fake"]) == (24, 8)
        assert (m["fid_num_real"], m["fid_num_fake"]) == (8, 8)  # FID: the first 8 reference images, equal counts
        assert (m["pr_num_real"], m["pr_num_fake"]) == (8, 8)
        assert m["kid_boot"]["n"] == ECFG.fid_boot and m["kid_boot"]["std"] > 0
        assert m["fid_boot"]["n"] == min(ECFG.fid_boot, 8)  # the FID jackknife: at most one replicate per image


def test_imported_reference_gives_the_fid_against_its_statistics(exported, tiny_run):
    """--ref-stats with the run's own exported statistics (the whole 24-image split): the FID (and FID replicates) of
    the generated images' features against that mean and covariance, to 1e-6 relative, with fid_num_real = 24 and a
    note that the importer chose the counts (the own-reference entry uses the first 8: another number); KID and
    precision/recall None with the reason, the file's sha256 in the manifest, and the own-reference entry kept."""
    path, own_doc, _ = exported
    import torch

    from flopmatch.evaluation.quality import feature_stats, fid_from_stats, fid_jackknife_stats
    from flopmatch.evaluation.run import IMPORTED_COUNTS
    from flopmatch.files import load_tensors
    from flopmatch.rundir import sample_dir
    from flopmatch.sample import load_sampler

    base = load_sampler(tiny_run).cfg.sample
    doc = evaluate(tiny_run, [replace(base, steps=2)], replace(ECFG, ref_stats=str(path), save_images=True), progress=False)
    sha = file_sha256(path)
    (key,) = [k for k in doc["entries"] if k.endswith(f",ref={sha[:12]}")]
    own = own_doc["entries"][key.removesuffix(f",ref={sha[:12]}")]
    assert doc["entries"][key.removesuffix(f",ref={sha[:12]}")]["metrics"] == own["metrics"]  # kept, not overwritten
    got = doc["entries"][key]["metrics"]["effnet"]
    images = load_tensors(sample_dir(tiny_run, key.removesuffix(f",ref={sha[:12]}")) / "images.safetensors")["images"]
    fake = extract_features(make_feature_extractor("effnet"), images, progress=False)
    with np.load(path, allow_pickle=False) as z:
        mu, sigma = torch.from_numpy(z["mu_effnet"]), torch.from_numpy(z["sigma_effnet"])
    assert got["fid"] > 0 and got["fid"] == pytest.approx(fid_from_stats(mu, sigma, *feature_stats(fake)), rel=1e-6)
    want = fid_jackknife_stats(mu, sigma, fake, ECFG.fid_boot, generator=torch.Generator().manual_seed(ECFG.seed))
    assert got["fid_boot"]["replicates"] == pytest.approx(want, rel=1e-6)
    assert (got["fid_num_real"], got["fid_num_fake"], got["fid_note"]) == (24, 8, IMPORTED_COUNTS)
    assert own["metrics"]["effnet"]["fid_num_real"] == 8 and got["fid"] != pytest.approx(own["metrics"]["effnet"]["fid"])
    assert all(got[k] is None for k in ("kid", "kid_std", "kid_boot", "precision", "recall"))
    assert "mean and covariance" in got["not_computed"] and got["reference"] == "imported"
    assert (got["num_real"], got["num_fake"], got["fid_small_n"]) == (24, 8, True)
    ref = doc["entries"][key]["manifest"]["reference"]
    assert ref["imported"] is True and ref["sha256"] == sha and ref["size"] == 24
    assert ref["source"] == own["manifest"]["reference"]
    assert doc["entries"][key]["manifest"]["generated_images_sha256"] == own["manifest"]["generated_images_sha256"]


def _rewrite(src, dst, change):
    """Copy the .npz at ``src`` to ``dst`` with ``change(arrays, manifest)`` applied."""
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    manifest = json.loads(str(arrays["manifest"].item()))
    change(arrays, manifest)
    arrays["manifest"] = np.array(json.dumps(manifest))
    np.savez(dst, **arrays)
    return dst


def _set(d: dict, **kv):
    d.update(kv)


MISMATCHES = {
    # feature dimension: statistics of 100 features where effnet gives 1280
    "dimension": (lambda a, m: _set(a, mu_effnet=a["mu_effnet"][:100], sigma_effnet=a["sigma_effnet"][:100, :100]),
                  "100 features"),
    # another preprocessing (same network)
    "resize": (lambda a, m: m["feature_extractors"]["effnet"].update(resize="bilinear-64"), "resize 'bilinear-64'"),
    # other weights
    "weights": (lambda a, m: m["feature_extractors"]["effnet"].update(weights_sha256="0" * 64), "weights_sha256"),
    # statistics of another extractor only
    "extractor": (lambda a, m: _set(m, feature_extractors={"inception": m["feature_extractors"].pop("effnet")}),
                  "for inception, not effnet"),
    # a plain mu/sigma file (clean-fid style): nothing says what made it
    "no manifest": (lambda a, m: m.clear(), "no flopmatch manifest"),
}


@pytest.mark.parametrize("name", list(MISMATCHES))
def test_mismatched_reference_stats_are_a_one_line_error(name, exported, tmp_path):
    """A statistics file whose feature dimension, extractor (weights, resize) or manifest does not fit is refused
    with a UserError of one line saying what differs."""
    change, message = MISMATCHES[name]
    bad = _rewrite(exported[0], tmp_path / "bad.npz", change)
    effnet = make_feature_extractor("effnet").describe()
    with pytest.raises(UserError, match=message) as e:
        read_reference_stats(bad, {"effnet": effnet})
    assert "\n" not in str(e.value)


def test_ref_stats_errors_exit_2_without_traceback_or_writes(exported, tiny_run, tmp_path, capsys):
    """`flopmatch eval RUN --ref-stats BAD` (a mismatched file, a pickled object array, a missing file) and
    --export-ref with --ref-stats: exit 2, one line on stderr, eval.json untouched."""
    from flopmatch.cli import main

    bad = _rewrite(exported[0], tmp_path / "bad.npz", MISMATCHES["dimension"][0])
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, mu=np.array([{"a": 1}], dtype=object), manifest=np.array("{}"))
    before = (tiny_run / "eval.json").read_bytes()
    cases = [["--ref-stats", str(bad)], ["--ref-stats", str(pickled)], ["--ref-stats", str(tmp_path / "none.npz")],
             ["--ref-stats", str(exported[0]), "--export-ref", str(tmp_path / "out.npz")],
             ["--export-ref", str(tmp_path / "out.txt")]]
    for extra in cases:
        assert main(["eval", str(tiny_run), "--num-samples", "8", "--no-timing", *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("flopmatch") and "error:" in err[0], (extra, err)
    assert (tiny_run / "eval.json").read_bytes() == before
    assert not (tmp_path / "out.npz").exists()


def test_small_n_warning_threshold():
    """The warning switches off at n = 2000 real and generated images, not before."""
    from flopmatch.evaluation.run import small_n_warning

    assert small_n_warning(1999, 5000) and small_n_warning(5000, 1999)
    assert small_n_warning(2000, 2000) is None
    assert "--ref-stats" in small_n_warning(50_000, 1000, imported=True)
