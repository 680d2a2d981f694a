"""Domain CLIP (contrastive image-text model trained in-domain) and the local-CLIP path.

The domain CLIP is trained once (a few minutes on 2 cores, most of it encoding 20k captions with MiniLM)
into the persistent cache and reused by later runs on the same machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from flopmatch.data.shapes import ShapesConfig, ShapesDataset
from flopmatch.errors import UserError
from flopmatch.evaluation import clipscore

# Trained evaluators are expensive (minutes) and keyed by data fingerprint + code version with a sha256,
# so they are loaded from the persistent cache (FLOPMATCH_CACHE as set before conftest isolates each test
# session in a temporary cache, else ~/.cache/flopmatch): CI trains them once per machine, not per run.
PERSISTENT_CACHE = os.environ.get("FLOPMATCH_CACHE") or str(Path.home() / ".cache" / "flopmatch")


def _in_persistent_cache(load):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOPMATCH_CACHE", PERSISTENT_CACHE)
        return load()


@pytest.fixture(scope="session")
def splits():
    return ShapesDataset(ShapesConfig(), "train"), ShapesDataset(ShapesConfig(), "eval")


@pytest.fixture(scope="session")
def domain_clip(splits):
    return _in_persistent_cache(lambda: clipscore.load_or_train_domain_clip(*splits, progress=False))


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
    again = _in_persistent_cache(lambda: clipscore.load_or_train_domain_clip(*splits, progress=False))
    assert again.checksum == domain_clip.checksum


def test_local_clip_rejects_a_directory_without_a_model(tmp_path):
    """LocalCLIP on a directory that is not a HF CLIP checkpoint is a UserError naming the directory."""
    with pytest.raises(UserError, match=str(tmp_path)):
        clipscore.LocalCLIP(tmp_path)


def _tiny_clip_dir(path: Path) -> Path:
    """A randomly initialised, tiny Hugging Face CLIP (byte-level vocabulary, no merges) saved to ``path``."""
    import json

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    n = len(vocab)
    text = dict(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    return path


def test_local_clip_scores_pairs_independently_of_batching(tmp_path):
    """LocalCLIP: score in [0, 100] is mean 100*max(cos, 0); a pair scores the same alone or batched."""
    clip = clipscore.LocalCLIP(_tiny_clip_dir(tmp_path))
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    captions = ["a red circle", "a big blue square at the top", "x", "a green cross left of a cyan disk", "a disk"]
    batched = clip.similarity(images, captions, batch_size=5)
    alone = torch.cat([clip.similarity(images[i : i + 1], captions[i : i + 1]) for i in range(5)])
    assert torch.allclose(batched, alone, atol=1e-5)
    assert clip.score(images, captions) == pytest.approx(float((100 * batched.clamp_min(0)).mean()), rel=1e-5)
    assert 0.0 <= clip.score(images, captions) <= 100.0


@pytest.mark.slow
def test_r_precision_is_high_for_true_pairs_and_at_chance_for_shuffled(domain_clip, splits):
    """R-precision (R = 100) of real held-out images: their own captions rank first far above chance; with
    shuffled captions the hit rate is at chance, 1/R, within a binomial bound (calibration on known truth)."""
    images, captions = splits[1].images_uint8()[:400], splits[1].captions()[:400]
    pool = splits[1].captions()
    true = clipscore.r_precision(domain_clip, images, captions, pool, r=100)
    assert true["r"] == 100 and true["chance"] == 0.01
    assert true["r_precision"] >= 0.3
    perm = torch.randperm(400, generator=torch.Generator().manual_seed(1)).tolist()
    shuffled = clipscore.r_precision(domain_clip, images, [captions[i] for i in perm], pool, r=100)
    # Binomial(400, 0.01): mean 4 hits, P(>= 13 hits) < 1e-3. Paraphrases of an image's own scene can
    # still rank first, so the bound allows a little more than pure chance.
    assert shuffled["r_precision"] * 400 < 13


def test_retrieval_chance_counts_repeated_captions(monkeypatch):
    """Top-1 chance of image->text retrieval is sum_i k(c_i)/N^2: 1/N for distinct captions, higher with repeats."""

    class Fixed:  # embeds image i and caption "c<j>" as one-hot vectors: retrieval is exact
        def __init__(self):
            self.model = self

        def eval(self):
            return self

        def embed_images(self, images):
            return torch.nn.functional.one_hot(images[:, 0, 0, 0].long(), 4).float()

        def embed_text(self, pooled):
            return pooled

        def text_encoder(self):
            return None

    captions = ["c0", "c0", "c1", "c2"]
    images = torch.tensor([0, 0, 1, 2], dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    monkeypatch.setattr(clipscore, "_encode_pooled", lambda caps, enc=None: torch.nn.functional.one_hot(
        torch.tensor([int(c[1]) for c in caps]), 4).float())
    r = clipscore.retrieval_accuracy(Fixed(), images, captions)
    assert r["top1"] == 1.0 and r["chance_top1"] == (2 + 2 + 1 + 1) / 16
