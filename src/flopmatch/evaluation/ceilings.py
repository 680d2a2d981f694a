"""A tokenizer's ceiling: its reconstructions scored exactly as the generators built on it are scored.

A generator produces its tokenizer's decoded outputs, so what the tokenizer loses bounds every image
quality and prompt-following number of the paradigms that use it. The ceiling mirrors
:func:`flopmatch.evaluation.run.evaluate`: the first ``n`` images of the evaluation split (cycled past
its end, as the generators' prompts are; ``n`` = the generators' sample count) are encoded and decoded
(:func:`flopmatch.evaluation.tokenizer.reconstruct`), then scored:

- ``fid[<extractor>]["recon"]``: FID of the n reconstructions against the whole evaluation split's cached
  reference features, the generators' own reference. FID is biased upward at small n, so only an rFID
  at the generators' n reads against their FID; ``["real"]``: the same n real images (the floor of FID
  at that n: what a generator that reproduced the real images would score);
- ``psnr`` (dB, mean per image), ``ssim``, ``mse`` (:func:`flopmatch.evaluation.tokenizer.image_metrics`);
- ``prompt_following["recon"]`` / ``["real"]``: the dataset's prompt scorer
  (:func:`flopmatch.evaluation.prompt_scoring.prompt_scorer`; the attribute classifier for shapes) on the
  reconstructions and on the real images, with the prompts the generators get (each image's own
  caption); ``full_match`` is the fraction of images passing every check;
- shapes only, ``attribute_accuracy``: per-head accuracy of the attribute classifier against the scenes'
  ground truth on real and reconstructed images
  (:func:`flopmatch.evaluation.tokenizer.reconstruction_attributes`).

A study keeps one entry per token type in ``<study>/tokenizer_ceilings.json`` (:data:`CEILINGS_FILE`,
written by ``flopmatch.study.ceilings``, read by the report).
"""

from __future__ import annotations

import torch

from flopmatch.config import DataConfig, parse_source
from flopmatch.data.datasets import make_dataset
from flopmatch.evaluation.prompt_scoring import prompt_scorer
from flopmatch.evaluation.run import eval_prompts
from flopmatch.evaluation.tokenizer import (
    image_metrics,
    reconstruct,
    reconstruction_attributes,
    reconstruction_fid,
    to_uint8,
)
from flopmatch.tokenizers.base import Tokenizer

CEILINGS_FILE = "tokenizer_ceilings.json"  # in the study directory
CEILINGS_VERSION = 1  # bump when what a ceiling measures changes: cached ceilings are then recomputed


def tokenizer_ceiling(tok: Tokenizer, data: DataConfig, num_images: int, features: list[str],
                      progress: bool = False, real_fids: dict[str, float | None] | None = None) -> dict:
    """Reconstruction quality of ``tok`` on ``num_images`` eval images of ``data``; see the module docstring.

    ``real_fids``: a dict shared between calls on the same data, n and extractors, holding the real images'
    FID per extractor (filled on first use), so several tokenizers pay for it once.

    Returns {"num_images", "num_reference", "psnr" (dB), "psnr_std", "ssim", "mse", "fid": {extractor:
    {"recon", "real"}}, "prompt_following": {"scorer", "recon", "real"} (fractions in [0, 1]),
    "attribute_accuracy" (shapes, else None)}.
    """
    ref = make_dataset(data, "eval", progress=progress)
    ref_images = ref.images_uint8()  # (R, 3, S, S): the generators' FID reference, the whole eval split
    index = torch.arange(num_images) % len(ref)  # the images of the generators' prompts (eval_prompts cycles)
    real = ref_images[index]  # (n, 3, S, S) uint8
    recon, _, _ = reconstruct(tok.eval(), real)
    recon_uint8 = to_uint8(recon)  # the rounding generated samples get (flopmatch.sample.generate)
    out = {"num_images": num_images, "num_reference": len(ref), **image_metrics(real.float() / 127.5 - 1.0, recon)}
    key = f"{ref.fingerprint()}-{len(ref)}"  # flopmatch.evaluation.run's key: the same cached reference features
    real_fids = {} if real_fids is None else real_fids
    out["fid"] = {}
    for name in features:
        if name not in real_fids:
            real_fids[name] = reconstruction_fid(ref_images, real, name, key, progress, dataset_name=data.name)
        out["fid"][name] = {"recon": reconstruction_fid(ref_images, recon_uint8, name, key, progress, dataset_name=data.name),
                            "real": real_fids[name]}
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
