"""Schedules shared by every training loop: learning rate and EMA warm-up.

Learning-rate schedules (``train.schedule``):

- ``cosine`` (default): linear warmup over ``warmup_frac`` of the steps, then a half cosine to
  ``lr * min_lr_ratio`` at the last step. Every step's LR depends on the total, so a finished run
  cannot be continued to a larger budget.
- ``wsd`` (warmup-stable-decay): linear warmup over a fixed ``warmup_steps``, the peak LR held
  constant, then a cooldown over the final ``decay_frac`` of the steps to ``lr * min_lr_ratio`` with
  the "1-sqrt" shape. Hu et al. 2024 (MiniCPM) introduced it; Hägele et al. 2024, "Scaling Laws and
  Compute-Optimal Training Beyond Fixed Training Durations", found that it matches the cosine at equal
  compute with a cooldown of ~20 % of the steps and that the 1-sqrt cooldown beats a linear one.
  Until the cooldown starts the LR does not depend on the budget, so the state saved there (the
  "stable" checkpoint) lies on the path of every larger budget: one run serves several budgets.
- ``constant``: the same warmup, then the peak LR to the end (no decay at all): every step is
  budget-independent; for the EMA-versus-LR-decay ablation.

Written once: the generators' loop (``train.py``) calls :func:`lr_at`, and the autoencoders' loop
(``tokenizers/train_ae.py``) calls :func:`warmup_cosine` directly.
"""

from __future__ import annotations

import math

from flopmatch.config import TrainConfig


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


def warmup_stable_decay(step: int, total: int, peak: float, warmup: int, decay: int, min_ratio: float) -> float:
    """Learning rate at ``step`` (counting from 0) of ``total`` steps: warmup, constant, 1-sqrt cooldown.

    Linear warmup over ``warmup`` steps (step 0 gets ``peak / warmup``, as in :func:`warmup_cosine`),
    then ``peak``; the last ``decay`` steps multiply that by ``min_ratio + (1 - min_ratio) * (1 - sqrt(p))``
    with p = 1/decay, ..., 1, so the last step, ``total - 1``, gets exactly ``peak * min_ratio``.
    The 1-sqrt shape is the cooldown Hägele et al. 2024 found best. ``decay = 0`` is the
    constant schedule. Before step ``total - decay`` the value does not depend on ``total``: that is
    what lets a run continue to a larger budget. A warmup longer than the stable phase is cooled down
    from wherever it got to (so the property still holds).
    """
    lr = peak * (step + 1) / max(1, warmup) if step < warmup else peak
    start = total - decay  # the first step of the cooldown
    if decay > 0 and step >= start:
        p = (step - start + 1) / decay  # (0, 1]
        lr *= min_ratio + (1 - min_ratio) * (1 - math.sqrt(p))
    return lr


def decay_steps(total: int, decay_frac: float) -> int:
    """Steps of the wsd cooldown: ``round(decay_frac * total)``, at least 1.

    Never falls as ``total`` grows, and grows by at most 1 per step of ``total`` (decay_frac < 1), so the
    cooldown start ``total - decay_steps`` never falls either: a smaller budget's stable phase is a
    prefix of a larger one's.
    """
    return max(1, round(decay_frac * total))


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """The generators' learning rate at ``step`` of ``total`` steps under ``cfg.schedule`` (see the module docstring)."""
    if cfg.schedule == "cosine":  # warmup over warmup_frac of the steps, cosine to lr * min_lr_ratio
        return warmup_cosine(step, total, cfg.lr, round(cfg.warmup_frac * total), cfg.min_lr_ratio)
    decay = decay_steps(total, cfg.decay_frac) if cfg.schedule == "wsd" else 0
    return warmup_stable_decay(step, total, cfg.lr, cfg.warmup_steps, decay, cfg.min_lr_ratio)


def stable_steps(total: int, cfg: TrainConfig) -> int | None:
    """How many of ``total`` steps run at learning rates that do not depend on the budget.

    wsd: the steps before the cooldown (its stable checkpoint is saved after them); constant: all of
    them; cosine: None (every step's LR depends on the total).
    """
    if cfg.schedule == "wsd":
        return total - decay_steps(total, cfg.decay_frac)
    if cfg.schedule == "constant":
        return total
    return None


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay at ``step``: min(decay, (1 + step) / (10 + step)).

    The warm-up keeps short runs from averaging mostly the random initialisation: early on the
    EMA follows the weights closely, and the nominal ``decay`` applies after ~10 / (1 - decay) steps.
    """
    return min(decay, (1 + step) / (10 + step))
