"""Procedural shapes: 32x32 RGB scenes of one or two coloured objects, with captions and ground truth.

A scene is a pure function of ``(cfg, split, index)``: the per-index ``random.Random`` is seeded
with a stable BLAKE2 digest of ``(seed, split, index, attempt)`` (never Python's salted ``hash``),
and only ``Random.random()`` is used (its stream is guaranteed across Python versions, unlike
``choice``/``randrange``). Held-out colour+shape combos are removed from the training split by
retrying the whole scene with ``attempt = 1, 2, ...``, so index -> scene stays a pure function and
scenes without a held-out combo are identical with or without a holdout. Held-out arrangements
(``holdout_relations``: a shape pair in a spatial relation, e.g. "triangle above circle", whatever the
colours) are removed from the training split the same way. The sets the study presets hold out are
``flopmatch.study.presets.HOLDOUT_COMBOS`` and ``HOLDOUT_RELATIONS``.

Geometry (fractions of the image side S, so it scales with ``image_size``): small objects are
0.25 S across (8 px at 32), large 0.42 S (~13.4 px); a lone object sits at one of five centres
(left/right/top/bottom/center, 0.25 S apart) with +-0.04 S jitter; two objects are separated by a
gap >= 0.06 S between their bounding boxes along the relation's axis and are offset by at most
0.12 S along the other axis, so the relation is unambiguous and the objects never overlap.
Rendering draws with Pillow at 4x and box-downsamples (area average: anti-aliased edges, exact
colours inside, no ringing that could bleed between objects).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from flopmatch.errors import UserError
from flopmatch.files import cache_dir, load_tensors, save_tensors

# Bump when rendering or scene sampling changes: it keys every on-disk cache of these images.
CODE_VERSION = 1

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 90, 240),
    "yellow": (245, 225, 40),
    "purple": (150, 60, 210),
    "orange": (250, 140, 20),
    "cyan": (40, 215, 225),
    "white": (245, 245, 245),
}
# Neutral, dark backgrounds: never one of COLORS, so an object always contrasts with its background.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "charcoal": (55, 55, 60),
    "gray": (105, 105, 105),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "center", "right", "top", "bottom")
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
SPLITS: tuple[str, ...] = ("train", "eval")

SIZE_FRACTION = {"small": 0.25, "large": 0.42}  # object extent (bounding-box side) / image side
POSITION_CENTRES = {  # lone-object centre (x, y) as fractions of the image side
    "left": (0.25, 0.5), "center": (0.5, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
}
_JITTER = 0.04  # lone-object centre jitter, fraction of S
_MARGIN = 0.03  # min distance object <-> image border, fraction of S
_GAP = 0.06  # min gap between the two objects' boxes along the relation axis, fraction of S
_CROSS_AXIS = 0.06  # each object's offset from the middle across the relation axis, fraction of S
_SUPERSAMPLE = 4
_MAX_ATTEMPTS = 10_000

# Caption vocabulary: first entry of each tuple is the canonical word.
SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big")}
COLOR_WORDS = {c: (c,) for c in COLORS} | {"purple": ("purple", "violet")}
SHAPE_WORDS = {s: (s,) for s in SHAPES} | {"circle": ("circle", "disk"), "diamond": ("diamond", "rhombus"),
                                          "cross": ("cross", "plus")}
POSITION_WORDS = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle", "at the center"),
}
RELATION_WORDS = {
    "to the left of": ("to the left of", "left of", "on the left of"),
    "to the right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}
ONE_OBJECT_TEMPLATES = (
    "a {o} {pos}",
    "{c} {s}, {z}, {pos}",
    "there is a {o} {pos}",
    "{pos}, a {o}",
    "an image of a {o} {pos}",
)
TWO_OBJECT_TEMPLATES = (
    "a {o1} {rel} a {o2}",
    "{o1} {rel} {o2}",
    "there is a {o1} {rel} a {o2}",
    "a {o1} sits {rel} a {o2}",
    "an image of a {o1} {rel} a {o2}",
)


@dataclass(frozen=True)
class ShapesConfig:
    """The shapes dataset: seed, image side in pixels, split sizes, P(two objects), held-out combos."""

    seed: int = 0
    image_size: int = 32
    num_train: int = 20000
    num_eval: int = 2000
    two_object_prob: float = 0.5
    # "colour shape" combos (e.g. "red triangle") that no TRAINING scene contains; eval scenes may.
    holdout: tuple[str, ...] = ()
    # "shape relation shape" arrangements (e.g. "triangle above circle", any colours) that no TRAINING scene
    # contains; the mirrored wording ("circle below triangle") names the same arrangement.
    holdout_relations: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "holdout", tuple(self.holdout))  # JSON round trips give lists
        object.__setattr__(self, "holdout_relations", tuple(self.holdout_relations))
        if self.image_size < 16:
            raise UserError(f"shapes image_size must be >= 16, got {self.image_size}")
        if self.num_train < 0 or self.num_eval < 0:
            raise UserError(f"shapes num_train/num_eval must be >= 0, got {self.num_train}/{self.num_eval}")
        if not 0.0 <= self.two_object_prob <= 1.0:
            raise UserError(f"shapes two_object_prob must be in [0, 1], got {self.two_object_prob}")
        for combo in self.holdout:
            parts = str(combo).split()
            if len(parts) != 2 or parts[0] not in COLORS or parts[1] not in SHAPES:
                raise UserError(f"shapes holdout entry {combo!r} must be 'colour shape' with colour in "
                                f"{list(COLORS)} and shape in {list(SHAPES)}, e.g. 'red triangle'")
        if len(set(self.holdout)) >= len(COLORS) * len(SHAPES):
            raise UserError("shapes holdout removes every colour+shape combo; keep at least one for training")
        arrangements = {relation_key(entry) for entry in self.holdout_relations}  # raises on a bad entry
        if len(arrangements) >= 2 * len(SHAPES) ** 2:
            raise UserError("shapes holdout_relations removes every arrangement; keep at least one for training")

    def fingerprint(self) -> str:
        """16-hex-digit digest of every field and CODE_VERSION (keys caches of anything derived from the data)."""
        fields = dataclasses.asdict(self)
        if not fields["holdout_relations"]:  # added later: configs without it keep their digests (and caches)
            del fields["holdout_relations"]
        payload = json.dumps({"version": CODE_VERSION, **fields}, sort_keys=True)
        return hashlib.blake2b(payload.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class Obj:
    """One object: colour/shape/size names and its bounding-box centre (cx, cy) in pixels of its scene."""

    color: str
    shape: str
    size: str
    cx: float
    cy: float

    def names(self) -> dict:
        """The object's attribute names as a JSON-able dict {color, shape, size}."""
        return {"color": self.color, "shape": self.shape, "size": self.size}


@dataclass(frozen=True)
class Scene:
    """A scene: objects in caption order; ``objects[0] <relation> objects[1]`` or a lone object's position."""

    objects: tuple[Obj, ...]
    relation: str | None
    position: str | None
    background: str
    caption: str
    image_size: int = 32  # the pixel grid cx/cy refer to

    def attrs(self) -> dict:
        """JSON-able ground truth; ``objects`` in canonical (left-to-right / top-to-bottom) order."""
        caption_objects = [o.names() for o in self.objects]
        return {**canonical_attrs(caption_objects, self.relation, self.position), "background": self.background}


def canonical_attrs(caption_objects: list[dict], relation: str | None, position: str | None) -> dict:
    """Attributes determinable from an image, from objects in caption order and a canonical relation.

    Two objects are put in canonical order (left-to-right for a horizontal relation, top-to-bottom
    for a vertical one) so an image-only classifier can predict them without knowing the caption.
    """
    objs = [dict(o) for o in caption_objects]
    if len(objs) == 2 and relation is not None:
        axis = "horizontal" if relation in ("to the left of", "to the right of") else "vertical"
        canonical = objs if relation in ("to the left of", "above") else objs[::-1]
    else:
        axis, canonical = None, objs
    return {"count": len(objs), "objects": canonical, "axis": axis,
            "position": position if len(objs) == 1 else None,
            "caption_objects": objs, "relation": relation if len(objs) == 2 else None}


def relation_key(entry: str) -> tuple[str, str, str]:
    """A ``holdout_relations`` entry ("triangle above circle", "square to the left of cross", ...) as its
    canonical arrangement (axis, first shape, second shape): first = left (horizontal) or top (vertical)."""
    text = " ".join(str(entry).lower().split())
    for relation in RELATIONS:
        a, sep, b = text.partition(f" {relation} ")
        if sep and a in SHAPES and b in SHAPES:
            axis = "horizontal" if relation in ("to the left of", "to the right of") else "vertical"
            return (axis, a, b) if relation in ("to the left of", "above") else (axis, b, a)
    raise UserError(f"shapes holdout_relations entry {entry!r} must be 'shape relation shape' with shapes in "
                    f"{list(SHAPES)} and relation one of {list(RELATIONS)}, e.g. 'triangle above circle'")


def holdout_hits(attrs: dict, holdout, holdout_relations) -> tuple[bool, bool]:
    """(names a held-out colour+shape combo, shows a held-out arrangement) for ``attrs`` in the form of
    ``Scene.attrs()`` or :func:`parse_caption` (attributes a prompt leaves out never match)."""
    combos = {f"{o['color']} {o['shape']}" for o in attrs["objects"] if o["color"] and o["shape"]}
    combo = bool(combos & set(holdout))
    arrangement = None
    if attrs["count"] == 2 and attrs["axis"] is not None:
        arrangement = (attrs["axis"], attrs["objects"][0]["shape"], attrs["objects"][1]["shape"])
    relation = arrangement is not None and arrangement in {relation_key(e) for e in holdout_relations}
    return combo, relation


def _pick(rng: random.Random | None, seq):
    """seq[0] without rng (canonical), else a uniform element using only rng.random()."""
    if rng is None:
        return seq[0]
    return seq[min(int(rng.random() * len(seq)), len(seq) - 1)]


def caption_for(objects, relation: str | None = None, position: str | None = None, *,
                template: int | None = None, rng: random.Random | None = None) -> str:
    """A caption naming colour, shape and size of every object plus the position or relation.

    ``objects``: 1 or 2 ``Obj`` (or dicts with color/shape/size), in caption order. Without ``rng``
    the canonical words are used; ``template`` picks a template (default: random with ``rng``, else 0).
    """
    names = [o.names() if isinstance(o, Obj) else o for o in objects]
    templates = ONE_OBJECT_TEMPLATES if len(names) == 1 else TWO_OBJECT_TEMPLATES
    if template is None:
        template = 0 if rng is None else int(rng.random() * len(templates)) % len(templates)
    words = [(_pick(rng, SIZE_WORDS[n["size"]]), _pick(rng, COLOR_WORDS[n["color"]]),
              _pick(rng, SHAPE_WORDS[n["shape"]])) for n in names]
    phrases = [" ".join(w) for w in words]
    if len(names) == 1:
        z, c, s = words[0]
        text = templates[template].format(o=phrases[0], z=z, c=c, s=s, pos=_pick(rng, POSITION_WORDS[position]))
    else:
        text = templates[template].format(o1=phrases[0], o2=phrases[1], rel=_pick(rng, RELATION_WORDS[relation]))
    # "a" before a vowel-initial word (only sizes follow articles today; keeps future templates right)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


# ---------------------------------------------------------------- parsing captions and prompts

_SIZE_LOOKUP = {w: k for k, ws in SIZE_WORDS.items() for w in ws}
_COLOR_LOOKUP = {w: k for k, ws in COLOR_WORDS.items() for w in ws}
_SHAPE_LOOKUP = {w: k for k, ws in SHAPE_WORDS.items() for w in ws} | {"disc": "circle"}
_POSITION_LOOKUP = {"left": "left", "right": "right", "top": "top", "bottom": "bottom",
                    "center": "center", "centre": "center", "middle": "center"}
# Longest phrases first so "to the left of" wins over "left of".
_RELATION_PATTERNS = sorted([(p, k) for k, ps in RELATION_WORDS.items() for p in ps] + [("underneath", "below")],
                            key=lambda x: -len(x[0]))


def _parse_object(tokens: list[str]) -> dict:
    def first(lookup):
        return next((lookup[t] for t in tokens if t in lookup), None)

    return {"color": first(_COLOR_LOOKUP), "shape": first(_SHAPE_LOOKUP), "size": first(_SIZE_LOOKUP)}


def parse_caption(caption: str) -> dict:
    """Map a caption (ours or a user's prompt in the same vocabulary) back to its attributes.

    Returns the keys of ``Scene.attrs()`` except ``background``; attributes a prompt does not name
    are None. Raises UserError when no colour, shape or size word is found at all.
    """
    text = " " + " ".join(re.sub(r"[^a-z ]", " ", caption.lower()).split()) + " "
    relation = None
    for phrase, rel in _RELATION_PATTERNS:
        i = text.find(f" {phrase} ")
        if i >= 0:
            relation, parts = rel, [text[:i], text[i + len(phrase) + 1:]]
            break
    else:
        parts = [text]
    objects = [_parse_object(p.split()) for p in parts]
    if all(v is None for o in objects for v in o.values()):
        raise UserError(f"cannot parse caption {caption!r}: it names no colour ({', '.join(COLORS)}), "
                        f"shape ({', '.join(SHAPES)}) or size ({', '.join(SIZES)})")
    position = None
    if relation is None:
        position = next((_POSITION_LOOKUP[t] for t in text.split() if t in _POSITION_LOOKUP), None)
    return canonical_attrs(objects, relation, position)


# ---------------------------------------------------------------- sampling scenes

def _stable_seed(*parts) -> int:
    """A 64-bit integer from a BLAKE2 digest of the parts (stable across processes and Python versions)."""
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def _sample_object(rng: random.Random) -> tuple[str, str, str]:
    return _pick(rng, tuple(COLORS)), _pick(rng, SHAPES), _pick(rng, SIZES)


def _sample_scene(cfg: ShapesConfig, rng: random.Random) -> Scene:
    S = float(cfg.image_size)
    background = _pick(rng, tuple(BACKGROUNDS))
    if rng.random() >= cfg.two_object_prob:
        color, shape, size = _sample_object(rng)
        position = _pick(rng, POSITIONS)
        half = SIZE_FRACTION[size] * S / 2
        lo, hi = _MARGIN * S + half, S - _MARGIN * S - half  # keep the whole object inside the image
        fx, fy = POSITION_CENTRES[position]
        cx = min(max(fx * S + (2 * rng.random() - 1) * _JITTER * S, lo), hi)
        cy = min(max(fy * S + (2 * rng.random() - 1) * _JITTER * S, lo), hi)
        obj = Obj(color, shape, size, cx, cy)
        return Scene((obj,), None, position, background, caption_for([obj], None, position, rng=rng), cfg.image_size)

    relation = _pick(rng, RELATIONS)
    a = _sample_object(rng)
    b = _sample_object(rng)
    while b == a:  # two objects in a scene must be distinguishable by colour+shape+size
        b = _sample_object(rng)
    # Lay out canonically: `first` is left (horizontal) or top (vertical).
    first, second = (a, b) if relation in ("to the left of", "above") else (b, a)
    s1, s2 = SIZE_FRACTION[first[2]] * S, SIZE_FRACTION[second[2]] * S
    slack = S - 2 * _MARGIN * S - _GAP * S - s1 - s2  # free room along the relation axis
    t1, t2 = sorted((rng.random(), rng.random()))  # uniform split of slack: lead, extra gap, trail
    main1 = _MARGIN * S + slack * t1 + s1 / 2
    main2 = main1 + s1 / 2 + _GAP * S + slack * (t2 - t1) + s2 / 2
    cross1 = S / 2 + (2 * rng.random() - 1) * _CROSS_AXIS * S
    cross2 = S / 2 + (2 * rng.random() - 1) * _CROSS_AXIS * S
    if relation in ("to the left of", "to the right of"):
        o1, o2 = Obj(*first, main1, cross1), Obj(*second, main2, cross2)
    else:
        o1, o2 = Obj(*first, cross1, main1), Obj(*second, cross2, main2)
    objects = (o1, o2) if relation in ("to the left of", "above") else (o2, o1)  # back to caption order
    return Scene(objects, relation, None, background, caption_for(objects, relation, rng=rng), cfg.image_size)


def make_scene(cfg: ShapesConfig, split: str, index: int) -> Scene:
    """The scene at ``index`` of ``split`` ("train" or "eval"): a pure function of (cfg, split, index).

    Training scenes containing a held-out colour+shape or a held-out arrangement are redrawn from the
    next sub-stream.
    """
    if split not in SPLITS:
        raise UserError(f"shapes split must be one of {SPLITS}, got {split!r}")
    held = set(cfg.holdout) if split == "train" else set()
    held_relations = cfg.holdout_relations if split == "train" else ()
    for attempt in range(_MAX_ATTEMPTS):
        scene = _sample_scene(cfg, random.Random(_stable_seed("shapes", cfg.seed, split, index, attempt)))
        if any(f"{o.color} {o.shape}" in held for o in scene.objects):
            continue
        if held_relations and any(holdout_hits(scene.attrs(), (), held_relations)):
            continue
        return scene
    raise UserError(f"shapes holdout {cfg.holdout} / {cfg.holdout_relations} leaves too few scenes to sample training scenes")


# ---------------------------------------------------------------- rendering

def _draw_object(draw: ImageDraw.ImageDraw, obj: Obj, scale: float, image_size: int) -> None:
    k = scale * _SUPERSAMPLE  # scene pixels -> supersampled canvas pixels
    cx, cy = obj.cx * k, obj.cy * k
    h = SIZE_FRACTION[obj.size] * image_size * _SUPERSAMPLE / 2
    fill = COLORS[obj.color]
    # Pillow includes the right/bottom edge pixel of boxes: subtract 1 so extents match the polygons.
    if obj.shape == "circle":
        draw.ellipse((cx - h, cy - h, cx + h - 1, cy + h - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((cx - h, cy - h, cx + h - 1, cy + h - 1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)
    elif obj.shape == "cross":
        t = h / 3  # arm half-thickness: arms are a third of the extent
        draw.rectangle((cx - h, cy - t, cx + h - 1, cy + t - 1), fill=fill)
        draw.rectangle((cx - t, cy - h, cx + t - 1, cy + h - 1), fill=fill)
    else:
        raise UserError(f"unknown shape {obj.shape!r}; known: {SHAPES}")


def _render_hwc(scene: Scene, image_size: int) -> np.ndarray:
    big = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw_object(draw, obj, image_size / scene.image_size, image_size)
    return np.asarray(img.reduce(_SUPERSAMPLE))  # box (area) downsample: (H, W, 3) uint8


def render(scene: Scene, image_size: int | None = None) -> torch.Tensor:
    """The scene as a uint8 tensor (3, H, W), H = W = image_size (default: the scene's own size)."""
    return torch.from_numpy(_render_hwc(scene, image_size or scene.image_size).copy()).permute(2, 0, 1)


# ---------------------------------------------------------------- dataset

class ShapesDataset(torch.utils.data.Dataset):
    """A split of the shapes data: items are {"image": float (3, H, W) in [-1, 1], "caption", "attrs"}."""

    def __init__(self, cfg: ShapesConfig, split: str, *, disk_cache: bool = True, progress: bool = True):
        """``disk_cache``: keep the drawn images in the cache folder; ``progress``: a bar while drawing many."""
        if split not in SPLITS:
            raise UserError(f"shapes split must be one of {SPLITS}, got {split!r}")
        self.cfg, self.split, self.disk_cache, self.progress = cfg, split, disk_cache, progress
        self._n = cfg.num_train if split == "train" else cfg.num_eval
        self._scenes: list[Scene | None] = [None] * self._n
        self._images: torch.Tensor | None = None

    def __len__(self) -> int:
        return self._n

    def _index(self, i: int) -> int:
        if not -self._n <= i < self._n:
            raise IndexError(f"index {i} out of range for shapes {self.split} split of {self._n}")
        return i % self._n

    def scene(self, i: int) -> Scene:
        """The Scene at index i (made once, then memoized)."""
        i = self._index(i)
        if self._scenes[i] is None:
            self._scenes[i] = make_scene(self.cfg, self.split, i)
        return self._scenes[i]

    def __getitem__(self, i: int) -> dict:
        """Item i: image float (3, H, W) in [-1, 1], its caption, its attrs() dict."""
        scene = self.scene(i)
        img = self._images[self._index(i)] if self._images is not None else render(scene, self.cfg.image_size)
        return {"image": img.float() / 127.5 - 1.0, "caption": scene.caption, "attrs": scene.attrs()}

    def captions(self) -> list[str]:
        """All N captions in index order."""
        return [self.scene(i).caption for i in range(self._n)]

    def fingerprint(self) -> str:
        """Digest of cfg (incl. CODE_VERSION) and split: names this split's cached images."""
        return f"{self.cfg.fingerprint()}-{self.split}"

    @property
    def info(self) -> dict:
        """What a run's ``data.json`` records about this split (the same keys real sources give)."""
        return {"source": "shapes", "image_size": self.cfg.image_size, "split": self.split, "size": self._n,
                "skipped": {}, "converted": {}, "split_rule": "procedural (seeded per split)"}

    def images_uint8(self) -> torch.Tensor:
        """All images as uint8 (N, 3, H, W), rendered once, kept in memory and (optionally) on disk."""
        if self._images is not None:
            return self._images
        path = None
        if self.disk_cache and self._n > 0:
            path = cache_dir() / "shapes" / f"{self.fingerprint()}.safetensors"
            if path.exists():
                try:
                    images = load_tensors(path)["images"]
                    if images.dtype == torch.uint8 and tuple(images.shape) == (self._n, 3, self.cfg.image_size,
                                                                               self.cfg.image_size):
                        self._images = images
                        return images
                except (UserError, KeyError):
                    pass  # corrupt or foreign file: re-render and overwrite it
        S = self.cfg.image_size
        out = np.empty((self._n, S, S, 3), dtype=np.uint8)
        desc = f"drawing {self._n} shapes images ({self.split} split{', cached for next time' if path else ''})"
        for i in tqdm(range(self._n), desc=desc, unit="img", disable=self._n < 2000 or not self.progress,
                      leave=False):
            out[i] = _render_hwc(self.scene(i), S)
        self._images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
        if path is not None:
            save_tensors(path, {"images": self._images}, metadata={"fingerprint": self.fingerprint()})
        return self._images
