"""The flow ODE's solvers: the grid of sampling times (with SD3's shift) and Euler / Heun integration.

Sampling a flow-matching model integrates dx/dt = v(x, t) from noise at t=1 to data at t=0 on a
grid ``1 = t_0 > t_1 > ... > t_N = 0`` of N *solver steps*. The functions here are pure: they take
the velocity as a callable ``velocity(x, t) -> v`` (t a 0-dim tensor), so they know no network,
guidance or text, and are tested on flows with known exact solutions (tests/test_diffusion_solvers.py).

* ``euler``: x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i). First order; 1 velocity call per step.
* ``heun``: Heun's second-order method as in EDM's deterministic sampler (Karras et al. 2022,
  "Elucidating the Design Space of Diffusion-Based Generative Models", Algorithm 1): an Euler
  predictor x' = x_i + h d_i with d_i = v(x_i, t_i), then a trapezoidal corrector
  x_{i+1} = x_i + h (d_i + v(x', t_{i+1})) / 2. As in EDM, the correction is skipped on the step
  that ends at t = 0, which is a plain Euler step. So heun-N costs 2N - 1 velocity calls (N >= 1),
  and :func:`num_velocity_calls` is what the FLOP accounting charges.
* the time shift of SD3 (Esser et al. 2024, "Scaling Rectified Flow Transformers for
  High-Resolution Image Synthesis", Sec. 5.3.2, eq. 23): t' = s t / (1 + (s - 1) t), applied to
  the uniform grid. It maps [0, 1] onto itself monotonically and fixes both ends; s = 1 is the
  identity, s > 1 moves the grid toward t = 1 (more steps at high noise, where SD3 found the
  uniform grid too coarse), s < 1 toward the data.

Why steps keep meaning solver steps: a step is one advance along the grid, for every solver, so
``steps`` stays the grid size a user asks for; the cost of a solve is its number of velocity calls
(network passes), which the FLOP accounting counts rather than assumes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flopmatch.config import SOLVERS
from flopmatch.errors import UserError

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B, ...), t 0-dim) -> v (B, ...)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift t' = shift * t / (1 + (shift - 1) * t) (Esser et al. 2024, eq. 23), elementwise on t in [0, 1]."""
    return shift * t / (1 + (shift - 1) * t)


def time_grid(steps: int, shift: float = 1.0, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sampling times (steps + 1,) from 1 (noise) down to 0 (data): a uniform grid, shifted unless shift == 1."""
    if steps < 1:
        raise UserError(f"the flow ODE needs at least 1 step, got {steps}")
    ts = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=dtype)  # (steps+1,)
    if shift == 1.0:
        return ts  # the exact uniform grid (shift 1 is the identity; skipping it keeps old samples bit for bit)
    ts = shift_time(ts, shift)
    # Both ends are fixed points of the shift; pin them so rounding in 1 + (shift - 1) cannot move t_0 off 1.
    ts[0], ts[-1] = 1.0, 0.0
    return ts


def num_velocity_calls(steps: int, solver: str) -> int:
    """Velocity (network) evaluations of one solve with ``steps`` solver steps: N for euler, 2N - 1 for heun."""
    if solver == "euler":
        return steps
    if solver == "heun":
        return 2 * steps - 1  # no correction on the last step, which ends at t = 0 (EDM, Algorithm 1)
    raise UserError(f"unknown ODE solver {solver!r}; choose one of {', '.join(SOLVERS)}")


def integrate(velocity: Velocity, x: torch.Tensor, ts: torch.Tensor, solver: str = "euler") -> torch.Tensor:
    """Solve dx/dt = velocity(x, t) from x at ts[0] through every time of ``ts`` (steps + 1,); returns x at ts[-1].

    x (B, ...) keeps its dtype if velocity returns the same; ``heun`` takes its last step as plain Euler,
    which is EDM's rule for a grid that ends at t = 0 (every :func:`time_grid` does).
    """
    if solver not in SOLVERS:
        raise UserError(f"unknown ODE solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    steps = len(ts) - 1
    for i in range(steps):
        h = ts[i + 1] - ts[i]  # 0-dim; < 0 when moving from noise toward data
        d = velocity(x, ts[i])  # (B, ...)
        if solver == "euler" or i == steps - 1:
            # Heun's last step ends at t = 0: plain Euler, as EDM does (its corrector would need v at the endpoint).
            x = x + h * d
        else:
            x_pred = x + h * d  # Euler predictor
            # trapezoidal corrector: the mean of the slopes at both ends of the step (2nd order, EDM Alg. 1)
            x = x + h * (0.5 * d + 0.5 * velocity(x_pred, ts[i + 1]))
    return x
