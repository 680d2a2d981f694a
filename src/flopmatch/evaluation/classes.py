"""Prompt following on Fashion-MNIST: a class classifier trained on the real training split, and prompt scoring.

Every Fashion-MNIST caption names exactly one class (:func:`flopmatch.data.fashion_mnist.caption_class`
parses captions and user prompts in that vocabulary), so prompt following is exact up to the
classifier: the fraction of generated images the classifier puts in the class their prompt names.

The classifier is a small CNN (:class:`ClassNet`) trained on the 60,000 training images at the user's
image size, through the same decoded pool the generators learn from (so it sees the same resizing). Its
accuracy on the 10,000 test images (the evaluation split, never trained on) is stored with it and
reported by :meth:`ClassClassifier.describe`: a prompt-following score can be no more exact than that.
Fashion-MNIST's classes overlap (shirt, T-shirt, pullover and coat are the usual confusions), so
published small CNNs reach ~90-93%; this one reaches ~90% at 32 px (:data:`ACCURACY_BOUND`: 85%).

Weights are cached like the attribute classifier's (:mod:`flopmatch.evaluation.attributes`): under
``cache_dir()/"evaluators"/"classes-<training data fingerprint>-<steps>steps-v<code version>[-fp32]"`` with
their sha256 and a JSON of how they were trained; a cache entry whose weights do not match their
sha256 is retrained, never trusted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from flopmatch.config import DataConfig
from flopmatch.data.datasets import ImageTextSet
from flopmatch.data.fashion_mnist import CLASSES, caption_class, fashion_mnist_pool
from flopmatch.device import autocast, evaluator_precision, evaluator_suffix
from flopmatch.errors import UserError
from flopmatch.evaluation.attributes import _augment, _to_input
from flopmatch.files import cache_dir, load_verified, save_verified
from flopmatch.trainstate import STATE_FILE, EpochOrder, TrainingState, optimizer_step

CLASS_CODE_VERSION = 1  # bump when the network, preprocessing or training recipe change: keys the cache
ACCURACY_BOUND = 0.85  # test accuracy the fully trained classifier should reach; info["meets_bound"] records it
# 800 steps x 128 images (1.7 epochs): 90.2% test accuracy at 32 px in 31 s on one CPU thread (bf16 autocast, AMX).
TRAIN_STEPS = 800
BATCH_SIZE = 128
LEARNING_RATE = 3e-3
WIDTH = 32
SEED = 7919  # parameter init, data order and augmentation


class ClassNet(nn.Module):
    """CNN: float images (B, 3, S, S) in [-1, 1] -> class logits (B, len(CLASSES)).

    Three stages of a stride-2 3x3 conv+BN+ReLU (S -> S/8), then a flatten and a 128-unit hidden layer.
    Strided convolutions rather than max-pools: on CPU, bf16 max-pooling and unstrided BN at full
    resolution took most of a training step (measured: several times slower per step, for ~1 point of accuracy).
    """

    def __init__(self, image_size: int = 32, width: int = WIDTH):
        super().__init__()
        self.image_size = image_size
        layers, cin = [], 3
        side = image_size
        for cout in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin, side = cout, (side + 1) // 2
        self.features = nn.Sequential(*layers)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(cin * side * side, 128), nn.ReLU(inplace=True))
        self.out = nn.Linear(128, len(CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(self.features(x)))  # (B, classes)


@dataclass
class ClassClassifier:
    """A trained ClassNet with its provenance: weights sha256, training info (with the test accuracy), path."""

    net: ClassNet
    checksum: str
    info: dict  # how it was trained and its accuracy on the test split
    path: Path | None

    @torch.inference_mode()
    def predict(self, images_uint8: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """uint8 images (N, 3, H, W) -> (N,) long predicted class (resized to the net's side if needed)."""
        self.net.eval()
        device = self.net.out.weight.device
        parts = [self.net(_to_input(images_uint8[i : i + batch_size].to(device), self.net.image_size)).argmax(1).cpu()
                 for i in range(0, images_uint8.shape[0], batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def describe(self) -> dict:
        """For eval manifests: identity of the evaluator and its accuracy on the real test split."""
        return {"name": "fashion-mnist-class-classifier", "code_version": CLASS_CODE_VERSION, "sha256": self.checksum,
                "train_data": self.info["train_data_fingerprint"], "steps": self.info["steps"],
                "test_accuracy": self.info.get("test_accuracy"), "num_test": self.info.get("num_test"),
                "bound": ACCURACY_BOUND, "meets_bound": self.info.get("meets_bound")}


def accuracy(classifier: ClassClassifier, images_uint8: torch.Tensor, labels: list[int] | torch.Tensor) -> float:
    """Fraction of images (N, 3, H, W) uint8 classified as their label."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    return float((classifier.predict(images_uint8) == labels).double().mean()) if len(labels) else float("nan")


def score_class_prompts(classifier: ClassClassifier, images_uint8: torch.Tensor, prompts: list[str]) -> dict:
    """Check each image (N, 3, H, W) uint8 against the class its prompt names; fractions in [0, 1].

    Returns {"class_accuracy": fraction of images with a class-naming prompt classified as that class
    (None if no prompt names one), "per_class": {class: that fraction over its prompts}, "per_image_match":
    [bool | None] * N (None: the prompt names no single class), "num_scored", "num_unparsed", "num_images"}.
    """
    if images_uint8.shape[0] != len(prompts):
        raise ValueError(f"{images_uint8.shape[0]} images but {len(prompts)} prompts")
    wanted = [caption_class(p) for p in prompts]
    preds = classifier.predict(images_uint8).tolist()
    per_image = [None if w is None else p == w for p, w in zip(preds, wanted)]
    scored = [m for m in per_image if m is not None]
    per_class = {}
    for c, name in enumerate(CLASSES):
        hits = [m for m, w in zip(per_image, wanted) if w == c]
        if hits:
            per_class[name] = sum(hits) / len(hits)
    return {"class_accuracy": sum(scored) / len(scored) if scored else None, "per_class": per_class,
            "per_image_match": per_image, "num_scored": len(scored), "num_unparsed": len(prompts) - len(scored),
            "num_images": len(prompts)}


# ----------------------------------------------------------------------------------------------
# Training and the cache


def train_class_classifier(images_uint8: torch.Tensor, labels: list[int] | torch.Tensor, image_size: int,
                           steps: int = TRAIN_STEPS, progress: bool = True, state_file: Path | None = None
                           ) -> tuple[ClassNet, dict]:
    """Train a ClassNet on uint8 images (N, 3, S, S) and their labels; returns (net, info). Deterministic.

    CPU, bf16 autocast where bf16 is native (else fp32: flopmatch.device.evaluator_precision), AdamW with a one-cycle schedule, ``steps`` x BATCH_SIZE images, with random
    horizontal flips (every class is mirror-symmetric as a class) and the attribute classifier's mild noise.
    """
    t0 = time.time()
    labels = torch.as_tensor(labels, dtype=torch.long)
    torch.manual_seed(SEED)  # parameter init; data order and augmentation use `g` below
    net = ClassNet(image_size)
    opt = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LEARNING_RATE, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(SEED)
    n = len(labels)
    order = EpochOrder(n, BATCH_SIZE, g)
    net.train()
    loss = torch.zeros(())
    # resumable (state_file: saved every 10 min and on Ctrl-C, continued bit for bit by the next call; its folder is
    # keyed by the training data already)
    identity = {"evaluator": "classes", "code_version": CLASS_CODE_VERSION, "steps": steps, "image_size": image_size,
                "precision": evaluator_precision()}
    with TrainingState(state_file, identity, modules={"net": net}, optimizers={"opt": opt}, schedulers={"sched": sched},
                       generators={"g": g}, orders={"batches": order}) as ts:
        bar = tqdm(range(ts.step, steps), desc="training the fashion-mnist class classifier (once per machine, cached)",
                   disable=not progress, leave=False, initial=ts.step, total=steps)
        for step in bar:
            idx = order.next()
            x = _to_input(images_uint8[idx], image_size)  # (B, 3, S, S)
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            x = _augment(x, g)
            with autocast(torch.device("cpu"), evaluator_precision() == "bf16"):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), labels[idx])
            optimizer_step(loss, opt, sched)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            ts.end_of_step(step, steps)
    net.eval()
    info = {"code_version": CLASS_CODE_VERSION, "steps": steps, "batch_size": BATCH_SIZE, "lr": LEARNING_RATE,
            "num_train": n, "final_loss": float(loss.detach()), "train_seconds": round(time.time() - t0, 1),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "precision": evaluator_precision()}
    return net, info


def _splits(data: DataConfig, progress: bool) -> tuple[ImageTextSet, ImageTextSet]:
    """Every training and every test image of Fashion-MNIST at ``data.image_size`` (not capped by num_train)."""
    if data.name != "fashion-mnist":
        raise UserError(f"the class classifier scores fashion-mnist prompts; data is {data.name!r}")
    pool = fashion_mnist_pool(data, "", progress)
    return ImageTextSet(pool, "train", len(pool), len(pool)), ImageTextSet(pool, "eval", len(pool), len(pool))


def _evaluator_dir(train_fingerprint: str, steps: int) -> Path:
    return cache_dir() / "evaluators" / f"classes-{train_fingerprint}-{steps}steps-v{CLASS_CODE_VERSION}{evaluator_suffix(evaluator_precision())}"


def load_or_train_class_classifier(data: DataConfig, progress: bool = True, steps: int = TRAIN_STEPS) -> ClassClassifier:
    """The cached class classifier for Fashion-MNIST at ``data.image_size`` (trained once, well under a minute on CPU).

    ``info["test_accuracy"]`` is its accuracy on the whole test split. ``steps`` other than TRAIN_STEPS
    (tests) is cached under its own key.
    """
    train, test = _splits(data, progress)
    folder = _evaluator_dir(train.fingerprint(), steps)
    weights, info_path = folder / "classifier.safetensors", folder / "info.json"
    net = ClassNet(data.image_size)
    info = load_verified(net, weights, info_path)
    if info is None:
        net, info = train_class_classifier(train.images_uint8(), train.labels(), data.image_size, steps, progress,
                                           state_file=folder / STATE_FILE)
        info |= {"train_data_fingerprint": train.fingerprint(), "test_data_fingerprint": test.fingerprint(),
                 "num_test": len(test)}
        info["test_accuracy"] = accuracy(ClassClassifier(net, "", info, None), test.images_uint8(), test.labels())
        info["meets_bound"] = info["test_accuracy"] >= ACCURACY_BOUND
        save_verified(net, weights, info_path, info, metadata={"code_version": str(CLASS_CODE_VERSION)})
    (folder / STATE_FILE).unlink(missing_ok=True)  # trained and saved: nothing to resume
    net.eval()
    return ClassClassifier(net, info["sha256"], info, weights)
