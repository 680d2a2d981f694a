"""A tokenizer's ceiling: its reconstructions scored exactly as the generators built on it are scored.

A generator produces its tokenizer's decoded outputs, so what the tokenizer loses bounds every image
quality and prompt-following number of the paradigms that use it. The ceiling mirrors
:func:`flopmatch.evaluation.run.evaluate` with ``n`` = the generators' sample count: eval images are
encoded and decoded (:func:`flopmatch.evaluation.tokenizer.reconstruct`), then scored:

- ``fid[<extractor>]``: FID at the generators' counts against the generators' reference. A generator's
  FID compares its n samples with the first n eval images, the prompt-matched real set
  (:func:`flopmatch.evaluation.run.fid_reference_rows`); FID's bias depends on both counts, so the
  ceiling uses the same n and the same reference. ``["real"]``, the floor: FID of n *other* real
  images, eval images n..2n-1, against that reference (what a generator that drew fresh real images
  would score; the reference images themselves would give a floor too low, as they are part of it);
  ``["recon"]``, rFID: the reconstructions of those same n other images against it (so no
  reconstruction is compared with a reference holding its own original). Both need R >= 2n eval
  images: otherwise they are None and ``fid_note`` says to raise data.num_eval. ``fid_num_reference``
  and ``fid_num_compared`` record the counts (n and n, or n and None);
- ``kid[<extractor>]``: the same two comparisons by KID, with the generators' kernel, subset size and
  subset count (:class:`flopmatch.evaluation.run.EvalConfig`'s). A generator's KID compares its samples
  with the whole split, reconstructions' originals included; KID's estimate is unbiased at any counts
  (Binkowski et al. 2018), so rKID against the disjoint first n reads against it without that overlap.
  ``["real"]`` is about 0 (an unbiased estimate of a zero distance): its spread is the noise of a KID at n;
- ``psnr`` (dB, mean per image), ``ssim``, ``mse`` (:func:`flopmatch.evaluation.tokenizer.image_metrics`),
  prompt following and attribute accuracy below are on the first n images (each compares an image with its
  own reconstruction or caption, so there is no reference to overlap);
- ``prompt_following["recon"]`` / ``["real"]``: the dataset's prompt scorer
  (:func:`flopmatch.evaluation.prompt_scoring.prompt_scorer`; the attribute classifier for shapes) on the
  reconstructions and on the real images, with the prompts the generators get (each image's own
  caption); ``full_match`` is the fraction of images passing every check;
- shapes only, ``attribute_accuracy``: per-head accuracy of the attribute classifier against the scenes'
  ground truth on real and reconstructed images
  (:func:`flopmatch.evaluation.tokenizer.reconstruction_attributes`).

``flopmatch tokenizer eval``'s rFID (:mod:`flopmatch.evaluation.tokenizer`) is another number: images
against their own reconstructions, at that command's count. A study keeps one entry per token type in
``<study>/tokenizer_ceilings.json`` (:data:`CEILINGS_FILE`, written by ``flopmatch.study.ceilings``, read
by the report).
"""

from __future__ import annotations

import torch

from flopmatch.config import DataConfig, parse_source
from flopmatch.data.datasets import make_dataset, more_eval_images
from flopmatch.device import resolve_device
from flopmatch.evaluation.features import extract_features, make_feature_extractor, reference_features
from flopmatch.evaluation.prompt_scoring import prompt_scorer
from flopmatch.evaluation.quality import fid_from_features, kid_from_features
from flopmatch.evaluation.run import EvalConfig, eval_prompts
from flopmatch.evaluation.tokenizer import image_metrics, reconstruct, reconstruction_attributes, to_uint8
from flopmatch.tokenizers.base import Tokenizer

CEILINGS_FILE = "tokenizer_ceilings.json"  # in the study directory
CEILINGS_VERSION = 3  # bump when what a ceiling measures changes: cached ceilings are then recomputed
# (2: the real-image floor and rFID on eval images n..2n-1, disjoint from the reference, the first n; 3: KID too)


def disjoint_note(ref, n: int) -> str | None:
    """Why the FID floor and rFID are not measured (the evaluation split ``ref`` lacks 2n images), or None when they are."""
    if len(ref) >= 2 * n:
        return None
    return (f"the evaluation split holds {len(ref)} < 2n = {2 * n} images; for a disjoint real-image floor, "
            f"{more_eval_images(ref, 2 * n)}")


def _kid(real: torch.Tensor, fake: torch.Tensor, ecfg: EvalConfig) -> float:
    """KID of fake (n, F) against real (n, F) as a generator's evaluation computes it (subsets, seed)."""
    subset = min(ecfg.kid_subset, len(fake), len(real))
    return kid_from_features(real, fake, subset_size=subset, subsets=ecfg.kid_subsets,
                             generator=torch.Generator().manual_seed(ecfg.seed))[0]


def tokenizer_ceiling(tok: Tokenizer, data: DataConfig, num_images: int, features: list[str],
                      progress: bool = False, real_fids: dict[str, tuple[float, float]] | None = None) -> dict:
    """Reconstruction quality of ``tok`` at the generators' sample count ``num_images`` (n) on eval images of
    ``data``; see the module docstring.

    ``real_fids``: a dict shared between calls on the same data, n and extractors, holding the real-image
    floor per extractor (FID, KID; filled on first use), so several tokenizers pay for it once.

    Returns {"num_images" (n), "num_eval" (R, the split's size), "psnr" (dB), "psnr_std", "ssim", "mse",
    "fid" and "kid": {extractor: {"recon", "real"}} (None when R < 2n), "fid_num_reference", "fid_num_compared",
    "fid_note" (None, or why FID is not measured), "prompt_following": {"scorer", "recon", "real"}
    (fractions in [0, 1]), "attribute_accuracy" (shapes, else None)}.
    """
    ref = make_dataset(data, "eval", progress=progress)
    ref_images = ref.images_uint8()  # (R, 3, S, S) in split order, as the generators' prompts take them
    index = torch.arange(num_images) % len(ref)  # the images of the generators' prompts (eval_prompts cycles)
    real = ref_images[index]  # (n, 3, S, S) uint8
    recon, _, _ = reconstruct(tok.eval(), real)
    recon_uint8 = to_uint8(recon)  # the rounding generated samples get (flopmatch.sample.generate)
    note = disjoint_note(ref, num_images)
    out = {"num_images": num_images, "num_eval": len(ref), **image_metrics(real.float() / 127.5 - 1.0, recon),
           "fid_num_reference": num_images, "fid_num_compared": None if note else num_images, "fid_note": note}
    real_fids = {} if real_fids is None else real_fids
    out["fid"], out["kid"] = {}, {}
    ecfg = EvalConfig()  # the generators' KID settings (a study does not change them)
    if note is None:
        # eval images n..2n-1: disjoint from the generators' reference (the first n), reconstructed once here
        other = ref_images[num_images : 2 * num_images]  # (n, 3, S, S) uint8
        other_recon = to_uint8(reconstruct(tok, other)[0])
    key = f"{ref.fingerprint()}-{len(ref)}"  # flopmatch.evaluation.run's key: the same cached reference features
    for name in features:
        if note is not None:
            out["fid"][name] = out["kid"][name] = {"recon": None, "real": None}
            continue
        extractor = make_feature_extractor(name, resolve_device("auto"))  # on the GPU when there is one, as in eval
        # rows of the whole split's cached features, sliced: the same numbers the generators' evaluation uses
        feats = reference_features(extractor, data.name, ref_images, key, progress=progress)  # (R, F)
        reference = feats[:num_images]  # (n, F)
        real_other = feats[num_images : 2 * num_images]  # (n, F)
        if name not in real_fids:
            real_fids[name] = (fid_from_features(reference, real_other), _kid(reference, real_other, ecfg))
        recon_feats = extract_features(extractor, other_recon, progress=progress)  # (n, F)
        out["fid"][name] = {"recon": fid_from_features(reference, recon_feats), "real": real_fids[name][0]}
        out["kid"][name] = {"recon": _kid(reference, recon_feats, ecfg), "real": real_fids[name][1]}
    prompts = eval_prompts(ref, num_images)
    scorer = prompt_scorer(data, progress=progress)
    pf = {which: scorer.score(images, prompts) for which, images in (("recon", recon_uint8), ("real", real))}
    described = scorer.describe()
    out["prompt_following"] = {"scorer": pf["real"]["scorer"], "evaluator": {k: described.get(k) for k in ("name", "sha256")},
                               **pf}
    out["attribute_accuracy"] = None
    if parse_source(data.name)[0] == "shapes":
        attrs = [ref.scene(int(i)).attrs() for i in index]
        out["attribute_accuracy"] = reconstruction_attributes(real, recon_uint8, attrs, ref.cfg, progress=progress)
    return out
