"""``folder:PATH``: a directory of images with captions, in the Hugging Face image-folder layout.

Layout (https://huggingface.co/docs/datasets/image_dataset#imagefolder):

- ``PATH/metadata.jsonl`` (one JSON object per line with ``file_name`` and ``text``) or
  ``PATH/metadata.csv`` (a header with those two columns); ``file_name`` is relative to the metadata
  file and may name nested folders (``cats/001.jpg``);
- or, in a folder without a metadata file, caption files: each image's caption in a ``.txt`` beside it
  with the same stem (``cats/001.jpg`` + ``cats/001.txt``, as kohya-ss and many exported datasets keep
  them), images found in nested folders too; an image without its ``.txt`` is skipped and counted;
- optionally ``PATH/train/`` and ``PATH/test/``, each with its own metadata file: the split is then
  the folders' (``test`` is the evaluation split), otherwise a hash split (see
  :func:`flopmatch.data.pool.split_indices`). ``test/`` beside a metadata file in ``PATH`` itself: that
  file's images train, ``test/``'s evaluate; ``train/`` alone is split by hash. Layouts that leave it
  open which images train (``test/`` alone; a root metadata file beside ``train/``, which it would
  contradict or be dropped by) are refused, so held-out images never train unnoticed.

A malformed metadata line (with its line number) or a missing column is a :class:`UserError`; a
missing image, an empty or non-UTF-8 caption, or an undecodable image is skipped and counted.

Cache key: the metadata files' bytes (or the caption files' names and bytes), and each listed image's name, size and modification time
(``st_mtime_ns``), so an edited caption, a replaced or touched image, or a new file invalidates the
cache, without re-reading every image on each start (the rule make and ccache use for files).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
from pathlib import Path

from flopmatch.config import DataConfig
from flopmatch.data.images import BadImage
from flopmatch.data.pool import Item, Pool, load_or_build
from flopmatch.errors import UserError

COLUMNS = ("file_name", "text")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SIDECARS = "caption files"  # a folder's caption source when it has .txt files beside its images, no metadata file
# Sub-folder -> flopmatch split, as Hugging Face's image-folder loader names them; "test" wins over "validation".
SPLIT_DIRS = {"train": "train", "test": "eval", "validation": "eval"}


def _metadata_file(directory: Path) -> Path | None:
    found = [directory / n for n in ("metadata.jsonl", "metadata.csv") if (directory / n).is_file()]
    if len(found) > 1:
        raise UserError(f"{directory} has both metadata.jsonl and metadata.csv; keep one")
    return found[0] if found else None


def _caption_source(directory: Path, splits_inside: bool = False) -> Path | str | None:
    """Where a folder's captions are: its metadata file; SIDECARS where it has none but some image with a ``.txt``
    of the same stem beside it; else None. ``splits_inside``: its train/, test/, validation/ are splits, not its own."""
    meta = _metadata_file(directory)
    if meta is not None:
        return meta
    return SIDECARS if any(p.with_suffix(".txt").is_file() for p in _images(directory, splits_inside)) else None


def _named(source: Path | str) -> str:
    return source.name if isinstance(source, Path) else f"its {SIDECARS} (image + .txt pairs)"


# Cached: the layout checks and the rows walk the same trees, once each per folder_items call (which clears it).
@functools.lru_cache(maxsize=8)
def _images(directory: Path, splits_inside: bool) -> tuple[Path, ...]:
    """The image files under ``directory`` by name (nested folders too, not through linked ones; without the split
    sub-folders where ``splits_inside``), sorted: the caption-file layout's items."""
    found = []
    for here, dirs, files in os.walk(directory):
        if splits_inside and Path(here) == directory:
            dirs[:] = [d for d in dirs if d not in SPLIT_DIRS]
        dirs.sort()
        found += [Path(here) / f for f in sorted(files) if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return tuple(found)


def _rows_sidecars(directory: Path, splits_inside: bool) -> tuple[list[tuple[str, object]], bytes]:
    """(file name relative to ``directory``, caption bytes, or None without a .txt) of each image, and the caption
    files' names and bytes for the cache key."""
    rows, key = [], []
    for path in _images(directory, splits_inside):
        txt = path.with_suffix(".txt")
        try:
            caption = txt.read_bytes().removeprefix(b"\xef\xbb\xbf")
        except FileNotFoundError:
            caption = None
        except OSError as e:
            raise UserError(f"cannot read {txt}: {e.strerror or e}") from None
        name = path.relative_to(directory).as_posix()
        rows.append((name, caption))
        size = b"-1" if caption is None else str(len(caption)).encode()  # a missing file is not any content
        key.append(name.encode("utf-8", "surrogateescape") + b"\0" + size + b"\0" + (caption or b"") + b"\0")
    return rows, b"".join(key)


def _rows_jsonl(path: Path, raw: bytes) -> list[tuple[str, object]]:
    rows = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            # Invalid UTF-8 inside a caption survives as surrogates and is skipped per image, not per file.
            row = json.loads(line.decode("utf-8", errors="surrogateescape"))
        except ValueError as e:
            raise UserError(f"{path}:{number}: not a JSON object ({e.msg}); fix or remove the line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number}: not a JSON object; each line must be {{\"file_name\": ..., \"text\": ...}}")
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise UserError(f"{path}:{number}: missing {' and '.join(repr(c) for c in missing)}; "
                            f"each line needs \"file_name\" and \"text\"")
        rows.append((str(row["file_name"]), row["text"]))
    return rows


def _rows_csv(path: Path, raw: bytes) -> list[tuple[str, object]]:
    text = raw.decode("utf-8-sig", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(f"{path} is empty; it needs a header with file_name,text") from None
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise UserError(f"{path}: no {' or '.join(repr(c) for c in missing)} column in the header {header}; "
                        f"the header must name file_name and text")
    i_name, i_text = header.index("file_name"), header.index("text")
    rows = []
    try:
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise UserError(f"{path}:{reader.line_num}: {len(row)} fields, the header has {len(header)}; "
                                f"quote captions that contain commas")
            rows.append((row[i_name], row[i_text]))
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: {e}") from None
    return rows


def _read_file(path: Path):
    def load() -> str:
        try:
            path.stat()
        except FileNotFoundError:
            raise
        except (OSError, ValueError, RuntimeError):  # NUL in the name, a symlink loop, a name too long
            raise BadImage("bad file name") from None
        return str(path)  # Pillow opens the path itself (and can then use JPEG draft decoding)

    return load


def folder_items(root: str | Path) -> tuple[list[Item], str]:
    """The items of an image folder and its content key (see the module docstring). UserError on bad layout."""
    root = Path(root)
    _images.cache_clear()  # the folder may have changed since the last call
    if not root.is_dir():
        raise UserError(f"folder:{root} is not a directory; give a folder of images with metadata.jsonl, "
                        "metadata.csv or a .txt caption beside each image")
    found = [(root / d, split) for d, split in SPLIT_DIRS.items() if (root / d).is_dir() and _caption_source(root / d)]
    train = [p for p in found if p[1] == "train"]
    held = [p for p in found if p[1] == "eval"][:1]
    top_meta = _caption_source(root, splits_inside=True)
    # Which metadata is the training set must never be a guess: images meant for evaluation must not train.
    if train and held:  # a given split: both sides
        if top_meta is not None:
            raise UserError(f"{root} has {_named(top_meta)} beside train/ and {held[0][0].name}/, whose split is used: "
                            f"its images would be left out; move them into train/ (or remove {_named(top_meta)})")
        parts = train + held
    elif held:  # test/ only: the root's images train, test/'s evaluate
        if top_meta is None:
            raise UserError(f"{root} has only a {held[0][0].name}/ split, held out for evaluation: add the training "
                            f"images as train/ (with its captions) or with captions in {root}")
        parts = [(root, "train"), *held]
    elif train:  # train/ alone: its items, split by hash
        if top_meta is not None:
            raise UserError(f"{root} has both {_named(top_meta)} and train/ with {_named(_caption_source(train[0][0]))}: "
                            f"say which is which by naming the held-out folder test/, or keep one of them")
        parts = [(train[0][0], "")]
    else:
        parts = [(root, "")]
    digest = hashlib.sha256()
    items: list[Item] = []
    files: list[tuple[int, Path | None]] = []  # (item index, the file it resolves to) of each item that will be read
    held_dirs = [d.resolve() for d, split in parts if split == "eval"]  # the root's rows must not reach into them
    for directory, split in parts:
        splits_inside = directory == root
        source = _caption_source(directory, splits_inside)
        if source is None:
            raise UserError(f"{directory} has no captions: add metadata.jsonl or metadata.csv with file_name and text "
                            f"columns (the Hugging Face image-folder layout), or a .txt beside each image with its caption "
                            f"(a.png + a.txt)")
        if source == SIDECARS:
            rows, raw = _rows_sidecars(directory, splits_inside)
            digest.update(f"{directory.relative_to(root)}\0{SIDECARS}\0{len(raw)}\0".encode() + raw)
        else:
            raw = source.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark (Windows editors)
            digest.update(f"{source.relative_to(root)}\0{len(raw)}\0".encode() + raw)
            rows = (_rows_jsonl if source.suffix == ".jsonl" else _rows_csv)(source, raw)
        for file_name, caption in rows:
            path = (directory / file_name)
            name = os.path.relpath(path, root)
            # Inside: the name as the metadata writes it (relative, no ".." part), not where a symlink in the folder
            # points: a folder of links into a shared image store is the user's own layout, the same trust as its images.
            # A NUL in the name cannot be opened either: it is kept as an item and load() counts it as "bad file name".
            inside = not Path(file_name).is_absolute() and ".." not in Path(file_name).parts
            try:
                st = path.stat() if inside else None
            except (OSError, ValueError, RuntimeError):
                st = None
            # surrogateescape: a non-UTF-8 byte in a file name is hashed as that byte, not an error
            digest.update(f"{name}\0{st.st_size if st else -1}\0{st.st_mtime_ns if st else -1}\0"
                          .encode("utf-8", "surrogateescape"))
            if not inside:
                items.append(Item(name, caption, _refuse_outside, split))
            elif caption is None and source == SIDECARS:
                # a stand-in caption, so the cause counted is the missing file and not "empty caption"
                items.append(Item(name, "-", _refuse_uncaptioned, split))
            elif split == "train" and _within(path, held_dirs):
                items.append(Item(name, caption, _refuse_held_out, split))
            else:
                items.append(Item(name, caption, _read_file(path), split))
                files.append((len(items) - 1, _resolved(path)))
    # The same file under two names (links into one store) must not train and be held out: what a held-out item
    # resolves to never trains.
    held = {f for i, f in files if items[i].split == "eval" and f is not None}
    for i, f in files:
        if items[i].split == "train" and f in held:
            items[i] = Item(items[i].name, items[i].caption, _refuse_held_out, "train")
    return items, digest.hexdigest()


def folder_pool(cfg: DataConfig, path: str, progress: bool = True) -> Pool:
    """The decoded (cached) pool of the image folder at ``path``, at ``cfg.image_size``."""
    items, content_key = folder_items(path)
    return load_or_build(cfg.name, "folder", content_key, cfg.image_size, lambda: items, total=len(items),
                         progress=progress)


def _resolved(path: Path) -> Path | None:
    """Where ``path`` leads after its symlinks (None where it cannot be resolved: it will not be read either)."""
    try:
        return path.resolve()
    except (OSError, ValueError, RuntimeError):
        return None


def _within(path: Path, folders: list[Path]) -> bool:
    """Whether ``path`` resolves inside one of ``folders`` (False where it cannot be resolved)."""
    try:
        resolved = path.resolve()
    except (OSError, ValueError, RuntimeError):
        return False
    return any(resolved.is_relative_to(f) for f in folders)


def _refuse_held_out():
    # A root metadata line naming an image of the test/ folder: that image is held out for evaluation, never trained on.
    raise BadImage("in the held-out test/ folder")


def _refuse_uncaptioned():
    # An image without its .txt in a folder captioned by .txt files.
    raise BadImage("no .txt caption beside it")


def _refuse_outside():
    # A metadata line naming a file outside the folder (../x.png, /etc/...) is skipped, never read.
    raise BadImage("outside the folder")
