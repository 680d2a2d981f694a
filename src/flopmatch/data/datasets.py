"""Dataset sources by name: a :class:`~flopmatch.config.DataConfig` -> a split of images and captions.

Every stage that needs data (training, the tokenizers, evaluation) asks :func:`make_dataset`; a new
source is one more branch here plus its own module in this package. ``data.name`` names the source:

- ``shapes``: the built-in procedural set (:mod:`flopmatch.data.shapes`), with exact ground truth;
- ``folder:PATH``: an image folder with ``metadata.jsonl``/``metadata.csv`` (:mod:`flopmatch.data.folder`);
- ``fashion-mnist``: Fashion-MNIST from the Debian package, class-templated captions and labels
  (:mod:`flopmatch.data.fashion_mnist`);
- ``emoji``: every emoji rendered with Noto Color Emoji, captioned by its name, split by base emoji
  (:mod:`flopmatch.data.emoji_set`);
- ``wds:PATTERN``: WebDataset tar shards of image + ``.txt`` caption pairs, e.g. img2dataset's output
  (:mod:`flopmatch.data.wds`);
- ``hf:PATH``: a Hugging Face dataset saved to disk or parquet files, read offline (:mod:`flopmatch.data.hf`).

Real sources are decoded once into a cached pool (:mod:`flopmatch.data.pool`) and served as an
:class:`ImageTextSet` with the same interface as :class:`~flopmatch.data.shapes.ShapesDataset`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from flopmatch.config import DataConfig, parse_source
from flopmatch.data.emoji_set import emoji_pool
from flopmatch.data.fashion_mnist import fashion_mnist_pool
from flopmatch.data.folder import folder_pool
from flopmatch.data.hf import hf_pool
from flopmatch.data.pool import MAX_EVAL_FRACTION, Pool, split_indices
from flopmatch.data.shapes import ShapesConfig, ShapesDataset
from flopmatch.data.wds import wds_pool
from flopmatch.errors import UserError

SPLITS = ("train", "eval")
# Real sources: kind (config.DATASETS name or config.SOURCE_KINDS prefix) -> (cfg, argument, progress) -> Pool.
REAL_SOURCES: dict[str, Callable[[DataConfig, str, bool], Pool]] = {
    "folder": folder_pool,
    "fashion-mnist": fashion_mnist_pool,
    "emoji": emoji_pool,
    "wds": wds_pool,
    "hf": hf_pool,
}


def shapes_config(cfg: DataConfig) -> ShapesConfig:
    """The ShapesConfig a DataConfig describes."""
    return ShapesConfig(
        seed=cfg.seed, image_size=cfg.image_size, num_train=cfg.num_train, num_eval=cfg.num_eval,
        two_object_prob=cfg.two_object_prob, holdout=tuple(cfg.holdout),
        holdout_relations=tuple(cfg.holdout_relations),
    )


def more_eval_images(ds, need: int) -> str:
    """How to give the evaluation split ``ds`` (an eval dataset with ``info``) at least ``need`` images, in words: a
    hash split is capped at MAX_EVAL_FRACTION of the source, so data.num_eval alone cannot raise it past that."""
    info = getattr(ds, "info", None) or {}
    rule, kind = info.get("split_rule"), parse_source(str(info.get("source", "shapes")))[0]
    given = {"folder": "a test/ folder", "hf": "a test split in the saved DatasetDict"}.get(kind)
    if str(rule).startswith("hash of the item name") and info.get("usable", 0) * MAX_EVAL_FRACTION < need:
        return (f"a hash split holds out at most {MAX_EVAL_FRACTION:.0%} of the source's {info.get('usable')} images: "
                f"add images{f' or give {given} of >= {need}' if given else ''}, with data.num_eval >= {need}")
    if rule == "given by the source" and len(ds) < need:
        return f"give the source's own evaluation split >= {need} images, with data.num_eval >= {need}"
    return f"set data.num_eval >= {need}"


class ImageTextSet(torch.utils.data.Dataset):
    """A split of a real source: items are {"image": float (3, S, S) in [-1, 1], "caption"}.

    ``info``: the source, its usable/skipped/converted counts and this split's size (written to a run's
    ``data.json``).
    """

    def __init__(self, pool: Pool, split: str, num_train: int, num_eval: int):
        if split not in SPLITS:
            raise UserError(f"split must be one of {SPLITS}, got {split!r}")
        idx = split_indices(pool, split, num_train, num_eval)
        self.split = split
        self._images = pool.images[idx]  # (n, 3, S, S) uint8
        self._captions = [pool.captions[i] for i in idx]
        self._labels = [pool.labels[i] for i in idx] if pool.labels is not None else None
        self.names = [pool.names[i] for i in idx]
        key = f"{pool.key}-{split}-{num_train}-{num_eval}"
        rule = "given by the source" if any(pool.splits) else "hash of the item name"
        if not any(pool.splits) and len(set(pool.names)) < len(pool.names):
            # An image on several rows (one per caption) keeps all its rows on one side of the hash split
            # (split_indices; an earlier version could cut between them). Named in the fingerprint too: a split cut
            # by the earlier rule must not pair with caches (encoded latents, tokenizers, evaluators) made for this
            # one. Sources without repeated names split as before and keep their caches.
            rule += ", an image's rows kept together"
            key += f"-{rule}"
        self._fingerprint = hashlib.sha256(key.encode()).hexdigest()[:20]
        self.info = {**pool.info, "split": split, "size": len(idx), "split_rule": rule}

    def __len__(self) -> int:
        return len(self._captions)

    def __getitem__(self, i: int) -> dict:
        """Item i: image float (3, S, S) in [-1, 1] and its caption."""
        return {"image": self._images[i].float() / 127.5 - 1.0, "caption": self._captions[i]}

    def captions(self) -> list[str]:
        """All captions in index order."""
        return list(self._captions)

    def labels(self) -> list[int] | None:
        """Class index of every item in index order (fashion-mnist), or None for a source without classes."""
        return None if self._labels is None else list(self._labels)

    def fingerprint(self) -> str:
        """Digest of the decoded source, the preprocessing and this split's selection."""
        return self._fingerprint

    def images_uint8(self) -> torch.Tensor:
        """All images as uint8 (N, 3, S, S)."""
        return self._images


def make_dataset(cfg: DataConfig, split: str, progress: bool = True) -> ShapesDataset | ImageTextSet:
    """The ``split`` ("train" | "eval") of the dataset a DataConfig names."""
    kind, arg = parse_source(cfg.name)
    if kind == "shapes":
        return ShapesDataset(shapes_config(cfg), split, progress=progress)
    if kind not in REAL_SOURCES:  # parse_source admits only known kinds
        raise UserError(f"unknown dataset {cfg.name!r}")
    ds = ImageTextSet(REAL_SOURCES[kind](cfg, arg, progress), split, cfg.num_train, cfg.num_eval)
    ds.info["source"] = cfg.name  # the cache is shared by copies of a source: name the one asked for
    if split == "train" and not len(ds):
        raise UserError(f"{cfg.name} has no training images in its training split; add images (or, where the source "
                        f"gives its split, a train split)")
    return ds
