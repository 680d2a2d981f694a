"""The objective protocol: the method of a paradigm, as a plain object handed the network.

An objective owns the loss, the sampler and the FLOP accounting of its paradigm; the network
(possibly DDP-wrapped, FSDP2-sharded or compiled) owns every parameter. Protocol::

    objective.net_spec(model_cfg, tokenizer_spec, text_dim, text_len) -> NetSpec
    objective.draw(batch, spec, device, generator) -> {name: tensor (batch, ...)}, the training randomness
    objective.loss(net, x, text, generator, draws=None) -> scalar tensor
    objective.sample(net, cond, uncond, sample_cfg, generator) -> latents (B, C, g, g) | tokens (B, L)
    objective.train_flops(spec) -> FLOPs per training example
    objective.sample_flops(spec, sample_cfg) -> FLOPs per generated image

Training randomness (diffusion's times and noise, masked's masks) is drawn by ``draw``, row b for example
b, and ``loss`` uses the rows it is given (or draws its own from ``generator``). Training draws the whole
global batch's rows from generators seeded by (seed, step) on every rank and hands each rank its slice,
so an example's randomness does not depend on the number of processes (:mod:`flopmatch.train`).
For the same reason ``loss`` is a mean over examples of per-example terms whose weights may depend on the
whole global batch (``draws`` carries them): DDP and FSDP average the ranks' gradients, and the mean of
equal slices' means is the global mean only for such a loss (see :class:`flopmatch.objectives.masked.Masked`).

Why objects and not three model classes: the comparison holds the network fixed (same backbone,
same parameter count up to the stem/head) and varies only the method, so the method is the one
thing that differs between runs; training, checkpointing and FLOP budgeting are shared.
"""

from __future__ import annotations

import torch

from flopmatch.config import ModelConfig, ObjectiveConfig, SampleConfig
from flopmatch.dist import unwrap
from flopmatch.errors import UserError
from flopmatch.flops import parallel_sample_flops, train_flops
from flopmatch.nets import NetSpec, make_net_spec
from flopmatch.tokenizers.base import TokenizerSpec


class Objective:
    """Base class: the parts every paradigm shares (net spec, training FLOPs, step defaults)."""

    name: str = ""
    tokens: str = ""  # "continuous" | "discrete": which tokenizer kind it consumes
    causal: bool = False  # causal self-attention (autoregressive only)
    time: bool = False  # the network takes a time input t (diffusion only)
    default_steps: int = 1  # sampling steps when the sample config says 0

    def __init__(self, cfg: ObjectiveConfig | None = None):
        self.cfg = cfg or ObjectiveConfig()

    def net_spec(self, model: ModelConfig, tok: TokenizerSpec, text_dim: int, text_len: int) -> NetSpec:
        """The network this objective trains, for a given backbone size, tokenizer and text encoder."""
        if tok.tokens != self.tokens:
            raise UserError(f"objective {self.name} needs a {self.tokens} tokenizer, got a {tok.tokens} one")
        return make_net_spec(model, tok, text_dim, text_len, causal=self.causal, time=self.time)

    def resolve_steps(self, sample: SampleConfig, spec: NetSpec) -> int:
        """Sampling steps actually used (0 in the config means this paradigm's default)."""
        return sample.steps or self.default_steps

    def train_flops(self, spec: NetSpec) -> int:
        """Training FLOPs per example (see flopmatch.flops for the conventions)."""
        # The full sequence for every paradigm: masked runs all L positions even though its loss reads
        # only the masked ones, and autoregressive trains all L next-token predictions in one causal pass.
        return train_flops(spec)

    def sample_flops(self, spec: NetSpec, sample: SampleConfig) -> int:
        """Network FLOPs to sample one image (tokenizer decode is a separate line item)."""
        return parallel_sample_flops(spec, self.resolve_steps(sample, spec), sample.guidance)

    def draw(self, batch: int, spec: NetSpec, device, generator) -> dict[str, torch.Tensor]:
        """The training randomness of ``batch`` examples, each tensor (batch, ...) with row b for example b;
        drawn from ``generator`` only. Nothing by default (autoregressive's loss is deterministic)."""
        return {}

    def loss(self, net, x, text, generator=None, draws: dict[str, torch.Tensor] | None = None):
        """Scalar training loss of inputs x (B, ...) and text (a TextBatch of B rows); its randomness is ``draws``
        (rows for these B examples, see :meth:`draw`), or drawn here from ``generator`` when None."""
        raise NotImplementedError

    def _draws(self, net, x, generator, draws):
        """``draws``, or this batch's own drawn from ``generator`` (callers outside training: tests, bench)."""
        return draws if draws is not None else self.draw(x.shape[0], spec_of(net), x.device, generator)

    def sample(self, net, cond, uncond, sample, generator):
        raise NotImplementedError


def spec_of(net) -> NetSpec:
    """The NetSpec of a network, seen through DDP / torch.compile wrappers."""
    return unwrap(net).spec
