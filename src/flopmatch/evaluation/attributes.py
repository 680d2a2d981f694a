"""Prompt following on shapes: an attribute classifier trained on procedural images, and prompt scoring.

The classifier is a small CNN that reads an image (never its caption) and predicts what a caption could
say about it: the object count; a lone object's position; a pair's axis (horizontal or vertical); and
colour, shape and size of each object in two CANONICAL slots (left-to-right for a horizontal pair,
top-to-bottom for a vertical one; slot 0 for a lone object). Canonical slots make the image -> label map
a function: "A left of B" and "B right of A" are the same image.

Scoring a generated image against its prompt (GenEval spirit): the prompt is parsed with
``data.shapes.parse_caption`` (our captions and user prompts in the same vocabulary), then every attribute
the prompt names is checked: count; colour/shape/size of each object (slot i against the prompt's i-th
canonical object: for "A left of B" the slots should hold (A, B), for "A right of B" (B, A), "above" is
vertical (A, B), "below" vertical (B, A)); position for one object; relation for two. The relation holds
when the predicted axis is right AND the objects are in the prompt's order: the straight slot assignment
matches more of the named attributes than the swapped one (if the two objects are named identically,
the axis alone decides). An image fully matches when every check on it passes.

Training data is fresh procedural scenes from a dedicated seed (TRAIN_SEED, no holdout), never the eval
split; the accuracy stored with the classifier is measured on the real held-out eval split of the user's
ShapesConfig, and must be >= ACCURACY_BOUND on every attribute. The trained weights are cached under
``cache_dir()/"evaluators"/"attributes-<training data fingerprint>-v<code version>[-fp32]"`` (``-fp32``: trained in fp32
on a CPU without native bf16, flopmatch.device.evaluator_precision) with a sha256 and
a JSON of how they were trained; held-out accuracies go into ``accuracy-<eval data fingerprint>.json``
beside them (so a new eval config costs one forward pass over its eval split, not a retraining).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from flopmatch.data.shapes import COLORS, POSITIONS, SHAPES, SIZES, ShapesConfig, ShapesDataset, parse_caption
from flopmatch.device import autocast, evaluator_precision, evaluator_suffix
from flopmatch.files import atomic_write_json, cache_dir, load_verified, read_json, save_verified
from flopmatch.trainstate import STATE_FILE, EpochOrder, TrainingState, optimizer_step

ATTRIBUTE_CODE_VERSION = 1  # bump when the network, labels or training recipe change: keys the cache
ACCURACY_BOUND = 0.95  # every attribute's held-out accuracy must reach this (asserted by the tests)
TRAIN_SEED = 104729  # the classifier's own scene stream: disjoint from any dataset's eval split
NUM_TRAIN_SCENES = 30000
TRAIN_STEPS = 600
BATCH_SIZE = 128
LEARNING_RATE = 2e-3
WIDTH = 16
IGNORE = -100  # label of a head that does not apply (e.g. position for a pair); cross_entropy skips it
ATTRIBUTES = ("color", "shape", "size", "position", "relation", "count")


def head_sizes() -> dict[str, int]:
    """Output classes per head, in the order of the logit vector."""
    sizes = {"count": 2, "position": len(POSITIONS), "axis": 2}
    for slot in (0, 1):
        sizes |= {f"color{slot}": len(COLORS), f"shape{slot}": len(SHAPES), f"size{slot}": len(SIZES)}
    return sizes


def _vocab() -> dict[str, tuple[str, ...]]:
    return {"color": tuple(COLORS), "shape": tuple(SHAPES), "size": tuple(SIZES), "position": tuple(POSITIONS),
            "axis": ("horizontal", "vertical")}


def labels_from_attrs(attrs: list[dict]) -> dict[str, torch.Tensor]:
    """Scene attrs (``Scene.attrs()`` dicts) -> {head: (N,) long labels}, IGNORE where a head does not apply."""
    vocab = _vocab()
    out = {name: torch.full((len(attrs),), IGNORE, dtype=torch.long) for name in head_sizes()}
    for i, a in enumerate(attrs):
        out["count"][i] = a["count"] - 1
        if a["count"] == 1:
            out["position"][i] = vocab["position"].index(a["position"])
        else:
            out["axis"][i] = vocab["axis"].index(a["axis"])
        for slot, obj in enumerate(a["objects"]):
            for key in ("color", "shape", "size"):
                out[f"{key}{slot}"][i] = vocab[key].index(obj[key])
    return out


class AttributeNet(nn.Module):
    """CNN: float images (B, 3, S, S) in [-1, 1] -> concatenated logits of every head (B, sum(head sizes)).

    Three stages of two 3x3 conv+BN+ReLU and a 2x2 max-pool, then a flatten (keeps where things are, which
    position and canonical order need) and a 256-unit hidden layer shared by all heads.
    """

    def __init__(self, image_size: int = 32, width: int = WIDTH):
        super().__init__()
        self.image_size = image_size
        self.heads = head_sizes()
        layers, cin = [], 3
        for cout in (width, 2 * width, 4 * width):
            for _ in range(2):
                layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = image_size // 8
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(cin * side * side, 256), nn.ReLU(inplace=True))
        self.out = nn.Linear(256, sum(self.heads.values()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(self.features(x)))  # (B, sum of head sizes)

    def split(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Concatenated logits (B, K) -> {head: (B, classes)}."""
        return dict(zip(self.heads, logits.split(list(self.heads.values()), dim=1)))


def _to_input(images_uint8: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, S, S) in [-1, 1] (bilinear resize if H, W != S)."""
    x = images_uint8.float() / 127.5 - 1.0
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return x


@dataclass
class AttributeClassifier:
    """A trained AttributeNet with its provenance: weights sha256, training info, held-out accuracy."""

    net: AttributeNet
    checksum: str
    info: dict  # how it was trained (steps, time, data fingerprint, ...)
    heldout: dict  # accuracies on the real held-out eval split of the ShapesConfig it was loaded for
    path: Path

    @torch.inference_mode()
    def predict(self, images_uint8: torch.Tensor, batch_size: int = 500) -> dict[str, torch.Tensor]:
        """uint8 images (N, 3, H, W) -> {head: (N,) long predicted class}."""
        self.net.eval()
        device = self.net.out.weight.device
        parts = []
        for start in range(0, images_uint8.shape[0], batch_size):
            x = _to_input(images_uint8[start : start + batch_size].to(device), self.net.image_size)
            parts.append({k: v.argmax(1).cpu() for k, v in self.net.split(self.net(x)).items()})
        if not parts:
            return {k: torch.zeros(0, dtype=torch.long) for k in self.net.heads}
        return {k: torch.cat([p[k] for p in parts]) for k in self.net.heads}

    def describe(self) -> dict:
        """For eval manifests: identity of the evaluator and its held-out accuracy."""
        return {"name": "shapes-attribute-classifier", "code_version": ATTRIBUTE_CODE_VERSION, "sha256": self.checksum,
                "train_data": self.info["train_data_fingerprint"], "heldout": self.heldout}


# ----------------------------------------------------------------------------------------------
# Scoring prompts


def _slot_matches(pred: dict[str, int], slot: int, obj: dict, vocab: dict) -> dict[str, bool]:
    """{attribute: match} for the attributes ``obj`` names, against predicted slot ``slot``."""
    return {key: vocab[key][pred[f"{key}{slot}"]] == obj[key]
            for key in ("color", "shape", "size") if obj[key] is not None}


def score_prompt_following(classifier: AttributeClassifier, images_uint8: torch.Tensor, captions: list[str]) -> dict:
    """Check each image (N, 3, H, W) uint8 against its caption; accuracies are fractions in [0, 1].

    Returns {"color", "shape", "size", "position", "relation", "count": accuracy over the checks of that
    attribute (None if no prompt names it), "full_match": fraction of images passing every check,
    "per_image_match": [bool] * N, "num_checks": {attribute: number of checks}, "num_images": N,
    "per_image_checks": [{attribute: [bool per check]}] * N} (the last for per-group scores, see
    :func:`summarise_checks`; callers drop both per-image lists before storing). Colour/shape/size are
    checked per named object, so a pair prompt contributes two checks each.
    """
    if images_uint8.shape[0] != len(captions):
        raise ValueError(f"{images_uint8.shape[0]} images but {len(captions)} captions")
    vocab = _vocab()
    preds = classifier.predict(images_uint8)
    preds = [{k: int(v[i]) for k, v in preds.items()} for i in range(len(captions))]
    per_image_checks = []
    for pred, caption in zip(preds, captions):
        want = parse_caption(caption)
        mine: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
        mine["count"].append(pred["count"] + 1 == want["count"])
        objs = want["objects"]
        for slot, obj in enumerate(objs):
            for key, ok in _slot_matches(pred, slot, obj, vocab).items():
                mine[key].append(ok)
        if want["count"] == 1 and want["position"] is not None:
            mine["position"].append(vocab["position"][pred["position"]] == want["position"])
        if want["count"] == 2:
            axis_ok = vocab["axis"][pred["axis"]] == want["axis"]
            straight = sum(sum(_slot_matches(pred, s, o, vocab).values()) for s, o in enumerate(objs))
            swapped = sum(sum(_slot_matches(pred, 1 - s, o, vocab).values()) for s, o in enumerate(objs))
            order_ok = straight > swapped or objs[0] == objs[1]
            mine["relation"].append(axis_ok and order_ok)
        per_image_checks.append(mine)
    summary = summarise_checks(per_image_checks)
    return {**{a: summary[a] for a in ATTRIBUTES}, "full_match": summary["full_match"],
            "per_image_match": [image_matches(c) for c in per_image_checks], "num_checks": summary["num_checks"],
            "num_images": summary["num_images"], "per_image_checks": per_image_checks}


def image_matches(checks: dict[str, list[bool]]) -> bool:
    """Whether one image passes every check of its prompt (``checks``: {attribute: [bool per check]})."""
    return all(ok for a in ATTRIBUTES for ok in checks.get(a, ()))


def summarise_checks(per_image_checks: list[dict[str, list[bool]]]) -> dict:
    """Scores of a set of images from their checks ({attribute: [bool per check]} per image).

    Returns {attribute: accuracy over that attribute's checks (fraction; None without checks),
    "full_match": fraction of images passing every check (None for no images), "num_full_match",
    "num_checks": {attribute: count}, "num_images"}: the overall fields of :func:`score_prompt_following`.
    """
    checks = {a: [ok for c in per_image_checks for ok in c.get(a, ())] for a in ATTRIBUTES}
    matches = [image_matches(c) for c in per_image_checks]
    out: dict = {a: (sum(v) / len(v) if v else None) for a, v in checks.items()}
    out["full_match"] = sum(matches) / len(matches) if matches else None
    out["num_full_match"] = sum(matches)
    out["num_checks"] = {a: len(v) for a, v in checks.items()}
    out["num_images"] = len(matches)
    return out


@torch.inference_mode()
def head_accuracy(classifier: AttributeClassifier, images_uint8: torch.Tensor, attrs: list[dict]) -> dict[str, float]:
    """Per-head accuracy (fraction) against ground-truth scene attrs, over the images each head applies to."""
    labels = labels_from_attrs(attrs)
    preds = classifier.predict(images_uint8)
    out = {}
    for head, y in labels.items():
        keep = y != IGNORE
        out[head] = float((preds[head][keep] == y[keep]).double().mean()) if keep.any() else None
    return out


# ----------------------------------------------------------------------------------------------
# Training and the cache


def _train_config(shapes_cfg):
    """The classifier's training data: fresh scenes at the user's image size, dedicated seed, no holdout."""
    return ShapesConfig(seed=TRAIN_SEED, image_size=shapes_cfg.image_size, num_train=NUM_TRAIN_SCENES, num_eval=0,
                        two_object_prob=0.5, holdout=())


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild corruption so the classifier is not thrown by a generator's noise: per-image Gaussian noise
    with sigma ~ U(0, 0.1) on half the images (images are in [-1, 1])."""
    b = x.shape[0]
    sigma = torch.rand(b, 1, 1, 1, generator=generator) * 0.1 * (torch.rand(b, 1, 1, 1, generator=generator) < 0.5)
    return x + sigma * torch.randn(x.shape, generator=generator)


def train_attribute_classifier(shapes_cfg, progress: bool = True, steps: int | None = None,
                               state_file: Path | None = None) -> tuple[AttributeNet, dict]:
    """Train an AttributeNet on fresh procedural scenes; returns (net, info). Deterministic given the code.

    CPU, bf16 autocast for the convolutions where bf16 is fast here (else fp32: flopmatch.device.evaluator_precision), AdamW with a cosine schedule, ``steps`` x BATCH_SIZE images.
    """
    steps = TRAIN_STEPS if steps is None else steps
    t0 = time.time()
    train_cfg = _train_config(shapes_cfg)
    ds = ShapesDataset(train_cfg, "train", disk_cache=False)
    images = ds.images_uint8()  # (N, 3, S, S) uint8, ~5k scenes/s to render
    labels = labels_from_attrs([ds.scene(i).attrs() for i in range(len(ds))])
    render_s = time.time() - t0
    torch.manual_seed(0)  # parameter init; data order and augmentation use `g` below
    net = AttributeNet(shapes_cfg.image_size)
    opt = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LEARNING_RATE, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(TRAIN_SEED)
    order = EpochOrder(len(ds), BATCH_SIZE, g)
    net.train()
    # resumable (state_file: saved every 10 min and on Ctrl-C, continued bit for bit by the next call)
    identity = {"evaluator": "attributes", "code_version": ATTRIBUTE_CODE_VERSION, "data": train_cfg.fingerprint(),
                "steps": steps, "precision": evaluator_precision()}
    with TrainingState(state_file, identity, modules={"net": net}, optimizers={"opt": opt}, schedulers={"sched": sched},
                       generators={"g": g}, orders={"batches": order}) as ts:
        bar = tqdm(range(ts.step, steps), desc="training the attribute classifier (once per machine, cached)",
                   disable=not progress, leave=False, initial=ts.step, total=steps)
        for step in bar:
            idx = order.next()
            x = _augment(_to_input(images[idx], net.image_size), g)
            with autocast(torch.device("cpu"), evaluator_precision() == "bf16"):
                logits = net.split(net(x))
            loss = sum(F.cross_entropy(logits[h].float(), labels[h][idx], ignore_index=IGNORE) for h in net.heads)
            optimizer_step(loss, opt, sched)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            ts.end_of_step(step, steps)
    net.eval()
    train_data = {"seed": train_cfg.seed, "image_size": train_cfg.image_size, "num_scenes": train_cfg.num_train,
                  "two_object_prob": train_cfg.two_object_prob}
    info = {"code_version": ATTRIBUTE_CODE_VERSION, "train_data": train_data,
            "train_data_fingerprint": train_cfg.fingerprint(), "steps": steps, "batch_size": BATCH_SIZE,
            "lr": LEARNING_RATE, "final_loss": float(loss.detach()), "render_seconds": round(render_s, 1),
            "train_seconds": round(time.time() - t0 - render_s, 1), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "precision": evaluator_precision()}
    return net, info


def _evaluator_dir(shapes_cfg) -> Path:
    name = f"attributes-{_train_config(shapes_cfg).fingerprint()}-v{ATTRIBUTE_CODE_VERSION}{evaluator_suffix(evaluator_precision())}"
    return cache_dir() / "evaluators" / name


def _heldout_accuracy(classifier: AttributeClassifier, shapes_cfg) -> dict:
    """Accuracies on the real eval split of ``shapes_cfg``: per head vs ground truth, and prompt scoring."""
    ds = ShapesDataset(shapes_cfg, "eval")
    if len(ds) == 0:
        return {"eval_data_fingerprint": shapes_cfg.fingerprint(), "num_images": 0}
    images = ds.images_uint8()
    heads = head_accuracy(classifier, images, [ds.scene(i).attrs() for i in range(len(ds))])
    prompt = score_prompt_following(classifier, images, ds.captions())
    prompt.pop("per_image_match")
    prompt.pop("per_image_checks")
    return {"eval_data_fingerprint": shapes_cfg.fingerprint(), "num_images": len(ds), "heads": heads,
            "prompt_following": prompt, "bound": ACCURACY_BOUND,
            "meets_bound": all(prompt[a] >= ACCURACY_BOUND for a in ATTRIBUTES if prompt[a] is not None)}


def attribute_classifier_cached(shapes_cfg) -> bool:
    """Whether the attribute classifier for ``shapes_cfg`` is already trained and cached on this machine."""
    folder = _evaluator_dir(shapes_cfg)
    return (folder / "classifier.safetensors").exists() and (folder / "info.json").exists()


def load_or_train_attribute_classifier(shapes_cfg, progress: bool = True) -> AttributeClassifier:
    """The cached attribute classifier for shapes at ``shapes_cfg.image_size`` (trained once, ~minutes on CPU).

    Its ``heldout`` dict holds the accuracies on ``shapes_cfg``'s real eval split (cached per eval config).
    A cache entry whose weights do not match their recorded sha256 is retrained, never trusted.
    """
    folder = _evaluator_dir(shapes_cfg)
    weights, info_path = folder / "classifier.safetensors", folder / "info.json"
    net = AttributeNet(shapes_cfg.image_size)
    info = load_verified(net, weights, info_path)
    if info is None:
        net, info = train_attribute_classifier(shapes_cfg, progress=progress, state_file=folder / STATE_FILE)
        save_verified(net, weights, info_path, info, metadata={"code_version": str(ATTRIBUTE_CODE_VERSION)})
    (folder / STATE_FILE).unlink(missing_ok=True)  # trained and saved: nothing to resume
    net.eval()
    classifier = AttributeClassifier(net, info["sha256"], info, {}, weights)
    acc_path = folder / f"accuracy-{shapes_cfg.fingerprint()}.json"
    heldout = read_json(acc_path) if acc_path.exists() else None
    if heldout is None or heldout.get("sha256") != info["sha256"]:
        heldout = {"sha256": info["sha256"], **_heldout_accuracy(classifier, shapes_cfg)}
        atomic_write_json(acc_path, heldout)
    classifier.heldout = heldout
    return classifier
