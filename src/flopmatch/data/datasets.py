"""Dataset sources by name: a :class:`~flopmatch.config.DataConfig` -> a split of images and captions.

Every stage that needs data (training, the tokenizers, evaluation) asks :func:`make_dataset`; a new
source is one more branch here plus its own module in this package. Today the only source is the
built-in procedural ``shapes`` set.
"""

from __future__ import annotations

from flopmatch.config import DATASETS, DataConfig
from flopmatch.data.shapes import ShapesConfig, ShapesDataset
from flopmatch.errors import UserError


def shapes_config(cfg: DataConfig) -> ShapesConfig:
    """The ShapesConfig a DataConfig describes."""
    return ShapesConfig(
        seed=cfg.seed, image_size=cfg.image_size, num_train=cfg.num_train, num_eval=cfg.num_eval,
        two_object_prob=cfg.two_object_prob, holdout=tuple(cfg.holdout),
    )


def make_dataset(cfg: DataConfig, split: str) -> ShapesDataset:
    """The ``split`` ("train" | "eval") of the dataset a DataConfig names."""
    if cfg.name not in DATASETS:
        raise UserError(f"unknown dataset {cfg.name!r}; available: {', '.join(DATASETS)}")
    return ShapesDataset(shapes_config(cfg), split)
