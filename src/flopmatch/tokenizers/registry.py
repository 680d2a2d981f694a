"""Tokenizers by kind: building, fitting and loading every kind, with plain imports a reader can follow.

Kinds: weight-free "patch" (continuous) and "kmeans" (discrete), learned "kl" (continuous) and "lfq"
(discrete). A saved tokenizer is a directory with ``tokenizer.json`` ({"kind", "spec", "config",
"version", ...}) and ``tensors.safetensors``; :func:`load_tokenizer` dispatches on "kind" through
:data:`LOADERS`. A new kind is a module in this package and one entry there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from flopmatch.errors import UserError
from flopmatch.files import load_tensors, read_json
from flopmatch.tokenizers.autoencoder import KINDS, AutoencoderConfig
from flopmatch.tokenizers.base import Tokenizer, TokenizerSpec
from flopmatch.tokenizers.kl import KLAutoencoder
from flopmatch.tokenizers.kmeans import KMeansTokenizer
from flopmatch.tokenizers.learned import FORMAT_VERSION, LearnedAutoencoder
from flopmatch.tokenizers.lfq import LFQAutoencoder
from flopmatch.tokenizers.patch import PatchTokenizer


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load a saved tokenizer directory; every problem is a UserError with one clear line."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is a file, not a tokenizer directory" if directory.exists() else
                        f"tokenizer directory {directory} does not exist; fit or train a tokenizer first")
    meta = read_json(directory / "tokenizer.json")  # UserError if missing or corrupt
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if not isinstance(kind, str):
        raise UserError(f"{directory / 'tokenizer.json'} has no 'kind'; it is not a flopmatch tokenizer")
    if kind not in LOADERS:
        raise UserError(f"unknown tokenizer kind {kind!r} in {directory}; known kinds: {', '.join(sorted(LOADERS))}")
    tok = LOADERS[kind](directory)
    try:
        stored = TokenizerSpec.from_dict(meta.get("spec") or {})
    except TypeError:
        stored = None
    if tok.spec != stored:
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
        patches = int(images_uint8.shape[0]) * tok.spec.seq_len
        if images_uint8.dim() == 4 and patches < codebook_size:  # (a malformed tensor: fit's own check says so)  # codes no patch can reach: tokens the generators can never learn to use
            raise UserError(f"a {codebook_size}-code k-means tokenizer needs at least {codebook_size} patches to fit; "
                            f"{images_uint8.shape[0]} training image(s) give {patches}: add images or lower "
                            f"tokenizer.codebook_size")
        return tok.fit(images_uint8, generator=g)
    raise UserError(f"unknown weight-free tokenizer {kind!r}; valid: patch, kmeans")


def make_autoencoder(config: AutoencoderConfig) -> LearnedAutoencoder:
    """Build an untrained KL or LFQ autoencoder from its config (``config.kind`` picks)."""
    config.validate()
    return KLAutoencoder(config) if config.kind == "kl" else LFQAutoencoder(config)


def load_learned(directory: str | Path, expect_kind: str | None = None) -> LearnedAutoencoder:
    """Load a KL or LFQ tokenizer directory; every inconsistency is a one-line UserError.

    Checks: tokenizer.json readable, version, kind (and ``expect_kind`` if given), config valid and
    of that kind, stored spec equal to the rebuilt model's, tensor names and shapes equal.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is a file, not a tokenizer directory" if directory.exists() else
                        f"tokenizer directory {directory} does not exist")
    meta = read_json(directory / "tokenizer.json")
    if not isinstance(meta, dict):
        raise UserError(f"{directory / 'tokenizer.json'} is not a JSON object; the tokenizer directory is corrupt")
    kind = meta.get("kind")
    if kind not in KINDS:
        raise UserError(f"{directory}: tokenizer kind {kind!r} is not a learned autoencoder (expected one of {KINDS})")
    if expect_kind is not None and kind != expect_kind:
        raise UserError(f"{directory}: expected a {expect_kind!r} tokenizer, found {kind!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise UserError(f"{directory}: tokenizer format version {meta.get('version')!r}, this code reads {FORMAT_VERSION}")
    if not isinstance(meta.get("config"), dict):
        raise UserError(f"{directory}: tokenizer.json has no 'config' object")
    config = AutoencoderConfig.from_dict(meta["config"], where=str(directory / "tokenizer.json"))
    if config.kind != kind:
        raise UserError(f"{directory}: tokenizer.json kind {kind!r} but config.kind {config.kind!r}")
    with torch.random.fork_rng(devices=[]):  # weight init is overwritten: leave the caller's RNG untouched
        model = make_autoencoder(config)
    try:
        stored = TokenizerSpec.from_dict(meta.get("spec") or {})
    except TypeError:
        stored = None
    if stored != model.spec:
        raise UserError(f"{directory}: stored spec {meta.get('spec')} does not match config (gives {model.spec.to_dict()})")
    tensors = load_tensors(directory / "tensors.safetensors")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise UserError(f"{directory}: tensors.safetensors does not match config "
                        f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                        f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})")
    for name, t in expected.items():
        if tensors[name].shape != t.shape:
            raise UserError(f"{directory}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                            f"config implies {tuple(t.shape)}")
    model.load_state_dict(tensors)
    model.data_info = meta.get("data") or {}
    model.train_info = meta.get("train") or {}
    model.eval()
    return model


def load_kl(directory: str | Path) -> LearnedAutoencoder:
    """Loader of kind "kl"."""
    return load_learned(directory, expect_kind="kl")


def load_lfq(directory: str | Path) -> LearnedAutoencoder:
    """Loader of kind "lfq"."""
    return load_learned(directory, expect_kind="lfq")


LOADERS: dict[str, Callable[[Path], Tokenizer]] = {
    "patch": PatchTokenizer.load,
    "kmeans": KMeansTokenizer.load,
    "kl": load_kl,
    "lfq": load_lfq,
}
