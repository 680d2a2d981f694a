"""Schedules shared by every training loop: learning rate (linear warmup + cosine) and EMA warm-up.

Written once: the generators' loop (``train.py``) and the autoencoders' loop
(``tokenizers/train_ae.py``) both call :func:`warmup_cosine`.
"""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Learning rate at ``step`` (counting from 0) of ``total`` steps.

    Linear warmup over ``warmup`` steps to ``peak`` (step 0 already gets ``peak / warmup``), then a
    half cosine that reaches ``peak * min_ratio`` exactly at the last step, ``total - 1``.
    """
    warmup = max(1, warmup)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay at ``step``: min(decay, (1 + step) / (10 + step)).

    The warm-up keeps short runs from averaging mostly the random initialisation: early on the
    EMA follows the weights closely, and the nominal ``decay`` applies after ~10 / (1 - decay) steps.
    """
    return min(decay, (1 + step) / (10 + step))
