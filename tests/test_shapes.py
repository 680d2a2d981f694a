"""The built-in procedural `shapes` data: determinism, splits, holdout, captions, geometry."""

from __future__ import annotations

import pytest
import torch

from flopmatch.data.shapes import (
    COLORS, POSITIONS, RELATIONS, SHAPES, SIZES, ShapesConfig, ShapesDataset, make_scene, parse_caption, render,
)
from flopmatch.errors import UserError

CFG = ShapesConfig(seed=0, num_train=300, num_eval=100)


def test_vocabulary_is_large_enough():
    """At least 6 colours and 4 shapes, two sizes, several positions and four relations."""
    assert len(COLORS) >= 6 and len(SHAPES) >= 4 and len(SIZES) == 2 and len(POSITIONS) >= 3 and len(RELATIONS) == 4


def test_scene_is_a_pure_function_of_seed_split_index():
    """Same (cfg, split, index) gives the same caption and pixels; another seed gives other scenes."""
    for i in range(20):
        a, b = make_scene(CFG, "train", i), make_scene(CFG, "train", i)
        assert a == b and torch.equal(render(a), render(b))
    other = ShapesConfig(seed=1, num_train=300, num_eval=100)
    assert [make_scene(CFG, "train", i).caption for i in range(20)] != [make_scene(other, "train", i).caption for i in range(20)]


def test_train_and_eval_splits_differ():
    """The evaluation split is a different stream from the training split."""
    train = [make_scene(CFG, "train", i).caption for i in range(50)]
    evals = [make_scene(CFG, "eval", i).caption for i in range(50)]
    assert train != evals


def test_holdout_combos_never_in_train_but_in_eval():
    """Held-out colour+shape combos are absent from training scenes and present in evaluation scenes."""
    cfg = ShapesConfig(seed=0, num_train=400, num_eval=400, holdout=("red triangle",))
    has = lambda s: any(o.color == "red" and o.shape == "triangle" for o in s.objects)  # noqa: E731
    assert not any(has(make_scene(cfg, "train", i)) for i in range(400))
    assert any(has(make_scene(cfg, "eval", i)) for i in range(400))


def test_bad_holdout_and_split_are_user_errors():
    """Malformed holdout entries and unknown splits raise UserError."""
    with pytest.raises(UserError):
        ShapesConfig(holdout=("red",))
    with pytest.raises(UserError):
        ShapesDataset(CFG, "test")


def test_caption_parses_back_to_ground_truth():
    """parse_caption inverts every caption template: same count, objects, axis, position and relation."""
    for split in ("train", "eval"):
        for i in range(300):
            scene = make_scene(CFG, split, i)
            truth, parsed = scene.attrs(), parse_caption(scene.caption)
            for key in ("count", "objects", "axis", "position", "relation"):
                assert parsed[key] == truth[key], (scene.caption, key)
            assert len(scene.caption.split()) <= 16


def test_relation_is_geometrically_true_and_objects_do_not_overlap():
    """For pairs, object centres satisfy the stated relation and the object masks do not intersect."""
    checked = 0
    for i in range(200):
        scene = make_scene(CFG, "train", i)
        if len(scene.objects) != 2:
            continue
        a, b = scene.objects
        rel = scene.relation
        assert {"to the left of": a.cx < b.cx, "to the right of": a.cx > b.cx,
                "above": a.cy < b.cy, "below": a.cy > b.cy}[rel], scene.caption
        # render each object alone on the same background: their foreground masks must be disjoint
        masks = []
        bg = render(scene.__class__((), None, None, scene.background, "", scene.image_size)).int()
        for o in (a, b):
            solo = scene.__class__((o,), None, "center", scene.background, "", scene.image_size)
            masks.append((render(solo).int() - bg).abs().sum(0) > 30)
        assert not (masks[0] & masks[1]).any(), scene.caption
        checked += 1
    assert checked > 50


def test_dataset_items_and_images():
    """Items are float images in [-1, 1] of shape (3, 32, 32) with captions; images_uint8 matches them."""
    ds = ShapesDataset(CFG, "eval")
    assert len(ds) == CFG.num_eval
    item = ds[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].min() >= -1 and item["image"].max() <= 1
    images = ds.images_uint8()
    assert images.dtype == torch.uint8 and images.shape == (CFG.num_eval, 3, 32, 32)
    assert torch.allclose(images[3].float() / 127.5 - 1, item["image"], atol=1e-6)
    assert ds.captions()[3] == item["caption"]


def test_fingerprint_tracks_config():
    """The data fingerprint changes with any config field and with the split."""
    assert CFG.fingerprint() != ShapesConfig(seed=0, num_train=301, num_eval=100).fingerprint()
    assert ShapesDataset(CFG, "train").fingerprint() != ShapesDataset(CFG, "eval").fingerprint()
