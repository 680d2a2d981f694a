"""Turn a run config into training tensors: dataset -> tokenizer -> cached latents/codes + text rows.

Everything expensive happens once and is cached under ``flopmatch.paths.cache_dir()``:
fitted weight-free tokenizers (keyed by data and tokenizer settings), the encoded training set
(keyed by the tokenizer's fingerprint and the data's, so a changed tokenizer never reuses a stale
cache) and the text encoder's states per unique caption. Generators never re-run the
tokenizer's encoder per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from flopmatch.checkpoint import load_tensors, save_tensors
from flopmatch.config import DataConfig, RunConfig
from flopmatch.errors import UserError
from flopmatch.paths import cache_dir


def shapes_config(cfg: DataConfig):
    """The ShapesConfig a DataConfig describes."""
    from flopmatch.data.shapes import ShapesConfig

    return ShapesConfig(
        seed=cfg.seed, image_size=cfg.image_size, num_train=cfg.num_train, num_eval=cfg.num_eval,
        two_object_prob=cfg.two_object_prob, holdout=tuple(cfg.holdout),
    )


def make_dataset(cfg: DataConfig, split: str):
    """The dataset split named by a DataConfig (only the built-in "shapes" for now)."""
    if cfg.name != "shapes":
        raise UserError(f"unknown dataset {cfg.name!r}; available: shapes")
    from flopmatch.data.shapes import ShapesDataset

    return ShapesDataset(shapes_config(cfg), split)


def tokenizer_kind(cfg: RunConfig, objective) -> str:
    """Resolve ``tokenizer.kind = auto``: patch for continuous objectives, kmeans for discrete ones."""
    if cfg.tokenizer.kind != "auto":
        return cfg.tokenizer.kind
    return "patch" if objective.tokens == "continuous" else "kmeans"


def build_tokenizer(cfg: RunConfig, objective, dataset):
    """Load ``tokenizer.path`` or fit (once, cached) the weight-free tokenizer the config asks for."""
    from flopmatch.tokenizers import fit_weight_free, load_tokenizer

    if cfg.tokenizer.path:
        tok = load_tokenizer(cfg.tokenizer.path)
    else:
        kind = tokenizer_kind(cfg, objective)
        t = cfg.tokenizer
        key = f"{kind}-p{t.patch}" + (f"-k{t.codebook_size}-s{t.seed}" if kind == "kmeans" else "")
        directory = cache_dir() / "tokenizers" / f"{key}-{dataset.fingerprint()}"
        tok = None
        if (directory / "tokenizer.json").exists():
            try:
                tok = load_tokenizer(directory)
            except UserError:
                tok = None  # damaged cache entry: refit
        if tok is None:
            tok = fit_weight_free(kind, dataset.images_uint8(), patch=t.patch, codebook_size=t.codebook_size, seed=t.seed)
            tok.save(directory)
    if tok.spec.kind != objective.tokens:
        raise UserError(
            f"objective {objective.name} needs a {objective.tokens} tokenizer but {cfg.tokenizer.path or tok.name} is "
            f"{tok.spec.kind}; use a {'kl or patch' if objective.tokens == 'continuous' else 'lfq or kmeans'} tokenizer"
        )
    if tok.spec.image_size != cfg.data.image_size:
        raise UserError(f"tokenizer expects {tok.spec.image_size}px images but data.image_size is {cfg.data.image_size}")
    return tok


@torch.no_grad()
def encode_dataset(tokenizer, dataset, batch_size: int = 512, progress: bool = True) -> torch.Tensor:
    """Encode every image of ``dataset`` once: (N, C, g, g) float32 latents or (N, L) long codes, cached."""
    path = cache_dir() / "encoded" / f"{tokenizer.fingerprint()}-{dataset.fingerprint()}.safetensors"
    if path.exists():
        try:
            return load_tensors(path)["x"]
        except (UserError, KeyError):
            pass  # damaged cache: re-encode
    from tqdm import tqdm

    images = dataset.images_uint8()
    parts = []
    tokenizer.eval()
    for start in tqdm(range(0, len(images), batch_size), desc="encoding images", unit="batch", disable=not progress, leave=False):
        chunk = images[start : start + batch_size].float() / 127.5 - 1.0  # uint8 -> [-1, 1]
        parts.append(tokenizer.encode(chunk).cpu())
    x = torch.cat(parts)
    save_tensors(path, {"x": x}, metadata={"tokenizer": tokenizer.fingerprint(), "data": dataset.fingerprint()})
    return x


@dataclass
class PreparedData:
    """The training set as the generator sees it."""

    x: torch.Tensor  # (N, C, g, g) float latents or (N, L) long codes
    rows: torch.Tensor  # (N,) long: row of each example's caption in ``text``
    text: object  # flopmatch.text.TextCache
    encoder: object  # flopmatch.text.TextEncoder
    tokenizer: object  # flopmatch.tokenizers.base.Tokenizer
    dataset: object


def make_text_encoder(cfg: RunConfig):
    """The run's frozen text encoder (the text encoder always runs on CPU; its states are cached)."""
    from flopmatch.text import make_text_encoder as make

    return make(cfg.text.kind, max_len=cfg.text.max_len, dim=cfg.text.dim)


def prepare(cfg: RunConfig, objective, progress: bool = True) -> PreparedData:
    """Dataset, tokenizer, encoded training set and text cache for a run config."""
    from flopmatch.text import TextCache

    dataset = make_dataset(cfg.data, "train")
    tok = build_tokenizer(cfg, objective, dataset)
    x = encode_dataset(tok, dataset, progress=progress)
    encoder = make_text_encoder(cfg)
    captions = dataset.captions()
    text = TextCache(encoder, captions)
    return PreparedData(x=x, rows=text.indices(captions), text=text, encoder=encoder, tokenizer=tok, dataset=dataset)


def tokenizer_dir(run_dir: str | Path) -> Path:
    """Where a run keeps its own copy of the tokenizer (so sampling needs nothing else)."""
    return Path(run_dir) / "tokenizer"
