"""File I/O, owned in one place: atomic writes, safetensors, JSON, the one sha256 helper, the cache root.

Every whole file the project writes goes through here, so an interrupted process never leaves a
half-written output: we write to a temporary file in the same directory and ``os.replace`` it.
(Append-only logs, ``metrics.jsonl`` and worker logs, are appended in place; a resumed run trims
``metrics.jsonl`` back to its checkpoint.)
Tensors are stored as safetensors, never pickled (no ``torch.load`` of untrusted data).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flopmatch.errors import UserError


def _umask_mode() -> int:
    """Mode for new files under the current umask (mkstemp would leave them owner-only, 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_SHA256: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime_ns) -> digest, per process


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks (identifies weights and checkpoints in manifests).

    Remembered per process while the file's size and modification time are unchanged: evaluator
    weights (up to ~90 MB, ~0.3 s to hash) are checked once per process, not once per use.
    """
    resolved = Path(path).resolve()
    st = resolved.stat()
    key = (str(resolved), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(resolved, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


def tensor_sha256(t: torch.Tensor) -> str:
    """Hex sha256 of a tensor's raw bytes (C order, on CPU): identifies an image set in manifests and caches."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def cache_dir() -> Path:
    """The cache root: $FLOPMATCH_CACHE if set, else ~/.cache/flopmatch (created on demand).

    Holds what is computed once and keyed by content: fitted codebooks, encoded datasets, text
    states, reference features and trained evaluators.
    """
    root = Path(os.environ.get("FLOPMATCH_CACHE") or Path.home() / ".cache" / "flopmatch")
    root.mkdir(parents=True, exist_ok=True)
    return root


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + rename (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomically write a UTF-8 text file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> dict:
    """Read a JSON file; a missing or corrupt file is a UserError naming the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"corrupt JSON in {path} ({e.msg if hasattr(e, 'msg') else e}); delete it or restore it") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write a flat dict of tensors as safetensors (tensors made contiguous, on CPU)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; missing or corrupt files raise UserError naming the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"missing file {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"corrupt tensor file {path} ({e}); delete it and re-run") from None
