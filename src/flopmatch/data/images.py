"""One user image -> one training image: decode, convert to RGB, resize and centre-crop, with causes counted.

Every real-data source (image folders, WebDataset shards, Hugging Face datasets) goes through
:func:`load_image`, so all of them treat bad and unusual images the same way:

- undecodable, truncated or empty files are skipped, counted under a cause ("unreadable",
  "truncated");
- grey, palette, CMYK, 16-bit and alpha images are converted to 8-bit RGB and counted under a
  conversion ("grey", "palette", "cmyk", "16-bit", "alpha"); transparency is composited on white,
  as browsers and image viewers show it;
- the image is centre-cropped to a square and resized to the configured side with Pillow's
  antialiased bicubic filter (``ImageOps.fit``), the preprocessing DiT and LlamaGen use for their
  ImageNet loaders (centre crop, then resize) and the filter clean-fid recommends over torch's.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's decompression-bomb guard: a 20k x 20k image is 400 M pixels; anything larger is refused as
# unreadable (it would take GiBs to decode for a 64 px training image).
MAX_PIXELS = 400_000_000
# Pillow warns above MAX_IMAGE_PIXELS (89.5 M by default) and refuses above twice that; raise its guard to ours so
# a 108 MP phone photo decodes (process-wide, but every image flopmatch opens goes through here).
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class BadImage(Exception):
    """An image that cannot be used; ``cause`` is the short name it is counted under."""

    def __init__(self, cause: str):
        super().__init__(cause)
        self.cause = cause


@dataclass
class Tally:
    """What preparing a source skipped and converted, by cause, plus a few example file names per skip cause."""

    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # cause -> up to 5 names
    upscaled: int = 0  # usable images whose shorter side was below the configured side (enlarged, so blurred)

    def skip(self, cause: str, name: str) -> None:
        self.skipped[cause] += 1
        names = self.examples.setdefault(cause, [])
        if len(names) < 5:
            names.append(name)

    def to_dict(self) -> dict:
        return {"skipped": dict(sorted(self.skipped.items())), "converted": dict(sorted(self.converted.items())),
                "skipped_examples": self.examples, "upscaled": self.upscaled}

    def lines(self) -> list[str]:
        """Human-readable summary lines (empty when nothing was skipped or converted)."""
        out = []
        if self.skipped:
            out.append("skipped " + ", ".join(f"{n} {c}" for c, n in sorted(self.skipped.items())))
        if self.converted:
            out.append("converted to RGB " + ", ".join(f"{n} {c}" for c, n in sorted(self.converted.items())))
        if self.upscaled:
            out.append(f"upscaled {self.upscaled} smaller than the image side (enlarged, so blurred)")
        return out


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """``img`` as 8-bit RGB and the conversion made (None if it already was RGB)."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode == "P":  # palette images may carry transparency in their info dict
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode == "RGB":
            return img, "palette"
        mode, cause = "RGBA", "palette"
    else:
        cause = None
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), cause or "alpha"
    if mode == "CMYK":
        return img.convert("RGB"), "cmyk"
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit grey: scale the full range to 8 bits (Pillow's convert("L") clips at 255).
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        grey = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB"), "16-bit"
    if mode in ("L", "1"):
        return img.convert("RGB"), "grey"
    return img.convert("RGB"), mode.lower()


def load_image(data: bytes | str | Path, size: int, tally: Tally | None = None) -> np.ndarray:
    """Decode an image (file path or encoded bytes) to a (size, size, 3) uint8 array, centre-cropped and resized.

    Raises :class:`BadImage` ("unreadable" | "truncated") for a file that cannot be used; conversions to
    RGB are counted in ``tally.converted``, images whose shorter side is below ``size`` in ``tally.upscaled``.
    """
    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise BadImage("unreadable")
                img.draft(img.mode, (size, size))  # JPEG: decode at a reduced scale that still covers `size`
                img.load()
                # Phone photos are stored sideways with an EXIF Orientation tag; apply it as viewers do.
                img = ImageOps.exif_transpose(img)
                rgb, conversion = _to_rgb(img)
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage("missing file") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("unreadable") from None
    except (OSError, SyntaxError, ValueError) as e:  # Pillow reports truncated/corrupt data as OSError/SyntaxError
        raise BadImage("truncated" if "truncat" in str(e).lower() else "unreadable") from None
    if conversion and tally is not None:
        tally.converted[conversion] += 1
    if tally is not None and min(rgb.size) < size:
        tally.upscaled += 1
    out = ImageOps.fit(rgb, (size, size), Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    return np.asarray(out, dtype=np.uint8)


def clean_caption(raw: bytes | str | None) -> str | None:
    """A caption as one line of text, or None if it is empty; raises BadImage("non-UTF-8 caption")."""
    if raw is None:
        return None
    if not isinstance(raw, (str, bytes, bytearray)):  # a number, boolean, list... in the metadata
        raise BadImage("caption not text")
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadImage("non-UTF-8 caption") from None
    elif any("\udc80" <= ch <= "\udcff" for ch in raw):  # surrogate-escaped bytes from a non-UTF-8 file
        raise BadImage("non-UTF-8 caption")
    text = " ".join(str(raw).split())  # newlines and runs of spaces -> one space
    return text or None
