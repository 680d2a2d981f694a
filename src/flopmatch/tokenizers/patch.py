"""Weight-free continuous tokenizer: non-overlapping pixel patches, normalised per channel.

A 32x32 image becomes an 8x8 grid of 4x4x3 patches, i.e. latents (B, 48, 8, 8). Each of the 48
channels is shifted and scaled by a mean/std fitted on training images so latents have roughly
zero mean and unit variance (the scale the diffusion objective assumes). decode() is the exact
inverse (up to float rounding and the final clamp to [-1, 1]). No matmul: 0 FLOPs either way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from flopmatch.errors import UserError
from flopmatch.files import atomic_write_json, load_tensors, read_json, save_tensors
from flopmatch.tokenizers.base import Tokenizer, TokenizerSpec

FORMAT_VERSION = 1
FIT_CHUNK = 2048  # images per chunk when fitting, bounds memory on large sets


def uint8_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
    return images.float() / 127.5 - 1.0


def check_images_uint8(images: torch.Tensor, image_size: int) -> None:
    """Raise UserError unless ``images`` is uint8 (B, 3, image_size, image_size) with B >= 1."""
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (3, image_size, image_size):
        raise UserError(
            f"tokenizer fitting needs uint8 images of shape (B, 3, {image_size}, {image_size}), "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise UserError("tokenizer fitting needs at least one image")


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3*p*p, H/p, W/p); channel index = c*p*p + i*p + j for pixel (i, j) of a patch."""
    return F.pixel_unshuffle(images, patch)


def unpatchify(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """Exact inverse of :func:`patchify`: (B, 3*p*p, g, g) -> (B, 3, g*p, g*p)."""
    return F.pixel_shuffle(latents, patch)


def tensors_fingerprint(kind: str, config: dict, tensors: dict[str, torch.Tensor]) -> str:
    """Digest of the kind, config and every tensor's name, dtype, shape and bytes (16 hex chars)."""
    h = hashlib.sha256(kind.encode())
    h.update(json.dumps(config, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def save_tokenizer_files(directory: str | Path, kind: str, spec: TokenizerSpec, config: dict, tensors: dict) -> None:
    """Write tensors.safetensors then tokenizer.json, each atomically (the JSON last marks completeness)."""
    directory = Path(directory)
    save_tensors(directory / "tensors.safetensors", tensors)
    meta = {"kind": kind, "spec": spec.to_dict(), "config": config, "version": FORMAT_VERSION}
    atomic_write_json(directory / "tokenizer.json", meta)


def read_tokenizer_files(directory: str | Path, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read (config, tensors) of a saved tokenizer of ``kind``; problems raise UserError naming the file."""
    directory = Path(directory)
    meta = read_json(directory / "tokenizer.json")
    meta = meta if isinstance(meta, dict) else {}
    if meta.get("kind") != kind or meta.get("version") != FORMAT_VERSION or not isinstance(meta.get("config"), dict):
        raise UserError(
            f"{directory / 'tokenizer.json'} is not a version-{FORMAT_VERSION} {kind!r} tokenizer "
            f"(kind={meta.get('kind')!r}, version={meta.get('version')!r})"
        )
    return meta["config"], load_tensors(directory / "tensors.safetensors")


class PatchTokenizer(Tokenizer):
    """Continuous, weight-free: images (B, 3, 32, 32) <-> normalised patch latents (B, 48, 8, 8)."""

    name = "patch"

    def __init__(self, patch: int = 4, image_size: int = 32):
        super().__init__()
        if patch < 1 or image_size % patch:
            raise UserError(f"patch size {patch} must divide the image size {image_size}")
        self.patch = patch
        self.image_size = image_size
        channels = 3 * patch * patch
        self.spec = TokenizerSpec(tokens="continuous", grid=image_size // patch, channels=channels, image_size=image_size)
        # Before fit(): pixels in [-1, 1] have std ~0.5, so this is a neutral default scale.
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.full((channels,), 0.5))

    def config(self) -> dict:
        return {"patch": self.patch, "image_size": self.image_size}

    @torch.no_grad()
    def fit(self, images_uint8: torch.Tensor) -> PatchTokenizer:
        """Fit the per-channel mean/std on uint8 images (B, 3, H, W); returns self."""
        check_images_uint8(images_uint8, self.image_size)
        c = self.spec.channels
        total = torch.zeros(c, dtype=torch.float64)
        total_sq = torch.zeros(c, dtype=torch.float64)
        count = 0
        for start in range(0, images_uint8.shape[0], FIT_CHUNK):
            x = patchify(uint8_to_float(images_uint8[start : start + FIT_CHUNK].cpu()), self.patch).double()
            total += x.sum(dim=(0, 2, 3))
            total_sq += x.square().sum(dim=(0, 2, 3))
            count += x.shape[0] * x.shape[2] * x.shape[3]
        mean = total / count
        var = (total_sq / count - mean.square()).clamp_min(0.0)
        # A constant channel (e.g. a blank training set) must not blow latents up: floor the std.
        self.mean.copy_(mean.float())
        self.std.copy_(var.sqrt().clamp_min(1e-3).float())
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> latents (B, 3*p*p, g, g), per-channel normalised."""
        x = patchify(images.float(), self.patch)  # (B, C, g, g)
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """latents (B, 3*p*p, g, g) -> images (B, 3, H, W) clamped to [-1, 1]."""
        x = z.float() * self.std.view(1, -1, 1, 1) + self.mean.view(1, -1, 1, 1)
        return unpatchify(x, self.patch).clamp(-1.0, 1.0)

    def encode_flops(self) -> int:
        """0: a reshape and a per-channel affine map, no matmul."""
        return 0

    def decode_flops(self) -> int:
        """0: a per-channel affine map and a reshape, no matmul."""
        return 0

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std}

    def fingerprint(self) -> str:
        return tensors_fingerprint("patch", self.config(), self._tensors())

    def save(self, directory: str | Path) -> None:
        save_tokenizer_files(directory, "patch", self.spec, self.config(), self._tensors())

    @classmethod
    def load(cls, directory: str | Path) -> PatchTokenizer:
        """Load a tokenizer written by :meth:`save`; problems raise UserError."""
        config, tensors = read_tokenizer_files(directory, "patch")
        try:
            tok = cls(patch=int(config["patch"]), image_size=int(config["image_size"]))
            tok.load_state_dict({"mean": tensors["mean"], "std": tensors["std"]})
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"tokenizer in {directory} is inconsistent ({type(e).__name__}: {e}); re-fit it") from None
        return tok
