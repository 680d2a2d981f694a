"""Objectives: the method of each paradigm, as a plain object handed the network.

An objective owns the loss, the sampler and the FLOP accounting of its paradigm; the network
(possibly DDP-wrapped or compiled) owns every parameter. Protocol::

    objective.net_spec(model_cfg, tokenizer_spec, text_dim, text_len) -> NetSpec
    objective.loss(net, x, text, generator) -> scalar tensor
    objective.sample(net, cond, uncond, sample_cfg, generator) -> latents (B, C, g, g) | tokens (B, L)
    objective.train_flops(spec) -> FLOPs per training example
    objective.sample_flops(spec, sample_cfg) -> FLOPs per generated image
"""

from __future__ import annotations

from flopmatch.config import ModelConfig, ObjectiveConfig, SampleConfig
from flopmatch.errors import UserError
from flopmatch.nets import NetSpec, make_net_spec
from flopmatch.tokenizers.base import TokenizerSpec


class Objective:
    """Base class: the parts every paradigm shares (net spec, training FLOPs, step defaults)."""

    name: str = ""
    tokens: str = ""  # "continuous" | "discrete": which tokenizer kind it consumes
    causal: bool = False
    time: bool = False
    default_steps: int = 1

    def __init__(self, cfg: ObjectiveConfig | None = None):
        self.cfg = cfg or ObjectiveConfig()

    def net_spec(self, model: ModelConfig, tok: TokenizerSpec, text_dim: int, text_len: int) -> NetSpec:
        """The network this objective trains, for a given backbone size, tokenizer and text encoder."""
        if tok.kind != self.tokens:
            raise UserError(f"objective {self.name} needs a {self.tokens} tokenizer, got a {tok.kind} one")
        return make_net_spec(model, tok, text_dim, text_len, causal=self.causal, time=self.time)

    def resolve_steps(self, sample: SampleConfig, spec: NetSpec) -> int:
        """Sampling steps actually used (0 in the config means this paradigm's default)."""
        return sample.steps or self.default_steps

    def train_flops(self, spec: NetSpec) -> int:
        """Training FLOPs per example (see flopmatch.flops for the conventions)."""
        from flopmatch.flops import train_flops

        return train_flops(spec)

    def sample_flops(self, spec: NetSpec, sample: SampleConfig) -> int:
        """Network FLOPs to sample one image (tokenizer decode is a separate line item)."""
        from flopmatch.flops import parallel_sample_flops

        return parallel_sample_flops(spec, self.resolve_steps(sample, spec), sample.cfg)

    def loss(self, net, x, text, generator):
        raise NotImplementedError

    def sample(self, net, cond, uncond, sample, generator):
        raise NotImplementedError


def spec_of(net) -> NetSpec:
    """The NetSpec of a network, seen through DDP / torch.compile wrappers."""
    from flopmatch.dist import unwrap

    return unwrap(net).spec


def make_objective(name: str, cfg: ObjectiveConfig | None = None) -> Objective:
    """The objective registered under ``name`` (diffusion | masked | autoregressive)."""
    from flopmatch.objectives.autoregressive import Autoregressive
    from flopmatch.objectives.diffusion import Diffusion
    from flopmatch.objectives.masked import Masked

    registry = {c.name: c for c in (Diffusion, Masked, Autoregressive)}
    if name not in registry:
        raise UserError(f"unknown objective {name!r}; choose one of {', '.join(registry)}")
    return registry[name](cfg)
