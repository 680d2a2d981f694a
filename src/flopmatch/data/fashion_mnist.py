"""``fashion-mnist``: Zalando's Fashion-MNIST, 70,000 28x28 grey product photos in 10 classes, with captions.

Files: the Debian package ``dataset-fashion-mnist`` installs the four gzipped IDX files of the original
release (https://github.com/zalandoresearch/fashion-mnist) under :data:`DATA_DIR`. The 60,000
``train-*`` images are the training split, the 10,000 ``t10k-*`` images the evaluation split (the
release's own test set). IDX format (http://yann.lecun.com/exdb/mnist/, "FILE FORMATS"): two zero
bytes, a type byte (0x08 = unsigned byte), the number of dimensions, then each dimension as a
big-endian uint32, then the data in row-major order.

Every image goes through the same decoding as every other real source
(:func:`flopmatch.data.images.load_image`, counted as a "grey" conversion), handed over as an 8-bit
binary PGM (a 13-byte header in front of the raw pixels: no image encoder needed, and Pillow decodes
it in ~0.1 ms: ~11 s for all 70,000 on one core, once per image size). The class label of each item is
kept in the pool (``Pool.labels``).

Captions: one of :data:`TEMPLATES` around the class phrase ("a photo of a sneaker", "an ankle boot,
product photo"), chosen by a sha256 of the item's name (split and index), so the same image always
gets the same caption on every machine and Python run. :func:`caption_class` maps a caption or prompt
in this vocabulary back to its class, for scoring prompt following.

Cache key: the IDX files' names, sizes and modification times, and a digest of the caption
vocabulary (editing a template re-captions the set).
"""

from __future__ import annotations

import gzip
import hashlib
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from flopmatch.config import DataConfig
from flopmatch.data.pool import Item, Pool, load_or_build
from flopmatch.errors import UserError

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {  # flopmatch split -> (images, labels) file names of the original release
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "eval": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
INSTALL_HINT = "apt-get install dataset-fashion-mnist"
REINSTALL_HINT = "apt-get install --reinstall dataset-fashion-mnist"
NUM_ITEMS = {"train": 60000, "eval": 10000}  # per split, in the release

# Label order of the release (its README's "Labels" table): CLASSES[label] is the class of an item.
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# The noun phrase each caption uses for a class, with its article.
PHRASES = ("a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat", "a sandal", "a shirt", "a sneaker",
           "a bag", "an ankle boot")
TEMPLATES = (
    "a photo of {}",
    "{}, product photo",
    "a black and white picture of {}",
    "a grayscale photo of {}",
    "a small image of {}",
    "{} on a black background",
    "a catalog photo of {}",
)
# Words that name each class in captions and user prompts (singular and plural, common synonyms).
# The word lists are disjoint and no template word is among them, so a caption names exactly one class.
ALIASES = (
    ("t-shirt", "t-shirts", "tshirt", "tshirts", "t shirt", "t shirts", "tee", "tees", "top", "tops"),
    ("trouser", "trousers", "pants"),
    ("pullover", "pullovers", "sweater", "sweaters", "jumper", "jumpers"),
    ("dress", "dresses"),
    ("coat", "coats", "jacket", "jackets"),
    ("sandal", "sandals"),
    ("shirt", "shirts"),
    ("sneaker", "sneakers", "trainers"),
    ("bag", "bags", "handbag", "handbags"),
    ("ankle boot", "ankle boots", "boot", "boots"),
)
_ALIAS_CLASS = {alias: c for c, aliases in enumerate(ALIASES) for alias in aliases}
# Longest alternative first, so "t shirt" wins over "shirt" and "ankle boot" over "boot"; a word may not
# continue with a letter, digit or hyphen on either side ("shirt" is not found inside "t-shirt").
_ALIAS_RE = re.compile(r"(?<![\w-])(" + "|".join(re.escape(a) for a in sorted(_ALIAS_CLASS, key=len, reverse=True))
                       + r")(?![\w-])", re.IGNORECASE)


def caption_class(caption: str) -> int | None:
    """The class index a caption or prompt names ("a photo of a sneaker" -> 7), or None if it names none or several."""
    found = {_ALIAS_CLASS[m.group(1).lower()] for m in _ALIAS_RE.finditer(" ".join(caption.split()))}
    return found.pop() if len(found) == 1 else None


def _digest_int(text: str) -> int:
    # sha256, never Python's hash(): that one is salted per process (PYTHONHASHSEED).
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def make_caption(name: str, label: int) -> str:
    """The caption of item ``name`` ("train/00042") of class ``label``: a template chosen by a hash of the name."""
    return TEMPLATES[_digest_int(name) % len(TEMPLATES)].format(PHRASES[label])


def read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes -> a uint8 array of its dimensions. UserError if missing or damaged."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"fashion-mnist: {path} not found; install it with `{INSTALL_HINT}`") from None
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"fashion-mnist: {path} is damaged ({e}); reinstall it with `{REINSTALL_HINT}`") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise UserError(f"fashion-mnist: {path} is not an IDX file of unsigned bytes; reinstall it with "
                        f"`{REINSTALL_HINT}`")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header]) if len(raw) >= header else ()
    if len(dims) != ndim or len(raw) - header != int(np.prod(dims)):
        raise UserError(f"fashion-mnist: {path} is truncated; reinstall it with `{REINSTALL_HINT}`")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _pgm(image: np.ndarray) -> bytes:
    """A (H, W) uint8 array as binary PGM bytes (Netpbm "P5"), which load_image decodes like any file."""
    h, w = image.shape
    return f"P5 {w} {h} 255\n".encode() + image.tobytes()


def _paths() -> dict[str, tuple[Path, Path]]:
    paths = {split: (DATA_DIR / images, DATA_DIR / labels) for split, (images, labels) in FILES.items()}
    missing = [str(p) for pair in paths.values() for p in pair if not p.is_file()]
    if missing:
        raise UserError(f"fashion-mnist: {', '.join(missing)} not found; install the set with `{INSTALL_HINT}`")
    return paths


def content_key(limit: int | None = None) -> str:
    """Digest of the IDX files' names, sizes and mtimes, the caption vocabulary and ``limit``. UserError if missing."""
    digest = hashlib.sha256(repr((PHRASES, TEMPLATES, limit)).encode())
    for pair in _paths().values():
        for p in pair:
            st = p.stat()
            digest.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def fashion_mnist_items(limit: int | None = None) -> Iterator[Item]:
    """The items of both splits (training first), at most ``limit`` per split; reads and checks the IDX files."""
    for split, (image_path, label_path) in _paths().items():
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or labels.max(initial=0) >= len(CLASSES):
            raise UserError(f"fashion-mnist: {image_path.name} ({images.shape}) and {label_path.name} ({labels.shape}) "
                            f"do not match; reinstall them with `{REINSTALL_HINT}`")
        file_split = "train" if split == "train" else "test"
        for i in range(len(images) if limit is None else min(limit, len(images))):
            name = f"{file_split}/{i:05d}"  # split and index in the original file
            label = int(labels[i])
            yield Item(name, make_caption(name, label), lambda image=images[i]: _pgm(image), split, label)


def fashion_mnist_pool(cfg: DataConfig, arg: str = "", progress: bool = True, limit: int | None = None) -> Pool:
    """The decoded (cached) Fashion-MNIST pool at ``cfg.image_size``, with labels; ``limit`` caps each split (tests)."""
    total = sum(n if limit is None else min(n, limit) for n in NUM_ITEMS.values())  # for the progress bar
    return load_or_build(cfg.name, "fashion-mnist", content_key(limit), cfg.image_size,
                         lambda: fashion_mnist_items(limit), total=total, progress=progress)
