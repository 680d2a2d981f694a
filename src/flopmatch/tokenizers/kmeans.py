"""Weight-free discrete tokenizer: a k-means codebook over 4x4x3 pixel patches.

A 32x32 image becomes 64 tokens (an 8x8 grid in raster order), each the index of the nearest of K
centroids (48-d patch vectors in [-1, 1] pixel space); decode pastes the centroids back. The codebook
is fitted with k-means++ seeding and Lloyd iterations on a random subsample of training patches,
deterministic under a torch.Generator.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flopmatch.errors import UserError
from flopmatch.tokenizers.base import Tokenizer, TokenizerSpec
from flopmatch.tokenizers.patch import (
    FIT_CHUNK,
    check_images_uint8,
    patchify,
    read_tokenizer_files,
    save_tokenizer_files,
    tensors_fingerprint,
    uint8_to_float,
    unpatchify,
)

ASSIGN_CHUNK = 16384  # points per distance block: bounds the (chunk, K) distance matrix
SEED_SAMPLE = 20000  # k-means++ seeding runs on at most this many points (K sequential passes)


def image_patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, g*g, 3*p*p) patch vectors in raster order."""
    x = patchify(images, patch)  # (B, C, g, g)
    return x.flatten(2).transpose(1, 2)  # (B, L, C)


def nearest(points: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index (N,) long and squared distance (N,) of each point's nearest centroid, in blocks.

    Uses |x - c|² = |x|² - 2 x·c + |c|² so the work is one (N, D) x (D, K) matmul per block.
    """
    c_sq = centroids.square().sum(1)  # (K,)
    idx, dist = [], []
    for start in range(0, points.shape[0], ASSIGN_CHUNK):
        x = points[start : start + ASSIGN_CHUNK]
        d = torch.addmm(c_sq.unsqueeze(0), x, centroids.T, alpha=-2.0)  # (n, K) = |c|² - 2 x·c
        d_min, i = d.min(1)
        idx.append(i)
        dist.append((d_min + x.square().sum(1)).clamp_min(0.0))
    return torch.cat(idx), torch.cat(dist)


def kmeans_plusplus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: (N, D) points -> (k, D) centroids, each drawn with prob ∝ squared distance."""
    n = points.shape[0]
    sq = points.square().sum(1)  # (N,) |x|², so each step is one matrix-vector product
    centroids = torch.empty(k, points.shape[1], dtype=points.dtype)
    pick = int(torch.randint(n, (1,), generator=generator))
    d2 = torch.full((n,), float("inf"), dtype=points.dtype)
    for j in range(k):
        centroids[j] = points[pick]
        dist = (sq + sq[pick]).addmv_(points, points[pick], alpha=-2.0).clamp_min_(0.0)  # (N,) |x - c_j|²
        d2 = torch.minimum(d2, dist)
        total = float(d2.sum())
        if total > 0:
            pick = int(torch.multinomial(d2, 1, generator=generator))
        else:  # fewer distinct points than k: take random points, Lloyd reseeds the duplicates
            pick = int(torch.randint(n, (1,), generator=generator))
    return centroids


def lloyd(
    points: torch.Tensor, centroids: torch.Tensor, iters: int, tol: float = 0.0
) -> tuple[torch.Tensor, list[float]]:
    """Up to ``iters`` Lloyd iterations from ``centroids`` (K, D) on points (N, D).

    Returns the final centroids and, per iteration, the mean squared distance of a point to its
    nearest centroid before that iteration's update. Stops early once an iteration improves that
    error by less than the fraction ``tol``. An empty cluster is reseeded at the point currently
    farthest from its centroid (deterministic), so every code stays in use.
    """
    k = centroids.shape[0]
    history = []
    for _ in range(iters):
        assign, dist = nearest(points, centroids)
        history.append(float(dist.mean()))
        if len(history) > 1 and history[-2] - history[-1] < tol * history[-2]:
            break  # converged: the previous update barely helped, keep its centroids
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k).to(points.dtype)
        empty = (counts == 0).nonzero().flatten()
        centroids = sums / counts.clamp_min(1.0).unsqueeze(1)
        if len(empty):
            far = dist.topk(min(len(empty), points.shape[0])).indices
            centroids[empty[: len(far)]] = points[far]
    return centroids, history


class KMeansTokenizer(Tokenizer):
    """Discrete, weight-free: images (B, 3, 32, 32) <-> tokens (B, 64) long in [0, K)."""

    name = "kmeans"

    def __init__(self, codebook_size: int = 512, patch: int = 4, image_size: int = 32):
        super().__init__()
        if codebook_size < 2:
            raise UserError(f"k-means codebook needs at least 2 codes, got {codebook_size}")
        if patch < 1 or image_size % patch:
            raise UserError(f"patch size {patch} must divide the image size {image_size}")
        self.patch = patch
        self.image_size = image_size
        self.codebook_size = codebook_size
        self.spec = TokenizerSpec(
            tokens="discrete", grid=image_size // patch, vocab_size=codebook_size, image_size=image_size
        )
        # Unfitted: evenly spaced grey patches, so encode/decode work (badly) before fit().
        grey = torch.linspace(-1.0, 1.0, codebook_size).unsqueeze(1)  # (K, 1)
        self.register_buffer("centroids", grey.expand(codebook_size, 3 * patch * patch).clone())  # (K, D)
        self.fit_history: list[float] = []

    def config(self) -> dict:
        return {"codebook_size": self.codebook_size, "patch": self.patch, "image_size": self.image_size}

    @torch.no_grad()
    def fit(
        self,
        images_uint8: torch.Tensor,
        iters: int = 20,
        generator: torch.Generator | None = None,
        max_patches: int = 200_000,
        init: str = "kmeans++",
        tol: float = 1e-3,
    ) -> KMeansTokenizer:
        """Fit the codebook on uint8 images (B, 3, H, W) from a random subsample of ``max_patches`` patches.

        init: "kmeans++" (seeded on at most 20k of the sampled patches) or "random" (K distinct random
        patches). Lloyd runs at most ``iters`` iterations and stops once one improves the mean squared
        error by less than the fraction ``tol``. Deterministic for a given generator (default: seed 0).
        Returns self; ``fit_history`` holds the error per iteration.
        """
        check_images_uint8(images_uint8, self.image_size)
        if init not in ("kmeans++", "random"):
            raise UserError(f"unknown k-means init {init!r}; valid: kmeans++, random")
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        b, per_image = images_uint8.shape[0], self.spec.seq_len
        n = min(max_patches, b * per_image)
        flat = torch.randperm(b * per_image, generator=g)[:n].sort().values  # sample patch ids without replacement
        img_idx, patch_idx = flat // per_image, flat % per_image
        points = torch.empty(n, 3 * self.patch * self.patch)  # (N, D)
        for start in range(0, b, FIT_CHUNK):
            # flat ids are sorted, so the samples from images [start, start + FIT_CHUNK) are one slice
            lo, hi = torch.searchsorted(img_idx, torch.tensor([start, start + FIT_CHUNK])).tolist()
            if lo == hi:
                continue
            imgs = uint8_to_float(images_uint8[start : start + FIT_CHUNK].cpu())
            patches = image_patches(imgs, self.patch)  # (b', L, D)
            points[lo:hi] = patches[img_idx[lo:hi] - start, patch_idx[lo:hi]]
        k = self.codebook_size
        if init == "kmeans++":
            seed_pts = points[torch.randperm(n, generator=g)[: max(SEED_SAMPLE, k)]]
            centroids = kmeans_plusplus(seed_pts, k, g)
        else:
            centroids = points[torch.randperm(n, generator=g)[:k]].clone()
            if centroids.shape[0] < k:  # fewer patches than codes: repeat, Lloyd reseeds empties
                centroids = centroids[torch.arange(k) % centroids.shape[0]]
        centroids, self.fit_history = lloyd(points, centroids, iters, tol)
        self.centroids.copy_(centroids)
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> tokens (B, g*g) long, raster order, nearest centroid."""
        x = image_patches(images.float(), self.patch)  # (B, L, D)
        b, l, d = x.shape
        idx, _ = nearest(x.reshape(b * l, d), self.centroids)
        return idx.view(b, l)  # (B, L)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """tokens (B, g*g) long -> images (B, 3, H, W): each token's centroid patch, clamped to [-1, 1]."""
        b, g = z.shape[0], self.spec.grid
        patches = self.centroids[z]  # (B, L, D)
        x = patches.transpose(1, 2).reshape(b, -1, g, g)  # (B, D, g, g)
        return unpatchify(x, self.patch).clamp(-1.0, 1.0)

    def encode_flops(self) -> int:
        """Distance matmul to every centroid: 2 · L · K · D per image (L=64, D=48)."""
        return 2 * self.spec.seq_len * self.codebook_size * self.centroids.shape[1]

    def decode_flops(self) -> int:
        """0: a table lookup and a reshape."""
        return 0

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"centroids": self.centroids}

    def fingerprint(self) -> str:
        return tensors_fingerprint("kmeans", self.config(), self._tensors())

    def save(self, directory: str | Path) -> None:
        save_tokenizer_files(directory, "kmeans", self.spec, self.config(), self._tensors())

    @classmethod
    def load(cls, directory: str | Path) -> KMeansTokenizer:
        """Load a tokenizer written by :meth:`save`; problems raise UserError."""
        config, tensors = read_tokenizer_files(directory, "kmeans")
        try:
            size, patch, image_size = int(config["codebook_size"]), int(config["patch"]), int(config["image_size"])
            tok = cls(codebook_size=size, patch=patch, image_size=image_size)
            tok.load_state_dict({"centroids": tensors["centroids"]})
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"tokenizer in {directory} is inconsistent ({type(e).__name__}: {e}); re-fit it") from None
        return tok
