"""Image-quality distances on precomputed features: FID, KID, and k-NN precision/recall.

All functions take feature matrices, real (N, F) and fake (M, F), never images, so a reference set's
features are extracted once and cached (features.reference_features) and only generated images are
embedded per evaluation.

How the numbers are computed, and why:
- FID is computed here, in float64: ``|mu1-mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` with
  ``tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))``: two symmetric eigendecompositions. torchmetrics
  has no features-in FID function (its ``FrechetInceptionDistance`` takes images, or rows through a pass-
  through module), and its final step is ``eigvals`` of the non-symmetric S1 S2, which took 20-50 s at
  F=2048 on this 2-core CPU against ~1-2 s for the symmetric route. tests/test_eval_metrics.py checks that
  our number equals torchmetrics' ``FrechetInceptionDistance`` fed the same images through the same
  extractor, and scipy.linalg.sqrtm, to 1e-3 relative.
- FID can also be taken against a reference given only as statistics (mean (F,), covariance (F, F)), as
  clean-fid and the ADM evaluator store them (:func:`fid_from_stats`, :func:`fid_jackknife_stats`). When there are
  fewer images than features, the features-in functions take the cross term from an image-by-image matrix instead
  (:func:`fid_from_features`, :func:`fid_against_stats`): the same number to roundoff, without the F x F solves.
- FID at small n is biased upward, and by an amount that depends on the model (Chong & Forsyth 2020,
  "Effectively Unbiased FID and Inception Score and where to find them"; Binkowski et al. 2018,
  "Demystifying MMD GANs", which also show that KID is unbiased): :data:`FID_SMALL_N` is the n below which
  an evaluation flags its FID.
- FID's evaluation noise (:func:`fid_jackknife`): a delete-1 jackknife over the generated rows, reference fixed,
  as pseudo-replicates; an M x M eigensolve per replicate when M < F (see :func:`fid_resampled`), so 200 take
  ~1-2 s. Not the bootstrap: a resample with replacement holds ~63 % distinct rows, and with fewer images than
  features (a CPU study: 250 against 1280) that shrinks the fake covariance's rank by a different amount in each
  replicate, so bootstrap FIDs scattered ~3x wider than FID over independent generated sets (correlated Gaussian
  features, F=1280, M=250: sd 15.1 vs 5.1); the jackknife's replicates drop one row and gave 1.0x there, 1.1x at
  F=256, M=200 (conservative, as a jackknife variance is: 1.25x at F=64, M=250). tests/test_eval_metrics.py checks it.
- KID bootstrap (:func:`kid_bootstrap`): generated rows resampled with replacement; each replicate is the
  complete unbiased MMD^2 of all real rows against the resample, pairs of copies of one row left out, from
  kernel matrices formed once (a replicate is then a quadratic form of its row counts; 200 replicates of
  1000 x 1280 features take ~0.2 s).
- KID uses torchmetrics' kernel and MMD functions (cubic polynomial kernel, unbiased MMD^2) on random subsets that we
  draw with an explicit ``torch.Generator``: torchmetrics' ``KernelInceptionDistance`` draws its subsets from
  the global RNG, which would make KID irreproducible.
- Precision/recall (Kynkaanniemi et al. 2019) has no torchmetrics implementation: written here. Each real
  feature gets a ball whose radius is the distance to its k-th nearest other real feature; precision is the
  fraction of fake features inside at least one real ball, recall the fraction of real features inside at
  least one fake ball (radii from the fake set). Both numbers move with the sizes of the two sets (in high
  dimensions the smaller balls of a larger set cover less of a sample from the same distribution), so
  :func:`precision_recall_matched` compares sets of equal size.
"""

from __future__ import annotations

import math

import torch


def _check(real: torch.Tensor, fake: torch.Tensor, min_rows: int = 2) -> None:
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, F) and (M, F) with the same F, "
                         f"got {tuple(real.shape)} {tuple(fake.shape)}")
    if real.shape[0] < min_rows or fake.shape[0] < min_rows:
        raise ValueError(f"need at least {min_rows} real and fake feature rows, "
                         f"got {real.shape[0]} and {fake.shape[0]}")


FID_SMALL_N = 2000  # below this many images (real or generated) FID is flagged as biased (``fid_small_n``)


def _mean_cov(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (F,) and unbiased covariance (F, F) of rows x (N, F), in float64."""
    x = x.double()
    mu = x.mean(dim=0)
    xc = x - mu  # (N, F)
    return mu, xc.T @ xc / (x.shape[0] - 1)


def feature_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (F,) and covariance (F, F, unbiased: divided by N-1) of feature rows (N, F), float64: what
    clean-fid and the ADM evaluator keep as ``mu`` and ``sigma``."""
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need (N, F) features with N >= 2, got {tuple(x.shape)}")
    return _mean_cov(x)


def _check_stats(mu: torch.Tensor, sigma: torch.Tensor, fake: torch.Tensor) -> None:
    f = fake.shape[1] if fake.ndim == 2 else -1
    if mu.shape != (f,) or sigma.shape != (f, f):
        raise ValueError(f"reference statistics (mu {tuple(mu.shape)}, sigma {tuple(sigma.shape)}) do not fit "
                         f"features {tuple(fake.shape)}")
    if fake.shape[0] < 2:
        raise ValueError(f"need at least 2 fake feature rows, got {fake.shape[0]}")


def _sqrt_psd(s: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a PSD matrix (F, F); tiny negative eigenvalues from roundoff -> 0."""
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to real (N, F) and fake (M, F) features (units: feature^2).

    When min(N, M) < F (every CPU study: F = 1280 or 2048 features of a few hundred images), the cross term comes
    from the N x M matrix of centred inner products instead of two F x F eigensolves: with S1 = Rc^T Rc / (N-1) and
    S2 = Gc^T Gc / (M-1), the nonzero eigenvalues of S1 S2 are those of B B^T / ((N-1)(M-1)) with B = Rc Gc^T, so
    ``tr((S1 S2)^(1/2)) = sum(svd(B)) / sqrt((N-1)(M-1))``. Measured on this 2-core CPU at F = 1280, N = M = 32:
    ~1 s per FID by the F x F route, a few ms by this one (a study evaluates dozens of settings). Otherwise the
    statistics route (:func:`fid_from_stats`)."""
    _check(real, fake)
    n, m, f = real.shape[0], fake.shape[0], real.shape[1]
    if min(n, m) >= f:
        return fid_from_stats(*_mean_cov(real), *_mean_cov(fake))
    r, g = real.double(), fake.double()
    mu1, mu2 = r.mean(dim=0), g.mean(dim=0)  # (F,)
    rc, gc = r - mu1, g - mu2  # centred rows (N, F), (M, F)
    cross = torch.linalg.svdvals(rc @ gc.T).sum() / math.sqrt((n - 1) * (m - 1))  # B: (N, M)
    return _frechet(mu1, rc.square().sum() / (n - 1), mu2, gc.square().sum() / (m - 1), cross)


def fid_from_stats(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2): means (F,), covariances (F, F), float64."""
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    f = mu1.shape[0]
    if mu1.shape != (f,) or mu2.shape != (f,) or s1.shape != (f, f) or s2.shape != (f, f):
        raise ValueError(f"mismatched statistics: {tuple(mu1.shape)} {tuple(s1.shape)} {tuple(mu2.shape)} {tuple(s2.shape)}")
    return _frechet(mu1, s1.trace(), mu2, s2.trace(), _root_cross(_sqrt_psd(s1), s2))


def fid_against_stats(mu: torch.Tensor, sigma: torch.Tensor, fake: torch.Tensor) -> float:
    """FID of fake features (M, F) against a reference given as its mean (F,) and covariance (F, F): equals
    ``fid_from_stats(mu, sigma, *feature_stats(fake))``, by an M x M eigensolve when M < F (:func:`fid_resampled_stats`
    with every row once)."""
    return fid_resampled_stats(mu, sigma, fake, [torch.arange(fake.shape[0], device=fake.device)])[0]


def _root_cross(root1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """``tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))`` from ``root1 = S1^(1/2)`` (F, F)."""
    return torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp_min(0).sqrt().sum()


def _frechet(mu1: torch.Tensor, tr1: torch.Tensor, mu2: torch.Tensor, tr2: torch.Tensor, cross: torch.Tensor) -> float:
    """``|mu1-mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``, floored at 0 (roundoff gives -1e-12 for
    identical sets; a distance is never negative)."""
    return max(float((mu1 - mu2).square().sum() + tr1 + tr2 - 2 * cross), 0.0)


def fid_jackknife(real: torch.Tensor, fake: torch.Tensor, n_rep: int = 200,
                  generator: torch.Generator | None = None) -> list[float]:
    """Jackknife pseudo-replicates of FID over the fake rows (M, F), against all real rows (N, F).

    Their spread estimates how much FID moves with *which* M images were generated (evaluation-sample noise); the
    reference set is held fixed because every model is compared against the same one. min(n_rep, M) replicates;
    see :func:`fid_jackknife_stats` for the estimator and the module docstring for why not a bootstrap.
    Deterministic given ``generator`` (seed 0 if None).
    """
    _check(real, fake)
    return fid_jackknife_stats(*_mean_cov(real), fake, n_rep, generator)


def _resamples(m: int, n_boot: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """``n_boot`` index vectors (m,) drawn with replacement from range(m) (seed 0 if no generator): the KID
    bootstrap's resamples (FID's noise is a jackknife, :func:`fid_jackknife_stats`)."""
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, m, (m,), generator=generator) for _ in range(n_boot)]


def fid_jackknife_stats(mu: torch.Tensor, sigma: torch.Tensor, fake: torch.Tensor, n_rep: int = 200,
                        generator: torch.Generator | None = None) -> list[float]:
    """:func:`fid_jackknife` against a reference given as its mean (F,) and covariance (F, F).

    Delete-1 jackknife (Efron & Stein 1981; Shao & Tu 1995, ch. 2): theta_i is FID without generated row i, for
    R = min(n_rep, M) rows drawn without replacement (all M when R = M), and the jackknife variance is
    (M - 1) / R * sum_i (theta_i - mean theta)^2 (= (M-1)/M * sum over all M rows when R = M). Returned as R
    pseudo-replicates ``FID + c (theta_i - mean theta)``, c = sqrt((M-1)(R-1)/R), whose sample variance (ddof 1) is
    that variance and whose mean is the point FID, so the consumers of bootstrap replicates (spread, log-scale
    variance) read them alike. Empty (no estimate) when R < 2 or M < 3 (a delete-1 FID needs 2 rows). The pseudo-
    replicates may be <= 0 when FID is small against its noise: read their spread, not their logs.
    """
    _check_stats(mu, sigma, fake)
    m = fake.shape[0]
    r = min(n_rep, m)
    if r < 2 or m < 3:
        return []
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    every = torch.arange(m, device=fake.device)
    dropped = torch.randperm(m, generator=generator)[:r].tolist()
    theta = torch.tensor(fid_resampled_stats(mu, sigma, fake, [every[every != i] for i in dropped]), dtype=torch.float64)
    point = fid_against_stats(mu, sigma, fake)
    c = math.sqrt((m - 1) * (r - 1) / r)
    return (point + c * (theta - theta.mean())).tolist()


def fid_resampled(real: torch.Tensor, fake: torch.Tensor, indices: list[torch.Tensor]) -> list[float]:
    """``[fid_from_features(real, fake[i]) for i in indices]``, computed without an (F, F) eigensolve per item.

    Why not call fid_from_features in a loop: at F=1280 each call costs two F x F eigendecompositions
    (~1 s on 2 CPU cores), so 200 replicates of 30 settings would take most of a CPU study's budget.
    When M < F the nonzero eigenvalues of ``S_fake S_real`` are those of the M x M matrix
    ``Xc S_real Xc^T / (M-1)`` (Xc: centred resampled fake rows), and ``Xc S_real Xc^T`` is the doubly
    centred submatrix of ``K = G S_real G^T``, computed once: each replicate is then one M x M
    symmetric eigensolve. When M >= F the F x F route with a precomputed ``S_real^(1/2)`` is cheaper.
    """
    _check(real, fake)
    return fid_resampled_stats(*_mean_cov(real), fake, indices)


def fid_resampled_stats(mu1: torch.Tensor, s1: torch.Tensor, fake: torch.Tensor, indices: list[torch.Tensor]) -> list[float]:
    """:func:`fid_resampled` against a reference given as its mean (F,) and covariance (F, F)."""
    _check_stats(mu1, s1, fake)
    mu1, s1 = mu1.double(), s1.double()
    g = fake.double()
    m, f = g.shape
    out = []
    if m < f:
        k = g @ s1 @ g.T  # (M, M)
        gram = g @ g.T  # (M, M)
        for i in indices:
            n = i.numel()
            if n < 2:
                raise ValueError("a resample needs at least 2 rows")
            kc = _double_centre(k[i][:, i]) / (n - 1)
            tr2 = _double_centre(gram[i][:, i]).trace() / (n - 1)  # tr(S_fake*)
            cross = torch.linalg.eigvalsh(kc).clamp_min(0).sqrt().sum()
            out.append(_frechet(mu1, s1.trace(), g[i].mean(dim=0), tr2, cross))
        return out
    root1 = _sqrt_psd(s1)
    for i in indices:
        mu2, s2 = _mean_cov(g[i])
        out.append(_frechet(mu1, s1.trace(), mu2, s2.trace(), _root_cross(root1, s2)))
    return out


def _double_centre(a: torch.Tensor) -> torch.Tensor:
    """``C a C`` with ``C = I - 11^T/n`` for a square (n, n) matrix: removes row and column means."""
    return a - a.mean(dim=0, keepdim=True) - a.mean(dim=1, keepdim=True) + a.mean()


KID_GRAM_LIMIT = 5000  # N + M up to which the kernel matrices are computed once (<= 200 MB float64)


def kid_from_features(
    real: torch.Tensor,
    fake: torch.Tensor,
    subset_size: int = 1000,
    subsets: int = 100,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Kernel distance (mean, std over ``subsets`` random subsets) between real (N, F) and fake (M, F).

    Subsets of ``min(subset_size, N, M)`` rows are drawn without replacement with ``generator`` (seed 0
    if None, so the same call gives the same numbers). Kernel: (x.y / F + 1)^3 (the KID paper's), unbiased
    MMD^2 (torchmetrics' ``maximum_mean_discrepancy``). For N + M <= KID_GRAM_LIMIT the kernel matrices are
    computed once and indexed per subset (the same numbers, ~30x fewer FLOPs at the default 100 subsets).
    """
    # Imported here: torchmetrics takes seconds to import, and only KID needs it (FID and PR are ours).
    from torchmetrics.image.kid import maximum_mean_discrepancy, poly_kernel

    _check(real, fake)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    real, fake = real.double(), fake.double()
    n, m = real.shape[0], fake.shape[0]
    size = min(subset_size, n, m)
    gram = n + m <= KID_GRAM_LIMIT
    if gram:
        k_rr, k_rf, k_ff = poly_kernel(real, real), poly_kernel(real, fake), poly_kernel(fake, fake)
    scores = []
    for _ in range(subsets):
        i = torch.randperm(n, generator=generator)[:size]
        j = torch.randperm(m, generator=generator)[:size]
        if gram:
            scores.append(maximum_mean_discrepancy(k_rr[i][:, i], k_rf[i][:, j], k_ff[j][:, j]))
        else:
            r, f = real[i], fake[j]
            scores.append(maximum_mean_discrepancy(poly_kernel(r, r), poly_kernel(r, f), poly_kernel(f, f)))
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(unbiased=False))


def _pairwise_dist(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Euclidean distances (A, B) in float64, computed in row chunks to bound memory."""
    return torch.cat([torch.cdist(a[i : i + chunk], b) for i in range(0, a.shape[0], chunk)])


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of x (N, F) to its k-th nearest other row -> (N,)."""
    d = _pairwise_dist(x, x)  # (N, N); the diagonal is each point's distance to itself (0)
    return d.kthvalue(k + 1, dim=1).values  # k+1: skip the point itself


def _coverage(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Fraction of ``points`` (P, F) inside at least one ball (centers (C, F), radii (C,))."""
    d = _pairwise_dist(points, centers)  # (P, C)
    return (d <= radii.unsqueeze(0)).any(dim=1).double().mean()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds: fractions in [0, 1].

    precision: share of fake (M, F) rows inside the real manifold; recall: share of real (N, F) rows
    inside the fake manifold. Memory is O(N^2 + M^2 + N*M) float64: ~10k x 10k is fine on a laptop.
    """
    _check(real, fake, min_rows=k + 1)
    real, fake = real.double(), fake.double()
    precision = _coverage(fake, real, _knn_radii(real, k))
    recall = _coverage(real, fake, _knn_radii(fake, k))
    return float(precision), float(recall)


def precision_recall_matched(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict:
    """:func:`precision_recall` on sets of equal size: the first ``min(N, M)`` rows of real (N, F) and fake (M, F).

    Why: with k fixed, the manifold of the larger set is made of smaller balls (its k-th neighbours are
    nearer), and in high dimensions that lowers how much of a sample from the same distribution it covers.
    So with unequal sets the two numbers differ even when the distributions are the same: on 64-d Gaussians
    (k=3, 40 draws), 800 real against 100 generated rows give precision - recall = -0.055 (+-0.012), 100
    against 800 give +0.073 (+-0.012), and equal sizes +-0.01 either way (tests/test_eval_metrics.py).
    Kynkaanniemi et al. (2019) use equal numbers of real and generated images. The first rows are taken, not a random subset:
    an evaluation's i-th generated image is prompted with the caption of the i-th reference image, so the
    first min(N, M) of each are the caption-matched pairs. Returns {"precision", "recall", "pr_num_real",
    "pr_num_fake"} (fractions in [0, 1]; the row counts used).
    """
    n = min(real.shape[0], fake.shape[0])
    precision, recall = precision_recall(real[:n], fake[:n], k=k)
    return {"precision": precision, "recall": recall, "pr_num_real": n, "pr_num_fake": n}


def kid_bootstrap(real: torch.Tensor, fake: torch.Tensor, n_boot: int = 200, generator: torch.Generator | None = None,
                  chunk: int = 1024) -> list[float]:
    """KID of ``n_boot`` resamples (with replacement) of the fake rows (M, F) against all real rows (N, F).

    The spread of the replicates estimates how much KID moves with which M images were generated, the reference
    fixed (within a factor 1.5 of KID's spread over independent generated sets: tests/test_eval_metrics.py).
    Each replicate is the complete unbiased MMD^2 with the KID kernel (x.y / F + 1)^3 (Binkowski et al.
    2018) between all real rows and the resample, written with the resample's row multiplicities c (M,):

        MMD^2 = mean_{i != j} k(r_i, r_j) + (c^T K c - sum_a c_a^2 K_aa) / (M^2 - sum_a c_a^2)
                - 2 (1^T K_rf c) / (N M),

    i.e. pairs of copies of one generated row are left out of the fake-fake mean (they would bias it up
    as repeated rows bias bootstrap FID). Without a repeat (c = 1) this is the U-statistic on the whole sets.
    Kernel matrices are formed once, in row chunks of ``chunk`` (memory O(chunk * max(N, M) + n_boot * M));
    each replicate then costs one M x M product. Deterministic given ``generator`` (seed 0 if None).
    """
    from torchmetrics.image.kid import poly_kernel  # imported here: see kid_from_features

    _check(real, fake)
    real, fake = real.double(), fake.double()
    n, m = real.shape[0], fake.shape[0]
    if n_boot <= 0:
        return []
    counts = torch.stack([torch.bincount(i, minlength=m) for i in _resamples(m, n_boot, generator)]).double().to(fake.device)  # (R, M)
    rr = sum(poly_kernel(real[s : s + chunk], real).sum() for s in range(0, n, chunk))
    rr = (rr - poly_kernel_diag(real).sum()) / (n * (n - 1))
    rf_cols = sum(poly_kernel(real[s : s + chunk], fake).sum(dim=0) for s in range(0, n, chunk))  # (M,)
    ckc = torch.zeros(counts.shape[0], dtype=torch.float64, device=fake.device)  # c^T K_ff c per replicate
    for s in range(0, m, chunk):
        k_ff = poly_kernel(fake[s : s + chunk], fake)  # (chunk, M)
        ckc += ((counts[:, s : s + chunk] @ k_ff) * counts).sum(dim=1)
    diag = poly_kernel_diag(fake)  # (M,)
    pairs = m * m - counts.square().sum(dim=1)  # pairs of positions holding different rows
    # A resample of one row repeated M times (possible only for tiny M) has no such pair: then keep the
    # same-row pairs at other positions (the plain U-statistic over the resample's positions).
    ff = torch.where(pairs > 0, (ckc - counts.square() @ diag) / pairs.clamp_min(1), (ckc - counts @ diag) / (m * (m - 1)))
    rf = counts @ rf_cols / (n * m)
    return (rr + ff - 2 * rf).tolist()


def poly_kernel_diag(x: torch.Tensor) -> torch.Tensor:
    """The KID kernel of each row with itself, (|x|^2 / F + 1)^3, for rows x (N, F) -> (N,)."""
    return (x.double().square().sum(dim=1) / x.shape[1] + 1) ** 3
