"""``hf:PATH``: a Hugging Face dataset on disk, read with the ``datasets`` library (the ``hf`` extra), offline.

PATH is one of:

- a folder written by ``Dataset.save_to_disk`` (read with ``datasets.load_from_disk``): hash split;
- a folder written by ``DatasetDict.save_to_disk``: with a ``train`` split and a ``test`` (else
  ``validation``) split, those are the training and evaluation splits; otherwise all its splits are
  pooled under the hash split (:func:`flopmatch.data.pool.split_indices`);
- parquet files: one file, a glob (``data/*.parquet``) or a folder (its ``*.parquet`` files, recursively),
  streamed with ``datasets.load_dataset("parquet", ..., streaming=True)`` so nothing is copied into the
  Hugging Face cache: hash split.

Columns: ``data.image_column`` (default "image") holds the image, as an ``Image`` feature (its encoded
bytes are read, ``decode=False``, and decoded once by :func:`flopmatch.data.images.load_image`), a
dict with ``bytes``/``path``, raw bytes, a path (relative paths are taken from PATH's folder) or a PIL
image; ``data.text_column`` (default "text") holds the caption (a list of captions: the first). A
missing column is a UserError naming the columns there are; a missing image or caption is skipped and
counted like any bad image.

Nothing is downloaded: ``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` are set while the dataset is opened.
Items are named ``SPLIT/ROW`` for a DatasetDict, ``ROW`` otherwise. Cache key: the name, size and
modification time of every file under PATH (or of the parquet files; the rule of
:mod:`flopmatch.data.folder`) and the two column names, so the dataset is opened only when the
cache misses.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from PIL import Image

from flopmatch.config import DataConfig
from flopmatch.data.images import BadImage
from flopmatch.data.pool import Item, Pool, load_or_build
from flopmatch.errors import UserError

GIVEN_SPLITS = (("train", "train"), ("test", "eval"), ("validation", "eval"))  # DatasetDict split -> flopmatch split
OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def _files(path: str) -> tuple[str, Path, list[Path]]:
    """("disk" | "parquet", the folder relative image paths are taken from, the files that make up the dataset)."""
    p = Path(path)
    if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
        return "disk", p, sorted(f for f in p.rglob("*") if f.is_file())
    if p.is_dir():
        files = sorted(p.rglob("*.parquet"))
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in glob.glob(path, recursive=True) if Path(f).is_file())
    files = [f for f in files if f.suffix == ".parquet"]
    if not files:
        raise UserError(f"hf:{path} is neither a folder written by save_to_disk (no state.json or dataset_dict.json) "
                        f"nor parquet files")
    return "parquet", (p if p.is_dir() else files[0].parent), files


def content_key(files: list[Path], root: Path, image_column: str, text_column: str) -> str:
    """Digest of each file's name (relative to ``root``), size and modification time, and the column names."""
    digest = hashlib.sha256(f"{image_column}\0{text_column}\0".encode())
    for f in files:
        st = f.stat()
        digest.update(f"{os.path.relpath(f, root)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def _import_datasets():
    # `datasets` is the optional `hf` extra and takes seconds to import: imported only when an hf source is
    # decoded (the one import not at the top of a file), so the base install and cache hits never need it.
    try:
        import datasets
    except ImportError:
        raise UserError("--data hf:PATH needs the Hugging Face datasets library: pip install 'flopmatch[hf]' "
                        "(or pip install -r requirements-hf.lock)") from None
    return datasets


@contextlib.contextmanager
def _offline():
    """``datasets``, in offline mode while the block runs (env and library flag restored after)."""
    saved_env = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update({k: "1" for k in OFFLINE_ENV})  # read when datasets is first imported ...
    try:
        datasets = _import_datasets()
        flags = {k: getattr(datasets.config, k) for k in OFFLINE_ENV if hasattr(datasets.config, k)}
        for k in flags:  # ... so also set the flags an earlier import already read
            setattr(datasets.config, k, True)
        try:
            yield datasets
        finally:
            for k, v in flags.items():
                setattr(datasets.config, k, v)
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _open(kind: str, path: str, files: list[Path], image_column: str, text_column: str) -> list[tuple[str, str, object]]:
    """The dataset's parts as (name prefix, flopmatch split, datasets object with just the two columns)."""
    with _offline() as datasets:
        if kind == "parquet":
            loaded = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", streaming=True)
        else:
            try:
                loaded = datasets.load_from_disk(path)
            except (FileNotFoundError, ValueError) as e:
                raise UserError(f"hf:{path}: not a dataset saved with save_to_disk ({e})") from None
        if isinstance(loaded, datasets.DatasetDict):
            found = {name: split for name, split in GIVEN_SPLITS if name in loaded}
            given = "train" in found and len(found) > 1
            chosen = [("train", "train"), next((n, s) for n, s in found.items() if s == "eval")] if given \
                else [(name, "") for name in loaded]
            parts = [(f"{name}/", split, loaded[name]) for name, split in chosen]
        else:
            parts = [("", "", loaded)]
        return [(prefix, split, _columns(ds, datasets, path, image_column, text_column)) for prefix, split, ds in parts]


def _columns(ds, datasets, path: str, image_column: str, text_column: str):
    """``ds`` reduced to its image and text columns, images left encoded; UserError naming the columns there are."""
    columns = list(ds.column_names or [])
    missing = [c for c in (image_column, text_column) if c not in columns]
    if missing:
        raise UserError(f"hf:{path} has no column {' or '.join(repr(c) for c in missing)}; its columns are "
                        f"{columns}: name them with --set data.image_column=... --set data.text_column=... "
                        f"(data inspect: --image-column / --text-column)")
    if isinstance((ds.features or {}).get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))  # bytes/path dicts: decoded once, by us
    return ds.select_columns([image_column, text_column])


def _encoded(value, root: Path) -> bytes | str:
    """An image cell -> encoded bytes or a file path for load_image."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)) and value:
        return bytes(value)
    if isinstance(value, str) and value:
        return str(root / value)  # an absolute path stays as it is
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        try:
            value.save(buf, format="TIFF")  # lossless for every mode, so load_image sees and counts the original
        except (OSError, ValueError):
            raise BadImage("unreadable") from None
        return buf.getvalue()
    raise BadImage("missing image")


def _caption(value) -> str | bytes | None:
    """A text cell -> what clean_caption takes: the first of a list of captions, numbers as text."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value if value is None or isinstance(value, (str, bytes)) else str(value)


class _Rows:
    """The rows of an opened dataset (opened only on a cache miss) as Items; sized unless streamed."""

    def __init__(self, parts: list[tuple[str, str, object]], root: Path, image_column: str, text_column: str):
        self.parts, self.root, self.image_column, self.text_column = parts, root, image_column, text_column

    def __len__(self) -> int:
        return sum(len(ds) for _, _, ds in self.parts)  # TypeError for a streamed dataset: no total shown

    def __iter__(self) -> Iterator[Item]:
        for prefix, split, ds in self.parts:
            rows = iter(ds)
            row = 0
            while True:
                try:
                    values = next(rows)
                except StopIteration:
                    break
                except Exception as e:  # noqa: BLE001 - pyarrow/datasets raise many types for a damaged file
                    raise UserError(f"{self.root}: cannot read row {row} of the dataset ({type(e).__name__}: {e}); "
                                    f"check the files") from None
                yield Item(f"{prefix}{row}", _caption(values[self.text_column]),
                           partial(_encoded, values[self.image_column], self.root), split)
                row += 1


def hf_pool(cfg: DataConfig, path: str, progress: bool = True) -> Pool:
    """The decoded (cached) pool of the Hugging Face dataset at ``path``, at ``cfg.image_size``."""
    kind, root, files = _files(path)
    key = content_key(files, root, cfg.image_column, cfg.text_column)

    def rows() -> _Rows:
        try:
            parts = _open(kind, path, files, cfg.image_column, cfg.text_column)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - pyarrow/datasets raise many types for a file that is not a dataset
            raise UserError(f"hf:{path}: cannot open it as a dataset ({type(e).__name__}: {e})") from None
        return _Rows(parts, root, cfg.image_column, cfg.text_column)

    return load_or_build(cfg.name, "hf", key, cfg.image_size, rows, progress=progress)
