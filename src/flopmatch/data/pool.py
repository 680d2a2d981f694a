"""A real dataset decoded once: every usable image at the configured side, its caption, cached on disk.

A source module (``folder``, ``wds``, ``hf``) describes its items as :class:`Item`s and gives a
*content key* that changes whenever the source does; :func:`load_or_build` decodes them through
:func:`flopmatch.data.images.load_image` into a :class:`Pool` and caches it under
``cache_dir()/data/``, keyed by the content key, the image side and :data:`POOL_VERSION` (the
preprocessing). A changed source or preprocessing gets a new key; an unchanged one loads in a
second. The cache is written to a temporary directory and renamed, so a killed preparation leaves
nothing that looks complete.

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
POOL_VERSION = 1
MAX_EVAL_FRACTION = 0.1  # without a given split, at most this fraction of a source is held out for evaluation


@dataclass
class Item:
    """One image-caption pair of a source before decoding. ``load`` returns the encoded image (bytes or a path)."""

    name: str  # stable identifier (relative file name, shard/key): reported, hashed for the split
    caption: bytes | str | None
    load: Callable[[], bytes | str | Path]
    split: str = ""  # "train" | "eval" when the source gives it, else "" (hash split)


@dataclass
class Pool:
    """Decoded items: ``images`` uint8 (N, 3, S, S), and per item its caption, name and given split."""

    images: torch.Tensor
    captions: list[str]
    names: list[str]
    splits: list[str]
    info: dict  # source, counts, skipped/converted by cause
    key: str

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
    return order[:n_eval] if split == "eval" else order[n_eval:][:num_train]


def _decode(items: Iterable[Item], size: int, tally: Tally, progress: bool, total: int | None, desc: str) -> dict:
    images, captions, names, splits = [], [], [], []
    for item in tqdm(items, total=total, desc=desc, unit="img", disable=not progress, leave=False, mininterval=1.0):
        try:
            caption = clean_caption(item.caption)
            if caption is None:
                raise BadImage("empty caption")
            try:
                data = item.load()
            except FileNotFoundError:
                raise BadImage("missing file") from None
            images.append(load_image(data, size, tally))
        except BadImage as e:
            tally.skip(e.cause, item.name)
            continue
        captions.append(caption)
        names.append(item.name)
        splits.append(item.split)
    return {"images": images, "captions": captions, "names": names, "splits": splits}


def _pool_dir(kind: str, content_key: str, size: int) -> tuple[Path, str]:
    key = hashlib.sha256(json.dumps([POOL_VERSION, kind, content_key, size]).encode()).hexdigest()[:20]
    return cache_dir() / "data" / f"{kind}-{size}px-{key}", key


def _load(directory: Path, key: str) -> Pool | None:
    try:
        meta = read_json(directory / "pool.json")
        images = load_tensors(directory / "images.safetensors")["images"]
    except (UserError, KeyError, OSError):
        return None
    if meta.get("key") != key or images.shape[0] != len(meta["captions"]):
        return None
    return Pool(images, meta["captions"], meta["names"], meta["splits"], meta["info"], key)


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


def _build(source: str, directory: Path, key: str, size: int, items: Callable[[], Iterable[Item]],
           total: int | None, progress: bool) -> Pool:
    tally = Tally()
    got = _decode(items(), size, tally, progress, total, f"decoding {source} at {size}px (cached for next time)")
    if not got["captions"]:
        causes = "; ".join(tally.lines()) or "the source lists no images"
        raise UserError(f"{source} has no usable image ({causes}); check the path and the metadata")
    images = torch.from_numpy(np.stack(got["images"])).permute(0, 3, 1, 2).contiguous()  # (N, S, S, 3) -> (N, 3, S, S)
    info = {"source": source, "image_size": size, "usable": len(got["captions"]), **tally.to_dict()}
    for line in tally.lines():
        print(f"{source}: {line}", flush=True)
    tmp = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.mkdir(parents=True)
        save_tensors(tmp / "images.safetensors", {"images": images})
        atomic_write_json(tmp / "pool.json", {"key": key, "captions": got["captions"], "names": got["names"],
                                              "splits": got["splits"], "info": info})
        if directory.exists():  # a damaged copy: replace it
            shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    except OSError:
        pass  # another process renamed first, or the cache is not writable: use what was decoded in memory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Pool(images, got["captions"], got["names"], got["splits"], info, key)
