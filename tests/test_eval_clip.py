"""Domain CLIP (contrastive image-text model trained in-domain) and the local-CLIP path.

The domain CLIP is trained once (a few minutes on 2 cores, most of it encoding 20k captions with MiniLM)
into the default cache and reused by later runs.
"""

from __future__ import annotations

import pytest
import torch

from flopmatch.data.shapes import ShapesConfig, ShapesDataset
from flopmatch.errors import UserError
from flopmatch.evaluation import clipscore


@pytest.fixture(scope="session")
def splits():
    return ShapesDataset(ShapesConfig(), "train"), ShapesDataset(ShapesConfig(), "eval")


@pytest.fixture(scope="session")
def domain_clip(splits):
    return clipscore.load_or_train_domain_clip(*splits, progress=False)


@pytest.mark.slow
def test_retrieval_accuracy_is_stored_and_far_above_chance(domain_clip):
    """Held-out image->text retrieval among 500 real pairs: top-1 >= 50% (chance 0.2%), top-5 >= 90%."""
    r = domain_clip.info["retrieval"]
    assert r["num_pairs"] == clipscore.HELDOUT_PAIRS
    assert r["top1"] >= 0.5 and r["top5"] >= 0.9
    assert domain_clip.describe()["retrieval"] == r


@pytest.mark.slow
def test_true_captions_score_far_above_shuffled(domain_clip, splits):
    """Domain-CLIP score of real images with their captions is far above the same images with shuffled captions."""
    images, captions = splits[1].images_uint8()[:300], splits[1].captions()[:300]
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(0)).tolist()
    true = clipscore.domain_clip_score(domain_clip, images, captions)
    shuffled = clipscore.domain_clip_score(domain_clip, images, [captions[i] for i in perm])
    assert 0.0 <= shuffled < 0.5 * true <= 50.0


@pytest.mark.slow
def test_cached_model_is_reused_not_retrained(domain_clip, splits, monkeypatch):
    """A second load finds the cached weights (same checksum) and never calls the trainer."""
    def boom(*a, **k):
        raise AssertionError("retrained")

    monkeypatch.setattr(clipscore, "train_domain_clip", boom)
    again = clipscore.load_or_train_domain_clip(*splits, progress=False)
    assert again.checksum == domain_clip.checksum


def test_local_clip_rejects_a_directory_without_a_model(tmp_path):
    """LocalCLIP on a directory that is not a HF CLIP checkpoint is a UserError naming the directory."""
    with pytest.raises(UserError, match=str(tmp_path)):
        clipscore.LocalCLIP(tmp_path)
