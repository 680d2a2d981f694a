"""Which prompt-following scorer a dataset gets, behind one interface.

- ``shapes``: exact attribute checks by the attribute classifier (:mod:`flopmatch.evaluation.attributes`);
  ``full_match`` is the fraction of images that pass every check of their prompt. ``by_group`` has the
  same scores for seen vs held-out prompts and one- vs two-object prompts
  (:mod:`flopmatch.evaluation.prompt_groups`), ``holdout`` what the data held out of training.
- ``fashion-mnist``: exact class checks by a classifier trained on its training split
  (:mod:`flopmatch.evaluation.classes`); ``full_match`` is the fraction classified as the prompt's class.
- every other source (free-text captions): the domain CLIP (:mod:`flopmatch.evaluation.clipscore`),
  trained on the dataset's training split and validated by retrieval on its evaluation split. It gives
  a CLIP-style score and R-precision (AttnGAN, Xu et al. 2018): the fraction of generated images whose
  own prompt has the highest similarity among R candidates (itself and R - 1 other evaluation
  captions). R-precision is reported as ``full_match`` too, so the study's prompt-following verdicts
  read one field on every dataset; the report names the scorer and its validation figures.

A scorer has ``score(images_uint8 (N, 3, S, S), prompts) -> dict`` and ``describe() -> dict``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from flopmatch.config import DataConfig, parse_source
from flopmatch.data.datasets import make_dataset, shapes_config
from flopmatch.evaluation.attributes import load_or_train_attribute_classifier, score_prompt_following
from flopmatch.evaluation.classes import load_or_train_class_classifier, score_class_prompts
from flopmatch.evaluation.clipscore import DomainCLIPModel, domain_clip_score, load_or_train_domain_clip, r_precision
from flopmatch.evaluation.prompt_groups import group_names, metrics_by_group, prompt_groups

R_CANDIDATES = 100  # R of R-precision: the prompt and 99 other captions, as in AttnGAN / DALL-E's evaluations


class PromptScorer(Protocol):
    def score(self, images_uint8: torch.Tensor, prompts: list[str]) -> dict: ...

    def describe(self) -> dict: ...


class AttributeScorer:
    """Exact scoring of shapes prompts (colour, shape, size, position, relation, count), overall and per
    prompt group; ``holdout`` / ``holdout_relations`` are the data's held-out combos and arrangements."""

    def __init__(self, classifier, holdout=(), holdout_relations=()):
        self.classifier = classifier
        self.holdout, self.holdout_relations = tuple(holdout), tuple(holdout_relations)

    def score(self, images_uint8: torch.Tensor, prompts: list[str]) -> dict:
        pf = score_prompt_following(self.classifier, images_uint8, prompts)
        matches = pf.pop("per_image_match")  # kept as a count: the per-image list would bloat eval.json
        checks = pf.pop("per_image_checks")
        pf["num_full_match"] = int(sum(matches))
        groups = prompt_groups(prompts, self.holdout, self.holdout_relations)
        pf["by_group"] = metrics_by_group(checks, groups, group_names(self.holdout, self.holdout_relations))
        pf["holdout"] = {"combos": list(self.holdout), "relations": list(self.holdout_relations)}
        return {"scorer": "attribute-classifier", **pf}

    def describe(self) -> dict:
        return self.classifier.describe()


class ClassScorer:
    """Exact scoring of Fashion-MNIST prompts: is the image classified as the class its prompt names?"""

    def __init__(self, classifier):
        self.classifier = classifier

    def score(self, images_uint8: torch.Tensor, prompts: list[str]) -> dict:
        pf = score_class_prompts(self.classifier, images_uint8, prompts)
        matches = pf.pop("per_image_match")
        pf["num_full_match"] = int(sum(bool(m) for m in matches))
        return {"scorer": "class-classifier", "full_match": pf["class_accuracy"], **pf}

    def describe(self) -> dict:
        return self.classifier.describe()


class ClipScorer:
    """Domain-CLIP score and R-precision for free-text captions; ``captions`` are the candidates' pool."""

    def __init__(self, model: DomainCLIPModel, captions: list[str], seed: int = 0):
        self.model, self.captions, self.seed = model, captions, seed

    def score(self, images_uint8: torch.Tensor, prompts: list[str]) -> dict:
        rp = r_precision(self.model, images_uint8, prompts, self.captions, r=R_CANDIDATES, seed=self.seed)
        return {"scorer": "domain-clip", "full_match": rp["r_precision"], **rp,
                "clip_score": domain_clip_score(self.model, images_uint8, prompts), "num_images": len(prompts)}

    def describe(self) -> dict:
        return self.model.describe()


def prompt_scorer(data: DataConfig, progress: bool = True) -> PromptScorer:
    """The scorer for ``data`` (trained once per machine and cached)."""
    kind, _ = parse_source(data.name)
    if kind == "shapes":
        # The classifier itself trains on fresh scenes without any holdout (attributes._train_config), so the
        # data's holdout only decides which prompts count as held-out.
        return AttributeScorer(load_or_train_attribute_classifier(shapes_config(data), progress=progress),
                               data.holdout, data.holdout_relations)
    if kind == "fashion-mnist":
        return ClassScorer(load_or_train_class_classifier(data, progress=progress))
    train, heldout = make_dataset(data, "train", progress=progress), make_dataset(data, "eval", progress=progress)
    return ClipScorer(load_or_train_domain_clip(train, heldout, progress=progress), heldout.captions())
