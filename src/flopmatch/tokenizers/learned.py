"""The learned autoencoders' shared parts: one conv encoder/decoder family, save/load, registration.

The KL autoencoder (``kl.py``, continuous latents for ``diffusion``) and the LFQ tokenizer
(``lfq.py``, discrete codes for ``masked`` and ``autoregressive``) are built from the *same*
:class:`ConvEncoder` / :class:`ConvDecoder` with the same widths and the same downsampling, so
both give the same 8x8 grid at 32x32 and differ only in the bottleneck (a Gaussian posterior vs
sign quantisation). That is what keeps tokenizer capacity from silently deciding the comparison.

Architecture (defaults ``patch=2``, ``channels=(64, 128)``, ``num_res_blocks=1``): a space-to-depth
stem (``pixel_unshuffle`` by ``patch``: 32x32x3 -> 16x16x12, the first downsampling, free) and a 3x3
conv, then per level ``num_res_blocks`` pre-activation residual blocks (GroupNorm, SiLU, 3x3 conv,
twice) with a stride-2 3x3 conv between levels (16 -> 8). The decoder mirrors it: nearest-neighbour
upsampling + 3x3 conv between levels and a final conv to 3 * patch^2 channels + ``pixel_shuffle``.
``patch=1`` gives the classic full-resolution stem (e.g. channels (32, 64, 128)); it trained 2.5-3x
slower per step on the 2-core CPU (32x32 maps make the convs and norms memory-bound), hence patch=2.
There is no attention: at 8x8 it buys little and would dominate CPU time.

FLOPs (:func:`conv_ae_flops`) count every convolution at 2 FLOPs per multiply-accumulate and
ignore biases, GroupNorm, SiLU, residual adds and upsampling (elementwise, a few percent at most),
the same convention as ``torch.utils.flop_counter`` and ``flopmatch.flops``.

On disk a tokenizer directory holds ``tokenizer.json`` ({"kind", "spec", "config", "version",
"data"}) and ``tensors.safetensors`` (the state dict), both written atomically. Loading checks
kind, version, config, spec and every tensor name and shape, and reports a mismatch as a
one-line :class:`~flopmatch.errors.UserError`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from flopmatch.files import atomic_write_json, save_tensors
from flopmatch.tokenizers.autoencoder import AutoencoderConfig
from flopmatch.tokenizers.base import Tokenizer

FORMAT_VERSION = 1


def _groups(channels: int) -> int:
    """GroupNorm groups: 8 (or fewer for very narrow layers, so each group has >= 4 channels)."""
    return max(1, min(8, channels // 4))


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1)


class ResBlock(nn.Module):
    """Pre-activation residual block at constant width: x + conv(act(norm(conv(act(norm(x))))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(channels), channels)
        self.conv1 = _conv(channels, channels)
        self.norm2 = nn.GroupNorm(_groups(channels), channels)
        self.conv2 = _conv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return x + h


class ConvEncoder(nn.Module):
    """(B, 3, S, S) in [-1, 1] -> (B, out_channels, S / (patch * 2^(levels-1)), same)."""

    def __init__(self, channels: tuple[int, ...], num_res_blocks: int, out_channels: int, patch: int = 1):
        super().__init__()
        self.patch = patch
        self.conv_in = _conv(3 * patch * patch, channels[0])
        levels = []
        for i, c in enumerate(channels):
            layers: list[nn.Module] = [] if i == 0 else [_conv(channels[i - 1], c, stride=2)]
            layers += [ResBlock(c) for _ in range(num_res_blocks)]
            levels.append(nn.Sequential(*layers))
        self.levels = nn.Sequential(*levels)
        self.norm_out = nn.GroupNorm(_groups(channels[-1]), channels[-1])
        self.conv_out = _conv(channels[-1], out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pixel_unshuffle(x, self.patch)  # (B, 3*p*p, S/p, S/p)
        h = self.levels(self.conv_in(x))
        return self.conv_out(nn.functional.silu(self.norm_out(h)))


class ConvDecoder(nn.Module):
    """(B, in_channels, g, g) -> (B, 3, g * patch * 2^(levels-1), same), unclamped (training sees raw output)."""

    def __init__(self, channels: tuple[int, ...], num_res_blocks: int, in_channels: int, patch: int = 1):
        super().__init__()
        self.patch = patch
        self.conv_in = _conv(in_channels, channels[-1])
        levels = []
        for i in reversed(range(len(channels))):
            layers: list[nn.Module] = [ResBlock(channels[i]) for _ in range(num_res_blocks)]
            if i > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(channels[i], channels[i - 1])]
            levels.append(nn.Sequential(*layers))
        self.levels = nn.Sequential(*levels)
        self.norm_out = nn.GroupNorm(_groups(channels[0]), channels[0])
        self.conv_out = _conv(channels[0], 3 * patch * patch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.levels(self.conv_in(z))
        h = self.conv_out(nn.functional.silu(self.norm_out(h)))  # (B, 3*p*p, S/p, S/p)
        return nn.functional.pixel_shuffle(h, self.patch)  # (B, 3, S, S)


def _conv_flops(cin: int, cout: int, side_out: int) -> int:
    """FLOPs of one 3x3 conv producing a (cout, side_out, side_out) map: 2 * MACs, bias ignored."""
    return 2 * cin * cout * 9 * side_out * side_out


def conv_ae_flops(channels: tuple[int, ...], num_res_blocks: int, image_size: int, z_channels: int,
                  encoder_out: int, patch: int = 1) -> tuple[int, int]:
    """Analytic (encoder, decoder) FLOPs per image for the family above (2 per MAC, convs only).

    ``encoder_out`` is the encoder's output width (2 * z_channels for KL: mean and log-variance;
    z_channels for LFQ); ``z_channels`` is what the decoder reads. Pixel (un)shuffle is free.
    """
    side = image_size // patch
    sides = [side // 2**i for i in range(len(channels))]
    enc = _conv_flops(3 * patch * patch, channels[0], side)
    dec = _conv_flops(z_channels, channels[-1], sides[-1])
    for i, (c, s) in enumerate(zip(channels, sides)):
        res = num_res_blocks * 2 * _conv_flops(c, c, s)
        enc += res
        dec += res
        if i > 0:
            enc += _conv_flops(channels[i - 1], c, s)  # stride-2 conv into level i
            dec += _conv_flops(c, channels[i - 1], sides[i - 1])  # upsample, then conv at level i-1 size
    enc += _conv_flops(channels[-1], encoder_out, sides[-1])
    dec += _conv_flops(channels[0], 3 * patch * patch, side)
    return enc, dec


class LearnedAutoencoder(Tokenizer):
    """Shared body of the KL and LFQ tokenizers: encoder, decoder, FLOPs, fingerprint, save.

    Subclasses set ``kind`` ("kl" | "lfq"), ``spec``, and implement encode/decode and
    ``training_forward(x, generator) -> (reconstruction (B, 3, S, S), bottleneck loss, {name: float})``.
    ``data_info`` (dataset name, fingerprint, ...) and ``train_info`` (steps, timings) are written into
    tokenizer.json by :meth:`save`.
    """

    kind: str = ""

    def __init__(self, config: AutoencoderConfig, encoder_out: int, z_channels: int):
        super().__init__()
        self.config = config
        self.z_channels = z_channels
        self.encoder_out = encoder_out
        self.encoder = ConvEncoder(tuple(config.channels), config.num_res_blocks, encoder_out, config.patch)
        self.decoder = ConvDecoder(tuple(config.channels), config.num_res_blocks, z_channels, config.patch)
        self.data_info: dict = {}  # dataset name, seed, fingerprint (tokenizer.json "data")
        self.train_info: dict = {}  # steps, timings, final train PSNR (tokenizer.json "train")

    @property
    def grid(self) -> int:
        """Side of the latent grid: image_size / (patch * 2^(levels - 1))."""
        return self.config.grid

    def _flops(self) -> tuple[int, int]:
        return conv_ae_flops(tuple(self.config.channels), self.config.num_res_blocks, self.config.image_size,
                             self.z_channels, self.encoder_out, self.config.patch)

    def encode_flops(self) -> int:
        """Analytic FLOPs to encode one image (all encoder convs, 2 per MAC)."""
        return self._flops()[0]

    def decode_flops(self) -> int:
        """Analytic FLOPs to decode one image (all decoder convs, 2 per MAC)."""
        return self._flops()[1]

    def fingerprint(self) -> str:
        """sha256 (first 16 hex) of kind, config and every tensor's name, dtype, shape and bytes."""
        h = hashlib.sha256()
        h.update(json.dumps({"kind": self.kind, "config": self.config.to_dict()}, sort_keys=True).encode())
        for name, t in sorted(self.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, directory: str | Path) -> None:
        """Write tensors.safetensors then tokenizer.json (the json last: it marks a complete save)."""
        directory = Path(directory)
        save_tensors(directory / "tensors.safetensors", self.state_dict())
        atomic_write_json(directory / "tokenizer.json", {
            "kind": self.kind,
            "spec": self.spec.to_dict(),
            "config": self.config.to_dict(),
            "version": FORMAT_VERSION,
            "data": self.data_info,
            "train": self.train_info,
            "fingerprint": self.fingerprint(),
        })
