"""The learned autoencoders' configuration: :class:`AutoencoderConfig`, its presets and ``--set`` overrides.

One flat dataclass describes a KL or LFQ tokenizer (architecture, bottleneck, losses, optimisation and
data) and is stored in its tokenizer.json. :meth:`AutoencoderConfig.spec` is the one place the
token-grid side is computed from it (``image_size / (patch * 2^(levels - 1))``), so a study can plan
runs before the tokenizers exist. Kept apart from the models (``learned.py``, ``kl.py``, ``lfq.py``) and
the trainer (``train_ae.py``), which all import it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from flopmatch.config import CHOICES, DataConfig, check_fields, from_dict
from flopmatch.config import apply_overrides as apply_config_overrides
from flopmatch.errors import UserError
from flopmatch.tokenizers.base import TokenizerSpec

KINDS = CHOICES[("AutoencoderConfig", "kind")]  # ("kl", "lfq")

RECON_LOSSES = CHOICES[("AutoencoderConfig", "recon_loss")]
PRESETS = ("cpu", "gpu")


@dataclass
class AutoencoderConfig:
    """Everything that defines a learned tokenizer and how it was trained (flat, for --set key=value).

    Architecture and bottleneck fields change the model; training fields only how it was fit. Both are
    saved in tokenizer.json (and so in the fingerprint).
    """

    kind: str = "kl"  # "kl" (continuous, diffusion) | "lfq" (discrete, masked/autoregressive)
    # architecture (shared by both kinds)
    image_size: int = 32
    patch: int = 2  # space-to-depth stem: the first patch x patch downsampling is a pixel_unshuffle
    channels: list[int] = field(default_factory=lambda: [64, 128])  # per level; len-1 stride-2 downsamplings
    num_res_blocks: int = 1
    # KL bottleneck
    latent_channels: int = 4
    kl_weight: float = 1e-6  # x KL summed per image / pixel values per image (SD convention)
    # LFQ bottleneck
    bits: int = 10  # vocab = 2^bits
    commitment_weight: float = 0.005  # MAGVIT-v2 uses 0.25 / 0.1; see lfq.py for why ours are smaller
    entropy_weight: float = 0.001
    diversity_weight: float = 1.0  # gamma on the codebook entropy inside the entropy loss
    entropy_temperature: float = 0.01
    # losses
    recon_loss: str = "l2"  # see the module docstring: measured far better than l1 on shapes
    adv_weight: float = 0.0  # PatchGAN hinge loss weight; 0 = off
    adv_start: int = 0  # step at which the adversarial loss switches on
    # optimisation
    steps: int = 2000  # ~170 s of CPU time at batch 32 on this 2-core CPU (see the report)
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.0
    beta2: float = 0.99
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp32 (auto = bf16 autocast where the device runs it fast)
    device: str = "auto"
    # data
    data: str = "shapes"
    data_seed: int = 0
    image_column: str = "image"  # hf:PATH data: the image column
    text_column: str = "text"  # hf:PATH data: the caption column
    # shapes: combos / arrangements left out of training (data.holdout, data.holdout_relations): a study passes its
    # runs' own, so no part of the pipeline, the tokenizer included, has seen a held-out prompt's scene
    holdout: list[str] = field(default_factory=list)
    holdout_relations: list[str] = field(default_factory=list)
    num_train: int = 20000
    stats_images: int = 4096  # KL: training images used to fit the latent mean/std
    log_every: int = 25

    @property
    def z_channels(self) -> int:
        """Channels between encoder and decoder: latent_channels (KL) or bits (LFQ)."""
        return self.latent_channels if self.kind == "kl" else self.bits

    @property
    def downsampling(self) -> int:
        """Pixels per token side: the space-to-depth patch times one factor 2 per extra level."""
        return self.patch * 2 ** (len(self.channels) - 1)

    @property
    def grid(self) -> int:
        """Side of the token grid, image_size / downsampling (8 for the 32 px presets)."""
        return self.image_size // self.downsampling

    def data_config(self, num_eval: int = 2000) -> DataConfig:
        """The data the tokenizer trains on, as a DataConfig (its eval split has ``num_eval`` images)."""
        return DataConfig(name=self.data, seed=self.data_seed, image_size=self.image_size,
                          num_train=self.num_train, num_eval=num_eval, image_column=self.image_column,
                          text_column=self.text_column, holdout=list(self.holdout),
                          holdout_relations=list(self.holdout_relations))

    def spec(self) -> TokenizerSpec:
        """The TokenizerSpec a tokenizer of this config has: KL latents or LFQ codes on the same grid."""
        if self.kind == "kl":
            return TokenizerSpec("continuous", self.grid, channels=self.latent_channels, image_size=self.image_size)
        return TokenizerSpec("discrete", self.grid, vocab_size=2**self.bits, image_size=self.image_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "") -> "AutoencoderConfig":
        """Typed construction from JSON; unknown keys or wrong types raise UserError."""
        try:
            return from_dict(cls, data).validate()
        except UserError as e:
            raise UserError(f"{where}: {e}" if where else str(e)) from None

    def validate(self) -> "AutoencoderConfig":
        """Raise UserError on values that cannot work (ranges and choices from config.RANGES/CHOICES); returns self."""
        check_fields(self)
        if not self.channels or any(c < 4 for c in self.channels):
            raise UserError(f"channels must be a non-empty list of widths >= 4, got {self.channels}")
        down = self.downsampling
        if self.image_size % down:
            raise UserError(f"image_size {self.image_size} is not divisible by the total downsampling "
                            f"patch * 2^(len(channels) - 1) = {down}")
        return self


def preset(name: str, kind: str) -> AutoencoderConfig:
    """Named configs. "cpu": trains in ~5 minutes on 2 cores. "gpu": wider, deeper, longer, with a GAN term.

    Both keep the 8x8 grid at 32x32 (patch 2, one stride-2 level), so a KL and an LFQ tokenizer of the
    same preset differ only in their bottleneck. The gpu preset is untested at full length here (no GPU).
    """
    if name == "cpu":
        return AutoencoderConfig(kind=kind).validate()
    if name == "gpu":
        return AutoencoderConfig(kind=kind, channels=[128, 256], num_res_blocks=2, steps=50_000,
                                 batch_size=128, lr=1e-3, warmup_steps=1000, adv_weight=0.1,
                                 adv_start=20_000, stats_images=20_000).validate()
    raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


def apply_overrides(config: AutoencoderConfig, overrides: list[str]) -> AutoencoderConfig:
    """Apply ``key=value`` strings (typed by the field; unknown keys raise UserError); returns config."""
    for item in overrides or []:
        if "." in item.split("=", 1)[0]:
            raise UserError(f"--set {item}: autoencoder config keys are flat (e.g. bits=9), no sections")
    return apply_config_overrides(config, overrides).validate()
