"""Typed dataclass configs, their JSON round trip, and ``--set section.key=value`` overrides.

A run is fully described by one :class:`RunConfig`, written to ``<run>/config.json`` before step 0.
Overrides are type-checked against the dataclass field types; unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field

from flopmatch import PARADIGMS
from flopmatch.errors import UserError


@dataclass
class DataConfig:
    """Training data: ``name`` is the source (see :mod:`flopmatch.data.datasets`); "shapes" is built in."""

    name: str = "shapes"  # dataset source: shapes, or folder:PATH, wds:PATTERN, hf:PATH, ...
    seed: int = 0  # seed of the procedural scenes
    image_size: int = 32  # image side in pixels
    num_train: int = 20000  # training images
    num_eval: int = 2000  # evaluation images (the FID reference set and the prompts)
    two_object_prob: float = 0.5  # shapes: fraction of scenes with two objects and a relation
    holdout: list[str] = field(default_factory=list)  # e.g. ["red triangle"]: never seen in training
    holdout_relations: list[str] = field(default_factory=list)  # e.g. ["triangle above circle"], any colours: never seen in training
    caption_dropout: float = 0.1  # fraction of training captions replaced by the empty caption (for CFG)
    image_column: str = "image"  # hf:PATH sources: the column holding the images
    text_column: str = "text"  # hf:PATH sources: the column holding the captions


HOLDOUT_FIELDS = ("holdout", "holdout_relations")  # DataConfig fields only the shapes source reads


@dataclass
class TextConfig:
    """Frozen text encoder: "minilm" (pretrained all-MiniLM-L6-v2) or "hash" (weight-free, for tests)."""

    kind: str = "minilm"  # minilm | hash
    max_len: int = 24  # token states are padded/truncated to this length (fixed, so FLOPs are exact)
    dim: int = 64  # token-state width of the "hash" encoder (MiniLM's is 384)


@dataclass
class TokenizerConfig:
    """Images <-> token grid. kind "auto" picks patch (diffusion) or kmeans (token paradigms).

    ``path`` (a directory written by ``flopmatch tokenizer train``) overrides ``kind``.
    """

    kind: str = "auto"  # auto | patch | kmeans
    path: str = ""  # a tokenizer directory (from `flopmatch tokenizer train`); overrides kind
    patch: int = 4  # pixels per token side (weight-free tokenizers)
    codebook_size: int = 512  # k-means codebook size (discrete weight-free tokenizer)
    seed: int = 0  # k-means initialisation seed


@dataclass
class ModelConfig:
    """The shared backbone. Size comes from one knob: width = 64 * depth, head dim 64."""

    depth: int = 4  # blocks; also the number of heads (the one model-size knob)
    mlp_ratio: int = 4  # MLP hidden width / width
    head_dim: int = 64  # width = head_dim * depth

    @property
    def width(self) -> int:
        return self.head_dim * self.depth

    @property
    def heads(self) -> int:
        return self.depth


@dataclass
class ObjectiveConfig:
    """The paradigm (``name``) and its method's hyper-parameters (each paradigm reads its own)."""

    name: str = "masked"  # diffusion | masked | autoregressive
    # diffusion: logit-normal timestep density (SD3): t = sigmoid(N(mean, std))
    t_mean: float = 0.0  # diffusion: mean of the logit-normal time density
    t_std: float = 1.0  # diffusion: std of the logit-normal time density
    # masked: mask ratio r = cos(pi/2 * u), u ~ U(0, 1) (MaskGIT)
    min_mask: int = 1  # masked: at least this many positions masked per training example


@dataclass
class TrainConfig:
    """Optimisation. Training length is a FLOP budget; steps are derived from it."""

    budget: float = 3e12  # training FLOPs (network forward+backward only)
    batch_size: int = 64  # global batch (split across processes)
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # the LR decays to lr * min_lr_ratio at the last step (cosine, wsd)
    warmup_frac: float = 0.05  # cosine: linear warmup over this fraction of the steps
    # wsd and constant warm up over a fixed number of steps: a fraction of the steps would tie every LR to the
    # budget, and a run could not be continued to a larger one (flopmatch.schedule).
    schedule: str = "cosine"  # LR schedule: cosine | wsd (warmup-stable-decay; a run can continue to a larger --budget) | constant (no decay)
    warmup_steps: int = 100  # wsd, constant: linear warmup over this many steps, whatever the budget (0 = none)
    decay_frac: float = 0.2  # wsd: the final fraction of the steps that cools the LR down to lr * min_lr_ratio (1-sqrt shape)
    weight_decay: float = 0.01  # AdamW decay of weight matrices (not biases, norms or stems)
    beta2: float = 0.99  # AdamW second-moment decay
    grad_clip: float = 1.0  # gradient-norm clipping threshold
    ema_decay: float = 0.999  # EMA of the weights (warmed up as (1+s)/(10+s)); sampling uses the EMA
    # post-hoc EMA (EDM2, flopmatch.ema): power-function averages kept during training, by relative length
    ema_profiles: list[float] = field(default_factory=lambda: [0.05, 0.10])  # sigma_rel of the power-function EMAs training keeps and snapshots (EDM2's pair), each in (0, 0.3]
    ema_snapshots: int = 16  # snapshots of those averages over a run, evenly spaced; any sigma_rel is rebuilt from them after training (0 = none)
    seed: int = 0  # initialisation, data order and training randomness
    precision: str = "auto"  # auto | bf16 | fp32; auto = bf16 autocast where the device runs it fast
    log_every: int = 10  # steps between metrics.jsonl rows
    checkpoint_every: int = 200  # steps between checkpoints (also saved at the end and on Ctrl-C)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False  # torch.compile the network
    parallel: str = "ddp"  # under torchrun: ddp (each process holds the whole network) | fsdp2 (parameters, gradients and optimizer state sharded across processes, for networks that do not fit); not part of the run's identity
    fsdp_param_dtype: str = "fp32"  # train.parallel=fsdp2 only: dtype parameters are all-gathered and computed in, fp32 (the numerics of ddp) | bf16 (half the all-gather bytes; shards, gradient reduce-scatter, AdamW and checkpoints stay fp32; needs a torchrun launch and bf16 train.precision); part of the run's identity
    trackers: list[str] = field(default_factory=list)  # live views of metrics.jsonl: tensorboard, wandb (offline unless WANDB_MODE is set); not part of the run's identity


@dataclass
class SampleConfig:
    """Sampling settings. ``steps`` is the inference-cost knob; 0 = paradigm default."""

    steps: int = 0  # diffusion: ODE solver steps (default 25; heun-N costs 2N-1 network calls); masked: decoding steps (default 12); autoregressive: fixed L
    guidance: float = 3.0  # classifier-free guidance scale; 1 = no guidance (no extra forward pass)
    temperature: float = 1.0  # token paradigms: softmax temperature
    top_k: int = 0  # 0 = no top-k filtering (token paradigms)
    choice_temperature: float = 4.5  # masked only: Gumbel noise on confidences, annealed to 0 (MaskGIT)
    kv_cache: bool = True  # autoregressive only
    compile: bool = False  # autoregressive with kv_cache only: torch.compile the one-token decode step (static cache; CUDA graphs on a GPU)
    solver: str = "euler"  # diffusion only: ODE solver, euler (1 network call per step) or heun (2nd order, EDM: 2 per step, 1 on the last)
    shift: float = 1.0  # diffusion only: SD3 time shift t' = shift*t / (1 + (shift-1)*t) of the sampling grid; 1 = uniform, > 1 = more steps at high noise


# SampleConfig fields that only some paradigms read (every paradigm reads guidance; next-token decodes its L tokens
# whatever steps says)
SAMPLE_FIELD_PARADIGMS = {"steps": ("diffusion", "masked"), "temperature": ("masked", "autoregressive"),
                          "top_k": ("masked", "autoregressive"),
                          "choice_temperature": ("masked",), "kv_cache": ("autoregressive",),
                          "compile": ("autoregressive",), "solver": ("diffusion",), "shift": ("diffusion",)}


def check_sample_fields(objective: str, names, flag=lambda name: "--" + name.replace("_", "-")) -> None:
    """A UserError when a sampler setting the user gave (``names``, SampleConfig fields) is one ``objective`` never
    reads: it would change nothing but an evaluation's key, so a "sweep" over it would repeat one setting."""
    for name in names:
        users = SAMPLE_FIELD_PARADIGMS.get(name)
        if users and objective not in users:
            raise UserError(f"{flag(name)} applies to {' and '.join(users)} runs only; this run is {objective}")


@dataclass
class RunConfig:
    """Everything a run needs; ``config.json`` in a run directory is this, serialised."""

    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self):
        # RunConfig(objective="masked") is shorthand for the paradigm with default hyper-parameters.
        if isinstance(self.objective, str):
            self.objective = ObjectiveConfig(name=self.objective)

    def validate(self) -> "RunConfig":
        """Raise UserError on values that cannot work (types, finite numbers, ranges, choices); returns self."""
        if self.objective.name not in PARADIGMS:
            raise UserError(f"unknown objective {self.objective.name!r}; choose one of {', '.join(PARADIGMS)}")
        check_fields(self)
        if not re.fullmatch(DEVICE_PATTERN, self.train.device):
            raise UserError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.train.device!r}")
        check_holdout(self.data)
        check_fsdp_param_dtype(self.train)
        if self.data.image_size % self.tokenizer.patch:
            raise UserError(f"data.image_size {self.data.image_size} is not a multiple of tokenizer.patch {self.tokenizer.patch}")
        return self


def check_holdout(data: DataConfig) -> None:
    """A UserError for a holdout on a source other than shapes, which has no scenes to hold out (it used to be
    recorded in config.json and silently ignored)."""
    if parse_source(data.name, "data.name")[0] == "shapes":
        return
    given = [f"data.{k}" for k in HOLDOUT_FIELDS if getattr(data, k)]
    if given:
        raise UserError(f"{' and '.join(given)} {'holds' if len(given) == 1 else 'hold'} out scenes of the built-in "
                        f"shapes data, and {data.name} has none: clear {'it' if len(given) == 1 else 'them'} ("
                        + " ".join(f"--set {g}=" for g in given) + "); the source's own evaluation split is held out "
                        "(for folder:PATH, a test/ folder)")


def check_fsdp_param_dtype(train: TrainConfig) -> None:
    """A UserError for ``train.fsdp_param_dtype=bf16`` where it cannot mean what it says (what a launch adds,
    torchrun and the resolved precision, is checked by :func:`flopmatch.train.check_fsdp_params`).

    Under ddp nothing is all-gathered: the key would be recorded in config.json and change nothing (and a run
    started under fsdp2 could switch numerics by a resume under ddp, train.parallel being outside the run's
    identity). Under train.precision=fp32 the network would compute in bf16 without autocast (every op, norms and
    softmax too): not the fp32 run that setting promises.
    """
    if train.fsdp_param_dtype == "fp32":
        return
    if train.parallel != "fsdp2":
        raise UserError(f"train.fsdp_param_dtype={train.fsdp_param_dtype} applies to FSDP2 only, and train.parallel is "
                        f"{train.parallel}; add --set train.parallel=fsdp2, or leave out train.fsdp_param_dtype (its default: fp32)")
    if train.precision == "fp32":
        raise UserError(f"train.fsdp_param_dtype={train.fsdp_param_dtype} computes in bf16, and train.precision is fp32; "
                        f"set train.precision=bf16 (or auto), or train.fsdp_param_dtype=fp32")


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric field: ``lo``/``hi`` bounds (None = unbounded), open or closed."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v) -> bool:
        return ((self.lo is None or (v > self.lo if self.lo_open else v >= self.lo))
                and (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)))

    def __str__(self) -> str:
        def num(v: float) -> str:
            return str(int(v)) if float(v).is_integer() and abs(v) < 1e9 else f"{v:g}"

        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {num(self.hi)}"
        return f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"


POSITIVE, AT_LEAST_1, NON_NEGATIVE = Range(0, lo_open=True), Range(1), Range(0)
FRACTION, PROBABILITY = Range(0, 1, hi_open=True), Range(0, 1)
# Every number a run is configured with, by dataclass and field: the one place inputs are range-checked
# (every command builds a RunConfig or SampleConfig and validates it). Floats must also be finite.
RANGES: dict[tuple[str, str], Range] = {
    ("DataConfig", "image_size"): Range(16, 1024), ("DataConfig", "num_train"): AT_LEAST_1,
    ("DataConfig", "num_eval"): NON_NEGATIVE, ("DataConfig", "two_object_prob"): PROBABILITY,
    ("DataConfig", "caption_dropout"): FRACTION,
    ("TextConfig", "max_len"): Range(2, 512), ("TextConfig", "dim"): Range(1, 4096),
    ("TokenizerConfig", "patch"): AT_LEAST_1, ("TokenizerConfig", "codebook_size"): Range(2, 2**20),
    ("ModelConfig", "depth"): Range(1, 256), ("ModelConfig", "mlp_ratio"): AT_LEAST_1,
    ("ModelConfig", "head_dim"): Range(4, 1024),
    ("ObjectiveConfig", "t_std"): POSITIVE, ("ObjectiveConfig", "min_mask"): AT_LEAST_1,
    ("TrainConfig", "budget"): POSITIVE, ("TrainConfig", "batch_size"): AT_LEAST_1, ("TrainConfig", "lr"): POSITIVE,
    ("TrainConfig", "min_lr_ratio"): PROBABILITY, ("TrainConfig", "warmup_frac"): FRACTION,
    ("TrainConfig", "warmup_steps"): NON_NEGATIVE, ("TrainConfig", "decay_frac"): Range(0, 1, lo_open=True),
    ("TrainConfig", "weight_decay"): NON_NEGATIVE, ("TrainConfig", "beta2"): FRACTION,
    ("TrainConfig", "grad_clip"): POSITIVE, ("TrainConfig", "ema_decay"): FRACTION,
    ("TrainConfig", "ema_profiles"): Range(0, 0.3, lo_open=True), ("TrainConfig", "ema_snapshots"): NON_NEGATIVE,
    ("TrainConfig", "log_every"): AT_LEAST_1, ("TrainConfig", "checkpoint_every"): AT_LEAST_1,
    ("SampleConfig", "steps"): NON_NEGATIVE, ("SampleConfig", "guidance"): NON_NEGATIVE,
    ("SampleConfig", "temperature"): POSITIVE, ("SampleConfig", "top_k"): NON_NEGATIVE,
    ("SampleConfig", "choice_temperature"): NON_NEGATIVE, ("SampleConfig", "shift"): POSITIVE,
    # the learned tokenizers' config (flopmatch.tokenizers.autoencoder), validated through the same table
    ("AutoencoderConfig", "image_size"): Range(16, 1024), ("AutoencoderConfig", "patch"): AT_LEAST_1,
    ("AutoencoderConfig", "num_res_blocks"): NON_NEGATIVE, ("AutoencoderConfig", "latent_channels"): AT_LEAST_1,
    ("AutoencoderConfig", "kl_weight"): NON_NEGATIVE, ("AutoencoderConfig", "bits"): Range(1, 20),
    ("AutoencoderConfig", "commitment_weight"): NON_NEGATIVE, ("AutoencoderConfig", "entropy_weight"): NON_NEGATIVE,
    ("AutoencoderConfig", "diversity_weight"): NON_NEGATIVE, ("AutoencoderConfig", "entropy_temperature"): POSITIVE,
    ("AutoencoderConfig", "adv_weight"): NON_NEGATIVE, ("AutoencoderConfig", "adv_start"): NON_NEGATIVE,
    ("AutoencoderConfig", "steps"): AT_LEAST_1, ("AutoencoderConfig", "batch_size"): AT_LEAST_1,
    ("AutoencoderConfig", "lr"): POSITIVE, ("AutoencoderConfig", "min_lr_ratio"): PROBABILITY,
    ("AutoencoderConfig", "warmup_steps"): NON_NEGATIVE, ("AutoencoderConfig", "weight_decay"): NON_NEGATIVE,
    ("AutoencoderConfig", "beta2"): FRACTION, ("AutoencoderConfig", "grad_clip"): POSITIVE,
    ("AutoencoderConfig", "num_train"): AT_LEAST_1, ("AutoencoderConfig", "stats_images"): AT_LEAST_1,
    ("AutoencoderConfig", "log_every"): AT_LEAST_1,
}
PRECISIONS = ("auto", "bf16", "fp32")
PARALLEL = ("ddp", "fsdp2")  # how flopmatch.dist.wrap splits training across torchrun processes
# train.fsdp_param_dtype: no "auto" following train.precision. The default must stay fp32, what FSDP2 runs written
# before this key computed: their config.json lacks it and is read with the default, and a resume must not change their
# numbers. An explicit bf16 is one visible setting where an "auto" would hide a numeric choice behind another key's.
FSDP_PARAM_DTYPES = ("fp32", "bf16")
# The learning-rate schedules of flopmatch.schedule.lr_at; only wsd and constant runs can grow to a larger budget.
SCHEDULES = ("cosine", "wsd", "constant")
SOLVERS = ("euler", "heun")  # the flow ODE solvers of flopmatch.objectives.ode
TRACKERS = ("tensorboard", "wandb")  # the experiment trackers of flopmatch.tracking
# The sources flopmatch.data.datasets.make_dataset knows: a name, or a kind with an argument ("folder:PATH").
DATASETS = ("shapes", "fashion-mnist", "emoji")
SOURCE_KINDS = ("folder", "wds", "hf")
SOURCE_FIELDS = {("DataConfig", "name"), ("AutoencoderConfig", "data")}
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("TextConfig", "kind"): ("minilm", "hash"), ("TokenizerConfig", "kind"): ("auto", "patch", "kmeans"),
    ("TrainConfig", "precision"): PRECISIONS, ("TrainConfig", "schedule"): SCHEDULES, ("ObjectiveConfig", "name"): PARADIGMS,
    ("TrainConfig", "parallel"): PARALLEL, ("TrainConfig", "fsdp_param_dtype"): FSDP_PARAM_DTYPES,
    ("AutoencoderConfig", "kind"): ("kl", "lfq"), ("AutoencoderConfig", "recon_loss"): ("l1", "l2", "l1+l2"),
    ("AutoencoderConfig", "precision"): PRECISIONS, ("SampleConfig", "solver"): SOLVERS,
    ("TrainConfig", "trackers"): TRACKERS,  # a list field: each item must be one of them
}
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d+)?"  # what train.device may name (flopmatch.device.resolve_device)


# Where each section lives in a RunConfig (for messages and --set keys).
SECTION_KEYS = {"DataConfig": "data", "TextConfig": "text", "TokenizerConfig": "tokenizer", "ModelConfig": "model",
                "ObjectiveConfig": "objective", "TrainConfig": "train", "SampleConfig": "sample"}


def field_help() -> dict[tuple[str, str], str]:
    """(dataclass name, field) -> the comment on its line in this module's source: each field's meaning,
    written once, where the field is defined. Empty if the source is not available."""
    try:
        lines = inspect.getsource(sys.modules[__name__]).splitlines()
    except (OSError, TypeError):
        return {}
    out, cls = {}, None
    for line in lines:
        if m := re.match(r"class (\w+)", line):
            cls = m.group(1)
        elif cls and (m := re.match(r"    (\w+): [^=]+=.*?  # (.*)$", line)):
            out[(cls, m.group(1))] = m.group(2)
    return out


def describe(cfg, where: str = "") -> list[dict]:
    """Every --set key of a dataclass tree: key, type, current value, allowed values and meaning."""
    docs, rows = field_help(), []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            rows += describe(value, key)
            continue
        rule = (type(cfg).__name__, f.name)
        allowed = str(RANGES[rule]) if rule in RANGES else " | ".join(CHOICES[rule]) if rule in CHOICES else ""
        tp = hints[f.name]
        rows.append({"key": key, "type": getattr(tp, "__name__", str(tp)), "value": value, "allowed": allowed,
                     "help": docs.get(rule, "")})
    return rows


def check_fields(cfg, where: str = "") -> None:
    """Check every field of a dataclass tree against RANGES and CHOICES; floats must be finite. UserError names the key."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            check_fields(value, f.name if not where else key)
            continue
        rule = (type(cfg).__name__, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key} must be a finite number, got {value}")
        if rule in RANGES and isinstance(value, list):  # a list field: each item in range
            if bad := [v for v in value if not isinstance(v, (int, float)) or v not in RANGES[rule]]:
                raise UserError(f"{key}: item {bad[0]!r} must be {RANGES[rule]}")
        elif rule in RANGES and value not in RANGES[rule]:
            raise UserError(f"{key} must be {RANGES[rule]}, got {value:g}")
        if rule in CHOICES and isinstance(value, list):  # a list field: each item is one of the choices
            if bad := [v for v in value if v not in CHOICES[rule]]:
                raise UserError(f"{key}: unknown item {bad[0]!r}; each must be one of {', '.join(CHOICES[rule])}")
        elif rule in CHOICES and value not in CHOICES[rule]:
            raise UserError(f"{key} must be one of {', '.join(CHOICES[rule])}, got {value!r}")
        if rule in SOURCE_FIELDS:
            parse_source(value, key)


def parse_source(name: str, key: str = "--data") -> tuple[str, str]:
    """A data source name -> (kind, argument): "shapes" -> ("shapes", ""), "folder:imgs" -> ("folder", "imgs")."""
    if name in DATASETS:
        return name, ""
    kind, sep, arg = str(name).partition(":")
    if sep and kind in SOURCE_KINDS and arg:
        return kind, arg
    forms = ", ".join([*DATASETS, *(f"{k}:PATH" for k in SOURCE_KINDS)])
    raise UserError(f"{key}: unknown dataset {name!r}; use one of {forms}")


def validate_sample(s: SampleConfig) -> None:
    """Raise UserError on impossible sampling settings (finite numbers in range; see RANGES)."""
    check_fields(s, "sample")


# --------------------------------------------------------------------------- JSON round trip


def to_dict(cfg) -> dict:
    """A dataclass tree as plain JSON-able dicts."""
    return dataclasses.asdict(cfg)


# Keys renamed since configs were first written, (dataclass, old key) -> new key. Files written by
# earlier versions (run directories, --config files) are read through these; new files use the new names.
RENAMED = {("SampleConfig", "cfg"): "guidance", ("StudyConfig", "eval_cfg"): "eval_guidance",
           ("NetSpec", "vocab"): "vocab_size", ("TokenizerSpec", "kind"): "tokens"}
# --set paths renamed the same way (a key ending in "." renames a prefix, others a whole path).
RENAMED_PATHS = {"sample.cfg": "sample.guidance", "method.": "objective.", "objective": "objective.name"}


def renamed_keys(cls_name: str, data: dict) -> dict:
    """A copy of ``data`` (the fields of dataclass ``cls_name``) with keys of earlier versions renamed (RENAMED)."""
    return {RENAMED.get((cls_name, k), k): v for k, v in data.items()}


def _migrate(cls, data: dict) -> dict:
    """``data`` with keys written by earlier versions renamed to today's (see RENAMED)."""
    data = renamed_keys(cls.__name__, data)
    if cls.__name__ == "RunConfig" and (isinstance(data.get("objective"), str) or "method" in data):
        # v0.1 kept the paradigm name at the top ("objective": "masked") and its hyper-parameters in
        # "method"; either could be absent (then the defaults applied).
        name = data.get("objective") if isinstance(data.get("objective"), str) else ObjectiveConfig.name
        data["objective"] = {"name": name, **(data.pop("method", None) or {})}
    if cls.__name__ == "DataConfig" and data.get("name", DataConfig.name) != "shapes":
        # Earlier versions recorded a holdout on another source and never applied it: what the run trained on is
        # read without it, so such a run compares equal to (and resumes under) the same config written today.
        data = {k: v for k, v in data.items() if k not in HOLDOUT_FIELDS}
    return data


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise UserError.

    Keys written by earlier versions are migrated first, so old run directories stay readable.
    """
    if not isinstance(data, dict):
        raise UserError(f"config section {where or cls.__name__} must be an object, got {type(data).__name__}")
    data = _migrate(cls, data)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise UserError(f"unknown config key {where + '.' if where else ''}{sorted(unknown)[0]}; valid keys: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, key)
        else:
            kwargs[name] = _coerce(tp, value, key)
    return cls(**kwargs)


def _coerce(tp, value, key: str):
    """Check/convert a JSON value to the field type ``tp`` (int, float, bool, str, list[T], dict[str, T], T | None)."""
    origin = typing.get_origin(tp)
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key {key} must be an object, got {value!r}")
        _, inner = typing.get_args(tp)
        return {str(k): _coerce(inner, v, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(inner, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"config key {key} must be a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(inner, v, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is dict:  # a free-form JSON object (e.g. a plan's whole run config, checked where it is used)
        if isinstance(value, dict):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise UserError(f"config key {key} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def parse_value(tp, text: str, key: str):
    """Parse command-line text for a field of type ``tp``."""
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        items = [s.strip() for s in text.split(",") if s.strip()] if text.strip() else []
        return [parse_value(inner, s, key) for s in items]
    try:
        if tp is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            f = float(text)  # accept 1e3
            if not f.is_integer():
                raise ValueError
            return int(f)
        if tp is float:
            return float(text)
        if tp is str:
            return text
    except ValueError:
        pass
    raise UserError(f"--set {key}={text}: expected {getattr(tp, '__name__', tp)}")


def current_path(path: str) -> str:
    """A run-config key as this version names it: "sample.cfg" -> "sample.guidance", "method.x" -> "objective.x"."""
    for old, new in RENAMED_PATHS.items():
        if path == old or (old.endswith(".") and path.startswith(old)):
            return new + path[len(old):]
    return path


def apply_overrides(cfg, overrides: list[str]):
    """Apply ``section.key=value`` strings to a dataclass tree in place; returns cfg."""
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set expects section.key=value, got {item!r}")
        path, text = item.split("=", 1)
        path = path.strip()
        if isinstance(cfg, RunConfig):
            path = current_path(path)
        parts = path.strip().split(".")
        obj = cfg
        for i, part in enumerate(parts):
            if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
                valid = ", ".join(f.name for f in dataclasses.fields(obj)) if dataclasses.is_dataclass(obj) else ""
                raise UserError(f"unknown config key {'.'.join(parts[: i + 1])!r}" + (f"; valid here: {valid}" if valid else ""))
            if i == len(parts) - 1:
                tp = typing.get_type_hints(type(obj))[part]
                if dataclasses.is_dataclass(tp):
                    raise UserError(f"{path} is a section; set one of its keys, e.g. {path}.{dataclasses.fields(tp)[0].name}=...")
                setattr(obj, part, parse_value(tp, text, path))
            else:
                obj = getattr(obj, part)
    return cfg
