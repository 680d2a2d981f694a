"""Categorical sampling shared by the token paradigms (objectives/logits.py)."""

from __future__ import annotations

import torch


def test_categorical_draws_follow_the_probabilities_and_never_zero_mass():
    """Inverse-CDF draws: frequencies match p within 5 sigma over 200k draws, zero-mass entries never
    drawn, rows need not be normalised, and the same generator seed gives the same draws."""
    from flopmatch.objectives.logits import categorical

    p = torch.tensor([0.0, 0.1, 0.0, 0.3, 0.6, 0.0])
    n = 200_000
    draws = categorical((3 * p).expand(n, -1), torch.Generator().manual_seed(0))  # unnormalised rows
    freq = torch.bincount(draws, minlength=6).double() / n
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), freq
    assert torch.equal(draws, categorical((3 * p).expand(n, -1), torch.Generator().manual_seed(0)))


def test_categorical_rounding_at_the_top_takes_the_last_entry_with_mass(monkeypatch):
    """If u * total rounds up to the total (float32), the draw is the last entry with mass, not a masked one."""
    from flopmatch.objectives import logits as logits_mod

    monkeypatch.setattr(logits_mod.torch, "rand", lambda *shape, **kw: torch.ones(*shape))
    probs = torch.tensor([[0.2, 0.8, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0]])
    assert logits_mod.categorical(probs, None).tolist() == [1, 2]
