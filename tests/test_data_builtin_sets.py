"""The built-in real sets: fashion-mnist (Debian IDX files) and emoji (Noto Color Emoji), and the class scorer.

Tests needing the Debian files or the ``emoji`` package skip, naming what to install. The pools are
built on small subsets (``limit`` / ``only``) so the file runs in seconds; full-set timings are in the
modules' docstrings.
"""

from __future__ import annotations

import re

import numpy as np
import PIL.features
import pytest
import torch

# flopmatch.data's source registry imports the emoji set, which needs the PyPI package `emoji` (a core
# dependency): without it nothing here imports, so the whole file skips.
emoji_pkg = pytest.importorskip("emoji", reason="flopmatch.data needs the PyPI package `emoji`")

from flopmatch.config import DataConfig, parse_source
from flopmatch.data import datasets, emoji_set, fashion_mnist
from flopmatch.data.datasets import ImageTextSet
from flopmatch.data.fashion_mnist import CLASSES, PHRASES, TEMPLATES, caption_class, fashion_mnist_pool, read_idx
from flopmatch.data.images import load_image
from flopmatch.errors import UserError

needs_fashion = pytest.mark.skipif(not all((fashion_mnist.DATA_DIR / f).is_file() for pair in fashion_mnist.FILES.values()
                                           for f in pair),
                                   reason="needs the Fashion-MNIST files: apt-get install dataset-fashion-mnist")
needs_font = pytest.mark.skipif(not emoji_set.FONT_PATH.is_file() or not PIL.features.check("raqm"),
                                reason="needs the emoji font and Pillow's text layout (raqm, with FriBiDi): "
                                       "apt-get install fonts-noto-color-emoji libfribidi0")
LIMIT = 300  # fashion-mnist items per split in the pool tests


def _fashion_cfg(size: int = 16) -> DataConfig:
    return DataConfig(name="fashion-mnist", image_size=size, num_train=200, num_eval=50)


# ----------------------------------------------------------------------------------------------
# fashion-mnist


def test_every_template_and_class_caption_parses_back_to_its_class():
    """caption_class inverts every template x class, and names one class or None."""
    for c, phrase in enumerate(PHRASES):
        for template in TEMPLATES:
            caption = template.format(phrase)
            assert caption_class(caption) == c, caption
            assert caption_class(caption.upper()) == c
    assert len(TEMPLATES) >= 5 and len(CLASSES) == len(PHRASES) == 10
    assert caption_class("a photo of a T-Shirt") == 0 and caption_class("two shirts") == 6  # "shirt" inside "t-shirt" is not a shirt
    assert caption_class("ankle boots on a shelf") == 9 and caption_class("a boot") == 9
    assert caption_class("a photo of a dog") is None
    assert caption_class("a shirt and a dress") is None  # two classes: no single answer


def test_registered_as_named_sources():
    """--data fashion-mnist / emoji parse as names and have a pool builder in the registry."""
    assert parse_source("fashion-mnist") == ("fashion-mnist", "") and parse_source("emoji") == ("emoji", "")
    assert datasets.REAL_SOURCES["fashion-mnist"] is fashion_mnist_pool
    assert datasets.REAL_SOURCES["emoji"] is emoji_set.emoji_pool


def test_missing_fashion_files_name_the_package(tmp_path, monkeypatch):
    """Without the Debian files: a one-line UserError naming the apt-get command."""
    monkeypatch.setattr(fashion_mnist, "DATA_DIR", tmp_path)
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist") as e:
        fashion_mnist_pool(_fashion_cfg(), progress=False)
    assert "\n" not in str(e.value)


@needs_fashion
def test_fashion_pool_splits_labels_and_cache(monkeypatch):
    """Train items come from train-*, eval from t10k-*, labels match the label files and survive the cache."""
    raw = {split: (read_idx(fashion_mnist.DATA_DIR / images), read_idx(fashion_mnist.DATA_DIR / labels))
           for split, (images, labels) in fashion_mnist.FILES.items()}
    assert raw["train"][0].shape == (60000, 28, 28) and raw["eval"][0].shape == (10000, 28, 28)
    assert raw["train"][1].shape == (60000,) and raw["eval"][1].shape == (10000,)
    cfg = _fashion_cfg()
    pool = fashion_mnist_pool(cfg, progress=False, limit=LIMIT)
    assert len(pool) == 2 * LIMIT and pool.labels is not None and pool.info["converted"] == {"grey": 2 * LIMIT}
    for i, (name, split, label, caption) in enumerate(zip(pool.names, pool.splits, pool.labels, pool.captions)):
        file_split, index = name.split("/")
        assert (file_split, split) in {("train", "train"), ("test", "eval")}
        images, labels = raw[split]
        assert label == labels[int(index)] and caption_class(caption) == label
        if i % 50 == 0:  # the pixels are this file's image, through the shared decoder
            assert np.array_equal(pool.images[i].permute(1, 2, 0).numpy(),
                                  load_image(fashion_mnist._pgm(images[int(index)]), cfg.image_size))
    used = {t for t in TEMPLATES for c in set(pool.captions) if c in {t.format(p) for p in PHRASES}}
    assert used == set(TEMPLATES)

    def no_decoding(limit=None):
        raise AssertionError("the second call must load the cache, not decode")

    monkeypatch.setattr(fashion_mnist, "fashion_mnist_items", no_decoding)
    again = fashion_mnist_pool(cfg, progress=False, limit=LIMIT)
    assert again.labels == pool.labels and again.names == pool.names and torch.equal(again.images, pool.images)
    for split, n in (("train", cfg.num_train), ("eval", cfg.num_eval)):
        ds = ImageTextSet(again, split, cfg.num_train, cfg.num_eval)
        assert len(ds) == n and all(caption_class(c) == y for c, y in zip(ds.captions(), ds.labels()))
        assert all(name.startswith("train/" if split == "train" else "test/") for name in ds.names)


# ----------------------------------------------------------------------------------------------
# emoji

SKIN_TONE_NAME = re.compile(r"_(light|medium-light|medium|medium-dark|dark)_skin_tone")


def test_variants_of_one_base_emoji_share_a_split():
    """Skin-tone and gender variants have one base group; no group is in both splits; ~10% of groups held out."""
    assert emoji_set.base_group("👍") == emoji_set.base_group("👍🏽")
    assert emoji_set.base_group("🕵️‍♀️") == emoji_set.base_group("🕵🏽‍♂️") == emoji_set.base_group("🕵️")
    assert emoji_set.base_group("👩🏾‍⚕️") == emoji_set.base_group("🧑‍⚕️") == emoji_set.base_group("👨‍⚕️")
    assert emoji_set.base_group("👩🏿‍❤️‍💋‍👨🏻") == emoji_set.base_group("💏")
    assert emoji_set.base_group("👍") != emoji_set.base_group("👎")
    everything = emoji_set.emoji_list()
    split_of_group: dict[str, set[str]] = {}
    for e in everything:
        split_of_group.setdefault(emoji_set.base_group(e), set()).add(emoji_set.split_of(e))
    assert all(len(s) == 1 for s in split_of_group.values())
    held_out = sum(s == {"eval"} for s in split_of_group.values()) / len(split_of_group)
    assert 0.06 < held_out < 0.14
    # By name: "X, <tone>" and "woman X"/"man X" land with "X" / "person X" wherever those exist.
    by_name = {emoji_pkg.EMOJI_DATA[e]["en"].strip(":"): e for e in everything}
    checked = 0
    for name, e in by_name.items():
        base = SKIN_TONE_NAME.sub("", name)
        for other in {base, re.sub(r"^(man|woman)_", "", base), re.sub(r"^(man|woman)_", "person_", base)} - {name}:
            if other in by_name:
                assert emoji_set.split_of(by_name[other]) == emoji_set.split_of(e), (name, other)
                checked += 1
    assert checked > 1500


def test_captions_come_from_the_names():
    """Captions use the CLDR name as words in one of the templates, deterministic per emoji."""
    assert emoji_set.readable_name("🕵️‍♀️") == "woman detective"
    assert emoji_set.readable_name("🇯🇵") == "flag of Japan"
    assert emoji_set.readable_name("👱🏿‍♂️") == "man blond hair, dark skin tone"
    captions = {emoji_set.make_caption(e) for e in emoji_set.emoji_list()[:300]}
    assert all(c.strip() for c in captions)
    assert "thumbs up" in emoji_set.make_caption("👍")
    assert emoji_set.make_caption("🕵️‍♀️") == emoji_set.make_caption("🕵️‍♀️")


def test_missing_font_names_the_package(tmp_path, monkeypatch):
    """Without the font: a one-line UserError naming the apt-get command."""
    monkeypatch.setattr(emoji_set, "FONT_PATH", tmp_path / "NotoColorEmoji.ttf")
    emoji_set.load_font.cache_clear()
    try:
        with pytest.raises(UserError, match="apt-get install fonts-noto-color-emoji"):
            emoji_set.emoji_pool(DataConfig(name="emoji", image_size=16), progress=False)
    finally:
        emoji_set.load_font.cache_clear()


@needs_font
def test_emoji_pool_renders_and_counts_what_the_font_lacks():
    """A subset renders to non-blank images with captions and given splits; emoji the font lacks are counted."""
    everything = emoji_set.emoji_list()
    train = [e for e in everything if emoji_set.split_of(e) == "train"][:20:2]
    held_out = [e for e in everything if emoji_set.split_of(e) == "eval"][:10:2]
    blank = "\U0001FAE9"  # face with bags under eyes (Emoji 16): newer than the font
    pieces = "\U0001F9D1\u200d\U0001FA70"  # ballet dancer (Emoji 17): drawn as person + ballet shoes
    subset = ["👍", "👍🏽", "🕵️‍♀️", "🇯🇵", "#️⃣", *train, *held_out, blank, pieces]
    pool = emoji_set.emoji_pool(DataConfig(name="emoji", image_size=24), progress=False, only=subset)
    assert len(pool) == len(set(subset)) - 2
    assert pool.info["skipped"] == {"not in font": 1, "not in font (drawn as pieces)": 1}
    assert pool.labels is None and set(pool.splits) == {"train", "eval"}
    assert all(c.strip() for c in pool.captions)
    for image in pool.images:  # (3, S, S) uint8: a glyph on a flat background, not the background alone
        pixels = image.reshape(3, -1).T.float()
        assert (pixels - pixels[0]).abs().sum(1).gt(30).float().mean() > 0.02
    thumbs = [pool.splits[pool.names.index(emoji_set.item_name(e))] for e in ("👍", "👍🏽")]
    assert thumbs[0] == thumbs[1]


# ----------------------------------------------------------------------------------------------
# The class classifier


@needs_fashion
def test_class_classifier_beats_chance_and_scores_prompts(monkeypatch):
    """A briefly trained classifier is far above chance on held-out real images; prompt scoring on real
    test images with their own captions equals its accuracy, and with wrong classes drops to near zero."""
    from flopmatch.evaluation import classes

    cfg = DataConfig(name="fashion-mnist", image_size=32)
    pool = fashion_mnist_pool(cfg, progress=False, limit=4000)
    train, test = ImageTextSet(pool, "train", 4000, 1000), ImageTextSet(pool, "eval", 4000, 1000)
    net, info = classes.train_class_classifier(train.images_uint8(), train.labels(), 32, steps=150, progress=False)
    clf = classes.ClassClassifier(net, "", info, None)
    acc = classes.accuracy(clf, test.images_uint8(), test.labels())
    assert acc > 0.6, acc  # chance is 0.1
    scores = classes.score_class_prompts(clf, test.images_uint8(), test.captions())
    assert scores["class_accuracy"] == pytest.approx(acc) and scores["num_unparsed"] == 0
    wrong = [PHRASES[(y + 1) % len(PHRASES)] for y in test.labels()]
    assert classes.score_class_prompts(clf, test.images_uint8(), wrong)["class_accuracy"] < 0.2

    # The cache: trained once, then loaded with the same checksum (a small pool and step count keep it fast).
    monkeypatch.setattr(classes, "fashion_mnist_pool", lambda data, arg, progress: fashion_mnist_pool(data, arg, progress,
                                                                                                         limit=500))
    first = classes.load_or_train_class_classifier(cfg, progress=False, steps=20)
    second = classes.load_or_train_class_classifier(cfg, progress=False, steps=20)
    assert second.checksum == first.checksum and second.describe() == first.describe()
    described = first.describe()
    assert described["name"] == "fashion-mnist-class-classifier" and 0.0 <= described["test_accuracy"] <= 1.0
    assert described["num_test"] == 500 and len(described["sha256"]) == 64
