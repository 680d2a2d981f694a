"""Tokenizers: images <-> latents or codes, and a registry to load saved ones by kind.

Weight-free tokenizers live here ("patch": continuous, "kmeans": discrete); learned autoencoders
(KL, LFQ) live in sibling modules that call :func:`register_loader` when imported. A saved tokenizer
is a directory with ``tokenizer.json`` ({"kind", "spec", "config", "version"}) and
``tensors.safetensors``; :func:`load_tokenizer` dispatches on "kind".
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch

from flopmatch.checkpoint import read_json
from flopmatch.errors import UserError
from flopmatch.tokenizers.base import Tokenizer, TokenizerSpec
from flopmatch.tokenizers.kmeans import KMeansTokenizer
from flopmatch.tokenizers.patch import (
    PatchTokenizer,
    read_tokenizer_files,
    save_tokenizer_files,
    tensors_fingerprint,
    uint8_to_float,
)

__all__ = [
    "LOADERS",
    "KMeansTokenizer",
    "PatchTokenizer",
    "Tokenizer",
    "TokenizerSpec",
    "fit_weight_free",
    "load_tokenizer",
    "read_tokenizer_files",
    "register_loader",
    "save_tokenizer_files",
    "tensors_fingerprint",
    "uint8_to_float",
]

LOADERS: dict[str, Callable[[Path], Tokenizer]] = {
    "patch": PatchTokenizer.load,
    "kmeans": KMeansTokenizer.load,
}

# Modules that register loaders for learned tokenizers when imported (imported lazily: they are
# heavier, and may not exist in every checkout).
_PLUGIN_MODULES = ("flopmatch.tokenizers.learned", "flopmatch.tokenizers.kl", "flopmatch.tokenizers.lfq")


def register_loader(kind: str, fn: Callable[[Path], Tokenizer]) -> None:
    """Make :func:`load_tokenizer` load directories whose tokenizer.json says ``"kind": kind`` with ``fn(dir)``."""
    LOADERS[kind] = fn


def _import_plugins() -> None:
    """Import the learned-tokenizer modules that exist so their register_loader calls run."""
    for name in _PLUGIN_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            importlib.import_module(name)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load a saved tokenizer directory; every problem is a UserError with one clear line."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"tokenizer directory {directory} does not exist; fit or train a tokenizer first")
    meta = read_json(directory / "tokenizer.json")  # UserError if missing or corrupt
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if not isinstance(kind, str):
        raise UserError(f"{directory / 'tokenizer.json'} has no 'kind'; it is not a flopmatch tokenizer")
    if kind not in LOADERS:
        _import_plugins()
    if kind not in LOADERS:
        raise UserError(f"unknown tokenizer kind {kind!r} in {directory}; known kinds: {', '.join(sorted(LOADERS))}")
    tok = LOADERS[kind](directory)
    if tok.spec.to_dict() != meta.get("spec"):
        raise UserError(
            f"tokenizer in {directory} does not match its tokenizer.json spec "
            f"(file says {meta.get('spec')}, loaded {tok.spec.to_dict()}); re-fit it"
        )
    return tok


def fit_weight_free(
    kind: str, images_uint8: torch.Tensor, *, patch: int = 4, codebook_size: int = 512, seed: int = 0
) -> Tokenizer:
    """Fit a weight-free tokenizer ("patch" or "kmeans") on uint8 training images (B, 3, H, W)."""
    image_size = int(images_uint8.shape[-1]) if images_uint8.dim() == 4 else 32
    if kind == "patch":
        return PatchTokenizer(patch=patch, image_size=image_size).fit(images_uint8)
    if kind == "kmeans":
        g = torch.Generator().manual_seed(seed)
        tok = KMeansTokenizer(codebook_size=codebook_size, patch=patch, image_size=image_size)
        return tok.fit(images_uint8, generator=g)
    raise UserError(f"unknown weight-free tokenizer {kind!r}; valid: patch, kmeans")
