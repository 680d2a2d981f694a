"""Post-hoc EMA: power-function averages of the weights, and any average's reconstruction after training.

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2, §3 and
App. C). A power-function EMA with exponent gamma, updated after every optimiser step t = 1, 2, ... by

    theta_hat <- beta_t * theta_hat + (1 - beta_t) * theta_t,    beta_t = (1 - 1/t) ** (gamma + 1),

averages the weights theta_1..theta_t with weights growing like tau ** gamma. Its length is scale-free:
the averaging profile's standard deviation over the run, relative to the run's length t, is

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))),

the same at every step. So an EMA length set as sigma_rel is a fixed *fraction of the run*, and runs of
different lengths (different budgets, different paradigms at one budget) are averaged alike, which a fixed
decay (0.999 everywhere) is not: there the averaging window is a different fraction of every run.

Training keeps two such averages (``train.ema_profiles``, EDM2's sigma_rel 0.05 and 0.10) and saves both
``train.ema_snapshots`` times over the run. Each snapshot is a known linear combination of theta_1..theta_T,
so the average for any other sigma_rel is found after training as the combination of snapshots whose
profile over tau is closest, in least squares, to the wanted one (:func:`solve`), and applied to the
snapshots' weights (:func:`flopmatch.rundir.posthoc_weights`). Quality can then be swept over sigma_rel
without training again.

One departure from EDM2, and why: EDM2 solves for the continuous profiles (tau a real number,
profile (gamma+1) tau**gamma / t**(gamma+1)), a fine approximation for runs of 10^5+ steps. A study here
has runs of a few hundred steps, where the first steps' weights differ measurably from the continuous
curve, so :func:`profile` gives the exact discrete weights of the update above (they telescope to a
closed form) and :func:`solve` fits those: a snapshot of the target itself is then reconstructed exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# sigma_rel of the power-function EMAs training keeps (EDM2's pair); the largest sigma_rel any gamma > -1
# gives is ~0.3002 (at gamma ~ -0.37): longer averages do not exist for this family.
DEFAULT_PROFILES = (0.05, 0.10)
SIGMA_REL_MAX = 0.3


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power-function EMA with relative length ``sigma_rel`` (EDM2 Eq. 3 inverted).

    sigma_rel ** 2 = (gamma+1) / ((gamma+2)**2 (gamma+3)) is the cubic gamma**3 + 7 gamma**2 + (16 - s) gamma
    + (12 - s) = 0 with s = sigma_rel ** -2; its largest real root is the EMA that weights late steps most.
    """
    if not 0 < sigma_rel <= SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX}], got {sigma_rel}")
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    gamma = float(max(r.real for r in roots if abs(r.imag) < 1e-9))
    return max(gamma, -1 + 1e-9)


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative length of the power-function EMA with exponent ``gamma`` (> -1) (EDM2 Eq. 3)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_beta(t: int, gamma: float) -> float:
    """The decay of a power-function EMA's update after optimiser step ``t`` (1-based): (1 - 1/t) ** (gamma+1).

    t = 1 gives 0: the first update copies the weights, so the initialisation never enters the average.
    """
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def profile(t: int, gamma: float, horizon: int | None = None) -> np.ndarray:
    """The weights the power-function EMA at step ``t`` gives theta_1..theta_horizon, float64 (horizon,).

    Exact for the discrete update of :func:`power_beta`: the product of the betas after tau telescopes,
    prod_{s=tau+1..t} (1 - 1/s) = tau / t, so weight(tau) = (tau**(g+1) - (tau-1)**(g+1)) / t**(g+1) for
    tau <= t (0 after t); they sum to 1. ``horizon`` defaults to ``t``.
    """
    tau = np.arange(1, (horizon or t) + 1, dtype=np.float64)
    g1 = gamma + 1.0
    # divided by t before the power: t ** (g+1) overflows no float for any t a run reaches
    w = (tau / t) ** g1 - ((tau - 1) / t) ** g1
    w[tau > t] = 0.0
    return w


@dataclass(frozen=True)
class Solution:
    """How to build one post-hoc average: ``coefficients[i]`` times snapshot ``i``'s average ``i``.

    ``residual``: the relative L2 distance between the reconstructed and the wanted profile over tau
    (0 = exact; EDM2 reports good FID agreement well below 0.1).
    """

    coefficients: np.ndarray  # (n_snapshots, n_profiles)
    residual: float


def solve(steps: list[int], gammas: list[float], t: int, gamma: float) -> Solution:
    """Least-squares coefficients that turn snapshots into the power-function EMA (``gamma``) at step ``t``.

    ``steps``: the snapshots' steps (n,); ``gammas``: the exponents of the averages each snapshot holds (m,).
    Snapshots after ``t`` get coefficient 0. The fit is over the exact discrete profiles (:func:`profile`),
    O((n m) ** 2 t) float64 work: milliseconds for the runs of a study.
    """
    usable = [i for i, s in enumerate(steps) if s <= t]
    if not usable:
        raise ValueError(f"no snapshot at or before step {t}")
    basis = np.stack([profile(steps[i], g, t) for i in usable for g in gammas], axis=1)  # (t, k), k = n_usable * m
    target = profile(t, gamma)  # (t,)
    # Least squares under the constraint sum(x) = 1 (every profile sums to 1, so this keeps the reconstructed
    # profile a weighted *average*: unconstrained, a long sigma_rel comes out ~2 % short, shrinking every weight).
    # Solved through the KKT system [[B'B, 1], [1', 0]] [x; lambda] = [B'p; 1]. Its rcond drops directions the
    # near-collinear profiles cannot tell apart instead of fitting them with huge coefficients of opposite signs,
    # which would amplify the snapshots' float rounding.
    k = basis.shape[1]
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k] = basis.T @ basis
    kkt[:k, k] = kkt[k, :k] = 1.0
    x = np.linalg.lstsq(kkt, np.concatenate([basis.T @ target, [1.0]]), rcond=1e-14)[0][:k]
    residual = float(np.linalg.norm(basis @ x - target) / np.linalg.norm(target))
    coef = np.zeros((len(steps), len(gammas)))
    coef[usable] = x.reshape(len(usable), len(gammas))  # basis columns are (snapshot, profile) in row-major order
    return Solution(coef, residual)


def fixed_ema_sigma_rel(steps: int, decay: float) -> float:
    """The relative length (std of its averaging profile over the run, / run length) of the EMA that training keeps
    with ``train.ema_decay`` after ``steps`` steps: decay min(decay, (1+s)/(10+s)) at step s
    (:func:`flopmatch.schedule.ema_decay_at`), the initial weights counted as step 0.

    For comparison with post-hoc lengths: its warm-up, ~1 - 9/s, is a power-function EMA with gamma ~ 8
    (sigma_rel ~0.09) for as long as it is below ``decay`` (s < ~9,000 at 0.999); longer runs see a fixed
    window of ~1/(1 - decay) steps, an ever shorter fraction of the run.
    """
    s = np.arange(steps, dtype=np.float64)  # the update after step s + 1 uses the decay of step s
    beta = np.minimum(decay, (1 + s) / (10 + s))
    after = np.concatenate([np.cumprod(beta[::-1])[::-1][1:], [1.0]])  # prod of the betas after each update
    w = np.concatenate([[np.prod(beta)], (1 - beta) * after])  # weights of theta_0 .. theta_steps (sum 1)
    tau = np.arange(steps + 1, dtype=np.float64)
    mean = (w * tau).sum()
    return float(np.sqrt((w * (tau - mean) ** 2).sum()) / steps)


def snapshot_steps(total_steps: int, count: int) -> list[int]:
    """Steps at which a run of ``total_steps`` saves its averages: ``count`` evenly spaced, the last at the end."""
    if count <= 0 or total_steps <= 0:
        return []
    return sorted({math.ceil(k * total_steps / count) for k in range(1, count + 1)})


@torch.no_grad()
def power_update(averages: list[torch.nn.Module], net: torch.nn.Module, t: int, gammas: list[float]) -> None:
    """Update each power-function average after optimiser step ``t`` (1-based) with its exponent in ``gammas``."""
    params = [p.detach() for p in net.parameters()]
    for avg, g in zip(averages, gammas):
        # one fused kernel per average over all its tensors (per-tensor lerp launches one kernel each)
        torch._foreach_lerp_(list(avg.parameters()), params, 1.0 - power_beta(t, g))
