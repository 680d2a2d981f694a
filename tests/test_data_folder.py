"""``--data folder:PATH``: an image folder with metadata.jsonl/csv, decoded once into a cached pool.

Every fixture is built here with Pillow (a few small PNG/JPEG images of different sizes and aspect
ratios), so the tests need no data set. Each test has its own FLOPMATCH_CACHE. Odd
metadata (non-text captions, undecodable or NUL file names, symlink loops, EXIF rotation) has its own
tests. The one end-to-end test (train, then evaluate, on a folder) is marked slow.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flopmatch.data.pool as pool_mod
from flopmatch import cli, dist
from flopmatch.cli.args import data_source
from flopmatch.config import DataConfig, parse_source, to_dict
from flopmatch.data.datasets import ImageTextSet, make_dataset, more_eval_images
from flopmatch.data.folder import folder_items
from flopmatch.data.images import BadImage, load_image
from flopmatch.data.inspect import format_summary, summarize
from flopmatch.data.pool import MAX_EVAL_FRACTION, Pool, split_indices
from flopmatch.errors import UserError
from tiny import color

# Sizes with different aspect ratios (wide, tall, square, smaller and larger than the training side).
SIZES = [(40, 40), (64, 24), (20, 50), (90, 60), (12, 12), (33, 71)]
RED, GREEN, BLUE, WHITE = (220, 20, 20), (20, 200, 40), (30, 40, 210), (255, 255, 255)


pytestmark = pytest.mark.usefixtures("own_cache")  # tests/conftest.py: a fresh cache per test


# ----------------------------------------------------------------------------------------- helpers


def write_image(path: Path, size=(40, 30), fill=RED, mode: str = "RGB", fmt: str | None = None) -> Path:
    """A solid image (``fill`` in ``mode``) saved at ``path`` (format from the suffix unless ``fmt``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, fill).save(path, format=fmt)
    return path


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def write_jsonl(directory: Path, rows) -> Path:
    """metadata.jsonl from (file_name, text) pairs (text None: the key is written as null)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "metadata.jsonl"
    path.write_text("".join(json.dumps({"file_name": f, "text": t}) + "\n" for f, t in rows))
    return path


def write_csv(directory: Path, rows, header=("file_name", "text")) -> Path:
    """metadata.csv written by the csv module (captions with commas or quotes come out quoted)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "metadata.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for f_name, text in rows:
            row = {"file_name": f_name, "text": text}
            w.writerow([row.get(h, "x") for h in header])
    return path


def make_folder(root: Path, n: int, ext: str = "png", prefix: str = "img", caption: str = "picture {i}") -> list:
    """``n`` solid images of varied sizes under ``root`` and their (file_name, caption) rows; no metadata."""
    rows = []
    for i in range(n):
        name = f"{prefix}{i:03d}.{ext}"
        write_image(root / name, SIZES[i % len(SIZES)], color(i))
        rows.append((name, caption.format(i=i)))
    return rows


def data_cfg(root: Path, size: int = 32, num_train: int = 10_000, num_eval: int = 2000) -> DataConfig:
    return DataConfig(name=f"folder:{root}", image_size=size, num_train=num_train, num_eval=num_eval)


def dataset(root: Path, split: str = "train", **kw) -> ImageTextSet:
    return make_dataset(data_cfg(root, **kw), split, progress=False)


def everything(root: Path, size: int = 32) -> ImageTextSet:
    """Every usable item of a folder without a given split (num_eval=0: nothing held out)."""
    return dataset(root, "train", size=size, num_eval=0)


def by_name(ds: ImageTextSet) -> dict:
    """name -> (caption, uint8 image) of a split."""
    return {n: (c, img) for n, c, img in zip(ds.names, ds.captions(), ds.images_uint8())}


class CountingLoad:
    """Stands in for ``flopmatch.data.pool.load_image``: counts decodes, optionally fails on call ``fail_at``."""

    def __init__(self, fail_at: int | None = None, error: type[BaseException] = KeyboardInterrupt):
        self.calls, self.fail_at, self.error = 0, fail_at, error

    def __call__(self, data, size, tally=None):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise self.error("decoding must not happen here")
        return load_image(data, size, tally)


def pool_dirs(cache: Path) -> list[Path]:
    """Every entry under the cache's data/ directory (hidden temporary ones included)."""
    data = cache / "data"
    return sorted(data.iterdir()) if data.is_dir() else []


# ----------------------------------------------------------------------------------------- metadata


def test_jsonl_and_csv_give_the_same_items(tmp_path):
    """The same folder described by metadata.jsonl or by metadata.csv (quoted captions with commas, quotes
    and a newline, extra columns in another order) gives the same names, captions and pixels."""
    rows = make_folder(tmp_path / "j", 5)
    write_image(tmp_path / "j" / "sub" / "a.png", (30, 50), BLUE)
    rows += [("sub/a.png", 'a blue, tall "box", seen\nfrom the side')]
    rows[0] = (rows[0][0], "red, green, and blue")
    shutil.copytree(tmp_path / "j", tmp_path / "c", copy_function=shutil.copy2)
    write_jsonl(tmp_path / "j", rows)
    write_csv(tmp_path / "c", rows, header=("score", "text", "file_name"))  # columns found by name
    raw = (tmp_path / "c" / "metadata.csv").read_text()
    assert '"red, green, and blue"' in raw and '""box""' in raw  # the csv really quotes them

    j, c = everything(tmp_path / "j"), everything(tmp_path / "c")
    assert sorted(j.names) == sorted(f for f, _ in rows)
    assert j.names == c.names and j.captions() == c.captions()
    assert torch.equal(j.images_uint8(), c.images_uint8())
    captions = dict(zip(j.names, j.captions()))
    assert captions["sub/a.png"] == 'a blue, tall "box", seen from the side'  # newline -> one space
    assert captions[rows[0][0]] == "red, green, and blue"


def test_nested_folders_are_read(tmp_path):
    """file_name may name nested folders; items are named by their path relative to the folder."""
    write_image(tmp_path / "cats" / "001.png", (30, 30), RED)
    write_image(tmp_path / "cats" / "young" / "002.jpg", (50, 20), GREEN)
    write_image(tmp_path / "top.png", (20, 20), BLUE)
    write_jsonl(tmp_path, [("cats/001.png", "a red cat"), ("cats/young/002.jpg", "a green kitten"), ("top.png", "blue")])
    items, _ = folder_items(tmp_path)
    assert [i.name for i in items] == ["cats/001.png", "cats/young/002.jpg", "top.png"]
    got = by_name(everything(tmp_path))
    assert set(got) == {"cats/001.png", "cats/young/002.jpg", "top.png"}
    assert got["cats/young/002.jpg"][0] == "a green kitten"
    np.testing.assert_allclose(got["cats/001.png"][1][:, 16, 16].numpy(), RED, atol=2)


def write_sidecars(root: Path, rows) -> None:
    """Each (file_name, caption) row's caption as a .txt beside its image."""
    for name, caption in rows:
        (root / name).with_suffix(".txt").write_text(caption)


def test_txt_captions_beside_images_read_as_a_metadata_file_would(tmp_path):
    """The caption-file layout (a.png + a.txt, nested folders too) gives the same items, captions and pixels as the
    same folder with metadata.jsonl; an image without its .txt is skipped and counted under its own cause; a .txt
    without an image is no item; an edited caption file invalidates the cache."""
    rows = make_folder(tmp_path / "side", 5) + [("cats/k.png", "a nested kitten")]
    write_image(tmp_path / "side" / "cats" / "k.png", (20, 20), GREEN)
    write_sidecars(tmp_path / "side", rows)
    for name, _ in rows:
        write_image(tmp_path / "meta" / name, *((20, 20), GREEN) if name == "cats/k.png" else
                    (SIZES[int(name[3:6]) % len(SIZES)], color(int(name[3:6]))))
    write_jsonl(tmp_path / "meta", rows)
    write_image(tmp_path / "side" / "lonely.png", (20, 20), RED)  # no caption file
    (tmp_path / "side" / "orphan.txt").write_text("a caption without an image")
    side, meta = everything(tmp_path / "side"), everything(tmp_path / "meta")
    assert side.names == meta.names and side.captions() == meta.captions()
    assert sorted(zip(side.names, side.captions())) == sorted(rows)
    assert torch.equal(side.images_uint8(), meta.images_uint8())
    assert side.info["skipped"] == {"no .txt caption beside it": 1}
    (tmp_path / "side" / "cats" / "k.txt").write_text("an edited kitten")
    assert by_name(everything(tmp_path / "side"))["cats/k.png"][0] == "an edited kitten"


def test_txt_captions_in_train_and_test_folders_keep_the_split(tmp_path):
    """train/ and test/ captioned by .txt files split as with metadata files; beside a test/ folder, the root's own
    caption files train and never reach into test/."""
    write_sidecars(tmp_path / "a" / "train", make_folder(tmp_path / "a" / "train", 6, caption="train {i}"))
    write_sidecars(tmp_path / "a" / "test", make_folder(tmp_path / "a" / "test", 3, prefix="t", caption="test {i}"))
    items, _ = folder_items(tmp_path / "a")
    assert sorted((i.split, i.caption) for i in items) == sorted(
        [("train", f"train {i}".encode()) for i in range(6)] + [("eval", f"test {i}".encode()) for i in range(3)])
    write_sidecars(tmp_path / "b", make_folder(tmp_path / "b", 4, caption="root {i}"))
    write_jsonl(tmp_path / "b" / "test", make_folder(tmp_path / "b" / "test", 2, prefix="t", caption="held {i}"))
    items, _ = folder_items(tmp_path / "b")
    assert sorted((i.split, i.name) for i in items) == sorted(
        [("train", f"img{i:03d}.png") for i in range(4)] + [("eval", f"test/t{i:03d}.png") for i in range(2)])


def test_train_and_test_subfolders_give_the_split(tmp_path):
    """train/ and test/ with their own metadata: the folders' split ("test" -> eval), no image in both,
    even where both folders hold a file of the same name; num_eval still caps the eval split."""
    train_rows = make_folder(tmp_path / "train", 7, caption="train {i}")
    test_rows = make_folder(tmp_path / "test", 4, caption="test {i}")  # same file names as train's first four
    write_jsonl(tmp_path / "train", train_rows)
    write_csv(tmp_path / "test", test_rows)
    train, ev = dataset(tmp_path, "train"), dataset(tmp_path, "eval")
    assert sorted(train.names) == sorted(f"train/{f}" for f, _ in train_rows)
    assert sorted(ev.names) == sorted(f"test/{f}" for f, _ in test_rows)
    assert not set(train.names) & set(ev.names)
    assert all(c.startswith("train ") for c in train.captions()) and all(c.startswith("test ") for c in ev.captions())
    # The given split is kept as is: 4 of 11 is more than MAX_EVAL_FRACTION, which caps only the hash split.
    assert len(ev) == 4 > MAX_EVAL_FRACTION * 11
    assert train.info["split_rule"] == ev.info["split_rule"] == "given by the source"
    small = dataset(tmp_path, "eval", num_eval=2)
    assert len(small) == 2 and set(small.names) <= set(ev.names)
    assert len(dataset(tmp_path, "train", num_train=3)) == 3


def test_links_into_one_store_never_train_a_held_out_image_nor_leave_the_folder(tmp_path):
    """Symlinks into a shared image store are read, but a training link to a file that a test/ link also names is held
    out (the same image must not train and evaluate), and a name that leaves the folder through a linked directory
    (``linked/../x.png``) is refused like ``../x.png``."""
    store = tmp_path / "store"
    shared = make_folder(store, 6)
    write_image(tmp_path / "secret.png", (20, 20), BLUE)
    root = tmp_path / "links"
    (root / "test").mkdir(parents=True)
    for name, _ in shared:
        (root / name).symlink_to(store / name)
    (root / "test" / "held.png").symlink_to(store / shared[0][0])  # the first store image, held out under another name
    (root / "linked").symlink_to(store, target_is_directory=True)
    write_jsonl(root, shared + [("linked/../secret.png", "through a linked folder")])
    write_jsonl(root / "test", [("held.png", "held out")])
    train, ev = dataset(root, "train"), dataset(root, "eval")
    assert ev.names == ["test/held.png"]
    assert sorted(train.names) == sorted(f for f, _ in shared[1:])
    assert train.info["skipped"] == {"in the held-out test/ folder": 1, "outside the folder": 1}


def test_root_metadata_trains_beside_a_test_folder_and_unclear_layouts_are_refused(tmp_path):
    """A root metadata file with test/ beside it: the root's images train and test/'s evaluate (they used to be
    dropped, and test/'s split by hash into training). test/ alone, or a root file beside train/, is refused with
    one line naming the fix: no held-out image may train unnoticed."""
    rows = make_folder(tmp_path / "both", 6, caption="root {i}")
    write_jsonl(tmp_path / "both", rows)
    held = make_folder(tmp_path / "both" / "test", 3, prefix="held", caption="held out {i}")
    write_jsonl(tmp_path / "both" / "test", held)
    train, ev = dataset(tmp_path / "both", "train"), dataset(tmp_path / "both", "eval")
    assert sorted(train.names) == sorted(f for f, _ in rows) and sorted(ev.names) == sorted(f"test/{f}" for f, _ in held)
    assert train.info["split_rule"] == "given by the source"
    # the root's metadata naming test/'s images too: they stay held out, skipped from training and counted
    write_jsonl(tmp_path / "both", rows + [(f"test/{f}", c) for f, c in held])
    train = dataset(tmp_path / "both", "train")
    assert sorted(train.names) == sorted(f for f, _ in rows)
    assert train.info["skipped"] == {"in the held-out test/ folder": len(held)}
    write_jsonl(tmp_path / "alone" / "test", make_folder(tmp_path / "alone" / "test", 3))
    with pytest.raises(UserError, match=r"only a test/ split, held out for evaluation: add the training images"):
        dataset(tmp_path / "alone", "train")
    write_jsonl(tmp_path / "clash", make_folder(tmp_path / "clash", 3))
    write_jsonl(tmp_path / "clash" / "train", make_folder(tmp_path / "clash" / "train", 3))
    with pytest.raises(UserError, match=r"has both metadata.jsonl and train/ with metadata.jsonl"):
        dataset(tmp_path / "clash", "train")
    write_jsonl(tmp_path / "clash" / "test", make_folder(tmp_path / "clash" / "test", 3))
    with pytest.raises(UserError, match=r"metadata.jsonl beside train/ and test/, whose split is used"):
        dataset(tmp_path / "clash", "eval")


def test_advice_for_more_evaluation_images_follows_the_split_rule(tmp_path):
    """Raising data.num_eval cannot grow a hash split past MAX_EVAL_FRACTION, nor a given test/ split: the advice says
    what can (shapes, procedural, only needs data.num_eval)."""
    write_jsonl(tmp_path / "flat", make_folder(tmp_path / "flat", 20))
    hashed = more_eval_images(dataset(tmp_path / "flat", "eval"), 64)
    assert "at most 10% of the source's 20 images: add images or give a test/ folder of >= 64" in hashed
    assert more_eval_images(dataset(tmp_path / "flat", "eval", num_eval=1), 2) == "set data.num_eval >= 2"  # 10% is 2
    for part, n in (("train", 6), ("test", 3)):
        write_jsonl(tmp_path / "given" / part, make_folder(tmp_path / "given" / part, n))
    assert more_eval_images(dataset(tmp_path / "given", "eval"), 64).startswith("give the source's own evaluation split")
    shapes = make_dataset(DataConfig(num_train=4, num_eval=4), "eval", progress=False)
    assert more_eval_images(shapes, 64) == "set data.num_eval >= 64"


def test_images_smaller_than_the_side_are_counted_as_upscaled(tmp_path):
    """At 32 px, the folder's 20x50, 64x24 and 12x12 images have a side below 32 and are enlarged (blurred): counted in
    the pool's info (so data.json) and said by `data inspect`; at 16 px only the two 12x12 ones are."""
    rows = make_folder(tmp_path, 12)
    write_jsonl(tmp_path, rows)
    small = sum(min(SIZES[i % len(SIZES)]) < 32 for i in range(12))
    assert small == 6
    train, ev = dataset(tmp_path, "train", num_eval=1), dataset(tmp_path, "eval", num_eval=1)
    assert train.info["upscaled"] == small and dataset(tmp_path, "train", size=16).info["upscaled"] == 2
    lines = format_summary(summarize({"train": train, "eval": ev}))
    assert f"  upscaled: {small} images smaller than 32px were enlarged (blurred); a smaller data.image_size keeps them sharp" in lines


# ----------------------------------------------------------------------------------------- hash split


def fake_pool(names: list[str], splits: list[str] | None = None) -> Pool:
    """A Pool of the given item names (1x1 images): split_indices looks only at names and splits."""
    n = len(names)
    return Pool(torch.zeros(n, 3, 1, 1, dtype=torch.uint8), [f"c {x}" for x in names], list(names),
                splits or [""] * n, {}, "key")


def split_names(pool: Pool, num_eval: int, num_train: int = 10**9) -> tuple[list[str], list[str]]:
    ev = [pool.names[i] for i in split_indices(pool, "eval", num_train, num_eval)]
    tr = [pool.names[i] for i in split_indices(pool, "train", num_train, num_eval)]
    return ev, tr


@pytest.mark.parametrize("n", [0, 1, 9, 10, 11, 57, 200])
@pytest.mark.parametrize("num_eval", [0, 1, 3, 2000])
def test_hash_split_is_deterministic_disjoint_and_capped(n, num_eval):
    """Eval = min(num_eval, 10% of the items); train = the rest; the two never share an item; the same
    names in any listing order give the same splits (and the same train order)."""
    names = [f"photos/img_{i:04d}.jpg" for i in range(n)]
    ev, tr = split_names(fake_pool(names), num_eval)
    assert len(ev) == min(num_eval, int(n * MAX_EVAL_FRACTION)) <= MAX_EVAL_FRACTION * n
    assert not set(ev) & set(tr) and sorted(ev + tr) == sorted(names)
    assert split_names(fake_pool(names), num_eval) == (ev, tr)
    rng = np.random.default_rng(n + num_eval)
    for _ in range(3):
        shuffled = [names[i] for i in rng.permutation(n)]
        ev2, tr2 = split_names(fake_pool(shuffled), num_eval)
        assert sorted(ev2) == sorted(ev) and tr2 == tr


@pytest.mark.parametrize("num_eval", [1, 2, 3, 4, 5, 6])
def test_an_image_listed_with_several_captions_never_trains_and_evaluates(num_eval):
    """Rows naming one image (one per caption) sort together; wherever the eval cut falls inside them, the image's
    other rows are left out of training, never trained on while it is evaluated. Eval keeps num_eval rows."""
    names = [f"img_{i:02d}.png" for i in range(60) for _ in range(3)]  # 60 images, 3 captions each
    ev, tr = split_names(fake_pool(names), num_eval)
    assert len(ev) == num_eval and not set(ev) & set(tr)
    assert len(tr) == len(names) - num_eval - (-num_eval % 3)  # the rest of a cut image's rows: dropped


def test_hash_split_respects_num_train():
    names = [f"{i}.png" for i in range(100)]
    ev, tr = split_names(fake_pool(names), num_eval=5, num_train=20)
    assert len(ev) == 5 and len(tr) == 20 and not set(ev) & set(tr)


def test_adding_an_image_does_not_move_existing_items_between_splits():
    """With num_eval binding (well under 10%), adding an image never moves an old train item into eval and
    moves at most one old eval item out (when the new one hashes into the eval prefix); an image that
    lands in train moves nothing at all."""
    names = [f"dir/{i:03d}.png" for i in range(120)]
    ev, tr = split_names(fake_pool(names), num_eval=6)
    landed_in_train = 0
    for j in range(40):
        new = f"added/{j}.png"
        ev2, tr2 = split_names(fake_pool(names + [new]), num_eval=6)
        assert len(ev2) == 6
        assert not set(tr) & set(ev2), "an existing training image moved to eval"
        assert len(set(ev) - set(ev2)) <= (new in ev2)
        if new in tr2:
            landed_in_train += 1
            assert ev2 == ev and [x for x in tr2 if x != new] == tr
    assert landed_in_train >= 30  # most new names land in train (eval is 5% of the order)


def test_folder_split_does_not_depend_on_listing_order(tmp_path):
    """Two copies of a folder whose metadata lists the images in opposite orders split identically."""
    rows = make_folder(tmp_path / "a", 30)
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=shutil.copy2)
    write_jsonl(tmp_path / "a", rows)
    write_jsonl(tmp_path / "b", rows[::-1])
    for split in ("train", "eval"):
        a, b = dataset(tmp_path / "a", split, num_eval=3), dataset(tmp_path / "b", split, num_eval=3)
        assert a.names == b.names and a.captions() == b.captions()
        assert torch.equal(a.images_uint8(), b.images_uint8())
        assert a.info["split_rule"] == "hash of the item name"
    assert len(dataset(tmp_path / "a", "eval", num_eval=3)) == 3
    assert len(dataset(tmp_path / "a", "eval", num_eval=100)) == 3  # 10% of 30


# ----------------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("size", [32, 64])
def test_output_is_uint8_n_3_s_s(tmp_path, size):
    """PNG and JPEG images of every aspect ratio (smaller and larger than S) come out (N, 3, S, S) uint8;
    items are float (3, S, S) in [-1, 1]."""
    rows = make_folder(tmp_path, 6, "png") + make_folder(tmp_path, 6, "jpg", prefix="photo")
    write_jsonl(tmp_path, rows)
    ds = everything(tmp_path, size=size)
    images = ds.images_uint8()
    assert images.shape == (12, 3, size, size) and images.dtype == torch.uint8
    item = ds[0]
    assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["caption"] == dict(rows)[ds.names[0]]
    for name, (_, img) in by_name(ds).items():  # solid colours stay solid
        i = int(name.removesuffix(".png").removesuffix(".jpg")[-3:])
        np.testing.assert_allclose(img.float().mean((1, 2)).numpy(), color(i), atol=4)


def three_bands(size: tuple[int, int], outer, inner, horizontal: bool) -> Image.Image:
    """An image whose outer thirds (left/right, or top/bottom) are ``outer`` and whose middle third is ``inner``."""
    w, h = size
    img = Image.new("RGB", size, outer)
    box = (w // 3, 0, w - w // 3, h) if horizontal else (0, h // 3, w, h - h // 3)
    img.paste(inner, box)
    return img


def assert_centre_colour(img: torch.Tensor, tol: int) -> None:
    """``img`` (S, S, 3) is GREEN: exactly (within ``tol``) away from the border, and nothing past a trace of
    another colour at the border. The bicubic filter behind ImageOps.fit reads a source pixel or two past
    the crop box (as resizing before cropping does in DiT's loader), so the outermost output rows and
    columns may carry a little of the outer colour; red and blue are 150+ away from green."""
    err = (img.int() - torch.tensor(GREEN)).abs().amax(-1)  # (S, S)
    assert err[3:-3, 3:-3].max() <= tol, err
    assert err.max() <= 50, err


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("size", [32, 64])
def test_non_square_images_are_centre_cropped(tmp_path, fmt, size):
    """A wide image with different left and right thirds, and a tall one with different top and bottom
    thirds, come out as their centre colour."""
    ext = fmt.lower()
    three_bands((300, 100), RED, GREEN, horizontal=True).save(tmp_path / f"wide.{ext}")
    three_bands((90, 270), BLUE, GREEN, horizontal=False).save(tmp_path / f"tall.{ext}")
    write_jsonl(tmp_path, [(f"wide.{ext}", "wide"), (f"tall.{ext}", "tall")])
    got = by_name(everything(tmp_path, size=size))
    assert set(got) == {f"wide.{ext}", f"tall.{ext}"}
    for _, img in got.values():
        assert_centre_colour(img.permute(1, 2, 0), tol=1 if fmt == "PNG" else 12)  # JPEG: block artefacts


def test_non_square_crop_directly():
    """load_image itself: the centre square of a 3:1 image, down- and upscaled."""
    data = encoded(three_bands((96, 32), RED, GREEN, horizontal=True), "PNG")
    for size in (16, 32, 64):
        out = load_image(data, size)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
        assert_centre_colour(torch.from_numpy(out.copy()), tol=1)


def mode_images() -> dict[str, tuple[Image.Image, str, dict]]:
    """name -> (image in an unusual mode, file format, save kwargs)."""
    pal = Image.new("P", (24, 24), 0)
    pal.putpalette([*BLUE, *RED] + [0] * 762)
    pal.paste(1, (12, 0, 24, 24))  # left half index 0 (blue), right half index 1 (red)
    rgba = Image.new("RGBA", (24, 24), (0, 0, 0, 0))  # left half fully transparent (black underneath)
    rgba.paste((*BLUE, 255), (12, 0, 24, 24))
    la = Image.new("LA", (24, 24), (0, 0))
    la.paste((90, 255), (12, 0, 24, 24))
    return {
        "grey.png": (Image.new("L", (24, 24), 100), "PNG", {}),
        "bilevel.png": (Image.new("1", (24, 24), 1), "PNG", {}),
        "palette.png": (pal, "PNG", {}),
        "palette_transparent.png": (pal, "PNG", {"transparency": 0}),
        "palette_transparent.gif": (pal, "GIF", {"transparency": 0}),
        "cmyk.jpg": (Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG", {"quality": 95}),
        "cmyk.tif": (Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "TIFF", {}),
        "rgba.png": (rgba, "PNG", {}),
        "la.png": (la, "PNG", {}),
        "grey16.png": (Image.fromarray(np.full((24, 36), 32768, np.uint16)), "PNG", {}),
        "rgb.png": (Image.new("RGB", (24, 24), GREEN), "PNG", {}),
    }


def test_unusual_modes_are_converted_to_rgb_and_counted(tmp_path):
    """Grey, bilevel, palette (with and without transparency), CMYK, RGBA/LA and 16-bit grey come out as
    8-bit RGB with the colours a viewer shows (transparent pixels white); each conversion is counted."""
    rows = []
    for name, (img, fmt, kw) in mode_images().items():
        img.save(tmp_path / name, fmt, **kw)
        rows.append((name, name))
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")  # really 16-bit on disk
    write_jsonl(tmp_path, rows)
    ds = everything(tmp_path, size=24)
    assert ds.info["converted"] == {"grey": 2, "palette": 3, "cmyk": 2, "alpha": 2, "16-bit": 1}
    assert ds.info["skipped"] == {} and ds.info["usable"] == len(rows)
    got = {n: img.permute(1, 2, 0).int().numpy() for n, (_, img) in by_name(ds).items()}  # (S, S, 3)

    def left(n):
        return got[n][12, 2]

    def right(n):
        return got[n][12, 21]

    np.testing.assert_array_equal(left("grey.png"), [100] * 3)
    np.testing.assert_array_equal(left("bilevel.png"), [255] * 3)
    np.testing.assert_array_equal(left("palette.png"), BLUE)
    np.testing.assert_array_equal(right("palette.png"), RED)
    for n in ("palette_transparent.png", "palette_transparent.gif", "rgba.png", "la.png"):
        np.testing.assert_array_equal(left(n), WHITE, err_msg=n)  # transparent -> white, not black or blue
    np.testing.assert_array_equal(right("palette_transparent.png"), RED)
    np.testing.assert_array_equal(right("rgba.png"), BLUE)
    np.testing.assert_array_equal(right("la.png"), [90] * 3)
    np.testing.assert_allclose(left("cmyk.jpg"), (255, 0, 0), atol=3)
    np.testing.assert_array_equal(left("cmyk.tif"), (255, 0, 0))
    np.testing.assert_array_equal(left("grey16.png"), [128] * 3)  # 32768/65535 of full scale, not clipped to 255
    np.testing.assert_array_equal(left("rgb.png"), GREEN)


def test_truncated_files_never_escape_as_other_errors():
    """An image cut at any byte is either decoded or a BadImage ("truncated" | "unreadable")."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    for fmt in ("PNG", "JPEG", "GIF"):
        data = encoded(img if fmt != "GIF" else img.convert("P"), fmt)
        causes = set()
        for n in range(0, len(data), 7):
            try:
                load_image(data[:n], 16)
            except BadImage as e:
                causes.add(e.cause)
        assert causes <= {"truncated", "unreadable"}, (fmt, causes)
        assert fmt == "GIF" or "truncated" in causes, (fmt, causes)


# ----------------------------------------------------------------------------------------- bad data


def test_bad_items_are_skipped_and_counted_by_cause(tmp_path):
    """Corrupt, truncated, empty and missing files, empty/null and non-UTF-8 captions, names leaving the
    folder (../, absolute): each skipped under its cause, the rest loads, and a symlink in the folder to an image
    elsewhere (a folder of links into a shared store) is read like any other image."""
    root = tmp_path / "imgs"
    good = make_folder(root, 3)
    (root / "corrupt.png").write_bytes(b"this is not an image at all" * 10)
    (root / "empty.png").write_bytes(b"")
    png = encoded(Image.new("RGB", (64, 64), RED), "PNG", compress_level=0)
    (root / "cut.png").write_bytes(png[: len(png) // 2])
    jpg = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    (root / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])
    write_image(tmp_path / "outside.png", (20, 20), BLUE)
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    lines = [json.dumps({"file_name": f, "text": t}).encode() for f, t in good]
    lines += [json.dumps({"file_name": f, "text": t}).encode() for f, t in [
        ("corrupt.png", "corrupt"), ("empty.png", "zero bytes"), ("cut.png", "truncated png"),
        ("cut.jpg", "truncated jpeg"), ("nowhere.png", "missing"), ("img000.png", "   "), ("img001.png", None),
        ("../outside.png", "escapes"), (str(tmp_path / "outside.png"), "absolute"), ("link.png", "symlink out"),
    ]]
    lines.append(b'{"file_name": "img002.png", "text": "caf\xe9 au lait"}')  # Latin-1 byte in a UTF-8 file
    (root / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    ds = everything(root)
    assert ds.info["skipped"] == {"unreadable": 2, "truncated": 2, "missing file": 1, "empty caption": 2,
                                  "non-UTF-8 caption": 1, "outside the folder": 2}
    assert ds.info["usable"] == len(ds) == 4 and sorted(ds.names) == sorted([f for f, _ in good] + ["link.png"])
    assert ds.captions() == [{**dict(good), "link.png": "symlink out"}[n] for n in ds.names]
    examples = ds.info["skipped_examples"]
    assert examples["missing file"] == ["nowhere.png"] and "../outside.png" in examples["outside the folder"]
    assert sorted(examples["truncated"]) == ["cut.jpg", "cut.png"]


def test_non_utf8_caption_in_csv_is_skipped(tmp_path):
    rows = make_folder(tmp_path, 2)
    (tmp_path / "metadata.csv").write_bytes(b"file_name,text\n" + f"{rows[0][0]},ok\n".encode()
                                            + f"{rows[1][0]},".encode() + b'"na\xefve, bytes"\n')
    ds = everything(tmp_path)
    assert ds.names == [rows[0][0]] and ds.info["skipped"] == {"non-UTF-8 caption": 1}


def bad_layout(tmp_path: Path, case: str) -> Path:
    """A folder whose metadata or content is unusable as a whole."""
    root = tmp_path / "imgs"
    rows = make_folder(root, 3)
    jl = [json.dumps({"file_name": f, "text": t}) for f, t in rows]
    if case == "no usable image":
        write_jsonl(root, [("gone1.png", "a"), ("gone2.png", "b"), (rows[0][0], "")])
    elif case == "lists no images":
        (root / "metadata.jsonl").write_text("\n\n")
    elif case == "malformed jsonl line":
        (root / "metadata.jsonl").write_text(jl[0] + "\n" + jl[1] + "\n" + '{"file_name": "x.png", "text": "oops"\n')
    elif case == "jsonl line not an object":
        (root / "metadata.jsonl").write_text(jl[0] + "\n" + '["img001.png", "a list"]\n')
    elif case == "jsonl missing key":
        (root / "metadata.jsonl").write_text(jl[0] + "\n" + '{"file_name": "img001.png", "caption": "x"}\n')
    elif case == "csv wrong field count":
        (root / "metadata.csv").write_text(f"file_name,text\n{rows[0][0]},fine\n{rows[1][0]},a, unquoted comma\n")
    elif case == "csv missing column":
        (root / "metadata.csv").write_text(f"file_name,caption\n{rows[0][0]},x\n")
    elif case == "csv empty":
        (root / "metadata.csv").write_text("")
    elif case == "both metadata files":
        write_jsonl(root, rows)
        write_csv(root, rows)
    elif case == "no metadata":
        pass
    elif case == "not a directory":
        return root / rows[0][0]
    elif case == "does not exist":
        return tmp_path / "nope"
    return root


BAD_LAYOUTS = {
    "no usable image": r"has no usable image \(skipped 1 empty caption, 2 missing file\)",
    "lists no images": r"has no usable image \(the source lists no images\)",
    "malformed jsonl line": r"metadata\.jsonl:3: not a JSON object",
    "jsonl line not an object": r"metadata\.jsonl:2: not a JSON object",
    "jsonl missing key": r"metadata\.jsonl:2: missing 'text'",
    "csv wrong field count": r"metadata\.csv:3: 3 fields, the header has 2; quote captions",
    "csv missing column": r"metadata\.csv: no 'text' column",
    "csv empty": r"metadata\.csv is empty",
    "both metadata files": r"has both metadata\.jsonl and metadata\.csv",
    "no metadata": r"has no captions: add metadata\.jsonl or metadata\.csv .* or a \.txt beside each image",
    "not a directory": r"is not a directory",
    "does not exist": r"is not a directory",
}


@pytest.mark.parametrize("case", list(BAD_LAYOUTS))
def test_unusable_source_is_one_line_user_error(tmp_path, case, own_cache):
    """Each is a one-line UserError naming the problem (and the line, for metadata); nothing is cached."""
    root = bad_layout(tmp_path, case)
    with pytest.raises(UserError, match=BAD_LAYOUTS[case]) as e:
        dataset(root)
    assert "\n" not in str(e.value)
    assert pool_dirs(own_cache) == []


# ----------------------------------------------------------------------------------------- caching


def test_second_load_does_not_decode(tmp_path, monkeypatch, own_cache):
    """The second make_dataset (either split, either order) comes from the cache: no image is decoded."""
    write_jsonl(tmp_path, make_folder(tmp_path, 25))
    first_train, first_eval = dataset(tmp_path, "train", num_eval=2), dataset(tmp_path, "eval", num_eval=2)
    (entry,) = pool_dirs(own_cache)
    assert (entry / "pool.json").is_file() and (entry / "images.safetensors").is_file()
    monkeypatch.setattr(pool_mod, "load_image", CountingLoad(fail_at=1, error=AssertionError))
    again_eval, again_train = dataset(tmp_path, "eval", num_eval=2), dataset(tmp_path, "train", num_eval=2)
    for a, b in ((first_train, again_train), (first_eval, again_eval)):
        assert a.names == b.names and a.captions() == b.captions() and a.fingerprint() == b.fingerprint()
        assert torch.equal(a.images_uint8(), b.images_uint8())
    assert again_train.info == first_train.info


def touch_later(path: Path, seconds: float = 10.0) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + int(seconds * 1e9)))


def change_caption(root: Path, rows: list) -> tuple[str, int]:
    write_jsonl(root, [rows[0]] + [(rows[1][0], "an edited caption")] + rows[2:])
    return "edited caption", 32


def rewrite_image(root: Path, rows: list) -> tuple[str, int]:
    path = root / rows[1][0]
    write_image(path, SIZES[1], (1, 2, 3))  # same dimensions, new pixels
    touch_later(path)
    return "rewritten", 32


def touch_image(root: Path, rows: list) -> tuple[str, int]:
    touch_later(root / rows[1][0])
    return "touched", 32


def add_image(root: Path, rows: list) -> tuple[str, int]:
    write_image(root / "new.png", (25, 25), (9, 9, 9))
    write_jsonl(root, rows + [("new.png", "a new image")])
    return "added", 32


def missing_appears(root: Path, rows: list) -> tuple[str, int]:
    write_image(root / "later.png", (25, 25), (9, 9, 9))  # listed from the start, missing until now
    return "appeared", 32


def other_size(root: Path, rows: list) -> tuple[str, int]:
    return "resized", 48


INVALIDATIONS = {"caption edited": change_caption, "image rewritten": rewrite_image, "image touched": touch_image,
                 "image added": add_image, "missing image appears": missing_appears, "image_size changed": other_size}


@pytest.mark.parametrize("change", list(INVALIDATIONS))
def test_cache_is_invalidated_when_the_source_changes(tmp_path, monkeypatch, change):
    """A changed caption, a rewritten or touched image, a new or newly present image, or another image
    side rebuilds the pool, and the rebuilt pool shows the change."""
    root = tmp_path / "imgs"
    rows = make_folder(root, 6)
    write_jsonl(root, rows + [("later.png", "listed before it exists")])
    before = everything(root)
    assert before.info["skipped"] == {"missing file": 1}
    what, size = INVALIDATIONS[change](root, rows)
    counter = CountingLoad()
    monkeypatch.setattr(pool_mod, "load_image", counter)
    after = everything(root, size=size)
    assert counter.calls > 0, f"{change}: the stale cache was used"
    assert after.fingerprint() != before.fingerprint()
    got = by_name(after)
    if what == "edited caption":
        assert got[rows[1][0]][0] == "an edited caption"
    elif what == "rewritten":
        np.testing.assert_array_equal(got[rows[1][0]][1][:, 5, 5].numpy(), (1, 2, 3))
    elif what == "added":
        assert got["new.png"][0] == "a new image"
    elif what == "appeared":
        assert "later.png" in got and after.info["skipped"] == {}
    elif what == "resized":
        assert after.images_uint8().shape[-1] == 48
    elif what == "touched":
        assert torch.equal(after.images_uint8(), before.images_uint8())


def test_unrelated_changes_keep_the_cache(tmp_path, monkeypatch):
    """A file the metadata does not list, and moving the whole folder, keep the cached pool (no decode)."""
    root = tmp_path / "imgs"
    write_jsonl(root, make_folder(root, 6))
    before = everything(root)
    write_image(root / "unlisted.png", (20, 20), RED)
    (root / "notes.txt").write_text("not data")
    monkeypatch.setattr(pool_mod, "load_image", CountingLoad(fail_at=1, error=AssertionError))
    assert everything(root).names == before.names
    root.rename(tmp_path / "moved")
    moved = everything(tmp_path / "moved")
    assert moved.names == before.names and torch.equal(moved.images_uint8(), before.images_uint8())


def test_info_names_the_folder_actually_loaded(tmp_path):
    root = tmp_path / "imgs"
    write_jsonl(root, make_folder(root, 6))
    everything(root)
    root.rename(tmp_path / "moved")
    assert everything(tmp_path / "moved").info["source"] == f"folder:{tmp_path / 'moved'}"


def test_interrupted_decode_leaves_no_cache(tmp_path, monkeypatch, own_cache):
    """Killed mid-decode: nothing is left under data/; the next call decodes everything and caches it."""
    write_jsonl(tmp_path, make_folder(tmp_path, 8))
    monkeypatch.setattr(pool_mod, "load_image", CountingLoad(fail_at=4))
    with pytest.raises(KeyboardInterrupt):
        everything(tmp_path)
    assert pool_dirs(own_cache) == []
    monkeypatch.setattr(pool_mod, "load_image", counter := CountingLoad())
    assert len(everything(tmp_path)) == 8 and counter.calls == 8
    assert [p.name.startswith(".") for p in pool_dirs(own_cache)] == [False]


def test_interrupted_cache_write_leaves_nothing_that_looks_complete(tmp_path, monkeypatch, own_cache):
    """Killed after the images are written but before pool.json: the temporary directory is removed, no
    cache entry exists, and the next call rebuilds a complete one."""
    write_jsonl(tmp_path, make_folder(tmp_path, 8))

    def killed(path, obj):
        assert (Path(path).parent / "images.safetensors").is_file()  # the write really was half done
        raise KeyboardInterrupt

    monkeypatch.setattr(pool_mod, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        everything(tmp_path)
    assert pool_dirs(own_cache) == []
    monkeypatch.undo()
    monkeypatch.setenv("FLOPMATCH_CACHE", str(own_cache))
    first = everything(tmp_path)
    (entry,) = pool_dirs(own_cache)
    assert (entry / "pool.json").is_file()
    monkeypatch.setattr(pool_mod, "load_image", CountingLoad(fail_at=1, error=AssertionError))
    assert everything(tmp_path).names == first.names


@pytest.mark.parametrize("damage", ["pool.json", "images.safetensors"])
def test_damaged_cache_entry_is_rebuilt(tmp_path, monkeypatch, own_cache, damage):
    """A cache entry with a corrupt file is decoded again and replaced, not an error."""
    write_jsonl(tmp_path, make_folder(tmp_path, 5))
    first = everything(tmp_path)
    (entry,) = pool_dirs(own_cache)
    (entry / damage).write_bytes(b"\x00garbage")
    monkeypatch.setattr(pool_mod, "load_image", counter := CountingLoad())
    again = everything(tmp_path)
    assert counter.calls == 5 and torch.equal(again.images_uint8(), first.images_uint8())
    assert [p.name for p in pool_dirs(own_cache)] == [entry.name]
    monkeypatch.setattr(pool_mod, "load_image", CountingLoad(fail_at=1, error=AssertionError))
    everything(tmp_path)


# ----------------------------------------------------------------------------------------- CLI


def test_data_source_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert data_source("shapes") == "shapes"
    assert data_source("folder:rel/imgs") == f"folder:{tmp_path / 'rel' / 'imgs'}"
    assert data_source("folder:/abs/imgs") == "folder:/abs/imgs"
    assert data_source("folder:a:b") == f"folder:{tmp_path / 'a:b'}"  # only the first colon separates
    assert parse_source("folder:x") == ("folder", "x")
    for bad in ("nosuch:x", "folder:", "folder", "", "imagenet"):
        with pytest.raises(UserError, match="unknown dataset"):
            parse_source(bad)


def test_cli_train_stores_an_absolute_folder_path(tmp_path, monkeypatch):
    """`flopmatch train --data folder:relative` hands train a config naming the folder absolutely."""
    import flopmatch.train

    seen = {}
    monkeypatch.setattr(flopmatch.train, "train", lambda cfg, out, progress=True: seen.update(cfg=cfg, out=out))
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["train", "--objective", "masked", "--budget", "1e12", "--data", "folder:photos/set1",
                   "--out", "run", "--set", "text.kind=hash"])
    assert rc == 0 and seen["cfg"].data.name == f"folder:{tmp_path / 'photos' / 'set1'}"


@pytest.mark.parametrize("value", ["nosuch:x", "folder:", "folder", "imagenet"])
def test_cli_bad_data_value_is_one_line_exit_2(tmp_path, capsys, value):
    rc = cli.main(["train", "--objective", "masked", "--data", value, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("flopmatch") and "--data" in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "r").exists()


def test_cli_folder_without_metadata_exits_2_in_a_subprocess(tmp_path, tiny_config):
    """`python -m flopmatch train --data folder:imgs` from the folder's parent, on a folder of images without
    metadata: exit 2, one line naming the folder's absolute path, no run directory left behind."""
    write_image(tmp_path / "imgs" / "a.png")
    (tmp_path / "config.json").write_text(json.dumps(to_dict(tiny_config("masked", 2))))
    env = {**os.environ, "FLOPMATCH_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "flopmatch", "train", "--objective", "masked", "--config", "config.json",
                           "--data", "folder:imgs", "--out", "run", "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("flopmatch: error:"), proc.stderr[-2000:]
    assert f"{tmp_path / 'imgs'} has no captions: add metadata.jsonl or metadata.csv" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------- known bugs

# Each metadata line that cannot name a usable image should be skipped and counted (or, for a malformed
# line, be a one-line UserError naming the line), never a traceback. These currently crash in
# folder_items / clean_caption with exceptions make_dataset does not turn into either.
CRASHING_LINES = {
    "caption is a number": b'{"file_name": "img000.png", "text": 5}',  # TypeError in clean_caption
    "caption is a boolean": b'{"file_name": "img000.png", "text": true}',  # TypeError in clean_caption
    "non-UTF-8 byte in file_name": b'{"file_name": "caf\xe9.png", "text": "x"}',  # UnicodeEncodeError, folder_items
    "NUL in file_name": b'{"file_name": "img\\u0000.png", "text": "x"}',  # ValueError from Path.resolve/stat
}


@pytest.mark.parametrize("case", list(CRASHING_LINES))
def test_odd_metadata_values_are_skipped_or_refused_not_a_crash(tmp_path, case):
    rows = make_folder(tmp_path, 2)
    good = json.dumps({"file_name": rows[1][0], "text": "fine"}).encode()
    (tmp_path / "metadata.jsonl").write_bytes(CRASHING_LINES[case] + b"\n" + good + b"\n")
    try:
        ds = everything(tmp_path)
    except UserError as e:
        assert ":1:" in str(e)
    else:
        assert rows[1][0] in ds.names and sum(ds.info["skipped"].values()) + len(ds) == 2


def test_non_utf8_file_name_in_csv_is_not_a_crash(tmp_path):
    rows = make_folder(tmp_path, 2)
    (tmp_path / "metadata.csv").write_bytes(b"file_name,text\ncaf\xe9.png,x\n" + f"{rows[1][0]},fine\n".encode())
    try:
        ds = everything(tmp_path)
    except UserError:
        return
    assert ds.names == [rows[1][0]]


def test_symlink_loop_is_skipped(tmp_path):
    rows = make_folder(tmp_path, 2)
    (tmp_path / "a.png").symlink_to("b.png")
    (tmp_path / "b.png").symlink_to("a.png")
    write_jsonl(tmp_path, [("a.png", "a loop")] + rows)
    ds = everything(tmp_path)
    assert len(ds) == 2 and sum(ds.info["skipped"].values()) == 1


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (64, 64), RED)
    stored.paste(GREEN, (32, 0, 64, 64))  # stored: left half red, right half green
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": shown with red on top, green below
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    out = load_image(str(tmp_path / "phone.jpg"), 32).astype(int)
    assert np.abs(out[2, 28] - RED).max() <= 12 and np.abs(out[29, 4] - GREEN).max() <= 12


# ----------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_and_evaluate_on_a_folder(tmp_path, tiny_config):
    """A tiny masked run on a folder of ~60 images at 32 px: data.json records the source and what was
    skipped and converted; config.json names the folder; evaluation uses the folder's eval split."""
    from flopmatch.evaluation.run import EvalConfig, evaluate
    from flopmatch.sample import load_sampler
    from flopmatch.train import train

    root = tmp_path / "imgs"
    rows = make_folder(root, 40, "png", caption="a picture number {i}")
    rows += make_folder(root, 21, "jpg", prefix="photo", caption="a photo, number {i}")
    write_image(root / "grey.png", (30, 40), 120, mode="L")
    (root / "broken.jpg").write_bytes(b"not an image, whatever its name says")
    rows += [("grey.png", "a grey card"), ("broken.jpg", "broken"), ("gone.png", "missing"), ("img000.png", " ")]
    write_jsonl(root, rows)
    source = f"folder:{root}"
    cfg = tiny_config("masked", 3, sets=[f"data.name={source}", "data.image_size=32", "data.num_eval=6",
                                         "data.num_train=1000"])
    run = tmp_path / "run"
    train(cfg, run, progress=False)

    info = json.loads((run / "data.json").read_text())
    assert info["source"] == source and info["image_size"] == 32 and info["split"] == "train"
    assert info["skipped"] == {"empty caption": 1, "missing file": 1, "unreadable": 1}
    assert info["converted"] == {"grey": 1}
    assert info["usable"] == 62 and info["size"] == 62 - 6 and info["split_rule"] == "hash of the item name"
    assert json.loads((run / "config.json").read_text())["data"]["name"] == source

    settings = [load_sampler(run).cfg.sample]
    ecfg = EvalConfig(num_samples=6, batch_size=6, kid_subset=4, kid_subsets=2, fid_boot=0, prompt_following=False,
                      timing=False, save_images=False)
    doc = evaluate(run, settings, ecfg, progress=False)
    assert json.loads((run / "eval.json").read_text()) == json.loads(json.dumps(doc))
    (entry,) = doc["entries"].values()
    ref = entry["manifest"]["reference"]
    reference = make_dataset(cfg.data, "eval", progress=False)
    assert ref["dataset"] == source and ref["split"] == "eval" and ref["size"] == 6
    assert ref["fingerprint"] == reference.fingerprint()
    assert entry["metrics"]["effnet"]["fid"] >= 0 and entry["metrics"]["effnet"]["num_real"] == 6


def test_a_run_resumes_only_on_the_training_split_it_started_on(tmp_path, tiny_config):
    """A run stopped after a step, then its folder given a test/ split: resuming would train the rest on other images
    (the same layout used to hash-split the root's images); refused in one line naming what changed. Unchanged, it
    resumes."""
    from flopmatch.train import train

    root = tmp_path / "imgs"
    write_jsonl(root, make_folder(root, 30, caption="a picture number {i}"))
    cfg = tiny_config("masked", 3, sets=[f"data.name=folder:{root}", "data.num_eval=3"])
    run = tmp_path / "run"
    train(cfg, run, progress=False, stop_after=1)
    held = make_folder(root / "test", 4, prefix="held")
    write_jsonl(root / "test", held)
    with pytest.raises(UserError, match=r"started on other training data than its source gives now \(split_rule "
                                        r"'hash of the item name' -> 'given by the source'; size 27 -> 30\)"):
        train(cfg, run, progress=False)
    for f, _ in held:
        (root / "test" / f).unlink()
    (root / "test" / "metadata.jsonl").unlink()
    (root / "test").rmdir()
    assert train(cfg, run, progress=False)["step"] == 3


@pytest.mark.slow
def test_tiny_study_on_a_folder(tmp_path, monkeypatch):
    """`flopmatch study --data folder:PATH` end to end: every run trains and evaluates on the folder, prompt following
    is scored by the domain CLIP trained on the folder's training split (R-precision, with its retrieval validation
    in the report), and the report names the data its answer is about."""
    import flopmatch.evaluation.clipscore as clipscore

    # The domain CLIP's schedule, shortened: this test checks that a study runs on a folder, not the scorer's
    # quality (tests/test_eval_clip.py does that on the full schedule).
    monkeypatch.setattr(clipscore, "TRAIN_STEPS", 40)
    root, colours = tmp_path / "imgs", {"red": RED, "green": GREEN, "blue": BLUE, "white": WHITE}
    rows = []
    for i in range(72):
        name, word = f"img{i:03d}.png", list(colours)[i % 4]
        write_image(root / name, SIZES[i % len(SIZES)], colours[word])
        rows.append((name, f"a {word} picture" if i % 3 else f"{word}, a plain square"))
    write_jsonl(root, rows)
    source, out = f"folder:{root}", tmp_path / "study"
    argv = ["study", "--preset", "tiny", "--objectives", "masked", "--budgets", "2e9,4e9", "--data", source,
            "--set", "data.num_eval=16", "--eval-samples", "16", "--sweep-samples", "10", "--no-calibrate", "--out", str(out)]
    assert cli.main(argv) == 0
    runs = [p for p in sorted((out / "runs").iterdir()) if p.is_dir()]
    assert len(runs) == 2
    for run in runs:
        info = json.loads((run / "data.json").read_text())
        assert info["source"] == source and info["usable"] == 72
        doc = json.loads((run / "eval.json").read_text())
        for entry in doc["entries"].values():
            assert entry["manifest"]["reference"]["dataset"] == source
            pf = entry["metrics"]["prompt_following"]
            assert pf["scorer"] == "domain-clip" and 0 <= pf["r_precision"] <= 1, pf
    report = (out / "report.md").read_text()
    assert f"dataset {source}" in report and "domain CLIP trained on this dataset's training split" in report


# ------------------------------------------------------------------------------- review fixes


def test_a_given_split_needs_both_sides_and_validation_counts_as_eval(tmp_path):
    """train/ alone is split by hash (not an empty eval split); train/ + validation/ is the given split."""
    only = tmp_path / "only"
    write_jsonl(only / "train", make_folder(only / "train", 30))
    ds_train, ds_eval = dataset(only, "train", num_eval=3), dataset(only, "eval", num_eval=3)
    assert len(ds_eval) == 3 and len(ds_train) == 27 and ds_eval.info["split_rule"] == "hash of the item name"
    both = tmp_path / "both"
    write_jsonl(both / "train", make_folder(both / "train", 6))
    write_jsonl(both / "validation", make_folder(both / "validation", 4, prefix="val"))
    assert sorted(dataset(both, "eval").names) == [f"validation/val{i:03d}.png" for i in range(4)]
    assert len(dataset(both, "train")) == 6 and dataset(both, "train").info["split_rule"] == "given by the source"


def test_a_second_builder_keeps_the_published_copy(tmp_path, own_cache):
    """Two processes missing the cache at once: the one that finishes second keeps the first one's copy."""
    write_jsonl(tmp_path, make_folder(tmp_path, 5))
    first = everything(tmp_path)
    directory = next(p for p in (own_cache / "data").iterdir() if not p.name.startswith("."))
    before = (directory / "pool.json").stat().st_mtime_ns
    got = pool_mod._decode(folder_items(tmp_path)[0], 32, pool_mod.Tally(), False, None, "")
    again = pool_mod._save(first.info["source"], directory, json.loads((directory / "pool.json").read_text())["key"],
                           32, got, pool_mod.Tally())
    assert (directory / "pool.json").stat().st_mtime_ns == before  # not replaced
    assert sorted(again.names) == sorted(first.names) and len(again) == 5
    assert [p for p in (own_cache / "data").iterdir() if p.name.startswith(".")] == []  # no temporaries left


def _main_only_rank(rank: int, port: int, cache: str, root: str, results) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                          LOCAL_RANK=str(rank), FLOPMATCH_CACHE=cache)
        torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
        cfg = data_cfg(Path(root), num_eval=2)
        make_dataset(cfg, "train", progress=False)  # collective: both ranks meet its barrier
        n = None
        if rank == 0:
            with dist.main_only():  # what evaluate does for the prompt scorer: barriers inside are skipped
                n = len(make_dataset(cfg, "eval", progress=False))
        dist.barrier()  # would pair with rank 0's inner barrier (and then hang) without main_only
        torch.distributed.destroy_process_group()
        results.put((rank, n))
    except BaseException as e:  # report instead of hanging the parent
        results.put((rank, repr(e)))


def test_main_only_block_does_not_desynchronise_ranks(tmp_path):
    """Under 2 gloo ranks, rank 0 alone reading a real source inside dist.main_only() leaves the ranks' barriers
    paired (the evaluation's prompt scorer runs on the main rank only)."""
    write_jsonl(tmp_path / "imgs", make_folder(tmp_path / "imgs", 20))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_main_only_rank, args=(r, port, str(tmp_path / "c"), str(tmp_path / "imgs"), results))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert got == {0: 2, 1: None}, got


def test_data_inspect_counts_rows_that_repeat_an_image(tmp_path):
    """Several captions per image (one metadata row each): every row is an example, and `data inspect` says how many
    rows repeat an image listed before, so a user sees the image count is not the example count."""
    rows = make_folder(tmp_path, 10)
    write_jsonl(tmp_path, rows + [(f, f"another caption of {f}") for f, _ in rows[:4]])
    train, ev = dataset(tmp_path, "train", num_eval=1), dataset(tmp_path, "eval", num_eval=1)
    s = summarize({"train": train, "eval": ev})
    repeated = s["splits"]["train"]["repeated_images"]
    assert len(train) + len(ev) <= 14 and repeated == len(train.names) - len(set(train.names)) and repeated >= 3
    assert any(f"{repeated} rows repeat an image listed before" in line for line in format_summary(s))
    # the rule that keeps an image's rows together is named, and keys the split's caches apart from the earlier rule's
    assert train.info["split_rule"] == "hash of the item name, an image's rows kept together"
    write_jsonl(tmp_path / "once", make_folder(tmp_path / "once", 10))
    assert dataset(tmp_path / "once", "train", num_eval=1).info["split_rule"] == "hash of the item name"


def test_data_inspect_json_is_json_the_first_time_a_folder_is_read(tmp_path, capsys):
    """Preparing a folder notes what it skipped and converted; under --json those notes go to stderr, so stdout is the
    JSON document the first time too (when the notes are written), not only once the pool is cached."""
    root = tmp_path / "imgs"
    rows = make_folder(root, 12)
    write_image(root / "grey.png", (30, 40), 120, mode="L")
    (root / "broken.jpg").write_bytes(b"not an image")
    write_jsonl(root, rows + [("grey.png", "a grey card"), ("broken.jpg", "broken"), ("gone.png", "missing")])
    for _ in range(2):
        capsys.readouterr()
        assert cli.main(["data", "inspect", f"folder:{root}", "--json", "--text", "none", "--out", str(tmp_path / "i.png")]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["skipped"] == {"unreadable": 1, "missing file": 1} and doc["converted"] == {"grey": 1}, doc
