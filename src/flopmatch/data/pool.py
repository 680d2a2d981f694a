"""A real dataset decoded once: every usable image at the configured side, its caption, cached on disk.

A source module (``folder``, ``wds``, ``hf``) describes its items as :class:`Item`s and gives a
*content key* that changes whenever the source does; :func:`load_or_build` decodes them through
:func:`flopmatch.data.images.load_image` into a :class:`Pool` and caches it under
``cache_dir()/data/``, keyed by the content key, the image side and :data:`POOL_VERSION` (the
preprocessing). A changed source or preprocessing gets a new key; an unchanged one loads in a
second. The cache is written to a temporary directory and renamed, so a killed preparation leaves
nothing that looks complete.

A source whose decoding divides into independent shares (WebDataset shards) uses
:func:`load_or_build_in_parts` instead: under torchrun each rank decodes its share into a part file,
the main rank merges the parts in source order into the same cached pool, and every rank loads it.

Splits (:func:`split_indices`): a source that names its split (``train/`` and ``test/`` folders)
keeps it; otherwise items are ordered by a hash of their name and the first ``num_eval`` (at most a
tenth of the set) are the evaluation split, so the split is stable when items are added or removed
elsewhere and never depends on the order files were listed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from flopmatch import dist
from flopmatch.data.images import BadImage, Tally, clean_caption, load_image
from flopmatch.errors import UserError
from flopmatch.files import atomic_write_json, cache_dir, load_tensors, read_json, save_tensors

# Bump when decoding, conversion, resizing or the split rule changes: it keys every cached pool.
# 2: a root metadata file beside test/ trains, and its rows naming test/ images are skipped; images upscaled counted
POOL_VERSION = 2
MAX_EVAL_FRACTION = 0.1  # without a given split, at most this fraction of a source is held out for evaluation


@dataclass
class Item:
    """One image-caption pair of a source before decoding. ``load`` returns the encoded image (bytes or a path)."""

    name: str  # stable identifier (relative file name, shard/key): reported, hashed for the split
    caption: bytes | str | None
    load: Callable[[], bytes | str | Path]
    split: str = ""  # "train" | "eval" when the source gives it, else "" (hash split)
    label: int | None = None  # class index when the source has classes (fashion-mnist), else None


@dataclass
class Decoded:
    """One item after decoding: its image and caption, or the cause it is skipped under."""

    name: str
    split: str = ""
    label: int | None = None
    order: tuple[int, ...] = ()  # the item's place in the source: shares decoded apart are merged in this order
    image: np.ndarray | None = None  # (S, S, 3) uint8; None when skipped
    caption: str = ""
    skipped: str = ""  # the cause it is skipped under; "" when usable
    converted: str = ""  # the conversion to RGB made ("grey", "alpha", ...); "" when none
    upscaled: bool = False  # its shorter side was below the configured side


@dataclass
class Pool:
    """Decoded items: ``images`` uint8 (N, 3, S, S), and per item its caption, name, given split and class label."""

    images: torch.Tensor
    captions: list[str]
    names: list[str]
    splits: list[str]
    info: dict  # source, counts, skipped/converted by cause
    key: str
    labels: list[int] | None = None  # per item, for sources whose every item has a class; else None

    def __len__(self) -> int:
        return len(self.captions)


def _name_order(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


def split_indices(pool: Pool, split: str, num_train: int, num_eval: int) -> list[int]:
    """Indices of ``split`` ("train" | "eval"): the source's own split if it has one, else the hash split."""
    given = {s for s in pool.splits if s}
    if given:
        idx = [i for i, s in enumerate(pool.splits) if s == split]
        idx.sort(key=lambda i: _name_order(pool.names[i]))
        return idx[: num_train if split == "train" else num_eval]
    order = sorted(range(len(pool)), key=lambda i: _name_order(pool.names[i]))
    n_eval = min(num_eval, int(len(order) * MAX_EVAL_FRACTION))
    if split == "eval":
        return order[:n_eval]
    # An image listed more than once (one row per caption) sorts into one run of equal hashes; where the cut falls
    # inside that run, its training rows would show the model an evaluation image: they are left out of training.
    held = {pool.names[i] for i in order[:n_eval]}
    return [i for i in order[n_eval:] if pool.names[i] not in held][:num_train]


def decode_item(item: Item, size: int, order: tuple[int, ...] = ()) -> Decoded:
    """Decode one item at ``size`` px: its image and cleaned caption, or the cause it is skipped under.

    Safe to call in DataLoader workers (it touches no shared state); ``order`` is passed through.
    """
    tally = Tally()
    try:
        caption = clean_caption(item.caption)
        if caption is None:
            raise BadImage("empty caption")
        try:
            data = item.load()
        except FileNotFoundError:
            raise BadImage("missing file") from None
        image = load_image(data, size, tally)
    except BadImage as e:
        return Decoded(item.name, item.split, item.label, order, skipped=e.cause)
    converted = next(iter(tally.converted), "")
    return Decoded(item.name, item.split, item.label, order, image, caption, converted=converted,
                   upscaled=bool(tally.upscaled))


def _gather(decoded: Iterable[Decoded], tally: Tally) -> dict:
    """Decoded items -> the lists a pool is made of (usable items, in the given order); skips counted in ``tally``."""
    images, captions, names, splits, labels = [], [], [], [], []
    for d in decoded:
        if d.skipped:
            tally.skip(d.skipped, d.name)
            continue
        if d.converted:
            tally.converted[d.converted] += 1
        tally.upscaled += d.upscaled
        images.append(d.image)
        captions.append(d.caption)
        names.append(d.name)
        splits.append(d.split)
        labels.append(d.label)
    return {"images": images, "captions": captions, "names": names, "splits": splits,
            "labels": labels if labels and all(label is not None for label in labels) else None}


def _decode(items: Iterable[Item], size: int, tally: Tally, progress: bool, total: int | None, desc: str) -> dict:
    bar = tqdm(items, total=total, desc=desc, unit="img", disable=not progress, leave=False, mininterval=1.0)
    return _gather((decode_item(item, size) for item in bar), tally)


def _pool_dir(kind: str, content_key: str, size: int) -> tuple[Path, str]:
    key = hashlib.sha256(json.dumps([POOL_VERSION, kind, content_key, size]).encode()).hexdigest()[:20]
    return cache_dir() / "data" / f"{kind}-{size}px-{key}", key


def _load(directory: Path, key: str) -> Pool | None:
    try:
        meta = read_json(directory / "pool.json")
        images = load_tensors(directory / "images.safetensors")["images"]
    except (UserError, KeyError, OSError):
        return None
    labels = meta.get("labels")  # absent in pools of sources without classes
    if meta.get("key") != key or images.shape[0] != len(meta["captions"]):
        return None
    if labels is not None and len(labels) != len(meta["captions"]):
        return None
    return Pool(images, meta["captions"], meta["names"], meta["splits"], meta["info"], key, labels)


def load_or_build(source: str, kind: str, content_key: str, size: int, items: Callable[[], Iterable[Item]],
                  total: int | None = None, progress: bool = True) -> Pool:
    """The decoded pool of a source (cached). ``items`` is called only when the cache misses.

    Under torchrun the main rank decodes and the others wait at a barrier, then every rank loads the cache.
    Raises UserError when no item is usable, naming the causes.
    """
    directory, key = _pool_dir(kind, content_key, size)
    pool = _load(directory, key) if directory.exists() else None
    if pool is None and dist.is_main():
        pool = _build(source, directory, key, size, items, total, progress)
    dist.barrier()
    if pool is None:
        pool = _load(directory, key)
        if pool is None:
            raise UserError(f"the main process did not leave a prepared copy of {source} in {directory}")
    return pool


def load_or_build_in_parts(source: str, kind: str, content_key: str, size: int,
                           decode_share: Callable[[int, int], Iterable[Decoded]], progress: bool = True) -> Pool:
    """The decoded pool of a source whose decoding divides into shares (cached), e.g. WebDataset shards.

    ``decode_share(rank, world_size)`` decodes one rank's share, in any order, each item with its
    ``order`` (its place in the source); it is called only when the cache misses. With one process it
    is called with (0, 1). Under torchrun the main rank decides (cache hit or miss, so all ranks take
    the same barriers), every rank writes its share to a part file in ``.<pool dir>.parts/`` beside
    the cache, the main rank merges the parts in ``order`` into the cache :func:`load_or_build` writes,
    and every rank loads it: the pool does not depend on the number of ranks. Raises UserError when no
    item is usable, naming the causes.
    """
    directory, key = _pool_dir(kind, content_key, size)
    desc = f"decoding {source} at {size}px (cached for next time)"
    rank, world = dist.rank(), dist.world_size()
    if world == 1:
        pool = _load(directory, key) if directory.exists() else None
        if pool is None:
            pool = _merge(source, directory, key, size, [_decode_share(decode_share, 0, 1, progress, desc)])
        return pool
    parts = directory.with_name(f".{directory.name}.parts")
    pool, mine = None, []
    if dist.is_main():
        pool = _load(directory, key) if directory.exists() else None
        shutil.rmtree(parts, ignore_errors=True)  # a killed preparation's parts
        if pool is None:
            parts.mkdir(parents=True)
    dist.barrier()
    if parts.is_dir():  # the main rank found no cached copy: every rank decodes its share
        mine = _decode_share(decode_share, rank, world, progress, desc)
        _save_part(parts / f"{rank}-of-{world}", size, mine)
    dist.barrier()
    try:
        if dist.is_main() and pool is None:
            shares = [mine if r == rank else _load_part(parts / f"{r}-of-{world}") for r in range(world)]
            pool = _merge(source, directory, key, size, shares)
    finally:
        if dist.is_main():
            shutil.rmtree(parts, ignore_errors=True)
        dist.barrier()  # also when the main rank raises: the others then fail to load below instead of waiting
    if pool is None:
        pool = _load(directory, key)
        if pool is None:
            raise UserError(f"the main process did not leave a prepared copy of {source} in {directory}")
    return pool


def _decode_share(decode_share: Callable[[int, int], Iterable[Decoded]], rank: int, world: int, progress: bool,
                  desc: str) -> list[Decoded]:
    share = decode_share(rank, world)
    return list(tqdm(share, desc=desc, unit="img", disable=not (progress and rank == 0), leave=False, mininterval=1.0))


def _save_part(path: Path, size: int, decoded: list[Decoded]) -> None:
    """One rank's decoded share: its images (n, S, S, 3) uint8 as safetensors, the rest as JSON."""
    images = [d.image for d in decoded if not d.skipped]
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    save_tensors(path.with_suffix(".safetensors"), {"images": torch.from_numpy(stacked)})
    fields = ("name", "split", "label", "order", "caption", "skipped", "converted", "upscaled")
    atomic_write_json(path.with_suffix(".json"), [{f: getattr(d, f) for f in fields} for d in decoded])


def _load_part(path: Path) -> list[Decoded]:
    images = iter(load_tensors(path.with_suffix(".safetensors"))["images"].numpy())
    decoded = [Decoded(**{**row, "order": tuple(row["order"])}) for row in read_json(path.with_suffix(".json"))]
    for d in decoded:
        if not d.skipped:
            d.image = next(images)
    return decoded


def _merge(source: str, directory: Path, key: str, size: int, shares: list[list[Decoded]]) -> Pool:
    tally = Tally()
    decoded = sorted((d for share in shares for d in share), key=lambda d: d.order)
    return _save(source, directory, key, size, _gather(decoded, tally), tally)


def _build(source: str, directory: Path, key: str, size: int, items: Callable[[], Iterable[Item]],
           total: int | None, progress: bool) -> Pool:
    tally = Tally()
    got = _decode(items(), size, tally, progress, total, f"decoding {source} at {size}px (cached for next time)")
    return _save(source, directory, key, size, got, tally)


def _save(source: str, directory: Path, key: str, size: int, got: dict, tally: Tally) -> Pool:
    """The pool of decoded items (``_gather``'s lists), written to the cache ``directory``; UserError if none is usable."""
    if not got["captions"]:
        causes = "; ".join(tally.lines()) or "the source lists no images"
        raise UserError(f"{source} has no usable image ({causes}); check the path and the metadata")
    images = torch.from_numpy(np.stack(got["images"])).permute(0, 3, 1, 2).contiguous()  # (N, S, S, 3) -> (N, 3, S, S)
    info = {"source": source, "image_size": size, "usable": len(got["captions"]), **tally.to_dict()}
    for line in tally.lines():
        print(f"{source}: {line}", file=sys.stderr, flush=True)  # notes: stdout may be a command's JSON
    tmp = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.mkdir(parents=True)
        save_tensors(tmp / "images.safetensors", {"images": images})
        atomic_write_json(tmp / "pool.json", {"key": key, "captions": got["captions"], "names": got["names"],
                                              "splits": got["splits"], "labels": got["labels"], "info": info})
        if directory.exists():
            if _load(directory, key) is not None:  # another process published it meanwhile: keep theirs
                return _load(directory, key)
            aside = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.damaged")
            os.replace(directory, aside)  # a damaged copy: moved aside in one step, then removed
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(tmp, directory)
    except OSError:
        pass  # another process renamed first, or the cache is not writable: use what was decoded in memory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Pool(images, got["captions"], got["names"], got["splits"], info, key, got["labels"])
