"""``wds:PATTERN``: WebDataset tar shards of image + caption pairs, the layout img2dataset writes.

Layout (https://github.com/webdataset/webdataset#the-webdataset-format): a shard is a tar whose files
are grouped into samples by their name up to the first dot: ``KEY.jpg`` (or ``.jpeg``, ``.png``,
``.webp``, ...) holds the image, ``KEY.txt`` the UTF-8 caption; other files (``KEY.json``) are ignored.
PATTERN names the shards: a brace pattern (``shards/{00000..00099}.tar``, expanded with braceexpand as
webdataset does), a glob (``shards/*.tar``), one shard, or a folder (its ``*.tar`` files).

Skipped and counted: a sample without an image ("missing image") or caption ("empty caption"), an
undecodable image (the causes of :func:`flopmatch.data.images.load_image`), a shard the pattern names
that does not exist ("missing shard", e.g. one img2dataset failed to write) and a shard that is not a
readable tar ("unreadable shard"; the samples before the damage are kept). A pattern that matches no
file is a :class:`UserError`.

Items are named ``SHARD/KEY``, SHARD being the shard's path relative to the folder that holds all the
shards (``00003.tar/000030017``). There is no given split: always the hash split of
:func:`flopmatch.data.pool.split_indices`.

Decoding is divided by shards: among ranks under torchrun (rank r takes shards r, r+W, ..., see
:func:`flopmatch.data.pool.load_or_build_in_parts`) and, within a rank, among DataLoader workers by
webdataset's ``split_by_worker``. Every sample carries its place (shard, position in the tar), and the
pool is assembled in that order, so it does not depend on the number of ranks or workers.

Cache key: each shard's name, size and modification time (the rule of :mod:`flopmatch.data.folder`).
"""

from __future__ import annotations

import glob
import hashlib
import os
import tarfile
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path

import torch
import webdataset
from braceexpand import braceexpand

from flopmatch import dist
from flopmatch.config import DataConfig
from flopmatch.data.images import BadImage
from flopmatch.data.pool import Decoded, Item, Pool, decode_item, load_or_build_in_parts
from flopmatch.errors import UserError

# Image members a sample may hold (webdataset lower-cases extensions); the first present one is used.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MAX_WORKERS = 8  # decoding workers per process: beyond this, reading the tars rather than the CPUs is the limit


def shard_paths(pattern: str) -> list[Path]:
    """The shards ``pattern`` names, in pattern order, present or not (see the module docstring).

    Raises UserError when the pattern is malformed or names no existing file.
    """
    if os.path.isdir(pattern):
        listed = sorted(Path(pattern).glob("*.tar"))
    else:
        try:
            expanded = list(braceexpand(pattern))
        except ValueError as e:  # braceexpand.UnbalancedBracesError
            raise UserError(f"wds:{pattern}: {e}; write brace ranges like shards/{{00000..00099}}.tar") from None
        listed = []
        for p in expanded:
            listed += sorted(Path(m) for m in glob.glob(p)) if any(c in p for c in "*?[") else [Path(p)]
    listed = list(dict.fromkeys(Path(os.path.abspath(p)) for p in listed))  # first occurrence of each
    if not any(p.is_file() for p in listed):
        raise UserError(f"wds:{pattern} matches no file; give tar shards, e.g. wds:shards/{{00000..00099}}.tar "
                        f"or wds:shards/*.tar")
    return listed


def shard_names(paths: list[Path]) -> list[str]:
    """Each shard's path relative to the folder holding all of them: the SHARD part of item names."""
    root = os.path.commonpath([str(p.parent) for p in paths])
    return [os.path.relpath(p, root) for p in paths]


def content_key(paths: list[Path], names: list[str]) -> str:
    """Digest of each shard's name, size and modification time (-1 for a missing shard)."""
    digest = hashlib.sha256()
    for path, name in zip(paths, names):
        try:
            st = path.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size = mtime = -1
        digest.update(f"{name}\0{size}\0{mtime}\0".encode())
    return digest.hexdigest()


def _image_bytes(data: bytes | None) -> bytes:
    if data is None:
        raise BadImage("missing image")
    return data


def _item(sample: dict, shard: str) -> Item:
    """A webdataset sample (``__key__``, ``txt``, ``jpg``, ...) as an Item named SHARD/KEY."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    return Item(f"{shard}/{sample['__key__']}", sample.get("txt"), partial(_image_bytes, sample.get(ext) if ext else None))


def _decode_shards(urls: Iterable[dict], shards: dict[str, tuple[int, str]], size: int) -> Iterator[Decoded]:
    """A webdataset pipeline stage: shard urls -> their decoded samples, ordered by (shard index, position).

    ``shards`` maps a url to its index in the pattern and its name.
    """
    for source in urls:
        index, name = shards[source["url"]]
        samples = webdataset.tarfile_samples([{"url": source["url"]}])
        position = 0
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                break
            except (tarfile.TarError, OSError, ValueError):  # damaged, truncated, duplicate member names
                yield Decoded(name, order=(index, position), skipped="unreadable shard")
                break
            yield decode_item(_item(sample, name), size, order=(index, position))
            position += 1


def default_workers() -> int:
    """Decoding workers for this process: its share of the machine's cores (torchrun runs LOCAL_WORLD_SIZE
    processes per machine), at most MAX_WORKERS; 0 (decode in this process) when that is one or fewer."""
    cpus = dist.available_cores()
    n = min(MAX_WORKERS, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return n if n > 1 else 0


def decode_share(paths: list[Path], names: list[str], size: int, workers: int, rank: int,
                 world_size: int) -> Iterator[Decoded]:
    """The decoded samples of this rank's shards (``paths[rank::world_size]``), in any order.

    Shards are divided among ``workers`` DataLoader workers by webdataset's ``split_by_worker`` (0:
    decode in this process).
    """
    mine = range(rank, len(paths), world_size)
    present = [i for i in mine if paths[i].is_file()]
    for i in sorted(set(mine) - set(present)):
        yield Decoded(names[i], order=(i, -1), skipped="missing shard")
    if not present:
        return
    shards = {str(paths[i]): (i, names[i]) for i in present}
    pipeline = webdataset.DataPipeline(
        webdataset.SimpleShardList(list(shards)),
        webdataset.split_by_worker,
        partial(_decode_shards, shards=shards, size=size),
    )
    # batch_size=None: samples pass through one by one, unbatched and unconverted (Decoded is not collated).
    yield from torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=min(workers, len(present)))


def wds_pool(cfg: DataConfig, pattern: str, progress: bool = True, workers: int | None = None) -> Pool:
    """The decoded (cached) pool of the WebDataset shards ``pattern`` names, at ``cfg.image_size``.

    ``workers``: decoding workers per process (None: :func:`default_workers`).
    """
    paths = shard_paths(pattern)
    names = shard_names(paths)
    workers = default_workers() if workers is None else workers
    return load_or_build_in_parts(cfg.name, "wds", content_key(paths, names), cfg.image_size,
                                  partial(decode_share, paths, names, cfg.image_size, workers), progress=progress)
