"""Time flopmatch's real training step and samplers on synthetic inputs, without data, tokenizers or a text encoder.

Two users: ``flopmatch bench`` (its training and sampling figures) and the study's host calibration
(:mod:`flopmatch.study.calibrate`, which times a few steps of each planned network before estimating a study's wall
time). Both need the step and the sampler exactly as ``train`` and ``eval`` run them, on inputs of the right shape:

* :class:`TrainingProbe`: a network of a :class:`~flopmatch.nets.NetSpec` with its EMA copy, AdamW optimizer
  (:func:`flopmatch.train.make_optimizer`), a fixed random batch and an RNG; :meth:`TrainingProbe.step` is one call
  of :func:`flopmatch.train.train_step`, the function the training loop calls;
* :class:`SamplingProbe`: a network whose adaLN-Zero init is perturbed (so blocks and head do work, as a trained
  network's would) and random caption states; :meth:`SamplingProbe.run` is one ``objective.sample`` call under the
  autocast decision ``eval`` makes, classifier-free guidance against the empty caption.

Timing itself (warm-up, rounds, CUDA events) is the caller's.
"""

from __future__ import annotations

import copy

import torch

from flopmatch.config import ObjectiveConfig, SampleConfig, TextConfig, TrainConfig
from flopmatch.device import autocast
from flopmatch.nets import NetSpec, Network
from flopmatch.objectives import make_objective
from flopmatch.schedule import ema_decay_at
from flopmatch.text import TextBatch, text_dim
from flopmatch.train import make_optimizer, train_step


def random_text(batch: int, text_len: int, dim: int, generator: torch.Generator) -> TextBatch:
    """Random caption states (B, Lt, Dt): row i has Lt - (i mod Lt/2) real tokens, zero padding, pooled = mean."""
    states = torch.randn(batch, text_len, dim, generator=generator)  # (B, Lt, Dt)
    real = text_len - torch.arange(batch) % max(1, text_len // 2)  # (B,) real tokens per row
    pad = torch.arange(text_len)[None, :] >= real[:, None]  # (B, Lt), True = padding
    states = states.masked_fill(pad[..., None], 0.0)
    return TextBatch(states, pad, states.sum(1) / real[:, None].float())


def empty_text(like: TextBatch) -> TextBatch:
    """The empty caption's stand-in for guidance: zero states, all padding (B, Lt, Dt)."""
    return TextBatch(torch.zeros_like(like.states), torch.ones_like(like.pad), torch.zeros_like(like.pooled))


def random_inputs(spec: NetSpec, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Training inputs of ``spec``'s shape: latents (B, C, g, g) or tokens (B, L) in [0, V)."""
    if spec.tokens == "continuous":
        return torch.randn(batch, spec.channels, spec.grid, spec.grid, generator=generator)
    return torch.randint(0, spec.vocab_size, (batch, spec.seq_len), generator=generator)


class TrainingProbe:
    """One network with its EMA, optimizer, fixed synthetic batch and RNG; :meth:`step` is one training step.

    ``name``: the paradigm or its config (subclasses may build other models in :meth:`build`); ``text``: the caption shapes
    (max_len, dim); ``flops_per_example``: the analytic training FLOPs ``train`` budgets with.
    """

    def __init__(self, name: str | ObjectiveConfig, spec: NetSpec, batch: int, cfg: TrainConfig, device: torch.device,
                 bf16: bool, text: TextConfig, compiled: bool = False, seed: int = 0):
        self.name, self.spec, self.bf16, self.cfg, self.compiled = name, spec, bf16, cfg, compiled
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # the network's init, as train seeds it
        self.objective, net, x, self.flops_per_example = self.build(name, spec, batch, g)
        self.net, self.x = net.to(device), x.to(device)
        self.text = random_text(batch, text.max_len, text_dim(text), g).to(device)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.opt = make_optimizer(self.net, cfg, device)
        self.model = torch.compile(self.net) if compiled else self.net
        self.rng = torch.Generator(device=device).manual_seed(seed * 1000)
        self.steps = 0
        self.batch = batch

    def build(self, name: str | ObjectiveConfig, spec: NetSpec, batch: int, g: torch.Generator) -> tuple[object, torch.nn.Module, torch.Tensor, int]:
        """(objective, network, inputs, training FLOPs per example) of paradigm ``name``."""
        objective = make_objective(name)
        return objective, Network(spec), random_inputs(spec, batch, g), objective.train_flops(spec)

    def step(self) -> torch.Tensor:
        """One step of :func:`flopmatch.train.train_step`; the loss as a device tensor."""
        loss, _ = train_step(self.model, self.net, self.ema, self.opt, self.objective, self.x, self.text, self.rng,
                             bf16=self.bf16, grad_clip=self.cfg.grad_clip, ema_decay=ema_decay_at(self.steps, self.cfg.ema_decay))
        self.steps += 1
        return loss


class SamplingProbe:
    """A paradigm's sampler on a (perturbed) random network: :meth:`run` generates ``batch`` images' latents/codes."""

    def __init__(self, name: str | ObjectiveConfig, spec: NetSpec, batch: int, device: torch.device, bf16: bool,
                 text: TextConfig, seed: int = 0):
        self.name, self.spec, self.batch, self.device, self.bf16 = name, spec, batch, device, bf16
        self.objective = make_objective(name)
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.net = Network(spec).to(device).eval()
        with torch.no_grad():  # leave the adaLN-Zero init so blocks and head do work, as a trained net's would
            for p in self.net.parameters():
                p.add_(0.02 * torch.randn_like(p))
        self.cond = random_text(batch, text.max_len, text_dim(text), g).to(device)
        self.uncond = empty_text(self.cond)
        self.seed = seed

    def flops_per_image(self, sample: SampleConfig) -> int:
        """Analytic sampling FLOPs per image of a setting (guidance included), as ``eval`` counts them."""
        return self.objective.sample_flops(self.spec, sample)

    def run(self, sample: SampleConfig) -> torch.Tensor:
        """One ``objective.sample`` call at ``sample``'s setting; its output (latents or codes) on the device."""
        with torch.no_grad(), autocast(self.device, self.bf16):
            return self.objective.sample(self.net, self.cond, self.uncond, sample,
                                         torch.Generator(device=self.device).manual_seed(self.seed))
