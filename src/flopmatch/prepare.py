"""Turn a run config into training tensors: dataset -> tokenizer -> cached latents/codes + text rows.

Everything expensive happens once and is cached under :func:`flopmatch.files.cache_dir`:
fitted weight-free tokenizers (keyed by data and tokenizer settings), the encoded training set
(keyed by the tokenizer's fingerprint and the data's, so a changed tokenizer never reuses a stale
cache) and the text encoder's states per unique caption. Generators never re-run the
tokenizer's encoder per step. Under torchrun the main rank builds these caches and the other ranks
load them (:func:`prepare`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from flopmatch import dist
from flopmatch.config import RunConfig
from flopmatch.data.datasets import make_dataset
from flopmatch.errors import UserError
from flopmatch.files import cache_dir, load_tensors, save_tensors
from flopmatch.objectives import Objective
from flopmatch.plan import weight_free_kind
from flopmatch.text import TextCache, TextEncoder, text_encoder_for
from flopmatch.tokenizers.base import LEARNED_KIND, WEIGHT_FREE_KIND, Tokenizer
from flopmatch.tokenizers.registry import fit_weight_free, load_tokenizer


def build_tokenizer(cfg: RunConfig, objective: Objective, dataset, build: bool = True) -> Tokenizer:
    """Load ``tokenizer.path`` or fit (once, cached) the weight-free tokenizer the config asks for; ``build=False``
    only loads the cached fit (UserError if there is none)."""
    if cfg.tokenizer.path:
        tok = load_tokenizer(cfg.tokenizer.path)
    else:
        kind = weight_free_kind(cfg, objective)
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
            if not build:
                raise UserError(f"the main process did not leave the fitted {kind} tokenizer in {directory}")
            images = dataset.images_uint8()
            if kind == "kmeans":  # seconds to a minute: say what is happening
                print(f"fitting the {t.codebook_size}-code k-means tokenizer on {len(images)} images (cached for next time)",
                      flush=True)
            tok = fit_weight_free(kind, images, patch=t.patch, codebook_size=t.codebook_size, seed=t.seed)
            tok.save(directory)
    if tok.spec.tokens != objective.tokens:
        raise UserError(
            f"objective {objective.name} needs a {objective.tokens} tokenizer but {cfg.tokenizer.path or tok.name} is "
            f"{tok.spec.tokens}; use a {LEARNED_KIND[objective.tokens]} or {WEIGHT_FREE_KIND[objective.tokens]} tokenizer"
        )
    if tok.spec.image_size != cfg.data.image_size:
        raise UserError(f"tokenizer expects {tok.spec.image_size}px images but data.image_size is {cfg.data.image_size}")
    return tok


@torch.no_grad()
def encode_dataset(tokenizer, dataset, batch_size: int = 512, progress: bool = True, build: bool = True) -> torch.Tensor:
    """Encode every image of ``dataset`` once: (N, C, g, g) float32 latents or (N, L) long codes, cached;
    ``build=False`` only loads the cached encoding (UserError if there is none)."""
    path = cache_dir() / "encoded" / f"{tokenizer.fingerprint()}-{dataset.fingerprint()}.safetensors"
    if path.exists():
        try:
            return load_tensors(path)["x"]
        except (UserError, KeyError):
            pass  # damaged cache: re-encode
    if not build:
        raise UserError(f"the main process did not leave the encoded training set in {path}")
    images = dataset.images_uint8()
    parts = []
    tokenizer.eval()
    for start in tqdm(range(0, len(images), batch_size), desc="encoding images with the tokenizer (cached for next time)", unit="batch", disable=not progress, leave=False):
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
    text: TextCache
    encoder: TextEncoder
    tokenizer: Tokenizer
    dataset: object


def prepare(cfg: RunConfig, objective: Objective, progress: bool = True, device: str | torch.device = "cpu") -> PreparedData:
    """Dataset, tokenizer, encoded training set and text cache for a run config; the text encoder on ``device``
    (the run's: on a GPU the captions not yet cached are encoded there)."""
    dataset = make_dataset(cfg.data, "train", progress=progress)  # under torchrun: decoded by the main rank
    encoder = text_encoder_for(cfg.text, device)
    captions = dataset.captions()
    if dist.world_size() == 1:
        tok, x, text = _caches(cfg, objective, dataset, encoder, captions, progress)
    else:
        # The main rank fits the tokenizer and encodes the images and captions into the caches, then the others load
        # them: each of N ranks would otherwise repeat the k-means fit and a text-encoder pass over every caption (the
        # same result, deterministic, but N times the time and N writers of each cache file). A main rank that fails
        # tells the others (run_on_main), which then stop with its error instead of waiting or blaming the cache.
        built = dist.run_on_main(lambda: _caches(cfg, objective, dataset, encoder, captions, progress))
        tok, x, text = built or _caches(cfg, objective, dataset, encoder, captions, progress, build=False)
    return PreparedData(x=x, rows=text.indices(captions), text=text, encoder=encoder, tokenizer=tok, dataset=dataset)


def _caches(cfg: RunConfig, objective: Objective, dataset, encoder: TextEncoder, captions: list[str], progress: bool,
            build: bool = True) -> tuple[Tokenizer, torch.Tensor, TextCache]:
    """The tokenizer, encoded training set and text cache: built where missing, or (``build=False``) loaded only."""
    tok = build_tokenizer(cfg, objective, dataset, build=build)
    x = encode_dataset(tok, dataset, progress=progress, build=build)
    return tok, x, TextCache(encoder, captions, progress=progress, build=build)
