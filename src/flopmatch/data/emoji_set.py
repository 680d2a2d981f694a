"""``emoji``: every fully-qualified emoji rendered with Noto Color Emoji, captioned by its CLDR name.

Images: each emoji of ``emoji.EMOJI_DATA`` (PyPI ``emoji``) with status "fully_qualified" is drawn with
the Noto Color Emoji font (Debian ``fonts-noto-color-emoji``) through Pillow. The font is a CBDT
colour-bitmap font whose only strike FreeType loads at size 109 (glyph box 136x128 px), drawn with
``embedded_color=True``; ZWJ sequences, flags and keycaps become one glyph through Pillow's raqm
layout (HarfBuzz) when it is installed. The glyph is centred on a :data:`CANVAS` px square of a light
solid colour picked from :data:`BACKGROUNDS` by a hash of the emoji, encoded as PNG and decoded by
:func:`flopmatch.data.images.load_image` like every other real source (the render is the "decode";
the pool cache means it happens once per image size: ~11 s for all ~3,800 on one core).

Emoji the font cannot draw are skipped and counted: "not in font" when nothing is drawn (emoji newer
than the font), "not in font (drawn as pieces)" when a sequence falls apart into several glyphs
(a ZWJ sequence newer than the font, or no raqm layout).

Captions: the English CLDR name (``":woman_detective:"`` -> "woman detective", skin tones last after
commas, flags as "flag of Japan") inside one of :data:`TEMPLATES`, chosen by a hash of the emoji.

Split by base emoji (:func:`base_group`), so no variant of an emoji is trained on while another is
evaluated: an emoji's group key is the emoji with

1. variation selectors (U+FE0E, U+FE0F) and skin-tone modifiers (U+1F3FB..U+1F3FF) removed;
2. gender signs joined by ZWJ (U+200D U+2640 / U+2642) removed: "woman detective" -> "detective";
3. gendered people replaced by the gender-neutral one of :data:`NEUTRAL` (man/woman -> person,
   boy/girl -> child, prince/princess -> person with crown, the single-codepoint couples -> "people
   holding hands", ...), so "woman health worker" and "health worker" share a group;
4. the ZWJ spellings of multi-person emoji mapped to their single-codepoint emoji (:data:`SEQUENCES`:
   "kiss: woman, man, dark skin tone" -> 💏), and every family (people and children joined by ZWJ) -> 👪.

A group is in the evaluation split when the first 8 bytes of the sha256 of its key, read as a fraction,
fall below :data:`EVAL_FRACTION` (about a tenth of the groups; the items' share varies with group sizes).

Cache key: the font's name, size and mtime, the ``emoji``, Pillow and raqm versions, and a digest of
every item's name, caption and split.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path

import emoji as emoji_data
import PIL
from PIL import Image, ImageDraw, ImageFont, features

from flopmatch.config import DataConfig
from flopmatch.data.images import BadImage
from flopmatch.data.pool import Item, Pool, load_or_build
from flopmatch.errors import UserError

FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_SIZE = 109  # the font's one bitmap strike: FreeType refuses other sizes for CBDT fonts
INSTALL_HINT = "apt-get install fonts-noto-color-emoji"
CANVAS = 144  # px, square: the 136x128 glyph box with a margin, before load_image resizes it
BACKGROUNDS = ((255, 255, 255), (236, 236, 236), (255, 244, 214), (222, 236, 255), (255, 228, 236), (226, 246, 226))
TEMPLATES = ("{name} emoji", "an emoji of {a_name}", "{name}, as an emoji")
EVAL_FRACTION = 0.1
RENDER_VERSION = 1  # bump when drawing, canvas, backgrounds or captions change: keys the cache

ZWJ = "\u200d"
SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))
SELECTORS = frozenset("\ufe0e\ufe0f")
GENDER_SIGNS = (ZWJ + "\u2640", ZWJ + "\u2642")  # ZWJ + female sign / male sign (selectors already removed)
NEUTRAL = {
    "\U0001F468": "\U0001F9D1", "\U0001F469": "\U0001F9D1",  # man, woman -> person
    "\U0001F466": "\U0001F9D2", "\U0001F467": "\U0001F9D2",  # boy, girl -> child
    "\U0001F474": "\U0001F9D3", "\U0001F475": "\U0001F9D3",  # old man, old woman -> older person
    "\U0001F934": "\U0001FAC5", "\U0001F478": "\U0001FAC5",  # prince, princess -> person with crown
    "\U0001F385": "\U0001F9D1\u200d\U0001F384", "\U0001F936": "\U0001F9D1\u200d\U0001F384",  # Santa, Mrs. Claus -> Mx Claus
    "\U0001FAC3": "\U0001FAC4", "\U0001F930": "\U0001FAC4",  # pregnant man, pregnant woman -> pregnant person
    "\U0001F57A": "\U0001F483",  # man dancing -> woman dancing (there is no neutral dancer)
    "\U0001F46B": "\U0001F9D1\u200d\U0001F91D\u200d\U0001F9D1",  # woman and man holding hands -> people holding hands
    "\U0001F46C": "\U0001F9D1\u200d\U0001F91D\u200d\U0001F9D1",  # men holding hands
    "\U0001F46D": "\U0001F9D1\u200d\U0001F91D\u200d\U0001F9D1",  # women holding hands
}
SEQUENCES = {  # (after steps 1-3) the ZWJ spelling of a multi-person emoji -> its single-codepoint emoji
    "\U0001F9D1\u200d\u2764\u200d\U0001F48B\u200d\U0001F9D1": "\U0001F48F",  # kiss
    "\U0001F9D1\u200d\u2764\u200d\U0001F9D1": "\U0001F491",  # couple with heart
    "\U0001F9D1\u200d\U0001F430\u200d\U0001F9D1": "\U0001F46F",  # people with bunny ears
    "\U0001F9D1\u200d\U0001FAEF\u200d\U0001F9D1": "\U0001F93C",  # people wrestling
    "\U0001FAF1\u200d\U0001FAF2": "\U0001F91D",  # handshake with two skin tones
}
FAMILY = "\U0001F46A"
_FAMILY_MEMBERS = frozenset("\U0001F9D1\U0001F9D2")  # person, child (after step 3)
_TONE_NAME = re.compile(r" ((?:light|medium-light|medium|medium-dark|dark) skin tone)")


def emoji_list() -> list[str]:
    """Every fully-qualified emoji of the installed ``emoji`` package, in code point order."""
    qualified = emoji_data.STATUS["fully_qualified"]
    return sorted(e for e, v in emoji_data.EMOJI_DATA.items() if v["status"] == qualified)


def item_name(e: str) -> str:
    """A stable file-like name: the code points in hex, "1f44d-1f3fd" (as Noto names its images)."""
    return "-".join(f"{ord(c):04x}" for c in e)


def is_flag(e: str) -> bool:
    """Whether ``e`` is a flag: a pair of regional indicators or a tag sequence (England, Scotland, Wales)."""
    return "\U0001F1E6" <= e[0] <= "\U0001F1FF" or any("\U000E0020" <= c <= "\U000E007F" for c in e)


def readable_name(e: str) -> str:
    """The CLDR name as words: ":woman_detective:" -> "woman detective"; "flag of Japan"; skin tones last, after
    commas: ":man_dark_skin_tone_blond_hair:" -> "man blond hair, dark skin tone"."""
    name = emoji_data.EMOJI_DATA[e]["en"].strip(":").replace("_", " ")
    tones = _TONE_NAME.findall(name)
    name = ", ".join([_TONE_NAME.sub("", name), *tones])
    return f"flag of {name}" if is_flag(e) else name


def make_caption(e: str) -> str:
    """A caption of emoji ``e``: its name in a template chosen by a hash of the emoji."""
    name = readable_name(e)
    article = "an" if name[:1].lower() in "aeiou" else "a"
    template = TEMPLATES[_digest_int("caption:" + e) % len(TEMPLATES)]
    return template.format(name=name, a_name=f"{article} {name}")


def base_group(e: str) -> str:
    """The key shared by an emoji and its skin-tone and gender variants (the rule in the module docstring)."""
    s = "".join(c for c in e if c not in SKIN_TONES and c not in SELECTORS)
    for sign in GENDER_SIGNS:
        s = s.replace(sign, "")
    s = "".join(NEUTRAL.get(c, c) for c in s)
    s = SEQUENCES.get(s, s)
    parts = s.split(ZWJ)
    if len(parts) > 1 and all(p in _FAMILY_MEMBERS for p in parts):
        return FAMILY
    return s


def split_of(e: str) -> str:
    """"eval" for emoji whose base group hashes into the lowest EVAL_FRACTION, else "train"."""
    return "eval" if _digest_int("group:" + base_group(e)) / 2**64 < EVAL_FRACTION else "train"


def _digest_int(text: str) -> int:
    # sha256, never Python's hash(): that one is salted per process (PYTHONHASHSEED).
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


@lru_cache(maxsize=1)
def load_font() -> ImageFont.FreeTypeFont:
    """The Noto Color Emoji font at its bitmap size. UserError naming the package when it is missing."""
    if not FONT_PATH.is_file():
        raise UserError(f"emoji: the font {FONT_PATH} is not installed; install it with `{INSTALL_HINT}`")
    try:
        return ImageFont.truetype(str(FONT_PATH), FONT_SIZE)
    except OSError as e:
        raise UserError(f"emoji: cannot load {FONT_PATH} at size {FONT_SIZE} ({e}); reinstall it with "
                        f"`apt-get install --reinstall fonts-noto-color-emoji`") from None


def render(e: str, font: ImageFont.FreeTypeFont | None = None) -> Image.Image:
    """Emoji ``e`` as an RGB CANVAS x CANVAS image on its background. BadImage("not in font...") if it cannot be drawn."""
    font = font or load_font()
    one = font.getlength("\u263a")  # advance of one glyph (136 px at size 109)
    if font.getlength(e) > 1.5 * one:  # a sequence the font has no ligature for is laid out glyph by glyph
        raise BadImage("not in font (drawn as pieces)")
    left, top, right, bottom = font.getbbox(e)
    glyph = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    xy = ((CANVAS - (right - left)) // 2 - left, (CANVAS - (bottom - top)) // 2 - top)
    ImageDraw.Draw(glyph).text(xy, e, font=font, embedded_color=True)
    if glyph.getbbox() is None:  # missing glyphs are empty in this font (no visible .notdef box)
        raise BadImage("not in font")
    background = Image.new("RGBA", (CANVAS, CANVAS), BACKGROUNDS[_digest_int("background:" + e) % len(BACKGROUNDS)] + (255,))
    return Image.alpha_composite(background, glyph).convert("RGB")


def _png(e: str) -> Callable[[], bytes]:
    def load() -> bytes:
        out = io.BytesIO()
        render(e).save(out, format="PNG", compress_level=1)  # fast, lossless: it is decoded right away
        return out.getvalue()
    return load


def emoji_items(only: Iterable[str] | None = None) -> tuple[list[Item], str]:
    """The items (all fully-qualified emoji, or those in ``only``) and the content key. UserError without the font."""
    load_font()  # fail before anything else when the font is missing
    emojis = emoji_list() if only is None else sorted(set(only))
    items = [Item(item_name(e), make_caption(e), _png(e), split_of(e)) for e in emojis]
    st = FONT_PATH.stat()
    digest = hashlib.sha256(repr((RENDER_VERSION, FONT_PATH.name, st.st_size, st.st_mtime_ns, emoji_data.__version__,
                                  PIL.__version__, features.version("raqm"))).encode())
    for item in items:
        digest.update(f"{item.name}\0{item.caption}\0{item.split}\0".encode())
    return items, digest.hexdigest()


def emoji_pool(cfg: DataConfig, arg: str = "", progress: bool = True, only: Iterable[str] | None = None) -> Pool:
    """The rendered (cached) emoji pool at ``cfg.image_size``; ``only`` restricts it to some emoji (tests)."""
    items, content_key = emoji_items(only)
    return load_or_build(cfg.name, "emoji", content_key, cfg.image_size, lambda: items, total=len(items),
                         progress=progress)
