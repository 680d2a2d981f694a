"""Prompt following for captioned data without labels: a "domain CLIP" trained in-domain, or a local CLIP.

No CLIP weights ship in any package we can install, so we train a small image-text similarity model on
the dataset's own training split:

- text side: the frozen MiniLM pooled sentence state (384-d, flopmatch.text) -> a learned 2-layer
  projection to a shared 256-d space;
- image side: a small CNN (uint8 images resized to 32x32) -> 256-d;
- symmetric InfoNCE with a learnable temperature (CLIP's recipe: logit scale init 1/0.07, capped at 100).

The score mirrors CLIP score: ``mean(100 * max(cos(image, caption), 0))``. It is only comparable between
runs evaluated with the same domain-CLIP checksum (recorded by ``describe()``). With each trained model we
store its image->text retrieval accuracy (top-1 and top-5 among HELDOUT_PAIRS held-out real pairs):
the evidence that the score measures prompt following at all. Caption paraphrases of one scene count as
different captions in retrieval, so top-1 is a lower bound on how well it ranks meaning.

``LocalCLIP``: for users who have a Hugging Face CLIP checkpoint on disk (e.g. a downloaded
openai/clip-vit-base-patch32 directory), ``LocalCLIP(dir).score(images, captions)`` is the standard CLIP
score, loaded with ``local_files_only=True`` (never downloads).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from flopmatch.device import autocast, evaluator_precision, evaluator_suffix
from flopmatch.errors import UserError
from flopmatch.files import atomic_write_json, cache_dir, file_sha256, load_tensors, read_json, save_tensors
from flopmatch.text import make_text_encoder
from flopmatch.trainstate import STATE_FILE, TrainingState, optimizer_step

CLIP_CODE_VERSION = 1  # bump when the model or training recipe changes: keys the cache
EMBED_DIM = 256
IMAGE_SIZE = 32
WIDTH = 16
TRAIN_STEPS = 800
BATCH_SIZE = 256
LEARNING_RATE = 2e-3
HELDOUT_PAIRS = 500
TEXT_ENCODER = "minilm"


class CaptionedImages(Protocol):
    """What training needs from a dataset split (ShapesDataset fits)."""

    def images_uint8(self) -> torch.Tensor: ...  # (N, 3, H, W) uint8

    def captions(self) -> list[str]: ...

    def fingerprint(self) -> str: ...


class ImageEncoder(nn.Module):
    """uint8 (B, 3, H, W) -> (B, EMBED_DIM): resize to 32x32, 3 conv stages, flatten, linear."""

    def __init__(self, width: int = WIDTH, dim: int = EMBED_DIM):
        super().__init__()
        layers, cin = [], 3
        for cout in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            cin = cout
        side = IMAGE_SIZE // 8
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * side * side, 512), nn.ReLU(inplace=True),
                                 nn.Linear(512, dim))

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.float() / 127.5 - 1.0
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return self.net(x)  # (B, D)


class DomainCLIP(nn.Module):
    """Image encoder + projection of frozen text features into one space, and a learnable temperature."""

    def __init__(self, text_dim: int = 384, dim: int = EMBED_DIM):
        super().__init__()
        self.image = ImageEncoder(dim=dim)
        self.text = nn.Sequential(nn.Linear(text_dim, 512), nn.GELU(), nn.Linear(512, dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed_images(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> unit vectors (B, D)."""
        return F.normalize(self.image(images_uint8).float(), dim=-1)

    def embed_text(self, pooled: torch.Tensor) -> torch.Tensor:
        """Frozen pooled text states (B, 384) -> unit vectors (B, D)."""
        return F.normalize(self.text(pooled).float(), dim=-1)


def _encode_pooled(captions: list[str], encoder=None) -> torch.Tensor:
    """MiniLM pooled states (N, 384) float32 for captions, each unique caption encoded once."""
    encoder = encoder or make_text_encoder(TEXT_ENCODER)
    unique = sorted(set(captions))
    row = {c: i for i, c in enumerate(unique)}
    pooled = torch.cat([encoder.encode(unique[i : i + 2048]).pooled.cpu() for i in range(0, len(unique), 2048)])
    return pooled[torch.tensor([row[c] for c in captions], dtype=torch.long)]  # (N, 384)


@dataclass
class DomainCLIPModel:
    """A trained DomainCLIP, the frozen text encoder it expects, and its provenance and retrieval accuracy."""

    model: DomainCLIP
    checksum: str
    info: dict  # training recipe, time, data key, retrieval accuracy on held-out real pairs
    path: Path
    _encoder: object = None

    def text_encoder(self):
        if self._encoder is None:
            self._encoder = make_text_encoder(TEXT_ENCODER)
        return self._encoder

    @torch.inference_mode()
    def similarity(self, images_uint8: torch.Tensor, captions: list[str], batch_size: int = 500) -> torch.Tensor:
        """Cosine similarity (N,) between each image (N, 3, H, W) uint8 and its caption."""
        if images_uint8.shape[0] != len(captions):
            raise ValueError(f"{images_uint8.shape[0]} images but {len(captions)} captions")
        self.model.eval()
        pooled = _encode_pooled(captions, self.text_encoder())
        out = []
        for i in range(0, len(captions), batch_size):
            img = self.model.embed_images(images_uint8[i : i + batch_size])
            txt = self.model.embed_text(pooled[i : i + batch_size])
            out.append((img * txt).sum(-1))
        return torch.cat(out) if out else torch.zeros(0)

    def describe(self) -> dict:
        """For eval manifests: identity of the evaluator and its held-out retrieval accuracy."""
        return {"name": "domain-clip", "code_version": CLIP_CODE_VERSION, "sha256": self.checksum,
                "data_key": self.info["data_key"], "text_encoder": self.info["text_encoder"],
                "retrieval": self.info["retrieval"]}


def domain_clip_score(model: DomainCLIPModel, images_uint8: torch.Tensor, captions: list[str]) -> float:
    """CLIP-score analogue: mean over images of 100 * max(cos(image, its caption), 0), in [0, 100]."""
    return float((100 * model.similarity(images_uint8, captions).clamp_min(0)).mean())


@torch.inference_mode()
def retrieval_accuracy(model: DomainCLIPModel, images_uint8: torch.Tensor, captions: list[str]) -> dict:
    """Image->text retrieval among the given N pairs: fraction whose own caption ranks top-1 / top-5."""
    model.model.eval()
    img = model.model.embed_images(images_uint8)  # (N, D)
    txt = model.model.embed_text(_encode_pooled(captions, model.text_encoder()))  # (N, D)
    # A caption string repeated in the set counts as correct wherever it ranks: compare strings, not indices.
    ranked = (img @ txt.T).argsort(dim=1, descending=True)[:, :5]  # (N, 5)
    hits = [[captions[j] == captions[i] for j in ranked[i].tolist()] for i in range(len(captions))]
    return {"top1": sum(h[0] for h in hits) / len(hits), "top5": sum(any(h) for h in hits) / len(hits),
            "num_pairs": len(hits), "chance_top1": retrieval_chance(captions)}


def retrieval_chance(captions: list[str]) -> float:
    """Top-1 retrieval accuracy of a random ranking: a caption string that occurs k times among N comes first
    with probability k/N, so chance is sum_i k(c_i) / N^2 (1/N when every caption is distinct)."""
    counts = Counter(captions)
    return sum(counts[c] for c in captions) / len(captions) ** 2


@torch.inference_mode()
def r_precision(model: DomainCLIPModel, images_uint8: torch.Tensor, prompts: list[str], candidates: list[str],
                r: int = 100, seed: int = 0) -> dict:
    """R-precision (Xu et al. 2018, AttnGAN §5): does each image rank its own prompt first among R captions?

    For image i the candidates are its prompt and R - 1 other distinct captions drawn (seeded) from
    ``candidates``; R is capped by the number of distinct captions. Returns {"r_precision": fraction in
    [0, 1], "r": R, "chance": 1 / R}. Images (N, 3, H, W) uint8, one prompt each.
    """
    if images_uint8.shape[0] != len(prompts):
        raise ValueError(f"{images_uint8.shape[0]} images but {len(prompts)} prompts")
    distinct = sorted(set(candidates) | set(prompts))
    r = min(r, len(distinct))
    if r < 2:
        raise UserError("R-precision needs at least 2 distinct captions in the evaluation split")
    model.model.eval()
    row = {c: j for j, c in enumerate(distinct)}
    txt = model.model.embed_text(_encode_pooled(distinct, model.text_encoder()))  # (M, D)
    g = torch.Generator().manual_seed(seed)
    hits = 0
    for start in range(0, len(prompts), 500):
        img = model.model.embed_images(images_uint8[start : start + 500])  # (B, D)
        sims = img @ txt.T  # (B, M)
        for b in range(img.shape[0]):
            own = row[prompts[start + b]]
            others = torch.randperm(len(distinct) - 1, generator=g)[: r - 1]
            others = others + (others >= own).long()  # skip the prompt's own index
            hits += bool(sims[b, own] > sims[b, others].max())
    return {"r_precision": hits / len(prompts), "r": r, "chance": 1 / r}


def train_domain_clip(train_images: torch.Tensor, train_captions: list[str], progress: bool = True,
                      steps: int | None = None, state_file: Path | None = None) -> tuple[DomainCLIP, dict]:
    """Contrastive training (symmetric InfoNCE) on (N, 3, H, W) uint8 images and their captions."""
    steps = TRAIN_STEPS if steps is None else steps
    t0 = time.time()
    pooled = _encode_pooled(train_captions)  # (N, 384), frozen: computed once
    t1 = time.time()
    torch.manual_seed(0)  # parameter init; batches come from `g`
    model = DomainCLIP(text_dim=pooled.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LEARNING_RATE, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    n = train_images.shape[0]
    batch = min(BATCH_SIZE, n)
    targets = torch.arange(batch)
    model.train()
    # resumable (state_file: saved every 10 min and on Ctrl-C, continued bit for bit by the next call; its folder is
    # keyed by the training data already)
    identity = {"evaluator": "clip", "code_version": CLIP_CODE_VERSION, "steps": steps, "precision": evaluator_precision()}
    with TrainingState(state_file, identity, modules={"model": model}, optimizers={"opt": opt},
                       schedulers={"sched": sched}, generators={"g": g}) as ts:
        for step in tqdm(range(ts.step, steps), desc="training the domain CLIP (once per machine, cached)",
                         disable=not progress, leave=False, initial=ts.step, total=steps):
            idx = torch.randperm(n, generator=g)[:batch]
            with autocast(torch.device("cpu"), evaluator_precision() == "bf16"):
                img = model.image(train_images[idx])
            img = F.normalize(img.float(), dim=-1)
            txt = model.embed_text(pooled[idx])
            logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T  # (B, B)
            loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
            optimizer_step(loss, opt, sched)
            ts.end_of_step(step, steps)
    model.eval()
    temperature = float(1 / model.logit_scale.detach().exp().clamp(max=100))
    info = {"code_version": CLIP_CODE_VERSION, "steps": steps, "batch_size": batch, "lr": LEARNING_RATE,
            "num_train_pairs": n, "final_loss": float(loss.detach()), "temperature": temperature,
            "encode_seconds": round(t1 - t0, 1), "train_seconds": round(time.time() - t1, 1),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "precision": evaluator_precision()}
    return model, info


def load_or_train_domain_clip(train_set: CaptionedImages, heldout_set: CaptionedImages, progress: bool = True
                              ) -> DomainCLIPModel:
    """The cached domain CLIP for a dataset (trained once, a few minutes on CPU), with retrieval accuracy.

    Trained on ``train_set``; retrieval accuracy measured on the first HELDOUT_PAIRS pairs of ``heldout_set``
    (real images, never seen in training). Cached under ``cache_dir()/"evaluators"/"clip-<key>[-fp32]"`` where the
    key digests both sets' fingerprints, the text encoder's fingerprint and CLIP_CODE_VERSION; weights whose
    sha256 does not match the recorded one are retrained.
    """
    encoder = make_text_encoder(TEXT_ENCODER)
    data_key = f"{train_set.fingerprint()}+{heldout_set.fingerprint()}"
    key = hashlib.sha256(f"{data_key}|{encoder.fingerprint()}|v{CLIP_CODE_VERSION}".encode()).hexdigest()[:16]
    folder = cache_dir() / "evaluators" / f"clip-{key}{evaluator_suffix(evaluator_precision())}"
    weights, info_path = folder / "model.safetensors", folder / "info.json"
    if weights.exists() and info_path.exists():
        try:
            info = read_json(info_path)
            if info.get("sha256") == file_sha256(weights):
                model = DomainCLIP(text_dim=encoder.dim)
                model.load_state_dict(load_tensors(weights), strict=True)
                n = info["retrieval"]["num_pairs"]  # chance recomputed: models cached before it counted repeats
                info["retrieval"]["chance_top1"] = retrieval_chance(heldout_set.captions()[:n])
                return DomainCLIPModel(model.eval(), info["sha256"], info, weights, encoder)
        except (UserError, RuntimeError, KeyError):
            pass  # damaged or stale: retrain below
    model, info = train_domain_clip(train_set.images_uint8(), train_set.captions(), progress=progress,
                                    state_file=folder / STATE_FILE)
    save_tensors(weights, model.state_dict(), metadata={"code_version": str(CLIP_CODE_VERSION)})
    info |= {"sha256": file_sha256(weights), "data_key": data_key, "text_encoder": encoder.name}
    trained = DomainCLIPModel(model, info["sha256"], info, weights, encoder)
    n = min(HELDOUT_PAIRS, len(heldout_set.captions()))
    info["retrieval"] = retrieval_accuracy(trained, heldout_set.images_uint8()[:n], heldout_set.captions()[:n])
    atomic_write_json(info_path, info)
    (folder / STATE_FILE).unlink(missing_ok=True)  # trained and saved: nothing to resume
    return trained


class LocalCLIP:
    """Real CLIP score from a Hugging Face CLIP model directory on disk (weights never downloaded).

    ``LocalCLIP("/models/clip-vit-base-patch32").score(images, captions)``: the model's own processor
    (resize, crop, normalise; captions truncated to the text model's length), then
    ``mean(100 * max(cos(image_embeds, text_embeds), 0))`` as in CLIPScore (Hessel et al. 2021). Written
    against ``CLIPModel.forward``'s ``image_embeds``/``text_embeds`` rather than torchmetrics' ``CLIPScore``,
    which breaks with transformers 5 (``get_image_features`` now returns an output object). No CLIP weights
    can be installed here, so the tests run it on a tiny randomly initialised CLIP saved to disk.
    """

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").exists():
            raise UserError(f"{self.model_dir} is not a Hugging Face CLIP model directory (no config.json)")
        # Imported here: transformers takes seconds to import, and only a user-supplied CLIP needs it.
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(str(self.model_dir), local_files_only=True).eval()
        self.processor = CLIPProcessor.from_pretrained(str(self.model_dir), local_files_only=True)

    @torch.inference_mode()
    def similarity(self, images_uint8: torch.Tensor, captions: list[str], batch_size: int = 64) -> torch.Tensor:
        """Cosine similarity (N,) between each uint8 image (N, 3, H, W) and its caption."""
        if images_uint8.shape[0] != len(captions):
            raise ValueError(f"{images_uint8.shape[0]} images but {len(captions)} captions")
        device = self.model.logit_scale.device
        out = []
        for i in range(0, len(captions), batch_size):
            inputs = self.processor(text=list(captions[i : i + batch_size]),
                                    images=list(images_uint8[i : i + batch_size]),
                                    return_tensors="pt", padding=True, truncation=True)
            o = self.model(**{k: v.to(device) for k, v in inputs.items()})
            out.append(F.cosine_similarity(o.image_embeds.float(), o.text_embeds.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def score(self, images_uint8: torch.Tensor, captions: list[str]) -> float:
        """Standard CLIP score of uint8 images (N, 3, H, W) against their captions, in [0, 100]."""
        return float((100 * self.similarity(images_uint8, captions).clamp_min(0)).mean())

    def describe(self) -> dict:
        """For eval manifests."""
        return {"name": "local-clip", "model_dir": str(self.model_dir)}
