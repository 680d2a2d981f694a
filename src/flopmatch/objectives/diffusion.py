"""``diffusion``: flow matching (rectified flow) on continuous latents, Euler or Heun ODE sampler.

Path x_t = (1 - t) x0 + t eps, t in [0, 1] (t=0 data, t=1 noise); the network predicts the
velocity v = eps - x0; t ~ logit-normal(mean, std) (SD3). Sampling integrates dx/dt = v from
t=1 to t=0 in ``steps`` solver steps (flopmatch.objectives.ode): ``euler`` (default; one network
call per step) or ``heun`` (EDM's second-order method: 2N - 1 calls for N steps), on a uniform
grid of times or one shifted toward noise by SD3's ``shift``. Guidance applies to every call.

Why this parameterisation: each (data, noise) pair is joined by a straight line travelled at
constant velocity, which keeps the learned ODE comparatively straight, so few Euler steps suffice;
the loss is a plain regression with no noise schedule to tune. The logit-normal t concentrates
training on mid-range t, where predicting the velocity is hardest (t near 0 or 1 is nearly data or
nearly noise), which SD3 found best among its timestep samplers.

References: Liu et al. 2022, "Flow Straight and Fast" (rectified flow); Lipman et al. 2022, "Flow
Matching for Generative Modeling"; Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis" (SD3: logit-normal t); Ho & Salimans 2022 (guidance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flopmatch.flops import parallel_sample_flops
from flopmatch.objectives.base import Objective, spec_of
from flopmatch.objectives.guidance import Guided
from flopmatch.objectives.ode import integrate, num_velocity_calls, time_grid


def flow_path(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Noised sample x_t and the target velocity for data x0, noise eps (B, ...) and t (B,)."""
    tb = t.view(-1, *([1] * (x0.dim() - 1)))  # (B, 1, 1, 1): broadcast over C, g, g
    # x_t = (1 - t) x0 + t eps, and its time derivative d x_t / dt = eps - x0 is the regression target.
    return (1 - tb) * x0 + tb * eps, eps - x0


class Diffusion(Objective):
    name = "diffusion"
    tokens = "continuous"
    time = True
    default_steps = 25

    def sample_t(self, batch: int, device, generator) -> torch.Tensor:
        """Training times t (B,) from the logit-normal density."""
        z = torch.randn(batch, device=device, generator=generator)  # (B,)
        return torch.sigmoid(self.cfg.t_mean + self.cfg.t_std * z)  # (B,) in (0, 1); SD3 default mean 0, std 1

    def draw(self, batch, spec, device, generator):
        """Times ``t`` (B,) and noise ``eps`` (B, C, g, g) of ``batch`` training examples."""
        t = self.sample_t(batch, device, generator)  # (B,)
        eps = torch.randn((batch, spec.channels, spec.grid, spec.grid), device=device, generator=generator)  # (B, C, g, g)
        return {"t": t, "eps": eps}

    def loss(self, net, x, text, generator=None, draws=None):
        """Mean squared velocity error on latents x (B, C, g, g).

        The mean over all B*C*g*g elements is a mean over examples of equal-sized terms, so equal slices of a
        batch average to the whole batch's loss (what DDP's gradient averaging needs; see objectives.base).
        """
        draws = self._draws(net, x, generator, draws)
        t, eps = draws["t"], draws["eps"]  # (B,), (B, C, g, g)
        xt, v = flow_path(x, eps, t)  # 2 x (B, C, g, g)
        pred = net(xt, text.states, text.pad, text.pooled, t=t)  # (B, C, g, g), bf16 under autocast
        # fp32 loss: bf16 (~3 significant digits) would round the small residuals and their mean; v is fp32.
        return F.mse_loss(pred.float(), v)

    def sample_flops(self, spec, sample):
        """Network FLOPs per image: one full-sequence pass per velocity call (heun-N: 2N - 1 calls), x2 with guidance."""
        calls = num_velocity_calls(self.resolve_steps(sample, spec), sample.solver)
        return parallel_sample_flops(spec, calls, sample.guidance)

    @torch.no_grad()
    def sample(self, net, cond, uncond, sample, generator=None):
        """Latents (B, C, g, g) by integrating the flow ODE from noise at t=1 to data at t=0 (``sample.solver``)."""
        spec = spec_of(net)
        B = cond.pooled.shape[0]
        device = cond.pooled.device
        x = torch.randn((B, spec.channels, spec.grid, spec.grid), device=device, generator=generator)  # (B, C, g, g)
        ts = time_grid(self.resolve_steps(sample, spec), sample.shift, device=device)  # (steps+1,) from noise to data

        model = Guided(net, cond, uncond, sample.guidance)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # guided on every call, the solver's corrector calls included; fp32 so steps accumulate in fp32
            return model(x, t=t.expand(B)).float()  # (B, C, g, g)

        return integrate(velocity, x, ts, sample.solver)
