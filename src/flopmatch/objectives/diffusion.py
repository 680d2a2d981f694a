"""``diffusion``: flow matching (rectified flow) on continuous latents, Euler ODE sampler.

Path x_t = (1 - t) x0 + t eps, t in [0, 1] (t=0 data, t=1 noise); the network predicts the
velocity v = eps - x0; t ~ logit-normal(mean, std) (SD3). Sampling integrates dx/dt = v from
t=1 to t=0 in ``steps`` uniform Euler steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flopmatch.objectives import Objective, spec_of
from flopmatch.objectives.guidance import guided


def flow_path(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Noised sample x_t and the target velocity for data x0, noise eps (B, ...) and t (B,)."""
    tb = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - tb) * x0 + tb * eps, eps - x0


class Diffusion(Objective):
    name = "diffusion"
    tokens = "continuous"
    time = True
    default_steps = 25

    def sample_t(self, batch: int, device, generator) -> torch.Tensor:
        """Training times t (B,) from the logit-normal density."""
        z = torch.randn(batch, device=device, generator=generator)
        return torch.sigmoid(self.cfg.t_mean + self.cfg.t_std * z)

    def loss(self, net, x, text, generator=None):
        """Mean squared velocity error on latents x (B, C, g, g)."""
        t = self.sample_t(x.shape[0], x.device, generator)
        eps = torch.randn(x.shape, device=x.device, generator=generator)
        xt, v = flow_path(x, eps, t)
        pred = net(xt, text.states, text.pad, text.pooled, t=t)
        return F.mse_loss(pred.float(), v)

    @torch.no_grad()
    def sample(self, net, cond, uncond, sample, generator=None):
        """Latents (B, C, g, g) by Euler integration from noise at t=1 to data at t=0."""
        spec = spec_of(net)
        B = cond.pooled.shape[0]
        device = cond.pooled.device
        x = torch.randn((B, spec.channels, spec.grid, spec.grid), device=device, generator=generator)
        steps = self.resolve_steps(sample, spec)
        ts = torch.linspace(1.0, 0.0, steps + 1, device=device)
        for i in range(steps):
            t = ts[i].expand(B)
            v = guided(net, x, cond, uncond, sample.cfg, t=t)
            x = x + (ts[i + 1] - ts[i]) * v.float()
        return x
