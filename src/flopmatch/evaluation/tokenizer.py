"""Reconstruction metrics of a learned tokenizer on the eval split, written to ``<dir>/eval.json``.

Reported (images compared in [0, 1], reconstructions clamped, not quantised to uint8):
- ``psnr``: mean over images of per-image PSNR in dB (data range 1); ``mse`` pooled over all pixels;
- ``ssim``: mean per-image SSIM (Gaussian window 11, sigma 1.5, reflect padding, data range 1): the
  same computation as torchmetrics' ``structural_similarity_index_measure`` (a test checks they agree),
  written here because importing torchmetrics costs 5-10 s on this CPU;
- ``rfid``: reconstruction FID (eval images vs their own reconstructions, equal counts) through
  :func:`reconstruction_fid`, using flopmatch.evaluation's feature extractors; ``rfid_features`` names
  the extractor ("effnet" = fast EfficientNet-Lite0 proxy; "inception" = standard FID, ~12 img/s on
  2 cores). ``null`` when evaluation is unavailable or disabled, never a made-up number. Paired images
  make it a tokenizer-training diagnostic; the study's ceiling rFID, which reads against generators' FID,
  compares reconstructions of other images with the generators' reference
  (:mod:`flopmatch.evaluation.ceilings`);
- LFQ: ``codebook_usage`` (fraction of the 2^bits codes that occur on the eval set), ``perplexity``
  (exp of the entropy of the empirical code distribution, in codes), ``bit_balance`` (P(bit = 1));
- KL: statistics of the normalised latents encode() returns (mean, std, per-channel mean/std) and the
  average posterior standard deviation (how much noise the KL term left, in normalised units);
- ``attribute_accuracy``: per-attribute accuracy (colour, shape, size, position, relation, count) of
  flopmatch.evaluation's shapes attribute classifier on the originals ("real") and on the
  reconstructions ("recon"). Prompt following is scored with that classifier, so what a tokenizer
  loses here caps every generator built on it; ``null`` if evaluation is unavailable or disabled;
- ``encode_flops`` / ``decode_flops`` per image (analytic) and measured encode/decode images per second.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as nn_f

from flopmatch.config import parse_source
from flopmatch.data.datasets import make_dataset
from flopmatch.device import resolve_device
from flopmatch.errors import UserError
from flopmatch.evaluation.attributes import head_accuracy, load_or_train_attribute_classifier
from flopmatch.evaluation.features import extract_features, make_feature_extractor, reference_features
from flopmatch.evaluation.quality import fid_from_features
from flopmatch.files import atomic_write_json
from flopmatch.tokenizers.base import Tokenizer
from flopmatch.tokenizers.learned import LearnedAutoencoder
from flopmatch.tokenizers.registry import load_learned
from flopmatch.tokenizers.train_ae import load_images

RFID_FEATURES = ("effnet", "inception", "none")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images (B, 3, H, W) in [-1, 1] -> uint8 (B, 3, H, W), rounding to nearest."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def reconstruction_fid(real_uint8: torch.Tensor, recon_uint8: torch.Tensor, features: str = "effnet",
                       reference_key: str | None = None, progress: bool = False,
                       dataset_name: str = "shapes") -> float | None:
    """FID between real images and their reconstructions, both uint8 (N, 3, H, W); None if unavailable.

    The hook into flopmatch.evaluation: features from ``make_feature_extractor(features)``, the real
    set's features cached under ``reference_key`` (if given) via ``reference_features``, distance from
    ``fid_from_features``. Returns None when features == "none", so eval.json says null instead of a
    made-up number; a missing weight package is a UserError naming what to install. ``dataset_name`` is
    recorded with the cached reference features (metadata only; ``reference_key`` identifies the set).
    """
    if features == "none":
        return None
    extractor = make_feature_extractor(features, resolve_device("auto"))  # on the GPU when there is one, as in eval
    if reference_key is not None:
        real = reference_features(extractor, dataset_name, real_uint8, reference_key, progress=progress)
    else:
        real = extract_features(extractor, real_uint8, progress=progress)
    fake = extract_features(extractor, recon_uint8, progress=progress)
    return fid_from_features(real, fake)


def reconstruction_attributes(real_uint8: torch.Tensor, recon_uint8: torch.Tensor, attrs: list[dict],
                              shapes_cfg, progress: bool = False) -> dict | None:
    """Attribute-classifier accuracy per head on real and reconstructed uint8 images (N, 3, H, W).

    ``attrs``: the scenes' ground truth (``Scene.attrs()``); ``shapes_cfg``: their ShapesConfig (the
    classifier is loaded from the cache, or trained once, for it).
    """
    classifier = load_or_train_attribute_classifier(shapes_cfg, progress=progress)
    return {"real": head_accuracy(classifier, real_uint8, attrs), "recon": head_accuracy(classifier, recon_uint8, attrs),
            "classifier_sha256": classifier.checksum}


@torch.no_grad()
def reconstruct(tok: Tokenizer, images_uint8: torch.Tensor, batch_size: int = 250
                ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Encode and decode uint8 images (N, 3, S, S) -> (recon float (N, 3, S, S) in [-1, 1],
    codes: tokens (N, L) long or latents (N, C, g, g), timing {"encode_s", "decode_s"}).

    Any tokenizer: learned autoencoders and the weight-free ones (which hold buffers, no parameters)."""
    device = next(itertools.chain(tok.parameters(), tok.buffers())).device
    recons, codes = [], []
    t_enc = t_dec = 0.0
    for start in range(0, images_uint8.shape[0], batch_size):
        x = images_uint8[start:start + batch_size].to(device).float() / 127.5 - 1.0
        t0 = time.perf_counter()
        z = tok.encode(x)
        t1 = time.perf_counter()
        recons.append(tok.decode(z).cpu())
        t_dec += time.perf_counter() - t1
        t_enc += t1 - t0
        codes.append(z.cpu())
    return torch.cat(recons), torch.cat(codes), {"encode_s": t_enc, "decode_s": t_dec}


METRIC_CHUNK = 1024  # images per chunk of image_metrics


def ssim(preds: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM (N,) of images (N, C, H, W) with values in a range of width ``data_range``.

    Gaussian window of side int(3.5 sigma + 0.5) * 2 + 1 (11 for sigma 1.5), inputs reflect-padded so
    every pixel gets a window, SSIM map averaged over channels and pixels (torchmetrics' convention).
    """
    side = int(3.5 * sigma + 0.5) * 2 + 1
    pad = (side - 1) // 2
    d = torch.arange(side, dtype=torch.float64) - pad
    g = torch.exp(-0.5 * (d / sigma) ** 2)
    g = g / g.sum()
    c = preds.shape[1]
    kernel = (g[:, None] * g[None, :]).to(preds).expand(c, 1, side, side)  # (C, 1, k, k), depthwise
    x = nn_f.pad(preds, (pad,) * 4, mode="reflect")
    y = nn_f.pad(target, (pad,) * 4, mode="reflect")
    stats = nn_f.conv2d(torch.cat([x, y, x * x, y * y, x * y]), kernel, groups=c).split(preds.shape[0])
    mu_x, mu_y = stats[0], stats[1]
    var_x = (stats[2] - mu_x ** 2).clamp_min(0)
    var_y = (stats[3] - mu_y ** 2).clamp_min(0)
    cov = stats[4] - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def image_metrics(real: torch.Tensor, recon: torch.Tensor) -> dict:
    """PSNR (dB, mean per image), SSIM (mean per image), MSE (pooled) of float images (N, C, H, W) in [-1, 1].

    Computed in chunks of :data:`METRIC_CHUNK` images: SSIM's padded statistics take ~15x the images' memory, which
    for 100k 32 px images would be tens of GB at once."""
    mse, ssims = [], []
    for i in range(0, real.shape[0], METRIC_CHUNK):
        a = (real[i : i + METRIC_CHUNK].float() + 1) / 2  # [0, 1]
        b = (recon[i : i + METRIC_CHUNK].float().clamp(-1, 1) + 1) / 2
        mse.append((a - b).pow(2).flatten(1).mean(1))  # (n,)
        ssims.append(ssim(b, a, data_range=1.0))  # (n,)
    per_image_mse, per_image_ssim = torch.cat(mse), torch.cat(ssims)  # (N,) each
    psnr = 10 * torch.log10(1.0 / per_image_mse.clamp_min(1e-10))  # capped at 100 dB for exact copies
    return {"psnr": float(psnr.mean()), "psnr_std": float(psnr.std()) if len(psnr) > 1 else 0.0,
            "ssim": float(per_image_ssim.mean()), "mse": float(per_image_mse.mean())}  # equal-size images: pooled


def code_metrics(tokens: torch.Tensor, vocab_size: int, bits: int) -> dict:
    """Codebook usage, perplexity (codes) and per-bit P(1) of tokens (N, L) long."""
    counts = torch.bincount(tokens.flatten(), minlength=vocab_size).double()
    p = counts / counts.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    on = (tokens.flatten().unsqueeze(1) // (2 ** torch.arange(bits))) % 2  # (N*L, bits)
    return {"codebook_usage": float((counts > 0).double().mean()), "codes_used": int((counts > 0).sum()),
            "vocab_size": vocab_size, "perplexity": math.exp(entropy),
            "bit_balance": [round(float(v), 4) for v in on.double().mean(dim=0)]}


@torch.no_grad()
def latent_metrics(tok: LearnedAutoencoder, latents: torch.Tensor, images_uint8: torch.Tensor) -> dict:
    """Statistics of normalised latents (N, C, g, g) and the mean posterior std in normalised units."""
    per_channel = latents.transpose(0, 1).flatten(1)  # (C, N*g*g)
    x = images_uint8[:500].to(tok.latent_std.device).float() / 127.5 - 1.0
    _, logvar = tok.posterior(x)
    post_std = (torch.exp(0.5 * logvar) / tok.latent_std.view(1, -1, 1, 1)).mean()
    return {"latent_mean": float(latents.mean()), "latent_std": float(latents.std()),
            "latent_abs_max": float(latents.abs().max()),
            "channel_mean": [round(float(v), 4) for v in per_channel.mean(dim=1)],
            "channel_std": [round(float(v), 4) for v in per_channel.std(dim=1)],
            "posterior_std": float(post_std),
            "normaliser_mean": [round(float(v), 4) for v in tok.latent_mean.cpu()],
            "normaliser_std": [round(float(v), 4) for v in tok.latent_std.cpu()]}


def evaluate_tokenizer(tok: LearnedAutoencoder, images_uint8: torch.Tensor, rfid_features: str = "effnet",
                       reference_key: str | None = None, attrs: list[dict] | None = None, shapes_cfg=None,
                       progress: bool = False) -> dict:
    """All reconstruction metrics of ``tok`` on uint8 images (N, 3, S, S); see the module docstring.

    Attribute accuracy is computed only when the scenes' ``attrs`` and their ``shapes_cfg`` are given.
    """
    if rfid_features not in RFID_FEATURES:
        raise UserError(f"rfid features must be one of {RFID_FEATURES}, got {rfid_features!r}")
    tok = tok.eval()
    n = images_uint8.shape[0]
    recon, codes, timing = reconstruct(tok, images_uint8)
    real = images_uint8.float() / 127.5 - 1.0
    out = {"kind": tok.kind, "num_images": n, **image_metrics(real, recon)}
    if tok.kind == "lfq":
        out.update(code_metrics(codes, tok.spec.vocab_size, tok.config.bits))
    else:
        out.update(latent_metrics(tok, codes, images_uint8))
    recon_uint8 = to_uint8(recon)
    rfid = reconstruction_fid(images_uint8, recon_uint8, rfid_features, reference_key, progress)
    attributes = None
    if attrs is not None and shapes_cfg is not None:
        attributes = reconstruction_attributes(images_uint8, recon_uint8, attrs, shapes_cfg, progress)
    out.update({"rfid": rfid, "rfid_features": rfid_features if rfid is not None else None,
                "attribute_accuracy": attributes,
                "encode_flops": tok.encode_flops(), "decode_flops": tok.decode_flops(),
                "encoder_params": sum(p.numel() for p in tok.encoder.parameters()),
                "decoder_params": sum(p.numel() for p in tok.decoder.parameters()),
                "encode_images_per_s": round(n / max(timing["encode_s"], 1e-9), 1),
                "decode_images_per_s": round(n / max(timing["decode_s"], 1e-9), 1)})
    return out


def run_eval(directory: str | Path, num: int = 2000, rfid_features: str = "effnet", attributes: bool = True,
             progress: bool = True) -> dict:
    """Load the tokenizer in ``directory``, evaluate it on ``num`` eval-split images, write eval.json."""
    if num < 2:
        raise UserError(f"--num must be >= 2 eval images, got {num}")
    directory = Path(directory)
    tok = load_learned(directory)
    images, info = load_images(tok.config, "eval", num_eval=num)
    key = f"{parse_source(info['name'])[0]}-{info['fingerprint']}-eval-{num}"  # a file name: no path in it
    attrs = cfg = None
    if attributes and tok.config.data == "shapes":  # exact attribute scoring needs the scenes' ground truth
        ds = make_dataset(tok.config.data_config(num), "eval")
        cfg = ds.cfg
        attrs = [ds.scene(i).attrs() for i in range(num)]
    metrics = evaluate_tokenizer(tok, images, rfid_features, reference_key=key, attrs=attrs, shapes_cfg=cfg,
                                 progress=progress)
    metrics["manifest"] = {"tokenizer_fingerprint": tok.fingerprint(), "data": info, "split": "eval",
                           "num_images": num}
    atomic_write_json(directory / "eval.json", metrics)
    return metrics
