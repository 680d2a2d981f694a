"""Tests for the procedural shapes dataset: determinism, holdout, captions, geometry, rendering, caching."""

import dataclasses
import random
import re

import numpy as np
import pytest
import torch
from scipy import ndimage

from flopmatch.data import shapes
from flopmatch.data.shapes import (
    COLORS,
    ONE_OBJECT_TEMPLATES,
    POSITION_CENTRES,
    SHAPES,
    SIZES,
    TWO_OBJECT_TEMPLATES,
    ShapesConfig,
    ShapesDataset,
    caption_for,
    make_scene,
    parse_caption,
    render,
)
from flopmatch.errors import UserError
from flopmatch.study.presets import HOLDOUT_COMBOS, HOLDOUT_RELATIONS

CFG = ShapesConfig(num_train=400, num_eval=300)


def _scenes(cfg=CFG, split="train", n=300):
    return [make_scene(cfg, split, i) for i in range(n)]


def _mask(scene, obj):
    """Boolean (H, W) mask of pixels that obj alone changes from the background."""
    alone = render(dataclasses.replace(scene, objects=(obj,)))
    empty = render(dataclasses.replace(scene, objects=()))
    return (alone != empty).any(0).numpy()


def _centroid(mask):
    ys, xs = np.nonzero(mask)
    return xs.mean() + 0.5, ys.mean() + 0.5  # pixel i covers [i, i+1)


def _strip_background(attrs):
    return {k: v for k, v in attrs.items() if k != "background"}


def test_scene_and_image_deterministic():
    """Same (cfg, split, index) gives the identical scene, caption and image, also across dataset instances."""
    a, b = ShapesDataset(CFG, "train", disk_cache=False), ShapesDataset(CFG, "train", disk_cache=False)
    for i in (0, 7, 123):
        assert make_scene(CFG, "train", i) == make_scene(CFG, "train", i)
        assert a[i]["caption"] == b[i]["caption"]
        assert torch.equal(a[i]["image"], b[i]["image"])


def test_seeds_and_splits_differ():
    """Different seeds, and train vs eval, give different scene streams."""
    base = [s.caption for s in _scenes(n=50)]
    other_seed = [s.caption for s in _scenes(dataclasses.replace(CFG, seed=1), n=50)]
    eval_split = [s.caption for s in _scenes(split="eval", n=50)]
    assert sum(x != y for x, y in zip(base, other_seed)) > 40
    assert sum(x != y for x, y in zip(base, eval_split)) > 40


def test_holdout_absent_from_train_present_in_eval():
    """Held-out colour+shape combos never appear in train scenes but do appear in eval scenes."""
    held = ("red triangle", "blue circle")
    cfg = dataclasses.replace(CFG, holdout=held)
    train = _scenes(cfg, "train", 1500)
    assert not any(f"{o.color} {o.shape}" in held for s in train for o in s.objects)
    evals = _scenes(cfg, "eval", 1500)
    seen = {f"{o.color} {o.shape}" for s in evals for o in s.objects}
    assert set(held) <= seen


def test_holdout_keeps_unaffected_scenes():
    """A train scene without a held-out combo is the same scene with or without the holdout (pure resampling)."""
    cfg = dataclasses.replace(CFG, holdout=("red triangle",))
    for i, plain in enumerate(_scenes(n=200)):
        if not any(o.color == "red" and o.shape == "triangle" for o in plain.objects):
            assert make_scene(cfg, "train", i) == plain


def test_relation_holdout_absent_from_train_present_in_eval():
    """Held-out arrangements never appear in train scenes (in either wording of their captions) but do in eval
    scenes; train scenes without one are unchanged, and the fingerprint of a config without them is too."""
    cfg = dataclasses.replace(CFG, holdout_relations=HOLDOUT_RELATIONS)
    held = {shapes.relation_key(e) for e in HOLDOUT_RELATIONS}
    assert shapes.relation_key("square below circle") == shapes.relation_key("circle above square") in held

    def arrangement(attrs):
        return (attrs["axis"], attrs["objects"][0]["shape"], attrs["objects"][1]["shape"]) if attrs["count"] == 2 else None

    train = _scenes(cfg, "train", 1500)
    assert not any(arrangement(parse_caption(s.caption)) in held for s in train)
    assert {arrangement(s.attrs()) for s in _scenes(cfg, "eval", 1500)} >= held
    for i, plain in enumerate(_scenes(n=200)):
        if arrangement(plain.attrs()) not in held:
            assert train[i] == plain
    assert ShapesConfig().fingerprint() != ShapesConfig(holdout_relations=("circle above square",)).fingerprint()


def test_preset_holdout_is_balanced():
    """Every held-out colour and shape of the presets' set is still seen in other combos (so it can be composed)."""
    colours, kinds = zip(*(c.split() for c in HOLDOUT_COMBOS))
    assert len(set(colours)) == len(set(kinds)) == len(HOLDOUT_COMBOS) == len(SHAPES)
    assert 0.1 <= len(HOLDOUT_COMBOS) / (len(COLORS) * len(SHAPES)) <= 0.15
    keys = [shapes.relation_key(e) for e in HOLDOUT_RELATIONS]
    assert sorted(k[1] for k in keys) == sorted(k[2] for k in keys) == sorted(SHAPES)  # each shape once first, once second


def test_bad_config_and_split_rejected():
    """Unknown holdout combos, bad splits and out-of-range probabilities raise UserError."""
    with pytest.raises(UserError):
        ShapesConfig(holdout=("pink hexagon",))
    with pytest.raises(UserError):
        ShapesConfig(two_object_prob=1.5)
    with pytest.raises(UserError, match="holdout_relations"):
        ShapesConfig(holdout_relations=("circle beside square",))
    with pytest.raises(UserError):
        ShapesDataset(CFG, "test")
    with pytest.raises(UserError):
        make_scene(CFG, "valid", 0)


def test_parse_caption_inverts_dataset_captions():
    """parse_caption(scene.caption) recovers scene.attrs() (all but background) for hundreds of scenes."""
    for s in _scenes(n=300) + _scenes(split="eval", n=100):
        assert parse_caption(s.caption) == _strip_background(s.attrs()), s.caption


@pytest.mark.parametrize("template", range(len(TWO_OBJECT_TEMPLATES)))
def test_parse_caption_inverts_every_template(template):
    """Every template with random synonyms parses back to the scene's attributes."""
    assert len(ONE_OBJECT_TEMPLATES) == len(TWO_OBJECT_TEMPLATES)
    rng = random.Random(template)
    for s in _scenes(n=200):
        cap = caption_for(s.objects, s.relation, s.position, template=template, rng=rng)
        assert parse_caption(cap) == _strip_background(s.attrs()), cap


def test_caption_words_name_exactly_the_attributes():
    """Each caption contains a synonym of every object attribute and of the position/relation, and no other colour."""
    for s in _scenes(n=300):
        cap = f" {re.sub(r'[^a-z ]', ' ', s.caption)} "
        words = set(cap.split())
        for o in s.objects:
            assert words & set(shapes.COLOR_WORDS[o.color]), cap
            assert words & set(shapes.SHAPE_WORDS[o.shape]), cap
            assert words & set(shapes.SIZE_WORDS[o.size]), cap
        named = {c for c, ws in shapes.COLOR_WORDS.items() if words & set(ws)}
        assert named == {o.color for o in s.objects}, cap
        if s.relation is None:
            assert any(f" {p} " in f" {' '.join(cap.split())} " for p in shapes.POSITION_WORDS[s.position]), cap
        else:
            assert any(f" {p} " in f" {' '.join(cap.split())} " for p in shapes.RELATION_WORDS[s.relation]), cap
        assert len(s.caption.split()) <= 16


def test_canonical_words_caption():
    """Without rng, caption_for uses template 0 and canonical words."""
    s = make_scene(CFG, "train", 1)
    obj = shapes.Obj("red", "triangle", "small", 10, 16)
    assert caption_for([obj], None, "left") == "a small red triangle on the left"
    assert caption_for([obj, dataclasses.replace(obj, color="blue", shape="circle", size="large")],
                       "above") == "a small red triangle above a large blue circle"
    assert parse_caption(caption_for(s.objects, s.relation, s.position)) == _strip_background(s.attrs())


def test_parse_caption_partial_prompts():
    """User prompts that omit attributes parse with None; prompts naming nothing raise UserError."""
    p = parse_caption("A red circle.")
    assert p["count"] == 1 and p["objects"] == [{"color": "red", "shape": "circle", "size": None}]
    assert p["position"] is None
    p = parse_caption("big blue square below a triangle")
    assert p["relation"] == "below" and p["axis"] == "vertical"
    assert p["objects"][0] == {"color": None, "shape": "triangle", "size": None}  # canonical: top first
    with pytest.raises(UserError):
        parse_caption("a photo of a dog")


def test_two_object_relation_holds_and_no_overlap():
    """In rendered two-object scenes the relation holds between mask centroids, clearly, and masks are disjoint."""
    two = [s for s in _scenes(n=300) if len(s.objects) == 2]
    assert len(two) > 100
    for s in two:
        m0, m1 = (_mask(s, o) for o in s.objects)
        assert not (m0 & m1).any(), s.caption
        # the objects are visibly separate: two connected components of non-background pixels
        fg = (render(s) != render(dataclasses.replace(s, objects=()))).any(0).numpy()
        assert ndimage.label(fg)[1] == 2, s.caption
        (x0, y0), (x1, y1) = _centroid(m0), _centroid(m1)
        along, across = {"to the left of": (x1 - x0, y1 - y0), "to the right of": (x0 - x1, y0 - y1),
                         "above": (y1 - y0, x1 - x0), "below": (y0 - y1, x0 - x1)}[s.relation]
        assert along > 2 * abs(across), (s.caption, along, across)
        a = s.attrs()
        assert a["axis"] == ("horizontal" if "left" in s.relation or "right" in s.relation else "vertical")
        assert s.objects[0].names() != s.objects[1].names(), s.caption


def test_lone_object_position_colour_size():
    """A lone object's centroid is nearest its position's centre; its centre pixel has its exact colour; sizes differ."""
    extents = {"small": [], "large": []}
    lone = [s for s in _scenes(n=300) if len(s.objects) == 1]
    assert len(lone) > 100
    for s in lone:
        (o,) = s.objects
        m = _mask(s, o)
        cx, cy = _centroid(m)
        dists = {p: np.hypot(cx - fx * 32, cy - fy * 32) for p, (fx, fy) in POSITION_CENTRES.items()}
        assert min(dists, key=dists.get) == s.position and dists[s.position] < 3.5, (s.caption, cx, cy)
        img = render(s)
        assert tuple(img[:, int(o.cy), int(o.cx)].tolist()) == COLORS[o.color], s.caption
        ys, xs = np.nonzero(m)
        extents[o.size].append(max(xs.max() - xs.min(), ys.max() - ys.min()) + 1)
    assert max(extents["small"]) <= 9 and min(extents["large"]) >= 13
    assert set(s.objects[0].shape for s in lone) == set(SHAPES) and SIZES == ("small", "large")


def test_dataset_items_shapes_and_ranges():
    """Items are float (3, H, W) images in [-1, 1] with caption and attrs; lengths follow the config."""
    ds = ShapesDataset(CFG, "eval", disk_cache=False)
    assert len(ds) == 300 and len(ShapesDataset(CFG, "train", disk_cache=False)) == 400
    item = ds[5]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 32, 32)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["caption"] == ds.scene(5).caption and item["attrs"] == ds.scene(5).attrs()
    assert len(ds.captions()) == 300
    with pytest.raises(IndexError):
        ds[300]
    big = render(ds.scene(0), 64)
    assert big.dtype == torch.uint8 and big.shape == (3, 64, 64)


def test_images_uint8_matches_items_and_disk_cache(tmp_path, monkeypatch):
    """images_uint8 equals per-item rendering, is written to the cache and read back; a corrupt file is rebuilt."""
    monkeypatch.setenv("FLOPMATCH_CACHE", str(tmp_path))
    cfg = ShapesConfig(num_train=50, num_eval=20)
    ds = ShapesDataset(cfg, "train")
    imgs = ds.images_uint8()
    assert imgs.dtype == torch.uint8 and imgs.shape == (50, 3, 32, 32)
    assert torch.equal(imgs[17], render(ds.scene(17)))
    assert torch.equal(ds[3]["image"], imgs[3].float() / 127.5 - 1)
    path = tmp_path / "shapes" / f"{ds.fingerprint()}.safetensors"
    assert path.exists()
    assert torch.equal(ShapesDataset(cfg, "train").images_uint8(), imgs)
    path.write_bytes(b"garbage")
    assert torch.equal(ShapesDataset(cfg, "train").images_uint8(), imgs)


def test_fingerprint_covers_every_field_and_split():
    """Changing any config field or the split changes the fingerprint; equal configs agree."""
    base = ShapesConfig()
    changed = [dict(seed=1), dict(image_size=64), dict(num_train=10), dict(num_eval=10),
               dict(two_object_prob=0.3), dict(holdout=("red triangle",))]
    prints = {base.fingerprint()} | {dataclasses.replace(base, **c).fingerprint() for c in changed}
    assert len(prints) == len(changed) + 1
    assert ShapesConfig().fingerprint() == base.fingerprint()
    assert ShapesDataset(base, "train").fingerprint() != ShapesDataset(base, "eval").fingerprint()


def test_images_rendered_once_then_served_from_memory_and_disk(tmp_path, monkeypatch):
    """Each image is rendered once: repeat calls reuse the in-memory tensor, a new dataset reads the disk cache."""
    monkeypatch.setenv("FLOPMATCH_CACHE", str(tmp_path))
    cfg = ShapesConfig(num_train=40, num_eval=10)
    real, calls = shapes._render_hwc, []
    monkeypatch.setattr(shapes, "_render_hwc", lambda *a: calls.append(a) or real(*a))
    ds = ShapesDataset(cfg, "train")
    imgs = ds.images_uint8()
    assert len(calls) == 40  # one render per image, on the first call
    assert ds.images_uint8() is imgs and torch.equal(ds[5]["image"], imgs[5].float() / 127.5 - 1)
    assert len(calls) == 40  # the second call and item access render nothing

    def no_render(*args):
        raise AssertionError("re-rendered an image that was cached")

    monkeypatch.setattr(shapes, "_render_hwc", no_render)
    again = ShapesDataset(cfg, "train").images_uint8()  # fresh instance: nothing in memory, file on disk
    assert again is not imgs and torch.equal(again, imgs)
    with pytest.raises(AssertionError, match="re-rendered"):  # control: without the disk cache it must render
        ShapesDataset(cfg, "train", disk_cache=False).images_uint8()


def test_study_tokenizers_never_see_held_out_scenes():
    """A study's learned tokenizers train on its runs' training split, held-out combos and arrangements excluded."""
    from flopmatch.data.datasets import make_dataset
    from flopmatch.study.plan import autoencoder_config
    from flopmatch.study.presets import cpu

    for tokens in ("continuous", "discrete"):
        ae = autoencoder_config(cpu(), tokens)
        assert ae.holdout == list(HOLDOUT_COMBOS) and ae.holdout_relations == list(HOLDOUT_RELATIONS)
    data = ae.data_config(num_eval=10)
    data.num_train = 300
    ds = make_dataset(data, "train", progress=False)
    for i in range(len(ds)):
        assert not any(shapes.holdout_hits(make_scene(ds.cfg, "train", i).attrs(), HOLDOUT_COMBOS, HOLDOUT_RELATIONS))


def test_drawing_many_images_shows_progress_only_when_asked(capsys):
    """A split of >= 2000 images draws a progress bar on stderr unless ``progress=False`` (``data inspect --json``,
    whose stderr a script may read), and the images do not depend on it."""
    cfg = ShapesConfig(num_train=2000, num_eval=0)
    quiet = ShapesDataset(cfg, "train", disk_cache=False, progress=False).images_uint8()
    assert capsys.readouterr().err == ""
    shown = ShapesDataset(cfg, "train", disk_cache=False).images_uint8()
    assert "drawing 2000 shapes images" in capsys.readouterr().err
    assert torch.equal(quiet, shown)
